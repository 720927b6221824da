//! A trajectory chunk in memory (`Chunk`): what actors build and learners train on,
//! with a strict conversion from the wire message that checks every shape, range and
//! count before anything is trusted.

use spur_proto::v1::{EpisodeSummary, TrajectoryChunk};

use crate::error::WireError;
use crate::tensor::{decode, encode};

/// Largest `num_envs` a single chunk may carry.
pub const MAX_ENVS_PER_CHUNK: usize = 1 << 16;
/// Most episodes a group may hold.
pub const MAX_GROUP_SIZE: u32 = 1024;
/// Longest event text accepted, in bytes.
pub const MAX_EVENT_TEXT_BYTES: usize = 4096;

/// `rollout_len` steps of `num_envs` environments, time-major, flat.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub actor_id: String,
    pub policy_version: u64,
    pub rollout_len: usize,
    pub num_envs: usize,
    pub obs_dim: usize,
    /// `(T + 1) * N * obs_dim`.
    pub observations: Vec<f32>,
    /// `T * N` each.
    pub actions: Vec<i64>,
    pub behaviour_log_probs: Vec<f32>,
    pub rewards: Vec<f32>,
    pub terminated: Vec<u8>,
    pub truncated: Vec<u8>,
    /// `K * obs_dim`, one row per truncated step in (t, n) order.
    pub final_observations: Vec<f32>,
    /// `T * N` texts, or empty for environments without text.
    pub event_texts: Vec<String>,
    pub env_ids: Vec<u32>,
    pub episode_ids: Vec<i64>,
    pub step_indices: Vec<i64>,
    pub finished_episodes: Vec<EpisodeSummary>,
    /// `T * N` per-episode occurrence counts of the event texts, or empty.
    pub event_counts: Vec<u32>,
    /// `T * N` group ids of the steps' episodes, or empty when not grouped.
    pub group_ids: Vec<u64>,
    /// Episodes per group (0 or 1 when not grouped).
    pub group_size: u32,
    /// `T * N` expert actions of patched steps (-1 elsewhere), or empty.
    pub expert_actions: Vec<i64>,
    /// The learner incarnation whose weights acted (0: none known).
    pub learner_incarnation: u64,
    /// Floats of recurrent state per env (0: a feedforward policy acted).
    pub state_size: usize,
    /// `N * state_size`: each env's core state before the chunk's first step.
    pub initial_state: Vec<f32>,
    /// `(T + 1) * N` values of the observation rows under the acting policy, or
    /// empty (sent only for `learner.actor_estimates`).
    pub behaviour_values: Vec<f32>,
}

/// What the receiver knows about chunks it accepts.
#[derive(Debug, Clone, Copy)]
pub struct ChunkExpectation {
    pub rollout_len: usize,
    pub obs_dim: usize,
    pub num_actions: usize,
    /// Episodes per group the receiver trains on (UI-S1 estimators); chunks must
    /// then carry group ids for groups of exactly this size. 0: any chunk.
    pub group_size: u32,
    /// Floats of recurrent state per env of the receiver's policy (0: feedforward,
    /// and chunks must carry no state).
    pub state_size: usize,
    /// The receiver trains with the actors' values (`learner.actor_estimates`):
    /// chunks must carry them. Otherwise values a chunk carries are dropped unread.
    pub values: bool,
}

impl Chunk {
    /// A chunk every check accepts, for benchmarks and tests: `rollout_len` steps of
    /// `num_envs` envs with zero observations, rewards and states, action 0 taken
    /// with probability 1/2, one episode per env and no episode end. Callers change
    /// the fields they care about.
    pub fn blank(
        actor_id: &str,
        rollout_len: usize,
        num_envs: usize,
        obs_dim: usize,
        state_size: usize,
    ) -> Self {
        let (t, n) = (rollout_len, num_envs);
        let steps = t * n;
        Chunk {
            actor_id: actor_id.into(),
            policy_version: 1,
            rollout_len: t,
            num_envs: n,
            obs_dim,
            observations: vec![0.0; (t + 1) * n * obs_dim],
            actions: vec![0; steps],
            behaviour_log_probs: vec![-std::f32::consts::LN_2; steps],
            rewards: vec![0.0; steps],
            terminated: vec![0; steps],
            truncated: vec![0; steps],
            final_observations: Vec::new(),
            event_texts: Vec::new(),
            env_ids: (0..n as u32).collect(),
            episode_ids: (0..steps as i64).map(|i| i % n as i64).collect(),
            step_indices: (0..steps as i64).map(|i| i / n as i64).collect(),
            finished_episodes: Vec::new(),
            event_counts: Vec::new(),
            group_ids: Vec::new(),
            group_size: 0,
            expert_actions: Vec::new(),
            learner_incarnation: 0,
            state_size,
            initial_state: vec![0.0; n * state_size],
            behaviour_values: Vec::new(),
        }
    }

