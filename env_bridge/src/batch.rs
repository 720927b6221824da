//! `RemoteBatch`: a batch of envs spread over env servers, K per server, every server
//! called at once per step; servers that die are restarted (or reconnected) within
//! `env.bridge_restarts`, and their envs' episodes reported lost.

use spur_core::backoff::Backoff;
use spur_core::config::EnvConfig;
use spur_core::env::{EnvBatch, EnvSpec, StepOutcome};
use spur_core::EnvError;
use spur_proto::v1::{RenderRequest, ResetRequest, StepReply, StepRequest};
use std::time::Duration;
use tracing::{info, warn};

use crate::process::BridgeProcess;
use crate::wire::{
    check_server, connect, decode_f32, protocol, runtime, server_error, server_is_gone, EnvClient,
};

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

/// One env server of a batch: how to reach it, its envs, and its restarts.
struct Server {
    /// Position among the batch's servers (0-based), for messages.
    index: usize,
    /// Where it serves: the bridge's loopback address, or the `env.remote` address
    /// as configured (resolved again on every reconnect).
    addr: String,
    client: EnvClient,
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
type Call<T> = tokio::task::JoinHandle<Result<T, tonic::Status>>;

/// The wait between tries of one recovery after the first, which goes at once: 0.5 s
/// doubling up to 8 s, with jitter.
fn restart_backoff() -> Backoff {
    Backoff::between(Duration::from_millis(500), Duration::from_secs(8))
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
        self.rt
            .block_on(call)
            .map_err(|e| protocol(&s.addr, format!("{what} call failed: {e}")))
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
        let mut backoff = restart_backoff();
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
            if attempt > 1 {
                std::thread::sleep(backoff.next_delay());
            }
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
        let skip = self.restart_exited()?;
        let calls = self.send_steps(actions, &skip);
        // Every reply is awaited before any is handled, so a restart does not leave
        // the other servers' steps unread.
        let mut replies = Vec::with_capacity(calls.len());
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
            match reply {
                Some(r) => self.take_step(si, r, obs, texts, outcomes)?,
                // Restarted: the step did not happen, and every episode is gone.
                None => {
                    for i in self.servers[si].envs_in_batch() {
                        mark_lost(i, outcomes, texts, &mut self.lost);
                    }
                }
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
        let text = self.rt.block_on(client.render(request)).ok()?.text;
        (!text.is_empty()).then_some(text)
    }
}

impl RemoteBatch {
    /// Before a step: restarts every bridge that exited since the last call (it is not
    /// stepped this time; the returned flags say which) and refuses to step a server
    /// whose envs were not reset since an earlier restart.
    fn restart_exited(&mut self) -> Result<Vec<bool>, EnvError> {
        let mut skip = vec![false; self.servers.len()];
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
        Ok(skip)
    }

    /// Sends every server not skipped its envs' actions, all at once.
    fn send_steps(&self, actions: &[i64], skip: &[bool]) -> Vec<Option<Call<StepReply>>> {
        self.servers
            .iter()
            .zip(skip)
            .map(|(s, &skip)| {
                (!skip).then(|| {
                    let mut client = s.client.clone();
                    let request = StepRequest {
                        actions: actions[s.envs_in_batch()].to_vec(),
                    };
                    self.rt.spawn(async move { client.step(request).await })
                })
            })
            .collect()
    }

    /// Checks server `si`'s step reply and writes its envs' observations, texts and
    /// outcomes into the batch's slots.
    fn take_step(
        &mut self,
        si: usize,
        r: StepReply,
        obs: &mut [f32],
        texts: &mut [String],
        outcomes: &mut [StepOutcome],
    ) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        let s = &self.servers[si];
        check_step_reply(&s.addr, &r, s.envs, d)?;
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
        Ok(())
    }
}

/// Checks that a step reply from `addr` holds one of everything for each of its `k`
/// envs, and `k` observations of `d` floats.
fn check_step_reply(addr: &str, r: &StepReply, k: usize, d: usize) -> Result<(), EnvError> {
    if r.rewards.len() != k
        || r.terminated.len() != k
        || r.truncated.len() != k
        || r.success.len() != k
        || r.texts.len() != k
    {
        return Err(protocol(
            addr,
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
            addr,
            format!(
                "{} observation bytes, expected {} ({k} envs of {d} floats)",
                r.observations.len(),
                k * d * 4
            ),
        ));
    }
    Ok(())
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
