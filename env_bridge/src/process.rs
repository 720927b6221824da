//! Bridge processes this side starts: `python -m spur_bridge` on a Unix socket in a
//! private temporary directory (`env.bridge_wire = "unix"`) or a free loopback port
//! (`"grpc"`), its log lines forwarded to ours, its address read from the line it
//! prints once it serves, and a clear error (with the last lines it wrote) when it
//! does not.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spur_core::config::{BridgeWire, EnvConfig};
use spur_core::EnvError;
use tracing::info;

/// How long a bridge process may take to import its env and listen.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The line a bridge prints once it serves.
const READY: &str = "SPUR_BRIDGE_LISTENING ";

/// A bridge process this side started; killed when dropped (and its socket's
/// directory removed).
pub struct BridgeProcess {
    child: Child,
    /// The directory of its Unix socket (unix wire only), only this user's.
    _socket_dir: Option<tempfile::TempDir>,
}

impl BridgeProcess {
    /// The process id (as in the "env bridge started" log line).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that runs bridges: `env.python`, else the active venv's, else the
/// project venv's, else `python3`.
pub fn python(config: &EnvConfig) -> String {
    if !config.python.is_empty() {
        return config.python.clone();
    }
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        let p = std::path::Path::new(&venv).join("bin/python");
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    // The project venv: in the working directory, then where this was built.
    for p in [
        ".venv/bin/python",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"),
    ] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "python3".into()
}

impl BridgeProcess {
    /// Starts `python -m spur_bridge` for `num_envs` envs of `config.gym_id` on the
    /// wire `config.bridge_wire` names; returns it with its address (`unix:PATH` or
    /// `127.0.0.1:PORT`) once it serves.
    pub fn spawn(config: &EnvConfig, num_envs: usize) -> Result<(Self, String), EnvError> {
        let python = python(config);
        let command = format!("{python} -m spur_bridge --env-id {}", config.gym_id);
        let spawn_error = |message: String| EnvError::Spawn {
            command: command.clone(),
            message,
        };
        // A killed actor cannot remove its bridge's socket directory; the bridge,
        // stopped by the parent-death signal, removes it (`--remove-socket-dir`).
        let (listen, socket_dir) = match config.bridge_wire {
            BridgeWire::Grpc => ("127.0.0.1:0".to_string(), None),
            BridgeWire::Unix => {
                let dir = tempfile::Builder::new()
                    .prefix("spur-bridge-")
                    .tempdir()
                    .map_err(|e| spawn_error(format!("cannot make its socket's directory: {e}")))?;
                let listen = format!("unix:{}", dir.path().join("env.sock").display());
                (listen, Some(dir))
            }
        };
        let mut cmd = Command::new(&python);
        // `--exit-with-parent` is Linux's parent-death signal, which fires when the
        // *thread* that started the bridge ends: every caller keeps the batch on the
        // thread that built it (the rollout thread, a blocking task), which ends with it.
        cmd.args([
            "-m",
            "spur_bridge",
            "--exit-with-parent",
            "--listen",
            &listen,
        ])
        .args(socket_dir.as_ref().map(|_| "--remove-socket-dir"))
        .args(["--env-id", &config.gym_id])
        .args(["--num-envs", &num_envs.to_string()])
        .args(["--crop", &config.crop.to_string()])
        .args(["--max-episode-steps", &config.max_episode_steps.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            spawn_error(format!(
                "{e} (run `make setup`, or set env.python to a Python with spur_bridge)"
            ))
        })?;
        // The bridge's log lines go to ours; the last few explain a failed start.
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let tail_w = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                info!(target: "spur_bridge", "{line}");
                let mut t = tail_w.lock().expect("the tail lock is never poisoned");
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix(READY) {
                    let _ = tx.send(port.trim().to_string());
                }
            }
        });
        let mut process = BridgeProcess {
            child,
            _socket_dir: socket_dir,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(at) => {
                // A port for gRPC, the address itself for the unix wire.
                let addr = if at.starts_with("unix:") {
                    at
                } else {
                    format!("127.0.0.1:{at}")
                };
                info!(
                    pid = process.pid(),
                    addr,
                    env = config.gym_id,
                    num_envs,
                    "env bridge started"
                );
                Ok((process, addr))
            }
            Err(_) => {
                // Either it exited (the channel closed) or it hung: stop it, then explain.
                let _ = process.child.kill();
                let status = process.child.wait().ok();
                std::thread::sleep(Duration::from_millis(100)); // let the stderr thread drain
                let said: Vec<String> = tail
                    .lock()
                    .expect("the tail lock is never poisoned")
                    .iter()
                    .cloned()
                    .collect();
                Err(spawn_error(format!(
                    "exited ({}) before serving; it said: {}",
                    status.map_or("killed after the start timeout".into(), |s| s.to_string()),
                    if said.is_empty() {
                        "nothing".into()
                    } else {
                        said.join(" | ")
                    }
                )))
            }
        }
    }
}
