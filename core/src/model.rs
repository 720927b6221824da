//! The actor-critic policy (tch): either separate policy and value MLPs with tanh
//! activations, or, for NetHack and MiniHack observations, a shared network of a
//! glyph-crop CNN, a bottom-line-stats MLP and a char-level message encoder. With a
//! recurrent core (`model.core`), the torso (the MLP's layers, shared by both heads,
//! or the NetHack network's) feeds an LSTM or GRU whose output feeds linear policy
//! and value heads. A TorchScript module written in PyTorch (`script`) can stand in
//! for all of these. Batched sampling for actors (carrying one core state per env),
//! log-prob/entropy/value evaluation for the learner (one step at a time, or whole
//! sequences from stored states), and weights as safetensors bytes with a version in
//! the metadata.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{CoreKind, ModelArch, ModelConfig, WeightsDtype};
use crate::env::EnvSpec;
use crate::error::ModelError;
use crate::recurrent::RecurrentCore;
use crate::script::{ScriptPolicy, Step};
use crate::tensor::{all_finite_le, all_finite_le16, BF16_EXPONENT, F16_EXPONENT};

mod folded;
use folded::Folded;

/// Metadata key holding the policy version inside a weights payload.
pub const VERSION_KEY: &str = "spur.policy_version";

/// The observation fields the NetHack network reads (the bridge's NetHack layout).
const NETHACK_FIELDS: [&str; 3] = ["glyphs_crop", "blstats", "message"];

/// NetHack's glyph ids run from 0 to this (`MAX_GLYPH`, "nothing", pads the crop).
const MAX_GLYPH: i64 = 5976;

pub struct ActorCritic {
    vs: nn::VarStore,
    body: Body,
    /// The recurrent core between torso and heads, if any.
    rnn: Option<RecurrentCore>,
    obs_dim: usize,
    num_actions: usize,
}

enum Body {
    /// Feedforward only: separate policy and value MLPs.
    Mlp {
        policy: Vec<nn::Linear>,
        value: Vec<nn::Linear>,
    },
    /// Recurrent only: a tanh MLP torso shared by the heads, which read the core.
    SharedMlp {
        torso: Vec<nn::Linear>,
        pi: nn::Linear,
        v: nn::Linear,
    },
    NetHack(Box<NetHackNet>),
    /// A TorchScript module: logits, values and its own state in one call.
    Script(Box<ScriptPolicy>),
}

/// Glyph crop -> embedding -> two 3x3 convolutions; stats -> signed log -> linear;
/// message bytes -> embedding -> strided 1-D convolution -> max over positions. The
/// three are joined by one shared core layer feeding the policy and value heads.
struct NetHackNet {
    crop_at: i64,
    crop: i64,
    stats_at: i64,
    n_stats: i64,
    msg_at: i64,
    n_msg: i64,
    glyph_emb: nn::Embedding,
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    crop_fc: nn::Linear,
    stats_fc: nn::Linear,
    msg_emb: nn::Embedding,
    msg_conv: nn::Conv1D,
    core: nn::Linear,
    pi: nn::Linear,
    v: nn::Linear,
    /// Tables folded from the weights for acting ([`ActorCritic::fold_for_acting`]).
    folded: Option<Folded>,
}

impl NetHackNet {
    /// The network for `spec`, whose fields must include `glyphs_crop` (square),
    /// `blstats` and `message`; its heads read `head_in` features (the core layer's
    /// `core`, or a recurrent core's output).
    fn new(
        path: &nn::Path,
        spec: &EnvSpec,
        core: i64,
        head_in: i64,
        num_actions: i64,
    ) -> Result<Self, String> {
        let need = |name: &str| {
            spec.field(name)
                .map(|(at, f)| (at as i64, f.shape.clone()))
                .ok_or_else(|| format!("the nethack network needs an observation field `{name}`"))
        };
        let [crop_field, stats_field, msg_field] = NETHACK_FIELDS;
        let (crop_at, crop_shape) = need(crop_field)?;
        let (stats_at, stats_shape) = need(stats_field)?;
        let (msg_at, msg_shape) = need(msg_field)?;
        if crop_shape.len() != 2 || crop_shape[0] != crop_shape[1] {
            return Err(format!("`glyphs_crop` must be square, not {crop_shape:?}"));
        }
        let crop = crop_shape[0] as i64;
        let n_msg = msg_shape.iter().product::<usize>() as i64;
        if n_msg < MSG_KERNEL {
            return Err(format!(
                "`message` must hold at least {MSG_KERNEL} bytes, not {n_msg}"
            ));
        }
        let conv = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let msg_conv = nn::ConvConfig {
            stride: MSG_STRIDE,
            ..Default::default()
        };
        let n_stats = stats_shape.iter().product::<usize>() as i64;
        Ok(Self {
            crop_at,
            crop,
            stats_at,
            n_stats,
            msg_at,
            n_msg,
            glyph_emb: nn::embedding(path / "glyph_emb", MAX_GLYPH + 1, 16, Default::default()),
            conv1: nn::conv2d(path / "conv1", 16, 32, 3, conv),
            conv2: nn::conv2d(path / "conv2", 32, 32, 3, conv),
            crop_fc: nn::linear(path / "crop_fc", 32 * crop * crop, 256, Default::default()),
            stats_fc: nn::linear(path / "stats_fc", n_stats, 64, Default::default()),
            msg_emb: nn::embedding(path / "msg_emb", 256, 16, Default::default()),
            msg_conv: nn::conv1d(path / "msg_conv", 16, 64, MSG_KERNEL, msg_conv),
            core: nn::linear(path / "core", 256 + 64 + 64, core, Default::default()),
            pi: nn::linear(path / "pi", head_in, num_actions, Default::default()),
            v: nn::linear(path / "v", head_in, 1, Default::default()),
            folded: None,
        })
    }

    fn torso(&self, obs: &Tensor) -> Tensor {
        let b = obs.size()[0];
        let c = self.crop;
        let glyphs = obs
            .narrow(1, self.crop_at, c * c)
            .to_kind(Kind::Int64)
            .clamp(0, MAX_GLYPH)
            .view([b, c, c]);
        let g = self
            .glyph_emb
            .forward(&glyphs)
            .permute([0, 3, 1, 2])
            .apply(&self.conv1)
            .elu()
            .apply(&self.conv2)
            // The convolutions keep the embedding's channels-last layout, but the
            // linear layer's gradient comes back in the flattened (channels-first)
            // order: ELU's backward over two layouts fell to a scalar loop (a sixth of
            // the NetHack trainer's time went to ELU, 9% since). Made contiguous here
            // (the copy the flatten made anyway), both sides of ELU agree.
            .contiguous()
            .elu()
            .flatten(1, -1)
            .apply(&self.crop_fc)
            .elu();
        let stats = obs.narrow(1, self.stats_at, self.n_stats);
        // Signed log: hit points, gold and turn counts span many orders of magnitude.
        let stats = (stats.sign() * stats.abs().log1p())
            .apply(&self.stats_fc)
            .elu();
        let bytes = obs
            .narrow(1, self.msg_at, self.n_msg)
            .to_kind(Kind::Int64)
            .clamp(0, 255);
        let m = self.message(&bytes, !bytes.device().is_cuda());
        Tensor::cat(&[g, stats, m], 1).apply(&self.core).elu()
    }

    /// Message features: the best of each filter over every window of the message
    /// bytes, then ELU (ELU is increasing, so taking the maximum first gives the same
    /// values and gradients over 63 times fewer elements).
    ///
    /// With `trim`, only the windows up to the first one that is zero in every row
    /// are computed. Messages are mostly padding: every all-zero window gives the same
    /// output, so one of them stands for all (the maximum is unchanged, and the
    /// gradient it routes to the tied windows sums to the same), and typical batches
    /// need a third of the windows or fewer. Finding the cut reads one number back
    /// from the device, so CUDA runs skip it (there the convolution is cheap anyway).
    fn message(&self, bytes: &Tensor, trim: bool) -> Tensor {
        let bytes = if trim {
            bytes.narrow(1, 0, self.message_bytes_needed(bytes))
        } else {
            bytes.shallow_clone()
        };
        self.msg_emb
            .forward(&bytes)
            .permute([0, 2, 1])
            .apply(&self.msg_conv)
            .amax(-1, false)
            .elu()
    }

