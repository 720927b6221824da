//! spur-learner: the central learner.
//!
//! [`serve`] binds the `spur.v1.Learner` gRPC service (plus gRPC health) and runs the
//! training thread until the env-step budget or target return is reached, or until
//! `shutdown` resolves; either way it writes a final checkpoint and tells actors that
//! training has finished.
//!
//! - `service.rs`: the gRPC handlers (trajectory streams into a bounded queue)
//! - `trainer.rs`: the training thread (V-trace targets, PPO updates, checkpoints)
//! - `batch.rs`: chunks to a time-major batch
//! - `broadcast.rs`: latest-wins weight broadcast, chunked under the message limit
//! - `intrinsic.rs`: the reward-model subscription and reward mixing
//! - `state.rs`: counters and episode statistics shared by handlers and trainer
//! - `metrics.rs`: `metrics.jsonl`
//! - `error.rs`: errors and their gRPC statuses

mod batch;
mod broadcast;
mod episodes;
mod error;
mod intrinsic;
mod metrics;
mod service;
mod state;
mod tensorboard;
mod trainer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use spur_core::checkpoint;
use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::env::env_spec;
use spur_core::model::ActorCritic;
use spur_core::trajectory::ChunkExpectation;
use spur_proto::v1::learner_server::LearnerServer;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use error::LearnerError;
pub use trainer::{TrainSummary, META_ENV_STEPS, META_UPDATES};

use broadcast::{Broadcaster, Published};
use service::LearnerService;
use state::Shared;
use trainer::Trainer;

/// HTTP/2 flow-control window of the learner's server, per stream and connection.
const FLOW_WINDOW_BYTES: u32 = 64 * 1024;

/// Name of the file in the run directory that holds the bound address.
pub const ADDR_FILE: &str = "learner.addr";

#[derive(Debug, Clone)]
pub struct LearnerOptions {
    pub run_dir: PathBuf,
    /// Continue from the newest checkpoint in `run_dir/checkpoints`.
    pub resume: bool,
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

/// Serves on an already bound listener until training ends.
pub async fn serve(
    config: Config,
    opts: LearnerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<TrainSummary, LearnerError> {
    let run_dir = opts.run_dir.clone();
    let io_err = |source| LearnerError::RunDir {
        path: run_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&run_dir).map_err(io_err)?;
    std::fs::write(run_dir.join("config.toml"), config.to_toml()).map_err(io_err)?;

    tch::set_num_threads(config.run.torch_threads as i32);
    tch::manual_seed(config.run.seed as i64);
    let spec = env_spec(&config.env)?;
    let device = resolve_device(&config.learner.device);
    let mut model = ActorCritic::for_spec(&spec, &config.model, device)?;
    let (mut version, mut updates, mut env_steps) = (1u64, 0u64, 0u64);
    if opts.resume {
        match checkpoint::load_latest(&run_dir.join("checkpoints"))? {
            Some(l) => {
                model.load_safetensors(&l.bytes)?;
                version = l.version;
                let meta = |k: &str| l.metadata.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
                updates = meta(META_UPDATES);
                env_steps = meta(META_ENV_STEPS);
                info!(version, env_steps, path = %l.path.display(), "resumed from checkpoint");
            }
            None => {
                warn!(run_dir = %run_dir.display(), "no checkpoint to resume from, starting fresh")
            }
        }
    }

    let lc = &config.learner;
    let shared = Arc::new(Shared::new(lc.queue_capacity, config.stop.env_steps));
    shared.policy_version.store(version, Ordering::Release);
    shared.env_steps.store(env_steps, Ordering::Relaxed);
    shared.updates.store(updates, Ordering::Relaxed);
    let initial = model.to_safetensors(version, &Default::default())?;
    let broadcaster = Broadcaster::new(
        Published {
            version,
            bytes: Arc::new(initial),
            finished: false,
        },
        lc.weights_chunk_bytes as usize,
    );
    let (queue_tx, queue_rx) = mpsc::channel(lc.queue_capacity as usize);
    let service = LearnerService {
        shared: shared.clone(),
        queue: queue_tx,
        expect: ChunkExpectation {
            rollout_len: config.actor.rollout_len as usize,
            obs_dim: spec.obs_dim,
            num_actions: spec.num_actions,
            group_size: if matches!(
                config.learner.advantage,
                spur_core::config::AdvantageKind::Uis1 | spur_core::config::AdvantageKind::Hybrid
            ) {
                config.actor.group_size
            } else {
                0
            },
        },
        broadcaster: broadcaster.clone(),
    };
    let intrinsic = config.intrinsic.enabled.then(|| {
        let table = Arc::new(intrinsic::RewardTable::default());
        tokio::spawn(intrinsic::subscribe(
            config.reward_service.addr.clone(),
            table.clone(),
            shared.clone().stop_flag(),
        ));
        table
    });
    let trainer = Trainer {
        intrinsic,
        config: config.clone(),
        run_dir: run_dir.clone(),
        model,
        spec,
        version,
        updates,
        shared: shared.clone(),
        broadcaster,
        rx: queue_rx,
        rt: tokio::runtime::Handle::current(),
    };
    let (result_tx, result_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("spur-trainer".into())
        .spawn(move || {
            let _ = result_tx.send(trainer.run());
        })
        .map_err(io_err)?;

    // Prometheus gauges that move even while no update runs.
    let gauges = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        while !gauges.stop_requested.load(Ordering::Acquire) {
            tick.tick().await;
            let s = gauges.status(0);
            ::metrics::gauge!("spur_learner_connected_actors").set(s.connected_actors as f64);
            ::metrics::gauge!("spur_learner_env_steps").set(s.env_steps as f64);
            ::metrics::gauge!("spur_learner_policy_version").set(s.policy_version as f64);
            ::metrics::gauge!("spur_learner_dropped_stale_chunks")
                .set(s.dropped_stale_chunks as f64);
        }
    });

    let stopper = shared.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested, finishing the current update");
        stopper.stop_requested.store(true, Ordering::Release);
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<LearnerServer<LearnerService>>()
        .await;
    let addr = listener.local_addr().map_err(io_err)?;
    checkpoint::write_atomic(&run_dir.join(ADDR_FILE), addr.to_string().as_bytes())
        .map_err(io_err)?;
    info!(%addr, run_dir = %run_dir.display(), "learner listening");

    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // Small HTTP/2 windows: chunks wait in the actors, not in socket buffers,
            // so the bounded queue is what sets the policy lag.
            .initial_stream_window_size(Some(FLOW_WINDOW_BYTES))
            .initial_connection_window_size(Some(FLOW_WINDOW_BYTES))
            .add_service(health)
            .add_service(
                LearnerServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = server_stopped.await;
            }),
    );

    let result = result_rx.await.map_err(|_| LearnerError::TrainerPanicked)?;
    reporter
        .set_not_serving::<LearnerServer<LearnerService>>()
        .await;
    // Let subscribers receive the final weights and the finished flag.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_server.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "grpc server ended with an error"),
        Err(_) => warn!("grpc server did not drain within 5 s"),
        _ => {}
    }
    let summary = result?;
    info!(
        version = summary.policy_version,
        env_steps = summary.env_steps,
        return_mean = summary.episode_return_mean,
        "training finished"
    );
    Ok(summary)
}
