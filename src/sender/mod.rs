//! `disparo send`: one batch of one campaign, run as one index of the campaign's Indexed
//! Job. It claims its batch's due messages, reserves rate-limit tokens from the
//! channel's shared windows, renders, sends, records every outcome, retries what is
//! worth retrying, and exits when every message of the batch is final.
//!
//! Exit codes tell the Job's pod failure policy what happened (see [`ExitReason`]).
//! The pod needs no Kubernetes API access: the controller passes the configuration as
//! one JSON environment variable and the credential through a `secretKeyRef`.

pub mod backoff;
mod batch;
pub mod decide;
pub mod metrics;
pub mod render;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span};
use uuid::Uuid;

pub use batch::{BatchEnd, BatchJob, MessageTemplate, run_batch};

use crate::api::{Provider, RateLimitsSpec, RetryPolicy};
use crate::providers::ProviderClient;

/// Errors of the sender.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Postgres failed.
    #[error("store")]
    Store(#[source] crate::store::Error),
}

/// Result alias of the sender.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit code: the channel's day window is spent; the controller suspends the Job and
/// resumes it when the window resets. The pod failure policy ignores it.
pub const EXIT_RATE_LIMITED: i32 = 75;
/// Exit code: the provider refused the channel (credentials, permissions, account,
/// billing); a person must act. The pod failure policy ignores it.
pub(crate) const EXIT_CHANNEL_STOPPED: i32 = 76;
/// Exit code: stopped by SIGTERM with messages left; a later run resumes them.
pub const EXIT_INTERRUPTED: i32 = 77;
/// Exit code: the provider refused this campaign's message (a paused template, a
/// message type it cannot send); the controller stalls the campaign until a person
/// edits or resumes it. The pod failure policy ignores it.
pub(crate) const EXIT_CAMPAIGN_STOPPED: i32 = 78;

/// Blocks a sender keeps in flight (see `batch::run_batch`).
pub(crate) const SENDER_LANES: u32 = 4;

/// Postgres connections of a sender: one per lane, and one for the pause checks and
/// usage counts beside them.
pub(crate) const SENDER_CONNECTIONS: u32 = SENDER_LANES + 1;

/// Lanes for a channel: only a channel fast enough for the database round trips to be
/// the bottleneck gets several. On a capped channel the caps are the bottleneck, and
/// lanes would reserve tokens for messages another lane already claimed.
pub fn lanes_for(limits: &crate::store::rate::Limits) -> u32 {
    let per_second = [
        limits.per_minute.map(|c| f64::from(c) / 60.0),
        limits.per_hour.map(|c| f64::from(c) / 3600.0),
        limits.per_day.map(|c| f64::from(c) / 86_400.0),
    ]
    .into_iter()
    .flatten()
    .fold(f64::INFINITY, f64::min);
    if !limits.min_interval.is_zero() || per_second < 200.0 { 1 } else { SENDER_LANES }
}

/// Exit codes the Job's pod failure policy must not count as failures.
pub(crate) const IGNORED_EXIT_CODES: [i32; 4] =
    [EXIT_RATE_LIMITED, EXIT_CHANNEL_STOPPED, EXIT_INTERRUPTED, EXIT_CAMPAIGN_STOPPED];

/// Where the provider lives (no secrets here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "camelCase")]
pub enum ProviderTarget {
    /// Meta Cloud API.
    #[serde(rename_all = "camelCase")]
    Meta {
        /// Graph API base URL.
        base_url: String,
        /// Graph API version.
        api_version: String,
        /// Business phone number id.
        phone_number_id: String,
    },
    /// Evolution API.
    #[serde(rename_all = "camelCase")]
    Evolution {
        /// Server base URL.
        base_url: String,
        /// Instance name.
        instance: String,
    },
}

impl ProviderTarget {
    /// Which provider.
    pub fn provider(&self) -> Provider {
        match self {
            ProviderTarget::Meta { .. } => Provider::Meta,
            ProviderTarget::Evolution { .. } => Provider::Evolution,
        }
    }
}

/// What the controller hands a sender pod (as JSON in `DISPARO_SEND_CONFIG`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendConfig {
    /// The Campaign's UID.
    pub campaign_uid: Uuid,
    /// Its namespace.
    pub organization: String,
    /// Its Channel's name.
    pub channel: String,
    /// The provider endpoint.
    pub target: ProviderTarget,
    /// What to send.
    pub message: MessageTemplate,
    /// Retries.
    pub retry: RetryPolicy,
    /// The channel's caps (provider defaults fill the gaps).
    pub rate_limits: RateLimitsSpec,
    /// Messages in flight at once.
    pub block_size: u32,
    /// Provider request timeout in milliseconds.
    pub request_timeout_millis: u64,
    /// The Meta channel's business portfolio, whose messaging limit templates count in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portfolio: Option<String>,
    /// What the Channel's marketing campaigns do while its quality is degraded.
    #[serde(default)]
    pub quality_policy: crate::api::QualityPolicy,
}

