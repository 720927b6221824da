//! Intrinsic rewards in the learner: a subscription to the reward service keeps the
//! newest reward model (for `retrieval`, the label table), and every batch's rewards
//! are recomputed from it, so labels that arrive after a chunk was produced still
//! count (as in ONI):
//!
//! `r = c_ext * clip(r_env, -clip_max, clip_max) + c_int * r_int(text) * count^(-beta)`

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use spur_core::backoff::Backoff;
use spur_core::config::IntrinsicConfig;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RewardModelRequest, RewardModelUpdate};
use spur_proto::MAX_MESSAGE_BYTES;
use tonic::transport::Endpoint;
use tracing::{info, warn};

/// The learner's copy of the reward model.
#[derive(Default)]
pub struct RewardTable {
    labels: RwLock<HashMap<String, f32>>,
    version: AtomicU64,
}

impl RewardTable {
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn label_count(&self) -> usize {
        self.labels
            .read()
            .expect("reward table lock poisoned")
            .len()
    }

    pub fn apply(&self, update: RewardModelUpdate) {
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
        let labels = self.labels.read().expect("reward table lock poisoned");
        let clip = c.clip_max as f32;
        let mut intrinsic_sum = 0.0f64;
        let mixed = rewards
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let ext = c.c_ext as f32 * r.clamp(-clip, clip);
                let int = match (texts.get(i), counts.get(i)) {
                    (Some(t), Some(&n)) if n > 0 => {
                        let v = labels.get(t).copied().unwrap_or(0.0) as f64;
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
