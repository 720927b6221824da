//! spur-reward-service: labels the event texts of trajectories with a judge (an
//! OpenAI-compatible LLM server, or the built-in rule judge offline), keeps every
//! label in an embedded transactional store, and publishes the labels as versions of
//! an intrinsic reward model for the learner (the ONI recipe).
//!
//! - `service.rs`: the `spur.v1.RewardService` gRPC service
//! - `labeler.rs`: dedup, queueing, batched concurrent judge calls, commit, publish
//! - `backlog.rs`: the bounded newest-first queue of unlabelled texts
//! - `retry.rs`: texts with unparseable answers, waiting for a later round
//! - `tasks.rs`: every spawned task, joined by name under the drain deadline
//! - `judge/`: the rule judge and the OpenAI-compatible client
//! - `prompt.rs`, `parse.rs`: prompt templates with versions; the strict answer parser
//! - `store.rs`: the redb label store
//! - `writer.rs`: group commit of the labels of concurrent judge answers
//! - `model.rs`: the label table and the reward-model versions subscribers receive
//! - `distill.rs`: training the `classification` or `ranking` network on the verdicts
//! - `stats.rs`: counters and judge latency percentiles
//! - `error.rs`: the service's typed errors

mod backlog;
mod distill;
pub mod error;
pub mod judge;
mod labeler;
mod model;
pub mod parse;
pub mod prompt;
mod retry;
mod service;
mod stats;
pub mod store;
mod tasks;
mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spur_core::config::{Config, JudgeKind, RewardModelKind};
use spur_core::secret::Secret;
use spur_core::transport::{bind_health, incoming, Transport};
use spur_proto::v1::reward_service_server::RewardServiceServer;
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use error::ServiceError;

use judge::{Judge, OpenAiJudge, OpenAiSettings, RulesJudge};
use labeler::Labeler;
use model::RewardModel;
use retry::RetryWait;
use service::RewardGrpc;
use tasks::Tasks;

/// Name of the file in the run directory that holds the bound address.
pub const ADDR_FILE: &str = "reward_service.addr";

/// Name of the file in the run directory that holds the plain health port's address
/// (with `reward_service.health_listen` set).
pub const HEALTH_ADDR_FILE: &str = "reward_service.health.addr";

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
            let api_key = Secret::from_env(&r.api_key_env);
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
            let judge = OpenAiJudge::new(settings).map_err(ServiceError::JudgeClient)?;
            // Another model gives other answers: its labels are its own.
            let version = format!(
                "{}-{}",
                prompt.version,
                prompt::version_of(&[&r.openai_model])
            );
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

/// A reward service running in this process on a free loopback port, for
/// benchmarks and tests; [`InProcess::stop`] shuts it down as SIGTERM would.
pub struct InProcess {
    /// `http://127.0.0.1:<port>`.
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), ServiceError>>,
}

impl InProcess {
    /// Binds `127.0.0.1:0` and starts serving `config` (paths resolved from `root`).
    /// It is ready once its health service reports SERVING.
    pub async fn start(config: Config, root: PathBuf) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let opts = ServiceOptions {
            root,
            run_dir: None,
        };
        let handle = tokio::spawn(serve(config, opts, listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            stop: Some(stop),
            handle,
        })
    }

    /// Asks the service to stop and waits until it has (labels in flight committed).
    pub async fn stop(mut self) -> Result<(), ServiceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.handle).await?
    }
}

/// Serves on a bound listener until `shutdown`.
///
/// Health says NOT_SERVING while the label store loads (off the async threads) and
/// SERVING once it is loaded. On `shutdown` health goes NOT_SERVING first; then the
/// service stops accepting texts, ends its streams and stops taking batches, lets
/// judge requests in flight commit their labels, and joins every task it spawned
/// within `run.drain_timeout_ms`, naming (and abandoning) whatever did not finish.
pub async fn serve(
    config: Config,
    opts: ServiceOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let drain = Duration::from_millis(config.run.drain_timeout_ms);
    let (judge, prompt, prompt_version) = build_judge(&config, &opts.root)?;
    let mut running = Running::start(&config, &opts, listener).await?;
    tokio::pin!(shutdown);
    let started = running
        .label(&config, &opts, judge, prompt, prompt_version, &mut shutdown)
        .await;
    let served = running.stop(drain).await;
    started?;
    served
}

type ServerResult = Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>;

/// The serving service between its steps: started, labelling, stopped.
struct Running {
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
    tasks: Tasks,
    reporter: HealthReporter,
    /// The labeler the gRPC service hands calls to, once the store is loaded.
    ready: watch::Sender<Option<Arc<Labeler>>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The server's result, when it ended before shutdown.
    server_ended: Option<ServerResult>,
    distiller: Option<distill::Distiller>,
}

