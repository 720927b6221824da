//! The rollout thread: steps `num_envs` environments in lock-step with one batched
//! `no_grad` forward pass per step, cuts `rollout_len` steps into a chunk and hands it
//! to the push task. New weights are swapped in between steps, never waited for.
//! Weights of a new learner incarnation (a restarted learner) end the chunk being
//! filled: it was made under a version history the new learner does not have, so it
//! is discarded and counted, and the next chunk starts with the new weights.
//! A recurrent policy keeps one core state per env, zeroed when the env's episode
//! ends, and every chunk carries each env's state at its first step.
//! The envs are one part or two halves (`parts.rs`): each step acts on one part after
//! the other, so a half's envs step while the other half is in the forward pass.

use std::sync::Arc;

use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::env::{EnvSpec, VecStep};
use spur_core::model::{reset_ended, ActorCritic};
use spur_core::trajectory::Chunk;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::ActorError;
use crate::health::Readiness;
use crate::parts::{build, Part};
use crate::texts::{SentTexts, TextSink};
use crate::weights::WeightsUpdate;

pub struct Rollout {
    pub config: Config,
    pub actor_id: String,
    /// Seeds this actor's environments apart from other actors'.
    pub seed: u64,
    pub weights: watch::Receiver<Option<Arc<WeightsUpdate>>>,
    /// Told when the policy first holds the learner's weights.
    pub readiness: Readiness,
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

/// The recurrent states of part `p`'s envs.
fn part_state<'a>(state: &'a mut [f32], p: &Part, state_size: usize) -> &'a mut [f32] {
    &mut state[p.envs.start * state_size..p.envs.end * state_size]
}

/// Appends one part's step outcome to the chunk (parts in env order, so each step's
/// row comes out in env order). The chunk's capacities say which optional columns it
/// keeps (see [`Rollout::empty_chunk`]).
fn record(c: &mut Chunk, out: &VecStep) {
    c.rewards.extend_from_slice(&out.rewards);
    if c.expert_actions.capacity() > 0 {
        c.expert_actions.extend_from_slice(&out.expert_actions);
    }
    c.terminated.extend_from_slice(&out.terminated);
    c.truncated.extend_from_slice(&out.truncated);
    c.final_observations
        .extend_from_slice(&out.final_observations);
    if c.event_texts.capacity() > 0 {
        c.event_texts.extend(out.texts.iter().cloned());
        c.event_counts.extend_from_slice(&out.event_counts);
    }
    c.finished_episodes.extend_from_slice(&out.finished);
}

/// Waits for the steps in flight of every part, resetting the recurrent state of
/// ended episodes, and records them into `chunk` (none: they are discarded).
fn finish_parts(
    parts: &mut [Part],
    state: &mut [f32],
    state_size: usize,
    mut chunk: Option<&mut Chunk>,
) -> Result<(), ActorError> {
    for p in parts.iter_mut() {
        let s = part_state(state, p, state_size);
        if let Some(out) = p.finish()? {
            if let Some(c) = chunk.as_deref_mut() {
                record(c, out);
            }
            reset_ended(s, &out.terminated, &out.truncated);
        }
    }
    Ok(())
}

/// One step of part `p` (whose recurrent states are `s`): records the outcome of
/// its step in flight, acts on its observations and starts its next step.
fn step_part(
    model: &ActorCritic,
    p: &mut Part,
    s: &mut [f32],
    c: &mut Chunk,
) -> Result<(), ActorError> {
    if let Some(out) = p.finish()? {
        record(c, out);
        reset_ended(s, &out.terminated, &out.truncated);
    }
    let v = p.view();
    let (actions, log_probs) = if c.behaviour_values.capacity() > 0 {
        let (actions, log_probs, values) = model.act_with_values(v.observations, false);
        c.behaviour_values.extend_from_slice(&values);
        (actions, log_probs)
    } else {
        model.act(v.observations, s, false)
    };
    c.observations.extend_from_slice(v.observations);
    c.episode_ids.extend_from_slice(v.episode_ids);
    c.step_indices.extend_from_slice(v.step_indices);
    if c.group_size > 0 {
        c.group_ids.extend_from_slice(v.group_ids);
    }
    c.actions.extend_from_slice(&actions);
    c.behaviour_log_probs.extend_from_slice(&log_probs);
    p.start(actions)
}

