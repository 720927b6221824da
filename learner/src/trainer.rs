//! The training thread: gathers chunks from the queue into batches (dropping those
//! older than `max_policy_lag` versions), computes V-trace targets with the current
//! critic, takes PPO-clipped Adam steps over minibatches, publishes weights, writes
//! metrics and checkpoints. A checkpoint holds what a resumed run needs to take the
//! same course: weights, Adam's moments, the counters the lr schedule and budget
//! read, and the intrinsic-reward state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spur_core::adam::Adam;
use spur_core::advantage::{gae, group_advantages, GaeInput, GroupEpisode, GroupParams};
use spur_core::checkpoint;
use spur_core::config::{AdvantageKind, Config, GroupOutcome, LearnerConfig};
use spur_core::mlp_grad;
use spur_core::model::{f32_vec, tensors_to_safetensors, ActorCritic};
use spur_core::ppo::{PpoLoss, PpoParams};
use spur_core::vtrace::{vtrace, VTraceInput, VTraceParams};
use tch::{nn, Device, Kind, Tensor};
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::batch::Batch;
use crate::broadcast::{Broadcaster, Published};
use crate::episodes::{episodes_batch, Assembler, GroupLayout};
use crate::error::LearnerError;
use crate::lockstep;
use crate::metrics::{MetricsRow, MetricsWriter};
use crate::parallel::{share_rows, Helpers, Share, ShareRows};
use crate::queue::ChunkReceiver;
use crate::returns::ReturnStats;
use crate::sequences::{Padded, Sequences};
use crate::state::{EpisodeStats, Shared, StepCounts};

/// Metadata keys of checkpoints.
pub const META_ENV_STEPS: &str = "spur.env_steps";
pub const META_UPDATES: &str = "spur.updates";
pub const META_EPISODES: &str = "spur.episodes";
pub const META_TIME_S: &str = "spur.time_s";
pub const META_INCARNATION: &str = "spur.learner_incarnation";
pub const META_REWARD_MODEL_VERSION: &str = "spur.reward_model_version";
pub const META_RANK_MEAN: &str = "spur.rank_score_mean";
pub const META_RANK_VAR: &str = "spur.rank_score_var";
/// The value targets' running statistics (`learner.normalize_returns`).
pub const META_RETURN_MEAN: &str = "spur.return_mean";
pub const META_RETURN_VAR: &str = "spur.return_var";
pub const META_RETURN_COUNT: &str = "spur.return_count";

pub struct Trainer {
    /// The reward model, when intrinsic rewards are on.
    pub intrinsic: Option<Arc<crate::intrinsic::RewardTable>>,
    pub config: Config,
    pub run_dir: PathBuf,
    pub model: ActorCritic,
    /// The environment's spec (episode step limits for grouped rollouts).
    pub spec: spur_core::env::EnvSpec,
    pub version: u64,
    pub updates: u64,
    /// Adam, with its moments restored when the run resumed.
    pub opt: Adam,
    /// Seconds trained before this incarnation (`time_s` in metrics.jsonl goes on).
    pub time_offset_s: f64,
    pub shared: Arc<Shared>,
    pub broadcaster: Broadcaster,
    pub rx: ChunkReceiver,
    pub rt: Handle,
    /// Groups of episodes UI-S1's spread filter kept and dropped, in this incarnation.
    pub groups_kept: u64,
    pub groups_dropped: u64,
    /// Drop every chunk once taken ([`crate::LearnerOptions::discard_chunks`]).
    pub discard_chunks: bool,
    /// The threads the learner trains on (`learner.threads`): an autograd step's
    /// shares of rows, or the closed-form MLP update's two sides in lock-step.
    pub helpers: Helpers,
    /// The value targets' running statistics, with `learner.normalize_returns`.
    pub returns: Option<ReturnStats>,
}

/// What a finished training run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub policy_version: u64,
    pub env_steps: u64,
    pub updates: u64,
    pub episode_return_mean: f64,
    pub success_rate: f64,
    pub checkpoint: PathBuf,
}

#[derive(Default)]
struct UpdateStats {
    policy_loss: f64,
    value_loss: f64,
    entropy: f64,
    clip_fraction: f64,
    /// Estimated KL(mu || pi) between behaviour and current policy: 0 when on-policy.
    behaviour_kl: f64,
    /// Gradient L2 norm before clipping, of the update's first minibatch (measured
    /// once per update to keep the minibatch loop lean).
    grad_norm: f64,
    /// Mean intrinsic term per step of the batch.
    intrinsic_reward_mean: f64,
    /// KL from the pre-update policy at the last minibatch.
    approx_kl: f64,
    /// The update stopped before its last minibatch because of `target_kl`.
    stopped_early: bool,
    steps: usize,
    /// Steps of the batch the policy trained on (all but those of dropped groups).
    trained_steps: usize,
}

impl UpdateStats {
    /// Adds a step's figures: its gradient norm before clipping (kept for the first
    /// step), its loss's terms (policy, value, entropy), clip fraction and KL from the
    /// proximal policy (kept for the last).
    fn record(
        &mut self,
        norm: f64,
        (policy, value, entropy): (f64, f64, f64),
        clip_fraction: f64,
        approx_kl: f64,
    ) {
        if self.steps == 0 {
            self.grad_norm = norm;
        }
        self.policy_loss += policy;
        self.value_loss += value;
        self.entropy += entropy;
        self.clip_fraction += clip_fraction;
        self.approx_kl = approx_kl;
        self.steps += 1;
    }
}

/// A batch's policy advantages and value targets, and for UI-S1's estimators which
/// of its groups the spread filter kept.
struct Advantages {
    policy: Vec<f32>,
    targets: Vec<f32>,
    kept: Option<Vec<bool>>,
}

