//! What is known of a channel's WhatsApp account, as Postgres keeps it: the number's
//! identity and quality, its portfolio's messaging limit and restriction, the status of
//! templates, and the portfolio's 24 h unique-recipient budget that every sender of the
//! portfolio's channels keeps together (the decisions are in [`crate::account`]).
//!
//! The controller writes what it reads from the Graph API and the Channel spec; the
//! webhook service writes what Meta's account webhooks say (`store::signals`); senders
//! read it every second and count recipients in the budget.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::Result;
use crate::account::{self, Admission, BUDGET_WINDOW, Signals, Tier};

/// How the controller identifies a channel's number to the webhook service, which
/// routes account webhooks by WABA id and display phone number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NumberIdentity {
    /// The business portfolio (spec.meta.businessPortfolio).
    pub portfolio: Option<String>,
    /// The WhatsApp Business Account id (spec.meta.wabaId).
    pub waba_id: Option<String>,
    /// The number as Meta displays it (digits), when the Graph API said.
    pub display_phone: Option<String>,
}

/// Records the channel's number identity, and makes sure its portfolio has a row (the
/// budget's lock).
pub(crate) async fn observe_number(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    id: &NumberIdentity,
) -> Result<()> {
    sqlx::query(
        r#"INSERT INTO channel_state AS s (organization, channel, portfolio, waba_id, display_phone) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (organization, channel) DO UPDATE SET
               portfolio = EXCLUDED.portfolio, waba_id = EXCLUDED.waba_id,
               display_phone = coalesce(EXCLUDED.display_phone, s.display_phone), updated_at = now()
           WHERE (s.portfolio, s.waba_id) IS DISTINCT FROM (EXCLUDED.portfolio, EXCLUDED.waba_id)
              OR (EXCLUDED.display_phone IS NOT NULL AND s.display_phone IS DISTINCT FROM EXCLUDED.display_phone)"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(&id.portfolio)
    .bind(&id.waba_id)
    .bind(&id.display_phone)
    .execute(pool)
    .await?;
    if let Some(portfolio) = &id.portfolio {
        sqlx::query("INSERT INTO portfolios (organization, portfolio) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(organization)
            .bind(portfolio)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// What the Graph API says of a number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NumberReading {
    /// The portfolio's tier (`whatsapp_business_manager_messaging_limit`).
    pub tier: Option<Tier>,
    /// `quality_rating`.
    pub quality_rating: Option<String>,
    /// `throughput.level`.
    pub throughput_level: Option<String>,
}

/// Records a Graph API reading: the number's quality and throughput, and its portfolio's
/// tier. A limit that grew lifts a spent budget at once.
pub(crate) async fn record_reading(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    portfolio: Option<&str>,
    reading: &NumberReading,
) -> Result<()> {
    sqlx::query(
        r#"UPDATE channel_state SET quality_rating = $3, throughput_level = $4, updated_at = now()
           WHERE organization = $1 AND channel = $2
             AND (quality_rating, throughput_level) IS DISTINCT FROM ($3, $4)"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(&reading.quality_rating)
    .bind(&reading.throughput_level)
    .execute(pool)
    .await?;
    if let (Some(portfolio), Some(tier)) = (portfolio, reading.tier) {
        set_tier(pool, organization, portfolio, tier, "graph").await?;
    }
    Ok(())
}

/// Sets a portfolio's tier (from `source`: `graph` or `webhook`).
pub(crate) async fn set_tier(
    pool: &PgPool,
    organization: &str,
    portfolio: &str,
    tier: Tier,
    source: &str,
) -> Result<()> {
    sqlx::query(
        r#"INSERT INTO portfolios AS p (organization, portfolio, tier, daily_limit, limit_source) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (organization, portfolio) DO UPDATE SET
               tier = EXCLUDED.tier, daily_limit = EXCLUDED.daily_limit, limit_source = EXCLUDED.limit_source,
               budget_spent_until = CASE WHEN EXCLUDED.daily_limit IS NULL OR EXCLUDED.daily_limit > coalesce(p.daily_limit, 0)
                                         THEN NULL ELSE p.budget_spent_until END,
               updated_at = now()
           WHERE p.tier IS DISTINCT FROM EXCLUDED.tier"#,
    )
    .bind(organization)
    .bind(portfolio)
    .bind(tier.as_str())
    .bind(tier.daily_limit())
    .bind(source)
    .execute(pool)
    .await?;
    Ok(())
}

/// What a channel's status shows of its account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountView {
    /// Quality as polled.
    pub quality_rating: Option<String>,
    /// Last quality event.
    pub quality_event: Option<String>,
    /// FLAGGED or DOWNGRADE in force.
    pub quality_flagged: bool,
    /// STANDARD or HIGH.
    pub throughput_level: Option<String>,
    /// The portfolio, if the channel names one.
    pub portfolio: Option<String>,
    /// Its tier as known (None: not known yet; the budget assumes [`Tier::ASSUMED`]).
    pub tier: Option<String>,
    /// The limit the budget keeps (None: unlimited).
    pub daily_limit: Option<i64>,
    /// A restriction of business-initiated messaging in force until then.
    pub restricted_until: Option<DateTime<Utc>>,
    /// The budget is spent until then.
    pub budget_spent_until: Option<DateTime<Utc>>,
}

impl AccountView {
    /// The signals a campaign's hold decision needs (its template's status apart).
    pub fn signals(&self) -> Signals {
        Signals {
            quality_flagged: self.quality_flagged,
            quality_event: self.quality_event.clone(),
            quality_rating: self.quality_rating.clone(),
            template_status: None,
            restricted_until: self.restricted_until,
        }
    }
}

type AccountRow = (
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// The channel's account as known now (a channel never observed reads as empty).
pub async fn account(pool: &PgPool, organization: &str, channel: &str) -> Result<AccountView> {
    let mut db = super::Autocommit::open(pool).await?;
    let row: Option<AccountRow> = sqlx::query_as(
        r#"SELECT s.quality_rating, s.quality_event, s.quality_flagged, s.throughput_level, s.portfolio,
                  p.tier, p.daily_limit, p.restricted_until, p.budget_spent_until
           FROM channel_state s
           LEFT JOIN portfolios p ON p.organization = s.organization AND p.portfolio = s.portfolio
           WHERE s.organization = $1 AND s.channel = $2"#,
    )
    .bind(organization)
    .bind(channel)
    .fetch_optional(db.conn())
    .await?;
    db.commit().await?;
    let Some((
        quality_rating,
        quality_event,
        quality_flagged,
        throughput_level,
        portfolio,
        tier,
        limit,
        restricted,
        spent,
    )) = row
    else {
        return Ok(AccountView::default());
    };
    let daily_limit = match (&portfolio, &tier) {
        (None, _) => None,
        (Some(_), None) => Tier::ASSUMED.daily_limit(),
        (Some(_), Some(_)) => limit.map(i64::from),
    };
    let now = Utc::now();
    Ok(AccountView {
        quality_rating,
        quality_event,
        quality_flagged,
        throughput_level,
        portfolio,
        tier,
        daily_limit,
        restricted_until: restricted.filter(|until| *until > now),
        budget_spent_until: spent.filter(|until| *until > now),
    })
}

/// The channel's signals for a campaign sending `template` (name, language), if a template.
pub async fn signals(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    template: Option<(&str, &str)>,
) -> Result<(AccountView, Signals)> {
    let view = account(pool, organization, channel).await?;
    let mut signals = view.signals();
    if let Some((name, language)) = template {
        let mut db = super::Autocommit::open(pool).await?;
        signals.template_status = sqlx::query_as::<_, (String, Option<String>)>(
            r#"SELECT t.status, t.reason FROM template_state t
               JOIN channel_state s ON s.organization = t.organization AND s.waba_id = t.waba_id
               WHERE s.organization = $1 AND s.channel = $2 AND t.name = $3 AND t.language = $4 AND t.status IS NOT NULL"#,
        )
        .bind(organization)
        .bind(channel)
        .bind(name)
        .bind(language)
        .fetch_optional(db.conn())
        .await?;
        db.commit().await?;
    }
    Ok((view, signals))
}

/// Records Meta's refusal of a template (132015 paused, 132016 disabled) as the
/// template's status on the channel's WABA, as the status webhook would. A status the
/// webhook already recorded is kept (with its reason). Returns false when the channel's
/// WABA is not known (the Channel names no `wabaId`): then nothing lifts it by itself.
pub(crate) async fn record_template_refusal(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    template: (&str, &str),
    status: &str,
) -> Result<bool> {
    let mut db = super::Autocommit::open(pool).await?;
    let result = sqlx::query(
        r#"INSERT INTO template_state (organization, waba_id, name, language, status)
           SELECT organization, waba_id, $3, $4, $5 FROM channel_state
           WHERE organization = $1 AND channel = $2 AND waba_id IS NOT NULL
           ON CONFLICT (organization, waba_id, name, language) DO UPDATE SET
               status = EXCLUDED.status, reason = NULL, updated_at = now()
           WHERE template_state.status IS DISTINCT FROM EXCLUDED.status"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(template.0)
    .bind(template.1)
    .bind(status)
    .execute(db.conn())
    .await?;
    if result.rows_affected() > 0 {
        db.commit().await?;
        return Ok(true);
    }
    let known: Option<(Option<String>,)> =
        sqlx::query_as("SELECT waba_id FROM channel_state WHERE organization = $1 AND channel = $2")
            .bind(organization)
            .bind(channel)
            .fetch_optional(db.conn())
            .await?;
    db.commit().await?;
    Ok(known.is_some_and(|(waba,)| waba.is_some()))
}

/// The quality score Meta last gave a template on the channel's WABA, if any.
pub(crate) async fn template_quality(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    name: &str,
    language: &str,
) -> Result<Option<String>> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        r#"SELECT t.quality FROM template_state t
           JOIN channel_state s ON s.organization = t.organization AND s.waba_id = t.waba_id
           WHERE s.organization = $1 AND s.channel = $2 AND t.name = $3 AND t.language = $4"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(name)
    .bind(language)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(quality,)| quality))
}

/// A portfolio's budget use now: recipients counted in the window and when the oldest
/// leaves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BudgetUse {
    /// Unique recipients in the last 24 h.
    pub used: i64,
    /// When the oldest of them leaves the window.
    pub resets_at: Option<DateTime<Utc>>,
}

/// How much of the portfolio's budget the last 24 h used.
pub(crate) async fn budget_use(pool: &PgPool, organization: &str, portfolio: &str) -> Result<BudgetUse> {
    let (used, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        r#"SELECT count(*), min(last_sent_at) FROM portfolio_recipients
           WHERE organization = $1 AND portfolio = $2 AND last_sent_at > now() - interval '24 hours'"#,
    )
    .bind(organization)
    .bind(portfolio)
    .fetch_one(pool)
    .await?;
    Ok(BudgetUse { used, resets_at: oldest.map(|t| t + BUDGET_WINDOW) })
}

/// Keeps a portfolio's spent mark true: lifted when the window has room again (time
/// passed, or a higher tier), moved to the new reset instant otherwise. Also forgets
/// recipients that left the window. Returns the budget's use now.
pub(crate) async fn refresh_budget(
    pool: &PgPool,
    organization: &str,
    portfolio: &str,
    limit: Option<i64>,
) -> Result<BudgetUse> {
    sqlx::query(
        "DELETE FROM portfolio_recipients WHERE organization = $1 AND portfolio = $2 AND last_sent_at <= now() - interval '24 hours'",
    )
    .bind(organization)
    .bind(portfolio)
    .execute(pool)
    .await?;
    let usage = budget_use(pool, organization, portfolio).await?;
    let spent_until = match limit {
        Some(limit) if usage.used >= limit => usage.resets_at,
        _ => None,
    };
    sqlx::query(
        r#"UPDATE portfolios SET budget_spent_until = $3, updated_at = now()
           WHERE organization = $1 AND portfolio = $2 AND budget_spent_until IS DISTINCT FROM $3"#,
    )
    .bind(organization)
    .bind(portfolio)
    .bind(spent_until)
    .execute(pool)
    .await?;
    Ok(usage)
}

/// Counts `recipients` in the portfolio's budget, as far as it has room, under the
/// portfolio row's lock so that every sender of every channel of the portfolio sees the
/// same count. Returns which were admitted; the others must not be sent now. A refusal
/// marks the budget spent until the oldest counted recipient leaves the window, which
/// the controller shows as `RateLimited` with that `resumeAt`.
pub(crate) async fn admit(
    pool: &PgPool,
    organization: &str,
    portfolio: &str,
    recipients: &[&str],
) -> Result<Admission> {
    let mut tx = super::begin(pool).await?;
    sqlx::query("INSERT INTO portfolios (organization, portfolio) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(organization)
        .bind(portfolio)
        .execute(&mut *tx)
        .await?;
    let (tier, limit, now): (Option<String>, Option<i32>, DateTime<Utc>) = sqlx::query_as(
        "SELECT tier, daily_limit, now() FROM portfolios WHERE organization = $1 AND portfolio = $2 FOR UPDATE",
    )
    .bind(organization)
    .bind(portfolio)
    .fetch_one(&mut *tx)
    .await?;
    let limit = if tier.is_none() { Tier::ASSUMED.daily_limit() } else { limit.map(i64::from) };
    let (counted, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        r#"SELECT count(*), min(last_sent_at) FROM portfolio_recipients
           WHERE organization = $1 AND portfolio = $2 AND last_sent_at > $3"#,
    )
    .bind(organization)
    .bind(portfolio)
    .bind(now - BUDGET_WINDOW)
    .fetch_one(&mut *tx)
    .await?;
    let wanted: Vec<String> = recipients.iter().map(|r| (*r).to_owned()).collect();
    let already: Vec<(String,)> = sqlx::query_as(
        r#"SELECT recipient FROM portfolio_recipients
           WHERE organization = $1 AND portfolio = $2 AND recipient = ANY($3) AND last_sent_at > $4"#,
    )
    .bind(organization)
    .bind(portfolio)
    .bind(&wanted)
    .bind(now - BUDGET_WINDOW)
    .fetch_all(&mut *tx)
    .await?;
    let already: HashSet<&str> = already.iter().map(|(r,)| r.as_str()).collect();
    let admission = account::admit(limit, counted, oldest, &already, recipients, now);
    let admitted: Vec<String> = recipients
        .iter()
        .zip(&admission.admitted)
        .filter(|(_, ok)| **ok)
        .map(|(r, _)| (*r).to_owned())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !admitted.is_empty() {
        sqlx::query(
            r#"INSERT INTO portfolio_recipients (organization, portfolio, recipient, last_sent_at)
               SELECT $1, $2, r, $4 FROM unnest($3::text[]) AS r
               ON CONFLICT (organization, portfolio, recipient) DO UPDATE SET last_sent_at = EXCLUDED.last_sent_at"#,
        )
        .bind(organization)
        .bind(portfolio)
        .bind(&admitted)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(until) = admission.blocked_until {
        sqlx::query("UPDATE portfolios SET budget_spent_until = $3, updated_at = now() WHERE organization = $1 AND portfolio = $2")
            .bind(organization)
            .bind(portfolio)
            .bind(until)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(admission)
}
