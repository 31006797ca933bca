//! Campaign messages on the send path: claiming due messages of one batch, recording
//! each attempt's outcome, and recovering what a dead sender left behind.
//!
//! A message is marked `sending` in the same statement that claims it, right before the
//! provider calls of its block, and gets its outcome right after. A sender that dies in
//! between leaves `sending` rows; the next sender of that batch turns them into
//! `unknown` instead of sending them again, because the request may have reached the
//! provider and the providers have no idempotency key.
//!
//! Two promises are kept here, at send time, whatever was frozen before: a contact who
//! opted out after the audience was frozen is never sent to (the claim turns the message
//! `skipped`), and a cancelled campaign sends nothing more (the claim takes nothing from
//! it, and an attempt that would go back to `pending` ends `cancelled`).
//!
//! Lock order: every writer of several message rows locks them in ascending id order
//! (the claim's `SKIP LOCKED` never waits), so two writers never deadlock.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;

/// A message claimed for sending, with what rendering needs.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClaimedMessage {
    /// Our message id (also carried to Meta as `biz_opaque_callback_data`).
    pub id: i64,
    /// Attempt number of this send (1 for the first).
    pub attempts: i32,
    /// Recipient, E.164.
    pub phone: String,
    /// Contact name.
    pub name: Option<String>,
    /// Contact attributes.
    pub attributes: Value,
    /// Times Meta's per-user marketing limit (131049) put it back already.
    pub marketing_requeues: i16,
}

/// Claims up to `limit` due pending messages of one batch and marks them `sending`
/// (attempts + 1, `updated_at` = when the attempt started), skipping rows another
/// transaction holds, so parallel senders never claim the same message.
///
/// Opt-outs are honoured here rather than only when the audience is frozen: a due
/// message whose contact has opted out since is marked `skipped` in the same statement
/// (no attempt spent) and not returned, so a claim may return fewer messages than it
/// took. A cancelled campaign yields nothing. A message claimed just before a cancel
/// commits is in flight: its outcome decides (see [`record_outcomes`]).
///
/// The claim adds nothing to the status history of a message it returns: the attempt's
/// history entry is written once, with its outcome (see [`record_outcomes`]), because
/// every message goes through here and an entry costs a rewrite of the JSONB.
pub async fn claim_due(pool: &PgPool, campaign: Uuid, batch: i32, limit: i64) -> Result<Vec<ClaimedMessage>> {
    let mut db = super::Autocommit::open(pool).await?;
    let rows = sqlx::query_as::<_, ClaimedMessage>(
        r#"
        WITH due AS (
            SELECT id, contact_id FROM campaign_messages
            WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending' AND next_attempt_at <= now()
              AND NOT EXISTS (SELECT 1 FROM campaigns WHERE uid = $1 AND cancelled_at IS NOT NULL)
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE campaign_messages m SET
                status = CASE WHEN c.opted_out THEN 'skipped' ELSE 'sending' END::message_status,
                attempts = CASE WHEN c.opted_out THEN m.attempts ELSE m.attempts + 1 END,
                updated_at = now(),
                status_history = CASE WHEN c.opted_out
                    THEN m.status_history || jsonb_build_array(jsonb_build_object('status', 'skipped', 'at', now(), 'reason', 'opted out'))
                    ELSE m.status_history END
            FROM due JOIN contacts c ON c.id = due.contact_id
            WHERE m.campaign_uid = $1 AND m.id = due.id
            RETURNING m.id, m.attempts, NOT c.opted_out AS sendable, c.phone, c.name, c.attributes, m.marketing_requeues
        )
        SELECT id, attempts, phone, name, attributes, marketing_requeues
        FROM marked WHERE sendable
        ORDER BY id
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(limit)
    .fetch_all(db.conn())
    .await?;
    db.commit().await?;
    Ok(rows)
}

/// The result of one attempt, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The provider accepted it and gave its id.
    Sent {
        /// WAMID (Meta) or key id (Evolution).
        provider_message_id: String,
    },
    /// It failed in a way worth retrying: back to pending until `at`.
    RetryAt {
        /// When to try again.
        at: DateTime<Utc>,
        /// Error code for the breakdown.
        code: String,
        /// Human-readable error.
        message: String,
    },
    /// Not attempted after all (the channel is rate-limited or stopped): back to pending
    /// without spending an attempt.
    Requeue {
        /// When to try again.
        at: DateTime<Utc>,
    },
    /// Meta withheld it under its per-user marketing limit (131049): back to pending
    /// until `at`, without spending an attempt, counted as a marketing requeue.
    MarketingHeld {
        /// When to try again (see `account::marketing_requeue_at`).
        at: DateTime<Utc>,
        /// What Meta said.
        message: String,
    },
    /// Failed for good.
    Failed {
        /// Error code (provider code, or `render`, `max_attempts`, ...).
        code: String,
        /// Human-readable error.
        message: String,
    },
    /// The request may have reached the provider; never re-sent silently.
    Unknown {
        /// Why the outcome is unknown.
        reason: String,
    },
}

