//! Retry delays: exponential backoff, capped, with jitter that only ever adds.
//!
//! The reference schedule (the [`RetryPolicy`] defaults): a failed send is retried
//! after 60 s, 120 s, then 240 s, and failed for good when the fourth send fails too.

use std::time::Duration;

use crate::api::RetryPolicy;

/// The most jitter adds to a delay, as a fraction of it.
pub(crate) const MAX_JITTER: f64 = 0.2;

/// The retry policy as the sender uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Sends per message, the first included (4 = the first send and 3 retries).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub base: Duration,
    /// Longest un-jittered delay.
    pub cap: Duration,
}

impl From<&RetryPolicy> for Backoff {
    fn from(p: &RetryPolicy) -> Self {
        Backoff {
            max_attempts: p.max_attempts,
            base: Duration::from_secs(p.base_delay_seconds.into()),
            cap: Duration::from_secs(p.max_delay_seconds.into()),
        }
    }
}

impl Backoff {
    /// Whether a message that just failed its `attempt`-th send (1-based) may be sent
    /// again.
    pub(crate) fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The un-jittered delay after the `attempt`-th failure: base × 2^(attempt−1), capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// The delay plus up to [`MAX_JITTER`] of it, so retries of many messages that
    /// failed together spread out instead of hitting the provider at the same instant.
    /// Jitter never shortens the schedule: a retry is never earlier than
    /// [`Self::delay`]. `unit` is a random number in [0, 1) (anything else counts as 0).
    pub fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.delay(attempt);
        let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.0 };
        full.saturating_add(full.mul_f64(MAX_JITTER * unit))
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
    fn the_defaults_are_the_reference_schedule_60_120_240_then_failed() {
        let b = reference();
        let retries: Vec<u64> = (1..).take_while(|a| b.may_retry(*a)).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(retries, vec![60, 120, 240], "three retries after the first send");
        assert!(!b.may_retry(4), "the fourth failure is final");
    }

    #[test]
    fn jitter_only_adds_up_to_a_fifth() {
        let b = reference();
        for attempt in 1..=8 {
            let delay = b.delay(attempt);
            for unit in [0.0, 0.25, 0.5, 0.999_999, 1.0, -1.0, 7.0, f64::NAN, f64::INFINITY] {
                let jittered = b.jittered(attempt, unit);
                assert!(jittered >= delay, "attempt {attempt}, unit {unit}: {jittered:?} < {delay:?}");
                assert!(jittered <= delay.mul_f64(1.0 + MAX_JITTER), "attempt {attempt}, unit {unit}: {jittered:?}");
            }
        }
        assert_eq!(b.jittered(2, 0.0), Duration::from_secs(120));
        assert_eq!(b.jittered(2, 0.5), Duration::from_secs(132));
        assert_eq!(b.jittered(2, 0.999_999).as_secs(), 143);
    }

    #[test]
    fn the_longest_policy_does_not_overflow() {
        let b = Backoff { max_attempts: 10, base: Duration::from_secs(86_400), cap: Duration::from_secs(86_400) };
        assert_eq!(b.jittered(40, 1.0), Duration::from_secs(86_400 + 17_280));
    }
}