/// Arguments of `disparo send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// How the URL reaches Postgres: `direct`, or `pgbouncer-transaction` when it points
    /// at PgBouncer in transaction pooling mode.
    #[arg(long, env = "DISPARO_DB_POOLER", value_enum, default_value_t = crate::store::Pooler::Direct)]
    pub db_pooler: crate::store::Pooler,
    /// The batch configuration, as JSON.
    #[arg(long, env = "DISPARO_SEND_CONFIG")]
    pub config: String,
    /// The batch index (the Job's completion index).
    #[arg(long, env = "JOB_COMPLETION_INDEX")]
    pub batch: i32,
    /// Provider credential: Meta access token or Evolution api key.
    #[arg(long, env = "DISPARO_PROVIDER_TOKEN", hide_env_values = true)]
    pub provider_token: String,
    /// Serve Prometheus metrics on this port while the batch runs (the Job names it
    /// `metrics`, where the chart's PodMonitor scrapes it).
    #[arg(long, env = "DISPARO_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Address the metrics port binds: the pod's IP in a Job (an IPv6 address needs no
    /// brackets here, unlike in a socket address).
    #[arg(long, env = "DISPARO_METRICS_HOST", default_value = "0.0.0.0")]
    pub metrics_host: std::net::IpAddr,
    /// The Campaign's name, a label on every metric (the namespace comes from the
    /// scrape's discovery).
    #[arg(long, env = "DISPARO_CAMPAIGN_NAME", default_value = "")]
    pub campaign_name: String,
}

/// Builds the provider client for a target.
pub fn build_client(
    target: &ProviderTarget,
    token: &str,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn ProviderClient>> {
    let http = crate::providers::http_client(crate::providers::Timeouts {
        connect: (timeout / 3).min(Duration::from_secs(3)),
        request: timeout,
    })
    .context("building the HTTP client")?;
    Ok(match target {
        ProviderTarget::Meta { base_url, api_version, phone_number_id } => {
            Arc::new(crate::providers::meta::MetaClient::new(
                http,
                base_url.clone(),
                api_version.clone(),
                phone_number_id.clone(),
                crate::providers::Secret::new(token.to_owned()),
            ))
        }
        ProviderTarget::Evolution { base_url, instance } => {
            Arc::new(crate::providers::evolution::EvolutionClient::new(
                http,
                base_url.clone(),
                instance.clone(),
                crate::providers::Secret::new(token.to_owned()),
            ))
        }
    })
}

impl SendConfig {
    /// The batch job this configuration describes for one batch index.
    pub fn batch_job(&self, batch: i32) -> BatchJob {
        BatchJob {
            campaign: self.campaign_uid,
            organization: self.organization.clone(),
            channel: self.channel.clone(),
            batch,
            message: self.message.clone(),
            backoff: backoff::Backoff::from(&self.retry),
            limits: crate::store::rate::Limits::effective(self.target.provider(), &self.rate_limits),
            block_size: self.block_size.max(1),
            lanes: lanes_for(&crate::store::rate::Limits::effective(self.target.provider(), &self.rate_limits)),
            account: matches!(self.target, ProviderTarget::Meta { .. }).then(|| batch::AccountSettings {
                portfolio: self.portfolio.clone(),
                quality_policy: self.quality_policy,
            }),
        }
    }
}

/// Runs `disparo send` and returns the process exit code.
pub async fn run(args: SendArgs, shutdown: CancellationToken) -> anyhow::Result<i32> {
    let config: SendConfig =
        serde_json::from_str(&args.config).context("DISPARO_SEND_CONFIG is not a valid send configuration")?;
    let job = config.batch_job(args.batch);
    let span =
        info_span!("send", namespace = %config.organization, campaign = %config.campaign_uid, batch = args.batch);
    async move {
        let pool = crate::store::connect_via(&args.database_url, SENDER_CONNECTIONS, args.db_pooler)
            .await
            .context("connecting to Postgres")?;
        let client =
            build_client(&config.target, &args.provider_token, Duration::from_millis(config.request_timeout_millis))?;
        let mut registry = Registry::with_labels(
            [
                ("campaign".into(), args.campaign_name.clone().into()),
                ("channel".into(), config.channel.clone().into()),
                ("batch".into(), args.batch.to_string().into()),
            ]
            .into_iter(),
        );
        let metrics = metrics::SenderMetrics::new(&mut registry);
        if let Some(port) = args.metrics_port {
            let addr = SocketAddr::new(args.metrics_host, port);
            let registry = Arc::new(registry);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(error) = crate::telemetry::serve_metrics(addr, registry, stop).await {
                    error!(%error, "metrics server failed");
                }
            });
        }
        info!("batch starting");
        let end = run_batch(&pool, &job, client, &metrics, &shutdown).await?;
        let code = match &end {
            BatchEnd::Done => 0,
            BatchEnd::RateLimited(until) => {
                info!(%until, "day window spent; exiting for the controller to pause the campaign");
                EXIT_RATE_LIMITED
            }
            BatchEnd::ChannelStopped(reason) => {
                error!(%reason, "the provider refused the channel; a person must act");
                EXIT_CHANNEL_STOPPED
            }
            BatchEnd::CampaignStopped(reason) => {
                error!(%reason, "the provider refused this campaign's message; a person must act");
                EXIT_CAMPAIGN_STOPPED
            }
            BatchEnd::Held(reason) => {
                info!(%reason, "Meta's signals hold the campaign; exiting for the controller to pause it");
                EXIT_RATE_LIMITED
            }
            BatchEnd::Interrupted => {
                info!("interrupted; unfinished messages stay pending for a later run");
                EXIT_INTERRUPTED
            }
        };
        info!(?end, "batch finished");
        Ok(code)
    }
    .instrument(span)
    .await
}
