//! Environments: the `Env` trait, the built-in `cartpole`, `keyroom`, `memory` and
//! `replay`, the `EnvBatch` trait for envs stepped together (in process here; K at a
//! time by remote env servers in the `spur-env-bridge` crate, which restarts bridges
//! that die), and `VecEnv`, which steps a batch in lock-step and starts the next
//! episode of every env whose episode ended or was lost with its bridge.

mod cartpole;
mod keyroom;
mod memory;
pub mod replay;
mod vec_env;

pub use cartpole::CartPole;
pub use keyroom::KeyRoom;
pub use memory::Memory;
pub use replay::Replay;
pub use vec_env::{VecEnv, VecStep};

use crate::config::{EnvConfig, EnvKind};
use crate::error::EnvError;

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
    /// Named parts of the flat observation, in layout order (bridge envs; empty for
    /// the built-in ones). Architectures such as the NetHack network read them.
    pub fields: Vec<ObsField>,
}

/// One named part of a flat observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObsField {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ObsField {
    pub fn size(&self) -> usize {
        self.shape.iter().product()
    }
}

impl EnvSpec {
    /// Offset and field of the part called `name`.
    pub fn field(&self, name: &str) -> Option<(usize, &ObsField)> {
        let mut at = 0;
        for f in &self.fields {
            if f.name == name {
                return Some((at, f));
            }
            at += f.size();
        }
        None
    }
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
    /// The episode was lost with the env bridge that held it (the bridge died and was
    /// restarted): the step did not happen, the other fields are zero, the env's
    /// observation is the one before the step, and the env must be reset before it
    /// is stepped again.
    pub lost: bool,
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

/// Environments stepped together. An env whose episode ends keeps its last
/// observation until [`reset`](EnvBatch::reset) starts its next one; so does an env
/// whose episode was [`lost`](StepOutcome::lost).
pub trait EnvBatch: Send {
    fn spec(&self) -> &EnvSpec;
    fn num_envs(&self) -> usize;
    /// Starts a new episode in each env of `envs` from the matching seed, writing its
    /// first observation into that env's slot of `obs` (`num_envs * obs_dim`).
    fn reset(&mut self, envs: &[usize], seeds: &[u64], obs: &mut [f32]) -> Result<(), EnvError>;
    /// Steps every env with its action, writing next observations into `obs`, event
    /// texts into `texts` and outcomes into `outcomes` (one per env each).
    fn step(
        &mut self,
        actions: &[i64],
        obs: &mut [f32],
        texts: &mut [String],
        outcomes: &mut [StepOutcome],
    ) -> Result<(), EnvError>;
    /// A text picture of env `i`'s current state, for environments that have one.
    fn render_text(&self, _i: usize) -> Option<String> {
        None
    }
    /// Restarts (or reconnects) of env bridges tried so far.
    fn restarts(&self) -> u64 {
        0
    }
}

/// In-process environments as a batch.
pub struct LocalBatch {
    envs: Vec<Box<dyn Env>>,
    spec: EnvSpec,
}

impl LocalBatch {
    /// Wraps `envs`, which must share one spec.
    pub fn new(envs: Vec<Box<dyn Env>>) -> Self {
        assert!(!envs.is_empty(), "a batch needs at least one env");
        let spec = envs[0].spec();
        Self { envs, spec }
    }
}

impl EnvBatch for LocalBatch {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn num_envs(&self) -> usize {
        self.envs.len()
    }

    fn reset(&mut self, envs: &[usize], seeds: &[u64], obs: &mut [f32]) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        for (&i, &seed) in envs.iter().zip(seeds) {
            self.envs[i].reset(seed, &mut obs[i * d..(i + 1) * d]);
        }
        Ok(())
    }

    fn step(
        &mut self,
        actions: &[i64],
        obs: &mut [f32],
        texts: &mut [String],
        outcomes: &mut [StepOutcome],
    ) -> Result<(), EnvError> {
        let d = self.spec.obs_dim;
        for (i, env) in self.envs.iter_mut().enumerate() {
            texts[i].clear();
            outcomes[i] = env.step(
                actions[i] as usize,
                &mut obs[i * d..(i + 1) * d],
                &mut texts[i],
            );
        }
        Ok(())
    }

    fn render_text(&self, i: usize) -> Option<String> {
        self.envs[i].render_text()
    }
}

/// Builds one built-in environment as the config describes (`gym` envs live in
/// bridge processes: `spur_env_bridge::make_batch` builds batches of every kind).
pub fn make_env(config: &EnvConfig) -> Box<dyn Env> {
    let limit = (config.max_episode_steps > 0).then_some(config.max_episode_steps);
    match config.kind {
        EnvKind::Cartpole => Box::new(CartPole::new(limit)),
        EnvKind::Keyroom => Box::new(KeyRoom::new(config.keyroom_size as usize, limit)),
        EnvKind::Memory => Box::new(Memory::new(
            config.memory_cues as usize,
            config.memory_delay,
            limit,
        )),
        // `Config::load` has read the file already; this fails only if it changed.
        EnvKind::Replay => Box::new(
            Replay::open(
                std::path::Path::new(&config.replay_path),
                config.replay_patches,
            )
            .unwrap_or_else(|e| panic!("env.replay_path: {e}")),
        ),
        EnvKind::Gym => panic!("gym envs run in bridge processes: use spur_env_bridge::make_batch"),
    }
}
