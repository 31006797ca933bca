//! The sandbox clock: real time plus an offset a rehearsal can move forward
//! (`POST /_sandbox/clock`), so a 24 h messaging-limit window or a restriction's expiry
//! (docs/providers.md A3, A6) can be crossed in a test that lasts seconds.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};

/// Shared by the handlers and the ledger. Cheap to clone; clones move together.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset: Arc<Mutex<TimeDelta>>,
}

impl Clock {
    /// The sandbox's now.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset()
    }

    /// How far ahead of real time the sandbox is.
    pub(crate) fn offset(&self) -> TimeDelta {
        *self.offset.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the clock forward (never back: the ledger's windows assume time only
    /// grows) and answers the new now.
    pub fn advance(&self, by: TimeDelta) -> DateTime<Utc> {
        let by = by.max(TimeDelta::zero());
        let mut offset = self.offset.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *offset += by;
        Utc::now() + *offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_only_moves_forward_and_clones_share_it() {
        let clock = Clock::default();
        let other = clock.clone();
        let before = clock.now();
        let after = clock.advance(TimeDelta::hours(24));
        assert!(after - before >= TimeDelta::hours(24));
        assert_eq!(other.offset(), TimeDelta::hours(24));
        clock.advance(TimeDelta::hours(-5));
        assert_eq!(other.offset(), TimeDelta::hours(24), "going back is ignored");
    }
}
