//! What a pod's status says at each step of its life, decided without I/O.
//!
//! The Job controller reads these statuses to count successes and failures and to
//! apply `podFailurePolicy` (`onExitCodes` reads `state.terminated.exitCode`), so they
//! follow kubelet's conventions closely: exit code `128 + n` for a process killed by
//! signal `n`, reasons `Completed`/`Error`/`StartError`, `Ready` tracking the one
//! container, and condition transition times kept while a condition does not flip.

use std::{process::ExitStatus, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        HostIP, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use super::LOCAL_IP;

/// A pod's `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Restart whatever the exit code (Deployments).
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart (Job pods with a pod failure policy or per-index backoff).
    Never,
}

impl RestartPolicy {
    /// Reads the policy from the spec; the API defaults it to `Always`.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }
}

/// A pod's `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bound but its container is not running yet.
    Pending,
    /// Its container runs (or waits to be restarted).
    Running,
    /// Its container exited 0 and will not run again.
    Succeeded,
    /// Its container failed and will not run again.
    Failed,
}

impl Phase {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Reads the phase from a status; `None` for an absent or unknown value.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value? {
            "Pending" => Some(Self::Pending),
            "Running" => Some(Self::Running),
            "Succeeded" => Some(Self::Succeeded),
            "Failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// Whether the pod is done for good; the API refuses to leave these phases.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    /// The final phase for a container that ended with `exit_code`.
    pub fn from_exit_code(exit_code: i32) -> Self {
        if exit_code == 0 { Self::Succeeded } else { Self::Failed }
    }
}

/// How a process ended, in the terms a container status uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code as a container runtime reports it: the process's own code, or
    /// `128 + signal` when a signal killed it.
    pub code: i32,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
}

impl Exit {
    /// Converts a process's exit status.
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self { code, signal: None },
            (None, Some(signal)) => Self { code: 128 + signal, signal: Some(signal) },
            // Neither a code nor a signal: stopped/continued, which `wait` never
            // returns; count it as a generic failure rather than a success.
            (None, None) => Self { code: 1, signal: None },
        }
    }
}

/// Why a container is not running, as a container status `reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingReason {
    /// The container is being prepared.
    ContainerCreating,
    /// Its environment references something missing; retried.
    CreateContainerConfigError,
    /// It exited and waits out the restart back-off.
    CrashLoopBackOff,
}

impl WaitingReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ContainerCreating => "ContainerCreating",
            Self::CreateContainerConfigError => "CreateContainerConfigError",
            Self::CrashLoopBackOff => "CrashLoopBackOff",
        }
    }
}

/// Why a container terminated, as a container status `reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminationReason {
    /// Exited 0.
    Completed,
    /// Exited non-zero or was killed.
    Error,
    /// The process could not be started (exit code 128, as containerd reports).
    StartError,
    /// The container's configuration could not be built and retries ran out.
    CreateContainerConfigError,
    /// The process was lost (the agent restarted) or never ran before the pod
    /// ended; kubelet reports these with exit code 137.
    ContainerStatusUnknown,
}

impl TerminationReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "Completed",
            Self::Error => "Error",
            Self::StartError => "StartError",
            Self::CreateContainerConfigError => "CreateContainerConfigError",
            Self::ContainerStatusUnknown => "ContainerStatusUnknown",
        }
    }
}

/// Exit code kubelet reports for a container it could not find (SIGKILL's 128 + 9).
pub const UNKNOWN_EXIT_CODE: i32 = 137;
/// Exit code containerd reports when a process could not be executed.
pub const START_ERROR_EXIT_CODE: i32 = 128;

/// The end of one run of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code, exactly as `onExitCodes` will match it.
    pub exit_code: i32,
    /// Signal that killed the process, if any.
    pub signal: Option<i32>,
    /// Status reason.
    pub reason: TerminationReason,
    /// Human-readable detail (start errors, config errors).
    pub message: Option<String>,
    /// When the process started; `None` if it never did.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
    /// The runtime id of the process that ran.
    pub container_id: Option<String>,
}

impl Termination {
    /// A process that ran and exited.
    pub fn exited(exit: Exit, started_at: Timestamp, finished_at: Timestamp, container_id: String) -> Self {
        Self {
            exit_code: exit.code,
            signal: exit.signal,
            reason: if exit.code == 0 { TerminationReason::Completed } else { TerminationReason::Error },
            message: None,
            started_at: Some(started_at),
            finished_at,
            container_id: Some(container_id),
        }
    }

