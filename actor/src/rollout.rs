//! The rollout thread: steps `num_envs` environments in lock-step with one batched
//! `no_grad` forward pass per step, cuts `rollout_len` steps into a chunk and hands it
//! to the push task. New weights are swapped in between steps, never waited for.
//! Weights of a new learner incarnation (a restarted learner) end the chunk being
//! filled: it was made under a version history the new learner does not have, so it
//! is discarded and counted, and the next chunk starts with the new weights.
//! A recurrent policy keeps one core state per env, zeroed when the env's episode
//! ends, and every chunk carries each env's state at its first step.

use std::sync::Arc;

use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::env::{make_batch, VecEnv};
use spur_core::model::{reset_ended, ActorCritic};
use spur_core::trajectory::Chunk;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
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
    pub stop: CancellationToken,
    pub rt: Handle,
    /// Where new event texts go, with intrinsic rewards on.
    pub texts: Option<TextSink>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RolloutStats {
    pub env_steps: u64,
    pub chunks: u64,
    pub weight_swaps: u64,
    /// Chunks abandoned half-filled because a new learner incarnation took over.
    pub discarded_chunks: u64,
}

/// The weights the policy acts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    version: u64,
    incarnation: u64,
}

impl Rollout {
    pub fn run(mut self) -> Result<RolloutStats, ActorError> {
        tch::set_num_threads(self.config.run.torch_threads as i32);
        tch::manual_seed(self.seed as i64); // process-wide: one actor per process
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
        // One recurrent state per env (none for a feedforward policy), carried across
        // chunks and weight swaps, zeroed when an episode ends.
        let state_size = model.state_size();
        let mut state = vec![0.0f32; n * state_size];

        // Act only with the learner's weights: wait for the first version.
        let mut held = loop {
            if let Some(h) = self.try_swap(&mut model, true) {
                break h;
            }
            let (weights, stop) = (&mut self.weights, &self.stop);
            let changed = self.rt.block_on(async {
                tokio::select! {
                    r = weights.changed() => r.is_ok(),
                    _ = stop.cancelled() => false,
                }
            });
            if !changed {
                return Ok(stats); // stopped, or the subscriber is gone
            }
        };
        info!(
            actor_id = self.actor_id,
            version = held.version,
            num_envs = n,
            "acting"
        );

        let env_ids: Vec<u32> = (0..n as u32).collect();
        'chunks: while !self.stop.is_cancelled() {
            let chunk_version = held.version;
            let mut c = Chunk {
                actor_id: self.actor_id.clone(),
                learner_incarnation: held.incarnation,
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
                state_size,
                initial_state: state.clone(),
            };
            for _ in 0..t_len {
                if let Some(h) = self.try_swap(&mut model, false) {
                    let new_incarnation = h.incarnation != held.incarnation;
                    held = h;
                    stats.weight_swaps += 1;
                    if new_incarnation {
                        stats.discarded_chunks += 1;
                        metrics::counter!("spur_actor_discarded_chunks_total").increment(1);
                        info!(
                            actor_id = self.actor_id,
                            incarnation = h.incarnation,
                            version = h.version,
                            "new learner incarnation: discarding the chunk in progress"
                        );
                        continue 'chunks;
                    }
                }
                let obs = venv.observations();
                let (actions, log_probs) = model.act(obs, &mut state, false);
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
                reset_ended(&mut state, &out.terminated, &out.truncated);
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
                    // The channel is the bounded buffer of unsent texts; what does
                    // not fit is counted and marked unsent, so it goes again the next
                    // time it occurs.
                    if let Err(e) = tx.try_send(new) {
                        let (mpsc::error::TrySendError::Full(t)
                        | mpsc::error::TrySendError::Closed(t)) = e;
                        metrics::counter!("spur_actor_dropped_texts_total")
                            .increment(t.len() as u64);
                        sent.unmark(&t);
                    }
                }
            }
            stats.env_steps += (t_len * n) as u64;
            stats.chunks += 1;
            metrics::counter!("spur_actor_env_steps_total").increment((t_len * n) as u64);
            metrics::counter!("spur_actor_chunks_total").increment(1);
            metrics::gauge!("spur_actor_policy_version").set(chunk_version as f64);
            // A full send queue waits (backpressure), but never past a stop.
            let (chunks, stop) = (&self.chunks, &self.stop);
            let sent = self.rt.block_on(async {
                tokio::select! {
                    r = chunks.send(c) => r.is_ok(),
                    _ = stop.cancelled() => false,
                }
            });
            if !sent {
                break; // stopping, or the push task is gone
            }
        }
        Ok(stats)
    }

    /// Loads the newest weights if they changed (or whatever is there, with `force`);
    /// returns which they are.
    fn try_swap(&mut self, model: &mut ActorCritic, force: bool) -> Option<Held> {
        if !force && !self.weights.has_changed().unwrap_or(false) {
            return None;
        }
        let update = self.weights.borrow_and_update().clone()?;
        match model.load_safetensors(&update.bytes) {
            Ok(_) => Some(Held {
                version: update.version,
                incarnation: update.incarnation,
            }),
            Err(e) => {
                warn!(actor_id = self.actor_id, version = update.version, error = %e, "ignoring unusable weights");
                None
            }
        }
    }
}
