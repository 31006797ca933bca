//! The HTTP side: routes, the order of checks on each request, and the answers.
//!
//! Every POST goes: channel lookup (404 unknown, 503 not checkable yet) → body within
//! the cap (413) → authentication on the raw bytes (401, nothing parsed, nothing
//! changed) → parse (400 with the reason) → apply through the writer (200 only after
//! the commit; 503 while Postgres is unavailable, so the provider retries).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use tracing::{Instrument, debug, info_span, warn};

use super::credentials::{ChannelCredentials, LookupError};
use super::metrics::{ProviderLabels, RequestLabels, WebhookMetrics};
use super::notification::Notification;
use super::optout::OptOutKeywords;
use super::signature::{self, Rejection};
use super::writer::{WriteError, Writer};
use super::{evolution, meta};
use crate::store::receipts::{ApplyOutcome, OptOut, Provider, StatusEvent};

const META: &str = "meta";
const EVOLUTION: &str = "evolution";

/// The metric label of a provider.
fn label(provider: Provider) -> &'static str {
    match provider {
        Provider::Meta => META,
        Provider::Evolution => EVOLUTION,
    }
}
/// Meta's signature header.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Longest `hub.challenge` echoed back (Meta sends a number).
const MAX_CHALLENGE_LEN: usize = 256;

/// What handlers share.
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) credentials: Arc<dyn ChannelCredentials>,
    pub(crate) writer: Writer,
    pub(crate) metrics: Arc<WebhookMetrics>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) keywords: OptOutKeywords,
    /// How long a handler waits for its events to be committed before answering 503.
    pub(crate) apply_timeout: Duration,
    /// Namespace name to organization id.
    pub(crate) organizations: super::organizations::Organizations,
}

type Shared = State<Arc<AppState>>;

/// The routes of `disparo webhook`.
pub(crate) fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhooks/meta/{namespace}/{channel}", get(meta_verify).post(meta_receive))
        .route("/webhooks/evolution/{namespace}/{channel}", post(evolution_receive))
        // Evolution's `byEvents: true` appends the event name (`/messages-update`).
        .route("/webhooks/evolution/{namespace}/{channel}/{event}", post(evolution_receive_by_event))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn lookup_failure(error: LookupError) -> Response {
    match error {
        LookupError::NotFound => (StatusCode::NOT_FOUND, "not found").into_response(),
        LookupError::Unavailable(reason) => {
            warn!(%reason, "channel credentials unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "channel credentials unavailable").into_response()
        }
    }
}

/// The subscription handshake: echo `hub.challenge` when `hub.verify_token` is the
/// channel's verify token, 403 otherwise.
async fn meta_verify(
    State(state): Shared,
    Path((namespace, channel)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let secrets = match state.credentials.meta(&namespace, &channel).await {
        Ok(secrets) => secrets,
        Err(error) => return lookup_failure(error),
    };
    let token = query.get("hub.verify_token").map(String::as_bytes).unwrap_or_default();
    let subscribing = query.get("hub.mode").map(String::as_str) == Some("subscribe");
    if !subscribing || !signature::secrets_match(secrets.verify_token.expose(), token) {
        state.metrics.count(META, "none", "rejected_verify_token", 1);
        return (StatusCode::FORBIDDEN, "forbidden").into_response();
    }
    match query.get("hub.challenge") {
        Some(challenge) if !challenge.is_empty() && challenge.len() <= MAX_CHALLENGE_LEN => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], challenge.clone()).into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "missing hub.challenge").into_response(),
    }
}

async fn meta_receive(State(state): Shared, Path((namespace, channel)): Path<(String, String)>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let span = info_span!("webhook", provider = META, %namespace, %channel);
    let response = async {
        let secrets = match state.credentials.meta(&namespace, &channel).await {
            Ok(secrets) => secrets,
            Err(error) => return lookup_failure(error),
        };
        let given = headers.get(SIGNATURE_HEADER).map(HeaderValue::as_bytes);
        if let Err(rejection) = signature::verify_meta(secrets.app_secret.expose(), &body, given) {
            return state.reject(META, rejection);
        }
        match meta::parse(&body, Utc::now()) {
            Ok(notification) => state.apply(Provider::Meta, &namespace, &channel, notification).await,
            Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        }
    }
    .instrument(span)
    .await;
    state.observe(META, started, &response);
    response
}

async fn evolution_receive(State(state): Shared, Path((namespace, channel)): Path<(String, String)>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let span = info_span!("webhook", provider = EVOLUTION, %namespace, %channel);
    let response = async {
        let secrets = match state.credentials.evolution(&namespace, &channel).await {
            Ok(secrets) => secrets,
            Err(error) => return lookup_failure(error),
        };
        // Evolution does not sign: the shared secret comes in the configured header,
        // or as the key of the HS256 JWT Evolution sends when configured with `jwt_key`.
        let token = secrets.token.expose();
        let authenticated = match (headers.get(&secrets.header_name), headers.get(header::AUTHORIZATION)) {
            (Some(given), _) if signature::secrets_match(token, given.as_bytes()) => Ok(()),
            (_, Some(bearer)) => signature::verify_evolution_jwt(token, bearer.as_bytes(), Utc::now()),
            (Some(_), None) => Err(Rejection::Mismatch),
            (None, None) => Err(Rejection::Missing),
        };
        if let Err(rejection) = authenticated {
            return state.reject(EVOLUTION, rejection);
        }
        match evolution::parse(&body, Utc::now()) {
            Ok(notification) => state.apply(Provider::Evolution, &namespace, &channel, notification).await,
            Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        }
    }
    .instrument(span)
    .await;
    state.observe(EVOLUTION, started, &response);
    response
}

