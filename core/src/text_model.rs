//! Character-level CNN over event texts (tch), the network behind the distilled
//! intrinsic reward models: `classification` (two logits, cross-entropy, reward 1 when
//! p(helpful) > 0.5) and `ranking` (one score, Bradley–Terry loss over judged pairs,
//! ties as 0.5).
//!
//! Texts are lower-cased bytes, cut or zero-padded to [`MAX_CHARS`]; the network is an
//! embedding, one width-3 convolution with ReLU, a max over positions and a linear head.

use tch::nn::{self, Module, OptimizerConfig};

use tch::{Device, Kind, Tensor};

use crate::error::ModelError;

/// Characters of a text the model reads.
pub const MAX_CHARS: usize = 64;
const EMBED: i64 = 16;
const CHANNELS: i64 = 64;

/// The network alone: what a reward-model consumer needs for inference.
pub struct CharCnn {
    vs: nn::VarStore,
    embed: nn::Embedding,
    conv: nn::Conv1D,
    head: nn::Linear,
}

/// The network with its optimizer, for the reward service that trains it.
pub struct CharCnnTrainer {
    pub net: CharCnn,
    opt: nn::Optimizer,
}

/// `[B, MAX_CHARS]` byte ids of lower-cased texts, zero-padded.
pub fn encode(texts: &[&str], device: Device) -> Tensor {
    let mut ids = vec![0i64; texts.len() * MAX_CHARS];
    for (row, t) in texts.iter().enumerate() {
        for (i, b) in t.to_lowercase().bytes().take(MAX_CHARS).enumerate() {
            ids[row * MAX_CHARS + i] = b as i64;
        }
    }
    Tensor::from_slice(&ids)
        .view([texts.len() as i64, MAX_CHARS as i64])
        .to_device(device)
}

impl CharCnn {
    /// A model with `outputs` outputs (2 for classification, 1 for ranking).
    pub fn new(outputs: i64, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let embed = nn::embedding(&root / "embed", 256, EMBED, Default::default());
        let conv = nn::conv1d(
            &root / "conv",
            EMBED,
            CHANNELS,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let head = nn::linear(&root / "head", CHANNELS, outputs, Default::default());
        Self {
            vs,
            embed,
            conv,
            head,
        }
    }

    /// Weights as safetensors with `version` in the metadata.
    pub fn to_safetensors(&self, version: u64) -> Result<Vec<u8>, ModelError> {
        crate::model::vars_to_safetensors(&self.vs, version, &Default::default())
    }

    /// Loads weights from [`to_safetensors`](Self::to_safetensors); returns the version.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> Result<u64, ModelError> {
        let meta = crate::model::load_vars(&self.vs, bytes)?;
        crate::model::payload_version(&meta)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// `[B, outputs]` for `[B, MAX_CHARS]` ids.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let x = self.embed.forward(ids).transpose(1, 2);
        let x = self.conv.forward(&x).relu().amax([2].as_slice(), false);
        self.head.forward(&x)
    }

    /// p(helpful) for each text.
    pub fn helpful_probability(&self, texts: &[&str]) -> Vec<f32> {
        tch::no_grad(|| {
            let p = self
                .forward(&encode(texts, self.device()))
                .softmax(-1, Kind::Float)
                .select(1, 1);
            Vec::<f32>::try_from(p.to_device(Device::Cpu)).expect("a float tensor converts")
        })
    }

    /// The ranking score of each text.
    pub fn scores(&self, texts: &[&str]) -> Vec<f32> {
        tch::no_grad(|| {
            let s = self.forward(&encode(texts, self.device())).squeeze_dim(1);
            Vec::<f32>::try_from(s.to_device(Device::Cpu)).expect("a float tensor converts")
        })
    }
}

impl CharCnnTrainer {
    pub fn new(outputs: i64, lr: f64, device: Device) -> Result<Self, ModelError> {
        let net = CharCnn::new(outputs, device);
        let opt = nn::Adam::default().build(&net.vs, lr)?;
        Ok(Self { net, opt })
    }

    /// One Adam step of cross-entropy on `labels` (0 or 1); returns the loss.
    pub fn train_classifier(&mut self, texts: &[&str], labels: &[i64]) -> f64 {
        let ids = encode(texts, self.net.device());
        let target = Tensor::from_slice(labels).to_device(self.net.device());
        let loss = self.net.forward(&ids).cross_entropy_for_logits(&target);
        self.opt.backward_step(&loss);
        loss.double_value(&[])
    }

