//! Advantage estimators besides V-trace (`vtrace.rs`):
//!
//! - [`gae`]: generalized advantage estimation (Schulman et al., 2016) over
//!   time-major `[T, B]` arrays with the current critic, no off-policy correction.
//! - [`group_advantages`]: UI-S1's critic-free estimator over a group of complete
//!   episodes that share a task. A group whose episode returns hardly differ is
//!   dropped ([`group_spread`] at or below `min_spread`: UI-S1's dynamic sampling).
//!   Otherwise each step gets `w_E * A_E + w_S * A_S`: the episode term `A_E`
//!   centres each episode's outcome on the group's mean, the step term `A_S`
//!   centres the discounted step return `R_t = r_t + gamma_s * R_{t+1}` on the mean
//!   over the group's episodes at the same step index; both are divided by their
//!   spread when `divide_by_std` is set.
//!
//! Episode ends follow `vtrace.rs`: a terminated step has no future; a truncated one
//! bootstraps from the value of its final observation (GAE). UI-S1's estimator has no
//! critic, so there both simply end the episode's sums.

use crate::vtrace::{vtrace, VTraceInput, VTraceParams};

/// Inputs of [`gae`], each of length `T * B` in time-major order.
pub struct GaeInput<'a> {
    pub rollout_len: usize,
    pub batch: usize,
    pub rewards: &'a [f32],
    /// `V(x_t)` under the current critic.
    pub values: &'a [f32],
    /// `V(x_{t+1})` in the same episode, or the value of the final observation when
    /// step t was truncated (ignored when terminated).
    pub next_values: &'a [f32],
    pub terminated: &'a [u8],
    pub truncated: &'a [u8],
}

/// GAE advantages and the value targets `advantage + V`. GAE is V-trace on-policy
/// (every importance ratio 1), so this is [`vtrace`] with zero log-ratios: one
/// recursion handles episode ends for both.
pub fn gae(input: &GaeInput, gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    let on_policy = vec![0.0f32; input.rewards.len()];
    let out = vtrace(
        &VTraceInput {
            rollout_len: input.rollout_len,
            batch: input.batch,
            log_rhos: &on_policy,
            rewards: input.rewards,
            values: input.values,
            next_values: input.next_values,
            terminated: input.terminated,
            truncated: input.truncated,
        },
        &VTraceParams {
            gamma,
            lambda,
            rho_clip: 1.0,
            c_clip: 1.0,
            pg_rho_clip: 1.0,
        },
    );
    let adv = out
        .vs
        .iter()
        .zip(input.values)
        .map(|(vs, v)| vs - v)
        .collect();
    (adv, out.vs)
}

