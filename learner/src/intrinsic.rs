//! Intrinsic rewards in the learner: a subscription to the reward service keeps the
//! newest reward model (for `retrieval`, the label table), and every batch's rewards
//! are recomputed from it, so labels that arrive after a chunk was produced still
//! count (as in ONI):
//!
//! `r = c_ext * clip(r_env, -clip_max, clip_max) + c_int * r_int(text) * count^(-beta)`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use spur_core::config::{IntrinsicConfig, RewardModelKind};
use spur_core::redial::{CallError, Redial};
use spur_core::reward::repeat_decay;
use spur_core::text_model::CharCnn;
use spur_core::transport::Connector;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{
    RewardModelRequest, RewardModelUpdate, RewardServiceStatus, RewardStatusRequest,
};
use spur_proto::MAX_MESSAGE_BYTES;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The learner's copy of the reward model: the label table (`retrieval`) or the
/// newest network (`classification`, `ranking`) with its outputs cached per text.
#[derive(Default)]
pub struct RewardTable {
    labels: RwLock<HashMap<String, f32>>,
    version: AtomicU64,
    network: Mutex<Option<Network>>,
    /// The reward service's latest counters, for the learner's metrics.
    service: Mutex<Option<RewardServiceStatus>>,
    /// Ranking score statistics from a checkpoint, for the first network to arrive.
    resumed_stats: Mutex<Option<(f64, f64)>>,
}

/// How often the learner asks the reward service for its counters.
const STATUS_POLL: Duration = Duration::from_secs(2);

struct Network {
    ranking: bool,
    net: CharCnn,
    /// Per text under the current weights: the reward (classification) or the raw
    /// score (ranking).
    cache: HashMap<String, f32>,
    /// Training loss the service reported with these weights.
    loss: f64,
    /// Running mean and variance of the scores of the texts in recent batches
    /// (ranking), one entry per occurrence.
    stats: Option<(f64, f64)>,
}

/// Weight of the newest batch in the running score statistics.
const SCORE_STATS_RATE: f64 = 0.05;

/// Smallest standard deviation ranking scores are divided by.
const SCORE_STD_FLOOR: f64 = 1e-3;

impl Network {
    /// Scores the texts of the batch this version has not seen, in one pass, and
    /// (ranking) folds the batch's scores into the running statistics.
    fn score(&mut self, texts: &[String], counts: &[u32]) {
        let mut fresh: Vec<&str> = texts
            .iter()
            .zip(counts)
            .filter(|(t, &k)| k > 0 && !self.cache.contains_key(t.as_str()))
            .map(|(t, _)| t.as_str())
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if !fresh.is_empty() {
            let values = if self.ranking {
                self.net.scores(&fresh)
            } else {
                let p = self.net.helpful_probability(&fresh);
                p.into_iter()
                    .map(|p| if p > 0.5 { 1.0 } else { 0.0 })
                    .collect()
            };
            for (t, v) in fresh.iter().zip(values) {
                self.cache.insert(t.to_string(), v);
            }
        }
        if !self.ranking {
            return;
        }
        let (mut n, mut sum, mut sq) = (0.0f64, 0.0f64, 0.0f64);
        for (t, &k) in texts.iter().zip(counts) {
            if k > 0 {
                let v = self.cache[t.as_str()] as f64;
                n += 1.0;
                sum += v;
                sq += v * v;
            }
        }
        if n == 0.0 {
            return;
        }
        let (m, v) = (sum / n, (sq / n - (sum / n).powi(2)).max(0.0));
        self.stats = Some(match self.stats {
            None => (m, v),
            Some((m0, v0)) => {
                let r = SCORE_STATS_RATE;
                let mean = m0 + r * (m - m0);
                // the batch's spread plus how far its mean moved
                let var = (1.0 - r) * v0 + r * (v + (m - m0) * (m - mean));
                (mean, var.max(0.0))
            }
        });
    }

    /// The intrinsic reward of a scored text.
    fn reward(&self, text: &str, rank_clip: f64) -> f64 {
        let Some(&v) = self.cache.get(text) else {
            return 0.0;
        };
        if !self.ranking {
            return v as f64;
        }
        let (mean, var) = self.stats.unwrap_or((v as f64, 1.0));
        ((v as f64 - mean) / var.sqrt().max(SCORE_STD_FLOOR)).clamp(-rank_clip, rank_clip)
    }
}

impl RewardTable {
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Labels held (retrieval), or texts scored so far (networks).
    pub fn label_count(&self) -> usize {
        let net = self.network.lock().expect("reward network lock poisoned");
        match net.as_ref() {
            Some(n) => n.cache.len(),
            None => self
                .labels
                .read()
                .expect("reward table lock poisoned")
                .len(),
        }
    }

    /// The reward service's latest counters, if it has answered.
    pub fn service_status(&self) -> Option<RewardServiceStatus> {
        self.service.lock().expect("status lock poisoned").clone()
    }

    /// Training loss of the network held (0 for the label table).
    pub fn loss(&self) -> f64 {
        let net = self.network.lock().expect("reward network lock poisoned");
        net.as_ref().map_or(0.0, |n| n.loss)
    }