    /// Number of environment steps in the chunk.
    pub fn steps(&self) -> usize {
        self.rollout_len * self.num_envs
    }

    pub fn to_proto(&self) -> TrajectoryChunk {
        let (t, n, d) = (self.rollout_len, self.num_envs, self.obs_dim);
        let k = self.final_observations.len() / d.max(1);
        TrajectoryChunk {
            actor_id: self.actor_id.clone(),
            policy_version: self.policy_version,
            rollout_len: t as u32,
            num_envs: n as u32,
            observations: Some(encode(&[t + 1, n, d], &self.observations)),
            actions: Some(encode(&[t, n], &self.actions)),
            behaviour_log_probs: Some(encode(&[t, n], &self.behaviour_log_probs)),
            rewards: Some(encode(&[t, n], &self.rewards)),
            terminated: Some(encode(&[t, n], &self.terminated)),
            truncated: Some(encode(&[t, n], &self.truncated)),
            final_observations: Some(encode(&[k, d], &self.final_observations)),
            event_texts: self.event_texts.clone(),
            env_ids: self.env_ids.clone(),
            episode_ids: Some(encode(&[t, n], &self.episode_ids)),
            step_indices: Some(encode(&[t, n], &self.step_indices)),
            finished_episodes: self.finished_episodes.clone(),
            event_counts: self.event_counts.clone(),
            group_ids: self.group_ids.clone(),
            group_size: self.group_size,
            expert_actions: self.expert_actions.clone(),
            learner_incarnation: self.learner_incarnation,
            initial_state: (self.state_size > 0)
                .then(|| encode(&[n, self.state_size], &self.initial_state)),
            behaviour_values: (!self.behaviour_values.is_empty())
                .then(|| encode(&[t + 1, n], &self.behaviour_values)),
        }
    }

    /// Decodes and checks a wire chunk against what the receiver expects: the
    /// header, the step columns, the texts, the groups and expert actions, the
    /// recurrent state and the episode bookkeeping, in that order.
    pub fn from_proto(msg: TrajectoryChunk, want: &ChunkExpectation) -> Result<Self, WireError> {
        let (t, n) = check_header(&msg, want)?;
        let steps = decode_steps(&msg, want, t, n)?;
        if msg.env_ids.len() != n {
            return Err(WireError::invalid(
                "env_ids",
                format!("holds {} ids for {n} environments", msg.env_ids.len()),
            ));
        }
        check_texts(&msg, t * n)?;
        check_groups(&msg, want, t * n)?;
        let initial_state = decode_state(&msg, want.state_size, n)?;
        let behaviour_values = decode_values(&msg, want.values, t, n)?;
        let episode_ids = decode::<i64>("episode_ids", msg.episode_ids.as_ref(), &[t, n])?;
        let step_indices = decode::<i64>("step_indices", msg.step_indices.as_ref(), &[t, n])?;
        if step_indices.iter().any(|&s| s < 0) {
            return Err(WireError::invalid(
                "step_indices",
                "a step index is negative",
            ));
        }
        if msg
            .finished_episodes
            .iter()
            .any(|e| !e.episode_return.is_finite())
        {
            return Err(WireError::invalid(
                "finished_episodes",
                "an episode return is not a finite number",
            ));
        }
        Ok(Self {
            actor_id: msg.actor_id,
            policy_version: msg.policy_version,
            rollout_len: t,
            num_envs: n,
            obs_dim: want.obs_dim,
            observations: steps.observations,
            actions: steps.actions,
            behaviour_log_probs: steps.behaviour_log_probs,
            rewards: steps.rewards,
            terminated: steps.terminated,
            truncated: steps.truncated,
            final_observations: steps.final_observations,
            event_texts: msg.event_texts,
            env_ids: msg.env_ids,
            episode_ids,
            step_indices,
            finished_episodes: msg.finished_episodes,
            group_size: if msg.group_ids.is_empty() {
                0
            } else {
                msg.group_size
            },
            group_ids: msg.group_ids,
            expert_actions: msg.expert_actions,
            event_counts: msg.event_counts,
            learner_incarnation: msg.learner_incarnation,
            state_size: want.state_size,
            initial_state,
            behaviour_values,
        })
    }
}

