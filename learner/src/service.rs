//! The `spur.v1.Learner` gRPC service: accepts trajectory streams into the bounded
//! queue, serves versioned weights and reports status.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use spur_core::trajectory::{Chunk, ChunkExpectation};
use spur_proto::v1::learner_server::Learner;
use spur_proto::v1::{
    LearnerStatus, PushAck, StatusRequest, SubscribeWeightsRequest, TrajectoryChunk, WeightsChunk,
};
use tokio::sync::watch;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::broadcast::Broadcaster;
use crate::error::{malformed_chunk, not_accepting};
use crate::queue::ChunkSender;
use crate::state::{ConnectedGuard, Shared, StepCounts};

pub struct LearnerService {
    pub shared: Arc<Shared>,
    pub queue: ChunkSender,
    pub expect: ChunkExpectation,
    pub broadcaster: Broadcaster,
    /// Every stream task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// Reads one actor's stream: each chunk is checked, counted, queued (waiting while
/// the queue is full) and acknowledged. A chunk of another learner incarnation is
/// acknowledged and counted but never queued. The stream ends with `Unavailable`
/// when the learner shuts down.
async fn receive(
    mut stream: Streaming<TrajectoryChunk>,
    shared: &Shared,
    queue: &ChunkSender,
    expect: &ChunkExpectation,
    acks: &watch::Sender<Option<Result<PushAck, Status>>>,
) -> Result<(), Status> {
    let _guard = ConnectedGuard::new(shared);
    let mut accepted = 0u64;
    let mut actor = String::new();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = shared.stop.cancelled() => return Err(not_accepting()),
        };
        let Some(msg) = msg else { break };
        if actor.is_empty() && !msg.actor_id.is_empty() {
            info!(actor_id = msg.actor_id, "actor stream opened");
            actor = msg.actor_id.clone();
        }
        let actor_id = msg.actor_id.clone();
        let claimed = msg.rollout_len as u64 * msg.num_envs as u64;
        let chunk = match Chunk::from_proto(msg, expect) {
            Ok(c) => c,
            Err(e) => {
                let c = &shared.counts;
                StepCounts::add(&c.malformed_steps, &c.malformed_chunks, claimed);
                return Err(malformed_chunk(&actor_id, &e));
            }
        };
        let steps = chunk.steps() as u64;
        shared.counts.received.fetch_add(steps, Ordering::Relaxed);
        shared.record_chunk(&chunk.actor_id, chunk.policy_version, steps);
        if chunk.learner_incarnation != shared.incarnation {
            let c = &shared.counts;
            StepCounts::add(&c.incarnation_steps, &c.incarnation_chunks, steps);
            debug!(
                actor_id,
                incarnation = chunk.learner_incarnation,
                version = chunk.policy_version,
                "dropping a chunk of a previous learner incarnation"
            );
        } else {
            shared.record_episodes(&chunk.finished_episodes);
            let sent = tokio::select! {
                r = queue.send(chunk) => r.map_err(|_| not_accepting()),
                _ = shared.stop.cancelled() => Err(not_accepting()),
            };
            sent?;
        }
        accepted += 1;
        let ack = PushAck {
            accepted_chunks: accepted,
            policy_version: shared.version(),
            learner_incarnation: shared.incarnation,
        };
        if acks.send(Some(Ok(ack))).is_err() {
            break; // the actor hung up
        }
    }
    debug!(actor, accepted, "actor stream closed");
    Ok(())
}

/// One trajectory stream's acknowledgements, latest wins: each carries the stream's
/// running count of accepted chunks, so an ack not yet sent when the next chunk is
/// accepted is replaced by that chunk's (one frame and one wake-up fewer per chunk
/// when chunks come faster than acks go out). An error ends the stream.
pub type AckStream = std::pin::Pin<Box<dyn Stream<Item = Result<PushAck, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for LearnerService {
    type PushTrajectoriesStream = AckStream;

    async fn push_trajectories(
        &self,
        request: Request<Streaming<TrajectoryChunk>>,
    ) -> Result<Response<Self::PushTrajectoriesStream>, Status> {
        let peer = request.remote_addr();
        let stream = request.into_inner();
        let (acks, out) = watch::channel(None);
        let shared = self.shared.clone();
        let queue = self.queue.clone();
        let expect = self.expect;
        self.tasks.spawn(async move {
            if let Err(status) = receive(stream, &shared, &queue, &expect, &acks).await {
                debug!(?peer, code = ?status.code(), "trajectory stream ended with an error");
                let _ = acks.send(Some(Err(status)));
            }
        });
        Ok(Response::new(Box::pin(
            WatchStream::from_changes(out).filter_map(|ack| ack),
        )))
    }

    type SubscribeWeightsStream = ReceiverStream<Result<WeightsChunk, Status>>;

    async fn subscribe_weights(
        &self,
        request: Request<SubscribeWeightsRequest>,
    ) -> Result<Response<Self::SubscribeWeightsStream>, Status> {
        let req = request.into_inner();
        debug!(
            actor_id = req.actor_id,
            have = req.have_version,
            "weights subscriber"
        );
        let (shared, actor_id) = (self.shared.clone(), req.actor_id);
        Ok(Response::new(self.broadcaster.subscribe(
            req.have_version,
            req.have_incarnation,
            move || shared.told_finished(&actor_id),
        )))
    }

    async fn get_status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<LearnerStatus>, Status> {
        let depth = self.queue.depth();
        Ok(Response::new(self.shared.status(depth as u32)))
    }
}
