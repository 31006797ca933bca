//! The simulated Cloud API: `POST /{version}/{phone_number_id}/messages`, its answers
//! and its status webhooks (docs/providers.md A1, A2, A4, A5), and the Graph read of a
//! phone number's messaging limit, quality and throughput (A6).
//!
//! Template sends meet the portfolio's protections as Meta applies them (A3, A6): a
//! template to a recipient new in the moving 24 h when the tier is spent is refused
//! with 131048; a paused or disabled template with 132015 or 132016; a marketing
//! template to a recipient under the per-user marketing limit is accepted and then
//! fails by webhook with 131049.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::debug;

use super::account::{TemplateCategory, bsuid_for, graph_display_number};
use super::behaviour::{self, Batching, Fault, Status};
use super::ledger::{Accepted, Admission, Ledger, Refusal};
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
    /// Digits.
    recipient: String,
    /// The recipient's business-scoped user id (`recipient_user_id`).
    recipient_user_id: String,
    /// False for a BSUID-only recipient: its statuses omit `recipient_id`.
    with_phone: bool,
    callback_data: Option<String>,
    /// Pricing category: templates are billed by their category, free text is a
    /// service reply.
    category: &'static str,
    /// The unix time its statuses carry (sandbox clock when the status is posted).
    clock: super::clock::Clock,
}

