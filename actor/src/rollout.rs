//! The rollout loop: steps `num_envs` environments in lock-step with one batched
//! `no_grad` forward pass per step, cuts `rollout_len` steps into a chunk and hands it
//! to the push task. New weights are swapped in between steps, never waited for.
//! Weights of a new learner incarnation (a restarted learner) end the chunk being
//! filled: it was made under a version history the new learner does not have, so it
//! is discarded and counted, and the next chunk starts with the new weights.
//! A recurrent policy keeps one core state per env, zeroed when the env's episode
//! ends, and every chunk carries each env's state at its first step.
//! The envs are one lane or two (`lanes.rs`): two lanes are two such loops on threads
//! of their own, each with half of the envs, so one lane's envs step while the
//! other's forward pass runs. Lanes start acting once every lane's envs are built.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use spur_core::config::Config;
use spur_core::device::resolve_device;
use spur_core::env::{EnvSpec, VecEnv, VecStep};
use spur_core::model::{reset_ended, ActorCritic};
use spur_core::trajectory::Chunk;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::ActorError;
use crate::health::Readiness;
use crate::lanes::{plan, Lane};
use crate::texts::{SentTexts, TextSink};
use crate::weights::WeightsUpdate;

#[derive(Clone)]
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

impl RolloutStats {
    fn add(&mut self, o: RolloutStats) {
        self.env_steps += o.env_steps;
        self.chunks += o.chunks;
        self.weight_swaps += o.weight_swaps;
        self.discarded_chunks += o.discarded_chunks;
    }
}

/// Where an actor's lanes wait for each other's envs to be built: an actor acts
/// with all of its envs or, when a lane cannot start, with none.
struct Gate {
    built: Mutex<usize>,
    all: Condvar,
    lanes: usize,
}

impl Gate {
    fn new(lanes: usize) -> Self {
        Gate {
            built: Mutex::new(0),
            all: Condvar::new(),
            lanes,
        }
    }

    /// Counts the caller's lane as built and waits for the others; false when `stop`
    /// is cancelled first (as it is when a lane ends before it gets here).
    fn pass(&self, stop: &CancellationToken) -> bool {
        let mut built = self.built.lock().expect("no lane panics holding the gate");
        *built += 1;
        self.all.notify_all();
        while *built < self.lanes {
            if stop.is_cancelled() {
                return false;
            }
            let tick = Duration::from_millis(20);
            built = self.all.wait_timeout(built, tick).expect("as above").0;
        }
        !stop.is_cancelled()
    }
}

/// The weights the policy acts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    version: u64,
    incarnation: u64,
}

/// Appends one step's outcome to the chunk. The chunk's capacities say which optional
/// columns it keeps (see [`Rollout::empty_chunk`]).
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

/// One step of `lane`'s envs (whose recurrent states are `state`): acts on their
/// observations, steps them and records both into the chunk.
fn step(
    model: &ActorCritic,
    lane: &Lane,
    venv: &mut VecEnv,
    state: &mut [f32],
    c: &mut Chunk,
) -> Result<(), ActorError> {
    let obs = venv.observations();
    let (actions, log_probs) = if c.behaviour_values.capacity() > 0 {
        let (actions, log_probs, values) = model.act_with_values(obs, false);
        c.behaviour_values.extend_from_slice(&values);
        (actions, log_probs)
    } else {
        model.act(obs, state, false)
    };
    c.observations.extend_from_slice(obs);
    c.episode_ids
        .extend(venv.episode_ids().iter().map(|&e| lane.episode_id(e)));
    c.step_indices.extend_from_slice(venv.step_indices());
    if c.group_size > 0 {
        c.group_ids.extend_from_slice(venv.group_ids());
    }
    c.actions.extend_from_slice(&actions);
    c.behaviour_log_probs.extend_from_slice(&log_probs);
    let out = venv.step(&actions)?;
    record(c, out);
    reset_ended(state, &out.terminated, &out.truncated);
    Ok(())
}