    /// How many leading message bytes cover every window with a nonzero byte in any
    /// row, plus one window of zeros wherever the full message has one.
    fn message_bytes_needed(&self, bytes: &Tensor) -> i64 {
        // One past the last column with a nonzero byte in some row (0 if none).
        let columns = Tensor::arange_start(1, self.n_msg + 1, (Kind::Int64, bytes.device()));
        let end = (bytes.ne(0).any_dim(0, false).to_kind(Kind::Int64) * columns)
            .max()
            .int64_value(&[]);
        message_cut(self.n_msg, end)
    }
}

/// How many leading bytes of an `n_msg`-byte message cover every window up to `end`
/// (one past the last nonzero byte of any row), plus one window of zeros wherever the
/// full message has one.
fn message_cut(n_msg: i64, end: i64) -> i64 {
    let (kernel, stride) = (MSG_KERNEL, MSG_STRIDE);
    let windows = (n_msg - kernel) / stride + 1;
    // The first window that starts at or after `end` holds only zeros.
    let first_zero = (end + stride - 1) / stride;
    if first_zero >= windows {
        n_msg
    } else {
        first_zero * stride + kernel
    }
}

/// The message convolution's width and step, in bytes.
const MSG_KERNEL: i64 = 8;
const MSG_STRIDE: i64 = 4;

/// Output of [`ActorCritic::unroll`]: per step of the sequences, time-major.
pub struct Unrolled {
    /// `[L * B, num_actions]`.
    pub logits: Tensor,
    /// `[L * B]`.
    pub values: Tensor,
    /// `[L * B, state_size]`: the core state after each step.
    pub states: Tensor,
}

/// Output of [`ActorCritic::evaluate`], all with gradients.
pub struct Evaluation {
    /// `[B, num_actions]` log-probabilities of every action.
    pub all_log_probs: Tensor,
    pub log_probs: Tensor,
    pub entropy: Tensor,
    pub values: Tensor,
}

fn mlp(path: &nn::Path, sizes: &[i64]) -> Vec<nn::Linear> {
    sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| nn::linear(path / format!("l{i}"), w[0], w[1], Default::default()))
        .collect()
}

/// A tensor's elements as f32, flattened, on the CPU.
pub fn f32_vec(t: &Tensor) -> Vec<f32> {
    // One copy to the host for a float tensor on any device (no conversion calls:
    // the learner's closed-form step calls this on every minibatch).
    let t = match t.kind() {
        Kind::Float => t.shallow_clone(),
        _ => t.to_kind(Kind::Float),
    };
    let n = t.numel();
    let mut out = vec![0f32; n];
    t.copy_data(&mut out, n);
    out
}

fn run_mlp(layers: &[nn::Linear], x: &Tensor) -> Tensor {
    let last = layers.len() - 1;
    layers
        .iter()
        .enumerate()
        .fold(x.shallow_clone(), |h, (i, l)| {
            let y = l.forward(&h);
            if i < last {
                y.tanh()
            } else {
                y
            }
        })
}

/// Scales a policy head's last layer down, so a fresh policy explores evenly (a small
/// last layer, as PPO implementations commonly do).
fn near_uniform(last: &nn::Linear) {
    tch::no_grad(|| {
        let _ = last.ws.shallow_clone().g_mul_scalar_(0.01);
        if let Some(b) = &last.bs {
            let _ = b.shallow_clone().zero_();
        }
    });
}

impl ActorCritic {
    /// The architecture `config.arch` names for `spec` (`auto`: the NetHack network
    /// when the observation has a glyph crop, stats and a message).
    pub fn for_spec(
        spec: &EnvSpec,
        config: &ModelConfig,
        device: Device,
    ) -> Result<Self, ModelError> {
        let nethack = match config.arch {
            ModelArch::Mlp => false,
            ModelArch::Nethack => true,
            ModelArch::Auto => NETHACK_FIELDS.iter().all(|f| spec.field(f).is_some()),
            ModelArch::Torchscript => return Self::script(spec, &config.path, device),
        };
        let recurrent = config.core != CoreKind::None;
        if !nethack {
            if !recurrent {
                return Ok(Self::new(
                    spec.obs_dim,
                    spec.num_actions,
                    &config.hidden,
                    device,
                ));
            }
            return Ok(Self::recurrent_mlp(spec, config, device));
        }
        let vs = nn::VarStore::new(device);
        let core = config.hidden.first().copied().unwrap_or(256) as i64;
        let head_in = if recurrent {
            config.core_size as i64
        } else {
            core
        };
        let net = NetHackNet::new(
            &(vs.root() / "nethack"),
            spec,
            core,
            head_in,
            spec.num_actions as i64,
        )
        .map_err(ModelError::Weights)?;
        near_uniform(&net.pi);
        // Values start near 0 as well: large first value errors would reshape the shared
        // torso before the policy learns anything.
        near_uniform(&net.v);
        let rnn = recurrent.then(|| {
            RecurrentCore::new(
                &(vs.root() / "rnn"),
                config.core,
                core,
                config.core_size as i64,
            )
        });
        Ok(Self {
            vs,
            body: Body::NetHack(Box::new(net)),
            rnn,
            obs_dim: spec.obs_dim,
            num_actions: spec.num_actions,
        })
    }

    /// The TorchScript module saved at `file`, checked against `spec`.
    pub fn script(spec: &EnvSpec, file: &str, device: Device) -> Result<Self, ModelError> {
        let vs = nn::VarStore::new(device);
        let module = ScriptPolicy::load(vs.root() / "script", file, spec)?;
        Ok(Self {
            vs,
            body: Body::Script(Box::new(module)),
            rnn: None,
            obs_dim: spec.obs_dim,
            num_actions: spec.num_actions,
        })
    }

    /// Training mode for the learner's update passes (on), evaluation mode for acting
    /// (off, the default). Only a TorchScript module has modes; the built-in
    /// networks behave the same in both.
    pub fn set_train(&mut self, train: bool) {
        if let Body::Script(s) = &mut self.body {
            s.set_train(train);
        }
    }

    /// The MLP torso (`config.hidden`, tanh) shared by both heads, with the core.
    fn recurrent_mlp(spec: &EnvSpec, config: &ModelConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut sizes = vec![spec.obs_dim as i64];
        sizes.extend(config.hidden.iter().map(|&h| h as i64));
        let torso = mlp(&(&root / "torso"), &sizes);
        let width = *sizes.last().expect("sizes starts with obs_dim");
        let size = config.core_size as i64;
        let rnn = RecurrentCore::new(&(&root / "rnn"), config.core, width, size);
        let pi = nn::linear(
            &root / "pi",
            size,
            spec.num_actions as i64,
            Default::default(),
        );
        let v = nn::linear(&root / "v", size, 1, Default::default());
        near_uniform(&pi);
        Self {
            vs,
            body: Body::SharedMlp { torso, pi, v },
            rnn: Some(rnn),
            obs_dim: spec.obs_dim,
            num_actions: spec.num_actions,
        }
    }