impl Outcome {
    pub(super) fn status(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::RetryAt { .. } | Outcome::Requeue { .. } | Outcome::MarketingHeld { .. } => "pending",
            Outcome::Failed { .. } => "failed",
            Outcome::Unknown { .. } => "unknown",
        }
    }
}

/// Outcomes as the column arrays the recording statements unnest.
pub(super) struct OutcomeColumns {
    pub(super) ids: Vec<i64>,
    pub(super) statuses: Vec<&'static str>,
    pub(super) provider_ids: Vec<Option<String>>,
    pub(super) codes: Vec<Option<String>>,
    pub(super) messages: Vec<Option<String>>,
    pub(super) next_at: Vec<Option<DateTime<Utc>>>,
    /// The attempt is given back (not attempted after all).
    pub(super) refund: Vec<bool>,
    pub(super) marketing: Vec<bool>,
}

impl OutcomeColumns {
    pub(super) fn of(outcomes: &[(i64, Outcome)]) -> OutcomeColumns {
        let mut c = OutcomeColumns {
            ids: Vec::with_capacity(outcomes.len()),
            statuses: Vec::with_capacity(outcomes.len()),
            provider_ids: Vec::with_capacity(outcomes.len()),
            codes: Vec::with_capacity(outcomes.len()),
            messages: Vec::with_capacity(outcomes.len()),
            next_at: Vec::with_capacity(outcomes.len()),
            refund: Vec::with_capacity(outcomes.len()),
            marketing: Vec::with_capacity(outcomes.len()),
        };
        for (id, outcome) in outcomes {
            let (pid, code, msg, at, give_back) = match outcome {
                Outcome::Sent { provider_message_id } => (Some(provider_message_id.clone()), None, None, None, false),
                Outcome::RetryAt { at, code, message } => {
                    (None, Some(code.clone()), Some(message.clone()), Some(*at), false)
                }
                Outcome::Requeue { at } => (None, None, None, Some(*at), true),
                Outcome::MarketingHeld { at, message } => (
                    None,
                    Some(crate::account::MARKETING_LIMIT_CODE.to_owned()),
                    Some(message.clone()),
                    Some(*at),
                    true,
                ),
                Outcome::Failed { code, message } => (None, Some(code.clone()), Some(message.clone()), None, false),
                Outcome::Unknown { reason } => (None, Some("unknown".to_owned()), Some(reason.clone()), None, false),
            };
            c.ids.push(*id);
            c.statuses.push(outcome.status());
            c.provider_ids.push(pid);
            c.codes.push(code);
            c.messages.push(msg);
            c.next_at.push(at);
            c.refund.push(give_back);
            c.marketing.push(matches!(outcome, Outcome::MarketingHeld { .. }));
        }
        c
    }
}

