//! The `spur` command: one binary for every role. `main` only parses arguments and
//! config, starts tracing, and hands over to the role's `run`.

mod bench;
mod bench_annotator;
mod bench_peer;
mod bench_scale;
mod cluster;
mod devices;
mod eval;
mod expert;
mod local;
mod logging;
mod malloc;
mod plot;
mod prometheus;
mod shutdown;
mod soak;
mod spec;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use spur_core::Config;

/// Rust's own allocations (messages, chunks, frames) come from mimalloc. Its free
/// lists are per thread, where glibc's arenas take a lock: a chunk decoded on one
/// runtime worker and dropped on the trainer's thread made glibc's arena locks about
/// a tenth of an ingesting learner's CPU (futex waits and wake-ups). libtorch's tensors
/// still come from glibc, tuned in `malloc`. mimalloc is built without transparent
/// huge pages (`no_thp`): with them the slowest loads of `spur bench broadcast` were up
/// to 1.8 times slower.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spur",
    version,
    about = "Distributed actor-learner RL with LLM-derived intrinsic rewards"
)]
struct Cli {
    /// Log as JSON lines (for clusters) instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the learner: accept trajectories, train, broadcast weights.
    Learner(LearnerArgs),
    /// Run one rollout actor against a learner.
    Actor(ActorArgs),
    /// Run the reward service: label event texts, keep them, publish reward models.
    RewardService(RewardServiceArgs),
    /// Start a learner and N actors (and the reward service when intrinsic rewards
    /// are on) as child processes on this machine.
    Local(LocalArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Learning curves of one or more runs as a PNG (runs overlaid).
    Plot(plot::PlotArgs),
    /// Play episodes with a checkpoint's policy: mean return, success rate, and a
    /// text rendering of one episode for grid environments.
    Eval(eval::EvalArgs),
    /// A live summary of a running learner and reward service.
    Status(status::StatusArgs),
    /// Write expert trajectories (keyroom's scripted solver) for the `replay` env.
    Expert(expert::ExpertArgs),
    /// Print a config's env spec as JSON: observation length, actions, and the named
    /// fields of the flat observation with their offsets (what a TorchScript policy
    /// slices).
    Spec(spec::SpecArgs),
    /// What torch on this machine can do with CUDA: its CUDA library, the devices it
    /// sees, and what `device = "auto"` picks.
    Devices(devices::DevicesArgs),
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Experiment config (TOML); built-in defaults when omitted.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set learner.lr=0.0005` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    /// File, then `SPUR_*` variables, then `--set`; validated as a whole.
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(
            self.config.as_deref(),
            std::env::vars(),
            &self.set,
        )?)
    }
}

#[derive(Args)]
struct LearnerArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run directory (config, metrics.jsonl, checkpoints).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from the newest checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    check: CheckConfigArg,
}

#[derive(Args)]
struct ActorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Learner address, e.g. http://127.0.0.1:50051 (default: actor.learner_addr).
    #[arg(long)]
    learner: Option<String>,
    /// Name of this actor (default: actor-<index>). Without `--index` it also seeds
    /// the actor's environments and action sampling (a hash of it), so the pods of a
    /// Kubernetes Deployment, which have names but no ordinals, act differently.
    #[arg(long)]
    actor_id: Option<String>,
    /// Position among the actors: seeds `run.seed + 1000 * index` (default 0 when
    /// `--actor-id` is not given either).
    #[arg(long)]
    index: Option<u32>,
    #[command(flatten)]
    check: CheckConfigArg,
}

#[derive(Args)]
struct RewardServiceArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run directory to write the bound address into.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    check: CheckConfigArg,
}

#[derive(Args)]
struct CheckConfigArg {
    /// Resolve and validate the config (file, `SPUR_*` variables, `--set`), print it
    /// and exit without binding anything; non-zero with the offending key otherwise.
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
pub struct LocalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Number of actor processes (default: run.actors).
    #[arg(long)]
    actors: Option<u32>,
    /// Run directory (default: <run.dir>/<run.name>-<unix time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// End-to-end env steps/s of local mode, env-only and inference-only steps/s.
    Throughput(bench::ThroughputArgs),
    /// The environment bridge: CartPole-v1 through it vs a plain Python loop, and
    /// NetHack in the full system vs NLE's raw random-action rate.
    Bridge(bench::BridgeArgs),
    /// `spur local` with many actors for minutes under kill -9 faults (an actor, the
    /// reward service, the learner, in turn): memory, restarts, dropped steps, labels
    /// and the time to the next policy version after each fault.
    Soak(soak::SoakArgs),
    /// Env steps/s one learner accepts from K clients replaying chunks, against raw
    /// TCP loopback moving the same bytes.
    Ingest(bench_scale::IngestArgs),
    /// Publish-to-loaded time of weights at 16 subscribers (p50, p99) for ~1M and
    /// ~10M parameter policies, against loading the same payload locally.
    Broadcast(bench_scale::BroadcastArgs),
    /// Judge calls/s a reward service achieves against a judge with a fixed latency
    /// and a concurrency cap (the bound), and texts labelled per second.
    Annotator(bench_annotator::AnnotatorArgs),
    /// spur against Sample Factory 2.1.1 with matched settings, one after the other:
    /// env steps/s on CartPole-v1 (spur's Rust env and Gymnasium's through the env
    /// bridge) and NetHackScore-v0, and CartPole env steps to a mean return of 475.
    /// Runs scripts/peer_bench.py with this binary as spur.
    Peer(bench_peer::PeerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_json);
    // Before any tensor exists.
    malloc::keep_freed_memory();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Learner(a) => {
            let config = a.config.load()?;
            if a.check.check_config {
                return print_checked(&config);
            }
            spur_core::device::load_cuda_for([config.learner.device.as_str()]);
            prometheus::install(&config.run.prometheus_listen, "learner").await?;
            let run_dir = a.run_dir.unwrap_or_else(|| default_run_dir(&config));
            let opts = spur_learner::LearnerOptions {
                run_dir,
                resume: a.resume,
                discard_chunks: false,
            };
            spur_learner::run(config, opts, shutdown::signal())
                .await
                .context("learner failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Actor(a) => {
            let config = a.config.load()?;
            if a.check.check_config {
                if let Some(addr) = &a.learner {
                    tonic::transport::Endpoint::from_shared(addr.clone())
                        .with_context(|| format!("--learner: bad address {addr}"))?;
                }
                return print_checked(&config);
            }
            spur_core::device::load_cuda_for([config.model.device.as_str()]);
            prometheus::install(&config.run.prometheus_listen, "actor").await?;
            // No name and no index: actor 0, as always. A name alone seeds by the name.
            let (actor_id, index) = match a.actor_id {
                Some(id) => (id, a.index),
                None => {
                    let i = a.index.unwrap_or(0);
                    (format!("actor-{i}"), Some(i))
                }
            };
            let opts = spur_actor::ActorOptions {
                actor_id,
                index,
                learner_addr: a.learner,
            };
            spur_actor::run(config, opts, shutdown::signal())
                .await
                .context("actor failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RewardService(a) => {
            let config = a.config.load()?;
            if a.check.check_config {
                check_reward_files(&config)?;
                return print_checked(&config);
            }
            prometheus::install(&config.run.prometheus_listen, "reward-service").await?;
            let opts = spur_reward_service::ServiceOptions {
                root: PathBuf::from("."),
                run_dir: a.run_dir,
            };
            spur_reward_service::run(config, opts, shutdown::signal())
                .await
                .context("reward service failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Local(a) => {
            let config = a.config.load()?;
            local::run(config, a).await
        }
        Command::Bench(BenchCommand::Throughput(a)) => bench::throughput(a).await,
        Command::Bench(BenchCommand::Bridge(a)) => bench::bridge(a).await,
        Command::Bench(BenchCommand::Soak(a)) => soak::soak(a).await,
        Command::Bench(BenchCommand::Ingest(a)) => bench_scale::ingest(a).await,
        Command::Bench(BenchCommand::Annotator(a)) => bench_annotator::annotator(a).await,
        Command::Bench(BenchCommand::Broadcast(a)) => bench_scale::broadcast(a).await,
        Command::Bench(BenchCommand::Peer(a)) => bench_peer::peer(a).await,
        Command::Plot(a) => {
            plot::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(a) => {
            // Off the async runtime: bridge envs drive a runtime of their own.
            tokio::task::spawn_blocking(move || eval::run(a)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Expert(a) => {
            expert::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Spec(a) => {
            // Off the async runtime: a bridge env's spec comes from starting a bridge.
            tokio::task::spawn_blocking(move || spec::run(a)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices(a) => Ok(devices::run(a)),
        Command::Status(a) => {
            status::run(a).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads torch's CUDA library where either of the config's devices may be a GPU, for
/// the benchmarks (which put models on both): right after the config, before any
/// tensor exists (libtorch decides once whether it has CUDA). The learner loads it for
/// `learner.device` and an actor for `model.device`; `local`'s own process, the reward
/// service (its text models are on the CPU) and `eval` never do.
pub(crate) fn load_cuda_if_wanted(config: &Config) {
    spur_core::device::load_cuda_for([
        config.model.device.as_str(),
        config.learner.device.as_str(),
    ]);
}

/// `--check-config`: the resolved config on stdout, then "ok" on stderr.
fn print_checked(config: &Config) -> anyhow::Result<ExitCode> {
    print!("{}", config.to_toml());
    eprintln!("ok");
    Ok(ExitCode::SUCCESS)
}

/// `reward-service --check-config`: the prompt, goal and rule files the service reads
/// at start, relative to the working directory as the service reads them.
fn check_reward_files(config: &Config) -> anyhow::Result<()> {
    use spur_core::config::{JudgeKind, RewardModelKind};
    let r = &config.reward_service;
    let (key, template) = if config.intrinsic.model == RewardModelKind::Ranking {
        ("reward_service.rank_prompt", &r.rank_prompt)
    } else {
        ("reward_service.prompt", &r.prompt)
    };
    spur_reward_service::prompt::Prompt::load(template.as_ref(), r.goal.as_ref())
        .with_context(|| format!("config key `{key}` or `reward_service.goal`"))?;
    if r.judge == JudgeKind::Rules {
        spur_reward_service::judge::RulesJudge::load(r.rules.as_ref())
            .context("config key `reward_service.rules`")?;
    }
    Ok(())
}

/// `<run.dir>/<run.name>-<unix seconds>`.
pub fn default_run_dir(config: &Config) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(&config.run.dir).join(format!("{}-{secs}", config.run.name))
}
