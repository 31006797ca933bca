//! Campaign messages on the send path: claiming due messages of one batch, recording
//! each attempt's outcome, and recovering what a dead sender left behind.
//!
//! A message is marked `sending` in the same statement that claims it, right before the
//! provider calls of its block, and gets its outcome right after. A sender that dies in
//! between leaves `sending` rows; the next sender of that batch turns them into
//! `unknown` instead of sending them again, because the request may have reached the
//! provider and the providers have no idempotency key.

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
}

/// Claims up to `limit` due pending messages of one batch and marks them `sending`
/// (attempts + 1, `updated_at` = when the attempt started), skipping rows another
/// transaction holds, so parallel senders never claim the same message.
///
/// The claim adds nothing to the status history: the attempt's history entry is written
/// once, with its outcome (see [`record_outcomes`]), because every message goes through
/// here and an entry costs a rewrite of the JSONB.
pub async fn claim_due(pool: &PgPool, campaign: Uuid, batch: i32, limit: i64) -> Result<Vec<ClaimedMessage>> {
    let rows = sqlx::query_as::<_, ClaimedMessage>(
        r#"
        WITH due AS (
            SELECT id FROM campaign_messages
            WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE campaign_messages m SET status = 'sending', attempts = m.attempts + 1, updated_at = now()
            FROM due WHERE m.id = due.id
            RETURNING m.id, m.attempts, m.contact_id
        )
        SELECT marked.id, marked.attempts, c.phone, c.name, c.attributes
        FROM marked JOIN contacts c ON c.id = marked.contact_id
        ORDER BY marked.id
        "#,
    )
    .bind(campaign)
    .bind(batch)
    .bind(limit)
    .fetch_all(pool)
    .await?;
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
    fn status(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::RetryAt { .. } | Outcome::Requeue { .. } => "pending",
            Outcome::Failed { .. } => "failed",
            Outcome::Unknown { .. } => "unknown",
        }
    }
}

/// Records the outcomes of a block of attempts in one statement. Only messages still
/// `sending` move (a webhook may already have moved one further: it wins). Each gets
/// one history entry for the attempt: its number, when it started, the sender run
/// that made it, and its outcome. Returns how many rows changed.
pub async fn record_outcomes(pool: &PgPool, outcomes: &[(i64, Outcome)], run_id: &str) -> Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut statuses = Vec::with_capacity(outcomes.len());
    let mut provider_ids: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
    let mut codes: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
    let mut messages: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
    let mut next_at: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(outcomes.len());
    let mut refund: Vec<bool> = Vec::with_capacity(outcomes.len());
    for (id, outcome) in outcomes {
        ids.push(*id);
        statuses.push(outcome.status());
        let (pid, code, msg, at, give_back) = match outcome {
            Outcome::Sent { provider_message_id } => (Some(provider_message_id.clone()), None, None, None, false),
            Outcome::RetryAt { at, code, message } => (None, Some(code.clone()), Some(message.clone()), Some(*at), false),
            Outcome::Requeue { at } => (None, None, None, Some(*at), true),
            Outcome::Failed { code, message } => (None, Some(code.clone()), Some(message.clone()), None, false),
            Outcome::Unknown { reason } => (None, Some("unknown".to_owned()), Some(reason.clone()), None, false),
        };
        provider_ids.push(pid);
        codes.push(code);
        messages.push(msg);
        next_at.push(at);
        refund.push(give_back);
    }
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET
            status = v.status::message_status,
            provider_message_id = coalesce(v.provider_id, m.provider_message_id),
            last_error_code = CASE WHEN v.code IS NULL THEN m.last_error_code ELSE v.code END,
            last_error_message = CASE WHEN v.code IS NULL THEN m.last_error_message ELSE v.message END,
            next_attempt_at = coalesce(v.next_at, m.next_attempt_at),
            attempts = CASE WHEN v.refund THEN m.attempts - 1 ELSE m.attempts END,
            updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
                'status', v.status, 'at', now(), 'attempt', m.attempts, 'startedAt', m.updated_at, 'run', $8::text,
                'providerId', v.provider_id, 'code', v.code, 'message', v.message, 'retryAt', v.next_at)))
        FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[])
             AS v(id, status, provider_id, code, message, next_at, refund)
        WHERE m.id = v.id AND m.status = 'sending'
        "#,
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&provider_ids)
    .bind(&codes)
    .bind(&messages)
    .bind(&next_at)
    .bind(&refund)
    .bind(run_id)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Turns messages of a batch left `sending` by a previous run into `unknown`. Called when
/// a sender starts: only one sender runs per batch index at a time, so any `sending` row
/// there belongs to a run that died mid-call.
pub async fn recover_interrupted(pool: &PgPool, campaign: Uuid, batch: i32) -> Result<u64> {
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
    .execute(pool)
    .await?;
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
    let (pending, next_due): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(next_attempt_at) FROM campaign_messages WHERE campaign_uid = $1 AND batch_index = $2 AND status = 'pending'",
    )
    .bind(campaign)
    .bind(batch)
    .fetch_one(pool)
    .await?;
    Ok(BatchRemaining { pending, next_due })
}

/// Cancels every pending message of a campaign (the campaign was cancelled). Messages in
/// flight finish normally.
pub async fn cancel_pending(pool: &PgPool, campaign: Uuid) -> Result<u64> {
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET status = 'cancelled', updated_at = now(),
            status_history = m.status_history || jsonb_build_array(jsonb_build_object('status', 'cancelled', 'at', now()))
        WHERE campaign_uid = $1 AND status = 'pending'
        "#,
    )
    .bind(campaign)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
