//! Weight broadcast: the training thread publishes each new version into a watch
//! channel, which keeps only the latest; each subscriber stream sends whatever is
//! newest when it is ready, so a slow subscriber skips versions instead of queueing
//! them. Payloads are cut into pieces below the message limit.

use std::sync::Arc;

use spur_proto::v1::WeightsChunk;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// One published version: safetensors bytes, and whether training has finished.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub bytes: Arc<Vec<u8>>,
    pub finished: bool,
}

#[derive(Clone)]
pub struct Broadcaster {
    tx: Arc<watch::Sender<Arc<Published>>>,
    chunk_bytes: usize,
}

impl Broadcaster {
    pub fn new(initial: Published, chunk_bytes: usize) -> Self {
        let (tx, _) = watch::channel(Arc::new(initial));
        Self {
            tx: Arc::new(tx),
            chunk_bytes,
        }
    }

    pub fn publish(&self, p: Published) {
        self.tx.send_replace(Arc::new(p));
    }

    /// A stream of pieces for every version newer than `have_version` (versions start
    /// at 1, so 0 asks for everything), starting with the latest; it ends after a
    /// finished version.
    pub fn subscribe(&self, have_version: u64) -> ReceiverStream<Result<WeightsChunk, Status>> {
        let mut rx = self.tx.subscribe();
        let (out, stream) = mpsc::channel(2);
        let chunk_bytes = self.chunk_bytes;
        tokio::spawn(async move {
            let mut sent = have_version;
            let mut first = true;
            loop {
                let p = rx.borrow_and_update().clone();
                if p.version > sent || (first && p.finished) {
                    for piece in pieces(&p, chunk_bytes) {
                        if out.send(Ok(piece)).await.is_err() {
                            return; // subscriber went away
                        }
                    }
                    sent = p.version;
                }
                first = false;
                if p.finished {
                    return;
                }
                if rx.changed().await.is_err() {
                    return; // learner shut down
                }
            }
        });
        ReceiverStream::new(stream)
    }
}

/// Cuts a payload into messages of at most `chunk_bytes` data each.
pub fn pieces(p: &Published, chunk_bytes: usize) -> Vec<WeightsChunk> {
    let total = p.bytes.len();
    let n = total.div_ceil(chunk_bytes).max(1);
    (0..n)
        .map(|i| {
            let start = i * chunk_bytes;
            let end = (start + chunk_bytes).min(total);
            WeightsChunk {
                version: p.version,
                chunk_index: i as u32,
                num_chunks: n as u32,
                total_bytes: total as u64,
                data: p.bytes[start..end].to_vec(),
                training_finished: p.finished && i + 1 == n,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn published(version: u64, len: usize, finished: bool) -> Published {
        Published {
            version,
            bytes: Arc::new((0..len).map(|i| i as u8).collect()),
            finished,
        }
    }

    #[test]
    fn pieces_cover_the_payload_in_order() {
        let p = published(3, 2500, false);
        let ps = pieces(&p, 1024);
        assert_eq!(ps.len(), 3);
        assert_eq!(
            ps.iter().map(|c| c.data.len()).collect::<Vec<_>>(),
            vec![1024, 1024, 452]
        );
        let joined: Vec<u8> = ps.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(&joined, p.bytes.as_ref());
        assert!(ps
            .iter()
            .all(|c| c.num_chunks == 3 && c.total_bytes == 2500));
    }

    #[tokio::test]
    async fn slow_subscriber_gets_the_latest_not_a_backlog() {
        let b = Broadcaster::new(published(1, 10, false), 1024);
        let mut s = b.subscribe(0);
        assert_eq!(s.next().await.unwrap().unwrap().version, 1);
        for v in 2..=9 {
            b.publish(published(v, 10, false));
        }
        // The stream's small buffer may hold one older version; it then jumps to 9.
        let mut seen = Vec::new();
        b.publish(published(10, 10, true));
        while let Some(c) = s.next().await {
            seen.push(c.unwrap().version);
        }
        assert!(seen.len() <= 3, "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 10);
    }

    #[tokio::test]
    async fn subscriber_with_current_version_waits_for_a_newer_one() {
        let b = Broadcaster::new(published(5, 10, false), 1024);
        let mut s = b.subscribe(5);
        b.publish(published(6, 10, false));
        assert_eq!(s.next().await.unwrap().unwrap().version, 6);
    }
}