/// The decoded per-step columns of a wire chunk.
struct StepColumns {
    observations: Vec<f32>,
    actions: Vec<i64>,
    behaviour_log_probs: Vec<f32>,
    rewards: Vec<f32>,
    terminated: Vec<u8>,
    truncated: Vec<u8>,
    final_observations: Vec<f32>,
}

/// The actor id, the rollout length the receiver trains on and a sane env count;
/// returns `(rollout_len, num_envs)`.
fn check_header(
    msg: &TrajectoryChunk,
    want: &ChunkExpectation,
) -> Result<(usize, usize), WireError> {
    if msg.actor_id.is_empty() {
        return Err(WireError::Missing { field: "actor_id" });
    }
    let t = msg.rollout_len as usize;
    let n = msg.num_envs as usize;
    if t != want.rollout_len {
        return Err(WireError::invalid(
            "rollout_len",
            format!(
                "is {t}, this learner trains on chunks of {}",
                want.rollout_len
            ),
        ));
    }
    if n == 0 || n > MAX_ENVS_PER_CHUNK {
        return Err(WireError::invalid(
            "num_envs",
            format!("is {n}, must be between 1 and {MAX_ENVS_PER_CHUNK}"),
        ));
    }
    Ok((t, n))
}

/// Observations, actions (inside the action space), behaviour log-probabilities (at
/// most 0), rewards, the episode-end flags (0 or 1, never both) and one final
/// observation per truncated step.
fn decode_steps(
    msg: &TrajectoryChunk,
    want: &ChunkExpectation,
    t: usize,
    n: usize,
) -> Result<StepColumns, WireError> {
    let d = want.obs_dim;
    let observations = decode::<f32>("observations", msg.observations.as_ref(), &[t + 1, n, d])?;
    let actions = decode::<i64>("actions", msg.actions.as_ref(), &[t, n])?;
    if let Some(a) = actions
        .iter()
        .find(|&&a| a < 0 || a as usize >= want.num_actions)
    {
        return Err(WireError::invalid(
            "actions",
            format!("action {a} is outside 0..{}", want.num_actions),
        ));
    }
    let behaviour_log_probs = decode::<f32>(
        "behaviour_log_probs",
        msg.behaviour_log_probs.as_ref(),
        &[t, n],
    )?;
    if behaviour_log_probs.iter().any(|&lp| lp > 1e-4) {
        return Err(WireError::invalid(
            "behaviour_log_probs",
            "a log-probability is above 0",
        ));
    }
    let rewards = decode::<f32>("rewards", msg.rewards.as_ref(), &[t, n])?;
    let terminated = decode::<u8>("terminated", msg.terminated.as_ref(), &[t, n])?;
    let truncated = decode::<u8>("truncated", msg.truncated.as_ref(), &[t, n])?;
    for (field, flags) in [("terminated", &terminated), ("truncated", &truncated)] {
        if flags.iter().any(|&f| f > 1) {
            return Err(WireError::invalid(field, "flags must be 0 or 1"));
        }
    }
    if terminated
        .iter()
        .zip(&truncated)
        .any(|(&a, &b)| a == 1 && b == 1)
    {
        return Err(WireError::invalid(
            "truncated",
            "a step is marked both terminated and truncated",
        ));
    }
    let k = truncated.iter().filter(|&&f| f == 1).count();
    let final_observations = decode::<f32>(
        "final_observations",
        msg.final_observations.as_ref(),
        &[k, d],
    )?;
    Ok(StepColumns {
        observations,
        actions,
        behaviour_log_probs,
        rewards,
        terminated,
        truncated,
        final_observations,
    })
}

