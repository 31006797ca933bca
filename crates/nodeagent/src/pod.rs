//! Kubelet's half: supervision of one pod bound to this node.
//!
//! A supervisor task owns the pod's process from start to final status. It receives
//! every new version of the pod over a `watch` channel (the agent drops the sender
//! when the pod disappears from the API) and reacts to three interruptions:
//! graceful deletion (SIGTERM the group, wait the grace period, SIGKILL, report the
//! final status, then delete the pod with grace 0 as kubelet does), disappearance
//! (kill, nothing left to report to), and agent shutdown (kill quickly, report the pod
//! `Failed` with a `DisruptionTarget` condition as kubelet's graceful node shutdown does).
//!
//! Only the first regular container runs; init containers and sidecars are ignored,
//! which suits the single-container Job pods Disparo creates.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, Pod, PodCondition, Secret},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    FIELD_MANAGER,
    agent::Context,
    command,
    credentials::{self, BoundPod, CredentialError, PodCredentials},
    env::{self, ConfigError, PodFields, Sources},
    process::{self, Launch},
    status::{
        self, AfterExit, Exit, Lifecycle, Phase, PodReport, RestartPolicy, START_ERROR_EXIT_CODE, Termination,
        TerminationReason, UNKNOWN_EXIT_CODE, WaitingReason,
    },
};

/// Grace period when the pod spec does not set one (the API default).
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Shortest grace kubelet gives a process, even for a zero-second deletion.
const MIN_GRACE: Duration = Duration::from_secs(2);
/// Longest grace on agent shutdown: the agent's own stop must stay quick.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the shutdown status report may take before it is abandoned.
const SHUTDOWN_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Configuration attempts before a pod whose Secret/ConfigMap is missing is failed,
/// so a Job does not hang forever; the delays between them add up to about a minute,
/// which covers the usual race of a Secret created just after its Job.
const CONFIG_ATTEMPTS: u32 = 6;
/// First delay between configuration attempts, doubled each time.
const CONFIG_RETRY_BASE: Duration = Duration::from_secs(2);
/// Attempts for a status report that must arrive (a final one carries the exit code).
const FINAL_REPORT_ATTEMPTS: u32 = 10;
/// Attempts for an intermediate status report; the next report supersedes it anyway.
const PROGRESS_REPORT_ATTEMPTS: u32 = 3;
/// Attempts to delete a pod after its containers stopped.
const DELETE_ATTEMPTS: u32 = 5;
/// Prefix of the container and image ids this agent reports.
const ID_SCHEME: &str = "disparo-node-agent://";

/// Why supervision must stop before the container ends on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    /// The pod was deleted gracefully: stop within the grace period, report, remove it.
    Deleted { grace: Duration },
    /// The pod vanished from the API: stop; there is nothing left to report to.
    Gone,
    /// The agent is shutting down.
    Shutdown { grace: Duration },
}

impl Interrupt {
    fn grace(self) -> Duration {
        match self {
            Self::Deleted { grace } | Self::Shutdown { grace } => grace,
            Self::Gone => MIN_GRACE,
        }
    }
}

