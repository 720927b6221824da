//! PPO's loss for the feedforward MLP actor-critic (separate tanh MLPs for the policy
//! and the critic, `ActorCritic::mlp_layers`) with its gradients in closed form
//! instead of through autograd.
//!
//! With small networks (CartPole's 64x64 MLPs, 256-row minibatches) an update is
//! libtorch's per-call cost as much as arithmetic: autograd records a node for every
//! forward call and runs one or more calls per node backwards. Here the backward pass
//! is written out: per layer one product for the weights' gradient, one sum for the
//! bias's, and one product with `tanh_backward` for the layer below, written straight
//! into the variables' gradients (the optimizer's flat buffer). Between the networks'
//! outputs and their gradients, PPO's loss (`ppo::ppo_loss`'s terms and figures) is a
//! few arithmetic operations per row: plain loops over the rows do them, where
//! libtorch took some forty calls of a few microseconds each.
//!
//! The policy's and the critic's MLPs share nothing, and neither do their terms of
//! the loss, so a step is two halves ([`Mlp::policy_step`], [`Mlp::value_step`])
//! that may run at once on two threads, each writing its own variables' gradients
//! (the learner's lock-step update does so).
//!
//! The gradients (derivations in the comments) are autograd's up to float rounding;
//! the tests compare every variable's gradient with autograd's.

use tch::{nn, Kind, Tensor};

use crate::model::f32_vec;
use crate::ppo::{PpoLoss, PpoParams};

/// One MLP's forward pass, kept for its backward pass.
struct Net<'a> {
    layers: &'a [nn::Linear],
    /// Each layer's input: the observations, then the tanh outputs.
    inputs: Vec<Tensor>,
}

impl<'a> Net<'a> {
    /// Runs `layers` on `x` (tanh after every layer but the last); returns the pass
    /// and the last layer's output.
    fn forward(layers: &'a [nn::Linear], x: &Tensor) -> (Self, Tensor) {
        let last = layers.len() - 1;
        let mut inputs = Vec::with_capacity(layers.len());
        let mut h = x.shallow_clone();
        for (i, nn::Linear { ws, bs }) in layers.iter().enumerate() {
            // What `nn::Linear` computes for a 2-D input.
            let z = match bs {
                Some(b) => b.addmm(&h, &ws.tr()),
                None => h.mm(&ws.tr()),
            };
            inputs.push(h);
            h = if i < last { z.tanh() } else { z };
        }
        (Self { layers, inputs }, h)
    }

    /// Writes every layer's gradient, given `dz`, the loss's gradient at the last
    /// layer's output. For a layer `z = h W^T + b`: dW = dz^T h, db = the column sums
    /// of dz, dh = dz W; below a tanh layer (`h = tanh(z')`) dz' = dh (1 - h^2).
    fn backward(&self, mut dz: Tensor) {
        for i in (0..self.layers.len()).rev() {
            let nn::Linear { ws, bs } = &self.layers[i];
            let input = &self.inputs[i];
            let _ = dz.tr().mm_out(&ws.grad(), input);
            if let Some(b) = bs {
                let _ = dz.sum_intlist_out(&b.grad(), [0i64].as_slice(), false, Kind::Float);
            }
            if i > 0 {
                dz = Tensor::tanh_backward(&dz.mm(ws), input);
            }
        }
    }
}

/// What a minibatch step reads: the observations, and per row the action, the
/// `proximal` policy's log-probability, the (normalised) advantage and the value
/// target.
pub struct Rows {
    pub obs: Tensor,
    pub actions: Vec<i64>,
    pub proximal: Vec<f32>,
    pub advantages: Vec<f32>,
    pub targets: Vec<f32>,
}

