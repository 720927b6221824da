//! `spur local`: every role as a child process on this machine, a progress bar fed by
//! the learner's status, clean stop on Ctrl-C, and a non-zero exit with the failing
//! child's log when something breaks.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use spur_core::Config;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus};

use crate::cluster::{log_tail, Cluster, Event, Restarts};
use crate::{default_run_dir, LocalArgs};

/// How long children get to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);

pub async fn run(mut config: Config, args: LocalArgs) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.actors {
        config.run.actors = n;
        config.validate()?;
    }
    let run_dir = args.run_dir.unwrap_or_else(|| default_run_dir(&config));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    println!("run directory: {}", run_dir.display());

    // Children find each other through the run directory, on ports they pick.
    let mut cluster = Cluster::start(&config, &run_dir, config.run.actors).await?;
    let progress = Progress::new(config.stop.env_steps);
    let mut last_status: Option<LearnerStatus> = None;
    let mut last_judge: Option<RewardServiceStatus> = None;
    let mut interrupt = std::pin::pin!(crate::shutdown::signal());
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outcome = loop {
        tokio::select! {
            _ = &mut interrupt => break Outcome::Interrupted,
            _ = tick.tick() => {}
        }
        let judge = cluster.reward_status().await;
        if let Some(s) = cluster.status().await {
            progress.update(&s, judge.as_ref().or(last_judge.as_ref()));
            last_status = Some(s);
        }
        if judge.is_some() {
            last_judge = judge;
        }
        match cluster.poll().await? {
            Some(Event::LearnerFinished) => break Outcome::Finished,
            Some(Event::Failed {
                role,
                status,
                restarts,
            }) => {
                break Outcome::Failed(format!(
                    "the {role} kept failing ({status}, after {restarts} restarts):\n{}",
                    log_tail(&run_dir, &role, 30)
                ))
            }
            None => {}
        }
        progress.restarts.set(cluster.restarts);
    };
    progress.finish();
    if let Some(j) = &last_judge {
        write_judge_summary(&run_dir, j);
    }
    match outcome {
        Outcome::Finished => {
            cluster.wait_actors(Duration::from_secs(10)).await;
            cluster.stop(STOP_GRACE).await;
            print_summary(&run_dir, last_status.as_ref(), "done");
            write_curves(&run_dir);
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted => {
            eprintln!("interrupted: stopping actors and learner (the learner checkpoints first)");
            let learner = cluster.stop(STOP_GRACE).await;
            print_summary(&run_dir, last_status.as_ref(), "stopped");
            write_curves(&run_dir);
            match learner {
                Some(s) if s.success() => Ok(ExitCode::from(130)),
                _ => bail!(
                    "the learner did not stop cleanly; see {}",
                    run_dir.join("logs").display()
                ),
            }
        }
        Outcome::Failed(message) => {
            cluster.stop(STOP_GRACE).await;
            bail!("{message}")
        }
    }
}

enum Outcome {
    Finished,
    Interrupted,
    Failed(String),
}

/// An indicatif bar on a terminal; a plain line every 10 s elsewhere (CI, pipes).
struct Progress {
    bar: Option<ProgressBar>,
    last_line: std::cell::Cell<Instant>,
    restarts: std::cell::Cell<Restarts>,
}

