//! What a webhook says, in the service's own terms, whichever provider sent it: the
//! statuses of our outbound messages, the inbound messages (for opt-outs), and what was
//! acknowledged but ignored (counted, never an error).

use chrono::{DateTime, TimeZone, Utc};

use super::signals::{AccountSignal, SignalField};
use crate::store::receipts::{Pricing, Provider, ProviderError, ReceiptStatus, StatusEvent};

/// A status a provider reported, not yet bound to an organization.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedStatus {
    /// WAMID (Meta) or key id (Evolution).
    pub provider_message_id: String,
    /// Our message id, when the provider echoed it (`biz_opaque_callback_data`).
    pub message_id: Option<i64>,
    /// Its campaign, when the provider echoed it (`biz_opaque_callback_data` in the
    /// current format, docs/providers.md A1).
    pub campaign: Option<uuid::Uuid>,
    /// The mapped status.
    pub status: ReceiptStatus,
    /// The provider's timestamp, or the receive time when it sends none.
    pub at: DateTime<Utc>,
    /// The error of a `failed` status.
    pub error: Option<ProviderError>,
    /// The recipient's WhatsApp id (digits), when the payload names a phone number.
    pub recipient: Option<String>,
    /// The failure means the recipient opted out (Meta 131050).
    pub opts_out: bool,
    /// The recipient's business-scoped user id (Meta `recipient_user_id`), when given.
    pub recipient_bsuid: Option<String>,
    /// What the provider says it charges for the message (Meta `pricing`).
    pub pricing: Option<Pricing>,
}

impl ReportedStatus {
    /// The status bound to the organization and channel whose URL it was posted at.
    pub(crate) fn into_event(self, provider: Provider, organization: &str, channel: &str) -> StatusEvent {
        StatusEvent {
            provider,
            organization: organization.to_owned(),
            channel: channel.to_owned(),
            provider_message_id: self.provider_message_id,
            message_id: self.message_id,
            campaign: self.campaign,
            status: self.status,
            at: self.at,
            error: self.error,
            recipient: self.recipient,
            opts_out: self.opts_out,
            recipient_bsuid: self.recipient_bsuid,
            pricing: self.pricing,
        }
    }
}

/// A message a user sent to the business number, from a phone number, a
/// business-scoped user id, or both (Meta may leave out the phone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The sender's WhatsApp id (digits only). Never logged in full.
    pub from: Option<String>,
    /// The sender's business-scoped user id (Meta `from_user_id` or the contact's `user_id`).
    pub from_bsuid: Option<String>,
    /// Its text (text body, button text or reply title), if it has any.
    pub text: Option<String>,
}

/// Why part of a payload was acknowledged without effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// A Meta change whose `field` is not `messages` (account, template, quality updates).
    OtherField,
    /// An Evolution event other than `messages.update`/`messages.upsert`.
    OtherEvent,
    /// A status with no delivery meaning: Meta `deleted`/`warning`, Evolution `PENDING`/`DELETED`, or unknown.
    NonDeliveryStatus,
    /// Meta `value.errors`: an app-level error not tied to one message.
    ErrorsNotice,
    /// A receipt about a message the business did not send (Evolution `fromMe: false`).
    NotOurs,
    /// An item that lacks what it needs (no id, an id that cannot be ours).
    InvalidItem,
}

impl Ignored {
    /// Snake-case name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::OtherField => "other_field",
            Ignored::OtherEvent => "other_event",
            Ignored::NonDeliveryStatus => "non_delivery_status",
            Ignored::ErrorsNotice => "errors_notice",
            Ignored::NotOurs => "not_ours",
            Ignored::InvalidItem => "invalid_item",
        }
    }
}

/// Everything one webhook body says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notification {
    /// Statuses of outbound messages, in payload order.
    pub statuses: Vec<ReportedStatus>,
    /// Inbound messages, in payload order.
    pub inbound: Vec<InboundMessage>,
    /// Account health signals (Meta's account, number and template fields), in payload
    /// order; the field of a change that could not be understood as an error.
    pub signals: Vec<Result<AccountSignal, SignalField>>,
    /// What was skipped, one entry per item.
    pub ignored: Vec<Ignored>,
}

/// A body that is not a webhook payload at all; the reason goes back in the 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Parses the body as a JSON object (serde_json bounds nesting depth, so no input can
/// exhaust the stack).
pub(crate) fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ParseError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ParseError("the body must be a JSON object".into())),
        Err(error) => Err(ParseError(format!("invalid JSON: {error}"))),
    }
}

/// Longest provider id accepted (WAMIDs are about 60 characters, Evolution ids 20-32).
const MAX_ID_LEN: usize = 256;
/// Longest error title or inbound text kept.
const MAX_TEXT_CHARS: usize = 512;

