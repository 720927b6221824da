//! The one place where spur's gRPC servers and client endpoints are built, from
//! `[transport]` (`config::TransportConfig`), so that every role speaks alike:
//!
//! - TLS with rustls: a server presents `tls_cert` and, when `tls_ca` is set,
//!   requires client certificates signed by it (mutual TLS); a client verifies the
//!   server against `tls_ca` and presents `tls_cert`. `https://` addresses go with
//!   `tls_ca`, `http://` without it, and nothing else is accepted.
//! - A shared bearer token: [`Transport::guard`] wraps a spur service so that a call
//!   without `authorization: Bearer <token>` fails with `Unauthenticated`, compared in
//!   constant time; every [`Connector`] attaches it. Health is never guarded.
//! - HTTP/2 keepalive on both ends: a ping after `keepalive_ms` without traffic, and
//!   a peer that does not answer within as long again is dropped, so a network
//!   partition (no FIN, no RST) ends the streams that crossed it after about twice
//!   `keepalive_ms` instead of never.
//! - A whole connect (TCP, TLS handshake, HTTP/2) within [`CONNECT_TIMEOUT`].
//!   Per-request deadlines are left to unary-only clients
//!   ([`Connector::request_timeout`]): on a stream they would cut it short.

use std::future::Future;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::net::TcpListener;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tracing::{info, warn};

use crate::config::TransportConfig;
use crate::secret::Secret;

/// The longest a client's connect may take: TCP, the TLS handshake and HTTP/2 (and
/// a server's TLS handshake with a client).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The metadata key of the bearer token.
const AUTHORIZATION: &str = "authorization";

/// The largest HTTP/2 DATA frame a peer may send us (both sides announce it). The
/// protocol's default of 16 KiB cuts a NetHack chunk (768 KiB) or a weights piece
/// into dozens of frames, each a wake-up and a copy; 1 MiB frames cut the CPU per
/// byte of ingest by about a fifth (`spur bench ingest`, docs/benchmarks.md).
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// A client channel that sends the service token with every call.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

/// A spur service that refuses calls without the service token.
pub type Guarded<S> = InterceptedService<S, RequireToken>;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("config key `{key}`: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config key `{key}`: {message}")]
    Tls { key: &'static str, message: String },
    #[error(
        "config key `transport.token_env`: the token in ${var} is not a valid header \
         value (visible ASCII only)"
    )]
    Token { var: String },
    #[error("address `{addr}`: {message}")]
    Address { addr: String, message: String },
    #[error("config key `{key}`: cannot bind {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {}", chain(source))]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {addr}: no connection within {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
}

/// TLS material, token and keepalive of one process, read once at start.
#[derive(Clone)]
pub struct Transport {
    identity: Option<Identity>,
    ca: Option<Certificate>,
    token: Option<Secret>,
    keepalive: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls_identity", &self.identity.is_some())
            .field("tls_ca", &self.ca.is_some())
            .field("token", &self.token)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// An error and its causes on one line (tonic's own say only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn read_pem(key: &'static str, path: &str) -> Result<Option<Vec<u8>>, TransportError> {
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|source| TransportError::Read {
            key,
            path: path.to_string(),
            source,
        })
}

