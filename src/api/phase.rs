//! Campaign phases and the only legal ways between them, as one pure function.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a campaign is in its lifecycle (`status.phase`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Created suspended and never started.
    Draft,
    /// Waiting for `schedule.startAt` or the send window.
    Scheduled,
    /// Sending.
    Running,
    /// Suspended by a person, or by the failure threshold.
    Paused,
    /// The channel's day window is spent; resumes by itself at `rateLimit.resumeAt`.
    RateLimited,
    /// Every message reached a final state.
    Completed,
    /// Cancelled by a person; unsent messages were cancelled.
    Cancelled,
    /// Batches failed beyond their retries. Final, unless a person resumes it
    /// (`kubectl disparo resume`): then the remaining messages are sent.
    Failed,
}

impl Phase {
    /// Every phase, for metrics that report zero for absent phases.
    pub(crate) const ALL: [Phase; 8] = [
        Phase::Draft,
        Phase::Scheduled,
        Phase::Running,
        Phase::Paused,
        Phase::RateLimited,
        Phase::Completed,
        Phase::Cancelled,
        Phase::Failed,
    ];

    /// A final phase never changes again.
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Cancelled | Phase::Failed)
    }

    /// The name as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Draft => "Draft",
            Phase::Scheduled => "Scheduled",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
            Phase::RateLimited => "RateLimited",
            Phase::Completed => "Completed",
            Phase::Cancelled => "Cancelled",
            Phase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a campaign and may move its phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseEvent {
    /// First seen with `spec.suspend: true`.
    CreatedSuspended,
    /// Waiting for `startAt` or the send window to open (or it closed).
    AwaitStart,
    /// Sending starts (or restarts after the window opened).
    Start,
    /// `spec.suspend` became true.
    Suspend,
    /// `spec.suspend` became false.
    Resume,
    /// The failure ratio passed the threshold.
    FailureThresholdExceeded,
    /// The channel's day window is spent.
    RateLimitHit,
    /// The spent window reset.
    RateWindowReset,
    /// The Job completed: every batch finished.
    JobSucceeded,
    /// The Job failed, or preflight found the campaign cannot run.
    Fail,
    /// `spec.cancel` became true.
    Cancel,
    /// A person resumed a Failed campaign whose messages are not all final: its Job is
    /// replaced and the remaining messages are sent.
    Restart,
    /// Meta withheld messages of a completed campaign under its per-user marketing
    /// limit (a late 131049 receipt): they are pending again, so the campaign runs again.
    Requeued,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("campaign phase {from:?} does not change on {event:?}")]
pub struct InvalidTransition {
    /// The phase before (None: never set).
    pub from: Option<Phase>,
    /// The event that was refused.
    pub event: PhaseEvent,
}

/// The phase after `event`, or why it cannot happen. `from` is `None` for a campaign
/// whose status has never been written.
pub fn transition(from: Option<Phase>, event: PhaseEvent) -> Result<Phase, InvalidTransition> {
    use Phase::*;
    use PhaseEvent::*;
    let refused = || InvalidTransition { from, event };
    let to = match (from, event) {
        (Some(Failed), Restart) => Running,
        (Some(Completed), Requeued) => Running,
        (Some(p), _) if p.is_terminal() => return Err(refused()),
        (_, Cancel) => Cancelled,
        (None | Some(Draft), CreatedSuspended | Suspend) => Draft,
        (None | Some(Draft | Scheduled | Running), AwaitStart) => Scheduled,
        (Some(Draft), Resume) => Scheduled,
        (None | Some(Scheduled | Running), Start) => Running,
        (Some(Paused), Resume) => Running,
        (Some(Scheduled | Running | RateLimited), Suspend) => Paused,
        (Some(Paused), Suspend) => Paused,
        (Some(Running | RateLimited), FailureThresholdExceeded) => Paused,
        (Some(Running), RateLimitHit) => RateLimited,
        (Some(RateLimited), RateLimitHit) => RateLimited,
        (Some(RateLimited), RateWindowReset) => Running,
        (Some(Running | RateLimited | Paused), JobSucceeded) => Completed,
        (None | Some(Draft | Scheduled | Running | Paused | RateLimited), Fail) => Failed,
        _ => return Err(refused()),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::Phase::*;
    use super::PhaseEvent::*;
    use super::*;

    #[test]
    fn the_happy_path_runs_from_scheduled_to_completed() {
        let mut phase = None;
        for event in [AwaitStart, Start, JobSucceeded] {
            phase = Some(transition(phase, event).unwrap());
        }
        assert_eq!(phase, Some(Completed));
    }

    #[test]
    fn table_of_transitions() {
        let cases: &[(Option<Phase>, PhaseEvent, Option<Phase>)] = &[
            (None, CreatedSuspended, Some(Draft)),
            (Some(Draft), Resume, Some(Scheduled)),
            (Some(Draft), Suspend, Some(Draft)),
            (Some(Draft), Start, None),
            (Some(Scheduled), Start, Some(Running)),
            (Some(Running), AwaitStart, Some(Scheduled)),
            (Some(Running), Suspend, Some(Paused)),
            (Some(Paused), Resume, Some(Running)),
            (Some(Paused), Start, None),
            (Some(Running), FailureThresholdExceeded, Some(Paused)),
            (Some(Paused), FailureThresholdExceeded, None),
            (Some(Running), RateLimitHit, Some(RateLimited)),
            (Some(RateLimited), RateWindowReset, Some(Running)),
            (Some(RateLimited), Suspend, Some(Paused)),
            (Some(Running), RateWindowReset, None),
            (Some(Running), JobSucceeded, Some(Completed)),
            (Some(Scheduled), JobSucceeded, None),
            (Some(Running), Fail, Some(Failed)),
            (None, Fail, Some(Failed)),
            (Some(Running), Cancel, Some(Cancelled)),
            (Some(Draft), Cancel, Some(Cancelled)),
            (Some(Paused), Cancel, Some(Cancelled)),
        ];
        for (from, event, expected) in cases {
            assert_eq!(transition(*from, *event).ok(), *expected, "{from:?} on {event:?}");
        }
    }

    #[test]
    fn terminal_phases_never_change() {
        let events = [
            CreatedSuspended,
            AwaitStart,
            Start,
            Suspend,
            Resume,
            FailureThresholdExceeded,
            RateLimitHit,
            RateWindowReset,
            JobSucceeded,
            Fail,
            Cancel,
        ];
        assert_eq!(transition(Some(Failed), Restart), Ok(Running), "a person may resume a failed campaign");
        assert!(transition(Some(Completed), Restart).is_err() && transition(Some(Cancelled), Restart).is_err());
        assert_eq!(transition(Some(Completed), Requeued), Ok(Running), "messages Meta withheld run it again");
        assert!(transition(Some(Cancelled), Requeued).is_err() && transition(Some(Failed), Requeued).is_err());
        for phase in Phase::ALL.into_iter().filter(|p| p.is_terminal()) {
            for event in events {
                assert!(transition(Some(phase), event).is_err(), "{phase} moved on {event:?}");
            }
        }
    }

    #[test]
    fn cancel_reaches_cancelled_from_every_live_phase() {
        for phase in Phase::ALL.into_iter().filter(|p| !p.is_terminal()) {
            assert_eq!(transition(Some(phase), Cancel), Ok(Cancelled));
        }
    }
}
