//! `helm install` of charts/disparo into the test control plane, with the bundled
//! Postgres off and the harness's Postgres behind `postgres.existingSecret`, brings up
//! a controller that runs a sandbox campaign to completion.
//!
//! Nothing runs outside the chart but the test's own stand-ins for a cluster's nodes
//! and the provider: two node agents (one for the release namespace, one for the
//! campaign namespace) run the chart's pods as processes of the binary under test, and
//! an in-process sandbox plays the Meta Cloud API. So the pre-install migration hook,
//! the controller (acting as its ServiceAccount, with the chart's RBAC and the
//! per-pod kubeconfig the node agent writes for it), its sender Jobs in another
//! namespace, and the webhook receiving the sandbox's receipts are all the chart's.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use common::cluster::{ensure_crds, fresh_namespace, kubeconfig, kubectl, kubectl_ok};
use common::process::{NodeAgent, free_port};
use disparo::sandbox::{self, Latency, SandboxConfig, WebhookBehaviour};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/disparo");
/// Contacts in the campaign's audience: three batches of 100, three sender pods.
const AUDIENCE: usize = 300;
/// `helm install --wait` and the campaign each get this long.
const TIMEOUT: Duration = Duration::from_secs(300);

use common::bin::helm;

/// Everything the test started, torn down in order even when it panics: the release
/// first (so its pods are stopped gracefully by the agents), then the agents, then
/// the namespaces.
struct Install {
    release: String,
    release_ns: String,
    campaign_ns: String,
    agents: Vec<NodeAgent>,
    _dir: tempfile::TempDir,
}

impl Install {
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for ns in [&self.release_ns, &self.campaign_ns] {
            let pods = kubectl(&["get", "pods,jobs,deployments", "-n", ns, "-o", "wide"], None);
            let events = kubectl(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"], None);
            out.push_str(&format!(
                "----- namespace {ns} -----\n{}{}\n{}\n",
                String::from_utf8_lossy(&pods.stdout),
                String::from_utf8_lossy(&pods.stderr),
                String::from_utf8_lossy(&events.stdout)
            ));
        }
        for agent in &self.agents {
            out.push_str(&agent.diagnostics());
        }
        out
    }

    fn campaign(&self, name: &str) -> Result<Value> {
        let text = kubectl_ok(&["get", "campaign", name, "-n", &self.campaign_ns, "-o", "json"], None);
        Ok(serde_json::from_str(&text)?)
    }

    /// Polls the campaign until `check` holds; on timeout panics with its status and
    /// every log that could say why.
    async fn wait_for(&self, what: &str, name: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let campaign = self.campaign(name)?;
            if check(&campaign) {
                return Ok(campaign);
            }
            if Instant::now() > deadline {
                let status = serde_json::to_string_pretty(&campaign["status"]).unwrap_or_default();
                panic!("timed out waiting for {what} of campaign {name}; status:\n{status}\n{}", self.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let kubeconfig = kubeconfig();
        let _ = Command::new(helm())
            .args(["uninstall", &self.release, "-n", &self.release_ns, "--kubeconfig", &kubeconfig])
            .args(["--wait", "--timeout", "60s"])
            .output();
        for agent in &mut self.agents {
            agent.stop();
        }
        for ns in [&self.release_ns, &self.campaign_ns] {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"], None);
        }
        // The agents' nodes go as the agents are dropped.
    }
}

fn channel_yaml(base_url: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: main}}\nspec:\n  provider: meta\n  meta:\n    phoneNumberId: '106540352242922'\n    baseUrl: {base_url}\n    accessToken: {{name: meta-creds, key: access-token}}\n    appSecret: {{name: meta-creds, key: app-secret}}\n    verifyToken: {{name: meta-creds, key: verify-token}}\n  rateLimits: {{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: 0}}\n"
    )
}

const CAMPAIGN_YAML: &str = "apiVersion: disparo.io/v1alpha1\nkind: Campaign\nmetadata: {name: welcome}\nspec:\n  channelRef: {name: main}\n  message:\n    template: {name: promo, language: pt_BR, bodyParameters: [\"{{contact.name}}\"]}\n  audience: {allContacts: true}\n  execution: {batchSize: 100, parallelism: 3}\n  retry: {maxAttempts: 3, baseDelaySeconds: 1, maxDelaySeconds: 2}\n";

