//! How far one learner scales, against a baseline measured in the same run.
//!
//! `spur bench ingest`: K clients replay one valid trajectory chunk of the config's
//! shape (built once, tagged with the learner's incarnation) into a real learner
//! (`spur_learner::serve` on 127.0.0.1:0, with a batch so large that it never
//! trains) for N seconds: acknowledged env steps/s and MB/s, against K plain TCP
//! loopback connections moving length-prefixed payloads of the same size.
//!
//! `spur bench broadcast`: 16 weight subscribers, each reading its stream into a
//! latest-wins slot and loading the newest payload into an `ActorCritic` whenever it
//! is free (as actors do), under a learner that publishes after every update (one
//! client replays chunks to drive it): publish-to-loaded time, p50 and p99, from the
//! `spur.published_unix_ns` the learner writes into each payload's metadata, for the
//! versions published after a warm-up, against copying and loading the same payload
//! locally.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use spur_actor::{WeightsAssembler, WeightsUpdate};
use spur_core::model::{read_metadata, ActorCritic};
use spur_core::trajectory::Chunk;
use spur_core::transport::{AuthChannel, Transport};
use spur_core::Config;
use spur_env_bridge::env_spec;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::{StatusRequest, SubscribeWeightsRequest, TrajectoryChunk};
use spur_proto::MAX_MESSAGE_BYTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream;

use crate::ConfigArgs;

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Clients pushing at once.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

#[derive(Args)]
pub struct BroadcastArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Weight subscribers.
    #[arg(long, default_value_t = 16)]
    subscribers: usize,
    /// Hidden layers of each measured MLP, `;` between policies (defaults: about 1M
    /// and 10M parameters).
    #[arg(long, default_value = "700,700;2200,2200")]
    hidden: String,
    /// Seconds each policy is measured.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of publishing before versions are counted (every subscriber's first
    /// loads, buffers and threads are made then).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
}

/// A learner served in-process on 127.0.0.1:0 from a temporary run directory.
struct InProcess {
    client: LearnerClient<AuthChannel>,
    incarnation: u64,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<spur_learner::TrainSummary, spur_learner::LearnerError>>,
    dir: std::path::PathBuf,
    transport: Transport,
    addr: String,
}

