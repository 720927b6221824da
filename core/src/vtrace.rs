//! V-trace (Espeholt et al., 2018, IMPALA): off-policy corrected value targets and
//! policy-gradient advantages, over time-major `[T, B]` arrays.
//!
//! Episode ends are handled per step: a *terminated* step has no future (its next value
//! counts as 0), while a *truncated* step bootstraps from the value of its final
//! observation. In both cases the trace stops there and does not reach into the next
//! episode, which follows in the same column.
//!
//! With `rho = exp(log_rho)`, `rho_bar = min(rho_clip, rho)`, `c = lambda * min(c_clip, rho)`:
//!
//! ```text
//! delta_t = rho_bar_t * (r_t + gamma_t * next_value_t - V_t)
//! vs_t    = V_t + delta_t + gamma * cont_t * c_t * (vs_{t+1} - V_{t+1})
//! adv_t   = min(pg_rho_clip, rho_t) * (r_t + gamma_t * next_vs_t - V_t)
//! ```
//!
//! where `gamma_t` is 0 on termination, `cont_t` is 0 on any episode end and at the
//! last step, and `next_vs_t` is `vs_{t+1}` inside an episode, else `next_value_t`.

/// Inputs, each of length `T * B` in time-major order.
pub struct VTraceInput<'a> {
    pub rollout_len: usize,
    pub batch: usize,
    /// `log pi(a|x) - log mu(a|x)` (target minus behaviour).
    pub log_rhos: &'a [f32],
    pub rewards: &'a [f32],
    /// `V(x_t)` under the current critic.
    pub values: &'a [f32],
    /// Value of the state after step t in the same episode: `V(x_{t+1})`, or the value
    /// of the final observation when step t was truncated, or anything when terminated.
    pub next_values: &'a [f32],
    pub terminated: &'a [u8],
    pub truncated: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