impl Rollout {
    pub fn run(mut self) -> Result<RolloutStats, ActorError> {
        tch::set_num_threads(self.config.run.torch_threads as i32);
        tch::manual_seed(self.seed as i64); // process-wide: one actor per process
        let n = self.config.env.num_envs as usize;
        let t_len = self.config.actor.rollout_len as usize;
        let group_size = self.config.actor.group_size as usize;
        let (mut parts, spec) = build(&self.config, self.seed, group_size)?;
        // New event texts for the reward service, with the memory of texts sent.
        let mut texts = match self.texts.take() {
            Some(sink) if spec.has_text => Some(sink.start(&self.rt, self.actor_id.clone())),
            _ => None,
        };
        let device = resolve_device(&self.config.model.device);
        let mut model = ActorCritic::for_spec(&spec, &self.config.model, device)?;
        if self.config.actor.fold_weights {
            model.fold_for_acting();
        }
        if self.config.learner.actor_estimates && model.is_recurrent() {
            return Err(ActorError::Rollout(
                "learner.actor_estimates needs a feedforward policy; this module keeps a \
                 recurrent state"
                    .into(),
            ));
        }
        let mut stats = RolloutStats::default();
        // One recurrent state per env (none for a feedforward policy), carried across
        // chunks and weight swaps, zeroed when an episode ends.
        let state_size = model.state_size();
        let mut state = vec![0.0f32; n * state_size];

        // Act only with the learner's weights.
        let Some(mut held) = self.first_weights(&mut model) else {
            return Ok(stats); // stopped, or the subscriber is gone
        };
        self.readiness.acting();
        info!(
            actor_id = self.actor_id,
            version = held.version,
            num_envs = n,
            parts = parts.len(),
            "acting"
        );

        'chunks: while !self.stop.is_cancelled() {
            let chunk_version = held.version;
            let mut c = self.empty_chunk(held, &spec, state_size, &state);
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
                        // The steps in flight belong to the discarded chunk.
                        finish_parts(&mut parts, &mut state, state_size, None)?;
                        continue 'chunks;
                    }
                }
                for p in parts.iter_mut() {
                    let s = part_state(&mut state, p, state_size);
                    step_part(&model, p, s, &mut c)?;
                }
            }
            // The last step's outcomes, then the observations after it (and their
            // values, to bootstrap from, when the learner takes the actors').
            finish_parts(&mut parts, &mut state, state_size, Some(&mut c))?;
            for p in &parts {
                let after = p.view().observations;
                c.observations.extend_from_slice(after);
                if c.behaviour_values.capacity() > 0 {
                    c.behaviour_values.extend(model.values_of(after));
                }
            }
            // A chunk that saw a weight swap is tagged with its oldest version, so the
            // learner's lag accounting errs on the safe side; the behaviour
            // log-probs are exact per step either way.
            if let Some((tx, sent)) = texts.as_mut() {
                send_new_texts(tx, sent, &c.event_texts);
            }
            stats.env_steps += (t_len * n) as u64;
            stats.chunks += 1;
            metrics::counter!("spur_actor_env_steps_total").increment((t_len * n) as u64);
            metrics::counter!("spur_actor_chunks_total").increment(1);
            metrics::gauge!("spur_actor_policy_version").set(chunk_version as f64);
            if !self.send(c) {
                break; // stopping, or the push task is gone
            }
        }
        Ok(stats)
    }

    /// Waits for the learner's first weights and loads them; None when the actor
    /// stops first, or the subscriber is gone.
    fn first_weights(&mut self, model: &mut ActorCritic) -> Option<Held> {
        loop {
            if let Some(h) = self.try_swap(model, true) {
                return Some(h);
            }
            let (weights, stop) = (&mut self.weights, &self.stop);
            let changed = self.rt.block_on(async {
                tokio::select! {
                    r = weights.changed() => r.is_ok(),
                    _ = stop.cancelled() => false,
                }
            });
            if !changed {
                return None;
            }
        }
    }

    /// Hands a chunk to the push task. A full send queue waits (backpressure), but
    /// never past a stop; false when stopping or the push task is gone.
    fn send(&self, c: Chunk) -> bool {
        let (chunks, stop) = (&self.chunks, &self.stop);
        self.rt.block_on(async {
            tokio::select! {
                r = chunks.send(c) => r.is_ok(),
                _ = stop.cancelled() => false,
            }
        })
    }

    /// A chunk to fill from the envs' current position: `state` is each env's
    /// recurrent state at its first step. Columns the run does not use get no
    /// capacity, which [`record`] reads.
    fn empty_chunk(&self, held: Held, spec: &EnvSpec, state_size: usize, state: &[f32]) -> Chunk {
        let (t_len, n, d) = (
            self.config.actor.rollout_len as usize,
            self.config.env.num_envs as usize,
            spec.obs_dim,
        );
        let group_size = self.config.actor.group_size;
        let grouped = group_size > 1;
        let patched_env = self.config.env.kind == spur_core::config::EnvKind::Replay;
        let texts = if spec.has_text { t_len * n } else { 0 };
        Chunk {
            actor_id: self.actor_id.clone(),
            learner_incarnation: held.incarnation,
            policy_version: held.version,
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
            event_texts: Vec::with_capacity(texts),
            env_ids: (0..n as u32).collect(),
            episode_ids: Vec::with_capacity(t_len * n),
            step_indices: Vec::with_capacity(t_len * n),
            finished_episodes: Vec::new(),
            event_counts: Vec::with_capacity(texts),
            group_ids: Vec::with_capacity(if grouped { t_len * n } else { 0 }),
            group_size: if grouped { group_size } else { 0 },
            expert_actions: Vec::with_capacity(if patched_env { t_len * n } else { 0 }),
            state_size,
            initial_state: state.to_vec(),
            behaviour_values: Vec::with_capacity(if self.config.learner.actor_estimates {
                (t_len + 1) * n
            } else {
                0
            }),
        }
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

/// Sends the texts of `texts` the reward service has not had yet, never waiting for
/// it: the channel is the bounded buffer of unsent texts, and what does not fit is
/// counted and marked unsent, so it goes again the next time it occurs.
fn send_new_texts(tx: &mpsc::Sender<Vec<String>>, sent: &mut SentTexts, texts: &[String]) {
    let new = sent.new_texts(texts);
    if new.is_empty() {
        return;
    }
    if let Err(e) = tx.try_send(new) {
        let (mpsc::error::TrySendError::Full(t) | mpsc::error::TrySendError::Closed(t)) = e;
        metrics::counter!("spur_actor_dropped_texts_total").increment(t.len() as u64);
        sent.unmark(&t);
    }
}
