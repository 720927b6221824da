//! The labelling pipeline: submitted texts are answered from the table when labelled,
//! else queued once; workers take the newest texts in batches, ask the judge (at most
//! `max_concurrent` requests at once), parse the answers strictly, commit the labels
//! to the store and only then publish them as a new reward-model version.
//!
//! For the `ranking` model each new text of a batch is put in `pairs_per_text` pairs
//! with texts already judged (or other texts of the batch, in a random order), and
//! the judge says which text of each pair shows more progress.
//!
//! An unparseable answer is never a verdict: its texts are asked again in rounds with
//! growing waits between them (`retry.rs`) and are stored as unparseable, reward 0,
//! only after the last round. While a text waits it stays "in flight" in the backlog,
//! so submitting it again does not queue it twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backlog::Backlog;
use crate::distill::{VerdictSender, Verdicts};
use crate::judge::{Judge, Task};
use crate::model::RewardModel;
use crate::parse::{parse_labels, parse_preferences};
use crate::prompt::Prompt;
use crate::retry::{Next, RetryWait};
use crate::stats::Stats;
use crate::store::{LabelStore, Pair, Record};
use crate::tasks::Tasks;
use crate::writer::LabelWriter;

/// Longest text the service accepts, in bytes (longer ones are cut there).
pub const MAX_TEXT_BYTES: usize = 1024;

