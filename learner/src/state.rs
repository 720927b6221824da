//! State the gRPC handlers and the training thread share: counters, the rolling
//! window of finished episodes, and what is known about each actor.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use spur_proto::v1::{ActorInfo, EpisodeSummary, LearnerStatus};
use tokio_util::sync::CancellationToken;

/// Episodes in the rolling window behind `episode_return_mean`.
pub const EPISODE_WINDOW: usize = 100;

#[derive(Default)]
pub struct Shared {
    /// Drawn at every start: chunks and weights of other incarnations are not ours.
    pub incarnation: u64,
    pub policy_version: AtomicU64,
    /// Env steps trained on: what `stop.env_steps` and the lr schedule count.
    pub env_steps: AtomicU64,
    pub updates: AtomicU64,
    pub counts: StepCounts,
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
    /// Cancelled when a shutdown is requested: the trainer finishes its update,
    /// checkpoints and stops.
    pub stop: CancellationToken,
    pub training_finished: AtomicBool,
    episodes: Mutex<EpisodeWindow>,
    actors: Mutex<HashMap<String, Known>>,
}

/// What the learner knows of one actor: its status row, when its last chunk came, and
/// whether its weight stream has carried the finished flag to it.
struct Known {
    info: ActorInfo,
    last_chunk: Instant,
    told_finished: bool,
}

/// Where received env steps went, besides training.
#[derive(Default)]
pub struct StepCounts {
    /// In chunks that decoded and were checked (malformed ones are not received).
    pub received: AtomicU64,
    /// Older than `learner.max_policy_lag` versions when their turn came.
    pub stale_steps: AtomicU64,
    pub stale_chunks: AtomicU64,
    /// Produced under another learner incarnation (before a restart).
    pub incarnation_steps: AtomicU64,
    pub incarnation_chunks: AtomicU64,
    /// In chunks refused as malformed (as the chunk claimed: rollout_len * num_envs).
    pub malformed_steps: AtomicU64,
    pub malformed_chunks: AtomicU64,
}

impl StepCounts {
    pub fn add(counter: &AtomicU64, chunks: &AtomicU64, steps: u64) {
        counter.fetch_add(steps, Ordering::Relaxed);
        chunks.fetch_add(1, Ordering::Relaxed);
    }

    /// Values to carry across a restart, by checkpoint metadata key.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("spur.env_steps_received", get(&self.received)),
            ("spur.dropped_steps_stale", get(&self.stale_steps)),
            ("spur.dropped_chunks_stale", get(&self.stale_chunks)),
            (
                "spur.dropped_steps_incarnation",
                get(&self.incarnation_steps),
            ),
            (
                "spur.dropped_chunks_incarnation",
                get(&self.incarnation_chunks),
            ),
            ("spur.dropped_steps_malformed", get(&self.malformed_steps)),
            ("spur.dropped_chunks_malformed", get(&self.malformed_chunks)),
        ]
    }

    /// Restores what [`snapshot`](Self::snapshot) saved (missing keys stay 0).
    pub fn restore(&self, get: impl Fn(&str) -> u64) {
        let fields = [
            &self.received,
            &self.stale_steps,
            &self.stale_chunks,
            &self.incarnation_steps,
            &self.incarnation_chunks,
            &self.malformed_steps,
            &self.malformed_chunks,
        ];
        for ((key, _), field) in self.snapshot().into_iter().zip(fields) {
            field.store(get(key), Ordering::Relaxed);
        }
    }
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
    pub fn new(incarnation: u64, queue_capacity: u32, env_steps_budget: u64) -> Self {
        Self {
            incarnation,
            queue_capacity,
            env_steps_budget,
            ..Default::default()
        }
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

    /// Episodes finished so far (carried across a restart).
    pub fn set_episodes_total(&self, total: u64) {
        self.episodes
            .lock()
            .expect("episode window lock poisoned")
            .total = total;
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
        let now = Instant::now();
        let mut actors = self.actors.lock().expect("actor table lock poisoned");
        // The id is copied only the first time an actor is seen.
        if !actors.contains_key(actor_id) {
            let info = ActorInfo {
                actor_id: actor_id.to_string(),
                first_policy_version: version,
                ..Default::default()
            };
            actors.insert(
                actor_id.to_string(),
                Known {
                    info,
                    last_chunk: now,
                    told_finished: false,
                },
            );
        }
        let known = actors
            .get_mut(actor_id)
            .expect("inserted above when it was missing");
        known.last_chunk = now;
        let info = &mut known.info;
        info.chunks += 1;
        info.env_steps += steps;
        info.last_policy_version = version;
    }

    /// Notes that `actor_id` has received the finished flag (a subscriber that never
    /// sent a chunk is not waited for, so it needs no note).
    pub fn told_finished(&self, actor_id: &str) {
        let mut actors = self.actors.lock().expect("actor table lock poisoned");
        if let Some(known) = actors.get_mut(actor_id) {
            known.told_finished = true;
        }
    }

    /// Actors that sent a chunk within `recent` and have not yet been told that
    /// training finished, sorted.
    pub fn untold_actors(&self, recent: Duration) -> Vec<String> {
        let actors = self.actors.lock().expect("actor table lock poisoned");
        let mut untold: Vec<String> = actors
            .iter()
            .filter(|(_, k)| k.last_chunk.elapsed() <= recent && !k.told_finished)
            .map(|(id, _)| id.clone())
            .collect();
        untold.sort();
        untold
    }

    pub fn status(&self, queue_depth: u32) -> LearnerStatus {
        let ep = self.episode_stats();
        let mut actors: Vec<ActorInfo> = self
            .actors
            .lock()
            .expect("actor table lock poisoned")
            .values()
            .map(|k| k.info.clone())
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
            dropped_stale_chunks: self.counts.stale_chunks.load(Ordering::Relaxed),
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
            learner_incarnation: self.incarnation,
            env_steps_received: self.counts.received.load(Ordering::Relaxed),
            dropped_steps_stale: self.counts.stale_steps.load(Ordering::Relaxed),
            dropped_steps_incarnation: self.counts.incarnation_steps.load(Ordering::Relaxed),
            dropped_steps_malformed: self.counts.malformed_steps.load(Ordering::Relaxed),
            dropped_incarnation_chunks: self.counts.incarnation_chunks.load(Ordering::Relaxed),
            dropped_malformed_chunks: self.counts.malformed_chunks.load(Ordering::Relaxed),
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
        let s = Shared::new(1, 4, 0);
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

    #[test]
    fn actors_heard_from_lately_wait_to_be_told() {
        let s = Shared::new(1, 4, 0);
        s.record_chunk("actor-1", 3, 32);
        s.record_chunk("actor-0", 3, 32);
        let all = Duration::from_secs(3600);
        assert_eq!(s.untold_actors(all), ["actor-0", "actor-1"]);
        s.told_finished("actor-1");
        s.told_finished("observer"); // a subscriber that never pushed
        assert_eq!(s.untold_actors(all), ["actor-0"]);
        // An actor not heard from within the window is not waited for.
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.untold_actors(Duration::from_millis(10)).is_empty());
        assert_eq!(s.status(0).actors.len(), 2);
    }
}
