//! `disparo bench receipts`: what looking up one receipt's message costs when
//! campaign_messages holds many campaigns' partitions (docs/architecture.md,
//! "Partitions"). A statement that does not name its campaign is planned, locked and
//! read against every partition; one that names its campaigns
//! (`campaign_uid = ANY($n)`) against theirs alone.
//!
//! Seeds `campaigns` campaigns of one channel, each in its partition with
//! `CAMPAIGN_ROWS` sent messages, all but `LIVE` of them finished more than a day ago
//! (so a receipt that names no campaign is looked up in the `LIVE` ones only), then
//! times, in the same run, on one connection (so each figure's first runs are that
//! connection's first executions of the statement, printed apart):
//! - the lookup by provider id and by our id as the webhook did before, naming no
//!   campaign, under Postgres' default plan choice (`plan_cache_mode = auto`), beside
//!   the same lookups naming one campaign and naming the live ones, planned as
//!   `store::connect` now has every execution planned (`force_custom_plan`);
//! - `receipts::apply` of one receipt (one transaction, as the webhook applies a
//!   one-status request) that names its campaign (Meta's callback data), that names
//!   none (Evolution; Meta's older format), and that finds nothing (kept).

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store;
use crate::store::receipts::{self, Provider, ReceiptStatus, StatusEvent};

/// Messages of each campaign other than the measured one.
const CAMPAIGN_ROWS: usize = 50;
/// Messages of the measured campaign (each timed apply takes a message of its own).
const MEASURED_ROWS: usize = 400;
/// Campaigns still taking receipts that name none (the measured one included).
const LIVE: usize = 5;
/// Timed repetitions per figure (after `WARM_UP` untimed ones).
const ROUNDS: usize = 60;
/// Untimed repetitions first (Postgres settles on its plan after five executions).
const WARM_UP: usize = 8;
/// Campaigns created (and their partitions attached) per transaction while seeding.
const SEED_CHUNK: usize = 50;
/// The channel of every campaign.
const CHANNEL: &str = "bench";

/// The lookup by provider id as it was before receipts named their campaigns.
const BY_PROVIDER_ID_ANYWHERE: &str = "SELECT x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
     WHERE x.organization = $1 AND x.provider_message_id = $2 AND k.channel = $3 ORDER BY x.id LIMIT 1";
/// The lookup by provider id within named campaigns.
const BY_PROVIDER_ID_NAMED: &str = "SELECT x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
     WHERE x.campaign_uid = ANY($4) AND x.organization = $1 AND x.provider_message_id = $2 AND k.channel = $3
     ORDER BY x.id LIMIT 1";
/// The lookup by our id as it was before.
const BY_ID_ANYWHERE: &str = "SELECT x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
     WHERE x.id = $1 AND x.organization = $2 AND k.channel = $3";
/// The lookup by our id within named campaigns.
const BY_ID_NAMED: &str = "SELECT x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
     WHERE x.campaign_uid = ANY($4) AND x.id = $1 AND x.organization = $2 AND k.channel = $3";

/// Creates `n` campaigns of `CAMPAIGN_ROWS` sent messages each, in chunks (attaching
/// a partition locks its relations until the transaction ends).
async fn seed_campaigns(pool: &PgPool, organization: &str, n: usize, rows: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut created = Vec::with_capacity(n);
    while created.len() < n {
        let chunk: Vec<Uuid> = (0..SEED_CHUNK.min(n - created.len())).map(|_| Uuid::new_v4()).collect();
        let mut tx = pool.begin().await.map_err(store::Error::from)?;
        sqlx::query(
            "INSERT INTO campaigns (uid, organization, name, channel, batch_size, batches, audience_frozen_at)
             SELECT u, $2, 'receipts-' || u, $3, 1000, 1, now() FROM unnest($1::uuid[]) AS u",
        )
        .bind(&chunk)
        .bind(organization)
        .bind(CHANNEL)
        .execute(&mut *tx)
        .await
        .map_err(store::Error::from)?;
        sqlx::query("SELECT campaign_messages_partition(u) FROM unnest($1::uuid[]) AS u")
            .bind(&chunk)
            .execute(&mut *tx)
            .await
            .map_err(store::Error::from)?;
        sqlx::query(
            r#"INSERT INTO campaign_messages (campaign_uid, organization, contact_id, batch_index, status, attempts,
                                              provider_message_id, status_history)
               SELECT u, $2, c.id, 0, 'sent', 1, 'wamid.' || replace(u::text, '-', '') || '.' || c.id,
                      '[{"status": "sent", "attempt": 1}]'::jsonb
               FROM unnest($1::uuid[]) AS u
               CROSS JOIN (SELECT id FROM contacts WHERE organization = $2 ORDER BY id LIMIT $3) c"#,
        )
        .bind(&chunk)
        .bind(organization)
        .bind(rows as i64)
        .execute(&mut *tx)
        .await
        .map_err(store::Error::from)?;
        tx.commit().await.map_err(store::Error::from)?;
        created.extend(chunk);
    }
    Ok(created)
}

