//! spur-learner: the central learner.
//!
//! [`serve`] binds the `spur.v1.Learner` gRPC service (plus gRPC health; the server,
//! TLS, token and keepalive come from `spur_core::transport`) and runs the
//! training thread until the env-step budget or target return is reached, or until
//! `shutdown` resolves; either way it writes a final checkpoint; a finished run also
//! tells actors to exit. Every start is a new incarnation (a random id in weights
//! and chunks): a learner resumed from an older checkpoint takes over its actors
//! instead of waiting for versions it will never reach again.
//!
//! - `service.rs`: the gRPC handlers (trajectory streams into a bounded queue)
//! - `queue.rs`: the chunk queue, which wakes a waiting trainer once per batch, not per chunk
//! - `trainer.rs`: the training thread (V-trace targets, PPO updates, checkpoints)
//! - `batch.rs`: chunks to a time-major batch
//! - `episodes.rs`: chunks cut back into episodes and grouped (UI-S1's group advantages)
//! - `sequences.rs`: the sequences a recurrent policy re-runs (columns or episodes)
//! - `returns.rs`: the value targets' running statistics (`learner.normalize_returns`)
//! - `broadcast.rs`: latest-wins weight broadcast, chunked under the message limit
//! - `intrinsic.rs`: the reward-model subscription and reward mixing
//! - `state.rs`: counters and episode statistics shared by handlers and trainer
//! - `metrics.rs`: `metrics.jsonl`
//! - `tensorboard.rs`: TensorBoard event files next to `metrics.jsonl`
//! - `error.rs`: errors and their gRPC statuses

mod batch;
mod broadcast;
mod episodes;
mod error;
mod intrinsic;
mod lockstep;
mod metrics;
mod parallel;
mod queue;
mod returns;
mod sequences;
mod service;
mod state;
mod tensorboard;
mod trainer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use spur_core::adam::Adam;
use spur_core::blocking::on_own_thread;
use spur_core::checkpoint;
use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::model::ActorCritic;
use spur_core::trajectory::ChunkExpectation;
use spur_core::transport::{bind_health, incoming, Transport};
use spur_env_bridge::env_spec;
use spur_proto::v1::learner_server::LearnerServer;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::pb::health_server::{Health, HealthServer};
use tracing::{info, warn};

pub use error::LearnerError;
pub use parallel::{helper_cpu_seconds, minibatch_threads_in_use, TRAINER_THREAD};
pub use trainer::{TrainSummary, META_ENV_STEPS, META_UPDATES};

use broadcast::{Broadcaster, Published};
use service::LearnerService;
use state::Shared;
use trainer::Trainer;

/// Adam's epsilon (PPO implementations use 1e-5 rather than PyTorch's 1e-8).
const ADAM_EPS: f64 = 1e-5;

/// Name of the file in the run directory that holds the bound address.
pub const ADDR_FILE: &str = "learner.addr";

/// Name of the file in the run directory that holds the plain health port's address
/// (with `learner.health_listen` set).
pub const HEALTH_ADDR_FILE: &str = "learner.health.addr";

#[derive(Debug, Clone)]
pub struct LearnerOptions {
    pub run_dir: PathBuf,
    /// Continue from the newest checkpoint in `run_dir/checkpoints`.
    pub resume: bool,
    /// Take each accepted chunk from the queue and drop it, never training: a learner
    /// that accepts as fast as it can without holding what it accepted (the ingest
    /// benchmark). Off for every real run.
    pub discard_chunks: bool,
}

/// Binds `config.learner.listen` and serves until training ends.
pub async fn run(
    config: Config,
    opts: LearnerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<TrainSummary, LearnerError> {
    let addr = config.learner.listen.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| LearnerError::Bind { addr, source })?;
    serve(config, opts, listener, shutdown).await
}

/// A fresh incarnation id: random, non-zero, and below 2^53 so that JSON and
/// Prometheus carry it exactly.
fn draw_incarnation() -> u64 {
    rand::random_range(1..(1u64 << 53))
}

/// Where a resumed run continues from.
struct Resumed {
    version: u64,
    updates: u64,
    time_s: f64,
    /// The value targets' statistics, when the run normalised returns.
    returns: Option<returns::ReturnStats>,
}