/// Records the outcomes of a block of attempts in one statement. Only messages still
/// `sending` move (a webhook may already have moved one further: it wins). Each gets
/// one history entry for the attempt: its number, when it started, the sender run
/// that made it, and its outcome. Returns how many rows changed.
///
/// The rows are locked first, in ascending id order, as every writer of several
/// messages does, so this never deadlocks with the webhook writer.
///
/// A retry or a requeue of a cancelled campaign is recorded `cancelled` instead of
/// `pending`: the message provably was not sent, and nothing may send it any more.
/// When the block has such outcomes, the campaign row is read under a share lock: a
/// cancel (see [`cancel_pending`]) that is under way is waited for and seen, and a
/// cancel that starts meanwhile waits for this statement and then finds these rows
/// `pending`, so neither order leaves a pending message in a cancelled campaign. A
/// block of sends and failures takes no such lock.
///
/// Every message must be of `campaign`: the statement names it, so Postgres reads and
/// locks that campaign's partition alone (docs/architecture.md, "Partitions"); an id of
/// another campaign is not found and does not change.
pub async fn record_campaign_outcomes(
    pool: &PgPool,
    campaign: Uuid,
    outcomes: &[(i64, Outcome)],
    run_id: &str,
) -> Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let columns = OutcomeColumns::of(outcomes);
    let may_go_back = outcomes.iter().any(|(_, o)| o.status() == "pending");
    let mut db = super::Autocommit::open(pool).await?;
    let result = sqlx::query(
        r#"
        WITH locked AS (
            SELECT id, campaign_uid FROM campaign_messages
            WHERE campaign_uid = $11 AND id = ANY($1) AND status = 'sending'
            ORDER BY id
            FOR UPDATE
        ), campaign AS (
            -- no filter on cancelled_at here: it would be checked before the lock is
            -- taken, and a cancel under way would go unnoticed
            SELECT uid, cancelled_at IS NOT NULL AS cancelled FROM campaigns
            WHERE $9 AND uid IN (SELECT campaign_uid FROM locked)
            FOR SHARE
        ), v AS (
            SELECT v.id, CASE WHEN v.status = 'pending' AND k.cancelled THEN 'cancelled' ELSE v.status END AS status,
                   v.provider_id, v.code, v.message, v.next_at, v.refund, v.marketing
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[], $10::bool[])
                 AS v(id, status, provider_id, code, message, next_at, refund, marketing)
            JOIN locked l ON l.id = v.id
            LEFT JOIN campaign k ON k.uid = l.campaign_uid
        )
        UPDATE campaign_messages m SET
            status = v.status::message_status,
            provider_message_id = coalesce(v.provider_id, m.provider_message_id),
            last_error_code = CASE WHEN v.code IS NULL THEN m.last_error_code ELSE v.code END,
            last_error_message = CASE WHEN v.code IS NULL THEN m.last_error_message ELSE v.message END,
            next_attempt_at = coalesce(v.next_at, m.next_attempt_at),
            attempts = CASE WHEN v.refund THEN m.attempts - 1 ELSE m.attempts END,
            marketing_requeues = m.marketing_requeues + CASE WHEN v.marketing THEN 1 ELSE 0 END,
            updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
                'status', v.status, 'at', now(), 'attempt', m.attempts, 'startedAt', m.updated_at, 'run', $8::text,
                'providerId', v.provider_id, 'code', v.code, 'message', v.message, 'retryAt', v.next_at)))
        FROM v
        WHERE m.campaign_uid = $11 AND m.id = v.id AND m.status = 'sending'
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
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(result.rows_affected())
}

