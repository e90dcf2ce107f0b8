//! Retry pacing after a failed request: exponential with jitter, so a fleet that loses its
//! gateway at the same moment does not come back at the same moment.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The wait after one more failure: half the current ceiling plus a random share of the
    /// other half (`unit` in [0, 1)), the ceiling doubling per failure up to `max`.
    pub fn failed(&mut self, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A small random number in [0, 1) without a shared generator: the clock's nanoseconds mixed
/// with a per-caller seed.
pub fn jitter(seed: u64) -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = (nanos ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_and_reset_on_success() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let lows: Vec<u64> = (0..8).map(|_| b.failed(0.0).as_millis() as u64).collect();
        assert_eq!(lows, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        let high = b.failed(0.999).as_millis();
        assert!((59_000..60_000).contains(&high), "{high}");
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(1.0), Duration::from_secs(1));
    }

    #[test]
    fn a_fleet_retrying_together_spreads_out() {
        // 1000 devices failing at the same instant, each with its own jitter: their retries
        // spread across the second half of the window instead of landing together.
        let mut per_100ms = [0usize; 10];
        for i in 0..1000u64 {
            let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
            let unit = ((i.wrapping_mul(2654435761)) % 1000) as f64 / 1000.0;
            let wait = b.failed(unit);
            per_100ms[(wait.as_millis() / 200) as usize] += 1;
        }
        assert!(per_100ms[..5].iter().all(|&n| n == 0), "{per_100ms:?}");
        assert!(
            per_100ms[5..].iter().all(|&n| (150..250).contains(&n)),
            "{per_100ms:?}"
        );
        assert!((0.0..1.0).contains(&jitter(7)));
    }
}
