//! The send path's one write per message: a block of due messages is claimed and kept
//! locked by a transaction held across its provider calls, and its outcomes are written
//! in that transaction's one commit (docs/architecture.md, "One write per message").
//!
//! What makes it crash-safe is the block's *intent*: a `send_intents` row naming the
//! block's messages, committed on another connection before the first provider call and
//! deleted by the commit that writes the outcomes. A crash or a lost connection rolls
//! the held transaction back, so the messages read `pending` again, but the intent
//! outlives it and says that calls may have been made:
//!
//! - nothing claims a message named by an intent ([`claim`] leaves them out);
//! - a sender still alive writes the outcomes it holds with [`settle`], which applies
//!   them only if the intent is still there (it is gone once a commit wrote them);
//! - the next run of the batch turns what dead runs' intents name into `unknown`
//!   ([`recover`]), never sending it again.
//!
//! Opt-outs and cancels are honoured as in [`super::messages`]: a claimed message whose
//! contact opted out is written `skipped` by the commit, and a cancelled campaign's
//! retries and requeues are written `cancelled`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use super::messages::{ClaimedMessage, Outcome, OutcomeColumns};

/// A claimed block: its messages are locked by the held transaction until
/// [`HeldBlock::record`] writes their outcomes.
pub struct HeldBlock {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    campaign: Uuid,
    batch: i32,
    intent: Option<i64>,
    started_at: DateTime<Utc>,
    messages: Vec<ClaimedMessage>,
    opted_out: Vec<i64>,
}

/// The intent of a block whose commit failed, to be settled with [`settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    id: i64,
    campaign: Uuid,
    started_at: DateTime<Utc>,
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

