//! `disparo webhook`: provider callbacks (Meta Cloud API, Evolution API) into Postgres.
//!
//! The service verifies each callback against its channel's secrets, turns it into
//! status events and opt-outs, and applies them through one writer task that groups
//! concurrent requests into single transactions; a provider gets its 200 only after the
//! commit. What it owns and where:
//!
//! - [`signature`]: Meta's `X-Hub-Signature-256`, Evolution's shared header and JWT.
//! - [`meta`], [`evolution`]: payload parsing, pure, into a [`notification::Notification`].
//! - [`signals`]: Meta's account health fields (number quality, messaging limits,
//!   restrictions, templates): parsing and routing, pure; the SQL is in
//!   [`crate::store::signals`].
//! - [`optout`]: opt-out keywords.
//! - [`credentials`]: channel secrets from the Kubernetes API (watch-backed) or fixed ones.
//! - [`writer`]: the batching writer; the SQL itself is in [`crate::store::receipts`].
//! - `sweeper`: receipts that came before their message's provider id was recorded
//!   are kept, matched again every few seconds, and dropped after a day.
//! - `server`: routes and answers; [`metrics`]: what is counted; [`bench`]: throughput.
//!
//! It leaves to others: sending (the sender), counters (schema triggers), channel
//! status and webhook paths (the controller).

pub mod credentials;
pub mod evolution;
pub mod meta;
pub mod metrics;
pub mod notification;
pub mod optout;
mod organizations;
mod server;
pub mod signals;
pub mod signature;
mod sweeper;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use credentials::{
    ChannelCredentials, EvolutionSecrets, KubeCredentials, LookupError, MetaSecrets, SecretValue, StaticCredentials,
};
pub use optout::OptOutKeywords;
pub use server::SIGNATURE_HEADER;
pub use writer::BatchConfig;

/// Errors of the webhook service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The writer or sweeper task panicked or was cancelled.
    #[error("writer or sweeper task")]
    Writer(#[source] tokio::task::JoinError),
}

/// Result alias of the webhook module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Postgres connections of a webhook replica unless told otherwise.
pub const DEFAULT_DB_CONNECTIONS: u32 = 4;

/// Arguments of `disparo webhook`.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to listen on (webhooks, /healthz, /readyz, /metrics).
    #[arg(long, env = "DISPARO_WEBHOOK_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// How the URL reaches Postgres: `direct`, or `pgbouncer-transaction` when it points
    /// at PgBouncer in transaction pooling mode.
    #[arg(long, env = "DISPARO_DB_POOLER", value_enum, default_value_t = crate::store::Pooler::Direct)]
    pub db_pooler: crate::store::Pooler,
    /// `host:port` to connect to instead of the URL's (a pooler in front of Postgres).
    #[arg(long, env = "DISPARO_DB_ADDRESS")]
    pub db_address: Option<String>,
    /// Largest request body accepted (413 above). Meta payloads reach about 3 MB.
    #[arg(long, env = "DISPARO_WEBHOOK_MAX_BODY_BYTES", default_value_t = 3 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Room for this many request bodies of the largest size (--max-body-bytes) read or
    /// handled at once: bodies take at most this many times --max-body-bytes of memory.
    /// A request takes room for the length it declares (at least 16 KiB), so far more
    /// small notifications (Meta's one status per request) are handled at once. A request
    /// that finds no room within 5 s gets 503 with Retry-After (providers retry it).
    #[arg(long, env = "DISPARO_WEBHOOK_MAX_CONCURRENT_REQUESTS", default_value_t = 32)]
    pub max_concurrent_requests: usize,
    /// How long a request's headers may take to arrive, in milliseconds (the
    /// connection is closed past it; an idle kept-alive connection too).
    #[arg(long, env = "DISPARO_WEBHOOK_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Client connections served at once; more wait to be accepted (in the kernel's
    /// backlog). Each open connection costs memory (buffers, its task) whether it
    /// carries a request or idles between them, so this bounds the service's memory
    /// when a provider opens thousands.
    #[arg(long, env = "DISPARO_WEBHOOK_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// How long a webhook request's body may take to arrive once it has a place, in
    /// milliseconds (408 past it).
    #[arg(long, env = "DISPARO_WEBHOOK_BODY_READ_TIMEOUT_MS", default_value_t = 20_000)]
    pub body_read_timeout_ms: u64,
    /// Inbound texts that opt the sender out, comma-separated (replaces the English and
    /// Portuguese defaults; an empty value turns opt-out detection off).
    #[arg(long, env = "DISPARO_OPT_OUT_KEYWORDS", value_delimiter = ',')]
    pub opt_out_keywords: Option<Vec<String>>,
    /// Most events grouped into one transaction.
    #[arg(long, env = "DISPARO_WEBHOOK_BATCH_MAX_EVENTS", default_value_t = 1000)]
    pub batch_max_events: usize,
    /// How long the writer waits for more requests before applying a batch (0: apply
    /// at once; requests that arrive during a transaction still form the next batch).
    #[arg(long, env = "DISPARO_WEBHOOK_BATCH_MAX_DELAY_MS", default_value_t = 0)]
    pub batch_max_delay_ms: u64,
    /// Postgres connections this process may open.
    #[arg(long, env = "DISPARO_WEBHOOK_DB_CONNECTIONS", default_value_t = DEFAULT_DB_CONNECTIONS)]
    pub db_max_connections: u32,
    /// How often receipts that came before their message's provider id was recorded are
    /// matched again, in milliseconds.
    #[arg(long, env = "DISPARO_WEBHOOK_SWEEP_INTERVAL_MS", default_value_t = 5000)]
    pub sweep_interval_ms: u64,
}