    /// One Adam step of the Bradley–Terry loss: `prefer` is 1 when the first text of
    /// a pair shows more progress, 0 when the second does, 0.5 for a tie.
    pub fn train_ranker(&mut self, first: &[&str], second: &[&str], prefer: &[f32]) -> f64 {
        let sa = self
            .net
            .forward(&encode(first, self.net.device()))
            .squeeze_dim(1);
        let sb = self
            .net
            .forward(&encode(second, self.net.device()))
            .squeeze_dim(1);
        let y = Tensor::from_slice(prefer).to_device(self.net.device());
        let loss = (sa - sb).binary_cross_entropy_with_logits::<Tensor>(
            &y,
            None,
            None,
            tch::Reduction::Mean,
        );
        self.opt.backward_step(&loss);
        loss.double_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const GOOD: [&str; 4] = [
        "you pick up the {} key",
        "you unlock the {} door",
        "you walk through the {} doorway",
        "you reach the {} goal",
    ];
    const BAD: [&str; 4] = [
        "you bump into a {} wall",
        "the {} door is locked",
        "you search the {} floor but find nothing",
        "a {} rat squeaks",
    ];
    const WORDS: [&str; 12] = [
        "red", "old", "small", "rusty", "blue", "heavy", "odd", "green", "dark", "bright", "tiny",
        "worn",
    ];

    /// Texts from templates with a filler word; the held-out set uses words the
    /// training set never saw.
    fn sample(rng: &mut SmallRng, words: &[&str], n: usize) -> Vec<(String, bool)> {
        (0..n)
            .map(|_| {
                let good = rng.random_bool(0.5);
                let templates = if good { &GOOD } else { &BAD };
                let t = templates[rng.random_range(0..templates.len())];
                let w = words[rng.random_range(0..words.len())];
                (t.replace("{}", w), good)
            })
            .collect()
    }

    #[test]
    fn classifier_learns_a_separable_set() {
        tch::manual_seed(0);
        let mut rng = SmallRng::seed_from_u64(0);
        let train = sample(&mut rng, &WORDS[..8], 128);
        let test = sample(&mut rng, &WORDS[8..], 200);
        let mut m = CharCnnTrainer::new(2, 3e-3, Device::Cpu).unwrap();
        let texts: Vec<&str> = train.iter().map(|(t, _)| t.as_str()).collect();
        let labels: Vec<i64> = train.iter().map(|(_, g)| *g as i64).collect();
        for _ in 0..100 {
            m.train_classifier(&texts, &labels);
        }
        let held: Vec<&str> = test.iter().map(|(t, _)| t.as_str()).collect();
        let p = m.net.helpful_probability(&held);
        let correct = p
            .iter()
            .zip(&test)
            .filter(|(p, (_, g))| (**p > 0.5) == *g)
            .count();
        let acc = correct as f64 / test.len() as f64;
        assert!(acc >= 0.95, "held-out accuracy {acc}");
    }

    #[test]
    fn ranker_orders_texts_by_progress() {
        tch::manual_seed(1);
        // Progress levels: search < key < door < goal.
        let levels = [
            "you search the {} floor but find nothing",
            "you pick up the {} key",
            "you unlock the {} door",
            "you reach the {} goal",
        ];
        let mut rng = SmallRng::seed_from_u64(1);
        let mut first = Vec::new();
        let mut second = Vec::new();
        let mut prefer = Vec::new();
        for _ in 0..256 {
            let (a, b) = (rng.random_range(0..4), rng.random_range(0..4));
            let w = WORDS[rng.random_range(0..8)];
            first.push(levels[a].replace("{}", w));
            second.push(levels[b].replace("{}", WORDS[rng.random_range(0..8)]));
            prefer.push(match a.cmp(&b) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Less => 0.0,
                std::cmp::Ordering::Equal => 0.5,
            });
        }
        let mut m = CharCnnTrainer::new(1, 3e-3, Device::Cpu).unwrap();
        let f: Vec<&str> = first.iter().map(String::as_str).collect();
        let s: Vec<&str> = second.iter().map(String::as_str).collect();
        for _ in 0..150 {
            m.train_ranker(&f, &s, &prefer);
        }
        // Held-out filler words: the scores must follow the progress order.
        for w in &WORDS[8..] {
            let texts: Vec<String> = levels.iter().map(|l| l.replace("{}", w)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let sc = m.net.scores(&refs);
            assert!(sc.windows(2).all(|p| p[0] < p[1]), "{w}: {sc:?}");
        }
    }
}
