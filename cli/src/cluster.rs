//! A learner, a reward service and N actors as child processes of this one: started
//! in their own process group (so a terminal's Ctrl-C reaches only the supervisor,
//! which then stops them in order), logging to `<run dir>/logs/` with their pids in
//! `<run dir>/pids/`, watched, restarted when they crash (the learner with
//! `--resume`, the reward service on the same label store, both on the address they
//! had, so actors find them again), each within `run.max_restarts`, and stopped
//! with SIGTERM, then SIGKILL after a grace period.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use spur_core::config::{EnvKind, SplitEnvs};
use spur_core::transport::{AuthChannel, Transport};
use spur_core::Config;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus, RewardStatusRequest, StatusRequest};
use tokio::process::{Child, Command};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::{info, warn};

pub struct ActorSlot {
    pub index: u32,
    pub child: Option<Child>,
    pub restarts: u32,
    /// The actor ended with success (the learner finished training).
    pub done: bool,
}

/// Restarts of each role so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restarts {
    pub learner: u32,
    pub reward_service: u32,
    pub actors: u32,
}

pub struct Cluster {
    pub run_dir: PathBuf,
    pub addr: String,
    pub learner: Child,
    /// The reward service and a client for its status, when intrinsic rewards are on.
    pub reward: Option<(Child, RewardServiceClient<AuthChannel>)>,
    pub actors: Vec<ActorSlot>,
    pub restarts: Restarts,
    config_path: PathBuf,
    config: Config,
    transport: Transport,
    client: LearnerClient<AuthChannel>,
}

/// What happened to the children since the last look that ends the run.
pub enum Event {
    /// The learner ended by itself with success: training finished.
    LearnerFinished,
    /// A role kept failing: its restart budget is spent.
    Failed {
        role: String,
        status: ExitStatus,
        restarts: u32,
    },
}

