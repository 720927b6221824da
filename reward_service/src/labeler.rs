//! The labelling pipeline: submitted texts are answered from the table when labelled,
//! else queued once; workers take the newest texts in batches, ask the judge (at most
//! `max_concurrent` requests at once), parse the answers strictly, commit the labels
//! to the store and only then publish them as a new reward-model version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::backlog::Backlog;
use crate::judge::Judge;
use crate::model::RetrievalModel;
use crate::parse::parse_labels;
use crate::prompt::Prompt;
use crate::stats::Stats;
use crate::store::{LabelRecord, LabelStore};

/// Longest text the service accepts, in bytes (longer ones are cut there).
pub const MAX_TEXT_BYTES: usize = 1024;

pub struct Labeler {
    pub prompt: Prompt,
    /// Key of this judge and prompt's labels in the store.
    pub prompt_version: String,
    pub judge: Judge,
    pub judge_id: String,
    pub store: Arc<LabelStore>,
    pub model: Arc<RetrievalModel>,
    /// Labels for the distilled network, when one is trained.
    pub distill: Option<Mutex<crate::distill::LabelSender>>,
    pub stats: Stats,
    pub backlog: Mutex<Backlog>,
    pub batch_size: usize,
    pub unparseable_budget: u32,
    attempts: Mutex<HashMap<String, u32>>,
    wake: Notify,
    slots: Arc<Semaphore>,
}

/// A text's first `MAX_TEXT_BYTES` bytes, cut on a character boundary.
pub fn clip_text(text: &str) -> &str {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Labeler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        prompt: Prompt,
        prompt_version: String,
        judge: Judge,
        store: Arc<LabelStore>,
        model: Arc<RetrievalModel>,
        distill: Option<crate::distill::LabelSender>,
        backlog: usize,
        batch_size: usize,
        max_concurrent: usize,
        unparseable_budget: u32,
    ) -> Self {
        Self {
            judge_id: judge.id(),
            prompt,
            prompt_version,
            judge,
            store,
            model,
            distill: distill.map(Mutex::new),
            stats: Stats::default(),
            backlog: Mutex::new(Backlog::new(backlog)),
            batch_size,
            unparseable_budget,
            attempts: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(max_concurrent)),
        }
    }

    /// Takes texts from an actor; returns how many were new to the service.
    pub fn submit(&self, texts: Vec<String>) -> u64 {
        let mut new = 0;
        for text in texts {
            Stats::add(&self.stats.texts_seen, 1);
            let text = clip_text(text.trim()).to_string();
            if text.is_empty() {
                continue;
            }
            if self.model.contains(&text) {
                Stats::add(&self.stats.store_hits, 1);
                continue;
            }
            if self
                .backlog
                .lock()
                .expect("backlog lock poisoned")
                .push_new(text)
            {
                new += 1;
            }
        }
        if new > 0 {
            self.wake.notify_one();
        }
        new
    }

    /// Runs the workers until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            let permit = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let batch = loop {
                let b = self
                    .backlog
                    .lock()
                    .expect("backlog lock poisoned")
                    .take(self.batch_size);
                if !b.is_empty() {
                    break b;
                }
                self.wake.notified().await;
            };
            // More may be waiting: let the next worker look too.
            self.wake.notify_one();
            tokio::spawn(self.clone().label(batch, permit));
        }
    }

    async fn label(self: Arc<Self>, batch: Vec<String>, _permit: OwnedSemaphorePermit) {
        let prompt = self.prompt.render(&batch);
        Stats::add(&self.stats.llm_calls, 1);
        Stats::add(&self.stats.texts_judged, batch.len() as u64);
        let started = Instant::now();
        let answer = self.judge.answer(&batch, &prompt).await;
        self.stats
            .record_latency(started.elapsed().as_secs_f64() * 1000.0);
        let raw = match answer {
            Ok(raw) => raw,
            Err(e) => {
                Stats::add(&self.stats.llm_failures, 1);
                warn!(error = %e, texts = batch.len(), "judge request failed, texts go back to the queue");
                self.backlog
                    .lock()
                    .expect("backlog lock poisoned")
                    .requeue(batch);
                self.wake.notify_one();
                return;
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut records = Vec::new();
        let mut retry = Vec::new();
        match parse_labels(&raw, batch.len()) {
            Ok(verdicts) => {
                let attempts = self.take_attempts(&batch);
                for ((text, helpful), tries) in batch.iter().zip(verdicts).zip(attempts) {
                    records.push((text.clone(), self.record(Some(helpful), &raw, now, tries)));
                }
            }
            Err(e) => {
                Stats::add(&self.stats.unparseable, 1);
                let shown: String = raw.chars().take(120).collect();
                warn!(error = %e, answer = shown, "unparseable judge answer");
                let mut attempts = self.attempts.lock().expect("attempts lock poisoned");
                for text in &batch {
                    let n = attempts.entry(text.clone()).or_insert(0);
                    *n += 1;
                    if *n >= self.unparseable_budget {
                        let tries = *n;
                        attempts.remove(text);
                        records.push((text.clone(), self.record(None, &raw, now, tries)));
                    } else {
                        retry.push(text.clone());
                    }
                }
            }
        }
        if !records.is_empty() {
            let store = self.store.clone();
            let pv = self.prompt_version.clone();
            let committed = tokio::task::spawn_blocking(move || store.put_new(&pv, records)).await;
            match committed {
                Ok(Ok(added)) => {
                    debug!(labels = added.len(), "labels committed");
                    if let Some(tx) = &self.distill {
                        let parsed: Vec<(String, bool)> = added
                            .iter()
                            .filter_map(|(t, r)| r.helpful.map(|h| (t.clone(), h)))
                            .collect();
                        if !parsed.is_empty() {
                            let _ = tx.lock().expect("distill lock poisoned").send(parsed);
                        }
                    }
                    self.model
                        .add(added.into_iter().map(|(t, r)| (t, r.value())).collect());
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot commit labels, texts go back to the queue");
                    retry.extend(batch.iter().cloned());
                }
                Err(e) => warn!(error = %e, "label commit task failed"),
            }
        }
        let mut backlog = self.backlog.lock().expect("backlog lock poisoned");
        backlog.done(&batch);
        if !retry.is_empty() {
            backlog.requeue(retry);
            self.wake.notify_one();
        }
    }

    /// Judge calls each text has taken, this one included; forgets them.
    fn take_attempts(&self, batch: &[String]) -> Vec<u32> {
        let mut attempts = self.attempts.lock().expect("attempts lock poisoned");
        batch
            .iter()
            .map(|t| attempts.remove(t).unwrap_or(0) + 1)
            .collect()
    }

    fn record(&self, helpful: Option<bool>, raw: &str, unix_ms: u64, attempts: u32) -> LabelRecord {
        LabelRecord {
            helpful,
            raw_answer: raw.to_string(),
            judge: self.judge_id.clone(),
            unix_ms,
            attempts,
        }
    }
}
