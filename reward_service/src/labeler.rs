//! The labelling pipeline: submitted texts are answered from the table when labelled,
//! else queued once; workers take the newest texts in batches, ask the judge (at most
//! `max_concurrent` requests at once), parse the answers strictly, commit the labels
//! to the store and only then publish them as a new reward-model version.
//!
//! For the `ranking` model each new text of a batch is put in `pairs_per_text` pairs
//! with texts already judged (or other texts of the batch, in a random order), and
//! the judge says which text of each pair shows more progress.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::backlog::Backlog;
use crate::distill::{VerdictSender, Verdicts};
use crate::judge::{Judge, Task};
use crate::model::RetrievalModel;
use crate::parse::{parse_labels, parse_preferences};
use crate::prompt::Prompt;
use crate::stats::Stats;
use crate::store::{LabelStore, Pair, Record};

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
    /// Verdicts for the distilled network, when one is trained.
    pub distill: Option<Mutex<VerdictSender>>,
    /// Pairs per new text when the judge ranks pairs; `None` when it labels texts.
    pub pairs_per_text: Option<usize>,
    /// Texts judged so far (ranking: the partners new texts are paired with).
    judged: Mutex<Vec<String>>,
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
        distill: Option<VerdictSender>,
        pairs_per_text: Option<usize>,
        judged: Vec<String>,
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
            pairs_per_text,
            judged: Mutex::new(judged),
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
                let b = {
                    let mut backlog = self.backlog.lock().expect("backlog lock poisoned");
                    // A lone text with nothing judged yet has no partner to rank
                    // against: wait for a second one.
                    let lone = self.pairs_per_text.is_some()
                        && backlog.depth() < 2
                        && self.judged.lock().expect("judged lock poisoned").is_empty();
                    if lone {
                        Vec::new()
                    } else {
                        backlog.take(self.batch_size)
                    }
                };
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
        let pairs = self.pairs_per_text.map(|k| self.pair_up(&batch, k));
        let (task, prompt) = match &pairs {
            Some(p) => (Task::Rank(p), self.prompt.render_pairs(p)),
            None => (Task::Label(&batch), self.prompt.render(&batch)),
        };
        Stats::add(&self.stats.llm_calls, 1);
        Stats::add(&self.stats.texts_judged, batch.len() as u64);
        let started = Instant::now();
        let answer = self.judge.answer(&task, &prompt).await;
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
        let parsed = match &pairs {
            Some(p) => parse_preferences(&raw, p.len()).map(Parsed::Pairs),
            None => parse_labels(&raw, batch.len()).map(Parsed::Labels),
        };
        // Texts that get a record now (with their judge calls), and texts to ask again.
        let (settled, retry, verdicts) = match parsed {
            Ok(v) => (self.take_attempts(&batch), Vec::new(), Some(v)),
            Err(e) => {
                Stats::add(&self.stats.unparseable, 1);
                let shown: String = raw.chars().take(120).collect();
                warn!(error = %e, answer = shown, "unparseable judge answer");
                let (given_up, retry) = self.count_failure(&batch);
                (given_up, retry, None)
            }
        };
        let mut retry = retry;
        if !settled.is_empty() {
            let committed = match (&pairs, verdicts) {
                (None, v) => {
                    let labels = match v {
                        Some(Parsed::Labels(l)) => l.into_iter().map(Some).collect(),
                        _ => vec![None; batch.len()],
                    };
                    let records: Vec<_> = batch
                        .iter()
                        .zip(labels)
                        .filter_map(|(t, h)| {
                            settled
                                .get(t)
                                .map(|&n| (t.clone(), self.record(h, &raw, now, n)))
                        })
                        .collect();
                    self.commit_labels(records).await
                }
                (Some(pairs), v) => {
                    let prefs = match v {
                        Some(Parsed::Pairs(p)) => p.into_iter().map(Some).collect(),
                        _ => vec![None; pairs.len()],
                    };
                    let records: Vec<_> = pairs
                        .iter()
                        .zip(prefs)
                        .filter_map(|(pair, p)| {
                            let n = settled.get(&pair.0).or(settled.get(&pair.1))?;
                            Some((pair.clone(), self.record(p, &raw, now, *n)))
                        })
                        .collect();
                    self.commit_pairs(records, &settled).await
                }
            };
            if !committed {
                retry.extend(settled.into_keys());
            }
        }
        let mut backlog = self.backlog.lock().expect("backlog lock poisoned");
        backlog.done(&batch);
        if !retry.is_empty() {
            backlog.requeue(retry);
            self.wake.notify_one();
        }
    }

    /// Runs a store transaction off the async threads; `None` (logged) when it failed.
    async fn in_store<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&LabelStore, &str) -> Result<T, crate::error::ServiceError> + Send + 'static,
    ) -> Option<T> {
        let store = self.store.clone();
        let pv = self.prompt_version.clone();
        match tokio::task::spawn_blocking(move || f(&store, &pv)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot commit {what}, texts go back to the queue");
                None
            }
            Err(e) => {
                warn!(error = %e, "commit task for {what} failed");
                None
            }
        }
    }

    /// Commits single-text labels, then publishes them; false when the store failed.
    async fn commit_labels(&self, records: Vec<(String, Record<bool>)>) -> bool {
        let Some(added) = self
            .in_store("labels", move |store, pv| store.put_new(pv, records))
            .await
        else {
            return false;
        };
        debug!(labels = added.len(), "labels committed");
        let parsed: Vec<(String, bool)> = added
            .iter()
            .filter_map(|(t, r)| r.verdict.map(|h| (t.clone(), h)))
            .collect();
        self.distill(Verdicts::Labels(parsed));
        self.judged
            .lock()
            .expect("judged lock poisoned")
            .extend(added.iter().map(|(t, _)| t.clone()));
        self.model
            .add(added.into_iter().map(|(t, r)| (t, r.value())).collect());
        true
    }

    /// Commits ranked pairs, then publishes the texts they settle; false when the
    /// store failed.
    async fn commit_pairs(
        &self,
        records: Vec<(Pair, Record<f32>)>,
        settled: &HashMap<String, u32>,
    ) -> bool {
        let Some(added) = self
            .in_store("ranked pairs", move |store, pv| {
                store.put_new_pairs(pv, records)
            })
            .await
        else {
            return false;
        };
        debug!(pairs = added.len(), "ranked pairs committed");
        Stats::add(&self.stats.ranked_pairs, added.len() as u64);
        let values = pair_values(&added);
        let prefs: Vec<(Pair, f32)> = added
            .into_iter()
            .filter_map(|(pair, r)| r.verdict.map(|p| (pair, p)))
            .collect();
        self.distill(Verdicts::Pairs(prefs));
        self.judged
            .lock()
            .expect("judged lock poisoned")
            .extend(settled.keys().cloned());
        // Every settled text is known from now on, paired or not.
        let mut values = values;
        for t in settled.keys() {
            values.entry(t.clone()).or_insert(0.0);
        }
        self.model.add(values.into_iter().collect());
        true
    }

    fn record<V>(&self, verdict: Option<V>, raw: &str, unix_ms: u64, attempts: u32) -> Record<V> {
        Record {
            verdict,
            raw_answer: raw.to_string(),
            judge: self.judge_id.clone(),
            unix_ms,
            attempts,
        }
    }

    fn distill(&self, verdicts: Verdicts) {
        let empty = match &verdicts {
            Verdicts::Labels(l) => l.is_empty(),
            Verdicts::Pairs(p) => p.is_empty(),
        };
        if let (Some(tx), false) = (&self.distill, empty) {
            let _ = tx.lock().expect("distill lock poisoned").send(verdicts);
        }
    }

    /// Pairs for the new texts of `batch`: each with up to `k` different partners
    /// drawn from the texts judged so far and the rest of the batch, the two texts of
    /// a pair in a random order, no pair twice.
    fn pair_up(&self, batch: &[String], k: usize) -> Vec<Pair> {
        let judged = self.judged.lock().expect("judged lock poisoned");
        let pool = judged.len() + batch.len() - 1;
        let mut rng = rand::rng();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        // Pairs each text is in so far (a text may already be someone's partner).
        let mut paired: HashMap<&str, usize> = HashMap::new();
        let mut pairs = Vec::new();
        for (i, text) in batch.iter().enumerate() {
            for _ in 0..k.min(pool) * 4 {
                if paired.get(text.as_str()).copied().unwrap_or(0) >= k {
                    break;
                }
                let j = rng.random_range(0..pool);
                let partner = if j < judged.len() {
                    &judged[j]
                } else {
                    let j = j - judged.len();
                    &batch[if j >= i { j + 1 } else { j }]
                };
                let key = if text < partner {
                    (text.as_str(), partner.as_str())
                } else {
                    (partner.as_str(), text.as_str())
                };
                if partner == text || !seen.insert(key) {
                    continue;
                }
                *paired.entry(text).or_default() += 1;
                *paired.entry(partner).or_default() += 1;
                pairs.push(if rng.random_bool(0.5) {
                    (text.clone(), partner.clone())
                } else {
                    (partner.clone(), text.clone())
                });
            }
        }
        pairs
    }

    /// Counts an unparseable answer against each text of `batch`: returns the texts
    /// whose budget is spent (with their judge calls) and those to ask again.
    fn count_failure(&self, batch: &[String]) -> (HashMap<String, u32>, Vec<String>) {
        let mut attempts = self.attempts.lock().expect("attempts lock poisoned");
        let mut given_up = HashMap::new();
        let mut retry = Vec::new();
        for text in batch {
            let n = attempts.entry(text.clone()).or_insert(0);
            *n += 1;
            if *n >= self.unparseable_budget {
                given_up.insert(text.clone(), *n);
                attempts.remove(text);
            } else {
                retry.push(text.clone());
            }
        }
        (given_up, retry)
    }

    /// Judge calls each text has taken, this one included; forgets them.
    fn take_attempts(&self, batch: &[String]) -> HashMap<String, u32> {
        let mut attempts = self.attempts.lock().expect("attempts lock poisoned");
        batch
            .iter()
            .map(|t| (t.clone(), attempts.remove(t).unwrap_or(0) + 1))
            .collect()
    }
}

/// A parsed answer.
enum Parsed {
    Labels(Vec<bool>),
    Pairs(Vec<f32>),
}

/// For the label table under `ranking`: 1 for a text that showed more progress than
/// its partner in some pair, else 0.
pub fn pair_values(pairs: &[(Pair, Record<f32>)]) -> HashMap<String, f32> {
    let mut values = HashMap::new();
    for ((a, b), r) in pairs {
        let p = r.verdict.unwrap_or(0.5);
        for (t, won) in [(a, p > 0.5), (b, p < 0.5)] {
            let v = values.entry(t.clone()).or_insert(0.0f32);
            if won {
                *v = 1.0;
            }
        }
    }
    values
}
