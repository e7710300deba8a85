//! Learning-rate schedules.

/// How the learning rate moves over the steps of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate at every step.
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then cosine decay to `min_ratio`·base at
    /// `total` steps (and held there after).
    WarmupCosine {
        /// Steps of linear warmup.
        warmup: usize,
        /// Step at which the decay reaches its floor.
        total: usize,
        /// The floor as a fraction of the base rate.
        min_ratio: f64,
    },
}

impl Schedule {
    /// The rate for step `step` (0-based) given the base rate.
    pub fn rate(&self, base: f64, step: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupCosine { warmup, total, min_ratio } => {
                if step < warmup {
                    return base * (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / span as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                base * (min_ratio + (1.0 - min_ratio) * cosine)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_is_constant() {
        assert_eq!(Schedule::Constant.rate(0.1, 0), 0.1);
        assert_eq!(Schedule::Constant.rate(0.1, 1000), 0.1);
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine { warmup: 10, total: 110, min_ratio: 0.1 };
        assert!((s.rate(1.0, 0) - 0.1).abs() < 1e-12);
        assert!((s.rate(1.0, 9) - 1.0).abs() < 1e-12);
        assert!((s.rate(1.0, 10) - 1.0).abs() < 1e-12);
        // Half way through the decay: min + (1-min)/2.
        assert!((s.rate(1.0, 60) - 0.55).abs() < 1e-12);
        assert!((s.rate(1.0, 110) - 0.1).abs() < 1e-12);
        assert!((s.rate(1.0, 500) - 0.1).abs() < 1e-12);
    }
}
