//! `disparo bench sender`: one sender against an in-process sandbox with zero latency
//! and limits lifted, beside two baselines measured in the same run: raw HTTP requests
//! per second from the same client to the sandbox, and raw Postgres batched updates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BatchEnd, MessageTemplate, ProviderTarget, SENDER_CONNECTIONS, SendConfig, build_client, lanes_for, metrics::SenderMetrics, run_batch};
use crate::api::{MAX_BATCH_SIZE, RateLimitsSpec, RetryPolicy};
use crate::providers::{Content, OutboundMessage};
use crate::sandbox::{self, Latency, SandboxConfig};
use crate::store::audience::{self, AudienceQuery, CampaignKey};
use crate::store::rate::Limits;

const BLOCK: u32 = 64;

/// Runs the benchmark with `n` messages.
pub async fn run(pool: &PgPool, database_url: &str, n: usize, lanes: Option<u32>) -> anyhow::Result<()> {
    let config = SandboxConfig { listen: "127.0.0.1:0".parse()?, latency: Latency { min_ms: 0, max_ms: 0 }, ..Default::default() };
    let sandbox = sandbox::start(config).await?;
    let target = ProviderTarget::Meta { base_url: sandbox.base_url(), api_version: "v23.0".into(), phone_number_id: "106540352242922".into() };
    let client = build_client(&target, "sandbox-meta-token", Duration::from_secs(10))?;

    // baseline 1: raw HTTP sends from the same client, same concurrency
    let http_n = n.min(20_000);
    let started = Instant::now();
    let client_for_raw: Arc<dyn crate::providers::ProviderClient> = client.clone();
    futures::stream::iter(0..http_n)
        .map(|i| {
            let client = client_for_raw.clone();
            async move {
                let msg = OutboundMessage {
                    to: format!("+55119{:08}", i),
                    content: Content::Template { name: "promo".into(), language: "pt_BR".into(), body_parameters: vec!["x".into()] },
                    callback_data: format!("disparo:{i}"),
                };
                client.send(&msg).await
            }
        })
        .buffer_unordered(BLOCK as usize)
        .for_each(|_| async {})
        .await;
    let http_rate = http_n as f64 / started.elapsed().as_secs_f64();

    // baseline 2: raw batched updates
    let pg_rate = crate::bench::raw_batched_update_rate(pool, n.min(100_000), BLOCK as usize).await?;

    // the pipeline
    // the pipeline: one sender, batch after batch of the largest size a Campaign allows,
    // with the connections `disparo send` has
    println!("seeding {n} contacts ...");
    let organization = crate::bench::seed(pool, n).await?;
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: &organization, name: "bench", channel: "bench", batch_size: MAX_BATCH_SIZE };
    let frozen = audience::materialize(pool, &key, &AudienceQuery::AllContacts).await?;
    let send = SendConfig {
        campaign_uid: uid,
        organization: organization.clone(),
        channel: "bench".into(),
        target,
        message: MessageTemplate::Template { name: "promo".into(), language: "pt_BR".into(), body_parameters: vec!["{{contact.name}}".into()] },
        retry: RetryPolicy::default(),
        rate_limits: RateLimitsSpec::default(),
        block_size: BLOCK,
        request_timeout_millis: 10_000,
    };
    let sender_pool = crate::store::connect(database_url, lanes.map_or(SENDER_CONNECTIONS, |l| l + 1)).await?;
    let metrics = SenderMetrics::new(&mut Registry::default());
    let started = Instant::now();
    let mut used_lanes = 0;
    for batch in 0..frozen.batches {
        // limits lifted: the channel's tokens are only counted
        let mut job = send.batch_job(batch);
        job.limits = Limits::unlimited();
        job.lanes = lanes.unwrap_or_else(|| lanes_for(&job.limits));
        used_lanes = job.lanes;
        let end = run_batch(&sender_pool, &job, client.clone(), &metrics, &CancellationToken::new()).await?;
        anyhow::ensure!(end == BatchEnd::Done, "batch {batch} ended {end:?}");
    }
    let elapsed = started.elapsed();
    let pipeline = n as f64 / elapsed.as_secs_f64();
    anyhow::ensure!(sandbox.ledger().accepted_count() >= n, "the sandbox did not receive every message");
    println!(
        "sender pipeline (claim, render, send, record; {used_lanes} lanes of {BLOCK}, {} batches of up to {MAX_BATCH_SIZE}): {pipeline:>8.0} msg/s  ({n} messages in {elapsed:.2?})",
        frozen.batches
    );
    println!("baseline: raw HTTP sends, same client, concurrency {BLOCK}:          {http_rate:>8.0} req/s");
    println!("baseline: raw Postgres batched UPDATE (blocks of {BLOCK}):             {pg_rate:>8.0} rows/s");
    let lower = http_rate.min(pg_rate);
    println!("pipeline / lower baseline: {:.0}% (target: at least 50%)", pipeline / lower * 100.0);
    sandbox.shutdown().await?;
    Ok(())
}
