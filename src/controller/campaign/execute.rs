//! Carrying out the decided step: suspending, replacing and deleting the Job, pausing
//! in status, taking a person's resume request.

use super::*;

pub(super) async fn set_job_suspended(jobs: &Api<Job>, name: &str, suspend: bool) -> Result<bool> {
    let Some(job) = jobs.get_opt(name).await? else { return Ok(false) };
    if job.spec.as_ref().and_then(|s| s.suspend) == Some(suspend) {
        return Ok(false);
    }
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": suspend}}))).await?;
    Ok(true)
}

/// Deletes the Job and, before it goes, its pods: a replacement must never run beside
/// an old sender of the same batch.
pub(super) async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<()> {
    match jobs
        .delete(name, &DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() })
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A person's `kubectl disparo resume` (a new value of the resume annotation): lifts the
/// operator's own pauses, this campaign's stop and its channel's stop. Returns whether
/// a new request was taken.
pub(super) async fn take_resume_request(r: &Reconcile<'_>, status: &mut CampaignStatus) -> Result<bool> {
    let Some(value) = r.campaign.annotations().get(RESUME_ANNOTATION) else { return Ok(false) };
    if status.last_resume_request.as_deref() == Some(value.as_str()) {
        return Ok(false);
    }
    status.last_resume_request = Some(value.clone());
    status.automatic_pause = None;
    let stop = store::pauses::clear_campaign_stop(&r.ctx.pool, r.uid).await?;
    let channel =
        store::pauses::clear_channel_pause(&r.ctx.pool, &r.organization, &r.campaign.spec.channel_ref.name).await?;
    info!(stop, channel, "a person asked to resume");
    publish(
        r.ctx,
        r.campaign,
        EventType::Normal,
        "ResumeRequested",
        "resume requested: automatic pauses and stops are lifted".into(),
    )
    .await;
    Ok(true)
}

/// Carries out one step; returns when to look again, and adds the conditions it raises.
pub(super) async fn execute(
    r: &Reconcile<'_>,
    step: &Step,
    job: Option<&(Job, JobView)>,
    channel: Option<&Channel>,
    status: &mut CampaignStatus,
    conditions: &mut Vec<DesiredCondition>,
) -> Result<Action> {
    let stalled =
        |reason: &'static str, why: &String| DesiredCondition::truthy(ConditionType::Stalled, reason, why.clone());
    Ok(match step {
        // Receipts keep arriving for a day after a campaign completes: its status follows.
        Step::Nothing
            if status.phase == Some(Phase::Completed)
                && status
                    .finished_at
                    .as_ref()
                    .is_some_and(|at| r.now - time::instant(&at.0) < chrono::Duration::hours(24)) =>
        {
            Action::requeue(Duration::from_secs(30))
        }
        Step::Nothing | Step::Draft => Action::await_change(),
        Step::Reopen => {
            status.finished_at = None;
            send_again(r, "Reopened", "Meta withheld messages under its per-user marketing limit after the campaign completed: they are sent again when due").await?
        }
        Step::Cancel => {
            if job.is_some() {
                r.jobs
                    .delete(
                        &r.job_name,
                        &DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() },
                    )
                    .await?;
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
        Step::AccountHold(hold) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            conditions.push(DesiredCondition::truthy(ConditionType::Held, hold.reason(), hold.message()));
            // Signals arrive by webhook at any moment: look again soon, and at the end
            // of a restriction.
            let soon = Duration::from_secs(5);
            Action::requeue(hold.until().and_then(|u| (u - r.now).to_std().ok()).map_or(soon, |d| d.min(soon)))
        }
        Step::PauseForFailures(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            if let Some(c) = store::campaigns::counters(&r.ctx.pool, r.uid).await? {
                status.failure_baseline = Some(FailureBaseline { failed: c.failed, finished: c.finished_attempted() });
            }
            status.automatic_pause = Some(AutomaticPause {
                reason: "FailureThresholdExceeded".into(),
                message: why.clone(),
                since: Some(time::k8s(r.now)),
            });
            conditions.push(stalled("FailureThresholdExceeded", why));
            Action::await_change()
        }
        Step::HoldAutomaticPause(why) => {
            set_job_suspended(&r.jobs, &r.job_name, true).await?;
            // The failure threshold is the one automatic pause kept in status today.
            conditions.push(stalled("FailureThresholdExceeded", why));
            Action::await_change()
        }
        Step::Preflight => {
            match super::preflight::preflight(r.campaign, channel, r.ctx, &r.organization, &r.name, r.uid, status)
                .await?
            {
                Ok(()) => Action::requeue(Duration::ZERO),
                // A person fixes this (imports the contacts, edits the message); look again
                // now and then, and at once on an edit.
                Err(why) => {
                    conditions.push(stalled("PreflightFailed", &why));
                    Action::requeue(Duration::from_secs(30))
                }
            }
        }
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
        Step::SendRequeued => {
            send_again(
                r,
                "SendingRequeued",
                "messages Meta withheld under its per-user marketing limit are due again: a new Job sends them",
            )
            .await?
        }
        Step::AwaitRequeued(at) => {
            Action::requeue((*at - r.now).to_std().unwrap_or(Duration::ZERO).min(Duration::from_secs(10)))
        }
        Step::Complete | Step::Fail(_) => {
            status.finished_at.get_or_insert(time::k8s(r.now));
            Action::await_change()
        }
        Step::Restart => {
            status.finished_at = None;
            send_again(r, "Restarted", "resumed after failing: the remaining messages are sent by a new Job").await?
        }
    })
}

