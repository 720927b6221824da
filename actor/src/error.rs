//! Actor errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ActorError {
    #[error(transparent)]
    Transport(#[from] spur_core::transport::TransportError),
    #[error("model: {0}")]
    Model(#[from] spur_core::ModelError),
    #[error("the learner rejected a chunk: {0}")]
    Rejected(String),
    #[error(transparent)]
    Env(#[from] spur_core::EnvError),
    #[error("rollout thread failed: {0}")]
    Rollout(String),
}