/// What one figure measured.
struct Cost {
    /// Mean of the `ROUNDS` timed runs.
    mean: Duration,
    /// The slowest of the `WARM_UP` first runs on the connection: Postgres plans a
    /// prepared statement's generic plan once, at its sixth execution, to compare it
    /// with the custom plans, and a generic plan covers every partition.
    slowest_first: Duration,
}

/// Runs `f(round)` `WARM_UP` times, then `ROUNDS` timed times.
async fn measure<F, Fut>(mut f: F) -> anyhow::Result<Cost>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut timed = Duration::ZERO;
    let mut slowest_first = Duration::ZERO;
    for round in 0..WARM_UP + ROUNDS {
        let started = Instant::now();
        f(round).await?;
        let took = started.elapsed();
        if round >= WARM_UP {
            timed += took;
        } else {
            slowest_first = slowest_first.max(took);
        }
    }
    Ok(Cost { mean: timed / ROUNDS as u32, slowest_first })
}

/// One timed lookup statement; fails if it does not find exactly `expected`.
async fn lookup(pool: &PgPool, sql: &'static str, binds: Lookup<'_>, expected: i64) -> anyhow::Result<()> {
    let query = sqlx::query_as::<_, (i64,)>(sql);
    let query = match binds {
        Lookup::ByProviderId { organization, pid } => query.bind(organization).bind(pid).bind(CHANNEL),
        Lookup::ById { organization, id } => query.bind(id).bind(organization).bind(CHANNEL),
    };
    let found = query.fetch_all(pool).await.map_err(store::Error::from)?;
    anyhow::ensure!(found == vec![(expected,)], "the lookup found {found:?}, not message {expected}");
    Ok(())
}

/// What a lookup is given.
#[derive(Clone, Copy)]
enum Lookup<'a> {
    ByProviderId { organization: &'a str, pid: &'a str },
    ById { organization: &'a str, id: i64 },
}

/// [`lookup`] within `campaigns`.
async fn lookup_named(
    pool: &PgPool,
    sql: &'static str,
    binds: Lookup<'_>,
    campaigns: &[Uuid],
    expected: i64,
) -> anyhow::Result<()> {
    let query = sqlx::query_as::<_, (i64,)>(sql);
    let query = match binds {
        Lookup::ByProviderId { organization, pid } => query.bind(organization).bind(pid).bind(CHANNEL),
        Lookup::ById { organization, id } => query.bind(id).bind(organization).bind(CHANNEL),
    };
    let found = query.bind(campaigns).fetch_all(pool).await.map_err(store::Error::from)?;
    anyhow::ensure!(found == vec![(expected,)], "the lookup found {found:?}, not message {expected}");
    Ok(())
}

/// A `delivered` receipt of message `id` (provider id `pid`) as a provider would post it.
fn event(organization: &str, provider: Provider, pid: &str, id: Option<i64>, campaign: Option<Uuid>) -> StatusEvent {
    StatusEvent {
        provider,
        organization: organization.to_owned(),
        channel: CHANNEL.to_owned(),
        provider_message_id: pid.to_owned(),
        message_id: id,
        campaign,
        status: ReceiptStatus::Delivered,
        at: Utc::now(),
        error: None,
        recipient: None,
        opts_out: false,
        recipient_bsuid: None,
        pricing: None,
    }
}

