//! The simulated Cloud API: `POST /{version}/{phone_number_id}/messages`, its answers
//! and its status webhooks (docs/providers.md A1, A2, A4, A5).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};
use tracing::debug;

use super::behaviour::{self, Batching, Fault, Status};
use super::ledger::Accepted;
use super::server::{Shared, credential_matches, gateway_timeout};
use crate::api::Provider;
use crate::providers::classify::meta_code;
use crate::providers::mask_phone;

/// What a status webhook needs to know about the message.
struct Sent {
    waba_id: String,
    display_phone_number: String,
    phone_number_id: String,
    wamid: String,
    recipient: String,
    callback_data: Option<String>,
    /// Pricing category: templates are billed, free text is a service reply.
    category: &'static str,
}

/// `POST /{version}/{phone_number_id}/messages`.
pub async fn send(
    State(shared): State<Arc<Shared>>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return oauth_error();
    }
    let known = &shared.config.meta.phone_number_ids;
    if !known.is_empty() && !known.contains(&phone_number_id) {
        let message = format!(
            "Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."
        );
        return GraphError::new(StatusCode::BAD_REQUEST, 100, message, None).into_response();
    }
    let request = match validate(&shared, &body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };

    let dice = shared.roll();
    if !shared.pause(dice.latency).await {
        return error(131000, "The sandbox is shutting down").into_response();
    }
    if let Some(fault) = dice.fault {
        return match fault {
            Fault::Retryable => error(131000, "An unknown error occurred (injected by the sandbox)"),
            Fault::RateLimit => error(130429, "Message failed to send because there were too many messages sent from this phone number in a short period of time"),
            Fault::PairRate => error(131056, "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time"),
            Fault::Permanent => error(131026, "Message Undeliverable."),
            Fault::Code(code) => error(code, "Injected by the sandbox"),
        }
        .into_response();
    }

    let wamid = behaviour::wamid(&mut rand::rng());
    let recipient = format!("+{}", request.digits);
    let entry = Accepted {
        at: Utc::now(),
        provider: Provider::Meta,
        recipient: recipient.clone(),
        message_id: wamid.clone(),
        callback_data: request.callback_data.clone(),
    };
    if !shared.accept(entry) {
        return error(130429, "Message failed to send because there were too many messages sent from this phone number in a short period of time").into_response();
    }
    debug!(recipient = %mask_phone(&recipient), "meta message accepted");
    if let Some(target) = &shared.meta_target {
        let undeliverable = shared.is_undeliverable(&request.digits);
        let posts = behaviour::plan(&mut rand::rng(), &shared.config.webhooks, undeliverable, Batching::Allowed);
        let sent = Sent {
            waba_id: shared.config.meta.waba_id.clone(),
            display_phone_number: shared.config.meta.display_phone_number.clone(),
            phone_number_id,
            wamid: wamid.clone(),
            recipient: request.digits.clone(),
            callback_data: request.callback_data.clone(),
            category: if request.is_template { "marketing" } else { "service" },
        };
        shared.webhooks.dispatch(target.clone(), posts, move |statuses| status_body(&sent, statuses));
    }
    if shared.behind_gateway(&request.digits, &dice) {
        // The message is sent; a proxy in front answers instead of Graph.
        return gateway_timeout();
    }
    if let Some(hold) = dice.hold {
        // The message is sent; the answer is what gets lost.
        shared.pause(hold).await;
    }

    let mut message = json!({ "id": wamid });
    if request.is_template {
        message["message_status"] = json!("accepted");
    }
    let answer = json!({
        "messaging_product": "whatsapp",
        "contacts": [{ "input": request.to, "wa_id": request.digits }],
        "messages": [message],
    });
    (StatusCode::OK, Json(answer)).into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    presented.is_some_and(|token| credential_matches(token, shared.config.meta.access_token.expose()))
}

/// What a valid send request carries.
struct Request {
    /// `to` as given (echoed in `contacts[].input`).
    to: String,
    digits: String,
    is_template: bool,
    callback_data: Option<String>,
}

/// Checks the body as Graph does, answering with Graph's errors.
fn validate(shared: &Shared, body: &[u8]) -> Result<Request, GraphError> {
    let invalid = |details: &str| {
        GraphError::new(StatusCode::BAD_REQUEST, 100, "(#100) Invalid parameter".to_owned(), Some(details))
    };
    let value: Value = serde_json::from_slice(body).map_err(|_| invalid("The request body is not valid JSON"))?;
    if value.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
        return Err(invalid("The parameter messaging_product is required and must be 'whatsapp'."));
    }
    let to = value.get("to").and_then(Value::as_str).ok_or_else(|| invalid("The parameter to is required."))?;
    let digits = to.strip_prefix('+').unwrap_or(to);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 15 {
        return Err(error(131009, "Recipient phone number is not a valid phone number"));
    }
    let callback_data = value.get("biz_opaque_callback_data").and_then(Value::as_str).map(str::to_owned);
    if callback_data.as_ref().is_some_and(|c| c.len() > 512) {
        return Err(invalid("biz_opaque_callback_data must be at most 512 characters."));
    }
    let is_template = match value.get("type").and_then(Value::as_str) {
        Some("text") => {
            let text = value.pointer("/text/body").and_then(Value::as_str).unwrap_or_default();
            if text.trim().is_empty() {
                return Err(invalid("The parameter text['body'] is required."));
            }
            if text.chars().count() > 4096 {
                return Err(invalid("Param text['body'] must be at most 4096 characters long."));
            }
            false
        }
        Some("template") => {
            validate_template(shared, &value)?;
            true
        }
        Some(other) => return Err(error(131051, &format!("Message type {other} is not supported by the sandbox"))),
        None => return Err(invalid("The parameter type is required.")),
    };
    Ok(Request { to: to.to_owned(), digits: digits.to_owned(), is_template, callback_data })
}

