//! spur-reward-service: labels the event texts of trajectories with an LLM judge
//! (or the built-in rule judge), keeps every label in an embedded transactional
//! store, and distils them into intrinsic reward models that the learner uses.
//!
//! This crate holds the pure parts that do not depend on the network yet.

/// How often an event text has occurred so far in its episode scales its intrinsic
/// reward by `count^(-beta)` (ONI's repeat decay), so repeated events fade fast.
pub fn repeat_decay(count: u32, beta: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    (count as f64).powf(-beta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_fade_quickly() {
        assert_eq!(repeat_decay(1, 3.0), 1.0);
        assert!((repeat_decay(2, 3.0) - 0.125).abs() < 1e-12);
        assert_eq!(repeat_decay(0, 3.0), 0.0);
    }
}
