//! Grouped rollouts for UI-S1's advantages: chunks are cut back into episodes (per
//! actor and env, across chunk boundaries), episodes are collected by group, and a
//! group is ready once all `group_size` of its episodes have ended. Memory is
//! bounded: an episode longer than the limit, an episode with missing steps, and the
//! oldest open groups beyond `max_open_groups` are given up and counted.

use std::collections::{HashMap, VecDeque};

use spur_core::trajectory::Chunk;

use crate::batch::Batch;

/// One complete episode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Episode {
    /// `L * obs_dim`: the observation before each step.
    pub observations: Vec<f32>,
    pub actions: Vec<i64>,
    pub behaviour_log_probs: Vec<f32>,
    pub rewards: Vec<f32>,
    /// `L` texts and counts, or empty without text.
    pub event_texts: Vec<String>,
    pub event_counts: Vec<u32>,
    /// `L` expert actions of patched steps (-1 elsewhere), or empty.
    pub expert_actions: Vec<i64>,
    /// Ended in a terminal state; otherwise truncated, with this final observation.
    pub terminated: bool,
    pub final_observation: Vec<f32>,
}

impl Episode {
    pub fn len(&self) -> usize {
        self.actions.len()
    }
}

struct Partial {
    episode_id: i64,
    group: u64,
    episode: Episode,
}

/// Episodes of one group, ready for training together.
pub type Group = Vec<Episode>;

pub struct Assembler {
    group_size: usize,
    max_episode_steps: usize,
    max_open_groups: usize,
    partial: HashMap<(String, u32), Partial>,
    open: HashMap<(String, u64), Group>,
    /// Open groups, oldest first, for eviction.
    order: VecDeque<(String, u64)>,
    ready: Vec<Group>,
    ready_steps: usize,
    /// Groups dropped before they were complete.
    pub given_up: u64,
}

impl Assembler {
    pub fn new(group_size: usize, max_episode_steps: usize, max_open_groups: usize) -> Self {
        Self {
            group_size,
            max_episode_steps,
            max_open_groups,
            partial: HashMap::new(),
            open: HashMap::new(),
            order: VecDeque::new(),
            ready: Vec::new(),
            ready_steps: 0,
            given_up: 0,
        }
    }

    /// Steps in complete groups waiting to be trained on.
    pub fn ready_steps(&self) -> usize {
        self.ready_steps
    }

    /// Takes every complete group.
    pub fn take_ready(&mut self) -> Vec<Group> {
        self.ready_steps = 0;
        std::mem::take(&mut self.ready)
    }

    fn give_up(&mut self, actor: &str, group: u64) {
        let key = (actor.to_string(), group);
        self.open.remove(&key);
        self.order.retain(|k| k != &key);
        self.given_up += 1;
    }

    /// Adds a grouped chunk's steps. Ungrouped chunks are ignored.
    pub fn push(&mut self, c: &Chunk) {
        if c.group_ids.is_empty() {
            return;
        }
        let (t_len, n, d) = (c.rollout_len, c.num_envs, c.obs_dim);
        let has_text = !c.event_texts.is_empty();
        // Row of each truncated step's final observation, in (t, n) order.
        let mut finals = 0usize;
        let mut final_row = vec![usize::MAX; t_len * n];
        for (i, &tr) in c.truncated.iter().enumerate() {
            if tr == 1 {
                final_row[i] = finals;
                finals += 1;
            }
        }
        for col in 0..n {
            let key = (c.actor_id.clone(), c.env_ids[col]);
            for t in 0..t_len {
                let i = t * n + col;
                let (episode_id, group) = (c.episode_ids[i], c.group_ids[i]);
                let continues = self
                    .partial
                    .get(&key)
                    .is_some_and(|p| p.episode_id == episode_id);
                if !continues {
                    if let Some(p) = self.partial.remove(&key) {
                        // Steps went missing (a lost chunk): its group cannot finish.
                        self.give_up(&c.actor_id, p.group);
                    }
                    if c.step_indices[i] != 0 {
                        continue; // joined mid-episode: wait for the next one
                    }
                    self.partial.insert(
                        key.clone(),
                        Partial {
                            episode_id,
                            group,
                            episode: Episode::default(),
                        },
                    );
                }
                let p = self.partial.get_mut(&key).expect("inserted above");
                let e = &mut p.episode;
                e.observations
                    .extend_from_slice(&c.observations[i * d..(i + 1) * d]);
                e.actions.push(c.actions[i]);
                e.behaviour_log_probs.push(c.behaviour_log_probs[i]);
                e.rewards.push(c.rewards[i]);
                if has_text {
                    e.event_texts.push(c.event_texts[i].clone());
                    e.event_counts.push(c.event_counts[i]);
                }
                if !c.expert_actions.is_empty() {
                    e.expert_actions.push(c.expert_actions[i]);
                }
                let terminated = c.terminated[i] == 1;
                let truncated = c.truncated[i] == 1;
                if !terminated && !truncated {
                    if e.len() > self.max_episode_steps {
                        let g = p.group;
                        self.partial.remove(&key);
                        self.give_up(&c.actor_id, g);
                    }
                    continue;
                }
                let mut p = self.partial.remove(&key).expect("present");
                p.episode.terminated = terminated;
                p.episode.final_observation = if truncated {
                    let r = final_row[i];
                    c.final_observations[r * d..(r + 1) * d].to_vec()
                } else {
                    vec![0.0; d]
                };
                self.finish(&c.actor_id, p.group, p.episode);
            }
        }
    }

