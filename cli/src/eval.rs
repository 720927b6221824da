//! `spur eval CHECKPOINT`: plays N episodes with a checkpoint's policy (sampled, or
//! greedy with `--greedy`), reports mean return, success rate and episode length, and for grid
//! environments writes a text rendering of one episode. A recurrent policy carries its
//! core state from step to step and starts every episode from zeros.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use spur_core::env::{Env, EnvBatch, StepOutcome};
use spur_core::model::ActorCritic;
use spur_core::Config;
use spur_env_bridge::make_batch;

use crate::ConfigArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint file, or a run directory (its newest checkpoint).
    checkpoint: PathBuf,
    /// Config of the run (default: config.toml of the checkpoint's run directory).
    #[command(flatten)]
    config: ConfigArgs,
    /// Episodes to play.
    #[arg(long, default_value_t = 100)]
    episodes: u32,
    /// Take the most likely action instead of sampling from the policy (a greedy
    /// policy can loop forever in a grid where the sampled one does not).
    #[arg(long)]
    greedy: bool,
    /// First episode seed (episode i uses seed + i).
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Where to write the rendering of the first episode (grid environments; default
    /// eval-episode.txt next to the checkpoint's run directory).
    #[arg(long)]
    render: Option<PathBuf>,
}

/// What `spur eval` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub episodes: u32,
    pub mean_return: f64,
    pub success_rate: f64,
    pub mean_length: f64,
    /// The first episode, frame by frame, when the environment renders.
    pub rendering: Option<String>,
    /// `replay`: UI-S1's semi-online score.
    pub semi_online: Option<SemiOnline>,
}

/// UI-S1's semi-online evaluation on expert trajectories, without patches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemiOnline {
    /// Steps matched before the first mismatch over the trajectory's length, averaged.
    pub progress: f64,
    /// Trajectories followed to the end without a mismatch.
    pub success_rate: f64,
    /// The mean of the two.
    pub score: f64,
}

/// The checkpoint file and its run directory (if it sits in one).
fn locate(path: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if path.is_dir() {
        let ckpts = if path.join("checkpoints").is_dir() {
            path.join("checkpoints")
        } else {
            path.to_path_buf()
        };
        let Some(newest) = spur_core::checkpoint::load_latest(&ckpts)? else {
            bail!("no checkpoint in {}", ckpts.display());
        };
        let run = ckpts.parent().map(Path::to_path_buf);
        return Ok((newest.path, run));
    }
    let run = path
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "checkpoints"))
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    Ok((path.to_path_buf(), run))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let (ckpt, run_dir) = locate(&args.checkpoint)?;
    let mut cargs = args.config.clone();
    if cargs.config.is_none() {
        cargs.config = run_dir
            .as_ref()
            .map(|d| d.join("config.toml"))
            .filter(|p| p.exists());
        if cargs.config.is_none() {
            bail!(
                "{} is not in a run directory with a config.toml: pass --config",
                ckpt.display()
            );
        }
    }
    let config = cargs.load()?;
    let loaded = spur_core::checkpoint::load_file(&ckpt)?;
    let report = evaluate(
        &config,
        &loaded.bytes,
        args.episodes,
        args.greedy,
        args.seed,
    )
    .with_context(|| format!("cannot evaluate {}", ckpt.display()))?;
    println!(
        "checkpoint:   {} (policy version {})",
        ckpt.display(),
        loaded.version
    );
    println!(
        "policy:       {}, {} episodes",
        if args.greedy { "greedy" } else { "sampled" },
        report.episodes
    );
    println!("mean return:  {:.3}", report.mean_return);
    println!("success rate: {:.1}%", report.success_rate * 100.0);
    println!("mean length:  {:.1} steps", report.mean_length);
    if let Some(s) = report.semi_online {
        println!(
            "semi-online:  score {:.3} (progress {:.3}, success {:.3})",
            s.score, s.progress, s.success_rate
        );
    }
    if let Some(text) = &report.rendering {
        let out = args.render.clone().unwrap_or_else(|| {
            run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("."))
                .join("eval-episode.txt")
        });
        std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
        println!("rendering:    {}", out.display());
    }
    Ok(())
}

