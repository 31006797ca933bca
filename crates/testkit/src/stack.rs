//! The real stack for one test: a namespace on the shared control plane, a controller
//! that watches only that namespace, a node agent that runs its pods as processes, a
//! fresh Postgres database, and sandboxes over real HTTP. Tests that use it run in
//! parallel without seeing each other.

use std::process::Stdio;
use std::time::{Duration, Instant};

use disparo::sandbox::{self, Latency, SandboxConfig, SandboxHandle};
use serde_json::Value;
use sqlx::PgPool;

use super::cluster::{ensure_crds, fresh_namespace, kubectl, kubectl_ok};
use crate::process::NodeAgent;
pub use crate::process::{Proc, free_port};

/// One test's stack.
pub struct Stack {
    pub ns: String,
    /// The namespace's organization id (its UID), which Postgres keys its rows by.
    pub org: String,
    pub pool: PgPool,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
    /// One node agent per namespace of the stack.
    pub agents: Vec<NodeAgent>,
    /// Namespaces added with [`Stack::add_namespace`], deleted with the stack.
    pub extra_namespaces: Vec<String>,
    /// Arguments every controller of the stack gets besides the usual ones.
    pub controller_args: Vec<String>,
    /// Where each controller serves /metrics, in start order.
    pub controller_metrics: Vec<String>,
}

/// A sandbox answering fast, with the given changes to its default configuration.
pub async fn sandbox_with(change: impl FnOnce(&mut SandboxConfig)) -> SandboxHandle {
    let mut config = SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Latency { min_ms: 1, max_ms: 3 },
        ..Default::default()
    };
    change(&mut config);
    sandbox::start(config).await.unwrap()
}

impl Stack {
    /// Starts the controller and the node agent for a fresh namespace and database, with
    /// the sandbox's Meta credentials in the namespace. The controller writes the
    /// namespace's own database credential (`disparo-database`) itself.
    pub async fn start(prefix: &str) -> Stack {
        Self::start_with(prefix, &[]).await
    }

    /// [`Stack::start`] with more arguments for the controller (e.g. `--rate-card`).
    pub async fn start_with(prefix: &str, controller_args: &[&str]) -> Stack {
        ensure_crds();
        let (pool, url) = super::fresh_db().await;
        let ns = fresh_namespace(prefix);
        let org = super::cluster::namespace_uid(&ns);
        let mut stack = Stack {
            ns: ns.clone(),
            org,
            pool,
            url: url.clone(),
            dir: tempfile::tempdir().unwrap(),
            procs: Vec::new(),
            agents: Vec::new(),
            extra_namespaces: Vec::new(),
            controller_args: controller_args.iter().map(|a| (*a).to_owned()).collect(),
            controller_metrics: Vec::new(),
        };
        create_meta_credentials(&ns);
        stack.spawn_controller("controller", &ns);
        stack.agents.push(NodeAgent::start(&ns, stack.dir.path()).expect("starting the node agent"));
        stack
    }

    /// A controller for namespace `ns` (its Lease there too), on the stack's database.
    pub fn spawn_controller(&mut self, identity: &str, ns: &str) -> usize {
        let metrics = format!("127.0.0.1:{}", free_port());
        self.controller_metrics.push(metrics.clone());
        let args = ["controller", "--metrics-addr", &metrics, "--lease-namespace", ns, "--watch-namespace", ns];
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--identity", identity, "--lease-seconds", "6"]);
        let extra = self.controller_args.clone();
        all.extend(extra.iter().map(String::as_str));
        self.spawn("controller", &all)
    }

    /// A second namespace on the same database, with its own controller and node agent
    /// (and the sandbox Meta credentials); returns its name and organization id.
    pub fn add_namespace(&mut self, prefix: &str) -> (String, String) {
        let ns = fresh_namespace(prefix);
        let org = super::cluster::namespace_uid(&ns);
        create_meta_credentials(&ns);
        self.spawn_controller("controller", &ns);
        self.agents.push(NodeAgent::start(&ns, self.dir.path()).expect("starting the node agent"));
        self.extra_namespaces.push(ns.clone());
        (ns, org)
    }

