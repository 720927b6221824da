//! The env server's wire: connections over gRPC or the unix wire
//! ([`EnvClient`]), the server's spec checked and converted, observations decoded,
//! and which failures mean the server is gone.

use std::sync::Arc;
use std::time::Duration;

use spur_core::config::EnvConfig;
use spur_core::env::{EnvSpec, ObsField};
use spur_core::tensor::Element;
use spur_core::EnvError;
use spur_proto::v1::env_service_client::EnvServiceClient;
use spur_proto::v1::{
    EnvSpecReply, EnvSpecRequest, RenderReply, RenderRequest, ResetReply, ResetRequest, StepReply,
    StepRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::unix::{Method, UnixLink};

/// Largest message an env server may send (thousands of NetHack observations).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long one reset or step call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to an env server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn endpoint(addr: &str) -> Result<Endpoint, EnvError> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url)
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true)
        })
        .map_err(|e| EnvError::Config(format!("env.remote `{addr}`: {e}")))
}

pub(crate) fn server_error(addr: &str, status: tonic::Status) -> EnvError {
    EnvError::Server {
        addr: addr.to_string(),
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

pub(crate) fn protocol(addr: &str, message: String) -> EnvError {
    EnvError::Protocol {
        addr: addr.to_string(),
        message,
    }
}

/// Converts an env server's spec.
pub(crate) fn to_spec(addr: &str, r: &EnvSpecReply) -> Result<EnvSpec, EnvError> {
    let fields: Vec<ObsField> = r
        .fields
        .iter()
        .map(|f| ObsField {
            name: f.name.clone(),
            shape: f.shape.iter().map(|&d| d as usize).collect(),
        })
        .collect();
    let obs_dim: usize = fields.iter().map(ObsField::size).sum();
    if obs_dim == 0 || r.num_actions == 0 {
        return Err(protocol(
            addr,
            format!(
                "an empty spec ({obs_dim} observation floats, {} actions)",
                r.num_actions
            ),
        ));
    }
    Ok(EnvSpec {
        obs_dim,
        num_actions: r.num_actions as usize,
        has_text: r.has_text,
        max_episode_steps: r.max_episode_steps,
        fields,
    })
}

/// Little-endian f32s of `bytes` into `out`, which must match in length.
pub(crate) fn decode_f32(addr: &str, bytes: &[u8], out: &mut [f32]) -> Result<(), EnvError> {
    if bytes.len() != out.len() * 4 {
        return Err(protocol(
            addr,
            format!(
                "{} observation bytes, expected {} ({} floats)",
                bytes.len(),
                out.len() * 4,
                out.len()
            ),
        ));
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::read_le(b);
    }
    Ok(())
}

/// Whether a failed call means the server is gone (or its envs are in an unknown
/// state), so that restarting it is the way on; other codes are answers to a bad
/// request and stay errors.
pub(crate) fn server_is_gone(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Aborted
            | Code::DataLoss
    )
}

/// Checks that a server answering `reply` serves `config`'s env; returns its spec.
pub(crate) fn check_server(
    config: &EnvConfig,
    addr: &str,
    reply: &EnvSpecReply,
) -> Result<EnvSpec, EnvError> {
    if reply.env_id != config.gym_id {
        return Err(protocol(
            addr,
            format!(
                "serves {}, not env.gym_id = {}",
                reply.env_id, config.gym_id
            ),
        ));
    }
    to_spec(addr, reply)
}

/// A one-thread runtime for a batch's calls, which its user's thread drives.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, EnvError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EnvError::Config(format!("cannot start a runtime for env calls: {e}")))
}

/// A connection to one env server: gRPC for a `host:port` address, the unix wire
/// for `unix:PATH`. Cheap to clone (clones share the connection); failures are
/// statuses either way, so callers judge them alike.
#[derive(Clone)]
pub struct EnvClient(Wire);

#[derive(Clone)]
enum Wire {
    Grpc(EnvServiceClient<Channel>),
    Unix(Arc<UnixLink>),
}

impl EnvClient {
    /// Connects to the env server at `addr`.
    pub async fn connect(addr: &str) -> Result<Self, EnvError> {
        let cannot = |e: &dyn std::fmt::Display| EnvError::Server {
            addr: addr.to_string(),
            message: format!("cannot connect: {e}"),
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            let link = UnixLink::connect(path.into(), CONNECT_TIMEOUT)
                .await
                .map_err(|e| cannot(&e))?;
            return Ok(Self(Wire::Unix(Arc::new(link))));
        }
        let channel = endpoint(addr)?.connect().await.map_err(|e| cannot(&e))?;
        Ok(Self(Wire::Grpc(
            EnvServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )))
    }

