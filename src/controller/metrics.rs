//! Controller metrics beside the controller: reconciles by kind and result, durations,
//! errors by cause, campaigns by phase, leadership, and one set of series per Campaign
//! and Channel taken from the status the controller has just written. Those are the
//! durable figures (counted in Postgres); a sender's own metrics (rates, provider codes,
//! latency) come from its pod and stop with it.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::condition::ConditionType;
use crate::api::{CampaignStatus, ChannelStatus, Phase};

/// Labels for reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Campaign or Channel.
    pub kind: String,
}

/// Labels for errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Campaign or Channel.
    pub kind: String,
    /// The error variant.
    pub error: String,
}

/// Labels for the phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase.
    pub phase: String,
}

/// Labels of a campaign's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CampaignLabels {
    /// The Campaign's namespace.
    pub namespace: String,
    /// Its name.
    pub campaign: String,
    /// Its Channel.
    pub channel: String,
}

/// Labels of a campaign's message counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CampaignMessageLabels {
    /// The Campaign's namespace.
    pub namespace: String,
    /// Its name.
    pub campaign: String,
    /// Its Channel.
    pub channel: String,
    /// pending, sent, delivered, read, failed, unknown, skipped, cancelled,
    /// marketing_limited (`sent`, `delivered` count messages that reached at least it).
    pub status: String,
}

/// Labels of a campaign's condition that holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CampaignConditionLabels {
    /// The Campaign's namespace.
    pub namespace: String,
    /// Its name.
    pub campaign: String,
    /// The condition type, e.g. Stalled.
    pub condition: String,
    /// Its reason, e.g. ChannelStopped.
    pub reason: String,
}

/// Labels of a channel's condition that holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelConditionLabels {
    /// The Channel's namespace.
    pub namespace: String,
    /// Its name.
    pub channel: String,
    /// The condition type, e.g. QualityDegraded.
    pub condition: String,
    /// Its reason.
    pub reason: String,
}

/// Labels of a Channel's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    /// The Channel's namespace.
    pub namespace: String,
    /// Its name.
    pub channel: String,
}

/// Labels of a Channel's caps.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabels {
    /// The Channel's namespace.
    pub namespace: String,
    /// Its name.
    pub channel: String,
    /// second, minute, hour or day.
    pub window: String,
}

/// A campaign's conditions exported as series while they hold. Its `Ready` is false
/// all the while it runs, so it says nothing a person must act on.
const CAMPAIGN_CONDITIONS: [ConditionType; 4] =
    [ConditionType::Stalled, ConditionType::Held, ConditionType::RateLimited, ConditionType::TemplateQualityLow];
/// A channel's conditions exported as series while they hold, and `Ready` while it
/// does not (a channel that cannot send is what pages).
const CHANNEL_CONDITIONS: [ConditionType; 2] = [ConditionType::QualityDegraded, ConditionType::Ready];

/// What was last exported for one object, to remove it exactly when it goes.
struct Exported<C> {
    conditions: Vec<C>,
    caps: Vec<CapLabels>,
    channel: Option<String>,
}

impl<C> Default for Exported<C> {
    fn default() -> Self {
        Exported { conditions: Vec::new(), caps: Vec::new(), channel: None }
    }
}

/// The controller's metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconcile failures by cause.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile durations.
    pub duration: Family<KindLabels, Histogram>,
    /// Campaigns by phase.
    pub phases: Family<PhaseLabels, Gauge>,
    /// 1 while this instance holds the lease.
    pub leader: Gauge,
    campaign_messages: Family<CampaignMessageLabels, Gauge>,
    campaign_audience: Family<CampaignLabels, Gauge>,
    campaign_rate: Family<CampaignLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    campaign_eta: Family<CampaignLabels, Gauge>,
    campaign_rate_limit_pauses: Family<CampaignLabels, Gauge>,
    campaign_phase: Family<CampaignPhaseLabels, Gauge>,
    campaign_conditions: Family<CampaignConditionLabels, Gauge>,
    channel_conditions: Family<ChannelConditionLabels, Gauge>,
    channel_caps: Family<CapLabels, Gauge>,
    channel_budget_used: Family<ChannelLabels, Gauge>,
    channel_budget_limit: Family<ChannelLabels, Gauge>,
    known: Mutex<HashMap<String, Phase>>,
    exported_campaigns: Mutex<HashMap<(String, String), Exported<CampaignConditionLabels>>>,
    exported_channels: Mutex<HashMap<(String, String), Exported<ChannelConditionLabels>>>,
}

