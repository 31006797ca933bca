//! What a Campaign reconcile looks at before deciding: its Channel (and the channel's
//! pause in Postgres), its Job and that Job's pods. Each observation is reduced to the
//! plain views [`super::decide`] takes.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::decide::{ChannelView, JobView};
use super::job::{foreign_job, is_stale};
use super::{Context, Result};
use crate::api::Channel;
use crate::api::condition::{ConditionType, find};
use crate::sender::IGNORED_EXIT_CODES;
use crate::store::pauses::{self, ChannelPause};

/// Observes the Channel as the decision needs it.
pub async fn channel(
    ctx: &Context,
    namespace: &str,
    organization: &str,
    name: &str,
    counts_in_budget: bool,
) -> Result<(ChannelView, Option<Channel>)> {
    let api: Api<Channel> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(channel) = api.get_opt(name).await? else { return Ok((ChannelView::Missing, None)) };
    let ready = channel.status.as_ref().and_then(|s| find(&s.conditions, ConditionType::Ready).cloned());
    let pause = pauses::channel_pause(&ctx.pool, organization, name).await?;
    // A template counts in the portfolio's 24 h messaging limit; a spent one rate-limits
    // the campaign like a spent window of the channel.
    let budget_spent_until = match channel.spec.meta.as_ref().and_then(|m| m.business_portfolio.as_ref()) {
        Some(_) if counts_in_budget => {
            crate::store::account::account(&ctx.pool, organization, name).await?.budget_spent_until
        }
        _ => None,
    };
    let view = match (pause, ready) {
        // A refusal shows on the Channel's Ready condition too; the campaign names it.
        (Some(ChannelPause::ProviderRefused { code, message }), _) => ChannelView::Stopped(format!(
            "channel {name:?} stopped: the provider refused it (error {code}: {message}); fix the credentials or account, then `kubectl disparo resume` (or change the credentials' Secret)"
        )),
        (_, None) => ChannelView::NotReady(format!("channel {name:?} has not been checked yet")),
        (_, Some(c)) if c.status != "True" => {
            ChannelView::NotReady(format!("channel {name:?} is not ready: {}", c.message))
        }
        (Some(ChannelPause::WindowSpent { until }), _) => {
            ChannelView::RateLimited(budget_spent_until.map_or(until, |b| b.max(until)))
        }
        (None, _) => budget_spent_until.map_or(ChannelView::Ready, ChannelView::RateLimited),
    };
    Ok((view, Some(channel)))
}

/// Pod waiting reasons that mean the sender cannot start or keeps crashing.
const STUCK_REASONS: [&str; 7] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "RunContainerError",
];

/// Failed sender pods (not counting exits the Job ignores) before the campaign says
/// its senders are crashing.
const CRASHES_BEFORE_STALLED: usize = 2;

/// Why the Job's pods cannot do their work, as a person should read it, if they cannot.
pub(crate) fn pods_failing(pods: &[Pod]) -> Option<String> {
    let mut crashed = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let Some(status) = pod.status.as_ref() else { continue };
        for container in status.container_statuses.iter().flatten() {
            let Some(state) = container.state.as_ref() else { continue };
            if let Some(waiting) = &state.waiting
                && let Some(reason) = waiting.reason.as_deref().filter(|r| STUCK_REASONS.contains(r))
            {
                let detail = waiting.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                return Some(format!("sender pod {name} cannot run: {reason}{detail}"));
            }
            if let Some(done) = &state.terminated
                && done.exit_code != 0
                && !IGNORED_EXIT_CODES.contains(&done.exit_code)
            {
                crashed.push((
                    name.to_owned(),
                    done.exit_code,
                    done.reason.clone().unwrap_or_default(),
                    done.message.clone().unwrap_or_default(),
                ));
            }
        }
    }
    if crashed.len() < CRASHES_BEFORE_STALLED {
        return None;
    }
    let (pod, code, reason, message) = crashed.last()?;
    Some(
        format!("{} sender pods crashed; the last, {pod}, exited with code {code} {reason} {message}", crashed.len())
            .trim_end()
            .to_owned(),
    )
}

/// Observes the campaign's Job (and, while it runs, its pods).
pub async fn job(
    ctx: &Context,
    jobs: &Api<Job>,
    name: &str,
    campaign_uid: &str,
    digest: Option<&str>,
) -> Result<Option<(Job, JobView)>> {
    let Some(job) = jobs.get_opt(name).await? else { return Ok(None) };
    let conditions = job.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    let mut view = JobView {
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        complete: has("Complete"),
        failed: has("Failed"),
        active: job.status.as_ref().and_then(|s| s.active).unwrap_or(0),
        deleting: job.metadata.deletion_timestamp.is_some(),
        stale: digest.is_some_and(|d| is_stale(&job, d)),
        foreign: foreign_job(&job, campaign_uid),
        pods_failing: None,
    };
    if view.foreign.is_none() && !view.suspended && !view.complete && !view.failed {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), jobs.namespace().unwrap_or_default());
        let listed = pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}"))).await?;
        view.pods_failing = pods_failing(&listed.items);
    }
    Ok(Some((job, view)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "status": status})).unwrap()
    }

    #[test]
    fn a_pod_that_cannot_start_is_named_with_its_reason() {
        let stuck = pod(
            "x-0",
            serde_json::json!({"containerStatuses": [{"name": "sender", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"disparo-postgres\" not found"}}}]}),
        );
        let why = pods_failing(&[stuck]).unwrap();
        assert!(
            why.contains("x-0") && why.contains("CreateContainerConfigError") && why.contains("disparo-postgres"),
            "{why}"
        );
    }

    #[test]
    fn one_crash_is_retried_quietly_two_are_reported_and_ignored_exits_never() {
        let crashed = |name: &str, code: i32| {
            pod(
                name,
                serde_json::json!({"containerStatuses": [{"name": "sender", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]}),
            )
        };
        assert_eq!(pods_failing(&[crashed("a", 1)]), None);
        assert_eq!(pods_failing(&[crashed("a", 75), crashed("b", 77), crashed("c", 0)]), None);
        let why = pods_failing(&[crashed("a", 1), crashed("b", 101)]).unwrap();
        assert!(why.contains("2 sender pods crashed") && why.contains("b") && why.contains("101"), "{why}");
    }
}
