//! The sender's core scenarios, shared by the suites that run them: tests/sender.rs and
//! tests/no_double_send.rs straight to Postgres, tests/pooler.rs through a real PgBouncer
//! in transaction pooling mode. Each scenario takes how the sender reaches its database
//! ([`Reach`]); the harness seeds and checks straight to Postgres.
//!
//! A module of several test crates: each uses part of it.
#![allow(dead_code)]

use disparo_testkit as common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use common::pgbouncer::Reach;
use disparo::api::{QualityPolicy, RateLimitMode, RateLimitsSpec, RetryPolicy, TemplateCategory};
use disparo::sandbox::{self, Faults, Latency, SandboxConfig, SandboxHandle};
use disparo::sender::{self, MessageTemplate, ProviderTarget, SendConfig};
use disparo::store::audience::{self, AudienceQuery, CampaignKey};
use disparo::store::campaigns;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Connections of an in-process sender's pool: what `disparo send` opens (one per lane
/// and one beside them).
pub const SENDER_CONNECTIONS: u32 = 5;

pub async fn sandbox(latency_ms: u64, faults: Faults) -> SandboxHandle {
    disparo::telemetry::install_crypto_provider();
    let config = SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Latency { min_ms: latency_ms, max_ms: latency_ms },
        faults,
        ..Default::default()
    };
    sandbox::start(config).await.unwrap()
}

pub fn config(
    campaign: Uuid,
    channel: &str,
    sandbox: &SandboxHandle,
    retry: RetryPolicy,
    limits: RateLimitsSpec,
    block: u32,
) -> SendConfig {
    SendConfig {
        campaign_uid: campaign,
        organization: "acme".into(),
        channel: channel.into(),
        target: ProviderTarget::Meta {
            base_url: sandbox.base_url(),
            api_version: "v23.0".into(),
            phone_number_id: "106540352242922".into(),
        },
        message: MessageTemplate::Template {
            name: "promo".into(),
            language: "pt_BR".into(),
            body_parameters: vec!["{{contact.name}}".into()],
            category: TemplateCategory::Marketing,
        },
        retry,
        rate_limits: limits,
        block_size: block,
        request_timeout_millis: 2_000,
        portfolio: None,
        quality_policy: QualityPolicy::Pause,
    }
}

pub fn unlimited() -> RateLimitsSpec {
    RateLimitsSpec {
        per_minute: None,
        per_hour: None,
        per_day: Some(100_000_000),
        mode: Some(RateLimitMode::Graceful),
        min_interval_millis: Some(0),
    }
}

pub async fn campaign(pool: &PgPool, n: usize, batch_size: u32) -> (Uuid, i32) {
    common::seed_contacts(pool, "acme", n, |i| (vec![], json!({"i": i}))).await;
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: "acme", name: &format!("c-{uid}"), channel: "main", batch_size };
    let frozen = audience::materialize(pool, &key, &AudienceQuery::AllContacts).await.unwrap();
    (uid, frozen.batches)
}

/// Runs one batch in this process, on `pool` (the sender's pool).
pub async fn run_in_process(pool: &PgPool, cfg: &SendConfig, batch: i32) -> sender::BatchEnd {
    let client =
        sender::build_client(&cfg.target, "sandbox-meta-token", Duration::from_millis(cfg.request_timeout_millis))
            .unwrap();
    let metrics = sender::metrics::SenderMetrics::new(&mut Registry::default());
    sender::run_batch(pool, &cfg.batch_job(batch), client, &metrics, &CancellationToken::new()).await.unwrap()
}

pub async fn statuses(pool: &PgPool, campaign: Uuid) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status::text, count(*) FROM campaign_messages WHERE campaign_uid = $1 GROUP BY 1")
            .bind(campaign)
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// `disparo send` for one batch, straight to the Postgres of `url`.
pub fn sender_process(url: &str, cfg: &SendConfig, batch: i32) -> tokio::process::Child {
    sender_process_with(&[("DATABASE_URL", url.to_owned())], cfg, batch)
}

