//! `disparo bench claim`: what one sender's claim costs while other campaigns' rows pile
//! up, with campaign_messages partitioned by campaign (docs/architecture.md,
//! "Partitions") and, in the same run on the same Postgres, with the same rows in one
//! unpartitioned table shaped as campaign_messages was before (the same indexes and
//! triggers), claimed by the statement of the time.
//!
//! Each measurement claims blocks of one campaign's due messages and puts them back,
//! so the campaign never runs dry; only the claim is timed. Other campaigns' rows are
//! added in campaigns of `CAMPAIGN_ROWS` messages, one in ten still pending, the others
//! sent, then the table is vacuumed and analyzed before measuring.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, messages};

/// Messages of each other campaign (the contacts are shared by every campaign).
const CAMPAIGN_ROWS: usize = 10_000;
/// Messages of the measured campaign.
const MEASURED_ROWS: usize = 10_000;
/// Messages per claim, as a sender's block.
const BLOCK: i64 = 100;
/// Claims timed per measurement (after as many untimed ones).
const ROUNDS: usize = 300;

/// The unpartitioned table, as campaign_messages was before migration 0011.
const FLAT: &str = "bench_flat_messages";

/// The claim statement as it was before partitioning, on the unpartitioned table.
fn flat_claim_sql() -> String {
    format!(
        r#"
        WITH due AS (
            SELECT id FROM {FLAT}
            WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending' AND next_attempt_at <= now()
              AND NOT EXISTS (SELECT 1 FROM campaigns WHERE uid = $1 AND cancelled_at IS NOT NULL)
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE {FLAT} m SET
                status = CASE WHEN c.opted_out THEN 'skipped' ELSE 'sending' END::message_status,
                attempts = CASE WHEN c.opted_out THEN m.attempts ELSE m.attempts + 1 END,
                updated_at = now(),
                status_history = CASE WHEN c.opted_out
                    THEN m.status_history || jsonb_build_array(jsonb_build_object('status', 'skipped', 'at', now(), 'reason', 'opted out'))
                    ELSE m.status_history END
            FROM due, contacts c
            WHERE m.id = due.id AND c.id = m.contact_id
            RETURNING m.id, NOT c.opted_out AS sendable
        )
        SELECT id FROM marked WHERE sendable ORDER BY id
        "#
    )
}

/// Where the rows live.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// campaign_messages, one partition per campaign.
    Partitioned,
    /// One table for every campaign (before 0011).
    Flat,
}

impl Layout {
    fn table(self) -> &'static str {
        match self {
            Layout::Partitioned => "campaign_messages",
            Layout::Flat => FLAT,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Layout::Partitioned => "partitioned by campaign (now)",
            Layout::Flat => "one table (before)",
        }
    }
}

/// Creates the unpartitioned table with the indexes and triggers campaign_messages had
/// before 0011.
async fn create_flat(pool: &PgPool) -> anyhow::Result<()> {
    let statements = [
        format!("DROP TABLE IF EXISTS {FLAT}"),
        format!("CREATE TABLE {FLAT} (LIKE campaign_messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"),
        format!("ALTER TABLE {FLAT} ADD PRIMARY KEY (id), ADD UNIQUE (campaign_uid, contact_id)"),
        format!(
            "CREATE INDEX ON {FLAT} (campaign_uid, batch_index, next_attempt_at, id) WHERE status = 'pending'"
        ),
        format!("CREATE INDEX ON {FLAT} (campaign_uid, batch_index) WHERE status = 'sending'"),
        format!(
            "CREATE INDEX ON {FLAT} (organization, provider_message_id) WHERE provider_message_id IS NOT NULL"
        ),
        format!(
            "CREATE INDEX ON {FLAT} (contact_id) WHERE status = 'unknown' AND provider_message_id IS NULL"
        ),
        format!("CREATE INDEX ON {FLAT} (campaign_uid) WHERE marketing_requeues > 0 AND status = 'pending'"),
        format!(
            r#"CREATE TRIGGER {FLAT}_forward_only BEFORE UPDATE ON {FLAT} FOR EACH ROW
               WHEN (NEW.status <> OLD.status AND NOT message_transition_allowed(OLD.status, NEW.status)
                         AND NOT message_requeue_allowed(OLD.status, NEW.status, OLD.marketing_requeues,
                                                         NEW.marketing_requeues, NEW.provider_message_id)
                     OR NEW.campaign_uid <> OLD.campaign_uid OR NEW.contact_id <> OLD.contact_id
                     OR NEW.organization <> OLD.organization)
               EXECUTE FUNCTION campaign_messages_forward_only()"#
        ),
        format!(
            "CREATE TRIGGER {FLAT}_count_insert AFTER INSERT ON {FLAT} REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_insert()"
        ),
        format!(
            "CREATE TRIGGER {FLAT}_count_update AFTER UPDATE ON {FLAT} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION campaign_messages_count_update()"
        ),
    ];
    for statement in statements {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(pool).await.map_err(store::Error::from)?;
    }
    Ok(())
}