fn phase(campaign: &Value) -> &str {
    campaign["status"]["phase"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_runs_a_sandbox_campaign_to_completion() -> Result<()> {
    ensure_crds();
    // Empty: the chart's pre-install hook Job applies the migrations.
    let url = common::empty_db().await;
    let release_ns = fresh_namespace("helm");
    let campaign_ns = fresh_namespace("helm-campaigns");
    let release = format!("it-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let dir = tempfile::tempdir()?;
    let agents = vec![NodeAgent::start(&release_ns, dir.path())?, NodeAgent::start(&campaign_ns, dir.path())?];
    let install = Install {
        release: release.clone(),
        release_ns: release_ns.clone(),
        campaign_ns: campaign_ns.clone(),
        agents,
        _dir: dir,
    };

    // The admin Postgres URL lives in the release namespace only (controller, webhook,
    // hook); the campaign namespace gets its own scoped credential from the controller.
    kubectl_ok(
        &["-n", &release_ns, "create", "secret", "generic", "disparo-postgres", &format!("--from-literal=url={url}")],
        None,
    );
    common::stack::create_meta_credentials(&campaign_ns);

    // Every pod is a process on this host: one replica each, on ports nobody else uses.
    let webhook_port = free_port();
    let controller_port = free_port();
    let mut config = SandboxConfig {
        listen: "127.0.0.1:0".parse()?,
        latency: Latency { min_ms: 2, max_ms: 10 },
        webhooks: WebhookBehaviour { delay_min_ms: 50, delay_max_ms: 200, ..Default::default() },
        ..Default::default()
    };
    config.meta.webhook_url = Some(format!("http://127.0.0.1:{webhook_port}/webhooks/meta/{campaign_ns}/main"));
    let sandbox = sandbox::start(config).await.context("starting the sandbox")?;

    let started = Instant::now();
    let timeout = format!("{}s", TIMEOUT.as_secs());
    let kubeconfig = kubeconfig();
    let values = [
        // The CRDs are shared by every test on this control plane (installed from crds/,
        // which a chart test proves equal to the chart's): Helm must not try to own them.
        "crds.install=false".to_string(),
        "postgres.bundled.enabled=false".to_string(),
        "postgres.existingSecret=disparo-postgres".to_string(),
        // The harness's Postgres listens on the loopback without TLS, which the chart's
        // default (verify-full) rightly refuses.
        "postgres.tls.mode=disable".to_string(),
        "controller.replicas=1".to_string(),
        format!("controller.containerPort={controller_port}"),
        "webhook.replicas=1".to_string(),
        format!("webhook.containerPort={webhook_port}"),
    ];
    let mut args = vec![
        "install",
        &release,
        CHART,
        "-n",
        &release_ns,
        "--kubeconfig",
        &kubeconfig,
        "--wait",
        "--timeout",
        &timeout,
    ];
    for value in &values {
        args.extend(["--set", value.as_str()]);
    }
    let out = tokio::process::Command::new(helm()).args(&args).output().await.context("running helm install")?;
    assert!(
        out.status.success(),
        "helm install failed after {:?}:\n{}{}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        install.diagnostics()
    );
    eprintln!("helm install --wait took {:?}", started.elapsed());

    // The hook migrated the database; the audience goes in after it.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await?;
    common::seed_contacts(&pool, &common::cluster::namespace_uid(&campaign_ns), AUDIENCE, |i| {
        (vec![], json!({"i": i}))
    })
    .await;

    let apply = |yaml: &str| {
        let out = kubectl(&["apply", "-n", &campaign_ns, "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    };
    apply(&channel_yaml(&sandbox.base_url()));
    apply(CAMPAIGN_YAML);

    let campaign = install
        .wait_for("Ready", "welcome", |c| {
            c["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|x| x["type"] == "Ready" && x["status"] == "True"))
        })
        .await?;
    eprintln!("campaign completed {:?} after helm install started", started.elapsed());
    assert_eq!(phase(&campaign), "Completed", "{}", campaign["status"]);
    let messages = &campaign["status"]["messages"];
    assert_eq!(messages["total"], AUDIENCE, "{messages}");
    assert_eq!(messages["pending"], 0, "{messages}");
    let settled = ["sent", "failed", "unknown"].iter().map(|k| messages[k].as_i64().unwrap_or(0)).sum::<i64>();
    assert_eq!(settled, AUDIENCE as i64, "{messages}");
    let recipients: Vec<String> = sandbox.ledger().entries().into_iter().map(|e| e.recipient).collect();
    assert_eq!(recipients.len(), AUDIENCE, "the sandbox received one send per contact");
    assert_eq!(recipients.iter().collect::<HashSet<_>>().len(), AUDIENCE, "nobody got the message twice");

    // It was the chart's controller (the release's Lease is held by its pod) ...
    let lease_name = format!("{release}-disparo-controller");
    let lease: Value =
        serde_json::from_str(&kubectl_ok(&["-n", &release_ns, "get", "lease", &lease_name, "-o", "json"], None))?;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
    let pods = kubectl_ok(
        &["-n", &release_ns, "get", "pods", "-l", "app.kubernetes.io/component=controller", "-o", "name"],
        None,
    );
    assert!(
        pods.lines().any(|p| p.trim_start_matches("pod/") == holder),
        "lease held by {holder:?}, controller pods: {pods}"
    );
    // Its sender pods ran without any API credentials: no token volume for the node
    // agent to fill (tests/nodeagent.rs proves it then grants nothing).
    let senders: Value = serde_json::from_str(&kubectl_ok(
        &["-n", &campaign_ns, "get", "pods", "-l", "app.kubernetes.io/component=sender", "-o", "json"],
        None,
    ))?;
    let senders = senders["items"].as_array().cloned().unwrap_or_default();
    assert!(!senders.is_empty(), "no sender pods in {campaign_ns}");
    for pod in &senders {
        let volumes = pod["spec"]["volumes"].to_string();
        assert!(!volumes.contains("serviceAccountToken"), "a sender pod mounts a token: {volumes}");
    }
    // The admin URL never reached the campaign namespace: its senders read their own
    // organization's role from the controller's `disparo-database` Secret there.
    let admin = url::Url::parse(&url)?;
    for pod in &senders {
        let env = &pod["spec"]["containers"][0]["env"];
        let database =
            env.as_array().and_then(|e| e.iter().find(|v| v["name"] == "DATABASE_URL")).cloned().unwrap_or_default();
        assert_eq!(
            database["valueFrom"]["secretKeyRef"]["name"], "disparo-database",
            "a sender pod reads DATABASE_URL from elsewhere: {database}"
        );
    }
    let secrets: Value =
        serde_json::from_str(&kubectl_ok(&["-n", &campaign_ns, "get", "secrets", "-o", "json"], None))?;
    let mut tenant_url = None;
    for secret in secrets["items"].as_array().cloned().unwrap_or_default() {
        let name = secret["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        for (key, value) in secret["data"].as_object().cloned().unwrap_or_default() {
            let decoded =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value.as_str().unwrap_or_default())?;
            let text = String::from_utf8_lossy(&decoded).into_owned();
            let credentials = format!("{}:{}@", admin.username(), admin.password().unwrap_or_default());
            assert!(
                !text.contains(&credentials) && !text.contains(url.as_str()),
                "Secret {name} key {key} holds the admin credentials"
            );
            if name == "disparo-database" && key == "url" {
                tenant_url = Some(url::Url::parse(&text)?);
            }
        }
    }
    let tenant_url = tenant_url.context("no disparo-database Secret with a url in the campaign namespace")?;
    assert_ne!(tenant_url.username(), admin.username(), "the campaign namespace got the admin role");
    assert_eq!(tenant_url.host_str(), admin.host_str());
    // ... and the chart's webhook applies the sandbox's receipts.
    install
        .wait_for("delivery receipts", "welcome", |c| c["status"]["messages"]["delivered"].as_i64().unwrap_or(0) > 0)
        .await?;

    let out = Command::new(helm())
        .args(["uninstall", &release, "-n", &release_ns, "--kubeconfig", &kubeconfig, "--wait", "--timeout", &timeout])
        .output()?;
    assert!(out.status.success(), "helm uninstall failed:\n{}", String::from_utf8_lossy(&out.stderr));
    pool.close().await;
    drop(install);
    Ok(())
}