    /// Runs the binary under test with the stack's kubeconfig and database; returns its
    /// index in `procs`.
    pub fn spawn(&mut self, name: &'static str, args: &[&str]) -> usize {
        let log = self.dir.path().join(format!("{name}-{}.log", self.procs.len()));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(super::bin::disparo())
            .args(args)
            .env("KUBECONFIG", super::cluster::kubeconfig())
            .env("DATABASE_URL", &self.url)
            .env("RUST_LOG", "info,kube=warn,hyper=warn")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.procs.push(Proc { name, child, log });
        self.procs.len() - 1
    }

    /// The logs of every process and pod, and the namespace's pods and events, for a
    /// failure.
    pub fn logs(&self) -> String {
        let mut out: String = self.procs.iter().map(|p| format!("----- {} -----\n{}\n", p.name, p.tail())).collect();
        out.extend(self.agents.iter().map(NodeAgent::diagnostics));
        out.push_str(&String::from_utf8_lossy(
            &kubectl(&["get", "pods,jobs", "-n", &self.ns, "-o", "wide"], None).stdout,
        ));
        out.push_str(&String::from_utf8_lossy(
            &kubectl(&["get", "events", "-n", &self.ns, "--sort-by=.lastTimestamp"], None).stdout,
        ));
        out
    }

