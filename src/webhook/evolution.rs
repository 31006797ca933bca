//! Evolution API v2 webhook bodies (docs/providers.md B2) → [`Notification`].
//!
//! Delivery receipts come as `messages.update` events (`data.keyId` is the id sendText
//! returned, `data.status` a Baileys status name); inbound messages, read for opt-outs,
//! come as `messages.upsert`. Everything else is acknowledged and counted. Evolution
//! sends no event timestamp we can trust (`date_time` is server-local time marked `Z`),
//! so statuses carry the receive time.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::notification::{
    Ignored, InboundMessage, Notification, ParseError, ReportedStatus, clean_id, clean_text, parse_object, wa_digits,
};
use crate::store::receipts::{ProviderError, ReceiptStatus};

/// What a status string of Evolution means for delivery tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvolutionStatus {
    /// A delivery status.
    Receipt(ReceiptStatus),
    /// Counted, no effect: `PENDING` (not acked yet), `DELETED` (Evolution's fallback
    /// when Baileys gives no status, e.g. edits), anything unknown.
    NoEffect,
}

/// Maps Baileys' names (`SERVER_ACK`, `DELIVERY_ACK`, `READ`, `PLAYED`, `ERROR`) and
/// the Cloud-API channel's (`SENT`, `DELIVERED`, `READ`, `FAILED`), in any case.
pub(crate) fn map_status(status: &str) -> EvolutionStatus {
    use EvolutionStatus::*;
    match status.trim().to_ascii_uppercase().as_str() {
        "SERVER_ACK" | "SENT" => Receipt(ReceiptStatus::Sent),
        "DELIVERY_ACK" | "DELIVERED" => Receipt(ReceiptStatus::Delivered),
        "READ" | "PLAYED" => Receipt(ReceiptStatus::Read),
        "ERROR" | "FAILED" => Receipt(ReceiptStatus::Failed),
        _ => NoEffect,
    }
}

/// The code recorded for an Evolution failure: Evolution forwards no WhatsApp error
/// code, only the status string.
pub(crate) const ERROR_CODE: &str = "evolution_error";

/// Parses one event. `received_at` is the time recorded for its statuses.
pub fn parse(body: &[u8], received_at: DateTime<Utc>) -> Result<Notification, ParseError> {
    let root = parse_object(body)?;
    let event = root.get("event").and_then(Value::as_str).ok_or_else(|| ParseError("missing \"event\"".into()))?;
    // `messages.update` in the body; `MESSAGES_UPDATE` in configuration and some versions
    let event = event.trim().to_ascii_lowercase().replace('_', ".");
    let data = root.get("data");
    // `data` is one object; accept an array of them too
    let items: Vec<&Value> = match data {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(item) => vec![item],
        None => vec![],
    };
    let mut out = Notification::default();
    match event.as_str() {
        "messages.update" => {
            for item in items {
                match parse_update(item, received_at) {
                    Ok(status) => out.statuses.push(status),
                    Err(ignored) => out.ignored.push(ignored),
                }
            }
        }
        "messages.upsert" => {
            for item in items {
                match parse_upsert(item) {
                    Ok(message) => out.inbound.push(message),
                    Err(ignored) => out.ignored.push(ignored),
                }
            }
        }
        _ => out.ignored.push(Ignored::OtherEvent),
    }
    Ok(out)
}

fn parse_update(item: &Value, received_at: DateTime<Utc>) -> Result<ReportedStatus, Ignored> {
    if item.get("fromMe").and_then(Value::as_bool) == Some(false) {
        return Err(Ignored::NotOurs);
    }
    let status = item.get("status").and_then(Value::as_str).ok_or(Ignored::InvalidItem)?;
    let EvolutionStatus::Receipt(status) = map_status(status) else {
        return Err(Ignored::NonDeliveryStatus);
    };
    let id = item.get("keyId").and_then(Value::as_str).and_then(clean_id).ok_or(Ignored::InvalidItem)?;
    let error = (status == ReceiptStatus::Failed).then(|| ProviderError {
        code: ERROR_CODE.to_owned(),
        title: "Evolution reported ERROR (no detail is forwarded)".to_owned(),
    });
    // The recipient finds an `unknown` message (its id never recorded): Evolution never
    // echoes our id. Privacy ids (`@lid`) name no phone and are left out.
    let recipient = item.get("remoteJid").and_then(Value::as_str).and_then(wa_digits);
    Ok(ReportedStatus {
        provider_message_id: id,
        message_id: None,
        campaign: None,
        status,
        at: received_at,
        error,
        recipient,
        opts_out: false,
        recipient_bsuid: None,
        pricing: None,
    })
}

