//! The simulated Evolution API: `POST /message/sendText/{instance}`,
//! `GET /instance/connectionState/{instance}`, `messages.update` webhooks, and the
//! `messages.upsert` of a person writing to the instance's number (docs/providers.md
//! B1, B2).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::debug;

use super::behaviour::{self, Batching, Fault, Status};
use super::control::Posted;
use super::ledger::{Accepted, Admission};
use super::server::{Shared, credential_matches, gateway_timeout};
use crate::api::Provider;
use crate::providers::evolution::{API_KEY_HEADER, ConnectionState};
use crate::providers::mask_phone;

/// What a `messages.update` needs to know about the message.
struct Sent {
    instance: String,
    instance_id: String,
    key_id: String,
    row_id: String,
    remote_jid: String,
    destination: String,
    owner_jid: String,
    server_url: String,
}

/// `POST /message/sendText/{instance}`. Guards run in Evolution's order: the instance
/// must exist, then the api key must match.
pub(crate) async fn send_text(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(state) = shared.instance_state(&instance) else {
        return error(StatusCode::NOT_FOUND, json!([format!("The \"{instance}\" instance does not exist")]));
    };
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, json!([["instance is not valid JSON"]]));
    };
    for field in ["number", "text"] {
        if !value.get(field).is_some_and(Value::is_string) {
            return error(StatusCode::BAD_REQUEST, json!([[format!("instance requires property \"{field}\"")]]));
        }
    }
    let number = value.get("number").and_then(Value::as_str).unwrap_or_default();
    let text = value.get("text").and_then(Value::as_str).unwrap_or_default();
    if text.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, json!(["Text is required"]));
    }

    let dice = shared.roll();
    if !shared.pause(dice.latency).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, json!("Connection Closed"));
    }
    match state {
        ConnectionState::Open => {}
        // The number check fails first when the socket is down (issue #1286)...
        ConnectionState::Close | ConnectionState::Unknown => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, json!("Connection Closed"));
        }
        // ...or the relay does, wrapped as "Error: ..." (issue #2229).
        ConnectionState::Connecting => return error(StatusCode::BAD_REQUEST, json!(["Error: Connection Closed"])),
    }
    let digits = behaviour::digits(number);
    let not_on_whatsapp = || {
        error(
            StatusCode::BAD_REQUEST,
            json!([{ "jid": format!("{digits}@s.whatsapp.net"), "exists": false, "number": digits }]),
        )
    };
    match dice.fault {
        Some(Fault::Retryable) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, json!("Internal Server Error (injected by the sandbox)"));
        }
        // Evolution has no pair limit; Baileys' rate-overlimit stands for both.
        Some(Fault::RateLimit | Fault::PairRate) => {
            return error(StatusCode::BAD_REQUEST, json!(["Error: rate-overlimit"]));
        }
        Some(Fault::Permanent) => return not_on_whatsapp(),
        Some(Fault::Code(_)) | None => {}
    }
    if digits.is_empty() || shared.is_undeliverable(&digits) {
        return not_on_whatsapp();
    }

    let (key_id, row_id) = {
        let mut rng = rand::rng();
        (behaviour::evolution_key_id(&mut rng), behaviour::evolution_row_id(&mut rng))
    };
    let recipient = format!("+{digits}");
    let entry = Accepted {
        at: shared.clock.now(),
        provider: Provider::Evolution,
        recipient: recipient.clone(),
        message_id: key_id.clone(),
        callback_data: None,
        template_category: None,
    };
    if shared.accept(entry, Admission::default()).is_err() {
        return error(StatusCode::BAD_REQUEST, json!(["Error: rate-overlimit"]));
    }
    debug!(recipient = %mask_phone(&recipient), instance = %instance, "evolution message accepted");
    let instance_id = shared.instance_ids.get(&instance).cloned().unwrap_or_default();
    let remote_jid = format!("{digits}@s.whatsapp.net");
    if let Some(target) = &shared.evolution_target {
        let posts = behaviour::plan(&mut rand::rng(), &shared.config.webhooks, None, Batching::Never);
        let sent = Sent {
            instance: instance.clone(),
            instance_id: instance_id.clone(),
            key_id: key_id.clone(),
            row_id,
            remote_jid: remote_jid.clone(),
            destination: target.url.clone(),
            owner_jid: format!("{}@s.whatsapp.net", shared.config.evolution.owner_number),
            server_url: shared.server_url.clone(),
        };
        shared.webhooks.dispatch(target.clone(), posts, move |statuses| update_body(&sent, statuses));
    }
    if shared.behind_gateway(&digits, &dice) {
        // The message is sent; a proxy in front answers instead of Evolution.
        return gateway_timeout();
    }
    if let Some(hold) = dice.hold {
        shared.pause(hold).await;
    }

    let record = json!({
        "key": { "remoteJid": remote_jid, "fromMe": true, "id": key_id },
        "pushName": "Você",
        "status": "PENDING",
        "message": { "conversation": text },
        "contextInfo": null,
        "messageType": "conversation",
        "messageTimestamp": Utc::now().timestamp(),
        "instanceId": instance_id,
        "source": "web",
    });
    (StatusCode::CREATED, Json(record)).into_response()
}

