//! `VecEnv`: many environments stepped in lock-step with one flat observation buffer.
//! An episode that ends is reset at once (its last observation is kept for
//! bootstrapping truncated episodes), and each new episode gets a fresh seed.
//!
//! With groups (`group_size` G > 1), envs come in blocks of G, and each block fills
//! one group at a time: the next G episodes started in the block share a task seed,
//! which is also their group id (UI-S1). Usually that is one episode per env; an env
//! whose episode ends early may run the same task again. Filling groups in start
//! order keeps a group's episodes close in time, so none of them waits long.
//!
//! An episode lost with a restarted env bridge ends truncated at the step that
//! failed (see [`VecEnv::step`] for why truncated); its group takes no further
//! episodes, and its env starts a new episode like any other.

use std::collections::HashMap;

use spur_proto::v1::EpisodeSummary;

use tracing::warn;

use super::{Env, EnvBatch, EnvSpec, LocalBatch, StepOutcome};
use crate::error::EnvError;

/// What one lock-step produced, for all environments (index = env).
#[derive(Debug, Default)]
pub struct VecStep {
    pub rewards: Vec<f32>,
    pub terminated: Vec<u8>,
    pub truncated: Vec<u8>,
    /// Event texts, one per env (empty strings when nothing happened or no text).
    pub texts: Vec<String>,
    /// How often each env's text has occurred in its episode so far, this step
    /// included (0 for an empty text).
    pub event_counts: Vec<u32>,
    /// Last observations of truncated episodes, in env order, `obs_dim` each.
    pub final_observations: Vec<f32>,
    /// Per env: the expert's action where the env patched a mismatch, else -1.
    pub expert_actions: Vec<i64>,
    pub finished: Vec<EpisodeSummary>,
}

pub struct VecEnv {
    batch: Box<dyn EnvBatch>,
    outcomes: Vec<StepOutcome>,
    /// Envs whose episode ended this step, and the seeds of their next episodes.
    ended: Vec<usize>,
    seeds: Vec<u64>,
    spec: EnvSpec,
    obs: Vec<f32>,
    seed: u64,
    /// Episodes started so far (across envs); feeds seeds and episode ids.
    episodes_started: u64,
    episode_ids: Vec<i64>,
    step_indices: Vec<i64>,
    returns: Vec<f32>,
    /// Per env: occurrences of each event text in the current episode.
    seen: Vec<HashMap<String, u32>>,
    /// Episodes per group (1: no groups).
    group_size: usize,
    /// Per block: the group being filled, its episodes started, groups opened.
    block_group: Vec<u64>,
    block_filled: Vec<usize>,
    block_groups: Vec<u64>,
    /// Per env: the group of the current episode.
    group_ids: Vec<u64>,
    /// Episodes lost with a restarted env bridge, so far.
    lost_episodes: u64,
    out: VecStep,
}

