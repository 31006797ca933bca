//! Account health signals Meta pushes by webhook (docs/providers.md, "Account health
//! signals"; the webhook envelope is A4): a number's quality, its portfolio's messaging
//! limit and restrictions, and its templates' status and quality.
//!
//! These are the latest word from Meta, not history: every function overwrites what
//! is stored (Meta sends them rarely, without a sequence number, and the controller
//! polls the same facts from the Graph API, which corrects a late or lost webhook).
//! Which rows a signal concerns is decided by the webhook (`webhook::signals::route`)
//! from [`channel_rows`]; this module trusts what it is given.
//!
//! Lock order, the same in every function and for any caller that takes several:
//! `channel_state` rows before `portfolios` rows, each set in ascending key order, so
//! two writers of the same rows queue instead of deadlocking.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Result;

/// A `phone_number_quality_update` event. FLAGGED and DOWNGRADE mean the number's
/// quality is low (its portfolio's limit drops if it continues); UNFLAGGED and UPGRADE
/// lift that; the others (ONBOARDING, THROUGHPUT_UPGRADE, ...) say nothing about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QualityEvent {
    /// Quality is low; the limit will drop if it stays low.
    Flagged,
    /// The flag is lifted.
    Unflagged,
    /// The limit dropped a tier.
    Downgrade,
    /// The limit grew a tier.
    Upgrade,
    /// Any other event, as Meta named it.
    Other(String),
}

impl QualityEvent {
    /// Reads Meta's event name (case as sent: Meta uses upper case).
    pub fn parse(event: &str) -> Self {
        match event {
            "FLAGGED" => QualityEvent::Flagged,
            "UNFLAGGED" => QualityEvent::Unflagged,
            "DOWNGRADE" => QualityEvent::Downgrade,
            "UPGRADE" => QualityEvent::Upgrade,
            other => QualityEvent::Other(other.to_owned()),
        }
    }

    /// Meta's name, as stored in `channel_state.quality_event`.
    pub fn as_str(&self) -> &str {
        match self {
            QualityEvent::Flagged => "FLAGGED",
            QualityEvent::Unflagged => "UNFLAGGED",
            QualityEvent::Downgrade => "DOWNGRADE",
            QualityEvent::Upgrade => "UPGRADE",
            QualityEvent::Other(other) => other,
        }
    }

    /// What the event makes of `channel_state.quality_flagged`: set, cleared, or left.
    pub fn flagged(&self) -> Option<bool> {
        match self {
            QualityEvent::Flagged | QualityEvent::Downgrade => Some(true),
            QualityEvent::Unflagged | QualityEvent::Upgrade => Some(false),
            QualityEvent::Other(_) => None,
        }
    }
}

pub use crate::account::Tier;

/// A portfolio's messaging limit as a webhook states it
/// (`max_daily_conversations_per_business`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagingLimit {
    /// The tier, when the number is one of Meta's tiers.
    pub tier: Option<Tier>,
    /// Unique recipients per moving 24 h; None is unlimited.
    pub daily_limit: Option<i32>,
}

impl MessagingLimit {
    /// Reads `max_daily_conversations_per_business`: -1 is unlimited, Meta's tier sizes
    /// are their tiers, any other count is kept as the limit without a tier. None for a
    /// number that cannot be a limit (below -1, or beyond what the column holds).
    pub(crate) fn from_max_daily(value: i64) -> Option<Self> {
        let tier = Tier::from_daily_limit(value);
        if tier == Some(Tier::Unlimited) {
            return Some(MessagingLimit { tier, daily_limit: None });
        }
        let daily_limit = i32::try_from(value).ok().filter(|n| *n >= 0)?;
        Some(MessagingLimit { tier, daily_limit: Some(daily_limit) })
    }
}

/// A restriction on business-initiated messaging (`account_update`,
/// `RESTRICTED_BIZ_INITIATED_MESSAGING`): no campaign of the portfolio can be sent
/// until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// Meta's restriction type, stored in `portfolios.restriction`.
    pub kind: String,
    /// When it ends (Meta's `expiration`).
    pub until: DateTime<Utc>,
}

/// A template as Meta's template webhooks name it, within a WABA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateKey {
    /// The WABA id (`entry[].id`).
    pub waba_id: String,
    /// `message_template_name`.
    pub name: String,
    /// `message_template_language`, e.g. `pt_BR`.
    pub language: String,
}

