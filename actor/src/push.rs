//! Streams chunks from the rollout thread to the learner over one bidirectional call
//! and counts the learner's acknowledgements: at most `max_unacked` chunks are in
//! flight, so a busy learner (full queue, no acks) stops this task, which fills the
//! actor's small send queue, which stops the rollout thread. Backpressure reaches the
//! environments without chunks piling up in socket buffers, which keeps the policy
//! lag small. The call is reopened with backoff when the learner goes away.

use std::time::Duration;

use spur_core::trajectory::Chunk;
use spur_core::transport::Connector;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::PushAck;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tracing::info;

use crate::error::ActorError;
use crate::health::Readiness;
use spur_core::redial::{CallError, Redial};

/// Counters of one actor's pushing.
#[derive(Debug, Default, Clone, Copy)]
pub struct PushStats {
    pub acked_chunks: u64,
    /// Chunks sent but not acknowledged when a stream broke (they may or may not
    /// have reached the learner).
    pub unacked_on_break: u64,
    pub reconnects: u64,
    /// Chunks still queued when the actor stopped with the learner unreachable.
    pub unsent_on_stop: u64,
}

impl PushStats {
    /// Counts `n` more chunks the learner acknowledged, out of the `unacked` in flight.
    fn acked(&mut self, unacked: &mut usize, n: usize) {
        let n = n.min(*unacked);
        *unacked -= n;
        self.acked_chunks += n as u64;
        metrics::counter!("spur_actor_acked_chunks_total").increment(n as u64);
    }
}

/// One stream's acknowledgements. Each carries the learner's running count of chunks
/// it accepted on the stream, and the learner replaces an ack it has not sent yet
/// with the next one, so one ack may stand for several chunks.
struct Acks {
    stream: tonic::Streaming<PushAck>,
    /// The count of the last ack read.
    seen: u64,
}

impl Acks {
    /// How many more chunks the next ack acknowledges; `None` when the stream ended.
    async fn next(&mut self) -> Result<Option<usize>, tonic::Status> {
        let Some(ack) = self.stream.message().await? else {
            return Ok(None);
        };
        let newly = ack.accepted_chunks.saturating_sub(self.seen);
        self.seen = self.seen.max(ack.accepted_chunks);
        Ok(Some(newly as usize))
    }
}

/// After the rollout finished: waits for the acknowledgements of the `unacked` chunks
/// in flight, until `drain` has passed; what is still unacknowledged then is counted.
async fn last_acks(acks: &mut Acks, mut unacked: usize, drain: Duration, stats: &mut PushStats) {
    let deadline = tokio::time::Instant::now() + drain;
    while unacked > 0 {
        match tokio::time::timeout_at(deadline, acks.next()).await {
            Ok(Ok(Some(n))) => {
                stats.acked(&mut unacked, n);
            }
            _ => break,
        }
    }
    stats.unacked_on_break += unacked as u64;
}

/// Sends every chunk from `chunks` until the rollout thread closes it. Returns an
/// error only when the learner rejects a chunk as malformed (a bug, not a hiccup).
pub async fn push(
    learner: Connector,
    readiness: Readiness,
    actor_id: String,
    mut chunks: mpsc::Receiver<Chunk>,
    max_unacked: usize,
    max_backoff: Duration,
    drain: Duration,
) -> Result<PushStats, ActorError> {
    let mut stats = PushStats::default();
    let mut redial = Redial::new(&actor_id, "learner", max_backoff);
    // A chunk taken from the rollout thread but not yet handed to a stream.
    let mut pending: Option<Chunk> = None;
    loop {
        let learner = &learner;
        let open = || async move {
            let channel = learner.connect().await?;
            let mut client = LearnerClient::new(channel)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel(max_unacked);
            let acks = client.push_trajectories(ReceiverStream::new(rx)).await?;
            let acks = Acks {
                stream: acks.into_inner(),
                seen: 0,
            };
            Ok::<_, CallError>((tx, acks))
        };
        // Stopping, with nobody to hand the rest to: give up.
        let Some((tx, mut acks)) = redial.open(open, || chunks.is_closed()).await else {
            stats.unsent_on_stop += chunks.len() as u64 + pending.is_some() as u64;
            return Ok(stats);
        };
        readiness.streaming(true);
        if stats.reconnects > 0 {
            info!(actor_id, "trajectory stream reopened");
        }
        let mut unacked = 0usize;
        let broke: CallError = loop {
            if unacked >= max_unacked {
                match acks.next().await {
                    Ok(Some(n)) => {
                        stats.acked(&mut unacked, n);
                        continue;
                    }
                    Ok(None) => break CallError::Closed("the learner closed the stream"),
                    Err(status) => break status.into(),
                }
            }
            let chunk = match pending.take() {
                Some(c) => c,
                None => tokio::select! {
                    c = chunks.recv() => match c {
                        Some(c) => c,
                        None => {
                            // Rollout finished: wait for the last acks, then close.
                            drop(tx);
                            last_acks(&mut acks, unacked, drain, &mut stats).await;
                            return Ok(stats);
                        }
                    },
                    a = acks.next() => {
                        match a {
                            Ok(Some(n)) => {
                                stats.acked(&mut unacked, n);
                                continue;
                            }
                            Ok(None) => break CallError::Closed("the learner closed the stream"),
                            Err(status) => break status.into(),
                        }
                    }
                },
            };
            if tx.send(chunk.to_proto()).await.is_err() {
                pending = Some(chunk);
                break CallError::Closed("the trajectory stream closed");
            }
            unacked += 1;
            redial.progressed();
        };
        readiness.streaming(false);
        if let CallError::Rpc(status) = &broke {
            if status.code() == Code::InvalidArgument {
                return Err(ActorError::Rejected(status.message().to_string()));
            }
        }
        stats.unacked_on_break += unacked as u64;
        stats.reconnects += 1;
        metrics::counter!("spur_actor_reconnects_total").increment(1);
        redial.ended(Some(&broke)).await;
        if chunks.is_closed() && chunks.is_empty() && pending.is_none() {
            return Ok(stats);
        }
    }
}
