//! `spur bench soak`: `spur local` (this binary, as a child process) with many actors
//! for minutes, under a fault every `--fault-every-s` seconds, in rotation: `kill -9`
//! of a random actor, of the reward service, and of the learner once its newest
//! checkpoint is older than its weights (so its replacement resumes from behind).
//! Everything is seen from outside, as an operator would: pid files, address files,
//! `/proc/<pid>/status` and the roles' `GetStatus`. At the end the run is stopped with
//! SIGINT and a report goes to stdout (Markdown tables) and `<run dir>/soak.json`:
//! resident memory of each role at start and end, kills and restarts per role, the
//! learner's dropped steps by reason, the reward service's labels around each of its
//! kills, and per fault kind the time from the kill to the next policy version.
//! The exit status is non-zero when a check fails: labels lost, a fault the run did
//! not recover from, or `spur local` not stopping cleanly.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::Rng;
use serde_json::json;
use spur_core::transport::Transport;
use spur_core::Config;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus, RewardStatusRequest, StatusRequest};
use tokio::process::{Child, Command};

use crate::cluster::log_tail;
use crate::status::{addr_in, connect_with};

#[derive(Args)]
pub struct SoakArgs {
    /// Experiment config to run under faults.
    #[arg(long, short, default_value = "configs/keyroom-oni.toml")]
    config: PathBuf,
    /// Override a config key, e.g. `--set env.num_envs=4` (repeatable; applied after
    /// the soak's own settings, see `SOAK_SETTINGS`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Actor processes.
    #[arg(long, default_value_t = 16)]
    actors: u32,
    /// How long the run goes on under faults, after every actor is connected.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds from one fault to the next.
    #[arg(long, default_value_t = 60.0)]
    fault_every_s: f64,
    /// Run directory (default: <run.dir>/<run.name>-soak-<unix time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

/// What the soak sets before the user's `--set`: no step budget or return target
/// (the soak ends the run), a restart budget no fault schedule spends, checkpoints
/// often enough that the learner has one to resume from, and few envs per actor so
/// that 16 actors fit on 2 cores.
const SOAK_SETTINGS: &[&str] = &[
    "stop.env_steps=0",
    "stop.target_return=0",
    "run.max_restarts=100000",
    "run.torch_threads=1",
    "env.num_envs=8",
    "learner.checkpoint_every=20",
];

const POLL: Duration = Duration::from_millis(250);
/// How long all actors get to connect and the first weights to go out.
const WARM_UP: Duration = Duration::from_secs(300);
/// How long a fault may take to recover from before it counts as not recovered.
const RECOVERY: Duration = Duration::from_secs(180);
/// How long `spur local` gets to stop after SIGINT (its children get 20 s each).
const STOP: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Actor,
    RewardService,
    Learner,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Actor => "actor",
            Fault::RewardService => "reward-service",
            Fault::Learner => "learner",
        }
    }
}

/// One injected fault and what followed.
struct Record {
    kind: Fault,
    role: String,
    /// Seconds into the soak.
    at_s: f64,
    /// From the kill to the first policy version past the one to beat (the learner's:
    /// past the checkpoint its replacement resumed from); None: not within RECOVERY.
    recovery_s: Option<f64>,
    /// Reward service kills: labels before and after (from its replacement).
    labels: Option<(u64, Option<u64>)>,
}

/// The `spur local` run under test, seen through its run directory.
struct Soak {
    dir: PathBuf,
    local: Child,
    actors: u32,
    /// Each role's pid at the last look, and how often it changed (per role group).
    pids: BTreeMap<String, u32>,
    restarts: BTreeMap<&'static str, u32>,
    interrupted: Arc<AtomicBool>,
    /// How the roles are reached (`[transport]`: TLS, token).
    transport: Transport,
}

