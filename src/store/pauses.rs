//! What holds sending back, as typed state shared by senders and the controller:
//! a channel's pause (a spent window, or a provider refusal that needs a person), a
//! campaign's stop (the provider refuses this campaign's message), and the channel's
//! current caps, which senders re-read every second so an edited Channel reaches the
//! senders already running.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use super::rate::Limits;
use crate::api::RateLimitMode;

/// Why a channel does not send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelPause {
    /// A cap of a Hard channel is spent; sending resumes by itself at the instant.
    WindowSpent {
        /// When the spent window ends.
        until: DateTime<Utc>,
    },
    /// The provider refused the channel's credentials, permissions or account. Holds
    /// until a person resumes or the credentials change.
    ProviderRefused {
        /// The provider's error code.
        code: String,
        /// What the provider said.
        message: String,
    },
}

/// Pauses the channel until `until`: a cap of a Hard channel is spent. A refusal in
/// force is never replaced by a window pause.
pub(crate) async fn pause_for_window(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    until: DateTime<Utc>,
) -> Result<()> {
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query(
        r#"INSERT INTO channel_state (organization, channel, pause_kind, paused_until) VALUES ($1, $2, 'window_spent', $3)
           ON CONFLICT (organization, channel) DO UPDATE SET
               pause_kind = 'window_spent',
               paused_until = CASE WHEN channel_state.pause_kind = 'window_spent' AND channel_state.paused_until > EXCLUDED.paused_until
                                   THEN channel_state.paused_until ELSE EXCLUDED.paused_until END,
               pause_code = NULL, pause_reason = NULL, updated_at = now()
           WHERE channel_state.pause_kind IS DISTINCT FROM 'provider_refused'"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(until)
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(())
}

/// Stops the channel: the provider refused it. Remembers the credentials version in
/// force, so that new credentials lift the stop.
pub async fn stop_channel(pool: &PgPool, organization: &str, channel: &str, code: &str, message: &str) -> Result<()> {
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query(
        r#"INSERT INTO channel_state (organization, channel, pause_kind, pause_code, pause_reason) VALUES ($1, $2, 'provider_refused', $3, $4)
           ON CONFLICT (organization, channel) DO UPDATE SET
               pause_kind = 'provider_refused', paused_until = NULL, pause_code = $3, pause_reason = $4,
               stopped_credentials_version = channel_state.credentials_version, updated_at = now()"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(code)
    .bind(message)
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(())
}

type PauseRow = (Option<String>, Option<DateTime<Utc>>, Option<String>, Option<String>);

fn pause_of(row: PauseRow) -> Option<ChannelPause> {
    match row {
        (Some(kind), Some(until), _, _) if kind == "window_spent" && until > Utc::now() => {
            Some(ChannelPause::WindowSpent { until })
        }
        (Some(kind), _, code, message) if kind == "provider_refused" => {
            Some(ChannelPause::ProviderRefused { code: code.unwrap_or_default(), message: message.unwrap_or_default() })
        }
        _ => None,
    }
}

/// The channel's pause, if one is in force now.
pub async fn channel_pause(pool: &PgPool, organization: &str, channel: &str) -> Result<Option<ChannelPause>> {
    let row: Option<PauseRow> = sqlx::query_as(
        "SELECT pause_kind::text, paused_until, pause_code, pause_reason FROM channel_state WHERE organization = $1 AND channel = $2",
    )
    .bind(organization)
    .bind(channel)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(pause_of))
}

/// Lifts whatever pause the channel has (a person resumed it). Returns whether one was lifted.
pub(crate) async fn clear_channel_pause(pool: &PgPool, organization: &str, channel: &str) -> Result<bool> {
    let result = sqlx::query(
        r#"UPDATE channel_state SET pause_kind = NULL, paused_until = NULL, pause_code = NULL, pause_reason = NULL, updated_at = now()
           WHERE organization = $1 AND channel = $2 AND pause_kind IS NOT NULL"#,
    )
    .bind(organization)
    .bind(channel)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() > 0)
}

/// The caps as stored for senders: what the Channel's spec says after provider defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLimits {
    per_minute: Option<u32>,
    per_hour: Option<u32>,
    per_day: Option<u32>,
    mode: RateLimitMode,
    min_interval_millis: u64,
}

