//! The HTTP side: routes, the order of checks on each request, and the answers.
//!
//! Every POST to a webhook route goes: a place among the requests being read (503 when
//! none frees up in time) → the whole body within the cap (413) and the read timeout
//! (408) → channel lookup (503 while the caches are not synced) → authentication on
//! the raw bytes → parse (400 with the reason) → apply through the writer (200 only
//! after the commit; 503 while Postgres is unavailable, so the provider retries).
//!
//! An unknown namespace or channel, a channel whose credentials cannot be read and a
//! bad signature all get the same 401 (the handshake: the same 403), after the same
//! body read, so the URL space tells nobody which organizations and channels exist.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use super::credentials::{ChannelCredentials, LookupError};
use super::metrics::{ProviderLabels, RequestLabels, SignalLabels, WebhookMetrics};
use super::notification::Notification;
use super::optout::OptOutKeywords;
use super::signals::{self, AccountSignal, SignalOutcome};
use super::signature::{self, Rejection};
use super::writer::{WriteError, Writer};
use super::{evolution, meta};
use crate::store::receipts::{ApplyOutcome, OptOut, Provider, StatusEvent};

const META: &str = "meta";
const EVOLUTION: &str = "evolution";

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

/// How the webhook routes read request bodies, before anything else looks at them.
#[derive(Debug)]
pub(crate) struct BodyLimits {
    /// Room for the bodies of the requests being read or handled, in units of
    /// [`ROOM_UNIT`] bytes: room for `max_concurrent_requests` bodies of the largest
    /// size. A request takes room for the length it declares (at least one unit), or
    /// for the largest size when it declares none, and holds it until its answer is
    /// ready: the memory bodies take stays bounded whatever clients do, while many
    /// small requests (Meta posts one status per request, many at once) are handled
    /// together, and their statuses share the writer's transactions.
    pub(crate) room: Arc<Semaphore>,
    /// How long a request waits for room before it is answered 503.
    pub(crate) wait: Duration,
    /// How long the whole body may take to arrive once its request has room.
    pub(crate) read_timeout: Duration,
    /// The body cap.
    pub(crate) max_bytes: usize,
}

/// The room one request takes at least: its body, what it is parsed into and its
/// answer, for a notification of a few statuses.
pub(crate) const ROOM_UNIT: usize = 16 * 1024;

impl BodyLimits {
    /// Limits with room for `requests` bodies of `max_bytes`.
    pub(crate) fn new(requests: usize, max_bytes: usize, wait: Duration, read_timeout: Duration) -> BodyLimits {
        let room = requests.max(1).saturating_mul(units(max_bytes)).min(Semaphore::MAX_PERMITS);
        BodyLimits { room: Arc::new(Semaphore::new(room)), wait, read_timeout, max_bytes }
    }

    /// The room a request takes: for the length it declares, or for the largest body.
    fn units_for(&self, declared: Option<u64>) -> u32 {
        let bytes = declared.map_or(self.max_bytes, |length| (length as usize).min(self.max_bytes));
        u32::try_from(units(bytes)).unwrap_or(u32::MAX)
    }
}

/// Units of [`ROOM_UNIT`] that `bytes` take (at least one).
fn units(bytes: usize) -> usize {
    bytes.div_ceil(ROOM_UNIT).max(1)
}

