//! `RemoteBatch`: envs that live in env servers (`spur.v1.EnvService`, served by the
//! Python bridge in `bridge/python`), K per server, stepped with one call per server
//! and step. All servers are called at once, so several servers step in parallel.
//!
//! With `env.remote` empty the batch starts `env.servers` bridge processes itself
//! (`python -m spur_bridge ... --exit-with-parent`) and stops them when dropped; with
//! addresses it connects to servers someone else runs (a Kubernetes sidecar).
//!
//! A server that dies (its process exits, or a call fails in transport) takes its
//! envs' episodes with it: there is nothing to retry mid-episode. The batch restarts
//! the bridge (for `env.remote`, reconnects to the address, resolving it again) with
//! backoff, up to `env.bridge_restarts` times per server over its life, and reports
//! the envs' episodes [`lost`](super::StepOutcome::lost) so that the caller starts new
//! ones; once the budget is spent the failure is an error naming the server. A server
//! that answers out of protocol is an error at once.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use spur_proto::v1::env_service_client::EnvServiceClient;
use spur_proto::v1::{EnvSpecReply, EnvSpecRequest, RenderRequest, ResetRequest, StepRequest};
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

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
            Ok(port) => {
                let addr = format!("127.0.0.1:{port}");
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

/// One env server of a batch, as [`RemoteBatch::bridges`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInfo {
    /// Where it serves now (a restarted bridge listens on a new port).
    pub addr: String,
    /// Its envs, as indices into the batch.
    pub envs: std::ops::Range<usize>,
    /// The bridge process, when the batch started it (`None` for `env.remote`).
    pub pid: Option<u32>,
    /// Restarts (or reconnects) of it tried so far.
    pub restarts: u32,
}

struct Server {
    /// Position among the batch's servers (0-based), for messages.
    index: usize,
    /// Where it serves: the bridge's loopback address, or the `env.remote` address
    /// as configured (resolved again on every reconnect).
    addr: String,
    client: EnvServiceClient<Channel>,
    /// Index of this server's first env in the batch.
    offset: usize,
    envs: usize,
    /// The bridge process, when this batch started it; `None` for `env.remote`.
    process: Option<BridgeProcess>,
    /// Whether this batch started it (and so restarts it rather than reconnecting).
    own: bool,
    /// Pid of the newest bridge process, kept for messages after it is gone.
    pid: Option<u32>,
    /// Restarts (or reconnects) tried so far, over the batch's life.
    restarts: u32,
    /// Restarted and not reset since: no env holds an episode, so it cannot step.
    fresh: bool,
}

impl Server {
    /// This server's envs, as indices into the batch.
    fn envs_in_batch(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.envs
    }

    /// How messages name it: `bridge 2 of 4 (envs 8..16 at 127.0.0.1:40123, pid 812)`
    /// or `server 10.0.0.7:50051 (envs 0..16)`, numbered among all of `place`'s
    /// servers and envs.
    fn describe(&self, place: &Place) -> String {
        let r = self.envs_in_batch();
        let (start, end) = (place.first_env + r.start, place.first_env + r.end);
        if self.own {
            let pid = self.pid.map_or(String::new(), |p| format!(", pid {p}"));
            format!(
                "bridge {} of {} (envs {start}..{end} at {}{pid})",
                place.first_server + self.index + 1,
                place.all_servers,
                self.addr
            )
        } else {
            format!("server {} (envs {start}..{end})", self.addr)
        }
    }

    /// The exit status of its bridge process, if that has ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(BridgeProcess::exited)
    }
}

/// Envs on env servers. A server that dies (its process exits, or a call fails in
/// transport) is restarted, or for `env.remote` reconnected, up to
/// `env.bridge_restarts` times with backoff; its envs' episodes are reported
/// [`lost`](StepOutcome::lost) and the envs wait for a reset.
pub struct RemoteBatch {
    rt: tokio::runtime::Runtime,
    config: EnvConfig,
    servers: Vec<Server>,
    spec: EnvSpec,
    num_envs: usize,
    /// Per env: its episode went with a restarted server and the caller has not been
    /// told yet (it is, at the next step).
    lost: Vec<bool>,
    /// Restarts tried, all servers together.
    restarts: u64,
    /// Where the batch sits among the envs of its user, for messages.
    place: Place,
}

/// Where a batch sits when it is one of several that together hold a user's envs
/// (an actor that steps its envs in halves): its servers and envs are named by their
/// position among all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Servers of the batches before this one.
    pub first_server: usize,
    /// Servers of all batches together.
    pub all_servers: usize,
    /// Envs of the batches before this one.
    pub first_env: usize,
}

