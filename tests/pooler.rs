//! Disparo through a real PgBouncer 1.18 in transaction pooling mode
//! (`DISPARO_DB_POOLER=pgbouncer-transaction`, docs/architecture.md "Connection budget
//! and poolers"): the sender's core scenarios and the webhook's guarantees hold when
//! their connections go through PgBouncer with fewer server connections than client
//! connections, so that consecutive transactions of one client run on different server
//! connections. The harness seeds and checks straight to Postgres.
//!
//! The first test shows why the setting is more than sqlx's statement cache turned off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod send_scenarios;

use disparo_testkit as common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::pgbouncer::Reach;
use disparo::store::{self, Pooler, audience, campaigns, messages};
use disparo::webhook::signature::sign_meta;
use disparo::webhook::{ServiceConfig, StaticCredentials, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Server connections PgBouncer may open per database and user: far fewer than the
/// clients' connections.
const SERVER_CONNECTIONS: u32 = 2;

/// Runs `clients` tasks of `rounds` parameterized statements each, alternating two
/// statements whose answers tell them apart, on `pool`; returns how many answers were
/// wrong or errors.
async fn wrong_answers(pool: &PgPool, clients: i64, rounds: i64) -> (usize, Option<String>) {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let (mut wrong, mut example) = (0, None);
            for round in 0..rounds {
                let input = client * 10_000 + round;
                let (sql, expected) = if round % 2 == 0 {
                    ("SELECT $1::bigint + 0", input)
                } else {
                    ("SELECT $1::bigint + 1000000", input + 1_000_000)
                };
                match sqlx::query_scalar::<_, i64>(sql).bind(input).fetch_one(&pool).await {
                    Ok(answer) if answer == expected => {}
                    Ok(answer) => {
                        wrong += 1;
                        example = Some(format!("{sql} with {input} answered {answer}"));
                    }
                    Err(error) => {
                        wrong += 1;
                        example = Some(error.to_string());
                    }
                }
            }
            (wrong, example)
        }));
    }
    let mut total = (0, None);
    for task in tasks {
        let (wrong, example) = task.await.unwrap();
        total.0 += wrong;
        total.1 = total.1.or(example);
    }
    total
}

/// sqlx 0.9 with its statement cache off still prepares each statement under a name
/// (`sqlx_s_N`, numbered per connection, never closed), and sends its `Parse` and its
/// `Bind` in two exchanges: through PgBouncer in transaction mode the names of two
/// clients collide on a server connection, or a statement is bound on a server
/// connection where another client's statement waits. The store's pooled pool, whose
/// autocommit statements run in transactions that first drop left-over statements,
/// answers every statement right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_pooled_setting_survives_transaction_pooling() {
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    let bare: PgConnectOptions = reach.url.parse().unwrap();
    let bare = bare.statement_cache_capacity(0).extra_float_digits(None);
    let bare = PgPoolOptions::new().max_connections(20).connect_with(bare).await.unwrap();
    let (wrong, example) = wrong_answers(&bare, 20, 100).await;
    assert!(wrong > 0, "the statement cache off was enough after all");
    println!("statement cache off: {wrong} of 2000 wrong, e.g. {example:?}");

    // The same load through store functions on a pooled pool: claims of 40 batches at
    // once (each an autocommit statement) and cancellations (transactions).
    let pooled = reach.connect(20).await;
    assert!(store::pooled(&pooled));
    common::seed_contacts(&reach.pool, "acme", 4000, |_| (vec![], json!({}))).await;
    let uid = Uuid::new_v4();
    let key = audience::CampaignKey { uid, organization: "acme", name: "c", channel: "main", batch_size: 100 };
    audience::materialize(&reach.pool, &key, &audience::AudienceQuery::AllContacts).await.unwrap();
    let mut tasks = Vec::new();
    for batch in 0..40 {
        let pool = pooled.clone();
        tasks.push(tokio::spawn(async move {
            let mut claimed = 0;
            loop {
                let got = messages::claim_due(&pool, uid, batch, 7).await.unwrap();
                if got.is_empty() {
                    return claimed;
                }
                assert!(got.iter().all(|m| m.attempts == 1));
                claimed += got.len();
                let remaining = messages::batch_remaining(&pool, uid, batch).await.unwrap();
                assert_eq!(remaining.pending as usize, 100 - claimed);
            }
        }));
    }
    let mut claimed = 0;
    for task in tasks {
        claimed += task.await.unwrap();
    }
    assert_eq!(claimed, 4000, "every message claimed once{}", reach.log());
    send_scenarios::assert_counters_match(&reach.pool, uid).await;
}

#[tokio::test]
async fn migrations_refuse_a_pooled_pool() {
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    let pooled = reach.connect(2).await;
    let refused = store::migrate(&pooled).await.unwrap_err();
    assert!(refused.to_string().contains("direct connection"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_match_the_ledger() {
    send_scenarios::ten_thousand_messages_match_the_ledger(&Reach::through_pgbouncer(SERVER_CONNECTIONS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_senders_at_once_send_each_message_once() {
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    send_scenarios::concurrent_batches_send_each_message_once(&reach, 4).await;
}

#[tokio::test]
async fn sigkill_mid_batch_neither_duplicates_nor_loses() {
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    send_scenarios::sigkill_mid_batch_neither_duplicates_nor_loses(&reach).await;
}

#[tokio::test]
async fn a_gateway_504_after_meta_accepted_is_never_resent() {
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    send_scenarios::no_recipient_gets_two_messages(&reach, send_scenarios::meta_target).await;
}

const APP_SECRET: &str = "pooler-app-secret";

/// A signed Meta notification of one status.
fn meta_status(provider_id: &str, status: &str) -> (String, String) {
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "statuses": [{"id": provider_id, "status": status, "timestamp": Utc::now().timestamp().to_string(),
                          "recipient_id": "5511900000000"}]
        }}]}]
    })
    .to_string();
    let signature = sign_meta(APP_SECRET.as_bytes(), body.as_bytes());
    (body, signature)
}