impl Sent {
    /// Whether Meta charges for the message once delivered (A6: templates are
    /// `regular`, replies in the service window `free_customer_service`).
    fn billable(&self) -> bool {
        self.category != "service"
    }
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
    if let Some(unknown) = unknown_phone_number(&shared, &phone_number_id, "post") {
        return unknown;
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
    let now = shared.clock.now();
    let entry = Accepted {
        at: now,
        provider: Provider::Meta,
        recipient: recipient.clone(),
        message_id: wamid.clone(),
        callback_data: request.callback_data.clone(),
        template_category: request.template,
    };
    // Decided by Meta after accepting: not on WhatsApp first, then the marketing limit.
    let fails_with = if shared.is_undeliverable(&request.digits) {
        Some(131026)
    } else if request.template == Some(TemplateCategory::Marketing)
        && shared.account().is_marketing_limited(&request.digits)
    {
        Some(131049)
    } else {
        None
    };
    let admission = {
        let account = shared.account();
        Admission {
            per_minute_cap: None,
            tier_limit: account.tier.daily_limit().map(|n| n as usize),
            while_restricted: request.template.is_some() && account.biz_initiated_restricted(now.timestamp()),
            marketing_limited: fails_with == Some(131049),
        }
    };
    match shared.accept(entry, admission) {
        Ok(()) => {}
        Err(Refusal::PerMinute) => {
            return error(130429, "Message failed to send because there were too many messages sent from this phone number in a short period of time").into_response();
        }
        Err(Refusal::OverTier) => {
            return error(131048, "Message failed to send because the business has reached its limit of unique recipients of business-initiated messages in 24 hours").into_response();
        }
    }
    debug!(recipient = %mask_phone(&recipient), "meta message accepted");
    if let Some(target) = &shared.meta_target {
        let posts = behaviour::plan(&mut rand::rng(), &shared.config.webhooks, fails_with, Batching::Allowed);
        let sent = Sent {
            waba_id: shared.config.meta.waba_id.clone(),
            display_phone_number: shared.config.meta.display_phone_number.clone(),
            phone_number_id,
            wamid: wamid.clone(),
            recipient_user_id: bsuid_for(&request.digits),
            with_phone: !shared.is_bsuid_only(&request.digits),
            recipient: request.digits.clone(),
            callback_data: request.callback_data.clone(),
            category: request.template.map_or("service", TemplateCategory::as_pricing),
            clock: shared.clock.clone(),
        };
        let ledger = shared.ledger.clone();
        shared.webhooks.dispatch(target.clone(), posts, move |statuses| announce(&ledger, &sent, statuses));
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
    if request.template.is_some() {
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
    /// A template's category; `None` for free text.
    template: Option<TemplateCategory>,
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
    let template = match value.get("type").and_then(Value::as_str) {
        Some("text") => {
            let text = value.pointer("/text/body").and_then(Value::as_str).unwrap_or_default();
            if text.trim().is_empty() {
                return Err(invalid("The parameter text['body'] is required."));
            }
            if text.chars().count() > 4096 {
                return Err(invalid("Param text['body'] must be at most 4096 characters long."));
            }
            None
        }
        Some("template") => Some(validate_template(shared, &value)?),
        Some(other) => return Err(error(131051, &format!("Message type {other} is not supported by the sandbox"))),
        None => return Err(invalid("The parameter type is required.")),
    };
    Ok(Request { to: to.to_owned(), digits: digits.to_owned(), template, callback_data })
}

/// Checks a template message against the configured templates and their live status;
/// answers the template's category.
fn validate_template(shared: &Shared, value: &Value) -> Result<TemplateCategory, GraphError> {
    let missing = |what: &str| error(131008, &format!("The parameter {what} is required."));
    let name = value.pointer("/template/name").and_then(Value::as_str).ok_or_else(|| missing("template['name']"))?;
    let language = value
        .pointer("/template/language/code")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("template['language']['code']"))?;
    let does_not_exist = || error(132001, &format!("template name ({name}) does not exist in {language}"));
    let meta = &shared.config.meta;
    let spec = meta.template(name, language);
    if spec.is_none() && !meta.templates.is_empty() {
        return Err(does_not_exist());
    }
    let state = shared.account().template(name, language, spec);
    match state.status.refusal() {
        Some(132015) => return Err(error(132015, &format!("template name ({name}) is paused in {language}"))),
        Some(132016) => return Err(error(132016, &format!("template name ({name}) is disabled in {language}"))),
        Some(_) => return Err(does_not_exist()),
        None => {}
    }
    let Some(spec) = spec else {
        return Ok(state.category);
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
        _ => Ok(state.category),
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

/// Graph's answer for a phone number id the sandbox does not know (none when any id
/// is accepted or this one is configured). `verb` is `get` or `post`, as Graph says it.
fn unknown_phone_number(shared: &Shared, phone_number_id: &str, verb: &str) -> Option<Response> {
    let known = &shared.config.meta.phone_number_ids;
    if known.is_empty() || known.iter().any(|id| id == phone_number_id) {
        return None;
    }
    let message = format!(
        "Unsupported {verb} request. Object with ID '{phone_number_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."
    );
    Some(GraphError::new(StatusCode::BAD_REQUEST, 100, message, None).into_response())
}

/// The phone-number fields the Graph read knows, and what it answers without `fields`.
const PHONE_NUMBER_FIELDS: &[&str] = &[
    "id",
    "display_phone_number",
    "verified_name",
    "quality_rating",
    "whatsapp_business_manager_messaging_limit",
    "throughput",
];
const DEFAULT_PHONE_NUMBER_FIELDS: &[&str] = &["verified_name", "display_phone_number", "quality_rating", "throughput"];

/// `GET /{version}/{phone_number_id}?fields=...`: the number's messaging limit
/// (portfolio-wide), quality rating and throughput level, as Graph answers it (A6):
/// `id` and the requested fields only.
pub(crate) async fn phone_number(
    State(shared): State<Arc<Shared>>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return oauth_error();
    }
    if let Some(unknown) = unknown_phone_number(&shared, &phone_number_id, "get") {
        return unknown;
    }
    let requested = match query.get("fields") {
        Some(fields) => match requested_fields(fields) {
            Ok(fields) => fields,
            Err(unknown) => {
                let message = format!(
                    "(#100) Tried accessing nonexisting field ({unknown}) on node type (WhatsAppBusinessPhoneNumber)"
                );
                return GraphError::new(StatusCode::BAD_REQUEST, 100, message, None).into_response();
            }
        },
        None => DEFAULT_PHONE_NUMBER_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
    };
    let (tier, quality, throughput) = {
        let account = shared.account();
        (account.tier, account.quality_rating, account.throughput_level)
    };
    let meta = &shared.config.meta;
    let mut answer = serde_json::Map::new();
    for field in requested {
        let value = match field.as_str() {
            "display_phone_number" => json!(graph_display_number(&meta.display_phone_number)),
            "verified_name" => json!(meta.verified_name),
            "quality_rating" => json!(quality),
            "whatsapp_business_manager_messaging_limit" => json!(tier),
            "throughput" => json!({ "level": throughput }),
            _ => continue,
        };
        answer.insert(field, value);
    }
    // Graph puts `id` last.
    answer.insert("id".to_owned(), json!(phone_number_id));
    (StatusCode::OK, Json(Value::Object(answer))).into_response()
}

/// The top-level names of a Graph `fields` list (`a,b{c,d},e`: a nested selection
/// names its field once), or the first name the node does not have.
fn requested_fields(fields: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in fields.chars().chain(std::iter::once(',')) {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                let name = current.trim().to_owned();
                current.clear();
                if name.is_empty() {
                    continue;
                }
                if !PHONE_NUMBER_FIELDS.contains(&name.as_str()) {
                    return Err(name);
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            c if depth == 0 => current.push(c),
            _ => {}
        }
    }
    Ok(names)
}

/// Renders a post's statuses, first recording in the ledger a billable message whose
/// `delivered` is announced (once, however often its webhook is posted).
fn announce(ledger: &Ledger, sent: &Sent, statuses: &[Status]) -> Vec<u8> {
    if sent.billable() && statuses.contains(&Status::Delivered) {
        ledger.record_billable(&sent.wamid, &format!("+{}", sent.recipient), sent.category);
    }
    status_body(sent, statuses)
}

/// The webhook body for some statuses of one message (A5 shape, with A6's pricing and
/// business-scoped user id).
fn status_body(sent: &Sent, statuses: &[Status]) -> Vec<u8> {
    let timestamp = sent.clock.now().timestamp().to_string();
    let items: Vec<Value> = statuses
        .iter()
        .map(|status| {
            let name = match status {
                Status::Sent => "sent",
                Status::Delivered => "delivered",
                Status::Read => "read",
                Status::Failed(_) => "failed",
            };
            let mut item = json!({
                "id": sent.wamid,
                "status": name,
                "timestamp": timestamp,
                "recipient_user_id": sent.recipient_user_id,
            });
            if sent.with_phone {
                item["recipient_id"] = json!(sent.recipient);
            }
            if let Some(data) = &sent.callback_data {
                item["biz_opaque_callback_data"] = json!(data);
            }
            match status {
                Status::Sent | Status::Delivered | Status::Read => {
                    let kind = if sent.billable() { "regular" } else { "free_customer_service" };
                    item["pricing"] = json!({ "billable": sent.billable(), "pricing_model": "PMP", "type": kind, "category": sent.category });
                }
                Status::Failed(code) => {
                    let (title, details) = webhook_error_text(*code);
                    item["errors"] = json!([{
                        "code": code,
                        "title": title,
                        "message": title,
                        "error_data": { "details": details },
                        "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
                    }]);
                }
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

/// Title and details of a `failed` status's error: Meta's wording for 131049 (as in
/// docs/providers.md A6), the table's title otherwise.
fn webhook_error_text(code: i64) -> (&'static str, String) {
    if code == 131049 {
        return (
            "This message was not delivered to maintain healthy ecosystem engagement.",
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.".to_owned(),
        );
    }
    let title = meta_code(code).map_or("Error", |row| row.title);
    (title, format!("{title}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(category: &'static str) -> Sent {
        Sent {
            waba_id: "102290129340398".into(),
            display_phone_number: "15550783881".into(),
            phone_number_id: "106540352242922".into(),
            wamid: "wamid.X".into(),
            recipient: "15550123456".into(),
            recipient_user_id: bsuid_for("15550123456"),
            with_phone: true,
            callback_data: Some("msg-42".into()),
            category,
            clock: super::super::clock::Clock::default(),
        }
    }

    fn statuses_of(body: &[u8]) -> Vec<Value> {
        let body: Value = serde_json::from_slice(body).unwrap_or_default();
        body["entry"][0]["changes"][0]["value"]["statuses"].as_array().cloned().unwrap_or_default()
    }

    #[test]
    fn status_bodies_have_the_a5_shape() {
        let sent = sent("marketing");
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

        let failed = &statuses_of(&status_body(&sent, &[Status::Failed(131026)]))[0];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["errors"][0]["code"], 131026);
        assert!(failed.get("pricing").is_none(), "nothing is charged for a failure");
    }

    #[test]
    fn statuses_carry_pricing_and_the_business_scoped_user_id() {
        let all = [Status::Sent, Status::Delivered, Status::Read];
        for category in ["marketing", "utility", "authentication"] {
            for status in statuses_of(&status_body(&sent(category), &all)) {
                assert_eq!(
                    status["pricing"],
                    json!({ "billable": true, "pricing_model": "PMP", "type": "regular", "category": category })
                );
                assert_eq!(status["recipient_id"], "15550123456");
                assert_eq!(status["recipient_user_id"], bsuid_for("+15550123456"));
            }
        }
        for status in statuses_of(&status_body(&sent("service"), &all)) {
            assert_eq!(status["pricing"]["type"], "free_customer_service");
            assert_eq!(status["pricing"]["category"], "service");
            assert_eq!(status["pricing"]["billable"], false);
        }
        let bsuid_only = Sent { with_phone: false, ..sent("marketing") };
        for status in statuses_of(&status_body(&bsuid_only, &[Status::Sent, Status::Failed(131026)])) {
            assert!(status.get("recipient_id").is_none(), "{status}");
            assert!(status["recipient_user_id"].as_str().is_some_and(|id| id.starts_with("US.")));
        }
    }

    #[test]
    fn a_marketing_limit_failure_has_meta_wording() {
        let failed = &statuses_of(&status_body(&sent("marketing"), &[Status::Failed(131049)]))[0];
        assert_eq!(failed["errors"][0]["code"], 131049);
        assert_eq!(
            failed["errors"][0]["title"],
            "This message was not delivered to maintain healthy ecosystem engagement."
        );
        assert!(failed["errors"][0]["error_data"]["details"].as_str().is_some_and(|d| d.contains("healthy ecosystem")));
    }

    #[test]
    fn only_delivered_billable_messages_are_recorded_once() {
        let ledger = Ledger::default();
        announce(&ledger, &sent("marketing"), &[Status::Sent]);
        assert!(ledger.billable_delivered().is_empty());
        announce(&ledger, &sent("marketing"), &[Status::Read, Status::Delivered]);
        announce(&ledger, &sent("marketing"), &[Status::Delivered]);
        announce(&ledger, &sent("service"), &[Status::Delivered]);
        let billable = ledger.billable_delivered();
        assert_eq!(billable.len(), 1, "{billable:?}");
        assert_eq!((billable[0].recipient.as_str(), billable[0].category.as_str()), ("+15550123456", "marketing"));
    }

    #[test]
    fn graph_fields_are_parsed_like_graph() {
        assert_eq!(
            requested_fields("whatsapp_business_manager_messaging_limit, quality_rating,throughput{level}"),
            Ok(vec![
                "whatsapp_business_manager_messaging_limit".to_owned(),
                "quality_rating".to_owned(),
                "throughput".to_owned()
            ])
        );
        assert_eq!(requested_fields("id,,id"), Ok(vec!["id".to_owned()]));
        assert_eq!(requested_fields("quality_rating,nope"), Err("nope".to_owned()));
    }
}