impl InProcess {
    /// A learner serving `config`; with `discard`, one that drops every chunk it
    /// takes ([`spur_learner::LearnerOptions::discard_chunks`]).
    async fn start(config: &Config, name: &str, discard: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("spur-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = spur_learner::LearnerOptions {
            run_dir: dir.clone(),
            resume: false,
            discard_chunks: discard,
        };
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(spur_learner::serve(
            config.clone(),
            opts,
            listener,
            shutdown,
        ));
        let transport = Transport::from_config(&config.transport)?;
        let mut client = connect(&transport, &addr).await?;
        let status = client.get_status(StatusRequest {}).await?.into_inner();
        Ok(Self {
            client,
            incarnation: status.learner_incarnation,
            stop: Some(stop),
            task,
            dir,
            transport,
            addr,
        })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("the learner did not stop within 60 s")???;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

async fn connect(transport: &Transport, addr: &str) -> anyhow::Result<LearnerClient<AuthChannel>> {
    let channel = transport.client(&transport.url(addr))?.connect().await?;
    Ok(LearnerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Config `path`, then the bench's own settings, then the user's `--set`.
pub(crate) fn load(args: &ConfigArgs, ours: &[String]) -> anyhow::Result<Config> {
    let sets: Vec<String> = ours.iter().chain(&args.set).cloned().collect();
    let config = Config::load(args.config.as_deref(), std::env::vars(), &sets)?;
    crate::load_cuda_if_wanted(&config);
    Ok(config)
}

/// A chunk every check accepts: zero observations (or `observations`, rows of a
/// real rollout), action 0, no episode ends (with zero values when the learner takes
/// the actors', `learner.actor_estimates`).
fn replay_chunk(
    config: &Config,
    incarnation: u64,
    observations: Option<Vec<f32>>,
) -> anyhow::Result<TrajectoryChunk> {
    let spec = env_spec(&config.env)?;
    let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?;
    let (t, n, d) = (
        config.actor.rollout_len as usize,
        config.env.num_envs as usize,
        spec.obs_dim,
    );
    let mut chunk = Chunk {
        policy_version: 0,
        behaviour_log_probs: vec![-(spec.num_actions as f32).ln(); t * n],
        learner_incarnation: incarnation,
        behaviour_values: if config.learner.actor_estimates {
            vec![0.0; (t + 1) * n]
        } else {
            Vec::new()
        },
        ..Chunk::blank("bench", t, n, d, model.state_size())
    };
    if let Some(rows) = observations {
        anyhow::ensure!(rows.len() == chunk.observations.len(), "observation rows");
        chunk.observations = rows;
    }
    Ok(chunk.to_proto())
}

/// Pushes `chunk` over one stream until `deadline`; returns the chunks acknowledged.
async fn push_until(
    mut client: LearnerClient<AuthChannel>,
    chunk: TrajectoryChunk,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let chunks = std::iter::from_fn(move || (Instant::now() < deadline).then(|| chunk.clone()));
    let mut acks = client
        .push_trajectories(tokio_stream::iter(chunks))
        .await?
        .into_inner();
    let mut accepted = 0;
    while let Some(ack) = acks.message().await? {
        if Instant::now() <= deadline {
            accepted = ack.accepted_chunks;
        }
    }
    Ok(accepted)
}

/// When the learner's trained env steps next move past `after`, and to what.
async fn next_update(
    client: &mut LearnerClient<AuthChannel>,
    after: u64,
    give_up: Instant,
) -> anyhow::Result<(Instant, u64)> {
    loop {
        let s = client.get_status(StatusRequest {}).await?.into_inner();
        if s.env_steps != after {
            return Ok((Instant::now(), s.env_steps));
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "the learner-only run trained nothing for too long"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Env steps trained per second by a learner that only trains: a real learner
/// served in-process with the config's batch, epochs, minibatches and model, fed
/// one chunk of the config's shape, with the observations of a random-action rollout
/// (the NetHack network's cost depends on its messages), by 2 streams as fast as it
/// takes them. Chunks keep version 0 (so `learner.max_policy_lag` is lifted); the
/// first `warmup` seconds are not counted.
pub async fn learner_only(config: &Config, warmup: f64, secs: f64) -> anyhow::Result<LearnerRate> {
    let mut config = config.clone();
    config.learner.max_policy_lag = u64::MAX / 2;
    config.stop.env_steps = 0;
    config.stop.target_return = 0.0;
    let rows = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            crate::bench::random_rollout_observations(&config, config.actor.rollout_len as usize)
        }
    })
    .await??;
    let mut learner = InProcess::start(&config, "learner-only", false).await?;
    let chunk = replay_chunk(&config, learner.incarnation, Some(rows))?;
    let deadline = Instant::now() + Duration::from_secs_f64(warmup + secs + 60.0);
    let mut pushers = Vec::new();
    for _ in 0..2 {
        let client = connect(&learner.transport, &learner.addr).await?;
        pushers.push(tokio::spawn(push_until(client, chunk.clone(), deadline)));
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    // From the first update after the warm-up to the last one that ends after `secs`:
    // an update trains a whole batch at once, so counting over a fixed window would
    // round to whole batches.
    let give_up = Instant::now() + Duration::from_secs_f64(10.0 * secs + 120.0);
    let client = &mut learner.client;
    let now = client.get_status(StatusRequest {}).await?.into_inner();
    let (t0, s0) = next_update(client, now.env_steps, give_up).await?;
    // The training thread's CPU time, and its helpers' (`learner.threads`), which
    // add up theirs share by share.
    let learner_cpu_s = || {
        threads_cpu_s(spur_learner::TRAINER_THREAD).map(|t| t + spur_learner::helper_cpu_seconds())
    };
    let cpu0 = learner_cpu_s();
    let mut last = (t0, s0);
    while last.0.duration_since(t0).as_secs_f64() < secs {
        last = next_update(client, last.1, give_up).await?;
    }
    let cpu1 = learner_cpu_s();
    let steps = (last.1 - s0) as f64;
    let rate = LearnerRate {
        threads: spur_learner::minibatch_threads_in_use(),
        wall: steps / last.0.duration_since(t0).as_secs_f64(),
        // libtorch's own worker threads, with more than one, may carry other names.
        per_cpu_s: match (cpu0, cpu1, config.run.torch_threads) {
            (Some(a), Some(b), 1) if b > a => Some(steps / (b - a)),
            _ => None,
        },
    };
    pushers.iter().for_each(JoinHandle::abort);
    learner.stop().await?;
    Ok(rate)
}

/// What [`learner_only`] measured.
pub struct LearnerRate {
    /// Threads per minibatch step (`learner.threads`, resolved).
    pub threads: u32,
    /// Env steps trained per second of wall-clock time.
    pub wall: f64,
    /// Env steps trained per CPU-second of the training thread and its helpers
    /// (`learner.threads`): the learner's cost per step, whatever else shared the
    /// cores (the pushers feeding it run in this process). `None` where the thread's
    /// CPU time cannot be read, or with more than one torch thread.
    pub per_cpu_s: Option<f64>,
}

impl LearnerRate {
    /// The rate a bound should use, and its name: per CPU-second of the training
    /// threads where it was read (the wall-clock rate also counts the time the
    /// feeders took the thread's core), else the wall-clock rate.
    pub fn for_bound(&self) -> (f64, &'static str) {
        match self.per_cpu_s {
            Some(rate) => (rate, "learner per CPU-second"),
            None => (self.wall, "learner only"),
        }
    }

    /// The fastest one learner can train however the actors are spread over the
    /// cores, and its name: on one thread its rate per CPU-second (as
    /// [`Self::for_bound`]); split over more, the wall-clock rate it reached on this
    /// machine's cores.
    pub fn one_learner_cap(&self) -> (f64, &'static str) {
        match self.threads {
            1 => self.for_bound(),
            _ => (self.wall, "learner only"),
        }
    }
}

/// CPU seconds (user and system) used so far by the threads of this process named
/// `name`, from `/proc/self/task/*/stat`; `None` where there is none, or no `/proc`.
fn threads_cpu_s(name: &str) -> Option<f64> {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        match std::fs::read_to_string(dir.join("comm")) {
            Ok(comm) if comm.trim_end() == name => {}
            _ => continue,
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // After the command in parentheses: the state, then 10 fields, then utime
        // and stime in clock ticks (proc(5)).
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let ticks_used: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        *total.get_or_insert(0.0) += ticks_used / ticks;
    }
    total
}

/// Bytes/s of `clients` loopback TCP connections writing `len`-byte length-prefixed
/// messages for `secs`, counted by the readers.
async fn raw_tcp(clients: usize, len: usize, secs: f64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut writer = TcpStream::connect(addr).await?;
        let (mut reader, _) = listener.accept().await?;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; len];
            while reader.read_u32().await.is_ok() {
                reader.read_exact(&mut buf).await?;
                if Instant::now() <= deadline {
                    received.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, std::io::Error>(())
        }));
        let payload = vec![7u8; len];
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                writer.write_u32(len as u32).await?;
                writer.write_all(&payload).await?;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(received.load(Ordering::Relaxed) as f64 / secs)
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.clients >= 1 && args.seconds > 0.0,
        "--clients and --seconds must be positive"
    );
    // The trainer gathers forever: every accepted chunk is queued, taken and
    // dropped, none trained on and none held (holding them all made the run's memory
    // grow by what it moved, and its page faults a fifth of its CPU time).
    let config = load(&args.config, &["learner.batch_steps=4294967295".into()])?;
    let learner = InProcess::start(&config, "ingest", true).await?;
    let chunk = replay_chunk(&config, learner.incarnation, None)?;
    let (bytes, steps) = (
        prost::Message::encoded_len(&chunk),
        config.actor.rollout_len * config.env.num_envs,
    );
    println!(
        "spur bench ingest: {} clients, chunks of {} steps x {} envs ({:.1} KiB), {} cores, {} s per measurement",
        args.clients,
        config.actor.rollout_len,
        config.env.num_envs,
        bytes as f64 / 1024.0,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.seconds
    );
    let cpu0 = process_cpu_s();
    let raw = raw_tcp(args.clients, bytes, args.seconds).await?;
    let raw_cpu = process_cpu_s() - cpu0;
    let cpu0 = process_cpu_s();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut pushers = Vec::new();
    for _ in 0..args.clients {
        let client = connect(&learner.transport, &learner.addr).await?;
        pushers.push(tokio::spawn(push_until(client, chunk.clone(), deadline)));
    }
    let mut chunks = 0;
    for p in pushers {
        chunks += p.await??;
    }
    let cpu = process_cpu_s() - cpu0;
    learner.stop().await?;
    let rate = chunks as f64 * bytes as f64 / args.seconds;
    // CPU time per byte moved (senders and receivers together, all in this process)
    // moves much less with other people's load than bytes per second does.
    let per_gb = |cpu: f64, b: f64| cpu / (b * args.seconds / 1e9);
    let raw_per_gb = per_gb(raw_cpu, raw);
    println!(
        "{:<44} {:>12} {:>10} {:>8} {:>9} {:>8}",
        "measurement", "env steps/s", "MB/s", "vs tcp", "CPU s/GB", "vs tcp"
    );
    let row = |name: &str, b: f64, cpu: f64| {
        let steps_s = b / bytes as f64 * steps as f64;
        let cpu_gb = per_gb(cpu, b);
        println!(
            "{name:<44} {steps_s:>12.0} {:>10.1} {:>7.3}x {cpu_gb:>9.2} {:>7.3}x",
            b / 1e6,
            b / raw,
            raw_per_gb / cpu_gb
        );
    };
    row("raw TCP loopback, same bytes (baseline)", raw, raw_cpu);
    row("learner, chunks acknowledged", rate, cpu);
    Ok(std::process::ExitCode::SUCCESS)
}

/// CPU seconds (user and system) this process has used so far, every thread.
fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(u.ru_utime) + s(u.ru_stime)
}

/// The p-th percentile (0..=100) of `v`, in milliseconds.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize] * 1e3
}

