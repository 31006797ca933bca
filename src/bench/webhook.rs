//! `disparo bench webhook`: status events applied per second through the real service
//! (signed Meta payloads over HTTP, several concurrent clients), beside what the same
//! Postgres does with a plain batched `UPDATE` ([`crate::bench::raw_batched_update_rate`])
//! and with the store's batch apply without HTTP, measured in the same run. Also the
//! request latency percentiles.
//!
//! It seeds its own organization (`bench-<random>`) with contacts and one campaign whose
//! messages are all `sent`, and deletes the campaign afterwards; run it against a
//! throwaway database (the contacts stay).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::audience::{self, AudienceQuery, CampaignKey};
use crate::store::receipts::{self, Provider, ReceiptStatus, StatusEvent};
use crate::store::{self, campaigns, contacts, messages};
use crate::webhook::credentials::StaticCredentials;
use crate::webhook::signature;
use crate::webhook::{ServiceConfig, serve};

/// What went wrong running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Seeding or measuring against Postgres failed.
    #[error("store")]
    Store(#[from] store::Error),
    /// The HTTP client failed.
    #[error("http")]
    Http(#[from] reqwest::Error),
    /// Binding the local listener failed.
    #[error("listening")]
    Io(#[from] std::io::Error),
    /// The service answered something other than 200 or did not apply every event.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Status events per HTTP scenario (and for the store baseline).
    pub events: usize,
    /// Statuses per payload, one scenario each (1: Meta's usual; 50: a busy batch).
    pub statuses_per_request: Vec<usize>,
    /// Concurrent HTTP clients.
    pub clients: usize,
    /// Events per statement/transaction in the baselines.
    pub baseline_batch: usize,
    /// The service's configuration (batching).
    pub service: ServiceConfig,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            events: 20_000,
            statuses_per_request: vec![1, 50],
            clients: 16,
            baseline_batch: 500,
            service: ServiceConfig::default(),
        }
    }
}

/// One HTTP scenario's figures.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Statuses per payload.
    pub statuses_per_request: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests sent.
    pub requests: usize,
    /// Events applied.
    pub events: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Median request latency.
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
}

impl ScenarioReport {
    /// Events applied per second.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A baseline's figures.
#[derive(Debug, Clone)]
pub struct BaselineReport {
    /// Rows or events per statement/transaction.
    pub batch: usize,
    /// Rows or events processed.
    pub events: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl BaselineReport {
    /// Events per second.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Everything measured in one run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Plain batched `UPDATE ... FROM unnest` of a table without triggers, rows per
    /// second (filled by [`run`]; the lead's shared baseline).
    pub raw_update: Option<f64>,
    /// A bare batched `UPDATE` of `campaign_messages` by provider id (its indexes and
    /// counter triggers, nothing else).
    pub bare_update: BaselineReport,
    /// `store::receipts::apply` (locking read + planned update + history), no HTTP.
    pub store_apply: BaselineReport,
    /// Through the service.
    pub scenarios: Vec<ScenarioReport>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "webhook benchmark: status events applied per second")?;
        if let Some(raw) = self.raw_update {
            writeln!(f, "  {:<50} {raw:>9.0} rows/s", "raw batched UPDATE, plain table (500/statement)")?;
        }
        let bare = format!("bare UPDATE of campaign_messages ({}/statement)", self.bare_update.batch);
        writeln!(f, "  {bare:<50} {:>9.0} events/s", self.bare_update.events_per_second())?;
        let store = format!("store apply, no HTTP ({}/transaction)", self.store_apply.batch);
        writeln!(f, "  {store:<50} {:>9.0} events/s", self.store_apply.events_per_second())?;
        for s in &self.scenarios {
            let label = format!("HTTP, {} status(es)/request, {} clients", s.statuses_per_request, s.clients);
            writeln!(
                f,
                "  {label:<50} {:>9.0} events/s  ({} requests; latency p50 {:.1} ms, p99 {:.1} ms)",
                s.events_per_second(),
                s.requests,
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3
            )?;
        }
        Ok(())
    }
}