impl Trainer {
    pub fn run(mut self) -> Result<TrainSummary, LearnerError> {
        // A policy sure of its actions makes subnormal probabilities and gradients,
        // which slow the update's matrix kernels several times over.
        spur_core::fpu::flush_denormals();
        self.helpers.pin_training_thread();
        let lc = self.config.learner.clone();
        let mut logs = Logs::open(&self.run_dir)?;
        let ckpt_dir = self.run_dir.join("checkpoints");
        let start = Instant::now() - Duration::from_secs_f64(self.time_offset_s);
        let mut rate = Throughput::new(self.shared.env_steps.load(Ordering::Relaxed));
        // UI-S1's estimators train on complete groups of episodes.
        let mut assembler = lc.advantage.is_grouped().then(|| {
            Assembler::new(
                self.config.actor.group_size as usize,
                self.spec.max_episode_steps as usize + 1,
                lc.max_open_groups as usize,
            )
        });
        while let Some(gathered) = self.gather(assembler.as_mut()) {
            let lr = self.scheduled_lr();
            self.opt.set_lr(lr);
            let stats = self.update(&gathered.batch, gathered.layout.as_ref());
            self.version += 1;
            self.updates += 1;
            self.shared
                .env_steps
                .fetch_add(gathered.batch.len() as u64, Ordering::Relaxed);
            self.shared
                .policy_version
                .store(self.version, Ordering::Release);
            self.shared.updates.store(self.updates, Ordering::Relaxed);
            if self.updates.is_multiple_of(lc.broadcast_every) {
                self.publish(false)?;
            }
            let env_steps = self.shared.env_steps.load(Ordering::Relaxed);
            self.shared.set_steps_per_sec(rate.tick(env_steps));
            let ep = self.shared.episode_stats();
            let mut row = self.metrics_row(&gathered, &stats, &ep, lr);
            row.time_s = start.elapsed().as_secs_f64();
            row.steps_per_sec = rate.rate;
            row.groups_given_up = assembler.as_ref().map_or(0, |a| a.given_up);
            row.groups_kept = self.groups_kept;
            row.groups_dropped = self.groups_dropped;
            logs.write(&row);
            if self.updates.is_multiple_of(lc.checkpoint_every) {
                self.checkpoint(&ckpt_dir, start)?;
            }
            if stats.steps == 0 && stats.trained_steps > 0 {
                warn!(
                    version = self.version,
                    "every minibatch of this update had a non-finite loss"
                );
            }
            if self.reached_goal(env_steps, &ep) {
                break;
            }
        }
        // Stop taking chunks and save. Only a run that reached its goal tells actors
        // to exit; after a shutdown they keep reconnecting, so a restarted learner
        // (`--resume`) picks them up again.
        self.rx.close();
        let path = self.checkpoint(&ckpt_dir, start)?;
        if !self.should_stop() {
            self.shared.training_finished.store(true, Ordering::Release);
            self.publish(true)?;
        }
        let ep = self.shared.episode_stats();
        Ok(TrainSummary {
            policy_version: self.version,
            env_steps: self.shared.env_steps.load(Ordering::Relaxed),
            updates: self.updates,
            episode_return_mean: ep.return_mean,
            success_rate: ep.success_rate,
            checkpoint: path,
        })
    }

    /// Takes chunks until a batch's worth of steps is ready (of chunks, or of whole
    /// episode groups with an `assembler`), dropping stale ones; `None` on shutdown.
    fn gather(&mut self, mut assembler: Option<&mut Assembler>) -> Option<Gathered> {
        let lc = &self.config.learner;
        let mut chunks = Vec::new();
        let (mut steps, mut lag_sum, mut taken) = (0usize, 0u64, 0usize);
        while steps < lc.batch_steps as usize {
            // Woken once the rest of the batch is queued; with episode groups
            // readiness is known only chunk by chunk.
            let want = match assembler {
                Some(_) => 1,
                None => lc.batch_steps as usize - steps,
            };
            let chunk = self.rx.next(&self.rt, want, &self.shared.stop)?;
            // Chunks of this incarnation are never ahead of it; one that is would be
            // a bug, and is dropped as stale rather than trained on.
            let lag = self.version as i64 - chunk.policy_version as i64;
            if lag < 0 || lag as u64 > lc.max_policy_lag {
                let c = &self.shared.counts;
                StepCounts::add(&c.stale_steps, &c.stale_chunks, chunk.steps() as u64);
                warn!(actor_id = %chunk.actor_id, lag, version = chunk.policy_version, "dropping stale chunk");
                continue;
            }
            lag_sum += lag as u64;
            taken += 1;
            if self.discard_chunks {
                continue;
            }
            match assembler.as_deref_mut() {
                Some(a) => {
                    a.push(&chunk);
                    steps = a.ready_steps();
                }
                None => {
                    steps += chunk.steps();
                    chunks.push(chunk);
                }
            }
        }
        let (batch, layout) = match assembler {
            Some(a) => {
                let (b, l) = episodes_batch(&a.take_ready(), self.model.obs_dim());
                (b, Some(l))
            }
            None => (Batch::from_chunks(&chunks), None),
        };
        Some(Gathered {
            batch,
            layout,
            lag_mean: lag_sum as f64 / taken.max(1) as f64,
        })
    }

    /// `learner.lr`, annealed linearly over the step budget to 5% of it when
    /// `learner.lr_anneal` is on.
    fn scheduled_lr(&self) -> f64 {
        let lc = &self.config.learner;
        if self.config.stop.env_steps > 0 && lc.lr_anneal {
            let done = self.shared.env_steps.load(Ordering::Relaxed) as f64
                / self.config.stop.env_steps as f64;
            lc.lr * (1.0 - done).max(0.05)
        } else {
            lc.lr
        }
    }