/// One minibatch step of the feedforward MLP (`ActorCritic::mlp_layers`' `policy`
/// and `value`): the forward passes and PPO's loss, and every variable's gradient
/// written (replacing what was there). The caller checks that the loss is finite
/// before stepping the optimizer.
pub fn step(
    (policy, value): (&[nn::Linear], &[nn::Linear]),
    rows: &Rows,
    params: &PpoParams,
) -> PpoLoss {
    let p = *params;
    let policy = policy_half(policy, rows, &p);
    let value = value_half(value, rows, &p);
    let total = policy.surrogate + p.value_coef * value - p.entropy_coef * policy.entropy;
    PpoLoss {
        total: Tensor::from(total as f32),
        policy: policy.surrogate,
        value,
        entropy: policy.entropy,
        clip_fraction: policy.clip_fraction,
        approx_kl: policy.approx_kl,
    }
}

/// The policy's terms of the loss, as `ppo::ppo_loss` reports them.
#[derive(Clone, Copy, Debug)]
pub struct PolicyFigures {
    pub surrogate: f64,
    pub entropy: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
}

/// One of the two MLPs (shallow clones: the same variables), to run one half of
/// [`step`] on a thread of its own.
pub struct Mlp(Vec<nn::Linear>);

impl Mlp {
    pub fn of(layers: &[nn::Linear]) -> Self {
        let clone = |l: &nn::Linear| nn::Linear {
            ws: l.ws.shallow_clone(),
            bs: l.bs.as_ref().map(Tensor::shallow_clone),
        };
        Self(layers.iter().map(clone).collect())
    }

    /// The policy's half of [`step`] with this MLP as the policy: its forward pass,
    /// its terms of the loss and its variables' gradients (written, replacing what
    /// was there).
    pub fn policy_step(&self, rows: &Rows, params: &PpoParams) -> PolicyFigures {
        policy_half(&self.0, rows, params)
    }

    /// The critic's half of [`step`] with this MLP as the critic: its forward pass,
    /// the value term of the loss (returned) and its variables' gradients.
    pub fn value_step(&self, rows: &Rows, params: &PpoParams) -> f64 {
        value_half(&self.0, rows, params)
    }
}

/// The policy's forward pass, its terms of the loss and its gradients.
fn policy_half(layers: &[nn::Linear], rows: &Rows, p: &PpoParams) -> PolicyFigures {
    tch::no_grad(|| {
        let (net, logits) = Net::forward(layers, &rows.obs);
        let [n, a] = logits.size()[..] else {
            panic!("logits are [rows, actions]")
        };
        let mut z = f32_vec(&logits);
        let figures = policy_head(&mut z, a as usize, rows, p);
        net.backward(
            Tensor::from_slice(&z)
                .view([n, a])
                .to_device(logits.device()),
        );
        figures
    })
}

/// PPO's policy terms from the logits `z` (`[n, a]`, row-major), which become their
/// gradient. Per row, with log-probabilities lp = log_softmax(z) and probabilities
/// p = exp(lp), the ratio r = exp(lp[action] - proximal) and advantage A:
/// - surrogate -mean(min(r A, clip(r) A)): its gradient at lp[action] is -r A / N
///   where the unclipped term is the smaller (on a tie autograd's min splits it
///   between the two terms, and the clipped term passes all of it on as long as r is
///   inside the clip range, where a tie happens unless A = 0), and 0 where the
///   clipped term is smaller (r is then outside the range, where the clip's gradient
///   is 0); through lp = log_softmax(z)[action], d lp / d z_k = [k = action] - p_k;
/// - entropy H = -sum_k p_k lp_k, its term -c mean(H): dH / dz_k = -p_k (lp_k + H).
fn policy_head(z: &mut [f32], a: usize, rows: &Rows, p: &PpoParams) -> PolicyFigures {
    let Rows {
        actions,
        proximal,
        advantages,
        ..
    } = rows;
    let n = actions.len();
    let (lo, hi) = ((1.0 - p.clip_eps) as f32, (1.0 + p.clip_eps) as f32);
    let (mut surrogate, mut entropy, mut clipped_rows, mut kl) = (0f64, 0f64, 0usize, 0f64);
    // Per row: the log-probabilities, and the probabilities (each logit's exp once).
    let (mut lp, mut prob) = (vec![0f32; a], vec![0f32; a]);
    for (i, row) in z.chunks_exact_mut(a).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for (e, &x) in prob.iter_mut().zip(row.iter()) {
            *e = (x - max).exp();
        }
        let sum = prob.iter().sum::<f32>();
        let log_sum = sum.ln() + max;
        for ((l, e), &x) in lp.iter_mut().zip(prob.iter_mut()).zip(row.iter()) {
            *l = x - log_sum;
            *e /= sum;
        }
        let h = -prob.iter().zip(&lp).map(|(&p, &l)| p * l).sum::<f32>();
        let act = actions[i] as usize;
        let log_ratio = lp[act] - proximal[i];
        let ratio = log_ratio.exp();
        let unclipped = ratio * advantages[i];
        let clipped = ratio.clamp(lo, hi) * advantages[i];
        surrogate -= unclipped.min(clipped) as f64;
        entropy += h as f64;
        clipped_rows += ((ratio - 1.0).abs() > p.clip_eps as f32) as usize;
        kl += ((ratio - 1.0) - log_ratio) as f64;
        let g = if unclipped <= clipped {
            -unclipped / n as f32
        } else {
            0.0
        };
        let c = (p.entropy_coef / n as f64) as f32;
        for (k, ((dz, &l), &prob)) in row.iter_mut().zip(&lp).zip(&prob).enumerate() {
            *dz = -prob * g + if k == act { g } else { 0.0 };
            if c != 0.0 {
                *dz += prob * (l + h) * c;
            }
        }
    }
    let n = n as f64;
    PolicyFigures {
        surrogate: surrogate / n,
        entropy: entropy / n,
        clip_fraction: clipped_rows as f64 / n,
        approx_kl: kl / n,
    }
}

