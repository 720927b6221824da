//! spur-actor: a rollout actor.
//!
//! [`run`] starts three parts that hand work to each other through small bounded
//! channels: the weight subscriber (`weights.rs`, async) fills a latest-wins slot; the
//! rollout thread (`rollout.rs`, blocking, tch) steps the environments (as one lane,
//! or two on threads of their own whose env steps and inference overlap, `lanes.rs`)
//! and produces chunks; the push task (`push.rs`, async) streams them to the learner. Both network
//! parts reconnect with jittered backoff. With intrinsic rewards on, new event texts
//! go to the reward service (`texts.rs`); `error.rs` holds the typed errors. The
//! actor ends when the learner announces that training has finished, or when
//! `shutdown` resolves: one cancellation token stops every part, the push task sends
//! what the rollout thread made and waits for its acknowledgements, and every task is
//! joined within `run.drain_timeout_ms`. With `actor.health_listen` set, a plain gRPC
//! health port says whether the actor is ready (`health.rs`).

mod error;
mod health;
mod lanes;
mod push;
mod rollout;
mod texts;
mod weights;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use spur_core::blocking::on_own_thread;
use spur_core::config::Config;
use spur_core::transport::{bind_health, Transport};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use error::ActorError;
pub use health::{Readiness, HEALTH_SERVICE};
pub use push::PushStats;
pub use rollout::{Rollout, RolloutStats};
pub use weights::{WeightsAssembler, WeightsUpdate};

#[derive(Debug, Clone)]
pub struct ActorOptions {
    pub actor_id: String,
    /// Position of this actor among its peers (`spur local` numbers them). None where
    /// actors have no ordinal (the pods of a Kubernetes Deployment): the seed then
    /// comes from `actor_id`; see [`ActorOptions::seed`].
    pub index: Option<u32>,
    /// Learner address (`http://host:port`); defaults to `actor.learner_addr`.
    pub learner_addr: Option<String>,
}