async fn evolution_receive_by_event(
    state: Shared,
    Path((namespace, channel, _event)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    evolution_receive(state, Path((namespace, channel)), headers, body).await
}

/// Alive: the process answers.
async fn healthz() -> &'static str {
    "ok"
}

/// Ready: Postgres answers and the credential caches are synced. Without Postgres the
/// service still answers webhooks (503), but should not be sent traffic.
async fn readyz(State(state): Shared) -> Response {
    if !state.credentials.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "credential caches not synced").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), crate::store::ping(&state.pool)).await {
        Ok(Ok(())) => "ok".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable").into_response(),
    }
}

async fn metrics(State(state): Shared) -> Response {
    crate::telemetry::metrics_response(&state.registry)
}

impl AppState {
    fn reject(&self, provider: &'static str, rejection: Rejection) -> Response {
        debug!(%rejection, "webhook rejected");
        self.metrics.count(provider, "none", "rejected_signature", 1);
        (StatusCode::UNAUTHORIZED, "unauthorized").into_response()
    }

    fn observe(&self, provider: &'static str, started: Instant, response: &Response) {
        self.metrics.requests.get_or_create(&RequestLabels { provider, code: response.status().as_u16() }).inc();
        self.metrics.request_seconds.get_or_create(&ProviderLabels { provider }).observe(started.elapsed().as_secs_f64());
    }

    /// Binds a verified notification to the namespace's organization and the channel,
    /// applies it, and answers once it is committed.
    async fn apply(&self, source: Provider, namespace: &str, channel: &str, notification: Notification) -> Response {
        let provider = label(source);
        let organization = match self.organizations.of(namespace).await {
            Ok(Some(organization)) => organization,
            // The Channel exists (its credentials verified the request) but the controller
            // has not provisioned its namespace yet: the provider retries later.
            Ok(None) => {
                return ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "namespace not provisioned yet, retry later")).into_response();
            }
            Err(error) => {
                debug!(%error, "organization lookup failed");
                return ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later")).into_response();
            }
        };
        let organization = organization.as_str();
        let Notification { statuses, inbound, ignored } = notification;
        for item in &ignored {
            self.metrics.count(provider, "none", item.as_str(), 1);
        }
        let mut opt_outs = Vec::new();
        let events: Vec<StatusEvent> = statuses
            .into_iter()
            .map(|s| {
                // A failure that means "opted out" opts out the recipient's number as
                // well as the message's contact (which the store finds, or finds later).
                if let (true, Some(recipient)) = (s.opts_out, &s.recipient) {
                    opt_outs.push(OptOut { organization: organization.to_owned(), wa_id: recipient.clone() });
                }
                StatusEvent {
                    provider: source,
                    organization: organization.to_owned(),
                    channel: channel.to_owned(),
                    provider_message_id: s.provider_message_id,
                    message_id: s.message_id,
                    status: s.status,
                    at: s.at,
                    error: s.error,
                    recipient: s.recipient,
                    opts_out: s.opts_out,
                }
            })
            .collect();
        for message in inbound {
            if message.text.as_deref().is_some_and(|text| self.keywords.matches(text)) {
                opt_outs.push(OptOut { organization: organization.to_owned(), wa_id: message.from });
            } else {
                self.metrics.count(provider, "inbound", "not_opt_out", 1);
            }
        }
        let mut summary = json!({"applied": 0, "duplicate": 0, "stale": 0, "unknown_id": 0, "opted_out": 0, "ignored": ignored.len()});
        if events.is_empty() && opt_outs.is_empty() {
            return (StatusCode::OK, axum::Json(summary)).into_response();
        }
        let statuses_of: Vec<&'static str> = events.iter().map(|e| e.status.as_str()).collect();
        match self.writer.submit(events, opt_outs, self.apply_timeout).await {
            Ok(report) => {
                for (status, outcome) in statuses_of.iter().zip(&report.outcomes) {
                    self.metrics.count(provider, status, outcome.as_str(), 1);
                    summary[outcome.as_str()] = json!(summary[outcome.as_str()].as_u64().unwrap_or(0) + 1);
                }
                let opted_out = report.opted_out.iter().filter(|m| **m).count() as u64;
                self.metrics.count(provider, "inbound", "opted_out", opted_out);
                self.metrics.count(provider, "inbound", "unknown_contact", report.opted_out.len() as u64 - opted_out);
                summary["opted_out"] = json!(opted_out);
                let unknown = report.outcomes.iter().filter(|o| **o == ApplyOutcome::UnknownId).count();
                if unknown > 0 {
                    debug!(unknown, "statuses for unknown message ids");
                }
                (StatusCode::OK, axum::Json(summary)).into_response()
            }
            Err(WriteError::Failed(reason)) => {
                warn!(%reason, "webhook events refused by the database");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
            Err(error) => {
                debug!(%error, "webhook events not applied");
                ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later")).into_response()
            }
        }
    }
}
