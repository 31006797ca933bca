//! What Meta says about a WhatsApp account, and what it means for a campaign: the
//! portfolio's messaging limit (a 24 h unique-recipient budget), the number's quality,
//! a template's status, a restriction on business-initiated messaging, and what the
//! delivered messages cost with a rate card (docs/providers.md, "Account health
//! signals"). Pure: the store reads and writes the state, the sender and the controller
//! act on these decisions.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

use crate::api::{QualityPolicy, TemplateCategory};
use crate::store::rate::Limits;

/// The moving window of Meta's messaging limit.
pub(crate) const BUDGET_WINDOW: Duration = Duration::hours(24);

/// A business portfolio's messaging limit tier, named as Graph's
/// `whatsapp_business_manager_messaging_limit` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize)]
pub enum Tier {
    /// 50 unique recipients per 24 h (Meta lists it for restricted portfolios).
    #[serde(rename = "TIER_50")]
    Tier50,
    /// 250 unique recipients per 24 h (a new portfolio).
    #[serde(rename = "TIER_250")]
    Tier250,
    /// 2,000.
    #[serde(rename = "TIER_2K")]
    Tier2K,
    /// 10,000.
    #[serde(rename = "TIER_10K")]
    Tier10K,
    /// 100,000.
    #[serde(rename = "TIER_100K")]
    Tier100K,
    /// No limit. The default of a simulated account; Disparo itself never takes an
    /// unknown tier for unlimited (see [`Tier::ASSUMED`]).
    #[default]
    #[serde(rename = "TIER_UNLIMITED")]
    Unlimited,
}

impl Tier {
    /// The tier a portfolio is assumed to have until Meta says otherwise: the lowest,
    /// so an unknown tier never lets Disparo exceed the real one.
    pub(crate) const ASSUMED: Tier = Tier::Tier250;

    /// Parses Graph's `whatsapp_business_manager_messaging_limit`.
    pub fn parse(name: &str) -> Option<Tier> {
        Some(match name {
            "TIER_50" => Tier::Tier50,
            "TIER_250" => Tier::Tier250,
            "TIER_2K" => Tier::Tier2K,
            "TIER_10K" => Tier::Tier10K,
            "TIER_100K" => Tier::Tier100K,
            "TIER_UNLIMITED" => Tier::Unlimited,
            _ => return None,
        })
    }

    /// The name Graph uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Tier50 => "TIER_50",
            Tier::Tier250 => "TIER_250",
            Tier::Tier2K => "TIER_2K",
            Tier::Tier10K => "TIER_10K",
            Tier::Tier100K => "TIER_100K",
            Tier::Unlimited => "TIER_UNLIMITED",
        }
    }

    /// Unique recipients per moving 24 h (None: unlimited).
    pub fn daily_limit(self) -> Option<i64> {
        match self {
            Tier::Tier50 => Some(50),
            Tier::Tier250 => Some(250),
            Tier::Tier2K => Some(2_000),
            Tier::Tier10K => Some(10_000),
            Tier::Tier100K => Some(100_000),
            Tier::Unlimited => None,
        }
    }

    /// The limit as webhooks carry it (`max_daily_conversations_per_business`, -1 is unlimited).
    pub(crate) fn max_daily_conversations(self) -> i64 {
        self.daily_limit().unwrap_or(-1)
    }

    /// The tier of a `max_daily_conversations_per_business` value (-1: unlimited).
    pub(crate) fn from_daily_limit(limit: i64) -> Option<Tier> {
        Some(match limit {
            -1 => Tier::Unlimited,
            50 => Tier::Tier50,
            250 => Tier::Tier250,
            2_000 => Tier::Tier2K,
            10_000 => Tier::Tier10K,
            100_000 => Tier::Tier100K,
            _ => return None,
        })
    }
}

/// What the budget allows of one block of recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admission {
    /// For each wanted recipient, in order: may it be messaged now.
    pub admitted: Vec<bool>,
    /// When some were refused: when the budget has room again (the oldest counted
    /// recipient leaves the window).
    pub blocked_until: Option<DateTime<Utc>>,
}

