//! `spur local` trains `configs/memory-lstm.toml` (an LSTM policy on the memory task)
//! to its target as real processes, and `spur eval` on its checkpoint, carrying the
//! core's state from step to step and resetting it at each episode's start, answers
//! the cue as the trained policy does; a feedforward checkpoint stays at chance.

use std::path::Path;
use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

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