/// How one service instance behaves (what [`WebhookArgs`] become).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Request body cap in bytes.
    pub max_body_bytes: usize,
    /// Opt-out keywords.
    pub keywords: OptOutKeywords,
    /// Writer batching.
    pub batch: BatchConfig,
    /// How long a request waits for its commit before answering 503. Providers time
    /// out somewhere between 3 and 20 seconds; a late answer is a wasted one.
    pub apply_timeout: Duration,
    /// How often kept receipts (those that arrived before their message's provider id
    /// was recorded) are matched again, and those older than `kept_for` dropped.
    pub sweep_interval: Duration,
    /// How long a receipt that finds no message is kept.
    pub kept_for: Duration,
    /// Room for this many bodies of `max_body_bytes` read or handled at once (see
    /// [`WebhookArgs`]).
    pub max_concurrent_requests: usize,
    /// How long a webhook request waits for room before it gets 503.
    pub request_wait: Duration,
    /// How long a request's headers may take to arrive.
    pub header_read_timeout: Duration,
    /// Client connections served at once (see [`WebhookArgs`]).
    pub max_connections: usize,
    /// How long a webhook request's body may take to arrive once it has a place.
    pub body_read_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 3 * 1024 * 1024,
            keywords: OptOutKeywords::default(),
            batch: BatchConfig::default(),
            apply_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(5),
            kept_for: crate::store::receipts::UNMATCHED_RECEIPT_TTL,
            max_concurrent_requests: 32,
            request_wait: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 512,
            body_read_timeout: Duration::from_secs(20),
        }
    }
}

/// Serves webhooks on `listener` until `shutdown`, then lets in-flight requests finish
/// and the writer commit what they handed it. This is the whole service minus where
/// its inputs come from: tests and benchmarks call it with a port-0 listener, fixed
/// credentials and a pool of their own.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: PgPool,
    credentials: Arc<dyn ChannelCredentials>,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::WebhookMetrics::new(&mut registry));
    let (writer, writer_task) = writer::Writer::spawn(pool.clone(), config.batch, metrics.clone());
    let stop_sweeping = shutdown.child_token();
    let sweeper_task =
        sweeper::spawn(pool.clone(), config.sweep_interval, config.kept_for, metrics.clone(), stop_sweeping.clone());
    let state = Arc::new(server::AppState {
        organizations: organizations::Organizations::new(pool.clone()),
        pool,
        credentials,
        writer,
        metrics,
        registry: Arc::new(registry),
        keywords: config.keywords,
        apply_timeout: config.apply_timeout,
    });
    let limits = Arc::new(server::BodyLimits::new(
        config.max_concurrent_requests,
        config.max_body_bytes,
        config.request_wait,
        config.body_read_timeout,
    ));
    let app = server::router(state, limits);
    server::serve_http1(listener, app, config.header_read_timeout, config.max_connections, shutdown).await;
    // The router (and with it the last writer handle) is gone: the writer drains and ends.
    stop_sweeping.cancel();
    let swept = sweeper_task.await;
    writer_task.await.map_err(Error::Writer)?;
    swept.map_err(Error::Writer)
}

/// Runs `disparo webhook`: Postgres (connected lazily, so the service starts and answers
/// 503 while Postgres is down), channel secrets from the Kubernetes API, HTTP until
/// `shutdown`.
pub async fn run(args: WebhookArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let WebhookArgs {
        listen,
        database_url,
        db_pooler,
        db_address,
        max_body_bytes,
        max_concurrent_requests,
        header_read_timeout_ms,
        max_connections,
        body_read_timeout_ms,
        opt_out_keywords,
        batch_max_events,
        batch_max_delay_ms,
        db_max_connections,
        sweep_interval_ms,
    } = args;
    let database_url = match &db_address {
        Some(address) => String::from(crate::store::tenancy::at_address(
            url::Url::parse(&database_url).context("the database URL cannot be parsed")?,
            address,
        )?),
        None => database_url,
    };
    let pool = crate::store::connect_lazy_via(&database_url, db_max_connections, db_pooler)
        .context("configuring the Postgres pool")?;
    let client = kube::Client::try_default().await.context("creating the Kubernetes client")?;
    let (credentials, watch_task) = KubeCredentials::start(client, shutdown.clone());
    let keywords = match &opt_out_keywords {
        Some(list) => OptOutKeywords::new(list.iter().map(String::as_str)),
        None => OptOutKeywords::default(),
    };
    let config = ServiceConfig {
        max_body_bytes,
        keywords,
        batch: BatchConfig {
            max_events: batch_max_events.max(1),
            max_delay: Duration::from_millis(batch_max_delay_ms),
            ..BatchConfig::default()
        },
        sweep_interval: Duration::from_millis(sweep_interval_ms),
        max_concurrent_requests,
        header_read_timeout: Duration::from_millis(header_read_timeout_ms),
        max_connections,
        body_read_timeout: Duration::from_millis(body_read_timeout_ms),
        ..ServiceConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    info!(%listen, opt_out_keywords = config.keywords.len(), "webhook service listening");
    let served = serve(listener, pool, Arc::new(credentials), config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = watch_task.await;
    served.context("webhook service")
}
