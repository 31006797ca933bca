//! The Evolution API path on the real stack (control plane, node agent running sender
//! pods, Postgres, the webhook service, the sandbox over HTTP): a Channel shows its
//! instance's connection state and a dropped session holds its campaigns back, parallel
//! senders keep the channel's 500 ms spacing, receipts come through the webhook only
//! with the channel's shared secret, and an inbound "SAIR" opts its sender out before
//! the campaign reaches them (docs/providers.md B1-B3).
//!
//! Each test has its own namespace, controller and node agent.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::process::free_port;
use common::stack::{Stack, condition, phase, recipients, sandbox_control, sandbox_with, uid, wait_for_sends};
use disparo::sandbox::{SandboxConfig, SandboxHandle};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);
/// The sandbox's one instance.
const INSTANCE: &str = "sandbox";
/// The shared secret the sandbox sends in `x-disparo-token` and the Channel expects.
const WEBHOOK_SECRET: &str = "evo-webhook-secret";

/// The stack with its webhook service, the Evolution credentials in the namespace, and a
/// sandbox posting Evolution webhooks for `channel` with the shared secret.
/// Returns the webhook service's URL for `channel` too.
async fn evolution_stack(
    prefix: &str,
    channel: &str,
    change: impl FnOnce(&mut SandboxConfig),
) -> (Stack, SandboxHandle, String) {
    let mut stack = Stack::start(prefix).await;
    let port = free_port();
    let ns = stack.ns.clone();
    let url = format!("http://127.0.0.1:{port}/webhooks/evolution/{ns}/{channel}");
    let sandbox = sandbox_with(|c| {
        c.evolution.webhook_url = Some(url.clone());
        c.evolution.webhook_secret = disparo::providers::Secret::new(WEBHOOK_SECRET);
        // No message fails by webhook: what a test counts is exact.
        c.webhooks.failed = 0.0;
        change(c);
    })
    .await;
    stack.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{port}")]);
    common::stack::create_evolution_credentials(&stack.ns, WEBHOOK_SECRET);
    (stack, sandbox, url)
}

/// An Evolution Channel on the sandbox's instance, with the provider's default caps
/// (1,000/h, Graceful, 500 ms between sends) unless `limits` is given.
fn evolution_channel(name: &str, base_url: &str, limits: Option<&str>) -> String {
    let limits = limits.map(|l| format!("  rateLimits: {l}\n")).unwrap_or_default();
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: evolution\n  evolution:\n    baseUrl: {base_url}\n    instance: {INSTANCE}\n    apiKey: {{name: evo-creds, key: api-key}}\n    webhookToken: {{name: evo-creds, key: webhook-token}}\n{limits}"
    )
}

/// A plain-text Campaign (the only kind Evolution sends) with the given execution.
fn text_campaign(name: &str, channel: &str, audience: &str, execution: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Campaign\nmetadata: {{name: {name}}}\nspec:\n  channelRef: {{name: {channel}}}\n  message:\n    text: 'Olá {{{{contact.name}}}}, sua promoção chegou.'\n  audience: {audience}\n  execution: {execution}\n  retry: {{maxAttempts: 3, baseDelaySeconds: 1, maxDelaySeconds: 2}}\n"
    )
}

/// Sets the instance's connection state as Evolution names it (`open`, `connecting`, `close`).
async fn set_state(sandbox: &SandboxHandle, state: &str) {
    sandbox_control(sandbox, reqwest::Method::PUT, &format!("evolution/{INSTANCE}/state"), json!({"state": state}))
        .await;
}

