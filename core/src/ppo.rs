//! PPO's clipped surrogate (Schulman et al., 2017) with a value loss and an entropy
//! bonus. The learner passes the *proximal* policy (its own weights before the update)
//! as the reference of the ratio and corrects for the older behaviour policy inside
//! the advantages with V-trace's truncated importance weights (decoupled PPO, Hilton
//! et al., 2021). Near-on-policy data then gets ordinary PPO steps, and stale data is
//! down-weighted instead of clipped into silence.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct PpoParams {
    pub clip_eps: f64,
    pub value_coef: f64,
    pub entropy_coef: f64,
}

pub struct PpoLoss {
    /// What the optimizer minimizes.
    pub total: Tensor,
    pub policy: f64,
    pub value: f64,
    pub entropy: f64,
    /// Fraction of samples whose ratio was clipped.
    pub clip_fraction: f64,
    /// Estimated KL(reference || current) on this minibatch, `mean((r - 1) - log r)`,
    /// with `r` the ratio `exp(log_probs - reference_log_probs)`.
    pub approx_kl: f64,
}

/// All inputs are 1-D over the minibatch. `advantages` and `value_targets` carry no
/// gradient.
pub fn ppo_loss(
    log_probs: &Tensor,
    reference_log_probs: &Tensor,
    advantages: &Tensor,
    values: &Tensor,
    value_targets: &Tensor,
    entropy: &Tensor,
    p: &PpoParams,
) -> PpoLoss {
    let ratio = (log_probs - reference_log_probs).exp();
    let unclipped = &ratio * advantages;
    let clipped = ratio.clamp(1.0 - p.clip_eps, 1.0 + p.clip_eps) * advantages;
    let policy = -unclipped.minimum(&clipped).mean(Kind::Float);
    let value = (values - value_targets).square().mean(Kind::Float) * 0.5;
    let entropy = entropy.mean(Kind::Float);
    let total = &policy + &value * p.value_coef - &entropy * p.entropy_coef;
    let (clip_fraction, approx_kl) = tch::no_grad(|| {
        let clipped = (&ratio - 1.0)
            .abs()
            .gt(p.clip_eps)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let kl = ((&ratio - 1.0) - ratio.log())
            .mean(Kind::Float)
            .double_value(&[]);
        (clipped, kl)
    });
    PpoLoss {
        policy: policy.double_value(&[]),
        value: value.double_value(&[]),
        entropy: entropy.double_value(&[]),
        clip_fraction,
        approx_kl,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    const P: PpoParams = PpoParams {
        clip_eps: 0.2,
        value_coef: 0.5,
        entropy_coef: 0.01,
    };

    #[test]
    fn hand_computed_case() {
        // ratios: e^0 = 1, e^ln1.5 = 1.5 (clipped to 1.2 for a positive advantage),
        // e^ln0.5 = 0.5 (clipped to 0.8, but min keeps 0.5*-1 = -0.5 vs -0.8 -> -0.8).
        let lp = t(&[0.0, 1.5f32.ln(), 0.5f32.ln()]);
        let old = t(&[0.0, 0.0, 0.0]);
        let adv = t(&[1.0, 2.0, -1.0]);
        let values = t(&[1.0, 0.0, 2.0]);
        let targets = t(&[0.0, 0.0, 0.0]);
        let ent = t(&[0.5, 0.5, 0.5]);
        let l = ppo_loss(&lp, &old, &adv, &values, &targets, &ent, &P);
        // surrogate terms: min(1,1)=1; min(3, 2.4)=2.4; min(-0.5, -0.8)=-0.8
        let policy = -(1.0 + 2.4 - 0.8) / 3.0;
        let value = 0.5 * (1.0 + 0.0 + 4.0) / 3.0;
        assert!((l.policy - policy).abs() < 1e-6, "{}", l.policy);
        assert!((l.value - value).abs() < 1e-6);
        assert!((l.entropy - 0.5).abs() < 1e-6);
        let total = policy + 0.5 * value - 0.01 * 0.5;
        assert!((l.total.double_value(&[]) - total).abs() < 1e-6);
        assert!((l.clip_fraction - 2.0 / 3.0).abs() < 1e-6);
        // (r - 1) - ln r for r = 1, 1.5, 0.5
        let kl = ((0.5 - 1.5f64.ln()) + (-0.5 - 0.5f64.ln())) / 3.0;
        assert!((l.approx_kl - kl).abs() < 1e-6);
    }

    #[test]
    fn clipped_samples_give_no_policy_gradient() {
        let lp = t(&[1.5f32.ln()]).set_requires_grad(true);
        let old = t(&[0.0]);
        let zero = t(&[0.0]);
        let l = ppo_loss(&lp, &old, &t(&[1.0]), &zero, &zero, &zero, &P);
        l.total.backward();
        assert_eq!(lp.grad().double_value(&[0]), 0.0);
        let lp = t(&[1.1f32.ln()]).set_requires_grad(true);
        let l = ppo_loss(&lp, &old, &t(&[1.0]), &zero, &zero, &zero, &P);
        l.total.backward();
        // d(-ratio*A)/d(logp) = -ratio*A = -1.1
        assert!((lp.grad().double_value(&[0]) + 1.1).abs() < 1e-5);
    }
}
