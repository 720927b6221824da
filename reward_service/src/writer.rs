//! Group commit of labels. Every judge answer's labels must be durable before they
//! are published, and a durable write costs a disk flush; with many requests in
//! flight, one transaction per answer makes the flushes the bottleneck. The writer
//! task takes the labels of every answer that arrived while it was writing and
//! commits them in one transaction, then tells each caller which of its labels were
//! new (an already stored label is kept as it is).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};

use crate::store::{LabelRecord, LabelStore};

type Labels = Vec<(String, LabelRecord)>;
/// What a caller hears back: its labels that were new, or why the commit failed.
type Reply = oneshot::Sender<Result<Labels, String>>;

/// The writer task's inbox; the task ends when this is dropped. It holds the store
/// weakly, so the store closes when its owner lets go of it.
pub struct LabelWriter {
    jobs: mpsc::UnboundedSender<(Labels, Reply)>,
}

impl LabelWriter {
    /// Starts the writer task (on the current runtime) for labels of
    /// `prompt_version` in `store`.
    pub fn start(store: &Arc<LabelStore>, prompt_version: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Labels, Reply)>();
        let store: Weak<LabelStore> = Arc::downgrade(store);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while let Ok(job) = rx.try_recv() {
                    jobs.push(job);
                }
                let Some(store) = store.upgrade() else {
                    // The store is closed: the callers hear that the writer stopped.
                    continue;
                };
                let pv = prompt_version.clone();
                let write = move || write_together(store, &pv, jobs);
                let _ = tokio::task::spawn_blocking(write).await;
            }
        });
        Self { jobs: tx }
    }

    /// Commits `labels` (with whatever else is waiting); returns those that were new.
    pub async fn put_new(&self, labels: Labels) -> Result<Labels, String> {
        let (tx, rx) = oneshot::channel();
        let stopped = || "the label writer stopped".to_string();
        self.jobs.send((labels, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// One transaction for every job; each caller gets back its own new labels. The
/// store is let go of before anyone hears back, so a caller that shuts down after
/// its reply finds the store closed.
fn write_together(store: Arc<LabelStore>, prompt_version: &str, jobs: Vec<(Labels, Reply)>) {
    let mut owner = HashMap::new();
    let mut all = Vec::new();
    let mut replies = Vec::with_capacity(jobs.len());
    for (i, (labels, reply)) in jobs.into_iter().enumerate() {
        for (text, record) in labels {
            owner.insert(text.clone(), i);
            all.push((text, record));
        }
        replies.push(reply);
    }
    let written = store.put_new(prompt_version, all);
    drop(store);
    match written {
        Ok(added) => {
            let mut theirs: Vec<Labels> = vec![Vec::new(); replies.len()];
            for (text, record) in added {
                theirs[owner[&text]].push((text, record));
            }
            for (reply, added) in replies.into_iter().zip(theirs) {
                let _ = reply.send(Ok(added));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(text: &str, helpful: bool) -> (String, LabelRecord) {
        let record = LabelRecord {
            verdict: Some(helpful),
            raw_answer: String::new(),
            judge: "test".into(),
            unix_ms: 0,
            attempts: 1,
        };
        (text.to_string(), record)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_each_hear_their_own_new_labels() {
        let dir = std::env::temp_dir().join(format!("spur-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(LabelStore::open(&dir.join("labels.redb")).unwrap());
        store.put_new("v1", vec![label("old", true)]).unwrap();
        let writer = Arc::new(LabelWriter::start(&store, "v1".into()));
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let w = writer.clone();
                tokio::spawn(async move {
                    let mut labels = vec![label(&format!("text {i}"), i % 2 == 0)];
                    if i == 0 {
                        // Already stored: kept as it is, and not reported as new.
                        labels.push(label("old", false));
                    }
                    w.put_new(labels).await
                })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let added = call.await.unwrap().unwrap();
            let texts: Vec<&str> = added.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(texts, vec![format!("text {i}").as_str()]);
        }
        assert_eq!(store.all("v1").unwrap().len(), 9);
        assert_eq!(store.get("v1", "old").unwrap().unwrap().verdict, Some(true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