/// What `GET /instance/connectionState/{instance}` answers, as Evolution does.
async fn connection_state(sandbox: &SandboxHandle) -> Value {
    reqwest::Client::new()
        .get(format!("{}/instance/connectionState/{INSTANCE}", sandbox.base_url()))
        .header("apikey", "sandbox-api-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn ready(object: &Value) -> Option<&Value> {
    condition(object, "Ready")
}

/// The campaign's `status.messages`.
fn messages(campaign: &Value) -> &Value {
    &campaign["status"]["messages"]
}

/// Gaps between consecutive accepted sends, in milliseconds, in order of acceptance.
fn gaps_ms(sandbox: &SandboxHandle) -> Vec<f64> {
    let mut at: Vec<_> = sandbox.ledger().entries().into_iter().map(|e| e.at).collect();
    at.sort();
    at.windows(2).map(|w| (w[1] - w[0]).num_microseconds().unwrap() as f64 / 1000.0).collect()
}

/// A channel's Ready condition shows the instance's connection state; a dropped session
/// (Evolution's `close`) makes it not Ready, holds its campaign back with the reason,
/// and nothing is sent until the session is open again; then the campaign completes,
/// nobody messaged twice and nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_session_holds_the_campaign_until_the_instance_is_open_again() {
    let (stack, sandbox, _) = evolution_stack("evo-conn", "evo", |_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 30, |_| (vec![], json!({}))).await;
    stack.apply(&evolution_channel("evo", &sandbox.base_url(), None));
    let channel =
        stack.wait_for("channel", "evo", "Ready", LONG, |ch| ready(ch).is_some_and(|r| r["status"] == "True")).await;
    let message = ready(&channel).unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("\"open\"") && message.contains(INSTANCE), "the state is shown: {message}");
    assert_eq!(channel["status"]["usage"]["limits"]["minIntervalMillis"], 500, "{}", channel["status"]);

    stack.apply(&text_campaign("promo", "evo", "{allContacts: true}", "{batchSize: 100, parallelism: 1}"));
    wait_for_sends(&stack, &sandbox, 4).await;
    set_state(&sandbox, "close").await;
    assert_eq!(connection_state(&sandbox).await["instance"]["state"], "close");

    let channel = stack
        .wait_for("channel", "evo", "InstanceNotConnected", LONG, |ch| {
            ready(ch).is_some_and(|r| r["status"] == "False" && r["reason"] == "InstanceNotConnected")
        })
        .await;
    let message = ready(&channel).unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("\"close\"") && message.contains("QR code"), "{message}");
    let c = stack
        .wait_for("campaign", "promo", "held back", LONG, |c| {
            condition(c, "Stalled").is_some_and(|s| s["status"] == "True")
        })
        .await;
    let stalled = condition(&c, "Stalled").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(stalled.contains("\"evo\"") && stalled.contains("\"close\""), "the reason names it: {stalled}");
    assert_eq!(phase(&c), "Paused", "{}", c["status"]);
    stack.wait_for_no_pods(&uid(&c)).await;
    let frozen = sandbox.ledger().accepted_count();
    assert!(frozen < 30, "held back before the end");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.ledger().accepted_count(), frozen, "nothing is sent while the session is closed");

    set_state(&sandbox, "open").await;
    stack.wait_for("channel", "evo", "Ready again", LONG, |ch| ready(ch).is_some_and(|r| r["status"] == "True")).await;
    let c = stack.wait_for("campaign", "promo", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(messages(&c)["sent"], 30, "{}", c["status"]);
    assert_eq!(messages(&c)["failed"], 0, "a closed session fails nothing: {}", c["status"]);
    let phones = recipients(&sandbox);
    assert_eq!(phones.len(), 30);
    assert_eq!(phones.iter().collect::<HashSet<_>>().len(), 30, "nobody got the message twice");
}