/// Claims up to `limit` due pending messages of one batch, skipping rows other
/// transactions hold and messages named by an intent, and keeps them locked. Nothing is
/// written: dropping the block (or an error) gives them back. Before calling the
/// provider, the caller announces what it sends ([`HeldBlock::announce`]).
///
/// The returned messages carry the attempt they are about to make (`attempts` + 1).
pub async fn claim(pool: &PgPool, campaign: Uuid, batch: i32, limit: i64) -> Result<HeldBlock> {
    let mut tx = super::begin(pool).await?;
    let rows = sqlx::query_as::<_, ClaimedRow>(
        r#"
        WITH named AS (
            SELECT unnest(message_ids) AS id FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2
        ), due AS (
            SELECT id FROM campaign_messages
            WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending' AND next_attempt_at <= now()
              AND NOT EXISTS (SELECT 1 FROM campaigns WHERE uid = $1 AND cancelled_at IS NOT NULL)
              AND id NOT IN (SELECT id FROM named)
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        SELECT m.id, m.attempts + 1 AS attempts, c.phone, c.name, c.attributes, m.marketing_requeues, c.opted_out
        FROM due JOIN campaign_messages m ON m.id = due.id AND m.campaign_uid = $1
        JOIN contacts c ON c.id = m.contact_id
        ORDER BY m.id
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let (opted_out, sendable): (Vec<ClaimedRow>, Vec<ClaimedRow>) = rows.into_iter().partition(|r| r.opted_out);
    let messages = sendable
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
    Ok(HeldBlock {
        tx,
        campaign,
        batch,
        intent: None,
        started_at: Utc::now(),
        messages,
        opted_out: opted_out.into_iter().map(|r| r.id).collect(),
    })
}

/// Deletes the intent a failed [`HeldBlock::announce`] may have committed without its
/// answer arriving: no call was made for it, and left behind it would keep its messages
/// from being claimed until the next run turned them `unknown`.
pub async fn forget(pool: &PgPool, campaign: Uuid, batch: i32, run_id: &str, ids: &[i64]) -> Result<u64> {
    let mut db = super::Autocommit::open(pool).await?;
    let result = sqlx::query(
        "DELETE FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2 AND run_id = $3 AND message_ids = $4",
    )
    .bind(campaign)
    .bind(batch)
    .bind(run_id)
    .bind(ids)
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(result.rows_affected())
}

/// Commits the block's intent on a connection of its own: it must be durable before the
/// first provider call, whatever becomes of the held transaction.
async fn record_intent(pool: &PgPool, campaign: Uuid, batch: i32, run_id: &str, ids: &[i64]) -> Result<i64> {
    let mut db = super::Autocommit::open(pool).await?;
    let (id,): (i64,) = sqlx::query_as(
        r#"
        INSERT INTO send_intents (organization, campaign_uid, batch_index, run_id, message_ids)
        SELECT organization, uid, $2, $3, $4 FROM campaigns WHERE uid = $1
        RETURNING id
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(run_id)
    .bind(ids)
    .fetch_one(db.conn())
    .await?;
    db.commit().await?;
    Ok(id)
}

impl HeldBlock {
    /// Takes the messages to send, leaving the block to record their outcomes.
    pub fn take_messages(&mut self) -> Vec<ClaimedMessage> {
        std::mem::take(&mut self.messages)
    }

    /// How many messages the block has to send.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether the block has nothing to send.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Whether the block claimed messages of contacts who opted out (written `skipped`
    /// by [`HeldBlock::record`]).
    pub fn has_opted_out(&self) -> bool {
        !self.opted_out.is_empty()
    }

    /// Commits the intent to send `ids` (messages of this block), on another
    /// connection: it must be durable before the first provider call. On an error the
    /// intent may or may not exist: call [`forget`] before giving the block up.
    pub async fn announce(&mut self, pool: &PgPool, ids: &[i64], run_id: &str) -> Result<()> {
        self.started_at = Utc::now();
        self.intent = Some(record_intent(pool, self.campaign, self.batch, run_id, ids).await?);
        Ok(())
    }

    /// The intent to settle if [`HeldBlock::record`] fails (none when nothing was to be
    /// sent).
    pub fn intent(&self) -> Option<Intent> {
        self.intent.map(|id| Intent { id, campaign: self.campaign, started_at: self.started_at })
    }

    /// Writes the outcomes (and the opted-out contacts' `skipped`), deletes the intent,
    /// and commits: the block's one write per message. On an error the transaction is
    /// rolled back (dropped) and the outcomes must be written with [`settle`].
    pub async fn record(mut self, outcomes: &[(i64, Outcome)], run_id: &str) -> Result<u64> {
        if let Some(id) = self.intent {
            sqlx::query("DELETE FROM send_intents WHERE id = $1").bind(id).execute(&mut *self.tx).await?;
        }
        let mut written = write_outcomes(&mut self.tx, self.campaign, self.started_at, outcomes, run_id).await?;
        if !self.opted_out.is_empty() {
            written += write_skipped(&mut self.tx, self.campaign, &self.opted_out).await?;
        }
        self.tx.commit().await?;
        Ok(written)
    }
}

/// Writes the outcomes of a block whose held transaction failed, if they were not
/// written: the intent still being there says they were not (its commit deletes it).
/// The intent's row lock makes this wait for a held transaction still finishing on a
/// broken connection. Safe to repeat. Returns how many messages moved.
pub async fn settle(pool: &PgPool, intent: Intent, outcomes: &[(i64, Outcome)], run_id: &str) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    let found =
        sqlx::query("DELETE FROM send_intents WHERE id = $1").bind(intent.id).execute(&mut *tx).await?.rows_affected();
    let written = if found == 0 {
        0
    } else {
        // Unlocked now, but no claim takes a message its intent names, and the intent
        // is deleted only with this write.
        write_outcomes(&mut tx, intent.campaign, intent.started_at, outcomes, run_id).await?
    };
    tx.commit().await?;
    Ok(written)
}

/// One statement for the block's outcomes, on messages still `pending` (each was locked
/// by the block, or named by its intent, since it was claimed).
///
/// A retry or a requeue of a cancelled campaign is written `cancelled`. The campaign row
/// is read under a share lock only when the block has such outcomes: a cancel under way
/// is waited for and seen; a cancel that starts meanwhile waits for this commit and then
/// finds these messages `pending` (see [`super::messages::cancel_pending`], which skips
/// the rows a held block locks rather than waiting for them while holding the campaign
/// row this waits for).
async fn write_outcomes(
    conn: &mut sqlx::PgConnection,
    campaign: Uuid,
    started_at: DateTime<Utc>,
    outcomes: &[(i64, Outcome)],
    run_id: &str,
) -> Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let columns = OutcomeColumns::of(outcomes);
    let may_go_back = outcomes.iter().any(|(_, o)| o.status() == "pending");
    let result = sqlx::query(
        r#"
        WITH campaign AS (
            SELECT cancelled_at IS NOT NULL AS cancelled FROM campaigns WHERE $9 AND uid = $11 FOR SHARE
        ), v AS (
            SELECT v.id,
                   CASE WHEN v.status = 'pending' AND coalesce((SELECT cancelled FROM campaign), false)
                        THEN 'cancelled' ELSE v.status END AS status,
                   v.provider_id, v.code, v.message, v.next_at, v.refund, v.marketing
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[], $10::bool[])
                 AS v(id, status, provider_id, code, message, next_at, refund, marketing)
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
        WHERE m.campaign_uid = $11 AND m.id = v.id AND m.status = 'pending'
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
    .bind(may_go_back)
    .bind(&columns.marketing)
    .bind(campaign)
    .bind(started_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Marks the block's opted-out contacts' messages `skipped` (no attempt spent).
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
/// (or lost Postgres for good) after its block's calls may have started.
///
/// The messages are written before the intents are deleted: a held transaction still
/// open on a connection Postgres has not yet seen die holds the messages' locks, so
/// this waits for it to end, and writes nothing over outcomes it committed. (Deleting
/// the intent first would lock the row that transaction's commit deletes, and each
/// would wait for the other.) Returns how many messages became `unknown`.
pub async fn recover(pool: &PgPool, campaign: Uuid, batch: i32, run_id: &str) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    let dead: Vec<(i64,)> = sqlx::query_as(
        "SELECT id FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2 AND run_id <> $3 ORDER BY id",
    )
    .bind(campaign)
    .bind(batch)
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    if dead.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let dead: Vec<i64> = dead.into_iter().map(|(id,)| id).collect();
    let result = sqlx::query(
        r#"
        WITH named AS (
            SELECT unnest(message_ids) AS id, created_at FROM send_intents WHERE id = ANY($2)
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
    .bind(&dead)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM send_intents WHERE id = ANY($1)").bind(&dead).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(result.rows_affected())
}

/// How many blocks of a batch are in flight or were left by dead runs (their intents).
pub async fn intents_in_flight(pool: &PgPool, campaign: Uuid, batch: i32) -> Result<i64> {
    let mut db = super::Autocommit::open(pool).await?;
    let (count,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM send_intents WHERE campaign_uid = $1 AND batch_index = $2")
            .bind(campaign)
            .bind(batch)
            .fetch_one(db.conn())
            .await?;
    db.commit().await?;
    Ok(count)
}
