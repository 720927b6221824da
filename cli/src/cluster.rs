//! A learner and N actors as child processes of this one: started in their own
//! process group (so a terminal's Ctrl-C reaches only the supervisor, which then stops
//! them in order), logging to `<run dir>/logs/`, watched, replaced when an actor
//! crashes, and stopped with SIGTERM, then SIGKILL after a grace period.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use spur_core::Config;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus, RewardStatusRequest, StatusRequest};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::warn;

/// How often a crashed actor slot is restarted before the run fails.
pub const MAX_ACTOR_RESTARTS: u32 = 3;

pub struct ActorSlot {
    pub index: u32,
    pub child: Option<Child>,
    pub restarts: u32,
    /// The actor ended with success (the learner finished training).
    pub done: bool,
}

pub struct Cluster {
    pub run_dir: PathBuf,
    pub addr: String,
    pub learner: Child,
    /// The reward service and a client for its status, when intrinsic rewards are on.
    pub reward: Option<(Child, RewardServiceClient<Channel>)>,
    pub actors: Vec<ActorSlot>,
    config_path: PathBuf,
    config: Config,
    client: LearnerClient<Channel>,
}

/// What happened to the children since the last look.
pub enum Event {
    LearnerExited(ExitStatus),
    RewardServiceExited(ExitStatus),
    ActorFailed { index: u32, status: ExitStatus },
}

fn spur_command(run_dir: &Path, log_name: &str) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the spur executable")?;
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // Appended, so a replaced actor's log still says why its predecessor failed.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{log_name}.log")))?;
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// `--set run.prometheus_listen=...` giving the `slot`-th child its own port, when
/// Prometheus metrics are on.
fn prometheus_args(config: &Config, slot: u16) -> Vec<String> {
    match crate::prometheus::child_listen(&config.run.prometheus_listen, slot) {
        Some(addr) => vec!["--set".into(), format!("run.prometheus_listen={addr}")],
        None => Vec::new(),
    }
}

/// The last `n` lines of a child's log, for error messages.
pub fn log_tail(run_dir: &Path, log_name: &str, n: usize) -> String {
    let path = run_dir.join("logs").join(format!("{log_name}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Starts the reward service (when `config.intrinsic.enabled`), then the learner,
    /// waiting until each serves, then `actors` actors. Writes the resolved config,
    /// with the addresses the children bound, to `run_dir/config.toml`.
    pub async fn start(config: &Config, run_dir: &Path, actors: u32) -> anyhow::Result<Self> {
        let mut config = config.clone();
        config.learner.listen = "127.0.0.1:0".into();
        config.reward_service.listen = "127.0.0.1:0".into();
        let config_path = run_dir.join("config.toml");
        std::fs::write(&config_path, config.to_toml())?;
        let reward = if config.intrinsic.enabled {
            let (child, addr, channel) = start_server(
                run_dir,
                &config_path,
                "reward-service",
                spur_reward_service::ADDR_FILE,
                "spur.v1.RewardService",
                prometheus_args(&config, 0),
            )
            .await?;
            config.reward_service.addr = addr;
            std::fs::write(&config_path, config.to_toml())?;
            Some((child, RewardServiceClient::new(channel)))
        } else {
            None
        };
        let (learner, addr, channel) = start_server(
            run_dir,
            &config_path,
            "learner",
            spur_learner::ADDR_FILE,
            "spur.v1.Learner",
            prometheus_args(&config, 1),
        )
        .await?;
        let mut cluster = Self {
            run_dir: run_dir.to_path_buf(),
            addr,
            learner,
            reward,
            actors: Vec::new(),
            config_path,
            config: config.clone(),
            client: LearnerClient::new(channel),
        };
        for index in 0..actors {
            let child = cluster.spawn_actor(index)?;
            cluster.actors.push(ActorSlot {
                index,
                child: Some(child),
                restarts: 0,
                done: false,
            });
        }
        Ok(cluster)
    }

    fn spawn_actor(&self, index: u32) -> anyhow::Result<Child> {
        spur_command(&self.run_dir, &format!("actor-{index}"))?
            .arg("actor")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--learner")
            .arg(&self.addr)
            .arg("--index")
            .arg(index.to_string())
            .args(prometheus_args(&self.config, 2 + index as u16))
            .spawn()
            .with_context(|| format!("cannot start actor {index}"))
    }

    pub async fn status(&mut self) -> Option<LearnerStatus> {
        let call = self.client.get_status(StatusRequest {});
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    pub async fn reward_status(&mut self) -> Option<RewardServiceStatus> {
        let (_, client) = self.reward.as_mut()?;
        let call = client.get_status(RewardStatusRequest {});
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Looks at every child once: a learner exit is reported; a crashed actor is
    /// replaced (up to [`MAX_ACTOR_RESTARTS`] times per slot, then reported).
    pub fn poll(&mut self) -> anyhow::Result<Option<Event>> {
        if let Some(status) = self.learner.try_wait()? {
            return Ok(Some(Event::LearnerExited(status)));
        }
        if let Some((child, _)) = self.reward.as_mut() {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(Event::RewardServiceExited(status)));
            }
        }
        for i in 0..self.actors.len() {
            let Some(child) = self.actors[i].child.as_mut() else {
                continue;
            };
            let Some(status) = child.try_wait()? else {
                continue;
            };
            let slot = &mut self.actors[i];
            slot.child = None;
            if status.success() {
                slot.done = true;
                continue;
            }
            if slot.restarts >= MAX_ACTOR_RESTARTS {
                return Ok(Some(Event::ActorFailed {
                    index: slot.index,
                    status,
                }));
            }
            slot.restarts += 1;
            let index = slot.index;
            let last = log_tail(&self.run_dir, &format!("actor-{index}"), 1);
            warn!(index, %status, restart = slot.restarts, last_log_line = %last, "actor exited, starting a replacement");
            let child = self.spawn_actor(index)?;
            self.actors[i].child = Some(child);
        }
        Ok(None)
    }

    /// Waits up to `grace` for every actor to exit by itself.
    pub async fn wait_actors(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for slot in &mut self.actors {
            if let Some(child) = slot.child.as_mut() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Ok(Ok(status)) = tokio::time::timeout(left, child.wait()).await {
                    slot.done = status.success();
                    slot.child = None;
                }
            }
        }
    }

    /// SIGTERM to every live child; SIGKILL to those still alive after `grace`.
    /// Returns the learner's exit status when it stopped by itself in time.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        for child in self.actors.iter_mut().filter_map(|s| s.child.as_mut()) {
            terminate(child);
        }
        terminate(&mut self.learner);
        if let Some((child, _)) = self.reward.as_mut() {
            terminate(child);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for child in self.actors.iter_mut().filter_map(|s| s.child.as_mut()) {
            stop_child(child, deadline).await;
        }
        if let Some((child, _)) = self.reward.as_mut() {
            stop_child(child, deadline).await;
        }
        stop_child(&mut self.learner, deadline).await
    }
}

