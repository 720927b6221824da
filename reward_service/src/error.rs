//! Reward-service errors.

use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("label store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("label store {path}: a stored record does not decode: {source}")]
    Record {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("judge: {0}")]
    Judge(String),
    #[error("judge client: {0}")]
    JudgeClient(#[source] JudgeError),
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

/// Why the service refused or ended a call. `From<RequestError> for Status` is the
/// one place the service's refusals become gRPC statuses.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("the reward service is shutting down")]
    ShuttingDown,
    #[error("a text batch holds {texts} texts, at most {limit} are allowed")]
    BatchTooLarge { texts: usize, limit: usize },
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::ShuttingDown => Status::unavailable(e.to_string()),
            RequestError::BatchTooLarge { .. } => Status::invalid_argument(e.to_string()),
        }
    }
}
