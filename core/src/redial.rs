//! Long-lived calls to a peer that may go away at any moment. [`CallError`] says why
//! a call did not open or ended (no connection, the peer's status, or the stream
//! closing) without flattening the cause into a string, and [`Redial`] reopens the
//! call with jittered exponential backoff, logging every failure with its wait. The
//! actor's trajectory, weights and text streams and the learner's reward-model
//! subscription all reconnect through it.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tonic::{Code, Status};
use tracing::warn;

use crate::backoff::Backoff;
use crate::transport::TransportError;

/// Why a call to a peer did not open, or ended.
#[derive(Debug, Error)]
pub enum CallError {
    /// No connection (TCP, TLS or HTTP/2) could be made.
    #[error(transparent)]
    Connect(#[from] TransportError),
    /// The peer answered with an error status.
    #[error("the peer answered {}: {}", .0.code(), .0.message())]
    Rpc(#[from] Status),
    /// The stream ended without an error status (the peer closed it, or our side
    /// of it went away).
    #[error("{0}")]
    Closed(&'static str),
}

impl CallError {
    /// The peer's status code, if the peer answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            CallError::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// Reopens one long-lived call to `peer` on behalf of `client`, waiting longer after
/// each failure in a row (up to a cap) and the shortest wait again once the call
/// has made progress.
pub struct Redial {
    backoff: Backoff,
    client: String,
    peer: &'static str,
}

impl Redial {
    /// `client` names the caller in logs (an actor id, `learner`), `peer` what it
    /// calls (`learner`, `reward service`).
    pub fn new(client: &str, peer: &'static str, max_backoff: Duration) -> Self {
        Self {
            backoff: Backoff::new(max_backoff),
            client: client.to_string(),
            peer,
        }
    }

    /// Runs `open` until it succeeds, waiting after each failure. Returns `None`
    /// when `give_up` says so after a failure (the caller is stopping and has
    /// nothing left to send).
    pub async fn open<T, F, Fut>(&mut self, mut open: F, give_up: impl Fn() -> bool) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        loop {
            match open().await {
                Ok(call) => return Some(call),
                Err(e) => {
                    if give_up() {
                        return None;
                    }
                    let delay = self.backoff.next_delay();
                    warn!(client = %self.client, peer = self.peer, error = %e, ?delay,
                        "cannot open a call to the {}, retrying", self.peer);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The call delivered something: the next failure waits the shortest delay.
    pub fn progressed(&mut self) {
        self.backoff.reset();
    }

    /// The call ended (`why`, if it ended with an error): logs it and waits before
    /// the caller reopens it.
    pub async fn ended(&mut self, why: Option<&CallError>) {
        let delay = self.backoff.next_delay();
        match why {
            Some(e) => warn!(client = %self.client, peer = self.peer, error = %e, ?delay,
                "the call to the {} ended, reopening", self.peer),
            None => warn!(client = %self.client, peer = self.peer, ?delay,
                "the {} closed the call, reopening", self.peer),
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn open_retries_until_the_call_opens() {
        let mut redial = Redial::new("a0", "learner", Duration::from_millis(20));
        let tries = AtomicU32::new(0);
        let opened = redial
            .open(
                || async {
                    if tries.fetch_add(1, Ordering::SeqCst) < 3 {
                        Err(CallError::Rpc(Status::unavailable("not yet")))
                    } else {
                        Ok(7)
                    }
                },
                || false,
            )
            .await;
        assert_eq!(opened, Some(7));
        assert_eq!(tries.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn open_gives_up_when_asked() {
        let mut redial = Redial::new("a0", "learner", Duration::from_millis(20));
        let opened: Option<()> = redial
            .open(|| async { Err(CallError::Closed("gone")) }, || true)
            .await;
        assert_eq!(opened, None);
    }

    #[test]
    fn only_an_answer_has_a_code() {
        assert_eq!(
            CallError::Rpc(Status::invalid_argument("bad")).code(),
            Some(Code::InvalidArgument)
        );
        assert_eq!(CallError::Closed("gone").code(), None);
    }
}
