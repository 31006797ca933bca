//! What a reconcile tells people: the phase it moves to, status, conditions and Events.

use super::*;

/// The phase event a step means, given the phase before and whether a Job exists.
pub(super) fn event_for(step: &Step, old: Option<Phase>, has_job: bool) -> Option<PhaseEvent> {
    Some(match step {
        Step::Nothing
        | Step::Preflight
        | Step::ReplaceJob
        | Step::AwaitJobDeletion
        | Step::PodsFailing(_)
        | Step::AwaitRequeued(_)
        | Step::SendRequeued => {
            return None;
        }
        // Stalled means not sending: a campaign that was sending is paused until it can go on.
        Step::Stall(_) if has_job => PhaseEvent::Suspend,
        Step::Stall(_) => return None,
        Step::Cancel => PhaseEvent::Cancel,
        Step::Draft => PhaseEvent::CreatedSuspended,
        Step::Pause
        | Step::ChannelStopped(_)
        | Step::MessageRejected(_)
        | Step::HoldAutomaticPause(_)
        | Step::AccountHold(_) => PhaseEvent::Suspend,
        Step::WaitForSchedule(_) => PhaseEvent::AwaitStart,
        Step::RateLimit(_) => PhaseEvent::RateLimitHit,
        Step::PauseForFailures(_) => PhaseEvent::FailureThresholdExceeded,
        Step::CreateJob | Step::ResumeJob | Step::Track => match old {
            Some(Phase::Paused) => PhaseEvent::Resume,
            Some(Phase::RateLimited) => PhaseEvent::RateWindowReset,
            Some(Phase::Draft) => PhaseEvent::Resume,
            Some(Phase::Running) => return None,
            _ => PhaseEvent::Start,
        },
        Step::Complete => PhaseEvent::JobSucceeded,
        Step::Fail(_) => PhaseEvent::Fail,
        Step::Restart => PhaseEvent::Restart,
        Step::Reopen => PhaseEvent::Requeued,
    })
}

/// The condition reason and Warning Event a step raises, if it needs a person.
pub(super) fn warning_for(step: &Step) -> Option<(&'static str, String)> {
    Some(match step {
        Step::Fail(why) => ("Failed", why.clone()),
        Step::PauseForFailures(why) | Step::HoldAutomaticPause(why) => ("FailureThresholdExceeded", why.clone()),
        Step::ChannelStopped(why) => ("ChannelStopped", why.clone()),
        Step::MessageRejected(why) => ("MessageRejected", why.clone()),
        Step::Stall(why) => ("Blocked", why.clone()),
        Step::PodsFailing(why) => ("SenderPodsFailing", why.clone()),
        Step::AccountHold(hold) => (hold.reason(), hold.message()),
        _ => return None,
    })
}

/// What a reconcile decided, for status and Events.
pub(super) struct Outcome {
    pub(super) phase: Option<Phase>,
    pub(super) conditions: Vec<DesiredCondition>,
    pub(super) requeue: Action,
}

pub(super) fn phase_conditions(phase: Option<Phase>, frozen: bool) -> Vec<DesiredCondition> {
    let phase_name = phase.map_or("Pending", Phase::as_str);
    let mut out = vec![
        match phase {
            Some(Phase::Completed) => {
                DesiredCondition::truthy(ConditionType::Ready, "Completed", "every message reached a final state")
            }
            _ => DesiredCondition::falsy(
                ConditionType::Ready,
                phase.map_or("Pending", Phase::as_str),
                format!("campaign is {phase_name}"),
            ),
        },
        match phase {
            Some(Phase::Scheduled | Phase::Running | Phase::RateLimited) | None => DesiredCondition::truthy(
                ConditionType::Reconciling,
                phase.map_or("Pending", Phase::as_str),
                format!("campaign is {phase_name}"),
            ),
            _ => DesiredCondition::falsy(
                ConditionType::Reconciling,
                phase.map_or("Pending", Phase::as_str),
                format!("campaign is {phase_name}"),
            ),
        },
    ];
    if phase != Some(Phase::RateLimited) {
        out.push(DesiredCondition::falsy(
            ConditionType::RateLimited,
            "WindowAvailable",
            "the channel's windows have room",
        ));
    }
    out.push(DesiredCondition::falsy(
        ConditionType::Held,
        "NotHeld",
        "Meta's account signals do not hold the campaign back",
    ));
    if frozen {
        out.push(DesiredCondition::truthy(
            ConditionType::AudienceFrozen,
            "Frozen",
            "the audience is frozen in Postgres",
        ));
    }
    out
}

/// What the reconcile observed that status is computed from.
pub(super) struct Observed<'a> {
    pub(super) counters: Option<&'a Counters>,
    pub(super) job: Option<&'a Job>,
}

