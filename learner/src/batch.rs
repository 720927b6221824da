//! Joins chunks into one time-major training batch `[T, B]` (B = all their envs side
//! by side), keeping the final observations of truncated steps where V-trace can
//! find them.

use spur_core::trajectory::Chunk;

pub struct Batch {
    pub rollout_len: usize,
    /// Columns: the sum of the chunks' `num_envs`.
    pub width: usize,
    pub obs_dim: usize,
    /// `(T + 1) * B * obs_dim`.
    pub observations: Vec<f32>,
    /// `K * obs_dim`: final observations of truncated steps, in batch (t, b) order.
    pub final_observations: Vec<f32>,
    /// `T * B` each.
    pub actions: Vec<i64>,
    pub behaviour_log_probs: Vec<f32>,
    pub rewards: Vec<f32>,
    pub terminated: Vec<u8>,
    pub truncated: Vec<u8>,
    /// For each truncated step (t, b), the row of its final observation; else 0.
    pub final_row: Vec<usize>,
    /// `T * B` event texts and their per-episode counts, or empty when no chunk
    /// carries text.
    pub event_texts: Vec<String>,
    pub event_counts: Vec<u32>,
    /// `T * B` expert actions of patched steps (-1 elsewhere), or empty when no
    /// chunk carries any.
    pub expert_actions: Vec<i64>,
    /// Floats of recurrent state per column (0: feedforward).
    pub state_size: usize,
    /// `B * state_size`: each column's core state before its first step.
    pub initial_states: Vec<f32>,
    /// `(T + 1) * B` values of the observation rows under the acting policies, or
    /// empty unless every chunk carries them (`learner.actor_estimates`).
    pub behaviour_values: Vec<f32>,
}

impl Batch {
    /// All chunks must share `rollout_len` and `obs_dim` (the learner checks both on
    /// arrival).
    pub fn from_chunks(chunks: &[Chunk]) -> Self {
        let first = chunks.first().expect("a batch needs at least one chunk");
        let (t_len, d) = (first.rollout_len, first.obs_dim);
        let width: usize = chunks.iter().map(|c| c.num_envs).sum();
        let n = t_len * width;
        let mut b = Batch {
            rollout_len: t_len,
            width,
            obs_dim: d,
            observations: Vec::with_capacity((t_len + 1) * width * d),
            final_observations: Vec::new(),
            actions: Vec::with_capacity(n),
            behaviour_log_probs: Vec::with_capacity(n),
            rewards: Vec::with_capacity(n),
            terminated: Vec::with_capacity(n),
            truncated: Vec::with_capacity(n),
            final_row: Vec::with_capacity(n),
            event_texts: Vec::new(),
            event_counts: Vec::new(),
            expert_actions: Vec::new(),
            state_size: first.state_size,
            initial_states: chunks
                .iter()
                .flat_map(|c| c.initial_state.iter().copied())
                .collect(),
            behaviour_values: Vec::new(),
        };
        let has_values = chunks.iter().all(|c| !c.behaviour_values.is_empty());
        let has_experts = chunks.iter().any(|c| !c.expert_actions.is_empty());
        let has_text = chunks.iter().any(|c| !c.event_texts.is_empty());
        let mut cursors = vec![0usize; chunks.len()];
        for t in 0..=t_len {
            for c in chunks {
                let row = t * c.num_envs * d;
                b.observations
                    .extend_from_slice(&c.observations[row..row + c.num_envs * d]);
                if has_values {
                    b.behaviour_values
                        .extend_from_slice(&c.behaviour_values[t * c.num_envs..][..c.num_envs]);
                }
            }
            if t == t_len {
                break;
            }
            for (ci, c) in chunks.iter().enumerate() {
                let r = t * c.num_envs..(t + 1) * c.num_envs;
                b.actions.extend_from_slice(&c.actions[r.clone()]);
                b.behaviour_log_probs
                    .extend_from_slice(&c.behaviour_log_probs[r.clone()]);
                b.rewards.extend_from_slice(&c.rewards[r.clone()]);
                b.terminated.extend_from_slice(&c.terminated[r.clone()]);
                b.truncated.extend_from_slice(&c.truncated[r.clone()]);
                if has_experts {
                    if c.expert_actions.is_empty() {
                        b.expert_actions.extend(r.clone().map(|_| -1));
                    } else {
                        b.expert_actions
                            .extend_from_slice(&c.expert_actions[r.clone()]);
                    }
                }
                if has_text {
                    if c.event_texts.is_empty() {
                        b.event_texts.extend(r.clone().map(|_| String::new()));
                        b.event_counts.extend(r.clone().map(|_| 0));
                    } else {
                        b.event_texts.extend_from_slice(&c.event_texts[r.clone()]);
                        b.event_counts.extend_from_slice(&c.event_counts[r.clone()]);
                    }
                }
                for &tr in &c.truncated[r] {
                    if tr == 1 {
                        let k = cursors[ci];
                        cursors[ci] += 1;
                        b.final_row.push(b.final_observations.len() / d);
                        b.final_observations
                            .extend_from_slice(&c.final_observations[k * d..(k + 1) * d]);
                    } else {
                        b.final_row.push(0);
                    }
                }
            }
        }
        b
    }