/// Three sender pods on one channel with the provider's default spacing: the sandbox
/// sees at least 500 ms between any two accepted sends. Receipts come back as
/// `messages.update` webhooks with the shared secret and move the campaign's counts; a
/// forged receipt without the secret or with a wrong one is refused with 401 and changes
/// nothing, while the same body with the secret applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_senders_keep_the_spacing_and_receipts_need_the_shared_secret() {
    let (stack, sandbox, url) = evolution_stack("evo-pace", "evo", |c| {
        c.latency = disparo::sandbox::Latency { min_ms: 2, max_ms: 2 };
        c.webhooks.delivered = 1.0;
        c.webhooks.read = 0.5;
        c.webhooks.delay_min_ms = 50;
        c.webhooks.delay_max_ms = 300;
    })
    .await;
    let phones = common::seed_contacts(&stack.pool, &stack.org, 30, |_| (vec![], json!({}))).await;
    stack.apply(&evolution_channel("evo", &sandbox.base_url(), None));
    stack.apply(&text_campaign("paced", "evo", "{allContacts: true}", "{batchSize: 10, parallelism: 3}"));
    let c = stack.wait_for("campaign", "paced", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(c["status"]["batches"]["total"], 3);
    assert_eq!(messages(&c)["sent"], 30, "{}", c["status"]);

    // Three senders really sent side by side: the batches' sends interleave.
    let job = c["status"]["batches"]["jobName"].as_str().unwrap().to_owned();
    assert_eq!(stack.get("job", &job)["spec"]["parallelism"], 3);
    let batch_of = |phone: &String| phones.iter().position(|p| p == phone).unwrap() / 10;
    let order: Vec<usize> = recipients(&sandbox).iter().map(batch_of).collect();
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 6, "the batches were sent side by side, not one after another: {order:?}");
    let gaps = gaps_ms(&sandbox);
    assert_eq!(gaps.len(), 29);
    let min = gaps.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "evolution spacing over {} sends by 3 senders: min {min:.1} ms, mean {mean:.1} ms (smallest: {:?})",
        gaps.len() + 1,
        &sorted[..5]
    );
    assert!(min >= 500.0, "two sends {min:.1} ms apart: {gaps:?}");

    // Receipts: every message delivered, some read, as the sandbox reported them.
    let c = stack
        .wait_for("campaign", "paced", "receipts", Duration::from_secs(60), |c| messages(c)["delivered"] == 30)
        .await;
    let campaign_uid: uuid::Uuid = uid(&c).parse().unwrap();
    settle_webhooks(&sandbox).await;
    let read_in_db: (i64,) =
        sqlx::query_as("SELECT count(*) FROM campaign_messages WHERE campaign_uid = $1 AND status = 'read'")
            .bind(campaign_uid)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    let c = stack
        .wait_for("campaign", "paced", "read counted", Duration::from_secs(30), |c| messages(c)["read"] == read_in_db.0)
        .await;
    assert!(read_in_db.0 > 0 && read_in_db.0 < 30, "about half are read: {}", c["status"]);

    // A forged READ for a message only delivered: refused, nothing moves.
    let (key_id, phone): (String, String) = sqlx::query_as(
        "SELECT m.provider_message_id, c.phone FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 AND m.status = 'delivered' ORDER BY m.id LIMIT 1",
    )
    .bind(campaign_uid)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let body = read_receipt(&key_id, &phone);
    for token in [None, Some("not-the-secret")] {
        let mut request = reqwest::Client::new().post(&url).json(&body);
        if let Some(token) = token {
            request = request.header("x-disparo-token", token);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 401, "token {token:?}");
    }
    let status_of = || async {
        let (status,): (String,) = sqlx::query_as(
            "SELECT status::text FROM campaign_messages WHERE campaign_uid = $1 AND provider_message_id = $2",
        )
        .bind(campaign_uid)
        .bind(&key_id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        status
    };
    assert_eq!(status_of().await, "delivered", "a forged receipt changes nothing");
    let counters = disparo::store::campaigns::counters(&stack.pool, campaign_uid).await.unwrap().unwrap();
    assert_eq!(counters.read, read_in_db.0);

    // The same body with the channel's secret is applied.
    let answer =
        reqwest::Client::new().post(&url).header("x-disparo-token", WEBHOOK_SECRET).json(&body).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(status_of().await, "read");
    stack
        .wait_for("campaign", "paced", "one more read", Duration::from_secs(30), |c| {
            messages(c)["read"] == read_in_db.0 + 1
        })
        .await;
}

