//! `spur bench throughput`: in one run on one machine, env-only steps/s (random
//! actions), inference-only steps/s (batched policy forward passes), a single actor's
//! rollout loop without a learner (env + inference), and end-to-end env steps/s of
//! local mode (learner and actors as processes, training for real). Ratios are
//! against the env-only baseline measured in the same run. A learner-only line (a
//! real learner fed synthetic chunks of the config's shape, see
//! [`learner_only`](crate::bench_scale::learner_only)) completes the parts, and end to
//! end is set against the bound they imply on this machine: each env step costs
//! 1/env + 1/inference + 1/learner CPU-seconds (single-thread rates; the learner's
//! from its training thread's CPU time, since the feeders share its cores), so C
//! cores cannot run more than C / (1/env + 1/inference + 1/learner) steps/s. Then the cost of a
//! recurrent core: inference steps/s of the config's network without a core, with an
//! LSTM and with a GRU (`model.core_size` wide), against the one without; for a
//! TorchScript policy instead, the module against the built-in network of
//! `model.hidden`. `--parts` picks some of these (to profile one alone, say).
//!
//! `spur bench bridge`: CartPole-v1 stepped through the env bridge (random actions),
//! on each wire, against a plain Python loop over the same envs, and NetHack env steps/s of the
//! full system (local mode, training) against NLE's raw random-action rate, all in
//! one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::Rng;
use spur_actor::{Rollout, WeightsUpdate};
use spur_core::config::{BridgeWire, ModelArch};
use spur_core::device::resolve_device;
use spur_core::env::VecEnv;
use spur_core::model::ActorCritic;
use spur_core::Config;
use spur_env_bridge::make_batch;
use spur_proto::v1::LearnerStatus;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::ConfigArgs;

#[derive(Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of end-to-end warm-up before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// The parts to measure, in the order they run (all by default); ratios and
    /// bounds are printed where the parts they need were measured. One part alone
    /// makes profiling it easy.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "env,inference,rollout,learner,end-to-end,cores"
    )]
    parts: Vec<Part>,
}

/// A part of `spur bench throughput`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Env steps/s with random actions.
    Env,
    /// Batched forward passes of the config's policy.
    Inference,
    /// One actor's rollout loop, no learner.
    Rollout,
    /// A learner that only trains, on synthetic chunks.
    Learner,
    /// Local mode, training for real.
    EndToEnd,
    /// The cost of a recurrent core (or of a TorchScript module).
    Cores,
}

fn vec_env(config: &Config) -> anyhow::Result<VecEnv> {
    let batch = make_batch(&config.env, config.env.num_envs as usize)?;
    Ok(VecEnv::from_batch(batch, config.run.seed, 1)?)
}

/// Steps every env of `venv` once with a uniformly drawn action (`actions` is the
/// buffer, one per env).
fn random_step(venv: &mut VecEnv, rng: &mut impl Rng, actions: &mut [i64]) -> anyhow::Result<()> {
    let a = venv.spec().num_actions as i64;
    actions.iter_mut().for_each(|x| *x = rng.random_range(0..a));
    venv.step(actions)?;
    Ok(())
}

/// The observation rows of `steps` steps of the config's envs with random actions
/// (the rows before each step and after the last): what a chunk of that length
/// carries.
pub fn random_rollout_observations(config: &Config, steps: usize) -> anyhow::Result<Vec<f32>> {
    let mut venv = vec_env(config)?;
    let (mut rng, mut actions) = (rand::rng(), vec![0i64; venv.num_envs()]);
    let mut rows = venv.observations().to_vec();
    for _ in 0..steps {
        random_step(&mut venv, &mut rng, &mut actions)?;
        rows.extend_from_slice(venv.observations());
    }
    Ok(rows)
}

/// Env steps/s with random actions.
pub fn env_only(config: &Config, secs: f64) -> anyhow::Result<f64> {
    let mut venv = vec_env(config)?;
    let n = venv.num_envs();
    let (mut rng, mut actions) = (rand::rng(), vec![0i64; n]);
    let (start, mut steps) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            random_step(&mut venv, &mut rng, &mut actions)?;
        }
        steps += 64 * n as u64;
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64())
}