    /// The metrics row of the update just made (time, rate and group counts are the
    /// caller's); publishes the reward model's figures to the shared state too.
    fn metrics_row(
        &self,
        gathered: &Gathered,
        stats: &UpdateStats,
        ep: &EpisodeStats,
        lr: f64,
    ) -> MetricsRow {
        let (rm_version, rm_labels, rm_loss) = self.intrinsic.as_ref().map_or((0, 0, 0.0), |t| {
            (t.version(), t.label_count() as u64, t.loss())
        });
        let shared = &self.shared;
        shared.set_reward_model_loss(rm_loss);
        shared
            .reward_model_version
            .store(rm_version, Ordering::Relaxed);
        shared.reward_labels.store(rm_labels, Ordering::Relaxed);
        shared.set_intrinsic_reward_mean(stats.intrinsic_reward_mean);
        let counts = &shared.counts;
        MetricsRow {
            env_steps: shared.env_steps.load(Ordering::Relaxed),
            episode_return_mean: ep.return_mean,
            episode_len_mean: ep.len_mean,
            success_rate: ep.success_rate,
            episodes: ep.total,
            policy_version: self.version,
            updates: self.updates,
            policy_lag_mean: gathered.lag_mean,
            dropped_stale_chunks: counts.stale_chunks.load(Ordering::Relaxed),
            env_steps_received: counts.received.load(Ordering::Relaxed),
            dropped_steps_stale: counts.stale_steps.load(Ordering::Relaxed),
            dropped_steps_incarnation: counts.incarnation_steps.load(Ordering::Relaxed),
            dropped_steps_malformed: counts.malformed_steps.load(Ordering::Relaxed),
            learner_incarnation: shared.incarnation,
            queue_depth: (self.rx.len()) as u32,
            connected_actors: shared.connected_actors.load(Ordering::Relaxed),
            lr,
            policy_loss: stats.policy_loss,
            value_loss: stats.value_loss,
            entropy: stats.entropy,
            clip_fraction: stats.clip_fraction,
            behaviour_kl: stats.behaviour_kl,
            grad_norm: stats.grad_norm,
            approx_kl: stats.approx_kl,
            minibatch_steps: stats.steps as u64,
            intrinsic_reward_mean: stats.intrinsic_reward_mean,
            reward_model_version: rm_version,
            reward_labels: rm_labels,
            reward_model_loss: rm_loss,
            batch_steps: gathered.batch.len() as u64,
            judge: self
                .intrinsic
                .as_ref()
                .and_then(|t| t.service_status())
                .map(|s| crate::metrics::JudgeMetrics::from(&s)),
            returns: self.returns.map(|s| crate::metrics::ReturnColumns {
                return_mean: s.mean,
                return_std: s.var.sqrt(),
                return_count: s.count,
            }),
            ..Default::default()
        }
    }

    /// The step budget is spent, or the mean return over a full window reached
    /// `stop.target_return`.
    fn reached_goal(&self, env_steps: u64, ep: &EpisodeStats) -> bool {
        let budget = self.config.stop.env_steps;
        let target = self.config.stop.target_return;
        if budget > 0 && env_steps >= budget {
            info!(env_steps, "env step budget reached");
            return true;
        }
        if target > 0.0 && ep.window >= crate::state::EPISODE_WINDOW && ep.return_mean >= target {
            info!(
                env_steps,
                return_mean = ep.return_mean,
                "target return reached"
            );
            return true;
        }
        false
    }

    /// UI-S1's advantages per step and which groups the spread filter kept: `uis1`
    /// combines the step-level and episode-level terms (0 on dropped groups, which
    /// it does not train on); `hybrid` takes V-trace's advantage as the step-level
    /// term and adds the episode-level term on kept groups.
    fn group_advantages(
        &mut self,
        rewards: &[f32],
        extrinsic: &[f32],
        vtrace_adv: &[f32],
        layout: &GroupLayout,
    ) -> (Vec<f32>, Vec<bool>) {
        let lc = &self.config.learner;
        let hybrid = lc.advantage == AdvantageKind::Hybrid;
        let params = GroupParams {
            gamma_step: lc.gamma_step,
            w_episode: lc.w_episode,
            w_step: if hybrid { 0.0 } else { lc.w_step },
            divide_by_std: lc.group_std_norm,
            min_spread: lc.group_min_spread,
            ..GroupParams::default()
        };
        // The rewards whose episode sum is an episode's outcome.
        let scored = match lc.group_outcome {
            GroupOutcome::Extrinsic => extrinsic,
            GroupOutcome::Mixed => rewards,
        };
        let mut adv = vec![0.0f32; rewards.len()];
        let mut kept = Vec::with_capacity(layout.len());
        for group in layout {
            let episodes: Vec<GroupEpisode> = group
                .iter()
                .map(|&(s, l)| GroupEpisode {
                    rewards: &rewards[s..s + l],
                    outcome: scored[s..s + l].iter().map(|&r| r as f64).sum(),
                })
                .collect();
            match group_advantages(&episodes, &params) {
                Some(per_episode) => {
                    for (&(s, l), a) in group.iter().zip(per_episode) {
                        adv[s..s + l].copy_from_slice(&a);
                    }
                    kept.push(true);
                }
                None => kept.push(false),
            }
        }
        if hybrid {
            for (a, v) in adv.iter_mut().zip(vtrace_adv) {
                *a += lc.w_step as f32 * v;
            }
        }
        let dropped = kept.iter().filter(|&&k| !k).count() as u64;
        self.groups_dropped += dropped;
        self.groups_kept += kept.len() as u64 - dropped;
        (adv, kept)
    }

    fn should_stop(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    /// The training position, as checkpoint metadata.
    fn position(&self, start: Instant) -> HashMap<String, String> {
        let mut meta: HashMap<String, String> = self
            .shared
            .counts
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env_steps = self.shared.env_steps.load(Ordering::Relaxed);
        let mut put = |k: &str, v: String| meta.insert(k.to_string(), v);
        put(META_ENV_STEPS, env_steps.to_string());
        put(META_UPDATES, self.updates.to_string());
        put(META_EPISODES, self.shared.episode_stats().total.to_string());
        put(META_TIME_S, start.elapsed().as_secs_f64().to_string());
        put(META_INCARNATION, self.shared.incarnation.to_string());
        if let Some(table) = &self.intrinsic {
            put(META_REWARD_MODEL_VERSION, table.version().to_string());
            if let Some((mean, var)) = table.score_stats() {
                put(META_RANK_MEAN, mean.to_string());
                put(META_RANK_VAR, var.to_string());
            }
        }
        if let Some(s) = &self.returns {
            put(META_RETURN_MEAN, s.mean.to_string());
            put(META_RETURN_VAR, s.var.to_string());
            put(META_RETURN_COUNT, s.count.to_string());
        }
        meta
    }

    /// Weights only, for actors.
    fn publish(&self, finished: bool) -> Result<(), LearnerError> {
        let mut meta = HashMap::new();
        meta.insert(
            META_ENV_STEPS.to_string(),
            self.shared.env_steps.load(Ordering::Relaxed).to_string(),
        );
        // When this version left the learner (`spur bench broadcast` reads it).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        meta.insert(
            "spur.published_unix_ns".into(),
            now.map_or(0, |d| d.as_nanos()).to_string(),
        );
        self.broadcaster.publish(Published {
            version: self.version,
            bytes: self
                .model
                .to_safetensors_as(self.version, &meta, self.config.learner.weights_dtype)?
                .into(),
            finished,
        });
        Ok(())
    }