/// The routes of `disparo webhook`. The probes and /metrics are outside the limits of
/// the webhook routes, so no flood of callbacks keeps them from answering.
pub(crate) fn router(state: Arc<AppState>, limits: Arc<BodyLimits>) -> Router {
    let max_body_bytes = limits.max_bytes;
    let webhooks = Router::new()
        .route("/webhooks/meta/{namespace}/{channel}", get(meta_verify).post(meta_receive))
        .route("/webhooks/evolution/{namespace}/{channel}", post(evolution_receive))
        // Evolution's `byEvents: true` appends the event name (`/messages-update`).
        .route("/webhooks/evolution/{namespace}/{channel}/{event}", post(evolution_receive_by_event))
        .route_layer(middleware::from_fn_with_state(limits, read_body));
    Router::new()
        .merge(webhooks)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Reads the whole body of a webhook request under [`BodyLimits`] before the handler
/// runs (and before anything about the channel is looked up): room for the body, the
/// cap, the read timeout. Slow or endless uploads to any URL therefore hold at most the
/// room (`max_concurrent_requests × max_bytes` of memory), each for at most
/// `read_timeout`. The room is held until the answer is ready.
///
/// A request that finds no room within `wait` gets 503 with `Retry-After`: Meta retries
/// any answer but 2xx (docs/providers.md A4), so an overload delays statuses, never
/// loses them (docs/architecture.md, "The webhook under load").
async fn read_body(State(limits): State<Arc<BodyLimits>>, request: Request, next: Next) -> Response {
    let provider = if request.uri().path().starts_with("/webhooks/meta/") { META } else { EVOLUTION };
    let too_large = || (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_bytes as u64) {
        return too_large();
    }
    let units = limits.units_for(declared);
    let permit = match tokio::time::timeout(limits.wait, limits.room.clone().acquire_many_owned(units)).await {
        Ok(Ok(permit)) => permit,
        _ => {
            debug!(provider, "no room for the request in time");
            return ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "busy, retry later"))
                .into_response();
        }
    };
    let (parts, body) = request.into_parts();
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::with_capacity(declared.map_or(0, |length| length as usize));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| false)?;
            if bytes.len() + chunk.len() > limits.max_bytes {
                return Err(true);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(true)) => return too_large(),
        // The client went away or broke the framing: nobody reads this answer.
        Ok(Err(false)) => return (StatusCode::BAD_REQUEST, "request body unreadable").into_response(),
        Err(_) => {
            debug!(provider, "request body not received in time");
            return (StatusCode::REQUEST_TIMEOUT, "request body not received in time").into_response();
        }
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    drop(permit);
    response
}

/// The one answer to a POST that is not authenticated, whatever the reason: an unknown
/// namespace or channel, a channel whose credentials cannot be read, a missing or bad
/// signature. The same status and body for all, so the internet-facing URL does not
/// tell which organizations and channels exist.
fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "unauthorized").into_response()
}

/// The one answer to a subscription handshake that is refused, whatever the reason
/// (see [`unauthorized`]).
fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "forbidden").into_response()
}

/// The answer when a channel's secrets cannot be had: 503 while nothing can be checked
/// (the same for every URL), otherwise `refused` (the same as a bad signature).
fn lookup_failure(
    metrics: &WebhookMetrics,
    provider: &'static str,
    error: LookupError,
    refused: fn() -> Response,
) -> Response {
    match error {
        LookupError::NotFound => {
            metrics.count(provider, "none", "rejected_unknown_channel", 1);
            refused()
        }
        LookupError::Misconfigured(reason) => {
            // Anyone may post to a channel's URL: at debug level, so that nobody fills the
            // log; the Channel's Ready condition tells its owner what to fix.
            debug!(%reason, "channel credentials unusable: its webhooks are refused until they are fixed");
            metrics.count(provider, "none", "rejected_unusable_credentials", 1);
            refused()
        }
        LookupError::Unavailable(reason) => {
            warn!(%reason, "channel credentials unavailable");
            ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "channel credentials unavailable"))
                .into_response()
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
        Err(error) => return lookup_failure(&state.metrics, META, error, forbidden),
    };
    let token = query.get("hub.verify_token").map(String::as_bytes).unwrap_or_default();
    let subscribing = query.get("hub.mode").map(String::as_str) == Some("subscribe");
    if !subscribing || !signature::secrets_match(secrets.verify_token.expose(), token) {
        state.metrics.count(META, "none", "rejected_verify_token", 1);
        return forbidden();
    }
    match query.get("hub.challenge") {
        Some(challenge) if !challenge.is_empty() && challenge.len() <= MAX_CHALLENGE_LEN => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
            challenge.clone(),
        )
            .into_response(),
        _ => (StatusCode::BAD_REQUEST, "missing hub.challenge").into_response(),
    }
}

