//! The actor's envs as one lane, or as two (`actor.split_envs`): each lane is a
//! rollout loop of its own on a thread of its own, with half of the envs (its own
//! `VecEnv`, seeded apart, with its own bridges), its own copy of the policy and its
//! own chunks. A lane steps its envs and then acts on them; with two lanes one lane's
//! forward pass runs while the other's envs step, and no step waits on a hand-over
//! between threads: for bridge envs each lane talks to its bridges itself.
//!
//! A lane's chunks carry its envs' indices among all of the actor's (`env_ids`), so the
//! learner keeps each env's episodes apart; its episode ids are interleaved
//! (`lanes * id + lane`) so that they stay distinct within the actor.

use std::ops::Range;

use spur_core::config::{Config, EnvConfig, EnvKind, SplitEnvs};
use spur_core::env::{EnvBatch, VecEnv};
use spur_env_bridge::{make_batch, Place, RemoteBatch};

use crate::error::ActorError;

/// One lane: which of the actor's envs it steps, and how.
#[derive(Debug, Clone)]
pub struct Lane {
    /// Its place among the actor's lanes, and how many there are.
    pub index: usize,
    pub count: usize,
    /// Its envs' indices among all of the actor's.
    pub envs: Range<usize>,
    /// The config of its envs (`num_envs` is the lane's).
    pub env: EnvConfig,
    /// Seeds its envs apart from the other lanes'.
    pub seed: u64,
}

impl Lane {
    /// The actor-wide id of the lane's episode `id`.
    pub fn episode_id(&self, id: i64) -> i64 {
        self.count as i64 * id + self.index as i64
    }

    /// Builds the lane's envs and starts their episodes. Bridges follow the calling
    /// thread's death (their parent-death signal), so call it on the lane's thread.
    pub fn build(&self, group_size: usize) -> Result<VecEnv, ActorError> {
        let n = self.env.num_envs as usize;
        let batch: Box<dyn EnvBatch> = if self.env.kind != EnvKind::Gym {
            make_batch(&self.env, n)?
        } else {
            // Bridges are named in messages by their place among every lane's.
            let servers = servers_of(&self.env);
            let place = Place {
                first_server: self.index * servers,
                all_servers: self.count * servers,
                first_env: self.envs.start,
            };
            Box::new(RemoteBatch::connect_at(&self.env, n, Some(place))?)
        };
        Ok(VecEnv::from_batch(batch, self.seed, group_size)?)
    }
}

/// Whether `config`'s actor steps its envs in two lanes.
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

/// The lanes of an actor whose seed is `seed`, as `config` says.
pub fn plan(config: &Config, seed: u64) -> Result<Vec<Lane>, ActorError> {
    let n = config.env.num_envs as usize;
    if !split(config) {
        return Ok(vec![Lane {
            index: 0,
            count: 1,
            envs: 0..n,
            env: config.env.clone(),
            seed,
        }]);
    }
    (0..2)
        .map(|h| {
            let env = half_config(&config.env, h)?;
            Ok(Lane {
                index: h,
                count: 2,
                envs: h * n / 2..(h + 1) * n / 2,
                env,
                seed: half_seed(seed, h),
            })
        })
        .collect()
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
    fn two_lanes_hold_half_the_envs_each_seeded_apart() {
        let lanes = plan(&cartpole("on"), 7).unwrap();
        assert_eq!(lanes.len(), 2);
        assert_eq!((lanes[0].envs.clone(), lanes[1].envs.clone()), (0..2, 2..4));
        assert_eq!((lanes[0].env.num_envs, lanes[1].env.num_envs), (2, 2));
        assert_eq!((lanes[0].episode_id(3), lanes[1].episode_id(3)), (6, 7));
        let (a, b) = (lanes[0].build(1).unwrap(), lanes[1].build(1).unwrap());
        assert_ne!(a.observations(), b.observations(), "seeded apart");
    }

    #[test]
    fn built_in_envs_stay_in_one_lane_unless_asked() {
        assert!(!split(&cartpole("auto")));
        let lanes = plan(&cartpole("off"), 7).unwrap();
        assert_eq!(lanes.len(), 1);
        assert_eq!(lanes[0].envs, 0..4);
        assert_eq!(lanes[0].episode_id(3), 3);
        assert!(split(&cartpole("on")));
    }
}
