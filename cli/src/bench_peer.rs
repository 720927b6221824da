//! `spur bench peer`: spur against Sample Factory 2.1.1 with matched settings, one
//! system after the other in one run. Sample Factory is Python, so the runner is
//! `scripts/peer_bench.py`; this subcommand starts it with the project venv's Python
//! (it reads its tables with numpy) and points its `--spur` at this very binary, so
//! the build that is asked is the build that is measured.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

/// The runner, relative to the repository root.
const SCRIPT: &str = "scripts/peer_bench.py";

#[derive(Args)]
#[command(after_help = "\
Run it from the repository root: the script, the configs and the default paths are \
relative to it. The first run needs Sample Factory's venv (`make bench-peer` makes \
it, or pass --install); the project venv's Python (`.venv`, from `make setup`) runs \
the script, `python3` from PATH where there is none. The table, the machine's \
load at the start and the end, and the run directories are printed at the end; the \
exit status is the script's.")]
pub struct PeerArgs {
    /// CartPole seeds (gym-cartpole runs the same ones).
    #[arg(long, default_value_t = 3)]
    seeds: u32,
    /// First seed; seeds run from here upwards.
    #[arg(long, default_value_t = 1)]
    first_seed: u32,
    /// CartPole step budget per run (runs stop earlier at a mean return of 475).
    #[arg(long, default_value_t = 400_000)]
    cartpole_steps: u64,
    /// NetHack env steps per run.
    #[arg(long, default_value_t = 100_000)]
    nethack_steps: u64,
    /// NetHack seeds (the first N of the CartPole seeds).
    #[arg(long, default_value_t = 1)]
    nethack_seeds: u32,
    /// Comma-separated tasks: cartpole (spur's Rust CartPole), gym-cartpole
    /// (Gymnasium's CartPole-v1 through spur's env bridge), nethack.
    #[arg(long, default_value = "cartpole,gym-cartpole,nethack")]
    tasks: String,
    /// Where the runs go (one timestamped folder per invocation).
    #[arg(long, default_value = "runs/peer")]
    out: PathBuf,
    /// Sample Factory's venv (sample-factory 2.1.1, gymnasium 0.29.1, nle 1.0.0).
    #[arg(long, default_value = "runs/peer-venv")]
    venv: PathBuf,
    /// Make the venv first (about 12 minutes and 5 GB).
    #[arg(long)]
    install: bool,
    /// On NetHack too, spur's learner recomputes values and log-probabilities over
    /// each batch before its update instead of taking the actors'
    /// (`learner.actor_estimates=false`, as on CartPole).
    #[arg(long)]
    learner_estimates: bool,
}

/// The Python that runs the script: the active venv's, else the project venv's under
/// `root` (`make setup` makes it, with numpy), else `python3` from PATH.
fn python(root: &Path, active_venv: Option<&std::ffi::OsStr>) -> PathBuf {
    let venv_python = |venv: &Path| venv.join("bin").join("python");
    if let Some(p) = active_venv.map(|v| venv_python(Path::new(v))) {
        if p.is_file() {
            return p;
        }
    }
    let project = venv_python(&root.join(".venv"));
    if project.is_file() {
        return project;
    }
    PathBuf::from("python3")
}

/// `SCRIPT` under `root`, or an error naming the path that is missing.
fn find_script(root: &Path) -> anyhow::Result<PathBuf> {
    let script = root.join(SCRIPT);
    anyhow::ensure!(
        script.is_file(),
        "{} not found: run `spur bench peer` from the repository root",
        script.display()
    );
    Ok(script)
}

pub async fn peer(args: PeerArgs) -> anyhow::Result<ExitCode> {
    let here = std::env::current_dir().context("cannot read the current directory")?;
    let script = find_script(&here)?;
    let spur = std::env::current_exe().context("cannot find this spur binary's path")?;
    let python = python(&here, std::env::var_os("VIRTUAL_ENV").as_deref());
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&script)
        .arg("--spur")
        .arg(&spur)
        .args(["--seeds", &args.seeds.to_string()])
        .args(["--first-seed", &args.first_seed.to_string()])
        .args(["--cartpole-steps", &args.cartpole_steps.to_string()])
        .args(["--nethack-steps", &args.nethack_steps.to_string()])
        .args(["--nethack-seeds", &args.nethack_seeds.to_string()])
        .args(["--tasks", &args.tasks])
        .arg("--out")
        .arg(&args.out)
        .arg("--venv")
        .arg(&args.venv);
    if args.install {
        cmd.arg("--install");
    }
    if args.learner_estimates {
        cmd.arg("--learner-estimates");
    }
    let status = cmd
        .status()
        .await
        .with_context(|| format!("cannot run {} {}", python.display(), script.display()))?;
    // A script killed by a signal has no code: report failure.
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_script_is_named() {
        let dir = std::env::temp_dir().join(format!("spur-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = find_script(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&dir.join(SCRIPT).display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_python_is_the_venvs_when_there_is_one() {
        let root = std::env::temp_dir().join(format!("spur-peer-py-{}", std::process::id()));
        let bin = root.join(".venv").join("bin");
        // No venv anywhere: python3 from PATH.
        assert_eq!(python(&root, None), PathBuf::from("python3"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("python"), "").unwrap();
        assert_eq!(python(&root, None), bin.join("python"));
        // An active venv without a python does not count; one with it wins.
        let other = root.join("other");
        assert_eq!(python(&root, Some(other.as_os_str())), bin.join("python"));
        std::fs::create_dir_all(other.join("bin")).unwrap();
        std::fs::write(other.join("bin").join("python"), "").unwrap();
        assert_eq!(
            python(&root, Some(other.as_os_str())),
            other.join("bin").join("python")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_repository_script_is_found() {
        // Unit tests run in the crate's folder; the script is one level up.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert!(find_script(&root).is_ok());
    }
}
