//! What to record for one provider answer, and what it means for the rest of the batch.
//! Pure: the batch loop does the I/O.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::backoff::Backoff;
use crate::providers::{ErrorClass, SendOutcome};
use crate::store::messages::Outcome;

/// What the batch must do besides recording the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
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

/// Maps one answer to the outcome to record and the effect on the batch. `attempt` is
/// the attempt that just ran (1-based); `unit` is a random number in [0, 1) for jitter.
pub fn decide(answer: &SendOutcome, attempt: u32, backoff: &Backoff, now: DateTime<Utc>, unit: f64) -> (Outcome, Effect) {
    let later = |d: Duration| now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
    match answer {
        SendOutcome::Accepted { provider_message_id } => {
            (Outcome::Sent { provider_message_id: provider_message_id.clone() }, Effect::Continue)
        }
        SendOutcome::Unknown { reason } => (Outcome::Unknown { reason: reason.clone() }, Effect::Continue),
        SendOutcome::Rejected(error) => match error.class {
            ErrorClass::Permanent => (Outcome::Failed { code: error.code.clone(), message: error.message.clone() }, Effect::Continue),
            ErrorClass::Retryable => {
                if backoff.may_retry(attempt) {
                    let delay = error.retry_after.unwrap_or_else(|| backoff.jittered(attempt, unit));
                    (Outcome::RetryAt { at: later(delay), code: error.code.clone(), message: error.message.clone() }, Effect::Continue)
                } else {
                    let message = format!("{} (gave up after {attempt} attempts)", error.message);
                    (Outcome::Failed { code: error.code.clone(), message }, Effect::Continue)
                }
            }
            // Throughput limits are the channel's, not the message's: no attempt is spent.
            ErrorClass::RateLimitedChannel => {
                let wait = error.retry_after.unwrap_or(DEFAULT_CHANNEL_BACKOFF);
                (Outcome::Requeue { at: later(wait) }, Effect::SlowDown(wait))
            }
            // A pair-rate limit holds back this recipient only; other messages go on.
            ErrorClass::RateLimitedRecipient => {
                let wait = error.retry_after.unwrap_or_else(|| crate::providers::pair_rate_backoff(attempt.saturating_sub(1)));
                if backoff.may_retry(attempt) {
                    (Outcome::RetryAt { at: later(wait), code: error.code.clone(), message: error.message.clone() }, Effect::Continue)
                } else {
                    (Outcome::Failed { code: error.code.clone(), message: error.message.clone() }, Effect::Continue)
                }
            }
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
        Backoff { max_attempts: 3, base: Duration::from_secs(60), cap: Duration::from_secs(3600) }
    }

    fn rejected(class: ErrorClass, code: &str) -> SendOutcome {
        SendOutcome::Rejected(ProviderError { class, code: code.into(), message: "m".into(), retry_after: None })
    }

    #[test]
    fn accepted_is_sent_with_its_id() {
        let (o, e) = decide(&SendOutcome::Accepted { provider_message_id: "wamid.1".into() }, 1, &backoff(), now(), 0.5);
        assert_eq!(o, Outcome::Sent { provider_message_id: "wamid.1".into() });
        assert_eq!(e, Effect::Continue);
    }

    #[test]
    fn retryable_errors_back_off_then_fail_at_the_limit() {
        let (o, _) = decide(&rejected(ErrorClass::Retryable, "131000"), 1, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::RetryAt { at: now() + chrono::Duration::seconds(30), code: "131000".into(), message: "m".into() });
        let (o, _) = decide(&rejected(ErrorClass::Retryable, "131000"), 2, &backoff(), now(), 0.0);
        assert!(matches!(o, Outcome::RetryAt { at, .. } if at == now() + chrono::Duration::seconds(60)));
        let (o, _) = decide(&rejected(ErrorClass::Retryable, "131000"), 3, &backoff(), now(), 0.0);
        assert!(matches!(o, Outcome::Failed { ref code, .. } if code == "131000"));
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let (o, _) = decide(&rejected(ErrorClass::Permanent, "131026"), 1, &backoff(), now(), 0.0);
        assert!(matches!(o, Outcome::Failed { ref code, .. } if code == "131026"));
    }

    #[test]
    fn channel_limits_requeue_without_spending_an_attempt() {
        let (o, e) = decide(&rejected(ErrorClass::RateLimitedChannel, "130429"), 1, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Requeue { at: now() + chrono::Duration::seconds(10) });
        assert_eq!(e, Effect::SlowDown(Duration::from_secs(10)));
    }

    #[test]
    fn stop_the_channel_requeues_and_stops() {
        let (o, e) = decide(&rejected(ErrorClass::StopChannel, "190"), 1, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Requeue { at: now() });
        assert!(matches!(e, Effect::StopChannel { ref code, .. } if code == "190"));
    }

    #[test]
    fn unknown_is_never_retried() {
        let (o, _) = decide(&SendOutcome::Unknown { reason: "timeout".into() }, 1, &backoff(), now(), 0.0);
        assert_eq!(o, Outcome::Unknown { reason: "timeout".into() });
    }
}
