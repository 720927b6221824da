//! spur-core: what every spur role shares.
//!
//! - `config`: the typed experiment config (TOML, `SPUR_*` variables, `--set` flags)
//! - `tensor`, `trajectory`: wire tensors and trajectory chunks, strictly checked
//! - `env`: the `Env` and `EnvBatch` traits, `cartpole`, `keyroom`, `memory`,
//!   `replay` and the lock-step `VecEnv` (envs served by the Python bridge live in
//!   `spur-env-bridge`)
//! - `model`: the tch actor-critics (MLP, NetHack network, optional recurrent core,
//!   or a TorchScript module) and their safetensors weights
//! - `recurrent`: the LSTM and GRU cores
//! - `script`: policies saved by PyTorch as TorchScript modules (`model.arch =
//!   "torchscript"`), their interface and its start-up checks
//! - `vtrace`, `ppo`: the V-trace targets and the PPO loss
//! - `mlp_grad`: the PPO loss's gradients for the feedforward MLP, in closed form
//! - `advantage`: advantage estimators besides V-trace (GAE, group advantages)
//! - `checkpoint`: atomic, versioned checkpoints
//! - `adam`: Adam whose moments go into checkpoints
//! - `device`: config device strings to `tch::Device`
//! - `text_model`: the char-level CNN behind the distilled intrinsic reward models
//! - `reward`: ONI's repeat decay of intrinsic rewards
//! - `backoff`: jittered exponential backoff for reconnecting clients
//! - `blocking`: blocking work on a thread of its own, awaited from async code
//! - `redial`: typed call errors and reopening long-lived calls with backoff
//! - `transport`: every gRPC server and client endpoint (TLS, token, keepalive)
//! - `secret`: secrets from the environment that never print
//! - `prom`: Prometheus gauges from metrics rows and status messages
//! - `error`: the typed errors (config, wire, env, model)

pub mod adam;
pub mod advantage;
pub mod backoff;
pub mod blocking;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod env;
pub mod error;
pub mod fpu;
pub mod mlp_grad;
pub mod model;
pub mod ppo;
pub mod prom;
pub mod recurrent;
pub mod redial;
pub mod reward;
pub mod script;
pub mod secret;
pub mod tensor;
pub mod text_model;
pub mod trajectory;
pub mod transport;
pub mod vtrace;

pub use config::Config;
pub use error::{ConfigError, EnvError, ModelError, WireError};