fn unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Reads the weight stream, keeping the newest complete payload in `slot` (latest
/// wins), as an actor's weight subscription does.
async fn reassemble(
    mut client: LearnerClient<AuthChannel>,
    slot: watch::Sender<Option<Arc<WeightsUpdate>>>,
) -> anyhow::Result<()> {
    let mut stream = client
        .subscribe_weights(SubscribeWeightsRequest::default())
        .await?
        .into_inner();
    let mut assembler = WeightsAssembler::default();
    while let Some(piece) = stream.message().await? {
        if let Some(update) = assembler.push(piece) {
            slot.send_replace(Some(Arc::new(update)));
        }
    }
    Ok(())
}

/// Follows the learner's weights as an actor does: the stream is read all the time
/// into a latest-wins slot, and the policy loads the newest payload whenever it is
/// free (off the runtime, as an actor's rollout thread would). Records
/// publish-to-loaded seconds of every version loaded but the first (which was
/// published before it came).
async fn subscriber(
    client: LearnerClient<AuthChannel>,
    mut model: ActorCritic,
    seen: Arc<Mutex<Vec<(f64, f64)>>>,
) -> anyhow::Result<()> {
    let (slot, mut newest) = watch::channel(None);
    let reader = tokio::spawn(reassemble(client, slot));
    let mut first = true;
    // Ends when the reader drops the slot: the stream ended.
    while newest.changed().await.is_ok() {
        let Some(update) = newest.borrow_and_update().clone() else {
            continue;
        };
        let (m, meta) = tokio::task::spawn_blocking(move || {
            let meta = model.load_safetensors(&update.bytes);
            (model, meta)
        })
        .await?;
        model = m;
        let published = meta?
            .get("spur.published_unix_ns")
            .and_then(|v| v.parse::<f64>().ok());
        if let (Some(ns), false) = (published, std::mem::take(&mut first)) {
            seen.lock()
                .expect("no panics while held")
                .push((ns / 1e9, unix_s() - ns / 1e9));
        }
    }
    reader.await?
}

/// Publish-to-loaded seconds of every subscriber and version published after the
/// first `warmup` seconds, the payload size and the policy's parameters.
async fn broadcast_once(
    config: &Config,
    subscribers: usize,
    warmup: f64,
    secs: f64,
) -> anyhow::Result<(Vec<f64>, usize, i64)> {
    let learner = InProcess::start(config, "broadcast", false).await?;
    let spec = env_spec(&config.env)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let client = connect(&learner.transport, &learner.addr).await?;
        let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?;
        subs.push(tokio::spawn(subscriber(client, model, seen.clone())));
    }
    let chunk = replay_chunk(config, learner.incarnation, None)?;
    let counted_from = unix_s() + warmup;
    let deadline = Instant::now() + Duration::from_secs_f64(warmup + secs);
    push_until(learner.client.clone(), chunk, deadline).await?;
    learner.stop().await?;
    for s in subs {
        // A subscriber ends with `Unavailable` when the learner stops.
        let _ = s.await?;
    }
    let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?;
    let bytes = model
        .to_safetensors_as(1, &Default::default(), config.learner.weights_dtype)?
        .len();
    let params = model
        .var_store()
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let v = std::mem::take(&mut *seen.lock().expect("no panics while held"))
        .into_iter()
        .filter(|&(published, _)| published >= counted_from)
        .map(|(_, latency)| latency)
        .collect();
    Ok((v, bytes, params))
}