/// A call in flight on the batch's runtime.
type Call<T> = tokio::task::JoinHandle<Result<tonic::Response<T>, tonic::Status>>;

/// Whether a failed call means the server is gone (or its envs are in an unknown
/// state), so that restarting it is the way on; other codes are answers to a bad
/// request and stay errors.
fn server_is_gone(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Aborted
            | Code::DataLoss
    )
}

/// How long to wait before the `attempt`-th try (1-based) of one recovery: the
/// first at once, then 0.5 s doubling up to 8 s, with jitter.
fn restart_delay(attempt: u32) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let base = Duration::from_millis(500) * 2u32.pow((attempt - 2).min(4));
    base.mul_f64(rand::random_range(0.5..=1.0))
}

/// Checks that a server answering `reply` serves `config`'s env; returns its spec.
fn check_server(config: &EnvConfig, addr: &str, reply: &EnvSpecReply) -> Result<EnvSpec, EnvError> {
    if reply.env_id != config.gym_id {
        return Err(protocol(
            addr,
            format!(
                "serves {}, not env.gym_id = {}",
                reply.env_id, config.gym_id
            ),
        ));
    }
    to_spec(addr, reply)
}

impl RemoteBatch {
    /// Waits for `call` to server `s`; a task failure is an error, a failed call is
    /// returned as its status for the caller to judge.
    fn wait<T>(
        &self,
        s: &Server,
        call: Call<T>,
        what: &str,
    ) -> Result<Result<T, tonic::Status>, EnvError> {
        Ok(self
            .rt
            .block_on(call)
            .map_err(|e| protocol(&s.addr, format!("{what} call failed: {e}")))?
            .map(tonic::Response::into_inner))
    }

    /// The batch's servers: addresses, envs, bridge pids and restarts so far.
    pub fn bridges(&self) -> Vec<BridgeInfo> {
        self.servers
            .iter()
            .map(|s| BridgeInfo {
                addr: s.addr.clone(),
                envs: s.envs_in_batch(),
                pid: s.process.as_ref().map(BridgeProcess::pid),
                restarts: s.restarts,
            })
            .collect()
    }

    /// Handles a failed call to server `si`: restarts it if the failure means it is
    /// gone, else returns the failure as an error.
    fn on_failure(&mut self, si: usize, status: tonic::Status, what: &str) -> Result<(), EnvError> {
        let exited = self.servers[si].exited();
        if !server_is_gone(&status) && exited.is_none() {
            return Err(server_error(&self.servers[si].addr, status));
        }
        let mut cause = format!(
            "{what} call failed: {:?}: {}",
            status.code(),
            status.message()
        );
        if let Some(e) = exited {
            cause.push_str(&format!(" (the bridge process exited: {e})"));
        }
        self.recover(si, cause)
    }

    /// Restarts (own bridge) or reconnects to (`env.remote`) server `si`, which is
    /// gone because of `cause`, with backoff between tries and within the
    /// `env.bridge_restarts` budget. Afterwards the server holds no episodes: all its
    /// envs are marked lost and it must be reset before it is stepped.
    fn recover(&mut self, si: usize, mut cause: String) -> Result<(), EnvError> {
        let limit = self.config.bridge_restarts;
        // Stop what is left of the old process (dropping kills and reaps it).
        self.servers[si].process = None;
        warn!(bridge = %self.servers[si].describe(&self.place), cause, "env bridge failed");
        let mut attempt = 0;
        loop {
            let s = &mut self.servers[si];
            if s.restarts >= limit {
                return Err(EnvError::BridgeFailed {
                    bridge: s.describe(&self.place),
                    restarts: s.restarts,
                    message: cause,
                });
            }
            attempt += 1;
            std::thread::sleep(restart_delay(attempt));
            s.restarts += 1;
            self.restarts += 1;
            metrics::counter!("spur_actor_bridge_restarts_total").increment(1);
            match self.reconnect(si) {
                Ok(()) => break,
                // It answers, but serves something else: no restart will fix that.
                Err(e @ EnvError::Protocol { .. }) => return Err(e),
                Err(e) => {
                    let bridge = self.servers[si].describe(&self.place);
                    warn!(%bridge, attempt, error = %e, "env bridge restart failed");
                    cause = e.to_string();
                }
            }
        }
        let s = &mut self.servers[si];
        s.fresh = true;
        self.lost[s.envs_in_batch()].fill(true);
        info!(
            bridge = %s.describe(&self.place),
            restarts = s.restarts,
            budget = limit,
            "env bridge restarted; its envs start new episodes"
        );
        Ok(())
    }