/// Deletes the finished Job so that the next reconcile creates one for the messages
/// still pending, and says why in an Event.
async fn send_again(r: &Reconcile<'_>, reason: &str, note: &str) -> Result<Action> {
    delete_job(&r.jobs, &r.job_name).await?;
    publish(r.ctx, r.campaign, EventType::Normal, reason, note.to_owned()).await;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// A cap of the channel is spent until `until`. The Job is suspended only when the wait
/// is long: senders wait out a spent minute in place rather than restart.
pub(super) async fn rate_limit(
    r: &Reconcile<'_>,
    until: DateTime<Utc>,
    status: &mut CampaignStatus,
    conditions: &mut Vec<DesiredCondition>,
) -> Result<Action> {
    if until - r.now > SUSPEND_WHEN_RATE_LIMITED_FOR && senders_had_time_to_stop(status, r.now) {
        set_job_suspended(&r.jobs, &r.job_name, true).await?;
    }
    let mut info = status.rate_limit.clone().unwrap_or_default();
    if status.phase != Some(Phase::RateLimited) {
        info.pauses += 1;
    }
    info.resume_at = Some(time::k8s(until));
    status.rate_limit = Some(info);
    conditions.push(DesiredCondition::truthy(
        ConditionType::RateLimited,
        "WindowSpent",
        format!("a cap of the channel, or its portfolio's 24 h messaging limit, is spent; sending resumes at {until}"),
    ));
    // Look again at the reset instant, and meanwhile every few seconds in case a
    // person lifted the pause or the windows were reset.
    Ok(Action::requeue(
        ((until - r.now).to_std().unwrap_or(Duration::ZERO) + Duration::from_millis(500)).min(Duration::from_secs(10)),
    ))
}

/// Whether the campaign has been rate-limited long enough for its senders to have ended
/// by themselves. Senders enforce the windows and the portfolio's budget before each
/// block; suspending the Job earlier would cut a block whose recipients were already
/// counted in the budget, leaving them counted but not messaged until the window moves.
fn senders_had_time_to_stop(status: &CampaignStatus, now: DateTime<Utc>) -> bool {
    crate::api::condition::find(&status.conditions, ConditionType::RateLimited)
        .filter(|c| c.status == "True")
        .is_some_and(|c| now - time::instant(&c.last_transition_time.0) >= SENDERS_END_THEIR_BLOCK_WITHIN)
}

/// Replaces a Job built from an older spec: suspend it, wait for its pods to go, then
/// delete it (the next reconcile creates the new one). A changed message also lifts a
/// stop caused by the old message.
pub(super) async fn replace_job(r: &Reconcile<'_>, job: Option<&JobView>) -> Result<Action> {
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