/// `disparo send` for one batch, with `env` saying how to reach Postgres.
pub fn sender_process_with(env: &[(&str, String)], cfg: &SendConfig, batch: i32) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_disparo"))
        .arg("send")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DISPARO_SEND_CONFIG", serde_json::to_string(cfg).unwrap())
        .env("JOB_COMPLETION_INDEX", batch.to_string())
        .env("DISPARO_PROVIDER_TOKEN", "sandbox-meta-token")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The campaign's counters equal a recount of its messages.
pub async fn assert_counters_match(pool: &PgPool, uid: Uuid) {
    let pick =
        |c: &campaigns::Counters| (c.total, c.pending, c.sending, c.unknown, c.sent, c.failed, c.cancelled, c.skipped);
    let counters = campaigns::counters(pool, uid).await.unwrap().unwrap();
    assert_eq!(pick(&counters), pick(&campaigns::recount(pool, uid).await.unwrap()), "counters equal a recount");
}

/// 10,000 messages, one batch, one sender with its lanes: the sandbox's ledger has each
/// recipient once, every message is `sent` with a distinct provider id, and the
/// counters equal a recount.
pub async fn ten_thousand_messages_match_the_ledger(reach: &Reach) {
    let pool = &reach.pool;
    let sandbox = sandbox(0, Faults::default()).await;
    let (uid, batches) = campaign(pool, 10_000, 10_000).await;
    assert_eq!(batches, 1);
    let cfg = config(uid, "main", &sandbox, RetryPolicy::default(), unlimited(), 64);
    let sender_pool = reach.connect(SENDER_CONNECTIONS).await;
    assert_eq!(run_in_process(&sender_pool, &cfg, 0).await, sender::BatchEnd::Done, "{}", reach.log());
    let ledger = sandbox.ledger();
    assert_eq!(ledger.accepted_count(), 10_000);
    assert!(ledger.duplicates().is_empty());
    let counters = campaigns::counters(pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.sent, counters.pending, counters.failed), (10_000, 0, 0));
    assert_counters_match(pool, uid).await;
    // every recorded provider id is one the sandbox handed out
    let (distinct,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT provider_message_id) FROM campaign_messages WHERE campaign_uid = $1")
            .bind(uid)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(distinct, 10_000);
}

/// Several batches of one campaign sent at once by senders of their own (each with its
/// own pool), on one channel: every recipient once, counters equal a recount.
pub async fn concurrent_batches_send_each_message_once(reach: &Reach, batches: i32) {
    let pool = &reach.pool;
    let sandbox = sandbox(1, Faults::default()).await;
    let (uid, frozen) = campaign(pool, 500 * batches as usize, 500).await;
    assert_eq!(frozen, batches);
    let cfg = config(uid, "main", &sandbox, RetryPolicy::default(), unlimited(), 16);
    let mut senders = Vec::new();
    for batch in 0..batches {
        let sender_pool = reach.connect(SENDER_CONNECTIONS).await;
        let cfg = cfg.clone();
        senders.push(tokio::spawn(async move { run_in_process(&sender_pool, &cfg, batch).await }));
    }
    for sender in senders {
        assert_eq!(sender.await.unwrap(), sender::BatchEnd::Done, "{}", reach.log());
    }
    let ledger = sandbox.ledger();
    assert!(ledger.duplicates().is_empty(), "recipients messaged twice: {:?}", ledger.duplicates());
    assert_eq!(ledger.accepted_count(), 500 * batches as usize);
    assert_eq!(statuses(pool, uid).await, BTreeMap::from([("sent".to_owned(), 500 * i64::from(batches))]));
    assert_counters_match(pool, uid).await;
}

