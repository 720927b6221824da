//! The actor's readiness, reported by gRPC health on `actor.health_listen` (a plain
//! port: the kubelet's `grpc:` probes present no client certificate). The service
//! [`HEALTH_SERVICE`] is SERVING while the policy acts with the learner's weights
//! and the trajectory stream to the learner is open, NOT_SERVING before that, while
//! the stream is being reopened, and from the moment shutdown starts. The whole
//! server ("") stays SERVING for as long as the process runs (liveness).
//!
//! The rollout thread and the push task flip flags in a watch channel; [`report`]
//! turns each change into the health service's status.

use std::sync::Arc;

use spur_core::transport::Transport;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::info;

/// The name probes ask for (a health name only: the actor serves no other gRPC).
pub const HEALTH_SERVICE: &str = "spur.v1.Actor";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    /// The policy holds weights from the learner.
    acting: bool,
    /// The trajectory stream to the learner is open.
    streaming: bool,
    /// Shutdown has started.
    stopping: bool,
}

impl State {
    fn status(self) -> ServingStatus {
        if self.acting && self.streaming && !self.stopping {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}

/// The flags behind the actor's readiness; cheap to clone, usable from any thread.
/// `Readiness::default()` reports to nobody (a rollout loop without a health port).
#[derive(Clone)]
pub struct Readiness(Arc<watch::Sender<State>>);

impl Default for Readiness {
    fn default() -> Self {
        Self::new().0
    }
}

impl Readiness {
    pub(crate) fn new() -> (Self, watch::Receiver<State>) {
        let (tx, rx) = watch::channel(State::default());
        (Self(Arc::new(tx)), rx)
    }

    /// The policy acts with the learner's weights (from the first swap on).
    pub(crate) fn acting(&self) {
        self.0
            .send_if_modified(|s| !std::mem::replace(&mut s.acting, true));
    }

    /// The trajectory stream opened (`true`) or broke (`false`).
    pub(crate) fn streaming(&self, open: bool) {
        self.0
            .send_if_modified(|s| std::mem::replace(&mut s.streaming, open) != open);
    }

    pub(crate) fn stopping(&self) {
        self.0
            .send_if_modified(|s| !std::mem::replace(&mut s.stopping, true));
    }
}

/// Serves gRPC health on `listener` (plain, whatever `transport` says of the rest)
/// until `stop` is cancelled; [`HEALTH_SERVICE`] follows `flags` and is NOT_SERVING
/// before the first probe can ask.
pub(crate) async fn serve(
    listener: TcpListener,
    transport: &Transport,
    flags: watch::Receiver<State>,
    actor_id: String,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(HEALTH_SERVICE, ServingStatus::NotServing)
        .await;
    tokio::spawn(report(flags, reporter, actor_id));
    tokio::spawn(transport.serve_health(listener, service, stop.cancelled_owned()))
}

/// Sets [`HEALTH_SERVICE`]'s status from every change of the flags; ends when every
/// [`Readiness`] is gone.
async fn report(mut flags: watch::Receiver<State>, reporter: HealthReporter, actor_id: String) {
    let mut last = None;
    loop {
        let status = flags.borrow_and_update().status();
        if last != Some(status) {
            info!(
                actor_id,
                ready = status == ServingStatus::Serving,
                "readiness"
            );
            reporter.set_service_status(HEALTH_SERVICE, status).await;
            last = Some(status);
        }
        if flags.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_needs_weights_and_an_open_stream_and_no_shutdown() {
        let (r, rx) = Readiness::new();
        let status = || rx.borrow().status();
        assert_eq!(status(), ServingStatus::NotServing);
        r.streaming(true);
        assert_eq!(status(), ServingStatus::NotServing, "no weights yet");
        r.acting();
        assert_eq!(status(), ServingStatus::Serving);
        r.streaming(false);
        assert_eq!(status(), ServingStatus::NotServing, "reconnecting");
        r.streaming(true);
        assert_eq!(status(), ServingStatus::Serving);
        r.stopping();
        assert_eq!(status(), ServingStatus::NotServing, "draining");
        r.streaming(true);
        assert_eq!(status(), ServingStatus::NotServing, "draining stays");
    }
}
