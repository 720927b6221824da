//! State the gRPC handlers and the training thread share: counters, the rolling
//! window of finished episodes, and what is known about each actor.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use spur_proto::v1::{ActorInfo, EpisodeSummary, LearnerStatus};

/// Episodes in the rolling window behind `episode_return_mean`.
pub const EPISODE_WINDOW: usize = 100;

#[derive(Default)]
pub struct Shared {
    pub policy_version: AtomicU64,
    pub env_steps: AtomicU64,
    pub updates: AtomicU64,
    pub dropped_stale_chunks: AtomicU64,
    pub connected_actors: AtomicU32,
    pub queue_capacity: u32,
    pub env_steps_budget: u64,
    /// f64 bits of the recent env steps per second.
    steps_per_sec: AtomicU64,
    pub reward_model_version: AtomicU64,
    pub reward_labels: AtomicU64,
    /// f64 bits of the last batch's mean intrinsic reward.
    intrinsic_reward_mean: AtomicU64,
    /// f64 bits of the reward network's training loss.
    reward_model_loss: AtomicU64,
    pub stop_requested: Arc<AtomicBool>,
    pub training_finished: AtomicBool,
    episodes: Mutex<EpisodeWindow>,
    actors: Mutex<HashMap<String, ActorInfo>>,
}

#[derive(Default)]
struct EpisodeWindow {
    recent: VecDeque<EpisodeSummary>,
    total: u64,
}

/// Means over the rolling episode window.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpisodeStats {
    pub return_mean: f64,
    pub len_mean: f64,
    pub success_rate: f64,
    /// Episodes in the window (at most [`EPISODE_WINDOW`]).
    pub window: usize,
    pub total: u64,
}

impl Shared {
    pub fn new(queue_capacity: u32, env_steps_budget: u64) -> Self {
        Self {
            queue_capacity,
            env_steps_budget,
            ..Default::default()
        }
    }

    /// The flag set when a shutdown is requested, for tasks that outlive a borrow.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop_requested.clone()
    }

    pub fn version(&self) -> u64 {
        self.policy_version.load(Ordering::Acquire)
    }

    pub fn set_steps_per_sec(&self, v: f64) {
        self.steps_per_sec.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn set_intrinsic_reward_mean(&self, v: f64) {
        self.intrinsic_reward_mean
            .store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn set_reward_model_loss(&self, v: f64) {
        self.reward_model_loss.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn steps_per_sec(&self) -> f64 {
        f64::from_bits(self.steps_per_sec.load(Ordering::Relaxed))
    }

    pub fn record_episodes(&self, finished: &[EpisodeSummary]) {
        if finished.is_empty() {
            return;
        }
        let mut w = self.episodes.lock().expect("episode window lock poisoned");
        for e in finished {
            if w.recent.len() == EPISODE_WINDOW {
                w.recent.pop_front();
            }
            w.recent.push_back(*e);
            w.total += 1;
        }
    }

    pub fn episode_stats(&self) -> EpisodeStats {
        let w = self.episodes.lock().expect("episode window lock poisoned");
        let n = w.recent.len();
        if n == 0 {
            return EpisodeStats {
                total: w.total,
                ..Default::default()
            };
        }
        let sum =
            |f: &dyn Fn(&EpisodeSummary) -> f64| w.recent.iter().map(f).sum::<f64>() / n as f64;
        EpisodeStats {
            return_mean: sum(&|e| e.episode_return as f64),
            len_mean: sum(&|e| e.length as f64),
            success_rate: sum(&|e| e.success as u8 as f64),
            window: n,
            total: w.total,
        }
    }

    /// Notes an accepted chunk from `actor_id` produced by `version`.
    pub fn record_chunk(&self, actor_id: &str, version: u64, steps: u64) {
        let mut actors = self.actors.lock().expect("actor table lock poisoned");
        let info = actors
            .entry(actor_id.to_string())
            .or_insert_with(|| ActorInfo {
                actor_id: actor_id.to_string(),
                first_policy_version: version,
                ..Default::default()
            });
        info.chunks += 1;
        info.env_steps += steps;
        info.last_policy_version = version;
    }

    pub fn status(&self, queue_depth: u32) -> LearnerStatus {
        let ep = self.episode_stats();
        let mut actors: Vec<ActorInfo> = self
            .actors
            .lock()
            .expect("actor table lock poisoned")
            .values()
            .cloned()
            .collect();
        actors.sort_by(|a, b| a.actor_id.cmp(&b.actor_id));
        LearnerStatus {
            policy_version: self.version(),
            env_steps: self.env_steps.load(Ordering::Relaxed),
            connected_actors: self.connected_actors.load(Ordering::Relaxed),
            queue_depth,
            queue_capacity: self.queue_capacity,
            steps_per_sec: self.steps_per_sec(),
            episode_return_mean: ep.return_mean,
            episode_len_mean: ep.len_mean,
            success_rate: ep.success_rate,
            episodes: ep.total,
            dropped_stale_chunks: self.dropped_stale_chunks.load(Ordering::Relaxed),
            updates: self.updates.load(Ordering::Relaxed),
            training_finished: self.training_finished.load(Ordering::Acquire),
            env_steps_budget: self.env_steps_budget,
            actors,
            reward_model_version: self.reward_model_version.load(Ordering::Relaxed),
            reward_labels: self.reward_labels.load(Ordering::Relaxed),
            intrinsic_reward_mean: f64::from_bits(
                self.intrinsic_reward_mean.load(Ordering::Relaxed),
            ),
            reward_model_loss: f64::from_bits(self.reward_model_loss.load(Ordering::Relaxed)),
        }
    }
}

/// Counts an open trajectory stream for as long as it lives.
pub struct ConnectedGuard<'a>(&'a Shared);

impl<'a> ConnectedGuard<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        shared.connected_actors.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.connected_actors.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_window_keeps_the_last_hundred() {
        let s = Shared::new(4, 0);
        let eps: Vec<EpisodeSummary> = (0..150)
            .map(|i| EpisodeSummary {
                episode_return: i as f32,
                length: 10,
                success: i % 2 == 0,
            })
            .collect();
        s.record_episodes(&eps);
        let st = s.episode_stats();
        assert_eq!(st.window, 100);
        assert_eq!(st.total, 150);
        assert!((st.return_mean - 99.5).abs() < 1e-9);
        assert!((st.success_rate - 0.5).abs() < 1e-9);
    }
}