fn parse_upsert(item: &Value) -> Result<InboundMessage, Ignored> {
    let key = item.get("key").ok_or(Ignored::InvalidItem)?;
    if key.get("fromMe").and_then(Value::as_bool) != Some(false) {
        return Err(Ignored::NotOurs);
    }
    // Newer WhatsApp versions address people by privacy id (`@lid`) and put the phone
    // JID beside it.
    let from = ["remoteJid", "senderPn", "remoteJidAlt"]
        .iter()
        .find_map(|field| key.get(*field).and_then(Value::as_str).and_then(wa_digits))
        .ok_or(Ignored::InvalidItem)?;
    let message = item.get("message");
    let text_at = |path: &[&str]| path.iter().try_fold(message?, |v, key| v.get(key))?.as_str();
    let text = text_at(&["conversation"])
        .or_else(|| text_at(&["extendedTextMessage", "text"]))
        .or_else(|| text_at(&["buttonsResponseMessage", "selectedDisplayText"]))
        .map(clean_text);
    Ok(InboundMessage { from: Some(from), from_bsuid: None, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENT: &str = include_str!("../../tests/fixtures/evolution/update_sent.json");
    const READ: &str = include_str!("../../tests/fixtures/evolution/update_read.json");
    const FAILED: &str = include_str!("../../tests/fixtures/evolution/update_error.json");

    #[test]
    fn examples_of_providers_md() {
        let now = Utc::now();
        for (body, id, status) in [
            (SENT, "3EB0A1B2C3D4E5F60718", ReceiptStatus::Sent),
            (READ, "3EB0A1B2C3D4E5F60718", ReceiptStatus::Read),
            (FAILED, "3EB0F9E8D7C6B5A40312", ReceiptStatus::Failed),
        ] {
            let n = parse(body.as_bytes(), now).unwrap();
            assert_eq!(n.statuses.len(), 1);
            let s = &n.statuses[0];
            assert_eq!((s.provider_message_id.as_str(), s.status, s.at), (id, status, now));
            assert_eq!(s.error.is_some(), status == ReceiptStatus::Failed);
            assert!(s.recipient.as_deref().is_some_and(|r| r.starts_with("55119")), "{:?}", s.recipient);
        }
    }

    #[test]
    fn status_names() {
        use EvolutionStatus::*;
        for (name, expected) in [
            ("SERVER_ACK", Receipt(ReceiptStatus::Sent)),
            ("DELIVERY_ACK", Receipt(ReceiptStatus::Delivered)),
            ("READ", Receipt(ReceiptStatus::Read)),
            ("PLAYED", Receipt(ReceiptStatus::Read)),
            ("ERROR", Receipt(ReceiptStatus::Failed)),
            ("SENT", Receipt(ReceiptStatus::Sent)),
            ("DELIVERED", Receipt(ReceiptStatus::Delivered)),
            ("failed", Receipt(ReceiptStatus::Failed)),
            ("PENDING", NoEffect),
            ("DELETED", NoEffect),
            ("", NoEffect),
        ] {
            assert_eq!(map_status(name), expected, "{name}");
        }
    }

    #[test]
    fn upserts_and_other_events() {
        let upsert = serde_json::json!({
            "event": "messages.upsert", "instance": "i",
            "data": {"key": {"remoteJid": "5511999999999@s.whatsapp.net", "fromMe": false, "id": "ABC"},
                     "message": {"conversation": "Sair"}, "messageType": "conversation"}
        });
        let n = parse(upsert.to_string().as_bytes(), Utc::now()).unwrap();
        assert_eq!(
            n.inbound,
            vec![InboundMessage { from: Some("5511999999999".into()), from_bsuid: None, text: Some("Sair".into()) }]
        );
        let lid = serde_json::json!({
            "event": "MESSAGES_UPSERT",
            "data": [{"key": {"remoteJid": "12345678901234@lid", "senderPn": "5511988887777@s.whatsapp.net", "fromMe": false},
                      "message": {"extendedTextMessage": {"text": "stop"}}},
                     {"key": {"remoteJid": "5511999999999@s.whatsapp.net", "fromMe": true}, "message": {"conversation": "STOP"}}]
        });
        let n = parse(lid.to_string().as_bytes(), Utc::now()).unwrap();
        assert_eq!(
            n.inbound,
            vec![InboundMessage { from: Some("5511988887777".into()), from_bsuid: None, text: Some("stop".into()) }]
        );
        assert_eq!(n.ignored, vec![Ignored::NotOurs]);
        let other = parse(br#"{"event":"connection.update","data":{"state":"open"}}"#, Utc::now()).unwrap();
        assert_eq!(other.ignored, vec![Ignored::OtherEvent]);
        let pending =
            parse(br#"{"event":"messages.update","data":{"keyId":"X","status":"PENDING","fromMe":true}}"#, Utc::now())
                .unwrap();
        assert_eq!(pending.ignored, vec![Ignored::NonDeliveryStatus]);
        let inbound_receipt =
            parse(br#"{"event":"messages.update","data":{"keyId":"X","status":"READ","fromMe":false}}"#, Utc::now())
                .unwrap();
        assert_eq!(inbound_receipt.ignored, vec![Ignored::NotOurs]);
        assert!(parse(br#"{"data":{}}"#, Utc::now()).is_err(), "an envelope names its event");
    }
}
