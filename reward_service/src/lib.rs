//! spur-reward-service: labels the event texts of trajectories with a judge (an
//! OpenAI-compatible LLM server, or the built-in rule judge offline), keeps every
//! label in an embedded transactional store, and publishes the labels as versions of
//! an intrinsic reward model for the learner (the ONI recipe).
//!
//! - `service.rs`: the `spur.v1.RewardService` gRPC service
//! - `labeler.rs`: dedup, queueing, batched concurrent judge calls, commit, publish
//! - `backlog.rs`: the bounded newest-first queue of unlabelled texts
//! - `judge/`: the rule judge and the OpenAI-compatible client
//! - `prompt.rs`, `parse.rs`: prompt templates with versions; the strict answer parser
//! - `store.rs`: the redb label store
//! - `model.rs`: the label table and the reward-model versions subscribers receive
//! - `distill.rs`: training the `classification` network on the labels
//! - `stats.rs`: counters and judge latency percentiles

mod backlog;
mod distill;
pub mod error;
pub mod judge;
mod labeler;
mod model;
pub mod parse;
pub mod prompt;
mod service;
mod stats;
pub mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spur_core::config::{Config, JudgeKind, RewardModelKind};
use spur_proto::v1::reward_service_server::RewardServiceServer;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use error::ServiceError;

use judge::{Judge, OpenAiJudge, OpenAiSettings, RulesJudge};
use labeler::Labeler;
use model::RetrievalModel;
use service::RewardGrpc;

/// Name of the file in the run directory that holds the bound address.
pub const ADDR_FILE: &str = "reward_service.addr";

/// ONI's repeat decay: the n-th occurrence of a text in an episode earns n^(-beta).
pub fn repeat_decay(count: u32, beta: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    (count as f64).powf(-beta)
}

