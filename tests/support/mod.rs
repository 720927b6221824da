//! Helpers for spur's end-to-end tests: a learner and a reward service on
//! `127.0.0.1:0` in this process, readiness by polling gRPC health (never a sleep),
//! and actors as tasks.

use std::path::PathBuf;
use std::time::Duration;

use spur_core::config::Config;
use spur_core::transport::{AuthChannel, Transport};
use spur_learner::{LearnerOptions, TrainSummary};
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, StatusRequest};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub struct TestLearner {
    pub addr: String,
    pub run_dir: PathBuf,
    /// Built from the learner's `[transport]`: its clients present the learner's
    /// certificate and token.
    pub transport: Transport,
    pub handle: JoinHandle<Result<TrainSummary, spur_learner::LearnerError>>,
    stop: Option<oneshot::Sender<()>>,
}

impl TestLearner {
    /// Starts a learner for `config` with a fresh run directory and waits until its
    /// health service reports SERVING.
    pub async fn start(config: Config, name: &str) -> anyhow::Result<Self> {
        Self::launch(config, name, false).await
    }

    /// [`start`](Self::start) with a learner that drops every chunk it takes
    /// (`LearnerOptions::discard_chunks`, the ingest benchmark's).
    pub async fn start_discarding(config: Config, name: &str) -> anyhow::Result<Self> {
        Self::launch(config, name, true).await
    }

    async fn launch(config: Config, name: &str, discard_chunks: bool) -> anyhow::Result<Self> {
        let run_dir = test_run_dir(name);
        let _ = std::fs::remove_dir_all(&run_dir);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let transport = Transport::from_config(&config.transport)?;
        let addr = transport.url(&listener.local_addr()?.to_string());
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = LearnerOptions {
            run_dir: run_dir.clone(),
            resume: false,
            discard_chunks,
        };
        let handle = tokio::spawn(spur_learner::serve(config, opts, listener, async {
            let _ = stopped.await;
        }));
        if let Err(e) = wait_serving_with(&transport, &addr).await {
            // A learner that stopped on its own says why.
            if handle.is_finished() {
                return Err(match handle.await? {
                    Err(learner) => anyhow::anyhow!("the learner stopped: {learner}"),
                    Ok(_) => anyhow::anyhow!("the learner stopped before serving"),
                });
            }
            return Err(e);
        }
        Ok(Self {
            addr,
            run_dir,
            transport,
            handle,
            stop: Some(stop),
        })
    }

    /// A plain client (no TLS, no token).
    pub async fn client(&self) -> anyhow::Result<LearnerClient<Channel>> {
        Ok(LearnerClient::connect(self.addr.clone()).await?)
    }

    /// A client through [`TestLearner::transport`].
    pub async fn auth_client(&self) -> anyhow::Result<LearnerClient<AuthChannel>> {
        let channel = self.transport.client(&self.addr)?.connect().await?;
        Ok(LearnerClient::new(channel))
    }

    pub async fn status(&self) -> anyhow::Result<LearnerStatus> {
        Ok(self
            .auth_client()
            .await?
            .get_status(StatusRequest {})
            .await?
            .into_inner())
    }

    /// Polls status until `pred` holds, failing after `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&LearnerStatus) -> bool,
    ) -> anyhow::Result<LearnerStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.status().await?;
            if pred(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("timed out waiting for {what}; last status: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the learner to stop and waits for its summary.
    pub async fn stop(mut self) -> anyhow::Result<TrainSummary> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Ok(self.handle.await??)
    }
}

/// Polls the gRPC health service until the learner reports SERVING.
pub async fn wait_serving(addr: &str) -> anyhow::Result<()> {
    wait_serving_with(&Transport::from_config(&Default::default())?, addr).await
}

/// [`wait_serving`] through `transport` (TLS, token).
pub async fn wait_serving_with(transport: &Transport, addr: &str) -> anyhow::Result<()> {
    wait_health(transport, addr, "spur.v1.Learner").await
}

