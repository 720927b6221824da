//! Mutual TLS and the service token between real roles over loopback: strangers are
//! refused (no client certificate, a certificate from another CA, a wrong or missing
//! token), health stays reachable on the plain health port, and a run over mutual
//! TLS with a token learns. Certificates are made here with rcgen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use spur_core::config::{Config, TransportConfig};
use spur_core::secret::Secret;
use spur_core::transport::Transport;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::{LearnerStatus, StatusRequest, SubscribeWeightsRequest};
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner};
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TOKEN: &str = "right-token-5d1e9a";
const WRONG_TOKEN: &str = "wrong-token-77c0b2";

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(p, KeyPair::generate()?)?)
}

/// A certificate for 127.0.0.1 and localhost, good for serving and as a client,
/// signed by `issuer`; written to `<dir>/<name>.pem` and `<name>.key`.
fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    Ok(())
}

/// `ca.pem`, `learner.*` and `actor.*` from one CA; `other-ca.pem` and `stranger.*`
/// from another.
fn pki(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("spur-pki-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ours = ca("spur test ca")?;
    std::fs::write(dir.join("ca.pem"), ours.pem())?;
    leaf(&ours, &dir, "learner")?;
    leaf(&ours, &dir, "actor")?;
    let other = ca("someone else's ca")?;
    std::fs::write(dir.join("other-ca.pem"), other.pem())?;
    leaf(&other, &dir, "stranger")?;
    Ok(dir)
}

/// `[transport]` with `cert` (`<dir>/<cert>.pem` and `.key`, if any), the CA and
/// `token`.
fn transport(dir: &Path, cert: Option<&str>, token: Option<&str>) -> TransportConfig {
    let path = |f: String| dir.join(f).display().to_string();
    TransportConfig {
        tls_cert: cert.map_or(String::new(), |c| path(format!("{c}.pem"))),
        tls_key: cert.map_or(String::new(), |c| path(format!("{c}.key"))),
        tls_ca: path("ca.pem".into()),
        token: token.map(Secret::new),
        ..Default::default()
    }
}

/// A tiny cartpole config whose roles speak mutual TLS with `TOKEN`.
fn mtls_config(dir: &Path, cert: &str, env_steps: u64) -> anyhow::Result<Config> {
    let mut config = tiny_cartpole(env_steps);
    config.transport = transport(dir, Some(cert), Some(TOKEN));
    config.actor.learner_addr = "https://localhost:50051".into();
    config.validate()?;
    Ok(config)
}

/// One status call through `t` to `addr`; a failed connect counts as the call's
/// failure (`Unavailable`), as it would for any client.
async fn status_call(t: &TransportConfig, addr: &str) -> Result<LearnerStatus, Status> {
    let transport = Transport::from_config(t).map_err(|e| Status::internal(e.to_string()))?;
    let client = transport
        .client(&transport.url(addr))
        .map_err(|e| Status::internal(e.to_string()))?;
    let channel = client
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    LearnerClient::new(channel)
        .get_status(StatusRequest {})
        .await
        .map(|r| r.into_inner())
}

/// Refused below gRPC by a caller that sent the right token, so the connection
/// was refused: the connect fails (`Unavailable`) or, when TLS 1.3 let the client
/// finish its handshake first, the first call finds the connection closed; hyper
/// reports that as `Unknown`, `Cancelled` or `Unavailable` depending on timing, or
/// as `Internal` when a TLS alert is read as an HTTP/2 frame.
fn assert_refused_below_grpc(s: &Status) {
    assert!(
        matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ),
        "not a connection-level refusal: {s:?}"
    );
    assert_no_token(s);
}

