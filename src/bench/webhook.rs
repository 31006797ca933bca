//! `disparo bench webhook`: status events applied per second through the real service
//! (signed Meta payloads over HTTP on real sockets), beside what the same Postgres does
//! with a plain batched `UPDATE` ([`crate::bench::raw_batched_update_rate`]) and with the
//! store's batch apply without HTTP, measured in the same run. Also the request latency
//! percentiles.
//!
//! Meta's pace: one status per request, many requests at once, an answer expected within
//! 200 ms (docs/providers.md). The scenarios at 64, 256 and 1,024 concurrent clients post
//! exactly that; each client keeps its own connection, like Meta's senders. A request
//! refused with 503 is posted again, as Meta retries any answer but 2xx, and counted. Each
//! scenario's figure is what Postgres shows afterwards: the rows its statuses moved.
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

/// One HTTP scenario: how many statuses each request carries, from how many clients at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// Statuses per payload (1: Meta's usual; 50: a busy batch).
    pub statuses_per_request: usize,
    /// Concurrent clients, each with its own connection.
    pub clients: usize,
}

/// Meta's pace: one status per request, from 64, 256 and 1,024 clients at once.
pub const META_PACE_CLIENTS: [usize; 3] = [64, 256, 1024];

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Status events per HTTP scenario (and for the store baseline).
    pub events: usize,
    /// The HTTP scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Events per statement/transaction in the baselines.
    pub baseline_batch: usize,
    /// The service's configuration (batching, request limits).
    pub service: ServiceConfig,
    /// Postgres connections of the service (its own pool, as `disparo webhook` has).
    pub service_connections: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let meta_pace = META_PACE_CLIENTS.iter().map(|&clients| Scenario { statuses_per_request: 1, clients });
        Self {
            events: 20_000,
            scenarios: meta_pace.chain([Scenario { statuses_per_request: 50, clients: 16 }]).collect(),
            baseline_batch: 500,
            service: ServiceConfig::default(),
            service_connections: crate::webhook::DEFAULT_DB_CONNECTIONS,
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
    /// Events applied, as the service answered.
    pub events: usize,
    /// Messages whose status the scenario moved, counted in Postgres afterwards.
    pub rows_moved: usize,
    /// Requests answered 503 (and posted again).
    pub refused: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Median request latency.
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
    /// Slowest request.
    pub max: Duration,
    /// What the service's writer did meanwhile (from its /metrics).
    pub writer: WriterStats,
}

/// The writer's work during a scenario, from the service's own metrics: where the time
/// of a request goes, apart from HTTP.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriterStats {
    /// Batch transactions committed.
    pub transactions: f64,
    /// Events per transaction, on average.
    pub events_per_transaction: f64,
    /// Requests per transaction, on average.
    pub requests_per_transaction: f64,
    /// Seconds per transaction (begin to commit), on average.
    pub seconds_per_transaction: f64,
    /// Seconds the service took per request (read to answer), on average.
    pub seconds_per_request: f64,
    /// Share of the wall time the writer spent in transactions (1: always busy).
    pub busy: f64,
}

/// Sums and counts of the service's histograms, from its /metrics text.
#[derive(Debug, Clone, Copy, Default)]
struct Scraped {
    batch_events: (f64, f64),
    batch_requests: (f64, f64),
    batch_seconds: (f64, f64),
    request_seconds: (f64, f64),
}

