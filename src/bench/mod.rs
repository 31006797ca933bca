//! `disparo bench store|sender|webhook|claim|receipts`: measurements printed as figures, each beside a
//! raw baseline measured in the same run on the same Postgres (and sandbox), so the
//! numbers mean something on whatever machine runs them.
//!
//! The benchmarks depend on what they measure, never the reverse: no product module
//! imports this one.

pub mod claim;
pub mod receipts;
pub mod sender;
pub mod webhook;

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, audience, contacts, messages};

/// Arguments of `disparo bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub what: BenchTarget,
    /// Postgres URL of a database the benchmark may fill (a fresh one is best).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Messages (store, sender) or status events (webhook).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Sender lanes (sender benchmark; default: what `disparo send` chooses).
    #[arg(long)]
    pub lanes: Option<u32>,
    /// Concurrent clients of the webhook benchmark's one-status-per-request scenarios,
    /// comma-separated (default: 64,256,1024).
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,
    /// Claim benchmark: the claim is measured with `--messages` rows of other campaigns
    /// and with this many times as many.
    #[arg(long, default_value_t = 100)]
    pub scale: usize,
    /// Receipts benchmark: campaigns (each with its partition of campaign_messages).
    #[arg(long, default_value_t = 2_000)]
    pub campaigns: usize,
}

/// Benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTarget {
    /// Materialization and status-update throughput.
    Store,
    /// One sender against the sandbox.
    Sender,
    /// Webhook status events applied per second.
    Webhook,
    /// One claim's cost with few and with many rows of other campaigns.
    Claim,
    /// One receipt's lookup with many campaigns' partitions, naming no campaign and naming them.
    Receipts,
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Seeds `n` contacts into a fresh organization; returns the organization.
pub async fn seed(pool: &PgPool, n: usize) -> anyhow::Result<String> {
    let organization = format!("bench-{}", Uuid::new_v4().simple());
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        batch.push(contacts::NewContact {
            phone: format!("+55119{:08}", i),
            name: Some(format!("Contact {i}")),
            tags: vec![if i % 2 == 0 { "even".into() } else { "odd".into() }],
            attributes: serde_json::json!({"city": "São Paulo"}),
            whatsapp_id: None,
        });
        if batch.len() == 5000 {
            contacts::upsert(pool, &organization, &batch).await?;
            batch.clear();
        }
    }
    contacts::upsert(pool, &organization, &batch).await?;
    Ok(organization)
}

/// Raw Postgres baseline: batched `UPDATE ... FROM unnest` of `n` rows of a plain table
/// without triggers, in blocks of `block`.
pub(crate) async fn raw_batched_update_rate(pool: &PgPool, n: usize, block: usize) -> anyhow::Result<f64> {
    let table = format!("bench_raw_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, status TEXT, note TEXT)")))
        .execute(pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} SELECT g, 'pending', NULL FROM generate_series(1, $1) g"
    )))
    .bind(n as i64)
    .execute(pool)
    .await?;
    let started = Instant::now();
    let ids: Vec<i64> = (1..=n as i64).collect();
    for chunk in ids.chunks(block) {
        let notes: Vec<String> = chunk.iter().map(|i| format!("wamid.{i}")).collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} t SET status = 'sent', note = v.note FROM unnest($1::bigint[], $2::text[]) AS v(id, note) WHERE t.id = v.id"
        )))
        .bind(chunk)
        .bind(&notes)
        .execute(pool)
        .await?;
    }
    let rate = per_second(n, started.elapsed());
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(pool).await?;
    Ok(rate)
}