/// Why a container could not be prepared.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("could not read {kind} {name:?}: {source}")]
    Fetch {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What preparing the container came to.
enum Prepared {
    Ready(Launch),
    Interrupted(Interrupt),
    GaveUp(String),
}

/// What one run of the container came to.
enum RunOutcome {
    Exited(Termination),
    Interrupted(Interrupt, Termination),
}

/// Whether supervision continues after a container ended.
enum Flow {
    Again,
    Done,
}

/// Supervises the pod `pods` carries until it is finished, deleted, gone, or the
/// agent stops. Never leaves its process running.
pub(super) async fn supervise(ctx: Arc<Context>, pods: watch::Receiver<Arc<Pod>>, stop: CancellationToken) {
    let pod = pods.borrow().clone();
    match Supervisor::new(ctx, pods, stop, &pod) {
        Some(supervisor) => supervisor.run().await,
        None => warn!("pod has no name, namespace or containers; not running it"),
    }
}

/// One pod's supervision state.
struct Supervisor {
    ctx: Arc<Context>,
    api: Api<Pod>,
    pods: watch::Receiver<Arc<Pod>>,
    stop: CancellationToken,
    name: String,
    uid: String,
    container: Container,
    policy: RestartPolicy,
    restart_count: i32,
    /// The previous run's end, reported as `lastState` and used as the final state
    /// if the pod ends while the container waits to restart.
    last_termination: Option<Termination>,
    /// `status.startTime`: kept from the pod if a previous agent set it.
    start_time: Timestamp,
    /// What ran in place of the image, once known.
    image_id: String,
    /// `<work-dir>/<namespace>_<pod>_<container>.log`, appended across restarts.
    log_path: std::path::PathBuf,
    /// The pod's ServiceAccount token and kubeconfig, if it mounts a token: issued at
    /// the first start, kept across restarts (as kubelet keeps the volume), removed
    /// when supervision ends.
    credentials: Option<PodCredentials>,
}

impl Supervisor {
    fn new(ctx: Arc<Context>, pods: watch::Receiver<Arc<Pod>>, stop: CancellationToken, pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone()?;
        let namespace = pod.metadata.namespace.clone()?;
        let uid = pod.metadata.uid.clone()?;
        let spec = pod.spec.as_ref()?;
        let container = spec.containers.first()?.clone();
        let log_path = ctx.settings.work_dir.join(format!("{namespace}_{name}_{}.log", container.name));
        let start_time =
            pod.status.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0).unwrap_or_else(Timestamp::now);
        let image_id = format!("{ID_SCHEME}{}", ctx.settings.binary.display());
        Some(Self {
            api: Api::namespaced(ctx.client.clone(), &namespace),
            ctx,
            pods,
            stop,
            name,
            uid,
            policy: RestartPolicy::parse(spec.restart_policy.as_deref()),
            container,
            restart_count: 0,
            last_termination: None,
            start_time,
            image_id,
            log_path,
            credentials: None,
        })
    }

    async fn run(mut self) {
        if let Some(lost) = self.adopt_previous_status() {
            warn!("container was running under a previous node agent and is lost");
            if let Flow::Done = self.settle(lost).await {
                return;
            }
        }
        loop {
            if let Some(interrupt) = self.pending_interrupt() {
                return self.finish_idle(interrupt).await;
            }
            let launch = match self.prepare_with_retries().await {
                Prepared::Ready(launch) => launch,
                Prepared::Interrupted(interrupt) => return self.finish_idle(interrupt).await,
                Prepared::GaveUp(message) => return self.fail_config(message).await,
            };
            let termination = match self.run_once(&launch).await {
                RunOutcome::Exited(termination) => termination,
                RunOutcome::Interrupted(interrupt, termination) => {
                    return self.finish_stopped(interrupt, termination).await;
                }
            };
            if let Flow::Done = self.settle(termination).await {
                return;
            }
        }
    }

    /// Picks up what a previous agent reported for this pod. A container it reported
    /// running cannot be reattached (its process died with that agent), so it counts
    /// as lost, as kubelet counts a container it cannot find.
    fn adopt_previous_status(&mut self) -> Option<Termination> {
        let pod = self.pods.borrow().clone();
        let previous =
            pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|cs| cs.name == self.container.name)?;
        self.restart_count = previous.restart_count;
        previous.state.as_ref()?.running.as_ref()?;
        Some(Termination::without_process(
            TerminationReason::ContainerStatusUnknown,
            UNKNOWN_EXIT_CODE,
            "The container could not be located when the node agent restarted".to_string(),
            Timestamp::now(),
        ))
    }

    /// Decides what follows a run's end: the final status, or a restart after back-off.
    async fn settle(&mut self, termination: Termination) -> Flow {
        match status::after_exit(self.policy, termination.exit_code) {
            AfterExit::Finish(phase) => {
                let report = self.report(phase, Lifecycle::Terminated(termination));
                self.send_final(&report).await;
                Flow::Done
            }
            AfterExit::Restart => {
                self.restart_count += 1;
                self.last_termination = Some(termination);
                let delay = status::restart_delay(self.restart_count);
                info!(restart_count = self.restart_count, delay_seconds = delay.as_secs(), "container will restart");
                let waiting = Lifecycle::Waiting {
                    reason: WaitingReason::CrashLoopBackOff,
                    message: Some(format!(
                        "back-off {}s restarting failed container={} pod={}",
                        delay.as_secs(),
                        self.container.name,
                        self.name
                    )),
                };
                self.send_progress(&self.report(Phase::Running, waiting)).await;
                match self.sleep_or_interrupt(delay).await {
                    Some(interrupt) => {
                        self.finish_idle(interrupt).await;
                        Flow::Done
                    }
                    None => Flow::Again,
                }
            }
        }
    }

    /// Starts the process, reports it running, and waits for it to end or be stopped.
    async fn run_once(&mut self, launch: &Launch) -> RunOutcome {
        let started_at = Timestamp::now();
        let mut group = match process::spawn(launch) {
            Ok(group) => group,
            Err(error) => {
                warn!(program = %launch.program.display(), %error, "container failed to start");
                return RunOutcome::Exited(Termination::without_process(
                    TerminationReason::StartError,
                    START_ERROR_EXIT_CODE,
                    format!("failed to start {}: {error}", launch.program.display()),
                    Timestamp::now(),
                ));
            }
        };
        let pid = group.pid();
        let container_id = format!("{ID_SCHEME}{pid}");
        info!(pid, program = %launch.program.display(), log = %launch.log_path.display(), "container started");
        let running = Lifecycle::Running { started_at, container_id: container_id.clone() };
        self.send_progress(&self.report(Phase::Running, running)).await;

        let (ended, interrupt) = tokio::select! {
            ended = group.wait() => (ended, None),
            interrupt = self.next_interrupt() => {
                info!(pid, grace_seconds = interrupt.grace().as_secs(), ?interrupt, "stopping container");
                (group.terminate(interrupt.grace()).await, Some(interrupt))
            }
        };
        let termination = match ended {
            Ok(status) => {
                let exit = Exit::from_status(status);
                info!(pid, exit_code = exit.code, signal = exit.signal, "container exited");
                Termination::exited(exit, started_at, Timestamp::now(), container_id)
            }
            Err(error) => {
                // The leader could not be waited for: make sure the group is gone and
                // report the outcome as unknown rather than guess an exit code.
                error!(pid, %error, "lost track of the container process");
                let _ = group.terminate(Duration::ZERO).await;
                Termination::without_process(
                    TerminationReason::ContainerStatusUnknown,
                    UNKNOWN_EXIT_CODE,
                    format!("lost track of process {pid}: {error}"),
                    Timestamp::now(),
                )
            }
        };
        match interrupt {
            Some(interrupt) => RunOutcome::Interrupted(interrupt, termination),
            None => RunOutcome::Exited(termination),
        }
    }

    /// Builds the launch, retrying configuration errors (missing Secrets or ConfigMaps)
    /// with a `CreateContainerConfigError` status in between.
    async fn prepare_with_retries(&mut self) -> Prepared {
        let mut delay = CONFIG_RETRY_BASE;
        for attempt in 1..=CONFIG_ATTEMPTS {
            let message = match self.prepare().await {
                Ok(launch) => return Prepared::Ready(launch),
                Err(error) => error.to_string(),
            };
            if attempt == CONFIG_ATTEMPTS {
                return Prepared::GaveUp(message);
            }
            warn!(attempt, error = %message, "container configuration failed; will retry");
            let waiting =
                Lifecycle::Waiting { reason: WaitingReason::CreateContainerConfigError, message: Some(message) };
            self.send_progress(&self.report(self.waiting_phase(), waiting)).await;
            if let Some(interrupt) = self.sleep_or_interrupt(delay).await {
                return Prepared::Interrupted(interrupt);
            }
            delay = delay.saturating_mul(2);
        }
        Prepared::GaveUp("no configuration attempts".to_string())
    }

    /// Resolves environment and command line from the latest pod and the objects it
    /// references.
    async fn prepare(&mut self) -> Result<Launch, PrepareError> {
        let pod = self.pods.borrow().clone();
        let sources = self.fetch_sources(&env::references(&self.container)).await?;
        let resolved = env::resolve(&self.container, &PodFields::of(&pod), &sources)?;
        let vars: HashMap<String, String> = resolved.iter().cloned().collect();
        let line = command::command_line(&self.container, &vars, &self.ctx.settings.binary);
        self.image_id = format!("{ID_SCHEME}{}", line.program.display());

        // kubelet sets HOSTNAME to the pod name; the container's own variables win.
        let mut env: Vec<(String, String)> = self.ctx.settings.base_env.clone();
        env.push(("HOSTNAME".to_string(), self.name.clone()));
        if let Some(kubeconfig) = self.api_credentials(&pod).await? {
            env.push(("KUBECONFIG".to_string(), kubeconfig.display().to_string()));
        }
        env.retain(|(name, _)| !vars.contains_key(name));
        env.extend(resolved);
        Ok(Launch {
            program: line.program,
            args: line.args,
            env,
            cwd: self.ctx.settings.work_dir.clone(),
            log_path: self.log_path.clone(),
        })
    }

    /// The kubeconfig granting the pod its ServiceAccount's API access, issuing the
    /// token on first use; `None` when the container mounts no token.
    async fn api_credentials(&mut self, pod: &Pod) -> Result<Option<std::path::PathBuf>, PrepareError> {
        let Some(grant) = credentials::token_projection(pod, &self.container) else {
            return Ok(None);
        };
        if self.credentials.is_none() {
            let bound = BoundPod {
                namespace: self.api.namespace().unwrap_or_default().to_string(),
                name: self.name.clone(),
                uid: self.uid.clone(),
            };
            let dir = self.ctx.settings.work_dir.join("pods").join(&self.uid);
            let issued =
                PodCredentials::issue(self.ctx.client.clone(), &self.ctx.settings.api_endpoint, bound, grant, dir)
                    .await?;
            self.credentials = Some(issued);
        }
        Ok(self.credentials.as_ref().map(|c| c.kubeconfig_path().to_path_buf()))
    }

    async fn fetch_sources(&self, refs: &env::References) -> Result<Sources, PrepareError> {
        let namespace = self.api.namespace().unwrap_or_default().to_string();
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let mut sources = Sources::default();
        for name in &refs.secrets {
            let secret = secrets.get_opt(name).await.map_err(|source| PrepareError::Fetch {
                kind: "Secret",
                name: name.clone(),
                source,
            })?;
            let data = secret.map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect());
            sources.secrets.insert(name.clone(), data);
        }
        for name in &refs.config_maps {
            let config_map = config_maps.get_opt(name).await.map_err(|source| PrepareError::Fetch {
                kind: "ConfigMap",
                name: name.clone(),
                source,
            })?;
            sources.config_maps.insert(name.clone(), config_map.map(|c| c.data.unwrap_or_default()));
        }
        Ok(sources)
    }

    /// Fails the pod for good once configuration retries ran out.
    async fn fail_config(&mut self, message: String) {
        error!(error = %message, "container configuration kept failing; failing the pod");
        let termination = Termination::without_process(
            TerminationReason::CreateContainerConfigError,
            START_ERROR_EXIT_CODE,
            message.clone(),
            Timestamp::now(),
        );
        let mut report = self.report(Phase::Failed, Lifecycle::Terminated(termination));
        report.reason = Some(WaitingReason::CreateContainerConfigError.as_str().to_string());
        report.message = Some(message);
        self.send_final(&report).await;
    }

    /// Ends supervision while no process runs (never started, or waiting to restart).
    async fn finish_idle(&mut self, interrupt: Interrupt) {
        // The previous run's end becomes the final state (and no longer the `lastState`).
        let termination = self.last_termination.take().unwrap_or_else(|| {
            Termination::without_process(
                TerminationReason::ContainerStatusUnknown,
                UNKNOWN_EXIT_CODE,
                "The container could not be located when the pod was terminated".to_string(),
                Timestamp::now(),
            )
        });
        self.finish_stopped(interrupt, termination).await;
    }

    /// Ends supervision after the process was stopped by `interrupt`.
    async fn finish_stopped(&mut self, interrupt: Interrupt, termination: Termination) {
        match interrupt {
            Interrupt::Gone => info!("pod no longer exists; its container is stopped"),
            Interrupt::Deleted { .. } => {
                let phase = Phase::from_exit_code(termination.exit_code);
                let report = self.report(phase, Lifecycle::Terminated(termination));
                self.send_final(&report).await;
                self.delete_now().await;
            }
            Interrupt::Shutdown { .. } => {
                let mut report = self.report(Phase::Failed, Lifecycle::Terminated(termination));
                let message = "Pod was terminated because the disparo node agent shut down.".to_string();
                report.reason = Some("Terminated".to_string());
                report.message = Some(message.clone());
                report.disruption = Some(message);
                let sent = tokio::time::timeout(SHUTDOWN_REPORT_TIMEOUT, self.send(&report, 1)).await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn!(%error, "could not report the pod terminated on shutdown"),
                    Err(_) => warn!("timed out reporting the pod terminated on shutdown"),
                }
            }
        }
    }

    /// Removes the pod from the API once its container has stopped, as kubelet does at
    /// the end of a graceful deletion. The uid precondition spares a same-named successor.
    async fn delete_now(&self) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(self.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        for attempt in 1..=DELETE_ATTEMPTS {
            match self.api.delete(&self.name, &params).await {
                Ok(_) => {
                    info!("pod deleted after its container stopped");
                    return;
                }
                Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => return,
                Err(error) if attempt < DELETE_ATTEMPTS && is_transient(&error) => {
                    debug!(%error, attempt, "pod deletion failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(error) => {
                    warn!(%error, "could not delete the pod after its container stopped");
                    return;
                }
            }
        }
    }

    /// The phase while the container waits: `Running` once it has run at all.
    fn waiting_phase(&self) -> Phase {
        if self.restart_count > 0 || self.last_termination.is_some() { Phase::Running } else { Phase::Pending }
    }

    fn report(&self, phase: Phase, state: Lifecycle) -> PodReport {
        PodReport {
            phase,
            start_time: self.start_time,
            container_name: self.container.name.clone(),
            image: self.container.image.clone().unwrap_or_default(),
            image_id: self.image_id.clone(),
            restart_count: self.restart_count,
            state,
            last_state: self.last_termination.clone(),
            reason: None,
            message: None,
            pod_ip: crate::pod_ip(&self.uid),
            disruption: None,
        }
    }

    async fn send_progress(&self, report: &PodReport) {
        if let Err(error) = self.send(report, PROGRESS_REPORT_ATTEMPTS).await {
            warn!(%error, phase = report.phase.as_str(), "could not report pod status");
        }
    }

    async fn send_final(&self, report: &PodReport) {
        match self.send(report, FINAL_REPORT_ATTEMPTS).await {
            Ok(()) => info!(phase = report.phase.as_str(), "final pod status reported"),
            Err(error) => error!(%error, phase = report.phase.as_str(), "could not report the final pod status"),
        }
    }

    /// Patches the pod status (strategic merge: conditions merge by type, so conditions
    /// other controllers add survive), retrying transient failures.
    async fn send(&self, report: &PodReport, attempts: u32) -> Result<(), kube::Error> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let status = status::pod_status(report, &self.current_conditions(), Timestamp::now());
            let patch = serde_json::json!({ "status": status });
            match self.api.patch_status(&self.name, &params, &Patch::Strategic(&patch)).await {
                Ok(_) => return Ok(()),
                Err(error) if attempt < attempts && is_transient(&error) => {
                    debug!(%error, attempt, "status report failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn current_conditions(&self) -> Vec<PodCondition> {
        self.pods.borrow().status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default()
    }

    /// An interruption that has already happened, if any.
    fn pending_interrupt(&self) -> Option<Interrupt> {
        let pod = self.pods.borrow().clone();
        if self.stop.is_cancelled() {
            return Some(Interrupt::Shutdown { grace: grace_period(&pod).min(SHUTDOWN_GRACE) });
        }
        if self.pods.has_changed().is_err() {
            return Some(Interrupt::Gone);
        }
        pod.metadata.deletion_timestamp.as_ref().map(|_| Interrupt::Deleted { grace: grace_period(&pod) })
    }

    /// Waits for the next interruption. Cancel-safe.
    async fn next_interrupt(&mut self) -> Interrupt {
        loop {
            if let Some(interrupt) = self.pending_interrupt() {
                return interrupt;
            }
            tokio::select! {
                _ = self.stop.cancelled() => {}
                changed = self.pods.changed() => {
                    if changed.is_err() {
                        return Interrupt::Gone;
                    }
                }
            }
        }
    }

    async fn sleep_or_interrupt(&mut self, delay: Duration) -> Option<Interrupt> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            interrupt = self.next_interrupt() => Some(interrupt),
        }
    }
}