/// [`record_campaign_outcomes`] for messages whose campaign the caller does not have at
/// hand (tests and tools): their campaigns are looked up first, by id alone, which reads
/// every partition's primary key, so its cost grows with the number of campaigns kept.
/// The send path knows its campaign and never calls this.
pub async fn record_outcomes(pool: &PgPool, outcomes: &[(i64, Outcome)], run_id: &str) -> Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
    let campaigns: Vec<(Uuid, Vec<i64>)> = sqlx::query_as(
        "SELECT campaign_uid, array_agg(id) FROM campaign_messages WHERE id = ANY($1) GROUP BY campaign_uid ORDER BY campaign_uid",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut changed = 0;
    for (campaign, of_campaign) in campaigns {
        let theirs: Vec<(i64, Outcome)> = outcomes.iter().filter(|(id, _)| of_campaign.contains(id)).cloned().collect();
        changed += record_campaign_outcomes(pool, campaign, &theirs, run_id).await?;
    }
    Ok(changed)
}

/// Turns messages of a batch left `sending` by a previous run into `unknown`. Called when
/// a sender starts: only one sender runs per batch index at a time, so any `sending` row
/// there belongs to a run that died mid-call.
pub async fn recover_interrupted(pool: &PgPool, campaign: Uuid, batch: i32) -> Result<u64> {
    let mut db = super::Autocommit::open(pool).await?;
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET
            status = 'unknown', last_error_code = 'interrupted',
            last_error_message = 'the sender stopped between marking and recording this message; it may have been sent',
            updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_build_object(
                'status', 'unknown', 'at', now(), 'attempt', m.attempts, 'startedAt', m.updated_at, 'code', 'interrupted'))
        WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'sending'
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(result.rows_affected())
}

/// What remains to do in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchRemaining {
    /// Pending messages, due or waiting for a retry.
    pub pending: i64,
    /// When the earliest pending message becomes due.
    pub next_due: Option<DateTime<Utc>>,
}

/// How many messages of the batch are not final yet, and when the next one is due.
pub async fn batch_remaining(pool: &PgPool, campaign: Uuid, batch: i32) -> Result<BatchRemaining> {
    let mut db = super::Autocommit::open(pool).await?;
    let (pending, next_due): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(next_attempt_at) FROM campaign_messages WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending'",
    )
    .bind(campaign)
    .bind(batch)
    .fetch_one(db.conn())
    .await?;
    db.commit().await?;
    Ok(BatchRemaining { pending, next_due })
}

/// Cancels a campaign in the store: marks it cancelled (the first instant is kept) and
/// cancels every pending message. From then on nothing of it is claimed, and a retry or
/// requeue of a message in flight is recorded `cancelled` (see [`record_outcomes`]);
/// messages in flight otherwise finish normally. Idempotent. Returns how many messages
/// this call cancelled.
///
/// Two statements in one transaction, in this order: marking the campaign takes its row
/// lock, which waits for any outcome recording that read the campaign under a share
/// lock, and only then does the second statement look for pending messages, so it sees
/// what that recording put back to `pending`.
pub async fn cancel_pending(pool: &PgPool, campaign: Uuid) -> Result<u64> {
    let mut tx = super::begin(pool).await?;
    sqlx::query("UPDATE campaigns SET cancelled_at = coalesce(cancelled_at, now()) WHERE uid = $1")
        .bind(campaign)
        .execute(&mut *tx)
        .await?;
    // A block being sent is left to its sender, which writes its retries and requeues
    // `cancelled` (`blocks::record`). Its intent is seen by a statement that starts after
    // the block's rows are locked here (its claim held them until it committed the
    // intent), hence two statements.
    sqlx::query(
        "SELECT id FROM campaign_messages WHERE campaign_uid = $1 AND status = 'pending' ORDER BY id FOR UPDATE",
    )
    .bind(campaign)
    .execute(&mut *tx)
    .await?;
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET status = 'cancelled', updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_build_object('status', 'cancelled', 'at', now()))
        WHERE m.campaign_uid = $1 AND m.status = 'pending'
          AND m.id NOT IN (SELECT unnest(message_ids) FROM send_intents WHERE campaign_uid = $1)
        "#,
    )
    .bind(campaign)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(result.rows_affected())
}