fn assert_no_token(s: &Status) {
    for secret in [TOKEN, WRONG_TOKEN] {
        assert!(
            !s.message().contains(secret) && !format!("{s:?}").contains(secret),
            "a status carries a token: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_the_token_refuse_strangers() -> anyhow::Result<()> {
    let dir = pki("refuse")?;
    let mut config = mtls_config(&dir, "learner", 0)?;
    config.learner.health_listen = "127.0.0.1:0".into();
    let learner = TestLearner::start(config.clone(), "mtls-refuse").await?;
    assert!(learner.addr.starts_with("https://"), "{}", learner.addr);
    let addr = learner.addr.clone();

    // The right certificate and token: served.
    let ok = status_call(&transport(&dir, Some("actor"), Some(TOKEN)), &addr).await?;
    assert!(ok.policy_version >= 1);

    // The next three callers send the right token: only TLS can refuse them.
    // No client certificate. Under TLS 1.3 the client may finish its handshake
    // before the server rejects it, so the refusal can come with the first call.
    let err = status_call(&transport(&dir, None, Some(TOKEN)), &addr)
        .await
        .expect_err("a client without a certificate was served");
    eprintln!("no certificate: {err:?}");
    assert_refused_below_grpc(&err);

    // A certificate from another CA (trusting our CA for the server's side).
    let err = status_call(&transport(&dir, Some("stranger"), Some(TOKEN)), &addr)
        .await
        .expect_err("a client with another CA's certificate was served");
    eprintln!("another CA's certificate: {err:?}");
    assert_refused_below_grpc(&err);

    // Plain HTTP/2 to the TLS port.
    let plain = TransportConfig {
        token: Some(Secret::new(TOKEN)),
        ..Default::default()
    };
    let err = status_call(&plain, &addr.replace("https://", "http://"))
        .await
        .expect_err("a plain-text client was served");
    eprintln!("plain text: {err:?}");
    assert_refused_below_grpc(&err);

    // The right certificate with a wrong token, or none: Unauthenticated, saying
    // nothing about the token.
    for token in [Some(WRONG_TOKEN), None] {
        let err = status_call(&transport(&dir, Some("actor"), token), &addr)
            .await
            .expect_err("a call without the right token was served");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_no_token(&err);
    }
    // Streams are guarded too.
    let t = Transport::from_config(&transport(&dir, Some("actor"), Some(WRONG_TOKEN)))?;
    let mut client = LearnerClient::new(t.client(&addr)?.connect().await?);
    let err = match client
        .subscribe_weights(SubscribeWeightsRequest::default())
        .await
    {
        Err(status) => status,
        Ok(r) => r
            .into_inner()
            .message()
            .await
            .expect_err("weights went to a client with a wrong token"),
    };
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Health: on the plain port with neither certificate nor token (Kubernetes'
    // probes), and on the main port with a certificate but no token.
    let health_addr =
        std::fs::read_to_string(learner.run_dir.join(spur_learner::HEALTH_ADDR_FILE))?;
    let plain = Transport::from_config(&TransportConfig::default())?;
    let probe = HealthCheckRequest {
        service: "spur.v1.Learner".into(),
    };
    for (t, addr) in [
        (plain, format!("http://{}", health_addr.trim())),
        (
            Transport::from_config(&transport(&dir, Some("actor"), None))?,
            addr.clone(),
        ),
    ] {
        let channel = t.client(&addr)?.connect().await?;
        let serving = HealthClient::new(channel).check(probe.clone()).await?;
        assert_eq!(serving.into_inner().status, 1, "health at {addr}");
    }
    // The plain health port serves nothing else.
    let err = status_call(
        &TransportConfig::default(),
        &format!("http://{}", health_addr.trim()),
    )
    .await
    .expect_err("the plain health port served a spur call");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    let run_dir = learner.run_dir.clone();
    learner.stop().await?;
    // The run directory's config copy names the files but holds no token.
    let copy = std::fs::read_to_string(run_dir.join("config.toml"))?;
    assert!(!copy.contains(TOKEN) && copy.contains("tls_ca"), "{copy}");
    Ok(())
}

/// A learner and two actors over mutual TLS with a token learn cartpole: versions
/// advance and the mean return climbs well above a random policy's (about 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_mutual_tls_with_a_token_learns() -> anyhow::Result<()> {
    let dir = pki("learns")?;
    let config = mtls_config(&dir, "learner", 0)?;
    let learner = TestLearner::start(config.clone(), "mtls-learns").await?;
    let actor_config = mtls_config(&dir, "actor", 0)?;
    let actors: Vec<_> = (0..2)
        .map(|i| spawn_actor(&actor_config, &learner.addr, i))
        .collect();
    let first = learner
        .wait_for(Duration::from_secs(60), "the first episodes", |s| {
            s.episodes >= 50
        })
        .await?;
    let learned = learner
        .wait_for(Duration::from_secs(60), "the return to rise", |s| {
            s.episode_return_mean > 60.0 && s.policy_version >= first.policy_version + 5
        })
        .await?;
    eprintln!(
        "return {:.1} -> {:.1}, version {} -> {}, {} env steps",
        first.episode_return_mean,
        learned.episode_return_mean,
        first.policy_version,
        learned.policy_version,
        learned.env_steps
    );
    assert_eq!(learned.connected_actors, 2);
    for (stop, a) in actors {
        let _ = stop.send(());
        assert!(a.await??.push.acked_chunks > 0);
    }
    learner.stop().await?;
    Ok(())
}