impl ActorOptions {
    /// The seed of this actor's environments and action sampling, apart from other
    /// actors': `base + 1000 * index`, or without an index `base` plus the first 8
    /// bytes of SHA-256 of the actor id (stable across runs and machines).
    pub fn seed(&self, base: u64) -> u64 {
        let offset = match self.index {
            Some(i) => 1000 * u64::from(i),
            None => {
                let digest = Sha256::digest(self.actor_id.as_bytes());
                u64::from_le_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
            }
        };
        base.wrapping_add(offset)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ActorSummary {
    pub rollout: RolloutStats,
    pub push: PushStats,
    /// The learner said training is over (as opposed to a local shutdown).
    pub training_finished: bool,
}

/// Runs an actor, with its health port bound from `actor.health_listen` (if set).
pub async fn run(
    config: Config,
    opts: ActorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ActorSummary, ActorError> {
    let health = bind_health("actor.health_listen", &config.actor.health_listen).await?;
    serve(config, opts, health, shutdown).await
}

/// Runs an actor that serves gRPC health on `health` (when given) until it ends.
pub async fn serve(
    config: Config,
    opts: ActorOptions,
    health: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ActorSummary, ActorError> {
    let transport = Transport::from_config(&config.transport)?;
    let drain = Duration::from_millis(config.run.drain_timeout_ms);
    let (readiness, flags) = health::Readiness::new();
    let health = HealthPort::open(health, &transport, flags, &opts.actor_id).await;
    let (net, weights, chunks) = Network::start(&config, &opts, &transport, &readiness, shutdown)?;
    let texts = if config.intrinsic.enabled {
        Some(texts::TextSink {
            reward: transport.client(&config.reward_service.addr)?,
            max_backoff: Duration::from_millis(config.actor.max_backoff_ms),
            tasks: net.tasks.clone(),
        })
    } else {
        None
    };
    let rollout = rollout::Rollout {
        texts,
        seed: opts.seed(config.run.seed),
        config,
        actor_id: opts.actor_id.clone(),
        weights,
        readiness: readiness.clone(),
        chunks,
        stop: net.stop.clone(),
        rt: tokio::runtime::Handle::current(),
    };
    let rollout = on_own_thread("spur-rollout", move || rollout.run())
        .map_err(|e| ActorError::Rollout(e.to_string()))?
        .await
        .map_err(|_| ActorError::Rollout("the rollout thread panicked".into()))?;
    // The rollout thread is gone (its chunk channel with it): the push task sends
    // what is left and waits for acknowledgements until the drain deadline.
    readiness.stopping();
    drop(readiness);
    let deadline = tokio::time::Instant::now() + drain;
    let (push, training_finished) = net.drain(deadline, &opts.actor_id).await?;
    health.close(deadline).await;
    let rollout = rollout?;
    let summary = ActorSummary {
        rollout,
        push,
        training_finished,
    };
    info!(
        actor_id = opts.actor_id,
        env_steps = rollout.env_steps,
        chunks = rollout.chunks,
        acked = summary.push.acked_chunks,
        training_finished = summary.training_finished,
        "actor stopped"
    );
    Ok(summary)
}

/// The actor's health port, if it has one; dropping it (on every way out of
/// [`serve`], errors included) closes the port.
struct HealthPort {
    _open: DropGuard,
    server: Option<JoinHandle<()>>,
}

impl HealthPort {
    async fn open(
        listener: Option<TcpListener>,
        transport: &Transport,
        flags: watch::Receiver<health::State>,
        actor_id: &str,
    ) -> Self {
        let stop = CancellationToken::new();
        let server = match listener {
            Some(l) => {
                Some(health::serve(l, transport, flags, actor_id.into(), stop.clone()).await)
            }
            None => None,
        };
        Self {
            _open: stop.drop_guard(),
            server,
        }
    }

    /// Closes the port and waits (until `deadline`) for its server to end.
    async fn close(self, deadline: tokio::time::Instant) {
        let Self { _open, server } = self;
        drop(_open);
        if let Some(server) = server {
            let _ = tokio::time::timeout_at(deadline, server).await;
        }
    }
}

/// Where the weight subscription leaves the newest weights for the rollout thread.
type WeightsSlot = watch::Receiver<Option<Arc<WeightsUpdate>>>;

/// The actor's network side: the weight subscription, the push task, and the task
/// that turns `shutdown` into a stop of every part.
struct Network {
    stop: CancellationToken,
    finished: Arc<AtomicBool>,
    tasks: TaskTracker,
    pusher: JoinHandle<Result<PushStats, ActorError>>,
    drain: Duration,
}

impl Network {
    /// Starts the network tasks; returns them with the weight slot and the chunk
    /// channel the rollout thread uses.
    fn start(
        config: &Config,
        opts: &ActorOptions,
        transport: &Transport,
        readiness: &Readiness,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<
        (
            Self,
            WeightsSlot,
            mpsc::Sender<spur_core::trajectory::Chunk>,
        ),
        ActorError,
    > {
        let addr = opts
            .learner_addr
            .clone()
            .unwrap_or_else(|| config.actor.learner_addr.clone());
        let learner = transport.client(&addr)?;
        let max_backoff = Duration::from_millis(config.actor.max_backoff_ms);
        let drain = Duration::from_millis(config.run.drain_timeout_ms);
        let stop = CancellationToken::new();
        let finished = Arc::new(AtomicBool::new(false));
        let tasks = TaskTracker::new();

        let (slot, slot_rx) = watch::channel(None);
        tasks.spawn(weights::subscribe(
            learner.clone(),
            opts.actor_id.clone(),
            slot,
            finished.clone(),
            stop.clone(),
            max_backoff,
        ));
        let (chunk_tx, chunk_rx) = mpsc::channel(config.actor.send_queue as usize);
        let pusher = tasks.spawn(push::push(
            learner,
            readiness.clone(),
            opts.actor_id.clone(),
            chunk_rx,
            config.actor.max_unacked_chunks as usize,
            max_backoff,
            drain,
        ));
        let stopper = stop.clone();
        let draining = readiness.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown => {
                    info!("shutdown requested, closing the trajectory stream");
                    draining.stopping();
                    stopper.cancel();
                }
                _ = stopper.cancelled() => {}
            }
        });
        let net = Self {
            stop,
            finished,
            tasks,
            pusher,
            drain,
        };
        Ok((net, slot_rx, chunk_tx))
    }

    /// Stops every part, lets the push task send what is left until `deadline`, and
    /// joins the other tasks; returns the push figures and whether the learner said
    /// training is over.
    async fn drain(
        self,
        deadline: tokio::time::Instant,
        actor_id: &str,
    ) -> Result<(PushStats, bool), ActorError> {
        self.stop.cancel();
        let push = match tokio::time::timeout_at(deadline, self.pusher).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => return Err(ActorError::Rollout(e.to_string())),
            Err(_) => {
                warn!(
                    actor_id,
                    drain = ?self.drain,
                    "could not flush the last chunks by the drain deadline"
                );
                PushStats::default()
            }
        };
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                actor_id,
                tasks = self.tasks.len(),
                "tasks still running at the drain deadline: the weight subscription or the text sender"
            );
        }
        Ok((push, self.finished.load(Ordering::Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(actor_id: &str, index: Option<u32>) -> ActorOptions {
        ActorOptions {
            actor_id: actor_id.into(),
            index,
            learner_addr: None,
        }
    }

    #[test]
    fn actors_without_an_index_get_seeds_from_their_ids() {
        let a = opts("spur-actor-7d9f8b6c5-x2k4q", None).seed(1);
        let b = opts("spur-actor-7d9f8b6c5-p9zrt", None).seed(1);
        assert_ne!(a, b, "two pods of one Deployment must not share a seed");
        assert_eq!(a, opts("spur-actor-7d9f8b6c5-x2k4q", None).seed(1));
        assert_ne!(a, opts("spur-actor-7d9f8b6c5-x2k4q", None).seed(2));
        // Pinned (Python: hashlib.sha256(b"actor-a").digest()[:8], little-endian):
        // a pod name seeds alike on any machine and in any release.
        assert_eq!(opts("actor-a", None).seed(5), 17_699_999_571_864_640_253);
    }

    #[test]
    fn an_index_spreads_seeds_as_before() {
        assert_eq!(opts("actor-0", Some(0)).seed(7), 7);
        assert_eq!(opts("actor-3", Some(3)).seed(7), 3007);
        // The index wins over the id: `spur local` runs keep their seeds.
        assert_eq!(opts("anything", Some(3)).seed(7), 3007);
    }
}