/// The webhook service on a pooled pool: 400 statuses posted one per request by 16
/// clients at once are all applied (and the counters equal a recount), a forged
/// signature gets 401 and changes nothing, receipts that beat their provider id are
/// kept and applied by the sweeper once the id is recorded, and /readyz answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_keeps_its_guarantees_through_pgbouncer() {
    disparo::telemetry::install_crypto_provider();
    let reach = Reach::through_pgbouncer(SERVER_CONNECTIONS).await;
    let pool = &reach.pool;
    sqlx::query("INSERT INTO organizations (id, namespace, role_name) VALUES ('acme', 'acme', 'test_acme')")
        .execute(pool)
        .await
        .unwrap();
    common::seed_contacts(pool, "acme", 450, |_| (vec![], json!({}))).await;
    let uid = Uuid::new_v4();
    let key = audience::CampaignKey { uid, organization: "acme", name: "c", channel: "wa", batch_size: 1000 };
    audience::materialize(pool, &key, &audience::AudienceQuery::AllContacts).await.unwrap();
    let claimed = messages::claim_due(pool, uid, 0, 1000).await.unwrap();
    let ids: Vec<i64> = claimed.iter().map(|m| m.id).collect();
    let pid = |id: i64| format!("wamid.pooler.{id}");
    // 400 messages have their provider id; 50 get receipts before it is recorded
    let (recorded, late) = ids.split_at(400);
    let outcomes: Vec<(i64, messages::Outcome)> =
        recorded.iter().map(|id| (*id, messages::Outcome::Sent { provider_message_id: pid(*id) })).collect();
    messages::record_outcomes(pool, &outcomes, "pooler").await.unwrap();

    let credentials = Arc::new(StaticCredentials::new());
    credentials.set_meta("acme", "wa", APP_SECRET, "verify");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let config = ServiceConfig { sweep_interval: Duration::from_millis(50), ..ServiceConfig::default() };
    let service = tokio::spawn(serve(listener, reach.connect(4).await, credentials, config, shutdown.clone()));
    let http = reqwest::Client::new();
    let url = format!("{base}/webhooks/meta/acme/wa");
    let (client, target) = (http.clone(), url.clone());
    let post = move |body: String, signature: String| {
        let http = client.clone();
        let url = target.clone();
        async move {
            let response = http
                .post(url)
                .header("x-hub-signature-256", signature)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };

    let (body, _) = meta_status(&pid(recorded[0]), "read");
    let (status, _) = post(body, format!("sha256={}", "0".repeat(64))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let mut clients = Vec::new();
    for chunk in recorded.chunks(25) {
        let requests: Vec<(String, String)> = chunk.iter().map(|id| meta_status(&pid(*id), "delivered")).collect();
        let post = post.clone();
        clients.push(tokio::spawn(async move {
            let mut applied = 0;
            for (body, signature) in requests {
                let (status, text) = post(body, signature).await;
                assert_eq!(status, StatusCode::OK, "{text}");
                applied += serde_json::from_str::<Value>(&text).unwrap()["applied"].as_u64().unwrap();
            }
            applied
        }));
    }
    let mut applied = 0;
    for client in clients {
        applied += client.await.unwrap();
    }
    assert_eq!(applied, 400, "{}", reach.log());
    for id in late {
        let (body, signature) = meta_status(&pid(*id), "delivered");
        let (status, text) = post(body, signature).await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&text).unwrap()["unknown_id"].as_u64()),
            (StatusCode::OK, Some(1))
        );
    }
    // the sender records the late provider ids; the sweeper applies the kept receipts
    let outcomes: Vec<(i64, messages::Outcome)> =
        late.iter().map(|id| (*id, messages::Outcome::Sent { provider_message_id: pid(*id) })).collect();
    messages::record_outcomes(pool, &outcomes, "pooler").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let by_status = send_scenarios::statuses(pool, uid).await;
        if by_status.get("delivered") == Some(&450) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "kept receipts never applied: {by_status:?}{}", reach.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (kept,): (i64,) = sqlx::query_as("SELECT count(*) FROM unmatched_receipts").fetch_one(pool).await.unwrap();
    assert_eq!(kept, 0);
    let history: HashMap<i64, Value> =
        sqlx::query_as::<_, (i64, Value)>("SELECT id, status_history FROM campaign_messages WHERE campaign_uid = $1")
            .bind(uid)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(history.values().all(|h| h.as_array().unwrap().iter().filter(|e| e["status"] == "delivered").count() == 1));
    send_scenarios::assert_counters_match(pool, uid).await;
    let counters = campaigns::counters(pool, uid).await.unwrap().unwrap();
    assert_eq!(counters.delivered, 450);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    shutdown.cancel();
    service.await.unwrap().unwrap();
    assert_eq!(reach.pooler, Pooler::PgbouncerTransaction);
}
