//! `VecEnv`: many environments stepped in lock-step with one flat observation buffer.
//! An episode that ends is reset at once (its last observation is kept for
//! bootstrapping truncated episodes), and each new episode gets a fresh seed.
//!
//! With groups (`group_size` G > 1), envs come in blocks of G, and each block fills
//! one group at a time: the next G episodes started in the block share a task seed,
//! which is also their group id (UI-S1). Usually that is one episode per env; an env
//! whose episode ends early may run the same task again. Filling groups in start
//! order keeps a group's episodes close in time, so none of them waits long.

use std::collections::HashMap;

use spur_proto::v1::EpisodeSummary;

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
    /// [`observations`](Self::observations) is the next input for every env.
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
        for i in 0..actions.len() {
            let text = &self.out.texts[i];
            let obs = &self.obs[i * d..(i + 1) * d];
            let o = self.outcomes[i];
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
        self.start_episodes()?;
        Ok(&self.out)
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