/// Decides which of `wanted` the portfolio's budget admits at `now`. A recipient
/// already counted in the window is free (Meta counts unique recipients); a new one
/// needs room under `limit`. `counted` is the number of recipients in the window and
/// `oldest` the earliest last-send among them.
pub(crate) fn admit(
    limit: Option<i64>,
    counted: i64,
    oldest: Option<DateTime<Utc>>,
    already: &HashSet<&str>,
    wanted: &[&str],
    now: DateTime<Utc>,
) -> Admission {
    let Some(limit) = limit else { return Admission { admitted: vec![true; wanted.len()], blocked_until: None } };
    let mut room = (limit - counted).max(0);
    let mut taken: HashSet<&str> = HashSet::new();
    let mut refused = false;
    let admitted = wanted
        .iter()
        .map(|recipient| {
            if already.contains(recipient) || taken.contains(recipient) {
                return true;
            }
            if room > 0 {
                room -= 1;
                taken.insert(recipient);
                true
            } else {
                refused = true;
                false
            }
        })
        .collect();
    // With nothing counted yet the window cannot be full; a full window always has an oldest.
    let blocked_until = refused.then(|| oldest.unwrap_or(now) + BUDGET_WINDOW);
    Admission { admitted, blocked_until }
}

/// Why Meta's signals hold a campaign back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The number's quality is degraded and the channel's policy pauses marketing.
    QualityDegraded {
        /// What Meta said (FLAGGED, DOWNGRADE, or a RED rating).
        signal: String,
    },
    /// Meta paused, disabled or rejected the campaign's template.
    TemplateHeld {
        /// PAUSED, DISABLED or REJECTED.
        status: String,
        /// Meta's reason, if given.
        reason: Option<String>,
    },
    /// Business-initiated messaging is restricted until the instant.
    Restricted {
        /// When the restriction expires.
        until: DateTime<Utc>,
    },
}

impl Hold {
    /// The condition reason a campaign shows.
    pub fn reason(&self) -> &'static str {
        match self {
            Hold::QualityDegraded { .. } => "QualityDegraded",
            Hold::TemplateHeld { .. } => "TemplatePaused",
            Hold::Restricted { .. } => "AccountRestricted",
        }
    }

    /// When the hold ends by itself, if Meta said.
    pub fn until(&self) -> Option<DateTime<Utc>> {
        match self {
            Hold::Restricted { until } => Some(*until),
            _ => None,
        }
    }

    /// What a person reads.
    pub fn message(&self) -> String {
        match self {
            Hold::QualityDegraded { signal } => format!(
                "Meta rates the number's quality low ({signal}): marketing messages are held until it recovers (UNFLAGGED or UPGRADE), so the number is not downgraded further; the channel's spec.qualityPolicy decides this"
            ),
            Hold::TemplateHeld { status, reason } => format!(
                "Meta set the campaign's template to {status}{}: the campaign waits until Meta approves it again",
                reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            ),
            Hold::Restricted { until } => format!(
                "Meta restricted business-initiated messaging for the portfolio until {}: the campaign resumes then",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        }
    }
}

/// What is known of the account, as the hold decision needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// A FLAGGED or DOWNGRADE event not lifted yet.
    pub quality_flagged: bool,
    /// The last quality event.
    pub quality_event: Option<String>,
    /// The polled rating (GREEN, YELLOW, RED, UNKNOWN).
    pub quality_rating: Option<String>,
    /// The campaign's template status as Meta last announced it, and its reason.
    pub template_status: Option<(String, Option<String>)>,
    /// A restriction on business-initiated messaging in force until the instant.
    pub restricted_until: Option<DateTime<Utc>>,
}

impl Signals {
    /// Whether the number's quality is degraded, and the signal that says so.
    pub(crate) fn quality_degraded(&self) -> Option<String> {
        if self.quality_flagged {
            return Some(self.quality_event.clone().unwrap_or_else(|| "FLAGGED".into()));
        }
        (self.quality_rating.as_deref() == Some("RED")).then(|| "quality rating RED".to_owned())
    }
}

/// Template statuses under which Meta refuses to send the template.
const HELD_TEMPLATE_STATUSES: [&str; 3] = ["PAUSED", "DISABLED", "REJECTED"];