impl Progress {
    fn new(budget: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(budget.max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {human_pos}/{human_len} steps  {msg}",
                )
                .expect("the progress template is valid")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            last_line: std::cell::Cell::new(Instant::now()),
            restarts: Default::default(),
        }
    }

    fn update(&self, s: &LearnerStatus, judge: Option<&RewardServiceStatus>) {
        let mut msg = status_line(s);
        let r = self.restarts.get();
        if r.learner + r.reward_service + r.actors > 0 {
            msg.push_str(&format!(
                " | restarts: learner {} reward {} actors {}",
                r.learner, r.reward_service, r.actors
            ));
        }
        if let Some(j) = judge {
            msg.push_str(&format!(
                " | judge: {} labels ({} helpful), {} calls (p50 {:.0} ms), backlog {} | {} v{}",
                j.labels,
                j.positive_labels,
                j.llm_calls,
                j.llm_latency_p50_ms,
                j.backlog,
                j.model_kind,
                j.model_version
            ));
            if j.model_loss > 0.0 {
                msg.push_str(&format!(" loss {:.3}", j.model_loss));
            }
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.env_steps);
                bar.set_message(msg);
            }
            None if self.last_line.get().elapsed() >= Duration::from_secs(10) => {
                self.last_line.set(Instant::now());
                println!("{} steps  {msg}", s.env_steps);
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn status_line(s: &LearnerStatus) -> String {
    let dropped = s.dropped_steps_stale + s.dropped_steps_incarnation + s.dropped_steps_malformed;
    format!(
        "{:>6.0} steps/s | return {:>6.1} | success {:>3.0}% | v{} | actors {} | dropped steps {}",
        s.steps_per_sec,
        s.episode_return_mean,
        s.success_rate * 100.0,
        s.policy_version,
        s.connected_actors,
        dropped
    )
}

/// The run's learning curves, `<run dir>/curves.png`; a run too short to have
/// metrics gets none.
fn write_curves(run_dir: &std::path::Path) {
    let out = run_dir.join("curves.png");
    match crate::plot::write_plot(&[run_dir.to_path_buf()], &out, false) {
        Ok(()) => println!("plot:        {}", out.display()),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "no learning-curve plot"),
    }
}

/// Keeps the reward service's last counters in the run directory, next to the
/// learner's metrics.
fn write_judge_summary(run_dir: &std::path::Path, j: &RewardServiceStatus) {
    let summary = serde_json::json!({
        "judge": j.judge,
        "prompt_version": j.prompt_version,
        "model_version": j.model_version,
        "texts_seen": j.texts_seen,
        "unique_texts": j.unique_texts,
        "store_hits": j.store_hits,
        "labels": j.labels,
        "positive_labels": j.positive_labels,
        "llm_calls": j.llm_calls,
        "llm_failures": j.llm_failures,
        "unparseable_answers": j.unparseable_answers,
        "backlog": j.backlog,
        "shed_texts": j.shed_texts,
        "llm_latency_p50_ms": j.llm_latency_p50_ms,
        "llm_latency_p99_ms": j.llm_latency_p99_ms,
        "calls_per_labelled_text": j.calls_per_labelled_text,
        "ranked_pairs": j.ranked_pairs,
        "model_kind": j.model_kind,
        "model_loss": j.model_loss,
    });
    let path = run_dir.join("reward_service.json");
    if let Err(e) = std::fs::write(&path, format!("{summary:#}\n")) {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the judge summary");
    }
    println!(
        "judge:       {} labels ({} helpful), {} calls, {:.2} calls per labelled text, {} store hits",
        j.labels, j.positive_labels, j.llm_calls, j.calls_per_labelled_text, j.store_hits
    );
}

fn print_summary(run_dir: &std::path::Path, last: Option<&LearnerStatus>, how: &str) {
    // The learner's final numbers are the last line of metrics.jsonl.
    let metrics = run_dir.join("metrics.jsonl");
    let last_row = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|t| t.lines().last().map(str::to_string))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok());
    match (last_row, last) {
        (Some(row), _) => println!(
            "{how}: {} env steps, mean return {:.1} (last 100 episodes), success {:.0}%, policy version {}",
            row["env_steps"],
            row["episode_return_mean"].as_f64().unwrap_or(0.0),
            row["success_rate"].as_f64().unwrap_or(0.0) * 100.0,
            row["policy_version"]
        ),
        (None, Some(s)) => println!("stopped: {}", status_line(s)),
        (None, None) => println!("stopped before the first update"),
    }
    println!("metrics:     {}", metrics.display());
    println!("checkpoints: {}", run_dir.join("checkpoints").display());
}
