//! The send path's one write per message (docs/architecture.md, "One write per
//! message"). A block of due messages is claimed by a short transaction that locks them
//! and commits an *intent* naming those it is about to send; the outcomes are written,
//! and the intent deleted, by one transaction after the provider calls. A message goes
//! straight from `pending` to its outcome: nothing marks it `sending`.
//!
//! The intent is what a `sending` mark used to be, for the whole block at once:
//!
//! - no claim takes a message an intent names ([`claim`] checks after taking the locks,
//!   with a fresh snapshot, so a block committed a moment before is seen);
//! - an intent is deleted only by the transaction that writes its outcomes, so it is
//!   there if and only if they were not written, and writing them is safe to repeat
//!   ([`record`]);
//! - the next run of a batch turns what dead runs' intents name into `unknown`
//!   ([`recover`]), never sending it again.
//!
//! Opt-outs and cancels are honoured as in [`super::messages`]: a claimed message whose
//! contact opted out is written `skipped` by the claim, and a cancelled campaign's
//! retries and requeues are written `cancelled`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use super::messages::{ClaimedMessage, Outcome, OutcomeColumns};

/// A claimed block: the messages to send and the intent naming them.
#[derive(Debug)]
pub struct Block {
    /// The intent to hand to [`record`] (none when there is nothing to send).
    pub intent: Option<Intent>,
    /// The messages to send (opted-out contacts were written `skipped`).
    pub messages: Vec<ClaimedMessage>,
    /// How many opted-out contacts' messages the claim wrote `skipped`.
    pub skipped: u64,
}

/// A committed intent to send a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    id: Uuid,
    campaign: Uuid,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    attempts: i32,
    phone: String,
    name: Option<String>,
    attributes: serde_json::Value,
    marketing_requeues: i16,
    opted_out: bool,
}

