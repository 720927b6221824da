//! The actor's weight subscription: keeps a watch slot filled with the newest
//! complete weights payload, reassembling pieces and reconnecting with backoff. The
//! rollout thread takes from the slot between steps and never waits on it. The
//! subscription names the learner incarnation its weights came from, so a restarted
//! learner sends its own current version even when its number is lower.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use spur_core::transport::Connector;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::{SubscribeWeightsRequest, WeightsChunk};
use spur_proto::{Bytes, MAX_MESSAGE_BYTES};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use spur_core::redial::{CallError, Redial};

/// A complete weights payload.
#[derive(Debug)]
pub struct WeightsUpdate {
    pub version: u64,
    /// The learner incarnation that published this version.
    pub incarnation: u64,
    pub bytes: Bytes,
}

pub type WeightsSlot = watch::Sender<Option<Arc<WeightsUpdate>>>;

/// Reassembles one version from its pieces; any gap or inconsistency discards it.
#[derive(Default)]
pub struct WeightsAssembler {
    version: u64,
    incarnation: u64,
    next: u32,
    total: u64,
    buf: Vec<u8>,
}

impl WeightsAssembler {
    /// Adds a piece; returns the payload when it completes a version.
    pub fn push(&mut self, c: WeightsChunk) -> Option<WeightsUpdate> {
        if c.chunk_index == 0 {
            self.version = c.version;
            self.incarnation = c.learner_incarnation;
            self.next = 0;
            self.total = c.total_bytes;
            self.buf.clear();
        }
        let consistent = c.version == self.version
            && c.learner_incarnation == self.incarnation
            && c.chunk_index == self.next
            && c.total_bytes == self.total
            && c.num_chunks > c.chunk_index
            && self.buf.len() + c.data.len() <= self.total as usize;
        if !consistent {
            warn!(
                version = c.version,
                index = c.chunk_index,
                "discarding an inconsistent weights piece"
            );
            self.next = u32::MAX;
            return None;
        }
        if c.num_chunks == 1 {
            // The whole payload in one message: keep its buffer, no copy.
            return self.complete(c.data);
        }
        self.buf.extend_from_slice(&c.data);
        self.next += 1;
        if self.next == c.num_chunks {
            let bytes = std::mem::take(&mut self.buf).into();
            return self.complete(bytes);
        }
        None
    }

    /// The finished version, if its payload is as long as its first piece announced.
    fn complete(&self, bytes: Bytes) -> Option<WeightsUpdate> {
        if bytes.len() as u64 != self.total {
            warn!(
                version = self.version,
                "weights payload shorter than announced"
            );
            return None;
        }
        Some(WeightsUpdate {
            version: self.version,
            incarnation: self.incarnation,
            bytes,
        })
    }
}

/// Runs until training finishes (then sets `finished` and cancels `stop`) or until
/// `stop` is cancelled.
pub async fn subscribe(
    learner: Connector,
    actor_id: String,
    slot: WeightsSlot,
    finished: Arc<AtomicBool>,
    stop: CancellationToken,
    max_backoff: Duration,
) {
    stop.run_until_cancelled(follow(
        learner,
        actor_id,
        slot,
        finished,
        stop.clone(),
        max_backoff,
    ))
    .await;
}

async fn follow(
    learner: Connector,
    actor_id: String,
    slot: WeightsSlot,
    finished: Arc<AtomicBool>,
    stop: CancellationToken,
    max_backoff: Duration,
) {
    let mut redial = Redial::new(&actor_id, "learner", max_backoff);
    loop {
        let (have, have_incarnation) = slot
            .borrow()
            .as_ref()
            .map_or((0, 0), |w| (w.version, w.incarnation));
        let request = SubscribeWeightsRequest {
            actor_id: actor_id.clone(),
            have_version: have,
            have_incarnation,
        };
        // A fresh connection each time: the learner's name is resolved again, so a
        // restarted learner at a new address is found.
        let learner = &learner;
        let open = || {
            let request = request.clone();
            async move {
                let channel = learner.connect().await?;
                let stream = LearnerClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .subscribe_weights(request)
                    .await?;
                Ok::<_, CallError>(stream.into_inner())
            }
        };
        let Some(mut stream) = redial.open(open, || false).await else {
            return;
        };
        let mut assembler = WeightsAssembler::default();
        let mut known = have_incarnation;
        let why = loop {
            match stream.message().await {
                Ok(Some(piece)) => {
                    redial.progressed();
                    let done = piece.training_finished;
                    if let Some(update) = assembler.push(piece) {
                        if update.incarnation != known && known != 0 {
                            info!(
                                actor_id,
                                incarnation = update.incarnation,
                                version = update.version,
                                "a new learner incarnation took over, adopting its weights"
                            );
                        }
                        known = update.incarnation;
                        debug!(actor_id, version = update.version, "new weights");
                        slot.send_replace(Some(Arc::new(update)));
                    }
                    if done {
                        info!(actor_id, "the learner finished training");
                        finished.store(true, Ordering::Release);
                        stop.cancel();
                        return;
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(CallError::from(status)),
            }
        };
        redial.ended(why.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(version: u64, index: u32, n: u32, total: u64, data: &[u8]) -> WeightsChunk {
        WeightsChunk {
            version,
            chunk_index: index,
            num_chunks: n,
            total_bytes: total,
            data: data.to_vec().into(),
            training_finished: false,
            learner_incarnation: 3,
        }
    }

    #[test]
    fn assembles_in_order_and_rejects_gaps() {
        let mut a = WeightsAssembler::default();
        assert!(a.push(piece(2, 0, 2, 4, &[1, 2])).is_none());
        let w = a.push(piece(2, 1, 2, 4, &[3, 4])).unwrap();
        assert_eq!((w.version, &w.bytes[..]), (2, &[1u8, 2, 3, 4][..]));
        // a missing middle piece discards the version
        assert!(a.push(piece(3, 0, 3, 6, &[1, 2])).is_none());
        assert!(a.push(piece(3, 2, 3, 6, &[5, 6])).is_none());
        // a fresh version starts over cleanly
        let w = a.push(piece(4, 0, 1, 1, &[9])).unwrap();
        assert_eq!((w.version, w.incarnation), (4, 3));
        // pieces of one version from two incarnations never mix
        assert!(a.push(piece(5, 0, 2, 2, &[1])).is_none());
        let mut other = piece(5, 1, 2, 2, &[2]);
        other.learner_incarnation = 4;
        assert!(a.push(other).is_none());
    }

    #[test]
    fn a_single_piece_is_kept_without_a_copy_and_checked() {
        let mut a = WeightsAssembler::default();
        let one = piece(6, 0, 1, 3, &[7, 8, 9]);
        let at = one.data.as_ptr();
        let w = a.push(one).unwrap();
        assert_eq!((w.version, &w.bytes[..]), (6, &[7u8, 8, 9][..]));
        assert_eq!(w.bytes.as_ptr(), at, "the piece's own buffer");
        // a single piece shorter than its announced total is no version
        assert!(a.push(piece(7, 0, 1, 4, &[1, 2, 3])).is_none());
        // and the next whole one still arrives
        assert_eq!(a.push(piece(8, 0, 1, 1, &[5])).unwrap().version, 8);
    }
}