    /// `kubectl` in the namespace; panics with its error on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.ns];
        all.extend_from_slice(args);
        kubectl_ok(&all, None)
    }

    /// The plugin (`kubectl disparo ...`) in the namespace.
    pub fn plugin(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(super::bin::disparo())
            .args(args)
            .args(["-n", &self.ns])
            .env("KUBECONFIG", super::cluster::kubeconfig())
            .output()
            .unwrap()
    }

    /// `kubectl apply` of a manifest in the namespace.
    pub fn apply(&self, yaml: &str) {
        let out = kubectl(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    }

    /// A merge patch of a Campaign or Channel.
    pub fn patch(&self, kind: &str, name: &str, patch: &str) {
        self.kubectl(&["patch", kind, name, "--type", "merge", "-p", patch]);
    }

    /// The object as JSON.
    pub fn get(&self, kind: &str, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", kind, name, "-o", "json"])).unwrap()
    }

    /// Waits until `check` holds for the object, or panics with its status and the logs.
    pub async fn wait_for(
        &self,
        kind: &str,
        name: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let object = self.get(kind, name);
            if check(&object) {
                return object;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} of {kind}/{name}; status:\n{}\n{}",
                    serde_json::to_string_pretty(&object["status"]).unwrap(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until no pod of the campaign runs.
    pub async fn wait_for_no_pods(&self, campaign_uid: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pods = self.kubectl(&[
                "get",
                "pods",
                "-l",
                &format!("disparo.io/campaign-uid={campaign_uid}"),
                "--field-selector=status.phase=Running",
                "-o",
                "name",
            ]);
            if pods.trim().is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "sender pods still running: {pods}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The controllers stop with the test: lift the Campaigns' cleanup finalizer
        // first, or the namespace would wait for a controller forever.
        for ns in std::iter::once(&self.ns).chain(&self.extra_namespaces) {
            let names = kubectl(&["-n", ns, "get", "campaigns", "-o", "name"], None);
            for name in String::from_utf8_lossy(&names.stdout).lines() {
                let _ = kubectl(
                    &["-n", ns, "patch", name, "--type", "merge", "-p", r#"{"metadata":{"finalizers":null}}"#],
                    None,
                );
            }
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"], None);
        }
        // Gracefully, so no sender process outlives the test; their nodes go when the
        // agents are dropped.
        for agent in &mut self.agents {
            agent.stop();
        }
    }
}

/// `metadata.uid`.
pub fn uid(object: &Value) -> String {
    object["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// Every recipient the sandbox accepted a send to, in order.
pub fn recipients(sandbox: &SandboxHandle) -> Vec<String> {
    sandbox.ledger().entries().into_iter().map(|e| e.recipient).collect()
}

/// Waits until the sandbox accepted at least `at_least` sends, or panics with the
/// stack's logs after three minutes.
pub async fn wait_for_sends(stack: &Stack, sandbox: &SandboxHandle, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while sandbox.ledger().accepted_count() < at_least {
        assert!(Instant::now() < deadline, "fewer than {at_least} sends\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sandbox's Meta credentials as a Secret `meta-creds` in `ns`, labelled for Disparo.
pub fn create_meta_credentials(ns: &str) {
    kubectl_ok(
        &[
            "-n",
            ns,
            "create",
            "secret",
            "generic",
            "meta-creds",
            "--from-literal=access-token=sandbox-meta-token",
            "--from-literal=app-secret=sandbox-app-secret",
            "--from-literal=verify-token=verify",
        ],
        None,
    );
    kubectl_ok(&["-n", ns, "label", "secret", "meta-creds", "disparo.io/credentials=true"], None);
}

/// An Evolution credentials Secret `evo-creds` in `ns` (the sandbox's api key and the
/// given webhook token), labelled for Disparo.
pub fn create_evolution_credentials(ns: &str, webhook_token: &str) {
    let token = format!("--from-literal=webhook-token={webhook_token}");
    kubectl_ok(
        &["-n", ns, "create", "secret", "generic", "evo-creds", "--from-literal=api-key=sandbox-api-key", &token],
        None,
    );
    kubectl_ok(&["-n", ns, "label", "secret", "evo-creds", "disparo.io/credentials=true"], None);
}

/// A control endpoint of the sandbox (`/_sandbox/{path}`); panics unless it answers
/// 2xx. Returns its JSON answer (null when it has none).
pub async fn sandbox_control(sandbox: &SandboxHandle, method: reqwest::Method, path: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .request(method, format!("{}/_sandbox/{path}", sandbox.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "sandbox {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// `status.phase`.
pub fn phase(object: &Value) -> &str {
    object["status"]["phase"].as_str().unwrap_or("")
}

/// A condition of the object's status, if present.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

/// Whether the condition is True with the reason.
pub fn is_true_with(object: &Value, type_: &str, reason: &str) -> bool {
    condition(object, type_).is_some_and(|c| c["status"] == "True" && c["reason"] == reason)
}

/// A Meta Channel on a sandbox.
pub fn meta_channel(name: &str, base_url: &str, phone_number_id: &str, limits: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: meta\n  meta:\n    phoneNumberId: '{phone_number_id}'\n    baseUrl: {base_url}\n    accessToken: {{name: meta-creds, key: access-token}}\n    appSecret: {{name: meta-creds, key: app-secret}}\n    verifyToken: {{name: meta-creds, key: verify-token}}\n  rateLimits: {limits}\n"
    )
}

/// A Campaign sending template `template` to `audience`, with `extra` spec lines.
pub fn campaign(name: &str, channel: &str, template: &str, audience: &str, extra: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Campaign\nmetadata: {{name: {name}}}\nspec:\n  channelRef: {{name: {channel}}}\n  message:\n    template: {{name: {template}, language: pt_BR, bodyParameters: [\"{{{{contact.name}}}}\"]}}\n  audience: {audience}\n  execution: {{batchSize: 50, parallelism: 2}}\n  retry: {{maxAttempts: 3, baseDelaySeconds: 1, maxDelaySeconds: 2}}\n{extra}"
    )
}

/// Limits for a fast channel that still spaces sends by `spacing_ms`.
pub fn fast(spacing_ms: u32) -> String {
    format!(
        "{{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: {spacing_ms}}}"
    )
}
