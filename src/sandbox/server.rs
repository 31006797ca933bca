//! The shared state of a running sandbox, its router, and the control endpoints a
//! rehearsal uses (`/_sandbox/...`, `/healthz`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use rand::Rng;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use super::account::Account;
use super::behaviour::{self, Fault};
use super::clock::Clock;
use super::config::{Faults, SandboxConfig};
use super::ledger::{Accepted, Admission, Ledger, LedgerSummary, Refusal};
use super::webhooks::{Auth, Target, WebhookCounts, Webhooks};
use super::{Error, Result, control, evolution, meta};
use crate::providers::evolution::ConnectionState;

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration the sandbox started with.
    pub config: SandboxConfig,
    /// Injected faults; replaceable at run time (`PUT /_sandbox/faults`).
    faults: RwLock<Faults>,
    /// Connection state per Evolution instance; replaceable at run time.
    instance_states: Mutex<HashMap<String, ConnectionState>>,
    /// A stable `instanceId` per instance, as Evolution reports it.
    pub instance_ids: HashMap<String, String>,
    /// Digits of the numbers that are not on WhatsApp.
    not_on_whatsapp: HashSet<String>,
    /// Digits of the numbers whose statuses carry only their BSUID.
    bsuid_only: HashSet<String>,
    /// The sandbox clock (real time plus what `POST /_sandbox/clock` added).
    pub clock: Clock,
    /// The Meta portfolio's state; changed by the control endpoints.
    account: Mutex<Account>,
    /// What was accepted.
    pub ledger: Ledger,
    /// The webhook poster.
    pub webhooks: Webhooks,
    /// Meta webhook receiver, if configured.
    pub meta_target: Option<Arc<Target>>,
    /// Evolution webhook receiver, if configured.
    pub evolution_target: Option<Arc<Target>>,
    /// Cancelled on shutdown: held answers and webhook tasks stop.
    pub shutdown: CancellationToken,
    /// The sandbox's own URL (Evolution's `server_url`).
    pub server_url: String,
}

/// Evolution stops retrying a webhook on these answers (`WEBHOOK_RETRY_NON_RETRYABLE_STATUS_CODES`).
const EVOLUTION_FINAL_STATUSES: &[u16] = &[400, 401, 403, 404, 422];

/// What a send request meets before it may be accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dice {
    /// Answer delay.
    pub latency: Duration,
    /// Injected error, if any.
    pub fault: Option<Fault>,
    /// Hold the answer of an accepted message this long (lost response).
    pub hold: Option<Duration>,
    /// Uniform draw in [0, 1) for the gateway 504 ([`behaviour::behind_gateway`]).
    pub gateway_draw: f64,
}