/// What the webhook needs of a Channel to route a signal: the WABA and display number
/// the controller recorded for it, and its portfolio.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChannelRow {
    /// The Channel's name.
    pub channel: String,
    /// Its WABA id, once the controller recorded it.
    pub waba_id: Option<String>,
    /// Its display phone number, as the controller recorded it (any format).
    pub display_phone: Option<String>,
    /// Its business portfolio.
    pub portfolio: Option<String>,
}

/// The organization's channel rows a signal for `waba_id`, posted at `url_channel`'s
/// URL, may concern: those of that WABA, and the URL's own row (the fallback when no
/// channel has recorded that WABA yet).
pub(crate) async fn channel_rows(
    conn: &mut PgConnection,
    organization: &str,
    waba_id: &str,
    url_channel: &str,
) -> Result<Vec<ChannelRow>> {
    let rows = sqlx::query_as::<_, ChannelRow>(
        r#"SELECT channel, waba_id, display_phone, portfolio FROM channel_state
           WHERE organization = $1 AND (waba_id = $2 OR channel = $3)
           ORDER BY channel"#,
    )
    .bind(organization)
    .bind(waba_id)
    .bind(url_channel)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Records a `phone_number_quality_update` on the channels of the number it is about:
/// the event always (senders and status show the latest), and the flag when the event
/// sets or lifts it (see [`QualityEvent::flagged`]). A channel without a row gets one,
/// so a signal that comes before the controller's first write of the channel is kept.
/// Returns the rows written.
pub(crate) async fn record_quality_event(
    conn: &mut PgConnection,
    organization: &str,
    channels: &[String],
    event: &QualityEvent,
) -> Result<u64> {
    let mut channels = channels.to_vec();
    channels.sort_unstable();
    channels.dedup();
    sqlx::query(
        r#"INSERT INTO channel_state (organization, channel)
           SELECT $1, c FROM unnest($2::text[]) AS c ORDER BY c
           ON CONFLICT DO NOTHING"#,
    )
    .bind(organization)
    .bind(&channels)
    .execute(&mut *conn)
    .await?;
    let result = sqlx::query(
        r#"WITH locked AS (
               SELECT channel FROM channel_state WHERE organization = $1 AND channel = ANY($2)
               ORDER BY channel FOR UPDATE
           )
           UPDATE channel_state s SET
               quality_event = $3,
               quality_flagged = coalesce($4, s.quality_flagged),
               quality_changed_at = now(),
               updated_at = now()
           FROM locked l
           WHERE s.organization = $1 AND s.channel = l.channel"#,
    )
    .bind(organization)
    .bind(&channels)
    .bind(event.as_str())
    .bind(event.flagged())
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected())
}

/// Records the messaging limit of `portfolios` as a webhook stated it
/// (`business_capability_update`, or a `phone_number_quality_update` that carries it),
/// creating their rows if needed. When the limit grew, a budget a sender found spent
/// under the old limit has room again: `budget_spent_until` is cleared so senders
/// recount at once instead of waiting for it. A limit that was not known (no row, or a
/// row a sender created) did not grow. Returns the rows written.
pub(crate) async fn record_messaging_limit(
    conn: &mut PgConnection,
    organization: &str,
    portfolios: &[String],
    limit: MessagingLimit,
) -> Result<u64> {
    let mut portfolios = portfolios.to_vec();
    portfolios.sort_unstable();
    portfolios.dedup();
    let result = sqlx::query(
        r#"INSERT INTO portfolios AS p (organization, portfolio, tier, daily_limit, limit_source)
           SELECT $1, v, $3, $4, 'webhook' FROM unnest($2::text[]) AS v ORDER BY v
           ON CONFLICT (organization, portfolio) DO UPDATE SET
               tier = EXCLUDED.tier,
               daily_limit = EXCLUDED.daily_limit,
               limit_source = 'webhook',
               budget_spent_until = CASE
                   WHEN p.daily_limit IS NOT NULL AND (EXCLUDED.daily_limit IS NULL OR EXCLUDED.daily_limit > p.daily_limit)
                   THEN NULL ELSE p.budget_spent_until END,
               updated_at = now()"#,
    )
    .bind(organization)
    .bind(&portfolios)
    .bind(limit.tier.map(Tier::as_str))
    .bind(limit.daily_limit)
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected())
}

