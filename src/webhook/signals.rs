//! Account health signals: the changes of Meta's webhooks that are not about one
//! message (docs/providers.md, "Account health signals"; the envelope is A4's): a
//! number's quality, its portfolio's messaging limit and restrictions, its templates'
//! status and quality. They come to the same per-channel URL as statuses, signed the
//! same way, with `entry[].id` the WABA id and `changes[].field` naming what changed.
//!
//! Three steps, the first two pure: [`parse_change`] reads a change, [`route`] decides
//! which of the organization's channels and portfolios it concerns, and [`apply`]
//! writes it through [`crate::store::signals`].
//!
//! Routing: the URL names the organization; the channels concerned are the
//! organization's channels of that WABA (the controller records each Channel's WABA id,
//! display number and portfolio), narrowed for a number's quality to the channel of
//! that display number; when no channel has recorded the WABA yet, the URL's own
//! channel. The portfolios concerned are those of the channels concerned.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::PgPool;
use tracing::info;

use super::notification::clean_id;
use crate::store::signals::{self as store, ChannelRow, MessagingLimit, QualityEvent, Restriction, TemplateKey};

/// The `field`s of Meta's account health changes this service records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalField {
    /// `phone_number_quality_update`.
    PhoneNumberQuality,
    /// `business_capability_update`.
    BusinessCapability,
    /// `account_update`.
    Account,
    /// `message_template_status_update`.
    TemplateStatus,
    /// `message_template_quality_update`.
    TemplateQuality,
}

impl SignalField {
    /// The field of a change, if it is one of these.
    pub fn parse(field: &str) -> Option<Self> {
        Some(match field {
            "phone_number_quality_update" => SignalField::PhoneNumberQuality,
            "business_capability_update" => SignalField::BusinessCapability,
            "account_update" => SignalField::Account,
            "message_template_status_update" => SignalField::TemplateStatus,
            "message_template_quality_update" => SignalField::TemplateQuality,
            _ => return None,
        })
    }

    /// Meta's name (also the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            SignalField::PhoneNumberQuality => "phone_number_quality_update",
            SignalField::BusinessCapability => "business_capability_update",
            SignalField::Account => "account_update",
            SignalField::TemplateStatus => "message_template_status_update",
            SignalField::TemplateQuality => "message_template_quality_update",
        }
    }
}

/// The one restriction type that stops campaigns: business-initiated messaging.
pub(crate) const BIZ_INITIATED_RESTRICTION: &str = "RESTRICTED_BIZ_INITIATED_MESSAGING";

/// What a change says, with the WABA it came for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSignal {
    /// `entry[].id`.
    pub waba_id: String,
    /// The change.
    pub change: SignalChange,
}

/// What each field says that Disparo records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalChange {
    /// `phone_number_quality_update`.
    PhoneQuality {
        /// `display_phone_number`, digits only.
        display_phone: Option<String>,
        /// `event`.
        event: QualityEvent,
        /// `max_daily_conversations_per_business`, when given.
        limit: Option<MessagingLimit>,
    },
    /// `business_capability_update`: the portfolio's limit, when it states one.
    Capability {
        /// `max_daily_conversations_per_business`.
        limit: Option<MessagingLimit>,
    },
    /// `account_update`.
    Account {
        /// `event` (ACCOUNT_RESTRICTION, ACCOUNT_VIOLATION, ...), for the log.
        event: Option<String>,
        /// The restriction on business-initiated messaging, if it is one (the latest
        /// expiration when several are listed).
        biz_restriction: Option<Restriction>,
        /// Other restriction types listed (not recorded; logged).
        other_restrictions: Vec<String>,
    },
    /// `message_template_status_update`.
    TemplateStatus {
        /// Which template.
        template: TemplateKey,
        /// `event`: APPROVED, PAUSED, DISABLED, ...
        status: String,
        /// `reason`, None when Meta says `NONE`.
        reason: Option<String>,
    },
    /// `message_template_quality_update`.
    TemplateQuality {
        /// Which template.
        template: TemplateKey,
        /// `new_quality_score`: GREEN, YELLOW, RED, UNKNOWN.
        quality: String,
    },
}