pub struct VTraceParams {
    pub gamma: f32,
    pub lambda: f32,
    pub rho_clip: f32,
    pub c_clip: f32,
    pub pg_rho_clip: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VTraceOutput {
    /// Value targets `vs_t`.
    pub vs: Vec<f32>,
    /// Policy-gradient advantages.
    pub pg_advantages: Vec<f32>,
}

pub fn vtrace(input: &VTraceInput, p: &VTraceParams) -> VTraceOutput {
    let (t_len, b) = (input.rollout_len, input.batch);
    let n = t_len * b;
    for len in [
        input.log_rhos.len(),
        input.rewards.len(),
        input.values.len(),
        input.next_values.len(),
        input.terminated.len(),
        input.truncated.len(),
    ] {
        assert_eq!(len, n, "every V-trace input holds T * B values");
    }
    let mut vs = vec![0.0f32; n];
    let mut adv = vec![0.0f32; n];
    // acc[j] = vs_{t+1} - V_{t+1} for column j while walking backwards.
    let mut acc = vec![0.0f32; b];
    for t in (0..t_len).rev() {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let i = t * b + j;
            let rho = input.log_rhos[i].exp();
            let rho_bar = rho.min(p.rho_clip);
            let c = p.lambda * rho.min(p.c_clip);
            let terminated = input.terminated[i] == 1;
            let ended = terminated || input.truncated[i] == 1;
            let disc = if terminated { 0.0 } else { p.gamma };
            let v = input.values[i];
            let next_v = input.next_values[i];
            let delta = rho_bar * (input.rewards[i] + disc * next_v - v);
            let inside = !ended && t + 1 < t_len;
            let carry = if inside { *acc_j } else { 0.0 };
            let a = delta + p.gamma * c * carry;
            vs[i] = v + a;
            let next_vs = if inside { next_v + carry } else { next_v };
            adv[i] = rho.min(p.pg_rho_clip) * (input.rewards[i] + disc * next_vs - v);
            *acc_j = a;
        }
    }
    VTraceOutput {
        vs,
        pg_advantages: adv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: VTraceParams = VTraceParams {
        gamma: 0.9,
        lambda: 1.0,
        rho_clip: 1.0,
        c_clip: 1.0,
        pg_rho_clip: 1.0,
    };

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} != {b:?}");
        }
    }

    /// On-policy, no episode end: vs is the bootstrapped discounted return.
    #[test]
    fn on_policy_is_n_step_return() {
        // T = 3, B = 1; V = [1, 2, 3], bootstrap V(x_3) = 4.
        let out = vtrace(
            &VTraceInput {
                rollout_len: 3,
                batch: 1,
                log_rhos: &[0.0; 3],
                rewards: &[1.0, 0.0, 2.0],
                values: &[1.0, 2.0, 3.0],
                next_values: &[2.0, 3.0, 4.0],
                terminated: &[0; 3],
                truncated: &[0; 3],
            },
            &P,
        );
        // vs_2 = 2 + 0.9*4 = 5.6; vs_1 = 0 + 0.9*5.6 = 5.04; vs_0 = 1 + 0.9*5.04 = 5.536
        close(&out.vs, &[5.536, 5.04, 5.6]);
        // adv_t = r_t + gamma * vs_{t+1} - V_t
        close(&out.pg_advantages, &[5.536 - 1.0, 5.04 - 2.0, 5.6 - 3.0]);
    }

    /// Termination: no bootstrap and no trace into the next episode.
    #[test]
    fn termination_cuts_value_and_trace() {
        let out = vtrace(
            &VTraceInput {
                rollout_len: 3,
                batch: 1,
                log_rhos: &[0.0; 3],
                rewards: &[1.0, 1.0, 5.0],
                values: &[1.0, 2.0, 3.0],
                // step 1 ends the episode; its next value must be ignored
                next_values: &[2.0, 100.0, 4.0],
                terminated: &[0, 1, 0],
                truncated: &[0; 3],
            },
            &P,
        );
        // vs_2 = 5 + 0.9*4 = 8.6 (new episode); vs_1 = 1; vs_0 = 1 + 0.9*1 = 1.9
        close(&out.vs, &[1.9, 1.0, 8.6]);
        close(&out.pg_advantages, &[1.9 - 1.0, 1.0 - 2.0, 8.6 - 3.0]);
    }

    /// Truncation: bootstrap from the final observation's value, still no trace.
    #[test]
    fn truncation_bootstraps_from_final_observation() {
        let out = vtrace(
            &VTraceInput {
                rollout_len: 3,
                batch: 1,
                log_rhos: &[0.0; 3],
                rewards: &[1.0, 1.0, 5.0],
                values: &[1.0, 2.0, 3.0],
                next_values: &[2.0, 10.0, 4.0],
                terminated: &[0; 3],
                truncated: &[0, 1, 0],
            },
            &P,
        );
        // vs_1 = 1 + 0.9*10 = 10; vs_0 = 1 + 0.9*10 = 10
        close(&out.vs, &[10.0, 10.0, 8.6]);
        close(&out.pg_advantages, &[9.0, 8.0, 5.6]);
    }

    /// Policy lag: importance weights are clipped, and a rare action (rho < 1) cuts
    /// the trace proportionally.
    #[test]
    fn clips_importance_weights_under_policy_lag() {
        let log_rhos = [(2.0f32).ln(), (0.5f32).ln()];
        let out = vtrace(
            &VTraceInput {
                rollout_len: 2,
                batch: 1,
                log_rhos: &log_rhos,
                rewards: &[1.0, 1.0],
                values: &[0.0, 0.0],
                next_values: &[0.0, 2.0],
                terminated: &[0, 0],
                truncated: &[0, 0],
            },
            &P,
        );
        // t=1: rho=0.5: delta_1 = 0.5*(1 + 1.8 - 0) = 1.4, vs_1 = 1.4
        // t=0: rho=2 -> rho_bar=1, c=1: delta_0 = 1*(1 + 0 - 0) = 1; vs_0 = 1 + 0.9*1*1.4 = 2.26
        close(&out.vs, &[2.26, 1.4]);
        // adv_1 = 0.5*(1 + 1.8) = 1.4; adv_0 = min(1,2)*(1 + 0.9*1.4) = 2.26
        close(&out.pg_advantages, &[2.26, 1.4]);
    }

    /// Columns are independent.
    #[test]
    fn batch_columns_do_not_mix() {
        let out = vtrace(
            &VTraceInput {
                rollout_len: 2,
                batch: 2,
                log_rhos: &[0.0; 4],
                rewards: &[1.0, 0.0, 1.0, 0.0],
                values: &[0.0; 4],
                next_values: &[0.0, 0.0, 0.0, 1.0],
                terminated: &[0; 4],
                truncated: &[0; 4],
            },
            &P,
        );
        close(&out.vs, &[1.9, 0.81, 1.0, 0.9]);
    }
}
