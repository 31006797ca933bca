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
use super::status as view;
use super::{Context, Error, Result};
use super::{observe, tenant};
use crate::api::condition::{ConditionType, DesiredCondition, merge_conditions};
use crate::api::{
    AudienceStatus, AutomaticPause, Campaign, CampaignStatus, Channel, FailureBaseline, Phase, PhaseEvent, Preflight,
    Provider, RESUME_ANNOTATION, Retention, time, transition,
};
use crate::sender::render;
use crate::store::{self, audience::AudienceQuery, campaigns::Counters};

/// Finalizer that lets the controller clean Postgres when a campaign asks for it.
pub const FINALIZER: &str = "disparo.io/cleanup";
/// Field manager of status writes (server-side apply).
pub(crate) const FIELD_MANAGER: &str = "disparo-controller";
/// How often a running campaign's status is refreshed from the counters.
const REFRESH: Duration = Duration::from_secs(3);
/// A spent cap that resets sooner than this is waited out by the senders in place; a
/// longer one suspends the Job (senders end their run with exit 75 then).
const SUSPEND_WHEN_RATE_LIMITED_FOR: chrono::Duration = chrono::Duration::seconds(60);
/// How long a rate-limited campaign's senders are given to finish the block they hold
/// and end by themselves before the Job is suspended.
const SENDERS_END_THEIR_BLOCK_WITHIN: chrono::Duration = chrono::Duration::seconds(30);

/// Entry point of the Campaign controller.
#[instrument(skip_all, fields(namespace = campaign.namespace().unwrap_or_default(), campaign = campaign.name_any()))]
pub(crate) async fn reconcile(campaign: Arc<Campaign>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("Campaign");
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<Campaign> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, campaign, |event| async {
        match event {
            Finalizer::Apply(campaign) => match apply(&campaign, &ctx).await {
                // Retrying will not help: say so on the campaign, where a person looks.
                Err(error) if !error.is_retryable() => stall_on_error(&campaign, &ctx, &error).await,
                other => other,
            },
            Finalizer::Cleanup(campaign) => cleanup(&campaign, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Reports an error a person must fix as the campaign's `Stalled` condition, and looks
/// again in a while (or at once when the campaign changes).
async fn stall_on_error(campaign: &Campaign, ctx: &Context, error: &Error) -> Result<Action> {
    let namespace = campaign.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let old = campaign.status.clone().unwrap_or_default();
    let stalled = DesiredCondition::truthy(
        ConditionType::Stalled,
        "ReconcileError",
        format!("{}; fix the campaign or its channel", crate::telemetry::chain(error)),
    );
    let conditions =
        merge_conditions(&old.conditions, &[stalled], campaign.metadata.generation, &time::k8s(Utc::now()));
    let api: Api<Campaign> = Api::namespaced(ctx.client.clone(), &namespace);
    // A merge patch of the conditions alone: an apply of a partial status would drop the
    // fields the controller's other status writes own.
    api.patch_status(
        &campaign.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await?;
    warn!(error = %crate::telemetry::chain(error), "the campaign cannot be reconciled until a person fixes it");
    Ok(Action::requeue(Duration::from_secs(300)))
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

mod execute;
mod preflight;
mod report;

use execute::{execute, take_resume_request};
use report::{Observed, Outcome, event_for, finish, publish, warning_for};

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

/// Whether Meta rates the campaign's template RED: a warning before Meta pauses it.
fn template_quality_condition(name: &str, language: &str, quality: Option<&str>) -> DesiredCondition {
    match quality {
        Some("RED") => DesiredCondition::truthy(
            ConditionType::TemplateQualityLow,
            "QualityRed",
            format!(
                "Meta rates template {name:?} ({language}) RED: it may pause the template soon; check recipients' feedback and consider slowing down"
            ),
        ),
        other => DesiredCondition::falsy(
            ConditionType::TemplateQualityLow,
            "QualityOk",
            format!("template {name:?} ({language}) quality is {}", other.unwrap_or("not rated yet")),
        ),
    }
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

    let message = crate::sender::MessageTemplate::from_spec(&campaign.spec.message);
    let category = message.as_ref().and_then(|m| m.category());
    let (channel_view, channel) =
        observe::channel(ctx, &r.namespace, &r.organization, &campaign.spec.channel_ref.name, category.is_some())
            .await?;
    let mut conditions = Vec::new();
    let account_hold = match channel.as_ref().filter(|ch| ch.spec.meta.is_some()) {
        Some(ch) => {
            let key = message.as_ref().and_then(|m| m.template_key());
            let (_, signals) = store::account::signals(&ctx.pool, &r.organization, &ch.name_any(), key).await?;
            if let Some((name, language)) = key {
                let quality =
                    store::account::template_quality(&ctx.pool, &r.organization, &ch.name_any(), name, language)
                        .await?;
                conditions.push(template_quality_condition(name, language, quality.as_deref()));
            }
            crate::account::hold(&signals, ch.spec.quality_policy, category, r.now)
        }
        None => None,
    };
    let digest = channel.as_ref().and_then(|ch| send_config_digest(campaign, ch, &r.organization, &ctx.sender).ok());
    let job = observe::job(ctx, &r.jobs, &r.job_name, &uid.to_string(), digest.as_deref()).await?;
    let mut counters = store::campaigns::counters(&ctx.pool, uid).await?;
    let memory = Memory {
        phase: old.phase,
        audience_frozen: counters.is_some(),
        failure_baseline: status.failure_baseline.as_ref().map_or((0, 0), |b| (b.failed, b.finished)),
        automatic_pause: status.automatic_pause.as_ref().map(|p| p.message.clone()),
        campaign_stop: store::pauses::campaign_stop(&ctx.pool, uid)
            .await?
            .map(|(code, message)| rejected_message(&code, &message)),
        resume_requested: resumed,
        account_hold,
        next_due: match (&job, &counters) {
            (Some((_, view)), Some(c)) if view.complete && c.pending > 0 => {
                store::campaigns::next_due(&ctx.pool, uid).await?
            }
            _ => None,
        },
    };
    let step = decide::next_step(
        &campaign.spec,
        &memory,
        &channel_view,
        job.as_ref().map(|(_, v)| v),
        counters.as_ref(),
        r.now,
    );
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
    if let Some(low) = conditions.iter().find(|c| c.type_ == ConditionType::TemplateQualityLow && c.status)
        && crate::api::condition::find(&old.conditions, ConditionType::TemplateQualityLow)
            .is_none_or(|c| c.status != "True")
    {
        publish(ctx, campaign, EventType::Warning, "TemplateQualityLow", low.message.clone()).await;
    }
    if let Some(c) = conditions.iter().find(|c| c.type_ == ConditionType::Stalled && c.reason == "PreflightFailed") {
        reason = Some(("PreflightFailed", c.message.clone()));
    }
    let outcome = Outcome { phase, conditions, requeue };
    finish(
        campaign,
        ctx,
        &old,
        status,
        outcome,
        Observed { counters: counters.as_ref(), job: job.as_ref().map(|(j, _)| j) },
        reason,
    )
    .await
}
