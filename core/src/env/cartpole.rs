//! The classic cart-pole balancing task with the standard dynamics (Barto, Sutton and
//! Anderson, 1983, as in Gymnasium's CartPole-v1): reward 1 per step, termination when
//! the pole falls past 12 degrees or the cart leaves the track, truncation at 500 steps.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Env, EnvSpec, StepOutcome};

const GRAVITY: f32 = 9.8;
const MASS_CART: f32 = 1.0;
const MASS_POLE: f32 = 0.1;
const TOTAL_MASS: f32 = MASS_CART + MASS_POLE;
const HALF_LENGTH: f32 = 0.5;
const POLE_MASS_LENGTH: f32 = MASS_POLE * HALF_LENGTH;
const FORCE: f32 = 10.0;
const TAU: f32 = 0.02;
const THETA_LIMIT: f32 = 12.0 * 2.0 * std::f32::consts::PI / 360.0;
const X_LIMIT: f32 = 2.4;

pub struct CartPole {
    state: [f32; 4],
    steps: u32,
    limit: u32,
    rng: SmallRng,
}

impl CartPole {
    pub fn new(limit: Option<u32>) -> Self {
        Self {
            state: [0.0; 4],
            steps: 0,
            limit: limit.unwrap_or(500),
            rng: SmallRng::seed_from_u64(0),
        }
    }

    /// The physical state: cart position, cart velocity, pole angle, pole angular velocity.
    pub fn state(&self) -> [f32; 4] {
        self.state
    }
}

impl Env for CartPole {
    fn spec(&self) -> EnvSpec {
        EnvSpec {
            obs_dim: 4,
            num_actions: 2,
            has_text: false,
            max_episode_steps: self.limit,
            fields: Vec::new(),
        }
    }

    fn reset(&mut self, seed: u64, obs: &mut [f32]) {
        self.rng = SmallRng::seed_from_u64(seed);
        for s in &mut self.state {
            *s = self.rng.random_range(-0.05..0.05);
        }
        self.steps = 0;
        obs.copy_from_slice(&self.state);
    }

    fn step(&mut self, action: usize, obs: &mut [f32], _text: &mut String) -> StepOutcome {
        let [x, x_dot, theta, theta_dot] = self.state;
        let force = if action == 1 { FORCE } else { -FORCE };
        let (sin, cos) = theta.sin_cos();
        let temp = (force + POLE_MASS_LENGTH * theta_dot * theta_dot * sin) / TOTAL_MASS;
        let theta_acc = (GRAVITY * sin - cos * temp)
            / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos * cos / TOTAL_MASS));
        let x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS;
        self.state = [
            x + TAU * x_dot,
            x_dot + TAU * x_acc,
            theta + TAU * theta_dot,
            theta_dot + TAU * theta_acc,
        ];
        self.steps += 1;
        obs.copy_from_slice(&self.state);
        let terminated = self.state[0].abs() > X_LIMIT || self.state[2].abs() > THETA_LIMIT;
        StepOutcome {
            reward: 1.0,
            terminated,
            truncated: !terminated && self.steps >= self.limit,
            success: !terminated && self.steps >= self.limit,
            expert_action: None,
            lost: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushing_one_way_topples_the_pole() {
        let mut env = CartPole::new(None);
        let mut obs = [0.0; 4];
        let mut text = String::new();
        env.reset(3, &mut obs);
        assert!(obs.iter().all(|x| x.abs() <= 0.05));
        let mut steps = 0;
        loop {
            steps += 1;
            let out = env.step(1, &mut obs, &mut text);
            if out.terminated {
                break;
            }
            assert!(steps < 100, "the pole must fall when always pushed right");
        }
        assert!((5..40).contains(&steps), "fell after {steps} steps");
        assert!(text.is_empty());
    }

    #[test]
    fn truncates_at_the_limit() {
        let mut env = CartPole::new(Some(3));
        let mut obs = [0.0; 4];
        env.reset(0, &mut obs);
        let mut text = String::new();
        let outs: Vec<_> = (0..3)
            .map(|i| env.step(i % 2, &mut obs, &mut text))
            .collect();
        assert!(!outs[1].truncated && outs[2].truncated && !outs[2].terminated);
    }

    #[test]
    fn same_seed_same_episode() {
        let (mut a, mut b) = (CartPole::new(None), CartPole::new(None));
        let (mut oa, mut ob) = ([0.0; 4], [0.0; 4]);
        a.reset(7, &mut oa);
        b.reset(7, &mut ob);
        assert_eq!(oa, ob);
        b.reset(8, &mut ob);
        assert_ne!(oa, ob);
    }
}
