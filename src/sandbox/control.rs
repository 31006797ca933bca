//! The control endpoints of the simulated Meta portfolio and the sandbox clock: a
//! rehearsal changes what Meta would change (tier, quality, template status and
//! quality, restrictions, the per-user marketing limit) and the sandbox posts the
//! signed account webhooks Meta posts for it (docs/providers.md A6), in the envelope of
//! A4, to `meta.webhook_url`.
//!
//! The webhooks are posted before the endpoint answers (with the provider's retries),
//! and the answer says whether the receiver took each one: a test goes on knowing the
//! receiver has the news. Without `meta.webhook_url` the state changes and nothing is
//! posted.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, TimeDelta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::account::{AccountChange, AccountView, Event, Quality, QualityEvent, Restriction, TemplateStatus, envelope};
use super::server::Shared;

/// One webhook a control endpoint posted.
#[derive(Debug, Clone, Serialize)]
pub struct Posted {
    /// `changes[].field`.
    pub field: String,
    /// Whether the receiver answered 2xx (after the retries).
    pub delivered: bool,
}

/// Signs and posts account events, one POST each, in order.
async fn announce(shared: &Shared, events: Vec<Event>) -> Vec<Posted> {
    let Some(target) = &shared.meta_target else {
        return Vec::new();
    };
    let time = shared.clock.now().timestamp();
    let mut posted = Vec::with_capacity(events.len());
    for event in events {
        let body = serde_json::to_vec(&envelope(&shared.config.meta.waba_id, time, &event)).unwrap_or_default();
        let delivered = shared.webhooks.post_now(target, body).await;
        posted.push(Posted { field: event.field.to_owned(), delivered });
    }
    posted
}

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, message.into()).into_response()
}

/// The JSON body, or why it is not one (the answer of a 400).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn now_view(shared: &Shared) -> Json<Value> {
    Json(json!({ "now": shared.clock.now().to_rfc3339_opts(SecondsFormat::Secs, true) }))
}

/// `GET /_sandbox/clock` → `{"now": RFC 3339}`.
pub(crate) async fn get_clock(State(shared): State<Arc<Shared>>) -> Json<Value> {
    now_view(&shared)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    advance_seconds: i64,
}

/// `POST /_sandbox/clock` `{"advance_seconds": N}` (N ≥ 0) → `{"now": RFC 3339}`.
pub(crate) async fn advance_clock(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let advance: Advance = match parse(&body) {
        Ok(advance) => advance,
        Err(why) => return bad_request(why),
    };
    if advance.advance_seconds < 0 {
        return bad_request("the sandbox clock only moves forward");
    }
    shared.clock.advance(TimeDelta::seconds(advance.advance_seconds));
    now_view(&shared).into_response()
}

/// `GET /_sandbox/meta/account`.
pub(crate) async fn get_account(State(shared): State<Arc<Shared>>) -> Json<AccountView> {
    Json(shared.account().view())
}