impl AccountSignal {
    /// The field the signal came in.
    pub fn field(&self) -> SignalField {
        match self.change {
            SignalChange::PhoneQuality { .. } => SignalField::PhoneNumberQuality,
            SignalChange::Capability { .. } => SignalField::BusinessCapability,
            SignalChange::Account { .. } => SignalField::Account,
            SignalChange::TemplateStatus { .. } => SignalField::TemplateStatus,
            SignalChange::TemplateQuality { .. } => SignalField::TemplateQuality,
        }
    }
}

/// Reads one change of an account health field. `waba_id` is the entry's `id`. Err
/// names the field when the change lacks what it needs (no WABA id, no event, no
/// template name): it is acknowledged and counted, never an error to Meta, which
/// would retry it for days.
pub(crate) fn parse_change(
    field: SignalField,
    waba_id: Option<&Value>,
    value: Option<&Value>,
) -> Result<AccountSignal, SignalField> {
    let waba_id = waba_id.and_then(id_text).ok_or(field)?;
    let value = value.filter(|v| v.is_object()).ok_or(field)?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).and_then(clean_id);
    let change = match field {
        SignalField::PhoneNumberQuality => SignalChange::PhoneQuality {
            display_phone: text("display_phone_number").map(|p| digits(&p)).filter(|p| !p.is_empty()),
            event: QualityEvent::parse(&text("event").ok_or(field)?),
            // a limit that cannot be read leaves the limit alone; the event still counts
            limit: value
                .get("max_daily_conversations_per_business")
                .and_then(integer)
                .and_then(MessagingLimit::from_max_daily),
        },
        SignalField::BusinessCapability => SignalChange::Capability {
            limit: match value.get("max_daily_conversations_per_business") {
                None => None,
                Some(limit) => Some(integer(limit).and_then(MessagingLimit::from_max_daily).ok_or(field)?),
            },
        },
        SignalField::Account => {
            let mut biz_restriction: Option<Restriction> = None;
            let mut other_restrictions = Vec::new();
            for item in value.get("restriction_info").and_then(Value::as_array).map_or(&[][..], Vec::as_slice) {
                let Some(kind) = item.get("restriction_type").and_then(Value::as_str).and_then(clean_id) else {
                    continue;
                };
                let until = item.get("expiration").and_then(integer).and_then(instant);
                match until {
                    Some(until) if kind == BIZ_INITIATED_RESTRICTION => {
                        if biz_restriction.as_ref().is_none_or(|r| r.until < until) {
                            biz_restriction = Some(Restriction { kind, until });
                        }
                    }
                    _ => other_restrictions.push(kind),
                }
            }
            SignalChange::Account { event: text("event"), biz_restriction, other_restrictions }
        }
        SignalField::TemplateStatus | SignalField::TemplateQuality => {
            let template = TemplateKey {
                waba_id: waba_id.clone(),
                name: text("message_template_name").ok_or(field)?,
                language: text("message_template_language").ok_or(field)?,
            };
            if field == SignalField::TemplateStatus {
                SignalChange::TemplateStatus {
                    template,
                    status: text("event").ok_or(field)?,
                    reason: text("reason").filter(|r| r != "NONE"),
                }
            } else {
                SignalChange::TemplateQuality { template, quality: text("new_quality_score").ok_or(field)? }
            }
        }
    };
    Ok(AccountSignal { waba_id, change })
}

/// An id Meta sends as a string or a number.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => clean_id(s),
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// An integer Meta sends as a number or a string.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Unix seconds as an instant, when believable (2000..2200).
fn instant(seconds: i64) -> Option<DateTime<Utc>> {
    const MIN: i64 = 946_684_800; // 2000-01-01
    const MAX: i64 = 7_258_118_400; // 2200-01-01
    (MIN..MAX).contains(&seconds).then(|| Utc.timestamp_opt(seconds, 0).single()).flatten()
}