/// Labels of a campaign's phase series (1 for its current phase).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CampaignPhaseLabels {
    /// The Campaign's namespace.
    pub namespace: String,
    /// Its name.
    pub campaign: String,
    /// Its Channel.
    pub channel: String,
    /// Its phase.
    pub phase: String,
}

/// The message statuses a campaign's counts are exported by.
const MESSAGE_STATUSES: [&str; 9] =
    ["pending", "sent", "delivered", "read", "failed", "unknown", "skipped", "cancelled", "marketing_limited"];

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 12))),
            phases: Family::default(),
            leader: Gauge::default(),
            campaign_messages: Family::default(),
            campaign_audience: Family::default(),
            campaign_rate: Family::default(),
            campaign_eta: Family::default(),
            campaign_rate_limit_pauses: Family::default(),
            campaign_phase: Family::default(),
            campaign_conditions: Family::default(),
            channel_conditions: Family::default(),
            channel_caps: Family::default(),
            channel_budget_used: Family::default(),
            channel_budget_limit: Family::default(),
            known: Mutex::new(HashMap::new()),
            exported_campaigns: Mutex::new(HashMap::new()),
            exported_channels: Mutex::new(HashMap::new()),
        };
        registry.register("disparo_controller_reconciles", "Reconciles run", metrics.reconciles.clone());
        registry.register(
            "disparo_controller_reconcile_failures",
            "Reconcile failures by cause",
            metrics.failures.clone(),
        );
        registry.register(
            "disparo_controller_reconcile_duration_seconds",
            "Reconcile duration",
            metrics.duration.clone(),
        );
        registry.register("disparo_campaigns", "Campaigns by phase", metrics.phases.clone());
        registry.register("disparo_controller_leader", "1 while this instance leads", metrics.leader.clone());
        registry.register(
            "disparo_campaign_messages",
            "A campaign's messages by status, as counted in Postgres",
            metrics.campaign_messages.clone(),
        );
        registry.register(
            "disparo_campaign_audience_size",
            "Messages in a campaign's frozen audience",
            metrics.campaign_audience.clone(),
        );
        registry.register(
            "disparo_campaign_send_rate_per_minute",
            "Messages a campaign sent per minute recently",
            metrics.campaign_rate.clone(),
        );
        registry.register(
            "disparo_campaign_eta_seconds",
            "Seconds until a campaign is estimated to finish at its current rate",
            metrics.campaign_eta.clone(),
        );
        registry.register(
            "disparo_campaign_rate_limit_pauses",
            "Times a campaign paused for a spent cap or messaging limit",
            metrics.campaign_rate_limit_pauses.clone(),
        );
        registry.register("disparo_campaign_phase", "1 for a campaign's current phase", metrics.campaign_phase.clone());
        registry.register(
            "disparo_campaign_condition",
            "1 while a campaign's condition holds (Ready: while it does not)",
            metrics.campaign_conditions.clone(),
        );
        registry.register(
            "disparo_channel_condition",
            "1 while a channel's condition holds (Ready: while it does not)",
            metrics.channel_conditions.clone(),
        );
        registry.register(
            "disparo_channel_rate_cap",
            "Messages a channel may send per window (absent: no cap)",
            metrics.channel_caps.clone(),
        );
        registry.register(
            "disparo_channel_budget_used",
            "Unique recipients counted in the channel's portfolio in the last 24 h",
            metrics.channel_budget_used.clone(),
        );
        registry.register(
            "disparo_channel_budget_limit",
            "The portfolio's 24 h unique-recipient limit (absent: unlimited or unknown)",
            metrics.channel_budget_limit.clone(),
        );
        for phase in Phase::ALL {
            metrics.phases.get_or_create(&PhaseLabels { phase: phase.to_string() }).set(0);
        }
        metrics
    }

    /// Records the phase of a campaign (keyed by namespace/name), keeping the gauge exact.
    pub(crate) fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let Ok(mut known) = self.known.lock() else { return };
        let previous = match phase {
            Some(p) => known.insert(key.to_owned(), p),
            None => known.remove(key),
        };
        if previous == phase {
            return;
        }
        if let Some(p) = previous {
            self.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).dec();
        }
        if let Some(p) = phase {
            self.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).inc();
        }
    }

    /// Exports a campaign's series from the status just written.
    pub(crate) fn observe_campaign(
        &self,
        namespace: &str,
        name: &str,
        channel: &str,
        status: &CampaignStatus,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let Ok(mut exported) = self.exported_campaigns.lock() else { return };
        let key = (namespace.to_owned(), name.to_owned());
        let previous = exported.remove(&key).unwrap_or_default();
        if previous.channel.as_deref().is_some_and(|c| c != channel) {
            self.remove_campaign_series(namespace, name, &previous);
        }
        let labels = CampaignLabels { namespace: namespace.into(), campaign: name.into(), channel: channel.into() };
        if let Some(m) = &status.messages {
            let counts = [
                m.pending,
                m.sent,
                m.delivered,
                m.read,
                m.failed,
                m.unknown,
                m.skipped,
                m.cancelled,
                m.marketing_limited,
            ];
            for (status, count) in MESSAGE_STATUSES.iter().zip(counts) {
                self.campaign_messages.get_or_create(&message_labels(&labels, status)).set(count);
            }
            self.campaign_audience.get_or_create(&labels).set(m.total);
        }
        if let Some(progress) = &status.progress {
            self.campaign_rate.get_or_create(&labels).set(progress.rate_per_minute);
            match &progress.eta {
                Some(eta) => {
                    let left = (crate::api::time::instant(&eta.0) - now).num_seconds().max(0);
                    self.campaign_eta.get_or_create(&labels).set(left);
                }
                None => {
                    self.campaign_eta.remove(&labels);
                }
            }
        }
        if let Some(rate_limit) = &status.rate_limit {
            self.campaign_rate_limit_pauses.get_or_create(&labels).set(rate_limit.pauses);
        }
        for phase in Phase::ALL {
            let phase_labels = phase_labels(&labels, phase);
            if status.phase == Some(phase) {
                self.campaign_phase.get_or_create(&phase_labels).set(1);
            } else {
                self.campaign_phase.remove(&phase_labels);
            }
        }
        let conditions = export_conditions(
            &self.campaign_conditions,
            &CAMPAIGN_CONDITIONS,
            &status.conditions,
            previous.conditions,
            |condition, reason| CampaignConditionLabels {
                namespace: namespace.into(),
                campaign: name.into(),
                condition,
                reason,
            },
        );
        exported.insert(key, Exported { conditions, caps: Vec::new(), channel: Some(channel.to_owned()) });
    }

    /// Removes the series of campaigns and channels that no longer exist (neither has
    /// a deletion hook of its own: a Channel has no finalizer).
    pub(crate) fn retain(
        &self,
        campaign_exists: impl Fn(&str, &str) -> bool,
        channel_exists: impl Fn(&str, &str) -> bool,
    ) {
        if let Ok(mut exported) = self.exported_campaigns.lock() {
            let gone: Vec<_> = exported.keys().filter(|(ns, name)| !campaign_exists(ns, name)).cloned().collect();
            for key in gone {
                if let Some(previous) = exported.remove(&key) {
                    self.remove_campaign_series(&key.0, &key.1, &previous);
                }
            }
        }
        if let Ok(mut exported) = self.exported_channels.lock() {
            let gone: Vec<_> = exported.keys().filter(|(ns, name)| !channel_exists(ns, name)).cloned().collect();
            for key in gone {
                if let Some(previous) = exported.remove(&key) {
                    let labels = ChannelLabels { namespace: key.0.clone(), channel: key.1.clone() };
                    self.channel_budget_used.remove(&labels);
                    self.channel_budget_limit.remove(&labels);
                    for c in &previous.caps {
                        self.channel_caps.remove(c);
                    }
                    for c in &previous.conditions {
                        self.channel_conditions.remove(c);
                    }
                }
            }
        }
    }

    fn remove_campaign_series(&self, namespace: &str, name: &str, previous: &Exported<CampaignConditionLabels>) {
        let labels = CampaignLabels {
            namespace: namespace.into(),
            campaign: name.into(),
            channel: previous.channel.clone().unwrap_or_default(),
        };
        for status in MESSAGE_STATUSES {
            self.campaign_messages.remove(&message_labels(&labels, status));
        }
        for family in [&self.campaign_audience, &self.campaign_eta, &self.campaign_rate_limit_pauses] {
            family.remove(&labels);
        }
        self.campaign_rate.remove(&labels);
        for phase in Phase::ALL {
            self.campaign_phase.remove(&phase_labels(&labels, phase));
        }
        for c in &previous.conditions {
            self.campaign_conditions.remove(c);
        }
    }

    /// Exports a channel's series from the status just written and its caps.
    pub(crate) fn observe_channel(
        &self,
        namespace: &str,
        name: &str,
        status: &ChannelStatus,
        caps: &[(&'static str, Option<u32>)],
    ) {
        let Ok(mut exported) = self.exported_channels.lock() else { return };
        let key = (namespace.to_owned(), name.to_owned());
        let previous = exported.remove(&key).unwrap_or_default();
        let labels = ChannelLabels { namespace: namespace.into(), channel: name.into() };
        let mut exported_caps = Vec::new();
        for (window, cap) in caps {
            let cap_labels = CapLabels { namespace: namespace.into(), channel: name.into(), window: (*window).into() };
            match cap {
                Some(cap) => {
                    self.channel_caps.get_or_create(&cap_labels).set(i64::from(*cap));
                    exported_caps.push(cap_labels);
                }
                None => {
                    self.channel_caps.remove(&cap_labels);
                }
            }
        }
        for stale in previous.caps.iter().filter(|c| !exported_caps.contains(c)) {
            self.channel_caps.remove(stale);
        }
        match status.account.as_ref().and_then(|a| a.budget.as_ref()) {
            Some(budget) => {
                self.channel_budget_used.get_or_create(&labels).set(budget.used_24h);
                if let Some(limit) = budget.limit {
                    self.channel_budget_limit.get_or_create(&labels).set(limit);
                } else {
                    self.channel_budget_limit.remove(&labels);
                }
            }
            None => {
                self.channel_budget_used.remove(&labels);
                self.channel_budget_limit.remove(&labels);
            }
        }
        let conditions = export_conditions(
            &self.channel_conditions,
            &CHANNEL_CONDITIONS,
            &status.conditions,
            previous.conditions,
            |condition, reason| ChannelConditionLabels {
                namespace: namespace.into(),
                channel: name.into(),
                condition,
                reason,
            },
        );
        exported.insert(key, Exported { conditions, caps: exported_caps, channel: None });
    }

    /// Starts timing a reconcile; the duration is observed when the guard drops.
    pub fn start(&self, kind: &str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
        ReconcileTimer { metrics: self, kind: kind.to_owned(), started: std::time::Instant::now() }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: String,
    started: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&KindLabels { kind: self.kind.clone() })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Every 30 s until `stop`, removes the series of campaigns and channels that the
/// controllers' caches no longer hold.
pub(crate) async fn sweep_deleted(
    ctx: std::sync::Arc<super::Context>,
    campaigns: kube::runtime::reflector::Store<crate::api::Campaign>,
    channels: kube::runtime::reflector::Store<crate::api::Channel>,
    stop: impl std::future::Future<Output = ()>,
) {
    use kube::runtime::reflector::ObjectRef;
    let sweep = async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tick.tick().await;
            ctx.metrics.retain(
                |ns, name| campaigns.get(&ObjectRef::new(name).within(ns)).is_some(),
                |ns, name| channels.get(&ObjectRef::new(name).within(ns)).is_some(),
            );
        }
    };
    tokio::select! {
        () = sweep => {}
        () = stop => {}
    }
}