/// `GET /instance/connectionState/{instance}`.
pub async fn connection_state(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(state) = shared.instance_state(&instance) else {
        return error(StatusCode::NOT_FOUND, json!([format!("The \"{instance}\" instance does not exist")]));
    };
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let state = match state {
        ConnectionState::Open => "open",
        ConnectionState::Connecting => "connecting",
        ConnectionState::Close | ConnectionState::Unknown => "close",
    };
    Json(json!({ "instance": { "instanceName": instance, "state": state } })).into_response()
}

/// What a person writes to the instance's number.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inbound {
    /// The person's number (E.164 or digits).
    from: String,
    /// The text they write.
    text: String,
}

/// `POST /_sandbox/evolution/{instance}/inbound` `{"from", "text"}`: a person writes to
/// the instance's number; the sandbox posts the `messages.upsert` Evolution posts for it,
/// with the shared-secret header, and answers `{"webhooks": [{"field", "delivered"}]}`
/// once the receiver answered (so a rehearsal goes on knowing the receiver has it).
pub(crate) async fn post_inbound(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    body: Bytes,
) -> Response {
    if shared.instance_state(&instance).is_none() {
        return (StatusCode::NOT_FOUND, format!("no Evolution instance named {instance:?}")).into_response();
    }
    let inbound: Inbound = match serde_json::from_slice(&body) {
        Ok(inbound) => inbound,
        Err(why) => return (StatusCode::BAD_REQUEST, why.to_string()).into_response(),
    };
    let digits = behaviour::digits(&inbound.from);
    if digits.is_empty() || inbound.text.trim().is_empty() {
        return (StatusCode::BAD_REQUEST, "\"from\" needs digits and \"text\" some text").into_response();
    }
    let Some(target) = &shared.evolution_target else {
        return (StatusCode::CONFLICT, "evolution.webhook_url is not configured").into_response();
    };
    let received = Received {
        instance: instance.clone(),
        instance_id: shared.instance_ids.get(&instance).cloned().unwrap_or_default(),
        key_id: behaviour::evolution_key_id(&mut rand::rng()),
        remote_jid: format!("{digits}@s.whatsapp.net"),
        text: inbound.text,
        timestamp: shared.clock.now().timestamp(),
        destination: target.url.clone(),
        owner_jid: format!("{}@s.whatsapp.net", shared.config.evolution.owner_number),
        server_url: shared.server_url.clone(),
    };
    let body = serde_json::to_vec(&upsert_body(&received)).unwrap_or_default();
    let delivered = shared.webhooks.post_now(target, body).await;
    Json(json!({ "webhooks": [Posted { field: "messages.upsert".to_owned(), delivered }] })).into_response()
}

/// What a `messages.upsert` of an inbound text needs.
struct Received {
    instance: String,
    instance_id: String,
    key_id: String,
    remote_jid: String,
    text: String,
    timestamp: i64,
    destination: String,
    owner_jid: String,
    server_url: String,
}