    /// The MLP architecture.
    pub fn new(obs_dim: usize, num_actions: usize, hidden: &[u32], device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut sizes = vec![obs_dim as i64];
        sizes.extend(hidden.iter().map(|&h| h as i64));
        let mut pi_sizes = sizes.clone();
        pi_sizes.push(num_actions as i64);
        let mut v_sizes = sizes;
        v_sizes.push(1);
        let policy = mlp(&(&root / "policy"), &pi_sizes);
        let value = mlp(&(&root / "value"), &v_sizes);
        near_uniform(policy.last().expect("the policy has at least one layer"));
        Self {
            vs,
            body: Body::Mlp { policy, value },
            rnn: None,
            obs_dim,
            num_actions,
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The policy's and the critic's layers, when this is the feedforward MLP
    /// (separate tanh MLPs, no core): what `mlp_grad` differentiates by hand.
    pub fn mlp_layers(&self) -> Option<(&[nn::Linear], &[nn::Linear])> {
        match (&self.body, &self.rnn) {
            (Body::Mlp { policy, value }, None) => Some((policy, value)),
            _ => None,
        }
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn obs_dim(&self) -> usize {
        self.obs_dim
    }

    pub fn num_actions(&self) -> usize {
        self.num_actions
    }

    /// Floats of recurrent state per env (0: feedforward).
    pub fn state_size(&self) -> usize {
        match &self.body {
            Body::Script(s) => s.state_size() as usize,
            _ => self.rnn.as_ref().map_or(0, |r| r.state_size() as usize),
        }
    }

    /// Whether this is the NetHack network (glyph crop, stats and message encoders).
    pub fn is_nethack(&self) -> bool {
        matches!(self.body, Body::NetHack(_))
    }

    pub fn is_recurrent(&self) -> bool {
        self.state_size() > 0
    }

    /// One call of the TorchScript module with each row from a zero state.
    fn script_from_zeros(s: &ScriptPolicy, obs: &Tensor) -> Step {
        s.step(obs, &s.zero_state(obs.size()[0], obs.device()))
    }

    /// Logits per row of `obs` (with a recurrent core: each row from a zero state).
    pub fn logits(&self, obs: &Tensor) -> Tensor {
        match &self.body {
            Body::Mlp { policy, .. } => run_mlp(policy, obs),
            Body::NetHack(n) if self.rnn.is_none() => n.torso(obs).apply(&n.pi),
            Body::Script(s) => Self::script_from_zeros(s, obs).logits,
            _ => self.logits_and_values(obs).0,
        }
    }

    /// Values per row of `obs` (with a recurrent core: each row from a zero state).
    pub fn values(&self, obs: &Tensor) -> Tensor {
        match &self.body {
            Body::Mlp { value, .. } => run_mlp(value, obs).squeeze_dim(-1),
            Body::NetHack(n) if self.rnn.is_none() => n.torso(obs).apply(&n.v).squeeze_dim(-1),
            Body::Script(s) => Self::script_from_zeros(s, obs).values,
            _ => self.logits_and_values(obs).1,
        }
    }

    /// Logits and values in one pass (the NetHack network shares its torso; with a
    /// recurrent core: each row from a zero state).
    pub fn logits_and_values(&self, obs: &Tensor) -> (Tensor, Tensor) {
        match (&self.body, &self.rnn) {
            (Body::Mlp { .. }, _) => (self.logits(obs), self.values(obs)),
            (Body::Script(s), _) => {
                let step = Self::script_from_zeros(s, obs);
                (step.logits, step.values)
            }
            (Body::NetHack(n), None) => {
                let h = n.torso(obs);
                (h.apply(&n.pi), h.apply(&n.v).squeeze_dim(-1))
            }
            (_, Some(rnn)) => {
                let zeros = Tensor::zeros(
                    [obs.size()[0], rnn.state_size()],
                    (Kind::Float, obs.device()),
                );
                let (h, _) = rnn.step(&self.features(obs), &zeros);
                self.heads(&h)
            }
            (Body::SharedMlp { .. }, None) => unreachable!("a shared MLP has a core"),
        }
    }

    /// What the recurrent core reads: the torso's output per row of `obs`.
    fn features(&self, obs: &Tensor) -> Tensor {
        match &self.body {
            Body::SharedMlp { torso, .. } => torso
                .iter()
                .fold(obs.shallow_clone(), |h, l| l.forward(&h).tanh()),
            Body::NetHack(n) => n.torso(obs),
            Body::Mlp { .. } | Body::Script(_) => {
                unreachable!("only the built-in recurrent networks have a shared torso")
            }
        }
    }

    /// Logits and values from the recurrent core's output (or, feedforward, the
    /// NetHack network's torso's).
    fn heads(&self, h: &Tensor) -> (Tensor, Tensor) {
        match &self.body {
            Body::SharedMlp { pi, v, .. } => (h.apply(pi), h.apply(v).squeeze_dim(-1)),
            Body::NetHack(n) => (h.apply(&n.pi), h.apply(&n.v).squeeze_dim(-1)),
            Body::Mlp { .. } | Body::Script(_) => {
                unreachable!("only the built-in recurrent networks have shared heads")
            }
        }
    }

    /// Logits only, from the recurrent core's output (or, feedforward, the NetHack
    /// network's torso's): what acting needs.
    fn policy_head(&self, h: &Tensor) -> Tensor {
        match &self.body {
            Body::SharedMlp { pi, .. } => h.apply(pi),
            Body::NetHack(n) => h.apply(&n.pi),
            Body::Mlp { .. } | Body::Script(_) => {
                unreachable!("only the built-in recurrent networks have shared heads")
            }
        }
    }

    /// Samples one action per row of `obs` (`n * obs_dim` floats) without gradients;
    /// returns the actions and their log-probabilities. `greedy` takes the most
    /// likely action instead of sampling. `state` holds each row's recurrent state
    /// (`n * state_size` floats, empty for a feedforward policy) and is advanced in
    /// place; zero a row to start that env's next episode.
    pub fn act(&self, obs: &[f32], state: &mut [f32], greedy: bool) -> (Vec<i64>, Vec<f32>) {
        let n = (obs.len() / self.obs_dim) as i64;
        let s = self.state_size();
        assert_eq!(
            state.len(),
            n as usize * s,
            "act needs state_size floats of state per row"
        );
        tch::no_grad(|| Self::sample(&self.acting_logits(obs, state), greedy))
    }

    /// [`act`](Self::act) for a feedforward policy, with each row's value from the
    /// same pass (the NetHack network's torso runs once for both heads).
    pub fn act_with_values(&self, obs: &[f32], greedy: bool) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
        assert!(
            !self.is_recurrent(),
            "act_with_values needs a feedforward policy"
        );
        tch::no_grad(|| {
            let (logits, values) = match self.folded_torso(obs) {
                Some(h) => self.heads(&h),
                None => self.logits_and_values(&self.rows(obs)),
            };
            let (actions, log_probs) = Self::sample(&logits, greedy);
            (actions, log_probs, f32_vec(&values))
        })
    }

    /// The critic's value of each row of `obs` (`n * obs_dim` floats) without
    /// gradients; a feedforward policy only.
    pub fn values_of(&self, obs: &[f32]) -> Vec<f32> {
        assert!(!self.is_recurrent(), "values_of needs a feedforward policy");
        tch::no_grad(|| match self.folded_torso(obs) {
            Some(h) => f32_vec(&self.heads(&h).1),
            None => f32_vec(&self.values(&self.rows(obs))),
        })
    }

    /// `obs` (`n * obs_dim` floats) as an `[n, obs_dim]` tensor on the policy's device.
    fn rows(&self, obs: &[f32]) -> Tensor {
        let n = (obs.len() / self.obs_dim) as i64;
        Tensor::from_slice(obs)
            .view([n, self.obs_dim as i64])
            .to_device(self.device())
    }

    /// One action per row of `logits` (sampled, or the most likely with `greedy`, the
    /// first of equals) and its log-probability. The draws come from libtorch's
    /// generator (`tch::manual_seed` repeats them); the choice is made here, in one
    /// pass over the copied log-probabilities, rather than by `multinomial`, whose
    /// checks and set-up cost more than the rest of a small batch's sampling.
    ///
    /// Panics when a row's probabilities are not finite (a diverged policy), as
    /// `multinomial` would.
    fn sample(logits: &Tensor, greedy: bool) -> (Vec<i64>, Vec<f32>) {
        let (n, a) = (logits.size()[0], logits.size()[1] as usize);
        let log_p = f32_vec(&logits.log_softmax(-1, Kind::Float));
        let draws = if greedy {
            Vec::new()
        } else {
            f32_vec(&Tensor::rand([n], (Kind::Float, Device::Cpu)))
        };
        log_p
            .chunks_exact(a)
            .enumerate()
            .map(|(i, row)| {
                assert!(
                    row.iter().all(|l| !l.is_nan() && *l < f32::INFINITY),
                    "the policy's probabilities are not finite: {row:?}"
                );
                let k = match draws.get(i) {
                    None => (0..a).fold(0, |best, j| if row[j] > row[best] { j } else { best }),
                    Some(&u) => inverse_cdf(row, u),
                };
                (k as i64, row[k])
            })
            .unzip()
    }

    /// The NetHack network's torso for acting on `obs` through the folded tables;
    /// None when there are none.
    fn folded_torso(&self, obs: &[f32]) -> Option<Tensor> {
        match &self.body {
            Body::NetHack(n) => n.folded.as_ref().map(|f| f.torso(n, obs, self.obs_dim)),
            _ => None,
        }
    }

    /// Logits for acting on `obs` (`n * obs_dim` floats), advancing `state` (`n *
    /// state_size` floats) in place.
    fn acting_logits(&self, obs: &[f32], state: &mut [f32]) -> Tensor {
        let folded = self.folded_torso(obs);
        if self.state_size() == 0 {
            return match folded {
                Some(h) => self.policy_head(&h),
                None => self.logits(&self.rows(obs)),
            };
        }
        let n = (obs.len() / self.obs_dim) as i64;
        let s0 = Tensor::from_slice(state)
            .view([n, self.state_size() as i64])
            .to_device(self.device());
        let (logits, next) = match (&self.body, &self.rnn) {
            (Body::Script(s), _) => {
                let step = s.step(&self.rows(obs), &s0);
                (step.logits, step.state)
            }
            (_, Some(rnn)) => {
                let features = folded.unwrap_or_else(|| self.features(&self.rows(obs)));
                let (h, next) = rnn.step(&features, &s0);
                (self.policy_head(&h), next)
            }
            (_, None) => unreachable!("a policy with state has a core or is a module"),
        };
        state.copy_from_slice(&f32_vec(&next));
        logits
    }

    /// Log-probabilities of `actions`, the policy entropy and the values, with gradients.
    pub fn evaluate(&self, obs: &Tensor, actions: &Tensor) -> Evaluation {
        let (logits, values) = self.logits_and_values(obs);
        Self::evaluation(&logits, values, actions)
    }

    /// Runs sequences through the recurrent core: `obs` is `[L * B, obs_dim]`,
    /// time-major (row `t * B + b` is step t of sequence b), `initial` `[B,
    /// state_size]` the states they start from, and `resets` `[L, B]` 1.0 where the
    /// state is zeroed before a step (an episode starts there), else 0.0. The torso
    /// runs on all rows at once, the core one step at a time, as actors step it (a
    /// TorchScript module runs whole, one step at a time).
    pub fn unroll(&self, obs: &Tensor, initial: &Tensor, resets: &Tensor) -> Unrolled {
        let b = initial.size()[0];
        if let Body::Script(s) = &self.body {
            let (steps, states) = scan(initial, resets, |t, state| {
                let step = s.step(&obs.narrow(0, t * b, b), state);
                let next = step.state.shallow_clone();
                (step, next)
            });
            let (logits, values): (Vec<Tensor>, Vec<Tensor>) =
                steps.into_iter().map(|s| (s.logits, s.values)).unzip();
            return Unrolled {
                logits: Tensor::cat(&logits, 0),
                values: Tensor::cat(&values, 0),
                states,
            };
        }
        let rnn = self
            .rnn
            .as_ref()
            .expect("unroll is for policies with a recurrent core");
        let features = self.features(obs);
        let (outs, states) = scan(initial, resets, |t, state| {
            rnn.step(&features.narrow(0, t * b, b), state)
        });
        let (logits, values) = self.heads(&Tensor::cat(&outs, 0));
        Unrolled {
            logits,
            values,
            states,
        }
    }

    /// Values of `obs` `[K, obs_dim]`, each row continuing from its core state in
    /// `states` `[K, state_size]` (the value of a truncated episode's final
    /// observation).
    pub fn values_after(&self, obs: &Tensor, states: &Tensor) -> Tensor {
        if let Body::Script(s) = &self.body {
            return s.step(obs, states).values;
        }
        let rnn = self
            .rnn
            .as_ref()
            .expect("values_after is for policies with a recurrent core");
        let (h, _) = rnn.step(&self.features(obs), states);
        self.heads(&h).1
    }

    /// Log-probabilities of `actions` under `logits`, entropy, and the values.
    pub fn evaluation(logits: &Tensor, values: Tensor, actions: &Tensor) -> Evaluation {
        let log_p = logits.log_softmax(-1, Kind::Float);
        let log_probs = log_p.gather(1, &actions.unsqueeze(1), false).squeeze_dim(1);
        let entropy = -(log_p.exp() * &log_p).sum_dim_intlist(-1, false, Kind::Float);
        Evaluation {
            all_log_probs: log_p,
            log_probs,
            entropy,
            values,
        }
    }

    /// Serializes all weights as safetensors (f32) with `metadata` and the version.
    pub fn to_safetensors(
        &self,
        version: u64,
        metadata: &HashMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        vars_to_safetensors(&self.vs, version, metadata)
    }

    /// [`to_safetensors`](Self::to_safetensors) with the weights rounded to `dtype`
    /// (for actors, which load any of the three): a tensor outside f16's range stays
    /// f32.
    pub fn to_safetensors_as(
        &self,
        version: u64,
        metadata: &HashMap<String, String>,
        dtype: WeightsDtype,
    ) -> Result<Vec<u8>, ModelError> {
        let named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        serialize(&named, version, metadata, dtype)
    }

    /// Loads weights produced by [`to_safetensors`](Self::to_safetensors) or
    /// [`to_safetensors_as`](Self::to_safetensors_as) (f32, f16 or bf16 tensors) by a
    /// model of the same architecture; returns the payload's metadata. Nothing is
    /// changed unless every tensor is present, finite and of the right shape.
    pub fn load_safetensors(
        &mut self,
        bytes: &[u8],
    ) -> Result<HashMap<String, String>, ModelError> {
        let meta = load_vars(&self.vs, bytes)?;
        self.refold();
        Ok(meta)
    }

    /// Copies every weight from `other` (same architecture).
    pub fn copy_from(&mut self, other: &ActorCritic) -> Result<(), ModelError> {
        self.vs.copy(&other.vs)?;
        self.refold();
        Ok(())
    }

    /// Acting ([`act`](Self::act), [`act_with_values`](Self::act_with_values),
    /// [`values_of`](Self::values_of)) goes through tables folded from the weights
    /// from now on (the NetHack network only; other networks are unchanged): the same
    /// outputs to float rounding, in fewer and cheaper libtorch calls. The tables are
    /// recomputed whenever weights are loaded through
    /// [`load_safetensors`](Self::load_safetensors) or [`copy_from`](Self::copy_from),
    /// and only then: a model whose variables change in place (an optimizer's step)
    /// must not fold, or it would act with the weights it had when it folded. The
    /// learner's passes ([`evaluate`](Self::evaluate), [`logits`](Self::logits) and
    /// the like) never use the tables.
    pub fn fold_for_acting(&mut self) {
        if let Body::NetHack(n) = &mut self.body {
            n.folded = Some(Folded::new(n));
        }
    }

    /// Whether acting goes through folded tables.
    pub fn is_folded(&self) -> bool {
        matches!(&self.body, Body::NetHack(n) if n.folded.is_some())
    }

    /// Recomputes the folded tables, if there are any, from the weights now held.
    fn refold(&mut self) {
        if self.is_folded() {
            self.fold_for_acting();
        }
    }
}

/// The action whose cumulative probability first exceeds `u` (in [0, 1)) under the
/// log-probabilities `row`; the last possible action when rounding leaves the total
/// just under `u`.
fn inverse_cdf(row: &[f32], u: f32) -> usize {
    let mut total = 0.0f32;
    for (k, l) in row.iter().enumerate() {
        total += l.exp();
        if u < total {
            return k;
        }
    }
    row.iter()
        .rposition(|l| *l > f32::NEG_INFINITY)
        .expect("log-probabilities from log_softmax have a finite entry")
}

/// Steps `step(t, state) -> (output, next state)` through the `[L, B]` `resets`
/// from `initial`, zeroing a row's state where its reset is 1.0; the outputs per step
/// and every step's next state, `[L * B, state_size]`.
fn scan<T>(
    initial: &Tensor,
    resets: &Tensor,
    mut step: impl FnMut(i64, &Tensor) -> (T, Tensor),
) -> (Vec<T>, Tensor) {
    let steps = resets.size()[0];
    let keep = (resets.ones_like() - resets).unsqueeze(-1);
    let mut state = initial.shallow_clone();
    let mut outs = Vec::with_capacity(steps as usize);
    let mut states = Vec::with_capacity(steps as usize);
    for t in 0..steps {
        state = &state * keep.get(t);
        let (out, next) = step(t, &state);
        outs.push(out);
        states.push(next.shallow_clone());
        state = next;
    }
    (outs, Tensor::cat(&states, 0))
}

/// Zeroes the recurrent state of every env whose episode just ended (`state` holds
/// one row per env, as [`ActorCritic::act`] takes it), so its next episode starts
/// from zeros as the learner's sequence pass assumes.
pub fn reset_ended(state: &mut [f32], terminated: &[u8], truncated: &[u8]) {
    let n = terminated.len();
    if n == 0 || state.is_empty() {
        return;
    }
    for (i, row) in state.chunks_exact_mut(state.len() / n).enumerate() {
        if terminated[i] == 1 || truncated[i] == 1 {
            row.fill(0.0);
        }
    }
}

/// Every variable of `vs` as f32 safetensors, with `metadata` and the version.
pub fn vars_to_safetensors(
    vs: &nn::VarStore,
    version: u64,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors_to_safetensors(&named, version, metadata)
}

/// Named tensors as f32 safetensors (sorted by name), with `metadata` and the version.
pub fn tensors_to_safetensors(
    named: &[(String, Tensor)],
    version: u64,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    serialize(named, version, metadata, WeightsDtype::F32)
}

/// Largest finite f16 value.
const F16_MAX: f64 = 65504.0;

/// The safetensors and libtorch types `t` is written as when `dtype` is asked for.
fn wire_type(t: &Tensor, dtype: WeightsDtype) -> (Dtype, Kind) {
    match dtype {
        WeightsDtype::F16 if t.numel() == 0 || t.abs().max().double_value(&[]) <= F16_MAX => {
            (Dtype::F16, Kind::Half)
        }
        WeightsDtype::Bf16 => (Dtype::BF16, Kind::BFloat16),
        _ => (Dtype::F32, Kind::Float),
    }
}

/// Named tensors as safetensors of `dtype` (sorted by name), with `metadata` and the
/// version.
fn serialize(
    named: &[(String, Tensor)],
    version: u64,
    metadata: &HashMap<String, String>,
    dtype: WeightsDtype,
) -> Result<Vec<u8>, ModelError> {
    let mut order: Vec<&(String, Tensor)> = named.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blobs = Vec::with_capacity(order.len());
    for (name, t) in order {
        let (st_type, kind) = wire_type(t, dtype);
        // Rounded where it lives (a GPU sends half the bytes to the host).
        let t = t.to_kind(kind).to_device(Device::Cpu).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let size = st_type.bitsize() / 8;
        // The tensor's bytes in one copy; safetensors wants them little-endian.
        let mut bytes = vec![0u8; t.numel() * size];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        if cfg!(target_endian = "big") {
            bytes.chunks_exact_mut(size).for_each(<[u8]>::reverse);
        }
        blobs.push((name.clone(), st_type, shape, bytes));
    }
    let views = blobs
        .iter()
        .map(|(name, st_type, shape, bytes)| {
            TensorView::new(*st_type, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Weights(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut info = metadata.clone();
    info.insert(VERSION_KEY.into(), version.to_string());
    safetensors::serialize(views, Some(info)).map_err(|e| ModelError::Weights(e.to_string()))
}

/// The type and bytes of one tensor of a safetensors payload, checked against the
/// shape it must have, for one of the float types in `types`, and for non-finite
/// values.
fn checked<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    want: &[i64],
    types: &[Dtype],
) -> Result<(Dtype, &'a [u8]), ModelError> {
    let view = st
        .tensor(name)
        .map_err(|_| ModelError::Weights(format!("tensor `{name}` is missing")))?;
    let want_usize: Vec<usize> = want.iter().map(|&d| d as usize).collect();
    if !types.contains(&view.dtype()) || view.shape() != want_usize.as_slice() {
        return Err(ModelError::Weights(format!(
            "tensor `{name}` is {:?} {:?}, expected {} {:?}",
            view.dtype(),
            view.shape(),
            types
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
            want_usize
        )));
    }
    let finite = match view.dtype() {
        Dtype::F16 => all_finite_le16(view.data(), F16_EXPONENT),
        Dtype::BF16 => all_finite_le16(view.data(), BF16_EXPONENT),
        _ => all_finite_le(view.data()),
    };
    if !finite {
        return Err(ModelError::Weights(format!(
            "tensor `{name}` holds a non-finite value"
        )));
    }
    Ok((view.dtype(), view.data()))
}

/// The bytes of one f32 tensor of a safetensors payload, checked as [`checked`] does.
fn checked_f32<'a>(st: &SafeTensors<'a>, name: &str, want: &[i64]) -> Result<&'a [u8], ModelError> {
    Ok(checked(st, name, want, &[Dtype::F32])?.1)
}

fn le_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// One f32 tensor of a safetensors payload, checked against the shape it must have.
pub fn read_f32_tensor(st: &SafeTensors, name: &str, want: &[i64]) -> Result<Tensor, ModelError> {
    let data = checked_f32(st, name, want)?;
    if cfg!(target_endian = "little") {
        // The payload's bytes are the tensor's bytes: one copy, no per-value loop.
        return Ok(Tensor::f_from_data_size(data, want, Kind::Float)?);
    }
    Ok(Tensor::from_slice(&le_values(data)).view(want))
}

/// Overwrites `var` (f32, contiguous, any device) with the little-endian values in
/// `data`, which holds exactly its elements.
fn copy_le_f32(var: &mut Tensor, data: &[u8]) -> Result<(), ModelError> {
    if cfg!(target_endian = "big") {
        let src = Tensor::from_slice(&le_values(data)).view(var.size().as_slice());
        var.f_copy_(&src.to_device(var.device()))?;
        return Ok(());
    }
    // A byte view of `data` (no alignment needed, unlike a float view: a piece's data
    // starts wherever its message put it) copied into a byte view of the variable, so
    // the payload is copied once, straight into place.
    // SAFETY: `src` reads `data`, which outlives it (it is dropped in this function),
    // and nothing writes through it.
    let src = unsafe {
        Tensor::f_from_blob(
            data.as_ptr(),
            &[data.len() as i64],
            &[1],
            Kind::Uint8,
            Device::Cpu,
        )?
    };
    var.f_view([-1])?.f_view_dtype(Kind::Uint8)?.f_copy_(&src)?;
    Ok(())
}

/// Overwrites `var` (f32, contiguous, any device) with the little-endian 16-bit floats
/// of `kind` in `data`, which holds exactly its elements, converting as it copies.
fn copy_le16(var: &mut Tensor, data: &[u8], kind: Kind) -> Result<(), ModelError> {
    // Read in place when the bytes are aligned for 16-bit values (a payload in one
    // piece starts wherever its message put it); otherwise staged with one memcpy.
    let mut values: std::borrow::Cow<[u16]> = match bytemuck::try_cast_slice::<u8, u16>(data) {
        Ok(v) => v.into(),
        Err(_) => {
            let mut staged = vec![0u16; data.len() / 2];
            bytemuck::cast_slice_mut(&mut staged).copy_from_slice(data);
            staged.into()
        }
    };
    if cfg!(target_endian = "big") {
        values
            .to_mut()
            .iter_mut()
            .for_each(|v| *v = u16::from_le(*v));
    }
    // SAFETY: `src` reads `values`, which outlives it (it is dropped in this
    // function), and nothing writes through it.
    let src = unsafe {
        Tensor::f_from_blob(
            values.as_ptr().cast(),
            &[values.len() as i64],
            &[1],
            kind,
            Device::Cpu,
        )?
    };
    var.f_view([-1])?.f_copy_(&src)?;
    Ok(())
}

/// Copies a payload from [`vars_to_safetensors`] or
/// [`ActorCritic::to_safetensors_as`] into `vs` (same architecture); nothing changes
/// unless every tensor is present, finite and of the right shape.
pub fn load_vars(vs: &nn::VarStore, bytes: &[u8]) -> Result<HashMap<String, String>, ModelError> {
    let metadata = read_metadata(bytes)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Weights(e.to_string()))?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    // Every tensor is checked before any variable is written.
    let types = [Dtype::F32, Dtype::F16, Dtype::BF16];
    let checked = vars
        .iter()
        .map(|(name, var)| checked(&st, name, &var.size(), &types))
        .collect::<Result<Vec<_>, _>>()?;
    tch::no_grad(|| {
        vars.iter_mut()
            .zip(checked)
            .try_for_each(|((_, var), (dtype, data))| match dtype {
                Dtype::F16 => copy_le16(var, data, Kind::Half),
                Dtype::BF16 => copy_le16(var, data, Kind::BFloat16),
                _ => copy_le_f32(var, data),
            })
    })?;
    Ok(metadata)
}

/// The metadata of a safetensors payload, without decoding its tensors.
pub fn read_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, ModelError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Weights(e.to_string()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The policy version stored in a payload's metadata.
pub fn payload_version(meta: &HashMap<String, String>) -> Result<u64, ModelError> {
    meta.get(VERSION_KEY)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ModelError::Weights(format!("metadata `{VERSION_KEY}` is missing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_with_version() {
        tch::manual_seed(0);
        let a = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let obs = Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.0]).view([1, 4]);
        assert!(!a.logits(&obs).allclose(&b.logits(&obs), 1e-6, 1e-6, false));
        let bytes = a.to_safetensors(7, &HashMap::new()).unwrap();
        let meta = b.load_safetensors(&bytes).unwrap();
        assert_eq!(payload_version(&meta).unwrap(), 7);
        assert!(a.logits(&obs).allclose(&b.logits(&obs), 1e-6, 1e-6, false));
        assert!(a.values(&obs).allclose(&b.values(&obs), 1e-6, 1e-6, false));
    }

    #[test]
    fn mismatched_or_corrupt_weights_change_nothing() {
        let a = ActorCritic::new(4, 3, &[8], Device::Cpu);
        let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let obs = Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.0]).view([1, 4]);
        let before = b.logits(&obs);
        let err = b.load_safetensors(&a.to_safetensors(1, &HashMap::new()).unwrap());
        assert!(err.unwrap_err().to_string().contains("policy.l1.bias"));
        assert!(b.load_safetensors(b"not a payload").is_err());
        assert!(before.allclose(&b.logits(&obs), 0.0, 0.0, false));
    }

