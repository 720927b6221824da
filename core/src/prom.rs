//! Prometheus gauges from the structs the roles already keep (a metrics row, a status
//! message): every numeric field becomes `<prefix>_<field>`. Without an exporter
//! installed (`run.prometheus_listen` empty) this costs next to nothing.

use serde::Serialize;

/// Sets a gauge `<prefix>_<field>` for every numeric field of `value`.
pub fn publish<T: Serialize>(prefix: &str, value: &T) {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(value) else {
        return;
    };
    for (name, v) in fields {
        if let Some(x) = v.as_f64() {
            metrics::gauge!(format!("{prefix}_{name}")).set(x);
        } else if let Some(b) = v.as_bool() {
            metrics::gauge!(format!("{prefix}_{name}")).set(if b { 1.0 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[derive(Serialize)]
    struct Row {
        env_steps: u64,
        loss: f64,
        finished: bool,
        name: String,
    }

    #[test]
    fn numeric_fields_become_gauges() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            publish(
                "spur_test",
                &Row {
                    env_steps: 7,
                    loss: 0.5,
                    finished: true,
                    name: "x".into(),
                },
            );
        });
        let mut seen: Vec<(String, f64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let DebugValue::Gauge(g) = value else {
                    panic!("not a gauge")
                };
                (key.key().name().to_string(), g.into_inner())
            })
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            vec![
                ("spur_test_env_steps".to_string(), 7.0),
                ("spur_test_finished".to_string(), 1.0),
                ("spur_test_loss".to_string(), 0.5),
            ]
        );
    }
}