    /// One try of [`recover`](Self::recover): a new bridge process, or a new
    /// connection (and name resolution) to the `env.remote` address, checked to
    /// serve the same env and env count.
    fn reconnect(&mut self, si: usize) -> Result<(), EnvError> {
        let s = &mut self.servers[si];
        let (addr, process) = if s.own {
            let (p, addr) = BridgeProcess::spawn(&self.config, s.envs)?;
            (addr, Some(p))
        } else {
            (s.addr.clone(), None)
        };
        let (client, reply) = self.rt.block_on(connect(&addr))?;
        let spec = check_server(&self.config, &addr, &reply)?;
        if spec != self.spec || reply.num_envs as usize != s.envs {
            return Err(protocol(
                &addr,
                format!(
                    "after the restart it serves another spec or env count ({} envs; \
                     before: {})",
                    reply.num_envs, s.envs
                ),
            ));
        }
        s.pid = process.as_ref().map(BridgeProcess::pid);
        s.process = process;
        s.addr = addr;
        s.client = client;
        Ok(())
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
        Self::connect_at(config, n, None)
    }

    /// Like [`connect`](Self::connect), for a batch that is one of several at
    /// `place` (`None`: the only one).
    pub fn connect_at(
        config: &EnvConfig,
        n: usize,
        place: Option<Place>,
    ) -> Result<Self, EnvError> {
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
        for (index, (addr, process)) in targets.into_iter().enumerate() {
            let (client, reply) = rt.block_on(connect(&addr))?;
            let s = check_server(config, &addr, &reply)?;
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
                index,
                addr,
                client,
                offset,
                envs,
                own: process.is_some(),
                pid: process.as_ref().map(BridgeProcess::pid),
                process,
                restarts: 0,
                fresh: false,
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
            bridge_restarts = config.bridge_restarts,
            "env servers ready"
        );
        let place = place.unwrap_or(Place {
            first_server: 0,
            all_servers: servers.len(),
            first_env: 0,
        });
        Ok(Self {
            rt,
            config: config.clone(),
            servers,
            spec,
            num_envs: n,
            lost: vec![false; n],
            restarts: 0,
            place,
        })
    }
}

/// Placeholder seed for the envs of a restarted server that a reset did not ask for:
/// their episodes are reported lost at the next step, and started again properly.
const PLACEHOLDER_SEED: u64 = 0;

impl EnvBatch for RemoteBatch {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn num_envs(&self) -> usize {
        self.num_envs
    }

    fn restarts(&self) -> u64 {
        self.restarts
    }