/// Loads the newest checkpoint into `model`, `opt` and `shared`'s counters.
fn resume(
    run_dir: &std::path::Path,
    model: &mut ActorCritic,
    opt: &mut Adam,
    shared: &Shared,
    intrinsic: Option<&intrinsic::RewardTable>,
) -> Result<Option<Resumed>, LearnerError> {
    let Some(l) = checkpoint::load_latest(&run_dir.join("checkpoints"))? else {
        warn!(run_dir = %run_dir.display(), "no checkpoint to resume from, starting fresh");
        return Ok(None);
    };
    model.load_safetensors(&l.bytes)?;
    if let Err(e) = opt.load_state(&l.bytes) {
        warn!(error = %e, "the checkpoint has no optimizer state, Adam starts afresh");
    }
    let int = |k: &str| {
        l.metadata
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64)
    };
    let float = |k: &str| l.metadata.get(k).and_then(|v| v.parse::<f64>().ok());
    shared
        .env_steps
        .store(int(META_ENV_STEPS), Ordering::Relaxed);
    shared.updates.store(int(META_UPDATES), Ordering::Relaxed);
    shared.set_episodes_total(int(trainer::META_EPISODES));
    shared.counts.restore(int);
    if let (Some(table), Some(mean), Some(var)) = (
        intrinsic,
        float(trainer::META_RANK_MEAN),
        float(trainer::META_RANK_VAR),
    ) {
        table.resume_score_stats((mean, var));
    }
    info!(
        version = l.version,
        env_steps = int(META_ENV_STEPS),
        updates = int(META_UPDATES),
        adam_steps = opt.steps(),
        previous_incarnation = int(trainer::META_INCARNATION),
        reward_model_version = int(trainer::META_REWARD_MODEL_VERSION),
        path = %l.path.display(),
        "resumed from checkpoint"
    );
    Ok(Some(Resumed {
        version: l.version,
        updates: int(META_UPDATES),
        time_s: float(trainer::META_TIME_S).unwrap_or(0.0),
        returns: match (
            float(trainer::META_RETURN_MEAN),
            float(trainer::META_RETURN_VAR),
            float(trainer::META_RETURN_COUNT),
        ) {
            (Some(mean), Some(var), Some(count)) => Some(returns::ReturnStats { mean, var, count }),
            _ => None,
        },
    }))
}

/// The return statistics a resumed run normalises with: the checkpoint's, or fresh
/// ones (with a warning) when it has none or they are not usable.
fn usable_return_stats(saved: Option<returns::ReturnStats>) -> returns::ReturnStats {
    match saved {
        Some(s) if s.is_valid() => s,
        Some(s) => {
            warn!(
                mean = s.mean,
                var = s.var,
                count = s.count,
                "the checkpoint's return statistics are not usable, normalising starts afresh"
            );
            Default::default()
        }
        None => {
            warn!(
                "the checkpoint has no return statistics (its critic learned raw returns): \
                 normalising starts afresh"
            );
            Default::default()
        }
    }
}

/// The trainer's starting point: a fresh model, or the newest checkpoint's.
struct Start {
    model: ActorCritic,
    opt: Adam,
    shared: Arc<Shared>,
    intrinsic: Option<Arc<intrinsic::RewardTable>>,
    spec: spur_core::env::EnvSpec,
    version: u64,
    updates: u64,
    time_offset_s: f64,
    returns: Option<returns::ReturnStats>,
}

/// Reads the env spec, builds the model and optimizer, and with `resume` loads the
/// newest checkpoint into them; every start draws a new incarnation.
async fn start(config: &Config, opts: &LearnerOptions) -> Result<Start, LearnerError> {
    tch::set_num_threads(config.run.torch_threads as i32);
    tch::manual_seed(config.run.seed as i64);
    // A gym env's spec comes from starting a bridge: blocking work.
    let env = config.env.clone();
    let spec = tokio::task::spawn_blocking(move || env_spec(&env))
        .await
        .map_err(|_| LearnerError::TrainerPanicked)??;
    let lc = &config.learner;
    let device = resolve_device("learner.device", &lc.device)?;
    let mut model = ActorCritic::for_spec(&spec, &config.model, device)?;
    // The learner only runs update passes (actors act in evaluation mode).
    model.set_train(true);
    let mut opt = Adam::new(model.var_store(), lc.lr, ADAM_EPS);
    let incarnation = draw_incarnation();
    let shared = Arc::new(Shared::new(
        incarnation,
        lc.queue_capacity,
        config.stop.env_steps,
    ));
    let intrinsic = config
        .intrinsic
        .enabled
        .then(|| Arc::new(intrinsic::RewardTable::default()));
    let resumed = match opts.resume {
        true => resume(
            &opts.run_dir,
            &mut model,
            &mut opt,
            &shared,
            intrinsic.as_deref(),
        )?,
        false => None,
    };
    let (version, updates, time_offset_s) = resumed
        .as_ref()
        .map_or((1, 0, 0.0), |r| (r.version, r.updates, r.time_s));
    shared.policy_version.store(version, Ordering::Release);
    let returns = lc.normalize_returns.then(|| {
        resumed
            .as_ref()
            .map_or_else(Default::default, |r| usable_return_stats(r.returns))
    });
    if !lc.normalize_returns && resumed.as_ref().is_some_and(|r| r.returns.is_some()) {
        warn!(
            "the checkpoint's critic learned normalised returns but \
             learner.normalize_returns is off: its values are off scale until it relearns"
        );
    }
    info!(incarnation, version, "learner incarnation");
    Ok(Start {
        model,
        opt,
        shared,
        intrinsic,
        spec,
        version,
        updates,
        time_offset_s,
        returns,
    })
}