/// Batched forward passes of the config's policy on `device` (the actors',
/// `model.device`, resolved once by the caller).
fn inference_only(config: &Config, device: tch::Device, secs: f64) -> anyhow::Result<f64> {
    let venv = vec_env(config)?;
    let mut model = ActorCritic::for_spec(venv.spec(), &config.model, device)?;
    if config.actor.fold_weights {
        model.fold_for_acting();
    }
    let obs = venv.observations().to_vec();
    let mut state = vec![0.0f32; venv.num_envs() * model.state_size()];
    let (start, mut steps) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..16 {
            std::hint::black_box(model.act(&obs, &mut state, false));
        }
        steps += 16 * venv.num_envs() as u64;
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64())
}

/// Env steps/s of one actor's rollout loop (`spur_actor::Rollout`, with its env
/// lanes, chunk building and all) acting with fresh weights, no learner: counted in
/// the chunks it makes once every env has been in one (the first ones wait for
/// bridges to start).
fn rollout_only(config: &Config, secs: f64, rt: Handle) -> anyhow::Result<f64> {
    let spec = spur_env_bridge::env_spec(&config.env)?;
    let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu)?;
    let bytes = model.to_safetensors(1, &Default::default())?;
    let (_weights_tx, weights) = watch::channel(Some(Arc::new(WeightsUpdate {
        version: 1,
        incarnation: 1,
        bytes: bytes.into(),
    })));
    let (chunks_tx, mut chunks) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let rollout = Rollout {
        config: config.clone(),
        actor_id: "bench".into(),
        seed: config.run.seed,
        weights,
        readiness: Default::default(),
        chunks: chunks_tx,
        stop: stop.clone(),
        rt,
        texts: None,
    };
    let thread = std::thread::spawn(move || rollout.run());
    let measured = (|| {
        let mut started = vec![false; config.env.num_envs as usize];
        while started.contains(&false) {
            let c = chunks
                .blocking_recv()
                .context("the rollout loop stopped before every env was in a chunk")?;
            for &i in &c.env_ids {
                started[i as usize] = true;
            }
        }
        let (start, mut steps) = (Instant::now(), 0);
        while start.elapsed().as_secs_f64() < secs {
            let c = chunks.blocking_recv().context("the rollout loop stopped")?;
            steps += c.steps();
        }
        Ok::<_, anyhow::Error>(steps as f64 / start.elapsed().as_secs_f64())
    })();
    stop.cancel();
    drop(chunks);
    let ended = thread
        .join()
        .map_err(|_| anyhow::anyhow!("the rollout thread panicked"))?;
    let rate = measured?;
    ended?;
    Ok(rate)
}

/// Inference steps/s of the config's network without a core, then with each core.
fn core_cost(
    config: &Config,
    device: tch::Device,
    secs: f64,
) -> anyhow::Result<Vec<(String, f64)>> {
    use spur_core::config::CoreKind;
    let mut rows = Vec::new();
    for (name, core) in [
        ("  no core (feedforward)", CoreKind::None),
        ("  lstm core", CoreKind::Lstm),
        ("  gru core", CoreKind::Gru),
    ] {
        let mut c = config.clone();
        c.model.core = core;
        rows.push((name.to_string(), inference_only(&c, device, secs)?));
    }
    Ok(rows)
}

/// Inference steps/s of the built-in network the config would get without its
/// TorchScript module (`model.hidden`, `model.core`), then of the module.
fn script_cost(
    config: &Config,
    device: tch::Device,
    secs: f64,
) -> anyhow::Result<Vec<(String, f64)>> {
    let mut builtin = config.clone();
    builtin.model.arch = ModelArch::Auto;
    builtin.model.path.clear();
    Ok(vec![
        (
            "  built-in network (model.hidden)".to_string(),
            inference_only(&builtin, device, secs)?,
        ),
        (
            "  torchscript module (model.path)".to_string(),
            inference_only(config, device, secs)?,
        ),
    ])
}

