//! The provider clients: Meta WhatsApp Cloud API and Evolution API v2 behind one trait.
//!
//! This module owns what a provider *says*: the wire formats of a send
//! ([`meta`], [`evolution`]), the one HTTP path both share (`transport`), and the
//! table that turns a provider's error into what the sender should do about it
//! ([`classify`]). It leaves rate limiting, retry scheduling and recording outcomes to
//! the sender, and webhooks to the webhook service (which reuses [`signature`] and
//! [`classify`]).
//!
//! A send has exactly three endings ([`SendOutcome`]): the provider accepted the
//! message and gave its id; it refused it and said why; or we cannot know. The third
//! exists because neither provider has an idempotency key: a request that may have
//! reached the provider must never be re-sent silently, or a contact gets the message
//! twice.

pub mod classify;
pub mod evolution;
pub mod meta;
mod secret;
pub mod signature;
mod transport;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::api::Provider;
pub use classify::{Answer, classify_evolution, classify_meta, classify_meta_webhook, pair_rate_backoff};
pub use secret::Secret;
pub use transport::{Timeouts, http_client};

/// Errors of this module's own operations (building clients, reading connection
/// state). A *send* never fails with this type: its answer is a [`SendOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared HTTP client could not be built (TLS setup).
    #[error("building the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// The connect timeout must leave room for the request, or a slow connect would be
    /// reported as a lost response instead of a request that never left.
    #[error("connect timeout ({connect:?}) must be shorter than the request timeout ({request:?})")]
    InvalidTimeouts {
        /// Configured connect timeout.
        connect: Duration,
        /// Configured request timeout.
        request: Duration,
    },
    /// The request did not complete (network, timeout).
    #[error("request to {provider} failed")]
    Transport {
        /// Which provider was called.
        provider: Provider,
        /// The HTTP error (never carries credentials: they travel in sensitive headers).
        #[source]
        source: reqwest::Error,
    },
    /// The provider answered with an error.
    #[error("{provider} rejected the request: {error}")]
    Rejected {
        /// Which provider answered.
        provider: Provider,
        /// The classified error.
        error: ProviderError,
    },
    /// The provider answered with a body we cannot read (a 2xx that is not a success
    /// body, or an error that is not the provider's own).
    #[error("{provider} answered HTTP {status} with an unexpected body: {reason}")]
    UnexpectedResponse {
        /// Which provider answered.
        provider: Provider,
        /// HTTP status.
        status: u16,
        /// What was wrong with the body.
        reason: String,
    },
}

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One message to one recipient, already rendered for that contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// Recipient in E.164 with the leading `+` (the form contacts are stored in). Each
    /// client converts it to what its provider wants (digits only).
    pub to: String,
    /// What to send.
    pub content: Content,
    /// Our message id. Meta echoes it in every status webhook as
    /// `biz_opaque_callback_data`, which lets a webhook resolve a message whose send
    /// ended `Unknown` (no WAMID was ever recorded). Evolution has no such field.
    pub callback_data: String,
}

/// The content of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A pre-approved Meta template; the only kind that may open a conversation.
    Template {
        /// Template name as approved in WhatsApp Manager.
        name: String,
        /// Language code, e.g. `pt_BR`.
        language: String,
        /// Body parameters in order (`{{1}}`, `{{2}}`, ...), already rendered.
        body_parameters: Vec<String>,
    },
    /// Free text (Meta: only inside the 24 h customer-service window; Evolution: always).
    Text(String),
}

/// How a send ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// The provider accepted the message. Not delivered yet: delivery comes by webhook.
    Accepted {
        /// Meta WAMID or Evolution `key.id`: the key every later webhook carries.
        provider_message_id: String,
    },
    /// The provider refused the message, or the request provably never left (then the
    /// code is `network` and the class `Retryable`).
    Rejected(ProviderError),
    /// The request may have reached the provider and nothing shows it was refused
    /// (timeout after the request was written, connection reset before the response,
    /// unreadable 2xx, a gateway's 5xx page instead of the provider's error body,
    /// Evolution's "Error: Timed Out"). Never re-send such a message automatically: a
    /// webhook may still resolve it.
    Unknown {
        /// What happened, for the message's history.
        reason: String,
    },
}

/// A refusal, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// What the sender should do.
    pub class: ErrorClass,
    /// The provider's code as text, kept for the error breakdown: Meta's numeric code
    /// (`"131026"`), `http_<status>` when the body had none, `network`, or an
    /// `evolution_*` name (Evolution has no codes).
    pub code: String,
    /// The provider's explanation (Meta: `message` and `error_data.details`).
    pub message: String,
    /// How long the provider suggests waiting, when known (a `Retry-After` header or a
    /// documented hint such as ~60 s for 131057).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// A request that provably never reached the provider (connect refused, DNS
    /// failure, connect timeout): safe to retry.
    pub fn network(message: impl Into<String>) -> Self {
        ProviderError {
            class: ErrorClass::Retryable,
            code: "network".to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.class.as_str(), self.message)
    }
}