/// What the learner checks every chunk against.
fn expectation(
    config: &Config,
    spec: &spur_core::env::EnvSpec,
    state_size: usize,
) -> ChunkExpectation {
    ChunkExpectation {
        rollout_len: config.actor.rollout_len as usize,
        obs_dim: spec.obs_dim,
        num_actions: spec.num_actions,
        group_size: if config.learner.advantage.is_grouped() {
            config.actor.group_size
        } else {
            0
        },
        state_size,
        values: config.learner.actor_estimates,
    }
}

/// Prometheus gauges that move even while no update runs, until the learner stops.
async fn gauges(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while shared.stop.run_until_cancelled(tick.tick()).await.is_some() {
        let s = shared.status(0);
        let set = |name: &'static str, v: u64| ::metrics::gauge!(name).set(v as f64);
        set("spur_learner_connected_actors", s.connected_actors as u64);
        set("spur_learner_env_steps", s.env_steps);
        set("spur_learner_env_steps_received", s.env_steps_received);
        set("spur_learner_policy_version", s.policy_version);
        set("spur_learner_dropped_stale_chunks", s.dropped_stale_chunks);
        set("spur_learner_dropped_steps_stale", s.dropped_steps_stale);
        set(
            "spur_learner_dropped_steps_incarnation",
            s.dropped_steps_incarnation,
        );
        set(
            "spur_learner_dropped_steps_malformed",
            s.dropped_steps_malformed,
        );
    }
}

/// On `shutdown`: readiness drops first, so no new work arrives, then the trainer
/// is asked to stop. Ends without doing anything when the learner stops by itself.
async fn watch_shutdown(
    shutdown: impl Future<Output = ()>,
    shared: Arc<Shared>,
    reporter: tonic_health::server::HealthReporter,
) {
    tokio::select! {
        _ = shutdown => {
            info!("shutdown requested, finishing the current update");
            reporter.set_not_serving::<LearnerServer<LearnerService>>().await;
            shared.stop.cancel();
        }
        _ = shared.stop.cancelled() => {}
    }
}

/// The parts that still run once the trainer has returned, and how they end.
struct Running {
    shared: Arc<Shared>,
    reporter: tonic_health::server::HealthReporter,
    weights_stop: CancellationToken,
    weight_streams: TaskTracker,
    server_stop: CancellationToken,
    server: ServerTask,
    tasks: TaskTracker,
}

/// The main gRPC server's task.
type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Actors that sent chunks this long before the end of training are waited for until
/// they have heard that it finished (or the drain deadline passes): one that was
/// redialing its weight stream at that moment would otherwise redial forever.
const TELL_RECENT: Duration = Duration::from_secs(30);