    /// Weights, Adam's moments and the training position, in one atomic file.
    fn checkpoint(&self, dir: &std::path::Path, start: Instant) -> Result<PathBuf, LearnerError> {
        let (mut named, adam_meta) = self.opt.state();
        named.extend(self.model.var_store().variables());
        let mut meta = self.position(start);
        meta.extend(adam_meta);
        let bytes = tensors_to_safetensors(&named, self.version, &meta)?;
        let path = checkpoint::save(dir, self.version, &bytes)?;
        info!(version = self.version, path = %path.display(), "checkpoint written");
        Ok(path)
    }

    /// One update on `batch`; `layout` says where each group's episodes are (UI-S1).
    fn update(&mut self, batch: &Batch, layout: Option<&GroupLayout>) -> UpdateStats {
        let dev = self.model.device();
        let t_len = batch.rollout_len;
        let n = batch.len() as i64;
        let obs_all = to_dev(&batch.observations, ((t_len + 1) * batch.width) as i64, dev);
        let inputs = Inputs {
            obs: obs_all.narrow(0, 0, n),
            obs_all,
            actions: Tensor::from_slice(&batch.actions).to_device(dev),
        };
        // A recurrent policy runs over whole sequences: a chunk batch's columns (its
        // targets reach one step further, to the bootstrap row), or the episodes of
        // a grouped batch.
        let all_sequences = self.model.is_recurrent().then(|| match layout {
            None => Sequences::columns(batch, t_len + 1),
            Some(l) => Sequences::episodes(l, self.model.state_size()),
        });
        let mut estimates = self.estimates(batch, &inputs, all_sequences.as_ref());
        if let Some(s) = &self.returns {
            // The critic's outputs on the raw scale, for the advantages.
            s.denormalize(&mut estimates.values);
            s.denormalize(&mut estimates.values_final);
        }
        let (rewards, intrinsic_mean) = match &self.intrinsic {
            Some(table) => table.mix(
                &batch.rewards,
                &batch.event_texts,
                &batch.event_counts,
                &self.config.intrinsic,
            ),
            None => (batch.rewards.clone(), 0.0),
        };
        let log_rhos: Vec<f32> = estimates
            .log_probs
            .iter()
            .zip(&batch.behaviour_log_probs)
            .map(|(a, b)| a - b)
            .collect();
        let advantages = self.advantages(batch, layout, &rewards, &log_rhos, &estimates);
        // `uis1` trains only on the groups the spread filter kept (`hybrid` keeps
        // every step: dropped groups still have their V-trace term).
        let trained_layout: Option<GroupLayout> = match (layout, &advantages.kept) {
            (Some(l), Some(kept)) if self.config.learner.advantage == AdvantageKind::Uis1 => Some(
                l.iter()
                    .zip(kept)
                    .filter(|(_, &k)| k)
                    .map(|(g, _)| g.clone())
                    .collect(),
            ),
            _ => layout.cloned(),
        };
        let trained: Vec<i64> = match &trained_layout {
            Some(l) => l
                .iter()
                .flatten()
                .flat_map(|&(s, len)| s as i64..(s + len) as i64)
                .collect(),
            None => (0..n).collect(),
        };
        // The training sequences of a recurrent policy: a chunk batch's columns, or
        // the trained groups' episodes.
        let sequences = self.model.is_recurrent().then(|| match &trained_layout {
            None => Sequences::columns(batch, t_len),
            Some(l) => Sequences::episodes(l, self.model.state_size()),
        });
        let lc = &self.config.learner;
        let (pg_advantages, mut value_targets) = (advantages.policy, advantages.targets);
        if let Some(s) = &mut self.returns {
            s.update(&value_targets);
            s.normalize(&mut value_targets);
        }
        // Decoupled PPO: the ratio is taken against the proximal policy (these
        // weights before this update); with V-trace, its truncated importance weights
        // inside the advantages correct for the older behaviour policy.
        let terms = LossTerms {
            proximal: Tensor::from_slice(&estimates.log_probs).to_device(dev),
            advantages: Tensor::from_slice(&pg_advantages).to_device(dev),
            targets: Tensor::from_slice(&value_targets).to_device(dev),
            experts: expert_actions(batch, lc.imitation_coef, dev),
            steps: StepTerms {
                actions: batch.actions.clone(),
                proximal: estimates.log_probs,
                advantages: pg_advantages,
                targets: value_targets,
            },
        };
        let mut stats = UpdateStats {
            intrinsic_reward_mean: intrinsic_mean,
            trained_steps: trained.len(),
            behaviour_kl: -log_rhos.iter().map(|&x| x as f64).sum::<f64>()
                / log_rhos.len().max(1) as f64,
            ..Default::default()
        };
        let trained = Tensor::from_slice(&trained).to_device(dev);
        let split = self.shares_per_step(&terms);
        let in_lockstep =
            sequences.is_none() && self.lockstep(&trained, &inputs, &terms, &mut stats);
        if !in_lockstep {
            'epochs: for _ in 0..self.config.learner.epochs {
                for minibatch in self.minibatches(&trained, sequences.as_ref(), split) {
                    if self.train_minibatch(minibatch, &inputs, &terms, &mut stats) {
                        stats.stopped_early = true;
                        break 'epochs;
                    }
                }
            }
        }
        let k = stats.steps.max(1) as f64;
        stats.policy_loss /= k;
        stats.value_loss /= k;
        stats.entropy /= k;
        stats.clip_fraction /= k;
        if stats.steps == 0 {
            // Nothing trained (UI-S1 dropped every group, or every minibatch's loss
            // was not finite): no loss to report, rather than a loss of zero. NaN is
            // null in metrics.jsonl and no point in TensorBoard or the plots.
            for x in [
                &mut stats.policy_loss,
                &mut stats.value_loss,
                &mut stats.entropy,
                &mut stats.clip_fraction,
                &mut stats.grad_norm,
                &mut stats.approx_kl,
            ] {
                *x = f64::NAN;
            }
        }
        stats
    }

    /// Values of every observation row and of the truncated steps' final
    /// observations, and log-probabilities of the batch's actions, with the current
    /// critic and policy and without gradients (through the sequences `all` for a
    /// recurrent policy).
    /// With the actors' values (`learner.actor_estimates`), only the truncated steps'
    /// final observations (rarely more than a few rows) go through the critic; the
    /// acting policy's log-probabilities stand for the proximal policy's.
    fn estimates(&self, batch: &Batch, inputs: &Inputs, all: Option<&Sequences>) -> Estimates {
        let dev = self.model.device();
        let k = batch.truncated_count() as i64;
        let final_obs = (k > 0).then(|| to_dev(&batch.final_observations, k, dev));
        if !batch.behaviour_values.is_empty() {
            return Estimates {
                values: batch.behaviour_values.clone(),
                values_final: final_obs.map_or_else(Vec::new, |f| {
                    tch::no_grad(|| f32_vec(&self.model.values(&f)))
                }),
                log_probs: batch.behaviour_log_probs.clone(),
            };
        }
        tch::no_grad(|| match all {
            None => {
                // One pass over every row: a shared torso (the NetHack network) runs
                // once, not once for the logits and again for the values.
                let (logits, values) = self.helpers.logits_and_values(&self.model, &inputs.obs_all);
                let log_probs = logits
                    .narrow(0, 0, inputs.obs.size()[0])
                    .log_softmax(-1, Kind::Float)
                    .gather(1, &inputs.actions.unsqueeze(1), false)
                    .squeeze_dim(1);
                Estimates {
                    values: f32_vec(&values),
                    values_final: final_obs
                        .map_or_else(Vec::new, |f| f32_vec(&self.model.values(&f))),
                    log_probs: f32_vec(&log_probs),
                }
            }
            Some(all) => {
                let t = sequence_targets(
                    &self.model,
                    batch,
                    all,
                    &inputs.obs_all,
                    final_obs,
                    &inputs.actions,
                );
                Estimates {
                    values: f32_vec(&t.values),
                    values_final: f32_vec(&t.values_final),
                    log_probs: f32_vec(&t.log_probs),
                }
            }
        })
    }

    /// The policy's advantages and the critic's targets for `rewards` (mixed), by
    /// the configured estimator: V-trace (grouped estimators replace only its policy
    /// advantages) or GAE.
    fn advantages(
        &mut self,
        batch: &Batch,
        layout: Option<&GroupLayout>,
        rewards: &[f32],
        log_rhos: &[f32],
        estimates: &Estimates,
    ) -> Advantages {
        let lc = &self.config.learner;
        let (t_len, w) = (batch.rollout_len, batch.width);
        let values = &estimates.values[..batch.len()];
        let next_values = batch.next_values(&estimates.values, &estimates.values_final);
        match lc.advantage {
            AdvantageKind::Vtrace | AdvantageKind::Uis1 | AdvantageKind::Hybrid => {
                let vt = vtrace(
                    &VTraceInput {
                        rollout_len: t_len,
                        batch: w,
                        log_rhos,
                        rewards,
                        values,
                        next_values: &next_values,
                        terminated: &batch.terminated,
                        truncated: &batch.truncated,
                    },
                    &VTraceParams {
                        gamma: lc.gamma as f32,
                        lambda: lc.lambda as f32,
                        rho_clip: lc.rho_clip as f32,
                        c_clip: lc.c_clip as f32,
                        pg_rho_clip: lc.rho_clip as f32,
                    },
                );
                match layout {
                    // The critic learns V-trace targets in every mode; only the
                    // policy's advantages differ.
                    Some(layout) => {
                        let (policy, kept) = self.group_advantages(
                            rewards,
                            &batch.rewards,
                            &vt.pg_advantages,
                            layout,
                        );
                        Advantages {
                            policy,
                            targets: vt.vs,
                            kept: Some(kept),
                        }
                    }
                    None => Advantages {
                        policy: vt.pg_advantages,
                        targets: vt.vs,
                        kept: None,
                    },
                }
            }
            AdvantageKind::Gae => {
                let (policy, targets) = gae(
                    &GaeInput {
                        rollout_len: t_len,
                        batch: w,
                        rewards,
                        values,
                        next_values: &next_values,
                        terminated: &batch.terminated,
                        truncated: &batch.truncated,
                    },
                    lc.gamma as f32,
                    lc.lambda as f32,
                );
                Advantages {
                    policy,
                    targets,
                    kept: None,
                }
            }
        }
    }

    /// One epoch's minibatches: the `trained` steps shuffled, or shuffled whole
    /// sequences of `train` for a recurrent policy, each minibatch's sequences in
    /// `split` shares (about equal; fewer when there are fewer sequences).
    fn minibatches(
        &self,
        trained: &Tensor,
        train: Option<&Sequences>,
        split: usize,
    ) -> Vec<Minibatch> {
        let parts = self.config.learner.minibatches as usize;
        let dev = self.model.device();
        match train {
            None => {
                let n = trained.size()[0];
                let mb = (n / parts as i64).max(1);
                let perm = trained.index_select(0, &Tensor::randperm(n, (Kind::Int64, dev)));
                (0..(n / mb))
                    .map(|m| Minibatch::Steps(perm.narrow(0, m * mb, mb)))
                    .collect()
            }
            Some(train) => {
                let j = train.len();
                let seq_mb = (j / parts).max(1);
                let perm =
                    Vec::<i64>::try_from(Tensor::randperm(j as i64, (Kind::Int64, Device::Cpu)))
                        .expect("an i64 tensor converts to Vec<i64>");
                let perm: Vec<usize> = perm.iter().map(|&q| q as usize).collect();
                let per_share = seq_mb.div_ceil(split.max(1));
                perm.chunks_exact(seq_mb)
                    .map(|which| {
                        Minibatch::Sequences(
                            which
                                .chunks(per_share)
                                .map(|share| train.pad(share, dev))
                                .collect(),
                        )
                    })
                    .collect()
            }
        }
    }

    /// PPO's settings from `learner`.
    fn ppo_params(&self) -> PpoParams {
        let lc = &self.config.learner;
        PpoParams {
            clip_eps: lc.clip_eps,
            value_coef: lc.value_coef,
            entropy_coef: lc.entropy_coef,
        }
    }

    /// The update's minibatch steps in lock-step on two threads ([`lockstep`]), when
    /// that applies: a feedforward MLP in closed form, no imitation terms, on the CPU,
    /// `learner.threads` of 2 or more. False (nothing done, nothing drawn from the
    /// random generator) when it does not.
    fn lockstep(
        &mut self,
        trained: &Tensor,
        inputs: &Inputs,
        terms: &LossTerms,
        stats: &mut UpdateStats,
    ) -> bool {
        let lc = &self.config.learner;
        let (Some(at), Some(layers), true) = (
            lockstep::split_at(&self.opt),
            closed_form_layers(&self.model, lc, terms),
            self.helpers.threads() >= 2,
        ) else {
            return false;
        };
        let minibatches: Vec<Vec<i64>> = (0..lc.epochs)
            .flat_map(|_| self.minibatches(trained, None, 1))
            .map(|m| match m {
                Minibatch::Steps(idx) => index_vec(&idx),
                Minibatch::Sequences(_) => unreachable!("a feedforward policy trains on steps"),
            })
            .collect();
        let settings = lockstep::Settings {
            params: self.ppo_params(),
            max_grad_norm: lc.max_grad_norm,
            target_kl: lc.target_kl,
            advantage_std_floor: lc.advantage_std_floor,
        };
        let steps = lockstep::update(
            &self.helpers,
            layers,
            (&mut self.opt, at),
            (&inputs.obs, &terms.steps),
            &minibatches,
            &settings,
        );
        stats.stopped_early = steps.len() < minibatches.len();
        for step in steps {
            if !step.taken {
                warn!(
                    version = self.version,
                    "skipping a minibatch with a non-finite loss"
                );
                continue;
            }
            let f = step.policy;
            stats.record(
                step.norm,
                (f.surrogate, step.value, f.entropy),
                f.clip_fraction,
                f.approx_kl,
            );
        }
        true
    }

    /// One optimizer step on `minibatch`, added to `stats`; true when the policy
    /// moved too far from the proximal one (`learner.target_kl`) and the update
    /// stops. A minibatch whose loss is not finite is skipped.
    fn train_minibatch(
        &mut self,
        minibatch: Minibatch,
        inputs: &Inputs,
        terms: &LossTerms,
        stats: &mut UpdateStats,
    ) -> bool {
        let lc = &self.config.learner;
        let params = self.ppo_params();
        // The feedforward MLP without imitation terms: gradients in closed form (on
        // one thread; with more, `lockstep` runs the update instead).
        if let (Minibatch::Steps(idx), Some(layers)) =
            (&minibatch, closed_form_layers(&self.model, lc, terms))
        {
            let rows = terms
                .steps
                .rows(&inputs.obs, &index_vec(idx), lc.advantage_std_floor);
            let loss = mlp_grad::step(layers, &rows, &params);
            if !self.finite(&loss.total) {
                return false;
            }
            return self.optimizer_step(&loss, stats);
        }
        let shares = self.shares(minibatch, inputs, terms);
        self.opt.zero_grad();
        let loss = match &terms.experts {
            // The shares' forward and backward passes, on a thread each.
            None => self.helpers.step(&self.model, shares, &params),
            // With imitation terms (normalised over the minibatch's expert steps),
            // one share on this thread.
            Some((acts, mask)) => {
                let share = shares.into_iter().next().expect("a minibatch has a share");
                let (loss, eval) = share.loss(&self.model, &params);
                let m = mask.index_select(0, &share.flat);
                let lp = eval
                    .all_log_probs
                    .gather(1, &acts.index_select(0, &share.flat).unsqueeze(1), false)
                    .squeeze_dim(1);
                let imitation = -(lp * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0);
                let total = &loss.total + imitation * lc.imitation_coef;
                if total.double_value(&[]).is_finite() {
                    total.backward();
                }
                PpoLoss { total, ..loss }
            }
        };
        if !self.finite(&loss.total) {
            self.opt.zero_grad();
            return false;
        }
        self.optimizer_step(&loss, stats)
    }

    /// Shares a minibatch step runs on: `learner.threads`, or one with imitation
    /// terms (normalised over a minibatch's expert steps).
    fn shares_per_step(&self, terms: &LossTerms) -> usize {
        match terms.experts {
            None => self.helpers.threads() as usize,
            Some(_) => 1,
        }
    }

    /// `minibatch` as the shares its step runs on (`learner.threads` of them; one
    /// with imitation terms): each share's rows of the inputs and of the loss's
    /// terms, the advantages normalised over the whole minibatch.
    fn shares(&self, minibatch: Minibatch, inputs: &Inputs, terms: &LossTerms) -> Vec<Share> {
        let rows: Vec<(ShareRows, Tensor)> = match minibatch {
            Minibatch::Steps(idx) => {
                let n = idx.size()[0];
                let split = (self.shares_per_step(terms) as i64).clamp(1, n.max(1));
                (0..split)
                    .map(|i| {
                        let (start, len) = share_rows(n, split, i);
                        let flat = idx.narrow(0, start, len);
                        let rows = ShareRows::Steps {
                            obs: inputs.obs.index_select(0, &flat),
                            actions: inputs.actions.index_select(0, &flat),
                        };
                        (rows, flat)
                    })
                    .collect()
            }
            Minibatch::Sequences(parts) => parts
                .into_iter()
                .map(|padded| {
                    let flat = padded.flat.shallow_clone();
                    let rows = ShareRows::Sequences {
                        obs: inputs.obs_all.index_select(0, &padded.index),
                        actions: inputs.actions.index_select(0, &flat),
                        padded,
                    };
                    (rows, flat)
                })
                .collect(),
        };
        let all: Vec<Tensor> = rows.iter().map(|(_, f)| f.shallow_clone()).collect();
        let all = Tensor::cat(&all, 0);
        let n = all.size()[0];
        let adv = normalized(
            &terms.advantages.index_select(0, &all),
            self.config.learner.advantage_std_floor,
        );
        let mut start = 0;
        rows.into_iter()
            .map(|(rows, flat)| {
                let len = flat.size()[0];
                let share = Share {
                    rows,
                    proximal: terms.proximal.index_select(0, &flat),
                    advantages: adv.narrow(0, start, len),
                    targets: terms.targets.index_select(0, &flat),
                    weight: len as f64 / n as f64,
                    flat,
                };
                start += len;
                share
            })
            .collect()
    }

    /// Whether `loss` is finite; a minibatch whose loss is not is skipped (logged).
    fn finite(&self, loss: &Tensor) -> bool {
        let finite = loss.double_value(&[]).is_finite();
        if !finite {
            warn!(
                version = self.version,
                "skipping a minibatch with a non-finite loss"
            );
        }
        finite
    }

    /// Clips the gradients, steps the optimizer and adds `loss`'s statistics to
    /// `stats`; true when the policy moved too far from the proximal one
    /// (`learner.target_kl`).
    fn optimizer_step(&mut self, loss: &PpoLoss, stats: &mut UpdateStats) -> bool {
        let lc = &self.config.learner;
        let norm = self.opt.clip_grad_norm(lc.max_grad_norm);
        self.opt.step();
        let terms = (loss.policy, loss.value, loss.entropy);
        stats.record(norm, terms, loss.clip_fraction, loss.approx_kl);
        past_target_kl(loss.approx_kl, lc.target_kl)
    }
}

