//! Every task the reward service spawns, tracked by name: shutdown waits for all of
//! them under one deadline, then names and aborts whatever is still running.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// How long aborted tasks get to be dropped (they go at their next poll).
const ABORT_GRACE: Duration = Duration::from_millis(200);

#[derive(Clone, Default)]
pub struct Tasks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    tracker: TaskTracker,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
}

struct Live {
    name: String,
    abort: Option<AbortHandle>,
}

/// Takes a task off the live list when its future ends or is dropped.
struct Registration {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner
            .live
            .lock()
            .expect("task list lock poisoned")
            .remove(&self.id);
    }
}

impl Tasks {
    /// Spawns `future` as the task `name`.
    pub fn spawn<F>(&self, name: impl Into<String>, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let live = Live {
            name: name.into(),
            abort: None,
        };
        self.live().insert(id, live);
        let registration = Registration {
            inner: self.inner.clone(),
            id,
        };
        let handle = self.inner.tracker.spawn(async move {
            let _registration = registration;
            future.await
        });
        // Absent when the task has ended already.
        if let Some(live) = self.live().get_mut(&id) {
            live.abort = Some(handle.abort_handle());
        }
    }

    /// Names of the tasks still running.
    #[cfg(test)]
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live().values().map(|l| l.name.clone()).collect();
        names.sort();
        names
    }

    /// Waits for every task, those spawned meanwhile included, until `deadline`; then
    /// logs and aborts the ones still running and returns their names.
    pub async fn join(&self, deadline: Instant) -> Vec<String> {
        self.inner.tracker.close();
        if tokio::time::timeout_at(deadline, self.inner.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        let mut stragglers = Vec::new();
        for live in self.live().values() {
            warn!(
                task = live.name,
                "task did not finish within the drain timeout, aborting it"
            );
            if let Some(abort) = &live.abort {
                abort.abort();
            }
            stragglers.push(live.name.clone());
        }
        stragglers.sort();
        let _ = tokio::time::timeout(ABORT_GRACE, self.inner.tracker.wait()).await;
        stragglers
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.inner.live.lock().expect("task list lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_join_and_stragglers_are_named_and_aborted() {
        let tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("quick", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        tasks.spawn("stuck", async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        assert_eq!(tasks.running(), vec!["quick", "stuck"]);
        let start = Instant::now();
        let stragglers = tasks.join(start + Duration::from_secs(5)).await;
        assert_eq!(stragglers, vec!["stuck"]);
        assert!(start.elapsed() >= Duration::from_secs(5));
        // aborted: its future was dropped
        assert!(rx.await.is_err());
        assert!(tasks.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn join_returns_as_soon_as_all_are_done() {
        let tasks = Tasks::default();
        tasks.spawn("a", async {
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let start = Instant::now();
        assert!(tasks.join(start + Duration::from_secs(60)).await.is_empty());
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}
