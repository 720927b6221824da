//! Policies written in PyTorch and saved with `torch.jit.save` (`model.arch =
//! "torchscript"`). The module's parameters are registered in the policy's
//! `VarStore` under `script.` (dots in their names become underscores), so Adam, the
//! weight broadcast, checkpoints and `load_vars` treat them like a built-in network's.
//!
//! The module must define two methods:
//!
//! - `forward(obs: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]`: `obs` is
//!   `[B, obs_dim]` float32 (the env's flat observation), `state` `[B, S]` float32;
//!   it returns the logits `[B, num_actions]`, the values `[B]` and the next state
//!   `[B, S]`.
//! - `initial_state(batch: int) -> Tensor`: `[batch, S]` zeros (`S = 0`, a `[batch,
//!   0]` tensor, for a feedforward module). Actors and the learner zero a row's state
//!   when its episode starts, so the initial state must be zeros.
//!
//! A module with `S > 0` is stepped one time step at a time with its state, as the
//! built-in recurrent cores are. [`ScriptPolicy::load`] checks all of this on a
//! dry run of two zero observations before any training or acting starts.

use std::path::Path;

use tch::nn;
use tch::{Device, IValue, Kind, Tensor, TrainableCModule};

use crate::env::EnvSpec;
use crate::error::ModelError;

/// Rows of zero observations in the start-up dry run.
const DRY_RUN_ROWS: i64 = 2;

pub struct ScriptPolicy {
    module: TrainableCModule,
    /// The file it came from, for messages.
    file: String,
    state_size: i64,
}

/// What one call of `forward` gave.
pub struct Step {
    /// `[B, num_actions]`.
    pub logits: Tensor,
    /// `[B]`.
    pub values: Tensor,
    /// `[B, S]`.
    pub state: Tensor,
}