/// Records a child's pid in `<run dir>/pids/<name>.pid` (for people and fault tests).
fn write_pid(run_dir: &Path, name: &str, child: &Child) {
    let Some(pid) = child.id() else { return };
    let dir = run_dir.join("pids");
    let written = std::fs::create_dir_all(&dir).and_then(|_| {
        spur_core::checkpoint::write_atomic(
            &dir.join(format!("{name}.pid")),
            pid.to_string().as_bytes(),
        )
    });
    if let Err(e) = written {
        warn!(name, error = %e, "cannot write the pid file");
    }
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
    // Where the child says which port its Prometheus listener bound (`:0` lets the
    // system pick one per child).
    let metrics = run_dir.join("metrics");
    std::fs::create_dir_all(&metrics)?;
    cmd.env(
        crate::prometheus::ADDR_FILE_ENV,
        metrics.join(format!("{log_name}.addr")),
    );
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// Local mode's reading of `actor.split_envs = "auto"`: two halves cost an actor a
/// second forward pass per step (a NetHack forward pass costs about as much for 8 rows
/// as for 16) and a second bridge process, which pays only when the actor has cores
/// that would otherwise wait. With fewer than 2 cores for each actor and the learner,
/// `auto` becomes `off` in the run's config; returns why, for the log.
fn resolve_split(config: &mut Config, cores: usize, actors: u32) -> Option<String> {
    let processes = actors as usize + 1;
    let splits = config.actor.split_envs == SplitEnvs::Auto && config.env.kind == EnvKind::Gym;
    if !splits || cores >= 2 * processes {
        return None;
    }
    config.actor.split_envs = SplitEnvs::Off;
    Some(format!(
        "actors step their envs in one part (actor.split_envs = \"auto\" is \"off\" \
         here): {cores} cores for {actors} actors and the learner, fewer than 2 each"
    ))
}

/// Makes `cmd`'s process `inc` steps nicer than this one (`run.actor_nice`); what it
/// starts inherits the niceness.
fn lower_priority(cmd: &mut Command, inc: u32) {
    if inc == 0 {
        return;
    }
    let inc = inc as libc::c_int;
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe calls (it sets errno and calls nice(2)).
    unsafe {
        cmd.pre_exec(move || {
            // nice(2) returns the new niceness, which may itself be -1: errno tells.
            *libc::__errno_location() = 0;
            if libc::nice(inc) == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
        // This process watches its actors; one health port for all of them would
        // clash (a config written for actor pods may set it).
        config.actor.health_listen = String::new();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(why) = resolve_split(&mut config, cores, actors) {
            info!("{why}");
        }
        let config_path = run_dir.join("config.toml");
        std::fs::write(&config_path, config.to_toml())?;
        let transport = Transport::from_config(&config.transport)?;
        let reward = if config.intrinsic.enabled {
            let (child, addr, channel) = start_server(
                run_dir,
                &config_path,
                &transport,
                Role::RewardService,
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
            &transport,
            Role::Learner,
            prometheus_args(&config, 1),
        )
        .await?;
        let mut cluster = Self {
            run_dir: run_dir.to_path_buf(),
            addr,
            learner,
            reward,
            actors: Vec::new(),
            restarts: Restarts::default(),
            config_path,
            config: config.clone(),
            transport,
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
        let name = format!("actor-{index}");
        let mut cmd = spur_command(&self.run_dir, &name)?;
        lower_priority(&mut cmd, self.config.run.actor_nice);
        let child = cmd
            .arg("actor")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--learner")
            .arg(&self.addr)
            .arg("--index")
            .arg(index.to_string())
            .args(prometheus_args(&self.config, 2 + index as u16))
            .spawn()
            .with_context(|| format!("cannot start actor {index}"))?;
        write_pid(&self.run_dir, &name, &child);
        Ok(child)
    }

    /// Starts the learner again from its newest checkpoint, on the address it had.
    async fn restart_learner(&mut self) -> anyhow::Result<()> {
        let listen = without_scheme(&self.addr).to_string();
        let mut args = prometheus_args(&self.config, 1);
        args.extend([
            "--resume".into(),
            "--set".into(),
            format!("learner.listen={listen}"),
        ]);
        let (child, _, channel) = start_server(
            &self.run_dir,
            &self.config_path,
            &self.transport,
            Role::Learner,
            args,
        )
        .await?;
        self.learner = child;
        self.client = LearnerClient::new(channel);
        Ok(())
    }

    /// Starts the reward service again on the same label store and address.
    async fn restart_reward_service(&mut self) -> anyhow::Result<()> {
        let listen = without_scheme(&self.config.reward_service.addr).to_string();
        let mut args = prometheus_args(&self.config, 0);
        args.extend(["--set".into(), format!("reward_service.listen={listen}")]);
        let (child, _, channel) = start_server(
            &self.run_dir,
            &self.config_path,
            &self.transport,
            Role::RewardService,
            args,
        )
        .await?;
        self.reward = Some((child, RewardServiceClient::new(channel)));
        Ok(())
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

    /// Looks at every child once. A learner that exits with success has finished
    /// training; any other exit of any role is a crash, and the role is restarted
    /// until its `run.max_restarts` budget is spent, which ends the run.
    pub async fn poll(&mut self) -> anyhow::Result<Option<Event>> {
        let budget = self.config.run.max_restarts;
        if let Some(status) = self.learner.try_wait()? {
            if status.success() {
                return Ok(Some(Event::LearnerFinished));
            }
            if self.restarts.learner >= budget {
                return Ok(Some(self.failed("learner", status, self.restarts.learner)));
            }
            self.restarts.learner += 1;
            let last = log_tail(&self.run_dir, "learner", 1);
            warn!(%status, restart = self.restarts.learner, last_log_line = %last, "the learner exited, restarting it from its newest checkpoint");
            if let Err(e) = self.restart_learner().await {
                // The dead child stays in place: the next look tries again.
                warn!(error = %format!("{e:#}"), "the learner did not come back");
            }
        }
        if let Some((child, _)) = self.reward.as_mut() {
            if let Some(status) = child.try_wait()? {
                if self.restarts.reward_service >= budget {
                    let n = self.restarts.reward_service;
                    return Ok(Some(self.failed("reward-service", status, n)));
                }
                self.restarts.reward_service += 1;
                let last = log_tail(&self.run_dir, "reward-service", 1);
                warn!(%status, restart = self.restarts.reward_service, last_log_line = %last, "the reward service exited, restarting it on the same store");
                if let Err(e) = self.restart_reward_service().await {
                    warn!(error = %format!("{e:#}"), "the reward service did not come back");
                }
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
            if slot.restarts >= budget {
                let (index, n) = (slot.index, slot.restarts);
                return Ok(Some(self.failed(&format!("actor-{index}"), status, n)));
            }
            slot.restarts += 1;
            self.restarts.actors += 1;
            let index = slot.index;
            let last = log_tail(&self.run_dir, &format!("actor-{index}"), 1);
            warn!(index, %status, restart = slot.restarts, last_log_line = %last, "actor exited, starting a replacement");
            let child = self.spawn_actor(index)?;
            self.actors[i].child = Some(child);
        }
        Ok(None)
    }

    fn failed(&self, role: &str, status: ExitStatus, restarts: u32) -> Event {
        Event::Failed {
            role: role.to_string(),
            status,
            restarts,
        }
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

/// The roles that serve gRPC.
#[derive(Debug, Clone, Copy)]
enum Role {
    Learner,
    RewardService,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Learner => "learner",
            Role::RewardService => "reward-service",
        }
    }

    fn addr_file(self) -> &'static str {
        match self {
            Role::Learner => spur_learner::ADDR_FILE,
            Role::RewardService => spur_reward_service::ADDR_FILE,
        }
    }

    fn health_service(self) -> &'static str {
        match self {
            Role::Learner => "spur.v1.Learner",
            Role::RewardService => "spur.v1.RewardService",
        }
    }
}

/// `host:port` of an `http://` or `https://` address.
fn without_scheme(addr: &str) -> &str {
    addr.split_once("://").map_or(addr, |(_, rest)| rest)
}

/// Starts `spur <role> --config .. --run-dir ..`, waits for the address it writes to
/// its address file and for its gRPC health to report it as serving.
async fn start_server(
    run_dir: &Path,
    config_path: &Path,
    transport: &Transport,
    role: Role,
    extra: Vec<String>,
) -> anyhow::Result<(Child, String, AuthChannel)> {
    let name = role.name();
    let mut child = spur_command(run_dir, name)?
        .arg(name)
        .arg("--config")
        .arg(config_path)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .spawn()
        .with_context(|| format!("cannot start the {name} process"))?;
    write_pid(run_dir, name, &child);
    let addr = wait_addr(&run_dir.join(role.addr_file()), &mut child, run_dir, name).await?;
    let addr = transport.url(&addr);
    let channel = wait_serving(
        transport,
        &addr,
        role.health_service(),
        &mut child,
        run_dir,
        name,
    )
    .await?;
    Ok((child, addr, channel))
}

/// Waits for a child to write the address it bound (`host:port`; an exit is an error).
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
            return Ok(a.trim().to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the {name} did not bind a port within 60 s")
}

/// Polls gRPC health until `service` serves (or the child exits, an error).
async fn wait_serving(
    transport: &Transport,
    addr: &str,
    service: &str,
    child: &mut Child,
    run_dir: &Path,
    name: &str,
) -> anyhow::Result<AuthChannel> {
    let endpoint = transport.client(addr)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in defaults: the Rust CartPole, no bridges.
    fn defaults() -> Config {
        Config::from_toml_str("").expect("the defaults are a valid config")
    }

    fn nethack(split: SplitEnvs) -> Config {
        let mut c = defaults();
        c.env.kind = EnvKind::Gym;
        c.env.gym_id = "NetHackScore-v0".into();
        c.actor.split_envs = split;
        c
    }

    #[test]
    fn auto_splits_only_with_two_cores_for_each_process() {
        // 2 cores, 2 actors and the learner: one part each, and the log says why.
        let mut c = nethack(SplitEnvs::Auto);
        let why = resolve_split(&mut c, 2, 2).expect("auto resolved");
        assert_eq!(c.actor.split_envs, SplitEnvs::Off);
        assert!(why.contains("2 cores for 2 actors"), "{why}");
        // Enough cores: auto stays auto (the actor splits bridge envs).
        let mut c = nethack(SplitEnvs::Auto);
        assert!(resolve_split(&mut c, 6, 2).is_none());
        assert_eq!(c.actor.split_envs, SplitEnvs::Auto);
        // An explicit choice is the user's, and envs without bridges never split.
        let mut c = nethack(SplitEnvs::On);
        assert!(resolve_split(&mut c, 2, 2).is_none());
        assert_eq!(c.actor.split_envs, SplitEnvs::On);
        let mut c = defaults();
        assert!(resolve_split(&mut c, 2, 2).is_none());
        assert_eq!(c.actor.split_envs, SplitEnvs::Auto);
    }
}
