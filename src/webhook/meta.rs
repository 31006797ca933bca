//! Meta Cloud API webhook bodies (docs/providers.md A4/A5) → [`Notification`].
//!
//! Pure: bytes in, a notification out. Every level (`entry[]`, `changes[]`,
//! `statuses[]`, `messages[]`) is iterated; unknown fields are ignored; an item that
//! cannot be understood is counted as ignored instead of failing the whole payload,
//! because Meta would retry a rejected payload for a week and never succeed.
//!
//! `messages` changes carry statuses and inbound messages; the account health fields
//! (a number's quality, the portfolio's limit and restrictions, templates) are read by
//! [`super::signals::parse_change`]. People may be named by phone, by business-scoped
//! user id (BSUID), or both (docs/providers.md, "Account health signals").

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::notification::{
    Ignored, InboundMessage, Notification, ParseError, ReportedStatus, bsuid, clean_id, clean_text, parse_object,
    unix_seconds, wa_digits,
};
use super::signals::{SignalField, parse_change};
use crate::providers::meta::CallbackData;
use crate::store::receipts::{Pricing, ProviderError, ReceiptStatus};

/// Failure codes that mean the recipient opted out: 131050, "user has stopped marketing
/// messages" (they blocked this business's marketing, e.g. with the "Stop promotions"
/// button). Treated as an opt-out of everything, like a STOP keyword.
pub(crate) const OPT_OUT_ERROR_CODES: &[&str] = &["131050"];

/// Parses a notification. `received_at` stands in for missing timestamps.
pub fn parse(body: &[u8], received_at: DateTime<Utc>) -> Result<Notification, ParseError> {
    let root = parse_object(body)?;
    let mut out = Notification::default();
    for entry in items(root.get("entry")) {
        for change in items(entry.get("changes")) {
            let field = change.get("field").and_then(Value::as_str);
            let value = change.get("value");
            if let Some(signal) = field.and_then(SignalField::parse) {
                out.signals.push(parse_change(signal, entry.get("id"), value));
                continue;
            }
            if field != Some("messages") {
                out.ignored.push(Ignored::OtherField);
                continue;
            }
            for status in items(value.and_then(|v| v.get("statuses"))) {
                match parse_status(status, received_at) {
                    Ok(status) => out.statuses.push(status),
                    Err(ignored) => out.ignored.push(ignored),
                }
            }
            let contacts = items(value.and_then(|v| v.get("contacts")));
            for message in items(value.and_then(|v| v.get("messages"))) {
                match parse_inbound(message, contacts) {
                    Some(message) => out.inbound.push(message),
                    None => out.ignored.push(Ignored::InvalidItem),
                }
            }
            for _ in items(value.and_then(|v| v.get("errors"))) {
                out.ignored.push(Ignored::ErrorsNotice);
            }
        }
    }
    Ok(out)
}

