//! `metrics.jsonl`: one JSON object per update, appended and flushed, so a run can be
//! plotted while it trains and nothing is lost when it stops.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsRow {
    pub time_s: f64,
    pub env_steps: u64,
    pub steps_per_sec: f64,
    pub episode_return_mean: f64,
    pub episode_len_mean: f64,
    pub success_rate: f64,
    pub episodes: u64,
    pub policy_version: u64,
    pub updates: u64,
    pub policy_lag_mean: f64,
    pub dropped_stale_chunks: u64,
    pub queue_depth: u32,
    pub connected_actors: u32,
    pub lr: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub entropy: f64,
    pub clip_fraction: f64,
    pub behaviour_kl: f64,
    pub grad_norm: f64,
    pub approx_kl: f64,
    pub minibatch_steps: u64,
    pub intrinsic_reward_mean: f64,
    pub reward_model_version: u64,
    pub reward_labels: u64,
    pub batch_steps: u64,
}

pub struct MetricsWriter {
    out: BufWriter<File>,
}

impl MetricsWriter {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            out: BufWriter::new(f),
        })
    }

    pub fn write(&mut self, row: &MetricsRow) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, row)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
