//! The heart of campaign reconciliation, as one pure function: from what the
//! controller observed (spec, status, channel, Job, counters, time) to the one next
//! [`Step`]. `campaign.rs` gathers the observations and carries the step out.

use chrono::{DateTime, Utc};

use super::schedule::{self, Gate};
use crate::api::{CampaignSpec, Phase};
use crate::store::campaigns::Counters;

/// What the controller knows about the campaign's Channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelView {
    /// No Channel of that name in the namespace.
    Missing,
    /// It exists but cannot send (why, for a person).
    NotReady(String),
    /// It can send.
    Ready,
    /// Its day window is spent until the instant.
    RateLimited(DateTime<Utc>),
    /// The provider refused it; a person must act (why).
    Stopped(String),
}

/// The campaign's sending Job as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobView {
    /// `spec.suspend`.
    pub suspended: bool,
    /// The Job reached its `Complete` condition.
    pub complete: bool,
    /// The Job reached its `Failed` condition.
    pub failed: bool,
    /// Pods still running (a suspended Job's pods take a moment to go).
    pub active: i32,
    /// The Job is being deleted.
    pub deleting: bool,
    /// It was built from another send configuration than the spec's now (the message,
    /// channel or retry policy was edited): it must be replaced before sending goes on.
    pub stale: bool,
    /// A Job of that name is not owned by this campaign (why).
    pub foreign: Option<String>,
    /// Its pods cannot run (a missing Secret, an image that cannot be pulled, a crash
    /// loop), as a person should read it.
    pub pods_failing: Option<String>,
}

/// What the controller remembers in status (and Postgres) between reconciles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Memory {
    /// The phase written last.
    pub phase: Option<Phase>,
    /// The audience was frozen.
    pub audience_frozen: bool,
    /// Failed and finished counts when the campaign last resumed, so the failure
    /// threshold judges what happened since (a person who resumes has seen the rest).
    pub failure_baseline: (i64, i64),
    /// A pause the operator decided (the failure threshold), until a person resumes.
    pub automatic_pause: Option<String>,
    /// The provider refused this campaign's message (why), until a person resumes or
    /// edits the message.
    pub campaign_stop: Option<String>,
    /// A person asked to resume in this reconcile (a new resume annotation).
    pub resume_requested: bool,
    /// Meta's account signals hold the campaign back (a degraded number, its template
    /// paused, a restriction) until they lift.
    pub account_hold: Option<crate::account::Hold>,
    /// When the earliest pending message is due, looked up when the Job completed with
    /// messages still pending (put back for a day by Meta's per-user marketing limit).
    pub next_due: Option<DateTime<Utc>>,
}

/// The one next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do (final phase).
    Nothing,
    /// Cancel: delete the Job, cancel pending messages.
    Cancel,
    /// Created suspended and never started.
    Draft,
    /// Suspended by a person: suspend the Job.
    Pause,
    /// Cannot proceed until something outside changes (why): suspend the Job if any.
    Stall(String),
    /// Wait (suspending the Job if any) until the instant: startAt or the send window.
    WaitForSchedule(DateTime<Utc>),
    /// A cap of the channel is spent until the instant.
    RateLimit(DateTime<Utc>),
    /// The provider refused the channel: pause until a person acts.
    ChannelStopped(String),
    /// The provider refused this campaign's message: pause until a person acts.
    MessageRejected(String),
    /// Failures ran past the threshold: pause (in status) with the reason.
    PauseForFailures(String),
    /// Paused by the operator earlier (why), until a person resumes.
    HoldAutomaticPause(String),
    /// Meta's signals hold the campaign back: pause until they lift.
    AccountHold(crate::account::Hold),
    /// Check the audience and message, then freeze the audience.
    Preflight,
    /// Create the sending Job.
    CreateJob,
    /// The Job was built from an older spec: stop it, delete it, create it anew.
    ReplaceJob,
    /// The Job is going away (replacement, restart): wait.
    AwaitJobDeletion,
    /// Unsuspend the Job.
    ResumeJob,
    /// Running: refresh status and look again soon.
    Track,
    /// The Job completed, but messages were put back for later (Meta's per-user
    /// marketing limit): wait until the first is due, then replace the Job.
    AwaitRequeued(DateTime<Utc>),
    /// Messages put back for later are due: delete the completed Job, so a new one sends them.
    SendRequeued,
    /// A completed campaign has messages pending again (a late 131049): run it again.
    Reopen,
    /// The Job's pods cannot run (why); the Job keeps trying, a person should look.
    PodsFailing(String),
    /// Every message is final.
    Complete,
    /// The Job failed (why).
    Fail(String),
    /// A person resumed a Failed campaign with messages left: replace its Job.
    Restart,
}

