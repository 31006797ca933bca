//! Campaign reconciliation: observe (Campaign, Channel, Job, counters), ask
//! [`decide::next_step`], carry the step out, write status, emit Events.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};
use uuid::Uuid;

use super::decide::{self, ChannelView, JobView, Memory, Step};
use super::job::{build_job, job_name};
use super::status as view;
use super::{Context, Error, Result};
use crate::api::condition::{ConditionType, DesiredCondition, merge_conditions};
use crate::api::{
    AudienceStatus, Campaign, CampaignStatus, Channel, FailureBaseline, Phase, PhaseEvent, Preflight, Retention, time, transition,
};
use crate::sender::render;
use crate::store::{self, audience::AudienceQuery, campaigns::Counters};

/// Finalizer that lets the controller clean Postgres when a campaign asks for it.
pub const FINALIZER: &str = "disparo.io/cleanup";
/// Field manager of status writes (server-side apply).
pub const FIELD_MANAGER: &str = "disparo-controller";
/// How often a running campaign's status is refreshed from the counters.
const REFRESH: Duration = Duration::from_secs(3);

/// Entry point of the Campaign controller.
#[instrument(skip_all, fields(namespace = campaign.namespace().unwrap_or_default(), campaign = campaign.name_any()))]
pub async fn reconcile(campaign: Arc<Campaign>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("Campaign");
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<Campaign> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, campaign, |event| async {
        match event {
            Finalizer::Apply(campaign) => apply(&campaign, &ctx).await,
            Finalizer::Cleanup(campaign) => cleanup(&campaign, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn uid_of(campaign: &Campaign) -> Result<Uuid> {
    campaign.uid().and_then(|u| u.parse().ok()).ok_or(Error::MissingObjectKey("metadata.uid"))
}

async fn cleanup(campaign: &Campaign, ctx: &Context) -> Result<Action> {
    let key = format!("{}/{}", campaign.namespace().unwrap_or_default(), campaign.name_any());
    ctx.metrics.set_phase(&key, None);
    if campaign.spec.retention == Retention::Delete {
        let deleted = store::campaigns::delete(&ctx.pool, uid_of(campaign)?).await?;
        info!(deleted, "deleted the campaign's messages from Postgres (retention: Delete)");
    }
    Ok(Action::await_change())
}

/// Observes the Channel as the decision needs it.
async fn observe_channel(ctx: &Context, namespace: &str, name: &str) -> Result<(ChannelView, Option<Channel>)> {
    let api: Api<Channel> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(channel) = api.get_opt(name).await? else { return Ok((ChannelView::Missing, None)) };
    let ready = channel.status.as_ref().and_then(|s| crate::api::condition::find(&s.conditions, ConditionType::Ready).cloned());
    let view = match ready {
        None => ChannelView::NotReady(format!("channel {name:?} has not been checked yet")),
        Some(c) if c.status != "True" => ChannelView::NotReady(format!("channel {name:?} is not ready: {}", c.message)),
        Some(_) => match store::rate::channel_pause(&ctx.pool, namespace, name).await? {
            Some((until, reason)) if reason.contains("day window") => ChannelView::RateLimited(until),
            Some((_, reason)) => ChannelView::Stopped(format!("channel {name:?} stopped: {reason}")),
            None => ChannelView::Ready,
        },
    };
    Ok((view, Some(channel)))
}

fn job_view(job: &Job) -> JobView {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    JobView {
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        complete: has("Complete"),
        failed: has("Failed"),
    }
}

/// The phase event a step means, given the phase before.
fn event_for(step: &Step, old: Option<Phase>) -> Option<PhaseEvent> {
    Some(match step {
        Step::Nothing | Step::Stall(_) | Step::Preflight => return None,
        Step::Cancel => PhaseEvent::Cancel,
        Step::Draft => PhaseEvent::CreatedSuspended,
        Step::Pause | Step::ChannelStopped(_) => PhaseEvent::Suspend,
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
    })
}

async fn set_job_suspended(jobs: &Api<Job>, name: &str, suspend: bool) -> Result<bool> {
    let Some(job) = jobs.get_opt(name).await? else { return Ok(false) };
    if job.spec.as_ref().and_then(|s| s.suspend) == Some(suspend) {
        return Ok(false);
    }
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": suspend}}))).await?;
    Ok(true)
}

/// What a reconcile decided, for status and Events.
struct Outcome {
    phase: Option<Phase>,
    conditions: Vec<DesiredCondition>,
    requeue: Action,
}

async fn apply(campaign: &Campaign, ctx: &Context) -> Result<Action> {
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = campaign.name_any();
    let uid = uid_of(campaign)?;
    let old = campaign.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let now = Utc::now();

    let (channel_view, channel) = observe_channel(ctx, &namespace, &campaign.spec.channel_ref.name).await?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let jname = job_name(&name);
    let job = jobs.get_opt(&jname).await?;
    let mut counters = store::campaigns::counters(&ctx.pool, uid).await?;
    let memory = Memory {
        phase: old.phase,
        audience_frozen: counters.is_some(),
        failure_baseline: old.failure_baseline.as_ref().map_or((0, 0), |b| (b.failed, b.finished)),
    };
    let step = decide::next_step(&campaign.spec, &memory, &channel_view, job.as_ref().map(job_view).as_ref(), counters.as_ref(), now);

    let mut conditions = Vec::new();
    let requeue = match &step {
        Step::Nothing => Action::await_change(),
        Step::Cancel => {
            if job.is_some() {
                jobs.delete(&jname, &DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() }).await?;
            }
            let cancelled = store::messages::cancel_pending(&ctx.pool, uid).await?;
            info!(cancelled, "campaign cancelled");
            status.finished_at = Some(time::k8s(now));
            Action::await_change()
        }
        Step::Draft => Action::await_change(),
        Step::Pause => {
            set_job_suspended(&jobs, &jname, true).await?;
            Action::await_change()
        }
        Step::Stall(why) => {
            conditions.push(DesiredCondition::truthy(ConditionType::Stalled, "ChannelNotReady", why.clone()));
            Action::requeue(Duration::from_secs(10))
        }
        Step::WaitForSchedule(at) => {
            set_job_suspended(&jobs, &jname, true).await?;
            Action::requeue((*at - now).to_std().unwrap_or(Duration::ZERO) + Duration::from_millis(200))
        }
        Step::RateLimit(until) => {
            set_job_suspended(&jobs, &jname, true).await?;
            let mut info = status.rate_limit.clone().unwrap_or_default();
            if old.phase != Some(Phase::RateLimited) {
                info.pauses += 1;
            }
            info.resume_at = Some(time::k8s(*until));
            status.rate_limit = Some(info);
            conditions.push(DesiredCondition::truthy(ConditionType::RateLimited, "DayWindowSpent", format!("the channel's day window is spent; resumes at {until}")));
            // Look again at the reset instant, and meanwhile every few seconds in case a
            // person lifted the pause or the windows were reset.
            Action::requeue(((*until - now).to_std().unwrap_or(Duration::ZERO) + Duration::from_millis(500)).min(Duration::from_secs(10)))
        }
        Step::ChannelStopped(why) => {
            set_job_suspended(&jobs, &jname, true).await?;
            conditions.push(DesiredCondition::truthy(ConditionType::Stalled, "ChannelStopped", why.clone()));
            Action::requeue(Duration::from_secs(30))
        }
        Step::PauseForFailures(why) => {
            let api: Api<Campaign> = Api::namespaced(ctx.client.clone(), &namespace);
            api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await?;
            set_job_suspended(&jobs, &jname, true).await?;
            if let Some(c) = &counters {
                status.failure_baseline = Some(FailureBaseline { failed: c.failed, finished: c.finished() - c.cancelled });
            }
            conditions.push(DesiredCondition::truthy(ConditionType::Stalled, "FailureThresholdExceeded", why.clone()));
            Action::await_change()
        }
        Step::Preflight => match preflight(campaign, channel.as_ref(), ctx, &namespace, &name, uid, &mut status).await? {
            Ok(()) => {
                counters = store::campaigns::counters(&ctx.pool, uid).await?;
                Action::requeue(Duration::ZERO)
            }
            Err(why) => {
                let outcome = Outcome {
                    phase: transition(old.phase, PhaseEvent::Fail).ok(),
                    conditions: vec![DesiredCondition::truthy(ConditionType::Stalled, "PreflightFailed", why.clone())],
                    requeue: Action::await_change(),
                };
                return finish(campaign, ctx, &old, status, outcome, Observed { counters: counters.as_ref(), job: job.as_ref() }, Some(("PreflightFailed", why))).await;
            }
        },
        Step::CreateJob => {
            let channel = channel.as_ref().ok_or_else(|| Error::InvalidChannel("channel vanished".into()))?;
            let batches = store::campaigns::frozen_batches(&ctx.pool, uid).await?.unwrap_or(1);
            let job = build_job(campaign, channel, batches, false, &ctx.sender)?;
            match jobs.create(&PostParams::default(), &job).await {
                Ok(_) => info!(batches, "sending Job created"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            status.started_at.get_or_insert(time::k8s(now));
            Action::requeue(REFRESH)
        }
        Step::ResumeJob => {
            set_job_suspended(&jobs, &jname, false).await?;
            status.started_at.get_or_insert(time::k8s(now));
            if let Some(info) = status.rate_limit.as_mut() {
                info.resume_at = None;
            }
            Action::requeue(REFRESH)
        }
        Step::Track => Action::requeue(REFRESH),
        Step::Complete | Step::Fail(_) => {
            status.finished_at.get_or_insert(time::k8s(now));
            Action::await_change()
        }
    };
    let phase = match event_for(&step, old.phase) {
        None => old.phase,
        Some(event) => match transition(old.phase, event) {
            Ok(p) => Some(p),
            Err(error) => {
                warn!(%error, ?step, "the decided step does not match the lifecycle; keeping the phase");
                old.phase
            }
        },
    };
    let outcome = Outcome { phase, conditions, requeue };
    let reason = match &step {
        Step::Fail(why) => Some(("Failed", why.clone())),
        Step::PauseForFailures(why) => Some(("FailureThresholdExceeded", why.clone())),
        Step::ChannelStopped(why) => Some(("ChannelStopped", why.clone())),
        Step::Stall(why) => Some(("InvalidChannel", why.clone())),
        _ => None,
    };
    finish(campaign, ctx, &old, status, outcome, Observed { counters: counters.as_ref(), job: job.as_ref() }, reason).await
}

/// Checks the audience and message, then freezes the audience. `Ok(Err(why))` is a
/// preflight failure a person must fix.
async fn preflight(
    campaign: &Campaign,
    channel: Option<&Channel>,
    ctx: &Context,
    namespace: &str,
    name: &str,
    uid: Uuid,
    status: &mut CampaignStatus,
) -> Result<std::result::Result<(), String>> {
    let query = match AudienceQuery::from_spec(&campaign.spec.audience) {
        Ok(q) => q,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let size = match store::audience::preview_size(&ctx.pool, namespace, &query).await {
        Ok(n) => n,
        Err(store::Error::SourceCampaignNotFound { name, .. }) => {
            return Ok(Err(format!("audience.fromCampaign names {name:?}, which never ran in this namespace")));
        }
        Err(e) => return Err(e.into()),
    };
    let texts: Vec<String> = match (&campaign.spec.message.template, &campaign.spec.message.text) {
        (Some(t), _) => t.body_parameters.iter().map(|p| p.0.clone()).collect(),
        (None, Some(text)) => vec![text.clone()],
        (None, None) => vec![],
    };
    let mut needs_name = false;
    let mut keys = Vec::new();
    for text in &texts {
        for var in render::variables(text) {
            match var {
                render::Variable::Name => needs_name = true,
                render::Variable::Phone => {}
                render::Variable::Attribute(key) => keys.push(key),
            }
        }
    }
    // A contact that has every variable must render; if not, the message itself is broken.
    let sample_attributes = serde_json::Value::Object(keys.iter().map(|k| (k.clone(), serde_json::Value::from("x"))).collect());
    let sample = render::ContactView { name: Some("x"), phone: "+5511999999999", attributes: &sample_attributes };
    for text in &texts {
        if let Err(e) = render::render(text, &sample) {
            return Ok(Err(format!("the message cannot render: {e}")));
        }
    }
    let missing = store::audience::count_missing_variables(&ctx.pool, namespace, &query, needs_name, &keys).await?;
    let sharing = store::campaigns::active_on_channel(&ctx.pool, namespace, &campaign.spec.channel_ref.name, uid).await?;
    let estimate = match channel {
        Some(channel) => {
            let limits = store::rate::Limits::effective(channel.spec.provider, &channel.spec.rate_limits);
            let window = view::window_fraction(campaign.spec.schedule.as_ref().and_then(|s| s.window.as_ref()));
            view::estimated_duration_seconds(size, &limits, sharing, window)
        }
        None => None,
    };
    status.preflight = Some(Preflight { audience_size: size, missing_variables: missing, estimated_duration_seconds: estimate, sharing_channel_with: sharing as i32 });
    if size == 0 {
        return Ok(Err("the audience is empty after opt-outs and de-duplication: nothing to send".into()));
    }
    if missing == size {
        return Ok(Err(format!("no contact of the audience has every variable the message uses ({missing} of {size} lack one)")));
    }
    let key = store::audience::CampaignKey {
        uid,
        organization: namespace,
        name,
        channel: &campaign.spec.channel_ref.name,
        batch_size: campaign.spec.execution.batch_size,
    };
    let frozen = store::audience::materialize(&ctx.pool, &key, &query).await?;
    status.audience = Some(AudienceStatus {
        frozen_at: Some(time::k8s(Utc::now())),
        frozen_generation: campaign.metadata.generation,
        size: frozen.messages,
        drift: None,
    });
    if frozen.newly_frozen {
        publish(ctx, campaign, EventType::Normal, "AudienceFrozen", format!("{} messages in {} batches", frozen.messages, frozen.batches)).await;
    }
    Ok(Ok(()))
}

fn phase_conditions(phase: Option<Phase>, frozen: bool) -> Vec<DesiredCondition> {
    let phase_name = phase.map_or("Pending", Phase::as_str);
    let mut out = vec![
        match phase {
            Some(Phase::Completed) => DesiredCondition::truthy(ConditionType::Ready, "Completed", "every message reached a final state"),
            _ => DesiredCondition::falsy(ConditionType::Ready, phase.map_or("Pending", Phase::as_str), format!("campaign is {phase_name}")),
        },
        match phase {
            Some(Phase::Scheduled | Phase::Running | Phase::RateLimited) | None => {
                DesiredCondition::truthy(ConditionType::Reconciling, phase.map_or("Pending", Phase::as_str), format!("campaign is {phase_name}"))
            }
            _ => DesiredCondition::falsy(ConditionType::Reconciling, phase.map_or("Pending", Phase::as_str), format!("campaign is {phase_name}")),
        },
    ];
    if phase != Some(Phase::RateLimited) {
        out.push(DesiredCondition::falsy(ConditionType::RateLimited, "WindowAvailable", "the channel's windows have room"));
    }
    if frozen {
        out.push(DesiredCondition::truthy(ConditionType::AudienceFrozen, "Frozen", "the audience is frozen in Postgres"));
    }
    out
}

/// What the reconcile observed that status is computed from.
struct Observed<'a> {
    counters: Option<&'a Counters>,
    job: Option<&'a Job>,
}

/// Writes status (when it changed) and emits the Event of a phase change.
async fn finish(
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
        status.messages = Some(view::message_counts(c));
        status.progress = Some(view::progress(c, now));
        status.rates = Some(view::rates(c));
        status.retries = Some(view::retry_stats(c, &errors));
        if let Some(audience) = status.audience.as_mut() {
            audience.size = c.total;
        } else {
            status.audience = Some(AudienceStatus { frozen_at: None, frozen_generation: None, size: c.total, drift: None });
        }
    }
    if let Some(audience) = status.audience.as_mut()
        && let Some(frozen_gen) = audience.frozen_generation
        && campaign.metadata.generation.is_some_and(|g| g > frozen_gen)
    {
        // The CRD only lets the audience change while suspended; any change after freezing is reported, not applied.
        audience.drift = Some("spec changed after the audience was frozen: audience edits are not applied to a started campaign".into());
    }
    // The Job as observed at the start of this reconcile: one read per reconcile; a Job
    // created or patched just now shows up at the next refresh.
    if let Some(job) = job {
        let completions = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(0);
        status.batches = Some(view::batch_counts(&job_name(&name), completions, job.status.as_ref()));
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

fn phase_event_reason(old: Option<Phase>, new: Phase) -> &'static str {
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

async fn publish(ctx: &Context, campaign: &Campaign, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent { type_, reason: reason.to_owned(), note: Some(note), action: "Reconcile".to_owned(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &campaign.object_ref(&())).await {
        warn!(%error, reason, "could not publish an Event");
    }
}
