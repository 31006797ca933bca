//! Campaign status from the counters and the Job: counts, progress, rates, retry
//! statistics. Pure; reading the counters costs one row whatever the campaign's size.

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::JobStatus;

use crate::api::{BatchCounts, ErrorCount, MessageCounts, Progress, Rates, RetryStats};
use crate::store::campaigns::Counters;

/// Message counts as users read them (`sent` includes what went further).
pub(crate) fn message_counts(c: &Counters) -> MessageCounts {
    MessageCounts {
        total: c.total,
        pending: c.pending + c.sending,
        sent: c.at_least_sent(),
        delivered: c.delivered + c.read,
        read: c.read,
        failed: c.failed,
        unknown: c.unknown,
        skipped: c.skipped,
        cancelled: c.cancelled,
        // Counted apart by the caller (a partial index, not a counter).
        marketing_limited: 0,
    }
}

fn ratio(part: i64, whole: i64) -> f64 {
    if whole <= 0 { 0.0 } else { ((part as f64 / whole as f64) * 1000.0).round() / 1000.0 }
}

/// Progress: the finished share (skipped and cancelled messages are finished), the send
/// rate since the first send, and the ETA at that rate.
pub fn progress(c: &Counters, now: DateTime<Utc>) -> Progress {
    let finished = c.finished();
    let percent = if c.total > 0 { finished * 100 / c.total } else { 100 };
    let rate_per_minute = match (c.first_sent_at, c.last_sent_at) {
        (Some(first), Some(last)) if last > first => {
            let minutes = (last - first).num_milliseconds() as f64 / 60_000.0;
            ((c.at_least_sent() + c.failed) as f64 / minutes * 10.0).round() / 10.0
        }
        _ => 0.0,
    };
    let remaining = c.pending + c.sending;
    let eta = (rate_per_minute > 0.0 && remaining > 0)
        .then(|| now + chrono::Duration::milliseconds((remaining as f64 / rate_per_minute * 60_000.0) as i64))
        .map(crate::api::time::k8s);
    Progress { percentage: format!("{percent}%"), rate_per_minute, eta }
}

/// Delivery, read and failure rates. Failure is a share of the messages that were
/// attempted: cancelled and skipped ones never reached the provider.
pub fn rates(c: &Counters) -> Rates {
    Rates {
        delivery: ratio(c.delivered + c.read, c.at_least_sent()),
        read: ratio(c.read, c.delivered + c.read),
        failure: ratio(c.failed, c.finished_attempted()),
    }
}

/// Retry statistics with the error breakdown (most frequent first).
pub(crate) fn retry_stats(c: &Counters, errors: &[(String, i64)]) -> RetryStats {
    RetryStats {
        succeeded_first_attempt: c.succeeded_first_attempt,
        succeeded_after_retry: c.succeeded_after_retry,
        permanent_failures: c.failed,
        retries_scheduled: c.retries_scheduled,
        errors: errors.iter().map(|(code, count)| ErrorCount { code: code.clone(), count: *count }).collect(),
    }
}

/// Batch counts from the Job's status.
pub(crate) fn batch_counts(job_name: &str, completions: i32, status: Option<&JobStatus>) -> BatchCounts {
    let status = status.cloned().unwrap_or_default();
    BatchCounts {
        total: completions,
        active: status.active.unwrap_or(0),
        succeeded: status.succeeded.unwrap_or(0),
        failed: status.failed_indexes.as_deref().map_or(0, count_indexes),
        job_name: Some(job_name.to_owned()),
    }
}

/// Estimated sending time of `messages` on a channel with `limits`, shared equally with
/// `sharing` other campaigns, sending only `window_fraction` of the day (1.0: no window).
/// None when nothing caps the rate (the estimate would be meaningless).
pub(crate) fn estimated_duration_seconds(
    messages: i64,
    limits: &crate::store::rate::Limits,
    sharing: i64,
    window_fraction: f64,
) -> Option<i64> {
    let interval_rate = (!limits.min_interval.is_zero()).then(|| 1.0 / limits.min_interval.as_secs_f64());
    let per_second = [
        limits.per_minute.map(|c| f64::from(c) / 60.0),
        limits.per_hour.map(|c| f64::from(c) / 3600.0),
        limits.per_day.map(|c| f64::from(c) / 86_400.0),
        interval_rate,
    ]
    .into_iter()
    .flatten()
    .fold(f64::INFINITY, f64::min);
    if !per_second.is_finite() || per_second <= 0.0 || window_fraction <= 0.0 {
        return None;
    }
    let share = per_second / (sharing.max(0) as f64 + 1.0) * window_fraction.min(1.0);
    Some((messages.max(0) as f64 / share).ceil() as i64)
}