impl Running {
    /// Starts the gRPC server (health NOT_SERVING) and the plain health port, and
    /// writes their addresses into the run directory.
    async fn start(
        config: &Config,
        opts: &ServiceOptions,
        listener: TcpListener,
    ) -> Result<Self, ServiceError> {
        let transport = Transport::from_config(&config.transport)?;
        let mut main_server = transport.server()?;
        let health_listener = bind_health(
            "reward_service.health_listen",
            &config.reward_service.health_listen,
        )
        .await?;
        let cancel = CancellationToken::new();
        let tasks = Tasks::default();
        let (ready, labeler_rx) = watch::channel(None);
        let (reporter, health) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        let addr = listener.local_addr()?;
        // The listeners are bound, so callers that read these files early wait in
        // the accept queue.
        if let Some(dir) = &opts.run_dir {
            write_addr(dir.clone(), ADDR_FILE, addr.to_string()).await?;
            if let Some(listener) = &health_listener {
                let health_addr = listener.local_addr()?.to_string();
                write_addr(dir.clone(), HEALTH_ADDR_FILE, health_addr).await?;
            }
        }
        if let Some(listener) = health_listener {
            tasks.spawn(
                "plain health server",
                transport.serve_health(listener, health.clone(), cancel.clone().cancelled_owned()),
            );
        }
        let grpc = RewardGrpc {
            labeler: labeler_rx,
            cancel: cancel.clone(),
            tasks: tasks.clone(),
        };
        let server = tokio::spawn(
            main_server
                .add_service(health)
                .add_service(
                    transport.guard(
                        RewardServiceServer::new(grpc)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    ),
                )
                .serve_with_incoming_shutdown(incoming(listener), cancel.clone().cancelled_owned()),
        );
        Ok(Self {
            addr,
            cancel,
            tasks,
            reporter,
            ready,
            server,
            server_ended: None,
            distiller: None,
        })
    }

    /// Loads the label store, starts the labeler and its tasks, reports SERVING, and
    /// serves until `shutdown` (or until the server ends by itself).
    async fn label(
        &mut self,
        config: &Config,
        opts: &ServiceOptions,
        judge: Judge,
        prompt: prompt::Prompt,
        prompt_version: String,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), ServiceError> {
        let addr = self.addr;
        info!(%addr, "reward service listening, loading the label store");
        let store = opts.root.join(&config.reward_service.store);
        let load = tokio::task::spawn_blocking({
            let pv = prompt_version.clone();
            let kind = config.intrinsic.model;
            move || load_store(&store, &pv, kind)
        });
        let loaded = tokio::select! {
            l = load => l??,
            _ = &mut *shutdown => return Ok(()),
            r = &mut self.server => {
                self.server_ended = Some(r);
                return Ok(());
            }
        };
        let cancel = &self.cancel;
        let (labeler, distiller) =
            start_labeler(config, judge, prompt, prompt_version, loaded, cancel)?;
        self.distiller = distiller;
        let tasks = &self.tasks;
        tasks.spawn(
            "labeler",
            labeler.clone().run(tasks.clone(), cancel.clone()),
        );
        tasks.spawn(
            "unparseable retries",
            labeler.clone().run_retries(cancel.clone()),
        );
        tasks.spawn(
            "status gauges",
            publish_gauges(labeler.clone(), cancel.clone()),
        );
        self.ready.send_replace(Some(labeler));
        set_health(&self.reporter, ServingStatus::Serving).await;
        info!(%addr, "reward service serving");
        tokio::select! {
            _ = &mut *shutdown => {}
            r = &mut self.server => self.server_ended = Some(r),
        }
        Ok(())
    }

    /// Drops readiness, cancels everything, and joins the server, the tasks and the
    /// distillation thread within `drain`; returns how the server ended.
    async fn stop(mut self, drain: Duration) -> Result<(), ServiceError> {
        // Readiness drops before anything else stops.
        set_health(&self.reporter, ServingStatus::NotServing).await;
        info!(
            drain_ms = drain.as_millis() as u64,
            "reward service stopping"
        );
        self.cancel.cancel();
        let deadline = Instant::now() + drain;
        let served = match self.server_ended.take() {
            Some(r) => r,
            None => match tokio::time::timeout_at(deadline, &mut self.server).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(
                        task = "grpc server",
                        "task did not finish within the drain timeout, aborting it"
                    );
                    self.server.abort();
                    Ok(Ok(()))
                }
            },
        };
        let stragglers = self.tasks.join(deadline).await;
        // The last reference to the labeler, and with it the store.
        let labeler = self.ready.send_replace(None);
        if let Some(labeler) = &labeler {
            labeler.close_distill();
        }
        if let Some(d) = self.distiller.take() {
            match tokio::time::timeout_at(deadline, d.finished).await {
                // The thread let go of everything: joining it is immediate.
                Ok(_) => {
                    let _ = tokio::task::spawn_blocking(move || d.thread.join()).await;
                }
                Err(_) => warn!(
                    task = "reward network training",
                    "task did not finish within the drain timeout, abandoning it"
                ),
            }
        }
        drop(labeler);
        served??;
        info!(unfinished = stragglers.len(), "reward service stopped");
        Ok(())
    }
}