    /// The running mean and variance of ranking scores (None before any, or when the
    /// model is not a ranking network).
    pub fn score_stats(&self) -> Option<(f64, f64)> {
        let net = self.network.lock().expect("reward network lock poisoned");
        net.as_ref().and_then(|n| n.stats)
    }

    /// Score statistics saved in a checkpoint; the ranking network that arrives
    /// after a restart continues from them instead of from its first batch.
    pub fn resume_score_stats(&self, stats: (f64, f64)) {
        *self
            .resumed_stats
            .lock()
            .expect("reward stats lock poisoned") = Some(stats);
    }

    pub fn apply(&self, update: RewardModelUpdate) {
        if !update.weights.is_empty() {
            let ranking = match RewardModelKind::try_from(update.kind) {
                Ok(kind) => kind == RewardModelKind::Ranking,
                Err(e) => {
                    warn!(version = update.version, error = %e, "ignoring reward-model weights of no known kind");
                    return;
                }
            };
            let mut guard = self.network.lock().expect("reward network lock poisoned");
            if guard.as_ref().is_some_and(|n| n.ranking != ranking) {
                *guard = None;
            }
            let resumed = || {
                let mut r = self
                    .resumed_stats
                    .lock()
                    .expect("reward stats lock poisoned");
                if ranking {
                    r.take()
                } else {
                    None
                }
            };
            let n = guard.get_or_insert_with(|| Network {
                ranking,
                net: CharCnn::new(if ranking { 1 } else { 2 }, tch::Device::Cpu),
                cache: HashMap::new(),
                loss: 0.0,
                stats: resumed(),
            });
            match n.net.load_safetensors(&update.weights) {
                Ok(_) => {
                    n.cache.clear();
                    n.loss = update.loss;
                    self.version.store(update.version, Ordering::Release);
                }
                Err(e) => {
                    warn!(version = update.version, error = %e, "ignoring unusable reward-model weights")
                }
            }
            return;
        }
        let mut labels = self.labels.write().expect("reward table lock poisoned");
        if update.full {
            labels.clear();
        }
        for l in update.labels {
            if l.value.is_finite() {
                labels.insert(l.text, l.value);
            }
        }
        self.version.store(update.version, Ordering::Release);
    }

    /// Mixed rewards for a batch; returns them and the mean intrinsic term.
    pub fn mix(
        &self,
        rewards: &[f32],
        texts: &[String],
        counts: &[u32],
        c: &IntrinsicConfig,
    ) -> (Vec<f32>, f64) {
        let mut net = self.network.lock().expect("reward network lock poisoned");
        if let Some(n) = net.as_mut() {
            n.score(texts, counts);
        }
        let labels = self.labels.read().expect("reward table lock poisoned");
        let value = |t: &str| match net.as_ref() {
            Some(n) => n.reward(t, c.rank_clip),
            None => labels.get(t).copied().unwrap_or(0.0) as f64,
        };
        let clip = c.clip_max as f32;
        let mut intrinsic_sum = 0.0f64;
        let mixed = rewards
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let ext = c.c_ext as f32 * r.clamp(-clip, clip);
                let int = match (texts.get(i), counts.get(i)) {
                    (Some(t), Some(&n)) if n > 0 => c.c_int * value(t) * repeat_decay(n, c.beta),
                    _ => 0.0,
                };
                intrinsic_sum += int;
                ext + int as f32
            })
            .collect();
        (mixed, intrinsic_sum / rewards.len().max(1) as f64)
    }
}

/// Keeps `table` current until `stop` is cancelled, reconnecting with backoff. While
/// the reward service is away the learner keeps the model it has.
pub async fn subscribe(reward: Connector, table: Arc<RewardTable>, stop: CancellationToken) {
    let status = tokio::spawn(poll_status(reward.clone(), table.clone(), stop.clone()));
    stop.run_until_cancelled(follow(reward, table)).await;
    let _ = status.await;
}

async fn follow(reward: Connector, table: Arc<RewardTable>) {
    let mut redial = Redial::new("learner", "reward service", Duration::from_secs(5));
    loop {
        let reward = &reward;
        let open = || async move {
            let channel = reward.connect().await?;
            let stream = RewardServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .subscribe_reward_model(RewardModelRequest {
                    subscriber: "learner".into(),
                })
                .await?;
            Ok::<_, CallError>(stream.into_inner())
        };
        let Some(mut stream) = redial.open(open, || false).await else {
            return;
        };
        info!(addr = reward.addr(), "subscribed to reward-model versions");
        let why = loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    redial.progressed();
                    // Loading a network is tch work, and the trainer holds the
                    // table's lock during its forward passes: off the async threads.
                    let t = table.clone();
                    if tokio::task::spawn_blocking(move || t.apply(update))
                        .await
                        .is_err()
                    {
                        warn!("applying a reward-model version panicked");
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(CallError::from(status)),
            }
        };
        redial.ended(why.as_ref()).await;
    }
}

