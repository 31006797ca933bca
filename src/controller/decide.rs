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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobView {
    /// `spec.suspend`.
    pub suspended: bool,
    /// The Job reached its `Complete` condition.
    pub complete: bool,
    /// The Job reached its `Failed` condition.
    pub failed: bool,
}

/// What the controller remembers in status between reconciles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    /// The phase written last.
    pub phase: Option<Phase>,
    /// The audience was frozen.
    pub audience_frozen: bool,
    /// Failed and finished counts when the campaign last resumed, so the failure
    /// threshold judges what happened since (a person who resumes has seen the rest).
    pub failure_baseline: (i64, i64),
}

/// The one next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do (final phase).
    Nothing,
    /// Cancel: delete the Job, cancel pending messages.
    Cancel,
    /// Created suspended and never started.
    Draft,
    /// Suspended by a person: suspend the Job.
    Pause,
    /// Cannot proceed until something outside changes (why).
    Stall(String),
    /// Wait (suspending the Job if any) until the instant: startAt or the send window.
    WaitForSchedule(DateTime<Utc>),
    /// The channel's day window is spent: suspend the Job until the instant.
    RateLimit(DateTime<Utc>),
    /// The provider refused the channel: pause until a person acts.
    ChannelStopped(String),
    /// Failures ran past the threshold: pause (sets spec.suspend) with the reason.
    PauseForFailures(String),
    /// Check the audience and message, then freeze the audience.
    Preflight,
    /// Create the sending Job.
    CreateJob,
    /// Unsuspend the Job.
    ResumeJob,
    /// Running: refresh status and look again soon.
    Track,
    /// Every message is final.
    Complete,
    /// The Job failed (why).
    Fail(String),
}

/// Whether the failure ratio since the last resume passed the threshold.
pub fn failure_threshold_exceeded(spec: &CampaignSpec, counters: &Counters, baseline: (i64, i64)) -> Option<String> {
    let failed = counters.failed - baseline.0;
    let finished = counters.finished() - counters.cancelled - baseline.1;
    let threshold = &spec.failure_threshold;
    if finished < i64::from(threshold.min_sample) || finished <= 0 {
        return None;
    }
    let percent = failed * 100 / finished;
    (percent > i64::from(threshold.max_failure_percent)).then(|| {
        format!("{failed} of the last {finished} messages failed ({percent}%), over the {}% threshold: paused so the rest of the audience is not burned; check the error breakdown, fix, then resume", threshold.max_failure_percent)
    })
}

/// Decides the next step.
pub fn next_step(
    spec: &CampaignSpec,
    memory: &Memory,
    channel: &ChannelView,
    job: Option<&JobView>,
    counters: Option<&Counters>,
    now: DateTime<Utc>,
) -> Step {
    if memory.phase.is_some_and(Phase::is_terminal) {
        return Step::Nothing;
    }
    if spec.cancel {
        return Step::Cancel;
    }
    if spec.suspend {
        return if memory.audience_frozen || matches!(memory.phase, Some(Phase::Paused)) { Step::Pause } else { Step::Draft };
    }
    if let Some(job) = job {
        if job.failed {
            return Step::Fail("the sending Job failed: some batches failed beyond their retries (see the Job's events)".into());
        }
        if job.complete && counters.is_none_or(|c| c.pending + c.sending == 0) {
            return Step::Complete;
        }
    }
    match channel {
        ChannelView::Missing | ChannelView::NotReady(_) => {
            let why = match channel {
                ChannelView::NotReady(why) => why.clone(),
                _ => format!("channel {:?} not found in this namespace", spec.channel_ref.name),
            };
            return Step::Stall(why);
        }
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
    match job {
        None => {
            if counters.is_some_and(|c| c.pending + c.sending == 0) {
                Step::Complete
            } else {
                Step::CreateJob
            }
        }
        Some(job) if job.suspended => Step::ResumeJob,
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
        Memory { phase: Some(Phase::Running), audience_frozen: true, failure_baseline: (0, 0) }
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
        let ready = ChannelView::Ready;
        let later = now() + chrono::Duration::hours(2);
        let cases: Vec<(&str, CampaignSpec, Memory, ChannelView, Option<JobView>, Option<Counters>, Step)> = vec![
            ("new campaign preflights", spec(), fresh, ready.clone(), None, None, Step::Preflight),
            ("frozen without a job creates it", spec(), running(), ready.clone(), None, Some(counters(10, 0, 0)), Step::CreateJob),
            ("an active job is tracked", spec(), running(), ready.clone(), Some(active), Some(counters(5, 5, 0)), Step::Track),
            ("a suspended job resumes", spec(), running(), ready.clone(), Some(suspended), Some(counters(5, 5, 0)), Step::ResumeJob),
            ("a complete job completes", spec(), running(), ready.clone(), Some(complete), Some(counters(0, 10, 0)), Step::Complete),
            ("a failed job fails", spec(), running(), ready.clone(), Some(failed), Some(counters(1, 9, 0)), Step::Fail("the sending Job failed: some batches failed beyond their retries (see the Job's events)".into())),
            ("an empty frozen audience completes", spec(), running(), ready.clone(), None, Some(counters(0, 0, 0)), Step::Complete),
            ("suspended before start is a draft", CampaignSpec { suspend: true, ..spec() }, fresh, ready.clone(), None, None, Step::Draft),
            ("suspended after start pauses", CampaignSpec { suspend: true, ..spec() }, running(), ready.clone(), Some(active), None, Step::Pause),
            ("cancel wins over suspend", CampaignSpec { suspend: true, cancel: true, ..spec() }, running(), ready.clone(), Some(active), None, Step::Cancel),
            ("missing channel stalls with its name", spec(), fresh, ChannelView::Missing, None, None, Step::Stall("channel \"main\" not found in this namespace".into())),
            ("a spent day window rate-limits", spec(), running(), ChannelView::RateLimited(later), Some(active), None, Step::RateLimit(later)),
            ("an expired rate limit resumes", spec(), running(), ChannelView::RateLimited(now()), Some(suspended), None, Step::ResumeJob),
            ("terminal phases do nothing", spec(), Memory { phase: Some(Phase::Completed), ..running() }, ready.clone(), None, None, Step::Nothing),
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
        assert_eq!(next_step(&s, &Memory::default(), &ChannelView::Ready, None, None, now()), Step::WaitForSchedule(start));
        s.schedule = Some(Schedule { start_at: None, window: Some(SendWindow { start: "13:00".into(), end: "14:00".into(), time_zone: "UTC".into(), days: vec![] }) });
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
        let step = next_step(&s, &running(), &ChannelView::Ready, Some(&JobView::default()), Some(&counters(10, 20, 40)), now());
        assert!(matches!(step, Step::PauseForFailures(ref why) if why.contains("40 of the last 60")), "{step:?}");
    }
}