fn digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

/// The channels and portfolios a signal concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Channel names, sorted.
    pub channels: Vec<String>,
    /// Distinct portfolios of those channels, sorted.
    pub portfolios: Vec<String>,
}

/// Decides which channels of the organization a signal for `waba_id` concerns, from
/// their rows (`rows`, see [`store::channel_rows`]): those of that WABA; for a number's
/// quality (`display_phone` given), only those whose display number has the same
/// digits, or all of the WABA's when none has; when no row has the WABA, the URL's
/// channel (the controller may not have recorded the WABA yet, and the URL is the one
/// the Channel's owner registered). Portfolios are those the chosen rows name.
pub fn route(rows: &[ChannelRow], url_channel: &str, waba_id: &str, display_phone: Option<&str>) -> Route {
    let of_waba: Vec<&ChannelRow> = rows.iter().filter(|r| r.waba_id.as_deref() == Some(waba_id)).collect();
    let chosen: Vec<&ChannelRow> = if of_waba.is_empty() {
        rows.iter().filter(|r| r.channel == url_channel).collect()
    } else {
        let wanted = display_phone.map(digits).filter(|d| !d.is_empty());
        let of_number: Vec<&ChannelRow> = of_waba
            .iter()
            .copied()
            .filter(|r| wanted.is_some() && r.display_phone.as_deref().map(digits) == wanted)
            .collect();
        if of_number.is_empty() { of_waba } else { of_number }
    };
    let mut channels: BTreeSet<String> = chosen.iter().map(|r| r.channel.clone()).collect();
    if chosen.is_empty() {
        channels.insert(url_channel.to_owned());
    }
    let portfolios: BTreeSet<String> = chosen.iter().filter_map(|r| r.portfolio.clone()).collect();
    Route { channels: channels.into_iter().collect(), portfolios: portfolios.into_iter().collect() }
}

/// What applying a signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOutcome {
    /// Recorded.
    Applied,
    /// About portfolios, but no channel concerned names one yet: nothing to record
    /// (the controller's polling of the Graph API will tell the limit).
    NoPortfolio,
    /// Nothing in it that Disparo records (another account event or restriction type,
    /// a capability update without a messaging limit).
    NotRecorded,
}

impl SignalOutcome {
    /// Snake-case name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SignalOutcome::Applied => "applied",
            SignalOutcome::NoPortfolio => "no_portfolio",
            SignalOutcome::NotRecorded => "not_recorded",
        }
    }
}

/// The metric outcome of a change that could not be understood.
pub(crate) const INVALID: &str = "invalid";