/// Keeps the reward service's counters in `table` until `stop` is cancelled.
async fn poll_status(reward: Connector, table: Arc<RewardTable>, stop: CancellationToken) {
    let mut client = None;
    let mut tick = tokio::time::interval(STATUS_POLL);
    while stop.run_until_cancelled(tick.tick()).await.is_some() {
        if client.is_none() {
            client = stop
                .run_until_cancelled(reward.connect())
                .await
                .and_then(|c| c.ok())
                .map(RewardServiceClient::new);
        }
        if let Some(c) = client.as_mut() {
            match stop
                .run_until_cancelled(c.get_status(RewardStatusRequest {}))
                .await
            {
                Some(Ok(s)) => {
                    *table.service.lock().expect("status lock poisoned") = Some(s.into_inner())
                }
                Some(Err(_)) => client = None,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_proto::v1::LabelEntry;

    #[test]
    fn mixes_clipped_extrinsic_and_decayed_intrinsic() {
        let t = RewardTable::default();
        t.apply(RewardModelUpdate {
            version: 3,
            full: true,
            labels: vec![LabelEntry {
                text: "key".into(),
                value: 1.0,
            }],
            ..Default::default()
        });
        let c = IntrinsicConfig {
            enabled: true,
            c_ext: 2.0,
            c_int: 0.5,
            clip_max: 1.0,
            beta: 3.0,
            ..Default::default()
        };
        let texts: Vec<String> = ["key", "key", "wall", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (mixed, mean_int) = t.mix(&[0.0, 5.0, 1.0, -3.0], &texts, &[1, 2, 1, 0], &c);
        // 0.5 * 1 * 1^-3 = 0.5; 2*clip(5)=2, + 0.5 * 2^-3 = 0.0625; wall unlabelled; ""
        assert_eq!(mixed, vec![0.5, 2.0625, 2.0, -2.0]);
        assert!((mean_int - (0.5 + 0.0625) / 4.0).abs() < 1e-9);
        assert_eq!(t.version(), 3);
        // a delta adds, a full table replaces
        t.apply(RewardModelUpdate {
            version: 4,
            labels: vec![LabelEntry {
                text: "door".into(),
                value: 1.0,
            }],
            ..Default::default()
        });
        assert_eq!(t.label_count(), 2);
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;
    use spur_core::text_model::CharCnnTrainer;

    #[test]
    fn classification_weights_score_texts() {
        let mut t = CharCnnTrainer::new(2, 3e-3, tch::Device::Cpu).unwrap();
        for _ in 0..50 {
            t.train_classifier(&["you pick up the key", "you bump into a wall"], &[1, 0]);
        }
        let table = RewardTable::default();
        table.apply(RewardModelUpdate {
            version: 2,
            kind: spur_proto::v1::RewardModelKind::Classification.into(),
            full: true,
            weights: t.net.to_safetensors(2).unwrap(),
            ..Default::default()
        });
        let c = IntrinsicConfig {
            enabled: true,
            c_int: 1.0,
            ..Default::default()
        };
        let texts: Vec<String> = ["you pick up the key", "you bump into a wall"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (mixed, _) = table.mix(&[0.0, 0.0], &texts, &[1, 1], &c);
        assert_eq!(mixed, vec![1.0, 0.0]);
        assert_eq!(table.label_count(), 2);
        assert_eq!(table.version(), 2);
    }

    #[test]
    fn ranking_scores_are_normalized_and_ordered() {
        let mut t = CharCnnTrainer::new(1, 3e-3, tch::Device::Cpu).unwrap();
        for _ in 0..100 {
            t.train_ranker(
                &["you pick up the key", "you reach the goal"],
                &["you bump into a wall", "you pick up the key"],
                &[1.0, 1.0],
            );
        }
        let table = RewardTable::default();
        table.apply(RewardModelUpdate {
            version: 5,
            kind: spur_proto::v1::RewardModelKind::Ranking.into(),
            full: true,
            weights: t.net.to_safetensors(5).unwrap(),
            loss: 0.25,
            ..Default::default()
        });
        let c = IntrinsicConfig {
            enabled: true,
            c_int: 1.0,
            beta: 0.0,
            rank_clip: 3.0,
            ..Default::default()
        };
        let texts: Vec<String> = [
            "you bump into a wall",
            "you bump into a wall",
            "you pick up the key",
            "you reach the goal",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (mixed, mean) = table.mix(&[0.0; 4], &texts, &[1, 1, 1, 1], &c);
        // the goal beats the key beats the wall, on the normalized scale
        assert!(mixed[3] > mixed[2] && mixed[2] > mixed[0], "{mixed:?}");
        assert_eq!(mixed[0], mixed[1]);
        // normalized by this batch's own statistics: mean 0, std 1 per occurrence
        assert!(mean.abs() < 1e-4, "{mean}");
        let var: f32 = mixed.iter().map(|x| x * x).sum::<f32>() / 4.0;
        assert!((var - 1.0).abs() < 1e-3, "{var}");
        assert!(mixed.iter().all(|x| x.abs() <= 3.0));
        assert_eq!(table.loss(), 0.25);
        assert_eq!(table.version(), 5);
    }
}