/// Whether Meta's signals hold back a campaign sending `category` (None: a text
/// message, which is neither a template nor marketing) on a channel with `policy`.
pub fn hold(
    signals: &Signals,
    policy: QualityPolicy,
    category: Option<TemplateCategory>,
    now: DateTime<Utc>,
) -> Option<Hold> {
    if let Some(until) = signals.restricted_until.filter(|until| *until > now)
        && category.is_some()
    {
        return Some(Hold::Restricted { until });
    }
    if let Some((status, reason)) = &signals.template_status
        && HELD_TEMPLATE_STATUSES.contains(&status.as_str())
    {
        return Some(Hold::TemplateHeld { status: status.clone(), reason: reason.clone() });
    }
    if policy == QualityPolicy::Pause
        && category == Some(TemplateCategory::Marketing)
        && let Some(signal) = signals.quality_degraded()
    {
        return Some(Hold::QualityDegraded { signal });
    }
    None
}

/// The caps a marketing campaign keeps on a degraded number under the `Slow` policy:
/// half of each cap, and twice the spacing.
pub(crate) fn slowed(limits: &Limits) -> Limits {
    let half = |cap: Option<u32>| cap.map(|c| (c / 2).max(1));
    Limits {
        per_minute: half(limits.per_minute).or(Some(10)),
        per_hour: half(limits.per_hour),
        per_day: half(limits.per_day),
        mode: limits.mode,
        min_interval: limits.min_interval * 2,
    }
}

/// Whether a campaign sending `category` slows down on a degraded number.
pub(crate) fn slows_down(signals: &Signals, policy: QualityPolicy, category: Option<TemplateCategory>) -> bool {
    policy == QualityPolicy::Slow
        && category == Some(TemplateCategory::Marketing)
        && signals.quality_degraded().is_some()
}

/// Meta's per-user marketing limit, "not delivered to maintain healthy ecosystem
/// engagement" (docs/providers.md A6): Meta declined the message for now, not for good.
pub(crate) const MARKETING_LIMIT_CODE: &str = "131049";

/// Meta's per-user marketing limit (131049) puts a message back this many times, after
/// 24 h, 48 h, 96 h; the next one fails it.
pub(crate) const MARKETING_REQUEUES: i16 = 3;

/// When a message withheld by Meta's per-user marketing limit is due again, given how
/// many times it was already put back for it: 24 h after `now`, then 48 h, then 96 h, as
/// Meta advises growing delays; None after three requeues, when it fails like any other
/// permanent error. One rule for the asynchronous 131049 (a `failed` status webhook) and
/// the synchronous one (a send's answer), so both count against the same requeues.
pub(crate) fn marketing_requeue_at(requeues: i16, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let done = u32::try_from(requeues).ok().filter(|n| *n < MARKETING_REQUEUES as u32)?;
    now.checked_add_signed(Duration::hours(24 << done))
}

