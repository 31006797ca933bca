//! A Meta Channel's account, as its status shows it: the Graph API's reading of the
//! number (tier, quality, throughput), polled every few minutes; what the account
//! webhooks said since (kept in Postgres by the webhook service); and the portfolio's
//! 24 h unique-recipient budget (docs/providers.md, "Account health signals").

use std::time::Duration;

use chrono::Utc;

use super::{Context, Result};
use crate::account::Tier;
use crate::api::condition::{ConditionType, DesiredCondition};
use crate::api::{AccountStatus, Channel, PortfolioBudget, time};
use crate::providers::meta::MetaClient;
use crate::store::account::{self as store, NumberIdentity, NumberReading};

/// How often the Graph API is read for a number's tier and quality. Changes between
/// readings arrive by webhook.
const POLL_EVERY: Duration = Duration::from_secs(300);

/// What the account adds to a Channel's status.
pub(crate) struct Observed {
    /// The status block.
    pub status: AccountStatus,
    /// `QualityDegraded`.
    pub condition: DesiredCondition,
}

/// Observes a Meta channel's account: polls the Graph API when due, records the
/// number's identity for the webhook's routing, keeps the portfolio's budget mark true.
pub async fn observe(
    channel: &Channel,
    ctx: &Context,
    namespace: &str,
    organization: &str,
    name: &str,
    old: Option<&AccountStatus>,
) -> Result<Option<Observed>> {
    let Some(meta) = &channel.spec.meta else { return Ok(None) };
    let mut status = old.cloned().unwrap_or_default();
    let due = status.checked_at.as_ref().is_none_or(|at| {
        Utc::now() - time::instant(&at.0) >= chrono::Duration::from_std(POLL_EVERY).unwrap_or_default()
    });
    let mut display_phone = None;
    let mut reading = None;
    if due {
        status.checked_at = Some(time::k8s(Utc::now()));
        match read_graph(channel, ctx, namespace).await? {
            Ok(health) => {
                status.check_error = None;
                display_phone = health.display_phone_number.as_deref().map(digits);
                reading = Some(NumberReading {
                    tier: health.whatsapp_business_manager_messaging_limit.as_deref().and_then(Tier::parse),
                    quality_rating: health.quality_rating.clone(),
                    throughput_level: health.throughput.as_ref().and_then(|t| t.level.clone()),
                });
            }
            Err(why) => status.check_error = Some(why),
        }
    }
    // The identity first: a reading's tier lands on the portfolio row it makes sure of.
    let id =
        NumberIdentity { portfolio: meta.business_portfolio.clone(), waba_id: meta.waba_id.clone(), display_phone };
    store::observe_number(&ctx.pool, organization, name, &id).await?;
    if let Some(reading) = &reading {
        store::record_reading(&ctx.pool, organization, name, meta.business_portfolio.as_deref(), reading).await?;
    }
    let view = store::account(&ctx.pool, organization, name).await?;
    status.quality_rating = view.quality_rating.clone();
    status.quality_event = view.quality_event.clone();
    status.throughput_level = view.throughput_level.clone();
    status.restricted_until = view.restricted_until.map(time::k8s);
    status.tier = view.tier.clone();
    status.budget = match &view.portfolio {
        Some(portfolio) => {
            let usage = store::refresh_budget(&ctx.pool, organization, portfolio, view.daily_limit).await?;
            Some(PortfolioBudget {
                portfolio: portfolio.clone(),
                limit: view.daily_limit,
                used_24h: usage.used,
                resets_at: usage.resets_at.map(time::k8s),
            })
        }
        None => None,
    };
    let condition = match view.signals().quality_degraded() {
        Some(signal) => DesiredCondition::truthy(
            ConditionType::QualityDegraded,
            "QualityDegraded",
            format!(
                "Meta rates the number's quality low ({signal}); with spec.qualityPolicy {:?} its marketing campaigns {}",
                channel.spec.quality_policy,
                match channel.spec.quality_policy {
                    crate::api::QualityPolicy::Pause => "pause until it recovers",
                    crate::api::QualityPolicy::Slow => "send at half the caps",
                    crate::api::QualityPolicy::Ignore => "go on as before",
                }
            ),
        ),
        None => DesiredCondition::falsy(ConditionType::QualityDegraded, "QualityOk", "Meta has not flagged the number"),
    };
    Ok(Some(Observed { status, condition }))
}

fn digits(phone: &str) -> String {
    phone.chars().filter(char::is_ascii_digit).collect()
}

/// Reads the number from the Graph API. A failure to read is the channel's status to
/// show (`checkError`), not a reconcile error: sending does not depend on it.
async fn read_graph(
    channel: &Channel,
    ctx: &Context,
    namespace: &str,
) -> Result<std::result::Result<crate::providers::meta::NumberHealth, String>> {
    let Some(meta) = &channel.spec.meta else { return Ok(Err("not a Meta channel".into())) };
    let Some(token) = super::channel::secret_value(ctx, namespace, &meta.access_token).await? else {
        return Ok(Err("the access token cannot be read (see the Ready condition)".into()));
    };
    let client = MetaClient::new(
        ctx.http.clone(),
        meta.base_url.clone(),
        meta.api_version.clone(),
        meta.phone_number_id.clone(),
        crate::providers::Secret::new(token),
    );
    Ok(client.number_health().await.map_err(|error| crate::telemetry::chain(&error)))
}
