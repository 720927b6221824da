//! Return normalisation (`learner.normalize_returns`): the critic learns value
//! targets scaled by a running mean and standard deviation of the targets seen so
//! far, and its outputs are scaled back before advantages are computed.
//!
//! Why: the value loss's gradient grows with the size of the returns. Where the
//! heads share a torso (the NetHack network), a critic chasing returns of 10 shapes
//! the shared layers more than the policy does; and with one norm clip over both
//! gradients (`max_grad_norm`), a large critic gradient shrinks the policy's step. On
//! the unit scale the two stay about the same size.

/// The running mean and variance of value targets, merged batch by batch (Chan et
/// al.'s parallel form: exact over everything seen, so each batch weighs by its
/// share of all targets so far).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReturnStats {
    pub mean: f64,
    pub var: f64,
    /// Targets folded in so far.
    pub count: f64,
}

/// Below this standard deviation targets are not scaled up (a batch of equal
/// returns would otherwise turn rounding into unit-size noise).
const STD_FLOOR: f64 = 1e-4;

impl Default for ReturnStats {
    /// The identity: mean 0, variance 1, nothing seen.
    fn default() -> Self {
        Self {
            mean: 0.0,
            var: 1.0,
            count: 0.0,
        }
    }
}

impl ReturnStats {
    /// Finite, a variance and a count not below 0: what a checkpoint must hold to
    /// be used.
    pub fn is_valid(&self) -> bool {
        self.mean.is_finite()
            && self.var.is_finite()
            && self.var >= 0.0
            && self.count.is_finite()
            && self.count >= 0.0
    }

    fn std(&self) -> f64 {
        self.var.sqrt().max(STD_FLOOR)
    }

    /// Folds `targets` in (non-finite values skipped: a NaN would stay for good).
    pub fn update(&mut self, targets: &[f32]) {
        let (mut n, mut sum) = (0.0, 0.0);
        for &t in targets.iter().filter(|t| t.is_finite()) {
            n += 1.0;
            sum += t as f64;
        }
        if n == 0.0 {
            return;
        }
        let mean = sum / n;
        let m2: f64 = targets
            .iter()
            .filter(|t| t.is_finite())
            .map(|&t| (t as f64 - mean).powi(2))
            .sum();
        if self.count == 0.0 {
            *self = Self {
                mean,
                var: m2 / n,
                count: n,
            };
            return;
        }
        let total = self.count + n;
        let delta = mean - self.mean;
        let merged_m2 = self.var * self.count + m2 + delta * delta * self.count * n / total;
        *self = Self {
            mean: self.mean + delta * n / total,
            var: merged_m2 / total,
            count: total,
        };
    }

    /// Raw returns to the critic's scale, in place.
    pub fn normalize(&self, values: &mut [f32]) {
        let (mean, std) = (self.mean, self.std());
        for v in values {
            *v = ((*v as f64 - mean) / std) as f32;
        }
    }

    /// The critic's outputs back to raw returns, in place.
    pub fn denormalize(&self, values: &mut [f32]) {
        let (mean, std) = (self.mean, self.std());
        for v in values {
            *v = (*v as f64 * std + mean) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_to_the_statistics_of_all_targets() {
        let all: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.5 - 7.0)
            .collect();
        let mut s = ReturnStats::default();
        for part in all.chunks(64) {
            s.update(part);
        }
        let n = all.len() as f64;
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert_eq!(s.count, n);
        assert!((s.mean - mean).abs() < 1e-9, "{} vs {mean}", s.mean);
        assert!((s.var - var).abs() < 1e-9 * var, "{} vs {var}", s.var);
    }

    #[test]
    fn normalize_and_denormalize_invert_each_other_and_skip_nan() {
        let mut s = ReturnStats::default();
        s.update(&[10.0, f32::NAN, 30.0, 20.0]);
        assert_eq!(s.count, 3.0);
        assert!((s.mean - 20.0).abs() < 1e-9);
        let raw = [20.0f32, 20.0 + (200.0f32 / 3.0).sqrt(), 5.0];
        let mut v = raw;
        s.normalize(&mut v);
        assert!(v[0].abs() < 1e-6 && (v[1] - 1.0).abs() < 1e-5, "{v:?}");
        s.denormalize(&mut v);
        for (a, b) in v.iter().zip(raw) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
    }

    #[test]
    fn only_finite_statistics_with_a_variance_and_count_not_below_zero_are_valid() {
        let ok = ReturnStats {
            mean: -3.0,
            var: 0.0,
            count: 10.0,
        };
        assert!(ok.is_valid() && ReturnStats::default().is_valid());
        for bad in [
            ReturnStats {
                mean: f64::NAN,
                ..ok
            },
            ReturnStats { var: -1.0, ..ok },
            ReturnStats {
                var: f64::INFINITY,
                ..ok
            },
            ReturnStats { count: -1.0, ..ok },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn fresh_statistics_leave_values_alone_and_equal_targets_are_not_blown_up() {
        let mut v = [3.0f32, -2.0];
        ReturnStats::default().normalize(&mut v);
        assert_eq!(v, [3.0, -2.0]);
        let mut s = ReturnStats::default();
        s.update(&[5.0; 8]);
        let mut w = [5.0f32 + 1e-6];
        s.normalize(&mut w);
        assert!(w[0].abs() < 0.1, "{w:?}");
    }
}