/// Applies the signals of one request, in payload order, in one transaction (they are
/// few, and a retried request applies them again to the same effect). Returns one
/// outcome per signal.
pub async fn apply(
    pool: &PgPool,
    organization: &str,
    url_channel: &str,
    signals: &[AccountSignal],
) -> crate::store::Result<Vec<SignalOutcome>> {
    let mut tx = crate::store::begin(pool).await?;
    let mut outcomes = Vec::with_capacity(signals.len());
    for signal in signals {
        let waba_id = signal.waba_id.as_str();
        let outcome = match &signal.change {
            SignalChange::PhoneQuality { display_phone, event, limit } => {
                let rows = store::channel_rows(&mut tx, organization, waba_id, url_channel).await?;
                let route = route(&rows, url_channel, waba_id, display_phone.as_deref());
                store::record_quality_event(&mut tx, organization, &route.channels, event).await?;
                if let Some(limit) = limit {
                    store::record_messaging_limit(&mut tx, organization, &route.portfolios, *limit).await?;
                }
                SignalOutcome::Applied
            }
            SignalChange::Capability { limit: None } => SignalOutcome::NotRecorded,
            SignalChange::Capability { limit: Some(limit) } => {
                let rows = store::channel_rows(&mut tx, organization, waba_id, url_channel).await?;
                let route = route(&rows, url_channel, waba_id, None);
                if route.portfolios.is_empty() {
                    info!(
                        waba_id,
                        field = signal.field().as_str(),
                        "messaging limit for channels without a portfolio: not recorded"
                    );
                    SignalOutcome::NoPortfolio
                } else {
                    store::record_messaging_limit(&mut tx, organization, &route.portfolios, *limit).await?;
                    SignalOutcome::Applied
                }
            }
            SignalChange::Account { event, biz_restriction, other_restrictions } => {
                if !other_restrictions.is_empty() || biz_restriction.is_none() {
                    info!(waba_id, event = event.as_deref().unwrap_or(""), restrictions = ?other_restrictions,
                          "account update without a restriction on business-initiated messaging: not recorded");
                }
                match biz_restriction {
                    None => SignalOutcome::NotRecorded,
                    Some(restriction) => {
                        let rows = store::channel_rows(&mut tx, organization, waba_id, url_channel).await?;
                        let route = route(&rows, url_channel, waba_id, None);
                        if route.portfolios.is_empty() {
                            info!(waba_id, "restriction for channels without a portfolio: not recorded");
                            SignalOutcome::NoPortfolio
                        } else {
                            store::record_restriction(&mut tx, organization, &route.portfolios, restriction).await?;
                            SignalOutcome::Applied
                        }
                    }
                }
            }
            SignalChange::TemplateStatus { template, status, reason } => {
                store::record_template_status(&mut tx, organization, template, status, reason.as_deref()).await?;
                SignalOutcome::Applied
            }
            SignalChange::TemplateQuality { template, quality } => {
                store::record_template_quality(&mut tx, organization, template, quality).await?;
                SignalOutcome::Applied
            }
        };
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::signals::Tier;
    use serde_json::json;

    const WABA: &str = "102290129340398";

    /// The change of a one-change body.
    fn parse(body: &str) -> Result<AccountSignal, SignalField> {
        let body: Value = serde_json::from_str(body).unwrap();
        let entry = &body["entry"][0];
        let change = &entry["changes"][0];
        let field = SignalField::parse(change["field"].as_str().unwrap()).unwrap();
        parse_change(field, entry.get("id"), change.get("value"))
    }

    fn template(name: &str, language: &str) -> TemplateKey {
        TemplateKey { waba_id: WABA.into(), name: name.into(), language: language.into() }
    }

    // The example bodies of docs/providers.md, "Account health signals".
    const QUALITY: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"phone_number_quality_update",
 "value":{"display_phone_number":"15550783881","event":"FLAGGED","current_limit":"TIER_10K","max_daily_conversations_per_business":10000}}]}]}"#;
    const TEMPLATE_STATUS: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"message_template_status_update",
 "value":{"event":"PAUSED","message_template_id":594425479261596,"message_template_name":"welcome",
 "message_template_language":"pt_BR","reason":"LOW_QUALITY","message_template_category":"MARKETING"}}]}]}"#;
    const ACCOUNT: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"account_update",
 "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[{"restriction_type":"RESTRICTED_BIZ_INITIATED_MESSAGING","expiration":1767225600}]}}]}]}"#;

    fn body(field: &str, value: Value) -> String {
        json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{"field": field, "value": value}]}]})
            .to_string()
    }

    #[test]
    fn a_number_flagged_with_its_limit() {
        assert_eq!(
            parse(QUALITY),
            Ok(AccountSignal {
                waba_id: WABA.into(),
                change: SignalChange::PhoneQuality {
                    display_phone: Some("15550783881".into()),
                    event: QualityEvent::Flagged,
                    limit: Some(MessagingLimit { tier: Some(Tier::Tier10K), daily_limit: Some(10_000) }),
                },
            })
        );
        let lifted = body(
            "phone_number_quality_update",
            json!({"display_phone_number": "+1 555-078-3881", "event": "UNFLAGGED"}),
        );
        assert_eq!(
            parse(&lifted).unwrap().change,
            SignalChange::PhoneQuality {
                display_phone: Some("15550783881".into()),
                event: QualityEvent::Unflagged,
                limit: None
            }
        );
        let onboarding = body(
            "phone_number_quality_update",
            json!({"event": "ONBOARDING", "max_daily_conversations_per_business": "x"}),
        );
        assert_eq!(
            parse(&onboarding).unwrap().change,
            SignalChange::PhoneQuality {
                display_phone: None,
                event: QualityEvent::Other("ONBOARDING".into()),
                limit: None
            },
            "an unreadable limit is left out, the event kept"
        );
        assert_eq!(
            parse(&body("phone_number_quality_update", json!({"display_phone_number": "15550783881"}))),
            Err(SignalField::PhoneNumberQuality),
            "no event"
        );
    }

    #[test]
    fn a_portfolios_messaging_limit() {
        for (value, tier, daily_limit) in [
            (json!(250), Some(Tier::Tier250), Some(250)),
            (json!(2000), Some(Tier::Tier2K), Some(2000)),
            (json!("100000"), Some(Tier::Tier100K), Some(100_000)),
            (json!(-1), Some(Tier::Unlimited), None),
            (json!(5000), None, Some(5000)),
        ] {
            let change = body(
                "business_capability_update",
                json!({"max_daily_conversations_per_business": value, "max_phone_numbers_per_business": 2}),
            );
            assert_eq!(
                parse(&change).unwrap().change,
                SignalChange::Capability { limit: Some(MessagingLimit { tier, daily_limit }) },
                "{value}"
            );
        }
        let without = body("business_capability_update", json!({"max_phone_numbers_per_waba": 25}));
        assert_eq!(parse(&without).unwrap().change, SignalChange::Capability { limit: None });
        let odd = body("business_capability_update", json!({"max_daily_conversations_per_business": -7}));
        assert_eq!(parse(&odd), Err(SignalField::BusinessCapability));
    }

    #[test]
    fn a_restriction_on_business_initiated_messaging() {
        let until = Utc.timestamp_opt(1_767_225_600, 0).unwrap();
        assert_eq!(
            parse(ACCOUNT).unwrap().change,
            SignalChange::Account {
                event: Some("ACCOUNT_RESTRICTION".into()),
                biz_restriction: Some(Restriction { kind: BIZ_INITIATED_RESTRICTION.into(), until }),
                other_restrictions: vec![],
            }
        );
        let others = body(
            "account_update",
            json!({"event": "ACCOUNT_RESTRICTION", "restriction_info": [
                {"restriction_type": "RESTRICTED_ADD_PHONE_NUMBER_ACTION", "expiration": 1767225600},
                {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": "1767225000"},
                {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": 1767225600},
                {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING"},
                {"expiration": 1767225600}
            ]}),
        );
        assert_eq!(
            parse(&others).unwrap().change,
            SignalChange::Account {
                event: Some("ACCOUNT_RESTRICTION".into()),
                biz_restriction: Some(Restriction { kind: BIZ_INITIATED_RESTRICTION.into(), until }),
                other_restrictions: vec!["RESTRICTED_ADD_PHONE_NUMBER_ACTION".into(), BIZ_INITIATED_RESTRICTION.into()],
            },
            "the latest end wins; one without an end is not recorded"
        );
        let violation =
            body("account_update", json!({"event": "ACCOUNT_VIOLATION", "violation_info": {"violation_type": "SCAM"}}));
        assert_eq!(
            parse(&violation).unwrap().change,
            SignalChange::Account {
                event: Some("ACCOUNT_VIOLATION".into()),
                biz_restriction: None,
                other_restrictions: vec![]
            }
        );
    }

    #[test]
    fn a_templates_status_and_quality() {
        assert_eq!(
            parse(TEMPLATE_STATUS),
            Ok(AccountSignal {
                waba_id: WABA.into(),
                change: SignalChange::TemplateStatus {
                    template: template("welcome", "pt_BR"),
                    status: "PAUSED".into(),
                    reason: Some("LOW_QUALITY".into()),
                },
            })
        );
        let approved = TEMPLATE_STATUS.replace("PAUSED", "APPROVED").replace("LOW_QUALITY", "NONE");
        assert_eq!(
            parse(&approved).unwrap().change,
            SignalChange::TemplateStatus {
                template: template("welcome", "pt_BR"),
                status: "APPROVED".into(),
                reason: None
            }
        );
        let quality = body(
            "message_template_quality_update",
            json!({"previous_quality_score": "GREEN", "new_quality_score": "YELLOW", "message_template_id": 594425479261596u64,
                   "message_template_name": "welcome", "message_template_language": "pt_BR"}),
        );
        assert_eq!(
            parse(&quality),
            Ok(AccountSignal {
                waba_id: WABA.into(),
                change: SignalChange::TemplateQuality {
                    template: template("welcome", "pt_BR"),
                    quality: "YELLOW".into()
                },
            })
        );
        let nameless = body("message_template_quality_update", json!({"new_quality_score": "RED"}));
        assert_eq!(parse(&nameless), Err(SignalField::TemplateQuality));
        let no_waba = TEMPLATE_STATUS.replace(r#""id":"102290129340398","#, "");
        assert_eq!(parse(&no_waba), Err(SignalField::TemplateStatus));
        let numeric_waba = TEMPLATE_STATUS.replace(r#""102290129340398""#, "102290129340398");
        assert_eq!(parse(&numeric_waba).unwrap().waba_id, WABA);
    }

    fn row(channel: &str, waba: Option<&str>, phone: Option<&str>, portfolio: Option<&str>) -> ChannelRow {
        ChannelRow {
            channel: channel.into(),
            waba_id: waba.map(Into::into),
            display_phone: phone.map(Into::into),
            portfolio: portfolio.map(Into::into),
        }
    }

    fn routed(channels: &[&str], portfolios: &[&str]) -> Route {
        Route {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            portfolios: portfolios.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn signals_go_to_the_channels_of_their_waba() {
        let rows = [
            row("wa", Some(WABA), Some("+1 555 078 3881"), Some("acme-bp")),
            row("wa2", Some(WABA), Some("15550783882"), Some("acme-bp")),
            row("wa3", Some(WABA), None, Some("other-bp")),
            row("url", Some("999"), Some("15550783881"), Some("elsewhere")),
        ];
        // the whole WABA, whatever channel the URL named
        assert_eq!(route(&rows, "url", WABA, None), routed(&["wa", "wa2", "wa3"], &["acme-bp", "other-bp"]));
        // a number's quality: the channel of that number (digits compared)
        assert_eq!(route(&rows, "url", WABA, Some("15550783881")), routed(&["wa"], &["acme-bp"]));
        // a number no channel has recorded: all of the WABA's
        assert_eq!(
            route(&rows, "url", WABA, Some("15550000000")),
            routed(&["wa", "wa2", "wa3"], &["acme-bp", "other-bp"])
        );
        // no channel of that WABA: the URL's channel, with its portfolio if it names one
        assert_eq!(route(&rows, "url", "777", Some("15550783881")), routed(&["url"], &["elsewhere"]));
        assert_eq!(route(&rows[..3], "new", "777", None), routed(&["new"], &[]), "the row is created");
        let unrecorded = [row("wa", None, None, None)];
        assert_eq!(route(&unrecorded, "wa", WABA, None), routed(&["wa"], &[]));
    }

    #[test]
    fn fields_are_named_as_meta_names_them() {
        for field in [
            SignalField::PhoneNumberQuality,
            SignalField::BusinessCapability,
            SignalField::Account,
            SignalField::TemplateStatus,
            SignalField::TemplateQuality,
        ] {
            assert_eq!(SignalField::parse(field.as_str()), Some(field));
        }
        assert_eq!(SignalField::parse("messages"), None);
        assert_eq!(SignalField::parse("security"), None);
    }
}
