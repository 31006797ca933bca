//! The record of every message the sandbox accepted: what a rehearsal checks against.
//!
//! "Nobody got the message twice" and "the channel never went over 20 a minute" are
//! questions about what the *provider* saw, not what Disparo believes it sent; the
//! ledger answers them from the provider's side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::api::Provider;

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accepted {
    /// When the sandbox accepted it.
    pub at: DateTime<Utc>,
    /// Which API accepted it.
    pub provider: Provider,
    /// Recipient, E.164 with `+`.
    pub recipient: String,
    /// The id the sandbox answered with (WAMID or Evolution `key.id`).
    pub message_id: String,
    /// Meta's `biz_opaque_callback_data`, when sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_data: Option<String>,
}

/// Accepted messages, shared by the handlers, the control endpoints and the
/// [`SandboxHandle`](super::SandboxHandle). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    // A std Mutex: no lock is held across an await, and each use is a short copy.
    entries: Arc<Mutex<Vec<Accepted>>>,
}

/// The ledger as `GET /_sandbox/ledger` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerSummary {
    /// Messages accepted.
    pub total_accepted: usize,
    /// Accepted messages per recipient.
    pub per_recipient: HashMap<String, u32>,
    /// Recipients who were sent more than one message.
    pub duplicates: Vec<String>,
    /// The most messages accepted in any 60-second window.
    pub max_in_any_minute_window: usize,
    /// Every accepted message, in order.
    pub accepted: Vec<Accepted>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Vec<Accepted>> {
        // A panic while holding the lock cannot leave a half-written Vec push behind.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an accepted message.
    pub fn record(&self, entry: Accepted) {
        self.lock().push(entry);
    }

    /// Records an accepted message unless `cap` messages were already accepted in the
    /// 60 s before it; false when over the cap. Check and record happen under one lock,
    /// so concurrent sends cannot slip past the cap together.
    pub fn record_within(&self, entry: Accepted, cap: Option<u32>) -> bool {
        let mut entries = self.lock();
        if let Some(cap) = cap {
            let since = entry.at - chrono::Duration::seconds(60);
            let recent = entries.iter().rev().take_while(|e| e.at > since).count();
            if recent >= cap as usize {
                return false;
            }
        }
        entries.push(entry);
        true
    }

    /// Forgets everything (between rehearsals).
    pub fn reset(&self) {
        self.lock().clear();
    }

    /// How many messages were accepted.
    pub fn accepted_count(&self) -> usize {
        self.lock().len()
    }

    /// Every accepted message, in order.
    pub fn entries(&self) -> Vec<Accepted> {
        self.lock().clone()
    }

    /// Accepted messages per recipient.
    pub fn per_recipient(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for entry in self.lock().iter() {
            *counts.entry(entry.recipient.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Recipients accepted more than once, sorted.
    pub fn duplicates(&self) -> Vec<String> {
        let mut dups: Vec<String> = self.per_recipient().into_iter().filter(|(_, n)| *n > 1).map(|(r, _)| r).collect();
        dups.sort();
        dups
    }

    /// When each message was accepted, and for whom.
    pub fn timestamps(&self) -> Vec<(DateTime<Utc>, String)> {
        self.lock().iter().map(|e| (e.at, e.recipient.clone())).collect()
    }

    /// The most messages accepted within any 60-second window: the number a
    /// per-minute cap must never be below.
    pub fn max_in_any_minute_window(&self) -> usize {
        let mut times: Vec<DateTime<Utc>> = self.lock().iter().map(|e| e.at).collect();
        times.sort();
        max_in_window(&times, chrono::Duration::seconds(60))
    }

    /// Everything at once, for the HTTP endpoint.
    pub fn summary(&self) -> LedgerSummary {
        LedgerSummary {
            total_accepted: self.accepted_count(),
            per_recipient: self.per_recipient(),
            duplicates: self.duplicates(),
            max_in_any_minute_window: self.max_in_any_minute_window(),
            accepted: self.entries(),
        }
    }
}

/// Largest number of sorted instants within any half-open window `[t, t + width)`.
fn max_in_window(sorted: &[DateTime<Utc>], width: chrono::Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, at) in sorted.iter().enumerate() {
        while *at - sorted[start] >= width {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_750_000_000 + secs, 0).single().unwrap_or_default()
    }

    fn entry(secs: i64, recipient: &str) -> Accepted {
        Accepted {
            at: at(secs),
            provider: Provider::Meta,
            recipient: recipient.into(),
            message_id: format!("wamid.{secs}"),
            callback_data: None,
        }
    }

    #[test]
    fn counts_recipients_and_duplicates() {
        let ledger = Ledger::default();
        for (secs, r) in [(0, "+551"), (1, "+552"), (2, "+551"), (3, "+553"), (4, "+553")] {
            ledger.record(entry(secs, r));
        }
        assert_eq!(ledger.accepted_count(), 5);
        assert_eq!(ledger.per_recipient().get("+551"), Some(&2));
        assert_eq!(ledger.duplicates(), vec!["+551".to_owned(), "+553".to_owned()]);
        assert_eq!(ledger.timestamps()[1], (at(1), "+552".to_owned()));
        ledger.reset();
        assert_eq!(ledger.accepted_count(), 0);
    }

    #[test]
    fn the_cap_counts_the_trailing_minute() {
        let ledger = Ledger::default();
        for secs in 0..5 {
            assert!(ledger.record_within(entry(secs, "+551"), None));
        }
        assert!(!ledger.record_within(entry(5, "+552"), Some(5)), "five in the last minute already");
        assert_eq!(ledger.accepted_count(), 5, "a refused message is not recorded");
        assert!(ledger.record_within(entry(5, "+552"), Some(6)));
        assert!(ledger.record_within(entry(70, "+553"), Some(1)), "the earlier ones are more than a minute old");
    }

    #[test]
    fn minute_windows_slide() {
        let ledger = Ledger::default();
        // 3 in the first minute, then 4 between 50 s and 109 s.
        for secs in [0, 10, 20, 50, 70, 100, 109, 200] {
            ledger.record(entry(secs, "+55"));
        }
        assert_eq!(ledger.max_in_any_minute_window(), 4);
        assert_eq!(max_in_window(&[], chrono::Duration::seconds(60)), 0);
        // Exactly 60 s apart are in different windows.
        assert_eq!(max_in_window(&[at(0), at(60)], chrono::Duration::seconds(60)), 1);
    }
}