impl Running {
    /// After a finished run: waits until every actor heard from lately has been told
    /// on its weight stream, or until `deadline`.
    async fn tell_every_actor(&self, deadline: tokio::time::Instant) {
        let all_told = async {
            while !self.shared.untold_actors(TELL_RECENT).is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout_at(deadline, all_told).await.is_err() {
            warn!(
                actors = ?self.shared.untold_actors(TELL_RECENT),
                "actors that were sending chunks never came back for the finished flag"
            );
        }
    }

    /// Ends everything by `deadline`: health, trajectory streams, weight streams
    /// (after a finished run, once every subscriber has the final version), the
    /// server, then every other task; stragglers are named in the log.
    async fn drain(self, deadline: tokio::time::Instant) {
        self.reporter
            .set_not_serving::<LearnerServer<LearnerService>>()
            .await;
        self.shared.stop.cancel();
        if self.shared.training_finished.load(Ordering::Acquire) {
            self.tell_every_actor(deadline).await;
        } else {
            self.weights_stop.cancel(); // nothing more to send after a shutdown
        }
        self.weight_streams.close();
        if tokio::time::timeout_at(deadline, self.weight_streams.wait())
            .await
            .is_err()
        {
            warn!(
                streams = self.weight_streams.len(),
                "weight streams still sending at the drain deadline, ending them"
            );
        }
        self.weights_stop.cancel();
        self.server_stop.cancel();
        match tokio::time::timeout_at(deadline, self.server).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "grpc server ended with an error"),
            Err(_) => warn!("grpc server did not drain by the deadline"),
            _ => {}
        }
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = self.tasks.len(),
                "tasks still running at the drain deadline: trajectory streams, the \
                 reward-model subscription or the gauges"
            );
        }
    }
}

/// Serves on an already bound listener until training ends, or until `shutdown`
/// resolves: then health turns NOT_SERVING, the trainer finishes its update and
/// checkpoints, streams end, and every task is joined, all within
/// `run.drain_timeout_ms`.
pub async fn serve(
    config: Config,
    opts: LearnerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<TrainSummary, LearnerError> {
    let run_dir = opts.run_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(run_dir_error(&run_dir))?;
    std::fs::write(run_dir.join("config.toml"), config.to_toml())
        .map_err(run_dir_error(&run_dir))?;
    let drain = Duration::from_millis(config.run.drain_timeout_ms);
    // Certificates, the token and the health port before any training work.
    let transport = Transport::from_config(&config.transport)?;
    let main_server = transport.server()?;
    let reward_client = config
        .intrinsic
        .enabled
        .then(|| transport.client(&config.reward_service.addr))
        .transpose()?;
    let health_listener =
        bind_health("learner.health_listen", &config.learner.health_listen).await?;
    let started = start(&config, &opts).await?;
    let shared = started.shared.clone();

    let tasks = TaskTracker::new();
    let (service, trainer, weights) = assemble(&config, &opts, started, &tasks)?;
    if let (Some(table), Some(client)) = (&trainer.intrinsic, reward_client) {
        tasks.spawn(intrinsic::subscribe(
            client,
            table.clone(),
            shared.stop.clone(),
        ));
    }
    let mut result_rx =
        on_own_thread(TRAINER_THREAD, move || trainer.run()).map_err(run_dir_error(&run_dir))?;
    tasks.spawn(gauges(shared.clone()));
    let (reporter, health) = tonic_health::server::health_reporter();
    tasks.spawn(watch_shutdown(shutdown, shared.clone(), reporter.clone()));
    // Weights are loaded and the trainer runs: ready.
    reporter
        .set_serving::<LearnerServer<LearnerService>>()
        .await;
    let ports = Ports {
        transport: &transport,
        main_server,
        listener,
        health_listener,
        run_dir: &run_dir,
    };
    let (server_stop, server) = ports.serve(&config, service, health, &tasks)?;

    // The trainer ends by itself (goal reached) or after a shutdown request; the
    // latter must finish its update and checkpoint within the drain timeout.
    let result = tokio::select! {
        r = &mut result_rx => r.map_err(|_| LearnerError::TrainerPanicked)?,
        _ = async { shared.stop.cancelled().await; tokio::time::sleep(drain).await } => {
            warn!(?drain, "the trainer did not checkpoint within the drain timeout");
            Err(LearnerError::DrainTimeout(drain))
        }
    };
    let running = Running {
        shared,
        reporter,
        weights_stop: weights.stop,
        weight_streams: weights.streams,
        server_stop,
        server,
        tasks,
    };
    running.drain(tokio::time::Instant::now() + drain).await;
    let summary = result?;
    info!(
        version = summary.policy_version,
        env_steps = summary.env_steps,
        return_mean = summary.episode_return_mean,
        "training finished"
    );
    Ok(summary)
}

/// How a failure to write into the run directory reads.
fn run_dir_error(run_dir: &std::path::Path) -> impl Fn(std::io::Error) -> LearnerError + '_ {
    move |source| LearnerError::RunDir {
        path: run_dir.display().to_string(),
        source,
    }
}