/// An optional per-step column: empty, or one entry per step of the chunk.
fn none_or_steps(
    field: &'static str,
    len: usize,
    steps: usize,
    what: &str,
) -> Result<(), WireError> {
    if len == 0 || len == steps {
        return Ok(());
    }
    Err(WireError::invalid(
        field,
        format!("holds {len} {what}, expected none or rollout_len * num_envs = {steps}"),
    ))
}

/// Event texts (none or one per step, each of bounded length) and their counts (one
/// per text, 0 exactly for an empty text).
fn check_texts(msg: &TrajectoryChunk, steps: usize) -> Result<(), WireError> {
    none_or_steps("event_texts", msg.event_texts.len(), steps, "texts")?;
    if msg
        .event_texts
        .iter()
        .any(|s| s.len() > MAX_EVENT_TEXT_BYTES)
    {
        return Err(WireError::invalid(
            "event_texts",
            format!("a text is longer than {MAX_EVENT_TEXT_BYTES} bytes"),
        ));
    }
    if msg.event_counts.len() != msg.event_texts.len() {
        return Err(WireError::invalid(
            "event_counts",
            format!(
                "holds {} counts for {} event texts",
                msg.event_counts.len(),
                msg.event_texts.len()
            ),
        ));
    }
    if let Some(i) = msg
        .event_texts
        .iter()
        .zip(&msg.event_counts)
        .position(|(text, &count)| text.is_empty() != (count == 0))
    {
        return Err(WireError::invalid(
            "event_counts",
            format!("count {i} must be 0 exactly when its text is empty"),
        ));
    }
    Ok(())
}

/// Group ids (none or one per step, with a group size the receiver trains on) and
/// expert actions (none or one per step, -1 or inside the action space).
fn check_groups(
    msg: &TrajectoryChunk,
    want: &ChunkExpectation,
    steps: usize,
) -> Result<(), WireError> {
    none_or_steps("group_ids", msg.group_ids.len(), steps, "ids")?;
    if !msg.group_ids.is_empty() && !(2..=MAX_GROUP_SIZE).contains(&msg.group_size) {
        return Err(WireError::invalid(
            "group_size",
            format!(
                "is {}, grouped chunks need 2..={MAX_GROUP_SIZE}",
                msg.group_size
            ),
        ));
    }
    none_or_steps("expert_actions", msg.expert_actions.len(), steps, "actions")?;
    if let Some(a) = msg
        .expert_actions
        .iter()
        .find(|&&a| a < -1 || a >= want.num_actions as i64)
    {
        return Err(WireError::invalid(
            "expert_actions",
            format!("action {a} is outside -1..{}", want.num_actions),
        ));
    }
    if want.group_size > 0 && (msg.group_ids.is_empty() || msg.group_size != want.group_size) {
        return Err(WireError::invalid(
            "group_size",
            format!(
                "is {} with {} group ids; this learner trains on groups of {} \
                 (set actor.group_size to match)",
                msg.group_size,
                msg.group_ids.len(),
                want.group_size
            ),
        ));
    }
    Ok(())
}

/// Each env's recurrent state before the chunk's first step: `[n, s]` when the
/// receiver's policy has `s` floats of state per env, nothing when it has none.
fn decode_state(msg: &TrajectoryChunk, s: usize, n: usize) -> Result<Vec<f32>, WireError> {
    if s == 0 {
        if msg
            .initial_state
            .as_ref()
            .is_some_and(|st| !st.data.is_empty())
        {
            return Err(WireError::invalid(
                "initial_state",
                "carries a recurrent state, but this learner's policy has no \
                 recurrent core (model.core = \"none\")",
            ));
        }
        return Ok(Vec::new());
    }
    decode::<f32>("initial_state", msg.initial_state.as_ref(), &[n, s]).map_err(|e| match e {
        WireError::Missing { field } => WireError::invalid(
            field,
            format!(
                "is missing; this learner's policy has a recurrent core \
                 with {s} floats of state per env"
            ),
        ),
        other => other,
    })
}