async fn meta_receive(
    State(state): Shared,
    Path((namespace, channel)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let span = info_span!("webhook", provider = META, %namespace, %channel);
    let response = async {
        let secrets = match state.credentials.meta(&namespace, &channel).await {
            Ok(secrets) => secrets,
            Err(error) => return lookup_failure(&state.metrics, META, error, unauthorized),
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

async fn evolution_receive(
    State(state): Shared,
    Path((namespace, channel)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let span = info_span!("webhook", provider = EVOLUTION, %namespace, %channel);
    let response = async {
        let secrets = match state.credentials.evolution(&namespace, &channel).await {
            Ok(secrets) => secrets,
            Err(error) => return lookup_failure(&state.metrics, EVOLUTION, error, unauthorized),
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
        unauthorized()
    }

    fn observe(&self, provider: &'static str, started: Instant, response: &Response) {
        self.metrics.requests.get_or_create(&RequestLabels { provider, code: response.status().as_u16() }).inc();
        self.metrics
            .request_seconds
            .get_or_create(&ProviderLabels { provider })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Applies the account health signals of a verified notification (see
    /// [`signals`]) before its statuses, and counts them. Returns how many were
    /// recorded, or the answer when they could not be (503 while Postgres is
    /// unavailable, so Meta retries the whole notification: applying a signal again
    /// has the same effect, and its statuses are then duplicates).
    async fn apply_signals(
        &self,
        organization: &str,
        channel: &str,
        parsed: Vec<Result<AccountSignal, signals::SignalField>>,
    ) -> Result<usize, Response> {
        let mut valid = Vec::with_capacity(parsed.len());
        for signal in parsed {
            match signal {
                Ok(signal) => valid.push(signal),
                Err(field) => self.count_signal(field.as_str(), signals::INVALID),
            }
        }
        if valid.is_empty() {
            return Ok(0);
        }
        let applied =
            tokio::time::timeout(self.apply_timeout, signals::apply(&self.pool, organization, channel, &valid));
        match applied.await {
            Ok(Ok(outcomes)) => {
                for (signal, outcome) in valid.iter().zip(&outcomes) {
                    self.count_signal(signal.field().as_str(), outcome.as_str());
                }
                Ok(outcomes.iter().filter(|o| **o == SignalOutcome::Applied).count())
            }
            Ok(Err(error)) if !error.is_transient() => {
                warn!(%error, "account signals refused by the database");
                Err((StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response())
            }
            result => {
                if let Ok(Err(error)) = result {
                    debug!(%error, "account signals not applied");
                }
                Err((
                    [(header::RETRY_AFTER, "5")],
                    (StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later"),
                )
                    .into_response())
            }
        }
    }

    fn count_signal(&self, field: &'static str, outcome: &'static str) {
        self.metrics.signals.get_or_create(&SignalLabels { field, outcome }).inc();
    }

    /// Binds a verified notification to the namespace's organization and the channel,
    /// applies it, and answers once it is committed.
    async fn apply(&self, source: Provider, namespace: &str, channel: &str, notification: Notification) -> Response {
        let provider = source.as_str();
        let organization = match self.organizations.of(namespace).await {
            Ok(Some(organization)) => organization,
            // The Channel exists (its credentials verified the request) but the controller
            // has not provisioned its namespace yet: the provider retries later.
            Ok(None) => {
                return (
                    [(header::RETRY_AFTER, "5")],
                    (StatusCode::SERVICE_UNAVAILABLE, "namespace not provisioned yet, retry later"),
                )
                    .into_response();
            }
            Err(error) => {
                debug!(error = %crate::telemetry::chain(&error), "organization lookup failed");
                return (
                    [(header::RETRY_AFTER, "5")],
                    (StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later"),
                )
                    .into_response();
            }
        };
        let organization = organization.as_str();
        let Notification { statuses, inbound, ignored, signals } = notification;
        for item in &ignored {
            self.metrics.count(provider, "none", item.as_str(), 1);
        }
        let signals = match self.apply_signals(organization, channel, signals).await {
            Ok(applied) => applied,
            Err(response) => return response,
        };
        let mut opt_outs = Vec::new();
        let events: Vec<StatusEvent> = statuses
            .into_iter()
            .map(|s| {
                // A failure that means "opted out" opts out the recipient (by number or
                // business-scoped id) as well as the message's contact (which the store
                // finds, or finds later).
                if s.opts_out && (s.recipient.is_some() || s.recipient_bsuid.is_some()) {
                    opt_outs.push(OptOut {
                        organization: organization.to_owned(),
                        wa_id: s.recipient.clone(),
                        bsuid: s.recipient_bsuid.clone(),
                    });
                }
                s.into_event(source, organization, channel)
            })
            .collect();
        for message in inbound {
            if message.text.as_deref().is_some_and(|text| self.keywords.matches(text)) {
                opt_outs.push(OptOut {
                    organization: organization.to_owned(),
                    wa_id: message.from,
                    bsuid: message.from_bsuid,
                });
            } else {
                self.metrics.count(provider, "inbound", "not_opt_out", 1);
            }
        }
        let mut summary = json!({"applied": 0, "duplicate": 0, "stale": 0, "unknown_id": 0, "opted_out": 0, "ignored": ignored.len(), "signals": signals});
        if events.is_empty() && opt_outs.is_empty() {
            return (StatusCode::OK, axum::Json(summary)).into_response();
        }
        let statuses_of: Vec<&'static str> = events.iter().map(|e| e.status.as_str()).collect();
        let happened_at: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
        match self.writer.submit(events, opt_outs, self.apply_timeout).await {
            Ok(report) => {
                let now = Utc::now();
                let lag = self.metrics.receipt_lag_seconds.get_or_create(&ProviderLabels { provider });
                for ((status, outcome), at) in statuses_of.iter().zip(&report.outcomes).zip(&happened_at) {
                    self.metrics.count(provider, status, outcome.as_str(), 1);
                    if *outcome == ApplyOutcome::Applied {
                        lag.observe((now - *at).num_milliseconds().max(0) as f64 / 1000.0);
                    }
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
                ([(header::RETRY_AFTER, "5")], (StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later"))
                    .into_response()
            }
        }
    }
}

/// Largest read buffer of a connection, which bounds the size of a request's headers
/// (hyper's default is about 400 KiB).
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown`, then lets in-flight
/// requests finish. Each connection must deliver a request's headers within
/// `header_read_timeout` (an idle kept-alive connection is closed after it too), so a
/// client that opens connections and trickles headers holds each for that long at
/// most; bodies are bounded by the webhook routes' own limits ([`BodyLimits`]). At
/// most `max_connections` are served at once: the next is accepted when one closes
/// (until then it waits in the kernel's backlog), which bounds the memory connections
/// take. Providers and ingress controllers speak HTTP/1.1 to this service.
pub(crate) async fn serve_http1(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        if connections.len() >= max_connections.max(1) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = connections.join_next() => continue,
            }
        }
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection that died before it was
                    // accepted: the listener itself is fine; give the first a moment.
                    debug!(%error, "accepting a connection failed");
                    if !matches!(error.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_CONNECTION_BUFFER);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                debug!(%error, "connection ended");
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections past the limit wait to be accepted, and are served once one closes.
    #[tokio::test]
    async fn connections_past_the_limit_wait_for_one_to_close() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve_http1(listener, app, Duration::from_secs(30), 2, shutdown.clone()));
        let ask = |mut stream: tokio::net::TcpStream| async move {
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        // two idle connections take both places
        let first = tokio::net::TcpStream::connect(address).await.unwrap();
        let second = tokio::net::TcpStream::connect(address).await.unwrap();
        let third = tokio::spawn(ask(tokio::net::TcpStream::connect(address).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!third.is_finished(), "a third connection is not served while two are open");
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(10), third).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(second);
        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn a_request_takes_room_for_its_declared_length_at_least_one_unit() {
        let limits = BodyLimits::new(32, 3 * 1024 * 1024, Duration::from_secs(5), Duration::from_secs(20));
        let largest = (3 * 1024 * 1024 / ROOM_UNIT) as u32;
        assert_eq!(limits.room.available_permits(), 32 * largest as usize, "room for 32 of the largest bodies");
        // Meta's one-status notification: one unit; thousands fit at once
        assert_eq!(limits.units_for(Some(700)), 1);
        assert_eq!(limits.units_for(Some(0)), 1);
        assert_eq!(limits.units_for(Some(ROOM_UNIT as u64 + 1)), 2);
        // no declared length (chunked): room for the largest body
        assert_eq!(limits.units_for(None), largest);
        assert_eq!(limits.units_for(Some(u64::MAX)), largest);
        // a service allowed a single request still takes the largest one
        let one = BodyLimits::new(0, 100, Duration::from_secs(5), Duration::from_secs(20));
        assert_eq!((one.room.available_permits(), one.units_for(None)), (1, 1));
    }
}