fn validate_template(shared: &Shared, value: &Value) -> Result<(), GraphError> {
    let missing = |what: &str| error(131008, &format!("The parameter {what} is required."));
    let name = value.pointer("/template/name").and_then(Value::as_str).ok_or_else(|| missing("template['name']"))?;
    let language = value
        .pointer("/template/language/code")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("template['language']['code']"))?;
    let templates = &shared.config.meta.templates;
    if templates.is_empty() {
        return Ok(());
    }
    let Some(spec) = templates
        .iter()
        .find(|t| t.name == name && (t.languages.is_empty() || t.languages.iter().any(|l| l == language)))
    else {
        return Err(error(132001, &format!("template name ({name}) does not exist in {language}")));
    };
    let parameters = value
        .pointer("/template/components")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.get("type").and_then(Value::as_str) == Some("body"))
        .map(|c| c.get("parameters").and_then(Value::as_array).map_or(0, Vec::len))
        .sum::<usize>();
    match spec.body_parameters {
        Some(expected) if expected != parameters => Err(error(
            132000,
            &format!(
                "body: number of localizable_params ({parameters}) does not match the expected number of params ({expected})"
            ),
        )),
        _ => Ok(()),
    }
}

/// A Graph API error answer.
struct GraphError {
    status: StatusCode,
    code: i64,
    message: String,
    details: Option<String>,
}

impl GraphError {
    fn new(status: StatusCode, code: i64, message: String, details: Option<&str>) -> Self {
        GraphError { status, code, message, details: details.map(str::to_owned) }
    }
}

impl IntoResponse for GraphError {
    fn into_response(self) -> Response {
        let mut error = json!({
            "message": self.message,
            "type": "OAuthException",
            "code": self.code,
            "fbtrace_id": behaviour::fbtrace_id(&mut rand::rng()),
        });
        if let Some(details) = self.details {
            error["error_data"] = json!({ "messaging_product": "whatsapp", "details": details });
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// Graph's error for a code of Meta's table, with that code's HTTP status and title.
fn error(code: i64, details: &str) -> GraphError {
    let (status, title) = meta_code(code).map_or((400, "Error"), |row| (row.http_status, row.title));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    GraphError::new(status, code, format!("(#{code}) {title}"), Some(details))
}

/// 401 with code 190, as Graph answers a missing or wrong token.
fn oauth_error() -> Response {
    GraphError::new(
        StatusCode::UNAUTHORIZED,
        190,
        "Invalid OAuth access token - Cannot parse access token".to_owned(),
        None,
    )
    .into_response()
}

/// The webhook body for some statuses of one message (A5 shape).
fn status_body(sent: &Sent, statuses: &[Status]) -> Vec<u8> {
    let timestamp = Utc::now().timestamp().to_string();
    let items: Vec<Value> = statuses
        .iter()
        .map(|status| {
            let name = match status {
                Status::Sent => "sent",
                Status::Delivered => "delivered",
                Status::Read => "read",
                Status::Failed(_) => "failed",
            };
            let mut item = json!({ "id": sent.wamid, "status": name, "timestamp": timestamp, "recipient_id": sent.recipient });
            if let Some(data) = &sent.callback_data {
                item["biz_opaque_callback_data"] = json!(data);
            }
            match status {
                Status::Sent | Status::Delivered => {
                    let kind = if sent.category == "service" { "free_customer_service" } else { "regular" };
                    item["pricing"] = json!({ "billable": kind == "regular", "pricing_model": "PMP", "type": kind, "category": sent.category });
                }
                Status::Failed(code) => {
                    let title = meta_code(*code).map_or("Error", |row| row.title);
                    item["errors"] = json!([{
                        "code": code,
                        "title": title,
                        "message": title,
                        "error_data": { "details": format!("{title}.") },
                        "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
                    }]);
                }
                Status::Read => {}
            }
            item
        })
        .collect();
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": sent.waba_id,
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": { "display_phone_number": sent.display_phone_number, "phone_number_id": sent.phone_number_id },
                    "statuses": items,
                },
            }],
        }],
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bodies_have_the_a5_shape() {
        let sent = Sent {
            waba_id: "102290129340398".into(),
            display_phone_number: "15550783881".into(),
            phone_number_id: "106540352242922".into(),
            wamid: "wamid.X".into(),
            recipient: "15550123456".into(),
            callback_data: Some("msg-42".into()),
            category: "marketing",
        };
        let body: Value =
            serde_json::from_slice(&status_body(&sent, &[Status::Read, Status::Delivered])).unwrap_or_default();
        let value = &body["entry"][0]["changes"][0]["value"];
        assert_eq!(body["object"], "whatsapp_business_account");
        assert_eq!(value["metadata"]["phone_number_id"], "106540352242922");
        assert_eq!(value["statuses"][0]["status"], "read");
        assert_eq!(value["statuses"][1]["status"], "delivered");
        assert_eq!(value["statuses"][1]["biz_opaque_callback_data"], "msg-42");
        assert_eq!(value["statuses"][1]["pricing"]["pricing_model"], "PMP");
        assert!(value["statuses"][0]["timestamp"].is_string());

        let body: Value = serde_json::from_slice(&status_body(&sent, &[Status::Failed(131026)])).unwrap_or_default();
        let failed = &body["entry"][0]["changes"][0]["value"]["statuses"][0];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["errors"][0]["code"], 131026);
    }
}
