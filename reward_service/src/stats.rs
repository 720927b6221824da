//! Counters of the reward service, reported by `GetStatus`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Latency samples kept for percentiles.
const LATENCY_WINDOW: usize = 1000;

#[derive(Default)]
pub struct Stats {
    pub texts_seen: AtomicU64,
    pub store_hits: AtomicU64,
    pub llm_calls: AtomicU64,
    /// Texts sent to the judge, each try counted.
    pub texts_judged: AtomicU64,
    pub llm_failures: AtomicU64,
    pub unparseable: AtomicU64,
    /// Pairs the judge ranked and the store kept.
    pub ranked_pairs: AtomicU64,
    latencies_ms: Mutex<VecDeque<f64>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_latency(&self, ms: f64) {
        let mut l = self.latencies_ms.lock().expect("latency lock poisoned");
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(ms);
    }

    /// The `q` quantile (0..=1) of recent judge latencies, in milliseconds.
    pub fn latency_quantile(&self, q: f64) -> f64 {
        let l = self.latencies_ms.lock().expect("latency lock poisoned");
        if l.is_empty() {
            return 0.0;
        }
        let mut v: Vec<f64> = l.iter().copied().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let s = Stats::default();
        assert_eq!(s.latency_quantile(0.5), 0.0);
        for i in 1..=100 {
            s.record_latency(i as f64);
        }
        assert_eq!(s.latency_quantile(0.5), 51.0);
        assert_eq!(s.latency_quantile(0.99), 99.0);
    }
}
