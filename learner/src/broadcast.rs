//! Weight broadcast: the training thread publishes each new version into a watch
//! channel, which keeps only the latest; each subscriber stream sends whatever is
//! newest when it is ready, so a slow subscriber skips versions instead of queueing
//! them. Payloads are cut into pieces below the message limit, each a slice of the
//! one published buffer. A version still going out when a newer one is published is
//! cut short (the subscriber's reassembly starts over at the newer version's first
//! piece), but never two in a row, so a publisher faster than a subscriber's link
//! cannot starve it. Every piece carries the learner's incarnation; a subscriber that
//! holds weights of another incarnation gets the current version whatever its number
//! (a resumed learner can be behind).

use std::sync::Arc;

use spur_proto::v1::WeightsChunk;
use spur_proto::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// One published version: safetensors bytes (shared by every subscriber's pieces,
/// never copied per subscriber), and whether training has finished.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub bytes: Bytes,
    pub finished: bool,
}

#[derive(Clone)]
pub struct Broadcaster {
    tx: Arc<watch::Sender<Arc<Published>>>,
    chunk_bytes: usize,
    incarnation: u64,
    /// Ends every subscriber stream (shutdown).
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Broadcaster {
    pub fn new(
        initial: Published,
        chunk_bytes: usize,
        incarnation: u64,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let (tx, _) = watch::channel(Arc::new(initial));
        Self {
            tx: Arc::new(tx),
            chunk_bytes,
            incarnation,
            stop,
            tasks,
        }
    }

    pub fn publish(&self, p: Published) {
        self.tx.send_replace(Arc::new(p));
    }

    /// A stream of pieces for every version newer than `have_version` of
    /// `have_incarnation` (versions start at 1, so 0 asks for everything; another
    /// incarnation gets the current version whatever its number), starting with the
    /// latest; it ends after a finished version or when the learner stops. `told` runs
    /// once the finished version's last piece has been taken by the server (not when
    /// the subscriber went away first).
    pub fn subscribe(
        &self,
        have_version: u64,
        have_incarnation: u64,
        told: impl FnOnce() + Send + 'static,
    ) -> ReceiverStream<Result<WeightsChunk, Status>> {
        let mut rx = self.tx.subscribe();
        let (out, stream) = mpsc::channel(2);
        let (chunk_bytes, incarnation) = (self.chunk_bytes, self.incarnation);
        let stop = self.stop.clone();
        let mut sent = if have_incarnation == incarnation {
            have_version
        } else {
            0
        };
        self.tasks.spawn(async move {
            // The previous version was cut short: this one goes out whole.
            let mut cut = false;
            loop {
                let p = rx.borrow_and_update().clone();
                // A finished version goes out even when its number was already sent
                // (the last update's weights are published before the flag).
                if p.version > sent || p.finished {
                    let mut cut_now = false;
                    for piece in pieces(&p, chunk_bytes, incarnation) {
                        if piece.chunk_index > 0
                            && !cut
                            && !p.finished
                            && rx.has_changed().unwrap_or(false)
                        {
                            cut_now = true; // a newer version is waiting
                            break;
                        }
                        let sent_piece = tokio::select! {
                            r = out.send(Ok(piece)) => r.is_ok(),
                            _ = stop.cancelled() => false,
                        };
                        if !sent_piece {
                            return; // subscriber went away, or the learner stops
                        }
                    }
                    cut = cut_now;
                    if cut {
                        continue;
                    }
                    sent = p.version;
                }
                if p.finished {
                    // Every permit back: the server has taken each piece for the wire.
                    let taken = tokio::select! {
                        r = out.reserve_many(out.max_capacity()) => r.is_ok(),
                        _ = stop.cancelled() => false,
                    };
                    if taken {
                        told();
                    }
                    return;
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
            }
        });
        ReceiverStream::new(stream)
    }
}

/// Cuts a payload into messages of at most `chunk_bytes` data each.
pub fn pieces(p: &Published, chunk_bytes: usize, incarnation: u64) -> Vec<WeightsChunk> {
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
                data: p.bytes.slice(start..end),
                training_finished: p.finished && i + 1 == n,
                learner_incarnation: incarnation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio_stream::StreamExt;

    fn published(version: u64, len: usize, finished: bool) -> Published {
        Published {
            version,
            bytes: (0..len).map(|i| i as u8).collect::<Vec<u8>>().into(),
            finished,
        }
    }

    #[test]
    fn pieces_cover_the_payload_in_order() {
        let p = published(3, 2500, false);
        let ps = pieces(&p, 1024, 5);
        assert_eq!(ps.len(), 3);
        assert_eq!(
            ps.iter().map(|c| c.data.len()).collect::<Vec<_>>(),
            vec![1024, 1024, 452]
        );
        let joined: Vec<u8> = ps.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(&joined, p.bytes.as_ref());
        assert!(ps
            .iter()
            .all(|c| c.num_chunks == 3 && c.total_bytes == 2500 && c.learner_incarnation == 5));
    }

    fn broadcaster(initial: Published, incarnation: u64) -> Broadcaster {
        let tasks = TaskTracker::new();
        Broadcaster::new(initial, 1024, incarnation, CancellationToken::new(), tasks)
    }

    #[tokio::test]
    async fn slow_subscriber_gets_the_latest_not_a_backlog() {
        let b = broadcaster(published(1, 10, false), 7);
        let mut s = b.subscribe(0, 0, || {});
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
    async fn a_newer_version_cuts_the_one_going_out_short_but_not_two_in_a_row() {
        // 10 pieces a version; the stream's buffer holds two of them.
        let b = broadcaster(published(1, 10 * 1024, false), 7);
        let mut s = b.subscribe(0, 0, || {});
        assert_eq!(s.next().await.unwrap().unwrap().chunk_index, 0);
        b.publish(published(2, 10 * 1024, false));
        // Version 1 stops after the pieces already handed over; version 2 starts.
        let mut v1 = 1;
        let first_of_2 = loop {
            let piece = s.next().await.unwrap().unwrap();
            if piece.version == 1 {
                v1 += 1;
                continue;
            }
            break piece;
        };
        assert!(v1 < 10, "version 1 went out whole");
        assert_eq!((first_of_2.version, first_of_2.chunk_index), (2, 0));
        // Version 3 arrives while 2 is going out: 2 was the cut one's successor, so
        // it completes, and 3 follows whole.
        b.publish(published(3, 10 * 1024, false));
        let mut seen = vec![(2, 0)];
        while seen.len() < 20 {
            let piece = s.next().await.unwrap().unwrap();
            seen.push((piece.version, piece.chunk_index));
        }
        let want: Vec<(u64, u32)> = (0..10)
            .map(|i| (2, i))
            .chain((0..10).map(|i| (3, i)))
            .collect();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn the_finished_flag_reaches_a_subscriber_that_has_the_version() {
        let b = broadcaster(published(5, 10, false), 7);
        let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = told.clone();
        let mut s = b.subscribe(5, 7, move || flag.store(true, Ordering::SeqCst));
        b.publish(published(5, 10, true));
        let piece = s.next().await.unwrap().unwrap();
        assert!(piece.training_finished);
        assert!(s.next().await.is_none());
        assert!(told.load(Ordering::SeqCst), "told once the flag was taken");
        // A subscriber that goes away before taking the flag is not counted as told.
        let b = broadcaster(published(5, 10, false), 7);
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = gone.clone();
        let s = b.subscribe(5, 7, move || flag.store(true, Ordering::SeqCst));
        drop(s);
        b.publish(published(5, 10, true));
        b.tasks.close();
        b.tasks.wait().await;
        assert!(!gone.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn subscriber_with_current_version_waits_for_a_newer_one() {
        let b = broadcaster(published(5, 10, false), 7);
        let mut s = b.subscribe(5, 7, || {});
        b.publish(published(6, 10, false));
        let piece = s.next().await.unwrap().unwrap();
        assert_eq!((piece.version, piece.learner_incarnation), (6, 7));
    }

    #[tokio::test]
    async fn a_new_incarnation_is_sent_even_when_behind_the_subscriber() {
        // A learner resumed at version 5 while the actor holds 9 of the old one.
        let b = broadcaster(published(5, 10, false), 8);
        let mut s = b.subscribe(9, 7, || {});
        let piece = s.next().await.unwrap().unwrap();
        assert_eq!((piece.version, piece.learner_incarnation), (5, 8));
        // the same numbers from this incarnation would wait for version 10
        let mut same = b.subscribe(9, 8, || {});
        b.publish(published(10, 10, false));
        assert_eq!(same.next().await.unwrap().unwrap().version, 10);
    }

    #[tokio::test]
    async fn streams_end_when_the_learner_stops() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let b = Broadcaster::new(
            published(1, 10, false),
            1024,
            3,
            stop.clone(),
            tasks.clone(),
        );
        let mut s = b.subscribe(1, 3, || {});
        stop.cancel();
        assert!(s.next().await.is_none());
        tasks.close();
        tasks.wait().await;
    }
}