/// The `messages.upsert` envelope of an inbound text: `data` is the stored message
/// record, the shape of the sendText answer with `fromMe: false` (docs/providers.md B2).
fn upsert_body(received: &Received) -> Value {
    json!({
        "event": "messages.upsert",
        "instance": received.instance,
        "data": {
            "key": { "remoteJid": received.remote_jid, "fromMe": false, "id": received.key_id },
            "pushName": "Contato",
            "status": "DELIVERY_ACK",
            "message": { "conversation": received.text },
            "messageType": "conversation",
            "messageTimestamp": received.timestamp,
            "instanceId": received.instance_id,
            "source": "android",
        },
        "destination": received.destination,
        "date_time": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "sender": received.owner_jid,
        "server_url": received.server_url,
        "apikey": null,
    })
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let presented = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok());
    presented.is_some_and(|key| credential_matches(key, shared.config.evolution.api_key.expose()))
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, json!("Unauthorized"))
}

/// Evolution's one error shape: `{status, error, response: {message}}`.
fn error(status: StatusCode, message: Value) -> Response {
    let body = json!({
        "status": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("Error"),
        "response": { "message": message },
    });
    (status, Json(body)).into_response()
}

/// The `messages.update` envelope for one status (Evolution posts one event per POST).
fn update_body(sent: &Sent, statuses: &[Status]) -> Vec<u8> {
    let status = match statuses.first() {
        Some(Status::Sent) | None => "SERVER_ACK",
        Some(Status::Delivered) => "DELIVERY_ACK",
        Some(Status::Read) => "READ",
        Some(Status::Failed(_)) => "ERROR",
    };
    let body = json!({
        "event": "messages.update",
        "instance": sent.instance,
        "data": {
            "keyId": sent.key_id,
            "remoteJid": sent.remote_jid,
            "fromMe": true,
            "status": status,
            "instanceId": sent.instance_id,
            "messageId": sent.row_id,
        },
        "destination": sent.destination,
        "date_time": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "sender": sent.owner_jid,
        "server_url": sent.server_url,
        "apikey": null,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_have_the_b2_envelope() {
        let sent = Sent {
            instance: "my-instance".into(),
            instance_id: "0b5c".into(),
            key_id: "3EB0A1".into(),
            row_id: "cmfy".into(),
            remote_jid: "5511999999999@s.whatsapp.net".into(),
            destination: "http://hook".into(),
            owner_jid: "5511988887777@s.whatsapp.net".into(),
            server_url: "http://sandbox".into(),
        };
        for (status, expected) in [
            (Status::Sent, "SERVER_ACK"),
            (Status::Delivered, "DELIVERY_ACK"),
            (Status::Read, "READ"),
            (Status::Failed(0), "ERROR"),
        ] {
            let body: Value = serde_json::from_slice(&update_body(&sent, &[status])).unwrap_or_default();
            assert_eq!(body["event"], "messages.update");
            assert_eq!(body["data"]["keyId"], "3EB0A1");
            assert_eq!(body["data"]["status"], expected);
            assert_eq!(body["apikey"], Value::Null);
            assert!(body["date_time"].as_str().is_some_and(|d| d.ends_with('Z')));
        }
    }

    #[test]
    fn an_inbound_text_is_an_upsert_the_webhook_reads_as_an_opt_out() {
        let received = Received {
            instance: "my-instance".into(),
            instance_id: "0b5c".into(),
            key_id: "3EB0C0FFEE".into(),
            remote_jid: "5511999999999@s.whatsapp.net".into(),
            text: "SAIR".into(),
            timestamp: 1_750_263_773,
            destination: "http://hook".into(),
            owner_jid: "5511988887777@s.whatsapp.net".into(),
            server_url: "http://sandbox".into(),
        };
        let body = upsert_body(&received);
        assert_eq!(body["event"], "messages.upsert");
        assert_eq!(body["data"]["key"]["fromMe"], false);
        assert_eq!(body["data"]["messageTimestamp"], 1_750_263_773);
        let parsed = crate::webhook::evolution::parse(body.to_string().as_bytes(), Utc::now()).ok().unwrap_or_default();
        assert_eq!(parsed.inbound.len(), 1, "{parsed:?}");
        assert_eq!(parsed.inbound[0].from.as_deref(), Some("5511999999999"));
        assert_eq!(parsed.inbound[0].text.as_deref(), Some("SAIR"));
    }
}