/// A well-spread 64-bit value for `x` (SplitMix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl VecEnv {
    /// Wraps `envs` (all of the same spec) and resets each from `seed`.
    pub fn new(envs: Vec<Box<dyn Env>>, seed: u64) -> Self {
        Self::grouped(envs, seed, 1)
    }

    /// Like [`new`](Self::new), with envs in groups of `group_size` (which must
    /// divide their number).
    pub fn grouped(envs: Vec<Box<dyn Env>>, seed: u64, group_size: usize) -> Self {
        Self::from_batch(Box::new(LocalBatch::new(envs)), seed, group_size)
            .expect("in-process envs do not fail")
    }

    /// Steps `batch` with envs in groups of `group_size` (which must divide their
    /// number), starting every env's first episode from `seed`.
    pub fn from_batch(
        batch: Box<dyn EnvBatch>,
        seed: u64,
        group_size: usize,
    ) -> Result<Self, EnvError> {
        let n = batch.num_envs();
        assert!(
            group_size >= 1 && n.is_multiple_of(group_size),
            "the number of envs must be a multiple of the group size"
        );
        assert!(n > 0, "a VecEnv needs at least one env");
        let spec = batch.spec().clone();
        let mut v = Self {
            obs: vec![0.0; n * spec.obs_dim],
            spec,
            seed,
            episodes_started: 0,
            episode_ids: vec![0; n],
            step_indices: vec![0; n],
            returns: vec![0.0; n],
            seen: vec![HashMap::new(); n],
            group_size,
            block_group: vec![0; n / group_size],
            block_filled: vec![group_size; n / group_size],
            block_groups: vec![0; n / group_size],
            group_ids: vec![0; n],
            lost_episodes: 0,
            out: VecStep {
                rewards: vec![0.0; n],
                terminated: vec![0; n],
                truncated: vec![0; n],
                texts: vec![String::new(); n],
                event_counts: vec![0; n],
                final_observations: Vec::new(),
                expert_actions: vec![-1; n],
                finished: Vec::new(),
            },
            batch,
            outcomes: vec![StepOutcome::default(); n],
            ended: (0..n).collect(),
            seeds: Vec::with_capacity(n),
        };
        v.start_episodes()?;
        Ok(v)
    }

    pub fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    pub fn num_envs(&self) -> usize {
        self.batch.num_envs()
    }

    /// Current observations, `num_envs * obs_dim`.
    pub fn observations(&self) -> &[f32] {
        &self.obs
    }

    /// Episode id and step index each env's current observation belongs to.
    pub fn episode_ids(&self) -> &[i64] {
        &self.episode_ids
    }

    pub fn step_indices(&self) -> &[i64] {
        &self.step_indices
    }

    /// Group of each env's current episode (its task seed); meaningful with groups.
    pub fn group_ids(&self) -> &[u64] {
        &self.group_ids
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Episodes lost so far because the env bridge that held them died.
    pub fn lost_episodes(&self) -> u64 {
        self.lost_episodes
    }

    /// Env bridge restarts (or reconnects) tried so far.
    pub fn bridge_restarts(&self) -> u64 {
        self.batch.restarts()
    }

    /// Starts the next episode of every env in `self.ended`, in env order, with one
    /// batch reset.
    fn start_episodes(&mut self) -> Result<(), EnvError> {
        if self.ended.is_empty() {
            return Ok(());
        }
        let ended = std::mem::take(&mut self.ended);
        self.seeds.clear();
        for &i in &ended {
            let seed = self.next_seed(i);
            self.seeds.push(seed);
        }
        let result = self.batch.reset(&ended, &self.seeds, &mut self.obs);
        self.ended = ended;
        self.ended.clear();
        result
    }

    /// The seed of env `i`'s next episode, with its bookkeeping started.
    fn next_seed(&mut self, i: usize) -> u64 {
        // SplitMix-style spread so neighbouring episodes get unrelated seeds.
        let seed = if self.group_size > 1 {
            let j = i / self.group_size;
            if self.block_filled[j] == self.group_size {
                // Open the block's next group: one task per (seed, block, count).
                self.block_groups[j] += 1;
                self.block_group[j] = mix(mix(self.seed ^ mix(j as u64)) ^ self.block_groups[j]);
                self.block_filled[j] = 0;
            }
            self.block_filled[j] += 1;
            self.block_group[j]
        } else {
            self.seed
                .wrapping_add(self.episodes_started.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        self.group_ids[i] = seed;
        self.episode_ids[i] = self.episodes_started as i64;
        self.episodes_started += 1;
        self.step_indices[i] = 0;
        self.returns[i] = 0.0;
        self.seen[i].clear();
        seed
    }

    /// Steps every env with its action; ended episodes are reset, so
    /// [`observations`](Self::observations) is the next input for every env. An
    /// episode lost with its env bridge ends here, truncated, with reward 0 and the
    /// step's own observation as its final observation.
    pub fn step(&mut self, actions: &[i64]) -> Result<&VecStep, EnvError> {
        assert_eq!(actions.len(), self.num_envs(), "one action per env");
        let d = self.spec.obs_dim;
        self.out.final_observations.clear();
        self.out.finished.clear();
        self.batch.step(
            actions,
            &mut self.obs,
            &mut self.out.texts,
            &mut self.outcomes,
        )?;
        let mut lost = 0;
        for i in 0..actions.len() {
            let obs = &self.obs[i * d..(i + 1) * d];
            let o = self.outcomes[i];
            if o.lost {
                // The step did not happen: the env's bridge died and its episode with
                // it. The episode ends here as *truncated*, with reward 0 and this
                // step's own observation (the last one the episode produced, still in
                // the env's slot) as its final observation. The learner then cuts
                // V-trace/GAE traces at this step, so nothing of the env's next episode
                // flows into this one, and bootstraps the step from V(obs): the target
                // is gamma * V(obs) instead of the unknown r + gamma * V(next). That
                // one made-up transition has the same TD error whatever action was
                // taken, so in expectation it pushes the policy towards no action.
                // `terminated` would instead teach that this state is worth 0 (a
                // false death) and bias every earlier step of the episode. A lost
                // episode has no summary: its return was not earned to the end.
                self.out.rewards[i] = 0.0;
                self.out.expert_actions[i] = -1;
                self.out.terminated[i] = 0;
                self.out.truncated[i] = 1;
                self.out.texts[i].clear();
                self.out.event_counts[i] = 0;
                self.out.final_observations.extend_from_slice(obs);
                self.abandon_group(i);
                lost += 1;
                self.ended.push(i);
                continue;
            }
            let text = &self.out.texts[i];
            self.out.event_counts[i] = if text.is_empty() {
                0
            } else {
                let c = self.seen[i].entry(text.clone()).or_insert(0);
                *c += 1;
                *c
            };
            self.out.rewards[i] = o.reward;
            self.out.expert_actions[i] = o.expert_action.map_or(-1, |a| a as i64);
            self.out.terminated[i] = o.terminated as u8;
            self.out.truncated[i] = o.truncated as u8;
            self.returns[i] += o.reward;
            self.step_indices[i] += 1;
            if o.truncated {
                self.out.final_observations.extend_from_slice(obs);
            }
            if o.terminated || o.truncated {
                self.out.finished.push(EpisodeSummary {
                    episode_return: self.returns[i],
                    length: self.step_indices[i] as u32,
                    success: o.success,
                });
                self.ended.push(i);
            }
        }
        if lost > 0 {
            self.lost_episodes += lost;
            metrics::counter!("spur_actor_lost_episodes_total").increment(lost);
            warn!(
                lost,
                lost_episodes = self.lost_episodes,
                bridge_restarts = self.batch.restarts(),
                "episodes lost with a restarted env bridge end truncated; their envs start new ones"
            );
        }
        self.start_episodes()?;
        Ok(&self.out)
    }

    /// Takes no more episodes into the group of env `i`'s current episode, which was
    /// lost: the group cannot be whole. The block's next episode opens a new group,
    /// so the envs restarted with the bridge start whole groups again.
    fn abandon_group(&mut self, i: usize) {
        if self.group_size > 1 {
            let j = i / self.group_size;
            if self.block_group[j] == self.group_ids[i] {
                self.block_filled[j] = self.group_size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::CartPole;

    #[test]
    fn resets_ended_episodes_and_keeps_final_observations() {
        let envs: Vec<Box<dyn Env>> = (0..3)
            .map(|_| Box::new(CartPole::new(Some(5))) as _)
            .collect();
        let mut v = VecEnv::new(envs, 11);
        assert_eq!(v.episode_ids(), &[0, 1, 2]);
        for step in 1..=5 {
            let out = v.step(&[0, 1, 0]).unwrap();
            if step < 5 {
                assert!(out.truncated.iter().all(|&t| t == 0));
            } else {
                assert_eq!(out.truncated, vec![1, 1, 1]);
                assert_eq!(out.final_observations.len(), 12);
                assert_eq!(out.finished.len(), 3);
                assert!(out
                    .finished
                    .iter()
                    .all(|e| e.length == 5 && e.episode_return == 5.0));
            }
        }
        assert_eq!(v.episode_ids(), &[3, 4, 5]);
        assert_eq!(v.step_indices(), &[0, 0, 0]);
    }

    #[test]
    fn groups_share_task_seeds_episode_by_episode() {
        use crate::env::KeyRoom;
        let envs: Vec<Box<dyn Env>> = (0..4)
            .map(|_| Box::new(KeyRoom::new(5, Some(3))) as _)
            .collect();
        let mut v = VecEnv::grouped(envs, 7, 2);
        let d = v.spec().obs_dim;
        let g0 = v.group_ids().to_vec();
        assert_eq!(g0[0], g0[1]);
        assert_eq!(g0[2], g0[3]);
        assert_ne!(g0[0], g0[2]);
        // The same task: the same first observation within a block.
        let obs = v.observations().to_vec();
        assert_eq!(obs[..d], obs[d..2 * d]);
        // After the step limit every env starts its second episode: a new group,
        // shared again within each block.
        for _ in 0..3 {
            v.step(&[4, 4, 4, 4]).unwrap();
        }
        let g1 = v.group_ids().to_vec();
        assert_eq!(g1[0], g1[1]);
        assert_ne!(g1[0], g0[0]);
        assert_ne!(g1[0], g1[2]);

        // Groups fill in start order: an env that ends early takes the next slot of
        // its block's open group, and the group after it opens once that is full.
        let envs: Vec<Box<dyn Env>> = vec![
            Box::new(KeyRoom::new(5, Some(1))),
            Box::new(KeyRoom::new(5, Some(3))),
        ];
        let mut v = VecEnv::grouped(envs, 7, 2);
        let first = v.group_ids()[0];
        v.step(&[4, 4]).unwrap(); // env 0 ends (1-step limit): the block's group 2 opens
        let second = v.group_ids()[0];
        assert_ne!(second, first);
        v.step(&[4, 4]).unwrap(); // env 0 ends again: group 2's second slot
        assert_eq!(v.group_ids()[0], second);
        v.step(&[4, 4]).unwrap(); // both end: group 3 opens and takes both
        assert_ne!(v.group_ids()[0], second);
        assert_eq!(v.group_ids()[0], v.group_ids()[1]);
    }

    /// In-process envs whose "bridge" dies once: at step `lose_at` the envs in
    /// `lose` are not stepped and are reported lost, as `RemoteBatch` reports the
    /// envs of a restarted bridge. Stepping a lost env before its reset panics.
    struct Flaky {
        inner: LocalBatch,
        lose_at: usize,
        lose: Vec<usize>,
        steps: usize,
        unreset: Vec<bool>,
    }

    impl Flaky {
        fn new(envs: Vec<Box<dyn Env>>, lose_at: usize, lose: Vec<usize>) -> Box<Self> {
            let n = envs.len();
            Box::new(Self {
                inner: LocalBatch::new(envs),
                lose_at,
                lose,
                steps: 0,
                unreset: vec![false; n],
            })
        }
    }

    impl EnvBatch for Flaky {
        fn spec(&self) -> &EnvSpec {
            self.inner.spec()
        }
        fn num_envs(&self) -> usize {
            self.inner.num_envs()
        }
        fn reset(
            &mut self,
            envs: &[usize],
            seeds: &[u64],
            obs: &mut [f32],
        ) -> Result<(), EnvError> {
            for &i in envs {
                self.unreset[i] = false;
            }
            self.inner.reset(envs, seeds, obs)
        }
        fn step(
            &mut self,
            actions: &[i64],
            obs: &mut [f32],
            texts: &mut [String],
            outcomes: &mut [StepOutcome],
        ) -> Result<(), EnvError> {
            assert!(
                !self.unreset.contains(&true),
                "a lost env was stepped before its reset"
            );
            self.steps += 1;
            let d = self.inner.spec().obs_dim;
            let before = obs.to_vec();
            self.inner.step(actions, obs, texts, outcomes)?;
            if self.steps == self.lose_at {
                for &i in &self.lose {
                    obs[i * d..(i + 1) * d].copy_from_slice(&before[i * d..(i + 1) * d]);
                    texts[i].clear();
                    outcomes[i] = StepOutcome {
                        lost: true,
                        ..StepOutcome::default()
                    };
                    self.unreset[i] = true;
                }
            }
            Ok(())
        }
        fn restarts(&self) -> u64 {
            (self.steps >= self.lose_at) as u64
        }
    }

    /// The columns of a chunk as the actor records them.
    #[derive(Default)]
    struct Rows {
        obs: Vec<Vec<f32>>,
        episode_ids: Vec<Vec<i64>>,
        step_indices: Vec<Vec<i64>>,
        group_ids: Vec<Vec<u64>>,
        rewards: Vec<Vec<f32>>,
        terminated: Vec<Vec<u8>>,
        truncated: Vec<Vec<u8>>,
        finals: Vec<Vec<f32>>,
        finished: usize,
    }

    fn record(v: &mut VecEnv, steps: usize, action: i64) -> Rows {
        let mut r = Rows::default();
        for _ in 0..steps {
            r.obs.push(v.observations().to_vec());
            r.episode_ids.push(v.episode_ids().to_vec());
            r.step_indices.push(v.step_indices().to_vec());
            r.group_ids.push(v.group_ids().to_vec());
            let out = v.step(&vec![action; v.num_envs()]).unwrap();
            r.rewards.push(out.rewards.clone());
            r.terminated.push(out.terminated.clone());
            r.truncated.push(out.truncated.clone());
            r.finals.push(out.final_observations.clone());
            r.finished += out.finished.len();
        }
        r
    }

    /// What the learner relies on: within an env's column, a step continues the
    /// previous step's episode (same id, next index) unless that step ended it.
    fn assert_columns_consistent(r: &Rows) {
        let n = r.episode_ids[0].len();
        for t in 1..r.episode_ids.len() {
            for i in 0..n {
                let ended = r.terminated[t - 1][i] == 1 || r.truncated[t - 1][i] == 1;
                if ended {
                    assert_ne!(
                        r.episode_ids[t][i],
                        r.episode_ids[t - 1][i],
                        "env {i} t {t}"
                    );
                    assert_eq!(r.step_indices[t][i], 0, "env {i} t {t}");
                } else {
                    assert_eq!(
                        r.episode_ids[t][i],
                        r.episode_ids[t - 1][i],
                        "env {i} t {t}"
                    );
                    assert_eq!(
                        r.step_indices[t][i],
                        r.step_indices[t - 1][i] + 1,
                        "env {i} t {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_lost_episode_ends_truncated_at_its_last_observation() {
        let envs: Vec<Box<dyn Env>> = (0..3)
            .map(|_| Box::new(CartPole::new(Some(50))) as _)
            .collect();
        let d = 4;
        // Env 1's bridge dies on the 4th step.
        let mut v = VecEnv::from_batch(Flaky::new(envs, 4, vec![1]), 3, 1).unwrap();
        let r = record(&mut v, 8, 1);
        let lost_row = 3;
        assert_eq!(r.truncated[lost_row], vec![0, 1, 0]);
        assert_eq!(r.terminated[lost_row], vec![0, 0, 0]);
        assert_eq!(r.rewards[lost_row], vec![1.0, 0.0, 1.0]);
        // Its final observation is the observation of the step that failed, so the
        // learner bootstraps from a state the episode really reached.
        assert_eq!(r.finals[lost_row], r.obs[lost_row][d..2 * d].to_vec());
        // Not an episode that finished: no summary for its partial return.
        assert_eq!(r.finished, 0);
        assert_eq!(v.lost_episodes(), 1);
        assert_eq!(v.bridge_restarts(), 1);
        // The env goes on with a fresh episode from a fresh seed; the others do not
        // notice.
        let next = lost_row + 1;
        assert_eq!(r.episode_ids[next], vec![0, 3, 2]);
        assert_eq!(r.step_indices[next], vec![4, 0, 4]);
        assert_ne!(r.obs[next][d..2 * d], r.obs[lost_row][d..2 * d]);
        assert!(r.truncated[next..].iter().all(|t| t == &vec![0, 0, 0]));
        assert_columns_consistent(&r);
    }

    #[test]
    fn a_lost_episode_s_group_takes_no_new_episodes() {
        use crate::env::KeyRoom;
        // A block of two: env 0 ends after every step, env 1 after two.
        let envs = || -> Vec<Box<dyn Env>> {
            vec![
                Box::new(KeyRoom::new(5, Some(1))),
                Box::new(KeyRoom::new(5, Some(2))),
            ]
        };
        // Step 1: env 0 ends and opens the block's second group, B. Step 2: env 0's
        // episode in B ends and env 0's next one takes B's second slot; env 1's
        // episode (of A) ends and opens the third group.
        let mut v = VecEnv::grouped(envs(), 7, 2);
        let a = v.group_ids()[0];
        v.step(&[4, 4]).unwrap();
        let b = v.group_ids()[0];
        v.step(&[4, 4]).unwrap();
        assert_eq!(v.group_ids()[0], b, "the healthy run fills B");
        assert_ne!(v.group_ids()[1], b);

        // The same, but env 0's episode in B is lost on step 2.
        let mut v = VecEnv::from_batch(Flaky::new(envs(), 2, vec![0]), 7, 2).unwrap();
        let r = record(&mut v, 3, 4);
        assert_eq!(r.group_ids[0], vec![a, a], "the same seeds");
        assert_eq!(r.group_ids[1][0], b);
        assert_eq!(r.truncated[1], vec![1, 1]);
        // Env 0's episodes ended by steps 1 and 3 and env 1's by step 2; the lost one
        // has no summary.
        assert_eq!(r.finished, 3);
        // B, with a lost episode, cannot be whole and takes no more: env 0 and env 1
        // start a new group together.
        let c = r.group_ids[2][0];
        assert!(c != a && c != b);
        assert_eq!(r.group_ids[2], vec![c, c]);
        assert_eq!(v.lost_episodes(), 1);
        assert_columns_consistent(&r);
    }

    #[test]
    fn counts_event_texts_per_episode() {
        use crate::env::KeyRoom;
        let envs: Vec<Box<dyn Env>> = vec![Box::new(KeyRoom::new(4, Some(3)))];
        let mut v = VecEnv::new(envs, 1);
        // "search" three times: the same text, counted 1, 2, 3; then a new episode.
        let counts: Vec<u32> = (0..4)
            .map(|_| v.step(&[4]).unwrap().event_counts[0])
            .collect();
        assert_eq!(counts, vec![1, 2, 3, 1]);
    }
}