/// The grace period a deletion grants: the deletion's own, else the spec's, never
/// below kubelet's two-second minimum.
fn grace_period(pod: &Pod) -> Duration {
    let seconds =
        pod.metadata.deletion_grace_period_seconds.or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds);
    seconds.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs).unwrap_or(DEFAULT_GRACE).max(MIN_GRACE)
}

/// Whether a failed request is worth repeating.
fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429 || status.code == 409,
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => false,
        _ => true,
    }
}

/// Delay before retry `attempt` (from 1): 0.5 s doubling, at most 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500).saturating_mul(1 << attempt.saturating_sub(1).min(4)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::PodSpec,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn pod(deletion_grace: Option<i64>, spec_grace: Option<i64>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                deletion_grace_period_seconds: deletion_grace,
                deletion_timestamp: deletion_grace.map(|_| Time(Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: Some(PodSpec { termination_grace_period_seconds: spec_grace, ..Default::default() }),
            status: None,
        }
    }

    #[test]
    fn grace_period_follows_deletion_then_spec_then_default() {
        let cases = [
            (None, None, 30),
            (None, Some(7), 7),
            (Some(4), Some(7), 4),
            (Some(0), Some(7), 2),
            (None, Some(0), 2),
            (Some(-1), None, 30),
        ];
        for (deletion, spec, expected) in cases {
            assert_eq!(grace_period(&pod(deletion, spec)), Duration::from_secs(expected), "{deletion:?} {spec:?}");
        }
    }

    #[test]
    fn backoff_is_bounded() {
        let delays: Vec<u128> = (1..=8).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000, 5000, 5000]);
    }
}