    /// A run that ended without a process to speak of.
    pub fn without_process(reason: TerminationReason, exit_code: i32, message: String, at: Timestamp) -> Self {
        Self {
            exit_code,
            signal: None,
            reason,
            message: Some(message),
            started_at: None,
            finished_at: at,
            container_id: None,
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> ContainerStateTerminated {
        ContainerStateTerminated {
            container_id: self.container_id.clone(),
            exit_code: self.exit_code,
            finished_at: Some(Time(self.finished_at)),
            message: self.message.clone(),
            reason: Some(self.reason.as_str().to_string()),
            signal: self.signal,
            started_at: self.started_at.map(Time),
        }
    }
}

/// The state of the one container the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Not running, for a reason.
    Waiting {
        /// Why.
        reason: WaitingReason,
        /// Detail, e.g. which Secret is missing.
        message: Option<String>,
    },
    /// Running since `started_at`.
    Running {
        /// Process start.
        started_at: Timestamp,
        /// The process's runtime id.
        container_id: String,
    },
    /// Ended.
    Terminated(Termination),
}

/// What to do after a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Run it again after the back-off.
    Restart,
    /// The pod is done, in this phase.
    Finish(Phase),
}

/// Decides, from the restart policy, what follows an exit with `exit_code`.
pub fn after_exit(policy: RestartPolicy, exit_code: i32) -> AfterExit {
    match (policy, exit_code) {
        (RestartPolicy::Always, _) => AfterExit::Restart,
        (RestartPolicy::OnFailure, 0) | (RestartPolicy::Never, 0) => AfterExit::Finish(Phase::Succeeded),
        (RestartPolicy::OnFailure, _) => AfterExit::Restart,
        (RestartPolicy::Never, _) => AfterExit::Finish(Phase::Failed),
    }
}

/// First restart delay, as kubelet's crash-loop back-off.
const RESTART_BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Longest restart delay, as kubelet's crash-loop back-off.
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(300);

/// How long to wait before the `restart_count`-th restart: 10 s doubling up to 5 min.
pub fn restart_delay(restart_count: i32) -> Duration {
    let doublings = u32::try_from(restart_count.saturating_sub(1)).unwrap_or(0).min(16);
    RESTART_BACKOFF_BASE.saturating_mul(1 << doublings).min(RESTART_BACKOFF_CAP)
}

/// Everything the status of a pod run by this agent says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodReport {
    /// The pod phase.
    pub phase: Phase,
    /// When the agent first took the pod on (`status.startTime`).
    pub start_time: Timestamp,
    /// The container's name.
    pub container_name: String,
    /// The container's image, echoed back as kubelet does.
    pub image: String,
    /// What really ran in place of the image.
    pub image_id: String,
    /// Restarts so far.
    pub restart_count: i32,
    /// The current state.
    pub state: Lifecycle,
    /// The previous run's end, after a restart.
    pub last_state: Option<Termination>,
    /// Pod-level reason, e.g. `Terminated` on agent shutdown.
    pub reason: Option<String>,
    /// Pod-level message.
    pub message: Option<String>,
    /// The pod's own loopback address (see `pod_ip`).
    pub pod_ip: std::net::Ipv4Addr,
    /// Set when the pod ends because the node agent goes away; adds the
    /// `DisruptionTarget` condition pod failure policies can match on.
    pub disruption: Option<String>,
}

/// Names of the pod conditions the agent maintains.
mod condition {
    pub const SCHEDULED: &str = "PodScheduled";
    pub const INITIALIZED: &str = "Initialized";
    pub const CONTAINERS_READY: &str = "ContainersReady";
    pub const READY: &str = "Ready";
    pub const DISRUPTION_TARGET: &str = "DisruptionTarget";
}