/// Seconds to copy `bytes` and load them into a policy, `n` times.
fn local_load(config: &Config, n: usize) -> anyhow::Result<Vec<f64>> {
    let spec = env_spec(&config.env)?;
    let mut model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?;
    let payload = model.to_safetensors_as(1, &Default::default(), config.learner.weights_dtype)?;
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let bytes = payload.clone();
            read_metadata(&bytes)?;
            model.load_safetensors(&bytes)?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

pub async fn broadcast(args: BroadcastArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.subscribers >= 1 && args.seconds > 0.0 && args.warmup >= 0.0,
        "--subscribers and --seconds must be positive, --warmup not negative"
    );
    // What `--set` may have changed of the bench's own settings.
    let shown = load(&args.config, &["learner.broadcast_every=1".into()])?;
    println!(
        "spur bench broadcast: {} subscribers, a publish every {} update(s), weights as {:?}, {} cores, {} s per policy after {} s of warm-up",
        args.subscribers,
        shown.learner.broadcast_every,
        shown.learner.weights_dtype,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.seconds,
        args.warmup
    );
    println!(
        "{:<44} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "measurement", "MiB", "samples", "p50 ms", "p99 ms", "p99 vs"
    );
    for hidden in args.hidden.split(';') {
        // Small updates (one short chunk, one minibatch), each followed by a publish.
        let ours = [
            format!("model.hidden=[{hidden}]"),
            "model.core=none".into(),
            "actor.rollout_len=8".into(),
            "env.num_envs=8".into(),
            "learner.batch_steps=64".into(),
            "learner.epochs=1".into(),
            "learner.minibatches=1".into(),
            "learner.broadcast_every=1".into(),
            "learner.max_policy_lag=1000000000".into(),
            "learner.checkpoint_every=1000000".into(),
        ];
        let config = load(&args.config, &ours)?;
        tch::set_num_threads(config.run.torch_threads as i32);
        let c = config.clone();
        let mut local = crate::bench::off_runtime(move || local_load(&c, 50)).await?;
        let (mut net, bytes, params) =
            broadcast_once(&config, args.subscribers, args.warmup, args.seconds).await?;
        anyhow::ensure!(
            !net.is_empty(),
            "no weights reached a subscriber after its first"
        );
        let mib = bytes as f64 / (1 << 20) as f64;
        let base = percentile(&mut local, 99.0);
        let row = |name: String, v: &mut Vec<f64>| {
            let (p50, p99) = (percentile(v, 50.0), percentile(v, 99.0));
            println!(
                "{name:<44} {mib:>8.1} {:>9} {p50:>9.1} {p99:>9.1} {:>7.1}x",
                v.len(),
                p99 / base
            );
        };
        let m = params as f64 / 1e6;
        row(
            format!("{m:.1}M params, local copy + load (baseline)"),
            &mut local,
        );
        row(
            format!("  publish to loaded, {} subscribers", args.subscribers),
            &mut net,
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
