//! Intrinsic rewards in the learner: a subscription to the reward service keeps the
//! newest reward model (for `retrieval`, the label table), and every batch's rewards
//! are recomputed from it, so labels that arrive after a chunk was produced still
//! count (as in ONI):
//!
//! `r = c_ext * clip(r_env, -clip_max, clip_max) + c_int * r_int(text) * count^(-beta)`

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use spur_core::backoff::Backoff;
use spur_core::config::IntrinsicConfig;
use spur_core::text_model::CharCnn;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RewardModelRequest, RewardModelUpdate};
use spur_proto::MAX_MESSAGE_BYTES;
use tonic::transport::Endpoint;
use tracing::{info, warn};

/// The learner's copy of the reward model: the label table (`retrieval`) or the
/// newest network (`classification`) with its rewards cached per text.
#[derive(Default)]
pub struct RewardTable {
    labels: RwLock<HashMap<String, f32>>,
    version: AtomicU64,
    network: Mutex<Option<Network>>,
}

struct Network {
    net: CharCnn,
    /// Reward per text under the current weights.
    cache: HashMap<String, f32>,
}

impl RewardTable {
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Labels held (retrieval), or texts scored so far (classification).
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

    pub fn apply(&self, update: RewardModelUpdate) {
        if !update.weights.is_empty() {
            let mut guard = self.network.lock().expect("reward network lock poisoned");
            let n = guard.get_or_insert_with(|| Network {
                net: CharCnn::new(2, tch::Device::Cpu),
                cache: HashMap::new(),
            });
            match n.net.load_safetensors(&update.weights) {
                Ok(_) => {
                    n.cache.clear();
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
            // Score the texts this version has not seen, in one batch.
            let mut fresh: Vec<&str> = texts
                .iter()
                .zip(counts)
                .filter(|(t, &k)| k > 0 && !n.cache.contains_key(t.as_str()))
                .map(|(t, _)| t.as_str())
                .collect();
            fresh.sort_unstable();
            fresh.dedup();
            if !fresh.is_empty() {
                let p = n.net.helpful_probability(&fresh);
                for (t, p) in fresh.iter().zip(p) {
                    n.cache
                        .insert(t.to_string(), if p > 0.5 { 1.0 } else { 0.0 });
                }
            }
        }
        let labels = self.labels.read().expect("reward table lock poisoned");
        let table = net.as_ref().map(|n| &n.cache).unwrap_or(&labels);
        let clip = c.clip_max as f32;
        let mut intrinsic_sum = 0.0f64;
        let mixed = rewards
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let ext = c.c_ext as f32 * r.clamp(-clip, clip);
                let int = match (texts.get(i), counts.get(i)) {
                    (Some(t), Some(&n)) if n > 0 => {
                        let v = table.get(t).copied().unwrap_or(0.0) as f64;
                        c.c_int * v * (n as f64).powf(-c.beta)
                    }
                    _ => 0.0,
                };
                intrinsic_sum += int;
                ext + int as f32
            })
            .collect();
        (mixed, intrinsic_sum / rewards.len().max(1) as f64)
    }
}

/// Keeps `table` current until `stop` is set, reconnecting with backoff.
pub async fn subscribe(addr: String, table: Arc<RewardTable>, stop: Arc<AtomicBool>) {
    let endpoint = match Endpoint::from_shared(addr.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(2)),
        Err(e) => {
            warn!(addr, error = %e, "bad reward service address, intrinsic rewards stay 0");
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_secs(5));
    while !stop.load(Ordering::Acquire) {
        let stream = match endpoint.connect().await {
            Ok(ch) => RewardServiceClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .subscribe_reward_model(RewardModelRequest {
                    subscriber: "learner".into(),
                })
                .await
                .map(|r| r.into_inner()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(status) => {
                let delay = backoff.next_delay();
                warn!(addr, error = %status.message(), ?delay, "cannot reach the reward service, retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        info!(addr, "subscribed to reward-model versions");
        loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    backoff.reset();
                    table.apply(update);
                }
                Ok(None) => break,
                Err(status) => {
                    warn!(error = %status.message(), "reward-model stream broke");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
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
}
