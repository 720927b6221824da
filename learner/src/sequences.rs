//! Sequences for recurrent policies: which steps of a batch one recurrent core runs
//! through in order, the state it starts from, and where episodes restart it. A
//! chunk batch holds one sequence per column (from the chunk's initial state, zeroed
//! after every step that ended an episode); an episodes batch (UI-S1's groups) holds
//! one per episode, from zeros. Minibatches of a recurrent update are whole
//! sequences, padded to the longest for one time-major pass.

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::episodes::GroupLayout;

pub struct Sequences {
    /// Per sequence, the flat batch index (`t * width + column`) of each step.
    steps: Vec<Vec<i64>>,
    /// Per sequence and step: 1.0 where the state is zeroed before the step.
    resets: Vec<Vec<f32>>,
    /// `len() * state_size` starting states.
    initial: Vec<f32>,
    state_size: usize,
}

/// Sequences laid out time-major for one pass: `[L, J]`, padded past each
/// sequence's end by repeating its last step.
pub struct Padded {
    /// `[L * J]` flat batch index of each (step, sequence).
    pub index: Tensor,
    /// `[L, J]`.
    pub resets: Tensor,
    /// `[J, state_size]`.
    pub initial: Tensor,
    /// Positions in `L * J` of real steps (None: no padding, every position is one).
    valid: Option<Tensor>,
    /// Flat batch index of each real step, in the order [`pick`](Self::pick) returns.
    pub flat: Tensor,
}

impl Padded {
    /// The rows of `t` (`[L * J, ...]`, from a pass over this layout) that are real
    /// steps, in the order of [`flat`](Self::flat).
    pub fn pick(&self, t: &Tensor) -> Tensor {
        match &self.valid {
            Some(v) => t.index_select(0, v),
            None => t.shallow_clone(),
        }
    }
}

impl Sequences {
    /// One sequence per column of a chunk batch over its first `rows` time steps
    /// (`T` to train; `T + 1` to reach the bootstrap row), each from its chunk's
    /// initial state; a step whose previous step ended the episode starts from zeros.
    pub fn columns(batch: &Batch, rows: usize) -> Self {
        let w = batch.width;
        let ended = |i: usize| batch.terminated[i] == 1 || batch.truncated[i] == 1;
        Self {
            steps: (0..w)
                .map(|b| (0..rows).map(|t| (t * w + b) as i64).collect())
                .collect(),
            resets: (0..w)
                .map(|b| {
                    (0..rows)
                        .map(|t| (t > 0 && ended((t - 1) * w + b)) as u8 as f32)
                        .collect()
                })
                .collect(),
            initial: batch.initial_states.clone(),
            state_size: batch.state_size,
        }
    }

    /// One sequence per episode of a batch from `episodes_batch` (one column,
    /// episodes back to back), each from a zero state.
    pub fn episodes(layout: &GroupLayout, state_size: usize) -> Self {
        let spans: Vec<(usize, usize)> = layout.iter().flatten().copied().collect();
        Self {
            steps: spans
                .iter()
                .map(|&(s, l)| (s as i64..(s + l) as i64).collect())
                .collect(),
            resets: spans.iter().map(|&(_, l)| vec![0.0; l]).collect(),
            initial: vec![0.0; spans.len() * state_size],
            state_size,
        }
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Sequences `which`, time-major and padded to the longest, on `dev`.
    pub fn pad(&self, which: &[usize], dev: Device) -> Padded {
        let (j, s) = (which.len(), self.state_size);
        let l = which
            .iter()
            .map(|&q| self.steps[q].len())
            .max()
            .unwrap_or(0);
        let mut index = Vec::with_capacity(l * j);
        let mut resets = Vec::with_capacity(l * j);
        let mut valid = Vec::with_capacity(l * j);
        let mut flat = Vec::with_capacity(l * j);
        for t in 0..l {
            for (col, &q) in which.iter().enumerate() {
                let steps = &self.steps[q];
                match steps.get(t) {
                    Some(&i) => {
                        valid.push((t * j + col) as i64);
                        index.push(i);
                        resets.push(self.resets[q][t]);
                        flat.push(i);
                    }
                    None => {
                        index.push(*steps.last().expect("sequences are not empty"));
                        resets.push(0.0);
                    }
                }
            }
        }
        let valid = (flat.len() < l * j).then(|| Tensor::from_slice(&valid).to_device(dev));
        let mut initial = Vec::with_capacity(j * s);
        for &q in which {
            initial.extend_from_slice(&self.initial[q * s..(q + 1) * s]);
        }
        Padded {
            index: Tensor::from_slice(&index).to_device(dev),
            resets: Tensor::from_slice(&resets)
                .view([l as i64, j as i64])
                .to_device(dev),
            initial: Tensor::from_slice(&initial)
                .view([j as i64, s as i64])
                .to_kind(Kind::Float)
                .to_device(dev),
            valid,
            flat: Tensor::from_slice(&flat).to_device(dev),
        }
    }
}