/// Whether a step's KL from the proximal policy ends the update: past 1.5 times
/// `learner.target_kl` (0: never).
pub(crate) fn past_target_kl(approx_kl: f64, target_kl: f64) -> bool {
    target_kl > 0.0 && approx_kl > 1.5 * target_kl
}

/// The policy's and the critic's layers when a minibatch step takes its gradients
/// in closed form: a feedforward MLP, `learner.explicit_mlp_gradients`, and no
/// imitation terms.
fn closed_form_layers<'a>(
    model: &'a ActorCritic,
    lc: &LearnerConfig,
    terms: &LossTerms,
) -> Option<(&'a [nn::Linear], &'a [nn::Linear])> {
    let applies = lc.explicit_mlp_gradients && terms.experts.is_none();
    model.mlp_layers().filter(|_| applies)
}

/// A minibatch's index tensor as the batch rows it picks.
fn index_vec(idx: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(idx).expect("an i64 index tensor converts to Vec<i64>")
}

/// Advantages shifted to mean 0 and scaled by their spread, but never by less than
/// `floor`, so near-zero advantages (a batch without any reward) do not blow up into
/// unit-size noise.
fn normalized(advantages: &Tensor, floor: f64) -> Tensor {
    let std = advantages.std(true).clamp_min(floor);
    (advantages - advantages.mean(Kind::Float)) / std
}

