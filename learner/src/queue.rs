//! The bounded chunk queue between the trajectory streams and the trainer.
//!
//! The trainer needs a batch's worth of steps before it can do anything with them, so
//! a trainer waiting on an empty queue is woken only once that many steps are queued
//! (or the queue is full), not for every chunk. Waking a parked thread is a futex call
//! and two context switches; done for every chunk, that was about a quarter of an
//! ingesting learner's CPU on cartpole's chunks (`spur bench ingest`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use spur_core::trajectory::Chunk;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Shared by both ends: what is queued and what the waiting trainer wants.
#[derive(Default)]
struct Wake {
    /// Steps in the queue (briefly below zero when the trainer takes a chunk before
    /// its sender has counted it).
    queued: AtomicI64,
    /// Steps the trainer waits for; `i64::MAX` while it is not waiting.
    wanted: AtomicI64,
    notify: Notify,
    /// Times the trainer parked on an empty queue.
    waits: AtomicU64,
}

/// The streams' end: cloned into every trajectory stream.
#[derive(Clone)]
pub struct ChunkSender {
    tx: mpsc::Sender<Chunk>,
    wake: Arc<Wake>,
}

/// The trainer's end.
pub struct ChunkReceiver {
    rx: mpsc::Receiver<Chunk>,
    wake: Arc<Wake>,
}

/// A queue holding at most `capacity` chunks.
pub fn channel(capacity: usize) -> (ChunkSender, ChunkReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    let wake = Arc::new(Wake {
        wanted: AtomicI64::new(i64::MAX),
        ..Wake::default()
    });
    (
        ChunkSender {
            tx,
            wake: wake.clone(),
        },
        ChunkReceiver { rx, wake },
    )
}

impl ChunkSender {
    /// Queues `chunk`, waiting while the queue is full; gives it back when the
    /// trainer has closed the queue.
    pub async fn send(&self, chunk: Chunk) -> Result<(), Chunk> {
        let steps = chunk.steps() as i64;
        self.tx.send(chunk).await.map_err(|e| e.0)?;
        let queued = self.wake.queued.fetch_add(steps, Ordering::SeqCst) + steps;
        if queued >= self.wake.wanted.load(Ordering::SeqCst) || self.tx.capacity() == 0 {
            self.wake.notify.notify_one();
        }
        Ok(())
    }

    /// Chunks in the queue now.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl ChunkReceiver {
    /// The next chunk, from `rt`'s thread-blocking side. On an empty queue it waits
    /// until `want_steps` steps are queued, the queue is full, or `stop` is
    /// cancelled; `None` on stop or once the queue is closed and empty.
    pub fn next(
        &mut self,
        rt: &tokio::runtime::Handle,
        want_steps: usize,
        stop: &CancellationToken,
    ) -> Option<Chunk> {
        let wake = &self.wake;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.rx.try_recv() {
                Ok(chunk) => {
                    wake.queued
                        .fetch_sub(chunk.steps() as i64, Ordering::SeqCst);
                    return Some(chunk);
                }
                Err(TryRecvError::Disconnected) => return None,
                // Closed by the trainer and drained.
                Err(TryRecvError::Empty) if self.rx.is_closed() => return None,
                Err(TryRecvError::Empty) => {}
            }
            let want = want_steps.max(1) as i64;
            rt.block_on(async {
                let notified = wake.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                wake.wanted.store(want, Ordering::SeqCst);
                // A sender that counted its chunk before `wanted` was set did not
                // see it: look again before parking.
                let full = self.rx.len() >= self.rx.max_capacity();
                if wake.queued.load(Ordering::SeqCst) < want && !full {
                    wake.waits.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = notified => {}
                        _ = stop.cancelled() => {}
                    }
                }
                wake.wanted.store(i64::MAX, Ordering::SeqCst);
            });
        }
    }

    /// Chunks in the queue now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Refuses further chunks (senders get theirs back); queued ones stay takeable.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// Times the trainer parked on an empty queue so far.
    #[cfg(test)]
    fn waits(&self) -> u64 {
        self.wake.waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk(steps: usize, tag: u64) -> Chunk {
        let mut c = Chunk::blank("a", steps, 1, 1, 0);
        c.policy_version = tag;
        c
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A stream that, once the trainer has parked on the empty queue, sends `count`
    /// chunks of 10 steps (tagged 0, 1, ...) 5 ms apart, and then hands its end back.
    fn send_once_parked(
        rt: &tokio::runtime::Runtime,
        tx: ChunkSender,
        count: u64,
    ) -> tokio::task::JoinHandle<ChunkSender> {
        rt.spawn(async move {
            while tx.wake.waits.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for tag in 0..count {
                tx.send(chunk(10, tag)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tx
        })
    }

    /// A trainer wanting 4 chunks' steps parks once while a stream sends them one
    /// by one, and then takes all four in order.
    #[test]
    fn a_waiting_trainer_wakes_once_enough_steps_are_queued() {
        let rt = runtime();
        let (tx, mut rx) = channel(8);
        let stop = CancellationToken::new();
        let sender = send_once_parked(&rt, tx, 4);
        let mut tags = Vec::new();
        for _ in 0..4 {
            let need = 40 - 10 * tags.len();
            tags.push(rx.next(rt.handle(), need, &stop).unwrap().policy_version);
        }
        assert_eq!(tags, [0, 1, 2, 3]);
        assert_eq!(rx.waits(), 1, "parked once for the four chunks");
        drop(rt.block_on(sender).unwrap());
        assert!(
            rx.next(rt.handle(), 10, &stop).is_none(),
            "closed and empty"
        );
    }

    /// A full queue wakes the trainer even when it holds fewer steps than wanted (else
    /// the streams and the trainer would wait on each other for good).
    #[test]
    fn a_full_queue_wakes_the_trainer() {
        let rt = runtime();
        let (tx, mut rx) = channel(2);
        let stop = CancellationToken::new();
        let _sender = send_once_parked(&rt, tx, 2);
        let tags: Vec<_> = (0..2)
            .map(|_| rx.next(rt.handle(), 1000, &stop).unwrap().policy_version)
            .collect();
        assert_eq!(tags, [0, 1]);
        assert_eq!(rx.waits(), 1);
    }

    /// Stop ends a wait that no chunk would end; a closed queue hands back what it
    /// still holds and refuses new chunks.
    #[test]
    fn stop_and_close_end_the_wait() {
        let rt = runtime();
        let (tx, mut rx) = channel(4);
        let stop = CancellationToken::new();
        rt.block_on(tx.send(chunk(5, 7))).unwrap();
        let canceller = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                stop.cancel();
            })
        };
        assert_eq!(rx.next(rt.handle(), 10, &stop).unwrap().policy_version, 7);
        assert!(rx.next(rt.handle(), 10, &stop).is_none(), "stopped");
        canceller.join().unwrap();
        let stop = CancellationToken::new();
        rt.block_on(tx.send(chunk(5, 8))).unwrap();
        rx.close();
        assert!(
            rt.block_on(tx.send(chunk(5, 9))).is_err(),
            "refused once closed"
        );
        assert_eq!(rx.next(rt.handle(), 10, &stop).unwrap().policy_version, 8);
        assert!(rx.next(rt.handle(), 10, &stop).is_none());
        assert_eq!(tx.depth(), 0);
    }
}