    #[test]
    fn non_finite_weights_are_refused_by_name_and_change_nothing() {
        let a = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let obs = Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.0]).view([1, 4]);
        let before = b.logits(&obs);
        // the same payload, all finite, loads
        let good = a.to_safetensors(1, &HashMap::new()).unwrap();
        let mut c = ActorCritic::new(4, 2, &[8], Device::Cpu);
        c.load_safetensors(&good).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            tch::no_grad(|| {
                let vars = a.vs.variables();
                let _ = vars["value.l1.weight"].get(0).get(3).fill_(f64::from(bad));
            });
            let err = b
                .load_safetensors(&a.to_safetensors(2, &HashMap::new()).unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("value.l1.weight") && err.contains("non-finite"),
                "{err}"
            );
            assert!(before.allclose(&b.logits(&obs), 0.0, 0.0, false));
        }
        // the largest finite values are weights like any other
        assert!(all_finite_le(
            &[f32::MAX, f32::MIN, -0.0, f32::MIN_POSITIVE / 2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        ));
    }

    /// The variables of `m`, by name.
    fn vars_of(m: &ActorCritic) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = m.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn weights_travel_as_f16_or_bf16_at_half_the_bytes() {
        tch::manual_seed(3);
        let a = ActorCritic::new(4, 2, &[64, 64], Device::Cpu);
        let f32_len = a.to_safetensors(1, &HashMap::new()).unwrap().len();
        for (dtype, st_type, kind) in [
            (WeightsDtype::F16, Dtype::F16, Kind::Half),
            (WeightsDtype::Bf16, Dtype::BF16, Kind::BFloat16),
        ] {
            let bytes = a.to_safetensors_as(4, &HashMap::new(), dtype).unwrap();
            assert!(
                bytes.len() * 10 < f32_len * 6,
                "{dtype:?}: {} bytes",
                bytes.len()
            );
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert!(st.tensors().iter().all(|(_, v)| v.dtype() == st_type));
            // At every alignment the payload can have in a message.
            for offset in 0..3 {
                let mut shifted = vec![0u8; offset];
                shifted.extend_from_slice(&bytes);
                let mut b = ActorCritic::new(4, 2, &[64, 64], Device::Cpu);
                let meta = b.load_safetensors(&shifted[offset..]).unwrap();
                assert_eq!(payload_version(&meta).unwrap(), 4);
                // Each variable holds exactly the rounded value, back in f32.
                for ((name, want), (_, got)) in vars_of(&a).iter().zip(vars_of(&b)) {
                    assert_eq!(got.kind(), Kind::Float);
                    let rounded = want.to_kind(kind).to_kind(Kind::Float);
                    assert!(rounded.equal(&got), "{dtype:?} {name}");
                }
            }
        }
    }

    #[test]
    fn a_tensor_beyond_f16_range_goes_out_as_f32() {
        let a = ActorCritic::new(4, 2, &[8], Device::Cpu);
        tch::no_grad(|| {
            let _ = a.vs.variables()["value.l0.bias"].get(2).fill_(1e6);
        });
        let bytes = a
            .to_safetensors_as(1, &HashMap::new(), WeightsDtype::F16)
            .unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let want = if name == "value.l0.bias" {
                Dtype::F32
            } else {
                Dtype::F16
            };
            assert_eq!(view.dtype(), want, "{name}");
        }
        let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
        b.load_safetensors(&bytes).unwrap();
        let got = b.vs.variables()["value.l0.bias"].double_value(&[2]);
        assert_eq!(got, 1e6);
    }

    #[test]
    fn non_finite_half_weights_are_refused_by_name_and_change_nothing() {
        let a = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let obs = Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.0]).view([1, 4]);
        for (dtype, bad_bits) in [
            (WeightsDtype::F16, [0x7c00u16, 0xfc00, 0x7e00]),
            (WeightsDtype::Bf16, [0x7f80u16, 0xff80, 0x7fc0]),
        ] {
            let good = a.to_safetensors_as(2, &HashMap::new(), dtype).unwrap();
            let at = {
                let st = SafeTensors::deserialize(&good).unwrap();
                let data = st.tensor("policy.l1.weight").unwrap().data();
                data.as_ptr() as usize - good.as_ptr() as usize
            };
            for bits in bad_bits {
                let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
                let before = b.logits(&obs);
                let mut bad = good.clone();
                bad[at + 6..at + 8].copy_from_slice(&bits.to_le_bytes());
                let err = b.load_safetensors(&bad).unwrap_err().to_string();
                assert!(
                    err.contains("policy.l1.weight") && err.contains("non-finite"),
                    "{dtype:?} {bits:#x}: {err}"
                );
                assert!(before.allclose(&b.logits(&obs), 0.0, 0.0, false));
                // The unpatched payload loads into the same model.
                b.load_safetensors(&good).unwrap();
            }
        }
    }

    #[test]
    fn weights_load_from_a_payload_at_any_alignment() {
        let a = ActorCritic::new(4, 2, &[8], Device::Cpu);
        let bytes = a.to_safetensors(1, &HashMap::new()).unwrap();
        let obs = Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.0]).view([1, 4]);
        for offset in 1..4 {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(&bytes);
            let mut b = ActorCritic::new(4, 2, &[8], Device::Cpu);
            b.load_safetensors(&shifted[offset..]).unwrap();
            assert!(a.logits(&obs).allclose(&b.logits(&obs), 0.0, 0.0, false));
            assert!(a.values(&obs).allclose(&b.values(&obs), 0.0, 0.0, false));
        }
    }

    #[test]
    fn act_samples_valid_actions_with_log_probs() {
        let m = ActorCritic::new(3, 4, &[16, 16], Device::Cpu);
        let obs = vec![0.5f32; 3 * 10];
        let (a, lp) = m.act(&obs, &mut [], false);
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|&x| (0..4).contains(&x)));
        // A fresh policy is close to uniform over 4 actions.
        assert!(
            lp.iter().all(|&l| (l - (0.25f32).ln()).abs() < 0.1),
            "{lp:?}"
        );
        // With values: one per row, the critic's, which reads the observations.
        let rows: Vec<f32> = (0..30).map(|i| i as f32 / 10.0).collect();
        let (a, lp, v) = m.act_with_values(&rows, false);
        assert_eq!((a.len(), lp.len(), v.len()), (10, 10, 10));
        assert_eq!(v, m.values_of(&rows));
        assert!(v[0] != v[9], "{v:?}");
    }

    /// Sampled actions follow the policy's probabilities, carry their own
    /// log-probabilities and never pick an impossible action; greedy takes the first
    /// of the most likely.
    #[test]
    fn sampling_follows_the_probabilities() {
        let probs = [0.2f32, 0.0, 0.5, 0.3];
        let n = 40_000;
        let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let logits = Tensor::from_slice(&row.repeat(n)).view([n as i64, 4]);
        tch::manual_seed(11);
        let (actions, lp) = ActorCritic::sample(&logits, false);
        let mut counts = [0usize; 4];
        for (&a, &l) in actions.iter().zip(&lp) {
            counts[a as usize] += 1;
            assert!((l - row[a as usize]).abs() < 1e-6);
        }
        assert_eq!(counts[1], 0);
        for (c, p) in counts.iter().zip(probs) {
            assert!((*c as f32 / n as f32 - p).abs() < 0.01, "{counts:?}");
        }

        let ties = Tensor::from_slice(&[1.0f32, 3.0, 3.0, -2.0]).view([1, 4]);
        let (greedy, lp) = ActorCritic::sample(&ties, true);
        assert_eq!(greedy, vec![1]);
        assert!(
            (lp[0] - (3.0 - (1f32.exp() + 2.0 * 3f32.exp() + (-2f32).exp()).ln())).abs() < 1e-5
        );
    }

    fn memory_spec() -> EnvSpec {
        use crate::env::Env;
        crate::env::Memory::new(2, 1, None).spec()
    }

    fn with_core(core: CoreKind) -> ModelConfig {
        ModelConfig {
            hidden: vec![16],
            core,
            core_size: 8,
            ..Default::default()
        }
    }

    #[test]
    fn recurrent_policies_carry_state_and_round_trip_their_core() {
        let spec = memory_spec();
        for (core, state_size) in [(CoreKind::Lstm, 16), (CoreKind::Gru, 8)] {
            let a = ActorCritic::for_spec(&spec, &with_core(core), Device::Cpu).unwrap();
            assert_eq!(a.state_size(), state_size);
            let names: Vec<String> = a.var_store().variables().into_keys().collect();
            assert!(names.iter().any(|k| k == "rnn.w_hh"), "{names:?}");
            // Acting moves the state; the same observation from another state acts
            // differently.
            let obs = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0];
            let mut state = vec![0.0f32; 2 * state_size];
            let (_, first) = a.act(&obs, &mut state, true);
            assert!(state.iter().any(|&x| x != 0.0));
            let (_, second) = a.act(&obs, &mut state, true);
            assert_ne!(first, second);
            // Weights (the core's included) travel in the safetensors payload.
            let mut b = ActorCritic::for_spec(&spec, &with_core(core), Device::Cpu).unwrap();
            b.load_safetensors(&a.to_safetensors(2, &HashMap::new()).unwrap())
                .unwrap();
            let (mut sa, mut sb) = (vec![0.5f32; 2 * state_size], vec![0.5f32; 2 * state_size]);
            assert_eq!(a.act(&obs, &mut sa, true), b.act(&obs, &mut sb, true));
            assert_eq!(sa, sb);
            // A feedforward policy cannot take a recurrent one's weights.
            let mut ff =
                ActorCritic::for_spec(&spec, &with_core(CoreKind::None), Device::Cpu).unwrap();
            assert_eq!(ff.state_size(), 0);
            assert!(ff
                .load_safetensors(&a.to_safetensors(2, &HashMap::new()).unwrap())
                .is_err());
        }
    }

    #[test]
    fn unrolled_sequences_reproduce_step_by_step_acting() {
        let spec = memory_spec();
        let (steps, n, d) = (7usize, 3usize, spec.obs_dim);
        for core in [CoreKind::Lstm, CoreKind::Gru] {
            let m = ActorCritic::for_spec(&spec, &with_core(core), Device::Cpu).unwrap();
            let s = m.state_size();
            let obs: Vec<f32> = (0..steps * n * d)
                .map(|i| ((i * 7919) % 13) as f32 / 13.0)
                .collect();
            // Env 1 ends an episode after step 2, env 2 after steps 0 and 4.
            let ended = |t: usize, b: usize| (b == 1 && t == 2) || (b == 2 && (t == 0 || t == 4));
            let initial: Vec<f32> = (0..n * s).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
            let mut state = initial.clone();
            let (mut actions, mut log_probs, mut resets) = (Vec::new(), Vec::new(), Vec::new());
            for t in 0..steps {
                let (a, lp) = m.act(&obs[t * n * d..(t + 1) * n * d], &mut state, false);
                actions.extend(a);
                log_probs.extend(lp);
                for b in 0..n {
                    resets.push((t > 0 && ended(t - 1, b)) as u8 as f32);
                }
                let term: Vec<u8> = (0..n).map(|b| ended(t, b) as u8).collect();
                reset_ended(&mut state, &term, &vec![0; n]);
            }
            let x = Tensor::from_slice(&obs).view([(steps * n) as i64, d as i64]);
            let init = Tensor::from_slice(&initial).view([n as i64, s as i64]);
            let r = Tensor::from_slice(&resets).view([steps as i64, n as i64]);
            let u = m.unroll(&x, &init, &r);
            let e = ActorCritic::evaluation(&u.logits, u.values, &Tensor::from_slice(&actions));
            let again = Vec::<f32>::try_from(e.log_probs).unwrap();
            for (i, (a, b)) in log_probs.iter().zip(&again).enumerate() {
                assert!((a - b).abs() < 1e-5, "{core:?} step {i}: {a} vs {b}");
            }
            // Without the resets the sequence differs after the first episode end.
            let u = m.unroll(&x, &init, &r.zeros_like());
            let e = ActorCritic::evaluation(&u.logits, u.values, &Tensor::from_slice(&actions));
            let carried = Vec::<f32>::try_from(e.log_probs).unwrap();
            assert!(carried
                .iter()
                .zip(&log_probs)
                .any(|(a, b)| (a - b).abs() > 1e-4));
        }
    }

    fn nethack_spec() -> EnvSpec {
        use crate::env::ObsField;
        let field = |name: &str, shape: Vec<usize>| ObsField {
            name: name.into(),
            shape,
        };
        let fields = vec![
            field("glyphs_crop", vec![5, 5]),
            field("blstats", vec![27]),
            field("message", vec![256]),
        ];
        EnvSpec {
            obs_dim: fields.iter().map(ObsField::size).sum(),
            num_actions: 23,
            has_text: true,
            max_episode_steps: 0,
            fields,
        }
    }

    /// The message features from the windows up to the first all-zero one equal
    /// those from every window, values and gradients, whatever the lengths in the
    /// batch: none, mixed, and one message without a zero window.
    #[test]
    fn trimmed_message_windows_give_the_same_features_and_gradients() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = NetHackNet::new(&vs.root(), &nethack_spec(), 32, 32, 23).unwrap();
        let message = |lengths: &[usize]| {
            let mut b = vec![0i64; lengths.len() * 256];
            for (row, &len) in lengths.iter().enumerate() {
                for (i, x) in b[row * 256..row * 256 + len].iter_mut().enumerate() {
                    *x = 32 + ((row * 31 + i * 7) % 90) as i64;
                }
            }
            Tensor::from_slice(&b).view([lengths.len() as i64, 256])
        };
        // Features and the gradients of a fixed projection of them.
        let run = |bytes: &Tensor, trim: bool| {
            let out = net.message(bytes, trim);
            let proj = Tensor::linspace(-1.0, 1.0, 64, (Kind::Float, Device::Cpu));
            for v in vs.trainable_variables() {
                v.grad().defined().then(|| v.grad().zero_());
            }
            (&out * &proj).sum(Kind::Float).backward();
            let grads: Vec<Vec<f32>> = vs
                .trainable_variables()
                .iter()
                .filter(|v| v.grad().defined())
                .map(|v| f32_vec(&v.grad()))
                .collect();
            (f32_vec(&out), grads)
        };
        for (lengths, cut) in [
            (vec![0, 0], 8),
            (vec![12, 0, 37, 5], 48),
            (vec![40], 48),
            (vec![3, 256], 256),
        ] {
            let bytes = message(&lengths);
            assert_eq!(net.message_bytes_needed(&bytes), cut, "{lengths:?}");
            let (trimmed, trimmed_grads) = run(&bytes, true);
            let (full, full_grads) = run(&bytes, false);
            assert_eq!(trimmed_grads.len(), 3, "embedding, filters and bias");
            let close = |a: &[f32], b: &[f32]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
            };
            assert!(close(&trimmed, &full), "{lengths:?}: features differ");
            for (t, f) in trimmed_grads.iter().zip(&full_grads) {
                assert!(close(t, f), "{lengths:?}: gradients differ");
            }
        }
    }

    /// NetHack-like rows: glyph ids across the whole range and past it at both ends,
    /// signed stats, and messages from empty to full.
    fn nethack_rows(spec: &EnvSpec, n: usize) -> Vec<f32> {
        let mut obs = vec![0.0f32; n * spec.obs_dim];
        for (row, r) in obs.chunks_exact_mut(spec.obs_dim).enumerate() {
            for (j, v) in r.iter_mut().enumerate() {
                *v = match j {
                    j if j < 25 => ((row * 2389 + j * 797) % 6100) as f32 - 20.0,
                    j if j < 52 => (row * j) as f32 * 37.5 - 300.0,
                    j if j - 52 < row * 45 => (32 + (row * 31 + j * 7) % 95) as f32,
                    _ => 0.0,
                };
            }
        }
        obs
    }

    /// Acting through the folded tables gives the network's torso (and, feedforward,
    /// its logits and values), before and after new weights are loaded by bytes or by
    /// copy; the learner's passes never use the tables.
    #[test]
    fn folded_acting_matches_the_network() {
        tch::manual_seed(5);
        let spec = nethack_spec();
        let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-4, 1e-4, false);
        for core in [CoreKind::None, CoreKind::Gru] {
            let config = ModelConfig {
                hidden: vec![32],
                core,
                core_size: 16,
                ..Default::default()
            };
            // Every message length, from none to all 256 bytes.
            for n in [1, 2, 7] {
                let obs = nethack_rows(&spec, n);
                let x = Tensor::from_slice(&obs).view([n as i64, spec.obs_dim as i64]);
                let mut a = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
                let torso = a.features(&x);
                assert!(a.folded_torso(&obs).is_none());
                a.fold_for_acting();
                assert!(a.is_folded());
                let folded = a.folded_torso(&obs).unwrap();
                assert!(close(&folded, &torso), "{core:?}, {n} rows");
                if core == CoreKind::None {
                    let (logits, values) = a.logits_and_values(&x);
                    let (greedy, lp, v) = a.act_with_values(&obs, true);
                    let want = logits.argmax(-1, false);
                    assert_eq!(greedy, Vec::<i64>::try_from(want).unwrap());
                    let want_lp = logits.log_softmax(-1, Kind::Float).amax(-1, false);
                    assert!(close(&Tensor::from_slice(&lp), &want_lp));
                    assert!(close(&Tensor::from_slice(&v), &values));
                }

                // Fresh weights, folded, then a's loaded: acting follows the new weights.
                let mut b = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
                b.fold_for_acting();
                assert!(!close(&b.folded_torso(&obs).unwrap(), &torso));
                b.load_safetensors(&a.to_safetensors(2, &HashMap::new()).unwrap())
                    .unwrap();
                assert!(close(&b.folded_torso(&obs).unwrap(), &torso), "{core:?}");
                let mut c = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
                c.fold_for_acting();
                c.copy_from(&a).unwrap();
                assert!(close(&c.folded_torso(&obs).unwrap(), &torso), "{core:?}");

                // Weights the tables hold, changed in place, are not seen by acting
                // (the tables are read), while the learner's pass sees them.
                tch::no_grad(|| {
                    for (name, mut v) in a.var_store().variables() {
                        let held = ["glyph_emb", "conv1", "msg_emb", "msg_conv", "crop_fc"]
                            .iter()
                            .any(|layer| name.ends_with(&format!("{layer}.weight")));
                        if held {
                            let _ = v.zero_();
                        }
                    }
                });
                assert!(close(&a.folded_torso(&obs).unwrap(), &torso), "{core:?}");
                assert!(!close(&a.features(&x), &torso), "{core:?}");
            }
        }
        // Folding another network changes nothing.
        let mut mlp = ActorCritic::new(4, 2, &[8], Device::Cpu);
        mlp.fold_for_acting();
        assert!(!mlp.is_folded());
    }

    #[test]
    fn nethack_network_acts_evaluates_and_round_trips() {
        tch::manual_seed(1);
        let spec = nethack_spec();
        let config = ModelConfig {
            hidden: vec![32],
            ..Default::default()
        };
        // `auto` picks the NetHack network for these fields.
        let a = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
        assert!(a
            .var_store()
            .variables()
            .keys()
            .any(|k| k.starts_with("nethack.glyph_emb")));
        // Glyph ids up to MAX_GLYPH, huge stats and message bytes all go through.
        let mut obs = vec![0.0f32; 3 * spec.obs_dim];
        for (i, v) in obs.iter_mut().enumerate() {
            *v = match i % spec.obs_dim {
                j if j < 25 => ((i * 797) % 5977) as f32,
                j if j < 52 => (i as f32) * 1000.0 - 5.0,
                _ => (i % 256) as f32,
            };
        }
        let (actions, lp) = a.act(&obs, &mut [], false);
        assert_eq!(actions.len(), 3);
        assert!(actions.iter().all(|&x| (0..23).contains(&x)));
        assert!(lp.iter().all(|l| l.is_finite() && *l < 0.0));
        let x = Tensor::from_slice(&obs).view([3, spec.obs_dim as i64]);
        let e = a.evaluate(&x, &Tensor::from_slice(&actions));
        assert_eq!(e.values.size(), vec![3]);
        assert_eq!(e.all_log_probs.size(), vec![3, 23]);
        // Different observations give different values: the inputs are read.
        assert!(e.values.double_value(&[0]) != e.values.double_value(&[1]));

        let mut b = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
        b.load_safetensors(&a.to_safetensors(3, &HashMap::new()).unwrap())
            .unwrap();
        assert!(a.values(&x).allclose(&b.values(&x), 1e-6, 1e-6, false));
        // Acting with values: the greedy actions and log-probabilities of `act`,
        // and the critic's values of the same rows.
        let (greedy, greedy_lp) = a.act(&obs, &mut [], true);
        let (with, with_lp, values) = a.act_with_values(&obs, true);
        assert_eq!((&greedy, &greedy_lp), (&with, &with_lp));
        assert_eq!(values, a.values_of(&obs));
        let direct = Vec::<f32>::try_from(a.values(&x)).unwrap();
        assert_eq!(values, direct);
        // An MLP cannot load NetHack weights.
        let mut mlp = ActorCritic::new(spec.obs_dim, 23, &[32], Device::Cpu);
        assert!(mlp
            .load_safetensors(&a.to_safetensors(3, &HashMap::new()).unwrap())
            .is_err());

        // Asking for the NetHack network without its fields is a clear error.
        let plain = EnvSpec {
            fields: Vec::new(),
            ..spec
        };
        let forced = ModelConfig {
            arch: ModelArch::Nethack,
            ..config
        };
        let err = ActorCritic::for_spec(&plain, &forced, Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("glyphs_crop"), "{err}");
    }
}
