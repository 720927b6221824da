//! Typed errors of the shared library. Servers map them to gRPC statuses in one place
//! each (the learner in `learner/src/error.rs`).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("override `{0}` must look like section.key=value")]
    Override(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// A message from another process that does not hold what it claims to.
#[derive(Debug, Error, PartialEq)]
pub enum WireError {
    #[error("field `{field}` is missing")]
    Missing { field: &'static str },
    #[error("field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl WireError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("weights payload: {0}")]
    Weights(String),
    /// A device the config names that this machine or this torch does not have.
    #[error("{key} = \"{spec}\": {message}")]
    Device {
        key: String,
        spec: String,
        message: String,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A TorchScript policy that cannot be loaded or breaks the module interface.
    #[error("torchscript module `{file}`: {message}")]
    Script { file: String, message: String },
}

/// An environment that cannot be built or stepped: a bridge process that would not
/// start, an env server that is gone (and could not be restarted) or answers out of
/// protocol.
#[derive(Debug, Error)]
pub enum EnvError {
    #[error("env bridge `{command}` did not start: {message}")]
    Spawn { command: String, message: String },
    #[error("env server {addr}: {message}")]
    Server { addr: String, message: String },
    #[error("env server {addr} broke the protocol: {message}")]
    Protocol { addr: String, message: String },
    /// A bridge (or `env.remote` server) that failed once `env.bridge_restarts`
    /// restarts of it had been tried.
    #[error(
        "env {bridge} failed and env.bridge_restarts is used up ({restarts} restarts tried): \
         {message}"
    )]
    BridgeFailed {
        bridge: String,
        restarts: u32,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}
