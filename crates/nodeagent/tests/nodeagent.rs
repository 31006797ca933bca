//! The `disparo-nodeagent` binary against a real kube-apiserver and
//! kube-controller-manager: Indexed Jobs run to completion, exit codes reach the Job
//! controller's pod failure policy, environments come from Secrets, ConfigMaps and pod
//! fields, and suspending a Job or stopping the agent (SIGTERM, as the tests and the
//! demo stop it) leaves no process behind.
//!
//! Needs a running control plane: `DISPARO_TEST_KUBECONFIG` (or `KUBECONFIG`) must
//! name its admin kubeconfig, e.g. after `eval "$(scripts/cluster up)"`. Each test runs
//! its own agent on its own node, restricted to a fresh namespace, so tests run in
//! parallel and never pick up each other's pods.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    future::Future,
    panic::AssertUnwindSafe,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures::FutureExt;
use k8s_openapi::api::{
    batch::v1::Job,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Namespace, Node, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(90);

/// The kubeconfig of the test control plane; fails the test when none is configured.
fn kubeconfig() -> PathBuf {
    std::env::var_os("DISPARO_TEST_KUBECONFIG")
        .or_else(|| std::env::var_os("KUBECONFIG"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "neither DISPARO_TEST_KUBECONFIG nor KUBECONFIG is set: the node agent tests need a running \
                 control plane (start it with `eval \"$(scripts/cluster up)\"`)"
            )
        })
}

async fn config() -> Result<kube::Config> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = kubeconfig();
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?)
}

/// One agent process on its own node, serving one fresh namespace.
struct Harness {
    client: Client,
    namespace: String,
    node: String,
    work_dir: tempfile::TempDir,
    /// The agent's own log, outside `work_dir` so it is never taken for a pod's.
    agent_log: tempfile::NamedTempFile,
    agent: Option<tokio::process::Child>,
}

impl Harness {
    async fn start(prefix: &str) -> Result<Self> {
        let config = config().await?;
        let client = Client::try_from(config)?;
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let namespace = format!("nodeagent-{prefix}-{suffix}");
        let node = format!("nodeagent-test-{suffix}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
        namespaces.create(&PostParams::default(), &ns).await.context("creating the test namespace")?;
        // The Job controller needs the default ServiceAccount before it creates pods.
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        wait_until("default ServiceAccount", || async { Ok(accounts.get_opt("default").await?.is_some()) }).await?;

        let work_dir = tempfile::tempdir()?;
        let agent_log = tempfile::NamedTempFile::new()?;
        let agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_disparo-nodeagent"))
            .args([
                "--node-name",
                &node,
                "--binary",
                "/bin/sh",
                "--namespace",
                &namespace,
                "--max-pods",
                "8",
                "--work-dir",
            ])
            .arg(work_dir.path())
            .env("KUBECONFIG", kubeconfig())
            .stdin(Stdio::null())
            .stdout(agent_log.reopen()?)
            .stderr(agent_log.reopen()?)
            .kill_on_drop(true)
            .spawn()
            .context("starting disparo-nodeagent")?;
        let mut harness = Self { client, namespace, node, work_dir, agent_log, agent: Some(agent) };
        let nodes: Api<Node> = Api::all(harness.client.clone());
        let ready = wait_until("node registered Ready", || async {
            Ok(nodes.get_opt(&harness.node).await?.is_some_and(|n| node_ready(&n) == Some(true)))
        })
        .await;
        if let Err(error) = ready {
            let _ = harness.stop_agent().await;
            return Err(error.context(harness.agent_log_text()));
        }
        Ok(harness)
    }

    /// What the agent process wrote, for failure messages.
    fn agent_log_text(&self) -> String {
        let text = std::fs::read_to_string(self.agent_log.path()).unwrap_or_default();
        format!("node agent log:\n{text}")
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Stops the agent with SIGTERM and checks it stopped cleanly.
    async fn stop_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else { return Ok(()) };
        if let Some(pid) = agent.id() {
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .context("running kill")?;
            ensure!(sent.success(), "kill -TERM {pid} failed");
        }
        let status = tokio::time::timeout(Duration::from_secs(60), agent.wait())
            .await
            .with_context(|| format!("the agent did not stop within 60 s; {}", self.agent_log_text()))??;
        ensure!(status.success(), "the agent exited with {status}; {}", self.agent_log_text());
        Ok(())
    }

    /// Runs `body`, then always stops the agent and removes the namespace and node.
    async fn run(prefix: &str, body: impl AsyncFnOnce(&mut Harness) -> Result<()>) -> Result<()> {
        let mut harness = Harness::start(prefix).await?;
        let outcome = AssertUnwindSafe(body(&mut harness)).catch_unwind().await;
        let stopped = harness.stop_agent().await;
        let namespaces: Api<Namespace> = Api::all(harness.client.clone());
        let _ = namespaces.delete(&harness.namespace, &DeleteParams::default()).await;
        let nodes: Api<Node> = Api::all(harness.client.clone());
        let _ = nodes.delete(&harness.node, &DeleteParams::default()).await;
        match outcome {
            Ok(result) => result.and(stopped),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Every line the containers of this namespace wrote.
    fn log_lines(&self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(self.work_dir.path())? {
            let path = entry?.path();
            let is_ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&self.namespace));
            if is_ours && path.extension().is_some_and(|e| e == "log") {
                lines.extend(std::fs::read_to_string(&path)?.lines().map(str::to_string));
            }
        }
        Ok(lines)
    }

    fn log_of(&self, pod: &str, container: &str) -> PathBuf {
        self.work_dir.path().join(format!("{}_{pod}_{container}.log", self.namespace))
    }

    async fn job_pods(&self, job: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = self.api();
        Ok(pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"))).await?.items)
    }
}

/// Polls `check` until it returns true, failing after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) if Instant::now() >= deadline => return Err(error.context(format!("waiting for {what}"))),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn node_ready(node: &Node) -> Option<bool> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status == "True")
}

fn job_condition(job: &Job, type_: &str) -> Option<(String, Option<String>)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn terminated(pod: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.terminated.clone()
}

/// Processes whose command line contains `marker`.
fn processes_matching(marker: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("pgrep").args(["-f", marker]).output().context("running pgrep")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect())
}

