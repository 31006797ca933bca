//! Campaign reconciliation: observe (Campaign, Channel, Job, counters), ask
//! [`decide::next_step`], carry the step out, write status, emit Events.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};
use uuid::Uuid;

use super::decide::{self, JobView, Memory, Step};
use super::job::{build_job, job_name, send_config_digest};
use super::{observe, tenant};
use super::status as view;
use super::{Context, Error, Result};
use crate::api::condition::{ConditionType, DesiredCondition, merge_conditions};
use crate::api::{
    AudienceStatus, AutomaticPause, Campaign, CampaignStatus, Channel, FailureBaseline, Phase, PhaseEvent, Preflight, Provider, RESUME_ANNOTATION,
    Retention, time, transition,
};
use crate::sender::render;
use crate::store::{self, audience::AudienceQuery, campaigns::Counters};

/// Finalizer that lets the controller clean Postgres when a campaign asks for it.
pub const FINALIZER: &str = "disparo.io/cleanup";
/// Field manager of status writes (server-side apply).
pub const FIELD_MANAGER: &str = "disparo-controller";
/// How often a running campaign's status is refreshed from the counters.
const REFRESH: Duration = Duration::from_secs(3);
/// A spent cap that resets sooner than this is waited out by the senders in place; a
/// longer one suspends the Job (senders end their run with exit 75 then).
const SUSPEND_WHEN_RATE_LIMITED_FOR: chrono::Duration = chrono::Duration::seconds(60);

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

/// The phase event a step means, given the phase before and whether a Job exists.
fn event_for(step: &Step, old: Option<Phase>, has_job: bool) -> Option<PhaseEvent> {
    Some(match step {
        Step::Nothing | Step::Preflight | Step::ReplaceJob | Step::AwaitJobDeletion | Step::PodsFailing(_) => return None,
        // Stalled means not sending: a campaign that was sending is paused until it can go on.
        Step::Stall(_) if has_job => PhaseEvent::Suspend,
        Step::Stall(_) => return None,
        Step::Cancel => PhaseEvent::Cancel,
        Step::Draft => PhaseEvent::CreatedSuspended,
        Step::Pause | Step::ChannelStopped(_) | Step::MessageRejected(_) | Step::HoldAutomaticPause(_) => PhaseEvent::Suspend,
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
    })
}

