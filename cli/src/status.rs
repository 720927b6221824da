//! `spur status TARGET`: a live summary of a running learner (and its reward service)
//! over gRPC. TARGET is a learner address or a run directory, whose `learner.addr`
//! and `reward_service.addr` files say where the roles listen.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use spur_core::transport::{AuthChannel, Transport};
use spur_core::Config;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus, RewardStatusRequest, StatusRequest};

#[derive(Args)]
pub struct StatusArgs {
    /// Learner address (host:port or http(s)://host:port) or a run directory.
    target: String,
    /// Reward service address (default: the run directory's, if any).
    #[arg(long)]
    reward: Option<String>,
    /// Refresh every 2 s until interrupted.
    #[arg(long)]
    watch: bool,
    /// Config whose `[transport]` section says how to reach the roles (TLS files,
    /// the token's variable); default: the run directory's `config.toml`, else the
    /// built-in defaults. `SPUR_*` variables apply on top.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// How to reach a cluster's roles: the `[transport]` section of `config`, else of
/// the run directory `dir`'s `config.toml`, else the defaults; with `SPUR_*`
/// variables applied and the token taken from the environment.
pub fn transport(config: Option<&Path>, dir: Option<&Path>) -> anyhow::Result<Transport> {
    let in_dir = dir.map(|d| d.join("config.toml")).filter(|p| p.is_file());
    let path = config.map(Path::to_path_buf).or(in_dir);
    let config = Config::load(path.as_deref(), std::env::vars(), &[])?;
    Ok(Transport::from_config(&config.transport)?)
}

/// Where the learner and the reward service listen, from an address or a run dir.
fn resolve(args: &StatusArgs, transport: &Transport) -> anyhow::Result<(String, Option<String>)> {
    let dir = Path::new(&args.target);
    let reward = args.reward.as_deref().map(|a| transport.url(a));
    if !dir.is_dir() {
        return Ok((transport.url(&args.target), reward));
    }
    let Some(learner) = addr_in(dir, spur_learner::ADDR_FILE) else {
        bail!(
            "{} has no {}: is a learner running there?",
            dir.display(),
            spur_learner::ADDR_FILE
        );
    };
    let reward = reward.or_else(|| addr_in(dir, spur_reward_service::ADDR_FILE));
    Ok((transport.url(&learner), reward.map(|a| transport.url(&a))))
}

/// The address (`host:port`) a role wrote to `file` in run directory `dir`.
pub fn addr_in(dir: &Path, file: &str) -> Option<String> {
    let addr = std::fs::read_to_string(dir.join(file)).ok()?;
    Some(addr.trim().to_string())
}

/// A channel to `addr` (`host:port` or a URL) with short timeouts: a status call
/// should answer quickly.
pub async fn connect_with(transport: &Transport, addr: &str) -> anyhow::Result<AuthChannel> {
    let client = transport
        .client(&transport.url(addr))?
        .request_timeout(Duration::from_secs(3));
    Ok(client.connect().await?)
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let dir = Path::new(&args.target);
    let transport = transport(args.config.as_deref(), dir.is_dir().then_some(dir))
        .context("cannot set up the transport (config key `transport`)")?;
    let (learner_addr, reward_addr) = resolve(&args, &transport)?;
    let learner = connect_with(&transport, &learner_addr)
        .await
        .with_context(|| format!("cannot reach the learner at {learner_addr}"))?;
    let mut learner = LearnerClient::new(learner);
    let mut reward = match &reward_addr {
        Some(addr) => match connect_with(&transport, addr).await {
            Ok(ch) => Some(RewardServiceClient::new(ch)),
            Err(e) => {
                eprintln!("(reward service at {addr} unreachable: {e:#})");
                None
            }
        },
        None => None,
    };
    loop {
        let l = learner
            .get_status(StatusRequest {})
            .await
            .with_context(|| format!("the learner at {learner_addr} did not answer"))?
            .into_inner();
        let r = match reward.as_mut() {
            Some(c) => c
                .get_status(RewardStatusRequest {})
                .await
                .ok()
                .map(|s| s.into_inner()),
            None => None,
        };
        print!("{}", summary(&learner_addr, &l, r.as_ref()));
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => println!(),
            _ = crate::shutdown::signal() => return Ok(()),
        }
    }
}