/// Whether the failure ratio since the last resume passed the threshold.
pub(crate) fn failure_threshold_exceeded(
    spec: &CampaignSpec,
    counters: &Counters,
    baseline: (i64, i64),
) -> Option<String> {
    let failed = counters.failed - baseline.0;
    let finished = counters.finished_attempted() - baseline.1;
    let threshold = &spec.failure_threshold;
    if finished < i64::from(threshold.min_sample) || finished <= 0 {
        return None;
    }
    let percent = failed * 100 / finished;
    (percent > i64::from(threshold.max_failure_percent)).then(|| {
        format!("{failed} of the last {finished} messages failed ({percent}%), over the {}% threshold: paused so the rest of the audience is not burned; check the error breakdown, fix, then `kubectl disparo resume`", threshold.max_failure_percent)
    })
}

fn unfinished(counters: Option<&Counters>) -> bool {
    counters.is_some_and(|c| c.pending + c.sending > 0)
}

/// Decides the next step.
pub(crate) fn next_step(
    spec: &CampaignSpec,
    memory: &Memory,
    channel: &ChannelView,
    job: Option<&JobView>,
    counters: Option<&Counters>,
    now: DateTime<Utc>,
) -> Step {
    if memory.phase == Some(Phase::Failed) && memory.resume_requested && !spec.cancel && unfinished(counters) {
        return Step::Restart;
    }
    if memory.phase == Some(Phase::Completed) && !spec.cancel && counters.is_some_and(|c| c.pending > 0) {
        return Step::Reopen;
    }
    if memory.phase.is_some_and(Phase::is_terminal) {
        return Step::Nothing;
    }
    if spec.cancel {
        return Step::Cancel;
    }
    if let Some(job) = job {
        if let Some(why) = &job.foreign {
            return Step::Stall(why.clone());
        }
        if job.deleting {
            return Step::AwaitJobDeletion;
        }
    }
    if spec.suspend {
        return if memory.audience_frozen || matches!(memory.phase, Some(Phase::Paused)) {
            Step::Pause
        } else {
            Step::Draft
        };
    }
    if let Some(why) = &memory.automatic_pause {
        return Step::HoldAutomaticPause(why.clone());
    }
    if let Some(why) = &memory.campaign_stop {
        return Step::MessageRejected(why.clone());
    }
    if let Some(job) = job {
        if job.failed {
            return Step::Fail("the sending Job failed: some batches failed beyond their retries (see the Job's events); `kubectl disparo resume` sends the rest once the cause is fixed".into());
        }
        if job.complete && !unfinished(counters) {
            return Step::Complete;
        }
    }
    match channel {
        ChannelView::Missing => {
            return Step::Stall(format!("channel {:?} not found in this namespace", spec.channel_ref.name));
        }
        ChannelView::NotReady(why) => return Step::Stall(why.clone()),
        ChannelView::Stopped(why) => return Step::ChannelStopped(why.clone()),
        ChannelView::RateLimited(until) if *until > now => return Step::RateLimit(*until),
        ChannelView::RateLimited(_) | ChannelView::Ready => {}
    }
    match schedule::gate(spec.schedule.as_ref(), now) {
        Ok(Gate::OpensAt(at)) => return Step::WaitForSchedule(at),
        Ok(Gate::Open { .. }) => {}
        Err(e) => return Step::Stall(e.to_string()),
    }
    if let Some(counters) = counters
        && let Some(why) = failure_threshold_exceeded(spec, counters, memory.failure_baseline)
    {
        return Step::PauseForFailures(why);
    }
    if !memory.audience_frozen {
        return Step::Preflight;
    }
    if let Some(hold) = &memory.account_hold {
        return Step::AccountHold(hold.clone());
    }
    match job {
        None if unfinished(counters) || counters.is_none() => Step::CreateJob,
        None => Step::Complete,
        Some(job) if job.stale => Step::ReplaceJob,
        Some(job) if job.complete => match memory.next_due {
            Some(at) if at > now => Step::AwaitRequeued(at),
            _ => Step::SendRequeued,
        },
        Some(job) if job.suspended => Step::ResumeJob,
        Some(JobView { pods_failing: Some(why), .. }) => Step::PodsFailing(why.clone()),
        Some(_) => Step::Track,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Schedule, SendWindow};
    use chrono::TimeZone;

    fn spec() -> CampaignSpec {
        serde_json::from_value(serde_json::json!({
            "channelRef": {"name": "main"},
            "message": {"text": "hi {{contact.name}}"},
            "audience": {"allContacts": true},
        }))
        .unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
    }

    fn running() -> Memory {
        Memory { phase: Some(Phase::Running), audience_frozen: true, ..Default::default() }
    }

    fn counters(pending: i64, sent: i64, failed: i64) -> Counters {
        Counters { total: pending + sent + failed, pending, sent, failed, ..Default::default() }
    }

    #[test]
    fn table() {
        let fresh = Memory::default();
        let active = JobView::default();
        let suspended = JobView { suspended: true, ..Default::default() };
        let complete = JobView { complete: true, ..Default::default() };
        let failed = JobView { failed: true, ..Default::default() };
        let stale = JobView { stale: true, ..Default::default() };
        let ready = ChannelView::Ready;
        let later = now() + chrono::Duration::hours(2);
        let failed_phase = Memory { phase: Some(Phase::Failed), ..running() };
        type Case = (&'static str, CampaignSpec, Memory, ChannelView, Option<JobView>, Option<Counters>, Step);
        let cases: Vec<Case> = vec![
            ("new campaign preflights", spec(), fresh.clone(), ready.clone(), None, None, Step::Preflight),
            ("frozen without a job creates it", spec(), running(), ready.clone(), None, Some(counters(10, 0, 0)), Step::CreateJob),
            ("an active job is tracked", spec(), running(), ready.clone(), Some(active.clone()), Some(counters(5, 5, 0)), Step::Track),
            ("a suspended job resumes", spec(), running(), ready.clone(), Some(suspended.clone()), Some(counters(5, 5, 0)), Step::ResumeJob),
            ("a complete job completes", spec(), running(), ready.clone(), Some(complete), Some(counters(0, 10, 0)), Step::Complete),
            ("a failed job fails", spec(), running(), ready.clone(), Some(failed.clone()), Some(counters(1, 9, 0)), Step::Fail("the sending Job failed: some batches failed beyond their retries (see the Job's events); `kubectl disparo resume` sends the rest once the cause is fixed".into())),
            ("an empty frozen audience completes", spec(), running(), ready.clone(), None, Some(counters(0, 0, 0)), Step::Complete),
            ("suspended before start is a draft", CampaignSpec { suspend: true, ..spec() }, fresh.clone(), ready.clone(), None, None, Step::Draft),
            ("suspended after start pauses", CampaignSpec { suspend: true, ..spec() }, running(), ready.clone(), Some(active.clone()), None, Step::Pause),
            ("cancel wins over suspend", CampaignSpec { suspend: true, cancel: true, ..spec() }, running(), ready.clone(), Some(active.clone()), None, Step::Cancel),
            ("missing channel stalls with its name", spec(), fresh.clone(), ChannelView::Missing, None, None, Step::Stall("channel \"main\" not found in this namespace".into())),
            ("a missing channel stalls a running campaign too", spec(), running(), ChannelView::Missing, Some(active.clone()), Some(counters(5, 5, 0)), Step::Stall("channel \"main\" not found in this namespace".into())),
            ("a spent day window rate-limits", spec(), running(), ChannelView::RateLimited(later), Some(active.clone()), None, Step::RateLimit(later)),
            ("an expired rate limit resumes", spec(), running(), ChannelView::RateLimited(now()), Some(suspended.clone()), None, Step::ResumeJob),
            ("terminal phases do nothing", spec(), Memory { phase: Some(Phase::Completed), ..running() }, ready.clone(), None, None, Step::Nothing),
            ("an edited spec replaces the job on resume", spec(), Memory { phase: Some(Phase::Paused), ..running() }, ready.clone(), Some(JobView { suspended: true, stale: true, ..Default::default() }), Some(counters(5, 5, 0)), Step::ReplaceJob),
            ("an edited spec replaces a running job", spec(), running(), ready.clone(), Some(stale.clone()), Some(counters(5, 5, 0)), Step::ReplaceJob),
            ("a job being deleted is waited for", spec(), running(), ready.clone(), Some(JobView { deleting: true, ..Default::default() }), Some(counters(5, 5, 0)), Step::AwaitJobDeletion),
            ("a job owned by someone else stalls", spec(), running(), ready.clone(), Some(JobView { foreign: Some("not ours".into()), ..Default::default() }), None, Step::Stall("not ours".into())),
            ("an automatic pause holds until resumed", spec(), Memory { automatic_pause: Some("too many failures".into()), ..running() }, ready.clone(), Some(suspended.clone()), Some(counters(5, 5, 0)), Step::HoldAutomaticPause("too many failures".into())),
            ("a rejected message stops the campaign only", spec(), Memory { campaign_stop: Some("template paused".into()), ..running() }, ready.clone(), Some(active.clone()), Some(counters(5, 5, 0)), Step::MessageRejected("template paused".into())),
            ("failing pods are reported", spec(), running(), ready.clone(), Some(JobView { pods_failing: Some("pod x: CreateContainerConfigError".into()), ..Default::default() }), Some(counters(5, 0, 0)), Step::PodsFailing("pod x: CreateContainerConfigError".into())),
            ("a failed campaign stays failed", spec(), failed_phase.clone(), ready.clone(), Some(failed.clone()), Some(counters(5, 5, 0)), Step::Nothing),
            ("a resumed failed campaign restarts", spec(), Memory { resume_requested: true, ..failed_phase.clone() }, ready.clone(), Some(failed.clone()), Some(counters(5, 5, 0)), Step::Restart),
            ("Meta's hold pauses a running campaign", spec(), Memory { account_hold: Some(crate::account::Hold::QualityDegraded { signal: "FLAGGED".into() }), ..running() }, ready.clone(), Some(active.clone()), Some(counters(5, 5, 0)), Step::AccountHold(crate::account::Hold::QualityDegraded { signal: "FLAGGED".into() })),
            ("a held campaign still completes when nothing is left", spec(), Memory { account_hold: Some(crate::account::Hold::QualityDegraded { signal: "FLAGGED".into() }), ..running() }, ready.clone(), Some(JobView { complete: true, ..Default::default() }), Some(counters(0, 10, 0)), Step::Complete),
            ("a complete job with messages put back for a day waits for them", spec(), Memory { next_due: Some(later), ..running() }, ready.clone(), Some(JobView { complete: true, ..Default::default() }), Some(counters(2, 8, 0)), Step::AwaitRequeued(later)),
            ("a complete job with messages due again is replaced", spec(), Memory { next_due: Some(now()), ..running() }, ready.clone(), Some(JobView { complete: true, ..Default::default() }), Some(counters(2, 8, 0)), Step::SendRequeued),
            ("a completed campaign with messages withheld late runs again", spec(), Memory { phase: Some(Phase::Completed), ..running() }, ready.clone(), Some(JobView { complete: true, ..Default::default() }), Some(counters(2, 8, 0)), Step::Reopen),
            ("a resumed failed campaign with nothing left stays failed", spec(), Memory { resume_requested: true, ..failed_phase }, ready.clone(), Some(failed), Some(counters(0, 10, 0)), Step::Nothing),
        ];
        for (name, spec, memory, channel, job, counters, expected) in cases {
            assert_eq!(next_step(&spec, &memory, &channel, job.as_ref(), counters.as_ref(), now()), expected, "{name}");
        }
    }

    #[test]
    fn waits_for_start_at_and_the_window() {
        let mut s = spec();
        let start = now() + chrono::Duration::minutes(30);
        s.schedule = Some(Schedule { start_at: Some(crate::api::time::k8s(start)), window: None });
        assert_eq!(
            next_step(&s, &Memory::default(), &ChannelView::Ready, None, None, now()),
            Step::WaitForSchedule(start)
        );
        s.schedule = Some(Schedule {
            start_at: None,
            window: Some(SendWindow {
                start: "13:00".into(),
                end: "14:00".into(),
                time_zone: "UTC".into(),
                days: vec![],
            }),
        });
        assert_eq!(
            next_step(&s, &running(), &ChannelView::Ready, Some(&JobView::default()), None, now()),
            Step::WaitForSchedule(Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap())
        );
    }

    #[test]
    fn the_failure_threshold_needs_a_sample_and_honours_the_baseline() {
        let s = spec(); // 50% after 50 finished
        assert_eq!(failure_threshold_exceeded(&s, &counters(0, 10, 30), (0, 0)), None, "sample too small");
        assert!(failure_threshold_exceeded(&s, &counters(0, 20, 40), (0, 0)).is_some());
        assert_eq!(failure_threshold_exceeded(&s, &counters(0, 20, 40), (40, 60)), None, "nothing new since resume");
        let step = next_step(
            &s,
            &running(),
            &ChannelView::Ready,
            Some(&JobView::default()),
            Some(&counters(10, 20, 40)),
            now(),
        );
        assert!(matches!(step, Step::PauseForFailures(ref why) if why.contains("40 of the last 60")), "{step:?}");
    }
}