/// A price list: what Meta charges per delivered billable message, by pricing category
/// and the recipient's country calling code, in one currency. Shipped as a ConfigMap.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RateCard {
    /// A version people recognise (e.g. the date of Meta's price list).
    pub version: String,
    /// ISO 4217.
    pub currency: String,
    /// category → calling code (digits, or `default`) → price per message.
    pub rates: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Why a rate card cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RateCardError {
    /// Not YAML of the expected shape.
    #[error("the rate card is not valid")]
    Parse(#[source] serde_yaml::Error),
    /// A price is negative or not a number.
    #[error("the rate card's price for {category}/{code} is {price}, not a price")]
    Price {
        /// Category.
        category: String,
        /// Calling code.
        code: String,
        /// The value.
        price: f64,
    },
}

impl RateCard {
    /// Parses a rate card (the ConfigMap's `rates.yaml`).
    pub fn parse(text: &str) -> Result<RateCard, RateCardError> {
        let card: RateCard = serde_yaml::from_str(text).map_err(RateCardError::Parse)?;
        for (category, codes) in &card.rates {
            for (code, price) in codes {
                if !price.is_finite() || *price < 0.0 {
                    return Err(RateCardError::Price { category: category.clone(), code: code.clone(), price: *price });
                }
            }
        }
        Ok(card)
    }

    /// The price of one message of `category` to `phone` (E.164, with or without `+`):
    /// the longest calling code of the card the number starts with, else the category's
    /// `default`. None: the card has no price for it.
    pub(crate) fn price(&self, category: &str, phone: &str) -> Option<f64> {
        let codes = self.rates.get(category)?;
        let digits = phone.trim_start_matches('+');
        (1..=3)
            .rev()
            .filter_map(|len| digits.get(..len))
            .find_map(|prefix| codes.get(prefix))
            .or_else(|| codes.get("default"))
            .copied()
    }

    /// The cost of counted messages, given as (category, recipient prefix of at least
    /// three digits, count).
    pub fn cost<'a>(&self, counted: impl IntoIterator<Item = (&'a str, &'a str, i64)>) -> Cost {
        let mut cost = Cost::default();
        for (category, prefix, count) in counted {
            cost.messages += count;
            match self.price(category, prefix) {
                Some(price) => {
                    let amount = price * count as f64;
                    cost.total += amount;
                    *cost.by_category.entry(category.to_owned()).or_default() += amount;
                }
                None => cost.unpriced += count,
            }
        }
        cost.total = round_cents(cost.total);
        for amount in cost.by_category.values_mut() {
            *amount = round_cents(*amount);
        }
        cost
    }
}

/// Money rounded to 1/10,000 of the unit: sums of many small prices stay exact enough
/// to compare, without pretending to more precision than the card has.
fn round_cents(amount: f64) -> f64 {
    (amount * 10_000.0).round() / 10_000.0
}

/// What a set of messages costs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Cost {
    /// Sum of the priced messages.
    pub total: f64,
    /// By category.
    pub by_category: BTreeMap<String, f64>,
    /// Messages counted.
    pub messages: i64,
    /// Messages the card has no price for.
    pub unpriced: i64,
}

