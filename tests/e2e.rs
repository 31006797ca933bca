//! End to end on the real control plane: the controller and the node agent as
//! processes of the binaries under test (the testkit's `Stack`), sender pods run by the
//! node agent, a real Postgres, the sandbox provider and the webhook service over real
//! HTTP.
//!
//! One test drives the scenarios in order, in one namespace.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::cluster::{kubectl, kubectl_ok};
use common::stack::{Stack, campaign, condition, free_port, meta_channel, phase, recipients};
use disparo::sandbox::{self, Latency, SandboxConfig, WebhookBehaviour};
use serde_json::{Value, json};

/// A campaign of the `promo` template, in batches of 100, four at a time.
fn campaign_yaml(name: &str, channel: &str, audience: &str, extra: &str) -> String {
    campaign(name, channel, "promo", audience, extra)
        .replace("batchSize: 50, parallelism: 2", "batchSize: 100, parallelism: 4")
}

fn channel_yaml(name: &str, base_url: &str, limits: &str) -> String {
    meta_channel(name, base_url, "106540352242922", limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_lifecycle_end_to_end() {
    let mut stack = Stack::start("e2e").await;
    let (ns, org) = (stack.ns.clone(), stack.org.clone());
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
    // The stack runs the controller (`procs[0]`) and the node agent; the webhook joins them.
    stack.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{webhook_port}")]);

    // --- a missing channel stalls with its name, and recovers when the channel appears
    common::seed_contacts(&stack.pool, &org, 2000, |i| (vec![], json!({"i": i}))).await;
    stack.apply(&campaign_yaml("big", "main", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "big", "Stalled", Duration::from_secs(60), |c| {
            condition(c, "Stalled").is_some_and(|x| x["status"] == "True")
        })
        .await;
    let stalled = condition(&c, "Stalled").unwrap().clone();
    assert!(stalled["message"].as_str().unwrap().contains("\"main\""), "{stalled}");
    stack.apply(&channel_yaml(
        "main",
        &sandbox.base_url(),
        "{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: 0}",
    ));

    // --- 2,000 contacts in 20 batches, parallelism 4, to Completed
    let out = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "campaign/big", "--timeout=300s"], None)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "kubectl wait failed: {}\n{}", String::from_utf8_lossy(&out.stderr), stack.logs());
    let c = stack.get("campaign", "big");
    assert_eq!(phase(&c), "Completed");
    assert_eq!(c["status"]["messages"]["total"], 2000);
    // the sandbox fails a few delivered messages by webhook (as Meta does with 131026)
    let m = &c["status"]["messages"];
    assert_eq!(
        m["sent"].as_i64().unwrap() + m["failed"].as_i64().unwrap() + m["unknown"].as_i64().unwrap(),
        2000,
        "{m}"
    );
    assert_eq!(m["pending"], 0);
    assert_eq!(c["status"]["batches"]["total"], 20);
    let phones = recipients(&sandbox);
    assert_eq!(phones.len(), 2000);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), 2000, "nobody got the message twice");
    let uid: uuid::Uuid = c["metadata"]["uid"].as_str().unwrap().parse().unwrap();
    let counters = disparo::store::campaigns::counters(&stack.pool, uid).await.unwrap().unwrap();
    assert_eq!(counters.at_least_sent() + counters.failed + counters.unknown, 2000);
    // Receipts keep resolving messages (an unknown one turns out delivered) after the
    // campaign completes, and its status follows them at its next refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let counters = disparo::store::campaigns::counters(&stack.pool, uid).await.unwrap().unwrap();
        let shown = stack.get("campaign", "big")["status"]["messages"]["sent"].as_i64().unwrap();
        if shown == counters.at_least_sent() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status ({shown}) never equals Postgres ({})",
            counters.at_least_sent()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // receipts arrive through the webhook service: delivered/read counts move
    stack
        .wait_for("campaign", "big", "receipts", Duration::from_secs(60), |c| {
            c["status"]["messages"]["delivered"].as_i64().unwrap_or(0) > 1000
        })
        .await;

    // --- pause mid-run: nothing is sent while paused, resume finishes without duplicates
    common::seed_contacts(&stack.pool, &org, 2600, |i| {
        (if i >= 2000 { vec!["late".into()] } else { vec![] }, json!({}))
    })
    .await;
    stack.apply(&channel_yaml(
        "slow",
        &sandbox.base_url(),
        "{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: 40}",
    ));
    stack.apply(&campaign_yaml("paused", "slow", "{tags: {anyOf: [late]}}", ""));
    let before = phones.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sandbox.ledger().accepted_count() < before + 60 {
        assert!(Instant::now() < deadline, "the second campaign never started sending\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubectl_ok(
        &["-n", &ns, "patch", "campaign", "paused", "--type", "merge", "-p", r#"{"spec":{"suspend":true}}"#],
        None,
    );
    let c = stack.wait_for("campaign", "paused", "Paused", Duration::from_secs(60), |c| phase(c) == "Paused").await;
    let paused_uid = c["metadata"]["uid"].as_str().unwrap().to_owned();
    let job_name = c["status"]["batches"]["jobName"].as_str().unwrap().to_owned();
    let job: Value =
        serde_json::from_str(&kubectl_ok(&["-n", &ns, "get", "job", &job_name, "-o", "json"], None)).unwrap();
    assert_eq!(job["spec"]["suspend"], true);
    // wait for the sender pods to be gone, then nothing may arrive
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = kubectl_ok(
            &["-n", &ns, "get", "pods", "-l", &format!("disparo.io/campaign-uid={paused_uid}"), "-o", "name"],
            None,
        );
        if pods.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "sender pods still there: {pods}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let frozen = sandbox.ledger().accepted_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.ledger().accepted_count(), frozen, "messages were sent while paused");
    assert!(frozen < before + 600, "paused before the end");
    kubectl_ok(
        &["-n", &ns, "patch", "campaign", "paused", "--type", "merge", "-p", r#"{"spec":{"suspend":false}}"#],
        None,
    );
    stack.wait_for("campaign", "paused", "Completed", Duration::from_secs(180), |c| phase(c) == "Completed").await;
    let phones = recipients(&sandbox);
    assert_eq!(phones.len(), 2600);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), 2600, "no duplicates after resume");

    // --- cancel stops it for good, and cancel: false is rejected
    common::seed_contacts(&stack.pool, &org, 3000, |i| {
        (if i >= 2600 { vec!["cancel".into()] } else { vec![] }, json!({}))
    })
    .await;
    stack.apply(&campaign_yaml("stopped", "slow", "{tags: {anyOf: [cancel]}}", ""));
    stack.wait_for("campaign", "stopped", "Running", Duration::from_secs(60), |c| phase(c) == "Running").await;
    kubectl_ok(
        &["-n", &ns, "patch", "campaign", "stopped", "--type", "merge", "-p", r#"{"spec":{"cancel":true}}"#],
        None,
    );
    let c =
        stack.wait_for("campaign", "stopped", "Cancelled", Duration::from_secs(60), |c| phase(c) == "Cancelled").await;
    let out = kubectl(
        &["-n", &ns, "patch", "campaign", "stopped", "--type", "merge", "-p", r#"{"spec":{"cancel":false}}"#],
        None,
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("spec.cancel"));
    let uid: uuid::Uuid = c["metadata"]["uid"].as_str().unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counters = disparo::store::campaigns::counters(&stack.pool, uid).await.unwrap().unwrap();
    assert!(counters.cancelled > 0, "{counters:?}");
    assert_eq!(counters.pending, 0);

    // --- a Hard channel with a tiny day cap goes RateLimited, then resumes on its own
    common::seed_contacts(&stack.pool, &org, 3020, |i| {
        (if i >= 3000 { vec!["tiny".into()] } else { vec![] }, json!({}))
    })
    .await;
    stack.apply(&channel_yaml("tiny", &sandbox.base_url(), "{perDay: 8, mode: Hard}"));
    stack.apply(&campaign_yaml("limited", "tiny", "{tags: {anyOf: [tiny]}}", ""));
    let c = stack
        .wait_for("campaign", "limited", "RateLimited", Duration::from_secs(120), |c| phase(c) == "RateLimited")
        .await;
    assert!(c["status"]["rateLimit"]["resumeAt"].is_string(), "{}", c["status"]);
    assert_eq!(c["status"]["rateLimit"]["pauses"], 1);
    // the day window "resets": in the test, move the channel's day window and pause into the past
    sqlx::query("UPDATE channel_rate_windows SET window_start = window_start - interval '1 day' WHERE organization = $1 AND channel = 'tiny'")
        .bind(&org)
        .execute(&stack.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE channel_state SET paused_until = now() - interval '1 second' WHERE organization = $1 AND channel = 'tiny'")
        .bind(&org)
        .execute(&stack.pool)
        .await
        .unwrap();
    // It runs again, and may spend its next 8 before a look catches it running.
    stack
        .wait_for("campaign", "limited", "Running again", Duration::from_secs(60), |c| {
            phase(c) != "RateLimited" || c["status"]["rateLimit"]["pauses"].as_i64() == Some(2)
        })
        .await;
    // 20 messages at 8 per day: it pauses again, each pause counted
    stack
        .wait_for("campaign", "limited", "second pause", Duration::from_secs(120), |c| {
            c["status"]["rateLimit"]["pauses"].as_i64() == Some(2)
        })
        .await;

    // --- killing the active controller: the standby takes over and a campaign completes
    let metrics_b = free_port().to_string();
    stack.spawn(
        "controller-b",
        &[
            "controller",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_b}"),
            "--lease-namespace",
            &ns,
            "--watch-namespace",
            &ns,
            "--identity",
            "controller-b",
            "--lease-seconds",
            "6",
        ],
    );
    common::seed_contacts(&stack.pool, &org, 3400, |i| {
        (if i >= 3020 { vec!["failover".into()] } else { vec![] }, json!({}))
    })
    .await;
    stack.apply(&campaign_yaml("failover", "slow", "{tags: {anyOf: [failover]}}", ""));
    stack
        .wait_for("campaign", "failover", "Running", Duration::from_secs(90), |c| {
            phase(c) == "Running" || phase(c) == "Completed"
        })
        .await;
    stack.procs[0].child.start_kill().unwrap(); // SIGKILL controller-a
    let _ = stack.procs[0].child.wait().await;
    let c = stack
        .wait_for("campaign", "failover", "Completed after failover", Duration::from_secs(180), |c| {
            phase(c) == "Completed"
        })
        .await;
    let m = &c["status"]["messages"];
    assert_eq!(
        m["sent"].as_i64().unwrap() + m["failed"].as_i64().unwrap() + m["unknown"].as_i64().unwrap(),
        380,
        "{m}"
    );
    let lease: Value =
        serde_json::from_str(&kubectl_ok(&["-n", &ns, "get", "lease", "disparo-controller", "-o", "json"], None))
            .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "controller-b");
    let phones = recipients(&sandbox);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), phones.len(), "no duplicates across the whole run");
}