/// The elements of a JSON array, or none when the value is missing or not an array.
fn items(value: Option<&Value>) -> &[Value] {
    value.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn text_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

/// Meta's status vocabulary. `played` (first play of a voice message) counts as read;
/// `deleted` and `warning` (On-Premises only) have no delivery meaning.
pub(crate) fn map_status(status: &str) -> Option<ReceiptStatus> {
    Some(match status {
        "sent" => ReceiptStatus::Sent,
        "delivered" => ReceiptStatus::Delivered,
        "read" | "played" => ReceiptStatus::Read,
        "failed" => ReceiptStatus::Failed,
        _ => return None,
    })
}

fn parse_status(item: &Value, received_at: DateTime<Utc>) -> Result<ReportedStatus, Ignored> {
    let status = item.get("status").and_then(Value::as_str).map(map_status).ok_or(Ignored::InvalidItem)?;
    let status = status.ok_or(Ignored::NonDeliveryStatus)?;
    let id = item.get("id").and_then(Value::as_str).and_then(clean_id).ok_or(Ignored::InvalidItem)?;
    let callback = item.get("biz_opaque_callback_data").and_then(Value::as_str).and_then(CallbackData::parse);
    let error = (status == ReceiptStatus::Failed).then(|| first_error(item)).flatten();
    let opts_out = error.as_ref().is_some_and(|e| OPT_OUT_ERROR_CODES.contains(&e.code.as_str()));
    // Meta may name the recipient by BSUID only (no `recipient_id`): the WAMID still finds the message.
    let recipient = item.get("recipient_id").and_then(Value::as_str).and_then(wa_digits);
    let recipient_bsuid = item.get("recipient_user_id").and_then(Value::as_str).and_then(bsuid);
    let at = unix_seconds(item.get("timestamp"), received_at);
    let pricing = item.get("pricing").and_then(parse_pricing);
    Ok(ReportedStatus {
        provider_message_id: id,
        message_id: callback.map(|c| c.message_id),
        campaign: callback.and_then(|c| c.campaign),
        status,
        at,
        error,
        recipient,
        opts_out,
        recipient_bsuid,
        pricing,
    })
}

/// Longest pricing category or type kept (Meta's are short words).
const MAX_PRICING_WORD: usize = 64;

/// `pricing: {category, type, pricing_model, billable}` → what is stored: the category
/// and type (the model is PMP for every status since July 2025; `billable` is deprecated).
fn parse_pricing(pricing: &Value) -> Option<Pricing> {
    let word = |key: &str| {
        pricing.get(key).and_then(Value::as_str).map(str::trim).filter(|w| {
            !w.is_empty()
                && w.len() <= MAX_PRICING_WORD
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    };
    let category = word("category").map(str::to_owned);
    let pricing_type = word("type").map(str::to_owned);
    (category.is_some() || pricing_type.is_some()).then_some(Pricing { category, pricing_type })
}

fn first_error(item: &Value) -> Option<ProviderError> {
    let error = items(item.get("errors")).first()?;
    let code = match error.get("code")? {
        Value::Number(n) => n.to_string(),
        Value::String(s) => clean_id(s)?,
        _ => return None,
    };
    let title =
        error.get("title").or_else(|| error.get("message")).and_then(Value::as_str).map(clean_text).unwrap_or_default();
    Some(ProviderError { code, title })
}

/// An inbound message, with its sender's phone (`from`) and BSUID (`from_user_id`);
/// what the message lacks is taken from its sender's entry in `contacts[]` (`wa_id`,
/// `user_id`): the entry with the same phone or BSUID, or the only entry. None when
/// neither names the sender.
fn parse_inbound(item: &Value, contacts: &[Value]) -> Option<InboundMessage> {
    let mut from = item.get("from").and_then(Value::as_str).and_then(wa_digits);
    let mut from_bsuid = item.get("from_user_id").and_then(Value::as_str).and_then(bsuid);
    let phone_of = |c: &Value| c.get("wa_id").and_then(Value::as_str).and_then(wa_digits);
    let bsuid_of = |c: &Value| c.get("user_id").and_then(Value::as_str).and_then(bsuid);
    let names = |c: &Value| from.is_some() && phone_of(c) == from || from_bsuid.is_some() && bsuid_of(c) == from_bsuid;
    // the only contact is the sender unless it names someone else
    let agrees = |c: &Value| {
        let (phone, id) = (phone_of(c), bsuid_of(c));
        (from.is_none() || phone.is_none() || phone == from)
            && (from_bsuid.is_none() || id.is_none() || id == from_bsuid)
    };
    let contact = contacts.iter().find(|c| names(c)).or(match contacts {
        [only] if agrees(only) => Some(only),
        _ => None,
    });
    if let Some(contact) = contact {
        from = from.or_else(|| phone_of(contact));
        from_bsuid = from_bsuid.or_else(|| bsuid_of(contact));
    }
    if from.is_none() && from_bsuid.is_none() {
        return None;
    }
    // Text bodies, and the quick-reply buttons of marketing templates ("Stop promotions").
    let text = text_at(item, &["text", "body"])
        .or_else(|| text_at(item, &["button", "text"]))
        .or_else(|| text_at(item, &["interactive", "button_reply", "title"]))
        .or_else(|| text_at(item, &["interactive", "list_reply", "title"]))
        .map(clean_text);
    Some(InboundMessage { from, from_bsuid, text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn fixture(name: &str) -> &'static str {
        match name {
            "sent" => include_str!("../../tests/fixtures/meta/sent.json"),
            "delivered" => include_str!("../../tests/fixtures/meta/delivered.json"),
            "read" => include_str!("../../tests/fixtures/meta/read.json"),
            "failed" => include_str!("../../tests/fixtures/meta/failed_131026.json"),
            "batch" => include_str!("../../tests/fixtures/meta/batch_out_of_order.json"),
            "inbound" => include_str!("../../tests/fixtures/meta/inbound_stop.json"),
            _ => unreachable!(),
        }
    }

    const RTCA: &str = "wamid.HBgLMTU1NTAxMjM0NTYVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA";

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(s, 0).unwrap()
    }

    #[test]
    fn single_status_examples() {
        let now = Utc::now();
        for (name, status, ts) in [
            ("sent", ReceiptStatus::Sent, 1_750_263_773),
            ("delivered", ReceiptStatus::Delivered, 1_750_263_779),
            ("read", ReceiptStatus::Read, 1_750_263_901),
        ] {
            let n = parse(fixture(name).as_bytes(), now).unwrap();
            assert_eq!(
                n.statuses,
                vec![ReportedStatus {
                    provider_message_id: RTCA.into(),
                    message_id: None,
                    campaign: None,
                    status,
                    at: at(ts),
                    error: None,
                    recipient: Some("15550123456".into()),
                    opts_out: false,
                    recipient_bsuid: None,
                    pricing: (name != "read")
                        .then(|| Pricing { category: Some("marketing".into()), pricing_type: Some("regular".into()) }),
                }],
                "{name}"
            );
            assert!(n.inbound.is_empty() && n.ignored.is_empty());
        }
        let failed = parse(fixture("failed").as_bytes(), now).unwrap();
        assert_eq!(failed.statuses.len(), 1);
        assert_eq!(failed.statuses[0].status, ReceiptStatus::Failed);
        assert_eq!(
            failed.statuses[0].error,
            Some(ProviderError { code: "131026".into(), title: "Message undeliverable".into() })
        );
        assert!(!failed.statuses[0].opts_out);
        let stopped = parse(fixture("failed").replace("131026", "131050").as_bytes(), now).unwrap();
        assert!(stopped.statuses[0].opts_out, "131050: the user stopped marketing messages");
        assert_eq!(stopped.statuses[0].recipient.as_deref(), Some("15550199999"));
    }

    #[test]
    fn batch_example_keeps_every_status_in_order() {
        let n = parse(fixture("batch").as_bytes(), Utc::now()).unwrap();
        let got: Vec<(&str, ReceiptStatus)> =
            n.statuses.iter().map(|s| (&s.provider_message_id[s.provider_message_id.len() - 4..], s.status)).collect();
        assert_eq!(
            got,
            vec![
                ("RTcA", ReceiptStatus::Read),
                ("RTcA", ReceiptStatus::Delivered),
                ("RTcA", ReceiptStatus::Sent),
                ("MjAA", ReceiptStatus::Delivered),
                ("NzEA", ReceiptStatus::Failed),
            ]
        );
        assert_eq!(n.statuses[4].error.as_ref().map(|e| e.code.as_str()), Some("131049"));
    }

    #[test]
    fn inbound_example_is_a_message_not_a_status() {
        let n = parse(fixture("inbound").as_bytes(), Utc::now()).unwrap();
        assert!(n.statuses.is_empty());
        assert_eq!(
            n.inbound,
            vec![InboundMessage { from: Some("15550123456".into()), from_bsuid: None, text: Some("STOP".into()) }]
        );
    }

    #[test]
    fn statuses_and_messages_may_name_people_by_bsuid_only() {
        let body = serde_json::json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
            {"field": "messages", "value": {"statuses": [
                {"id": "wamid.A", "status": "delivered", "timestamp": "1750263779", "recipient_user_id": "BR.1502576394655843",
                 "pricing": {"billable": true, "pricing_model": "PMP", "category": "utility"}},
                {"id": "wamid.B", "status": "read", "recipient_id": "15550123456", "recipient_user_id": "not a bsuid",
                 "pricing": {"category": "", "type": "x y"}}
            ]}},
            {"field": "messages", "value": {
                "contacts": [{"profile": {"name": "A"}, "user_id": "BR.1502576394655843"}],
                "messages": [{"id": "wamid.in", "type": "text", "text": {"body": "STOP"}}]}},
            {"field": "messages", "value": {
                "contacts": [{"wa_id": "15550123456", "user_id": "US.7"}, {"wa_id": "15550123457", "user_id": "US.8"}],
                "messages": [
                    {"from": "15550123457", "type": "text", "text": {"body": "hi"}},
                    {"from_user_id": "US.9", "type": "text", "text": {"body": "hi"}},
                    {"type": "text", "text": {"body": "who?"}}
                ]}},
            {"field": "messages", "value": {
                "contacts": [{"wa_id": "15550123456", "user_id": "US.7"}],
                "messages": [{"from": "15550999999", "type": "text", "text": {"body": "hi"}}]}}
        ]}]});
        let now = Utc::now();
        let n = parse(body.to_string().as_bytes(), now).unwrap();
        let pick: Vec<_> =
            n.statuses.iter().map(|s| (s.recipient.clone(), s.recipient_bsuid.clone(), s.pricing.clone())).collect();
        assert_eq!(
            pick,
            vec![
                (
                    None,
                    Some("BR.1502576394655843".into()),
                    Some(Pricing { category: Some("utility".into()), pricing_type: None })
                ),
                (Some("15550123456".into()), None, None),
            ]
        );
        let inbound = |from: Option<&str>, bsuid: Option<&str>, text: &str| InboundMessage {
            from: from.map(Into::into),
            from_bsuid: bsuid.map(Into::into),
            text: Some(text.into()),
        };
        assert_eq!(
            n.inbound,
            vec![
                inbound(None, Some("BR.1502576394655843"), "STOP"),
                inbound(Some("15550123457"), Some("US.8"), "hi"),
                inbound(None, Some("US.9"), "hi"),
                inbound(Some("15550999999"), None, "hi"),
            ],
            "the sender's contact entry fills in what the message lacks; the only entry unless it names someone else"
        );
        assert_eq!(n.ignored, vec![Ignored::InvalidItem], "a message naming nobody");
    }

    #[test]
    fn account_fields_are_signals_not_ignored() {
        let body = include_str!("../../tests/fixtures/meta/sent.json")
            .replace("\"field\": \"messages\"", "\"field\": \"message_template_quality_update\"");
        let n = parse(body.as_bytes(), Utc::now()).unwrap();
        assert!(n.statuses.is_empty() && n.ignored.is_empty());
        assert_eq!(n.signals, vec![Err(SignalField::TemplateQuality)], "no template name in it");
    }

    #[test]
    fn callback_data_only_in_the_senders_format() {
        let campaign = uuid::Uuid::new_v4();
        let status = |data: &str| {
            let body = serde_json::json!({"entry": [{"changes": [{"field": "messages", "value": {"statuses": [
                {"id": "wamid.B", "status": "read", "timestamp": "1750263773", "biz_opaque_callback_data": data}
            ]}}]}]});
            let n = parse(body.to_string().as_bytes(), Utc::now()).unwrap();
            (n.statuses[0].message_id, n.statuses[0].campaign)
        };
        assert_eq!(status(&format!("disparo:42:{campaign}")), (Some(42), Some(campaign)));
        assert_eq!(status("disparo:42"), (Some(42), None), "the format of older senders");
        assert_eq!(status("disparo:campaign=spring-sale:msg=42"), (None, None), "docs/providers.md A5.1 is not ours");
        assert_eq!(status("disparo:-1"), (None, None));
        assert_eq!(status("42"), (None, None));
    }

    #[test]
    fn odd_items_are_ignored_not_fatal() {
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [
                {"changes": [
                    {"field": "security", "value": {}},
                    {"field": "account_update", "value": {}},
                    {"field": "messages", "value": {
                        "statuses": [
                            {"id": "wamid.A", "status": "deleted", "timestamp": "1750263773"},
                            {"status": "read"},
                            {"id": 5, "status": "read"},
                            {"id": "wamid.B", "status": "played", "biz_opaque_callback_data": "disparo:7"},
                            "not an object"
                        ],
                        "errors": [{"code": 130429, "title": "Rate limit hit"}],
                        "messages": [{"from": "not-a-number", "type": "text", "text": {"body": "hi"}}]
                    }},
                    {"field": "messages"}
                ]},
                {"id": "no changes"},
                7
            ]
        });
        let now = Utc::now();
        let n = parse(body.to_string().as_bytes(), now).unwrap();
        assert_eq!(
            n.statuses,
            vec![ReportedStatus {
                provider_message_id: "wamid.B".into(),
                message_id: Some(7),
                campaign: None,
                status: ReceiptStatus::Read,
                at: now,
                error: None,
                recipient: None,
                opts_out: false,
                recipient_bsuid: None,
                pricing: None,
            }]
        );
        assert_eq!(
            n.ignored,
            vec![
                Ignored::OtherField,
                Ignored::NonDeliveryStatus,
                Ignored::InvalidItem,
                Ignored::InvalidItem,
                Ignored::InvalidItem,
                Ignored::InvalidItem,
                Ignored::ErrorsNotice
            ]
        );
        assert_eq!(n.signals, vec![Err(SignalField::Account)], "an account change without its WABA id");
    }

    #[test]
    fn what_is_not_a_payload() {
        for body in [&b""[..], b"{", b"[]", b"\"x\"", b"null", b"{\"a\":1}}"] {
            let result = parse(body, Utc::now());
            assert!(result.is_err(), "{}", String::from_utf8_lossy(body));
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(
            parse(format!("{{\"entry\":{deep}}}").as_bytes(), Utc::now()).is_err(),
            "deep nesting is refused, not a stack overflow"
        );
        assert_eq!(parse(b"{}", Utc::now()).unwrap(), Notification::default());
    }
}
