//! The actor's envs as one part, or as two halves that step on threads of their own
//! (`actor.split_envs`): while one half's observations are in the policy's forward
//! pass, the other half's envs step. For bridge envs a step is mostly waiting for a
//! Python process, so this overlap keeps both the bridge and the policy busy.
//!
//! A part is driven in two moves: [`Part::start`] hands it the actions of a step, and
//! [`Part::finish`] returns that step's outcome, after which [`Part::view`] shows the
//! next observations. An inline part (no split) steps inside `finish`; a half's
//! worker thread steps as soon as `start` hands it the actions. Each half is a
//! `VecEnv` of its own (seeded apart, with its own bridges, built on its worker
//! thread, which a bridge's parent-death signal follows); their episode ids are
//! interleaved (`2 * id + half`) so that they stay distinct within the actor.

use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;

use spur_core::config::{Config, EnvConfig, EnvKind, SplitEnvs};
use spur_core::env::{EnvBatch, EnvSpec, VecEnv, VecStep};
use spur_core::EnvError;
use spur_env_bridge::{make_batch, Place, RemoteBatch};

use crate::error::ActorError;

/// Observations and episode bookkeeping of a part's envs, for the step to come.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub observations: &'a [f32],
    pub episode_ids: &'a [i64],
    pub step_indices: &'a [i64],
    pub group_ids: &'a [u64],
}

/// A half's [`View`], owned, to send across threads (episode ids interleaved).
#[derive(Debug, Default)]
struct OwnedView {
    observations: Vec<f32>,
    episode_ids: Vec<i64>,
    step_indices: Vec<i64>,
    group_ids: Vec<u64>,
}

impl OwnedView {
    fn of(venv: &VecEnv, half: usize) -> Self {
        OwnedView {
            observations: venv.observations().to_vec(),
            episode_ids: venv
                .episode_ids()
                .iter()
                .map(|&e| 2 * e + half as i64)
                .collect(),
            step_indices: venv.step_indices().to_vec(),
            group_ids: venv.group_ids().to_vec(),
        }
    }
}

/// A copy of one step's outcome, to send across threads.
fn copy_step(s: &VecStep) -> VecStep {
    VecStep {
        rewards: s.rewards.clone(),
        terminated: s.terminated.clone(),
        truncated: s.truncated.clone(),
        texts: s.texts.clone(),
        event_counts: s.event_counts.clone(),
        final_observations: s.final_observations.clone(),
        expert_actions: s.expert_actions.clone(),
        finished: s.finished.clone(),
    }
}

/// What a worker thread sends back: the step's outcome and the next view.
type Stepped = Result<(VecStep, OwnedView), EnvError>;

/// A half of the envs on a thread of its own.
struct Worker {
    actions: Option<mpsc::Sender<Vec<i64>>>,
    stepped: mpsc::Receiver<Stepped>,
    thread: Option<JoinHandle<()>>,
    view: OwnedView,
    out: VecStep,
    pending: bool,
}