pub struct Labeler {
    pub prompt: Prompt,
    /// Key of this judge and prompt's labels in the store.
    pub prompt_version: String,
    pub judge: Judge,
    pub judge_id: String,
    pub store: Arc<LabelStore>,
    pub model: Arc<RewardModel>,
    /// Verdicts for the distilled network, when one is trained (taken at shutdown).
    distill: Mutex<Option<VerdictSender>>,
    /// Pairs per new text when the judge ranks pairs; `None` when it labels texts.
    pub pairs_per_text: Option<usize>,
    /// Texts judged so far (ranking: the partners new texts are paired with).
    judged: Mutex<Vec<String>>,
    pub stats: Stats,
    pub backlog: Mutex<Backlog>,
    pub batch_size: usize,
    /// Texts with unparseable answers: their calls, and those waiting for a round.
    pub retry: Mutex<RetryWait>,
    /// Wakes the retry timer when a text starts waiting.
    retry_changed: Notify,
    wake: Notify,
    slots: Arc<Semaphore>,
    /// Commits the labels of concurrent answers together.
    writer: LabelWriter,
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
        model: Arc<RewardModel>,
        distill: Option<VerdictSender>,
        pairs_per_text: Option<usize>,
        judged: Vec<String>,
        backlog: usize,
        batch_size: usize,
        max_concurrent: usize,
        retry: RetryWait,
    ) -> Self {
        let writer = LabelWriter::start(&store, prompt_version.clone());
        Self {
            judge_id: judge.id(),
            prompt,
            prompt_version,
            judge,
            store,
            model,
            distill: Mutex::new(distill),
            pairs_per_text,
            judged: Mutex::new(judged),
            stats: Stats::default(),
            backlog: Mutex::new(Backlog::new(backlog)),
            batch_size,
            retry: Mutex::new(retry),
            retry_changed: Notify::new(),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(max_concurrent)),
            writer,
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

    /// Takes batches off the queue and spawns a judge request for each (at most
    /// `max_concurrent` at once) in `tasks`, until `cancel`. Requests in flight then
    /// finish (and commit) on their own.
    pub async fn run(self: Arc<Self>, tasks: Tasks, cancel: CancellationToken) {
        loop {
            let Some(permit) = cancel
                .run_until_cancelled(self.slots.clone().acquire_owned())
                .await
            else {
                return;
            };
            let permit = permit.expect("the semaphore is never closed");
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
                if cancel
                    .run_until_cancelled(self.wake.notified())
                    .await
                    .is_none()
                {
                    return;
                }
            };
            // More may be waiting: let the next worker look too.
            self.wake.notify_one();
            let first: String = batch[0].chars().take(40).collect();
            let name = format!("judge request ({} texts, first {first:?})", batch.len());
            tasks.spawn(name, self.clone().label(batch, permit));
        }
    }

    /// Puts texts whose wait is over back in the queue, until `cancel`.
    pub async fn run_retries(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let next = self.retry.lock().expect("retry lock poisoned").next_due();
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                // A text started waiting: it may be due before `next`.
                _ = self.retry_changed.notified() => continue,
                _ = due => {}
            }
            let due = self
                .retry
                .lock()
                .expect("retry lock poisoned")
                .take_due(tokio::time::Instant::now());
            if due.is_empty() {
                continue;
            }
            debug!(texts = due.len(), "unparseable texts get another round");
            self.requeue(due);
        }
    }

    /// Texts back to the queue (behind the new ones); those it sheds are forgotten.
    fn requeue(&self, texts: Vec<String>) {
        let shed = self
            .backlog
            .lock()
            .expect("backlog lock poisoned")
            .requeue(texts);
        if !shed.is_empty() {
            let mut retry = self.retry.lock().expect("retry lock poisoned");
            for t in &shed {
                retry.forget(t);
            }
        }
        self.wake.notify_one();
    }

    /// Stops sending verdicts to the distilled network, so its thread ends.
    pub fn close_distill(&self) {
        self.distill.lock().expect("distill lock poisoned").take();
    }

    async fn label(self: Arc<Self>, batch: Vec<String>, permit: OwnedSemaphorePermit) {
        let pairs = self.pairs_per_text.map(|k| self.pair_up(&batch, k));
        let (task, prompt) = match &pairs {
            Some(p) => (Task::Rank(p), self.prompt.render_pairs(p)),
            None => (Task::Label(&batch), self.prompt.render(&batch)),
        };
        Stats::add(&self.stats.llm_calls, 1);
        Stats::add(&self.stats.texts_judged, batch.len() as u64);
        let started = Instant::now();
        let answer = self.judge.answer(&task, &prompt).await;
        // The cap is on requests at the judge: with labels, the next request may
        // start while this answer is parsed and committed (the writer commits
        // answers together). Ranking keeps its slot until its pairs are committed:
        // the next batch is paired against the texts this one settles.
        let _slot = pairs.is_some().then_some(permit);
        self.stats
            .record_latency(started.elapsed().as_secs_f64() * 1000.0);
        let raw = match answer {
            Ok(raw) => raw,
            Err(e) => {
                Stats::add(&self.stats.llm_failures, 1);
                warn!(error = %e, texts = batch.len(), "judge request failed, texts go back to the queue");
                self.requeue(batch);
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
        // Texts that get a record now (with their judge calls), texts to ask again
        // now, and texts that wait for a later round.
        let (settled, mut retry, waiting, verdicts) = match parsed {
            Ok(v) => (self.settle(&batch), Vec::new(), HashSet::new(), Some(v)),
            Err(e) => {
                Stats::add(&self.stats.unparseable, 1);
                let shown: String = raw.chars().take(120).collect();
                warn!(error = %e, answer = shown, "unparseable judge answer");
                let (given_up, retry, waiting) = self.count_unparseable(&batch);
                (given_up, retry, waiting, None)
            }
        };
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
        // Waiting texts stay in flight until their next round.
        let finished: Vec<String> = batch.into_iter().filter(|t| !waiting.contains(t)).collect();
        self.backlog
            .lock()
            .expect("backlog lock poisoned")
            .done(&finished);
        if !retry.is_empty() {
            self.requeue(retry);
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
        let added = match self.writer.put_new(records).await {
            Ok(added) => added,
            Err(e) => {
                warn!(error = %e, "cannot commit labels, texts go back to the queue");
                return false;
            }
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
        if empty {
            return;
        }
        if let Some(tx) = self.distill.lock().expect("distill lock poisoned").as_ref() {
            let _ = tx.send(verdicts);
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
    /// whose last round is spent (with their judge calls), those to ask again now and
    /// those that now wait for a later round.
    fn count_unparseable(
        &self,
        batch: &[String],
    ) -> (HashMap<String, u32>, Vec<String>, HashSet<String>) {
        let now = tokio::time::Instant::now();
        let mut given_up = HashMap::new();
        let mut retry = Vec::new();
        let mut waiting = HashSet::new();
        {
            let mut tries = self.retry.lock().expect("retry lock poisoned");
            for text in batch {
                match tries.unparseable(text, now) {
                    Next::AskAgain => retry.push(text.clone()),
                    Next::Wait(_) => {
                        waiting.insert(text.clone());
                    }
                    Next::GiveUp { calls } => {
                        given_up.insert(text.clone(), calls);
                    }
                }
            }
        }
        if !waiting.is_empty() {
            info!(
                texts = waiting.len(),
                "unparseable answers: texts wait for a later round"
            );
            self.retry_changed.notify_one();
        }
        if !given_up.is_empty() {
            warn!(
                texts = given_up.len(),
                "unparseable answers in every round: texts stored as unparseable"
            );
        }
        (given_up, retry, waiting)
    }

    /// Judge calls each text has taken, this one included; forgets them.
    fn settle(&self, batch: &[String]) -> HashMap<String, u32> {
        let mut tries = self.retry.lock().expect("retry lock poisoned");
        batch.iter().map(|t| (t.clone(), tries.settle(t))).collect()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::judge::ScriptedJudge;
    use spur_core::config::RewardModelKind;

    const GARBAGE: &str = "Thought process: the key matters.\n1: helpful";

    struct Fixture {
        labeler: Arc<Labeler>,
        tasks: Tasks,
        cancel: CancellationToken,
        dir: std::path::PathBuf,
    }

    /// A labeler whose judge gives `script` first, with rounds of 2 calls, `retries`
    /// later rounds and a 10 s first wait.
    fn start(name: &str, script: &[&str], retries: u32) -> Fixture {
        let dir = std::env::temp_dir().join(format!("spur-labeler-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(LabelStore::open(&dir.join("labels.redb")).unwrap());
        let prompt = Prompt::new("{count} {events}".into(), "goal".into());
        let labeler = Arc::new(Labeler::new(
            prompt,
            "v1".into(),
            Judge::Scripted(ScriptedJudge::new(script)),
            store,
            Arc::new(RewardModel::new(
                "v1".into(),
                RewardModelKind::Retrieval,
                Vec::new(),
            )),
            None,
            None,
            Vec::new(),
            100,
            8,
            1,
            RetryWait::new(2, retries, Duration::from_secs(10)),
        ));
        let tasks = Tasks::default();
        let cancel = CancellationToken::new();
        tasks.spawn(
            "labeler",
            labeler.clone().run(tasks.clone(), cancel.clone()),
        );
        tasks.spawn("retries", labeler.clone().run_retries(cancel.clone()));
        Fixture {
            labeler,
            tasks,
            cancel,
            dir,
        }
    }

    impl Fixture {
        fn judge(&self) -> &ScriptedJudge {
            match &self.labeler.judge {
                Judge::Scripted(j) => j,
                _ => unreachable!("the fixture's judge is scripted"),
            }
        }

        fn waiting(&self) -> usize {
            self.labeler.retry.lock().unwrap().waiting()
        }

        /// Polls (in paused time) until `pred` holds; panics after an hour.
        async fn until(&self, what: &str, pred: impl Fn(&Labeler) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !pred(&self.labeler) {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn stop(self) {
            self.cancel.cancel();
            let stragglers = self
                .tasks
                .join(Instant::now() + Duration::from_secs(5))
                .await;
            assert!(stragglers.is_empty(), "{stragglers:?}");
            drop(self.labeler);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unparseable_texts_wait_then_get_their_labels() {
        // one garbage round (2 calls for the batch), then correct answers
        let f = start("retry", &[GARBAGE, ":"], 3);
        let key = "you pick up the key";
        let wall = "you bump into a wall";
        let t0 = Instant::now();
        f.labeler.submit(vec![key.into(), wall.into()]);
        f.until("a waiting round", |_| f.waiting() == 2).await;
        let waited_from = Instant::now();
        assert_eq!(f.labeler.model.label_count(), 0, "garbage is no label");
        assert!(!f.labeler.model.contains(key));
        assert_eq!(crate::service::status(&f.labeler).retry_waiting, 2);
        // Waiting texts are not queued twice when an actor sends them again.
        assert_eq!(f.labeler.submit(vec![key.into()]), 0);
        assert_eq!(f.judge().calls(key), 2);

        f.until("labels", |l| l.model.label_count() == 2).await;
        assert!(
            waited_from.duration_since(t0) < Duration::from_secs(1),
            "the first round runs at once"
        );
        let waited = Instant::now().duration_since(waited_from);
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "the second round starts after the backoff: {waited:?}"
        );
        assert_eq!(f.waiting(), 0);
        assert_eq!(f.labeler.model.positives(), 1);
        assert_eq!(f.judge().calls(key), 3);
        let rec = f.labeler.store.get("v1", key).unwrap().unwrap();
        assert_eq!(rec.verdict, Some(true));
        assert_eq!(rec.attempts, 3, "every call counted");
        assert_eq!(
            f.labeler.store.get("v1", wall).unwrap().unwrap().verdict,
            Some(false)
        );
        f.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_in_every_round_ends_unparseable_never_positive() {
        // 1 + 2 rounds of 2 calls, all garbage
        let f = start("give-up", &[GARBAGE; 6], 2);
        let key = "a key glints";
        let t0 = Instant::now();
        f.labeler.submit(vec![key.into()]);
        f.until("a stored record", |l| l.model.contains(key)).await;
        // waits of 10 s, then 20 s
        let took = Instant::now().duration_since(t0);
        assert!(
            took >= Duration::from_secs(30) && took < Duration::from_secs(31),
            "{took:?}"
        );
        assert_eq!(f.judge().calls(key), 6);
        assert_eq!(f.labeler.model.positives(), 0);
        assert_eq!(f.waiting(), 0);
        let rec = f.labeler.store.get("v1", key).unwrap().unwrap();
        assert_eq!(rec.verdict, None);
        assert_eq!(rec.value(), 0.0);
        assert_eq!(rec.attempts, 6);
        // Final now: no further call, and the record is never replaced.
        assert_eq!(f.labeler.submit(vec![key.into()]), 0);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(f.judge().calls(key), 6);
        assert_eq!(Stats::get(&f.labeler.stats.store_hits), 1);
        f.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_workers_and_the_retry_timer() {
        let f = start("stop", &[GARBAGE, GARBAGE], 5);
        f.labeler.submit(vec!["you pick up the key".into()]);
        f.until("a waiting round", |_| f.waiting() == 1).await;
        let start = Instant::now();
        f.cancel.cancel();
        let stragglers = f.tasks.join(start + Duration::from_secs(5)).await;
        assert!(stragglers.is_empty(), "{stragglers:?}");
        assert!(Instant::now().duration_since(start) < Duration::from_secs(1));
        // the waiting text was never stored
        assert_eq!(f.labeler.model.label_count(), 0);
        assert!(f.labeler.store.all("v1").unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}