impl Scraped {
    fn parse(text: &str) -> Scraped {
        let mut scraped = Scraped::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let name = name.split('{').next().unwrap_or_default();
            let slot = match name.strip_prefix("disparo_webhook_") {
                Some(rest) => match rest.rsplit_once('_') {
                    Some(("batch_events", part)) => (&mut scraped.batch_events, part),
                    Some(("batch_requests", part)) => (&mut scraped.batch_requests, part),
                    Some(("batch_seconds", part)) => (&mut scraped.batch_seconds, part),
                    Some(("request_seconds", part)) => (&mut scraped.request_seconds, part),
                    _ => continue,
                },
                None => continue,
            };
            match slot {
                (pair, "sum") => pair.0 += value,
                (pair, "count") => pair.1 += value,
                _ => {}
            }
        }
        scraped
    }

    /// What happened between `before` and `self`, over `elapsed`.
    fn since(&self, before: &Scraped, elapsed: Duration) -> WriterStats {
        let delta = |now: (f64, f64), then: (f64, f64)| (now.0 - then.0, now.1 - then.1);
        let mean = |(sum, count): (f64, f64)| if count > 0.0 { sum / count } else { 0.0 };
        let seconds = delta(self.batch_seconds, before.batch_seconds);
        WriterStats {
            transactions: seconds.1,
            events_per_transaction: mean(delta(self.batch_events, before.batch_events)),
            requests_per_transaction: mean(delta(self.batch_requests, before.batch_requests)),
            seconds_per_transaction: mean(seconds),
            seconds_per_request: mean(delta(self.request_seconds, before.request_seconds)),
            busy: seconds.0 / elapsed.as_secs_f64().max(1e-9),
        }
    }
}

async fn scrape(metrics_url: &str) -> Result<Scraped, BenchError> {
    let text = reqwest::get(metrics_url).await?.text().await?;
    Ok(Scraped::parse(&text))
}

impl ScenarioReport {
    /// Events applied per second (rows moved in Postgres over the wall time).
    pub fn events_per_second(&self) -> f64 {
        self.rows_moved as f64 / self.elapsed.as_secs_f64().max(1e-9)
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
            let share = self.raw_update.map(|raw| format!(", {:.0} % of raw", 100.0 * s.events_per_second() / raw));
            writeln!(
                f,
                "  {label:<50} {:>9.0} events/s  ({} requests, {} refused with 503; {} rows moved{}; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
                s.events_per_second(),
                s.requests,
                s.refused,
                s.rows_moved,
                share.unwrap_or_default(),
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3,
                s.max.as_secs_f64() * 1e3
            )?;
            let w = &s.writer;
            writeln!(
                f,
                "  {:<50} writer: {:.0} transactions of {:.1} events ({:.1} requests), {:.2} ms each, busy {:.0} % of the time; service time per request {:.1} ms",
                "",
                w.transactions,
                w.events_per_transaction,
                w.requests_per_transaction,
                w.seconds_per_transaction * 1e3,
                w.busy * 100.0,
                w.seconds_per_request * 1e3
            )?;
        }
        Ok(())
    }
}

