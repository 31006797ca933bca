//! Per-campaign reads for status (counters, error breakdown) and the cleanup a user
//! asks for when deleting a campaign. Reading counters costs the same for a campaign of
//! a thousand messages as for one of a million.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;

/// The counters row of a campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Counters {
    /// Messages in the frozen audience.
    pub total: i64,
    /// Waiting (first attempt or retry).
    pub pending: i64,
    /// Being sent right now.
    pub sending: i64,
    /// Outcome unknown.
    pub unknown: i64,
    /// Sent, not yet delivered.
    pub sent: i64,
    /// Delivered, not yet read.
    pub delivered: i64,
    /// Read.
    pub read: i64,
    /// Failed for good.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Never attempted: the contact opted out after the audience was frozen.
    pub skipped: i64,
    /// Reached sent on the first attempt.
    pub succeeded_first_attempt: i64,
    /// Reached sent after a retry.
    pub succeeded_after_retry: i64,
    /// Retries scheduled.
    pub retries_scheduled: i64,
    /// First message sent.
    pub first_sent_at: Option<DateTime<Utc>>,
    /// Latest message sent.
    pub last_sent_at: Option<DateTime<Utc>>,
}

impl Counters {
    /// Messages that will not change any more through sending (webhooks may still move
    /// sent ones forward).
    pub fn finished(&self) -> i64 {
        self.unknown + self.sent + self.delivered + self.read + self.failed + self.cancelled + self.skipped
    }

    /// Finished messages that were attempted: what a failure rate is a share of
    /// (cancelled and skipped messages never reached the provider).
    pub(crate) fn finished_attempted(&self) -> i64 {
        self.unknown + self.sent + self.delivered + self.read + self.failed
    }

    /// Messages that reached at least `sent`.
    pub fn at_least_sent(&self) -> i64 {
        self.sent + self.delivered + self.read
    }
}

/// Reads a campaign's counters (None: the audience was never frozen).
pub async fn counters(pool: &PgPool, campaign: Uuid) -> Result<Option<Counters>> {
    let row = sqlx::query_as::<_, Counters>(
        r#"SELECT total, pending, sending, unknown, sent, delivered, read, failed, cancelled, skipped,
                  succeeded_first_attempt, succeeded_after_retry, retries_scheduled, first_sent_at, last_sent_at
           FROM campaign_counters WHERE campaign_uid = $1"#,
    )
    .bind(campaign)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Counts by status recomputed from the message rows (tests and audits; scans the campaign).
pub async fn recount(pool: &PgPool, campaign: Uuid) -> Result<Counters> {
    let row = sqlx::query_as::<_, Counters>(
        r#"SELECT count(*) AS total,
                  count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'sending') AS sending,
                  count(*) FILTER (WHERE status = 'unknown') AS unknown,
                  count(*) FILTER (WHERE status = 'sent') AS sent,
                  count(*) FILTER (WHERE status = 'delivered') AS delivered,
                  count(*) FILTER (WHERE status = 'read') AS read,
                  count(*) FILTER (WHERE status = 'failed') AS failed,
                  count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                  count(*) FILTER (WHERE status = 'skipped') AS skipped,
                  0::bigint AS succeeded_first_attempt, 0::bigint AS succeeded_after_retry, 0::bigint AS retries_scheduled,
                  NULL::timestamptz AS first_sent_at, NULL::timestamptz AS last_sent_at
           FROM campaign_messages WHERE campaign_uid = $1"#,
    )
    .bind(campaign)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// Failures by error code, most frequent first.
pub async fn error_breakdown(pool: &PgPool, campaign: Uuid, limit: i64) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query_as(
        "SELECT code, count FROM campaign_error_counts WHERE campaign_uid = $1 ORDER BY count DESC, code LIMIT $2",
    )
    .bind(campaign)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Deletes everything Postgres holds for a campaign (retention: Delete); returns how
/// many messages it had. The messages go with their partition, detached and dropped
/// (docs/architecture.md, "Partitions"): no row is deleted one by one, and no counter
/// trigger runs. Detaching locks campaign_messages for an instant, after the statements
/// running on it finish; `lock_timeout` bounds that wait, so a long statement makes
/// this fail (and the controller retry) instead of queueing every sender behind it.
pub async fn delete(pool: &PgPool, campaign: Uuid) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
    let (messages,): (i64,) =
        sqlx::query_as("SELECT coalesce((SELECT total FROM campaign_counters WHERE campaign_uid = $1), 0)")
            .bind(campaign)
            .fetch_one(&mut *tx)
            .await?;
    sqlx::query("SELECT campaign_messages_drop_partition($1)").bind(campaign).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM campaigns WHERE uid = $1").bind(campaign).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(u64::try_from(messages).unwrap_or_default())
}

/// Campaigns other than `except` that share a channel and still have messages to send.
pub(crate) async fn active_on_channel(pool: &PgPool, organization: &str, channel: &str, except: Uuid) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        r#"SELECT count(*) FROM campaigns c JOIN campaign_counters k ON k.campaign_uid = c.uid
           WHERE c.organization = $1 AND c.channel = $2 AND c.uid <> $3 AND (k.pending + k.sending) > 0"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(except)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// The frozen campaign's batch count, if its audience was frozen.
pub(crate) async fn frozen_batches(pool: &PgPool, campaign: Uuid) -> Result<Option<i32>> {
    let row: Option<(i32,)> =
        sqlx::query_as("SELECT batches FROM campaigns WHERE uid = $1 AND audience_frozen_at IS NOT NULL")
            .bind(campaign)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(b,)| b))
}

/// Whether the campaign was cancelled: a running sender asks once a second, and stops
/// sending as soon as it is. One primary-key lookup. A campaign never frozen reads as
/// not cancelled.
pub async fn is_cancelled(pool: &PgPool, campaign: Uuid) -> Result<bool> {
    let mut db = super::Autocommit::open(pool).await?;
    let row: Option<(bool,)> = sqlx::query_as("SELECT cancelled_at IS NOT NULL FROM campaigns WHERE uid = $1")
        .bind(campaign)
        .fetch_optional(db.conn())
        .await?;
    db.commit().await?;
    Ok(row.is_some_and(|(cancelled,)| cancelled))
}

/// The campaign's delivered messages Meta charges for (`pricing.type` `regular`), by
/// pricing category and the first three digits of the recipient's number (enough for
/// any country calling code), for the rate card to price.
pub(crate) async fn billable_by_prefix(pool: &PgPool, campaign: Uuid) -> Result<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        r#"SELECT m.pricing_category, substr(c.phone, 2, 3), count(*)
           FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id
           WHERE m.campaign_uid = $1 AND m.pricing_type = 'regular' AND m.pricing_category IS NOT NULL
             AND m.status IN ('delivered', 'read')
           GROUP BY 1, 2"#,
    )
    .bind(campaign)
    .fetch_all(pool)
    .await?)
}

/// Messages waiting again because Meta's per-user marketing limit withheld them (131049).
pub async fn marketing_limited(pool: &PgPool, campaign: Uuid) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM campaign_messages WHERE campaign_uid = $1 AND marketing_requeues > 0 AND status = 'pending'",
    )
    .bind(campaign)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// When the campaign's earliest pending message is due (None: nothing pending).
pub(crate) async fn next_due(pool: &PgPool, campaign: Uuid) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let (at,): (Option<chrono::DateTime<chrono::Utc>>,) = sqlx::query_as(
        "SELECT min(next_attempt_at) FROM campaign_messages WHERE campaign_uid = $1 AND status = 'pending'",
    )
    .bind(campaign)
    .fetch_one(pool)
    .await?;
    Ok(at)
}