/// Records a restriction on business-initiated messaging of `portfolios` (an
/// `account_update` with `RESTRICTED_BIZ_INITIATED_MESSAGING`): senders hold the
/// portfolio's campaigns until it ends rather than have every message refused.
/// Creates the rows if needed. Returns the rows written.
pub(crate) async fn record_restriction(
    conn: &mut PgConnection,
    organization: &str,
    portfolios: &[String],
    restriction: &Restriction,
) -> Result<u64> {
    let mut portfolios = portfolios.to_vec();
    portfolios.sort_unstable();
    portfolios.dedup();
    let result = sqlx::query(
        r#"INSERT INTO portfolios AS p (organization, portfolio, restricted_until, restriction)
           SELECT $1, v, $3, $4 FROM unnest($2::text[]) AS v ORDER BY v
           ON CONFLICT (organization, portfolio) DO UPDATE SET
               restricted_until = EXCLUDED.restricted_until,
               restriction = EXCLUDED.restriction,
               updated_at = now()"#,
    )
    .bind(organization)
    .bind(&portfolios)
    .bind(restriction.until)
    .bind(&restriction.kind)
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected())
}

/// Records a template's status (`message_template_status_update`): a PAUSED or
/// DISABLED template fails every message that uses it (docs/providers.md A2, 132015
/// and 132016), so the controller and senders look here before sending. `reason` is
/// Meta's, None when Meta says `NONE`. The quality already known is kept.
pub(crate) async fn record_template_status(
    conn: &mut PgConnection,
    organization: &str,
    template: &TemplateKey,
    status: &str,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(
        r#"INSERT INTO template_state (organization, waba_id, name, language, status, reason)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (organization, waba_id, name, language) DO UPDATE SET
               status = EXCLUDED.status, reason = EXCLUDED.reason, updated_at = now()"#,
    )
    .bind(organization)
    .bind(&template.waba_id)
    .bind(&template.name)
    .bind(&template.language)
    .bind(status)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a template's quality (`message_template_quality_update`): YELLOW or RED
/// warn that Meta may soon pause it. The status already known is kept (NULL when only
/// the quality is known).
pub(crate) async fn record_template_quality(
    conn: &mut PgConnection,
    organization: &str,
    template: &TemplateKey,
    quality: &str,
) -> Result<()> {
    sqlx::query(
        r#"INSERT INTO template_state (organization, waba_id, name, language, quality)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (organization, waba_id, name, language) DO UPDATE SET
               quality = EXCLUDED.quality, updated_at = now()"#,
    )
    .bind(organization)
    .bind(&template.waba_id)
    .bind(&template.name)
    .bind(&template.language)
    .bind(quality)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_events_set_lift_or_leave_the_flag() {
        for (name, flagged) in [
            ("FLAGGED", Some(true)),
            ("DOWNGRADE", Some(true)),
            ("UNFLAGGED", Some(false)),
            ("UPGRADE", Some(false)),
            ("ONBOARDING", None),
            ("THROUGHPUT_UPGRADE", None),
        ] {
            let event = QualityEvent::parse(name);
            assert_eq!(event.flagged(), flagged, "{name}");
            assert_eq!(event.as_str(), name, "stored as Meta named it");
        }
    }

    #[test]
    fn limits_map_to_tiers() {
        let limit = |tier, daily_limit| Some(MessagingLimit { tier, daily_limit });
        assert_eq!(MessagingLimit::from_max_daily(250), limit(Some(Tier::Tier250), Some(250)));
        assert_eq!(MessagingLimit::from_max_daily(2_000), limit(Some(Tier::Tier2K), Some(2_000)));
        assert_eq!(MessagingLimit::from_max_daily(10_000), limit(Some(Tier::Tier10K), Some(10_000)));
        assert_eq!(MessagingLimit::from_max_daily(100_000), limit(Some(Tier::Tier100K), Some(100_000)));
        assert_eq!(MessagingLimit::from_max_daily(-1), limit(Some(Tier::Unlimited), None));
        assert_eq!(MessagingLimit::from_max_daily(1_000), limit(None, Some(1_000)), "not a tier: kept as a number");
        assert_eq!(MessagingLimit::from_max_daily(0), limit(None, Some(0)));
        assert_eq!(MessagingLimit::from_max_daily(-2), None);
        assert_eq!(MessagingLimit::from_max_daily(i64::from(i32::MAX) + 1), None);
        assert_eq!(Tier::Unlimited.as_str(), "TIER_UNLIMITED");
        assert_eq!(Tier::Tier2K.as_str(), "TIER_2K");
    }
}