/// `R_t = r_t + gamma * R_{t+1}` within one episode (nothing after its last step).
pub fn discounted_returns(rewards: &[f32], gamma: f64) -> Vec<f64> {
    let mut out = vec![0.0f64; rewards.len()];
    let mut acc = 0.0f64;
    for t in (0..rewards.len()).rev() {
        acc = rewards[t] as f64 + gamma * acc;
        out[t] = acc;
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct GroupParams {
    /// Discount of the step returns (UI-S1 uses 0.5).
    pub gamma_step: f64,
    /// Weight of the episode-level term.
    pub w_episode: f64,
    /// Weight of the step-level term.
    pub w_step: f64,
    /// Divide both terms by their group's standard deviation (UI-S1's
    /// `mean_std_norm`); otherwise only subtract the mean (`mean_norm`).
    pub divide_by_std: bool,
    /// A group whose [`group_spread`] is at or below this is dropped.
    pub min_spread: f64,
    /// Added to the standard deviation before dividing.
    pub eps: f64,
}

impl Default for GroupParams {
    fn default() -> Self {
        Self {
            gamma_step: 0.5,
            w_episode: 1.0,
            w_step: 1.0,
            divide_by_std: true,
            min_spread: 0.0,
            eps: 1e-6,
        }
    }
}

/// One episode of a group: its step rewards (the mixed reward, for the step term
/// and the spread) and its outcome (for the episode term).
#[derive(Debug, Clone, Copy)]
pub struct GroupEpisode<'a> {
    pub rewards: &'a [f32],
    pub outcome: f64,
}

/// Population standard deviation of `xs` (0 for fewer than two).
fn spread(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// How much a group's episodes differ: the standard deviation of their (undiscounted)
/// returns of step rewards. The dynamic-sampling filter compares it with
/// [`GroupParams::min_spread`].
pub fn group_spread(episodes: &[GroupEpisode]) -> f64 {
    let totals: Vec<f64> = episodes
        .iter()
        .map(|e| e.rewards.iter().map(|&x| x as f64).sum())
        .collect();
    spread(&totals)
}

/// `x - mean`, divided by `std + eps` when `divide`, for each of `xs`; all 0 for
/// fewer than two values.
fn centred(xs: &[f64], divide: bool, eps: f64) -> Vec<f64> {
    if xs.len() < 2 {
        return vec![0.0; xs.len()];
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let scale = if divide { spread(xs) + eps } else { 1.0 };
    xs.iter().map(|x| (x - mean) / scale).collect()
}

/// UI-S1 advantages for a group of complete episodes (any lengths): one advantage
/// per step of each episode, or `None` when the group is dropped for too little
/// spread. A step index only some episodes reach is scored among those; a step
/// reached by one episode alone, like a group of one, gets no step-level term.
pub fn group_advantages(episodes: &[GroupEpisode], p: &GroupParams) -> Option<Vec<Vec<f32>>> {
    if episodes.len() >= 2 && group_spread(episodes) <= p.min_spread {
        return None;
    }
    let returns: Vec<Vec<f64>> = episodes
        .iter()
        .map(|e| discounted_returns(e.rewards, p.gamma_step))
        .collect();
    let outcomes: Vec<f64> = episodes.iter().map(|e| e.outcome).collect();
    let a_episode = centred(&outcomes, p.divide_by_std, p.eps);
    let mut out: Vec<Vec<f32>> = episodes
        .iter()
        .map(|e| vec![0.0; e.rewards.len()])
        .collect();
    let longest = episodes.iter().map(|e| e.rewards.len()).max().unwrap_or(0);
    for t in 0..longest {
        let present: Vec<usize> = (0..episodes.len())
            .filter(|&i| episodes[i].rewards.len() > t)
            .collect();
        let at_t: Vec<f64> = present.iter().map(|&i| returns[i][t]).collect();
        for (&i, a_step) in present.iter().zip(centred(&at_t, p.divide_by_std, p.eps)) {
            out[i][t] = (p.w_episode * a_episode[i] + p.w_step * a_step) as f32;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vtrace::{vtrace, VTraceInput, VTraceParams};

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn gae_by_hand_with_termination_and_truncation() {
        // One column, T = 4: steps 0-1 end by termination at step 1, steps 2-3 are a
        // new episode truncated at step 3 (final observation worth 10).
        let (g, l) = (0.9f32, 0.5f32);
        let rewards = [1.0, 2.0, 0.0, 1.0];
        let values = [0.5, 1.0, 2.0, 3.0];
        let next_values = [1.0, 99.0, 3.0, 10.0];
        let (adv, targets) = gae(
            &GaeInput {
                rollout_len: 4,
                batch: 1,
                rewards: &rewards,
                values: &values,
                next_values: &next_values,
                terminated: &[0, 1, 0, 0],
                truncated: &[0, 0, 0, 1],
            },
            g,
            l,
        );
        let d1 = 2.0 - 1.0; // terminated: no bootstrap
        let d0 = 1.0 + g * 1.0 - 0.5;
        let d3 = 1.0 + g * 10.0 - 3.0; // truncated: bootstrap from the final obs
        let d2 = 0.0 + g * 3.0 - 2.0;
        let want = [d0 + g * l * d1, d1, d2 + g * l * d3, d3];
        assert!(close(&adv, &want), "{adv:?} vs {want:?}");
        let want_targets: Vec<f32> = want.iter().zip(values).map(|(a, v)| a + v).collect();
        assert!(close(&targets, &want_targets));
    }

    #[test]
    fn gae_is_on_policy_vtrace() {
        // With the behaviour policy equal to the target, V-trace's value targets
        // minus V are GAE advantages (lambda-returns), whatever the episode ends.
        let (t_len, b) = (5, 2);
        let rewards: Vec<f32> = (0..10).map(|i| (i % 3) as f32 - 0.5).collect();
        let values: Vec<f32> = (0..10).map(|i| 0.1 * i as f32).collect();
        let next_values: Vec<f32> = (0..10).map(|i| 0.3 * i as f32 - 1.0).collect();
        let terminated = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let truncated = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let (adv, _) = gae(
            &GaeInput {
                rollout_len: t_len,
                batch: b,
                rewards: &rewards,
                values: &values,
                next_values: &next_values,
                terminated: &terminated,
                truncated: &truncated,
            },
            0.95,
            0.8,
        );
        let vt = vtrace(
            &VTraceInput {
                rollout_len: t_len,
                batch: b,
                log_rhos: &[0.0; 10],
                rewards: &rewards,
                values: &values,
                next_values: &next_values,
                terminated: &terminated,
                truncated: &truncated,
            },
            &VTraceParams {
                gamma: 0.95,
                lambda: 0.8,
                rho_clip: 1.0,
                c_clip: 1.0,
                pg_rho_clip: 1.0,
            },
        );
        let from_vtrace: Vec<f32> = vt.vs.iter().zip(&values).map(|(s, v)| s - v).collect();
        assert!(close(&adv, &from_vtrace), "{adv:?} vs {from_vtrace:?}");
    }

    #[test]
    fn discounted_returns_by_hand() {
        let r = discounted_returns(&[1.0, 0.0, 2.0], 0.5);
        assert_eq!(r, vec![1.0 + 0.25 * 2.0, 1.0, 2.0]);
    }

    fn ep(rewards: &[f32], outcome: f64) -> GroupEpisode<'_> {
        GroupEpisode { rewards, outcome }
    }

    #[test]
    fn the_step_term_compares_matching_steps() {
        let p = GroupParams {
            w_episode: 0.0,
            ..GroupParams::default()
        };
        // [1, 0] and [0, 0, 2] with gamma_s = 0.5: step returns [1, 0] and
        // [0.5, 1, 2]. Step 0: 1 vs 0.5 (+1 / -1); step 1: 0 vs 1 (-1 / +1); step 2:
        // only the second episode gets there, so nothing to compare.
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 0.0, 2.0]);
        let out = group_advantages(&[ep(&a, 0.0), ep(&b, 0.0)], &p).expect("kept");
        assert!(close(&out[0], &[1.0, -1.0]), "{:?}", out[0]);
        assert!(close(&out[1], &[-1.0, 1.0, 0.0]), "{:?}", out[1]);
        // Without the division, the terms keep the size of the return differences.
        let raw = GroupParams {
            divide_by_std: false,
            ..p
        };
        let out = group_advantages(&[ep(&a, 0.0), ep(&b, 0.0)], &raw).expect("kept");
        assert!(close(&out[0], &[0.25, -0.5]), "{:?}", out[0]);
        assert!(close(&out[1], &[-0.25, 0.5, 0.0]), "{:?}", out[1]);
    }

    #[test]
    fn the_episode_term_scores_the_outcome_not_the_step_rewards() {
        let p = GroupParams {
            w_step: 0.0,
            ..GroupParams::default()
        };
        // The first episode collected more reward (say, intrinsic) but failed; the
        // second succeeded. The episode term follows the outcome.
        let (a, b) = ([0.4f32, 0.4], [0.0f32, 0.0, 0.0]);
        let out = group_advantages(&[ep(&a, 0.0), ep(&b, 1.0)], &p).expect("kept");
        assert!(close(&out[0], &[-1.0, -1.0]), "{:?}", out[0]);
        assert!(close(&out[1], &[1.0, 1.0, 1.0]), "{:?}", out[1]);
        // Outcomes 2, 0, 1: mean 1, population std sqrt(2/3).
        let (x, y, z) = ([2.0f32], [0.0f32], [1.0f32]);
        let group = [ep(&x, 2.0), ep(&y, 0.0), ep(&z, 1.0)];
        let out = group_advantages(&group, &p).expect("kept");
        let s = (2.0f64 / 3.0).sqrt();
        let want = [(1.0 / s) as f32, (-1.0 / s) as f32, 0.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o[0] - w).abs() < 1e-4, "{out:?}");
        }
        // Weights scale the terms; with one step each, R_0 is the reward, which here
        // equals the outcome, so A_S = A_E.
        let both = GroupParams {
            w_episode: 2.0,
            w_step: 0.5,
            ..p
        };
        let out = group_advantages(&group, &both).expect("kept");
        assert!((out[0][0] - 2.5 * want[0]).abs() < 1e-4, "{out:?}");
    }

    #[test]
    fn groups_without_enough_spread_are_dropped() {
        let p = GroupParams::default();
        let same = [0.5f32, 0.5];
        // Zero spread: dropped even at the default threshold of 0, whatever the
        // outcomes say.
        assert_eq!(group_spread(&[ep(&same, 0.0), ep(&same, 1.0)]), 0.0);
        assert!(group_advantages(&[ep(&same, 0.0), ep(&same, 1.0)], &p).is_none());
        // Returns 1 and 0.6: spread 0.2. Kept below that threshold, dropped at or
        // above it.
        let (a, b) = ([1.0f32], [0.6f32]);
        let group = [ep(&a, 1.0), ep(&b, 0.0)];
        assert!((group_spread(&group) - 0.2).abs() < 1e-6);
        let at = |min_spread| GroupParams { min_spread, ..p };
        assert!(group_advantages(&group, &at(0.1)).is_some());
        assert!(group_advantages(&group, &at(0.3)).is_none());
        // A group of one has nothing to compare: kept, all zero.
        let one = [1.0f32, 2.0, 3.0];
        assert_eq!(
            group_advantages(&[ep(&one, 1.0)], &p),
            Some(vec![vec![0.0; 3]])
        );
        assert_eq!(group_advantages(&[], &p), Some(vec![]));
    }
}