/// Builds the judge, its prompt and the key its labels are stored under.
fn build_judge(
    config: &Config,
    root: &Path,
) -> Result<(Judge, prompt::Prompt, String), ServiceError> {
    let r = &config.reward_service;
    let template = if config.intrinsic.model == RewardModelKind::Ranking {
        &r.rank_prompt
    } else {
        &r.prompt
    };
    let prompt = prompt::Prompt::load(&root.join(template), &root.join(&r.goal))?;
    match r.judge {
        JudgeKind::Rules => {
            // The rule judge ignores the prompt's words, but not what it asks for.
            let rules = RulesJudge::load(&root.join(&r.rules))?;
            let asks = if config.intrinsic.model == RewardModelKind::Ranking {
                "rules-rank"
            } else {
                "rules"
            };
            let version = format!("{asks}-{}", prompt::version_of(&[&rules.source]));
            Ok((Judge::Rules(rules), prompt, version))
        }
        JudgeKind::Openai => {
            let api_key = std::env::var(&r.api_key_env).ok().filter(|k| !k.is_empty());
            let settings = OpenAiSettings {
                base_url: r.openai_base_url.clone(),
                model: r.openai_model.clone(),
                api_key,
                timeout: Duration::from_millis(r.timeout_ms),
                retries: r.retries,
                max_tokens: r.max_tokens,
                breaker_failures: r.breaker_failures,
                breaker_cooldown: Duration::from_millis(r.breaker_cooldown_ms),
            };
            let judge =
                OpenAiJudge::new(settings).map_err(|e| ServiceError::Judge(e.to_string()))?;
            let version = prompt.version.clone();
            Ok((Judge::OpenAi(judge), prompt, version))
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Where prompt, goal, rules and store paths are resolved from.
    pub root: PathBuf,
    /// Run directory to write the bound address into (local mode), if any.
    pub run_dir: Option<PathBuf>,
}

/// Binds `reward_service.listen` and serves until `shutdown`.
pub async fn run(
    config: Config,
    opts: ServiceOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let addr = config.reward_service.listen.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServiceError::Bind { addr, source })?;
    serve(config, opts, listener, shutdown).await
}

/// Serves on a bound listener until `shutdown`.
pub async fn serve(
    config: Config,
    opts: ServiceOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let r = &config.reward_service;
    let (judge, prompt, prompt_version) = build_judge(&config, &opts.root)?;
    let store = Arc::new(store::LabelStore::open(&opts.root.join(&r.store))?);
    let kind = config.intrinsic.model;
    let network = match kind {
        RewardModelKind::Retrieval => None,
        RewardModelKind::Classification => Some(model::KIND_CLASSIFICATION),
        RewardModelKind::Ranking => Some(model::KIND_RANKING),
    };
    // What earlier runs with this judge and prompt left: labels, or ranked pairs.
    let (known, initial) = if kind == RewardModelKind::Ranking {
        let pairs = store.all_pairs(&prompt_version)?;
        let known: Vec<(String, f32)> = labeler::pair_values(&pairs).into_iter().collect();
        let prefs = pairs
            .into_iter()
            .filter_map(|(pair, rec)| rec.verdict.map(|p| (pair, p)))
            .collect();
        (known, distill::Verdicts::Pairs(prefs))
    } else {
        let labels = store.all(&prompt_version)?;
        let parsed = labels
            .iter()
            .filter_map(|(t, rec)| rec.verdict.map(|h| (t.clone(), h)))
            .collect();
        let known = labels
            .into_iter()
            .map(|(t, rec)| (t, rec.value()))
            .collect();
        (known, distill::Verdicts::Labels(parsed))
    };
    info!(
        texts = known.len(),
        prompt_version,
        judge = judge.id(),
        model = ?kind,
        "label store open"
    );
    let judged: Vec<String> = known.iter().map(|(t, _)| t.clone()).collect();
    let model = Arc::new(RetrievalModel::new(prompt_version.clone(), network, known));
    let distill_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (distill, distill_thread) = match network {
        Some(kind) => {
            let (tx, handle) = distill::spawn(
                kind,
                initial,
                r.distill_steps,
                r.distill_lr,
                model.clone(),
                distill_stop.clone(),
            )?;
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };
    let pairs_per_text = (kind == RewardModelKind::Ranking).then_some(r.pairs_per_text as usize);
    let labeler = Arc::new(Labeler::new(
        prompt,
        prompt_version,
        judge,
        store,
        model,
        distill,
        pairs_per_text,
        judged,
        r.backlog as usize,
        r.batch_size as usize,
        r.max_concurrent as usize,
        r.unparseable_budget,
    ));
    let workers = tokio::spawn(labeler.clone().run());
    // Prometheus gauges, refreshed every second (no-ops without an exporter).
    let weak = Arc::downgrade(&labeler);
    let gauges = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(l) = weak.upgrade() else { return };
            service::publish_gauges(&service::status(&l));
        }
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RewardServiceServer<RewardGrpc>>()
        .await;
    let addr = listener.local_addr()?;
    if let Some(dir) = &opts.run_dir {
        std::fs::create_dir_all(dir)?;
        spur_core::checkpoint::write_atomic(&dir.join(ADDR_FILE), addr.to_string().as_bytes())?;
    }
    info!(%addr, "reward service listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(
            RewardServiceServer::new(RewardGrpc {
                labeler: labeler.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(stop_rx.clone()));
    // Reward-model subscriptions never end by themselves: give streams a moment to
    // drain after the signal, then close regardless.
    let result = tokio::select! {
        r = server => r,
        _ = async {
            stopped(stop_rx).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    workers.abort();
    let _ = workers.await;
    gauges.abort();
    let _ = gauges.await;
    // Wait for in-flight judge requests to let go of the store before returning, so
    // a new service can open it at once.
    for _ in 0..500 {
        if Arc::strong_count(&labeler) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(labeler);
    if let Some(handle) = distill_thread {
        // Ends after its current training step.
        distill_stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    result?;
    info!("reward service stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_fade_quickly() {
        assert_eq!(repeat_decay(1, 3.0), 1.0);
        assert!((repeat_decay(2, 3.0) - 0.125).abs() < 1e-12);
        assert_eq!(repeat_decay(0, 3.0), 0.0);
    }
}