/// `disparo bench webhook`: the raw Postgres baseline, then [`bench`] with `events`
/// status events per scenario; prints the figures.
pub async fn run(pool: &PgPool, events: usize) -> anyhow::Result<()> {
    let raw = crate::bench::raw_batched_update_rate(pool, events, 500).await?;
    let mut report = bench(pool.clone(), BenchOptions { events, ..BenchOptions::default() }).await?;
    report.raw_update = Some(raw);
    print!("{report}");
    Ok(())
}

const CHANNEL: &str = "bench";
const APP_SECRET: &str = "bench-app-secret";

/// Runs the benchmark against a migrated database.
pub async fn bench(pool: PgPool, options: BenchOptions) -> Result<BenchReport, BenchError> {
    crate::telemetry::install_crypto_provider();
    let organization = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let per_phase = options.events.max(1);
    let phases = options.statuses_per_request.len() + 2;
    let campaign = Uuid::new_v4();
    let provider_ids = seed(&pool, &organization, campaign, per_phase * phases).await?;
    let mut slices = provider_ids.chunks(per_phase);
    let mut next_slice = || slices.next().map(<[String]>::to_vec).unwrap_or_default();

    let result = async {
        // Baseline: the same table, a bare batched UPDATE (indexes and triggers included).
        let bare_ids = next_slice();
        let started = Instant::now();
        for chunk in bare_ids.chunks(options.baseline_batch.max(1)) {
            receipts::baseline_update(&pool, &organization, chunk, ReceiptStatus::Delivered).await?;
        }
        let bare_update =
            BaselineReport { batch: options.baseline_batch, events: bare_ids.len(), elapsed: started.elapsed() };

        // Baseline: the store's apply, no HTTP, one transaction per batch.
        let store_ids = next_slice();
        let started = Instant::now();
        for chunk in store_ids.chunks(options.baseline_batch.max(1)) {
            let events: Vec<StatusEvent> = chunk
                .iter()
                .map(|pid| StatusEvent {
                    provider: Provider::Meta,
                    organization: organization.clone(),
                    channel: CHANNEL.to_owned(),
                    provider_message_id: pid.clone(),
                    message_id: None,
                    status: ReceiptStatus::Delivered,
                    at: Utc::now(),
                    error: None,
                    recipient: None,
                    opts_out: false,
                    recipient_bsuid: None,
                    pricing: None,
                })
                .collect();
            receipts::apply(&pool, &events, &[]).await?;
        }
        let store_apply =
            BaselineReport { batch: options.baseline_batch, events: store_ids.len(), elapsed: started.elapsed() };

        // The service, over HTTP.
        let credentials = Arc::new(StaticCredentials::new());
        credentials.set_meta(&organization, CHANNEL, APP_SECRET, "verify");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/webhooks/meta/{organization}/{CHANNEL}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let server =
            tokio::spawn(serve(listener, pool.clone(), credentials, options.service.clone(), shutdown.clone()));
        let mut scenarios = Vec::new();
        for &per_request in &options.statuses_per_request {
            let ids = next_slice();
            let scenario = run_scenario(&url, &ids, per_request.max(1), options.clients.max(1)).await;
            match scenario {
                Ok(report) => scenarios.push(report),
                Err(error) => {
                    shutdown.cancel();
                    let _ = server.await;
                    return Err(error);
                }
            }
        }
        shutdown.cancel();
        let _ = server.await;
        Ok(BenchReport { raw_update: None, bare_update, store_apply, scenarios })
    }
    .await;
    campaigns::delete(&pool, campaign).await?;
    result
}

