//! Sends new event texts to the reward service. The rollout thread keeps a bounded
//! set of texts it has already handed over, so common texts cross the wire once;
//! this task streams them in batches and reconnects with backoff. After a reconnect
//! it asks the rollout thread to forget its set, so texts that may have been lost
//! with the old stream are sent again (the service deduplicates).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spur_core::redial::{CallError, Redial};
use spur_core::transport::Connector;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::TextBatch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::info;

/// Texts an actor remembers as sent before it starts over.
pub const MAX_SENT_TEXTS: usize = 1 << 16;

/// The rollout thread's memory of texts already handed over.
pub struct SentTexts {
    seen: std::collections::HashSet<String>,
    forget: Arc<AtomicBool>,
}

impl SentTexts {
    pub fn new(forget: Arc<AtomicBool>) -> Self {
        Self {
            seen: Default::default(),
            forget,
        }
    }

    /// The texts among `texts` not sent before (each once), marked as sent.
    pub fn new_texts<'a>(&mut self, texts: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        if self.forget.swap(false, Ordering::AcqRel) || self.seen.len() > MAX_SENT_TEXTS {
            self.seen.clear();
        }
        texts
            .into_iter()
            .filter(|t| !t.is_empty() && self.seen.insert((*t).clone()))
            .cloned()
            .collect()
    }

    /// Texts that could not be handed over are to be sent again later.
    pub fn unmark(&mut self, texts: &[String]) {
        for t in texts {
            self.seen.remove(t);
        }
    }
}

/// Where new event texts go. Each rollout lane starts it once its envs turn out to
/// emit text (it knows only after building them; a bridge env is not asked twice).
#[derive(Clone)]
pub struct TextSink {
    pub reward: Connector,
    pub max_backoff: Duration,
    /// The actor's tasks, so shutdown joins the sender.
    pub tasks: tokio_util::task::TaskTracker,
}

impl TextSink {
    /// Spawns the submit task on `rt`; returns its channel and the memory of texts sent.
    pub fn start(
        self,
        rt: &tokio::runtime::Handle,
        actor_id: String,
    ) -> (mpsc::Sender<Vec<String>>, SentTexts) {
        let forget = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(64);
        self.tasks.spawn_on(
            submit(self.reward, actor_id, rx, forget.clone(), self.max_backoff),
            rt,
        );
        (tx, SentTexts::new(forget))
    }
}

pub async fn submit(
    reward: Connector,
    actor_id: String,
    mut batches: mpsc::Receiver<Vec<String>>,
    forget: Arc<AtomicBool>,
    max_backoff: Duration,
) {
    let mut redial = Redial::new(&actor_id, "reward service", max_backoff);
    let mut first = true;
    loop {
        let reward = &reward;
        let connect = || async move { Ok::<_, CallError>(reward.connect().await?) };
        let Some(channel) = redial.open(connect, || batches.is_closed()).await else {
            return;
        };
        if !first {
            info!(actor_id, "reward service stream reopened; resending texts");
            forget.store(true, Ordering::Release);
        }
        first = false;
        let (tx, rx) = mpsc::channel(4);
        let mut client = RewardServiceClient::new(channel);
        let mut call =
            tokio::spawn(async move { client.submit_texts(ReceiverStream::new(rx)).await });
        let why = loop {
            tokio::select! {
                batch = batches.recv() => {
                    let Some(texts) = batch else {
                        drop(tx);
                        let _ = call.await;
                        return;
                    };
                    let msg = TextBatch { actor_id: actor_id.clone(), texts };
                    if tx.send(msg).await.is_err() {
                        break Some(CallError::Closed("the text stream closed"));
                    }
                    redial.progressed();
                }
                r = &mut call => break match r {
                    Ok(Err(status)) => Some(CallError::from(status)),
                    _ => None,
                },
            }
        };
        redial.ended(why.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_text_once_until_forgotten() {
        let forget = Arc::new(AtomicBool::new(false));
        let mut s = SentTexts::new(forget.clone());
        let batch: Vec<String> = ["a", "", "b", "a"].iter().map(|t| t.to_string()).collect();
        assert_eq!(s.new_texts(&batch), vec!["a".to_string(), "b".to_string()]);
        assert!(s.new_texts(&batch).is_empty());
        s.unmark(&["b".to_string()]);
        assert_eq!(s.new_texts(&batch), vec!["b".to_string()]);
        forget.store(true, Ordering::Release);
        assert_eq!(s.new_texts(&batch).len(), 2);
    }
}