/// A `disparo send` process killed (SIGKILL) mid-batch, then run again: nobody gets the
/// message twice, and every message is `sent` or (at most a block per lane) `unknown`.
pub async fn sigkill_mid_batch_neither_duplicates_nor_loses(reach: &Reach) {
    let pool = &reach.pool;
    let env = reach.env();
    let sandbox = sandbox(20, Faults::default()).await;
    let (uid, _) = campaign(pool, 600, 1000).await;
    let cfg = config(uid, "main", &sandbox, RetryPolicy::default(), unlimited(), 8);
    let mut child = sender_process_with(&env, &cfg, 0);
    let ledger = sandbox.ledger();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ledger.accepted_count() < 150 {
        assert!(std::time::Instant::now() < deadline, "the sender made no progress{}", reach.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let before = statuses(pool, uid).await;
    assert!(before.get("pending").copied().unwrap_or(0) > 0, "killed before the end: {before:?}");

    let status = sender_process_with(&env, &cfg, 0).wait().await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", reach.log());
    assert!(ledger.duplicates().is_empty(), "a recipient got the message twice: {:?}", ledger.duplicates());
    let after = statuses(pool, uid).await;
    let sent = after.get("sent").copied().unwrap_or(0);
    let unknown = after.get("unknown").copied().unwrap_or(0);
    assert_eq!(after.get("pending"), None, "{after:?}");
    assert_eq!(sent + unknown, 600, "every message is accounted for: {after:?}");
    let in_flight = 8 * i64::from(sender::lanes_for(&cfg.batch_job(0).limits));
    assert!(unknown <= in_flight, "at most one block per lane was in flight when killed: {after:?}");
    // every accepted message is either recorded as sent or is one of the unknown ones
    assert!(ledger.accepted_count() as i64 >= sent && ledger.accepted_count() as i64 <= sent + unknown);
    assert_counters_match(pool, uid).await;
}

/// Contacts of the no-double-send scenario.
pub const GATEWAY_CONTACTS: usize = 120;

/// Every tenth contact's messages always meet the gateway's 504.
fn behind_gateway(i: usize) -> bool {
    i % 10 == 3
}

async fn gateway_sandbox() -> SandboxHandle {
    disparo::telemetry::install_crypto_provider();
    let faults = Faults {
        // The provider refuses with its own error body: retried, never accepted.
        retryable: 0.3,
        // The provider accepts, then a gateway answers 504 instead.
        gateway_timeout: 0.1,
        gateway_timeout_recipients: (0..GATEWAY_CONTACTS).filter(|i| behind_gateway(*i)).map(common::phone).collect(),
        ..Faults::default()
    };
    let config = SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Latency { min_ms: 0, max_ms: 2 },
        faults,
        ..Default::default()
    };
    sandbox::start(config).await.unwrap()
}

async fn gateway_campaign(pool: &PgPool) -> Uuid {
    common::seed_contacts(pool, "acme", GATEWAY_CONTACTS, |i| (vec![], json!({"i": i}))).await;
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: "acme", name: &format!("c-{uid}"), channel: "main", batch_size: 1000 };
    audience::materialize(pool, &key, &AudienceQuery::AllContacts).await.unwrap();
    uid
}

/// One message as Postgres has it at the end.
struct Row {
    phone: String,
    status: String,
    attempts: i32,
    error_message: Option<String>,
    history: Value,
}

async fn rows(pool: &PgPool, campaign: Uuid) -> Vec<Row> {
    let rows: Vec<(String, String, i32, Option<String>, Value)> = sqlx::query_as(
        "SELECT c.phone, m.status::text, m.attempts, m.last_error_message, m.status_history
           FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id
          WHERE m.campaign_uid = $1",
    )
    .bind(campaign)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(phone, status, attempts, error_message, history)| Row {
            phone,
            status,
            attempts,
            error_message,
            history,
        })
        .collect()
}

