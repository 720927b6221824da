//! Reward-service errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("label store {path}: {message}")]
    Store { path: String, message: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("judge: {0}")]
    Judge(String),
    #[error("grpc server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error(transparent)]
    Transport(#[from] spur_core::transport::TransportError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("a start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why one judge request produced no answer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum JudgeError {
    #[error("request timed out")]
    Timeout,
    #[error("cannot reach the judge: {0}")]
    Connect(String),
    #[error("judge answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("judge response is not a chat completion: {0}")]
    BadResponse(String),
}

impl JudgeError {
    /// Worth another try: network trouble, timeouts, overload and server errors.
    pub fn retryable(&self) -> bool {
        match self {
            JudgeError::Timeout | JudgeError::Connect(_) => true,
            JudgeError::Http { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            JudgeError::BadResponse(_) => true,
        }
    }
}
