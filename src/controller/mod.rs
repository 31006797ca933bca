//! `disparo controller`: the campaign lifecycle on Kubernetes. Two kube-runtime
//! controllers (Campaign, which owns its Jobs, and Channel) share one [`Context`];
//! only the replica holding the Lease reconciles. `/metrics`, `/healthz` and `/readyz`
//! are served beside them.

mod account;
pub mod campaign;
pub mod channel;
mod cost;
pub mod decide;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod schedule;
pub mod status;
pub mod tenant;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{Campaign, Channel};

/// Errors of a reconcile. Each variant is counted by name in the failure metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed.
    #[error("kubernetes API")]
    Kube(#[from] kube::Error),
    /// Postgres failed.
    #[error("store")]
    Store(#[from] crate::store::Error),
    /// An object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// The Channel cannot be used as written.
    #[error("invalid channel: {0}")]
    InvalidChannel(String),
    /// The Campaign cannot be used as written.
    #[error("invalid campaign: {0}")]
    InvalidCampaign(String),
    /// The finalizer machinery failed.
    #[error("finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Whether trying again later may succeed (the API server or Postgres was briefly
    /// unavailable, a write lost a race), as opposed to something a person must fix (an
    /// invalid object, a permission the controller lacks).
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(status)) => status.code >= 500 || matches!(status.code, 409 | 429),
            Error::Kube(_) => true,
            Error::Store(e) => e.is_transient(),
            Error::MissingObjectKey(_) | Error::InvalidChannel(_) | Error::InvalidCampaign(_) => false,
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.is_retryable(),
                _ => true,
            },
        }
    }

    /// The variant's name, for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::InvalidChannel(_) => "invalid_channel",
            Error::InvalidCampaign(_) => "invalid_campaign",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Result alias of the controller.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconcile shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Postgres.
    pub pool: PgPool,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// How sender Jobs are built.
    pub sender: job::SenderSettings,
    /// HTTP client for provider checks (Evolution connection state).
    pub http: reqwest::Client,
    /// The admin database URL, from which each organization's scoped URL is derived.
    pub database_url: String,
    /// Serializes provisioning of organizations' roles and Secrets.
    pub tenancy: tokio::sync::Mutex<()>,
    /// Where the rate card is (see [`ControllerArgs::rate_card`]).
    pub rate_card: Option<std::path::PathBuf>,
    /// When each campaign's cost was last computed: a grouping over its delivered
    /// messages, done every [`cost::EVERY`] rather than at every status refresh.
    pub costed_at: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>,
}

/// Errors a retry may cure requeue soon; the others (reported on the object as a
/// `Stalled` condition by the reconcilers) are looked at again only now and then, or
/// when the object changes. Both kinds are counted by cause.
fn error_policy<K: ResourceExt>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let kind = std::any::type_name::<K>().rsplit("::").next().unwrap_or("object");
    warn!(error = %crate::telemetry::chain(error), retryable = error.is_retryable(), name = %object.name_any(), namespace = ?object.namespace(), "reconcile failed");
    ctx.metrics
        .failures
        .get_or_create(&metrics::ErrorLabels { kind: kind.to_owned(), error: error.metric_label().to_owned() })
        .inc();
    if error.is_retryable() {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::requeue(Duration::from_secs(300))
    }
}

/// Arguments of `disparo controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Image of sender pods (the operator's own image).
    #[arg(long, env = "DISPARO_SENDER_IMAGE", default_value = "ghcr.io/disparo/disparo:latest")]
    pub sender_image: String,
    /// Messages in flight per sender pod.
    #[arg(long, env = "DISPARO_SENDER_BLOCK_SIZE", default_value_t = 16)]
    pub sender_block_size: u32,
    /// Provider request timeout of sender pods, in milliseconds.
    #[arg(long, env = "DISPARO_SENDER_TIMEOUT_MS", default_value_t = 15_000)]
    pub sender_timeout_ms: u64,
    /// How sender pods reach Postgres: straight, or through PgBouncer in transaction
    /// mode (passed to them as `DISPARO_DB_POOLER`).
    #[arg(long, env = "DISPARO_SENDER_DB_POOLER", value_enum, default_value_t = crate::store::Pooler::Direct)]
    pub sender_db_pooler: crate::store::Pooler,
    /// `host:port` sender pods connect to instead of the admin URL's (a pooler in front
    /// of Postgres): the namespaces' database URLs point there.
    #[arg(long, env = "DISPARO_SENDER_DB_ADDRESS")]
    pub sender_db_address: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DISPARO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "DISPARO_LEASE_NAME", default_value = "disparo-controller")]
    pub lease_name: String,
    /// This replica's identity (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a lease holds without renewal (failover time).
    #[arg(long, default_value_t = 10)]
    pub lease_seconds: u64,
    /// Reconcile only this namespace (default: every namespace). Lets several
    /// installations, or test runs, share one cluster.
    #[arg(long, env = "DISPARO_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Apply migrations at start.
    #[arg(long, env = "DISPARO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// The rate card campaigns' costs are estimated with (YAML: version, currency,
    /// rates by category and calling code; the chart mounts it from a ConfigMap).
    #[arg(long, env = "DISPARO_RATE_CARD")]
    pub rate_card: Option<std::path::PathBuf>,
}

