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
    /// Env steps that reached the learner; `env_steps` counts those trained on.
    pub env_steps_received: u64,
    /// Received steps never trained on, by reason.
    pub dropped_steps_stale: u64,
    pub dropped_steps_incarnation: u64,
    pub dropped_steps_malformed: u64,
    pub learner_incarnation: u64,
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
    pub reward_model_loss: f64,
    pub batch_steps: u64,
    /// Groups of episodes dropped before they were complete (UI-S1 estimators).
    pub groups_given_up: u64,
    /// Complete groups UI-S1's spread filter (`learner.group_min_spread`) kept and
    /// dropped so far in this incarnation.
    pub groups_kept: u64,
    pub groups_dropped: u64,
    /// The reward service's counters at this update, when it runs.
    #[serde(flatten)]
    pub judge: Option<JudgeMetrics>,
    /// The value targets' running statistics, with `learner.normalize_returns`.
    #[serde(flatten)]
    pub returns: Option<ReturnColumns>,
}

/// `return_*` columns: the scale the critic learns on (`learner.normalize_returns`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReturnColumns {
    pub return_mean: f64,
    pub return_std: f64,
    /// Value targets folded into the statistics, over the whole run.
    pub return_count: f64,
}

/// The reward service's counters, as `judge_*` columns of `metrics.jsonl`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JudgeMetrics {
    pub judge_texts_seen: u64,
    pub judge_unique_texts: u64,
    /// Submitted texts answered from the label store, over texts seen.
    pub judge_store_hit_rate: f64,
    pub judge_labels: u64,
    pub judge_ranked_pairs: u64,
    pub judge_llm_calls: u64,
    pub judge_llm_failures: u64,
    pub judge_llm_latency_p50_ms: f64,
    pub judge_llm_latency_p99_ms: f64,
    pub judge_unparseable_answers: u64,
    pub judge_backlog: u64,
    pub judge_shed_texts: u64,
    pub judge_calls_per_labelled_text: f64,
    pub judge_model_version: u64,
    pub judge_model_loss: f64,
}

impl From<&spur_proto::v1::RewardServiceStatus> for JudgeMetrics {
    fn from(s: &spur_proto::v1::RewardServiceStatus) -> Self {
        Self {
            judge_texts_seen: s.texts_seen,
            judge_unique_texts: s.unique_texts,
            judge_store_hit_rate: s.store_hits as f64 / s.texts_seen.max(1) as f64,
            judge_labels: s.labels,
            judge_ranked_pairs: s.ranked_pairs,
            judge_llm_calls: s.llm_calls,
            judge_llm_failures: s.llm_failures,
            judge_llm_latency_p50_ms: s.llm_latency_p50_ms,
            judge_llm_latency_p99_ms: s.llm_latency_p99_ms,
            judge_unparseable_answers: s.unparseable_answers,
            judge_backlog: s.backlog,
            judge_shed_texts: s.shed_texts,
            judge_calls_per_labelled_text: s.calls_per_labelled_text,
            judge_model_version: s.model_version,
            judge_model_loss: s.model_loss,
        }
    }
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
