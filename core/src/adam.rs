//! Adam with its state in the open: the learner checkpoints the first and second
//! moments and the step count next to the weights, so a resumed run takes the same
//! steps an uninterrupted one would. (tch's optimizer keeps its state inside libtorch,
//! out of reach of a checkpoint.) The update is PyTorch's Adam without weight decay,
//! and gradient clipping is `clip_grad_norm_`'s: one scale for all gradients when
//! their joint L2 norm exceeds the limit.
//!
//! Every trainable variable's data, and its gradient, live in one flat buffer each
//! (the variables and gradients are views into them), so zeroing, clipping and the
//! update are a handful of libtorch calls over the whole model instead of about ten
//! per tensor. With a small network (the CartPole MLPs: 12 tensors, 256-step
//! minibatches) those per-call costs, not arithmetic, are most of an update. On the
//! CPU the clipping norm and the update are plain loops over the buffers, one pass
//! each: libtorch's calls each made a pass of their own (eight for the update), which
//! for a large network (NetHack's) is memory traffic, for a small one per-call cost.

use std::collections::HashMap;
use std::ops::Range;

use safetensors::SafeTensors;
use tch::{nn, Device, Kind, Tensor};

use crate::error::ModelError;
use crate::model::read_f32_tensor;

/// Metadata key of the optimizer's step count in a checkpoint.
pub const STEP_KEY: &str = "spur.adam_step";
/// Tensor name prefixes of the moments in a checkpoint.
const M_PREFIX: &str = "adam.m/";
const V_PREFIX: &str = "adam.v/";

/// Where one variable sits in the flat buffers.
struct Slot {
    name: String,
    shape: Vec<i64>,
    offset: i64,
}

impl Slot {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
    slots: Vec<Slot>,
    /// Every trainable variable's data, back to back (the variables are views).
    params: Tensor,
    /// Their gradients, likewise.
    grads: Tensor,
    m: Tensor,
    v: Tensor,
}

