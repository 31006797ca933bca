//! End to end on the real control plane: the controller and the node agent as
//! processes of the binary under test, sender pods run by the node agent, a real
//! Postgres, the sandbox provider and the webhook service over real HTTP.
//!
//! One test drives the scenarios in order, because the controller and the node agent
//! serve the whole (shared) cluster.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::{ensure_crds, fresh_namespace, kubectl, kubectl_ok};
use disparo::sandbox::{self, Latency, SandboxConfig, SandboxHandle, WebhookBehaviour};
use serde_json::{Value, json};
use sqlx::PgPool;

struct Proc {
    name: &'static str,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Proc {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

struct Env {
    ns: String,
    pool: PgPool,
    url: String,
    sandbox: SandboxHandle,
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Env {
    fn spawn(&mut self, name: &'static str, args: &[&str]) -> usize {
        self.spawn_program(name, std::path::Path::new(env!("CARGO_BIN_EXE_disparo")), args)
    }

    fn spawn_program(&mut self, name: &'static str, program: &std::path::Path, args: &[&str]) -> usize {
        let log = self.dir.path().join(format!("{name}-{}.log", self.procs.len()));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(program)
            .args(args)
            .env("KUBECONFIG", common::cluster::kubeconfig())
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

    fn logs(&self) -> String {
        self.procs.iter().map(|p| format!("----- {} -----\n{}\n", p.name, p.tail())).collect()
    }

    fn apply(&self, yaml: &str) {
        let out = kubectl(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    }

    fn campaign(&self, name: &str) -> Value {
        serde_json::from_str(&kubectl_ok(&["get", "campaign", name, "-n", &self.ns, "-o", "json"], None)).unwrap()
    }

    async fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Value) -> bool, name: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.campaign(name);
            if check(&c) {
                return c;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what} of {name}; campaign:\n{}\n{}", serde_json::to_string_pretty(&c["status"]).unwrap(), self.logs());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn phase(c: &Value) -> &str {
    c["status"]["phase"].as_str().unwrap_or("")
}

fn campaign_yaml(name: &str, channel: &str, audience: &str, extra: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Campaign\nmetadata: {{name: {name}}}\nspec:\n  channelRef: {{name: {channel}}}\n  message:\n    template: {{name: promo, language: pt_BR, bodyParameters: [\"{{{{contact.name}}}}\"]}}\n  audience: {audience}\n  execution: {{batchSize: 100, parallelism: 4}}\n  retry: {{maxAttempts: 3, baseDelaySeconds: 1, maxDelaySeconds: 2}}\n{extra}"
    )
}

fn channel_yaml(name: &str, base_url: &str, limits: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: meta\n  meta:\n    phoneNumberId: '106540352242922'\n    baseUrl: {base_url}\n    accessToken: {{name: meta-creds, key: access-token}}\n    appSecret: {{name: meta-creds, key: app-secret}}\n    verifyToken: {{name: meta-creds, key: verify-token}}\n  rateLimits: {limits}\n"
    )
}

fn ledger_phones(sandbox: &SandboxHandle) -> Vec<String> {
    sandbox.ledger().entries().into_iter().map(|e| e.recipient).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_lifecycle_end_to_end() {
    ensure_crds();
    let (pool, url) = common::fresh_db().await;
    let ns = fresh_namespace("e2e");
    let webhook_port = free_port();
    let config = SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Latency { min_ms: 2, max_ms: 10 },
        webhooks: WebhookBehaviour { delay_min_ms: 50, delay_max_ms: 400, ..Default::default() },
        ..Default::default()
    };
    let mut config = config;
    config.meta.webhook_url = Some(format!("http://127.0.0.1:{webhook_port}/webhooks/meta/{ns}/main"));
    let sandbox = sandbox::start(config).await.unwrap();
    let mut env = Env { ns: ns.clone(), pool, url: url.clone(), sandbox, dir: tempfile::tempdir().unwrap(), procs: Vec::new() };

    let org = common::cluster::namespace_uid(&ns);
    kubectl_ok(
        &["-n", &ns, "create", "secret", "generic", "meta-creds", "--from-literal=access-token=sandbox-meta-token", "--from-literal=app-secret=sandbox-app-secret", "--from-literal=verify-token=verify"],
        None,
    );
    kubectl_ok(&["-n", &ns, "label", "secret", "meta-creds", "disparo.io/credentials=true"], None);
    let metrics_a = free_port().to_string();
    env.spawn("controller-a", &["controller", "--metrics-addr", &format!("127.0.0.1:{metrics_a}"), "--lease-namespace", &ns, "--watch-namespace", &ns, "--identity", "controller-a", "--lease-seconds", "6"]);
    env.spawn_program("node-agent", &common::bin::node_agent(), &["--binary", env!("CARGO_BIN_EXE_disparo"), "--namespace", &ns, "--node-name", &format!("node-{ns}")]);
    env.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{webhook_port}")]);

    // --- a missing channel stalls with its name, and recovers when the channel appears
    common::seed_contacts(&env.pool, &org, 2000, |i| (vec![], json!({"i": i}))).await;
    env.apply(&campaign_yaml("big", "main", "{allContacts: true}", ""));
    let c = env
        .wait_for("Stalled", Duration::from_secs(60), |c| c["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|x| x["type"] == "Stalled" && x["status"] == "True")), "big")
        .await;
    let stalled = c["status"]["conditions"].as_array().unwrap().iter().find(|x| x["type"] == "Stalled").unwrap().clone();
    assert!(stalled["message"].as_str().unwrap().contains("\"main\""), "{stalled}");
    env.apply(&channel_yaml("main", &env.sandbox.base_url(), "{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: 0}"));

    // --- 2,000 contacts in 20 batches, parallelism 4, to Completed
    let out = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "campaign/big", "--timeout=300s"], None)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "kubectl wait failed: {}\n{}", String::from_utf8_lossy(&out.stderr), env.logs());
    let c = env.campaign("big");
    assert_eq!(phase(&c), "Completed");
    assert_eq!(c["status"]["messages"]["total"], 2000);
    // the sandbox fails a few delivered messages by webhook (as Meta does with 131026)
    let m = &c["status"]["messages"];
    assert_eq!(m["sent"].as_i64().unwrap() + m["failed"].as_i64().unwrap() + m["unknown"].as_i64().unwrap(), 2000, "{m}");
    assert_eq!(m["pending"], 0);
    assert_eq!(c["status"]["batches"]["total"], 20);
    let phones = ledger_phones(&env.sandbox);
    assert_eq!(phones.len(), 2000);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), 2000, "nobody got the message twice");
    let uid: uuid::Uuid = c["metadata"]["uid"].as_str().unwrap().parse().unwrap();
    let counters = disparo::store::campaigns::counters(&env.pool, uid).await.unwrap().unwrap();
    assert_eq!(counters.at_least_sent() + counters.failed + counters.unknown, 2000);
    assert_eq!(counters.at_least_sent(), m["sent"].as_i64().unwrap(), "status equals Postgres");
    // receipts arrive through the webhook service: delivered/read counts move
    env.wait_for("receipts", Duration::from_secs(60), |c| c["status"]["messages"]["delivered"].as_i64().unwrap_or(0) > 1000, "big").await;