/// A batch's observations and actions on the policy's device.
struct Inputs {
    /// `[(T + 1) * width, obs_dim]`: every step's observation and the bootstrap row.
    obs_all: Tensor,
    /// `[T * width, obs_dim]`: the observations actions were taken in.
    obs: Tensor,
    actions: Tensor,
}

/// The current policy's and critic's view of a batch, before the update.
struct Estimates {
    values: Vec<f32>,
    values_final: Vec<f32>,
    log_probs: Vec<f32>,
}

/// What the loss compares against, per step, on the policy's device.
struct LossTerms {
    /// Log-probabilities under the proximal policy (before this update).
    proximal: Tensor,
    advantages: Tensor,
    /// The critic's targets.
    targets: Tensor,
    /// The expert's actions and where there is one (patched replay steps).
    experts: Option<(Tensor, Tensor)>,
    /// The actions and the terms above on the host, per batch step.
    steps: StepTerms,
}

/// Per batch step on the host: what the closed-form MLP step reads besides the
/// observations.
pub(crate) struct StepTerms {
    pub actions: Vec<i64>,
    pub proximal: Vec<f32>,
    pub advantages: Vec<f32>,
    pub targets: Vec<f32>,
}

impl StepTerms {
    /// The minibatch of the batch steps `at`, its advantages normalised as
    /// [`normalized`] does (but for a minibatch of one step, whose spread is 0/0:
    /// there its advantage is 0, where the tensor path's is NaN and skips the step).
    /// On a GPU the picks and the closed form's loss run on the host all the same:
    /// a few hundred floats each way per step.
    pub(crate) fn rows(&self, obs: &Tensor, at: &[i64], floor: f64) -> mlp_grad::Rows {
        let idx = Tensor::from_slice(at).to_device(obs.device());
        let pick = |v: &[f32]| -> Vec<f32> { at.iter().map(|&i| v[i as usize]).collect() };
        let mut advantages = pick(&self.advantages);
        let n = advantages.len() as f64;
        let mean = advantages.iter().map(|&a| a as f64).sum::<f64>() / n;
        let var = advantages
            .iter()
            .map(|&a| (a as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let std = var.sqrt().max(floor);
        for a in &mut advantages {
            *a = ((*a as f64 - mean) / std) as f32;
        }
        mlp_grad::Rows {
            obs: obs.index_select(0, &idx),
            actions: at.iter().map(|&i| self.actions[i as usize]).collect(),
            proximal: pick(&self.proximal),
            advantages,
            targets: pick(&self.targets),
        }
    }
}

/// Patched steps of a replay env: the expert's actions and a mask of where there is
/// one, to imitate (nothing when the batch has none or imitation is off).
fn expert_actions(batch: &Batch, imitation_coef: f64, dev: Device) -> Option<(Tensor, Tensor)> {
    if batch.expert_actions.is_empty() || imitation_coef <= 0.0 {
        return None;
    }
    let mask: Vec<f32> = batch
        .expert_actions
        .iter()
        .map(|&a| (a >= 0) as u8 as f32)
        .collect();
    let acts: Vec<i64> = batch.expert_actions.iter().map(|&a| a.max(0)).collect();
    Some((
        Tensor::from_slice(&acts).to_device(dev),
        Tensor::from_slice(&mask).to_device(dev),
    ))
}

fn to_dev(v: &[f32], rows: i64, dev: Device) -> Tensor {
    Tensor::from_slice(v).view([rows, -1]).to_device(dev)
}

/// A batch ready to train on, and the policy lag of the chunks it came from.
struct Gathered {
    batch: Batch,
    layout: Option<GroupLayout>,
    lag_mean: f64,
}

/// Env steps per second, an exponential average over updates.
struct Throughput {
    last: (Instant, u64),
    rate: f64,
}

impl Throughput {
    fn new(env_steps: u64) -> Self {
        Self {
            last: (Instant::now(), env_steps),
            rate: 0.0,
        }
    }

    /// Folds in the steps since the last tick; returns the average.
    fn tick(&mut self, env_steps: u64) -> f64 {
        let now = Instant::now();
        let dt = now.duration_since(self.last.0).as_secs_f64();
        if dt > 0.0 {
            let inst = (env_steps - self.last.1) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                inst
            } else {
                0.8 * self.rate + 0.2 * inst
            };
        }
        self.last = (now, env_steps);
        self.rate
    }
}

/// Where every update's metrics row goes: `metrics.jsonl`, TensorBoard (when its
/// file could be made) and the Prometheus gauges.
struct Logs {
    metrics: MetricsWriter,
    tensorboard: Option<crate::tensorboard::TensorBoard>,
}

impl Logs {
    fn open(run_dir: &std::path::Path) -> Result<Self, LearnerError> {
        let metrics = MetricsWriter::open(&run_dir.join("metrics.jsonl")).map_err(|source| {
            LearnerError::RunDir {
                path: run_dir.display().to_string(),
                source,
            }
        })?;
        // TensorBoard is a convenience: a run without it still trains and logs.
        let tensorboard = match crate::tensorboard::TensorBoard::create(run_dir) {
            Ok(tb) => Some(tb),
            Err(e) => {
                warn!(error = %e, "no TensorBoard event file for this run");
                None
            }
        };
        Ok(Self {
            metrics,
            tensorboard,
        })
    }