impl From<&Limits> for StoredLimits {
    fn from(l: &Limits) -> Self {
        StoredLimits {
            per_minute: l.per_minute,
            per_hour: l.per_hour,
            per_day: l.per_day,
            mode: l.mode,
            min_interval_millis: u64::try_from(l.min_interval.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl From<StoredLimits> for Limits {
    fn from(s: StoredLimits) -> Self {
        Limits {
            per_minute: s.per_minute,
            per_hour: s.per_hour,
            per_day: s.per_day,
            mode: s.mode,
            min_interval: std::time::Duration::from_millis(s.min_interval_millis),
        }
    }
}

/// What the controller observed of a Channel and hands to its senders and to the stop
/// logic: the caps in force and the version of the credentials. A stop whose credentials
/// version differs from the new one is lifted (a person replaced the credentials).
/// Returns whether a provider refusal was lifted.
pub(crate) async fn observe_channel(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    limits: &Limits,
    credentials_version: &str,
) -> Result<bool> {
    let stored = serde_json::to_value(StoredLimits::from(limits))
        .map_err(|e| super::Error::Invalid(format!("channel limits: {e}")))?;
    let lifted: Option<(bool,)> = sqlx::query_as(
        r#"WITH before AS (
               SELECT pause_kind FROM channel_state WHERE organization = $1 AND channel = $2
           )
           INSERT INTO channel_state AS s (organization, channel, limits, credentials_version) VALUES ($1, $2, $3, $4)
           ON CONFLICT (organization, channel) DO UPDATE SET
               limits = EXCLUDED.limits,
               credentials_version = EXCLUDED.credentials_version,
               pause_kind = CASE WHEN s.pause_kind = 'provider_refused' AND s.stopped_credentials_version IS DISTINCT FROM EXCLUDED.credentials_version
                                 THEN NULL ELSE s.pause_kind END,
               pause_code = CASE WHEN s.pause_kind = 'provider_refused' AND s.stopped_credentials_version IS DISTINCT FROM EXCLUDED.credentials_version
                                 THEN NULL ELSE s.pause_code END,
               pause_reason = CASE WHEN s.pause_kind = 'provider_refused' AND s.stopped_credentials_version IS DISTINCT FROM EXCLUDED.credentials_version
                                 THEN NULL ELSE s.pause_reason END,
               updated_at = now()
           WHERE s.limits IS DISTINCT FROM EXCLUDED.limits OR s.credentials_version IS DISTINCT FROM EXCLUDED.credentials_version
           RETURNING coalesce((SELECT pause_kind = 'provider_refused' FROM before), false) AND s.pause_kind IS NULL"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(stored)
    .bind(credentials_version)
    .fetch_optional(pool)
    .await?;
    Ok(lifted.is_some_and(|(lifted,)| lifted))
}

/// What a running sender re-reads every second.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SendState {
    /// The channel's pause in force, if any.
    pub channel_pause: Option<ChannelPause>,
    /// The channel's caps as last observed by the controller (None: never observed; the
    /// sender keeps the caps it started with).
    pub limits: Option<Limits>,
    /// The campaign was stopped by a refusal of its message (code, message).
    pub campaign_stop: Option<(String, String)>,
    /// The campaign was cancelled.
    pub cancelled: bool,
}

/// Reads the channel's and the campaign's state in one round trip.
pub(crate) async fn send_state(pool: &PgPool, organization: &str, channel: &str, campaign: Uuid) -> Result<SendState> {
    type Row = (
        Option<String>,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<String>,
        Option<serde_json::Value>,
        Option<String>,
        Option<String>,
        bool,
    );
    let mut db = super::Autocommit::open(pool).await?;
    let row: Option<Row> = sqlx::query_as(
        r#"SELECT s.pause_kind::text, s.paused_until, s.pause_code, s.pause_reason, s.limits, c.stop_code, c.stop_message,
                  coalesce(c.cancelled, false)
           FROM (SELECT 1) AS one
           LEFT JOIN channel_state s ON s.organization = $1 AND s.channel = $2
           LEFT JOIN LATERAL (
               SELECT stop_code, stop_message, cancelled_at IS NOT NULL AS cancelled
               FROM campaigns WHERE uid = $3
           ) c ON true"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(campaign)
    .fetch_optional(db.conn())
    .await?;
    db.commit().await?;
    let Some((kind, until, code, reason, limits, stop_code, stop_message, cancelled)) = row else {
        return Ok(SendState::default());
    };
    Ok(SendState {
        channel_pause: pause_of((kind, until, code, reason)),
        limits: limits.and_then(|v| serde_json::from_value::<StoredLimits>(v).ok()).map(Limits::from),
        campaign_stop: stop_code.map(|code| (code, stop_message.unwrap_or_default())),
        cancelled,
    })
}

/// Stops one campaign: the provider refuses its message. The first stop's reason wins.
pub(crate) async fn stop_campaign(pool: &PgPool, campaign: Uuid, code: &str, message: &str) -> Result<()> {
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query("UPDATE campaigns SET stop_code = $2, stop_message = $3, stopped_at = now() WHERE uid = $1 AND stop_code IS NULL")
        .bind(campaign)
        .bind(code)
        .bind(message)
        .execute(db.conn())
        .await?;
    db.commit().await?;
    Ok(())
}

/// The campaign's stop, if any (code, message).
pub(crate) async fn campaign_stop(pool: &PgPool, campaign: Uuid) -> Result<Option<(String, String)>> {
    let row: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT stop_code, stop_message FROM campaigns WHERE uid = $1")
            .bind(campaign)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(code, message)| code.map(|c| (c, message.unwrap_or_default()))))
}

/// Lifts a campaign's stop (a person resumed it, or its message changed). Returns
/// whether there was one.
pub(crate) async fn clear_campaign_stop(pool: &PgPool, campaign: Uuid) -> Result<bool> {
    let result = sqlx::query("UPDATE campaigns SET stop_code = NULL, stop_message = NULL, stopped_at = NULL WHERE uid = $1 AND stop_code IS NOT NULL")
        .bind(campaign)
        .execute(pool)
        .await?;
    Ok(result.rows_affected() > 0)
}
