//! Streams chunks from the rollout thread to the learner over one client-streaming
//! call, reopening the call with backoff when the learner goes away. A full stream
//! (the learner's queue is full) makes `send` wait, which fills the actor's small
//! send queue, which stops the rollout thread: backpressure all the way to the envs.

use std::time::Duration;

use spur_core::trajectory::Chunk;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::Code;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::error::ActorError;

/// Counters of one actor's pushing.
#[derive(Debug, Default, Clone, Copy)]
pub struct PushStats {
    pub sent_chunks: u64,
    /// Chunks lost because the stream broke while they were in flight.
    pub lost_chunks: u64,
    pub reconnects: u64,
}

/// Sends every chunk from `chunks` until the rollout thread closes it. Returns an
/// error only when the learner rejects a chunk as malformed (a bug, not a hiccup).
pub async fn push(
    endpoint: Endpoint,
    actor_id: String,
    mut chunks: mpsc::Receiver<Chunk>,
    max_backoff: Duration,
) -> Result<PushStats, ActorError> {
    let mut stats = PushStats::default();
    let mut backoff = Backoff::new(max_backoff);
    let mut pending: Option<Chunk> = None;
    loop {
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(actor_id, error = %e, ?delay, "cannot reach the learner, retrying");
                tokio::time::sleep(delay).await;
                // Keep draining so the rollout thread notices a closed channel.
                if chunks.is_closed() && chunks.is_empty() && pending.is_none() {
                    return Ok(stats);
                }
                continue;
            }
        };
        let mut client = LearnerClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(1);
        let mut call = tokio::spawn(async move { client.push_trajectories(ReceiverStream::new(rx)).await });
        if stats.sent_chunks > 0 || stats.reconnects > 0 {
            info!(actor_id, "trajectory stream reopened");
        }
        let outcome = loop {
            let next = match pending.take() {
                Some(c) => Some(c),
                None => tokio::select! {
                    c = chunks.recv() => c,
                    r = &mut call => break Some(r),
                },
            };
            let Some(chunk) = next else {
                // Rollout finished: close the stream and wait for the summary.
                drop(tx);
                let _ = call.await;
                return Ok(stats);
            };
            tokio::select! {
                sent = tx.send(chunk.to_proto()) => {
                    if sent.is_err() {
                        stats.lost_chunks += 1;
                        break None;
                    }
                    stats.sent_chunks += 1;
                    backoff.reset();
                }
                r = &mut call => {
                    // Not handed over yet: send it on the next stream.
                    pending = Some(chunk);
                    break Some(r);
                }
            }
        };
        let status = match outcome {
            Some(Ok(Ok(_))) => None,
            Some(Ok(Err(status))) => Some(status),
            Some(Err(join)) => Some(tonic::Status::internal(join.to_string())),
            None => match call.await {
                Ok(Err(status)) => Some(status),
                _ => None,
            },
        };
        if let Some(status) = status {
            if status.code() == Code::InvalidArgument {
                return Err(ActorError::Rejected(status.message().to_string()));
            }
            warn!(actor_id, code = ?status.code(), error = %status.message(), "trajectory stream ended");
        }
        stats.reconnects += 1;
        tokio::time::sleep(backoff.next_delay()).await;
        if chunks.is_closed() && chunks.is_empty() {
            return Ok(stats);
        }
    }
}