impl Adam {
    /// Adam over `vs`'s trainable variables, which it moves into one flat buffer
    /// (their values do not change; their gradients become views of a second one).
    pub fn new(vs: &nn::VarStore, lr: f64, eps: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            // Every spur policy's trainable variables are float32 (weights travel
            // as f32); another kind would not fit the flat buffer's views.
            .filter(|(_, t)| t.requires_grad() && t.kind() == Kind::Float)
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let total: i64 = vars.iter().map(|(_, t)| t.numel() as i64).sum();
        let options = (Kind::Float, vs.device());
        let params = Tensor::zeros([total], options);
        let grads = Tensor::zeros([total], options);
        let mut slots = Vec::with_capacity(vars.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for (name, var) in &mut vars {
                let slot = Slot {
                    name: name.clone(),
                    shape: var.size(),
                    offset,
                };
                let mut data = Self::part(&params, &slot);
                data.copy_(var);
                var.set_data(&data);
                offset += var.numel() as i64;
                slots.push(slot);
            }
        });
        // Give every variable a gradient (zeros, from a backward pass through nothing
        // but them), then point each at its slice of `grads`: backward passes add
        // into a gradient that is already there in place.
        tch::with_grad(|| {
            if let Some(sum) = vars
                .iter()
                .map(|(_, v)| v.sum(Kind::Float) * 0.0)
                .reduce(|a, b| a + b)
            {
                sum.backward();
            }
        });
        tch::no_grad(|| {
            for ((_, var), slot) in vars.iter().zip(&slots) {
                var.grad().set_data(&Self::part(&grads, slot));
            }
        });
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps,
            step: 0,
            m: grads.zeros_like(),
            v: grads.zeros_like(),
            slots,
            params,
            grads,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        let _ = self.grads.zero_();
    }

    /// Scales all gradients down together so their joint L2 norm is at most
    /// `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        if let Some(mut all) = self.host() {
            let norm = all.sum_of_squares().sqrt();
            all.scale_grads(clip_coef(norm, max_norm));
            return norm;
        }
        self.clip_tensors(max_norm)
    }

    /// [`clip_grad_norm`](Self::clip_grad_norm) in libtorch calls, on any device.
    fn clip_tensors(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let norm = self.grads.norm().double_value(&[]);
            let coef = clip_coef(norm, max_norm);
            if coef < 1.0 {
                let _ = self.grads.g_mul_scalar_(coef);
            }
            norm
        })
    }

    pub fn step(&mut self) {
        if let Some(mut all) = self.host() {
            all.step();
            self.step += 1;
            return;
        }
        self.step += 1;
        self.step_tensors();
    }

    /// The update of [`step`](Self::step) (its count already advanced) in libtorch
    /// calls, on any device.
    fn step_tensors(&mut self) {
        let (step_size, bc2_sqrt) = bias_corrected(self.lr, (self.beta1, self.beta2), self.step);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        tch::no_grad(|| {
            let _ = self.m.lerp_(&self.grads, 1.0 - b1);
            let _ = self.v.lerp_(&self.grads.square(), 1.0 - b2);
            let mut denom = self.v.sqrt();
            let _ = denom
                .g_div_scalar_(bc2_sqrt)
                .g_add_scalar_(eps)
                .g_div_scalar_(-step_size);
            let _ = self.params.addcdiv_(&self.m, &denom);
        });
    }

    /// The flat buffers (parameters, gradients, first and second moments) on the CPU;
    /// `None` on another device.
    fn host(&mut self) -> Option<HostPart<'_>> {
        if !self.on_cpu() {
            return None;
        }
        let n = self.params.numel();
        let buffers = [&self.params, &self.grads, &self.m, &self.v];
        for b in buffers {
            assert!(
                b.kind() == Kind::Float && b.is_contiguous() && b.numel() == n,
                "Adam's flat buffers are contiguous float32 of one length"
            );
        }
        // SAFETY: each buffer is a contiguous float32 CPU tensor of `n` elements (just
        // checked) that this optimizer allocated on its own (`zeros`, `zeros_like`), so
        // the four slices do not overlap. The variables
        // and their gradients are views of `params` and `grads`; `&mut self` is held
        // for as long as the slices live, and the learner reads or writes the
        // variables only between the optimizer's calls, or (see `split_host`) each
        // thread only its own part's.
        let [params, grads, m, v] =
            buffers.map(|b| unsafe { std::slice::from_raw_parts_mut(b.data_ptr() as *mut f32, n) });
        Some(HostPart {
            params,
            grads,
            m,
            v,
            lr: self.lr,
            betas: (self.beta1, self.beta2),
            eps: self.eps,
            step: self.step,
        })
    }

    /// Whether the buffers live on the CPU (where [`split_host`](Self::split_host)
    /// works).
    pub fn on_cpu(&self) -> bool {
        self.params.device() == Device::Cpu
    }

    /// The elements of the variables whose names start with `prefix`, when they are
    /// one contiguous run of the flat buffers (names sort together).
    pub fn span(&self, prefix: &str) -> Option<Range<usize>> {
        let mut span: Option<Range<usize>> = None;
        for s in self.slots.iter().filter(|s| s.name.starts_with(prefix)) {
            let (start, end) = (s.offset as usize, (s.offset + s.numel()) as usize);
            span = match span {
                None => Some(start..end),
                Some(r) if r.end == start => Some(r.start..end),
                Some(_) => return None,
            };
        }
        span
    }

    /// The buffers on the CPU split at element `at` into two parts that threads may
    /// clip and step at once (each reading and writing only its own variables), each
    /// counting its steps from this optimizer's; `None` on another device. Afterwards
    /// [`add_steps`](Self::add_steps) records the steps they took.
    pub fn split_host(&mut self, at: usize) -> Option<(HostPart<'_>, HostPart<'_>)> {
        let mut all = self.host()?;
        let (p0, p1) = std::mem::take(&mut all.params).split_at_mut(at);
        let (g0, g1) = std::mem::take(&mut all.grads).split_at_mut(at);
        let (m0, m1) = std::mem::take(&mut all.m).split_at_mut(at);
        let (v0, v1) = std::mem::take(&mut all.v).split_at_mut(at);
        let part = |params, grads, m, v| HostPart {
            params,
            grads,
            m,
            v,
            ..all
        };
        Some((part(p0, g0, m0, v0), part(p1, g1, m1, v1)))
    }

    /// Counts `n` steps that the parts of [`split_host`](Self::split_host) took.
    pub fn add_steps(&mut self, n: u64) {
        self.step += n;
    }

    /// `flat`'s slice for `slot`, shaped like its variable.
    fn part(flat: &Tensor, slot: &Slot) -> Tensor {
        flat.narrow(0, slot.offset, slot.numel())
            .view(slot.shape.as_slice())
    }

    /// The moments as named tensors and the step count as metadata, for a checkpoint.
    pub fn state(&self) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
        let mut tensors = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            tensors.push((format!("{M_PREFIX}{}", s.name), Self::part(&self.m, s)));
            tensors.push((format!("{V_PREFIX}{}", s.name), Self::part(&self.v, s)));
        }
        let meta = HashMap::from([(STEP_KEY.to_string(), self.step.to_string())]);
        (tensors, meta)
    }

    /// Restores the moments and step count from a checkpoint written with
    /// [`state`](Self::state); nothing changes unless every moment is present, finite
    /// and of the right shape.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let meta = crate::model::read_metadata(bytes)?;
        let step = meta
            .get(STEP_KEY)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ModelError::Weights(format!("metadata `{STEP_KEY}` is missing")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Weights(e.to_string()))?;
        let mut staged = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let m = read_f32_tensor(&st, &format!("{M_PREFIX}{}", s.name), &s.shape)?;
            let v = read_f32_tensor(&st, &format!("{V_PREFIX}{}", s.name), &s.shape)?;
            staged.push((m, v));
        }
        let device = self.m.device();
        tch::no_grad(|| {
            for (s, (m, v)) in self.slots.iter().zip(staged) {
                Self::part(&self.m, s).copy_(&m.to_device(device));
                Self::part(&self.v, s).copy_(&v.to_device(device));
            }
        });
        self.step = step;
        Ok(())
    }
}