/// What a provider error means for the campaign (docs/providers.md section C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient: retry the same message later with backoff, a bounded number of times.
    Retryable,
    /// The channel as a whole is over a limit (throughput, call budget, spam limit, an
    /// Evolution instance whose WhatsApp connection dropped): slow down or pause the
    /// channel. The message stays pending and spends no attempt.
    RateLimitedChannel,
    /// Too many messages to this one recipient (Meta 131056): back this recipient off
    /// (see [`pair_rate_backoff`]) and keep sending to the others.
    RateLimitedRecipient,
    /// This message can never succeed (not a WhatsApp number, opted out, bad template
    /// data): fail it at once.
    Permanent,
    /// Credentials, permissions, a locked or unpaid account, an unregistered number:
    /// every further message of every campaign would fail the same way. Stop and ask a
    /// person instead of burning the audience. Only the provider's own error body
    /// proves this; a bare HTTP status never does.
    StopChannel,
    /// This campaign's message cannot be sent on this channel (a template paused or
    /// disabled by Meta, a template on a provider without templates): every message of
    /// the campaign would fail the same way, other campaigns of the channel are fine.
    /// Stop the campaign, never the channel.
    StopCampaign,
    /// Meta withheld this marketing message under its per-user limit across all
    /// businesses (131049): not a failure; try this recipient again after growing
    /// delays of a day or more (`account::marketing_requeue_at`).
    MarketingLimited,
}

impl ErrorClass {
    /// Stable lowercase name for metrics labels and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::RateLimitedChannel => "rate_limited_channel",
            ErrorClass::RateLimitedRecipient => "rate_limited_recipient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::StopChannel => "stop_channel",
            ErrorClass::StopCampaign => "stop_campaign",
            ErrorClass::MarketingLimited => "marketing_limited",
        }
    }
}

/// A provider that sends one message at a time. Implementations hold their
/// credentials and share one pooled HTTP client; they never retry on their own (the
/// sender decides, from the outcome, with its rate limiter and retry policy in view).
#[async_trait]
pub trait ProviderClient: Send + Sync {
    /// Sends one message. Never panics and never returns an error type: every ending is
    /// a [`SendOutcome`].
    async fn send(&self, msg: &OutboundMessage) -> SendOutcome;

    /// Which provider this client speaks to (labels, logs).
    fn provider(&self) -> Provider;
}

/// A phone number for logs: the country and area prefix and the last four digits
/// stay, four digits in between are masked (`+5511999999999` → `+55119****9999`).
/// Logs never carry a full number.
pub(crate) fn mask_phone(phone: &str) -> String {
    let (plus, digits) = match phone.strip_prefix('+') {
        Some(rest) => ("+", rest),
        None => ("", phone),
    };
    let chars: Vec<char> = digits.chars().collect();
    let n = chars.len();
    if n < 8 {
        let keep = n.min(2);
        let masked: String = std::iter::repeat_n('*', n - keep).chain(chars[n - keep..].iter().copied()).collect();
        return format!("{plus}{masked}");
    }
    let prefix: String = chars[..n - 8].iter().collect();
    let suffix: String = chars[n - 4..].iter().collect();
    format!("{plus}{prefix}****{suffix}")
}

/// The digits of an E.164 number (`+5511...` → `5511...`), as both providers want them,
/// or `None` when it is not a plausible number: such a message is refused before any
/// request is made.
pub(crate) fn recipient_digits(to: &str) -> Option<&str> {
    let digits = to.strip_prefix('+').unwrap_or(to);
    let plausible = (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    plausible.then_some(digits)
}

/// The refusal for a recipient that is not a phone number: permanent, no request made.
fn invalid_recipient(to: &str) -> ProviderError {
    ProviderError {
        class: ErrorClass::Permanent,
        code: "invalid_recipient".to_owned(),
        message: format!("recipient {} is not an E.164 phone number", mask_phone(to)),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_masked_in_the_middle() {
        assert_eq!(mask_phone("+5511999999999"), "+55119****9999");
        assert_eq!(mask_phone("+15551234567"), "+155****4567");
        assert_eq!(mask_phone("5511988887777"), "55119****7777");
        assert_eq!(mask_phone("+12345"), "+***45");
        assert_eq!(mask_phone(""), "");
    }

    #[test]
    fn recipients_become_digits() {
        assert_eq!(recipient_digits("+5511999999999"), Some("5511999999999"));
        assert_eq!(recipient_digits("15551234567"), Some("15551234567"));
        assert_eq!(recipient_digits("+55 11 9999"), None);
        assert_eq!(recipient_digits("+"), None);
        assert_eq!(recipient_digits("+1234567890123456"), None);
    }

    #[test]
    fn error_classes_have_stable_labels() {
        assert_eq!(ErrorClass::RateLimitedRecipient.as_str(), "rate_limited_recipient");
        assert_eq!(serde_json::to_string(&ErrorClass::StopChannel).ok().as_deref(), Some("\"stop_channel\""));
    }
}
