//! The record of every message the sandbox accepted: what a rehearsal checks against.
//!
//! "Nobody got the message twice", "the channel never went over 20 a minute" and "the
//! portfolio never messaged more unique recipients in 24 h than its tier allows" are
//! questions about what the *provider* saw, not what Disparo believes it sent; the
//! ledger answers them from the provider's side, on the sandbox clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use super::account::TemplateCategory;
use super::clock::Clock;
use crate::api::Provider;

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accepted {
    /// When the sandbox accepted it (sandbox clock).
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
    /// Meta templates only: the template's category. A template is business-initiated
    /// and counts toward the portfolio's messaging limit (docs/providers.md A3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_category: Option<TemplateCategory>,
}

/// Why [`Ledger::admit`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The per-minute cap of the injected faults is spent.
    PerMinute,
    /// A template to a recipient new in the moving 24 h while the tier's unique
    /// recipients are all spent (Meta answers 131048).
    OverTier,
}

/// What [`Ledger::admit`] checks and counts along with the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Admission {
    /// At most this many accepted messages in the trailing 60 s.
    pub per_minute_cap: Option<u32>,
    /// At most this many unique template recipients in the moving 24 h.
    pub tier_limit: Option<usize>,
    /// The message is a template sent while business-initiated messaging is restricted.
    pub while_restricted: bool,
    /// The message is a marketing template Meta will withhold (131049).
    pub marketing_limited: bool,
}

/// A delivered message Meta charges for: a `delivered` status with pricing type
/// `regular` was announced for it (docs/providers.md A6). Cost = a rate card applied to
/// (category, recipient's country calling code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Billable {
    /// Recipient, E.164 with `+`.
    pub recipient: String,
    /// `pricing.category`: `marketing`, `utility` or `authentication`.
    pub category: String,
    /// The WAMID (each message counted once, however often its webhook is posted).
    pub message_id: String,
}

/// Counters of account-protection events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AccountCounters {
    /// Template sends refused with 131048 because the tier was spent.
    pub over_tier_refusals: u64,
    /// Marketing templates accepted and then failed with 131049.
    pub marketing_limited: u64,
    /// Templates accepted while business-initiated messaging was restricted.
    pub sent_while_restricted: u64,
}

#[derive(Debug, Default)]
struct Book {
    accepted: Vec<Accepted>,
    /// Per template recipient, the last time a template was accepted for it.
    last_template: HashMap<String, DateTime<Utc>>,
    counters: AccountCounters,
    billable: Vec<Billable>,
    billed: HashSet<String>,
}

/// Accepted messages, shared by the handlers, the control endpoints and the
/// [`SandboxHandle`](super::SandboxHandle). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    // A std Mutex: no lock is held across an await, and each use is a short copy.
    book: Arc<Mutex<Book>>,
    clock: Clock,
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
    /// Unique recipients of templates in the 24 h before now (sandbox clock).
    pub unique_recipients_24h: usize,
    /// The most unique template recipients in any 24 h of the ledger's history.
    pub max_unique_recipients_in_any_24h: usize,
    /// Template sends refused with 131048 (tier spent).
    pub over_tier_refusals: u64,
    /// Marketing templates accepted, then failed with 131049.
    pub marketing_limited: u64,
    /// Templates accepted while business-initiated messaging was restricted.
    pub sent_while_restricted: u64,
    /// Delivered messages Meta charges for, in the order their `delivered` was announced.
    pub billable_delivered: Vec<Billable>,
    /// Every accepted message, in order.
    pub accepted: Vec<Accepted>,
}

/// The messaging limit's window (docs/providers.md A3).
fn day() -> TimeDelta {
    TimeDelta::hours(24)
}