/// Writes an address file into the run directory, off the async threads.
async fn write_addr(dir: PathBuf, file: &'static str, addr: String) -> Result<(), ServiceError> {
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        spur_core::checkpoint::write_atomic(&dir.join(file), addr.as_bytes())
    })
    .await??;
    Ok(())
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    // Probes that name no service see the same.
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <RewardServiceServer<RewardGrpc> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Refreshes the Prometheus gauges every second (no-ops without an exporter).
async fn publish_gauges(labeler: Arc<Labeler>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while cancel.run_until_cancelled(tick.tick()).await.is_some() {
        service::publish_gauges(&service::status(&labeler));
    }
}

/// What earlier runs with this judge and prompt left in the store.
struct Loaded {
    store: Arc<store::LabelStore>,
    /// Every judged text and its value in the label table.
    known: Vec<(String, f32)>,
    /// What the distilled network starts from.
    initial: distill::Verdicts,
}

/// Opens the store and reads every label (or ranked pair) of `prompt_version`:
/// blocking work, for `spawn_blocking`.
fn load_store(
    path: &Path,
    prompt_version: &str,
    kind: RewardModelKind,
) -> Result<Loaded, ServiceError> {
    let store = store::LabelStore::open(path)?;
    let (known, initial) = if kind == RewardModelKind::Ranking {
        let pairs = store.all_pairs(prompt_version)?;
        let known: Vec<(String, f32)> = labeler::pair_values(&pairs).into_iter().collect();
        let prefs = pairs
            .into_iter()
            .filter_map(|(pair, rec)| rec.verdict.map(|p| (pair, p)))
            .collect();
        (known, distill::Verdicts::Pairs(prefs))
    } else {
        let labels = store.all(prompt_version)?;
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
    Ok(Loaded {
        store: Arc::new(store),
        known,
        initial,
    })
}

/// Builds the labeler on the loaded store, and the training thread of the
/// distilled network when there is one.
fn start_labeler(
    config: &Config,
    judge: Judge,
    prompt: prompt::Prompt,
    prompt_version: String,
    loaded: Loaded,
    cancel: &CancellationToken,
) -> Result<(Arc<Labeler>, Option<distill::Distiller>), ServiceError> {
    let r = &config.reward_service;
    let kind = config.intrinsic.model;
    let Loaded {
        store,
        known,
        initial,
    } = loaded;
    info!(
        texts = known.len(),
        prompt_version,
        judge = judge.id(),
        model = ?kind,
        "label store open"
    );
    let judged: Vec<String> = known.iter().map(|(t, _)| t.clone()).collect();
    let model = Arc::new(RewardModel::new(prompt_version.clone(), kind, known));
    let (distill, distiller) = if kind == RewardModelKind::Retrieval {
        (None, None)
    } else {
        let (tx, d) = distill::spawn(
            kind,
            initial,
            r.distill_steps,
            r.distill_lr,
            model.clone(),
            cancel.clone(),
        )?;
        (Some(tx), Some(d))
    };
    let pairs_per_text = (kind == RewardModelKind::Ranking).then_some(r.pairs_per_text as usize);
    let retry = RetryWait::new(
        r.unparseable_budget,
        r.unparseable_retries,
        Duration::from_millis(r.unparseable_retry_ms),
    );
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
        retry,
    ));
    Ok((labeler, distiller))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(judge: JudgeKind, model: &str, goal: &str) -> String {
        let mut config = Config::from_toml_str("").unwrap();
        config.reward_service.judge = judge;
        config.reward_service.openai_model = model.into();
        config.reward_service.goal = goal.into();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        build_judge(&config, &root).unwrap().2
    }

    #[test]
    fn labels_are_kept_apart_by_model_prompt_and_goal() {
        let keyroom = "prompts/keyroom-goal.txt";
        let a = version(JudgeKind::Openai, "model-a", keyroom);
        assert_eq!(a, version(JudgeKind::Openai, "model-a", keyroom));
        assert_ne!(a, version(JudgeKind::Openai, "model-b", keyroom));
        assert_ne!(
            a,
            version(
                JudgeKind::Openai,
                "model-a",
                "prompts/nethack-score-goal.txt"
            )
        );
        // The rule judge answers by its rules file, whatever the model setting says.
        assert_eq!(
            version(JudgeKind::Rules, "model-a", keyroom),
            version(JudgeKind::Rules, "model-b", keyroom)
        );
    }
}
