//! No double send through intermediaries: a real sender, a real Postgres and the
//! sandbox over HTTP, where a gateway in front of the provider answers 504 after the
//! provider accepted the message. Such a message must end `unknown` and never be sent
//! again, while refusals the provider itself makes are still retried; the sandbox's
//! ledger (what the provider saw) must show no recipient twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashMap;
use std::time::Duration;

use disparo::api::{QualityPolicy, RateLimitMode, RateLimitsSpec, RetryPolicy, TemplateCategory};
use disparo::sandbox::{self, Faults, Latency, SandboxConfig, SandboxHandle};
use disparo::sender::{self, MessageTemplate, ProviderTarget, SendConfig};
use disparo::store::audience::{self, AudienceQuery, CampaignKey};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CONTACTS: usize = 120;

/// Every tenth contact's messages always meet the gateway's 504.
fn behind_gateway(i: usize) -> bool {
    i % 10 == 3
}

async fn sandbox() -> SandboxHandle {
    disparo::telemetry::install_crypto_provider();
    let faults = Faults {
        // The provider refuses with its own error body: retried, never accepted.
        retryable: 0.3,
        // The provider accepts, then a gateway answers 504 instead.
        gateway_timeout: 0.1,
        gateway_timeout_recipients: (0..CONTACTS).filter(|i| behind_gateway(*i)).map(common::phone).collect(),
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

fn unlimited() -> RateLimitsSpec {
    RateLimitsSpec {
        per_minute: None,
        per_hour: None,
        per_day: Some(100_000_000),
        mode: Some(RateLimitMode::Graceful),
        min_interval_millis: Some(0),
    }
}

async fn campaign(pool: &PgPool) -> Uuid {
    common::seed_contacts(pool, "acme", CONTACTS, |i| (vec![], json!({"i": i}))).await;
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

async fn no_recipient_gets_two_messages(
    target: impl FnOnce(&SandboxHandle) -> (ProviderTarget, MessageTemplate, &'static str),
) {
    let (pool, _) = common::fresh_db().await;
    let sandbox = sandbox().await;
    let uid = campaign(&pool).await;
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
    let end = sender::run_batch(&pool, &cfg.batch_job(0), client, &metrics, &CancellationToken::new()).await.unwrap();
    assert_eq!(end, sender::BatchEnd::Done);

    let ledger = sandbox.ledger();
    assert!(ledger.duplicates().is_empty(), "recipients messaged twice: {:?}", ledger.duplicates());
    let per_recipient: HashMap<String, u32> = ledger.per_recipient();
    let rows = rows(&pool, uid).await;
    assert_eq!(rows.len(), CONTACTS);
    let gateway: Vec<String> = (0..CONTACTS).filter(|i| behind_gateway(*i)).map(common::phone).collect();
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
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_gateway_504_after_meta_accepted_is_never_resent() {
    no_recipient_gets_two_messages(|sandbox| {
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
    })
    .await;
}

#[tokio::test]
async fn a_gateway_504_after_evolution_accepted_is_never_resent() {
    no_recipient_gets_two_messages(|sandbox| {
        (
            ProviderTarget::Evolution { base_url: sandbox.base_url(), instance: "sandbox".into() },
            MessageTemplate::Text("Olá {{contact.name}}".into()),
            "sandbox-api-key",
        )
    })
    .await;
}
