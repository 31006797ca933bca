//! What to record for one provider answer, and what it means for the rest of the batch.
//! Pure: the batch loop does the I/O.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::backoff::Backoff;
use crate::providers::{ErrorClass, SendOutcome};
use crate::store::messages::Outcome;

/// What the batch must do besides recording the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Nothing: go on.
    Continue,
    /// The channel is over its provider-side throughput: wait before the next block.
    SlowDown(Duration),
    /// Credentials, permissions, account or billing: stop the batch and ask a person.
    StopChannel {
        /// Provider code.
        code: String,
        /// What the provider said.
        message: String,
    },
    /// The campaign's message cannot be sent on this channel: stop this campaign only.
    StopCampaign {
        /// Provider code.
        code: String,
        /// What the provider said.
        message: String,
    },
}

/// How long a channel-level rate limit holds the message back when the provider gives
/// no hint (130429 recovers within seconds).
const DEFAULT_CHANNEL_BACKOFF: Duration = Duration::from_secs(10);

/// The longest any answer holds a message back: a provider's wait hint beyond a day
/// is a mistake, and a date further out could overflow.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Maps one answer to the outcome to record and the effect on the batch. `attempt` is
/// the attempt that just ran (1-based); `marketing_requeues` how often Meta's per-user
/// marketing limit put the message back before; `unit` is a random number in [0, 1)
/// for jitter.
pub(crate) fn decide(
    answer: &SendOutcome,
    attempt: u32,
    marketing_requeues: i16,
    backoff: &Backoff,
    now: DateTime<Utc>,
    unit: f64,
) -> (Outcome, Effect) {
    // Every wait is clamped to a day and the date computed with checked arithmetic, so
    // no answer can make the sender panic (only a clock near the end of chrono's
    // calendar falls back on `now`).
    let later = |d: Duration| {
        chrono::Duration::from_std(d.min(MAX_WAIT)).ok().and_then(|d| now.checked_add_signed(d)).unwrap_or(now)
    };
    match answer {
        SendOutcome::Accepted { provider_message_id } => {
            (Outcome::Sent { provider_message_id: provider_message_id.clone() }, Effect::Continue)
        }
        SendOutcome::Unknown { reason } => (Outcome::Unknown { reason: reason.clone() }, Effect::Continue),
        SendOutcome::Rejected(error) => match error.class {
            ErrorClass::Permanent => {
                (Outcome::Failed { code: error.code.clone(), message: error.message.clone() }, Effect::Continue)
            }
            ErrorClass::Retryable => {
                if backoff.may_retry(attempt) {
                    let delay = error.retry_after.unwrap_or_else(|| backoff.jittered(attempt, unit));
                    (
                        Outcome::RetryAt { at: later(delay), code: error.code.clone(), message: error.message.clone() },
                        Effect::Continue,
                    )
                } else {
                    let message = format!("{} (gave up after {attempt} attempts)", error.message);
                    (Outcome::Failed { code: error.code.clone(), message }, Effect::Continue)
                }
            }
            // Throughput limits are the channel's, not the message's: no attempt is spent.
            ErrorClass::RateLimitedChannel => {
                let wait = error.retry_after.unwrap_or(DEFAULT_CHANNEL_BACKOFF).min(MAX_WAIT);
                (Outcome::Requeue { at: later(wait) }, Effect::SlowDown(wait))
            }
            // A pair-rate limit holds back this recipient only; other messages go on.
            ErrorClass::RateLimitedRecipient => {
                let wait =
                    error.retry_after.unwrap_or_else(|| crate::providers::pair_rate_backoff(attempt.saturating_sub(1)));
                if backoff.may_retry(attempt) {
                    (
                        Outcome::RetryAt { at: later(wait), code: error.code.clone(), message: error.message.clone() },
                        Effect::Continue,
                    )
                } else {
                    (Outcome::Failed { code: error.code.clone(), message: error.message.clone() }, Effect::Continue)
                }
            }
            ErrorClass::MarketingLimited => match crate::account::marketing_requeue_at(marketing_requeues, now) {
                Some(at) => (Outcome::MarketingHeld { at, message: error.message.clone() }, Effect::Continue),
                None => (
                    Outcome::Failed {
                        code: error.code.clone(),
                        message: format!(
                            "{} (withheld by Meta's per-user marketing limit {} times)",
                            error.message,
                            crate::account::MARKETING_REQUEUES + 1
                        ),
                    },
                    Effect::Continue,
                ),
            },
            ErrorClass::StopChannel => (
                Outcome::Requeue { at: now },
                Effect::StopChannel { code: error.code.clone(), message: error.message.clone() },
            ),
            ErrorClass::StopCampaign => (
                Outcome::Requeue { at: now },
                Effect::StopCampaign { code: error.code.clone(), message: error.message.clone() },
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderError;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
    }

    fn backoff() -> Backoff {
        Backoff::from(&crate::api::RetryPolicy::default())
    }

    fn rejected(class: ErrorClass, code: &str) -> SendOutcome {
        SendOutcome::Rejected(ProviderError { class, code: code.into(), message: "m".into(), retry_after: None })
    }

    #[test]
    fn accepted_is_sent_with_its_id() {
        let (o, e) =
            decide(&SendOutcome::Accepted { provider_message_id: "wamid.1".into() }, 1, 0, &backoff(), now(), 0.5);
        assert_eq!(o, Outcome::Sent { provider_message_id: "wamid.1".into() });
        assert_eq!(e, Effect::Continue);
    }

    #[test]
    fn retryable_errors_back_off_60_120_240_then_fail() {
        let retry_at = |attempt: u32, unit: f64| match decide(
            &rejected(ErrorClass::Retryable, "131000"),
            attempt,
            0,
            &backoff(),
            now(),
            unit,
        )
        .0
        {
            Outcome::RetryAt { at, code, .. } => {
                assert_eq!(code, "131000");
                Some((at - now()).num_seconds())
            }
            Outcome::Failed { code, message } => {
                assert_eq!(code, "131000");
                assert!(message.contains("gave up after 4 attempts"), "{message}");
                None
            }
            other => panic!("{other:?}"),
        };
        assert_eq!([1, 2, 3, 4].map(|a| retry_at(a, 0.0)), [Some(60), Some(120), Some(240), None]);
        // Jitter only lengthens: at most a fifth more.
        assert_eq!([1, 2, 3].map(|a| retry_at(a, 0.5)), [Some(66), Some(132), Some(264)]);
    }

    #[test]
    fn a_provider_wait_hint_replaces_the_schedule() {
        let answer = SendOutcome::Rejected(ProviderError {
            class: ErrorClass::Retryable,
            code: "131057".into(),
            message: "m".into(),
            retry_after: Some(Duration::from_secs(60)),
        });
        let (o, _) = decide(&answer, 3, 0, &backoff(), now(), 0.9);
        assert!(matches!(o, Outcome::RetryAt { at, .. } if at == now() + chrono::Duration::seconds(60)), "{o:?}");
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let (o, _) = decide(&rejected(ErrorClass::Permanent, "131026"), 1, 0, &backoff(), now(), 0.0);
        assert!(matches!(o, Outcome::Failed { ref code, .. } if code == "131026"));
    }

    #[test]
    fn channel_limits_requeue_without_spending_an_attempt() {
        let (o, e) = decide(&rejected(ErrorClass::RateLimitedChannel, "130429"), 1, 0, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Requeue { at: now() + chrono::Duration::seconds(10) });
        assert_eq!(e, Effect::SlowDown(Duration::from_secs(10)));
    }

    #[test]
    fn stop_the_channel_requeues_and_stops() {
        let (o, e) = decide(&rejected(ErrorClass::StopChannel, "190"), 1, 0, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Requeue { at: now() });
        assert!(matches!(e, Effect::StopChannel { ref code, .. } if code == "190"));
    }

    #[test]
    fn stop_the_campaign_requeues_and_stops_only_the_campaign() {
        let (o, e) = decide(&rejected(ErrorClass::StopCampaign, "132015"), 1, 0, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Requeue { at: now() });
        assert!(matches!(e, Effect::StopCampaign { ref code, .. } if code == "132015"), "{e:?}");
    }

    #[test]
    fn unknown_is_never_retried() {
        let (o, _) = decide(&SendOutcome::Unknown { reason: "timeout".into() }, 1, 0, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Unknown { reason: "timeout".into() });
    }

    #[test]
    fn the_marketing_limit_requeues_after_growing_delays_then_fails() {
        let held =
            |requeues| decide(&rejected(ErrorClass::MarketingLimited, "131049"), 4, requeues, &backoff(), now(), 0.0);
        assert!(
            matches!(held(0), (Outcome::MarketingHeld { at, .. }, Effect::Continue) if at == now() + chrono::Duration::hours(24)),
            "131049 is not a failure and spends no attempt, even past the retry limit"
        );
        assert!(matches!(held(2), (Outcome::MarketingHeld { at, .. }, _) if at == now() + chrono::Duration::hours(96)));
        assert!(matches!(held(3), (Outcome::Failed { code, .. }, _) if code == "131049"));
    }

    #[test]
    fn a_wait_too_long_for_a_date_neither_panics_nor_retries_at_once() {
        // 10^13 s does not fit a chrono duration; 9·10^12 s does but overflows the date.
        for secs in [10_000_000_000_000u64, 9_000_000_000_000, u64::MAX] {
            let wait = Some(Duration::from_secs(secs));
            for class in [ErrorClass::Retryable, ErrorClass::RateLimitedChannel, ErrorClass::RateLimitedRecipient] {
                let answer = SendOutcome::Rejected(ProviderError {
                    class,
                    code: "x".into(),
                    message: "m".into(),
                    retry_after: wait,
                });
                let (o, e) = decide(&answer, 1, 0, &backoff(), now(), 0.0);
                let at = match o {
                    Outcome::RetryAt { at, .. } | Outcome::Requeue { at } => at,
                    other => panic!("{class:?}: {other:?}"),
                };
                assert_eq!(at, now() + chrono::Duration::seconds(MAX_WAIT.as_secs() as i64), "{class:?} {secs}");
                if let Effect::SlowDown(d) = e {
                    assert_eq!(d, MAX_WAIT);
                }
            }
        }
    }
}
