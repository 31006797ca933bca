//! The Meta business portfolio the sandbox models (docs/providers.md A3, A6): one WABA
//! whose phone numbers share a messaging tier, a quality rating and a throughput level;
//! its templates' statuses and quality; restrictions on business-initiated messaging;
//! Meta's per-user marketing limit (131049); the business-scoped user id (BSUID) of
//! every phone; and the bodies of the account webhooks Meta posts when any of these
//! change.
//!
//! Pure: [`Account`] changes state and answers which webhooks to post ([`Event`]);
//! the control endpoints do the HTTP.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::behaviour::digits;
use super::config::{MetaSandbox, TemplateSpec};

/// A portfolio's messaging limit (docs/providers.md A3, A6): Disparo's own type, so the
/// simulator and the operator cannot disagree on a tier's size.
pub use crate::account::Tier;

/// A number's quality rating (`quality_rating`; template quality scores use the same
/// values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Quality {
    /// High quality.
    #[default]
    Green,
    /// Medium quality.
    Yellow,
    /// Low quality.
    Red,
    /// Not rated yet (new templates start here).
    Unknown,
}

/// A number's throughput level (`throughput.level`): 80 or 1,000 messages per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ThroughputLevel {
    /// 80 mps.
    #[default]
    Standard,
    /// 1,000 mps.
    High,
}

/// A template's review status (`message_template_status_update.event`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TemplateStatus {
    /// Sendable.
    #[default]
    Approved,
    /// In review: not sendable yet.
    Pending,
    /// Refused in review: not sendable.
    Rejected,
    /// Paused for low quality: sends fail with 132015.
    Paused,
    /// Disabled after repeated pauses: sends fail with 132016.
    Disabled,
    /// Still approved, but headed for a pause.
    Flagged,
}

impl TemplateStatus {
    /// The Meta code a send of a template in this status is refused with (A6): paused
    /// 132015, disabled 132016, not approved answered like an unknown template, 132001.
    pub fn refusal(self) -> Option<i64> {
        match self {
            TemplateStatus::Approved | TemplateStatus::Flagged => None,
            TemplateStatus::Paused => Some(132015),
            TemplateStatus::Disabled => Some(132016),
            TemplateStatus::Pending | TemplateStatus::Rejected => Some(132001),
        }
    }

    /// Meta's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateStatus::Approved => "APPROVED",
            TemplateStatus::Pending => "PENDING",
            TemplateStatus::Rejected => "REJECTED",
            TemplateStatus::Paused => "PAUSED",
            TemplateStatus::Disabled => "DISABLED",
            TemplateStatus::Flagged => "FLAGGED",
        }
    }
}

/// A template's category, which decides its price (docs/providers.md A6): the
/// operator's own type, so the two cannot disagree.
pub use crate::api::TemplateCategory;

/// What `account_update` restricts (`restriction_info[].restriction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RestrictionType {
    /// No new phone numbers.
    RestrictedAddPhoneNumberAction,
    /// No business-initiated (template) messages.
    RestrictedBizInitiatedMessaging,
    /// No replies to customers.
    RestrictedCustomerInitiatedMessaging,
}

/// One restriction and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restriction {
    /// What is restricted.
    pub restriction_type: RestrictionType,
    /// Unix seconds (sandbox clock) when it ends.
    pub expiration: i64,
}

/// The `event` of a `phone_number_quality_update` (docs/providers.md A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QualityEvent {
    /// Quality is low; the limit drops if it goes on. The sandbox sets the rating RED.
    Flagged,
    /// Quality recovered. The sandbox sets the rating GREEN.
    Unflagged,
    /// The limit went down.
    Downgrade,
    /// The limit went up.
    Upgrade,
    /// A newly onboarded number.
    Onboarding,
    /// Throughput went to HIGH.
    ThroughputUpgrade,
}

/// One template's live state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TemplateState {
    /// Review status.
    pub status: TemplateStatus,
    /// Category (price).
    pub category: TemplateCategory,
    /// Quality score.
    pub quality_score: Quality,
}

impl TemplateState {
    /// The state a configured template starts in (Meta rates new templates UNKNOWN).
    fn from_spec(spec: Option<&TemplateSpec>) -> Self {
        TemplateState {
            status: spec.map_or(TemplateStatus::Approved, |s| s.status),
            category: spec.map_or(TemplateCategory::Marketing, |s| s.category),
            quality_score: Quality::Unknown,
        }
    }
}

