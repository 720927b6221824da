//! Environments: the `Env` trait, the built-in `cartpole` and `keyroom`, and
//! `VecEnv`, which steps many of them in lock-step and resets ended episodes.

mod cartpole;
mod keyroom;
pub mod replay;
mod vec_env;

pub use cartpole::CartPole;
pub use keyroom::KeyRoom;
pub use replay::Replay;
pub use vec_env::{VecEnv, VecStep};

use crate::config::{EnvConfig, EnvKind};

/// Shapes an environment exposes to policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSpec {
    /// Length of the flat f32 observation.
    pub obs_dim: usize,
    /// Number of discrete actions.
    pub num_actions: usize,
    /// Whether steps carry event texts.
    pub has_text: bool,
    /// Episode step limit; reaching it truncates the episode.
    pub max_episode_steps: u32,
}

/// Outcome of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepOutcome {
    pub reward: f32,
    /// The episode reached a terminal state.
    pub terminated: bool,
    /// The episode hit the step limit.
    pub truncated: bool,
    /// The episode ended by reaching its goal (for success rates).
    pub success: bool,
    /// The expert's action, when the environment patched a mismatch with it (the
    /// `replay` env); the step's action and reward stay the policy's.
    pub expert_action: Option<usize>,
}

/// A single environment with a discrete action space and a flat observation.
pub trait Env: Send {
    fn spec(&self) -> EnvSpec;
    /// Starts a new episode from `seed` and writes its first observation.
    fn reset(&mut self, seed: u64, obs: &mut [f32]);
    /// Applies `action`, writes the next observation and, for text environments, the
    /// event text of this step into `text` (left empty when nothing happened).
    fn step(&mut self, action: usize, obs: &mut [f32], text: &mut String) -> StepOutcome;
    /// A text picture of the current state, for environments that have one.
    fn render_text(&self) -> Option<String> {
        None
    }
}

/// Builds one environment as the config describes.
pub fn make_env(config: &EnvConfig) -> Box<dyn Env> {
    let limit = (config.max_episode_steps > 0).then_some(config.max_episode_steps);
    match config.kind {
        EnvKind::Cartpole => Box::new(CartPole::new(limit)),
        EnvKind::Keyroom => Box::new(KeyRoom::new(config.keyroom_size as usize, limit)),
        // `Config::load` has read the file already; this fails only if it changed.
        EnvKind::Replay => Box::new(
            Replay::open(
                std::path::Path::new(&config.replay_path),
                config.replay_patches,
            )
            .unwrap_or_else(|e| panic!("env.replay_path: {e}")),
        ),
    }
}

/// The spec of the environment the config describes.
pub fn env_spec(config: &EnvConfig) -> EnvSpec {
    make_env(config).spec()
}