    // --- pause mid-run: nothing is sent while paused, resume finishes without duplicates
    common::seed_contacts(&env.pool, &org, 2600, |i| (if i >= 2000 { vec!["late".into()] } else { vec![] }, json!({}))).await;
    env.apply(&channel_yaml("slow", &env.sandbox.base_url(), "{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: 40}"));
    env.apply(&campaign_yaml("paused", "slow", "{tags: {anyOf: [late]}}", ""));
    let before = phones.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.sandbox.ledger().accepted_count() < before + 60 {
        assert!(Instant::now() < deadline, "the second campaign never started sending\n{}", env.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubectl_ok(&["-n", &ns, "patch", "campaign", "paused", "--type", "merge", "-p", r#"{"spec":{"suspend":true}}"#], None);
    let c = env.wait_for("Paused", Duration::from_secs(60), |c| phase(c) == "Paused", "paused").await;
    let paused_uid = c["metadata"]["uid"].as_str().unwrap().to_owned();
    let job_name = c["status"]["batches"]["jobName"].as_str().unwrap().to_owned();
    let job: Value = serde_json::from_str(&kubectl_ok(&["-n", &ns, "get", "job", &job_name, "-o", "json"], None)).unwrap();
    assert_eq!(job["spec"]["suspend"], true);
    // wait for the sender pods to be gone, then nothing may arrive
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = kubectl_ok(&["-n", &ns, "get", "pods", "-l", &format!("disparo.io/campaign-uid={paused_uid}"), "-o", "name"], None);
        if pods.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "sender pods still there: {pods}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let frozen = env.sandbox.ledger().accepted_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.sandbox.ledger().accepted_count(), frozen, "messages were sent while paused");
    assert!(frozen < before + 600, "paused before the end");
    kubectl_ok(&["-n", &ns, "patch", "campaign", "paused", "--type", "merge", "-p", r#"{"spec":{"suspend":false}}"#], None);
    env.wait_for("Completed", Duration::from_secs(180), |c| phase(c) == "Completed", "paused").await;
    let phones = ledger_phones(&env.sandbox);
    assert_eq!(phones.len(), 2600);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), 2600, "no duplicates after resume");

    // --- cancel stops it for good, and cancel: false is rejected
    common::seed_contacts(&env.pool, &org, 3000, |i| (if i >= 2600 { vec!["cancel".into()] } else { vec![] }, json!({}))).await;
    env.apply(&campaign_yaml("stopped", "slow", "{tags: {anyOf: [cancel]}}", ""));
    env.wait_for("Running", Duration::from_secs(60), |c| phase(c) == "Running", "stopped").await;
    kubectl_ok(&["-n", &ns, "patch", "campaign", "stopped", "--type", "merge", "-p", r#"{"spec":{"cancel":true}}"#], None);
    let c = env.wait_for("Cancelled", Duration::from_secs(60), |c| phase(c) == "Cancelled", "stopped").await;
    let out = kubectl(&["-n", &ns, "patch", "campaign", "stopped", "--type", "merge", "-p", r#"{"spec":{"cancel":false}}"#], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("spec.cancel"));
    let uid: uuid::Uuid = c["metadata"]["uid"].as_str().unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counters = disparo::store::campaigns::counters(&env.pool, uid).await.unwrap().unwrap();
    assert!(counters.cancelled > 0, "{counters:?}");
    assert_eq!(counters.pending, 0);

    // --- a Hard channel with a tiny day cap goes RateLimited, then resumes on its own
    common::seed_contacts(&env.pool, &org, 3020, |i| (if i >= 3000 { vec!["tiny".into()] } else { vec![] }, json!({}))).await;
    env.apply(&channel_yaml("tiny", &env.sandbox.base_url(), "{perDay: 8, mode: Hard}"));
    env.apply(&campaign_yaml("limited", "tiny", "{tags: {anyOf: [tiny]}}", ""));
    let c = env.wait_for("RateLimited", Duration::from_secs(120), |c| phase(c) == "RateLimited", "limited").await;
    assert!(c["status"]["rateLimit"]["resumeAt"].is_string(), "{}", c["status"]);
    assert_eq!(c["status"]["rateLimit"]["pauses"], 1);
    // the day window "resets": in the test, move the channel's day window and pause into the past
    sqlx::query("UPDATE channel_rate_windows SET window_start = window_start - interval '1 day' WHERE organization = $1 AND channel = 'tiny'")
        .bind(&org)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE channel_state SET paused_until = now() - interval '1 second' WHERE organization = $1 AND channel = 'tiny'")
        .bind(&org)
        .execute(&env.pool)
        .await
        .unwrap();
    env.wait_for("Running again", Duration::from_secs(60), |c| phase(c) != "RateLimited", "limited").await;
    // 20 messages at 8 per day: it pauses again, each pause counted
    env.wait_for("second pause", Duration::from_secs(120), |c| c["status"]["rateLimit"]["pauses"].as_i64() == Some(2), "limited").await;

    // --- killing the active controller: the standby takes over and a campaign completes
    let metrics_b = free_port().to_string();
    env.spawn("controller-b", &["controller", "--metrics-addr", &format!("127.0.0.1:{metrics_b}"), "--lease-namespace", &ns, "--watch-namespace", &ns, "--identity", "controller-b", "--lease-seconds", "6"]);
    common::seed_contacts(&env.pool, &org, 3400, |i| (if i >= 3020 { vec!["failover".into()] } else { vec![] }, json!({}))).await;
    env.apply(&campaign_yaml("failover", "slow", "{tags: {anyOf: [failover]}}", ""));
    env.wait_for("Running", Duration::from_secs(90), |c| phase(c) == "Running" || phase(c) == "Completed", "failover").await;
    env.procs[0].child.start_kill().unwrap(); // SIGKILL controller-a
    let _ = env.procs[0].child.wait().await;
    let c = env.wait_for("Completed after failover", Duration::from_secs(180), |c| phase(c) == "Completed", "failover").await;
    let m = &c["status"]["messages"];
    assert_eq!(m["sent"].as_i64().unwrap() + m["failed"].as_i64().unwrap() + m["unknown"].as_i64().unwrap(), 380, "{m}");
    let lease: Value = serde_json::from_str(&kubectl_ok(&["-n", &ns, "get", "lease", "disparo-controller", "-o", "json"], None)).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "controller-b");
    let phones = ledger_phones(&env.sandbox);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), phones.len(), "no duplicates across the whole run");

    kubectl_ok(&["delete", "namespace", &ns, "--wait=false"], None);
    for p in &mut env.procs {
        let _ = p.child.start_kill();
    }
}