    fn finish(&mut self, actor: &str, group: u64, episode: Episode) {
        let key = (actor.to_string(), group);
        if !self.open.contains_key(&key) {
            self.order.push_back(key.clone());
        }
        let members = self.open.entry(key.clone()).or_default();
        members.push(episode);
        if members.len() >= self.group_size {
            let done = self.open.remove(&key).expect("present");
            self.order.retain(|k| k != &key);
            self.ready_steps += done.iter().map(Episode::len).sum::<usize>();
            self.ready.push(done);
        }
        while self.order.len() > self.max_open_groups {
            if let Some(oldest) = self.order.pop_front() {
                self.open.remove(&oldest);
                self.given_up += 1;
            }
        }
    }
}

/// Where each group's episodes sit in a batch built by [`episodes_batch`]: per
/// group, per episode, (first step, length).
pub type GroupLayout = Vec<Vec<(usize, usize)>>;

/// One column holding every episode back to back (`rollout_len` = all their
/// steps), which V-trace and GAE treat like any column: episode ends stop the traces.
pub fn episodes_batch(groups: &[Group], obs_dim: usize) -> (Batch, GroupLayout) {
    let total: usize = groups.iter().flatten().map(Episode::len).sum();
    let has_text = groups.iter().flatten().any(|e| !e.event_texts.is_empty());
    let mut b = Batch {
        rollout_len: total,
        width: 1,
        obs_dim,
        observations: Vec::with_capacity((total + 1) * obs_dim),
        final_observations: Vec::new(),
        actions: Vec::with_capacity(total),
        behaviour_log_probs: Vec::with_capacity(total),
        rewards: Vec::with_capacity(total),
        terminated: Vec::with_capacity(total),
        truncated: Vec::with_capacity(total),
        final_row: Vec::with_capacity(total),
        event_texts: Vec::new(),
        event_counts: Vec::new(),
        expert_actions: Vec::new(),
        // Every episode starts from a zero state (the recurrent learner runs one
        // sequence per episode).
        state_size: 0,
        initial_states: Vec::new(),
        // Grouped estimators run the learner's own critic.
        behaviour_values: Vec::new(),
    };
    let has_experts = groups
        .iter()
        .flatten()
        .any(|e| !e.expert_actions.is_empty());
    let mut layout = Vec::with_capacity(groups.len());
    for g in groups {
        let mut spans = Vec::with_capacity(g.len());
        for e in g {
            let (start, len) = (b.actions.len(), e.len());
            spans.push((start, len));
            b.observations.extend_from_slice(&e.observations);
            b.actions.extend_from_slice(&e.actions);
            b.behaviour_log_probs
                .extend_from_slice(&e.behaviour_log_probs);
            b.rewards.extend_from_slice(&e.rewards);
            if has_text {
                if e.event_texts.is_empty() {
                    b.event_texts.extend((0..len).map(|_| String::new()));
                    b.event_counts.extend((0..len).map(|_| 0));
                } else {
                    b.event_texts.extend_from_slice(&e.event_texts);
                    b.event_counts.extend_from_slice(&e.event_counts);
                }
            }
            if has_experts {
                if e.expert_actions.len() == len {
                    b.expert_actions.extend_from_slice(&e.expert_actions);
                } else {
                    b.expert_actions.extend((0..len).map(|_| -1));
                }
            }
            for s in 0..len {
                let last = s + 1 == len;
                b.terminated.push((last && e.terminated) as u8);
                let truncated = last && !e.terminated;
                b.truncated.push(truncated as u8);
                if truncated {
                    b.final_row.push(b.final_observations.len() / obs_dim);
                    b.final_observations.extend_from_slice(&e.final_observation);
                } else {
                    b.final_row.push(0);
                }
            }
        }
        layout.push(spans);
    }
    // The row after the last step; never read, since that step ends an episode.
    b.observations.extend(std::iter::repeat_n(0.0, obs_dim));
    (b, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk of `n` envs and `t` steps with obs = step index, reward = 1, the given
    /// ends, episode ids, step indices and groups.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        actor: &str,
        t: usize,
        n: usize,
        terminated: Vec<u8>,
        truncated: Vec<u8>,
        episode_ids: Vec<i64>,
        step_indices: Vec<i64>,
        group_ids: Vec<u64>,
    ) -> Chunk {
        let k = truncated.iter().filter(|&&x| x == 1).count();
        Chunk {
            actor_id: actor.into(),
            policy_version: 1,
            rollout_len: t,
            num_envs: n,
            obs_dim: 1,
            observations: (0..(t + 1) * n).map(|i| (i / n) as f32).collect(),
            actions: vec![1; t * n],
            behaviour_log_probs: vec![-0.7; t * n],
            rewards: vec![1.0; t * n],
            terminated,
            truncated,
            final_observations: (0..k).map(|i| 100.0 + i as f32).collect(),
            event_texts: vec![],
            env_ids: (0..n as u32).collect(),
            episode_ids,
            step_indices,
            finished_episodes: vec![],
            event_counts: vec![],
            group_ids,
            group_size: 2,
            expert_actions: vec![],
            learner_incarnation: 1,
            state_size: 0,
            initial_state: vec![],
            behaviour_values: vec![],
        }
    }

    #[test]
    fn episodes_cross_chunk_boundaries_and_groups_wait_for_all() {
        let mut a = Assembler::new(2, 100, 16);
        // Two envs in one group (id 7). Env 0 ends at t=2 of chunk 1 (terminated,
        // 3 steps); env 1 runs on into chunk 2 and is truncated there (5 steps).
        a.push(&chunk(
            "x",
            3,
            2,
            vec![0, 0, 0, 0, 1, 0],
            vec![0; 6],
            vec![0, 1, 0, 1, 0, 1],
            vec![0, 0, 1, 1, 2, 2],
            vec![7, 7, 7, 7, 7, 7],
        ));
        assert_eq!(a.ready_steps(), 0, "env 1 is still running");
        a.push(&chunk(
            "x",
            2,
            2,
            vec![0; 4],
            vec![0, 0, 0, 1],
            vec![2, 1, 2, 1],
            vec![0, 3, 1, 4],
            vec![8, 7, 8, 7],
        ));
        assert_eq!(a.ready_steps(), 8);
        let groups = a.take_ready();
        assert_eq!(groups.len(), 1);
        let (e0, e1) = (&groups[0][0], &groups[0][1]);
        assert!(e0.terminated && e0.len() == 3);
        assert!(!e1.terminated && e1.len() == 5);
        assert_eq!(e1.final_observation, vec![100.0]);
        assert_eq!(e1.observations, vec![0.0, 1.0, 2.0, 0.0, 1.0]);
        assert_eq!(a.given_up, 0);

        // Back to back in one column, ends marked on each episode's last step.
        let (b, layout) = episodes_batch(&groups, 1);
        assert_eq!(layout, vec![vec![(0, 3), (3, 5)]]);
        assert_eq!(b.len(), 8);
        assert_eq!(b.terminated, vec![0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(b.truncated, vec![0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(b.observations.len(), 9);
        let nv = b.next_values(&b.observations, &b.final_observations);
        assert_eq!(nv[3..], [1.0, 2.0, 0.0, 1.0, 100.0]);
    }

    #[test]
    fn missing_steps_long_episodes_and_old_groups_are_given_up() {
        // Missing steps: env 0's episode 0 jumps to episode 2 without ending.
        let mut a = Assembler::new(2, 100, 16);
        a.push(&chunk(
            "x",
            1,
            1,
            vec![0],
            vec![0],
            vec![0],
            vec![0],
            vec![5],
        ));
        a.push(&chunk(
            "x",
            1,
            1,
            vec![0],
            vec![0],
            vec![2],
            vec![0],
            vec![6],
        ));
        assert_eq!(a.given_up, 1);
        // Joining mid-episode: skipped until an episode starts.
        a.push(&chunk(
            "y",
            1,
            1,
            vec![1],
            vec![0],
            vec![9],
            vec![4],
            vec![3],
        ));
        assert_eq!(a.ready_steps(), 0);

        // Too long: the limit is 2 steps.
        let mut a = Assembler::new(2, 2, 16);
        a.push(&chunk(
            "x",
            3,
            1,
            vec![0; 3],
            vec![0; 3],
            vec![0; 3],
            vec![0, 1, 2],
            vec![1; 3],
        ));
        assert_eq!(a.given_up, 1);

        // At most one open group: a second one pushes the first out.
        let mut a = Assembler::new(2, 100, 1);
        a.push(&chunk(
            "x",
            1,
            1,
            vec![1],
            vec![0],
            vec![0],
            vec![0],
            vec![1],
        ));
        a.push(&chunk(
            "x",
            1,
            1,
            vec![1],
            vec![0],
            vec![1],
            vec![0],
            vec![2],
        ));
        assert_eq!(a.given_up, 1);
        a.push(&chunk(
            "x",
            1,
            1,
            vec![1],
            vec![0],
            vec![2],
            vec![0],
            vec![2],
        ));
        assert_eq!(a.take_ready().len(), 1, "group 2 completed");
    }
}
