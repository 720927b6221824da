//! ONI's reward terms that do not depend on the reward model: how a repeated event
//! text fades within an episode.

/// ONI's repeat decay: the n-th occurrence of a text in an episode earns n^(-beta)
/// of its intrinsic reward (0 for a step without text, count 0).
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
