//! A memory task for recurrent policies: the first observation shows one of `cues`
//! cues (one-hot), the next `delay` observations are blank, and the last one is a
//! query (a flag). The action taken at the query earns 1 when it names the cue, else
//! 0, and ends the episode; actions before the query do nothing. A feedforward policy
//! sees the same query observation whatever the cue was, so it cannot beat chance
//! (1 / cues); a policy that remembers the cue can reach 1.
//!
//! Observation: `cues` cue flags, then the query flag. Actions: `cues`.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Env, EnvSpec, StepOutcome};

pub struct Memory {
    cues: usize,
    delay: u32,
    /// Step limit (the episode is `delay + 2` steps unless this cuts it short).
    limit: u32,
    cue: usize,
    steps: u32,
}

impl Memory {
    /// A task with `cues` cues and `delay` blank steps; `limit` truncates episodes
    /// longer than it.
    pub fn new(cues: usize, delay: u32, limit: Option<u32>) -> Self {
        assert!(cues >= 2, "a memory task needs at least two cues");
        Self {
            cues,
            delay,
            limit: limit.unwrap_or(delay + 2),
            cue: 0,
            steps: 0,
        }
    }

    /// The cue of the current episode.
    pub fn cue(&self) -> usize {
        self.cue
    }

    /// Steps from the episode's start to its query.
    fn query_step(&self) -> u32 {
        self.delay + 1
    }

    fn observe(&self, obs: &mut [f32]) {
        obs.fill(0.0);
        if self.steps == 0 {
            obs[self.cue] = 1.0;
        } else if self.steps == self.query_step() {
            obs[self.cues] = 1.0;
        }
    }
}

impl Env for Memory {
    fn spec(&self) -> EnvSpec {
        EnvSpec {
            obs_dim: self.cues + 1,
            num_actions: self.cues,
            has_text: false,
            max_episode_steps: self.limit,
            fields: Vec::new(),
        }
    }

    fn reset(&mut self, seed: u64, obs: &mut [f32]) {
        let mut rng = SmallRng::seed_from_u64(seed);
        self.cue = rng.random_range(0..self.cues);
        self.steps = 0;
        self.observe(obs);
    }

    fn step(&mut self, action: usize, obs: &mut [f32], _text: &mut String) -> StepOutcome {
        let answered = self.steps == self.query_step();
        self.steps += 1;
        self.observe(obs);
        if answered {
            let correct = action == self.cue;
            return StepOutcome {
                reward: correct as u8 as f32,
                terminated: true,
                success: correct,
                ..Default::default()
            };
        }
        StepOutcome {
            truncated: self.steps >= self.limit,
            ..Default::default()
        }
    }

    fn render_text(&self) -> Option<String> {
        let what = if self.steps == 0 {
            format!("cue {}", self.cue)
        } else if self.steps == self.query_step() {
            "query".to_string()
        } else {
            "blank".to_string()
        };
        Some(format!("{what} (the cue was {})\n", self.cue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays one episode answering `answer` at the query; returns every observation
    /// and every outcome.
    fn play(env: &mut Memory, seed: u64, answer: usize) -> (Vec<Vec<f32>>, Vec<StepOutcome>) {
        let d = env.spec().obs_dim;
        let mut obs = vec![0.0; d];
        let mut text = String::new();
        env.reset(seed, &mut obs);
        let (mut seen, mut outs) = (vec![obs.clone()], Vec::new());
        loop {
            let out = env.step(answer, &mut obs, &mut text);
            outs.push(out);
            if out.terminated || out.truncated {
                return (seen, outs);
            }
            seen.push(obs.clone());
        }
    }

    #[test]
    fn the_cue_shows_once_and_only_the_right_answer_pays() {
        let mut env = Memory::new(3, 4, None);
        for seed in 0..20 {
            let (seen, _) = play(&mut env, seed, 0);
            let cue = env.cue();
            assert_eq!(seen.len(), 6, "cue, 4 blanks, query");
            assert_eq!(seen[0], one_hot(cue, 4));
            assert!(seen[1..5].iter().all(|o| o.iter().all(|&x| x == 0.0)));
            assert_eq!(seen[5], one_hot(3, 4), "the query flag");
            let (_, outs) = play(&mut env, seed, cue);
            assert_eq!(outs.len(), 6);
            assert!(outs[..5].iter().all(|o| o.reward == 0.0 && !o.terminated));
            assert!(outs[5].terminated && outs[5].success && outs[5].reward == 1.0);
            let (_, outs) = play(&mut env, seed, (cue + 1) % 3);
            assert!(outs[5].terminated && !outs[5].success && outs[5].reward == 0.0);
        }
    }

    fn one_hot(i: usize, n: usize) -> Vec<f32> {
        (0..n).map(|j| (i == j) as u8 as f32).collect()
    }

    #[test]
    fn same_seed_same_cue_and_every_cue_occurs() {
        let (mut a, mut b) = (Memory::new(2, 0, None), Memory::new(2, 0, None));
        let mut counts = [0; 2];
        for seed in 0..200 {
            let (mut oa, mut ob) = ([0.0; 3], [0.0; 3]);
            a.reset(seed, &mut oa);
            b.reset(seed, &mut ob);
            assert_eq!(oa, ob);
            counts[a.cue()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
    }

    #[test]
    fn a_short_limit_truncates_before_the_query() {
        let mut env = Memory::new(2, 5, Some(3));
        let (_, outs) = play(&mut env, 1, 0);
        assert_eq!(outs.len(), 3);
        assert!(outs[2].truncated && !outs[2].terminated && outs[2].reward == 0.0);
    }
}
