//! PPO's loss for the feedforward MLP actor-critic (separate tanh MLPs for the policy
//! and the critic, `ActorCritic::mlp_layers`) with its gradients in closed form
//! instead of through autograd.
//!
//! With small networks (CartPole's 64x64 MLPs, 256-row minibatches) an update is
//! libtorch's per-call cost, not arithmetic: autograd records a node for every
//! forward call and runs one or more calls per node backwards. Here the backward pass
//! is written out: the loss's gradient at the logits and at the value, then per
//! layer one product for the weights' gradient, one sum for the bias's, and one
//! product with `tanh_backward` for the layer below, written straight into the
//! variables' gradients (the optimizer's flat buffer). The loss and its statistics
//! are `ppo::ppo_loss`'s, computed on the same tensors.
//!
//! The gradients (derivations in the comments) are autograd's up to float rounding;
//! the tests compare every variable's gradient with autograd's.

use tch::{nn, Kind, Tensor};

use crate::model::ActorCritic;
use crate::ppo::{ppo_loss, PpoLoss, PpoParams};

/// One MLP's forward pass, kept for its backward pass.
struct Net {
    /// Each layer's weight and bias (shallow clones: the same variables).
    layers: Vec<(Tensor, Option<Tensor>)>,
    /// Each layer's input: the observations, then the tanh outputs.
    inputs: Vec<Tensor>,
}

impl Net {
    /// Runs `layers` on `x` (tanh after every layer but the last); returns the pass
    /// and the last layer's output.
    fn forward(layers: &[nn::Linear], x: &Tensor) -> (Self, Tensor) {
        let last = layers.len() - 1;
        let mut inputs = Vec::with_capacity(layers.len());
        let mut h = x.shallow_clone();
        for (i, l) in layers.iter().enumerate() {
            // What `nn::Linear` computes for a 2-D input.
            let z = match &l.bs {
                Some(b) => b.addmm(&h, &l.ws.tr()),
                None => h.mm(&l.ws.tr()),
            };
            inputs.push(h);
            h = if i < last { z.tanh() } else { z };
        }
        let layers = layers
            .iter()
            .map(|l| {
                (
                    l.ws.shallow_clone(),
                    l.bs.as_ref().map(Tensor::shallow_clone),
                )
            })
            .collect();
        (Self { layers, inputs }, h)
    }

    /// Writes every layer's gradient, given `dz`, the loss's gradient at the last
    /// layer's output. For a layer `z = h W^T + b`: dW = dz^T h, db = the column sums
    /// of dz, dh = dz W; below a tanh layer (`h = tanh(z')`) dz' = dh (1 - h^2).
    fn backward(&self, mut dz: Tensor) {
        for i in (0..self.layers.len()).rev() {
            let (ws, bs) = &self.layers[i];
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

/// One minibatch's forward pass and loss; [`write_gradients`](Self::write_gradients)
/// then fills in the variables' gradients.
pub struct MlpPass {
    policy: Net,
    value: Net,
    /// Log-probabilities of every action, `[N, A]`.
    log_p: Tensor,
    /// Per-row entropies, `[N]`.
    entropy: Tensor,
    values: Tensor,
    actions: Tensor,
    advantages: Tensor,
    targets: Tensor,
    params: PpoParams,
    /// `ppo_loss`'s loss and statistics (no gradient attached).
    pub loss: PpoLoss,
}

impl MlpPass {
    /// The forward pass of `policy` and `value` (as `ActorCritic::mlp_layers` returns
    /// them) over `obs` and PPO's loss: `actions`, `proximal` log-probabilities,
    /// (normalized) `advantages` and value `targets` are 1-D over the rows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (policy, value): (&[nn::Linear], &[nn::Linear]),
        obs: &Tensor,
        actions: &Tensor,
        proximal: &Tensor,
        advantages: &Tensor,
        targets: &Tensor,
        params: &PpoParams,
    ) -> Self {
        tch::no_grad(|| {
            let (policy, logits) = Net::forward(policy, obs);
            let (value, values) = Net::forward(value, obs);
            let eval = ActorCritic::evaluation(&logits, values.squeeze_dim(-1), actions);
            let loss = ppo_loss(
                &eval.log_probs,
                proximal,
                advantages,
                &eval.values,
                targets,
                &eval.entropy,
                params,
            );
            Self {
                policy,
                value,
                log_p: eval.all_log_probs,
                entropy: eval.entropy,
                values: eval.values,
                actions: actions.shallow_clone(),
                advantages: advantages.shallow_clone(),
                targets: targets.shallow_clone(),
                params: *params,
                loss,
            }
        })
    }

    /// Writes the loss's gradient into every variable of both MLPs (replacing what
    /// was there).
    pub fn write_gradients(&self) {
        tch::no_grad(|| {
            let p = &self.params;
            let n = self.log_p.size()[0] as f64;
            // Policy term, -mean(min(r A, clip(r) A)) with r = exp(lp - lp_ref): its
            // gradient at lp is -r A / N where the unclipped term is the smaller (on
            // a tie autograd's min splits it between the two terms, and the clipped
            // term passes all of it on as long as r is inside the clip range, where a
            // tie happens unless A = 0), and 0 where the clipped term is smaller (r
            // is then outside the range, where the clip's gradient is 0).
            let unclipped = &self.loss.ratio * &self.advantages;
            let clipped =
                self.loss.ratio.clamp(1.0 - p.clip_eps, 1.0 + p.clip_eps) * &self.advantages;
            let g = unclipped.where_scalarother(&unclipped.le_tensor(&clipped), 0.0) * (-1.0 / n);
            // lp = log_softmax(z)[a]: d lp / d z_k = [k = a] - p_k.
            let probs = self.log_p.exp();
            let g = g.unsqueeze(1);
            let mut dlogits = -(&probs * &g);
            let _ = dlogits.scatter_add_(1, &self.actions.unsqueeze(1), &g);
            if p.entropy_coef != 0.0 {
                // Entropy term, -c mean(H) with H = -sum_k p_k lp_k: dH / dz_k =
                // -p_k (lp_k + H).
                dlogits += probs * (&self.log_p + self.entropy.unsqueeze(1)) * (p.entropy_coef / n);
            }
            // Value term, c/2 mean((v - target)^2): c (v - target) / N.
            let dvalues = ((&self.values - &self.targets) * (p.value_coef / n)).unsqueeze(1);
            self.policy.backward(dlogits);
            self.value.backward(dvalues);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adam::Adam;
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
            let pass = MlpPass::new(
                model.mlp_layers().expect("the MLP"),
                &c.obs,
                &c.actions,
                &c.proximal,
                &c.advantages,
                &c.targets,
                &params,
            );
            assert!(
                pass.loss.clip_fraction > 0.1 && pass.loss.clip_fraction < 0.9,
                "both clipped and unclipped samples: {}",
                pass.loss.clip_fraction
            );
            assert!(
                (pass.loss.total.double_value(&[]) - auto.total.double_value(&[])).abs() < 1e-6
            );
            pass.write_gradients();
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
}
