//! Retry delays: exponential backoff with jitter, capped (the reference defaults are
//! 3 attempts, 60 s base, doubling, 3600 s cap).

use std::time::Duration;

use crate::api::RetryPolicy;

/// The retry policy as the sender uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts per message, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
}

impl From<&RetryPolicy> for Backoff {
    fn from(p: &RetryPolicy) -> Self {
        Backoff { max_attempts: p.max_attempts, base: Duration::from_secs(p.base_delay_seconds.into()), cap: Duration::from_secs(p.max_delay_seconds.into()) }
    }
}

impl Backoff {
    /// Whether a message that just failed its `attempt`-th try (1-based) may try again.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The un-jittered delay after the `attempt`-th failure: base × 2^(attempt−1), capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// The delay with "equal jitter": between half and all of [`Self::delay`], so retries
    /// of many messages that failed together spread out instead of hitting the provider
    /// at the same instant. `unit` is a random number in [0, 1).
    pub fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.delay(attempt);
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Backoff {
        Backoff::from(&RetryPolicy::default())
    }

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let b = reference();
        let delays: Vec<u64> = (1..=8).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(delays, vec![60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn three_attempts_mean_two_retries() {
        let b = reference();
        assert!(b.may_retry(1) && b.may_retry(2));
        assert!(!b.may_retry(3));
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let b = reference();
        assert_eq!(b.jittered(2, 0.0), Duration::from_secs(60));
        assert_eq!(b.jittered(2, 0.999_999).as_secs(), 119);
        assert!(b.jittered(40, 0.5) <= Duration::from_secs(3600));
    }
}