/// Waits for a child until `deadline`, then kills it.
async fn stop_child(child: &mut Child, deadline: tokio::time::Instant) -> Option<ExitStatus> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match tokio::time::timeout(left, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            warn!(
                pid = child.id(),
                "child did not stop in time and was killed"
            );
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    }
}

fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// Starts `spur <role> --config .. --run-dir ..`, waits for the address it writes to
/// `addr_file` and for its gRPC health to report `health_service` as serving.
async fn start_server(
    run_dir: &Path,
    config_path: &Path,
    role: &str,
    addr_file: &str,
    health_service: &str,
    extra: Vec<String>,
) -> anyhow::Result<(Child, String, Channel)> {
    let mut child = spur_command(run_dir, role)?
        .arg(role)
        .arg("--config")
        .arg(config_path)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .spawn()
        .with_context(|| format!("cannot start the {role} process"))?;
    let addr = wait_addr(&run_dir.join(addr_file), &mut child, run_dir, role).await?;
    let channel = wait_serving(&addr, health_service, &mut child, run_dir, role).await?;
    Ok((child, addr, channel))
}

/// Waits for a child to write the address it bound (an exit is an error).
async fn wait_addr(
    file: &Path,
    child: &mut Child,
    run_dir: &Path,
    name: &str,
) -> anyhow::Result<String> {
    let _ = std::fs::remove_file(file);
    for _ in 0..1200 {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {name} exited during start-up ({status}):\n{}",
                log_tail(run_dir, name, 20)
            );
        }
        if let Ok(a) = std::fs::read_to_string(file) {
            return Ok(format!("http://{}", a.trim()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the {name} did not bind a port within 60 s")
}

/// Polls gRPC health until `service` serves (or the child exits, an error).
async fn wait_serving(
    addr: &str,
    service: &str,
    child: &mut Child,
    run_dir: &Path,
    name: &str,
) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(addr.to_string())?;
    for _ in 0..600 {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {name} exited during start-up ({status}):\n{}",
                log_tail(run_dir, name, 20)
            );
        }
        if let Ok(channel) = endpoint.connect().await {
            let mut health = HealthClient::new(channel.clone());
            let req = HealthCheckRequest {
                service: service.into(),
            };
            if let Ok(r) = health.check(req).await {
                if r.into_inner().status == 1 {
                    return Ok(channel);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the {name} at {addr} did not become ready within 60 s")
}
