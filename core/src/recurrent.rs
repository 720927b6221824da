//! Recurrent cores (LSTM and GRU cells) for policies with memory. A core's state is
//! one flat row per sequence, `[B, state_size]`: an LSTM's hidden and cell state side
//! by side (`2 * size`), a GRU's hidden state (`size`). Actors and the learner step
//! the same cell one time step at a time, so a sequence re-run from a stored state
//! reproduces what the actor computed.

use tch::nn;
use tch::Tensor;

use crate::config::CoreKind;

pub struct RecurrentCore {
    kind: CoreKind,
    size: i64,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

impl RecurrentCore {
    /// A `kind` core (`lstm` or `gru`) reading `input` features into a `size`-wide
    /// hidden state, initialized as PyTorch initializes its cells.
    pub fn new(path: &nn::Path, kind: CoreKind, input: i64, size: i64) -> Self {
        let gates = match kind {
            CoreKind::Lstm => 4,
            CoreKind::Gru => 3,
            CoreKind::None => panic!("a recurrent core is an lstm or a gru"),
        };
        let bound = 1.0 / (size as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Self {
            kind,
            size,
            w_ih: path.var("w_ih", &[gates * size, input], init),
            w_hh: path.var("w_hh", &[gates * size, size], init),
            b_ih: path.var("b_ih", &[gates * size], init),
            b_hh: path.var("b_hh", &[gates * size], init),
        }
    }

    /// Width of the output (the hidden state).
    pub fn size(&self) -> i64 {
        self.size
    }

    /// Floats of state per sequence.
    pub fn state_size(&self) -> i64 {
        match self.kind {
            CoreKind::Lstm => 2 * self.size,
            _ => self.size,
        }
    }

    /// One time step: `x` `[B, input]` and `state` `[B, state_size]` give the
    /// output `[B, size]` and the next state.
    pub fn step(&self, x: &Tensor, state: &Tensor) -> (Tensor, Tensor) {
        match self.kind {
            CoreKind::Lstm => {
                let h = state.narrow(1, 0, self.size);
                let c = state.narrow(1, self.size, self.size);
                let (h, c) = x.lstm_cell(
                    &[&h, &c],
                    &self.w_ih,
                    &self.w_hh,
                    Some(&self.b_ih),
                    Some(&self.b_hh),
                );
                let next = Tensor::cat(&[&h, &c], 1);
                (h, next)
            }
            _ => {
                let h = x.gru_cell(
                    state,
                    &self.w_ih,
                    &self.w_hh,
                    Some(&self.b_ih),
                    Some(&self.b_hh),
                );
                (h.shallow_clone(), h)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn cells_match_the_step_by_step_definition() {
        for (kind, state_size) in [(CoreKind::Lstm, 10), (CoreKind::Gru, 5)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let core = RecurrentCore::new(&vs.root(), kind, 3, 5);
            assert_eq!(core.state_size(), state_size);
            let x = (Tensor::arange(12, (Kind::Float, Device::Cpu)) * 0.3)
                .sin()
                .view([4, 3]);
            let s0 = Tensor::zeros([4, state_size], (Kind::Float, Device::Cpu));
            let (out, s1) = core.step(&x, &s0);
            assert_eq!(out.size(), vec![4, 5]);
            assert_eq!(s1.size(), vec![4, state_size]);
            // The state moves, and depends on the state it came from.
            let (out2, _) = core.step(&x, &s1);
            assert!(!out.allclose(&out2, 1e-6, 1e-6, false));
            // Rows are independent: stepping one row alone gives the same row.
            let (one, _) = core.step(&x.narrow(0, 2, 1), &s1.narrow(0, 2, 1));
            let (all, _) = core.step(&x, &s1);
            assert!(one.allclose(&all.narrow(0, 2, 1), 1e-6, 1e-6, false));
        }
    }
}