/// Polls the gRPC health service at `addr` until `service` reports SERVING.
async fn wait_health(transport: &Transport, addr: &str, service: &str) -> anyhow::Result<()> {
    let client = transport.client(addr)?;
    for _ in 0..200 {
        if let Ok(channel) = client.connect().await {
            let mut h = HealthClient::new(channel);
            let req = HealthCheckRequest {
                service: service.into(),
            };
            if let Ok(r) = h.check(req).await {
                if r.into_inner().status == 1 {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{service} at {addr} never became ready")
}

/// A reward service in this process on `127.0.0.1:0`, with the judge of its config
/// (paths relative to the repository root).
pub struct TestRewardService {
    pub addr: String,
    service: spur_reward_service::InProcess,
}

impl TestRewardService {
    /// Starts the reward service for `config`, points `config.reward_service.addr` at
    /// it, and waits until its health service reports SERVING (label store loaded).
    pub async fn start(config: &mut Config) -> anyhow::Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let service = spur_reward_service::InProcess::start(config.clone(), root).await?;
        let addr = service.addr.clone();
        config.reward_service.addr = addr.clone();
        let plain = Transport::from_config(&Default::default())?;
        wait_health(&plain, &addr, "spur.v1.RewardService").await?;
        Ok(Self { addr, service })
    }

    pub async fn client(&self) -> anyhow::Result<RewardServiceClient<Channel>> {
        Ok(RewardServiceClient::connect(self.addr.clone()).await?)
    }

    /// Asks the service to stop and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        Ok(self.service.stop().await?)
    }
}

/// Starts an actor task against `addr`; it stops when `stop` fires or training ends.
pub fn spawn_actor(
    config: &Config,
    addr: &str,
    index: u32,
) -> (
    oneshot::Sender<()>,
    JoinHandle<Result<spur_actor::ActorSummary, spur_actor::ActorError>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let opts = spur_actor::ActorOptions {
        actor_id: format!("actor-{index}"),
        index: Some(index),
        learner_addr: Some(addr.to_string()),
    };
    let handle = tokio::spawn(spur_actor::run(config.clone(), opts, async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

/// Trains `config` with a learner and two actor tasks until the learner stops; the
/// learner's summary and each actor's.
pub async fn train_two_actors(
    config: &Config,
    name: &str,
) -> anyhow::Result<(TrainSummary, Vec<spur_actor::ActorSummary>)> {
    let learner = TestLearner::start(config.clone(), name).await?;
    let actors: Vec<_> = (0..2)
        .map(|i| spawn_actor(config, &learner.addr, i))
        .collect();
    let summary = learner.handle.await??;
    let mut done = Vec::with_capacity(actors.len());
    for (_stop, a) in actors {
        done.push(a.await??);
    }
    Ok((summary, done))
}

/// A small, fast cartpole config for tests.
pub fn tiny_cartpole(env_steps: u64) -> Config {
    let mut c = Config::from_toml_str(
        r#"
[run]
name = "test"
[env]
kind = "cartpole"
num_envs = 16
[model]
device = "cpu"
[learner]
device = "cpu"
checkpoint_every = 1000
"#,
    )
    .expect("the test config is valid");
    c.stop.env_steps = env_steps;
    c
}

/// A memory-task config for tests: a cue, `delay` blank steps, then the query
/// (chance is a mean return of 0.5), with the given recurrent core.
pub fn tiny_memory(core: spur_core::config::CoreKind, env_steps: u64) -> Config {
    let mut c = Config::from_toml_str(
        r#"
[run]
name = "test-memory"
[env]
kind = "memory"
num_envs = 16
memory_delay = 4
[model]
device = "cpu"
hidden = [32]
core_size = 32
[actor]
rollout_len = 16
[learner]
device = "cpu"
batch_steps = 1024
epochs = 4
minibatches = 4
lr = 0.003
gamma = 0.9
entropy_coef = 0.01
checkpoint_every = 1000
"#,
    )
    .expect("the test config is valid");
    c.model.core = core;
    c.stop.env_steps = env_steps;
    // Stop once the last 100 episodes average this (a feedforward policy never does).
    c.stop.target_return = 0.98;
    c
}

/// The project's Python, found as the env bridge finds it (`VIRTUAL_ENV`, then the
/// repository's `.venv`, then `python3`).
pub fn python() -> String {
    spur_env_bridge::python(&spur_core::config::EnvConfig::default())
}

/// Runs `examples/models/<script>` with the project's Python (as the env bridge finds
/// it) and `args`, writing the TorchScript module to `dir/<name>.pt`; its path.
pub fn export_model(script: &str, args: &[&str], dir: &std::path::Path, name: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = dir.join(format!("{name}.pt"));
    let python = python();
    let status = std::process::Command::new(&python)
        .arg(root.join("examples/models").join(script))
        .args(args)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("{python} runs: {e}"));
    assert!(status.success(), "exporting {script} {args:?} failed");
    out
}

/// The run directory of the test learner `name` in this test process (not created).
pub fn test_run_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("spur-test-{name}-{}", std::process::id()))
}

/// A fresh scratch folder for one test's exported modules.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spur-scratch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}