/// Env steps/s that `cores` cores can sustain at most when each step costs
/// 1/env + 1/inference + 1/learner CPU-seconds.
fn cpu_bound(cores: usize, env: f64, inference: f64, learner: f64) -> f64 {
    cores as f64 / (1.0 / env + 1.0 / inference + 1.0 / learner)
}

/// Runs `f` on a thread of its own: bridge envs run their own runtime, which cannot
/// start inside this async one.
pub async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// When the learner's trained env steps next move past `after`, and its status then.
async fn next_update(
    cluster: &mut Cluster,
    after: u64,
    give_up: Instant,
) -> anyhow::Result<(Instant, LearnerStatus)> {
    loop {
        if let Some(s) = cluster.status().await {
            if s.env_steps != after {
                return Ok((Instant::now(), s));
            }
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "the end-to-end run trained nothing for too long"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn end_to_end(config: &Config, warmup: f64, secs: f64) -> anyhow::Result<(f64, u64)> {
    let mut config = config.clone();
    config.stop.env_steps = 0;
    config.stop.target_return = 0.0;
    let run_dir = std::env::temp_dir().join(format!("spur-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let mut cluster = Cluster::start(&config, &run_dir, config.run.actors).await?;
    let result = async {
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        // From the first update after the warm-up to the last one that ends after
        // `secs`: trained steps move a whole batch at a time.
        let give_up = Instant::now() + Duration::from_secs_f64(10.0 * secs + 120.0);
        let now = cluster
            .status()
            .await
            .ok_or_else(|| anyhow::anyhow!("no status from the learner"))?;
        let (t0, a) = next_update(&mut cluster, now.env_steps, give_up).await?;
        let mut last = (t0, a.clone());
        while last.0.duration_since(t0).as_secs_f64() < secs {
            last = next_update(&mut cluster, last.1.env_steps, give_up).await?;
        }
        let (t1, b) = last;
        let rate = (b.env_steps - a.env_steps) as f64 / t1.duration_since(t0).as_secs_f64();
        Ok::<_, anyhow::Error>((rate, b.dropped_stale_chunks))
    }
    .await;
    cluster.stop(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

pub async fn throughput(args: ThroughputArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.config.load()?;
    crate::load_cuda_if_wanted(&config);
    tch::set_num_threads(config.run.torch_threads as i32);
    let secs = args.seconds;
    println!(
        "spur bench throughput: env {:?}, {} envs per actor, {} actors, {} cores, {secs} s per measurement",
        config.env.kind,
        config.env.num_envs,
        config.run.actors,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let actors_on = resolve_device("model.device", &config.model.device)?;
    let learner_on = resolve_device("learner.device", &config.learner.device)?;
    println!(
        "devices: actors (model.device = {:?}) {actors_on:?}, learner (learner.device = {:?}) {learner_on:?}",
        config.model.device, config.learner.device
    );
    let has = |p: Part| args.parts.contains(&p);
    let (c, rt, parts) = (config.clone(), Handle::current(), args.parts.clone());
    let (env, inference, rollout) = off_runtime(move || {
        let has = |p: Part| parts.contains(&p);
        Ok((
            has(Part::Env).then(|| env_only(&c, secs)).transpose()?,
            has(Part::Inference)
                .then(|| inference_only(&c, actors_on, secs))
                .transpose()?,
            has(Part::Rollout)
                .then(|| rollout_only(&c, secs, rt))
                .transpose()?,
        ))
    })
    .await?;
    // Blank chunks carry no groups, so a grouped learner would never train on them.
    let grouped = config.learner.advantage.is_grouped();
    let learner = if has(Part::Learner) && !grouped {
        Some(crate::bench_scale::learner_only(&config, args.warmup, secs).await?)
    } else {
        None
    };
    let e2e = if has(Part::EndToEnd) {
        Some(end_to_end(&config, args.warmup, secs).await?)
    } else {
        None
    };
    println!(
        "{:<44} {:>12} {:>10}",
        "measurement", "env steps/s", "vs env"
    );
    let row = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            match env {
                Some(env) => println!("{name:<44} {v:>12.0} {:>9.3}x", v / env),
                None => println!("{name:<44} {v:>12.0}"),
            }
        }
    };
    row("env only (1 thread, random actions)", env);
    row("inference only (1 thread, batched forward)", inference);
    row("one actor's rollout loop (env + inference)", rollout);
    if has(Part::Learner) && grouped {
        println!("learner only: not measured (grouped advantages need real episodes)");
    }
    let threads = learner.as_ref().map_or(1, |l| l.threads);
    let plural = if threads == 1 { "" } else { "s" };
    row(
        &format!("learner only ({threads} thread{plural}, synthetic chunks)"),
        learner.as_ref().map(|l| l.wall),
    );
    row(
        &format!("learner per CPU-second of its training thread{plural}"),
        learner.as_ref().and_then(|l| l.per_cpu_s),
    );
    row("end to end (local mode, training)", e2e.map(|(v, _)| v));
    if let Some((_, dropped)) = e2e {
        println!("stale chunks dropped during the end-to-end run: {dropped}");
    }
    let on_gpu = actors_on.is_cuda() || learner_on.is_cuda();
    if let (true, Some(rate), Some((e2e, _))) = (on_gpu, &learner, e2e) {
        // CPU-seconds are not what a CUDA part costs: no CPU bound, only the learner's.
        println!(
            "CPU bound: not computed (a part runs on CUDA); end to end vs learner only: {:.3}x",
            e2e / rate.wall
        );
    }
    if let (false, Some(env), Some(inference), Some(rate)) = (on_gpu, env, inference, &learner) {
        let (learner, which) = rate.for_bound();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let bound = cpu_bound(cores, env, inference, learner);
        println!(
            "CPU bound on {cores} cores: C / (1/env + 1/inference + 1/learner) = {bound:.0} env steps/s (learner: {which}){}",
            if config.env.kind == spur_core::config::EnvKind::Gym {
                " (env work runs in the bridge's Python processes)"
            } else {
                ""
            }
        );
        // One learner trains one batch after another: however the actors are
        // spread over the cores, a run cannot train faster than the learner alone.
        let (cap, which) = rate.one_learner_cap();
        let one_learner = bound.min(cap);
        match e2e {
            Some((e2e, _)) => {
                println!("end to end vs that bound: {:.3}x", e2e / bound);
                println!(
                    "bound with one learner: min(that, {which}) = {one_learner:.0} env steps/s; end to end vs it: {:.3}x",
                    e2e / one_learner
                );
            }
            None => println!(
                "bound with one learner: min(that, {which}) = {one_learner:.0} env steps/s"
            ),
        }
    }
    if !has(Part::Cores) {
        return Ok(std::process::ExitCode::SUCCESS);
    }

    let c = config.clone();
    let (title, base_name) = if config.model.arch == ModelArch::Torchscript {
        (
            "torchscript module, inference only".to_string(),
            "vs built-in",
        )
    } else {
        let width = config.model.core_size;
        (
            format!("recurrent core ({width} wide), inference only"),
            "vs none",
        )
    };
    let rows = off_runtime(move || match c.model.arch {
        ModelArch::Torchscript => script_cost(&c, actors_on, secs),
        _ => core_cost(&c, actors_on, secs),
    })
    .await?;
    println!("\n{title:<44} {:>12} {base_name:>10}", "env steps/s");
    let base = rows[0].1;
    for (name, v) in &rows {
        println!("{name:<44} {v:>12.0} {:>9.3}x", v / base);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct BridgeArgs {
    /// Envs of the Python loops and of the first bridge row (later rows: 4x per server).
    #[arg(long, default_value_t = 16)]
    num_envs: u32,
    /// The NetHack run measured end to end.
    #[arg(long, default_value = "configs/nethack-score.toml")]
    nethack_config: PathBuf,
    /// Override a key of the NetHack config (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of end-to-end warm-up (bridges importing NetHack, first weights).
    #[arg(long, default_value_t = 15.0)]
    warmup: f64,
}

/// How the bench's rows name a bridge wire.
fn wire_name(wire: BridgeWire) -> &'static str {
    match wire {
        BridgeWire::Grpc => "gRPC",
        BridgeWire::Unix => "unix",
    }
}

/// Steps/s of `python -m spur_bridge.bench` (a plain Python loop, random actions).
fn python_loop(config: &Config, extra: &[&str], secs: f64) -> anyhow::Result<f64> {
    let python = spur_env_bridge::python(&config.env);
    let out = std::process::Command::new(&python)
        .args(["-m", "spur_bridge.bench", "--env-id", &config.env.gym_id])
        .args(["--num-envs", &config.env.num_envs.to_string()])
        .args(["--seconds", &secs.to_string()])
        .args(extra)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| {
            format!(
                "spur_bridge.bench printed `{}` ({})",
                text.trim(),
                out.status
            )
        })
}

pub async fn bridge(args: BridgeArgs) -> anyhow::Result<std::process::ExitCode> {
    let secs = args.seconds;
    let mut cartpole = Config::load(
        None,
        Vec::new(),
        &[
            "env.kind=gym".into(),
            "env.gym_id=CartPole-v1".into(),
            format!("env.num_envs={}", args.num_envs),
        ],
    )?;
    println!(
        "spur bench bridge: {} envs per process, {} cores, {secs} s per measurement",
        args.num_envs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<58} {:>12} {:>10}",
        "measurement", "env steps/s", "ratio"
    );
    let row = |name: &str, v: f64, base: f64| println!("{name:<58} {v:>12.0} {:>9.3}x", v / base);

    let c = cartpole.clone();
    let py = off_runtime(move || python_loop(&c, &[], secs)).await?;
    row("CartPole-v1, plain Python loop (baseline)", py, py);
    // One call steps all envs of a server: more envs per call spread its overhead,
    // more servers step in parallel. Each on both wires.
    let k = args.num_envs;
    for (servers, per_server) in [(1, k), (1, 4 * k), (2, 4 * k)] {
        cartpole.env.num_envs = servers * per_server;
        cartpole.env.servers = servers;
        for wire in [BridgeWire::Grpc, BridgeWire::Unix] {
            cartpole.env.bridge_wire = wire;
            let c = cartpole.clone();
            let v = off_runtime(move || env_only(&c, secs)).await?;
            let name = format!(
                "  through the bridge ({}): {servers} server(s) x {per_server} envs",
                wire_name(wire)
            );
            row(&name, v, py);
        }
    }

    let nethack = Config::load(Some(&args.nethack_config), Vec::new(), &args.set)?;
    let c = nethack.clone();
    let raw = off_runtime(move || python_loop(&c, &[], secs)).await?;
    let name = format!("{}, NLE raw random actions (baseline)", nethack.env.gym_id);
    row(&name, raw, raw);
    let c = nethack.clone();
    let all = off_runtime(move || python_loop(&c, &["--all-keys"], secs)).await?;
    row("  same, NLE computing every observation key", all, raw);
    for wire in [BridgeWire::Grpc, BridgeWire::Unix] {
        let mut c = nethack.clone();
        c.env.bridge_wire = wire;
        let through = off_runtime(move || env_only(&c, secs)).await?;
        let name = format!(
            "  through the bridge ({}), random actions, 1 server",
            wire_name(wire)
        );
        row(&name, through, raw);
    }
    let (e2e, _) = end_to_end(&nethack, args.warmup, secs).await?;
    let name = format!(
        "  full system (spur local: {} actors, learner, judge)",
        nethack.run.actors
    );
    row(&name, e2e, raw);
    Ok(std::process::ExitCode::SUCCESS)
}