impl Transport {
    /// Reads the certificate files and checks that they parse, naming the key at
    /// fault, so a role fails at start rather than on its first connection.
    pub fn from_config(c: &TransportConfig) -> Result<Self, TransportError> {
        let cert = read_pem("transport.tls_cert", &c.tls_cert)?;
        let key = read_pem("transport.tls_key", &c.tls_key)?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(cert, key)),
            (None, None) => None,
            _ => {
                return Err(TransportError::Tls {
                    key: "transport.tls_key",
                    message: "must be set together with transport.tls_cert".into(),
                })
            }
        };
        let ca = read_pem("transport.tls_ca", &c.tls_ca)?.map(Certificate::from_pem);
        if let Some(id) = &identity {
            Server::builder()
                .tls_config(ServerTlsConfig::new().identity(id.clone()))
                .map_err(|e| TransportError::Tls {
                    key: "transport.tls_cert",
                    message: format!(
                        "not a PEM certificate with its private key in transport.tls_key: {}",
                        chain(&e)
                    ),
                })?;
        }
        if let Some(ca) = &ca {
            Endpoint::from_static("https://localhost")
                .tls_config(ClientTlsConfig::new().ca_certificate(ca.clone()))
                .map_err(|e| TransportError::Tls {
                    key: "transport.tls_ca",
                    message: format!("not a PEM CA certificate: {}", chain(&e)),
                })?;
        }
        if let Some(t) = &c.token {
            // Checked here, so attaching it later cannot fail.
            AsciiMetadataValue::try_from(format!("Bearer {}", t.expose())).map_err(|_| {
                TransportError::Token {
                    var: c.token_env.clone(),
                }
            })?;
        }
        Ok(Self {
            identity,
            ca,
            token: c.token.clone(),
            keepalive: Duration::from_millis(c.keepalive_ms),
        })
    }

    /// `https` when clients speak TLS (`transport.tls_ca` is set), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.ca.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `addr` (`host:port`) as a URL with [`Transport::scheme`]; an address that
    /// already has a scheme is returned as is.
    pub fn url(&self, addr: &str) -> String {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("{}://{addr}", self.scheme())
        }
    }

    /// The server of a role's main port: TLS with `tls_cert` (client certificates
    /// signed by `tls_ca` required when it is set), HTTP/2 keepalive. Add the role's
    /// services through [`Transport::guard`].
    pub fn server(&self) -> Result<Server, TransportError> {
        let server = self.plain_server();
        let Some(identity) = &self.identity else {
            if self.ca.is_some() {
                // Clients sharing this config speak TLS: a plain server would
                // answer none of them.
                return Err(TransportError::Tls {
                    key: "transport.tls_cert",
                    message: "a server needs its own certificate when transport.tls_ca is set"
                        .into(),
                });
            }
            return Ok(server);
        };
        let mut tls = ServerTlsConfig::new()
            .identity(identity.clone())
            .timeout(CONNECT_TIMEOUT);
        if let Some(ca) = &self.ca {
            tls = tls.client_ca_root(ca.clone());
        }
        server.tls_config(tls).map_err(|e| TransportError::Tls {
            key: "transport.tls_cert",
            message: chain(&e),
        })
    }

    /// A server with keepalive but no TLS, for the plain health port.
    fn plain_server(&self) -> Server {
        Server::builder()
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keepalive_interval(Some(self.keepalive))
            .http2_keepalive_timeout(Some(self.keepalive))
    }

    /// Serves `health` alone on a role's plain health port ([`bind_health`]): no
    /// TLS and no token, for probes that cannot present a client certificate (the
    /// role's main port answers health too). Ends when `stop` resolves.
    pub fn serve_health<T: Health>(
        &self,
        listener: TcpListener,
        health: HealthServer<T>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "plain health port listening");
        }
        let serve = self
            .plain_server()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming(listener), stop);
        async move {
            if let Err(e) = serve.await {
                warn!(error = %e, "the plain health server ended with an error");
            }
        }
    }

    /// `service` behind the token check (a pass-through when no token is set).
    pub fn guard<S>(&self, service: S) -> Guarded<S> {
        InterceptedService::new(service, RequireToken::new(self.token.as_ref()))
    }

    /// A client of the server at `addr`, with TLS, keepalive and the token.
    pub fn client(&self, addr: &str) -> Result<Connector, TransportError> {
        let bad = |message: &str| TransportError::Address {
            addr: addr.to_string(),
            message: message.into(),
        };
        let https = addr.starts_with("https://");
        if https && self.ca.is_none() {
            return Err(bad(
                "https:// needs transport.tls_ca, the CA that signed the server's certificate",
            ));
        }
        if !https && self.ca.is_some() {
            return Err(bad(
                "transport.tls_ca is set, so servers speak TLS: use https://",
            ));
        }
        let mut endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| bad(&chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive)
            .keep_alive_while_idle(true);
        if let Some(ca) = &self.ca {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .timeout(CONNECT_TIMEOUT);
            if let Some(identity) = &self.identity {
                tls = tls.identity(identity.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(&chain(&e)))?;
        }
        Ok(Connector {
            addr: addr.to_string(),
            endpoint,
            token: AttachToken::new(self.token.as_ref()),
        })
    }
}

/// The connections `listener` accepts, with Nagle's algorithm off as on the client
/// side: a small reply (an acknowledgement) leaves at once instead of waiting for
/// the peer's TCP acknowledgement of the previous one.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Binds a role's plain health port, `listen` being the value of config key `key`
/// (`learner.health_listen`, `reward_service.health_listen`); empty binds nothing.
pub async fn bind_health(
    key: &'static str,
    listen: &str,
) -> Result<Option<TcpListener>, TransportError> {
    if listen.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(listen)
        .await
        .map(Some)
        .map_err(|source| TransportError::Bind {
            key,
            addr: listen.to_string(),
            source,
        })
}