/// A change of `PUT /_sandbox/meta/account`; absent fields stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    /// New messaging limit.
    pub tier: Option<Tier>,
    /// New quality rating (silent: Meta announces quality through FLAGGED/UNFLAGGED).
    pub quality_rating: Option<Quality>,
    /// New throughput level (HIGH from STANDARD posts THROUGHPUT_UPGRADE, docs/providers.md A6).
    pub throughput_level: Option<ThroughputLevel>,
}

/// An account webhook to post: `entry[].changes[] = {field, value}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `changes[].field`.
    pub field: &'static str,
    /// `changes[].value`.
    pub value: Value,
}

/// The portfolio's state at run time.
#[derive(Debug, Clone, Default)]
pub struct Account {
    /// Messaging limit.
    pub tier: Tier,
    /// Quality rating of its numbers.
    pub quality_rating: Quality,
    /// Throughput level of its numbers.
    pub throughput_level: ThroughputLevel,
    /// Templates whose state was set at run time or configured per language, by (name, language).
    templates: BTreeMap<(String, String), TemplateState>,
    /// Restrictions, at most one per type.
    restrictions: Vec<Restriction>,
    /// Digits of recipients Meta withholds marketing templates from (131049).
    marketing_limited: BTreeSet<String>,
}

/// The account as `GET /_sandbox/meta/account` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    /// Messaging limit.
    pub tier: Tier,
    /// Quality rating.
    pub quality_rating: Quality,
    /// Throughput level.
    pub throughput_level: ThroughputLevel,
    /// Restrictions (expired ones included, with their expiration).
    pub restrictions: Vec<Restriction>,
    /// Recipients under the per-user marketing limit, `+` and digits.
    pub marketing_limited_recipients: Vec<String>,
    /// Templates with a known per-language state.
    pub templates: Vec<TemplateView>,
}

/// One template in [`AccountView`].
#[derive(Debug, Clone, Serialize)]
pub struct TemplateView {
    /// Name.
    pub name: String,
    /// Language code.
    pub language: String,
    /// Meta's id of this name and language.
    pub message_template_id: u64,
    /// State.
    #[serde(flatten)]
    pub state: TemplateState,
}

impl Account {
    /// The state a sandbox starts in.
    pub(crate) fn from_config(meta: &MetaSandbox) -> Self {
        let templates = meta
            .templates
            .iter()
            .flat_map(|spec| {
                spec.languages
                    .iter()
                    .map(move |language| ((spec.name.clone(), language.clone()), TemplateState::from_spec(Some(spec))))
            })
            .collect();
        Account {
            tier: meta.tier,
            quality_rating: meta.quality_rating,
            throughput_level: meta.throughput_level,
            templates,
            restrictions: Vec::new(),
            marketing_limited: meta.marketing_limited_recipients.iter().map(|n| digits(n)).collect(),
        }
    }

    /// What a rehearsal sees.
    pub fn view(&self) -> AccountView {
        AccountView {
            tier: self.tier,
            quality_rating: self.quality_rating,
            throughput_level: self.throughput_level,
            restrictions: self.restrictions.clone(),
            marketing_limited_recipients: self.marketing_limited.iter().map(|d| format!("+{d}")).collect(),
            templates: self
                .templates
                .iter()
                .map(|((name, language), state)| TemplateView {
                    name: name.clone(),
                    language: language.clone(),
                    message_template_id: template_id(name, language),
                    state: *state,
                })
                .collect(),
        }
    }

    /// A template's state; `spec` is its configuration (none when the sandbox accepts
    /// any template name).
    pub fn template(&self, name: &str, language: &str, spec: Option<&TemplateSpec>) -> TemplateState {
        self.templates
            .get(&(name.to_owned(), language.to_owned()))
            .copied()
            .unwrap_or_else(|| TemplateState::from_spec(spec))
    }