/// The human-readable summary.
pub fn summary(addr: &str, l: &LearnerStatus, r: Option<&RewardServiceStatus>) -> String {
    let mut s = String::new();
    let budget = if l.env_steps_budget > 0 {
        format!(
            " of {} ({:.0}%)",
            l.env_steps_budget,
            100.0 * l.env_steps as f64 / l.env_steps_budget as f64
        )
    } else {
        String::new()
    };
    let _ = writeln!(s, "learner {addr}");
    let _ = writeln!(
        s,
        "  env steps    {}{budget}, {:.0} steps/s{}",
        l.env_steps,
        l.steps_per_sec,
        if l.training_finished {
            " (finished)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "  received     {} env steps; dropped {} stale, {} from a previous learner \
         incarnation ({} chunks), {} malformed ({} chunks)",
        l.env_steps_received,
        l.dropped_steps_stale,
        l.dropped_steps_incarnation,
        l.dropped_incarnation_chunks,
        l.dropped_steps_malformed,
        l.dropped_malformed_chunks
    );
    let _ = writeln!(
        s,
        "  episodes     {}: mean return {:.2}, length {:.1}, success {:.0}% (last 100)",
        l.episodes,
        l.episode_return_mean,
        l.episode_len_mean,
        l.success_rate * 100.0
    );
    let _ = writeln!(
        s,
        "  policy       version {}, {} updates, queue {}/{}, {} stale chunks dropped, \
         incarnation {}",
        l.policy_version,
        l.updates,
        l.queue_depth,
        l.queue_capacity,
        l.dropped_stale_chunks,
        l.learner_incarnation
    );
    let _ = writeln!(s, "  actors       {} connected", l.connected_actors);
    for a in &l.actors {
        let _ = writeln!(
            s,
            "    {:<12} {} chunks, {} env steps, policy v{}..v{}",
            a.actor_id, a.chunks, a.env_steps, a.first_policy_version, a.last_policy_version
        );
    }
    if l.reward_model_version > 0 {
        let _ = writeln!(
            s,
            "  intrinsic    reward model v{} ({} texts, loss {:.3}), mean {:.4} per step",
            l.reward_model_version, l.reward_labels, l.reward_model_loss, l.intrinsic_reward_mean
        );
    }
    if let Some(r) = r {
        let _ = writeln!(
            s,
            "reward service ({}, prompt {})",
            r.judge, r.prompt_version
        );
        let _ = writeln!(
            s,
            "  texts        {} seen, {} unique, {} store hits, {} labelled ({} helpful), {} ranked pairs",
            r.texts_seen, r.unique_texts, r.store_hits, r.labels, r.positive_labels, r.ranked_pairs
        );
        let _ = writeln!(
            s,
            "  judge        {} calls, {} failed, {} unparseable, latency p50 {:.0} ms p99 {:.0} ms, {:.2} calls per text",
            r.llm_calls,
            r.llm_failures,
            r.unparseable_answers,
            r.llm_latency_p50_ms,
            r.llm_latency_p99_ms,
            r.calls_per_labelled_text
        );
        let _ = writeln!(
            s,
            "  queue        backlog {}, {} shed; {} model v{}, loss {:.3}",
            r.backlog, r.shed_texts, r.model_kind, r.model_version, r.model_loss
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_from_the_run_directory() {
        let dir = std::env::temp_dir().join(format!("spur-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = |target: &str| StatusArgs {
            target: target.into(),
            reward: None,
            watch: false,
            config: None,
        };
        let plain = Transport::from_config(&Default::default()).unwrap();
        let resolve = |a: &StatusArgs| resolve(a, &plain);
        let d = dir.display().to_string();
        assert!(resolve(&args(&d)).is_err(), "no learner.addr yet");
        std::fs::write(dir.join(spur_learner::ADDR_FILE), "127.0.0.1:5000\n").unwrap();
        std::fs::write(dir.join(spur_reward_service::ADDR_FILE), "127.0.0.1:5001").unwrap();
        assert_eq!(
            resolve(&args(&d)).unwrap(),
            (
                "http://127.0.0.1:5000".to_string(),
                Some("http://127.0.0.1:5001".to_string())
            )
        );
        assert_eq!(
            resolve(&args("127.0.0.1:7")).unwrap(),
            ("http://127.0.0.1:7".to_string(), None)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn summary_names_the_numbers() {
        let l = LearnerStatus {
            env_steps: 500,
            env_steps_received: 640,
            dropped_steps_incarnation: 128,
            env_steps_budget: 1000,
            success_rate: 0.25,
            reward_model_version: 3,
            ..Default::default()
        };
        let r = RewardServiceStatus {
            llm_calls: 7,
            model_kind: "ranking".into(),
            ..Default::default()
        };
        let s = summary("http://x", &l, Some(&r));
        assert!(s.contains("500 of 1000 (50%)"), "{s}");
        assert!(s.contains("received     640 env steps"), "{s}");
        assert!(s.contains("128 from a previous learner incarnation"), "{s}");
        assert!(s.contains("success 25%"), "{s}");
        assert!(s.contains("7 calls"), "{s}");
        assert!(s.contains("ranking model v0"), "{s}");
    }
}