/// Plays `episodes` episodes of the config's environment with the policy `weights`.
pub fn evaluate(
    config: &Config,
    weights: &[u8],
    episodes: u32,
    greedy: bool,
    seed: u64,
) -> anyhow::Result<EvalReport> {
    tch::manual_seed(seed as i64);
    if config.env.kind == spur_core::config::EnvKind::Replay {
        return semi_online(config, weights, episodes, greedy);
    }
    let mut env = make_batch(&config.env, 1)?;
    let spec = env.spec().clone();
    let model = load_policy(&spec, config, weights)?;
    let mut obs = vec![0.0f32; spec.obs_dim];
    let mut text = vec![String::new()];
    let mut outcome = vec![StepOutcome::default()];
    let (mut total_return, mut successes, mut total_len) = (0.0f64, 0u32, 0u64);
    let mut rendering = None;
    for e in 0..episodes {
        env.reset(&[0], &[seed + e as u64], &mut obs)?;
        let mut frames = String::new();
        let mut record = |step: u32, env: &dyn EnvBatch, event: &str| {
            if e == 0 {
                if let Some(pic) = env.render_text(0) {
                    let _ = writeln!(frames, "step {step}{}", event_suffix(event));
                    frames.push_str(&pic);
                    frames.push('\n');
                }
            }
        };
        record(0, env.as_ref(), "");
        let (mut ret, mut len) = (0.0f64, 0u32);
        let mut state = vec![0.0f32; model.state_size()];
        loop {
            let (action, _) = model.act(&obs, &mut state, greedy);
            env.step(&action, &mut obs, &mut text, &mut outcome)?;
            let out = outcome[0];
            ret += out.reward as f64;
            len += 1;
            record(len, env.as_ref(), &text[0]);
            if out.terminated || out.truncated {
                successes += out.success as u32;
                if e == 0 && !frames.is_empty() {
                    let _ = writeln!(
                        frames,
                        "episode over after {len} steps: return {ret:.2}, {}",
                        if out.success {
                            "reached the goal"
                        } else {
                            "goal not reached"
                        }
                    );
                }
                break;
            }
        }
        if e == 0 && !frames.is_empty() {
            rendering = Some(frames);
        }
        total_return += ret;
        total_len += len as u64;
    }
    let n = episodes.max(1) as f64;
    Ok(EvalReport {
        episodes,
        mean_return: total_return / n,
        success_rate: successes as f64 / n,
        mean_length: total_len as f64 / n,
        rendering,
        semi_online: None,
    })
}

/// The config's policy network on the CPU with the checkpoint's `weights`.
fn load_policy(
    spec: &spur_core::env::EnvSpec,
    config: &Config,
    weights: &[u8],
) -> anyhow::Result<ActorCritic> {
    let mut model = ActorCritic::for_spec(spec, &config.model, tch::Device::Cpu)?;
    model
        .load_safetensors(weights)
        .context("the checkpoint does not fit this config's environment and model")?;
    if config.actor.fold_weights {
        model.fold_for_acting();
    }
    Ok(model)
}

/// Plays each expert trajectory (up to `episodes`) without patches: progress is the
/// share of its steps matched before the first mismatch.
fn semi_online(
    config: &Config,
    weights: &[u8],
    episodes: u32,
    greedy: bool,
) -> anyhow::Result<EvalReport> {
    let mut env = spur_core::env::Replay::open(Path::new(&config.env.replay_path), 0)
        .map_err(|e| anyhow::anyhow!(e))?;
    let spec = env.spec();
    let model = load_policy(&spec, config, weights)?;
    let n = (episodes as usize).min(env.trajectories()).max(1);
    let mut obs = vec![0.0f32; spec.obs_dim];
    let mut text = String::new();
    // Without patches an episode ends at the first mismatch, so its length is the
    // number of steps it matched.
    let (mut progress, mut successes, mut matched) = (0.0f64, 0u32, 0u64);
    for i in 0..n {
        env.reset(i as u64, &mut obs);
        let expert_len = env.expert_len();
        let mut ok = 0usize;
        let mut state = vec![0.0f32; model.state_size()];
        loop {
            let (action, _) = model.act(&obs, &mut state, greedy);
            let out = env.step(action[0] as usize, &mut obs, &mut text);
            ok += out.reward as usize;
            if out.terminated || out.truncated {
                successes += out.success as u32;
                break;
            }
        }
        progress += ok as f64 / expert_len as f64;
        matched += ok as u64;
    }
    let nf = n as f64;
    let (p, s) = (progress / nf, successes as f64 / nf);
    Ok(EvalReport {
        episodes: n as u32,
        mean_return: matched as f64 / nf,
        success_rate: s,
        mean_length: matched as f64 / nf,
        rendering: None,
        semi_online: Some(SemiOnline {
            progress: p,
            success_rate: s,
            score: (p + s) / 2.0,
        }),
    })
}