/// A `sleep` argument unique to one test run, so `pgrep -f` finds only its processes.
fn unique_sleep() -> String {
    format!("299.{}", u32::from_str_radix(&uuid::Uuid::new_v4().simple().to_string()[..6], 16).unwrap_or(1))
}

fn job(name: &str, spec: serde_json::Value) -> Result<Job> {
    Ok(serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_job_runs_to_completion() -> Result<()> {
    Harness::run("indexed", async |h| {
        let jobs: Api<Job> = h.api();
        let spec = json!({
            "completions": 3,
            "parallelism": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "ghcr.io/disparo/disparo:test",
                    "command": ["/bin/sh", "-c", "echo index=$JOB_COMPLETION_INDEX; exit 0"],
                }],
            }},
        });
        jobs.create(&PostParams::default(), &job("indexed", spec)?).await?;
        wait_until("the Job to complete", || async {
            let job = jobs.get("indexed").await?;
            ensure!(job_condition(&job, "Failed").is_none(), "the Job failed: {:?}", job.status);
            Ok(job_condition(&job, "Complete").is_some_and(|(status, _)| status == "True"))
        })
        .await?;

        let indices: BTreeSet<String> =
            h.log_lines()?.into_iter().filter_map(|l| l.strip_prefix("index=").map(str::to_string)).collect();
        assert_eq!(indices, BTreeSet::from(["0".to_string(), "1".to_string(), "2".to_string()]));

        let pods = h.job_pods("indexed").await?;
        assert_eq!(pods.len(), 3, "one pod per index, none retried");
        for pod in &pods {
            assert_eq!(phase(pod), Some("Succeeded"));
            let end = terminated(pod).context("no terminated state")?;
            assert_eq!((end.exit_code, end.reason.as_deref()), (0, Some("Completed")));
            assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(h.node.as_str()));
        }

        // The node keeps both heartbeats the lifecycle controller reads.
        let leases: Api<Lease> = Api::namespaced(h.client.clone(), "kube-node-lease");
        let lease = leases.get(&h.node).await?;
        assert!(lease.spec.and_then(|s| s.renew_time).is_some());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_reach_the_pod_failure_policy() -> Result<()> {
    Harness::run("exitcode", async |h| {
        let jobs: Api<Job> = h.api();
        let spec = json!({
            "completions": 1,
            "backoffLimit": 6,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}},
            ]},
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "ghcr.io/disparo/disparo:test",
                    "command": ["/bin/sh", "-c", "echo failing on purpose; exit 3"],
                }],
            }},
        });
        jobs.create(&PostParams::default(), &job("exits-3", spec)?).await?;
        wait_until("the Job to fail by its pod failure policy", || async {
            let job = jobs.get("exits-3").await?;
            Ok(job_condition(&job, "Failed") == Some(("True".to_string(), Some("PodFailurePolicy".to_string()))))
        })
        .await?;

        let pods = h.job_pods("exits-3").await?;
        assert_eq!(pods.len(), 1, "FailJob must stop retries: {pods:?}");
        let pod = &pods[0];
        assert_eq!(phase(pod), Some("Failed"));
        let end = terminated(pod).context("no terminated state")?;
        assert_eq!((end.exit_code, end.reason.as_deref()), (3, Some("Error")));
        assert!(end.started_at.is_some() && end.finished_at.is_some());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_comes_from_secrets_config_maps_and_fields() -> Result<()> {
    Harness::run("env", async |h| {
        let config_maps: Api<ConfigMap> = h.api();
        let cm = serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"RATE": "20"}}))?;
        config_maps.create(&PostParams::default(), &cm).await?;

        let script = "echo token=$TOKEN rate=$RATE pod=$POD_NAME ns=$POD_NAMESPACE ip=$POD_IP arg=$1 \
                      optional=${OPTIONAL-unset} k8s=${KUBERNETES_SERVICE_HOST-unset}";
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "env"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "ghcr.io/disparo/disparo:test",
                    "command": ["/bin/sh", "-c", script, "sh", "per-minute=$(RATE)"],
                    "env": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "meta", "key": "token"}}},
                        {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": true}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                    "envFrom": [{"configMapRef": {"name": "settings"}}],
                }],
            },
        }))?;
        let pods: Api<Pod> = h.api();
        pods.create(&PostParams::default(), &pod).await?;

        // The Secret does not exist yet: kubelet's CreateContainerConfigError, retried.
        wait_until("CreateContainerConfigError", || async {
            let pod = pods.get("env").await?;
            let waiting = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|cs| cs.first()?.state.as_ref()?.waiting.clone());
            Ok(waiting.is_some_and(|w| {
                w.reason.as_deref() == Some("CreateContainerConfigError")
                    && w.message.is_some_and(|m| m.contains("\"meta\""))
            }))
        })
        .await?;

        let secrets: Api<Secret> = h.api();
        let secret = serde_json::from_value(json!({"metadata": {"name": "meta"}, "stringData": {"token": "s3cr3t"}}))?;
        secrets.create(&PostParams::default(), &secret).await?;
        wait_until("the pod to succeed once its Secret exists", || async {
            let pod = pods.get("env").await?;
            ensure!(phase(&pod) != Some("Failed"), "the pod failed: {:?}", pod.status);
            Ok(phase(&pod) == Some("Succeeded"))
        })
        .await?;

        let log = std::fs::read_to_string(h.log_of("env", "main"))?;
        // The pod's own loopback address, the one its status reports (not the node's).
        let ip = pods.get("env").await?.status.and_then(|s| s.pod_ip).unwrap_or_default();
        assert!(ip.starts_with("127.") && ip != "127.0.0.1", "{ip}");
        let expected = format!(
            "token=s3cr3t rate=20 pod=env ns={} ip={ip} arg=per-minute=20 optional=unset k8s=unset",
            h.namespace
        );
        assert_eq!(log.trim(), expected);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_job_kills_its_processes_and_removes_its_pods() -> Result<()> {
    Harness::run("suspend", async |h| {
        let marker = unique_sleep();
        // Ignored signals are inherited: nothing in the group yields to SIGTERM, so the
        // agent must escalate to SIGKILL after the grace period, for the whole group.
        let script = format!("trap '' TERM; sleep {marker} & sleep {marker}; wait");
        let jobs: Api<Job> = h.api();
        let spec = json!({
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 3,
                "containers": [{"name": "main", "image": "ghcr.io/disparo/disparo:test", "command": ["/bin/sh", "-c", script]}],
            }},
        });
        jobs.create(&PostParams::default(), &job("sleepy", spec)?).await?;
        wait_until("both pods running", || async {
            let pods = h.job_pods("sleepy").await?;
            Ok(pods.iter().filter(|p| phase(p) == Some("Running")).count() == 2)
        })
        .await?;
        // Two shells and four sleeps.
        wait_until("the processes to appear", || async { Ok(processes_matching(&marker)?.len() >= 6) }).await?;

        let started = Instant::now();
        jobs.patch("sleepy", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await?;
        wait_until("the pods to be gone", || async { Ok(h.job_pods("sleepy").await?.is_empty()) }).await?;
        assert!(started.elapsed() >= Duration::from_secs(3), "the grace period was not honoured");
        let left = processes_matching(&marker)?;
        assert!(left.is_empty(), "processes survived the suspension: {left:?}");

        wait_until("the Job to report itself suspended", || async {
            let job = jobs.get("sleepy").await?;
            let active = job.status.as_ref().and_then(|s| s.active).unwrap_or(0);
            Ok(active == 0 && job_condition(&job, "Suspended").is_some_and(|(status, _)| status == "True"))
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_agent_leaves_no_process_and_a_not_ready_node() -> Result<()> {
    Harness::run("shutdown", async |h| {
        let marker = unique_sleep();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "long"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "ghcr.io/disparo/disparo:test",
                    "command": ["/bin/sh", "-c", format!("sleep {marker} & sleep {marker}; wait")],
                }],
            },
        }))?;
        let pods: Api<Pod> = h.api();
        pods.create(&PostParams::default(), &pod).await?;
        wait_until("the pod to run", || async { Ok(phase(&pods.get("long").await?) == Some("Running")) }).await?;
        wait_until("the processes to appear", || async { Ok(processes_matching(&marker)?.len() >= 3) }).await?;

        h.stop_agent().await?;
        let left = processes_matching(&marker)?;
        assert!(left.is_empty(), "processes survived the agent: {left:?}");

        let nodes: Api<Node> = Api::all(h.client.clone());
        assert_eq!(node_ready(&nodes.get(&h.node).await?), Some(false));
        let pod = pods.get("long").await?;
        assert_eq!(phase(&pod), Some("Failed"));
        let disrupted = pod
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "DisruptionTarget" && c.status == "True"));
        assert!(disrupted, "no DisruptionTarget condition");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_the_container_in_place() -> Result<()> {
    Harness::run("restart", async |h| {
        // Fails on its first run only: the marker survives in the agent's work dir.
        let script = "m=./ran-once-$HOSTNAME; if [ -e $m ]; then echo second run; exit 0; fi; touch $m; exit 1";
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "flaky"},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "main", "image": "ghcr.io/disparo/disparo:test", "command": ["/bin/sh", "-c", script]}],
            },
        }))?;
        let pods: Api<Pod> = h.api();
        pods.create(&PostParams::default(), &pod).await?;
        wait_until("the pod to succeed after one restart", || async {
            let pod = pods.get("flaky").await?;
            ensure!(phase(&pod) != Some("Failed"), "the pod failed: {:?}", pod.status);
            Ok(phase(&pod) == Some("Succeeded"))
        })
        .await?;
        let pod = pods.get("flaky").await?;
        let status = pod.status.and_then(|s| s.container_statuses).and_then(|cs| cs.into_iter().next());
        let status = status.context("no container status")?;
        assert_eq!(status.restart_count, 1);
        let last = status.last_state.and_then(|s| s.terminated).context("no lastState")?;
        assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
        let end = status.state.and_then(|s| s.terminated).context("not terminated")?;
        assert_eq!(end.exit_code, 0);
        Ok(())
    })
    .await
}