/// How a client reaches one server; cheap to clone. Each [`Connector::connect`]
/// resolves the name again, so a restarted peer at a new address is found.
#[derive(Clone)]
pub struct Connector {
    addr: String,
    endpoint: Endpoint,
    token: AttachToken,
}

impl Connector {
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Connects (TCP, TLS, HTTP/2) within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<AuthChannel, TransportError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(InterceptedService::new(channel, self.token.clone())),
            Ok(Err(source)) => Err(TransportError::Connect {
                addr: self.addr.clone(),
                source,
            }),
            Err(_) => Err(TransportError::ConnectTimeout {
                addr: self.addr.clone(),
                after: CONNECT_TIMEOUT,
            }),
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self) -> AuthChannel {
        InterceptedService::new(self.endpoint.connect_lazy(), self.token.clone())
    }

    /// A deadline for every call, for clients that make only unary calls: a
    /// stream would be cut off after it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint = self.endpoint.timeout(timeout);
        self
    }
}

/// Sends `authorization: Bearer <token>` with every call (nothing without a token).
#[derive(Clone)]
pub struct AttachToken {
    header: Option<AsciiMetadataValue>,
}

impl AttachToken {
    fn new(token: Option<&Secret>) -> Self {
        let header = token.and_then(|t| {
            let mut v = AsciiMetadataValue::try_from(format!("Bearer {}", t.expose())).ok()?;
            // Kept out of HPACK tables and printed as "Sensitive".
            v.set_sensitive(true);
            Some(v)
        });
        Self { header }
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, h.clone());
        }
        Ok(request)
    }
}

/// Refuses calls that do not carry the service token. The token is kept only as
/// its SHA-256, and a presented token is hashed and compared in constant time, so
/// neither its bytes nor its length leak through timing.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl RequireToken {
    pub fn new(token: Option<&Secret>) -> Self {
        Self {
            expected: token.map(|t| digest(t.expose())),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("bearer "))
                    .map(|_| &v[7..])
            });
        let valid = presented.is_some_and(|t| bool::from(digest(t).ct_eq(expected)));
        if valid {
            return Ok(request);
        }
        warn!(
            peer = ?request.remote_addr(),
            token_sent = presented.is_some(),
            "refusing a call without a valid service token"
        );
        Err(Status::unauthenticated("missing or invalid service token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut()
                .insert(AUTHORIZATION, v.parse().expect("ascii"));
        }
        r
    }

    #[test]
    fn the_token_is_required_and_compared_exactly() {
        let token = Secret::new("s3cret-Token");
        let mut guard = RequireToken::new(Some(&token));
        assert!(guard.call(with_auth(Some("Bearer s3cret-Token"))).is_ok());
        assert!(guard.call(with_auth(Some("bearer s3cret-Token"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cret-Toke"),
            Some("Bearer s3cret-Token2"),
            Some("Bearer "),
            Some("Basic s3cret-Token"),
            Some("s3cret-Token"),
        ] {
            let err = guard.call(with_auth(bad)).unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{bad:?}");
            assert!(!err.message().contains("s3cret"), "{}", err.message());
        }
        // Without a token everything passes.
        assert!(RequireToken::new(None).call(with_auth(None)).is_ok());
    }

    #[test]
    fn clients_attach_the_token_the_server_wants() {
        let token = Secret::new("abc");
        let mut attach = AttachToken::new(Some(&token));
        let sent = attach.call(Request::new(())).unwrap();
        assert!(RequireToken::new(Some(&token)).call(sent).is_ok());
        let none = AttachToken::new(None).call(Request::new(())).unwrap();
        assert!(none.metadata().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn schemes_follow_the_ca() {
        let plain = Transport::from_config(&TransportConfig::default()).unwrap();
        assert!(plain.client("http://127.0.0.1:1").is_ok());
        let err = plain.client("https://127.0.0.1:1").err().unwrap();
        assert!(err.to_string().contains("transport.tls_ca"), "{err}");
        assert_eq!(plain.url("127.0.0.1:5"), "http://127.0.0.1:5");
    }

    #[test]
    fn unreadable_files_name_their_key() {
        let c = TransportConfig {
            tls_ca: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        let err = Transport::from_config(&c).unwrap_err();
        assert!(err.to_string().contains("transport.tls_ca"), "{err}");
        let c = TransportConfig {
            token: Some(Secret::new("bad\ntoken")),
            ..Default::default()
        };
        let err = Transport::from_config(&c).unwrap_err().to_string();
        assert!(
            err.contains("SPUR_SERVICE_TOKEN") && !err.contains("bad"),
            "{err}"
        );
    }
}
