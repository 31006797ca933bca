//! `disparo sandbox`: a provider simulator speaking the Meta Cloud API and Evolution
//! API wire formats, so a campaign can be rehearsed end to end without real messages.
//!
//! The same client code runs unchanged against it: same paths, auth headers, request
//! validation, success and error bodies (docs/providers.md A1/A2, B1), and signed status
//! webhooks posted back later, sometimes duplicated or out of order (A4/A5, B2). On
//! top it injects latency and errors ([`config::Faults`]) and keeps a [`Ledger`] of
//! every accepted message so a rehearsal can check what the provider actually saw
//! (nobody messaged twice, no minute over the cap).
//!
//! It also models the one Meta business portfolio its phone number ids share
//! ([`account`], docs/providers.md A3, A6): a messaging tier enforced over unique
//! template recipients in a moving 24 h of the sandbox [`clock`] (131048 beyond it),
//! a quality rating and throughput level the Graph read reports, template statuses
//! (132015 paused, 132016 disabled), restrictions, the per-user marketing limit (131049
//! by webhook), pricing and business-scoped user ids on every status, and the signed
//! account webhooks Meta posts when any of these change.
//!
//! Layout: [`config`] (what to simulate), [`behaviour`] (the dice, pure), [`ledger`],
//! [`account`] (the portfolio, pure), [`clock`], `meta` and `evolution` (the two APIs),
//! `webhooks` (posting them back), `server` (state, routes, the first control
//! endpoints), `control` (the portfolio's and the clock's control endpoints).
//!
//! Control endpoints (JSON bodies):
//! - `GET /_sandbox/ledger` (the [`LedgerSummary`] and webhook counts),
//!   `POST /_sandbox/reset` (empties the ledger), `GET|PUT /_sandbox/faults`,
//!   `PUT /_sandbox/evolution/{instance}/state` `{"state": "open" | "connecting" |
//!   "close"}` (what `connectionState` answers from then on), `GET /healthz`;
//! - `POST /_sandbox/evolution/{instance}/inbound` `{"from", "text"}` (posts the
//!   `messages.upsert` of a person writing to the instance's number);
//! - `GET /_sandbox/clock` → `{"now"}`; `POST /_sandbox/clock` `{"advance_seconds"}`;
//! - `GET /_sandbox/meta/account`; `PUT /_sandbox/meta/account` `{"tier"?,
//!   "quality_rating"?, "throughput_level"?}` (a tier change posts
//!   `business_capability_update` and `phone_number_quality_update`);
//! - `POST /_sandbox/meta/quality` `{"event"}` (`phone_number_quality_update`);
//! - `PUT /_sandbox/meta/templates/{name}/{language}` `{"status", "reason"?}`
//!   (`message_template_status_update`);
//! - `POST /_sandbox/meta/templates/{name}/{language}/quality` `{"score"}`
//!   (`message_template_quality_update`);
//! - `POST /_sandbox/meta/restriction` `{"restriction_type", "expiration"}`
//!   (`account_update`);
//! - `PUT /_sandbox/meta/marketing-limited` `["+55...", ...]`;
//! - `POST /_sandbox/meta/webhook` any JSON: signed and posted as is.
//!
//! The endpoints that post answer `{"webhooks": [{"field", "delivered"}], ...}` after
//! the receiver answered.

pub mod account;
pub mod behaviour;
pub mod clock;
pub mod config;
mod control;
mod evolution;
pub mod ledger;
mod meta;
mod server;
mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use account::{Quality, TemplateCategory, TemplateStatus, ThroughputLevel, Tier, bsuid_for};
pub use clock::Clock;
pub use config::{
    EvolutionSandbox, Faults, InstanceSpec, Latency, MetaSandbox, SandboxArgs, SandboxConfig, TemplateSpec,
    WebhookBehaviour,
};
pub use ledger::{Accepted, AccountCounters, Billable, Ledger, LedgerSummary};
pub use webhooks::WebhookCounts;

use crate::providers::evolution::ConnectionState;

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or malformed.
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
    /// The configuration file could not be read.
    #[error("reading {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML for [`SandboxConfig`].
    #[error("parsing {path}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_yaml::Error,
    },
    /// The listen address could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("serving")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was aborted.
    #[error("the server task ended abnormally")]
    Join(#[source] tokio::task::JoinError),
    /// The webhook HTTP client could not be built.
    #[error("building the webhook client")]
    HttpClient(#[source] crate::providers::Error),
    /// No Evolution instance of that name is configured.
    #[error("no Evolution instance named {0:?}")]
    UnknownInstance(String),
}

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A running sandbox. Dropping it leaves the server running until the runtime stops;
/// call [`SandboxHandle::shutdown`] to stop it and its webhook tasks.
#[derive(Debug)]
pub struct SandboxHandle {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    server: JoinHandle<std::io::Result<()>>,
}

/// Binds the configured address (port 0 picks one) and serves both APIs in the
/// background.
pub async fn start(config: SandboxConfig) -> Result<SandboxHandle> {
    config.validate()?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
    let shutdown = CancellationToken::new();
    let shared = Arc::new(server::Shared::new(config, format!("http://{addr}"), shutdown.clone())?);
    let app = server::router(shared.clone());
    let server =
        tokio::spawn(
            async move { axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await },
        );
    Ok(SandboxHandle { addr, shared, server })
}

impl SandboxHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`: the base URL for both clients (Meta `baseUrl`, Evolution `baseUrl`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ledger of accepted messages (shared: it keeps filling while the sandbox runs).
    pub fn ledger(&self) -> Ledger {
        self.shared.ledger.clone()
    }

    /// Webhook counters so far.
    pub fn webhook_counts(&self) -> WebhookCounts {
        self.shared.webhooks.counts()
    }

    /// Replaces the injected faults (e.g. start failing mid-campaign).
    pub fn set_faults(&self, faults: Faults) -> Result<()> {
        self.shared.set_faults(faults)
    }

    /// Changes an Evolution instance's connection state (e.g. simulate a dropped session).
    pub fn set_connection_state(&self, instance: &str, state: ConnectionState) -> Result<()> {
        self.shared.set_instance_state(instance, state)
    }

    /// The sandbox clock (real time plus what was advanced).
    pub fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    /// Stops accepting, ends held answers and webhook tasks, and waits for all of them.
    pub async fn shutdown(self) -> Result<()> {
        self.shared.shutdown.cancel();
        self.shared.webhooks.drain().await;
        self.server.await.map_err(Error::Join)?.map_err(Error::Serve)
    }
}

/// Runs `disparo sandbox` until ctrl-c or SIGTERM.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = run_until(args, shutdown).await;
    signals.abort();
    result
}

/// Runs `disparo sandbox` until `shutdown` is cancelled (for a `main` that owns the
/// signal handling).
pub(crate) async fn run_until(args: SandboxArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let meta_webhooks = config.meta.webhook_url.is_some();
    let evolution_webhooks = config.evolution.webhook_url.is_some();
    let handle = start(config).await?;
    info!(addr = %handle.addr(), meta_webhooks, evolution_webhooks, "sandbox listening");
    shutdown.cancelled().await;
    info!(accepted = handle.ledger().accepted_count(), "sandbox stopping");
    handle.shutdown().await?;
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}