fn event_suffix(event: &str) -> String {
    if event.is_empty() {
        String::new()
    } else {
        format!(": {event}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_core::config::EnvKind;
    use std::collections::HashMap;

    #[test]
    fn plays_episodes_and_renders_grids() {
        let mut config = Config::from_toml_str("").unwrap();
        config.env.kind = EnvKind::Keyroom;
        config.env.keyroom_size = 5;
        config.env.max_episode_steps = 30;
        let spec = spur_env_bridge::env_spec(&config.env).unwrap();
        let model = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu).unwrap();
        let weights = model.to_safetensors(7, &HashMap::new()).unwrap();
        let r = evaluate(&config, &weights, 5, false, 3).unwrap();
        assert_eq!(r.episodes, 5);
        assert!(r.mean_length > 0.0 && r.mean_length <= 30.0);
        assert!((0.0..=1.0).contains(&r.success_rate));
        let pic = r.rendering.expect("keyroom renders");
        assert!(pic.starts_with("step 0\n"), "{pic}");
        assert!(pic.contains('@') && pic.contains("episode over after"));

        // Weights of another shape are refused with a clear error.
        config.model.hidden = vec![3];
        let err = evaluate(&config, &weights, 1, true, 0).unwrap_err();
        assert!(format!("{err:#}").contains("does not fit"), "{err:#}");

        // Cartpole has no picture.
        let mut cp = Config::from_toml_str("").unwrap();
        cp.env.kind = EnvKind::Cartpole;
        let spec = spur_env_bridge::env_spec(&cp.env).unwrap();
        let m = ActorCritic::for_spec(&spec, &cp.model, tch::Device::Cpu).unwrap();
        let w = m.to_safetensors(1, &HashMap::new()).unwrap();
        assert!(evaluate(&cp, &w, 2, true, 0).unwrap().rendering.is_none());
    }

    #[test]
    fn semi_online_score_on_expert_data() {
        let path =
            std::env::temp_dir().join(format!("spur-eval-expert-{}.jsonl", std::process::id()));
        let lines: Vec<String> = (0..4)
            .map(|s| {
                serde_json::to_string(&spur_core::env::replay::keyroom_expert(3, None, s).unwrap())
                    .unwrap()
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let config = Config::load(
            None,
            Vec::new(),
            &[
                "env.kind=replay".into(),
                format!("env.replay_path={}", path.display()),
            ],
        )
        .unwrap();
        let spec = spur_env_bridge::env_spec(&config.env).unwrap();
        let m = ActorCritic::for_spec(&spec, &config.model, tch::Device::Cpu).unwrap();
        let w = m.to_safetensors(1, &HashMap::new()).unwrap();
        let r = evaluate(&config, &w, 10, true, 0).unwrap();
        let s = r.semi_online.expect("replay gets a semi-online score");
        assert_eq!(r.episodes, 4, "one episode per trajectory");
        assert!((0.0..=1.0).contains(&s.progress) && (0.0..=1.0).contains(&s.success_rate));
        assert!((s.score - (s.progress + s.success_rate) / 2.0).abs() < 1e-12);
        // Success means following a whole trajectory, so it never beats progress.
        assert!(s.success_rate <= s.progress + 1e-12);
        let _ = std::fs::remove_file(&path);
    }
}