    fn write(&mut self, row: &MetricsRow) {
        spur_core::prom::publish("spur_learner", row);
        if let Some(tb) = self.tensorboard.as_mut() {
            if let Err(e) = tb.write(row.env_steps as i64, row) {
                warn!(error = %e, "cannot write the TensorBoard event file, stopping it");
                self.tensorboard = None;
            }
        }
        if let Err(e) = self.metrics.write(row) {
            warn!(error = %e, "cannot write metrics.jsonl");
        }
    }
}

/// One minibatch: shuffled single steps (feedforward) or whole sequences (recurrent).
enum Minibatch {
    /// Steps (rows of the batch).
    Steps(Tensor),
    /// Whole sequences of a recurrent policy, padded, in shares of sequences.
    Sequences(Vec<Padded>),
}

/// What a recurrent policy's sequence pass gives the advantage estimators.
pub(crate) struct SequenceTargets {
    /// `[rows]`: the value of every observation row of the batch (0 for rows no
    /// sequence reaches).
    pub values: Tensor,
    /// `[K]`: values of the truncated steps' final observations, each continuing its
    /// episode's state.
    pub values_final: Tensor,
    /// `[T * B]`: log-probabilities of the batch's actions.
    pub log_probs: Tensor,
}

/// Runs every sequence of `all` (which must cover the batch's steps) through the
/// policy from its stored state: the values and log-probabilities the targets are
/// made of, as the actors' own passes computed them.
pub(crate) fn sequence_targets(
    model: &ActorCritic,
    batch: &Batch,
    all: &Sequences,
    obs_all: &Tensor,
    final_obs: Option<Tensor>,
    actions: &Tensor,
) -> SequenceTargets {
    let dev = model.device();
    let rows = obs_all.size()[0];
    let n = batch.len() as i64;
    let which: Vec<usize> = (0..all.len()).collect();
    let p = all.pad(&which, dev);
    let u = model.unroll(&obs_all.index_select(0, &p.index), &p.initial, &p.resets);
    let scatter = |t: &Tensor, width: Option<i64>| {
        let shape: Vec<i64> = match width {
            Some(w) => vec![rows, w],
            None => vec![rows],
        };
        Tensor::zeros(shape, (Kind::Float, dev)).index_copy(0, &p.flat, &p.pick(t))
    };
    let values = scatter(&u.values, None);
    let log_p = scatter(
        &u.logits.log_softmax(-1, Kind::Float),
        Some(model.num_actions() as i64),
    );
    let log_probs = log_p
        .narrow(0, 0, n)
        .gather(1, &actions.unsqueeze(1), false)
        .squeeze_dim(1);
    let values_final = match final_obs {
        Some(f) => {
            let states = scatter(&u.states, Some(model.state_size() as i64));
            let truncated: Vec<i64> = (0..batch.len())
                .filter(|&i| batch.truncated[i] == 1)
                .map(|i| i as i64)
                .collect();
            let at = Tensor::from_slice(&truncated).to_device(dev);
            model.values_after(&f, &states.index_select(0, &at))
        }
        None => Tensor::zeros([0], (Kind::Float, dev)),
    };
    SequenceTargets {
        values,
        values_final,
        log_probs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed-form step's rows are the batch steps asked for, in order, with the
    /// advantages normalised as the autograd path normalises them (its spread's
    /// floor too).
    #[test]
    fn step_rows_pick_the_minibatch_and_normalise_like_autograd() {
        let n = 40;
        let obs = Tensor::arange(n * 3, (Kind::Float, Device::Cpu)).view([n, 3]);
        let steps = StepTerms {
            actions: (0..n).map(|i| i % 3).collect(),
            proximal: (0..n).map(|i| -(i as f32) / 10.0).collect(),
            advantages: (0..n).map(|i| ((i * 7) % 11) as f32 - 4.0).collect(),
            targets: (0..n).map(|i| i as f32 * 2.0).collect(),
        };
        let idx = Tensor::from_slice(&[5i64, 0, 39, 17, 17, 8]);
        let at = [5usize, 0, 39, 17, 17, 8];
        for floor in [1e-3, 1e3] {
            let rows = steps.rows(&obs, &at.map(|i| i as i64), floor);
            assert!(rows.obs.equal(&obs.index_select(0, &idx)));
            assert_eq!(rows.actions, at.map(|i| steps.actions[i]));
            assert_eq!(rows.proximal, at.map(|i| steps.proximal[i]));
            assert_eq!(rows.targets, at.map(|i| steps.targets[i]));
            let want = normalized(&Tensor::from_slice(&at.map(|i| steps.advantages[i])), floor);
            let want = Vec::<f32>::try_from(want).unwrap();
            for (a, b) in rows.advantages.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "floor {floor}: {a} against {b}");
            }
            assert!(rows.advantages.iter().any(|&a| a.abs() > 1e-4));
        }
    }
}
