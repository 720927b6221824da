//! Jittered exponential backoff for reconnecting to a peer that went away.

use std::time::Duration;

use rand::Rng;

pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 50 ms (or `max`, if that is less).
    pub fn new(max: Duration) -> Self {
        Self::between(Duration::from_millis(50).min(max), max)
    }

    /// Starts at `min` and doubles up to `max`.
    pub fn between(min: Duration, max: Duration) -> Self {
        Self {
            current: min,
            min,
            max,
        }
    }

    /// The next delay: doubles up to `max`, with up to 50% random jitter below it.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(400));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays[7] >= Duration::from_millis(200));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }
}