pub async fn soak(args: SoakArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.actors >= 1 && args.minutes > 0.0 && args.fault_every_s > 0.0,
        "--actors, --minutes and --fault-every-s must be positive"
    );
    let named = Config::load(Some(&args.config), std::env::vars(), &args.set)?;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let mut c = named.clone();
        c.run.name = format!("{}-soak", c.run.name);
        crate::default_run_dir(&c)
    });
    std::fs::create_dir_all(run_dir.join("logs"))
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    // A label store of its own: labels counted are this run's.
    let store = format!(
        "reward_service.store={}",
        run_dir.join("labels.redb").display()
    );
    let sets: Vec<String> = SOAK_SETTINGS
        .iter()
        .map(|s| s.to_string())
        .chain([store])
        .chain(args.set.iter().cloned())
        .collect();
    let config = Config::load(Some(&args.config), std::env::vars(), &sets)?;
    let kinds: &[Fault] = if config.intrinsic.enabled {
        &[Fault::Actor, Fault::RewardService, Fault::Learner]
    } else {
        &[Fault::Actor, Fault::Learner]
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let header = format!(
        "spur bench soak: {} actors x {} envs, {}, {} min, a fault every {} s, {cores} cores",
        args.actors,
        config.env.num_envs,
        args.config.display(),
        args.minutes,
        args.fault_every_s
    );
    println!("{header}\nrun directory: {}", run_dir.display());

    let transport = Transport::from_config(&config.transport)?;
    let mut soak = Soak::start(&run_dir, &args, &sets, transport)?;
    let result = soak.run(&args, kinds).await;
    if result.is_err() {
        soak.interrupt_local();
        let _ = tokio::time::timeout(STOP, soak.local.wait()).await;
    }
    let report = result?;
    let (text, json, ok) = report.render(&header, args.actors);
    print!("{text}");
    let path = run_dir.join("soak.json");
    std::fs::write(&path, format!("{json:#}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Soak {
    /// Starts `spur local` in a process group of its own (a Ctrl-C here reaches only
    /// the soak, which then ends the run and still reports), logging to
    /// `<run dir>/logs/local.log`.
    fn start(
        dir: &Path,
        args: &SoakArgs,
        sets: &[String],
        transport: Transport,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the spur executable")?;
        let log = std::fs::File::create(dir.join("logs").join("local.log"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("local")
            .arg("--config")
            .arg(&args.config)
            .args(["--actors", &args.actors.to_string()])
            .arg("--run-dir")
            .arg(dir);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let local = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start spur local")?;
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        tokio::spawn(async move {
            crate::shutdown::signal().await;
            eprintln!("interrupted: ending the soak early");
            flag.store(true, Ordering::SeqCst);
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            local,
            actors: args.actors,
            pids: BTreeMap::new(),
            restarts: BTreeMap::new(),
            interrupted,
            transport,
        })
    }

    fn roles(&self) -> impl Iterator<Item = String> {
        ["learner".to_string(), "reward-service".to_string()]
            .into_iter()
            .chain((0..self.actors).map(|i| format!("actor-{i}")))
    }

    /// Notes replaced pids (restarts) and fails when `spur local` has exited.
    fn look(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.local.try_wait()? {
            bail!(
                "spur local exited during the soak ({status}):\n{}",
                log_tail(&self.dir, "local", 30)
            );
        }
        for role in self.roles().collect::<Vec<_>>() {
            let Some(pid) = read_pid(&self.dir, &role) else {
                continue;
            };
            if self
                .pids
                .insert(role.clone(), pid)
                .is_some_and(|old| old != pid)
            {
                *self.restarts.entry(group(&role)).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Looks every POLL until `probe` answers; None after `limit` or on Ctrl-C.
    async fn until<T>(
        &mut self,
        limit: Duration,
        probe: impl AsyncFn(&Self) -> Option<T>,
    ) -> anyhow::Result<Option<T>> {
        let deadline = Instant::now() + limit;
        loop {
            self.look()?;
            if let Some(t) = probe(self).await {
                return Ok(Some(t));
            }
            if self.interrupted.load(Ordering::SeqCst) || Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn run(&mut self, args: &SoakArgs, kinds: &[Fault]) -> anyhow::Result<Report> {
        let n = self.actors;
        let ready = async |s: &Self| {
            s.learner()
                .await
                .filter(|l| l.policy_version >= 1 && l.connected_actors >= n)
        };
        let Some(first) = self.until(WARM_UP, ready).await? else {
            if self.interrupted.load(Ordering::SeqCst) {
                bail!("interrupted before the soak began");
            }
            bail!(
                "the learner did not reach policy version 1 with {n} actors connected within {} s:\n{}",
                WARM_UP.as_secs(),
                log_tail(&self.dir, "local", 30)
            );
        };
        let memory_start = self.memory();
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(args.minutes * 60.0);
        let every = Duration::from_secs_f64(args.fault_every_s);
        let mut faults = Vec::new();
        let mut next = start + every;
        for kind in kinds.iter().cycle() {
            // Wait for the next fault, watching the children meanwhile.
            let idle = next.min(end).saturating_duration_since(Instant::now());
            self.until(idle, async |_: &Self| None::<()>).await?;
            if Instant::now() >= end || self.interrupted.load(Ordering::SeqCst) {
                break;
            }
            if let Some(r) = self.inject(*kind, start).await? {
                let recovered = r.recovery_s.map_or("not recovered".into(), |s| {
                    format!("next policy version after {s:.1} s")
                });
                println!("{:>6.0} s  kill -9 {:<16} {recovered}", r.at_s, r.role);
                faults.push(r);
            }
            next = (next + every).max(Instant::now());
        }
        let memory_end = self.memory();
        let last = self.until(RECOVERY, Self::learner).await?;
        let judge_last = match kinds.contains(&Fault::RewardService) {
            true => self.until(RECOVERY, Self::judge).await?,
            false => None,
        };
        let elapsed_s = start.elapsed().as_secs_f64();
        self.look()?;
        self.interrupt_local();
        let stopped = tokio::time::timeout(STOP, self.local.wait()).await;
        let exit_code = match stopped {
            Ok(Ok(status)) => status.code(),
            _ => None,
        };
        Ok(Report {
            elapsed_s,
            first,
            last,
            judge_last,
            memory_start,
            memory_end,
            faults,
            restarts: self.restarts.clone(),
            exit_code,
        })
    }

    /// Kills one role of `kind` and waits for the policy to move on; None when the
    /// fault could not be set up in time (no learner answer, no checkpoint behind).
    async fn inject(&mut self, kind: Fault, start: Instant) -> anyhow::Result<Option<Record>> {
        let role = match kind {
            Fault::Actor => format!("actor-{}", rand::rng().random_range(0..self.actors)),
            other => other.name().to_string(),
        };
        // The learner only once a resume would go back to an older version.
        let before = self
            .until(RECOVERY, async |s: &Self| {
                let l = s.learner().await?;
                let behind = kind != Fault::Learner
                    || newest_checkpoint(&s.dir).is_some_and(|v| v < l.policy_version);
                behind.then_some(l)
            })
            .await?;
        let Some(before) = before else {
            return Ok(None);
        };
        let labels_before = match kind {
            Fault::RewardService => self.until(RECOVERY, Self::judge).await?.map(|j| j.labels),
            _ => None,
        };
        let Some(pid) = read_pid(&self.dir, &role) else {
            bail!("{role} has no pid file in {}", self.dir.display());
        };
        kill_9(pid);
        let killed = Instant::now();
        // The learner's replacement resumes from the newest checkpoint, now final.
        let (beat, incarnation) = match kind {
            Fault::Learner => (
                newest_checkpoint(&self.dir).unwrap_or(0),
                Some(before.learner_incarnation),
            ),
            _ => (before.policy_version, None),
        };
        let advanced = self
            .until(RECOVERY, async |s: &Self| {
                s.learner().await.filter(|l| {
                    l.policy_version > beat && incarnation != Some(l.learner_incarnation)
                })
            })
            .await?;
        let recovery_s = advanced.map(|_| killed.elapsed().as_secs_f64());
        let labels = match labels_before {
            Some(b) => {
                let after = self
                    .until(RECOVERY, async |s: &Self| {
                        let replaced = read_pid(&s.dir, "reward-service").is_some_and(|p| p != pid);
                        if !replaced {
                            return None;
                        }
                        s.judge().await.map(|j| j.labels)
                    })
                    .await?;
                Some((b, after))
            }
            None => None,
        };
        Ok(Some(Record {
            kind,
            role,
            at_s: killed.duration_since(start).as_secs_f64(),
            recovery_s,
            labels,
        }))
    }

    /// Resident memory of each role now, in MiB: the supervisor, the learner, the
    /// reward service, and the actors' sum and maximum.
    fn memory(&self) -> Vec<(String, f64)> {
        let of = |role: &str| read_pid(&self.dir, role).and_then(rss_mib).unwrap_or(0.0);
        let actors: Vec<f64> = (0..self.actors)
            .map(|i| of(&format!("actor-{i}")))
            .collect();
        let local = self.local.id().and_then(rss_mib).unwrap_or(0.0);
        vec![
            ("spur local (supervisor)".into(), local),
            ("learner".into(), of("learner")),
            ("reward service".into(), of("reward-service")),
            (
                format!("actors (sum of {})", self.actors),
                actors.iter().sum(),
            ),
            (
                "actors (max)".into(),
                actors.iter().copied().fold(0.0, f64::max),
            ),
        ]
    }

    async fn learner(&self) -> Option<LearnerStatus> {
        let addr = addr_in(&self.dir, spur_learner::ADDR_FILE)?;
        let channel = connect_with(&self.transport, &addr).await.ok()?;
        let mut client = LearnerClient::new(channel);
        Some(client.get_status(StatusRequest {}).await.ok()?.into_inner())
    }

    async fn judge(&self) -> Option<RewardServiceStatus> {
        let addr = addr_in(&self.dir, spur_reward_service::ADDR_FILE)?;
        let channel = connect_with(&self.transport, &addr).await.ok()?;
        let mut client = RewardServiceClient::new(channel);
        Some(
            client
                .get_status(RewardStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }

    /// SIGINT, as a terminal's Ctrl-C: `spur local` stops its children in order.
    fn interrupt_local(&self) {
        if let Some(pid) = self.local.id() {
            // SAFETY: kill(2) with a pid this process started and a valid signal number.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
    }
}

/// Restarts are counted per learner, reward service, and all actors together.
fn group(role: &str) -> &'static str {
    match role {
        "learner" => "learner",
        "reward-service" => "reward-service",
        _ => "actors",
    }
}

fn read_pid(dir: &Path, role: &str) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("pids").join(format!("{role}.pid"))).ok()?;
    text.trim().parse().ok()
}

fn kill_9(pid: u32) {
    // SAFETY: kill(2) with a pid from `spur local`'s pid files and a valid signal.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// The version of the newest readable checkpoint in the run directory.
fn newest_checkpoint(dir: &Path) -> Option<u64> {
    let loaded = spur_core::checkpoint::load_latest(&dir.join("checkpoints")).ok()??;
    Some(loaded.version)
}

struct Report {
    elapsed_s: f64,
    first: LearnerStatus,
    last: Option<LearnerStatus>,
    judge_last: Option<RewardServiceStatus>,
    memory_start: Vec<(String, f64)>,
    memory_end: Vec<(String, f64)>,
    faults: Vec<Record>,
    restarts: BTreeMap<&'static str, u32>,
    exit_code: Option<i32>,
}

impl Report {
    /// The Markdown tables, the JSON report, and whether every check passed.
    fn render(&self, header: &str, actors: u32) -> (String, serde_json::Value, bool) {
        let mut t = String::new();
        let _ = writeln!(t, "\n{header}, {:.0} s under faults\n", self.elapsed_s);
        self.memory_table(&mut t);
        self.kills_table(&mut t);
        let recovery = self.recovery_table(&mut t);
        let labels_kept = self.labels_table(&mut t);
        let l = self.last.clone().unwrap_or_default();
        self.learner_table(&mut t, &l);
        let clean = self.exit_code == Some(130);
        let checks = [
            (
                self.faults.iter().all(|f| f.recovery_s.is_some()),
                "every fault recovered",
            ),
            (labels_kept, "no reward service kill lost labels"),
            (self.last.is_some(), "the learner answered at the end"),
            (clean, "spur local stopped cleanly on SIGINT (exit 130)"),
        ];
        for (ok, what) in checks {
            let _ = writeln!(t, "{} {what}", if ok { "ok:    " } else { "FAILED:" });
        }
        if let Some(code) = self.exit_code.filter(|_| !clean) {
            let _ = writeln!(t, "spur local exited with {code}");
        }
        let passed = checks.iter().all(|c| c.0);
        (t, self.json(actors, recovery, &l, passed), passed)
    }

    /// Resident memory of every process at the start and at the end.
    fn memory_table(&self, t: &mut String) {
        let _ = writeln!(t, "| process | RSS start (MiB) | RSS end (MiB) |");
        let _ = writeln!(t, "|---|---:|---:|");
        for ((name, a), (_, b)) in self.memory_start.iter().zip(&self.memory_end) {
            let _ = writeln!(t, "| {name} | {a:.0} | {b:.0} |");
        }
    }

    /// Kills and restarts per role.
    fn kills_table(&self, t: &mut String) {
        let kills = |g: &str| self.faults.iter().filter(|f| group(&f.role) == g).count();
        let _ = writeln!(t, "\n| role | kill -9 | restarts |");
        let _ = writeln!(t, "|---|---:|---:|");
        for g in ["learner", "reward-service", "actors"] {
            let restarts = self.restarts.get(g).copied().unwrap_or(0);
            let _ = writeln!(t, "| {g} | {} | {restarts} |", kills(g));
        }
    }

    /// Per kind of fault: how many, how many recovered, and the time from the kill to
    /// the next policy version; returns the same figures for the JSON report.
    fn recovery_table(&self, t: &mut String) -> serde_json::Map<String, serde_json::Value> {
        let _ = writeln!(
            t,
            "\n| fault | count | recovered | kill to next policy version, p50 (s) | max (s) |"
        );
        let _ = writeln!(t, "|---|---:|---:|---:|---:|");
        let mut by_kind: BTreeMap<Fault, Vec<&Record>> = BTreeMap::new();
        for f in &self.faults {
            by_kind.entry(f.kind).or_default().push(f);
        }
        let mut kinds_json = serde_json::Map::new();
        for (kind, records) in &by_kind {
            let mut times: Vec<f64> = records.iter().filter_map(|r| r.recovery_s).collect();
            times.sort_by(f64::total_cmp);
            let p50 = times.get(times.len().saturating_sub(1) / 2).copied();
            let max = times.last().copied();
            let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                t,
                "| kill -9 {} | {} | {} | {} | {} |",
                kind.name(),
                records.len(),
                times.len(),
                fmt(p50),
                fmt(max)
            );
            kinds_json.insert(
                kind.name().into(),
                json!({"count": records.len(), "recovered": times.len(), "p50_s": p50, "max_s": max}),
            );
        }
        kinds_json
    }

    /// Labels before and after each reward service kill; returns whether every kill
    /// kept them.
    fn labels_table(&self, t: &mut String) -> bool {
        let label_kills: Vec<(u64, Option<u64>)> =
            self.faults.iter().filter_map(|f| f.labels).collect();
        if !label_kills.is_empty() {
            let _ = writeln!(
                t,
                "\n| reward service kill | labels before | labels after |"
            );
            let _ = writeln!(t, "|---|---:|---:|");
            for (i, (b, a)) in label_kills.iter().enumerate() {
                let a = a.map_or("no answer".into(), |a| a.to_string());
                let _ = writeln!(t, "| {} | {b} | {a} |", i + 1);
            }
        }
        label_kills.iter().all(|&(b, a)| a.is_some_and(|a| a >= b))
    }

    /// The learner's counts at the end: received, trained and dropped steps.
    fn learner_table(&self, t: &mut String, l: &LearnerStatus) {
        let _ = writeln!(t, "\n| learner at the end | env steps | chunks |");
        let _ = writeln!(t, "|---|---:|---:|");
        let rows = [
            ("received", l.env_steps_received, None),
            ("trained", l.env_steps, None),
            (
                "dropped: stale",
                l.dropped_steps_stale,
                Some(l.dropped_stale_chunks),
            ),
            (
                "dropped: previous learner incarnation",
                l.dropped_steps_incarnation,
                Some(l.dropped_incarnation_chunks),
            ),
            (
                "dropped: malformed",
                l.dropped_steps_malformed,
                Some(l.dropped_malformed_chunks),
            ),
        ];
        for (name, steps, chunks) in rows {
            let chunks = chunks.map_or("-".into(), |c| c.to_string());
            let _ = writeln!(t, "| {name} | {steps} | {chunks} |");
        }
        let _ = writeln!(
            t,
            "\npolicy version {} -> {}, learner incarnation {}, {} actors connected at the end",
            self.first.policy_version, l.policy_version, l.learner_incarnation, l.connected_actors
        );
    }

    /// The report as JSON, for scripts.
    fn json(
        &self,
        actors: u32,
        recovery: serde_json::Map<String, serde_json::Value>,
        l: &LearnerStatus,
        passed: bool,
    ) -> serde_json::Value {
        let memory = |m: &[(String, f64)]| {
            m.iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "actors": actors,
            "seconds_under_faults": self.elapsed_s,
            "rss_mib_start": memory(&self.memory_start),
            "rss_mib_end": memory(&self.memory_end),
            "restarts": self.restarts,
            "faults": self.faults.iter().map(|f| json!({
                "kind": f.kind.name(),
                "role": f.role,
                "at_s": f.at_s,
                "recovery_s": f.recovery_s,
                "labels_before": f.labels.map(|l| l.0),
                "labels_after": f.labels.and_then(|l| l.1),
            })).collect::<Vec<_>>(),
            "recovery_by_kind": recovery,
            "learner_end": {
                "policy_version": l.policy_version,
                "learner_incarnation": l.learner_incarnation,
                "env_steps_received": l.env_steps_received,
                "env_steps_trained": l.env_steps,
                "dropped_steps_stale": l.dropped_steps_stale,
                "dropped_steps_incarnation": l.dropped_steps_incarnation,
                "dropped_steps_malformed": l.dropped_steps_malformed,
                "dropped_stale_chunks": l.dropped_stale_chunks,
                "dropped_incarnation_chunks": l.dropped_incarnation_chunks,
                "dropped_malformed_chunks": l.dropped_malformed_chunks,
            },
            "reward_service_end": self.judge_last.as_ref().map(|j| json!({
                "labels": j.labels,
                "llm_calls": j.llm_calls,
                "unique_texts": j.unique_texts,
            })),
            "local_exit_code": self.exit_code,
            "checks_passed": passed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Fault, role: &str, recovery_s: Option<f64>) -> Record {
        Record {
            kind,
            role: role.into(),
            at_s: 10.0,
            recovery_s,
            labels: None,
        }
    }

    fn report(faults: Vec<Record>) -> Report {
        Report {
            elapsed_s: 60.0,
            first: LearnerStatus::default(),
            last: Some(LearnerStatus {
                policy_version: 40,
                env_steps: 1000,
                ..Default::default()
            }),
            judge_last: None,
            memory_start: vec![("learner".into(), 100.0)],
            memory_end: vec![("learner".into(), 120.0)],
            faults,
            restarts: BTreeMap::from([("learner", 1), ("actors", 2)]),
            exit_code: Some(130),
        }
    }

    #[test]
    fn a_soak_where_everything_recovered_passes() {
        let faults = vec![
            record(Fault::Actor, "actor-3", Some(2.0)),
            record(Fault::Actor, "actor-1", Some(4.0)),
            record(Fault::Learner, "learner", Some(9.0)),
        ];
        let (table, json, passed) = report(faults).render("soak", 4);
        assert!(passed, "{table}");
        assert!(table.contains("| actors | 2 | 2 |"), "{table}");
        assert!(
            table.contains("| kill -9 actor | 2 | 2 | 2.0 | 4.0 |"),
            "{table}"
        );
        assert_eq!(json["recovery_by_kind"]["learner"]["max_s"], 9.0);
        assert_eq!(json["learner_end"]["policy_version"], 40);
        assert_eq!(json["checks_passed"], true);
    }

    #[test]
    fn lost_labels_or_an_unrecovered_fault_fail_the_soak() {
        let mut judge = record(Fault::RewardService, "reward-service", Some(3.0));
        judge.labels = Some((50, Some(48)));
        let (table, json, passed) = report(vec![judge]).render("soak", 4);
        assert!(!passed);
        assert!(
            table.contains("FAILED: no reward service kill lost labels"),
            "{table}"
        );
        assert!(table.contains("| 1 | 50 | 48 |"), "{table}");
        assert_eq!(json["checks_passed"], false);

        let (table, _, passed) =
            report(vec![record(Fault::Actor, "actor-0", None)]).render("soak", 4);
        assert!(!passed);
        assert!(table.contains("FAILED: every fault recovered"), "{table}");
    }
}