/// Builds the `status` a strategic-merge patch should send for `report`.
///
/// `previous` are the pod's current conditions: a condition whose status does not
/// change keeps its `lastTransitionTime`.
pub fn pod_status(report: &PodReport, previous: &[PodCondition], now: Timestamp) -> PodStatus {
    let running = matches!(report.state, Lifecycle::Running { .. });
    let (ready_reason, ready_message) = match (running, report.phase) {
        (true, _) => (None, None),
        (false, Phase::Succeeded) => (Some("PodCompleted"), None),
        (false, _) => {
            (Some("ContainersNotReady"), Some(format!("containers with unready status: [{}]", report.container_name)))
        }
    };
    let mut conditions = vec![
        make_condition(condition::SCHEDULED, true, None, None, previous, now),
        make_condition(condition::INITIALIZED, true, None, None, previous, now),
        make_condition(condition::CONTAINERS_READY, running, ready_reason, ready_message.clone(), previous, now),
        make_condition(condition::READY, running, ready_reason, ready_message, previous, now),
    ];
    if let Some(message) = &report.disruption {
        conditions.push(make_condition(
            condition::DISRUPTION_TARGET,
            true,
            Some("TerminationByKubelet"),
            Some(message.clone()),
            previous,
            now,
        ));
    }

    let (state, started, container_id) = match &report.state {
        Lifecycle::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.as_str().to_string()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            false,
            None,
        ),
        Lifecycle::Running { started_at, container_id } => (
            ContainerState {
                running: Some(ContainerStateRunning { started_at: Some(Time(*started_at)) }),
                ..Default::default()
            },
            true,
            Some(container_id.clone()),
        ),
        Lifecycle::Terminated(termination) => (
            ContainerState { terminated: Some(termination.to_wire()), ..Default::default() },
            false,
            termination.container_id.clone(),
        ),
    };
    let container = ContainerStatus {
        name: report.container_name.clone(),
        image: report.image.clone(),
        image_id: report.image_id.clone(),
        container_id,
        ready: running,
        started: Some(started),
        restart_count: report.restart_count,
        state: Some(state),
        last_state: report
            .last_state
            .as_ref()
            .map(|last| ContainerState { terminated: Some(last.to_wire()), ..Default::default() }),
        ..Default::default()
    };

    PodStatus {
        phase: Some(report.phase.as_str().to_string()),
        reason: report.reason.clone(),
        message: report.message.clone(),
        host_ip: Some(LOCAL_IP.to_string()),
        host_ips: Some(vec![HostIP { ip: LOCAL_IP.to_string() }]),
        pod_ip: Some(report.pod_ip.to_string()),
        pod_ips: Some(vec![PodIP { ip: report.pod_ip.to_string() }]),
        start_time: Some(Time(report.start_time)),
        conditions: Some(conditions),
        container_statuses: Some(vec![container]),
        ..Default::default()
    }
}

