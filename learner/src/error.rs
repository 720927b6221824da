//! Learner errors, and the one place where they become gRPC statuses.

use spur_core::{ModelError, WireError};
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum LearnerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("run directory {path}: {source}")]
    RunDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Env(#[from] spur_core::EnvError),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("grpc server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error(transparent)]
    Transport(#[from] spur_core::transport::TransportError),
    #[error("training thread panicked")]
    TrainerPanicked,
    #[error(
        "the trainer did not finish its update and checkpoint within the drain timeout ({0:?})"
    )]
    DrainTimeout(std::time::Duration),
}

/// A chunk that does not hold what it claims is the sender's fault.
pub fn malformed_chunk(actor_id: &str, err: &WireError) -> Status {
    tracing::warn!(actor_id, error = %err, "rejecting malformed chunk");
    Status::invalid_argument(format!("malformed trajectory chunk: {err}"))
}

/// The learner stopped taking chunks (training finished or shutting down).
pub fn not_accepting() -> Status {
    Status::unavailable("the learner is not accepting chunks: training finished or shutting down")
}