/// The critic's forward pass, the value term of the loss and its gradients: the
/// term c/2 mean((v - target)^2) has the gradient c (v - target) / N at v.
fn value_half(layers: &[nn::Linear], rows: &Rows, p: &PpoParams) -> f64 {
    tch::no_grad(|| {
        let (net, values) = Net::forward(layers, &rows.obs);
        let mut v = f32_vec(&values);
        let n = v.len() as f64;
        let c = (p.value_coef / n) as f32;
        let mut sum = 0f64;
        for (v, &t) in v.iter_mut().zip(&rows.targets) {
            let d = *v - t;
            sum += (d * d) as f64;
            *v = c * d;
        }
        net.backward(
            Tensor::from_slice(&v)
                .view([-1, 1])
                .to_device(values.device()),
        );
        0.5 * sum / n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adam::Adam;
    use crate::model::ActorCritic;
    use crate::ppo::ppo_loss;
    use tch::Device;

    /// Every variable's gradient as a flat vector, in the store's name order.
    fn gradients(model: &ActorCritic) -> Vec<(String, Vec<f32>)> {
        let mut vars = model
            .var_store()
            .variables()
            .into_iter()
            .collect::<Vec<_>>();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter()
            .map(|(name, v)| (name, crate::model::f32_vec(&v.grad())))
            .collect()
    }

    /// A minibatch whose ratios fall on both sides of the clip range, with both
    /// signs of advantage.
    struct Case {
        obs: Tensor,
        actions: Tensor,
        proximal: Tensor,
        advantages: Tensor,
        targets: Tensor,
    }

    impl Case {
        /// The same rows as the closed form reads them.
        fn rows(&self) -> Rows {
            Rows {
                obs: self.obs.shallow_clone(),
                actions: Vec::try_from(&self.actions).expect("i64 actions"),
                proximal: f32_vec(&self.proximal),
                advantages: f32_vec(&self.advantages),
                targets: f32_vec(&self.targets),
            }
        }
    }

    fn case(model: &ActorCritic, n: i64, obs_dim: i64, num_actions: i64) -> Case {
        let obs = Tensor::randn([n, obs_dim], (Kind::Float, Device::Cpu));
        let actions = Tensor::randint(num_actions, [n], (Kind::Int64, Device::Cpu));
        let current = tch::no_grad(|| model.evaluate(&obs, &actions).log_probs.detach());
        // Reference log-probabilities off by up to +-0.5: ratios from 0.6 to 1.65.
        let proximal = &current + (Tensor::rand([n], (Kind::Float, Device::Cpu)) - 0.5);
        Case {
            obs,
            actions,
            proximal,
            advantages: Tensor::randn([n], (Kind::Float, Device::Cpu)),
            targets: Tensor::randn([n], (Kind::Float, Device::Cpu)),
        }
    }

    #[test]
    fn closed_form_gradients_match_autograd() {
        tch::manual_seed(7);
        for (hidden, entropy_coef) in [(vec![64u32, 64], 0.0), (vec![32, 16, 8], 0.2)] {
            let (obs_dim, num_actions) = (5, 3);
            let model = ActorCritic::new(obs_dim, num_actions, &hidden, Device::Cpu);
            // A fresh policy is near uniform, where the entropy's gradient vanishes:
            // undo the last layer's scaling so that every term has a gradient.
            tch::no_grad(|| {
                let (policy, _) = model.mlp_layers().expect("the MLP");
                let _ = policy
                    .last()
                    .unwrap()
                    .ws
                    .shallow_clone()
                    .g_mul_scalar_(100.0);
            });
            // The optimizer gives every variable a gradient (views of its buffer).
            let mut opt = Adam::new(model.var_store(), 1e-3, 1e-5);
            let params = PpoParams {
                clip_eps: 0.2,
                value_coef: 0.5,
                entropy_coef,
            };
            let c = case(&model, 256, obs_dim as i64, num_actions as i64);

            opt.zero_grad();
            let eval = model.evaluate(&c.obs, &c.actions);
            let auto = ppo_loss(
                &eval.log_probs,
                &c.proximal,
                &c.advantages,
                &eval.values,
                &c.targets,
                &eval.entropy,
                &params,
            );
            auto.total.backward();
            let expected = gradients(&model);

            // Garbage first: the closed form must replace, not add to, what is there.
            tch::no_grad(|| {
                for (_, v) in model.var_store().variables() {
                    let _ = v.grad().fill_(3.0);
                }
            });
            let loss = step(model.mlp_layers().expect("the MLP"), &c.rows(), &params);
            assert!(
                loss.clip_fraction > 0.1 && loss.clip_fraction < 0.9,
                "both clipped and unclipped samples: {}",
                loss.clip_fraction
            );
            for (got, want) in [
                (loss.total.double_value(&[]), auto.total.double_value(&[])),
                (loss.policy, auto.policy),
                (loss.value, auto.value),
                (loss.entropy, auto.entropy),
                (loss.approx_kl, auto.approx_kl),
            ] {
                assert!((got - want).abs() < 1e-6, "{got} against {want}");
            }
            let got = gradients(&model);
            assert_eq!(got.len(), expected.len());
            for ((name, g), (_, e)) in got.iter().zip(&expected) {
                let scale = e.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                for (i, (a, b)) in g.iter().zip(e).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{hidden:?}: {name}[{i}]: closed form {a}, autograd {b}"
                    );
                }
                assert!(e.iter().any(|&x| x != 0.0), "{name}: a gradient to compare");
            }
        }
    }

    /// A row whose advantage or target is NaN makes the loss not finite, so the
    /// learner skips the step; the same rows without it give a finite loss.
    #[test]
    fn a_nan_in_a_row_makes_the_loss_not_finite() {
        tch::manual_seed(3);
        let model = ActorCritic::new(4, 2, &[16, 16], Device::Cpu);
        let _opt = Adam::new(model.var_store(), 1e-3, 1e-5);
        let params = PpoParams {
            clip_eps: 0.2,
            value_coef: 0.5,
            entropy_coef: 0.01,
        };
        let layers = model.mlp_layers().expect("the MLP");
        let rows = case(&model, 32, 4, 2).rows();
        let total = |rows: &Rows| step(layers, rows, &params).total.double_value(&[]);
        assert!(total(&rows).is_finite());
        let mut bad = case(&model, 32, 4, 2).rows();
        bad.advantages[7] = f32::NAN;
        assert!(!total(&bad).is_finite(), "a NaN advantage");
        let mut bad = rows;
        bad.targets[31] = f32::NAN;
        assert!(!total(&bad).is_finite(), "a NaN target");
    }
}