#[derive(Clone)]
struct Health {
    pool: PgPool,
    registry: Arc<Registry>,
    leading: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    match crate::store::ping(&health.pool).await {
        Ok(()) => {
            (StatusCode::OK, if health.leading.load(Ordering::Relaxed) { "ready (leader)" } else { "ready (standby)" })
                .into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable").into_response(),
    }
}

async fn metrics_handler(State(health): State<Health>) -> axum::response::Response {
    crate::telemetry::metrics_response(&health.registry)
}

/// Runs the controller until shutdown (or until the lease is lost, which returns an
/// error so the pod restarts as a standby).
pub async fn run(args: ControllerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    let pool = crate::store::connect(&args.database_url, 10).await.context("connecting to Postgres")?;
    if args.migrate {
        crate::store::migrate(&pool).await.context("applying migrations")?;
    }
    let identity =
        args.identity.clone().unwrap_or_else(|| format!("disparo-controller-{}", uuid::Uuid::new_v4().simple()));
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let leading = Arc::new(AtomicBool::new(false));
    let health = Health { pool: pool.clone(), registry: Arc::new(registry), leading: leading.clone() };
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { server_stop.cancelled().await }).await
    });

    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
    let lease = leader::LeaseConfig {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: Duration::from_secs(args.lease_seconds.max(2)),
        renew: Duration::from_secs((args.lease_seconds / 3).max(1)),
    };
    info!(%identity, "waiting for the lease");
    if !leader::acquire(&leases, &lease, &shutdown).await {
        let _ = server.await;
        return Ok(());
    }
    leading.store(true, Ordering::Relaxed);
    metrics.leader.set(1);
    let lost = CancellationToken::new();
    let holder = tokio::spawn(leader::hold(leases, lease, shutdown.clone(), lost.clone()));

    let ctx = Arc::new(Context {
        client: client.clone(),
        pool,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "disparo-controller".into(), instance: Some(identity) },
        ),
        metrics,
        sender: job::SenderSettings {
            image: args.sender_image,
            database_secret: tenant::DATABASE_SECRET.to_owned(),
            database_secret_key: tenant::URL_KEY.to_owned(),
            block_size: args.sender_block_size,
            request_timeout_millis: args.sender_timeout_ms,
            ttl_seconds_after_finished: 3600,
            db_pooler: args.sender_db_pooler,
            db_address: args.sender_db_address.clone(),
        },
        http: crate::providers::http_client(crate::providers::Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
        })
        .context("building the HTTP client")?,
        database_url: args.database_url.clone(),
        tenancy: tokio::sync::Mutex::new(()),
        rate_card: args.rate_card.clone(),
        costed_at: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let stop = {
        let shutdown = shutdown.clone();
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
            }
        }
    };
    let stop = futures::future::FutureExt::shared(Box::pin(stop));
    let (campaign_api, job_api, channel_api): (Api<Campaign>, Api<Job>, Api<Channel>) = match &args.watch_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
    };
    let campaigns = Controller::new(campaign_api, watcher::Config::default())
        .owns(job_api, watcher::Config::default().labels(job::CAMPAIGN_LABEL))
        .graceful_shutdown_on(stop.clone());
    let channels = Controller::new(channel_api, watcher::Config::default()).graceful_shutdown_on(stop.clone());
    let sweep = metrics::sweep_deleted(ctx.clone(), campaigns.store(), channels.store(), stop);
    let campaigns =
        campaigns.run(campaign::reconcile, error_policy, ctx.clone()).for_each(|_| futures::future::ready(()));
    let channels = channels.run(channel::reconcile, error_policy, ctx.clone()).for_each(|_| futures::future::ready(()));
    info!("reconciling campaigns and channels");
    futures::future::join3(campaigns, channels, sweep).await;
    shutdown.cancel();
    let _ = holder.await;
    let _ = server.await;
    if lost.is_cancelled() {
        anyhow::bail!("lost the leader lease; restarting as a standby");
    }
    Ok(())
}
