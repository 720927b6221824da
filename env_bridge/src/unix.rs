//! The unix wire: the env service's request and reply messages, one per frame, on a
//! Unix socket between an actor and the bridge processes it starts beside itself
//! (`env.bridge_wire = "unix"`, or an `env.remote` address `unix:PATH`).
//!
//! A frame is a little-endian u32 body length, one kind byte, and the body. A
//! request's kind names the method ([`Method`]); a reply's is 0 with the encoded reply
//! as its body, or a gRPC status code with the error message as its body. The Python
//! side is `spur_bridge.server.UnixServer`.
//!
//! Failures read as gRPC's would, so that the batch judges them the same way: a socket
//! that fails, closes or stalls past the call timeout is `Unavailable` or
//! `DeadlineExceeded` (the server is gone), a reply that breaks the framing is
//! `Internal`; after any of them the connection is not used again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tonic::{Code, Status};

/// The largest frame body either side sends (as the gRPC wire's message limit).
pub(crate) const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Body length, then kind.
const HEADER_BYTES: usize = 5;

/// The request kinds: which method a frame calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Method {
    Spec = 1,
    Reset = 2,
    Step = 3,
    Render = 4,
}

/// One connection to a bridge's Unix socket; one call at a time.
pub(crate) struct UnixLink {
    path: PathBuf,
    stream: Mutex<UnixStream>,
    /// A call failed mid-frame: what is left on the stream cannot be trusted.
    broken: AtomicBool,
}

impl UnixLink {
    /// Connects to the socket at `path`, waiting at most `timeout`.
    pub(crate) async fn connect(path: PathBuf, timeout: Duration) -> std::io::Result<Self> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(&path))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        Ok(Self {
            path,
            stream: Mutex::new(stream),
            broken: AtomicBool::new(false),
        })
    }

    /// Sends `request` as a `method` frame and waits at most `timeout` for the reply.
    pub(crate) async fn call<Q: Message, R: Message + Default>(
        &self,
        method: Method,
        request: &Q,
        timeout: Duration,
    ) -> Result<R, Status> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(Status::unavailable(format!(
                "the connection to unix:{} broke in an earlier call",
                self.path.display()
            )));
        }
        let len = request.encoded_len();
        let mut frame = Vec::with_capacity(HEADER_BYTES + len);
        frame.extend_from_slice(&(len as u32).to_le_bytes());
        frame.push(method as u8);
        request
            .encode(&mut frame)
            .expect("a Vec grows to fit any message");
        let mut stream = self.stream.lock().await;
        let answer = tokio::time::timeout(timeout, exchange(&mut stream, &frame, &self.path)).await;
        let (kind, body) = match answer {
            Ok(Ok(reply)) => reply,
            Ok(Err(status)) => {
                self.broken.store(true, Ordering::Relaxed);
                return Err(status);
            }
            Err(_) => {
                self.broken.store(true, Ordering::Relaxed);
                return Err(Status::deadline_exceeded(format!(
                    "no reply from unix:{} within {timeout:?}",
                    self.path.display()
                )));
            }
        };
        if kind != 0 {
            return Err(Status::new(
                Code::from_i32(i32::from(kind)),
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
        R::decode(body.as_slice())
            .map_err(|e| Status::internal(format!("cannot decode the {method:?} reply: {e}")))
    }
}

/// Writes `frame` and reads one reply frame: its kind and body.
async fn exchange(
    stream: &mut UnixStream,
    frame: &[u8],
    path: &std::path::Path,
) -> Result<(u8, Vec<u8>), Status> {
    let gone = |e: std::io::Error| Status::unavailable(format!("unix:{}: {e}", path.display()));
    stream.write_all(frame).await.map_err(gone)?;
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header).await.map_err(gone)?;
    let (len, kind) = parse_header(header)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(gone)?;
    Ok((kind, body))
}

/// A reply header's body length and kind; a length over the limit breaks the framing.
fn parse_header(header: [u8; HEADER_BYTES]) -> Result<(usize, u8), Status> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(Status::internal(format!(
            "a reply frame of {len} bytes, over the limit of {MAX_FRAME_BYTES}"
        )));
    }
    Ok((len, header[4]))
}

#[cfg(test)]
mod tests {
    use spur_proto::v1::{StepReply, StepRequest};
    use tokio::net::UnixListener;

    use super::*;

    /// A server on a fresh socket that answers the first request with `reply` bytes
    /// (raw, so tests can break the framing), after checking the request frame.
    /// A listener on a socket in a fresh directory (removed when the first is dropped).
    fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    async fn serve_once(reply: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        let (dir, path, listener) = listen();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut header = [0u8; HEADER_BYTES];
            s.read_exact(&mut header).await.unwrap();
            let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            assert_eq!(header[4], Method::Step as u8);
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            assert_eq!(
                StepRequest::decode(body.as_slice()).unwrap().actions,
                [1, 0]
            );
            s.write_all(&reply).await.unwrap();
            // Hold the connection open until the client is done.
            let _ = s.read(&mut [0u8; 1]).await;
        });
        (dir, path)
    }

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = frame_header(body.len() as u32, kind);
        f.extend_from_slice(body);
        f
    }

    async fn step(path: PathBuf) -> (UnixLink, Result<StepReply, Status>) {
        let link = UnixLink::connect(path, Duration::from_secs(5))
            .await
            .unwrap();
        let request = StepRequest {
            actions: vec![1, 0],
        };
        let r = link
            .call(Method::Step, &request, Duration::from_secs(5))
            .await;
        (link, r)
    }

    #[tokio::test]
    async fn a_reply_frame_decodes_into_the_reply() {
        let reply = StepReply {
            rewards: vec![1.0, 0.5],
            ..Default::default()
        };
        let (_dir, path) = serve_once(frame(0, &reply.encode_to_vec())).await;
        let (_, r) = step(path).await;
        assert_eq!(r.unwrap(), reply);
    }

    #[tokio::test]
    async fn an_error_frame_is_its_status_and_the_link_stays_usable() {
        let (_dir, path) = serve_once(frame(3, b"action 5 for env 2 is outside 0..1")).await;
        let (link, r) = step(path).await;
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "action 5 for env 2 is outside 0..1");
        assert!(
            !link.broken.load(Ordering::Relaxed),
            "a refusal keeps the framing"
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_breaks_the_link() {
        let (_dir, path) = serve_once(frame_header(u32::MAX, 0)).await;
        let (link, r) = step(path).await;
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("4294967295 bytes"), "{status:?}");
        let again = link
            .call::<_, StepReply>(
                Method::Step,
                &StepRequest::default(),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert_eq!(again.code(), Code::Unavailable, "{again:?}");
        assert!(
            again.message().contains("broke in an earlier call"),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_mid_reply_is_gone() {
        let reply = StepReply {
            rewards: vec![1.0, 0.5],
            ..Default::default()
        };
        let mut bytes = frame(0, &reply.encode_to_vec());
        bytes.truncate(bytes.len() - 1);
        let (_dir, path, listener) = listen();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 64];
            let _ = s.read(&mut request).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            // Dropped here: the reply stops one byte short.
        });
        let (_, r) = step(path).await;
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_times_out() {
        let (_dir, path, listener) = listen();
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let link = UnixLink::connect(path, Duration::from_secs(5))
            .await
            .unwrap();
        let r = link
            .call::<_, StepReply>(
                Method::Step,
                &StepRequest::default(),
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    }

    fn frame_header(len: u32, kind: u8) -> Vec<u8> {
        let mut f = len.to_le_bytes().to_vec();
        f.push(kind);
        f
    }
}