impl Worker {
    /// Builds `config`'s envs on a new thread; returns once they are reset.
    fn spawn(
        config: EnvConfig,
        seed: u64,
        group_size: usize,
        half: usize,
        all_servers: usize,
    ) -> Result<(Self, EnvSpec), ActorError> {
        let (actions_tx, actions_rx) = mpsc::channel::<Vec<i64>>();
        let (stepped_tx, stepped_rx) = mpsc::channel::<Stepped>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(EnvSpec, OwnedView), EnvError>>();
        let thread = std::thread::Builder::new()
            .name(format!("spur-envs-{half}"))
            .spawn(move || {
                let built = half_batch(&config, half, all_servers)
                    .and_then(|b| VecEnv::from_batch(b, seed, group_size));
                let mut venv = match built {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((venv.spec().clone(), OwnedView::of(&venv, half))));
                // Ends when the part is dropped (or the rollout thread is gone).
                while let Ok(actions) = actions_rx.recv() {
                    let r = venv
                        .step(&actions)
                        .map(copy_step)
                        .map(|out| (out, OwnedView::of(&venv, half)));
                    if stepped_tx.send(r).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| ActorError::Rollout(format!("cannot start an env thread: {e}")))?;
        let (spec, view) = ready_rx
            .recv()
            .map_err(|_| ActorError::Rollout("an env thread panicked while starting".into()))??;
        Ok((
            Worker {
                actions: Some(actions_tx),
                stepped: stepped_rx,
                thread: Some(thread),
                view,
                out: VecStep::default(),
                pending: false,
            },
            spec,
        ))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the action channel ends the thread, which drops (and stops) its envs.
        self.actions = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Stepper {
    /// All envs, stepped on the caller's thread.
    Inline {
        venv: Box<VecEnv>,
        actions: Option<Vec<i64>>,
    },
    Worker(Box<Worker>),
}

/// Some of the actor's envs: `envs` are their indices among all of them.
pub struct Part {
    pub envs: Range<usize>,
    stepper: Stepper,
}

impl Part {
    /// Starts a step with one action per env of the part.
    pub fn start(&mut self, actions: Vec<i64>) -> Result<(), ActorError> {
        match &mut self.stepper {
            Stepper::Inline { actions: a, .. } => *a = Some(actions),
            Stepper::Worker(w) => {
                w.actions
                    .as_ref()
                    .expect("the sender lives until drop")
                    .send(actions)
                    .map_err(|_| ActorError::Rollout("an env thread ended".into()))?;
                w.pending = true;
            }
        }
        Ok(())
    }

    /// The outcome of the step started last, if one is not finished yet; afterwards
    /// [`view`](Self::view) holds the next observations.
    pub fn finish(&mut self) -> Result<Option<&VecStep>, ActorError> {
        match &mut self.stepper {
            Stepper::Inline { venv, actions } => match actions.take() {
                Some(a) => Ok(Some(venv.step(&a)?)),
                None => Ok(None),
            },
            Stepper::Worker(w) => {
                if !w.pending {
                    return Ok(None);
                }
                w.pending = false;
                let (out, view) = w
                    .stepped
                    .recv()
                    .map_err(|_| ActorError::Rollout("an env thread panicked".into()))??;
                w.out = out;
                w.view = view;
                Ok(Some(&w.out))
            }
        }
    }

    pub fn view(&self) -> View<'_> {
        match &self.stepper {
            Stepper::Inline { venv, .. } => View {
                observations: venv.observations(),
                episode_ids: venv.episode_ids(),
                step_indices: venv.step_indices(),
                group_ids: venv.group_ids(),
            },
            Stepper::Worker(w) => View {
                observations: &w.view.observations,
                episode_ids: &w.view.episode_ids,
                step_indices: &w.view.step_indices,
                group_ids: &w.view.group_ids,
            },
        }
    }
}

/// Whether `config`'s actor steps its envs in two halves.
pub fn split(config: &Config) -> bool {
    let (env, n, g) = (&config.env, config.env.num_envs, config.actor.group_size);
    let halves_fit = n >= 2 && n.is_multiple_of(2) && (n / 2).is_multiple_of(g);
    let servers_fit = if env.remote.is_empty() {
        (n / 2).is_multiple_of(half_servers(env))
    } else {
        env.remote.len().is_multiple_of(2)
    };
    match config.actor.split_envs {
        SplitEnvs::Off => false,
        SplitEnvs::On => true,
        SplitEnvs::Auto => env.kind == EnvKind::Gym && halves_fit && servers_fit,
    }
}

/// Bridges each half starts for itself: half of `env.servers`, at least one.
fn half_servers(env: &EnvConfig) -> u32 {
    (env.servers / 2).max(1)
}

/// The env config of half `h` (0 or 1) of `config`'s envs.
fn half_config(config: &EnvConfig, h: usize) -> Result<EnvConfig, ActorError> {
    let mut c = config.clone();
    c.num_envs = config.num_envs / 2;
    if config.remote.is_empty() {
        c.servers = half_servers(config);
    } else {
        if !config.remote.len().is_multiple_of(2) {
            return Err(ActorError::Rollout(format!(
                "actor.split_envs = on needs an even number of env.remote addresses, not {}",
                config.remote.len()
            )));
        }
        let k = config.remote.len() / 2;
        c.remote = config.remote[h * k..(h + 1) * k].to_vec();
    }
    Ok(c)
}

/// The envs of half `h` (whose config is `config`); bridge envs are named in
/// messages by their place among both halves' `all_servers` servers.
fn half_batch(
    config: &EnvConfig,
    h: usize,
    all_servers: usize,
) -> Result<Box<dyn EnvBatch>, EnvError> {
    let n = config.num_envs as usize;
    if config.kind != EnvKind::Gym {
        return make_batch(config, n);
    }
    let servers = servers_of(config);
    let place = Place {
        first_server: h * servers,
        all_servers,
        first_env: h * n,
    };
    Ok(Box::new(RemoteBatch::connect_at(config, n, Some(place))?))
}

/// Env servers of a batch built from `config`.
fn servers_of(config: &EnvConfig) -> usize {
    if config.remote.is_empty() {
        config.servers.max(1) as usize
    } else {
        config.remote.len()
    }
}

/// A seed for half `h`, apart from the other half's.
fn half_seed(seed: u64, h: usize) -> u64 {
    seed ^ (h as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The actor's envs, as `config` says: one inline part, or two halves on threads.
pub fn build(
    config: &Config,
    seed: u64,
    group_size: usize,
) -> Result<(Vec<Part>, EnvSpec), ActorError> {
    let n = config.env.num_envs as usize;
    if !split(config) {
        let venv = VecEnv::from_batch(make_batch(&config.env, n)?, seed, group_size)?;
        let spec = venv.spec().clone();
        let stepper = Stepper::Inline {
            venv: Box::new(venv),
            actions: None,
        };
        return Ok((
            vec![Part {
                envs: 0..n,
                stepper,
            }],
            spec,
        ));
    }
    let mut parts = Vec::with_capacity(2);
    let mut spec = None;
    for h in 0..2 {
        let c = half_config(&config.env, h)?;
        let all_servers = 2 * servers_of(&c);
        let (w, s) = Worker::spawn(c, half_seed(seed, h), group_size, h, all_servers)?;
        spec = Some(s);
        parts.push(Part {
            envs: h * n / 2..(h + 1) * n / 2,
            stepper: Stepper::Worker(Box::new(w)),
        });
    }
    Ok((parts, spec.expect("two halves were built")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cartpole(split: &str) -> Config {
        Config::from_toml_str(&format!(
            "[env]\nkind = \"cartpole\"\nnum_envs = 4\n[actor]\nsplit_envs = \"{split}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn halves_step_apart_with_distinct_episode_ids() {
        let (mut parts, spec) = build(&cartpole("on"), 7, 1).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].envs.clone(), parts[1].envs.clone()), (0..2, 2..4));
        assert_eq!(parts[0].view().episode_ids, &[0, 2]);
        assert_eq!(parts[1].view().episode_ids, &[1, 3]);
        // Seeded apart: the halves start from different states.
        assert_ne!(parts[0].view().observations, parts[1].view().observations);
        let mut seen = std::collections::HashSet::new();
        let mut ended = 0;
        for _ in 0..200 {
            for p in parts.iter_mut() {
                assert!(p.finish().unwrap().is_none(), "nothing in flight");
                p.start(vec![0, 0]).unwrap();
            }
            for (h, p) in parts.iter_mut().enumerate() {
                let out = p.finish().unwrap().expect("the step started above");
                assert_eq!(out.rewards.len(), 2);
                ended += out.finished.len();
                let v = p.view();
                assert_eq!(v.observations.len(), 2 * spec.obs_dim);
                for &e in v.episode_ids {
                    assert_eq!(e % 2, h as i64, "half {h} holds episode {e}");
                    seen.insert(e);
                }
            }
        }
        // Always pushing left ends CartPole's episodes within a few dozen steps.
        assert!(ended > 8, "{ended} episodes ended");
        assert_eq!(seen.len(), ended + 4, "every episode has its own id");
    }

    #[test]
    fn built_in_envs_stay_in_one_part_unless_asked() {
        assert!(!split(&cartpole("auto")));
        let (parts, _) = build(&cartpole("off"), 7, 1).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].envs, 0..4);
        assert!(split(&cartpole("on")));
    }
}