/// `PUT /_sandbox/meta/account` `{"tier"?, "quality_rating"?, "throughput_level"?}` →
/// `{"account": ..., "webhooks": [{field, delivered}]}`.
pub(crate) async fn put_account(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let change: AccountChange = match parse(&body) {
        Ok(change) => change,
        Err(why) => return bad_request(why),
    };
    let events = shared.account().change(change, &shared.config.meta.display_phone_number);
    let webhooks = announce(&shared, events).await;
    Json(json!({ "account": shared.account().view(), "webhooks": webhooks })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QualityChange {
    event: QualityEvent,
}

/// `POST /_sandbox/meta/quality` `{"event": "FLAGGED" | ...}` → posts a
/// `phone_number_quality_update`.
pub(crate) async fn post_quality(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let change: QualityChange = match parse(&body) {
        Ok(change) => change,
        Err(why) => return bad_request(why),
    };
    let event = shared.account().quality_event(change.event, &shared.config.meta.display_phone_number);
    let webhooks = announce(&shared, vec![event]).await;
    Json(json!({ "account": shared.account().view(), "webhooks": webhooks })).into_response()
}

/// 404 for a template the configuration does not have (any name is known when none is
/// configured).
fn unknown_template(shared: &Shared, name: &str, language: &str) -> Option<Response> {
    let meta = &shared.config.meta;
    (!meta.templates.is_empty() && meta.template(name, language).is_none())
        .then(|| (StatusCode::NOT_FOUND, format!("no template {name:?} in {language:?} is configured")).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusChange {
    status: TemplateStatus,
    reason: Option<String>,
}

/// `PUT /_sandbox/meta/templates/{name}/{language}` `{"status", "reason"?}` → posts a
/// `message_template_status_update`.
pub(crate) async fn put_template_status(
    State(shared): State<Arc<Shared>>,
    Path((name, language)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let change: StatusChange = match parse(&body) {
        Ok(change) => change,
        Err(why) => return bad_request(why),
    };
    if let Some(unknown) = unknown_template(&shared, &name, &language) {
        return unknown;
    }
    let spec = shared.config.meta.template(&name, &language);
    let now = shared.clock.now().timestamp();
    let event = shared.account().set_template_status(&name, &language, spec, change.status, change.reason, now);
    let webhooks = announce(&shared, vec![event]).await;
    let template = shared.account().template(&name, &language, spec);
    Json(json!({ "template": template, "webhooks": webhooks })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreChange {
    score: Quality,
}

/// `POST /_sandbox/meta/templates/{name}/{language}/quality` `{"score"}` → posts a
/// `message_template_quality_update`.
pub(crate) async fn post_template_quality(
    State(shared): State<Arc<Shared>>,
    Path((name, language)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let change: ScoreChange = match parse(&body) {
        Ok(change) => change,
        Err(why) => return bad_request(why),
    };
    if let Some(unknown) = unknown_template(&shared, &name, &language) {
        return unknown;
    }
    let spec = shared.config.meta.template(&name, &language);
    let event = shared.account().set_template_quality(&name, &language, spec, change.score);
    let webhooks = announce(&shared, vec![event]).await;
    let template = shared.account().template(&name, &language, spec);
    Json(json!({ "template": template, "webhooks": webhooks })).into_response()
}

/// `POST /_sandbox/meta/restriction` `{"restriction_type", "expiration"}` → posts an
/// `account_update` ACCOUNT_RESTRICTION.
pub(crate) async fn post_restriction(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let restriction: Restriction = match parse(&body) {
        Ok(restriction) => restriction,
        Err(why) => return bad_request(why),
    };
    let event = shared.account().restrict(restriction);
    let webhooks = announce(&shared, vec![event]).await;
    Json(json!({ "account": shared.account().view(), "webhooks": webhooks })).into_response()
}

/// `PUT /_sandbox/meta/marketing-limited` `["+5511...", ...]`: replaces the recipients
/// under the per-user marketing limit.
pub(crate) async fn put_marketing_limited(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let numbers: Vec<String> = match parse(&body) {
        Ok(numbers) => numbers,
        Err(why) => return bad_request(why),
    };
    shared.account().set_marketing_limited(&numbers);
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /_sandbox/meta/webhook` with any JSON body: signed and posted exactly as
/// given (e.g. an inbound message that carries only a BSUID).
pub(crate) async fn post_webhook(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let value: Value = match parse(&body) {
        Ok(value) => value,
        Err(why) => return bad_request(why),
    };
    let Some(target) = &shared.meta_target else {
        return (StatusCode::CONFLICT, "meta.webhook_url is not configured").into_response();
    };
    let field = value.pointer("/entry/0/changes/0/field").and_then(Value::as_str).unwrap_or_default().to_owned();
    let delivered = shared.webhooks.post_now(target, body.to_vec()).await;
    Json(json!({ "webhooks": [Posted { field, delivered }] })).into_response()
}