impl ScriptPolicy {
    /// Loads `file` into `path`'s var store (on its device), in evaluation mode, and
    /// checks its interface against `spec` with a dry run.
    pub fn load(path: nn::Path, file: &str, spec: &EnvSpec) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Script {
            file: file.into(),
            message,
        };
        if !Path::new(file).is_file() {
            return Err(bad("no such file".into()));
        }
        let device = path.device();
        let mut module = TrainableCModule::load(file, path)
            .map_err(|e| bad(format!("cannot be loaded: {}", first_line(&e))))?;
        module.f_set_eval().map_err(|e| {
            bad(format!(
                "cannot switch to evaluation mode: {}",
                first_line(&e)
            ))
        })?;
        let mut policy = Self {
            module,
            file: file.into(),
            state_size: 0,
        };
        policy.state_size = policy.dry_run(spec, device)?;
        Ok(policy)
    }

    /// Floats of state per env (0: feedforward).
    pub fn state_size(&self) -> i64 {
        self.state_size
    }

    /// Training mode (dropout and the like on) for the learner's update passes, else
    /// evaluation mode for acting.
    pub fn set_train(&mut self, train: bool) {
        if train {
            self.module.set_train()
        } else {
            self.module.set_eval()
        }
    }

    /// One step of `obs` `[B, obs_dim]` from `state` `[B, S]`. The interface was
    /// checked at load time; a module that breaks it later (its output depends on the
    /// batch size, say) panics with the module's name and what went wrong.
    pub fn step(&self, obs: &Tensor, state: &Tensor) -> Step {
        let b = obs.size()[0];
        self.try_step(obs, state)
            .and_then(|s| self.check_step(&s, b, None).map(|_| s))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `[B, S]` zeros (what every episode starts from) on `device`.
    pub fn zero_state(&self, batch: i64, device: Device) -> Tensor {
        Tensor::zeros([batch, self.state_size], (Kind::Float, device))
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Script {
            file: self.file.clone(),
            message,
        }
    }

    fn try_step(&self, obs: &Tensor, state: &Tensor) -> Result<Step, ModelError> {
        let out = self
            .module
            .forward_is(&[
                IValue::Tensor(obs.shallow_clone()),
                IValue::Tensor(state.shallow_clone()),
            ])
            .map_err(|e| self.error(format!("forward failed: {}", first_line(&e))))?;
        let parts = match out {
            IValue::Tuple(parts) if parts.len() == 3 => parts,
            other => {
                return Err(self.error(format!(
                    "forward must return a tuple (logits, value, next_state), not {}",
                    describe(&other)
                )))
            }
        };
        let mut tensors = Vec::with_capacity(3);
        for (part, name) in parts.into_iter().zip(["logits", "value", "next_state"]) {
            match part {
                IValue::Tensor(t) => tensors.push(t),
                other => {
                    return Err(self.error(format!(
                        "forward returned {name} as {}, not a tensor",
                        describe(&other)
                    )))
                }
            }
        }
        let state = tensors.pop().expect("three tensors");
        let values = tensors.pop().expect("three tensors");
        let logits = tensors.pop().expect("three tensors");
        Ok(Step {
            logits,
            values,
            state,
        })
    }

    /// Shapes and kinds of one step's outputs for a batch of `b`; with `actions`, the
    /// logits must be that wide.
    fn check_step(&self, s: &Step, b: i64, actions: Option<i64>) -> Result<(), ModelError> {
        let logits_ok = match actions {
            Some(a) => s.logits.size() == [b, a],
            None => s.logits.dim() == 2 && s.logits.size()[0] == b,
        };
        if !logits_ok {
            let want = actions.map_or("one row per observation".into(), |a| {
                format!("the env has {a} actions")
            });
            return Err(self.error(format!(
                "forward returned logits of shape {:?}, {want}",
                s.logits.size()
            )));
        }
        if s.values.size() != [b] {
            return Err(self.error(format!(
                "forward returned value of shape {:?}, expected [{b}] (one value per row; \
                 squeeze a [B, 1] head)",
                s.values.size()
            )));
        }
        if s.state.size() != [b, self.state_size] {
            return Err(self.error(format!(
                "forward returned next_state of shape {:?}, expected [{b}, {}] as \
                 initial_state gives",
                s.state.size(),
                self.state_size
            )));
        }
        for (t, name) in [
            (&s.logits, "logits"),
            (&s.values, "value"),
            (&s.state, "next_state"),
        ] {
            if t.kind() != Kind::Float {
                return Err(self.error(format!(
                    "forward returned {name} as {:?}, expected float32",
                    t.kind()
                )));
            }
        }
        Ok(())
    }

    /// `initial_state(2)` and `forward` on two zero observations; the state width.
    fn dry_run(&mut self, spec: &EnvSpec, device: Device) -> Result<i64, ModelError> {
        let b = DRY_RUN_ROWS;
        let init = self
            .module
            .method_is("initial_state", &[IValue::Int(b)])
            .map_err(|e| {
                self.error(format!(
                    "calling method `initial_state` failed (it must be defined as \
                     initial_state(batch: int) -> Tensor): {}",
                    first_line(&e)
                ))
            })?;
        let init = match init {
            IValue::Tensor(t) => t,
            other => {
                return Err(self.error(format!(
                    "initial_state returned {}, not a tensor",
                    describe(&other)
                )))
            }
        };
        if init.dim() != 2 || init.size()[0] != b || init.kind() != Kind::Float {
            return Err(self.error(format!(
                "initial_state({b}) returned a {:?} tensor of shape {:?}, expected float32 \
                 [{b}, S]",
                init.kind(),
                init.size()
            )));
        }
        if init.numel() > 0 && init.abs().max().double_value(&[]) != 0.0 {
            return Err(self.error(
                "initial_state must return zeros (episodes start from a zeroed state)".into(),
            ));
        }
        self.state_size = init.size()[1];
        let obs = Tensor::zeros([b, spec.obs_dim as i64], (Kind::Float, device));
        let step = tch::no_grad(|| self.try_step(&obs, &init.to_device(device)))?;
        self.check_step(&step, b, Some(spec.num_actions as i64))?;
        for (t, name) in [
            (&step.logits, "logits"),
            (&step.values, "value"),
            (&step.state, "next_state"),
        ] {
            if t.numel() > 0 && !bool::try_from(t.isfinite().all()).unwrap_or(false) {
                return Err(self.error(format!(
                    "forward returned non-finite {name} for zero observations"
                )));
            }
        }
        Ok(self.state_size)
    }
}

/// The first line of a torch error (TorchScript errors carry long backtraces).
fn first_line(e: &tch::TchError) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}

fn describe(v: &IValue) -> String {
    match v {
        IValue::Tuple(parts) => format!("a tuple of {}", parts.len()),
        IValue::Tensor(t) => format!("a tensor of shape {:?}", t.size()),
        IValue::None => "None".into(),
        IValue::Int(_) => "an int".into(),
        IValue::Double(_) => "a float".into(),
        IValue::GenericList(_) | IValue::TensorList(_) => "a list".into(),
        _ => "another kind of value".into(),
    }
}