/// Adds a campaign of `rows` messages to `layout`'s table: one in ten pending (in
/// batches of 1,000), the others sent. Returns its UID.
async fn add_campaign(
    pool: &PgPool,
    layout: Layout,
    organization: &str,
    rows: usize,
    pending_every: i64,
) -> anyhow::Result<Uuid> {
    let uid = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO campaigns (uid, organization, name, channel, batch_size, batches, audience_frozen_at)
         VALUES ($1, $2, $3, 'bench', 1000, $4, now())",
    )
    .bind(uid)
    .bind(organization)
    .bind(format!("claim-{uid}"))
    .bind(rows.div_ceil(1000) as i32)
    .execute(pool)
    .await
    .map_err(store::Error::from)?;
    if layout == Layout::Partitioned {
        sqlx::query("SELECT campaign_messages_partition($1)").bind(uid).execute(pool).await?;
    }
    let table = layout.table();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"INSERT INTO {table} (campaign_uid, organization, contact_id, batch_index, status, attempts,
                                provider_message_id, status_history)
           SELECT $1, $2, c.id, (c.n - 1) / 1000,
                  CASE WHEN c.n % $4 = 0 THEN 'pending' ELSE 'sent' END::message_status,
                  CASE WHEN c.n % $4 = 0 THEN 0 ELSE 1 END,
                  CASE WHEN c.n % $4 = 0 THEN NULL ELSE 'wamid.' || $5 || '.' || c.id END,
                  CASE WHEN c.n % $4 = 0 THEN '[]'::jsonb ELSE '[{{"status": "sent", "attempt": 1}}]'::jsonb END
           FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM contacts WHERE organization = $2
                 ORDER BY id LIMIT $3) c"#
    )))
    .bind(uid)
    .bind(organization)
    .bind(rows as i64)
    .bind(pending_every)
    .bind(uid.simple().to_string())
    .execute(pool)
    .await
    .map_err(store::Error::from)?;
    Ok(uid)
}

/// Rows of `layout`'s table that are not of `campaign`.
async fn other_rows(pool: &PgPool, layout: Layout, campaign: Uuid) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE campaign_uid <> $1",
        layout.table()
    )))
    .bind(campaign)
    .fetch_one(pool)
    .await
    .map_err(store::Error::from)?;
    Ok(n)
}

/// Mean time of one claim of `BLOCK` messages of `campaign`'s batch 0, each claim put
/// back untimed.
async fn claim_cost(pool: &PgPool, layout: Layout, campaign: Uuid) -> anyhow::Result<Duration> {
    let table = layout.table();
    let flat_sql = flat_claim_sql();
    let mut timed = Duration::ZERO;
    for round in 0..2 * ROUNDS {
        let started = Instant::now();
        let ids: Vec<i64> = match layout {
            Layout::Partitioned => {
                messages::claim_due(pool, campaign, 0, BLOCK).await?.into_iter().map(|m| m.id).collect()
            }
            Layout::Flat => sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(flat_sql.clone()))
                .bind(campaign)
                .bind(0i32)
                .bind(BLOCK)
                .fetch_all(pool)
                .await
                .map_err(store::Error::from)?
                .into_iter()
                .map(|(id,)| id)
                .collect(),
        };
        if round >= ROUNDS {
            timed += started.elapsed();
        }
        anyhow::ensure!(ids.len() as i64 == BLOCK, "the claim took {} messages, not {BLOCK}", ids.len());
        // back to pending (a retry: sending -> pending is allowed), at the end of the queue
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET status = 'pending', attempts = attempts - 1, next_attempt_at = now() - interval '1 day'
             WHERE campaign_uid = $1 AND id = ANY($2)"
        )))
        .bind(campaign)
        .bind(&ids)
        .execute(pool)
        .await
        .map_err(store::Error::from)?;
    }
    Ok(timed / ROUNDS as u32)
}

/// One layout: the measured campaign, other campaigns up to `small` rows, a
/// measurement, other campaigns up to `large` rows, a measurement.
async fn measure(
    pool: &PgPool,
    layout: Layout,
    organization: &str,
    small: usize,
    large: usize,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let measured = add_campaign(pool, layout, organization, MEASURED_ROWS, 1).await?;
    let mut results = Vec::new();
    let mut added = 0usize;
    let mut campaigns = 0usize;
    for target in [small, large] {
        let started = Instant::now();
        while added < target {
            let rows = CAMPAIGN_ROWS.min(target - added);
            add_campaign(pool, layout, organization, rows, 10).await?;
            added += rows;
            campaigns += 1;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) {}", layout.table())))
            .execute(pool)
            .await
            .map_err(store::Error::from)?;
        let others = other_rows(pool, layout, measured).await?;
        println!(
            "  {}: {others} rows of {campaigns} other campaigns (seeded in {:.1?})",
            layout.label(),
            started.elapsed()
        );
        results.push(claim_cost(pool, layout, measured).await?);
    }
    Ok((results[0], results[1], campaigns))
}

/// Runs the benchmark: `small` and `small * scale` rows of other campaigns.
pub async fn run(pool: &PgPool, small: usize, scale: usize) -> anyhow::Result<()> {
    let large = small.saturating_mul(scale.max(1));
    let organization = super::seed(pool, CAMPAIGN_ROWS.max(MEASURED_ROWS)).await?;
    println!(
        "claim of {BLOCK} due messages of one campaign, mean of {ROUNDS}, with {small} and {large} rows of other campaigns"
    );
    create_flat(pool).await?;
    let mut lines = Vec::new();
    for layout in [Layout::Flat, Layout::Partitioned] {
        let (at_small, at_large, campaigns) = measure(pool, layout, &organization, small, large).await?;
        lines.push(format!(
            "{:<32} {small:>10} other rows: {at_small:>9.2?}   {large:>10} other rows ({campaigns} campaigns): {at_large:>9.2?}   ratio {:.2}",
            layout.label(),
            at_large.as_secs_f64() / at_small.as_secs_f64().max(1e-9)
        ));
        if layout == Layout::Flat {
            // the disk is given back before the partitioned table is filled
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {FLAT}")))
                .execute(pool)
                .await
                .map_err(store::Error::from)?;
        }
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
