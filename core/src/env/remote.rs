//! `RemoteBatch`: envs that live in env servers (`spur.v1.EnvService`, served by the
//! Python bridge in `bridge/python`), K per server, stepped with one call per server
//! and step. All servers are called at once, so several servers step in parallel.
//!
//! With `env.remote` empty the batch starts `env.servers` bridge processes itself
//! (`python -m spur_bridge ... --exit-with-parent`) and stops them when dropped; with
//! addresses it connects to servers someone else runs (a Kubernetes sidecar).
//!
//! A server that fails or answers out of protocol is an error for the caller: the
//! envs' state is gone with it, so there is nothing to retry mid-episode.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use spur_proto::v1::env_service_client::EnvServiceClient;
use spur_proto::v1::{EnvSpecReply, EnvSpecRequest, RenderRequest, ResetRequest, StepRequest};
use tonic::transport::{Channel, Endpoint};
use tracing::info;

use super::{EnvBatch, EnvSpec, ObsField, StepOutcome};
use crate::config::EnvConfig;
use crate::error::EnvError;
use crate::tensor::Element;

/// Largest message an env server may send (thousands of NetHack observations).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a bridge process may take to import its env and listen.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one reset or step call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The line a bridge prints once it serves.
const READY: &str = "SPUR_BRIDGE_LISTENING ";

