//! The rollout thread: steps `num_envs` environments in lock-step with one batched
//! `no_grad` forward pass per step, cuts `rollout_len` steps into a chunk and hands it
//! to the push task. New weights are swapped in between steps, never waited for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::env::{make_batch, VecEnv};
use spur_core::model::ActorCritic;
use spur_core::trajectory::Chunk;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::error::ActorError;
use crate::texts::TextSink;
use crate::weights::WeightsUpdate;

pub struct Rollout {
    pub config: Config,
    pub actor_id: String,
    /// Seeds this actor's environments apart from other actors'.
    pub seed: u64,
    pub weights: watch::Receiver<Option<Arc<WeightsUpdate>>>,
    pub chunks: mpsc::Sender<Chunk>,
    pub stop: Arc<AtomicBool>,
    pub rt: Handle,
    /// Where new event texts go, with intrinsic rewards on.
    pub texts: Option<TextSink>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RolloutStats {
    pub env_steps: u64,
    pub chunks: u64,
    pub weight_swaps: u64,
}

impl Rollout {
    pub fn run(mut self) -> Result<RolloutStats, ActorError> {
        tch::set_num_threads(self.config.run.torch_threads as i32);
        let n = self.config.env.num_envs as usize;
        let t_len = self.config.actor.rollout_len as usize;
        let group_size = self.config.actor.group_size as usize;
        let batch = make_batch(&self.config.env, n)?;
        let mut venv = VecEnv::from_batch(batch, self.seed, group_size)?;
        let grouped = group_size > 1;
        let patched_env = self.config.env.kind == spur_core::config::EnvKind::Replay;
        let spec = venv.spec().clone();
        let d = spec.obs_dim;
        // New event texts for the reward service, with the memory of texts sent.
        let mut texts = match self.texts.take() {
            Some(sink) if spec.has_text => Some(sink.start(&self.rt, self.actor_id.clone())),
            _ => None,
        };
        let device = resolve_device(&self.config.model.device);
        let mut model = ActorCritic::for_spec(&spec, &self.config.model, device)?;
        let mut stats = RolloutStats::default();

        // Act only with the learner's weights: wait for the first version.
        let mut version = loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(stats);
            }
            if let Some(v) = self.try_swap(&mut model, true) {
                break v;
            }
            let weights = &mut self.weights;
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(100), weights.changed()).await
            });
        };
        info!(actor_id = self.actor_id, version, num_envs = n, "acting");

        let env_ids: Vec<u32> = (0..n as u32).collect();
        while !self.stop.load(Ordering::Acquire) {
            let chunk_version = version;
            let mut c = Chunk {
                actor_id: self.actor_id.clone(),
                policy_version: chunk_version,
                rollout_len: t_len,
                num_envs: n,
                obs_dim: d,
                observations: Vec::with_capacity((t_len + 1) * n * d),
                actions: Vec::with_capacity(t_len * n),
                behaviour_log_probs: Vec::with_capacity(t_len * n),
                rewards: Vec::with_capacity(t_len * n),
                terminated: Vec::with_capacity(t_len * n),
                truncated: Vec::with_capacity(t_len * n),
                final_observations: Vec::new(),
                event_texts: Vec::with_capacity(if spec.has_text { t_len * n } else { 0 }),
                env_ids: env_ids.clone(),
                episode_ids: Vec::with_capacity(t_len * n),
                step_indices: Vec::with_capacity(t_len * n),
                finished_episodes: Vec::new(),
                event_counts: Vec::with_capacity(if spec.has_text { t_len * n } else { 0 }),
                group_ids: Vec::with_capacity(if grouped { t_len * n } else { 0 }),
                group_size: if grouped { group_size as u32 } else { 0 },
                expert_actions: Vec::with_capacity(if patched_env { t_len * n } else { 0 }),
            };
            for _ in 0..t_len {
                if let Some(v) = self.try_swap(&mut model, false) {
                    version = v;
                    stats.weight_swaps += 1;
                }
                let obs = venv.observations();
                let (actions, log_probs) = model.act(obs, false);
                c.observations.extend_from_slice(obs);
                c.episode_ids.extend_from_slice(venv.episode_ids());
                c.step_indices.extend_from_slice(venv.step_indices());
                if grouped {
                    c.group_ids.extend_from_slice(venv.group_ids());
                }
                let out = venv.step(&actions)?;
                c.actions.extend_from_slice(&actions);
                c.behaviour_log_probs.extend_from_slice(&log_probs);
                c.rewards.extend_from_slice(&out.rewards);
                if patched_env {
                    c.expert_actions.extend_from_slice(&out.expert_actions);
                }
                c.terminated.extend_from_slice(&out.terminated);
                c.truncated.extend_from_slice(&out.truncated);
                c.final_observations
                    .extend_from_slice(&out.final_observations);
                if spec.has_text {
                    c.event_texts.extend(out.texts.iter().cloned());
                    c.event_counts.extend_from_slice(&out.event_counts);
                }
                c.finished_episodes.extend_from_slice(&out.finished);
            }
            c.observations.extend_from_slice(venv.observations());
            // A chunk that saw a weight swap is tagged with its oldest version, so the
            // learner's lag accounting errs on the safe side; the behaviour
            // log-probs are exact per step either way.
            if let Some((tx, sent)) = texts.as_mut() {
                let new = sent.new_texts(&c.event_texts);
                if !new.is_empty() {
                    // Never wait for the reward service: if it is behind, send later.
                    if let Err(e) = tx.try_send(new) {
                        let (mpsc::error::TrySendError::Full(t)
                        | mpsc::error::TrySendError::Closed(t)) = e;
                        sent.unmark(&t);
                    }
                }
            }
            stats.env_steps += (t_len * n) as u64;
            stats.chunks += 1;
            metrics::counter!("spur_actor_env_steps_total").increment((t_len * n) as u64);
            metrics::counter!("spur_actor_chunks_total").increment(1);
            metrics::gauge!("spur_actor_policy_version").set(chunk_version as f64);
            if self.chunks.blocking_send(c).is_err() {
                break; // the push task is gone
            }
        }
        Ok(stats)
    }

    /// Loads the newest weights if they changed (or whatever is there, with `force`);
    /// returns their version.
    fn try_swap(&mut self, model: &mut ActorCritic, force: bool) -> Option<u64> {
        if !force && !self.weights.has_changed().unwrap_or(false) {
            return None;
        }
        let update = self.weights.borrow_and_update().clone()?;
        match model.load_safetensors(&update.bytes) {
            Ok(_) => Some(update.version),
            Err(e) => {
                warn!(actor_id = self.actor_id, version = update.version, error = %e, "ignoring unusable weights");
                None
            }
        }
    }
}
