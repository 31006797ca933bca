//! What a campaign costs: Meta sends each delivered message's pricing category, never
//! an amount, so the controller applies the rate card to the delivered billable
//! messages (docs/providers.md, "Pricing in status webhooks").

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Context, Result};
use crate::account::{Cost, RateCard, days_needed};
use crate::api::CostStatus;
use crate::store;

/// How often a campaign's cost is recomputed while it runs.
pub(crate) const EVERY: Duration = Duration::from_secs(20);

/// The rate card, if one is configured and readable. A card that cannot be read is
/// logged and treated as none: costs are an estimate, sending does not depend on them.
pub(crate) fn rate_card(ctx: &Context) -> Option<RateCard> {
    let path = ctx.rate_card.as_ref()?;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "the rate card cannot be read; costs are not estimated");
            return None;
        }
    };
    match RateCard::parse(&text) {
        Ok(card) => Some(card),
        Err(error) => {
            tracing::warn!(error = %crate::telemetry::chain(&error), path = %path.display(), "the rate card is not valid; costs are not estimated");
            None
        }
    }
}

/// Whether the campaign's cost is due for a recomputation (and marks it done).
fn due(ctx: &Context, campaign: Uuid, force: bool) -> bool {
    let Ok(mut costed) = ctx.costed_at.lock() else { return true };
    let due = force || costed.get(&campaign).is_none_or(|at| at.elapsed() >= EVERY);
    if due {
        costed.insert(campaign, Instant::now());
    }
    due
}

/// The campaign's cost now, or None when not due (keep the one in status) or no card.
pub(crate) async fn refresh(ctx: &Context, campaign: Uuid, finished: bool) -> Result<Option<CostStatus>> {
    if !due(ctx, campaign, finished) {
        return Ok(None);
    }
    let Some(card) = rate_card(ctx) else { return Ok(None) };
    let rows = store::campaigns::billable_by_prefix(&ctx.pool, campaign).await?;
    let cost = card.cost(rows.iter().map(|(category, prefix, n)| (category.as_str(), prefix.as_str(), *n)));
    Ok(Some(status_of(&card, &cost)))
}

/// A cost as the campaign's status shows it.
pub fn status_of(card: &RateCard, cost: &Cost) -> CostStatus {
    CostStatus {
        estimated: cost.total,
        currency: card.currency.clone(),
        by_category: cost.by_category.clone(),
        billable_messages: cost.messages,
        unpriced_messages: cost.unpriced,
        rate_card_version: card.version.clone(),
    }
}

/// What the audience would cost if every message were delivered, with the card.
pub(crate) async fn estimate(
    ctx: &Context,
    organization: &str,
    audience: &store::audience::AudienceQuery,
    category: &str,
) -> Result<Option<(RateCard, Cost)>> {
    let Some(card) = rate_card(ctx) else { return Ok(None) };
    let rows = store::audience::size_by_prefix(&ctx.pool, organization, audience).await?;
    let cost = card.cost(rows.iter().map(|(prefix, n)| (category, prefix.as_str(), *n)));
    Ok(Some((card, cost)))
}

/// "needs 5 days at TIER_2K": how long the portfolio's messaging limit makes an
/// audience take.
pub(crate) fn messaging_limit_note(recipients: i64, tier: Option<&str>, limit: Option<i64>) -> String {
    let tier = tier.unwrap_or("TIER_250 (assumed until Meta says)");
    match days_needed(recipients, limit) {
        0 | 1 => format!("fits in one day at {tier}"),
        days => format!("needs {days} days at {tier}"),
    }
}