/// Some or all of an optimizer's elements on the CPU, with its settings: what one
/// thread clips and steps.
pub struct HostPart<'a> {
    params: &'a mut [f32],
    grads: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    /// Steps taken, this part's included.
    step: u64,
}

impl HostPart<'_> {
    /// The sum of the squares of this part's gradients.
    pub fn sum_of_squares(&self) -> f64 {
        sum_of_squares(self.grads)
    }

    /// Multiplies this part's gradients by `coef` when it is below 1 (clipping).
    pub fn scale_grads(&mut self, coef: f64) {
        if coef < 1.0 {
            let coef = coef as f32;
            self.grads.iter_mut().for_each(|g| *g *= coef);
        }
    }

    /// One Adam step of this part: PyTorch's update, element by element, in float32
    /// as its kernels do.
    pub fn step(&mut self) {
        self.step += 1;
        let (step_size, bc2_sqrt) = bias_corrected(self.lr, self.betas, self.step);
        let (w1, w2) = ((1.0 - self.betas.0) as f32, (1.0 - self.betas.1) as f32);
        let (step_size, bc2_sqrt, eps) = (step_size as f32, bc2_sqrt as f32, self.eps as f32);
        let grads = &*self.grads;
        for (((p, &g), m), v) in self
            .params
            .iter_mut()
            .zip(grads)
            .zip(&mut *self.m)
            .zip(&mut *self.v)
        {
            *m += w1 * (g - *m);
            *v += w2 * (g * g - *v);
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
    }
}

/// `clip_grad_norm_`'s scale for gradients of joint norm `norm`: below 1 when they
/// are to shrink to `max_norm`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    max_norm / (norm + 1e-6)
}

/// Adam's step size after the first moment's bias correction, and the square root of
/// the second moment's, at step `t` (counted from 1).
fn bias_corrected(lr: f64, (beta1, beta2): (f64, f64), t: u64) -> (f64, f64) {
    let t = t as i32;
    let bc1 = 1.0 - beta1.powi(t);
    let bc2 = 1.0 - beta2.powi(t);
    (lr / bc1, bc2.sqrt())
}