impl Ledger {
    /// A ledger on `clock` (its "now" for [`Ledger::unique_recipients_24h`]).
    pub(crate) fn with_clock(clock: Clock) -> Self {
        Ledger { book: Arc::default(), clock }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock cannot leave a half-written push behind.
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an accepted message.
    pub fn record(&self, entry: Accepted) {
        push(&mut self.lock(), entry);
    }

    /// Records an accepted message unless `cap` messages were already accepted in the
    /// 60 s before it; false when over the cap.
    #[cfg(test)]
    fn record_within(&self, entry: Accepted, cap: Option<u32>) -> bool {
        self.admit(entry, Admission { per_minute_cap: cap, ..Admission::default() }).is_ok()
    }

    /// Records an accepted message unless a limit refuses it, counting the
    /// account-protection events of `admission`. Check and record happen under one
    /// lock, so concurrent sends cannot slip past a limit together.
    pub(crate) fn admit(&self, entry: Accepted, admission: Admission) -> Result<(), Refusal> {
        let mut book = self.lock();
        if let Some(cap) = admission.per_minute_cap {
            let since = entry.at - TimeDelta::seconds(60);
            let recent = book.accepted.iter().rev().take_while(|e| e.at > since).count();
            if recent >= cap as usize {
                return Err(Refusal::PerMinute);
            }
        }
        if entry.template_category.is_some() {
            if let Some(limit) = admission.tier_limit {
                let since = entry.at - day();
                let counted = book.last_template.get(&entry.recipient).is_some_and(|last| *last > since);
                if !counted && book.last_template.values().filter(|last| **last > since).count() >= limit {
                    book.counters.over_tier_refusals += 1;
                    return Err(Refusal::OverTier);
                }
            }
            if admission.while_restricted {
                book.counters.sent_while_restricted += 1;
            }
            if admission.marketing_limited {
                book.counters.marketing_limited += 1;
            }
        }
        push(&mut book, entry);
        Ok(())
    }

    /// Records that a `delivered` status with pricing type `regular` was announced for
    /// a message; false (and nothing recorded) if it already was.
    pub(crate) fn record_billable(&self, message_id: &str, recipient: &str, category: &str) -> bool {
        let mut book = self.lock();
        if !book.billed.insert(message_id.to_owned()) {
            return false;
        }
        book.billable.push(Billable {
            recipient: recipient.to_owned(),
            category: category.to_owned(),
            message_id: message_id.to_owned(),
        });
        true
    }

    /// Forgets everything (between rehearsals). The clock stays where it is.
    pub fn reset(&self) {
        *self.lock() = Book::default();
    }

    /// How many messages were accepted.
    pub fn accepted_count(&self) -> usize {
        self.lock().accepted.len()
    }

    /// Every accepted message, in order.
    pub fn entries(&self) -> Vec<Accepted> {
        self.lock().accepted.clone()
    }

    /// Accepted messages per recipient.
    pub fn per_recipient(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for entry in self.lock().accepted.iter() {
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
        self.lock().accepted.iter().map(|e| (e.at, e.recipient.clone())).collect()
    }

    /// The most messages accepted within any 60-second window: the number a
    /// per-minute cap must never be below.
    pub fn max_in_any_minute_window(&self) -> usize {
        let mut times: Vec<DateTime<Utc>> = self.lock().accepted.iter().map(|e| e.at).collect();
        times.sort();
        max_in_window(&times, TimeDelta::seconds(60))
    }

    /// Unique template recipients in the 24 h before now (sandbox clock): what the
    /// tier is compared with.
    pub fn unique_recipients_24h(&self) -> usize {
        let since = self.clock.now() - day();
        self.lock().last_template.values().filter(|last| **last > since).count()
    }

    /// The most unique template recipients within any 24 h of the history: the number
    /// the tier's limit must never be below.
    pub fn max_unique_recipients_in_any_24h(&self) -> usize {
        let mut sends: Vec<(DateTime<Utc>, String)> = self
            .lock()
            .accepted
            .iter()
            .filter(|e| e.template_category.is_some())
            .map(|e| (e.at, e.recipient.clone()))
            .collect();
        sends.sort();
        max_unique_in_window(&sends, day())
    }

    /// Account-protection counters.
    pub fn counters(&self) -> AccountCounters {
        self.lock().counters
    }

    /// Delivered messages Meta charges for.
    pub fn billable_delivered(&self) -> Vec<Billable> {
        self.lock().billable.clone()
    }

    /// Everything at once, for the HTTP endpoint.
    pub fn summary(&self) -> LedgerSummary {
        let counters = self.counters();
        LedgerSummary {
            total_accepted: self.accepted_count(),
            per_recipient: self.per_recipient(),
            duplicates: self.duplicates(),
            max_in_any_minute_window: self.max_in_any_minute_window(),
            unique_recipients_24h: self.unique_recipients_24h(),
            max_unique_recipients_in_any_24h: self.max_unique_recipients_in_any_24h(),
            over_tier_refusals: counters.over_tier_refusals,
            marketing_limited: counters.marketing_limited,
            sent_while_restricted: counters.sent_while_restricted,
            billable_delivered: self.billable_delivered(),
            accepted: self.entries(),
        }
    }
}

fn push(book: &mut Book, entry: Accepted) {
    if entry.template_category.is_some() {
        let last = book.last_template.entry(entry.recipient.clone()).or_insert(entry.at);
        *last = (*last).max(entry.at);
    }
    book.accepted.push(entry);
}

/// Largest number of sorted instants within any half-open window `[t, t + width)`.
fn max_in_window(sorted: &[DateTime<Utc>], width: TimeDelta) -> usize {
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

/// Largest number of distinct recipients among sends (sorted by time) within any
/// half-open window `[t, t + width)`: the same window the tier check uses, which
/// counts sends less than `width` before the new one.
fn max_unique_in_window(sorted: &[(DateTime<Utc>, String)], width: TimeDelta) -> usize {
    let mut in_window: HashMap<&str, usize> = HashMap::new();
    let mut best = 0;
    let mut start = 0;
    for (at, recipient) in sorted {
        while *at - sorted[start].0 >= width {
            let leaving = sorted[start].1.as_str();
            if let Some(n) = in_window.get_mut(leaving) {
                *n -= 1;
                if *n == 0 {
                    in_window.remove(leaving);
                }
            }
            start += 1;
        }
        *in_window.entry(recipient.as_str()).or_insert(0) += 1;
        best = best.max(in_window.len());
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
            template_category: None,
        }
    }

    fn template(secs: i64, recipient: &str) -> Accepted {
        Accepted { template_category: Some(TemplateCategory::Marketing), ..entry(secs, recipient) }
    }

    fn tier(limit: usize) -> Admission {
        Admission { tier_limit: Some(limit), ..Admission::default() }
    }

    const DAY: i64 = 86_400;

    #[test]
    fn the_tier_counts_unique_template_recipients_in_a_moving_day() {
        let ledger = Ledger::default();
        assert_eq!(ledger.admit(template(0, "+551"), tier(2)), Ok(()));
        assert_eq!(ledger.admit(template(10, "+552"), tier(2)), Ok(()));
        assert_eq!(ledger.admit(template(20, "+553"), tier(2)), Err(Refusal::OverTier), "a third new recipient");
        assert_eq!(ledger.admit(template(30, "+551"), tier(2)), Ok(()), "a repeat recipient is not new");
        assert_eq!(ledger.admit(entry(40, "+554"), tier(2)), Ok(()), "session text is not counted");
        assert_eq!(ledger.admit(template(DAY - 1, "+553"), tier(2)), Err(Refusal::OverTier));
        // +551 was last sent at 30 s, +552 at 10 s: a day after 10 s one slot is free.
        assert_eq!(ledger.admit(template(DAY + 10, "+553"), tier(2)), Ok(()));
        assert_eq!(ledger.admit(template(DAY + 11, "+554"), tier(2)), Err(Refusal::OverTier));
        assert_eq!(ledger.admit(template(DAY + 30, "+554"), tier(2)), Ok(()), "+551's send at 30 s left the window");
        assert_eq!(ledger.counters().over_tier_refusals, 3);
        assert_eq!(ledger.accepted_count(), 6);
        assert_eq!(ledger.max_unique_recipients_in_any_24h(), 2, "the tier was never exceeded");
        assert_eq!(ledger.admit(template(DAY + 31, "+555"), Admission::default()), Ok(()), "unlimited");
        assert_eq!(ledger.max_unique_recipients_in_any_24h(), 3);
    }

    #[test]
    fn max_unique_recipients_looks_at_every_day_of_the_history() {
        let at_secs = |secs: i64, r: &str| (at(secs), r.to_owned());
        // Day one: 2 unique (3 sends); then 3 unique between 25 h and 30 h.
        let sends = [
            at_secs(0, "a"),
            at_secs(10, "b"),
            at_secs(20, "a"),
            at_secs(25 * 3600, "c"),
            at_secs(26 * 3600, "d"),
            at_secs(30 * 3600, "c"),
            at_secs(30 * 3600 + 1, "e"),
        ];
        assert_eq!(max_unique_in_window(&sends, day()), 3);
        assert_eq!(max_unique_in_window(&[], day()), 0);
        // Exactly a day apart are in different windows, as the tier check sees them.
        assert_eq!(max_unique_in_window(&[at_secs(0, "a"), at_secs(DAY, "b")], day()), 1);
    }

    #[test]
    fn unique_recipients_now_follow_the_sandbox_clock() {
        let clock = Clock::default();
        let ledger = Ledger::with_clock(clock.clone());
        let now = clock.now();
        for (i, r) in ["+551", "+552", "+551"].iter().enumerate() {
            let mut e = template(0, r);
            e.at = now + TimeDelta::seconds(i as i64);
            ledger.record(e);
        }
        assert_eq!(ledger.unique_recipients_24h(), 2);
        clock.advance(TimeDelta::hours(24) + TimeDelta::seconds(5));
        assert_eq!(ledger.unique_recipients_24h(), 0);
        assert_eq!(ledger.max_unique_recipients_in_any_24h(), 2);
    }

    #[test]
    fn account_events_are_counted_once_and_billing_dedupes() {
        let ledger = Ledger::default();
        let flags = Admission { while_restricted: true, marketing_limited: true, ..Admission::default() };
        assert_eq!(ledger.admit(template(0, "+551"), flags), Ok(()));
        assert_eq!(ledger.admit(entry(1, "+551"), flags), Ok(()), "text is neither");
        assert_eq!(
            ledger.counters(),
            AccountCounters { over_tier_refusals: 0, marketing_limited: 1, sent_while_restricted: 1 }
        );
        assert!(ledger.record_billable("wamid.0", "+551", "marketing"));
        assert!(!ledger.record_billable("wamid.0", "+551", "marketing"), "a duplicate webhook");
        assert_eq!(ledger.billable_delivered().len(), 1);
        let summary = ledger.summary();
        assert_eq!((summary.marketing_limited, summary.sent_while_restricted), (1, 1));
        assert_eq!(summary.billable_delivered[0].category, "marketing");
        ledger.reset();
        assert_eq!(ledger.counters(), AccountCounters::default());
        assert!(ledger.billable_delivered().is_empty());
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
        assert_eq!(max_in_window(&[], TimeDelta::seconds(60)), 0);
        // Exactly 60 s apart are in different windows.
        assert_eq!(max_in_window(&[at(0), at(60)], TimeDelta::seconds(60)), 1);
    }
}