/// Contacts, one campaign, all messages `sent` with provider ids `wamid.bench.<id>`.
async fn seed(pool: &PgPool, organization: &str, campaign: Uuid, n: usize) -> Result<Vec<String>, BenchError> {
    let people: Vec<contacts::NewContact> = (0..n)
        .map(|i| contacts::NewContact {
            phone: format!("+55219{i:08}"),
            name: None,
            tags: vec![],
            attributes: json!({}),
            whatsapp_id: None,
        })
        .collect();
    for chunk in people.chunks(5000) {
        contacts::upsert(pool, organization, chunk).await?;
    }
    // The webhook URL names the organization as its namespace.
    crate::store::tenancy::record(pool, organization, organization, &format!("bench_{organization}")).await?;
    let key = CampaignKey {
        uid: campaign,
        organization,
        name: "bench",
        channel: CHANNEL,
        batch_size: u32::try_from(n.max(1)).unwrap_or(u32::MAX),
    };
    audience::materialize(pool, &key, &AudienceQuery::AllContacts).await?;
    let mut provider_ids = Vec::with_capacity(n);
    loop {
        let claimed = messages::claim_due(pool, campaign, 0, 5000).await?;
        if claimed.is_empty() {
            break;
        }
        let outcomes: Vec<(i64, messages::Outcome)> = claimed
            .iter()
            .map(|m| (m.id, messages::Outcome::Sent { provider_message_id: format!("wamid.bench.{}", m.id) }))
            .collect();
        messages::record_outcomes(pool, &outcomes, "bench").await?;
        provider_ids.extend(claimed.iter().map(|m| format!("wamid.bench.{}", m.id)));
    }
    // Measure the steady state a running database is in, not the minutes after a bulk
    // load before autovacuum has set hint bits and statistics (without statistics the
    // planner may scan the whole table per batch).
    sqlx::query("VACUUM (ANALYZE) campaign_messages, contacts").execute(pool).await.map_err(store::Error::from)?;
    Ok(provider_ids)
}

/// A signed Meta payload of `delivered` statuses (v24-style, with pricing).
fn payload(ids: &[String]) -> (Vec<u8>, String) {
    let ts = Utc::now().timestamp().to_string();
    let statuses: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            json!({
                "id": id, "status": "delivered", "timestamp": ts, "recipient_id": "5521900000000",
                "pricing": {"billable": true, "pricing_model": "PMP", "type": "regular", "category": "marketing"}
            })
        })
        .collect();
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "statuses": statuses
        }}]}]
    })
    .to_string()
    .into_bytes();
    let signature = signature::sign_meta(APP_SECRET.as_bytes(), &body);
    (body, signature)
}

async fn run_scenario(
    url: &str,
    ids: &[String],
    per_request: usize,
    clients: usize,
) -> Result<ScenarioReport, BenchError> {
    let requests: Vec<(Vec<u8>, String)> = ids.chunks(per_request).map(payload).collect();
    let mut queues: Vec<Vec<(Vec<u8>, String)>> = vec![Vec::new(); clients];
    for (i, request) in requests.into_iter().enumerate() {
        queues[i % clients].push(request);
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let started = Instant::now();
    let tasks: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(queue.len());
                let mut applied = 0u64;
                for (body, signature) in queue {
                    let sent = Instant::now();
                    let response = http
                        .post(&url)
                        .header(crate::webhook::SIGNATURE_HEADER, signature)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    let text = response.text().await?;
                    latencies.push(sent.elapsed());
                    if !status.is_success() {
                        return Err(BenchError::Unexpected(format!("{status}: {text}")));
                    }
                    let summary: serde_json::Value =
                        serde_json::from_str(&text).map_err(|e| BenchError::Unexpected(e.to_string()))?;
                    applied += summary["applied"].as_u64().unwrap_or(0);
                }
                Ok::<_, BenchError>((latencies, applied))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut applied = 0;
    for task in tasks {
        let (mut l, a) = task.await.map_err(|e| BenchError::Unexpected(e.to_string()))??;
        latencies.append(&mut l);
        applied += a;
    }
    let elapsed = started.elapsed();
    if applied != ids.len() as u64 {
        return Err(BenchError::Unexpected(format!("{applied} of {} events applied", ids.len())));
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies.get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
    };
    Ok(ScenarioReport {
        statuses_per_request: per_request,
        clients,
        requests: latencies.len(),
        events: ids.len(),
        elapsed,
        p50: percentile(0.50),
        p99: percentile(0.99),
    })
}