/// A `messages.update` READ for one message, as Evolution posts it (docs/providers.md B2).
fn read_receipt(key_id: &str, phone: &str) -> Value {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    json!({
        "event": "messages.update",
        "instance": INSTANCE,
        "data": {
            "keyId": key_id,
            "remoteJid": format!("{digits}@s.whatsapp.net"),
            "fromMe": true,
            "status": "READ",
            "instanceId": "0b5c8e3e-2f0f-4a5e-9a3f-7c1d2e3f4a5b",
            "messageId": "cmfyoow42000hov4xwkdug3lv"
        },
        "destination": "http://disparo-webhook/",
        "date_time": "2025-06-18T13:25:10.004Z",
        "sender": "5511988887777@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": null
    })
}

/// Waits until the sandbox has posted every webhook it planned (none posted for two
/// seconds; its plans span at most a second here).
async fn settle_webhooks(sandbox: &SandboxHandle) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = sandbox.webhook_counts();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = sandbox.webhook_counts();
        if now == last {
            return;
        }
        assert!(Instant::now() < deadline, "the sandbox kept posting webhooks");
        last = now;
    }
}

/// An inbound "SAIR" (and a "stop") from contacts the running campaign has not reached
/// yet opts them out: they are never messaged, their messages end skipped, and the rest
/// of the audience completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inbound_sair_opts_out_a_contact_before_the_campaign_reaches_them() {
    let (stack, sandbox, _) = evolution_stack("evo-optout", "evo", |_| {}).await;
    let phones = common::seed_contacts(&stack.pool, &stack.org, 20, |_| (vec![], json!({}))).await;
    stack.apply(&evolution_channel("evo", &sandbox.base_url(), None));
    // One batch: contacts are messaged in the order they were created, 500 ms apart, so
    // the last ones are reached about ten seconds in.
    stack.apply(&text_campaign("promo", "evo", "{allContacts: true}", "{batchSize: 100, parallelism: 1}"));
    wait_for_sends(&stack, &sandbox, 2).await;
    let leaving = [(&phones[19], "SAIR"), (&phones[17], "stop")];
    for (phone, text) in leaving {
        assert!(!recipients(&sandbox).contains(phone), "{phone} was not messaged yet");
        let answer = sandbox_control(
            &sandbox,
            reqwest::Method::POST,
            &format!("evolution/{INSTANCE}/inbound"),
            json!({"from": phone, "text": text}),
        )
        .await;
        assert_eq!(answer["webhooks"][0]["delivered"], true, "{answer}");
    }
    for (phone, _) in leaving {
        let (opted_out,): (bool,) =
            sqlx::query_as("SELECT opted_out FROM contacts WHERE organization = $1 AND phone = $2")
                .bind(&stack.org)
                .bind(phone)
                .fetch_one(&stack.pool)
                .await
                .unwrap();
        assert!(opted_out, "{phone} is opted out");
    }

    let c = stack.wait_for("campaign", "promo", "Completed", LONG, |c| phase(c) == "Completed").await;
    let m = messages(&c);
    assert_eq!((m["total"].as_i64(), m["sent"].as_i64(), m["skipped"].as_i64()), (Some(20), Some(18), Some(2)), "{m}");
    let sent = recipients(&sandbox);
    assert_eq!(sent.len(), 18);
    let campaign_uid: uuid::Uuid = uid(&c).parse().unwrap();
    for (phone, _) in leaving {
        assert!(!sent.contains(phone), "{phone} opted out and was never messaged");
        let (status,): (String,) = sqlx::query_as(
            "SELECT m.status::text FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 AND c.phone = $2",
        )
        .bind(campaign_uid)
        .bind(phone)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        assert_eq!(status, "skipped", "{phone}");
    }
}
