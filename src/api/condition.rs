//! Status conditions (metav1.Condition) with named types and reasons, merged the
//! Kubernetes way: `lastTransitionTime` only moves when the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types Disparo sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The resource reached its goal: a Channel can send; a Campaign completed.
    Ready,
    /// The controller is working towards the goal (sending, waiting for the schedule).
    Reconciling,
    /// Progress is blocked until a person acts (missing channel, failed preflight).
    Stalled,
    /// The audience was frozen into Postgres.
    AudienceFrozen,
    /// The channel's rate window is spent.
    RateLimited,
    /// Meta rates the channel's number low (FLAGGED, DOWNGRADE, or a RED rating).
    QualityDegraded,
    /// Meta's account signals hold the campaign back (quality, template, restriction).
    Held,
    /// Meta rates the campaign's template RED: it may soon pause it.
    TemplateQualityLow,
}

impl ConditionType {
    /// The type string written in the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
            ConditionType::AudienceFrozen => "AudienceFrozen",
            ConditionType::RateLimited => "RateLimited",
            ConditionType::QualityDegraded => "QualityDegraded",
            ConditionType::Held => "Held",
            ConditionType::TemplateQualityLow => "TemplateQualityLow",
        }
    }
}

/// One condition the controller wants, before merging with what is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DesiredCondition {
    /// Which condition.
    pub type_: ConditionType,
    /// True or false.
    pub status: bool,
    /// CamelCase reason, e.g. `ChannelNotFound`.
    pub reason: &'static str,
    /// A sentence a person understands.
    pub message: String,
}

impl DesiredCondition {
    /// A condition that holds.
    pub(crate) fn truthy(type_: ConditionType, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: true, reason, message: message.into() }
    }

    /// A condition that does not hold.
    pub(crate) fn falsy(type_: ConditionType, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: false, reason, message: message.into() }
    }
}

/// Merges `desired` into `existing`: conditions keep their `lastTransitionTime` unless
/// their status flips; types not in `desired` are kept as they are.
pub(crate) fn merge_conditions(
    existing: &[Condition],
    desired: &[DesiredCondition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing.to_vec();
    for want in desired {
        let status = if want.status { "True" } else { "False" }.to_owned();
        let fresh = Condition {
            type_: want.type_.as_str().to_owned(),
            status: status.clone(),
            reason: want.reason.to_owned(),
            message: want.message.clone(),
            observed_generation: generation,
            last_transition_time: now.clone(),
        };
        match merged.iter_mut().find(|c| c.type_ == want.type_.as_str()) {
            Some(current) if current.status == status => {
                current.reason = fresh.reason;
                current.message = fresh.message;
                current.observed_generation = generation;
            }
            Some(current) => *current = fresh,
            None => merged.push(fresh),
        }
    }
    merged
}

/// Finds a condition by type.
pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn at(secs: i64) -> Time {
        crate::api::time::k8s(Utc.timestamp_opt(secs, 0).single().unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge_conditions(
            &[],
            &[DesiredCondition::falsy(ConditionType::Ready, "Sending", "sending")],
            Some(1),
            &at(100),
        );
        let same = merge_conditions(
            &first,
            &[DesiredCondition::falsy(ConditionType::Ready, "Sending", "50% sent")],
            Some(2),
            &at(200),
        );
        assert_eq!(same[0].last_transition_time, at(100));
        assert_eq!(same[0].message, "50% sent");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(
            &same,
            &[DesiredCondition::truthy(ConditionType::Ready, "Completed", "done")],
            Some(2),
            &at(300),
        );
        assert_eq!(flipped[0].last_transition_time, at(300));
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn unrelated_conditions_are_kept() {
        let first = merge_conditions(
            &[],
            &[DesiredCondition::truthy(ConditionType::AudienceFrozen, "Frozen", "10 messages")],
            None,
            &at(1),
        );
        let both = merge_conditions(
            &first,
            &[DesiredCondition::truthy(ConditionType::Ready, "Completed", "done")],
            None,
            &at(2),
        );
        assert_eq!(both.len(), 2);
        assert!(find(&both, ConditionType::AudienceFrozen).is_some());
    }
}