/// The weight streams' own stop and tracker: they outlive the trajectory streams after
/// a finished run, until every subscriber has the final version.
struct WeightStreams {
    stop: CancellationToken,
    streams: TaskTracker,
}

/// Connects what `start` made: the broadcaster (holding the starting weights), the
/// chunk queue between the gRPC service and the trainer, the service and the trainer.
fn assemble(
    config: &Config,
    opts: &LearnerOptions,
    started: Start,
    tasks: &TaskTracker,
) -> Result<(LearnerService, Trainer, WeightStreams), LearnerError> {
    let lc = &config.learner;
    let weights = WeightStreams {
        stop: CancellationToken::new(),
        streams: TaskTracker::new(),
    };
    let broadcaster = Broadcaster::new(
        Published {
            version: started.version,
            bytes: started
                .model
                .to_safetensors_as(started.version, &Default::default(), lc.weights_dtype)?
                .into(),
            finished: false,
        },
        lc.weights_chunk_bytes as usize,
        started.shared.incarnation,
        weights.stop.clone(),
        weights.streams.clone(),
    );
    let (queue_tx, queue_rx) = queue::channel(lc.queue_capacity as usize);
    let service = LearnerService {
        shared: started.shared.clone(),
        queue: queue_tx,
        expect: expectation(config, &started.spec, started.model.state_size()),
        broadcaster: broadcaster.clone(),
        tasks: tasks.clone(),
    };
    let helpers = parallel::Helpers::for_model(
        &config.learner,
        &started.model,
        config.run.torch_threads as i32,
    );
    let trainer = Trainer {
        intrinsic: started.intrinsic,
        config: config.clone(),
        run_dir: opts.run_dir.clone(),
        model: started.model,
        spec: started.spec,
        version: started.version,
        updates: started.updates,
        opt: started.opt,
        time_offset_s: started.time_offset_s,
        shared: started.shared,
        broadcaster,
        rx: queue_rx,
        rt: tokio::runtime::Handle::current(),
        groups_kept: 0,
        groups_dropped: 0,
        discard_chunks: opts.discard_chunks,
        helpers,
        returns: started.returns,
    };
    Ok((service, trainer, weights))
}

/// The learner's listeners, before they serve.
struct Ports<'a> {
    transport: &'a Transport,
    /// The main port's server, TLS and all.
    main_server: tonic::transport::Server,
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    run_dir: &'a std::path::Path,
}

impl Ports<'_> {
    /// Writes the bound addresses into the run directory and serves: health on its
    /// own plain port (if any) and with the learner service on the main one. Returns
    /// the token that stops both and the main server's task.
    fn serve(
        self,
        config: &Config,
        service: LearnerService,
        health: HealthServer<impl Health>,
        tasks: &TaskTracker,
    ) -> Result<(CancellationToken, ServerTask), LearnerError> {
        let io_err = run_dir_error(self.run_dir);
        let lc = &config.learner;
        let addr = self.listener.local_addr().map_err(&io_err)?;
        checkpoint::write_atomic(&self.run_dir.join(ADDR_FILE), addr.to_string().as_bytes())
            .map_err(&io_err)?;
        info!(%addr, run_dir = %self.run_dir.display(), "learner listening");
        let stop = CancellationToken::new();
        if let Some(listener) = self.health_listener {
            let health_addr = listener.local_addr().map_err(&io_err)?.to_string();
            checkpoint::write_atomic(&self.run_dir.join(HEALTH_ADDR_FILE), health_addr.as_bytes())
                .map_err(&io_err)?;
            tasks.spawn(self.transport.serve_health(
                listener,
                health.clone(),
                stop.clone().cancelled_owned(),
            ));
        }
        let server = tokio::spawn(
            self.main_server
                // Windows large enough for a chunk to arrive without waiting for
                // window updates; actors keep at most `actor.max_unacked_chunks` in
                // flight, so the bounded queue, not the windows, sets the policy lag.
                .initial_stream_window_size(Some(lc.stream_window_bytes))
                .initial_connection_window_size(Some(lc.connection_window_bytes))
                .add_service(health)
                .add_service(
                    self.transport.guard(
                        LearnerServer::new(service)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    ),
                )
                .serve_with_incoming_shutdown(
                    incoming(self.listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        Ok((stop, server))
    }
}
