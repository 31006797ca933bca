//! `disparo bench sender`: one sender against an in-process sandbox with zero latency
//! and limits lifted, beside two baselines measured in the same run: raw HTTP requests
//! per second from the same client to the sandbox, and raw Postgres batched updates.
//!
//! The machine's speed drifts within a run (shared cores, other tenants), so the
//! figures are taken in rounds, each measuring both baselines right before its share
//! of the pipeline; the verdict is the median of the rounds' ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::{MAX_BATCH_SIZE, QualityPolicy, RateLimitsSpec, RetryPolicy, TemplateCategory};
use crate::providers::{Content, OutboundMessage, ProviderClient};
use crate::sandbox::{self, Latency, SandboxConfig};
use crate::sender::{
    BatchEnd, MessageTemplate, ProviderTarget, SENDER_CONNECTIONS, SendConfig, build_client, lanes_for,
    metrics::SenderMetrics, run_batch,
};
use crate::store::audience::{self, AudienceQuery, CampaignKey};
use crate::store::rate::Limits;

/// Messages claimed per block by each lane, and the concurrency of the HTTP baseline.
const BLOCK: u32 = 64;
/// Rounds of (baselines, share of the pipeline).
const ROUNDS: usize = 3;
/// Requests of the HTTP baseline and rows of the Postgres baseline, per round.
const BASELINE_SIZE: usize = 20_000;

/// One round's figures, per second.
#[derive(Debug, Clone, Copy)]
struct Round {
    pipeline: f64,
    http: f64,
    postgres: f64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.pipeline / self.http.min(self.postgres)
    }
}

/// Raw sends from the sender's client, `BLOCK` at a time.
async fn raw_http_rate(client: Arc<dyn ProviderClient>, n: usize) -> f64 {
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let msg = OutboundMessage {
                    to: format!("+55119{:08}", i),
                    content: Content::Template {
                        name: "promo".into(),
                        language: "pt_BR".into(),
                        body_parameters: vec!["x".into()],
                    },
                    callback_data: format!("disparo:{i}"),
                };
                client.send(&msg).await
            }
        })
        .buffer_unordered(BLOCK as usize)
        .for_each(|_| async {})
        .await;
    n as f64 / started.elapsed().as_secs_f64()
}

/// Messages of the campaign the provider accepted.
async fn sent_so_far(pool: &PgPool, campaign: Uuid) -> anyhow::Result<usize> {
    let counters = crate::store::campaigns::counters(pool, campaign)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the bench campaign has no counters"))?;
    Ok(usize::try_from(counters.sent)?)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark with `n` messages.
pub async fn run(pool: &PgPool, database_url: &str, n: usize, lanes: Option<u32>) -> anyhow::Result<()> {
    let config = SandboxConfig {
        listen: "127.0.0.1:0".parse()?,
        latency: Latency { min_ms: 0, max_ms: 0 },
        ..Default::default()
    };
    let sandbox = sandbox::start(config).await?;
    let target = ProviderTarget::Meta {
        base_url: sandbox.base_url(),
        api_version: "v23.0".into(),
        phone_number_id: "106540352242922".into(),
    };
    let client = build_client(&target, "sandbox-meta-token", Duration::from_secs(10))?;

    // the pipeline's campaign: batches of the largest size a Campaign allows
    println!("seeding {n} contacts ...");
    let organization = super::seed(pool, n).await?;
    let uid = Uuid::new_v4();
    let key =
        CampaignKey { uid, organization: &organization, name: "bench", channel: "bench", batch_size: MAX_BATCH_SIZE };
    let frozen = audience::materialize(pool, &key, &AudienceQuery::AllContacts).await?;
    let send = SendConfig {
        campaign_uid: uid,
        organization: organization.clone(),
        channel: "bench".into(),
        target,
        message: MessageTemplate::Template {
            name: "promo".into(),
            language: "pt_BR".into(),
            body_parameters: vec!["{{contact.name}}".into()],
            category: TemplateCategory::Marketing,
        },
        retry: RetryPolicy::default(),
        rate_limits: RateLimitsSpec::default(),
        block_size: BLOCK,
        request_timeout_millis: 10_000,
        portfolio: None,
        quality_policy: QualityPolicy::Pause,
    };
    // one sender: the connections `disparo send` has, one batch after the other
    let sender_pool = crate::store::connect(database_url, lanes.map_or(SENDER_CONNECTIONS, |l| l + 1)).await?;
    let metrics = SenderMetrics::new(&mut Registry::default());
    let lanes = lanes.unwrap_or_else(|| lanes_for(&Limits::unlimited()));
    let rounds = ROUNDS.min(frozen.batches.max(1) as usize);
    let mut figures = Vec::with_capacity(rounds);
    let mut sent_before = 0;
    for round in 0..rounds {
        let http = raw_http_rate(client.clone(), BASELINE_SIZE).await;
        let postgres = super::raw_batched_update_rate(pool, BASELINE_SIZE, BLOCK as usize).await?;
        let batches =
            (round as i32 * frozen.batches / rounds as i32)..((round as i32 + 1) * frozen.batches / rounds as i32);
        let started = Instant::now();
        for batch in batches {
            // limits lifted: the channel's tokens are only counted
            let mut job = send.batch_job(batch);
            job.limits = Limits::unlimited();
            job.lanes = lanes;
            let end = run_batch(&sender_pool, &job, client.clone(), &metrics, &CancellationToken::new()).await?;
            anyhow::ensure!(end == BatchEnd::Done, "batch {batch} ended {end:?}");
        }
        let elapsed = started.elapsed();
        let sent = sent_so_far(pool, uid).await?;
        let pipeline = (sent - sent_before) as f64 / elapsed.as_secs_f64();
        sent_before = sent;
        let figures_of_round = Round { pipeline, http, postgres };
        println!(
            "round {}: pipeline {pipeline:>7.0} msg/s | raw HTTP {http:>7.0} req/s | raw Postgres {postgres:>7.0} rows/s | {:.0}%",
            round + 1,
            figures_of_round.ratio() * 100.0
        );
        figures.push(figures_of_round);
    }
    anyhow::ensure!(sent_before == n, "{sent_before} of the {n} messages were sent");
    let accepted = sandbox.ledger().accepted_count();
    anyhow::ensure!(
        accepted == n + rounds * BASELINE_SIZE,
        "the sandbox accepted {accepted} requests, not one per message and baseline request"
    );
    println!(
        "sender pipeline (claim, render, send, record; {lanes} lanes of {BLOCK}, {} batches of up to {MAX_BATCH_SIZE}): {:>8.0} msg/s (median of {rounds} rounds)",
        frozen.batches,
        median(figures.iter().map(|r| r.pipeline).collect())
    );
    println!(
        "baseline: raw HTTP sends, same client, concurrency {BLOCK}:          {:>8.0} req/s",
        median(figures.iter().map(|r| r.http).collect())
    );
    println!(
        "baseline: raw Postgres batched UPDATE (blocks of {BLOCK}):             {:>8.0} rows/s",
        median(figures.iter().map(|r| r.postgres).collect())
    );
    println!(
        "pipeline / lower baseline, median of the rounds: {:.0}% (target: at least 50%)",
        median(figures.iter().map(Round::ratio).collect()) * 100.0
    );
    sandbox.shutdown().await?;
    Ok(())
}