/// Writes status (when it changed) and emits the Event of a phase change.
pub(super) async fn finish(
    campaign: &Campaign,
    ctx: &Context,
    old: &CampaignStatus,
    mut status: CampaignStatus,
    outcome: Outcome,
    observed: Observed<'_>,
    reason: Option<(&'static str, String)>,
) -> Result<Action> {
    let Observed { counters, job } = observed;
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = campaign.name_any();
    let now = Utc::now();
    status.phase = outcome.phase;
    status.observed_generation = campaign.metadata.generation;
    if let Some(c) = counters {
        let errors = store::campaigns::error_breakdown(&ctx.pool, uid_of(campaign)?, 10).await?;
        let mut counts = view::message_counts(c);
        counts.marketing_limited = store::campaigns::marketing_limited(&ctx.pool, uid_of(campaign)?).await?;
        status.messages = Some(counts);
        let finished = outcome.phase.is_some_and(Phase::is_terminal);
        if let Some(cost) = super::super::cost::refresh(ctx, uid_of(campaign)?, finished).await? {
            status.cost = Some(cost);
        }
        status.progress = Some(view::progress(c, now));
        status.rates = Some(view::rates(c));
        status.retries = Some(view::retry_stats(c, &errors));
        if let Some(audience) = status.audience.as_mut() {
            audience.size = c.total;
        } else {
            status.audience =
                Some(AudienceStatus { frozen_at: None, frozen_generation: None, size: c.total, drift: None });
        }
    }
    if let Some(audience) = status.audience.as_mut()
        && let Some(frozen_gen) = audience.frozen_generation
        && campaign.metadata.generation.is_some_and(|g| g > frozen_gen)
    {
        // The CRD only lets the audience change while suspended; any change after freezing is reported, not applied.
        audience.drift = Some(
            "spec changed after the audience was frozen: audience edits are not applied to a started campaign".into(),
        );
    }
    // The Job as observed at the start of this reconcile: one read per reconcile; a Job
    // created or patched just now shows up at the next refresh.
    if let Some(job) = job {
        let completions = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(0);
        let uid = campaign.uid().unwrap_or_default();
        status.batches = Some(view::batch_counts(&job_name(&name, &uid), completions, job.status.as_ref()));
    }
    let mut desired = phase_conditions(status.phase, counters.is_some());
    desired.extend(outcome.conditions.iter().cloned());
    if !desired.iter().any(|c| c.type_ == ConditionType::Stalled) {
        desired.push(DesiredCondition::falsy(ConditionType::Stalled, "Progressing", "nothing blocks the campaign"));
    }
    // The last condition of a type wins.
    let mut dedup: Vec<DesiredCondition> = Vec::new();
    for c in desired {
        dedup.retain(|d| d.type_ != c.type_);
        dedup.push(c);
    }
    status.conditions = merge_conditions(&old.conditions, &dedup, campaign.metadata.generation, &time::k8s(now));

    if &status != old {
        let api: Api<Campaign> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "disparo.io/v1alpha1", "kind": "Campaign", "status": status});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    ctx.metrics.set_phase(&format!("{namespace}/{name}"), status.phase);
    ctx.metrics.observe_campaign(&namespace, &name, &campaign.spec.channel_ref.name, &status, now);
    if status.phase != old.phase {
        let (type_, event_reason, note) = match (status.phase, &reason) {
            (Some(Phase::Failed), Some((r, why))) => (EventType::Warning, *r, why.clone()),
            (Some(Phase::Paused), Some((r, why))) => (EventType::Warning, *r, why.clone()),
            (Some(p), _) => (EventType::Normal, phase_event_reason(old.phase, p), format!("campaign is now {p}")),
            (None, _) => (EventType::Normal, "Pending", "campaign is pending".into()),
        };
        publish(ctx, campaign, type_, event_reason, note).await;
    } else if let Some((r, why)) = reason
        && old.conditions.iter().all(|c| c.message != why)
    {
        publish(ctx, campaign, EventType::Warning, r, why).await;
    }
    Ok(outcome.requeue)
}

pub(super) fn phase_event_reason(old: Option<Phase>, new: Phase) -> &'static str {
    match (old, new) {
        (Some(Phase::Paused | Phase::RateLimited | Phase::Draft), Phase::Running) => "Resumed",
        (_, Phase::Running) => "Started",
        (_, Phase::Paused) => "Paused",
        (_, Phase::RateLimited) => "RateLimited",
        (_, Phase::Completed) => "Completed",
        (_, Phase::Cancelled) => "Cancelled",
        (_, Phase::Failed) => "Failed",
        (_, Phase::Scheduled) => "Scheduled",
        (_, Phase::Draft) => "Draft",
    }
}

pub(super) async fn publish(ctx: &Context, campaign: &Campaign, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &campaign.object_ref(&())).await {
        warn!(%error, reason, "could not publish an Event");
    }
}