impl Rollout {
    /// Runs the actor's lanes until it stops; one lane runs on the calling thread,
    /// two on threads of their own (the first to end stops the other).
    pub fn run(self) -> Result<RolloutStats, ActorError> {
        // As the learner does: a sure policy's subnormal probabilities would slow
        // its forward passes (the lanes' threads, started below, inherit this).
        spur_core::fpu::flush_denormals();
        tch::set_num_threads(self.config.run.torch_threads as i32);
        tch::manual_seed(self.seed as i64); // process-wide: one actor per process
        let mut lanes = plan(&self.config, self.seed)?;
        if lanes.len() == 1 {
            return self.run_lane(&lanes.remove(0), &Gate::new(1));
        }
        let stop = self.stop.child_token();
        let gate = Arc::new(Gate::new(lanes.len()));
        let mut threads = Vec::with_capacity(lanes.len());
        for lane in lanes {
            let mut r = self.clone();
            r.stop = stop.clone();
            let stop_all = stop.clone().drop_guard();
            let gate = gate.clone();
            let thread = std::thread::Builder::new()
                .name(format!("spur-lane-{}", lane.index))
                .spawn(move || {
                    let _stop_all = stop_all; // ended, failed or panicked: the rest stop
                    r.run_lane(&lane, &gate)
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.cancel();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(ActorError::Rollout(format!(
                        "cannot start a rollout lane: {e}"
                    )));
                }
            }
        }
        let mut stats = RolloutStats::default();
        let mut failed = None;
        for t in threads {
            match t.join() {
                Ok(Ok(s)) => stats.add(s),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(ActorError::Rollout("a rollout lane panicked".into()));
                }
            }
        }
        failed.map_or(Ok(stats), Err)
    }

    /// One lane's loop: builds its envs and policy, waits for weights and makes
    /// chunks until the actor stops.
    fn run_lane(mut self, lane: &Lane, gate: &Gate) -> Result<RolloutStats, ActorError> {
        let t_len = self.config.actor.rollout_len as usize;
        let group_size = self.config.actor.group_size as usize;
        let n = lane.envs.len();
        let mut venv = lane.build(group_size)?;
        let mut stats = RolloutStats::default();
        if !gate.pass(&self.stop) {
            return Ok(stats); // stopped, or another lane failed to start
        }
        let spec = venv.spec().clone();
        // New event texts for the reward service, with the memory of texts sent.
        let mut texts = match self.texts.take() {
            Some(sink) if spec.has_text => Some(sink.start(&self.rt, self.actor_id.clone())),
            _ => None,
        };
        let device = resolve_device("model.device", &self.config.model.device)?;
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
            lane = lane.index,
            lanes = lane.count,
            "acting"
        );

        'chunks: while !self.stop.is_cancelled() {
            let chunk_version = held.version;
            let mut c = self.empty_chunk(held, lane, &spec, state_size, &state);
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
                step(&model, lane, &mut venv, &mut state, &mut c)?;
            }
            // The observations after the last step (and their values, to bootstrap
            // from, when the learner takes the actors').
            let after = venv.observations();
            c.observations.extend_from_slice(after);
            if c.behaviour_values.capacity() > 0 {
                c.behaviour_values.extend(model.values_of(after));
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

    /// A chunk of `lane`'s envs to fill from their current position: `state` is each env's
    /// recurrent state at its first step. Columns the run does not use get no
    /// capacity, which [`record`] reads.
    fn empty_chunk(
        &self,
        held: Held,
        lane: &Lane,
        spec: &EnvSpec,
        state_size: usize,
        state: &[f32],
    ) -> Chunk {
        let (t_len, n, d) = (
            self.config.actor.rollout_len as usize,
            lane.envs.len(),
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
            env_ids: lane.envs.clone().map(|i| i as u32).collect(),
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A rollout of cartpole's 4 envs in `split_envs` lanes, acting with fresh
    /// weights; returns its chunk receiver, stop token and thread.
    #[allow(clippy::type_complexity)]
    fn start(
        split: &str,
        rt: &tokio::runtime::Runtime,
    ) -> (
        mpsc::Receiver<Chunk>,
        CancellationToken,
        std::thread::JoinHandle<Result<RolloutStats, ActorError>>,
        watch::Sender<Option<Arc<WeightsUpdate>>>,
    ) {
        let config = Config::from_toml_str(&format!(
            "[env]\nkind = \"cartpole\"\nnum_envs = 4\n[actor]\nrollout_len = 50\n\
             split_envs = \"{split}\"\n"
        ))
        .unwrap();
        let spec = spur_env_bridge::env_spec(&config.env).unwrap();
        let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu).unwrap();
        let bytes = model.to_safetensors(1, &Default::default()).unwrap();
        let (weights_tx, weights) = watch::channel(Some(Arc::new(WeightsUpdate {
            version: 1,
            incarnation: 1,
            bytes: bytes.into(),
        })));
        let (chunks_tx, chunks) = mpsc::channel(2);
        let stop = CancellationToken::new();
        let rollout = Rollout {
            config,
            actor_id: "a".into(),
            seed: 3,
            weights,
            readiness: Default::default(),
            chunks: chunks_tx,
            stop: stop.clone(),
            rt: rt.handle().clone(),
            texts: None,
        };
        let thread = std::thread::spawn(move || rollout.run());
        (chunks, stop, thread, weights_tx)
    }

    #[test]
    fn lanes_pass_the_gate_together_or_not_at_all() {
        let gate = Arc::new(Gate::new(2));
        let stop = CancellationToken::new();
        let first = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || gate.pass(&stop))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!first.is_finished(), "one lane of two waits");
        assert!(gate.pass(&stop), "the second lane opens the gate");
        assert!(first.join().unwrap(), "and lets the first through");

        // A lane that never gets there (it failed): the others give up on the stop.
        let gate = Arc::new(Gate::new(2));
        let waiting = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || gate.pass(&stop))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiting.is_finished());
        stop.cancel();
        assert!(
            !waiting.join().unwrap(),
            "stopped before every lane was built"
        );
    }

    #[test]
    fn two_lanes_make_chunks_of_their_own_envs_with_distinct_episodes() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut chunks, stop, thread, _weights) = start("on", &rt);
        let mut lanes_seen = HashSet::new();
        let mut episodes: [HashSet<i64>; 2] = Default::default();
        for _ in 0..12 {
            let c = chunks.blocking_recv().expect("a chunk");
            assert_eq!((c.num_envs, c.rollout_len), (2, 50));
            let want = spur_core::trajectory::ChunkExpectation {
                rollout_len: 50,
                obs_dim: 4,
                num_actions: 2,
                group_size: 0,
                state_size: 0,
                values: false,
            };
            Chunk::from_proto(c.to_proto(), &want).expect("the learner takes it");
            let lane = match c.env_ids.as_slice() {
                [0, 1] => 0,
                [2, 3] => 1,
                other => panic!("env ids {other:?}"),
            };
            lanes_seen.insert(lane);
            for &e in &c.episode_ids {
                assert_eq!(e % 2, lane as i64, "lane {lane} holds episode {e}");
                episodes[lane].insert(e);
            }
        }
        assert_eq!(lanes_seen.len(), 2, "both lanes made chunks");
        // A random policy ends CartPole's episodes within a few dozen steps.
        assert!(episodes.iter().all(|e| e.len() > 4), "{episodes:?}");
        stop.cancel();
        drop(chunks);
        let stats = thread.join().unwrap().unwrap();
        assert!(stats.chunks >= 12, "{stats:?}");
        assert_eq!(stats.env_steps, stats.chunks * 100);
    }

    #[test]
    fn lanes_skip_unusable_weights_and_end_when_the_push_side_is_gone() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut chunks, _stop, thread, weights) = start("on", &rt);
        chunks.blocking_recv().expect("a chunk");
        // Weights the policy cannot load are ignored; the lanes go on.
        weights.send_replace(Some(Arc::new(WeightsUpdate {
            version: 2,
            incarnation: 1,
            bytes: vec![1, 2, 3].into(),
        })));
        chunks
            .blocking_recv()
            .expect("a chunk after unusable weights");
        // The push side is gone: each lane ends at its next chunk, and the run returns.
        drop(chunks);
        let stats = thread.join().unwrap().unwrap();
        assert!(stats.chunks >= 2, "{stats:?}");
    }
}
