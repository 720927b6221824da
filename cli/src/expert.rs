//! `spur expert`: expert trajectories for UI-S1's semi-online mode, from keyroom's
//! scripted solver, as the JSONL file the `replay` environment reads.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use spur_core::config::EnvKind;
use spur_core::env::replay::keyroom_expert;

use crate::ConfigArgs;

#[derive(Args)]
pub struct ExpertArgs {
    /// A keyroom config (room size and step limit come from it).
    #[command(flatten)]
    config: ConfigArgs,
    /// Trajectories to write.
    #[arg(long, default_value_t = 1000)]
    episodes: u32,
    /// First episode seed (episode i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the JSONL file.
    #[arg(long, short)]
    out: PathBuf,
}

pub fn run(args: ExpertArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    if config.env.kind != EnvKind::Keyroom {
        bail!("spur expert solves keyroom only: use a config with env.kind = \"keyroom\"");
    }
    let limit = (config.env.max_episode_steps > 0).then_some(config.env.max_episode_steps);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let mut steps = 0usize;
    for i in 0..args.episodes as u64 {
        let t = keyroom_expert(config.env.keyroom_size as usize, limit, args.seed + i)
            .map_err(|e| anyhow::anyhow!(e))?;
        steps += t.steps.len();
        serde_json::to_writer(&mut w, &t)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    println!(
        "expert:      {} trajectories, {:.1} steps each on average -> {}",
        args.episodes,
        steps as f64 / args.episodes.max(1) as f64,
        args.out.display()
    );
    Ok(())
}
