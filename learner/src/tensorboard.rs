//! TensorBoard event files in the run directory, next to `metrics.jsonl`, so
//! `tensorboard --logdir runs/` shows every run. Each update's metrics row becomes
//! scalars at step = env steps, grouped by what they describe (`episode/`, `loss/`
//! with the critic's return statistics, `intrinsic/`, `judge/`, `system/`). The
//! records are written by the `tfrecord` crate (length- and CRC-framed `Event`
//! protos, TensorBoard's own format).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tfrecord::protobuf::event::What;
use tfrecord::{Event, EventWriter, EventWriterConfig};

pub struct TensorBoard {
    writer: EventWriter<BufWriter<File>>,
}

/// The TensorBoard tag of a metrics column.
pub fn tag(column: &str) -> String {
    if let Some(rest) = column.strip_prefix("judge_") {
        return format!("judge/{rest}");
    }
    let group = if column.starts_with("episode") || column == "success_rate" || column == "episodes"
    {
        "episode"
    } else if column.ends_with("_loss")
        || column.starts_with("return_")
        || matches!(
            column,
            "entropy" | "clip_fraction" | "approx_kl" | "behaviour_kl" | "grad_norm" | "lr"
        )
    {
        "loss"
    } else if column.starts_with("intrinsic") || column.starts_with("reward_") {
        "intrinsic"
    } else {
        "system"
    };
    format!("{group}/{column}")
}

impl TensorBoard {
    /// Starts a new event file in `dir` (a resumed run adds a file; TensorBoard
    /// reads them together).
    pub fn create(dir: &Path) -> tfrecord::Result<Self> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "spur".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now.as_secs(),
            std::process::id()
        ));
        let mut writer = EventWriter::create(path, EventWriterConfig { auto_flush: true })?;
        writer.write_event(Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            source_metadata: None,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(Self { writer })
    }

    /// Every numeric field of `row` as a scalar at `step`.
    pub fn write<T: Serialize>(&mut self, step: i64, row: &T) -> tfrecord::Result<()> {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(row) else {
            return Ok(());
        };
        for (name, v) in fields {
            if name == "env_steps" {
                continue;
            }
            if let Some(x) = v.as_f64() {
                self.writer.write_scalar(tag(&name), step, x as f32)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfrecord::protobuf::summary::value::Value as V;
    use tfrecord::{EventIter, RecordReaderConfig};

    #[derive(Serialize)]
    struct Row {
        env_steps: u64,
        success_rate: f64,
        policy_loss: f64,
        judge_llm_calls: u64,
    }

    #[test]
    fn rows_read_back_as_scalars() {
        let dir = std::env::temp_dir().join(format!("spur-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tb = TensorBoard::create(&dir).unwrap();
        for i in 0..3u64 {
            let row = Row {
                env_steps: 1000 * i,
                success_rate: i as f64 / 2.0,
                policy_loss: -0.5,
                judge_llm_calls: i,
            };
            tb.write(row.env_steps as i64, &row).unwrap();
        }
        drop(tb);
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("events.out.tfevents."))
            .expect("an event file");
        // The reader checks every record's length and CRC.
        let events: Vec<Event> = EventIter::open(&file, RecordReaderConfig::default())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(matches!(&events[0].what, Some(What::FileVersion(v)) if v == "brain.Event:2"));
        let scalars: Vec<(i64, String, f32)> = events[1..]
            .iter()
            .map(|e| {
                let Some(What::Summary(s)) = &e.what else {
                    panic!("not a summary")
                };
                let v = &s.value[0];
                let Some(V::SimpleValue(x)) = v.value else {
                    panic!("not a scalar")
                };
                (e.step, v.tag.clone(), x)
            })
            .collect();
        assert_eq!(scalars.len(), 9);
        assert!(scalars.contains(&(2000, "episode/success_rate".into(), 1.0)));
        assert!(scalars.contains(&(1000, "loss/policy_loss".into(), -0.5)));
        assert!(scalars.contains(&(2000, "judge/llm_calls".into(), 2.0)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn columns_are_grouped() {
        assert_eq!(tag("episode_return_mean"), "episode/episode_return_mean");
        assert_eq!(tag("value_loss"), "loss/value_loss");
        assert_eq!(tag("return_std"), "loss/return_std");
        assert_eq!(tag("reward_model_loss"), "loss/reward_model_loss");
        assert_eq!(
            tag("intrinsic_reward_mean"),
            "intrinsic/intrinsic_reward_mean"
        );
        assert_eq!(tag("steps_per_sec"), "system/steps_per_sec");
    }
}