impl Shared {
    /// Builds the state; `server_url` is where the sandbox listens.
    pub fn new(config: SandboxConfig, server_url: String, shutdown: CancellationToken) -> Result<Self> {
        let webhooks = Webhooks::new(config.webhooks.clone(), shutdown.clone())?;
        let meta_target = config.meta.webhook_url.clone().map(|url| {
            Arc::new(Target { url, auth: Auth::MetaSignature(config.meta.app_secret.clone()), give_up_on: &[] })
        });
        let evolution_target = match &config.evolution.webhook_url {
            Some(url) => {
                let name = HeaderName::from_bytes(config.evolution.webhook_header.as_bytes()).map_err(|_| {
                    Error::Config(format!(
                        "evolution.webhook_header {:?} is not a header name",
                        config.evolution.webhook_header
                    ))
                })?;
                let mut value = HeaderValue::from_str(config.evolution.webhook_secret.expose())
                    .map_err(|_| Error::Config("evolution.webhook_secret cannot be sent in a header".to_owned()))?;
                value.set_sensitive(true);
                Some(Arc::new(Target {
                    url: url.clone(),
                    auth: Auth::Header(name, value),
                    give_up_on: EVOLUTION_FINAL_STATUSES,
                }))
            }
            None => None,
        };
        let instance_states = config.evolution.instances.iter().map(|i| (i.name.clone(), i.state)).collect();
        let instance_ids =
            config.evolution.instances.iter().map(|i| (i.name.clone(), uuid::Uuid::new_v4().to_string())).collect();
        let not_on_whatsapp = config.not_on_whatsapp.iter().map(|n| behaviour::digits(n)).collect();
        let bsuid_only = config.meta.bsuid_only_recipients.iter().map(|n| behaviour::digits(n)).collect();
        let clock = Clock::default();
        Ok(Shared {
            faults: RwLock::new(config.faults.clone()),
            instance_states: Mutex::new(instance_states),
            instance_ids,
            not_on_whatsapp,
            bsuid_only,
            account: Mutex::new(Account::from_config(&config.meta)),
            ledger: Ledger::with_clock(clock.clone()),
            clock,
            webhooks,
            meta_target,
            evolution_target,
            shutdown,
            server_url,
            config,
        })
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.faults.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the faults (validated).
    pub fn set_faults(&self, faults: Faults) -> Result<()> {
        faults.validate()?;
        *self.faults.write().unwrap_or_else(std::sync::PoisonError::into_inner) = faults;
        Ok(())
    }

    /// An instance's state, or `None` if it does not exist.
    pub(crate) fn instance_state(&self, instance: &str) -> Option<ConnectionState> {
        self.instance_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(instance).copied()
    }

    /// Changes an existing instance's state.
    pub(crate) fn set_instance_state(&self, instance: &str, state: ConnectionState) -> Result<()> {
        let mut states = self.instance_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match states.get_mut(instance) {
            Some(current) => {
                *current = state;
                Ok(())
            }
            None => Err(Error::UnknownInstance(instance.to_owned())),
        }
    }

    /// Whether a number (digits) is configured as not on WhatsApp.
    pub(crate) fn is_undeliverable(&self, digits: &str) -> bool {
        self.not_on_whatsapp.contains(digits)
    }

    /// Whether a number's (digits) statuses omit its phone and carry only its BSUID.
    pub(crate) fn is_bsuid_only(&self, digits: &str) -> bool {
        self.bsuid_only.contains(digits)
    }

    /// The Meta portfolio's state, locked for a short read or change (never across an
    /// await).
    pub fn account(&self) -> std::sync::MutexGuard<'_, Account> {
        self.account.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rolls the dice for one send. (The per-minute cap is checked when the message is
    /// recorded: [`Shared::accept`].)
    pub(crate) fn roll(&self) -> Dice {
        let faults = self.faults();
        let mut rng = rand::rng();
        let latency = behaviour::latency(&mut rng, &self.config.latency);
        let draw: f64 = rng.random();
        let fault = behaviour::choose_fault(&faults, draw);
        let hold = behaviour::chance(&mut rng, faults.timeout).then(|| Duration::from_millis(faults.timeout_delay_ms));
        Dice { latency, fault, hold, gateway_draw: rng.random() }
    }

    /// Whether the answer to an accepted message to `recipient_digits` is lost behind a
    /// gateway (see [`gateway_timeout`]).
    pub fn behind_gateway(&self, recipient_digits: &str, dice: &Dice) -> bool {
        behaviour::behind_gateway(&self.faults(), recipient_digits, dice.gateway_draw)
    }

    /// Records an accepted message in the ledger under the per-minute cap in force
    /// and the limits of `admission`; a refusal is answered with the provider's error.
    pub fn accept(&self, entry: Accepted, admission: Admission) -> Result<(), Refusal> {
        let per_minute_cap = self.faults().per_minute_cap;
        self.ledger.admit(entry, Admission { per_minute_cap, ..admission })
    }

    /// Sleeps unless shutting down; false when interrupted.
    pub async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }
}

/// The sandbox's routes: both provider APIs and the control endpoints.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{version}/{phone_number_id}", get(meta::phone_number))
        .route("/{version}/{phone_number_id}/messages", post(meta::send))
        .route("/message/sendText/{instance}", post(evolution::send_text))
        .route("/instance/connectionState/{instance}", get(evolution::connection_state))
        .route("/healthz", get(|| async { "ok" }))
        .route("/_sandbox/ledger", get(ledger))
        .route("/_sandbox/reset", post(reset))
        .route("/_sandbox/faults", get(get_faults).put(put_faults))
        .route("/_sandbox/evolution/{instance}/state", put(put_instance_state))
        .route("/_sandbox/evolution/{instance}/inbound", post(evolution::post_inbound))
        .route("/_sandbox/clock", get(control::get_clock).post(control::advance_clock))
        .route("/_sandbox/meta/account", get(control::get_account).put(control::put_account))
        .route("/_sandbox/meta/quality", post(control::post_quality))
        .route("/_sandbox/meta/templates/{name}/{language}", put(control::put_template_status))
        .route("/_sandbox/meta/templates/{name}/{language}/quality", post(control::post_template_quality))
        .route("/_sandbox/meta/restriction", post(control::post_restriction))
        .route("/_sandbox/meta/marketing-limited", put(control::put_marketing_limited))
        .route("/_sandbox/meta/webhook", post(control::post_webhook))
        .with_state(shared)
}

/// `GET /_sandbox/ledger`.
#[derive(Debug, Serialize)]
struct LedgerView {
    #[serde(flatten)]
    ledger: LedgerSummary,
    webhooks: WebhookCounts,
}

async fn ledger(State(shared): State<Arc<Shared>>) -> Json<LedgerView> {
    Json(LedgerView { ledger: shared.ledger.summary(), webhooks: shared.webhooks.counts() })
}

async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.ledger.reset();
    StatusCode::NO_CONTENT
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(shared.faults())
}

async fn put_faults(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let faults = match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => faults,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match shared.set_faults(faults) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct StateChange {
    state: ConnectionState,
}

async fn put_instance_state(
    State(shared): State<Arc<Shared>>,
    Path(instance): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let change = match serde_json::from_slice::<StateChange>(&body) {
        Ok(change) => change,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match shared.set_instance_state(&instance, change.state) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// What a reverse proxy (nginx) answers when its upstream is too slow: a 504 with an
/// HTML page, nothing of the provider's. The sandbox sends it *after* accepting the
/// message, the case a client must not retry.
pub fn gateway_timeout() -> Response {
    const PAGE: &str = "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    (StatusCode::GATEWAY_TIMEOUT, [(axum::http::header::CONTENT_TYPE, "text/html")], PAGE).into_response()
}

/// Compares a presented credential with the expected one in constant time.
pub(crate) fn credential_matches(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}