/// Claims up to `limit` due pending messages of one batch and commits the intent to
/// send them, as `intent_id` (chosen by the caller: if this fails after its commit, the
/// caller can [`forget`] it). Rows other transactions hold are skipped, so parallel
/// claims never take the same message, and so are messages an intent names.
///
/// The claimed messages carry the attempt they are about to make (`attempts` + 1), which
/// [`record`] spends. A cancelled campaign yields nothing.
pub async fn claim(
    pool: &PgPool,
    campaign: Uuid,
    batch: i32,
    limit: i64,
    run_id: &str,
    intent_id: Uuid,
) -> Result<Block> {
    let mut tx = super::begin(pool).await?;
    let rows = sqlx::query_as::<_, ClaimedRow>(
        r#"
        WITH named AS (
            SELECT unnest(message_ids) AS id FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2
        ), due AS (
            SELECT id, attempts, contact_id, marketing_requeues FROM campaign_messages
            WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending' AND next_attempt_at <= now()
              AND NOT EXISTS (SELECT 1 FROM campaigns WHERE uid = $1 AND cancelled_at IS NOT NULL)
              AND id NOT IN (SELECT id FROM named)
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        SELECT due.id, due.attempts + 1 AS attempts, c.phone, c.name, c.attributes, due.marketing_requeues, c.opted_out
        FROM due JOIN contacts c ON c.id = due.contact_id
        ORDER BY due.id
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Block { intent: None, messages: Vec::new(), skipped: 0 });
    }
    // The statement above saw the intents of its snapshot. A block that committed after
    // it began had locked its rows until then, and its intent is visible now that they
    // are ours: this statement's fresh snapshot sees it.
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let taken: Vec<(i64,)> = sqlx::query_as(
        r#"
        SELECT id FROM unnest($3::bigint[]) AS id
        WHERE id IN (SELECT unnest(message_ids) FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2)
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let taken: std::collections::HashSet<i64> = taken.into_iter().map(|(id,)| id).collect();
    let (opted_out, sendable): (Vec<ClaimedRow>, Vec<ClaimedRow>) =
        rows.into_iter().filter(|r| !taken.contains(&r.id)).partition(|r| r.opted_out);
    let skipped = if opted_out.is_empty() {
        0
    } else {
        let ids: Vec<i64> = opted_out.iter().map(|r| r.id).collect();
        write_skipped(&mut tx, campaign, &ids).await?
    };
    let messages: Vec<ClaimedMessage> = sendable
        .into_iter()
        .map(|r| ClaimedMessage {
            id: r.id,
            attempts: r.attempts,
            phone: r.phone,
            name: r.name,
            attributes: r.attributes,
            marketing_requeues: r.marketing_requeues,
        })
        .collect();
    let intent = if messages.is_empty() {
        None
    } else {
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        sqlx::query(
            r#"
            INSERT INTO send_intents (id, organization, campaign_uid, batch_index, run_id, message_ids)
            SELECT $1, organization, uid, $3, $4, $5 FROM campaigns WHERE uid = $2
            "#,
        )
        .bind(intent_id)
        .bind(campaign)
        .bind(batch)
        .bind(run_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        Some(Intent { id: intent_id, campaign })
    };
    tx.commit().await?;
    Ok(Block { intent, messages, skipped })
}

/// Deletes the intent of a [`claim`] that failed, which may have committed without its
/// answer arriving: no call was made for it, and left behind it would keep its messages
/// from being claimed until the next run turned them `unknown`.
pub async fn forget(pool: &PgPool, intent_id: Uuid) -> Result<u64> {
    let mut db = super::Autocommit::open(pool).await?;
    let result = sqlx::query("DELETE FROM send_intents WHERE id = $1").bind(intent_id).execute(db.conn()).await?;
    db.commit().await?;
    Ok(result.rows_affected())
}

/// Writes a block's outcomes and deletes its intent, in one transaction, if the intent
/// is still there (it is gone once they were written): safe to repeat after an error
/// whose commit may or may not have happened. Returns how many messages moved.
///
/// A retry or a requeue of a cancelled campaign is written `cancelled`. When the block
/// has such outcomes, the campaign row is read under a share lock first, before any
/// message row is locked: a cancel under way is waited for and seen, and a cancel that
/// starts meanwhile waits for this commit and then finds these messages `pending`
/// (see [`super::messages::cancel_pending`], which leaves alone what an intent names).
pub async fn record(pool: &PgPool, intent: Intent, outcomes: &[(i64, Outcome)], run_id: &str) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    let may_go_back = outcomes.iter().any(|(_, o)| o.status() == "pending");
    let cancelled = if may_go_back {
        let (cancelled,): (bool,) =
            sqlx::query_as("SELECT cancelled_at IS NOT NULL FROM campaigns WHERE uid = $1 FOR SHARE")
                .bind(intent.campaign)
                .fetch_one(&mut *tx)
                .await?;
        cancelled
    } else {
        false
    };
    let started_at: Option<(DateTime<Utc>,)> =
        sqlx::query_as("DELETE FROM send_intents WHERE id = $1 RETURNING created_at")
            .bind(intent.id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((started_at,)) = started_at else {
        tx.commit().await?;
        return Ok(0);
    };
    let written = write_outcomes(&mut tx, intent.campaign, started_at, cancelled, outcomes, run_id).await?;
    tx.commit().await?;
    Ok(written)
}

/// One statement for a block's outcomes, on its messages still `pending`. The rows are
/// found by key, checked `pending` and locked in id order first (as every writer of
/// several messages does), and the update reaches them by key alone: with a `status =
/// 'pending'` condition of its own, the planner scanned the partition's pending rows.
/// Both rely on the partition's statistics (taken when the audience is frozen).
async fn write_outcomes(
    conn: &mut sqlx::PgConnection,
    campaign: Uuid,
    started_at: DateTime<Utc>,
    cancelled: bool,
    outcomes: &[(i64, Outcome)],
    run_id: &str,
) -> Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let columns = OutcomeColumns::of(outcomes);
    let result = sqlx::query(
        r#"
        WITH locked AS (
            SELECT id FROM campaign_messages
            WHERE campaign_uid = $11 AND id = ANY($1) AND status = 'pending'
            ORDER BY id
            FOR UPDATE
        ), v AS (
            SELECT v.id, CASE WHEN v.status = 'pending' AND $9 THEN 'cancelled' ELSE v.status END AS status,
                   v.provider_id, v.code, v.message, v.next_at, v.refund, v.marketing
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[], $10::bool[])
                 AS v(id, status, provider_id, code, message, next_at, refund, marketing)
            JOIN locked l ON l.id = v.id
        )
        UPDATE campaign_messages m SET
            status = v.status::message_status,
            provider_message_id = coalesce(v.provider_id, m.provider_message_id),
            last_error_code = CASE WHEN v.code IS NULL THEN m.last_error_code ELSE v.code END,
            last_error_message = CASE WHEN v.code IS NULL THEN m.last_error_message ELSE v.message END,
            next_attempt_at = coalesce(v.next_at, m.next_attempt_at),
            attempts = CASE WHEN v.refund THEN m.attempts ELSE m.attempts + 1 END,
            marketing_requeues = m.marketing_requeues + CASE WHEN v.marketing THEN 1 ELSE 0 END,
            updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
                'status', v.status, 'at', now(), 'attempt', m.attempts + 1, 'startedAt', $12::timestamptz,
                'run', $8::text, 'providerId', v.provider_id, 'code', v.code, 'message', v.message,
                'retryAt', v.next_at)))
        FROM v
        WHERE m.campaign_uid = $11 AND m.id = v.id
        "#,
    )
    .bind(&columns.ids)
    .bind(&columns.statuses)
    .bind(&columns.provider_ids)
    .bind(&columns.codes)
    .bind(&columns.messages)
    .bind(&columns.next_at)
    .bind(&columns.refund)
    .bind(run_id)
    .bind(cancelled)
    .bind(&columns.marketing)
    .bind(campaign)
    .bind(started_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Marks the claimed messages of contacts who opted out `skipped` (no attempt spent).
async fn write_skipped(conn: &mut sqlx::PgConnection, campaign: Uuid, ids: &[i64]) -> Result<u64> {
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET status = 'skipped', updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_build_object('status', 'skipped', 'at', now(), 'reason', 'opted out'))
        WHERE m.campaign_uid = $1 AND m.id = ANY($2) AND m.status = 'pending'
        "#,
    )
    .bind(campaign)
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Turns the messages named by intents that runs other than `run_id` left in a batch
/// into `unknown`, and deletes those intents. Called when a sender starts: only one
/// sender runs per batch index at a time, so such an intent belongs to a run that died
/// (or lost Postgres for good) after its block's calls may have started. Returns how
/// many messages became `unknown`.
pub async fn recover(pool: &PgPool, campaign: Uuid, batch: i32, run_id: &str) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    let result = sqlx::query(
        r#"
        WITH dead AS (
            DELETE FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2 AND run_id <> $3
            RETURNING message_ids, created_at
        ), named AS (
            SELECT unnest(message_ids) AS id, created_at FROM dead
        )
        UPDATE campaign_messages m SET
            status = 'unknown', attempts = m.attempts + 1, last_error_code = 'interrupted',
            last_error_message = 'the sender stopped while this message''s block was being sent; it may have been sent',
            updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_build_object(
                'status', 'unknown', 'at', now(), 'attempt', m.attempts + 1, 'startedAt', named.created_at,
                'code', 'interrupted'))
        FROM named
        WHERE m.campaign_uid = $1 AND m.id = named.id AND m.status = 'pending'
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(run_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(result.rows_affected())
}