/// What `report_api_identity` printed: the `KUBECONFIG` the container saw, then (when
/// it had one) who the API server says it is and whether it may read Secrets.
fn api_identity(log: &str) -> Result<(String, Option<serde_json::Value>, Option<String>)> {
    let mut lines = log.lines();
    let kubeconfig = lines.next().and_then(|l| l.strip_prefix("KUBECONFIG=")).context("no KUBECONFIG line")?;
    let rest: Vec<&str> = lines.collect();
    let whoami = rest.iter().position(|l| l.trim() == "---").map(|end| rest[..end].join("\n"));
    let whoami = whoami.map(|json| serde_json::from_str(&json)).transpose().with_context(|| format!("log: {log}"))?;
    let secrets = rest.iter().rev().find_map(|l| l.strip_prefix("secrets: ")).map(str::to_string);
    Ok((kubeconfig.to_string(), whoami, secrets))
}

/// A pod that reports whether it got API credentials and, if so, whom they identify.
fn report_api_identity(name: &str, account: &str, automount: Option<bool>) -> Result<Pod> {
    let script = r#"echo "KUBECONFIG=${KUBECONFIG-unset}"
if [ -n "${KUBECONFIG-}" ]; then
  kubectl auth whoami -o json; echo ---
  if kubectl get secrets -o name >/dev/null 2>err; then echo "secrets: allowed"; else echo "secrets: $(grep -o forbidden err | head -n 1)"; fi
fi"#;
    let mut spec = json!({
        "serviceAccountName": account,
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "ghcr.io/disparo/disparo:test", "command": ["/bin/sh", "-c", script]}],
    });
    if let Some(automount) = automount {
        spec["automountServiceAccountToken"] = json!(automount);
    }
    Ok(serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_the_api_as_their_service_account_only_when_a_token_is_mounted() -> Result<()> {
    Harness::run("token", async |h| {
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = h.api();
        for (name, automount) in [("app", None), ("quiet", Some(false))] {
            let mut account = json!({"metadata": {"name": name}});
            if let Some(automount) = automount {
                account["automountServiceAccountToken"] = json!(automount);
            }
            accounts.create(&PostParams::default(), &serde_json::from_value(account)?).await?;
        }
        let pods: Api<Pod> = h.api();
        let cases = [
            // (pod, account, pod's automount, expected identity)
            ("default-mounts", "app", None, Some("app")),
            ("pod-opts-out", "app", Some(false), None),
            ("account-opts-out", "quiet", None, None),
            ("pod-wins", "quiet", Some(true), Some("quiet")),
        ];
        for (name, account, automount, _) in cases {
            pods.create(&PostParams::default(), &report_api_identity(name, account, automount)?).await?;
        }
        for (name, _, _, expected) in cases {
            wait_until(&format!("pod {name} to finish"), || async {
                Ok(matches!(phase(&pods.get(name).await?), Some("Succeeded" | "Failed")))
            })
            .await?;
            let log = std::fs::read_to_string(h.log_of(name, "main"))?;
            let (kubeconfig, whoami, secrets) = api_identity(&log)?;
            let pod = pods.get(name).await?;
            assert_eq!(phase(&pod), Some("Succeeded"), "{name}: {log}");
            let Some(account) = expected else {
                assert_eq!(kubeconfig, "unset", "{name} must get no API credentials: {log}");
                continue;
            };
            let whoami = whoami.with_context(|| format!("{name}: no identity in {log}"))?;
            let user = &whoami["status"]["userInfo"];
            assert_eq!(user["username"], format!("system:serviceaccount:{}:{account}", h.namespace), "{name}");
            let uid = pod.metadata.uid.as_deref().context("pod without uid")?;
            assert_eq!(user["extra"]["authentication.kubernetes.io/pod-name"], json!([name]), "bound to the pod");
            assert_eq!(user["extra"]["authentication.kubernetes.io/pod-uid"], json!([uid]), "bound to the pod");
            assert_eq!(secrets.as_deref(), Some("forbidden"), "{name} has only its account's rights: {log}");
            // The credentials live in the pod's private state and go with it.
            let state = h.work_dir.path().join("pods").join(uid);
            assert!(kubeconfig.starts_with(&*state.to_string_lossy()), "{kubeconfig}");
            wait_until(&format!("{name}'s credentials to be removed"), || async { Ok(!state.exists()) }).await?;
        }
        Ok(())
    })
    .await
}