/// The condition reason and Warning Event a step raises, if it needs a person.
fn warning_for(step: &Step) -> Option<(&'static str, String)> {
    Some(match step {
        Step::Fail(why) => ("Failed", why.clone()),
        Step::PauseForFailures(why) | Step::HoldAutomaticPause(why) => ("FailureThresholdExceeded", why.clone()),
        Step::ChannelStopped(why) => ("ChannelStopped", why.clone()),
        Step::MessageRejected(why) => ("MessageRejected", why.clone()),
        Step::Stall(why) => ("Blocked", why.clone()),
        Step::PodsFailing(why) => ("SenderPodsFailing", why.clone()),
        _ => return None,
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

/// Deletes the Job and, before it goes, its pods: a replacement must never run beside
/// an old sender of the same batch.
async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<()> {
    match jobs.delete(name, &DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() }).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a reconcile decided, for status and Events.
struct Outcome {
    phase: Option<Phase>,
    conditions: Vec<DesiredCondition>,
    requeue: Action,
}

/// One reconcile of one campaign: what it works on.
struct Reconcile<'a> {
    campaign: &'a Campaign,
    ctx: &'a Context,
    namespace: String,
    /// The namespace's organization id (its UID): what Postgres keys its rows by.
    organization: String,
    name: String,
    uid: Uuid,
    jobs: Api<Job>,
    job_name: String,
    now: DateTime<Utc>,
}

/// A person's `kubectl disparo resume` (a new value of the resume annotation): lifts the
/// operator's own pauses, this campaign's stop and its channel's stop. Returns whether
/// a new request was taken.
async fn take_resume_request(r: &Reconcile<'_>, status: &mut CampaignStatus) -> Result<bool> {
    let Some(value) = r.campaign.annotations().get(RESUME_ANNOTATION) else { return Ok(false) };
    if status.last_resume_request.as_deref() == Some(value.as_str()) {
        return Ok(false);
    }
    status.last_resume_request = Some(value.clone());
    status.automatic_pause = None;
    let stop = store::pauses::clear_campaign_stop(&r.ctx.pool, r.uid).await?;
    let channel = store::pauses::clear_channel_pause(&r.ctx.pool, &r.organization, &r.campaign.spec.channel_ref.name).await?;
    info!(stop, channel, "a person asked to resume");
    publish(r.ctx, r.campaign, EventType::Normal, "ResumeRequested", "resume requested: automatic pauses and stops are lifted".into()).await;
    Ok(true)
}

fn rejected_message(code: &str, message: &str) -> String {
    format!(
        "the provider refused this campaign's message (error {code}: {message}); fix it (pause, edit spec.message, resume) or at the provider, then `kubectl disparo resume`"
    )
}

async fn apply(campaign: &Campaign, ctx: &Context) -> Result<Action> {
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = campaign.name_any();
    let uid = uid_of(campaign)?;
    let organization = tenant::ensure(ctx, &namespace).await?;
    let r = Reconcile {
        campaign,
        ctx,
        organization,
        jobs: Api::namespaced(ctx.client.clone(), &namespace),
        job_name: job_name(&name, &uid.to_string()),
        namespace,
        name,
        uid,
        now: Utc::now(),
    };
    let old = campaign.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let resumed = take_resume_request(&r, &mut status).await?;

    let (channel_view, channel) = observe::channel(ctx, &r.namespace, &r.organization, &campaign.spec.channel_ref.name).await?;
    let digest = channel.as_ref().and_then(|ch| send_config_digest(campaign, ch, &r.organization, &ctx.sender).ok());
    let job = observe::job(ctx, &r.jobs, &r.job_name, &uid.to_string(), digest.as_deref()).await?;
    let mut counters = store::campaigns::counters(&ctx.pool, uid).await?;
    let memory = Memory {
        phase: old.phase,
        audience_frozen: counters.is_some(),
        failure_baseline: status.failure_baseline.as_ref().map_or((0, 0), |b| (b.failed, b.finished)),
        automatic_pause: status.automatic_pause.as_ref().map(|p| p.message.clone()),
        campaign_stop: store::pauses::campaign_stop(&ctx.pool, uid).await?.map(|(code, message)| rejected_message(&code, &message)),
        resume_requested: resumed,
    };
    let step = decide::next_step(&campaign.spec, &memory, &channel_view, job.as_ref().map(|(_, v)| v), counters.as_ref(), r.now);
    let mut conditions = Vec::new();
    let requeue = execute(&r, &step, job.as_ref(), channel.as_ref(), &mut status, &mut conditions).await?;
    if matches!(step, Step::Preflight) {
        counters = store::campaigns::counters(&ctx.pool, uid).await?;
    }
    let phase = match event_for(&step, old.phase, job.is_some()) {
        None => old.phase,
        Some(event) => match transition(old.phase, event) {
            Ok(p) => Some(p),
            Err(error) => {
                warn!(%error, ?step, "the decided step does not match the lifecycle; keeping the phase");
                old.phase
            }
        },
    };
    let mut reason = warning_for(&step);
    if let Some(c) = conditions.iter().find(|c| c.type_ == ConditionType::Stalled && c.reason == "PreflightFailed") {
        reason = Some(("PreflightFailed", c.message.clone()));
    }
    let outcome = Outcome { phase, conditions, requeue };
    finish(campaign, ctx, &old, status, outcome, Observed { counters: counters.as_ref(), job: job.as_ref().map(|(j, _)| j) }, reason).await
}

/// Carries out one step; returns when to look again, and adds the conditions it raises.
async fn execute(
    r: &Reconcile<'_>,
    step: &Step,
    job: Option<&(Job, JobView)>,
    channel: Option<&Channel>,
    status: &mut CampaignStatus,
    conditions: &mut Vec<DesiredCondition>,
) -> Result<Action> {
    let stalled = |reason: &'static str, why: &String| DesiredCondition::truthy(ConditionType::Stalled, reason, why.clone());
    Ok(match step {
        Step::Nothing | Step::Draft => Action::await_change(),
        Step::Cancel => {
            if job.is_some() {
                r.jobs.delete(&r.job_name, &DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() }).await?;
            }
            let cancelled = store::messages::cancel_pending(&r.ctx.pool, r.uid).await?;
            info!(cancelled, "campaign cancelled");
            status.finished_at = Some(time::k8s(r.now));
            Action::await_change()
        }
        Step::Pause => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            Action::await_change()
        }
        Step::Stall(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            conditions.push(stalled("Blocked", why));
            Action::requeue(Duration::from_secs(10))
        }
        Step::PodsFailing(why) => {
            conditions.push(stalled("SenderPodsFailing", why));
            Action::requeue(Duration::from_secs(10))
        }
        Step::WaitForSchedule(at) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            Action::requeue((*at - r.now).to_std().unwrap_or(Duration::ZERO) + Duration::from_millis(200))
        }
        Step::RateLimit(until) => rate_limit(r, *until, status, conditions).await?,
        Step::ChannelStopped(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            conditions.push(stalled("ChannelStopped", why));
            Action::requeue(Duration::from_secs(30))
        }
        Step::MessageRejected(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            conditions.push(stalled("MessageRejected", why));
            Action::requeue(Duration::from_secs(30))
        }
        Step::PauseForFailures(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            if let Some(c) = store::campaigns::counters(&r.ctx.pool, r.uid).await? {
                status.failure_baseline = Some(FailureBaseline { failed: c.failed, finished: c.finished_attempted() });
            }
            status.automatic_pause = Some(AutomaticPause { reason: "FailureThresholdExceeded".into(), message: why.clone(), since: Some(time::k8s(r.now)) });
            conditions.push(stalled("FailureThresholdExceeded", why));
            Action::await_change()
        }
        Step::HoldAutomaticPause(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            // The failure threshold is the one automatic pause kept in status today.
            conditions.push(stalled("FailureThresholdExceeded", why));
            Action::await_change()
        }
        Step::Preflight => match preflight(r.campaign, channel, r.ctx, &r.organization, &r.name, r.uid, status).await? {
            Ok(()) => Action::requeue(Duration::ZERO),
            // A person fixes this (imports the contacts, edits the message); look again
            // now and then, and at once on an edit.
            Err(why) => {
                conditions.push(stalled("PreflightFailed", &why));
                Action::requeue(Duration::from_secs(30))
            }
        },
        Step::CreateJob => {
            let channel = channel.ok_or_else(|| Error::InvalidChannel("channel vanished".into()))?;
            let batches = store::campaigns::frozen_batches(&r.ctx.pool, r.uid).await?.unwrap_or(1);
            let built = build_job(r.campaign, channel, &r.organization, batches, false, &r.ctx.sender)?;
            match r.jobs.create(&PostParams::default(), &built).await {
                Ok(_) => info!(batches, "sending Job created"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            status.started_at.get_or_insert(time::k8s(r.now));
            status.finished_at = None;
            Action::requeue(REFRESH)
        }
        Step::ReplaceJob => replace_job(r, job.map(|(_, v)| v)).await?,
        Step::AwaitJobDeletion => Action::requeue(Duration::from_secs(1)),
        Step::ResumeJob => {
            set_job_suspended(&r.jobs, &r.job_name, false).await?;
            status.started_at.get_or_insert(time::k8s(r.now));
            if let Some(info) = status.rate_limit.as_mut() {
                info.resume_at = None;
            }
            Action::requeue(REFRESH)
        }
        Step::Track => Action::requeue(REFRESH),
        Step::Complete | Step::Fail(_) => {
            status.finished_at.get_or_insert(time::k8s(r.now));
            Action::await_change()
        }
        Step::Restart => {
            delete_job(&r.jobs, &r.job_name).await?;
            status.finished_at = None;
            publish(r.ctx, r.campaign, EventType::Normal, "Restarted", "resumed after failing: the remaining messages are sent by a new Job".into()).await;
            Action::requeue(Duration::from_secs(1))
        }
    })
}

/// A cap of the channel is spent until `until`. The Job is suspended only when the wait
/// is long: senders wait out a spent minute in place rather than restart.
async fn rate_limit(r: &Reconcile<'_>, until: DateTime<Utc>, status: &mut CampaignStatus, conditions: &mut Vec<DesiredCondition>) -> Result<Action> {
    if until - r.now > SUSPEND_WHEN_RATE_LIMITED_FOR {
        set_job_suspended(&r.jobs, &r.job_name, true).await?;
    }
    let mut info = status.rate_limit.clone().unwrap_or_default();
    if status.phase != Some(Phase::RateLimited) {
        info.pauses += 1;
    }
    info.resume_at = Some(time::k8s(until));
    status.rate_limit = Some(info);
    conditions.push(DesiredCondition::truthy(ConditionType::RateLimited, "WindowSpent", format!("a cap of the channel is spent; sending resumes at {until}")));
    // Look again at the reset instant, and meanwhile every few seconds in case a
    // person lifted the pause or the windows were reset.
    Ok(Action::requeue(((until - r.now).to_std().unwrap_or(Duration::ZERO) + Duration::from_millis(500)).min(Duration::from_secs(10))))
}

/// Replaces a Job built from an older spec: suspend it, wait for its pods to go, then
/// delete it (the next reconcile creates the new one). A changed message also lifts a
/// stop caused by the old message.
async fn replace_job(r: &Reconcile<'_>, job: Option<&JobView>) -> Result<Action> {
    let Some(job) = job else { return Ok(Action::requeue(Duration::ZERO)) };
    if !job.suspended {
        set_job_suspended(&r.jobs, &r.job_name, true).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if job.active > 0 {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    store::pauses::clear_campaign_stop(&r.ctx.pool, r.uid).await?;
    delete_job(&r.jobs, &r.job_name).await?;
    publish(r.ctx, r.campaign, EventType::Normal, "SpecChanged", "the message, channel or retry policy changed: the sending Job is replaced so every message from now on uses them".into()).await;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Checks the audience and message, then freezes the audience. `Ok(Err(why))` is a
/// preflight failure a person must fix.
async fn preflight(
    campaign: &Campaign,
    channel: Option<&Channel>,
    ctx: &Context,
    organization: &str,
    name: &str,
    uid: Uuid,
    status: &mut CampaignStatus,
) -> Result<std::result::Result<(), String>> {
    let query = match AudienceQuery::from_spec(&campaign.spec.audience) {
        Ok(q) => q,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let size = match store::audience::preview_size(&ctx.pool, organization, &query).await {
        Ok(n) => n,
        Err(store::Error::SourceCampaignNotFound { name, .. }) => {
            return Ok(Err(format!("audience.fromCampaign names {name:?}, which never ran in this namespace")));
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(channel), Some(_)) = (channel, &campaign.spec.message.template)
        && channel.spec.provider == Provider::Evolution
    {
        return Ok(Err(format!(
            "spec.message.template: channel {:?} uses the Evolution API, which has no templates; send spec.message.text instead (pause, edit, resume)",
            campaign.spec.channel_ref.name
        )));
    }
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
    let missing = store::audience::count_missing_variables(&ctx.pool, organization, &query, needs_name, &keys).await?;
    let sharing = store::campaigns::active_on_channel(&ctx.pool, organization, &campaign.spec.channel_ref.name, uid).await?;
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
        organization,
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