    /// Applies `PUT /_sandbox/meta/account`. A tier change posts
    /// `business_capability_update` and a `phone_number_quality_update` UPGRADE or
    /// DOWNGRADE; HIGH throughput from STANDARD posts THROUGHPUT_UPGRADE (A3, A6).
    pub fn change(&mut self, change: AccountChange, display_phone_number: &str) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(rating) = change.quality_rating {
            self.quality_rating = rating;
        }
        if let Some(tier) = change.tier
            && tier != self.tier
        {
            let old = self.tier;
            self.tier = tier;
            let event = if tier > old { QualityEvent::Upgrade } else { QualityEvent::Downgrade };
            events.push(capability_update(tier));
            events.push(quality_update(display_phone_number, event, tier, Some(old)));
        }
        if let Some(level) = change.throughput_level {
            let upgraded = self.throughput_level == ThroughputLevel::Standard && level == ThroughputLevel::High;
            self.throughput_level = level;
            if upgraded {
                events.push(quality_update(display_phone_number, QualityEvent::ThroughputUpgrade, self.tier, None));
            }
        }
        events
    }

    /// Applies `POST /_sandbox/meta/quality`: FLAGGED rates the numbers RED, UNFLAGGED
    /// GREEN (so the Graph read agrees); the tier stays (change it with [`Account::change`]).
    pub fn quality_event(&mut self, event: QualityEvent, display_phone_number: &str) -> Event {
        match event {
            QualityEvent::Flagged => self.quality_rating = Quality::Red,
            QualityEvent::Unflagged => self.quality_rating = Quality::Green,
            _ => {}
        }
        quality_update(display_phone_number, event, self.tier, None)
    }

    /// Sets a template's status and answers its `message_template_status_update`.
    /// `reason` defaults to `NONE`; a disabled template carries `disable_info`.
    pub(crate) fn set_template_status(
        &mut self,
        name: &str,
        language: &str,
        spec: Option<&TemplateSpec>,
        status: TemplateStatus,
        reason: Option<String>,
        now_unix: i64,
    ) -> Event {
        let mut state = self.template(name, language, spec);
        state.status = status;
        self.templates.insert((name.to_owned(), language.to_owned()), state);
        let mut value = json!({
            "event": status.as_str(),
            "message_template_id": template_id(name, language),
            "message_template_name": name,
            "message_template_language": language,
            "reason": reason.unwrap_or_else(|| "NONE".to_owned()),
            "message_template_category": state.category.as_meta(),
        });
        if status == TemplateStatus::Disabled {
            value["disable_info"] = json!({ "disable_date": now_unix });
        }
        Event { field: "message_template_status_update", value }
    }

    /// Sets a template's quality score and answers its `message_template_quality_update`.
    pub(crate) fn set_template_quality(
        &mut self,
        name: &str,
        language: &str,
        spec: Option<&TemplateSpec>,
        score: Quality,
    ) -> Event {
        let mut state = self.template(name, language, spec);
        let previous = state.quality_score;
        state.quality_score = score;
        self.templates.insert((name.to_owned(), language.to_owned()), state);
        Event {
            field: "message_template_quality_update",
            value: json!({
                "previous_quality_score": previous,
                "new_quality_score": score,
                "message_template_id": template_id(name, language),
                "message_template_name": name,
                "message_template_language": language,
            }),
        }
    }

    /// Adds (or replaces, per type) a restriction and answers its `account_update`.
    pub fn restrict(&mut self, restriction: Restriction) -> Event {
        self.restrictions.retain(|r| r.restriction_type != restriction.restriction_type);
        self.restrictions.push(restriction);
        Event {
            field: "account_update",
            value: json!({ "event": "ACCOUNT_RESTRICTION", "restriction_info": [restriction] }),
        }
    }

    /// Whether business-initiated messaging is restricted at `now_unix` (sandbox clock).
    pub(crate) fn biz_initiated_restricted(&self, now_unix: i64) -> bool {
        self.restrictions
            .iter()
            .any(|r| r.restriction_type == RestrictionType::RestrictedBizInitiatedMessaging && now_unix < r.expiration)
    }

    /// Replaces the recipients under the per-user marketing limit.
    pub(crate) fn set_marketing_limited(&mut self, numbers: &[String]) {
        self.marketing_limited = numbers.iter().map(|n| digits(n)).collect();
    }

    /// Whether Meta withholds marketing templates from this recipient (digits).
    pub(crate) fn is_marketing_limited(&self, recipient_digits: &str) -> bool {
        self.marketing_limited.contains(recipient_digits)
    }
}

/// `business_capability_update` for a tier (A6).
pub(crate) fn capability_update(tier: Tier) -> Event {
    Event {
        field: "business_capability_update",
        value: json!({ "max_daily_conversations_per_business": tier.max_daily_conversations() }),
    }
}