/// No double send through intermediaries: a gateway in front of the provider answers
/// 504 after the provider accepted the message. Such a message must end `unknown` and
/// never be sent again, while refusals the provider itself makes are still retried;
/// the sandbox's ledger (what the provider saw) must show no recipient twice.
pub async fn no_recipient_gets_two_messages(
    reach: &Reach,
    target: impl FnOnce(&SandboxHandle) -> (ProviderTarget, MessageTemplate, &'static str),
) {
    let pool = &reach.pool;
    let sandbox = gateway_sandbox().await;
    let uid = gateway_campaign(pool).await;
    let (target, message, token) = target(&sandbox);
    let cfg = SendConfig {
        campaign_uid: uid,
        organization: "acme".into(),
        channel: "main".into(),
        target,
        message,
        // Immediate retries: the schedule is not what this test is about.
        retry: RetryPolicy { max_attempts: 4, base_delay_seconds: 0, max_delay_seconds: 0 },
        rate_limits: unlimited(),
        block_size: 8,
        request_timeout_millis: 5_000,
        portfolio: None,
        quality_policy: QualityPolicy::Pause,
    };
    let client = sender::build_client(&cfg.target, token, Duration::from_millis(cfg.request_timeout_millis)).unwrap();
    let metrics = sender::metrics::SenderMetrics::new(&mut Registry::default());
    let sender_pool = reach.connect(SENDER_CONNECTIONS).await;
    let end =
        sender::run_batch(&sender_pool, &cfg.batch_job(0), client, &metrics, &CancellationToken::new()).await.unwrap();
    assert_eq!(end, sender::BatchEnd::Done, "{}", reach.log());

    let ledger = sandbox.ledger();
    assert!(ledger.duplicates().is_empty(), "recipients messaged twice: {:?}", ledger.duplicates());
    let per_recipient: HashMap<String, u32> = ledger.per_recipient();
    let rows = rows(pool, uid).await;
    assert_eq!(rows.len(), GATEWAY_CONTACTS);
    let gateway: Vec<String> = (0..GATEWAY_CONTACTS).filter(|i| behind_gateway(*i)).map(common::phone).collect();
    let mut retried = 0;
    for row in &rows {
        let seen = per_recipient.get(&row.phone).copied().unwrap_or(0);
        match row.status.as_str() {
            // Accepted once: either the answer came back or a gateway's 504 did.
            "sent" | "unknown" => {
                assert_eq!(seen, 1, "{} ({}) reached the provider {seen} times", row.phone, row.status)
            }
            // Refused by the provider on every attempt: never accepted.
            "failed" => assert_eq!((seen, row.attempts), (0, 4), "{}: {}", row.phone, row.history),
            other => panic!("{} ended {other}: {}", row.phone, row.history),
        }
        let history = row.history.as_array().unwrap();
        if row.status == "unknown" {
            // The 504 was the last send: nothing after it, however many refusals before.
            assert_eq!(history.iter().filter(|h| h["status"] == "unknown").count(), 1, "{}", row.history);
            assert_eq!(history.last().map(|h| &h["status"]), Some(&json!("unknown")), "{}", row.history);
            assert!(row.error_message.as_deref().is_some_and(|m| m.contains("504")), "{:?}", row.error_message);
        }
        if row.attempts > 1 {
            retried += 1;
        }
    }
    // A listed recipient's message ends unknown once the provider accepted it (unless
    // the provider refused it on every attempt, then it was never accepted at all).
    let mut unknown_behind_gateway = 0;
    for phone in &gateway {
        let row = rows.iter().find(|r| &r.phone == phone).unwrap();
        match row.status.as_str() {
            "unknown" => unknown_behind_gateway += 1,
            "failed" => assert_eq!(per_recipient.get(phone), None, "{phone}: {}", row.history),
            other => panic!("{phone} met the gateway's 504 after acceptance yet ended {other}: {}", row.history),
        }
    }
    assert!(unknown_behind_gateway > 0, "the gateway's 504 was exercised");
    assert!(retried > 0, "the provider's own refusals are still retried");
    let counted = |status: &str| rows.iter().filter(|r| r.status == status).count();
    assert_eq!(
        ledger.accepted_count(),
        counted("sent") + counted("unknown"),
        "every accepted message is sent or unknown"
    );
    assert_counters_match(pool, uid).await;
    sandbox.shutdown().await.unwrap();
}

/// Meta through the sandbox, a marketing template.
pub fn meta_target(sandbox: &SandboxHandle) -> (ProviderTarget, MessageTemplate, &'static str) {
    (
        ProviderTarget::Meta {
            base_url: sandbox.base_url(),
            api_version: "v23.0".into(),
            phone_number_id: "106540352242922".into(),
        },
        MessageTemplate::Template {
            name: "promo".into(),
            language: "pt_BR".into(),
            body_parameters: vec!["{{contact.name}}".into()],
            category: TemplateCategory::Marketing,
        },
        "sandbox-meta-token",
    )
}

/// Evolution through the sandbox, a text.
pub fn evolution_target(sandbox: &SandboxHandle) -> (ProviderTarget, MessageTemplate, &'static str) {
    (
        ProviderTarget::Evolution { base_url: sandbox.base_url(), instance: "sandbox".into() },
        MessageTemplate::Text("Olá {{contact.name}}".into()),
        "sandbox-api-key",
    )
}