async fn bench_store(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    println!("seeding {n} contacts ...");
    let organization = seed(pool, n).await?;
    let uid = Uuid::new_v4();
    let key =
        audience::CampaignKey { uid, organization: &organization, name: "bench", channel: "bench", batch_size: 1000 };
    let started = Instant::now();
    let frozen = audience::materialize(pool, &key, &audience::AudienceQuery::AllContacts).await?;
    let materialize = started.elapsed();
    println!(
        "materialization: {} messages in {} batches in {:.2?} ({:.0} rows/s)",
        frozen.messages,
        frozen.batches,
        materialize,
        per_second(frozen.messages as usize, materialize)
    );

    // batched, blocks of 500: the sender's one write per message (claim with its intent,
    // record with the outcomes) against the two-write path (claim marking `sending`,
    // then record), block for block in turn so both see the same table
    let (mut one_write, mut two_writes) = (Duration::ZERO, Duration::ZERO);
    let (mut done_one, mut done_two) = (0usize, 0usize);
    'blocks: for batch in 0..frozen.batches {
        for turn in 0usize.. {
            let started = Instant::now();
            let claimed = if turn % 2 == 0 {
                let block = store::blocks::claim(pool, uid, batch, 500, "bench", Uuid::new_v4()).await?;
                let Some(intent) = block.intent else { break };
                let outcomes = all_sent(&block.messages);
                store::blocks::record(pool, intent, &outcomes, "bench").await?;
                one_write += started.elapsed();
                done_one += outcomes.len();
                outcomes.len()
            } else {
                let claimed = messages::claim_due(pool, uid, batch, 500).await?;
                let outcomes = all_sent(&claimed);
                messages::record_campaign_outcomes(pool, uid, &outcomes, "bench").await?;
                two_writes += started.elapsed();
                done_two += outcomes.len();
                outcomes.len()
            };
            if claimed == 0 {
                break;
            }
            if done_one + done_two >= n / 2 {
                break 'blocks;
            }
        }
    }
    let batched = per_second(done_one, one_write);
    let batched_two = per_second(done_two, two_writes);
    // row by row: one claim and one record per message
    let started = Instant::now();
    let row_target = (n / 20).clamp(100, 5000);
    let mut rows = 0usize;
    'outer: for batch in 0..frozen.batches {
        loop {
            let claimed = messages::claim_due(pool, uid, batch, 1).await?;
            let Some(m) = claimed.first() else { break };
            messages::record_campaign_outcomes(
                pool,
                uid,
                &[(m.id, messages::Outcome::Sent { provider_message_id: format!("wamid.{}", m.id) })],
                "bench",
            )
            .await?;
            rows += 1;
            if rows >= row_target {
                break 'outer;
            }
        }
    }
    let row_by_row = per_second(rows, started.elapsed());
    let raw = raw_batched_update_rate(pool, n, 500).await?;
    println!(
        "status updates, batched, one write per message (the sender's blocks of 500, counters included): {batched:.0} msg/s"
    );
    println!(
        "status updates, batched, two writes per message (claim marking `sending`, then record):        {batched_two:.0} msg/s"
    );
    println!(
        "status updates, row by row ({rows} messages):                                          {row_by_row:.0} msg/s"
    );
    println!("raw Postgres baseline, batched UPDATE ... FROM unnest of a plain table:               {raw:.0} rows/s");
    let counters = store::campaigns::counters(pool, uid).await?.unwrap_or_default();
    let recount = store::campaigns::recount(pool, uid).await?;
    anyhow::ensure!(counters.sent == recount.sent, "counters drifted from the recount");
    status_refresh_cost(pool).await
}

fn all_sent(claimed: &[messages::ClaimedMessage]) -> Vec<(i64, messages::Outcome)> {
    claimed.iter().map(|m| (m.id, messages::Outcome::Sent { provider_message_id: format!("wamid.{}", m.id) })).collect()
}

/// What one controller status refresh reads (counters and error breakdown), for a
/// campaign of 1,000 and one of 1,000,000 messages (counters seeded directly).
async fn status_refresh_cost(pool: &PgPool) -> anyhow::Result<()> {
    const ROUNDS: usize = 300;
    for total in [1_000i64, 1_000_000] {
        let uid = Uuid::new_v4();
        sqlx::query("INSERT INTO campaigns (uid, organization, name, channel, batch_size, batches, audience_frozen_at) VALUES ($1, 'bench', $2, 'bench', 1000, $3, now())")
            .bind(uid)
            .bind(format!("refresh-{total}"))
            .bind((total / 1000) as i32)
            .execute(pool)
            .await?;
        sqlx::query("INSERT INTO campaign_counters (campaign_uid, total, pending, sent, delivered, read, failed) VALUES ($1, $2, $2 / 2, $2 / 4, $2 / 8, $2 / 16, $2 / 16)")
            .bind(uid)
            .bind(total)
            .execute(pool)
            .await?;
        sqlx::query("INSERT INTO campaign_error_counts (campaign_uid, code, count) SELECT $1, c::text, $2 / 100 FROM generate_series(131000, 131020) c")
            .bind(uid)
            .bind(total)
            .execute(pool)
            .await?;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            store::campaigns::counters(pool, uid).await?;
            store::campaigns::error_breakdown(pool, uid, 10).await?;
        }
        let each = started.elapsed() / ROUNDS as u32;
        println!("status refresh reads for a {total:>9}-message campaign: {each:.2?} per refresh");
    }
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit, and fails when
/// that leaves fewer than `needed`: a benchmark that opens a thousand client
/// connections to a server in the same process needs two descriptors for each.
pub(crate) fn raise_open_files_limit(needed: u64) -> anyhow::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    if limit.current != limit.maximum {
        setrlimit(Resource::Nofile, raised).context("raising the open files limit")?;
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    anyhow::ensure!(
        now >= needed,
        "the open files limit is {now}, the benchmark needs {needed}: raise the hard limit (ulimit -Hn) first"
    );
    Ok(now)
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let pool = store::connect(&args.database_url, 20).await.context("connecting to Postgres")?;
    store::migrate(&pool).await?;
    match args.what {
        BenchTarget::Store => bench_store(&pool, args.messages).await,
        BenchTarget::Sender => sender::run(&pool, &args.database_url, args.messages, args.lanes).await,
        BenchTarget::Webhook => webhook::run(&pool, args.messages, args.clients).await,
        BenchTarget::Claim => claim::run(&pool, args.messages, args.scale).await,
        BenchTarget::Receipts => receipts::run(&pool, &args.database_url, args.campaigns).await,
    }
}