/// The acting policy's values, `[t + 1, n]`, when the receiver trains with them
/// (nothing otherwise: a learner that runs its own critic does not read them).
fn decode_values(
    msg: &TrajectoryChunk,
    wanted: bool,
    t: usize,
    n: usize,
) -> Result<Vec<f32>, WireError> {
    if !wanted {
        return Ok(Vec::new());
    }
    decode::<f32>(
        "behaviour_values",
        msg.behaviour_values.as_ref(),
        &[t + 1, n],
    )
    .map_err(|e| match e {
        WireError::Missing { field } => WireError::invalid(
            field,
            "is missing; this learner trains with the actors' values \
                 (learner.actor_estimates): set the key for the actors too",
        ),
        other => other,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_chunk() -> Chunk {
        let (t, n, d) = (2, 2, 3);
        Chunk {
            actor_id: "a0".into(),
            policy_version: 4,
            rollout_len: t,
            num_envs: n,
            obs_dim: d,
            observations: (0..(t + 1) * n * d).map(|x| x as f32).collect(),
            actions: vec![0, 1, 1, 0],
            behaviour_log_probs: vec![-0.5, -0.7, -0.1, -0.2],
            rewards: vec![1.0, 1.0, 0.0, 1.0],
            terminated: vec![0, 0, 1, 0],
            truncated: vec![0, 1, 0, 0],
            final_observations: vec![9.0, 9.0, 9.0],
            event_texts: vec![],
            env_ids: vec![0, 1],
            episode_ids: vec![0, 1, 0, 2],
            step_indices: vec![5, 499, 6, 0],
            finished_episodes: vec![EpisodeSummary {
                episode_return: 7.0,
                length: 7,
                success: false,
            }],
            event_counts: vec![],
            group_ids: vec![],
            group_size: 0,
            expert_actions: vec![],
            learner_incarnation: 11,
            state_size: 0,
            initial_state: vec![],
            behaviour_values: vec![],
        }
    }

    const WANT: ChunkExpectation = ChunkExpectation {
        rollout_len: 2,
        obs_dim: 3,
        num_actions: 2,
        group_size: 0,
        state_size: 0,
        values: false,
    };

    #[test]
    fn round_trips_through_the_wire() {
        let c = sample_chunk();
        assert_eq!(Chunk::from_proto(c.to_proto(), &WANT).unwrap(), c);
        let mut g = sample_chunk();
        g.group_ids = vec![7, 8, 7, 8];
        g.group_size = 2;
        g.expert_actions = vec![-1, 1, -1, -1];
        assert_eq!(Chunk::from_proto(g.to_proto(), &WANT).unwrap(), g);
        // A learner that trains on groups takes only groups of its size.
        let grouped = ChunkExpectation {
            group_size: 2,
            ..WANT
        };
        assert!(Chunk::from_proto(g.to_proto(), &grouped).is_ok());
        let err = Chunk::from_proto(sample_chunk().to_proto(), &grouped).unwrap_err();
        assert!(err.to_string().contains("actor.group_size"), "{err}");
        let four = ChunkExpectation {
            group_size: 4,
            ..WANT
        };
        assert!(Chunk::from_proto(g.to_proto(), &four).is_err());
        // A recurrent policy's chunks carry each env's state at the first step.
        let mut r = sample_chunk();
        r.state_size = 3;
        r.initial_state = vec![0.5, -0.25, 0.0, 0.0, 0.0, 0.0];
        let recurrent = ChunkExpectation {
            state_size: 3,
            ..WANT
        };
        assert_eq!(Chunk::from_proto(r.to_proto(), &recurrent).unwrap(), r);
    }

    #[test]
    fn rejects_malformed_initial_states_naming_the_field() {
        let recurrent = ChunkExpectation {
            state_size: 3,
            ..WANT
        };
        let mut r = sample_chunk();
        r.state_size = 3;
        r.initial_state = vec![0.0; 6];
        type Mangle = Box<dyn Fn(&mut TrajectoryChunk)>;
        let cases: Vec<(Mangle, &str)> = vec![
            (Box::new(|m| m.initial_state = None), "is missing"),
            (
                Box::new(|m| m.initial_state = Some(encode(&[2, 2], &[0f32; 4]))),
                "shape",
            ),
            (
                Box::new(|m| m.initial_state = Some(encode(&[3, 3], &[0f32; 9]))),
                "shape",
            ),
            (
                Box::new(|m| {
                    m.initial_state = Some(encode(&[2, 3], &[0f32, 0.0, f32::NAN, 0.0, 0.0, 0.0]))
                }),
                "finite",
            ),
            (
                Box::new(|m| m.initial_state = Some(encode(&[2, 3], &[0i64; 6]))),
                "dtype",
            ),
        ];
        for (mangle, what) in cases {
            let mut m = r.to_proto();
            mangle(&mut m);
            let err = Chunk::from_proto(m, &recurrent).unwrap_err().to_string();
            assert!(err.contains("initial_state"), "{what}: {err}");
        }
        // A feedforward learner refuses chunks that carry a state.
        let err = Chunk::from_proto(r.to_proto(), &WANT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("initial_state") && err.contains("model.core"),
            "{err}"
        );
    }

    #[test]
    fn values_travel_for_a_learner_that_wants_them_and_are_checked_by_name() {
        let valued = ChunkExpectation {
            values: true,
            ..WANT
        };
        let mut v = sample_chunk();
        v.behaviour_values = vec![0.5, -1.0, 2.0, 0.0, 3.25, 1.0];
        assert_eq!(Chunk::from_proto(v.to_proto(), &valued).unwrap(), v);
        // A learner that runs its own critic drops them unread.
        let plain = Chunk::from_proto(v.to_proto(), &WANT).unwrap();
        assert!(plain.behaviour_values.is_empty());
        assert_eq!(plain.observations, v.observations);
        type Mangle = Box<dyn Fn(&mut TrajectoryChunk)>;
        let cases: Vec<(Mangle, &str)> = vec![
            (
                Box::new(|m| m.behaviour_values = None),
                "learner.actor_estimates",
            ),
            (
                // [T, N]: the bootstrap row is missing.
                Box::new(|m| m.behaviour_values = Some(encode(&[2, 2], &[0f32; 4]))),
                "shape",
            ),
            (
                Box::new(|m| {
                    m.behaviour_values =
                        Some(encode(&[3, 2], &[0f32, 0.0, 0.0, f32::INFINITY, 0.0, 0.0]))
                }),
                "finite",
            ),
        ];
        for (mangle, what) in cases {
            let mut m = v.to_proto();
            mangle(&mut m);
            let err = Chunk::from_proto(m, &valued).unwrap_err().to_string();
            assert!(
                err.contains("behaviour_values") && err.contains(what),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn rejects_inconsistent_chunks() {
        type Mangle = Box<dyn Fn(&mut TrajectoryChunk)>;
        let cases: Vec<(Mangle, &str)> = vec![
            (Box::new(|m| m.rollout_len = 3), "rollout_len"),
            (Box::new(|m| m.actor_id.clear()), "actor_id"),
            (Box::new(|m| m.observations = None), "observations"),
            (
                Box::new(|m| m.observations.as_mut().unwrap().shape = vec![3, 2, 2]),
                "observations",
            ),
            (
                Box::new(|m| m.actions = Some(encode(&[2, 2], &[0i64, 5, 0, 0]))),
                "actions",
            ),
            (
                Box::new(|m| m.rewards = Some(encode(&[2, 2], &[0f32, f32::NAN, 0.0, 0.0]))),
                "rewards",
            ),
            (
                Box::new(|m| m.truncated = Some(encode(&[2, 2], &[0u8, 1, 1, 0]))),
                "truncated",
            ),
            (
                Box::new(|m| m.event_texts = vec!["x".into()]),
                "event_texts",
            ),
            (
                Box::new(|m| m.env_ids.pop().map(|_| ()).unwrap()),
                "env_ids",
            ),
            (Box::new(|m| m.group_ids = vec![1, 2, 3]), "group_ids"),
            (
                Box::new(|m| {
                    m.group_ids = vec![1; 4];
                    m.group_size = 0;
                }),
                "group_size",
            ),
            (
                Box::new(|m| m.expert_actions = vec![-1, 0]),
                "expert_actions",
            ),
            (
                Box::new(|m| m.expert_actions = vec![-1, 0, 2, -1]),
                "expert_actions",
            ),
        ];
        for (mangle, field) in cases {
            let mut m = sample_chunk().to_proto();
            mangle(&mut m);
            let err = Chunk::from_proto(m, &WANT).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }
}