/// `phone_number_quality_update` (A6): `old_limit` only on limit changes.
pub(crate) fn quality_update(display_phone_number: &str, event: QualityEvent, tier: Tier, old: Option<Tier>) -> Event {
    let mut value = json!({
        "display_phone_number": display_phone_number,
        "event": event,
        "current_limit": tier.as_str(),
        "max_daily_conversations_per_business": tier.max_daily_conversations(),
    });
    if let Some(old) = old {
        value["old_limit"] = json!(old.as_str());
    }
    Event { field: "phone_number_quality_update", value }
}

/// The envelope every account webhook shares with status webhooks (A4, A6).
pub fn envelope(waba_id: &str, time: i64, event: &Event) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": waba_id,
            "time": time,
            "changes": [{ "field": event.field, "value": event.value }],
        }],
    })
}

/// Calling codes the sandbox maps to countries (longest first where they overlap).
const COUNTRIES: &[(&str, &str)] = &[
    ("351", "PT"),
    ("55", "BR"),
    ("52", "MX"),
    ("44", "GB"),
    ("91", "IN"),
    ("34", "ES"),
    ("54", "AR"),
    ("49", "DE"),
    ("1", "US"),
];

/// The country calling code and ISO country of a number's digits, if the sandbox knows it.
fn calling_code(digits: &str) -> Option<(&'static str, &'static str)> {
    COUNTRIES.iter().find(|(code, _)| digits.starts_with(code)).copied()
}

/// The ISO country of a number (`ZZ` when unknown).
pub(crate) fn country_of(phone: &str) -> &'static str {
    calling_code(&digits(phone)).map_or("ZZ", |(_, country)| country)
}

/// A number in `[low, low + span)` from a SHA-256 of `text`: stable across runs and builds.
fn stable_number(text: &str, low: u64, span: u64) -> u64 {
    let hash = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    low + u64::from_be_bytes(first) % span
}

/// The business-scoped user id the sandbox gives a phone (`recipient_user_id`,
/// `user_id`; docs/providers.md A6): the ISO country of its calling code, a dot and a
/// stable 15 to 19 digit number, e.g. `BR.150257639465584`. The same phone always gets
/// the same id, with or without `+` or formatting.
pub fn bsuid_for(phone: &str) -> String {
    let digits = digits(phone);
    let number =
        stable_number(&format!("disparo-sandbox-bsuid:{digits}"), 100_000_000_000_000, 9_999_900_000_000_000_000);
    format!("{}.{number}", country_of(&digits))
}

/// A stable 15-digit `message_template_id` per template name and language.
pub fn template_id(name: &str, language: &str) -> u64 {
    stable_number(&format!("disparo-sandbox-template:{name}:{language}"), 100_000_000_000_000, 900_000_000_000_000)
}