/// `disparo bench webhook`: the raw Postgres baseline, then [`bench`] with `events`
/// status events per scenario (the one-status scenarios at `clients`, when given);
/// prints the figures.
pub async fn run(pool: &PgPool, events: usize, clients: Option<Vec<usize>>) -> anyhow::Result<()> {
    let mut options = BenchOptions { events, ..BenchOptions::default() };
    if let Some(clients) = clients {
        let batch = options.scenarios.iter().copied().filter(|s| s.statuses_per_request > 1);
        options.scenarios =
            clients.iter().map(|&clients| Scenario { statuses_per_request: 1, clients }).chain(batch).collect();
    }
    let most = options.scenarios.iter().map(|s| s.clients).max().unwrap_or(1);
    let descriptors = super::raise_open_files_limit((2 * most + 256) as u64)?;
    println!(
        "open files limit: {descriptors}; the service: one writer, {} Postgres connections, room for {} bodies of {} bytes",
        options.service_connections, options.service.max_concurrent_requests, options.service.max_body_bytes
    );
    let raw = crate::bench::raw_batched_update_rate(pool, events, 500).await?;
    let mut report = bench(pool.clone(), options).await?;
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
    let phases = options.scenarios.len() + 2;
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

        // Baseline: the store's apply, no HTTP, one transaction per batch, of the very
        // events the service makes of the payloads it is posted.
        let store_ids = next_slice();
        let mut batches = Vec::new();
        for chunk in store_ids.chunks(options.baseline_batch.max(1)) {
            batches.push(events_of(&payload(chunk).0, &organization)?);
        }
        let started = Instant::now();
        for events in &batches {
            receipts::apply(&pool, events, &[]).await?;
        }
        let store_apply =
            BaselineReport { batch: options.baseline_batch, events: store_ids.len(), elapsed: started.elapsed() };

        // The service, over HTTP, on a pool of its own.
        let credentials = Arc::new(StaticCredentials::new());
        credentials.set_meta(&organization, CHANNEL, APP_SECRET, "verify");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/webhooks/meta/{organization}/{CHANNEL}", listener.local_addr()?);
        let metrics_url = format!("http://{}/metrics", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let service_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(options.service_connections.max(1))
            .connect_with((*pool.connect_options()).clone())
            .await
            .map_err(store::Error::from)?;
        let server =
            tokio::spawn(serve(listener, service_pool, credentials, options.service.clone(), shutdown.clone()));
        let mut scenarios = Vec::new();
        for scenario in &options.scenarios {
            let ids = next_slice();
            let report = async {
                let before = scrape(&metrics_url).await?;
                let report =
                    run_scenario(&url, &ids, scenario.statuses_per_request.max(1), scenario.clients.max(1)).await?;
                let writer = scrape(&metrics_url).await?.since(&before, report.elapsed);
                let rows_moved = rows_moved(&pool, &organization, &ids).await?;
                Ok::<_, BenchError>(ScenarioReport { rows_moved, writer, ..report })
            }
            .await;
            match report {
                Ok(report) if report.rows_moved == ids.len() => scenarios.push(report),
                Ok(report) => {
                    shutdown.cancel();
                    let _ = server.await;
                    return Err(BenchError::Unexpected(format!(
                        "{} of {} statuses moved their message in Postgres",
                        report.rows_moved,
                        ids.len()
                    )));
                }
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
        // Blocks of a sender's size: recording outcomes costs more than linearly in
        // the block (a nested loop over the block's outcomes).
        let claimed = messages::claim_due(pool, campaign, 0, 500).await?;
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
    // Meta posts `sent` before `delivered`: by the time the measured `delivered` come,
    // the contacts have the business-scoped user id the `sent` gave them.
    sqlx::query(
        "UPDATE contacts c SET bsuid = 'BR.' || (100000000000000 + m.id) FROM campaign_messages m WHERE m.campaign_uid = $1 AND c.id = m.contact_id",
    )
    .bind(campaign)
    .execute(pool)
    .await
    .map_err(store::Error::from)?;
    // Measure the steady state a running database is in, not the minutes after a bulk
    // load before autovacuum has set hint bits and statistics (without statistics the
    // planner may scan the whole table per batch).
    sqlx::query("VACUUM (ANALYZE) campaign_messages, contacts").execute(pool).await.map_err(store::Error::from)?;
    Ok(provider_ids)
}

/// How many of the messages with these provider ids are `delivered` now.
async fn rows_moved(pool: &PgPool, organization: &str, ids: &[String]) -> Result<usize, BenchError> {
    let (moved,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM campaign_messages WHERE organization = $1 AND provider_message_id = ANY($2) AND status = 'delivered'",
    )
    .bind(organization)
    .bind(ids)
    .fetch_one(pool)
    .await
    .map_err(store::Error::from)?;
    Ok(usize::try_from(moved).unwrap_or_default())
}

/// The status events the service makes of a Meta payload for `organization`.
fn events_of(body: &[u8], organization: &str) -> Result<Vec<StatusEvent>, BenchError> {
    let notification =
        crate::webhook::meta::parse(body, Utc::now()).map_err(|e| BenchError::Unexpected(e.to_string()))?;
    Ok(notification.statuses.into_iter().map(|s| s.into_event(Provider::Meta, organization, CHANNEL)).collect())
}

/// A signed Meta payload of `delivered` statuses, in the shape the sandbox posts
/// (docs/providers.md A5, with A6's pricing and business-scoped user id).
fn payload(ids: &[String]) -> (Vec<u8>, String) {
    let ts = Utc::now().timestamp().to_string();
    let statuses: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            // the seed's provider ids are `wamid.bench.<message id>`
            let ours: u64 = id.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or_default();
            json!({
                "id": id, "status": "delivered", "timestamp": ts, "recipient_id": "5521900000000",
                "recipient_user_id": format!("BR.{}", 100_000_000_000_000 + ours),
                "biz_opaque_callback_data": format!("disparo:{ours}"),
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

/// How long a client waits before posting a refused request again (Meta's own retry
/// schedule is slower; the figure counts the refusals either way).
const RETRY_AFTER_503: Duration = Duration::from_millis(50);

/// What one client did.
#[derive(Default)]
struct ClientTally {
    latencies: Vec<Duration>,
    applied: u64,
    refused: usize,
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
    // One connection per client at most: each client waits for its answer before its
    // next request, as one of Meta's senders does.
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).tcp_nodelay(true).build()?;
    let started = Instant::now();
    let tasks: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut tally = ClientTally { latencies: Vec::with_capacity(queue.len()), ..ClientTally::default() };
                for (body, signature) in queue {
                    loop {
                        let sent = Instant::now();
                        let response = http
                            .post(&url)
                            .header(crate::webhook::SIGNATURE_HEADER, signature.as_str())
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await?;
                        let status = response.status();
                        let text = response.text().await?;
                        tally.latencies.push(sent.elapsed());
                        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                            tally.refused += 1;
                            tokio::time::sleep(RETRY_AFTER_503).await;
                            continue;
                        }
                        if !status.is_success() {
                            return Err(BenchError::Unexpected(format!("{status}: {text}")));
                        }
                        let summary: serde_json::Value =
                            serde_json::from_str(&text).map_err(|e| BenchError::Unexpected(e.to_string()))?;
                        tally.applied += summary["applied"].as_u64().unwrap_or(0);
                        break;
                    }
                }
                Ok::<_, BenchError>(tally)
            })
        })
        .collect();
    let mut all = ClientTally::default();
    for task in tasks {
        let mut tally = task.await.map_err(|e| BenchError::Unexpected(e.to_string()))??;
        all.latencies.append(&mut tally.latencies);
        all.applied += tally.applied;
        all.refused += tally.refused;
    }
    let elapsed = started.elapsed();
    if all.applied != ids.len() as u64 {
        return Err(BenchError::Unexpected(format!("{} of {} events applied", all.applied, ids.len())));
    }
    let mut latencies = all.latencies;
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies.get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
    };
    Ok(ScenarioReport {
        statuses_per_request: per_request,
        clients,
        requests: latencies.len(),
        events: ids.len(),
        rows_moved: 0,
        refused: all.refused,
        elapsed,
        p50: percentile(0.50),
        p99: percentile(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        writer: WriterStats::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_figures_come_from_the_histograms_sums_and_counts() {
        let before = Scraped::parse(
            "disparo_webhook_batch_events_sum 10.0\ndisparo_webhook_batch_events_count 2\n\
             disparo_webhook_batch_seconds_sum 0.5\ndisparo_webhook_batch_seconds_count 2\n",
        );
        let after = Scraped::parse(
            "# HELP disparo_webhook_batch_events Events applied per database transaction\n\
             disparo_webhook_batch_events_sum 110.0\ndisparo_webhook_batch_events_count 6\n\
             disparo_webhook_batch_events_bucket{le=\"1.0\"} 0\n\
             disparo_webhook_batch_requests_sum 40\ndisparo_webhook_batch_requests_count 4\n\
             disparo_webhook_batch_seconds_sum 1.5\ndisparo_webhook_batch_seconds_count 6\n\
             disparo_webhook_request_seconds_sum{provider=\"meta\"} 2.0\n\
             disparo_webhook_request_seconds_count{provider=\"meta\"} 40\n",
        );
        let stats = after.since(&before, Duration::from_secs(2));
        assert_eq!(stats.transactions, 4.0);
        assert_eq!(stats.events_per_transaction, 25.0);
        assert_eq!(stats.requests_per_transaction, 10.0);
        assert_eq!(stats.seconds_per_transaction, 0.25);
        assert_eq!(stats.seconds_per_request, 0.05);
        assert_eq!(stats.busy, 0.5);
    }
}