    pub fn len(&self) -> usize {
        self.rollout_len * self.width
    }

    /// Number of truncated steps.
    pub fn truncated_count(&self) -> usize {
        self.final_observations.len() / self.obs_dim
    }

    /// Next-state values for V-trace from the values of all `T + 1` observation rows
    /// (`values_obs`) and of the final observations (`values_final`).
    pub fn next_values(&self, values_obs: &[f32], values_final: &[f32]) -> Vec<f32> {
        (0..self.len())
            .map(|i| {
                if self.truncated[i] == 1 {
                    values_final[self.final_row[i]]
                } else {
                    values_obs[i + self.width]
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_proto::v1::EpisodeSummary;

    fn chunk(n: usize, base: f32, truncated: Vec<u8>) -> Chunk {
        let (t, d) = (2, 1);
        let k = truncated.iter().filter(|&&x| x == 1).count();
        Chunk {
            actor_id: "a".into(),
            policy_version: 1,
            rollout_len: t,
            num_envs: n,
            obs_dim: d,
            observations: (0..(t + 1) * n).map(|i| base + i as f32).collect(),
            actions: vec![0; t * n],
            behaviour_log_probs: vec![-0.5; t * n],
            rewards: (0..t * n).map(|i| base + i as f32).collect(),
            terminated: vec![0; t * n],
            truncated,
            final_observations: (0..k).map(|i| base + 100.0 + i as f32).collect(),
            event_texts: vec![],
            env_ids: (0..n as u32).collect(),
            episode_ids: vec![0; t * n],
            step_indices: vec![0; t * n],
            finished_episodes: Vec::<EpisodeSummary>::new(),
            event_counts: vec![],
            group_ids: vec![],
            group_size: 0,
            expert_actions: vec![],
            learner_incarnation: 1,
            state_size: 0,
            initial_state: vec![],
            behaviour_values: vec![],
        }
    }

    #[test]
    fn interleaves_columns_per_time_step() {
        let a = chunk(1, 0.0, vec![1, 0]);
        let b = chunk(2, 10.0, vec![0, 1, 1, 0]);
        let batch = Batch::from_chunks(&[a, b]);
        assert_eq!(batch.width, 3);
        assert_eq!(
            batch.observations,
            vec![0.0, 10.0, 11.0, 1.0, 12.0, 13.0, 2.0, 14.0, 15.0]
        );
        assert_eq!(batch.rewards, vec![0.0, 10.0, 11.0, 1.0, 12.0, 13.0]);
        assert_eq!(batch.truncated, vec![1, 0, 1, 0, 1, 0]);
        assert_eq!(batch.final_observations, vec![100.0, 110.0, 111.0]);
        // values: obs value = obs itself, final value = final obs itself
        let nv = batch.next_values(&batch.observations, &batch.final_observations);
        assert_eq!(nv, vec![100.0, 12.0, 110.0, 2.0, 111.0, 15.0]);
        assert!(batch.behaviour_values.is_empty());
    }

    #[test]
    fn actors_values_interleave_like_observations_and_need_every_chunk() {
        let (mut a, mut b) = (chunk(1, 0.0, vec![0, 0]), chunk(2, 10.0, vec![0; 4]));
        a.behaviour_values = a.observations.clone();
        b.behaviour_values = b.observations.clone();
        let batch = Batch::from_chunks(&[a.clone(), b]);
        assert_eq!(batch.behaviour_values, batch.observations);
        // One chunk without values: the batch has none (the learner checks on arrival).
        let batch = Batch::from_chunks(&[a, chunk(2, 10.0, vec![0; 4])]);
        assert!(batch.behaviour_values.is_empty());
    }
}