    fn reset(&mut self, envs: &[usize], seeds: &[u64], obs: &mut [f32]) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        // Per server: its envs to reset (local indices) with their seeds.
        let mut asks: Vec<Vec<(u32, u64)>> = self
            .servers
            .iter()
            .map(|s| {
                envs.iter()
                    .zip(seeds)
                    .filter(|(&i, _)| s.envs_in_batch().contains(&i))
                    .map(|(&i, &seed)| ((i - s.offset) as u32, seed))
                    .collect()
            })
            .collect();
        for (si, ask) in asks.iter().enumerate() {
            if ask.is_empty() {
                continue;
            }
            if let Some(e) = self.servers[si].exited() {
                self.recover(si, format!("the bridge process exited: {e}"))?;
            }
        }
        // Until every server has answered; a server that dies on the way is restarted
        // (which `recover` bounds) and asked again.
        while asks.iter().any(|a| !a.is_empty()) {
            let mut calls = Vec::new();
            for (si, s) in self.servers.iter().enumerate() {
                if asks[si].is_empty() {
                    continue;
                }
                // A restarted server steps only with every env reset: those not asked
                // for get a placeholder episode (they are reported lost anyway).
                let mut request = ResetRequest::default();
                if s.fresh {
                    for local in 0..s.envs as u32 {
                        let seed = asks[si]
                            .iter()
                            .find(|(l, _)| *l == local)
                            .map_or(PLACEHOLDER_SEED, |&(_, seed)| seed);
                        request.env_indices.push(local);
                        request.seeds.push(seed);
                    }
                } else {
                    (request.env_indices, request.seeds) = asks[si].iter().copied().unzip();
                }
                let mut client = s.client.clone();
                calls.push((si, request.env_indices.clone(), {
                    self.rt.spawn(async move { client.reset(request).await })
                }));
            }
            let mut replies = Vec::with_capacity(calls.len());
            for (si, asked, call) in calls {
                replies.push((si, asked, self.wait(&self.servers[si], call, "reset")?));
            }
            let mut firsts = Vec::new();
            for (si, asked, reply) in replies {
                let reply = match reply {
                    Ok(r) => r,
                    Err(status) => {
                        self.on_failure(si, status, "reset")?;
                        continue; // asked again on the restarted server
                    }
                };
                let s = &mut self.servers[si];
                firsts.resize(asked.len() * d, 0.0);
                decode_f32(&s.addr, &reply.observations, &mut firsts)?;
                s.fresh = false;
                for (first, &local) in firsts.chunks_exact(d).zip(&asked) {
                    if !asks[si].iter().any(|(l, _)| *l == local) {
                        // A placeholder episode: reported lost at the next step.
                        self.lost[s.offset + local as usize] = true;
                        continue;
                    }
                    let i = s.offset + local as usize;
                    obs[i * d..(i + 1) * d].copy_from_slice(first);
                    self.lost[i] = false;
                }
                asks[si].clear();
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
        let n = self.servers.len();
        // A bridge that exited since the last call is restarted before anything is
        // sent to it; it is not stepped this time.
        let mut skip = vec![false; n];
        for (si, skip) in skip.iter_mut().enumerate() {
            if let Some(e) = self.servers[si].exited() {
                self.recover(si, format!("the bridge process exited: {e}"))?;
                *skip = true;
            } else if self.servers[si].fresh {
                return Err(EnvError::Config(format!(
                    "env {}: its envs lost their episodes in a restart and must be reset \
                     before they are stepped",
                    self.servers[si].describe(&self.place)
                )));
            }
        }
        let calls: Vec<_> = self
            .servers
            .iter()
            .zip(&skip)
            .map(|(s, &skip)| {
                (!skip).then(|| {
                    let mut client = s.client.clone();
                    let request = StepRequest {
                        actions: actions[s.envs_in_batch()].to_vec(),
                    };
                    self.rt.spawn(async move { client.step(request).await })
                })
            })
            .collect();
        // Every reply is awaited before any is handled, so a restart does not leave
        // the other servers' steps unread.
        let mut replies = Vec::with_capacity(n);
        for (s, call) in self.servers.iter().zip(calls) {
            replies.push(match call {
                Some(call) => Some(self.wait(s, call, "step")?),
                None => None,
            });
        }
        for (si, reply) in replies.into_iter().enumerate() {
            let reply = match reply {
                Some(Ok(r)) => Some(r),
                Some(Err(status)) => {
                    self.on_failure(si, status, "step")?;
                    None
                }
                None => None,
            };
            let s = &self.servers[si];
            let Some(r) = reply else {
                // Restarted: the step did not happen, and every episode is gone.
                for i in s.envs_in_batch() {
                    mark_lost(i, outcomes, texts, &mut self.lost);
                }
                continue;
            };
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
            if r.observations.len() != k * d * 4 {
                return Err(protocol(
                    &s.addr,
                    format!(
                        "{} observation bytes, expected {} ({k} envs of {d} floats)",
                        r.observations.len(),
                        k * d * 4
                    ),
                ));
            }
            for (j, text) in r.texts.into_iter().enumerate() {
                let i = s.offset + j;
                if self.lost[i] {
                    // Its episode went with an earlier restart (one that a reset ran
                    // into); this step was a placeholder's.
                    mark_lost(i, outcomes, texts, &mut self.lost);
                    continue;
                }
                if !r.rewards[j].is_finite() {
                    return Err(protocol(
                        &s.addr,
                        format!("env {j} returned reward {}", r.rewards[j]),
                    ));
                }
                decode_f32(
                    &s.addr,
                    &r.observations[j * d * 4..(j + 1) * d * 4],
                    &mut obs[i * d..(i + 1) * d],
                )?;
                outcomes[i] = StepOutcome {
                    reward: r.rewards[j],
                    terminated: r.terminated[j],
                    truncated: r.truncated[j] && !r.terminated[j],
                    success: r.success[j],
                    expert_action: None,
                    lost: false,
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

/// Reports env `i`'s step as lost with its episode: no reward, no text.
fn mark_lost(i: usize, outcomes: &mut [StepOutcome], texts: &mut [String], lost: &mut [bool]) {
    outcomes[i] = StepOutcome {
        lost: true,
        ..StepOutcome::default()
    };
    texts[i].clear();
    lost[i] = false;
}