/// A number as Graph shows `display_phone_number`: `+`, the calling code, a space and
/// the rest (North American numbers grouped `555-078-3881`). Webhooks carry digits
/// only, so a reader compares digits.
pub(crate) fn graph_display_number(phone: &str) -> String {
    let digits = digits(phone);
    match calling_code(&digits) {
        Some(("1", _)) if digits.len() == 11 => {
            format!("+1 {}-{}-{}", &digits[1..4], &digits[4..7], &digits[7..])
        }
        Some((code, _)) if digits.len() > code.len() => format!("+{code} {}", &digits[code.len()..]),
        _ => format!("+{digits}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_have_meta_limits_and_names() {
        let all = [Tier::Tier250, Tier::Tier2K, Tier::Tier10K, Tier::Tier100K, Tier::Unlimited];
        let limits: Vec<_> = all.iter().map(|t| t.daily_limit()).collect();
        assert_eq!(limits, [Some(250), Some(2_000), Some(10_000), Some(100_000), None]);
        assert_eq!(all.map(Tier::max_daily_conversations), [250, 2000, 10000, 100000, -1]);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "ordered by size for UPGRADE/DOWNGRADE");
        for tier in all {
            assert_eq!(serde_json::to_value(tier).ok(), Some(json!(tier.as_str())));
        }
        assert_eq!(serde_json::from_value::<Tier>(json!("TIER_2K")).ok(), Some(Tier::Tier2K));
        assert_eq!(Tier::default(), Tier::Unlimited);
    }

    #[test]
    fn template_statuses_refuse_like_meta() {
        assert_eq!(TemplateStatus::Approved.refusal(), None);
        assert_eq!(TemplateStatus::Flagged.refusal(), None);
        assert_eq!(TemplateStatus::Paused.refusal(), Some(132015));
        assert_eq!(TemplateStatus::Disabled.refusal(), Some(132016));
        assert_eq!(TemplateStatus::Rejected.refusal(), Some(132001));
        assert_eq!(TemplateCategory::Utility.as_pricing(), "utility");
    }

    #[test]
    fn bsuids_are_stable_country_scoped_and_long_enough() {
        let id = bsuid_for("+55 11 99999-0001");
        assert_eq!(id, bsuid_for("5511999990001"), "formatting does not matter");
        assert_ne!(id, bsuid_for("5511999990002"));
        let (country, number) = id.split_once('.').unwrap_or_default();
        assert_eq!(country, "BR");
        assert!((15..=19).contains(&number.len()) && number.bytes().all(|b| b.is_ascii_digit()), "{id}");
        for (phone, country) in [
            ("15550123456", "US"),
            ("525512345678", "MX"),
            ("447700900123", "GB"),
            ("919812345678", "IN"),
            ("34612345678", "ES"),
            ("351912345678", "PT"),
            ("5491123456789", "AR"),
            ("4915112345678", "DE"),
            ("33612345678", "ZZ"),
        ] {
            assert!(bsuid_for(phone).starts_with(&format!("{country}.")), "{phone}");
        }
        // Pinned: a change of the derivation would silently change every test's ids.
        assert_eq!(bsuid_for("+15550123456"), bsuid_for("15550123456"));
        assert_eq!(template_id("welcome", "pt_BR"), template_id("welcome", "pt_BR"));
        assert_eq!(template_id("welcome", "pt_BR").to_string().len(), 15);
        assert_ne!(template_id("welcome", "pt_BR"), template_id("welcome", "en_US"));
    }

    #[test]
    fn graph_formats_display_numbers() {
        assert_eq!(graph_display_number("15550783881"), "+1 555-078-3881");
        assert_eq!(graph_display_number("5511988887777"), "+55 11988887777");
        assert_eq!(graph_display_number("33612345678"), "+33612345678");
    }

    fn value_of(body: &Value) -> &Value {
        &body["entry"][0]["changes"][0]["value"]
    }

    #[test]
    fn a_tier_change_posts_capability_and_quality_updates_in_the_a6_shape() {
        let mut account = Account { tier: Tier::Tier10K, ..Account::default() };
        let events =
            account.change(AccountChange { tier: Some(Tier::Tier2K), ..AccountChange::default() }, "15550783881");
        assert_eq!(account.tier, Tier::Tier2K);
        let bodies: Vec<Value> = events.iter().map(|e| envelope("102290129340398", 1_750_000_000, e)).collect();
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0]["object"], "whatsapp_business_account");
        assert_eq!(bodies[0]["entry"][0]["id"], "102290129340398");
        assert_eq!(bodies[0]["entry"][0]["time"], 1_750_000_000);
        assert_eq!(bodies[0]["entry"][0]["changes"][0]["field"], "business_capability_update");
        assert_eq!(value_of(&bodies[0]), &json!({ "max_daily_conversations_per_business": 2000 }));
        assert_eq!(bodies[1]["entry"][0]["changes"][0]["field"], "phone_number_quality_update");
        assert_eq!(
            value_of(&bodies[1]),
            &json!({
                "display_phone_number": "15550783881",
                "event": "DOWNGRADE",
                "current_limit": "TIER_2K",
                "old_limit": "TIER_10K",
                "max_daily_conversations_per_business": 2000,
            })
        );
        let up = account.change(AccountChange { tier: Some(Tier::Unlimited), ..AccountChange::default() }, "1");
        assert_eq!(up[1].value["event"], "UPGRADE");
        assert_eq!(up[0].value["max_daily_conversations_per_business"], -1);
        assert!(
            account.change(AccountChange { tier: Some(Tier::Unlimited), ..AccountChange::default() }, "1").is_empty()
        );
        let faster = account
            .change(AccountChange { throughput_level: Some(ThroughputLevel::High), ..AccountChange::default() }, "1");
        assert_eq!(faster.len(), 1);
        assert_eq!(faster[0].value["event"], "THROUGHPUT_UPGRADE");
    }

    #[test]
    fn flagged_and_unflagged_move_the_rating() {
        let mut account = Account { tier: Tier::Tier10K, ..Account::default() };
        let event = account.quality_event(QualityEvent::Flagged, "15550783881");
        assert_eq!(account.quality_rating, Quality::Red);
        // The A6 example, field for field.
        assert_eq!(
            envelope("102290129340398", 0, &event)["entry"][0]["changes"][0],
            json!({"field":"phone_number_quality_update",
                   "value":{"display_phone_number":"15550783881","event":"FLAGGED","current_limit":"TIER_10K","max_daily_conversations_per_business":10000}})
        );
        account.quality_event(QualityEvent::Unflagged, "15550783881");
        assert_eq!(account.quality_rating, Quality::Green);
    }

    #[test]
    fn template_events_have_the_a6_shape_and_change_the_state() {
        let spec: TemplateSpec =
            serde_json::from_value(json!({ "name": "welcome", "languages": ["pt_BR"], "category": "UTILITY" }))
                .unwrap_or_else(|e| panic!("{e}"));
        let mut account = Account::default();
        let event = account.set_template_status(
            "welcome",
            "pt_BR",
            Some(&spec),
            TemplateStatus::Paused,
            Some("LOW_QUALITY".into()),
            0,
        );
        assert_eq!(event.field, "message_template_status_update");
        assert_eq!(
            event.value,
            json!({"event":"PAUSED","message_template_id":template_id("welcome","pt_BR"),"message_template_name":"welcome",
                   "message_template_language":"pt_BR","reason":"LOW_QUALITY","message_template_category":"UTILITY"})
        );
        assert_eq!(account.template("welcome", "pt_BR", Some(&spec)).status, TemplateStatus::Paused);
        assert_eq!(account.template("welcome", "en_US", Some(&spec)).status, TemplateStatus::Approved);
        let approved = account.set_template_status("welcome", "pt_BR", Some(&spec), TemplateStatus::Approved, None, 0);
        assert_eq!(approved.value["reason"], "NONE");
        let disabled = account.set_template_status("welcome", "pt_BR", Some(&spec), TemplateStatus::Disabled, None, 7);
        assert_eq!(disabled.value["disable_info"]["disable_date"], 7);

        let quality = account.set_template_quality("welcome", "pt_BR", Some(&spec), Quality::Red);
        assert_eq!(quality.field, "message_template_quality_update");
        assert_eq!(quality.value["previous_quality_score"], "UNKNOWN");
        assert_eq!(quality.value["new_quality_score"], "RED");
        assert_eq!(quality.value["message_template_name"], "welcome");
        let again = account.set_template_quality("welcome", "pt_BR", Some(&spec), Quality::Green);
        assert_eq!(again.value["previous_quality_score"], "RED");
    }

    #[test]
    fn restrictions_hold_until_they_expire() {
        let mut account = Account::default();
        let event = account.restrict(Restriction {
            restriction_type: RestrictionType::RestrictedBizInitiatedMessaging,
            expiration: 1_767_225_600,
        });
        assert_eq!(
            envelope("102290129340398", 0, &event)["entry"][0]["changes"][0],
            json!({"field":"account_update",
                   "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[{"restriction_type":"RESTRICTED_BIZ_INITIATED_MESSAGING","expiration":1767225600}]}})
        );
        assert!(account.biz_initiated_restricted(1_767_225_599));
        assert!(!account.biz_initiated_restricted(1_767_225_600));
        account.restrict(Restriction {
            restriction_type: RestrictionType::RestrictedCustomerInitiatedMessaging,
            expiration: i64::MAX,
        });
        assert!(!account.biz_initiated_restricted(1_767_225_600), "another type does not stop templates");
        assert_eq!(account.view().restrictions.len(), 2);
    }

    #[test]
    fn marketing_limited_recipients_match_with_or_without_plus() {
        let mut account = Account::default();
        account.set_marketing_limited(&["+5511900000001".into(), "5511900000002".into()]);
        assert!(account.is_marketing_limited("5511900000001"));
        assert!(account.is_marketing_limited("5511900000002"));
        assert!(!account.is_marketing_limited("5511900000003"));
        assert_eq!(account.view().marketing_limited_recipients, ["+5511900000001", "+5511900000002"]);
    }
}