    /// The server's env: id, env count, observation fields, actions.
    pub async fn spec(&mut self) -> Result<EnvSpecReply, Status> {
        match &mut self.0 {
            Wire::Grpc(c) => c
                .spec(EnvSpecRequest {})
                .await
                .map(tonic::Response::into_inner),
            Wire::Unix(l) => l.call(Method::Spec, &EnvSpecRequest {}, CALL_TIMEOUT).await,
        }
    }

    /// Resets the envs `request` names with its seeds; their first observations.
    pub async fn reset(&mut self, request: ResetRequest) -> Result<ResetReply, Status> {
        match &mut self.0 {
            Wire::Grpc(c) => c.reset(request).await.map(tonic::Response::into_inner),
            Wire::Unix(l) => l.call(Method::Reset, &request, CALL_TIMEOUT).await,
        }
    }

    /// Steps every env of the server with one action each.
    pub async fn step(&mut self, request: StepRequest) -> Result<StepReply, Status> {
        match &mut self.0 {
            Wire::Grpc(c) => c.step(request).await.map(tonic::Response::into_inner),
            Wire::Unix(l) => l.call(Method::Step, &request, CALL_TIMEOUT).await,
        }
    }

    /// A text picture of one env.
    pub async fn render(&mut self, request: RenderRequest) -> Result<RenderReply, Status> {
        match &mut self.0 {
            Wire::Grpc(c) => c.render(request).await.map(tonic::Response::into_inner),
            Wire::Unix(l) => l.call(Method::Render, &request, CALL_TIMEOUT).await,
        }
    }
}

/// Connects to the env server at `addr` and asks for its spec.
pub(crate) async fn connect(addr: &str) -> Result<(EnvClient, EnvSpecReply), EnvError> {
    let mut client = EnvClient::connect(addr).await?;
    let spec = client.spec().await.map_err(|s| server_error(addr, s))?;
    Ok((client, spec))
}

#[cfg(test)]
mod tests {
    use spur_proto::v1::ObservationField;

    use super::*;

    fn reply(env_id: &str, shape: Vec<u32>, num_actions: u32) -> EnvSpecReply {
        EnvSpecReply {
            env_id: env_id.into(),
            num_actions,
            fields: vec![ObservationField {
                name: "glyphs".into(),
                shape,
            }],
            ..Default::default()
        }
    }

    fn gym(id: &str) -> EnvConfig {
        EnvConfig {
            gym_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_server_of_the_configured_env_gives_its_spec() {
        let spec = check_server(&gym("A-v0"), "a:1", &reply("A-v0", vec![3, 4], 5)).unwrap();
        assert_eq!((spec.obs_dim, spec.num_actions), (12, 5));
        assert_eq!(spec.field("glyphs").map(|(at, _)| at), Some(0));
    }

    #[test]
    fn a_server_of_another_env_is_refused_by_name() {
        let err = check_server(&gym("A-v0"), "a:1", &reply("B-v0", vec![3], 5)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EnvError::Protocol { .. }), "{msg}");
        assert!(msg.contains("B-v0") && msg.contains("env.gym_id"), "{msg}");
    }

    #[test]
    fn an_empty_spec_is_a_protocol_error() {
        for (shape, actions) in [(vec![0], 5), (vec![3], 0)] {
            let err = to_spec("a:1", &reply("A-v0", shape, actions)).unwrap_err();
            assert!(err.to_string().contains("empty spec"), "{err}");
        }
    }

    #[test]
    fn observations_decode_only_at_the_expected_length() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut out = [0.0f32; 2];
        decode_f32("a:1", &bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        let mut short = [0.0f32; 3];
        let err = decode_f32("a:1", &bytes, &mut short).unwrap_err();
        assert!(
            err.to_string().contains("8 observation bytes, expected 12"),
            "{err}"
        );
    }

    #[test]
    fn transport_failures_mean_the_server_is_gone_and_refusals_do_not() {
        assert!(server_is_gone(&tonic::Status::unavailable("x")));
        assert!(server_is_gone(&tonic::Status::deadline_exceeded("x")));
        assert!(!server_is_gone(&tonic::Status::invalid_argument("x")));
        assert!(!server_is_gone(&tonic::Status::failed_precondition("x")));
    }
}