/// A bridge process this side started; killed when dropped.
pub struct BridgeProcess {
    child: Child,
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
    /// Starts `python -m spur_bridge` for `num_envs` envs of `config.gym_id` on a free
    /// loopback port; returns it with its address once it serves.
    pub fn spawn(config: &EnvConfig, num_envs: usize) -> Result<(Self, String), EnvError> {
        let python = python(config);
        let mut cmd = Command::new(&python);
        // `--exit-with-parent` is Linux's parent-death signal, which fires when the
        // *thread* that started the bridge ends: every caller keeps the batch on the
        // thread that built it (the rollout thread, a blocking task), which ends with it.
        cmd.args([
            "-m",
            "spur_bridge",
            "--exit-with-parent",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--env-id", &config.gym_id])
        .args(["--num-envs", &num_envs.to_string()])
        .args(["--crop", &config.crop.to_string()])
        .args(["--max-episode-steps", &config.max_episode_steps.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let command = format!("{python} -m spur_bridge --env-id {}", config.gym_id);
        let spawn_error = |message: String| EnvError::Spawn {
            command: command.clone(),
            message,
        };
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
        let mut process = BridgeProcess { child };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(port) => Ok((process, format!("127.0.0.1:{port}"))),
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

fn endpoint(addr: &str) -> Result<Endpoint, EnvError> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true)
        })
        .map_err(|e| EnvError::Config(format!("env.remote `{addr}`: {e}")))
}

fn server_error(addr: &str, status: tonic::Status) -> EnvError {
    EnvError::Server {
        addr: addr.to_string(),
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

fn protocol(addr: &str, message: String) -> EnvError {
    EnvError::Protocol {
        addr: addr.to_string(),
        message,
    }
}

/// Converts an env server's spec.
fn to_spec(addr: &str, r: &EnvSpecReply) -> Result<EnvSpec, EnvError> {
    let fields: Vec<ObsField> = r
        .fields
        .iter()
        .map(|f| ObsField {
            name: f.name.clone(),
            shape: f.shape.iter().map(|&d| d as usize).collect(),
        })
        .collect();
    let obs_dim: usize = fields.iter().map(ObsField::size).sum();
    if obs_dim == 0 || r.num_actions == 0 {
        return Err(protocol(
            addr,
            format!(
                "an empty spec ({obs_dim} observation floats, {} actions)",
                r.num_actions
            ),
        ));
    }
    Ok(EnvSpec {
        obs_dim,
        num_actions: r.num_actions as usize,
        has_text: r.has_text,
        max_episode_steps: r.max_episode_steps,
        fields,
    })
}

/// Little-endian f32s of `bytes` into `out`, which must match in length.
fn decode_f32(addr: &str, bytes: &[u8], out: &mut [f32]) -> Result<(), EnvError> {
    if bytes.len() != out.len() * 4 {
        return Err(protocol(
            addr,
            format!(
                "{} observation bytes, expected {} ({} floats)",
                bytes.len(),
                out.len() * 4,
                out.len()
            ),
        ));
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::read_le(b);
    }
    Ok(())
}

struct Server {
    addr: String,
    client: EnvServiceClient<Channel>,
    /// Index of this server's first env in the batch.
    offset: usize,
    envs: usize,
    _process: Option<BridgeProcess>,
}

impl Server {
    /// This server's envs, as indices into the batch.
    fn envs_in_batch(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.envs
    }
}

pub struct RemoteBatch {
    rt: tokio::runtime::Runtime,
    servers: Vec<Server>,
    spec: EnvSpec,
    num_envs: usize,
}

/// A call in flight on the batch's runtime.
type Call<T> = tokio::task::JoinHandle<Result<tonic::Response<T>, tonic::Status>>;

impl RemoteBatch {
    /// Waits for `call` to server `s`, turning every failure into an [`EnvError`].
    fn finish<T>(&self, s: &Server, call: Call<T>, what: &str) -> Result<T, EnvError> {
        Ok(self
            .rt
            .block_on(call)
            .map_err(|e| protocol(&s.addr, format!("{what} call failed: {e}")))?
            .map_err(|status| server_error(&s.addr, status))?
            .into_inner())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, EnvError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EnvError::Config(format!("cannot start a runtime for env calls: {e}")))
}

async fn connect(addr: &str) -> Result<(EnvServiceClient<Channel>, EnvSpecReply), EnvError> {
    let channel = endpoint(addr)?
        .connect()
        .await
        .map_err(|e| EnvError::Server {
            addr: addr.to_string(),
            message: format!("cannot connect: {e}"),
        })?;
    let mut client = EnvServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let spec = client
        .spec(EnvSpecRequest {})
        .await
        .map_err(|s| server_error(addr, s))?
        .into_inner();
    Ok((client, spec))
}

impl RemoteBatch {
    /// `n` envs as `config` describes: on the servers of `env.remote`, or on
    /// `env.servers` bridge processes started here. Call it outside any async runtime.
    pub fn connect(config: &EnvConfig, n: usize) -> Result<Self, EnvError> {
        let rt = runtime()?;
        let mut targets: Vec<(String, Option<BridgeProcess>)> = Vec::new();
        if config.remote.is_empty() {
            let k = config.servers.max(1) as usize;
            if !n.is_multiple_of(k) {
                return Err(EnvError::Config(format!(
                    "{n} envs do not split evenly over env.servers = {k}"
                )));
            }
            for _ in 0..k {
                let (p, addr) = BridgeProcess::spawn(config, n / k)?;
                targets.push((addr, Some(p)));
            }
        } else {
            targets.extend(config.remote.iter().map(|a| (a.clone(), None)));
        }
        let mut servers = Vec::with_capacity(targets.len());
        let mut spec: Option<EnvSpec> = None;
        let mut offset = 0;
        for (addr, process) in targets {
            let (client, reply) = rt.block_on(connect(&addr))?;
            if reply.env_id != config.gym_id {
                return Err(protocol(
                    &addr,
                    format!(
                        "serves {}, not env.gym_id = {}",
                        reply.env_id, config.gym_id
                    ),
                ));
            }
            let s = to_spec(&addr, &reply)?;
            match &spec {
                Some(first) if *first != s => {
                    return Err(protocol(
                        &addr,
                        "its spec differs from the first server's".into(),
                    ))
                }
                Some(_) => {}
                None => spec = Some(s),
            }
            let envs = reply.num_envs as usize;
            servers.push(Server {
                addr,
                client,
                offset,
                envs,
                _process: process,
            });
            offset += envs;
        }
        if offset != n {
            return Err(EnvError::Config(format!(
                "the env servers hold {offset} envs in all, but env.num_envs is {n}"
            )));
        }
        let spec = spec.ok_or_else(|| EnvError::Config("no env server".into()))?;
        info!(
            env = config.gym_id,
            servers = servers.len(),
            num_envs = n,
            obs_dim = spec.obs_dim,
            num_actions = spec.num_actions,
            "env servers ready"
        );
        Ok(Self {
            rt,
            servers,
            spec,
            num_envs: n,
        })
    }
}

impl EnvBatch for RemoteBatch {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn num_envs(&self) -> usize {
        self.num_envs
    }

    fn reset(&mut self, envs: &[usize], seeds: &[u64], obs: &mut [f32]) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        let mut calls = Vec::new();
        for s in &self.servers {
            let (mine, my_seeds): (Vec<u32>, Vec<u64>) = envs
                .iter()
                .zip(seeds)
                .filter(|(&i, _)| s.envs_in_batch().contains(&i))
                .map(|(&i, &seed)| ((i - s.offset) as u32, seed))
                .unzip();
            if mine.is_empty() {
                continue;
            }
            let mut client = s.client.clone();
            let request = ResetRequest {
                env_indices: mine.clone(),
                seeds: my_seeds,
            };
            calls.push((
                s,
                mine,
                self.rt.spawn(async move { client.reset(request).await }),
            ));
        }
        let mut firsts = Vec::new();
        for (s, mine, call) in calls {
            let reply = self.finish(s, call, "reset")?;
            firsts.resize(mine.len() * d, 0.0);
            decode_f32(&s.addr, &reply.observations, &mut firsts)?;
            for (first, &local) in firsts.chunks_exact(d).zip(&mine) {
                let i = s.offset + local as usize;
                obs[i * d..(i + 1) * d].copy_from_slice(first);
            }
        }
        Ok(())
    }

    fn step(
        &mut self,
        actions: &[i64],
        obs: &mut [f32],
        texts: &mut [String],
        outcomes: &mut [StepOutcome],
    ) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        let calls: Vec<_> = self
            .servers
            .iter()
            .map(|s| {
                let mut client = s.client.clone();
                let request = StepRequest {
                    actions: actions[s.envs_in_batch()].to_vec(),
                };
                self.rt.spawn(async move { client.step(request).await })
            })
            .collect();
        for (s, call) in self.servers.iter().zip(calls) {
            let r = self.finish(s, call, "step")?;
            let k = s.envs;
            if r.rewards.len() != k
                || r.terminated.len() != k
                || r.truncated.len() != k
                || r.success.len() != k
                || r.texts.len() != k
            {
                return Err(protocol(
                    &s.addr,
                    format!(
                        "a step reply for {k} envs with {} rewards, {} terminated, {} truncated, \
                         {} success flags and {} texts",
                        r.rewards.len(),
                        r.terminated.len(),
                        r.truncated.len(),
                        r.success.len(),
                        r.texts.len()
                    ),
                ));
            }
            let range = s.envs_in_batch();
            decode_f32(
                &s.addr,
                &r.observations,
                &mut obs[range.start * d..range.end * d],
            )?;
            for (j, text) in r.texts.into_iter().enumerate() {
                let i = s.offset + j;
                if !r.rewards[j].is_finite() {
                    return Err(protocol(
                        &s.addr,
                        format!("env {j} returned reward {}", r.rewards[j]),
                    ));
                }
                outcomes[i] = StepOutcome {
                    reward: r.rewards[j],
                    terminated: r.terminated[j],
                    truncated: r.truncated[j] && !r.terminated[j],
                    success: r.success[j],
                    expert_action: None,
                };
                texts[i] = text;
            }
        }
        Ok(())
    }

    fn render_text(&self, i: usize) -> Option<String> {
        let s = self
            .servers
            .iter()
            .find(|s| s.envs_in_batch().contains(&i))?;
        let mut client = s.client.clone();
        let request = RenderRequest {
            env_index: (i - s.offset) as u32,
        };
        let text = self
            .rt
            .block_on(client.render(request))
            .ok()?
            .into_inner()
            .text;
        (!text.is_empty()).then_some(text)
    }
}

/// The spec of `config`'s gym env: asked of the first `env.remote` server, or of a
/// one-env bridge process started for the question. Cached per process.
pub fn spec(config: &EnvConfig) -> Result<EnvSpec, EnvError> {
    static CACHE: OnceLock<Mutex<Vec<(EnvConfig, EnvSpec)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((_, s)) = cache
        .lock()
        .expect("the spec cache is never poisoned")
        .iter()
        .find(|(c, _)| c == config)
    {
        return Ok(s.clone());
    }
    // A thread of its own, so this works from inside an async runtime as well.
    let spec = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<EnvSpec, EnvError> {
                let rt = runtime()?;
                let (addr, _process) = match config.remote.first() {
                    Some(a) => (a.clone(), None),
                    None => {
                        let (p, a) = BridgeProcess::spawn(config, 1)?;
                        (a, Some(p))
                    }
                };
                let (_, reply) = rt.block_on(connect(&addr))?;
                to_spec(&addr, &reply)
            })
            .join()
            .unwrap_or_else(|_| Err(EnvError::Config("the spec query panicked".into())))
    })?;
    cache
        .lock()
        .expect("the spec cache is never poisoned")
        .push((config.clone(), spec.clone()));
    Ok(spec)
}