/// Days an audience of `recipients` needs at a daily limit (None: unlimited, one day).
pub(crate) fn days_needed(recipients: i64, limit: Option<i64>) -> i64 {
    match limit {
        Some(limit) if limit > 0 => (recipients + limit - 1) / limit,
        _ => i64::from(recipients > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn tiers_round_trip_through_graph_and_webhook_values() {
        for tier in [Tier::Tier50, Tier::Tier250, Tier::Tier2K, Tier::Tier10K, Tier::Tier100K, Tier::Unlimited] {
            assert_eq!(Tier::parse(tier.as_str()), Some(tier));
            assert_eq!(Tier::from_daily_limit(tier.daily_limit().unwrap_or(-1)), Some(tier));
        }
        assert_eq!(Tier::parse("TIER_1K"), None);
        assert_eq!(Tier::from_daily_limit(1_000), None);
    }

    #[test]
    fn the_budget_counts_each_recipient_once_and_stops_at_the_limit() {
        let oldest = now() - Duration::hours(20);
        let already: HashSet<&str> = ["+551100000001"].into_iter().collect();
        let wanted = ["+551100000001", "+551100000002", "+551100000003", "+551100000002", "+551100000004"];
        let a = admit(Some(250), 248, Some(oldest), &already, &wanted, now());
        assert_eq!(a.admitted, vec![true, true, true, true, false], "a repeat is free; the third new one is over");
        assert_eq!(a.blocked_until, Some(oldest + BUDGET_WINDOW));
        let all = admit(None, 1_000_000, Some(oldest), &HashSet::new(), &wanted, now());
        assert!(all.admitted.iter().all(|a| *a) && all.blocked_until.is_none(), "unlimited admits everyone");
        let full = admit(Some(250), 260, Some(oldest), &HashSet::new(), &wanted[1..2], now());
        assert_eq!(full.admitted, vec![false], "a window over the limit (a lowered tier) admits no one new");
    }

    #[test]
    fn holds_follow_the_signals_and_the_policy() {
        let flagged = Signals { quality_flagged: true, quality_event: Some("FLAGGED".into()), ..Default::default() };
        let marketing = Some(TemplateCategory::Marketing);
        assert_eq!(hold(&flagged, QualityPolicy::Pause, marketing, now()).map(|h| h.reason()), Some("QualityDegraded"));
        assert_eq!(hold(&flagged, QualityPolicy::Pause, Some(TemplateCategory::Utility), now()), None);
        assert_eq!(hold(&flagged, QualityPolicy::Slow, marketing, now()), None);
        assert!(slows_down(&flagged, QualityPolicy::Slow, marketing));
        assert_eq!(hold(&flagged, QualityPolicy::Ignore, marketing, now()), None);
        let red = Signals { quality_rating: Some("RED".into()), ..Default::default() };
        assert!(hold(&red, QualityPolicy::Pause, marketing, now()).is_some(), "a polled RED rating counts");
        let paused =
            Signals { template_status: Some(("PAUSED".into(), Some("LOW_QUALITY".into()))), ..Default::default() };
        let h = hold(&paused, QualityPolicy::Ignore, Some(TemplateCategory::Utility), now());
        assert!(h.as_ref().is_some_and(|h| h.message().contains("PAUSED (LOW_QUALITY)")), "{h:?}");
        let approved = Signals { template_status: Some(("APPROVED".into(), None)), ..Default::default() };
        assert_eq!(hold(&approved, QualityPolicy::Pause, marketing, now()), None);
        let until = now() + Duration::hours(3);
        let restricted = Signals { restricted_until: Some(until), ..Default::default() };
        assert_eq!(hold(&restricted, QualityPolicy::Pause, marketing, now()), Some(Hold::Restricted { until }));
        assert_eq!(hold(&restricted, QualityPolicy::Pause, marketing, until), None, "an expired restriction is over");
        assert_eq!(
            hold(&restricted, QualityPolicy::Pause, None, now()),
            None,
            "text replies are not business-initiated"
        );
    }

    #[test]
    fn slow_halves_the_caps() {
        let l = Limits::provider_default(crate::api::Provider::Meta);
        let s = slowed(&l);
        assert_eq!((s.per_minute, s.per_hour, s.per_day), (Some(10), Some(50), Some(250)));
    }

    #[test]
    fn marketing_requeues_double_then_stop() {
        let at: Vec<_> = (0..4).map(|n| marketing_requeue_at(n, now()).map(|t| (t - now()).num_hours())).collect();
        assert_eq!(at, vec![Some(24), Some(48), Some(96), None]);
        assert_eq!(marketing_requeue_at(i16::MAX, now()), None);
        assert_eq!(marketing_requeue_at(-1, now()), None);
    }

    #[test]
    fn a_rate_card_prices_by_the_longest_calling_code() {
        let card = RateCard::parse(
            "version: '2026-10'\ncurrency: USD\nrates:\n  marketing: {'55': 0.0625, '1': 0.025, default: 0.05}\n  utility: {'55': 0.008}\n",
        )
        .unwrap();
        assert_eq!(card.price("marketing", "+5511999990000"), Some(0.0625));
        assert_eq!(card.price("marketing", "+15551230000"), Some(0.025));
        assert_eq!(card.price("marketing", "+4479460000"), Some(0.05), "default");
        assert_eq!(card.price("utility", "+4479460000"), None);
        let cost = card.cost([("marketing", "551", 10), ("utility", "551", 5), ("utility", "447", 2)]);
        assert_eq!(cost.total, 0.665);
        assert_eq!(cost.by_category.get("utility"), Some(&0.04));
        assert_eq!((cost.messages, cost.unpriced), (17, 2));
        assert!(RateCard::parse("version: x\ncurrency: USD\nrates: {marketing: {'55': -1}}").is_err());
        assert!(RateCard::parse("version: x\ncurrency: USD\nrates: {}\nextra: 1").is_err());
    }

    #[test]
    fn days_needed_rounds_up() {
        assert_eq!(days_needed(9_000, Tier::Tier2K.daily_limit()), 5);
        assert_eq!(days_needed(2_000, Some(2_000)), 1);
        assert_eq!(days_needed(10, None), 1);
        assert_eq!(days_needed(0, None), 0);
    }
}