/// A condition, keeping the previous transition time when its status is unchanged.
fn make_condition(
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: Timestamp,
) -> PodCondition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    PodCondition {
        type_: type_.to_string(),
        status,
        reason: reason.map(str::to_string),
        message,
        last_transition_time: Some(last_transition_time),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn exit_statuses_map_to_runtime_exit_codes() {
        // Raw wait statuses: code << 8 for an exit, the signal number for a kill.
        let cases = [
            (0, Exit { code: 0, signal: None }),
            (3 << 8, Exit { code: 3, signal: None }),
            (255 << 8, Exit { code: 255, signal: None }),
            (15, Exit { code: 143, signal: Some(15) }),
            (9, Exit { code: 137, signal: Some(9) }),
        ];
        for (raw, expected) in cases {
            assert_eq!(Exit::from_status(ExitStatus::from_raw(raw)), expected, "raw {raw}");
        }
    }

    #[test]
    fn restart_policy_decides_what_follows_an_exit() {
        use AfterExit::*;
        let cases = [
            (RestartPolicy::Never, 0, Finish(Phase::Succeeded)),
            (RestartPolicy::Never, 3, Finish(Phase::Failed)),
            (RestartPolicy::Never, 137, Finish(Phase::Failed)),
            (RestartPolicy::OnFailure, 0, Finish(Phase::Succeeded)),
            (RestartPolicy::OnFailure, 1, Restart),
            (RestartPolicy::Always, 0, Restart),
            (RestartPolicy::Always, 2, Restart),
        ];
        for (policy, code, expected) in cases {
            assert_eq!(after_exit(policy, code), expected, "{policy:?} exit {code}");
        }
        assert_eq!(RestartPolicy::parse(None), RestartPolicy::Always);
        assert_eq!(RestartPolicy::parse(Some("OnFailure")), RestartPolicy::OnFailure);
        assert_eq!(RestartPolicy::parse(Some("Never")), RestartPolicy::Never);
    }

    #[test]
    fn restart_delay_doubles_up_to_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 4, 5, 6, 7, 100].map(|n| restart_delay(n).as_secs()).to_vec();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
    }

    fn report(state: Lifecycle, phase: Phase) -> PodReport {
        PodReport {
            phase,
            start_time: at(0),
            container_name: "sender".into(),
            image: "ghcr.io/disparo/disparo:dev".into(),
            image_id: "disparo-node-agent:///bin/sh".into(),
            restart_count: 0,
            state,
            last_state: None,
            reason: None,
            message: None,
            pod_ip: std::net::Ipv4Addr::new(127, 3, 2, 1),
            disruption: None,
        }
    }

    fn condition<'a>(status: &'a PodStatus, type_: &str) -> &'a PodCondition {
        status.conditions.iter().flatten().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    #[test]
    fn running_pod_is_ready() {
        let state = Lifecycle::Running { started_at: at(5), container_id: "disparo-node-agent://42".into() };
        let status = pod_status(&report(state, Phase::Running), &[], at(6));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("127.3.2.1"));
        assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(condition(&status, "Ready").status, "True");
        assert_eq!(condition(&status, "ContainersReady").status, "True");
        assert_eq!(condition(&status, "PodScheduled").status, "True");
        let cs = &status.container_statuses.clone().unwrap_or_default()[0];
        assert!(cs.ready);
        assert_eq!(cs.started, Some(true));
        let running = cs.state.as_ref().and_then(|s| s.running.as_ref());
        assert_eq!(running.and_then(|r| r.started_at.clone()), Some(Time(at(5))));
        assert_eq!(cs.container_id.as_deref(), Some("disparo-node-agent://42"));
    }

    #[test]
    fn terminated_pod_reports_the_exact_exit_code() {
        let termination =
            Termination::exited(Exit { code: 3, signal: None }, at(5), at(9), "disparo-node-agent://42".into());
        let status = pod_status(&report(Lifecycle::Terminated(termination), Phase::Failed), &[], at(9));
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        let cs = &status.container_statuses.clone().unwrap_or_default()[0];
        let terminated = cs.state.as_ref().and_then(|s| s.terminated.clone());
        let terminated = terminated.unwrap_or_else(|| panic!("not terminated"));
        assert_eq!(terminated.exit_code, 3);
        assert_eq!(terminated.reason.as_deref(), Some("Error"));
        assert_eq!(terminated.started_at, Some(Time(at(5))));
        assert_eq!(terminated.finished_at, Some(Time(at(9))));
        assert!(!cs.ready);
        assert_eq!(condition(&status, "Ready").status, "False");
        assert_eq!(condition(&status, "Ready").reason.as_deref(), Some("ContainersNotReady"));
    }

    #[test]
    fn succeeded_pod_is_completed() {
        let termination = Termination::exited(Exit { code: 0, signal: None }, at(5), at(9), "id".into());
        let status = pod_status(&report(Lifecycle::Terminated(termination), Phase::Succeeded), &[], at(9));
        let reason = status
            .container_statuses
            .iter()
            .flatten()
            .find_map(|cs| cs.state.as_ref()?.terminated.as_ref()?.reason.clone());
        assert_eq!(reason.as_deref(), Some("Completed"));
        assert_eq!(condition(&status, "Ready").reason.as_deref(), Some("PodCompleted"));
    }

    #[test]
    fn transition_times_survive_until_a_condition_flips() {
        let previous = vec![
            PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(Time(at(1))),
                ..Default::default()
            },
            PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                last_transition_time: Some(Time(at(0))),
                ..Default::default()
            },
        ];
        let running = Lifecycle::Running { started_at: at(1), container_id: "id".into() };
        let status = pod_status(&report(running, Phase::Running), &previous, at(50));
        assert_eq!(condition(&status, "Ready").last_transition_time, Some(Time(at(1))));
        assert_eq!(condition(&status, "PodScheduled").last_transition_time, Some(Time(at(0))));
        assert_eq!(condition(&status, "Initialized").last_transition_time, Some(Time(at(50))));

        let waiting = Lifecycle::Waiting { reason: WaitingReason::CrashLoopBackOff, message: None };
        let status = pod_status(&report(waiting, Phase::Running), &previous, at(60));
        assert_eq!(condition(&status, "Ready").status, "False");
        assert_eq!(condition(&status, "Ready").last_transition_time, Some(Time(at(60))));
    }

    #[test]
    fn shutdown_marks_a_disruption_target() {
        let mut r = report(
            Lifecycle::Terminated(Termination::exited(Exit { code: 143, signal: Some(15) }, at(1), at(2), "id".into())),
            Phase::Failed,
        );
        r.disruption = Some("node agent shut down".into());
        r.reason = Some("Terminated".into());
        let status = pod_status(&r, &[], at(2));
        assert_eq!(condition(&status, "DisruptionTarget").status, "True");
        assert_eq!(status.reason.as_deref(), Some("Terminated"));
        let terminated =
            status.container_statuses.iter().flatten().find_map(|cs| cs.state.as_ref()?.terminated.clone());
        assert_eq!(terminated.map(|t| (t.exit_code, t.signal)), Some((143, Some(15))));
    }

    #[test]
    fn config_errors_wait_with_a_reason() {
        let waiting = Lifecycle::Waiting {
            reason: WaitingReason::CreateContainerConfigError,
            message: Some("secret \"meta\" not found".into()),
        };
        let status = pod_status(&report(waiting, Phase::Pending), &[], at(1));
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let waiting = status.container_statuses.iter().flatten().find_map(|cs| cs.state.as_ref()?.waiting.clone());
        let waiting = waiting.unwrap_or_else(|| panic!("not waiting"));
        assert_eq!(waiting.reason.as_deref(), Some("CreateContainerConfigError"));
        assert_eq!(waiting.message.as_deref(), Some("secret \"meta\" not found"));
    }
}