fn message_labels(labels: &CampaignLabels, status: &str) -> CampaignMessageLabels {
    CampaignMessageLabels {
        namespace: labels.namespace.clone(),
        campaign: labels.campaign.clone(),
        channel: labels.channel.clone(),
        status: status.to_owned(),
    }
}

fn phase_labels(labels: &CampaignLabels, phase: Phase) -> CampaignPhaseLabels {
    CampaignPhaseLabels {
        namespace: labels.namespace.clone(),
        campaign: labels.campaign.clone(),
        channel: labels.channel.clone(),
        phase: phase.to_string(),
    }
}

/// Which of `types` are exported: those that hold, and Ready when it does not.
pub(crate) fn exported_conditions(
    types: &[ConditionType],
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<(String, String)> {
    conditions
        .iter()
        .filter(|c| {
            types.iter().any(|t| t.as_str() == c.type_)
                && (c.status == "True") != (c.type_ == ConditionType::Ready.as_str())
        })
        .map(|c| (c.type_.clone(), c.reason.clone()))
        .collect()
}

/// Sets the conditions' series and removes those that stopped holding.
fn export_conditions<L>(
    family: &Family<L, Gauge>,
    types: &[ConditionType],
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    previous: Vec<L>,
    labels: impl Fn(String, String) -> L,
) -> Vec<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let now: Vec<L> = exported_conditions(types, conditions)
        .into_iter()
        .map(|(condition, reason)| labels(condition, reason))
        .collect();
    for stale in previous.iter().filter(|c| !now.contains(c)) {
        family.remove(stale);
    }
    for c in &now {
        family.get_or_create(c).set(1);
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_gauge_follows_transitions() {
        let m = Metrics::new(&mut Registry::default());
        m.set_phase("a/x", Some(Phase::Running));
        m.set_phase("a/x", Some(Phase::Running));
        m.set_phase("a/y", Some(Phase::Running));
        m.set_phase("a/x", Some(Phase::Completed));
        let get = |p: Phase| m.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).get();
        assert_eq!((get(Phase::Running), get(Phase::Completed)), (1, 1));
        m.set_phase("a/y", None);
        assert_eq!(get(Phase::Running), 0);
    }

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn condition(type_: &str, status: &str, reason: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: crate::api::time::k8s(chrono::Utc::now()),
            observed_generation: None,
        }
    }

    #[test]
    fn a_campaign_s_series_follow_its_status_and_go_with_it() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let mut status = CampaignStatus {
            phase: Some(Phase::Paused),
            messages: Some(crate::api::MessageCounts {
                total: 10,
                pending: 4,
                sent: 6,
                delivered: 5,
                ..Default::default()
            }),
            conditions: vec![
                condition("Stalled", "True", "ChannelStopped"),
                condition("Ready", "False", "Paused"),
                condition("RateLimited", "False", "WindowOpen"),
            ],
            ..Default::default()
        };
        m.observe_campaign("acme", "promo", "main", &status, chrono::Utc::now());
        let text = encoded(&registry);
        assert!(
            text.contains(
                r#"disparo_campaign_messages{namespace="acme",campaign="promo",channel="main",status="pending"} 4"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"disparo_campaign_phase{namespace="acme",campaign="promo",channel="main",phase="Paused"} 1"#
            )
        );
        assert!(!text.contains(r#"phase="Running"} 1"#));
        assert!(text.contains(
            r#"disparo_campaign_condition{namespace="acme",campaign="promo",condition="Stalled",reason="ChannelStopped"} 1"#
        ));
        assert!(!text.contains(r#"condition="Ready""#), "a campaign's Ready says nothing to act on");
        assert!(!text.contains(r#"condition="RateLimited""#), "a condition that does not hold is not exported");

        status.phase = Some(Phase::Running);
        status.conditions = vec![condition("Stalled", "False", "Progressing"), condition("Ready", "True", "Running")];
        m.observe_campaign("acme", "promo", "main", &status, chrono::Utc::now());
        let text = encoded(&registry);
        assert!(!text.contains(r#"condition="Stalled""#), "a lifted condition goes: {text}");
        assert!(!text.contains(r#"phase="Paused"} 1"#));

        m.retain(|_, _| false, |_, _| false);
        let text = encoded(&registry);
        assert!(!text.contains(r#"campaign="promo""#), "a deleted campaign's series go: {text}");
    }

    #[test]
    fn a_channel_s_caps_budget_and_stop_are_exported() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let status = ChannelStatus {
            conditions: vec![condition("Ready", "False", "ProviderRefused")],
            account: Some(crate::api::AccountStatus {
                budget: Some(crate::api::PortfolioBudget {
                    portfolio: "p".into(),
                    limit: Some(250),
                    used_24h: 40,
                    resets_at: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        m.observe_channel("acme", "main", &status, &[("minute", Some(20)), ("hour", None), ("day", Some(500))]);
        let text = encoded(&registry);
        assert!(
            text.contains(r#"disparo_channel_rate_cap{namespace="acme",channel="main",window="minute"} 20"#),
            "{text}"
        );
        assert!(!text.contains(r#"window="hour""#));
        assert!(text.contains(r#"disparo_channel_budget_used{namespace="acme",channel="main"} 40"#));
        assert!(text.contains(r#"disparo_channel_budget_limit{namespace="acme",channel="main"} 250"#));
        assert!(text.contains(
            r#"disparo_channel_condition{namespace="acme",channel="main",condition="Ready",reason="ProviderRefused"} 1"#
        ));
        m.retain(|_, _| true, |_, _| false);
        assert!(!encoded(&registry).contains(r#"channel="main""#));
    }
}