/// The sum of the squares of `xs`, accumulated in float64 over eight lanes (which
/// the compiler vectorizes).
fn sum_of_squares(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += (x as f64) * (x as f64);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{tensors_to_safetensors, ActorCritic};
    use tch::nn::OptimizerConfig;
    use tch::{Device, Kind};

    fn loss(m: &ActorCritic, seed: i64) -> Tensor {
        // Deterministic inputs without the global generator, which tests running in
        // parallel (building models) also draw from.
        let obs = ((Tensor::arange(64, (Kind::Float, Device::Cpu)) + (seed * 64) as f64) * 0.7)
            .sin()
            .view([16, 4]);
        (m.logits(&obs).square().mean(Kind::Float) + m.values(&obs).mean(Kind::Float)) * 3.0
    }

    fn max_diff(a: &ActorCritic, b: &ActorCritic) -> f64 {
        let va = a.var_store().variables();
        let vb = b.var_store().variables();
        va.iter()
            .map(|(k, t)| (t - &vb[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn matches_torch_adam_with_clipping() {
        let a = ActorCritic::new(4, 3, &[8, 8], Device::Cpu);
        let mut b = ActorCritic::new(4, 3, &[8, 8], Device::Cpu);
        b.copy_from(&a).unwrap();
        let mut theirs = nn::Adam {
            eps: 1e-5,
            ..Default::default()
        }
        .build(a.var_store(), 1e-2)
        .unwrap();
        let mut ours = Adam::new(b.var_store(), 1e-2, 1e-5);
        for step in 0..6 {
            theirs.zero_grad();
            loss(&a, step).backward();
            theirs.clip_grad_norm(0.5);
            theirs.step();
            ours.zero_grad();
            loss(&b, step).backward();
            let norm = ours.clip_grad_norm(0.5);
            assert!(norm > 0.0);
            ours.step();
        }
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
        assert!(max_diff(&a, &ActorCritic::new(4, 3, &[8, 8], Device::Cpu)) > 1e-3);
    }

    /// The loops over the buffers (the CPU's path) take the same steps as the libtorch
    /// calls (any other device's), clipping included.
    #[test]
    fn loops_on_the_host_match_the_tensor_calls() {
        let a = ActorCritic::new(6, 4, &[32, 32], Device::Cpu);
        let mut b = ActorCritic::new(6, 4, &[32, 32], Device::Cpu);
        b.copy_from(&a).unwrap();
        let mut host = Adam::new(a.var_store(), 1e-2, 1e-5);
        let mut tensors = Adam::new(b.var_store(), 1e-2, 1e-5);
        let n = host.grads.numel() as i64;
        for step in 0..5 {
            let grads = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + step as f64))
                .sin()
                * (1.0 + step as f64);
            host.grads.copy_(&grads);
            tensors.grads.copy_(&grads);
            // Large gradients: the clip binds on some steps, not on the first.
            let max_norm = 50.0;
            let norm = host.clip_grad_norm(max_norm);
            let norm_t = tensors.clip_tensors(max_norm);
            assert!(
                (norm - norm_t).abs() <= 1e-5 * norm,
                "{norm} against {norm_t}"
            );
            assert_eq!(norm > max_norm, step > 0, "step {step}: norm {norm}");
            host.step();
            tensors.step += 1;
            tensors.step_tensors();
        }
        assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
        for (x, y) in [(&host.m, &tensors.m), (&host.v, &tensors.v)] {
            let d = (x - y).abs().max().double_value(&[]);
            assert!(
                d <= 1e-6 * x.abs().max().double_value(&[]),
                "moments differ by {d}"
            );
        }
        assert!(max_diff(&a, &ActorCritic::new(6, 4, &[32, 32], Device::Cpu)) > 1e-3);
    }

    #[test]
    fn restored_state_continues_the_same_steps() {
        let a = ActorCritic::new(4, 3, &[8], Device::Cpu);
        let mut opt = Adam::new(a.var_store(), 1e-2, 1e-5);
        for step in 0..3 {
            opt.zero_grad();
            loss(&a, step).backward();
            opt.step();
        }
        // a checkpoint: weights and optimizer state in one payload
        let (mut named, meta) = opt.state();
        named.extend(a.var_store().variables());
        let bytes = tensors_to_safetensors(&named, 9, &meta).unwrap();

        // The learner's order: the optimizer first (it moves the variables into its
        // flat buffer), then the checkpoint's weights into the model.
        let mut b = ActorCritic::new(4, 3, &[8], Device::Cpu);
        let mut resumed = Adam::new(b.var_store(), 1e-2, 1e-5);
        b.load_safetensors(&bytes).unwrap();
        resumed.load_state(&bytes).unwrap();
        assert_eq!(resumed.steps(), 3);
        let mut fresh_b = ActorCritic::new(4, 3, &[8], Device::Cpu);
        fresh_b.load_safetensors(&bytes).unwrap();
        let mut fresh = Adam::new(fresh_b.var_store(), 1e-2, 1e-5);
        for step in 3..5 {
            for (m, o) in [(&a, &mut opt), (&b, &mut resumed), (&fresh_b, &mut fresh)] {
                o.zero_grad();
                loss(m, step).backward();
                o.step();
            }
        }
        assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
        // without the moments the run goes elsewhere
        assert!(max_diff(&a, &fresh_b) > 1e-4, "{}", max_diff(&a, &fresh_b));
    }

    #[test]
    fn a_payload_without_moments_changes_nothing() {
        let a = ActorCritic::new(4, 3, &[8], Device::Cpu);
        let mut opt = Adam::new(a.var_store(), 1e-2, 1e-5);
        let weights_only = a.to_safetensors(1, &HashMap::new()).unwrap();
        let err = opt.load_state(&weights_only).unwrap_err();
        assert!(err.to_string().contains(STEP_KEY), "{err}");
        let meta = HashMap::from([(STEP_KEY.to_string(), "4".to_string())]);
        let bytes = tensors_to_safetensors(
            &a.var_store().variables().into_iter().collect::<Vec<_>>(),
            1,
            &meta,
        )
        .unwrap();
        let err = opt.load_state(&bytes).unwrap_err();
        assert!(err.to_string().contains("adam.m/"), "{err}");
        assert_eq!(opt.steps(), 0);
    }
}