/// Runs the benchmark with `campaigns` campaigns' partitions. Seeds through `seeding`;
/// measures on one connection of its own to `database_url`, so every figure's first
/// runs are that connection's first executions of the statement.
pub async fn run(seeding: &PgPool, database_url: &str, campaigns: usize) -> anyhow::Result<()> {
    let pool = seeding;
    let campaigns = campaigns.max(LIVE);
    let organization = super::seed(pool, MEASURED_ROWS.max(CAMPAIGN_ROWS)).await?;
    let started = Instant::now();
    let others = seed_campaigns(pool, &organization, campaigns - 1, CAMPAIGN_ROWS).await?;
    let measured = seed_campaigns(pool, &organization, 1, MEASURED_ROWS).await?;
    let measured = measured.first().copied().ok_or_else(|| anyhow::anyhow!("no measured campaign"))?;
    // every campaign but the measured one and LIVE - 1 others finished two days ago
    let live: Vec<Uuid> = others.iter().take(LIVE - 1).copied().chain([measured]).collect();
    sqlx::query(
        "UPDATE campaign_counters SET updated_at = now() - interval '2 days'
         WHERE campaign_uid IN (SELECT uid FROM campaigns WHERE organization = $1) AND campaign_uid <> ALL($2)",
    )
    .bind(&organization)
    .bind(&live)
    .execute(pool)
    .await
    .map_err(store::Error::from)?;
    sqlx::query("VACUUM (ANALYZE) campaign_messages, campaigns, campaign_counters")
        .execute(pool)
        .await
        .map_err(store::Error::from)?;
    let (partitions,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_inherits WHERE inhparent = 'campaign_messages'::regclass")
            .fetch_one(pool)
            .await
            .map_err(store::Error::from)?;
    let messages: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, provider_message_id FROM campaign_messages WHERE campaign_uid = $1 ORDER BY id")
            .bind(measured)
            .fetch_all(pool)
            .await
            .map_err(store::Error::from)?;
    println!(
        "one receipt's lookup with {partitions} partitions of campaign_messages ({campaigns} campaigns of this run, \
         {LIVE} still taking receipts; seeded in {:.1?}); mean of {ROUNDS}",
        started.elapsed()
    );
    let measuring = store::connect(database_url, 1).await?;
    let pool = &measuring;
    let (plan_cache_mode,): (String,) = sqlx::query_as("SELECT current_setting('plan_cache_mode')")
        .fetch_one(pool)
        .await
        .map_err(store::Error::from)?;
    let (id, pid) = messages.first().cloned().ok_or_else(|| anyhow::anyhow!("the measured campaign is empty"))?;
    let org = organization.as_str();
    let by_pid = Lookup::ByProviderId { organization: org, pid: &pid };
    let by_id = Lookup::ById { organization: org, id };
    let own = [measured];
    let mut lines: Vec<(String, Cost)> = Vec::new();
    // Before: no campaign named, and Postgres' default plan choice (a connection's
    // sixth execution builds the generic plan over every partition, once).
    sqlx::raw_sql("SET plan_cache_mode = auto").execute(pool).await.map_err(store::Error::from)?;
    lines.push((
        "by provider id, no campaign named (before)".into(),
        measure(|_| lookup(pool, BY_PROVIDER_ID_ANYWHERE, by_pid, id)).await?,
    ));
    lines.push((
        "by our id, no campaign named (before)".into(),
        measure(|_| lookup(pool, BY_ID_ANYWHERE, by_id, id)).await?,
    ));
    // Now: campaigns named, plans made with the parameters (what store::connect sets).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {plan_cache_mode}")))
        .execute(pool)
        .await
        .map_err(store::Error::from)?;
    lines.push((
        "by provider id, its campaign named".into(),
        measure(|_| lookup_named(pool, BY_PROVIDER_ID_NAMED, by_pid, &own, id)).await?,
    ));
    lines.push((
        format!("by provider id, the {LIVE} live campaigns named"),
        measure(|_| lookup_named(pool, BY_PROVIDER_ID_NAMED, by_pid, &live, id)).await?,
    ));
    lines.push((
        "by our id, its campaign named".into(),
        measure(|_| lookup_named(pool, BY_ID_NAMED, by_id, &own, id)).await?,
    ));
    lines.push((
        format!("by our id, the {LIVE} live campaigns named"),
        measure(|_| lookup_named(pool, BY_ID_NAMED, by_id, &live, id)).await?,
    ));

    // Whole applies, one receipt per transaction, each on a message of its own.
    let per_kind = WARM_UP + ROUNDS;
    anyhow::ensure!(messages.len() >= 3 * per_kind, "the measured campaign has too few messages");
    let kinds: [(&str, Provider, bool, bool); 3] = [
        ("receipts::apply, campaign named (Meta)", Provider::Meta, true, true),
        ("receipts::apply, none named (Meta, older format)", Provider::Meta, true, false),
        ("receipts::apply, none named (Evolution)", Provider::Evolution, false, false),
    ];
    for (k, (label, provider, with_id, named)) in kinds.into_iter().enumerate() {
        let batch = &messages[k * per_kind..(k + 1) * per_kind];
        let cost = measure(|round| {
            let (id, pid) = &batch[round];
            let receipt = event(org, provider, pid, with_id.then_some(*id), named.then_some(measured));
            async move {
                let report = receipts::apply(pool, &[receipt], &[]).await?;
                anyhow::ensure!(
                    report.outcomes == [receipts::ApplyOutcome::Applied],
                    "the receipt was {:?}",
                    report.outcomes
                );
                Ok(())
            }
        })
        .await?;
        lines.push((label.into(), cost));
    }
    let cost = measure(|round| {
        let receipt = event(org, Provider::Evolution, &format!("wamid.nowhere.{round}"), None, None);
        async move {
            let report = receipts::apply(pool, &[receipt], &[]).await?;
            anyhow::ensure!(report.outcomes == [receipts::ApplyOutcome::UnknownId], "{:?}", report.outcomes);
            Ok(())
        }
    })
    .await?;
    lines.push(("receipts::apply, none named, no message (kept)".into(), cost));
    println!("  (before: plan_cache_mode auto; named: plan_cache_mode {plan_cache_mode}, as connections now set it)");
    println!("  {:<52} {:>12} {:>24}", "", "mean", format!("slowest of the first {WARM_UP}"));
    for (label, cost) in lines {
        println!(
            "  {label:<52} {:>9.2} ms {:>21.2} ms",
            cost.mean.as_secs_f64() * 1000.0,
            cost.slowest_first.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