/// The share of a day a send window is open (1.0 without a window).
pub(crate) fn window_fraction(window: Option<&crate::api::SendWindow>) -> f64 {
    let Some(w) = window else { return 1.0 };
    let minutes = |t: &str| -> Option<i64> {
        let (h, m) = t.split_once(':')?;
        Some(h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?)
    };
    let (Some(start), Some(end)) = (minutes(&w.start), minutes(&w.end)) else { return 1.0 };
    let open = if end > start { end - start } else { 1440 - start + end };
    let days = if w.days.is_empty() { 7.0 } else { w.days.len() as f64 };
    open as f64 / 1440.0 * days / 7.0
}

/// Counts the indexes in a Job's interval notation, e.g. `1,3-5` → 4.
pub(crate) fn count_indexes(indexes: &str) -> i32 {
    indexes
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<i32>(), b.trim().parse::<i32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => i32::from(part.trim().parse::<i32>().is_ok()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn counts_are_cumulative_for_people() {
        let c = Counters {
            total: 10,
            pending: 2,
            sending: 1,
            sent: 2,
            delivered: 2,
            read: 1,
            failed: 1,
            unknown: 1,
            ..Default::default()
        };
        let m = message_counts(&c);
        assert_eq!((m.pending, m.sent, m.delivered, m.read), (3, 5, 3, 1));
    }

    #[test]
    fn progress_rate_and_eta() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
        let c = Counters {
            total: 200,
            pending: 100,
            sent: 100,
            first_sent_at: Some(t0),
            last_sent_at: Some(t0 + chrono::Duration::minutes(10)),
            ..Default::default()
        };
        let p = progress(&c, t0 + chrono::Duration::minutes(10));
        assert_eq!(p.percentage, "50%");
        assert_eq!(p.rate_per_minute, 10.0);
        assert_eq!(crate::api::time::instant(&p.eta.unwrap().0), t0 + chrono::Duration::minutes(20));
    }

    #[test]
    fn rates_ignore_cancelled_messages() {
        let c = Counters { total: 10, sent: 2, delivered: 2, read: 2, failed: 2, cancelled: 2, ..Default::default() };
        let r = rates(&c);
        assert_eq!((r.delivery, r.read, r.failure), (0.667, 0.5, 0.25));
    }

    #[test]
    fn skipped_messages_are_finished_but_never_attempted() {
        // every remaining contact opted out: the campaign is done
        let c = Counters { total: 10, sent: 2, failed: 2, skipped: 6, ..Default::default() };
        assert_eq!(message_counts(&c).skipped, 6);
        assert_eq!(progress(&c, Utc::now()).percentage, "100%");
        assert_eq!(rates(&c).failure, 0.5, "a failure rate is a share of attempted messages");
    }

    #[test]
    fn estimates_follow_the_tightest_cap_the_sharing_and_the_window() {
        let meta = crate::store::rate::Limits::provider_default(crate::api::Provider::Meta);
        // 500/day is the tightest: 1,000 messages take two days
        assert_eq!(estimated_duration_seconds(1000, &meta, 0, 1.0), Some(172_800));
        assert_eq!(estimated_duration_seconds(1000, &meta, 1, 1.0), Some(345_600), "shared with one other campaign");
        let w = crate::api::SendWindow {
            start: "09:00".into(),
            end: "21:00".into(),
            time_zone: "UTC".into(),
            days: vec![],
        };
        assert_eq!(window_fraction(Some(&w)), 0.5);
        assert_eq!(estimated_duration_seconds(10, &crate::store::rate::Limits::unlimited(), 0, 1.0), None);
    }

    #[test]
    fn job_index_notation() {
        assert_eq!(count_indexes("1,3-5,9"), 5);
        assert_eq!(count_indexes(""), 0);
    }
}
