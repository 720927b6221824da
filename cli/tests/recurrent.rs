//! `spur local` trains `configs/memory-lstm.toml` (an LSTM policy on the memory task)
//! to its target as real processes, and `spur eval` on its checkpoint, carrying the
//! core's state from step to step and resetting it at each episode's start, answers
//! the cue as the trained policy does; a feedforward checkpoint stays at chance. A run
//! whose learner is killed with `kill -9` after the policy has learned the task
//! resumes from its checkpoint with the recurrent core's weights: the actors keep
//! answering the cue once the resumed learner's weights reach them.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{kill_9, read_log, temp_dir, ROOT};

fn spur(args: &[&str], run_dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spur"))
        .current_dir(ROOT)
        .args(args)
        .arg(run_dir)
        .output()
        .expect("spur runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "spur {args:?} failed: {text}");
    text
}

/// Trains with `core` and returns the greedy mean return `spur eval` reports.
fn train_and_eval(core: &str, env_steps: u64) -> f64 {
    let run_dir = std::env::temp_dir().join(format!("spur-memory-{core}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let core_flag = format!("model.core={core}");
    let budget = format!("stop.env_steps={env_steps}");
    spur(
        &[
            "local",
            "--config",
            "configs/memory-lstm.toml",
            "--set",
            &core_flag,
            "--set",
            &budget,
            "--run-dir",
        ],
        &run_dir,
    );
    let report = spur(&["eval", "--greedy", "--episodes", "200"], &run_dir);
    let mean = report
        .lines()
        .find_map(|l| l.strip_prefix("mean return:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mean return in {report}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    mean
}

#[test]
fn an_lstm_checkpoint_remembers_the_cue_in_eval() {
    let lstm = train_and_eval("lstm", 150_000);
    assert!(lstm > 0.95, "greedy mean return {lstm} (chance is 0.5)");
    let none = train_and_eval("none", 30_000);
    assert!(none < 0.65, "greedy mean return {none} (chance is 0.5)");
}

/// Rows of `metrics.jsonl` so far.
fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn field(row: &serde_json::Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {row}"))
}

#[test]
fn an_lstm_run_resumes_after_kill_9_with_its_core_weights() {
    let run_dir = temp_dir("lstm-resume");
    // No early stop: the run goes on after the task is learned, so the rows after the
    // restart show what the resumed weights do.
    let mut local = Command::new(env!("CARGO_BIN_EXE_spur"))
        .current_dir(ROOT)
        .args(["local", "--config", "configs/memory-lstm.toml"])
        .args([
            "--set",
            "stop.env_steps=60000",
            "--set",
            "stop.target_return=0",
        ])
        .args(["--set", "learner.checkpoint_every=2", "--run-dir"])
        .arg(&run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spur local starts");
    let logs = || read_log(&run_dir.join("logs").join("learner.log"));

    // Wait until the policy answers the cue, then kill the learner.
    let deadline = Instant::now() + Duration::from_secs(300);
    let learned =
        loop {
            let rows = metrics(&run_dir);
            if let Some(r) = rows.iter().rev().take(3).find(|r| {
                field(r, "episode_return_mean") >= 0.95 && field(r, "env_steps") >= 16_384.0
            }) {
                break r.clone();
            }
            assert!(
                local.try_wait().unwrap().is_none(),
                "spur local ended early\n{}",
                logs()
            );
            assert!(
                Instant::now() < deadline,
                "the LSTM did not learn the cue\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
    let pid: u32 = std::fs::read_to_string(run_dir.join("pids").join("learner.pid"))
        .expect("the learner's pid file")
        .trim()
        .parse()
        .unwrap();
    kill_9(pid);
    let status = local.wait().unwrap();
    assert!(
        status.success(),
        "spur local failed after the kill ({status})\n{}",
        logs()
    );

    let rows = metrics(&run_dir);
    let first = field(&rows[0], "learner_incarnation");
    let resumed: Vec<_> = rows
        .iter()
        .filter(|r| field(r, "learner_incarnation") != first)
        .collect();
    assert!(
        resumed.len() >= 5,
        "too few rows after the restart: {}",
        resumed.len()
    );
    // It went on from a checkpoint at most a few updates older than the kill, not
    // from scratch.
    let at = field(resumed[0], "env_steps");
    assert!(
        at >= field(&learned, "env_steps") - 4.0 * 1024.0,
        "resumed at {at} env steps; the task was learned at {}",
        field(&learned, "env_steps")
    );
    // A learner that lost the core's weights would broadcast a policy at chance
    // (mean return 0.5) and need thousands of steps to learn the cue again: the first
    // updates after the restart say it (about 100 episodes each, from the resumed
    // weights or the next version). Later rows are PPO's own business: CI runs have
    // resumed cleanly, held 1.0 for a few or for 17 updates, then collapsed to chance
    // and relearned the cue later, so the window stays at the resumed policy's own.
    let returns: Vec<f64> = resumed
        .iter()
        .map(|r| field(r, "episode_return_mean"))
        .collect();
    let worst = returns
        .iter()
        .take(3)
        .copied()
        .fold(f64::INFINITY, f64::min);
    assert!(
        worst >= 0.9,
        "the mean return fell to {worst} right after the restart (mean returns of the \
         rows after it: {returns:?})"
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}