/// A provider id fit to store and look up: non-empty, bounded, printable (Postgres text
/// cannot hold NUL, and an id with control characters is not one the provider gave us).
pub(crate) fn clean_id(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)).then(|| id.to_owned())
}

/// Text fit to store: without control characters (NUL breaks Postgres text and JSONB),
/// at most [`MAX_TEXT_CHARS`] characters.
pub(crate) fn clean_text(text: &str) -> String {
    text.chars().filter(|c| !c.is_control() || *c == '\n').take(MAX_TEXT_CHARS).collect()
}

/// Provider timestamps are Unix seconds (Meta sends them as strings). Values outside
/// 2000..2200 are not believable and fall back to the receive time.
pub(crate) fn unix_seconds(value: Option<&serde_json::Value>, received_at: DateTime<Utc>) -> DateTime<Utc> {
    const MIN: i64 = 946_684_800; // 2000-01-01
    const MAX: i64 = 7_258_118_400; // 2200-01-01
    let seconds = match value {
        Some(serde_json::Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    seconds.filter(|s| (MIN..MAX).contains(s)).and_then(|s| Utc.timestamp_opt(s, 0).single()).unwrap_or(received_at)
}

/// Digits of a WhatsApp id or JID (`5511999999999@s.whatsapp.net` → `5511999999999`),
/// if it names a phone number (7 to 15 digits).
pub(crate) fn wa_digits(id: &str) -> Option<String> {
    let (user, domain) = id.split_once('@').map_or((id, None), |(u, d)| (u, Some(d)));
    // groups (`@g.us`), broadcast lists and privacy ids (`@lid`) are not phone numbers
    if domain.is_some_and(|d| d != "s.whatsapp.net" && d != "c.us") {
        return None;
    }
    let user = user.split(':').next().unwrap_or(user); // device suffix `number:12@...`
    let digits: String = user.trim_start_matches('+').chars().collect();
    (digits.len() >= 7 && digits.len() <= 15 && digits.chars().all(|c| c.is_ascii_digit())).then_some(digits)
}

/// Longest business-scoped user id: a two-letter country code, a dot, and up to 128
/// alphanumerics (docs/providers.md, "Account health signals").
const MAX_BSUID_LEN: usize = 131;

/// A business-scoped user id fit to store and look up (`BR.1502576394655843`): a
/// two-letter country code, a dot, alphanumerics; None for anything else.
pub(crate) fn bsuid(id: &str) -> Option<String> {
    let id = id.trim();
    let (country, rest) = id.split_once('.')?;
    let fits = id.len() <= MAX_BSUID_LEN
        && country.len() == 2
        && country.chars().all(|c| c.is_ascii_alphabetic())
        && !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_alphanumeric());
    fits.then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps() {
        let now = Utc::now();
        assert_eq!(unix_seconds(Some(&json!("1750263773")), now).timestamp(), 1_750_263_773);
        assert_eq!(unix_seconds(Some(&json!(1_750_263_773)), now).timestamp(), 1_750_263_773);
        for odd in [json!("x"), json!(-1), json!("99999999999999999"), json!(1.5), json!(null)] {
            assert_eq!(unix_seconds(Some(&odd), now), now, "{odd}");
        }
        assert_eq!(unix_seconds(None, now), now);
    }

    #[test]
    fn ids_and_texts() {
        assert_eq!(clean_id(" wamid.X "), Some("wamid.X".into()));
        assert_eq!(clean_id(""), None);
        assert_eq!(clean_id("a\u{0}b"), None);
        assert_eq!(clean_id(&"x".repeat(300)), None);
        assert_eq!(clean_text("a\u{0}b\nc"), "ab\nc");
        assert_eq!(clean_text(&"é".repeat(1000)).chars().count(), MAX_TEXT_CHARS);
        assert_eq!(wa_digits("5511999999999@s.whatsapp.net"), Some("5511999999999".into()));
        assert_eq!(wa_digits("5511999999999:3@s.whatsapp.net"), Some("5511999999999".into()));
        assert_eq!(wa_digits("15550123456"), Some("15550123456".into()));
        assert_eq!(wa_digits("120363025246125888@g.us"), None, "groups are not people");
        assert_eq!(wa_digits("abc"), None);
        assert_eq!(wa_digits("123456789012345@lid"), None, "privacy ids are not phone numbers");
        assert_eq!(bsuid("BR.1502576394655843"), Some("BR.1502576394655843".into()));
        assert_eq!(bsuid(" US.abcXYZ09 "), Some("US.abcXYZ09".into()));
        for odd in [
            "1502576394655843",
            "BR.",
            "BRA.123",
            "B1.123",
            "BR.12-3",
            "BR.1.2",
            "",
            &format!("BR.{}", "9".repeat(129)),
        ] {
            assert_eq!(bsuid(odd), None, "{odd}");
        }
    }
}
