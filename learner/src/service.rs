//! The `spur.v1.Learner` gRPC service: accepts trajectory streams into the bounded
//! queue, serves versioned weights and reports status.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use spur_core::trajectory::{Chunk, ChunkExpectation};
use spur_proto::v1::learner_server::Learner;
use spur_proto::v1::{
    LearnerStatus, PushSummary, StatusRequest, SubscribeWeightsRequest, TrajectoryChunk,
    WeightsChunk,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::broadcast::Broadcaster;
use crate::error::{malformed_chunk, not_accepting};
use crate::state::{ConnectedGuard, Shared};

pub struct LearnerService {
    pub shared: Arc<Shared>,
    pub queue: mpsc::Sender<Chunk>,
    pub expect: ChunkExpectation,
    pub broadcaster: Broadcaster,
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn push_trajectories(
        &self,
        request: Request<Streaming<TrajectoryChunk>>,
    ) -> Result<Response<PushSummary>, Status> {
        let peer = request.remote_addr();
        let mut stream = request.into_inner();
        let _guard = ConnectedGuard::new(&self.shared);
        let mut accepted = 0u64;
        let mut actor = String::new();
        while let Some(msg) = stream.message().await? {
            let actor_id = msg.actor_id.clone();
            if actor.is_empty() && !actor_id.is_empty() {
                info!(actor_id, ?peer, "actor stream opened");
                actor = actor_id.clone();
            }
            let chunk = Chunk::from_proto(msg, &self.expect).map_err(|e| malformed_chunk(&actor_id, &e))?;
            let steps = chunk.steps() as u64;
            self.shared.env_steps.fetch_add(steps, Ordering::Relaxed);
            self.shared.record_episodes(&chunk.finished_episodes);
            self.shared
                .record_chunk(&chunk.actor_id, chunk.policy_version, steps);
            // Waits while the queue is full: the stream is not read, and HTTP/2 flow
            // control slows the actor down.
            self.queue.send(chunk).await.map_err(|_| not_accepting())?;
            accepted += 1;
        }
        debug!(actor, accepted, "actor stream closed");
        Ok(Response::new(PushSummary {
            accepted_chunks: accepted,
            dropped_stale_chunks: self.shared.dropped_stale_chunks.load(Ordering::Relaxed),
        }))
    }

    type SubscribeWeightsStream = ReceiverStream<Result<WeightsChunk, Status>>;

    async fn subscribe_weights(
        &self,
        request: Request<SubscribeWeightsRequest>,
    ) -> Result<Response<Self::SubscribeWeightsStream>, Status> {
        let req = request.into_inner();
        debug!(actor_id = req.actor_id, have = req.have_version, "weights subscriber");
        Ok(Response::new(self.broadcaster.subscribe(req.have_version)))
    }

    async fn get_status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<LearnerStatus>, Status> {
        let depth = self.queue.max_capacity() - self.queue.capacity();
        Ok(Response::new(self.shared.status(depth as u32)))
    }
}
