//! `disparo webhook` over real HTTP against a real Postgres: the docs/providers.md examples,
//! signatures, the handshake, out-of-order and duplicated receipts, Evolution, opt-outs,
//! Postgres going away and coming back, body limits, and random input.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::postgres::OwnPostgres;
use disparo::store::{audience, campaigns, messages};
use disparo::webhook::signature::{sign_evolution_jwt, sign_meta};
use disparo::webhook::{ServiceConfig, StaticCredentials, serve};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const APP_SECRET: &str = "test_app_secret";
const VERIFY_TOKEN: &str = "meatyhamhock";
const EVOLUTION_TOKEN: &str = "evolution-shared-secret";

const RTCA: &str = "wamid.HBgLMTU1NTAxMjM0NTYVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA";
const NDGA: &str = "wamid.HBgLMTU1NTAxOTk5OTkVAgARGBJCMUY0QzE3RTk5QkFEMjc4NDgA";
const MJAA: &str = "wamid.HBgLMTU1NTAxMjM0NTcVAgARGBI3RDE0RkYyQzA5QjExQTc0MjAA";
const NZEA: &str = "wamid.HBgLMTU1NTAxMjM0NTgVAgARGBJFNkE5MzMwQjE4RDI0QzVBNzEA";
const EVO_SENT_ID: &str = "3EB0A1B2C3D4E5F60718";
const EVO_FAILED_ID: &str = "3EB0F9E8D7C6B5A40312";

fn fixture(name: &str) -> &'static str {
    match name {
        "meta_sent" => include_str!("fixtures/meta/sent.json"),
        "meta_delivered" => include_str!("fixtures/meta/delivered.json"),
        "meta_read" => include_str!("fixtures/meta/read.json"),
        "meta_failed" => include_str!("fixtures/meta/failed_131026.json"),
        "meta_batch" => include_str!("fixtures/meta/batch_out_of_order.json"),
        "meta_inbound_stop" => include_str!("fixtures/meta/inbound_stop.json"),
        "evo_sent" => include_str!("fixtures/evolution/update_sent.json"),
        "evo_delivered" => include_str!("fixtures/evolution/update_delivered.json"),
        "evo_read" => include_str!("fixtures/evolution/update_read.json"),
        "evo_failed" => include_str!("fixtures/evolution/update_error.json"),
        "evo_upsert_sair" => include_str!("fixtures/webhook/evolution_upsert_sair.json"),
        other => panic!("no fixture {other}"),
    }
}

/// A running service on a port-0 listener; stopped (and awaited) by `stop`, or
/// cancelled on drop.
struct Service {
    addr: SocketAddr,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<disparo::webhook::Result<()>>>,
}

impl Service {
    async fn start(pool: PgPool, config: ServiceConfig) -> Service {
        disparo::telemetry::install_crypto_provider();
        // The namespaces acme and beta are organizations of the same ids (in a cluster an
        // organization's id is its namespace's UID; the webhook maps one to the other).
        for org in ["acme", "beta"] {
            sqlx::query("INSERT INTO organizations (id, namespace, role_name) VALUES ($1, $1, 'test_' || $1) ON CONFLICT DO NOTHING")
                .bind(org)
                .execute(&pool)
                .await
                .unwrap();
        }
        let credentials = Arc::new(StaticCredentials::new());
        for org in ["acme", "beta"] {
            credentials.set_meta(org, "wa", APP_SECRET, VERIFY_TOKEN);
            credentials.set_meta(org, "wa2", APP_SECRET, VERIFY_TOKEN);
            credentials.set_evolution(org, "evo", "x-disparo-token".parse().unwrap(), EVOLUTION_TOKEN);
            credentials.set_evolution(org, "evo2", "x-disparo-token".parse().unwrap(), EVOLUTION_TOKEN);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, pool, credentials, config, shutdown.clone()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Service { addr, http, shutdown, task: Some(task) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs a Meta body signed with `secret` (None: unsigned) to org/channel.
    async fn meta_post(&self, org: &str, body: &str, secret: Option<&str>) -> (StatusCode, String) {
        let mut request = self
            .http
            .post(self.url(&format!("/webhooks/meta/{org}/wa")))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(secret) = secret {
            request = request.header("x-hub-signature-256", sign_meta(secret.as_bytes(), body.as_bytes()));
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn meta(&self, org: &str, body: &str) -> Value {
        let (status, text) = self.meta_post(org, body, Some(APP_SECRET)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn evolution_post(&self, path: &str, body: &str, headers: &[(&str, String)]) -> (StatusCode, String) {
        let mut request =
            self.http.post(self.url(path)).header("content-type", "application/json").body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn evolution(&self, org: &str, body: &str) -> Value {
        self.evolution_on(org, "evo", body).await
    }

    async fn evolution_on(&self, org: &str, channel: &str, body: &str) -> Value {
        let (status, text) = self
            .evolution_post(
                &format!("/webhooks/evolution/{org}/{channel}"),
                body,
                &[("x-disparo-token", EVOLUTION_TOKEN.into())],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One campaign in `org` on channel `wa` with `n` messages, all claimed (`sending`);
/// returns the uid and the message ids with their contacts' phones, in phone order.
async fn campaign(pool: &PgPool, org: &str, phones: &[&str]) -> (Uuid, Vec<i64>) {
    campaign_on(pool, org, "wa", phones).await
}

/// [`campaign`] on another channel.
async fn campaign_on(pool: &PgPool, org: &str, channel: &str, phones: &[&str]) -> (Uuid, Vec<i64>) {
    let contacts: Vec<disparo::store::contacts::NewContact> = phones
        .iter()
        .map(|p| disparo::store::contacts::NewContact {
            phone: (*p).to_owned(),
            name: None,
            tags: vec![],
            attributes: json!({}),
            whatsapp_id: None,
        })
        .collect();
    disparo::store::contacts::upsert(pool, org, &contacts).await.unwrap();
    let uid = Uuid::new_v4();
    let key = audience::CampaignKey { uid, organization: org, name: &format!("c-{uid}"), channel, batch_size: 100_000 };
    audience::materialize(
        pool,
        &key,
        &audience::AudienceQuery::Contacts(phones.iter().map(|p| (*p).to_owned()).collect()),
    )
    .await
    .unwrap();
    let claimed = messages::claim_due(pool, uid, 0, 100_000).await.unwrap();
    let by_phone: HashMap<String, i64> = claimed.iter().map(|m| (m.phone.clone(), m.id)).collect();
    (uid, phones.iter().map(|p| by_phone[*p]).collect())
}

async fn mark_sent(pool: &PgPool, pairs: &[(i64, &str)]) {
    let outcomes: Vec<(i64, messages::Outcome)> = pairs
        .iter()
        .map(|(id, pid)| (*id, messages::Outcome::Sent { provider_message_id: (*pid).to_owned() }))
        .collect();
    assert_eq!(messages::record_outcomes(pool, &outcomes, "test-run").await.unwrap(), pairs.len() as u64);
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    status: String,
    provider_message_id: Option<String>,
    code: Option<String>,
    error: Option<String>,
    history: Vec<Value>,
}

impl Row {
    fn webhook_history(&self) -> Vec<Value> {
        self.history.iter().filter(|e| e["source"] == "webhook").cloned().collect()
    }
}

async fn row(pool: &PgPool, id: i64) -> Row {
    let (status, provider_message_id, code, error, history): (String, Option<String>, Option<String>, Option<String>, Value) = sqlx::query_as(
        "SELECT status::text, provider_message_id, last_error_code, last_error_message, status_history FROM campaign_messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    Row { status, provider_message_id, code, error, history: history.as_array().cloned().unwrap_or_default() }
}

/// Everything the webhook could change, to prove it changed nothing.
async fn snapshot(pool: &PgPool) -> Value {
    let (v,): (Value,) = sqlx::query_as(
        r#"SELECT jsonb_build_object(
             'messages', (SELECT coalesce(jsonb_agg(to_jsonb(m) - 'updated_at' ORDER BY id), '[]') FROM campaign_messages m),
             'updated', (SELECT coalesce(jsonb_agg(updated_at ORDER BY id), '[]') FROM campaign_messages),
             'counters', (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY campaign_uid), '[]') FROM campaign_counters c),
             'errors', (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY campaign_uid, code), '[]') FROM campaign_error_counts e),
             'contacts', (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY id), '[]') FROM contacts c))"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    v
}

async fn assert_counters_match(pool: &PgPool, uid: Uuid) {
    let counters = campaigns::counters(pool, uid).await.unwrap().unwrap();
    let recount = campaigns::recount(pool, uid).await.unwrap();
    let pick = |c: &campaigns::Counters| {
        (c.total, c.pending, c.sending, c.unknown, c.sent, c.delivered, c.read, c.failed, c.cancelled)
    };
    assert_eq!(pick(&counters), pick(&recount), "counters equal a recount");
}

fn entry(status: &str, at: &str) -> Value {
    json!({"status": status, "at": at, "source": "webhook"})
}

/// Receipts kept because no message had their provider id yet.
async fn kept(pool: &PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM unmatched_receipts").fetch_one(pool).await.unwrap();
    n
}

/// Waits until `check` holds (the service sweeps kept receipts on its own schedule).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A service that sweeps kept receipts often, so tests need not wait.
fn sweeping() -> ServiceConfig {
    ServiceConfig { sweep_interval: Duration::from_millis(20), ..ServiceConfig::default() }
}

async fn opted_out(pool: &PgPool, org: &str, phone: &str) -> bool {
    let (o,): (bool,) = sqlx::query_as("SELECT opted_out FROM contacts WHERE organization = $1 AND phone = $2")
        .bind(org)
        .bind(phone)
        .fetch_one(pool)
        .await
        .unwrap();
    o
}

#[tokio::test]
async fn each_meta_example_of_providers_md_applies_as_expected() {
    let (pool, _) = common::fresh_db().await;
    let phones = ["+15550123456", "+15550199999", "+15550123457", "+15550123458"];
    let (uid, ids) = campaign(&pool, "acme", &phones).await;
    mark_sent(&pool, &[(ids[0], RTCA), (ids[1], NDGA), (ids[2], MJAA), (ids[3], NZEA)]).await;
    // the same WAMIDs in another organization must never be touched by acme's webhooks
    let (beta_uid, beta_ids) = campaign(&pool, "beta", &phones).await;
    mark_sent(&pool, &[(beta_ids[0], RTCA), (beta_ids[2], MJAA), (beta_ids[3], NZEA)]).await;
    let beta_before = snapshot(&pool).await["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["organization"] == "beta")
        .cloned()
        .collect::<Vec<_>>();
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;

    // A5.1 sent: the message is already sent
    let summary = service.meta("acme", fixture("meta_sent")).await;
    assert_eq!((summary["duplicate"].as_u64(), summary["applied"].as_u64()), (Some(1), Some(0)));
    assert_eq!(row(&pool, ids[0]).await.status, "sent");
    assert!(row(&pool, ids[0]).await.webhook_history().is_empty());

    // A5.2 delivered, A5.3 read
    assert_eq!(service.meta("acme", fixture("meta_delivered")).await["applied"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "delivered");
    assert_eq!(service.meta("acme", fixture("meta_read")).await["applied"], 1);
    let m0 = row(&pool, ids[0]).await;
    assert_eq!(m0.status, "read");
    assert_eq!(
        m0.webhook_history(),
        vec![entry("delivered", "2025-06-18T16:22:59Z"), entry("read", "2025-06-18T16:25:01Z")]
    );

    // A5.4 failed with its error code and title
    assert_eq!(service.meta("acme", fixture("meta_failed")).await["applied"], 1);
    let m1 = row(&pool, ids[1]).await;
    assert_eq!(
        (m1.status.as_str(), m1.code.as_deref(), m1.error.as_deref()),
        ("failed", Some("131026"), Some("Message undeliverable"))
    );
    assert_eq!(
        m1.webhook_history(),
        vec![
            json!({"status": "failed", "at": "2025-06-18T16:23:05Z", "source": "webhook", "code": "131026", "title": "Message undeliverable"})
        ]
    );

    // A5.5 batch: RTcA stays read (read duplicate, delivered and sent stale), MjAA delivered, NzEA's
    // 131049 (Meta's per-user marketing limit) puts it back to be sent again in a day
    let summary = service.meta("acme", fixture("meta_batch")).await;
    assert_eq!(
        summary,
        json!({"applied": 2, "duplicate": 1, "stale": 2, "unknown_id": 0, "opted_out": 0, "ignored": 0, "signals": 0})
    );
    assert_eq!(row(&pool, ids[0]).await, m0, "nothing about RTcA changed");
    assert_eq!(row(&pool, ids[2]).await.status, "delivered");
    let m3 = row(&pool, ids[3]).await;
    assert_eq!((m3.status.as_str(), m3.code.as_deref(), m3.provider_message_id), ("pending", Some("131049"), None));
    assert!(m3.error.unwrap().starts_with("This message was not delivered"));
    assert_counters_match(&pool, uid).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.pending, counters.sent, counters.delivered, counters.read, counters.failed), (1, 0, 1, 1, 1));
    let breakdown = campaigns::error_breakdown(&pool, uid, 10).await.unwrap();
    assert_eq!(
        breakdown.iter().map(|(c, n)| (c.as_str(), *n)).collect::<BTreeMap<_, _>>(),
        BTreeMap::from([("131026", 1), ("131049", 1)])
    );

    // replaying everything changes nothing
    let before = snapshot(&pool).await;
    for name in ["meta_sent", "meta_delivered", "meta_read", "meta_failed", "meta_batch"] {
        let summary = service.meta("acme", fixture(name)).await;
        assert_eq!(summary["applied"], 0, "{name}");
    }
    assert_eq!(snapshot(&pool).await, before, "duplicates change nothing");

    // beta was untouched; A5.5 alone on beta's fresh `sent` messages ends in the same state
    let after = snapshot(&pool).await["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["organization"] == "beta")
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(after, beta_before);
    let summary = service.meta("beta", fixture("meta_batch")).await;
    assert_eq!(
        summary,
        json!({"applied": 4, "duplicate": 1, "stale": 0, "unknown_id": 0, "opted_out": 0, "ignored": 0, "signals": 0})
    );
    let b0 = row(&pool, beta_ids[0]).await;
    assert_eq!(b0.status, "read");
    assert_eq!(
        b0.webhook_history(),
        vec![entry("delivered", "2025-06-18T16:26:42Z"), entry("read", "2025-06-18T16:26:50Z")],
        "accepted events in timestamp order"
    );
    assert_eq!(row(&pool, beta_ids[2]).await.status, "delivered");
    assert_eq!(row(&pool, beta_ids[3]).await.status, "pending");
    assert_counters_match(&pool, beta_uid).await;

    // A5.4 on beta: no such WAMID there
    assert_eq!(service.meta("beta", fixture("meta_failed")).await["unknown_id"], 1);

    let (status, metrics) = service.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"disparo_webhook_events_total{provider="meta",status="delivered",outcome="applied"}"#,
        r#"disparo_webhook_events_total{provider="meta",status="sent",outcome="duplicate"}"#,
        r#"disparo_webhook_events_total{provider="meta",status="sent",outcome="stale"}"#,
        r#"disparo_webhook_events_total{provider="meta",status="failed",outcome="unknown_id"}"#,
        "disparo_webhook_batch_events_count",
        r#"disparo_webhook_request_seconds_count{provider="meta"}"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    service.stop().await;
}

#[tokio::test]
async fn a_status_finds_a_message_whose_provider_id_was_never_recorded() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+5511900000001", "+5511900000002"]).await;
    // the sender died after the provider call: `unknown`, no provider id
    messages::record_outcomes(&pool, &[(ids[0], messages::Outcome::Unknown { reason: "timeout".into() })], "test-run")
        .await
        .unwrap();
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    let body = fixture("meta_sent")
        .replace(RTCA, "wamid.recovered")
        .replace("disparo:campaign=spring-sale:msg=42", &format!("disparo:{}", ids[0]));
    // posted for another organization, our id does not reach across
    assert_eq!(service.meta("beta", &body).await["unknown_id"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "unknown");
    assert_eq!(service.meta("acme", &body).await["applied"], 1);
    let m = row(&pool, ids[0]).await;
    assert_eq!((m.status.as_str(), m.provider_message_id.as_deref()), ("sent", Some("wamid.recovered")));
    // later statuses find it by the provider id it now has
    let delivered = fixture("meta_delivered").replace(RTCA, "wamid.recovered");
    assert_eq!(service.meta("acme", &delivered).await["applied"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "delivered");
    // a message that already has a provider id is never taken over through our id
    mark_sent(&pool, &[(ids[1], "wamid.original")]).await;
    let hijack = fixture("meta_delivered")
        .replace(RTCA, "wamid.other")
        .replace("disparo:campaign=spring-sale:msg=42", &format!("disparo:{}", ids[1]));
    assert_eq!(service.meta("acme", &hijack).await["unknown_id"], 1);
    assert_eq!(row(&pool, ids[1]).await.status, "sent");
    assert_counters_match(&pool, uid).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.unknown, counters.succeeded_first_attempt), (0, 2));
    service.stop().await;
}

#[tokio::test]
async fn a_forged_or_missing_signature_gets_401_and_changes_nothing() {
    let (pool, _) = common::fresh_db().await;
    let (_, ids) = campaign(&pool, "acme", &["+15550123456"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    let before = snapshot(&pool).await;
    let body = fixture("meta_delivered");
    assert_eq!(service.meta_post("acme", body, None).await.0, StatusCode::UNAUTHORIZED, "missing");
    assert_eq!(service.meta_post("acme", body, Some("wrong_secret")).await.0, StatusCode::UNAUTHORIZED, "forged");
    // a valid signature of another body
    let other_signature = sign_meta(APP_SECRET.as_bytes(), fixture("meta_read").as_bytes());
    for signature in
        [other_signature.as_str(), "sha256=", "sha256=00", "garbage", &other_signature.replace("sha256=", "sha1=")]
    {
        let response = service
            .http
            .post(service.url("/webhooks/meta/acme/wa"))
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{signature}");
    }
    // re-serialized JSON (whitespace changed) no longer matches the signature of the original
    let reserialized = serde_json::to_string(&serde_json::from_str::<Value>(body).unwrap()).unwrap();
    let response = service
        .http
        .post(service.url("/webhooks/meta/acme/wa"))
        .header("x-hub-signature-256", sign_meta(APP_SECRET.as_bytes(), body.as_bytes()))
        .body(reserialized)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // unknown channel: 401 like a bad signature, whatever the signature
    let response = service.http.post(service.url("/webhooks/meta/acme/nope")).body(body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = service.http.post(service.url("/webhooks/meta/acme/evo")).body(body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "an Evolution channel is not a Meta channel");
    assert_eq!(snapshot(&pool).await, before);
    let (_, metrics) = service.get("/metrics").await;
    assert!(
        metrics
            .contains(r#"disparo_webhook_events_total{provider="meta",status="none",outcome="rejected_signature"} 8"#),
        "{metrics}"
    );
    // the right signature still works
    assert_eq!(service.meta("acme", body).await["applied"], 1);
    service.stop().await;
}

#[tokio::test]
async fn the_verification_handshake_echoes_the_challenge_only_for_the_right_token() {
    let (pool, _) = common::fresh_db().await;
    let service = Service::start(pool, ServiceConfig::default()).await;
    let path = |org: &str, channel: &str, mode: &str, token: &str| {
        format!("/webhooks/meta/{org}/{channel}?hub.mode={mode}&hub.challenge=1158201444&hub.verify_token={token}")
    };
    assert_eq!(
        service.get(&path("acme", "wa", "subscribe", VERIFY_TOKEN)).await,
        (StatusCode::OK, "1158201444".to_owned())
    );
    assert_eq!(service.get(&path("acme", "wa", "subscribe", "wrong")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get(&path("acme", "wa", "subscribe", "")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get(&path("acme", "wa", "unsubscribe", VERIFY_TOKEN)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get("/webhooks/meta/acme/wa").await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get(&path("acme", "missing", "subscribe", VERIFY_TOKEN)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get(&path("other", "wa", "subscribe", VERIFY_TOKEN)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(service.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(service.get("/readyz").await.0, StatusCode::OK);
    service.stop().await;
}

/// Each message gets a random set of receipts, shuffled, duplicated, split into payloads
/// of 1 to 12 statuses, posted by concurrent clients. Half the messages start `sending`
/// without a provider id (found through our id), half `sent`.
#[tokio::test]
async fn out_of_order_and_duplicated_receipts_end_in_the_right_state() {
    let (pool, _) = common::fresh_db().await;
    let n = 300;
    let phones: Vec<String> = (0..n).map(common::phone).collect();
    let phone_refs: Vec<&str> = phones.iter().map(String::as_str).collect();
    let (uid, ids) = campaign(&pool, "acme", &phone_refs).await;
    let pid = |id: i64| format!("wamid.r.{id}");
    let sent: Vec<(i64, String)> = ids.iter().step_by(2).map(|id| (*id, pid(*id))).collect();
    mark_sent(&pool, &sent.iter().map(|(id, p)| (*id, p.as_str())).collect::<Vec<_>>()).await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut statuses = Vec::new();
    let mut expected = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let base = 1_750_000_000 + i as i64 * 10;
        let (events, last): (Vec<(&str, i64)>, &str) = match rng.random_range(0..6) {
            0 => (vec![("sent", base), ("failed", base + 1)], "failed"),
            1 => (vec![("failed", base + 1)], "failed"),
            2 => (vec![("sent", base), ("delivered", base + 1), ("read", base + 2)], "read"),
            3 => (vec![("read", base + 2)], "read"),
            4 => (vec![("delivered", base + 1), ("sent", base)], "delivered"),
            _ => (vec![("sent", base)], "sent"),
        };
        expected.insert(*id, last);
        for (status, ts) in events {
            for _ in 0..rng.random_range(1..=3) {
                let mut item = json!({"id": pid(*id), "status": status, "timestamp": ts.to_string(), "recipient_id": "15550123456",
                                      "biz_opaque_callback_data": format!("disparo:{id}")});
                if status == "failed" {
                    item["errors"] = json!([{"code": 131026, "title": "Message undeliverable"}]);
                }
                statuses.push(item);
            }
        }
    }
    statuses.shuffle(&mut rng);
    let mut bodies = Vec::new();
    let mut rest = statuses.as_slice();
    while !rest.is_empty() {
        let take = rng.random_range(1..=12).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        bodies.push(
            json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"statuses": chunk}}]}]})
                .to_string(),
        );
    }
    let requests = bodies.len();
    let service = Arc::new(Service::start(pool.clone(), ServiceConfig::default()).await);
    let clients = 16;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let service = service.clone();
        let mine: Vec<String> = bodies.iter().skip(c).step_by(clients).cloned().collect();
        tasks.push(tokio::spawn(async move {
            for body in mine {
                service.meta("acme", &body).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for id in &ids {
        let m = row(&pool, *id).await;
        assert_eq!(m.status, expected[id], "message {id}");
        assert_eq!(m.provider_message_id, Some(pid(*id)));
        let history = m.webhook_history();
        let mut seen: Vec<&str> = history.iter().map(|e| e["status"].as_str().unwrap()).collect();
        let total = seen.len();
        seen.dedup();
        assert_eq!(seen.len(), total, "no status recorded twice for {id}: {history:?}");
    }
    assert_counters_match(&pool, uid).await;
    let (_, metrics) = service.get("/metrics").await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let (batches, grouped) =
        (value("disparo_webhook_batch_requests_count"), value("disparo_webhook_batch_requests_sum"));
    assert_eq!(grouped as usize, requests);
    assert!(batches < grouped, "concurrent requests share transactions ({batches} batches for {grouped} requests)");
    Arc::try_unwrap(service).ok().unwrap().stop().await;
}

#[tokio::test]
async fn an_evolution_update_sequence_maps_to_sent_delivered_read() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign_on(&pool, "acme", "evo", &["+5511999999999", "+5511977776666"]).await;
    // The provider id is known while the message is still `sending` (the webhook beat the sender's record).
    sqlx::query("UPDATE campaign_messages SET provider_message_id = $1 WHERE id = $2")
        .bind(EVO_SENT_ID)
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();
    mark_sent(&pool, &[(ids[1], EVO_FAILED_ID)]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;

    for (name, status) in [("evo_sent", "sent"), ("evo_delivered", "delivered"), ("evo_read", "read")] {
        assert_eq!(service.evolution("acme", fixture(name)).await["applied"], 1, "{name}");
        assert_eq!(row(&pool, ids[0]).await.status, status);
    }
    let statuses: Vec<String> =
        row(&pool, ids[0]).await.webhook_history().iter().map(|e| e["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(statuses, ["sent", "delivered", "read"]);
    // a late SERVER_ACK, and the same READ again
    assert_eq!(service.evolution("acme", fixture("evo_sent")).await["stale"], 1);
    assert_eq!(service.evolution("acme", fixture("evo_read")).await["duplicate"], 1);
    // ERROR → failed, with the only code Evolution gives
    assert_eq!(service.evolution("acme", fixture("evo_failed")).await["applied"], 1);
    let failed = row(&pool, ids[1]).await;
    assert_eq!((failed.status.as_str(), failed.code.as_deref()), ("failed", Some("evolution_error")));
    // PENDING / DELETED and other events are acknowledged and counted
    let pending = fixture("evo_sent").replace("SERVER_ACK", "PENDING");
    assert_eq!(service.evolution("acme", &pending).await["ignored"], 1);
    let connection = r#"{"event":"connection.update","instance":"my-instance","data":{"state":"open"}}"#;
    assert_eq!(service.evolution("acme", connection).await["ignored"], 1);
    assert_counters_match(&pool, uid).await;

    // authentication: header token, HS256 JWT, byEvents path; wrong or missing → 401
    let before = snapshot(&pool).await;
    let path = "/webhooks/evolution/acme/evo";
    let body = fixture("evo_delivered");
    let bearer = format!("Bearer {}", sign_evolution_jwt(EVOLUTION_TOKEN.as_bytes(), Utc::now()));
    let forged = format!("Bearer {}", sign_evolution_jwt(b"not-the-token", Utc::now()));
    let expired =
        format!("Bearer {}", sign_evolution_jwt(EVOLUTION_TOKEN.as_bytes(), Utc::now() - chrono::Duration::hours(1)));
    for (headers, expected) in [
        (vec![], StatusCode::UNAUTHORIZED),
        (vec![("x-disparo-token", "wrong".to_owned())], StatusCode::UNAUTHORIZED),
        (vec![("x-disparo-token", format!("{EVOLUTION_TOKEN}x"))], StatusCode::UNAUTHORIZED),
        (vec![("authorization", forged)], StatusCode::UNAUTHORIZED),
        (vec![("authorization", expired)], StatusCode::UNAUTHORIZED),
        (vec![("x-other", EVOLUTION_TOKEN.to_owned())], StatusCode::UNAUTHORIZED),
    ] {
        assert_eq!(service.evolution_post(path, body, &headers).await.0, expected, "{headers:?}");
    }
    assert_eq!(
        service
            .evolution_post("/webhooks/evolution/acme/nope", body, &[("x-disparo-token", EVOLUTION_TOKEN.into())])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        service
            .evolution_post("/webhooks/evolution/acme/wa", body, &[("x-disparo-token", EVOLUTION_TOKEN.into())])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(snapshot(&pool).await, before);
    assert_eq!(service.evolution_post(path, body, &[("authorization", bearer.clone())]).await.0, StatusCode::OK);
    assert_eq!(
        service
            .evolution_post(&format!("{path}/messages-update"), body, &[("x-disparo-token", EVOLUTION_TOKEN.into())])
            .await
            .0,
        StatusCode::OK
    );
    service.stop().await;
}

#[tokio::test]
async fn an_opt_out_message_marks_the_contact() {
    let (pool, _) = common::fresh_db().await;
    campaign(&pool, "acme", &["+15550123456", "+5511999999999", "+5511988886666", "+5511900000009"]).await;
    campaign(&pool, "beta", &["+15550123456"]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    // A5.6: "STOP" from 15550123456
    assert_eq!(service.meta("acme", fixture("meta_inbound_stop")).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+15550123456").await);
    assert!(!opted_out(&pool, "beta", "+15550123456").await, "only the organization the webhook belongs to");
    // Evolution messages.upsert "Sair"
    assert_eq!(service.evolution("acme", fixture("evo_upsert_sair")).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+5511999999999").await);
    // an old Brazilian WhatsApp id without the ninth digit
    let parar = fixture("meta_inbound_stop").replace("15550123456", "551188886666").replace("\"STOP\"", "\"parar.\"");
    assert_eq!(service.meta("acme", &parar).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+5511988886666").await);
    // a conversation is not an opt-out; a stranger's STOP is acknowledged
    let chat = fixture("meta_inbound_stop")
        .replace("15550123456", "5511900000009")
        .replace("\"STOP\"", "\"can you stop by tomorrow?\"");
    assert_eq!(service.meta("acme", &chat).await["opted_out"], 0);
    assert!(!opted_out(&pool, "acme", "+5511900000009").await);
    let stranger = fixture("meta_inbound_stop").replace("15550123456", "4915112345678");
    assert_eq!(service.meta("acme", &stranger).await["opted_out"], 0);
    // opting out twice is harmless
    assert_eq!(service.meta("acme", fixture("meta_inbound_stop")).await["opted_out"], 1);
    service.stop().await;

    // configured keywords replace the defaults
    let config =
        ServiceConfig { keywords: disparo::webhook::OptOutKeywords::new(["BASTA"]), ..ServiceConfig::default() };
    let service = Service::start(pool.clone(), config).await;
    let stop = fixture("meta_inbound_stop").replace("15550123456", "5511900000009");
    assert_eq!(service.meta("acme", &stop).await["opted_out"], 0);
    assert_eq!(service.meta("acme", &stop.replace("\"STOP\"", "\"Basta!\"")).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+5511900000009").await);
    service.stop().await;
}

#[tokio::test]
async fn bodies_are_capped_and_malformed_json_gets_a_reason() {
    let (pool, _) = common::fresh_db().await;
    let service =
        Service::start(pool.clone(), ServiceConfig { max_body_bytes: 4096, ..ServiceConfig::default() }).await;
    let big = format!("{{\"object\":\"whatsapp_business_account\",\"entry\":[],\"pad\":\"{}\"}}", "x".repeat(8192));
    assert_eq!(service.meta_post("acme", &big, Some(APP_SECRET)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        service
            .evolution_post("/webhooks/evolution/acme/evo", &big, &[("x-disparo-token", EVOLUTION_TOKEN.into())])
            .await
            .0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let (status, reason) = service.meta_post("acme", "{\"object\": ", Some(APP_SECRET)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("invalid JSON"), "{reason}");
    let (status, reason) = service.meta_post("acme", "[1,2]", Some(APP_SECRET)).await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_REQUEST, "the body must be a JSON object"));
    let (status, reason) = service
        .evolution_post("/webhooks/evolution/acme/evo", "{}", &[("x-disparo-token", EVOLUTION_TOKEN.into())])
        .await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_REQUEST, "missing \"event\""));
    // unsigned malformed JSON is a 401: nothing is parsed before authentication
    assert_eq!(service.meta_post("acme", "{", None).await.0, StatusCode::UNAUTHORIZED);
    // a signed payload with nothing in it is acknowledged
    assert_eq!(service.meta("acme", r#"{"object":"whatsapp_business_account","entry":[]}"#).await["applied"], 0);
    service.stop().await;
}

fn random_text(rng: &mut impl Rng, max: usize) -> String {
    const PIECES: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "entry",
        "changes",
        "statuses",
        "messages",
        "field",
        "value",
        "id",
        "status",
        "read",
        "failed",
        "errors",
        "code",
        "timestamp",
        "\"wamid.x\"",
        "null",
        "true",
        "1e999",
        "-0",
        "\\u0000",
        "\\ud800",
        "é",
        "🛑",
        " ",
        "disparo:1",
        "event",
        "messages.update",
        "data",
        "keyId",
        "SERVER_ACK",
    ];
    let n = rng.random_range(0..max);
    (0..n).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

fn random_bytes(rng: &mut impl Rng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..max);
    (0..n).map(|_| rng.random()).collect()
}

fn random_header_value(rng: &mut impl Rng) -> String {
    let n = rng.random_range(0..80);
    (0..n).map(|_| rng.random_range(0x20u8..0x7f) as char).collect()
}

/// Random bodies (bytes, JSON-ish text, mutated fixtures, deep nesting), random headers,
/// random paths: never a panic (every request is answered), never a 5xx, and without a
/// valid signature or token nothing changes. Then the same bodies properly signed:
/// still no 5xx.
#[tokio::test]
async fn arbitrary_bodies_and_headers_never_panic_nor_change_anything_unsigned() {
    let (pool, _) = common::fresh_db().await;
    let (_, ids) = campaign(&pool, "acme", &["+15550123456", "+5511999999999"]).await;
    mark_sent(&pool, &[(ids[0], RTCA), (ids[1], EVO_SENT_ID)]).await;
    let service =
        Service::start(pool.clone(), ServiceConfig { max_body_bytes: 64 * 1024, ..ServiceConfig::default() }).await;
    let before = snapshot(&pool).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd15ba60);
    let fixtures = ["meta_batch", "meta_inbound_stop", "meta_failed", "evo_read", "evo_upsert_sair"];
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for i in 0..600 {
        let body = match i % 5 {
            0 => random_bytes(&mut rng, 512),
            1 => random_text(&mut rng, 200).into_bytes(),
            2 => {
                let mut b = fixture(fixtures[rng.random_range(0..fixtures.len())]).as_bytes().to_vec();
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
                b
            }
            3 => {
                let depth = rng.random_range(1..5000);
                format!("{{\"entry\":{}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
            }
            _ => {
                // structurally plausible, with odd leaves
                let leaf = [
                    json!(null),
                    json!(1.5),
                    json!(-1),
                    json!("x"),
                    json!([]),
                    json!({}),
                    json!("\u{0}"),
                    json!(u64::MAX),
                    json!("1".repeat(300)),
                ];
                let mut pick = || leaf[rng.random_range(0..leaf.len())].clone();
                let event = ["messages.update", "messages.upsert", "x"][i % 3];
                let status = ["sent", "read", "failed", "played", "x"][i % 5];
                json!({"object": pick(), "event": event, "entry": [{"changes": [{"field": "messages", "value": {
                    "statuses": [{"id": pick(), "status": status, "timestamp": pick(), "errors": [{"code": pick(), "title": pick()}], "biz_opaque_callback_data": pick()}],
                    "messages": [{"from": pick(), "text": {"body": pick()}}]}}]}],
                    "data": {"keyId": pick(), "status": pick(), "fromMe": pick(), "key": {"remoteJid": pick(), "fromMe": false}, "message": {"conversation": pick()}}})
                .to_string()
                .into_bytes()
            }
        };
        bodies.push(body);
    }
    let paths =
        ["/webhooks/meta/acme/wa", "/webhooks/evolution/acme/evo", "/webhooks/evolution/acme/evo/messages-upsert"];
    let mut answered = HashMap::<u16, usize>::new();
    for (i, body) in bodies.iter().enumerate() {
        let path = if i % 17 == 0 {
            format!("/webhooks/meta/%FF%00/{}", random_header_value(&mut rng).replace(['/', '?', '#', ' ', '%'], ""))
        } else {
            paths[i % paths.len()].to_owned()
        };
        let mut request = service.http.post(service.url(&path)).body(body.clone());
        for _ in 0..rng.random_range(0..4) {
            let name = ["x-hub-signature-256", "x-disparo-token", "authorization", "content-type", "x-random"]
                [rng.random_range(0..5)];
            let value = match rng.random_range(0..3) {
                0 => format!("sha256={}", hex::encode(random_bytes(&mut rng, 40))),
                1 => format!(
                    "Bearer {}.{}.{}",
                    random_header_value(&mut rng),
                    random_header_value(&mut rng),
                    random_header_value(&mut rng)
                ),
                _ => random_header_value(&mut rng),
            };
            request = request.header(name, value);
        }
        let response = request.send().await.expect("every request is answered (a panic would drop the connection)");
        let status = response.status();
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::NOT_FOUND, StatusCode::BAD_REQUEST, StatusCode::PAYLOAD_TOO_LARGE]
                .contains(&status),
            "unsigned request answered {status}"
        );
        *answered.entry(status.as_u16()).or_default() += 1;
    }
    for query in [
        "hub.mode=subscribe&hub.verify_token=x&hub.challenge=1",
        "hub.mode=%FF&hub.challenge=%00",
        "a=b=c&&&",
        "hub.challenge=",
        "%",
    ] {
        let (status, _) = service.get(&format!("/webhooks/meta/acme/wa?{query}")).await;
        assert!(status == StatusCode::FORBIDDEN || status == StatusCode::BAD_REQUEST, "{query}: {status}");
    }
    assert_eq!(snapshot(&pool).await, before, "nothing changes without a valid signature or token");
    assert!(answered[&401] > 400, "{answered:?}");

    // signed: the service parses everything; never a 5xx
    for (i, body) in bodies.iter().enumerate() {
        let (path, header, value) = if i % 2 == 0 {
            ("/webhooks/meta/acme/wa", "x-hub-signature-256", sign_meta(APP_SECRET.as_bytes(), body))
        } else {
            ("/webhooks/evolution/acme/evo", "x-disparo-token", EVOLUTION_TOKEN.to_owned())
        };
        let response = service
            .http
            .post(service.url(path))
            .header(header, value)
            .body(body.clone())
            .send()
            .await
            .expect("answered");
        let status = response.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE,
            "signed request {i} answered {status}"
        );
    }
    assert_eq!(service.get("/healthz").await.0, StatusCode::OK);
    service.stop().await;
}

#[tokio::test]
async fn with_postgres_down_the_service_answers_503_and_applies_the_retry_once_it_is_back() {
    disparo::telemetry::install_crypto_provider();
    let pg = Arc::new(tokio::task::spawn_blocking(OwnPostgres::init).await.unwrap());
    let setup = disparo::store::connect(&pg.url(), 2).await.unwrap();
    disparo::store::migrate(&setup).await.unwrap();
    let (uid, ids) = campaign(&setup, "acme", &["+15550123456"]).await;
    mark_sent(&setup, &[(ids[0], RTCA)]).await;
    setup.close().await;

    // the service's own pool, lazy, as `disparo webhook` opens it
    let pool = disparo::store::connect_lazy(&pg.url(), 4).unwrap();
    let service = Service::start(pool, ServiceConfig::default()).await;
    assert_eq!(service.get("/readyz").await.0, StatusCode::OK);
    assert_eq!(service.meta("acme", fixture("meta_sent")).await["duplicate"], 1, "connections are open and in use");

    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.stop()
    })
    .await
    .unwrap();
    for attempt in 0..2 {
        let (status, text) = service.meta_post("acme", fixture("meta_delivered"), Some(APP_SECRET)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "attempt {attempt}: {text}");
    }
    assert_eq!(service.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(service.get("/healthz").await.0, StatusCode::OK, "alive, only not ready");

    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.start()
    })
    .await
    .unwrap();
    // the provider retries; the service recovers by itself
    let mut applied = None;
    for _ in 0..40 {
        let (status, text) = service.meta_post("acme", fixture("meta_delivered"), Some(APP_SECRET)).await;
        if status == StatusCode::OK {
            applied = Some(serde_json::from_str::<Value>(&text).unwrap());
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(applied.expect("recovered")["applied"], 1);
    assert_eq!(service.get("/readyz").await.0, StatusCode::OK);
    service.stop().await;

    let check = disparo::store::connect(&pg.url(), 1).await.unwrap();
    assert_eq!(row(&check, ids[0]).await.status, "delivered");
    assert_counters_match(&check, uid).await;
    check.close().await;
}

#[tokio::test]
async fn the_benchmark_runs() {
    let (pool, _) = common::fresh_db().await;
    use disparo::bench::webhook::{BenchOptions, Scenario};
    let scenarios =
        vec![Scenario { statuses_per_request: 1, clients: 64 }, Scenario { statuses_per_request: 50, clients: 4 }];
    let options = BenchOptions { events: 200, scenarios, baseline_batch: 50, ..Default::default() };
    let report = disparo::bench::webhook::bench(pool.clone(), options).await.unwrap();
    assert_eq!(report.scenarios.len(), 2);
    assert!(report.scenarios.iter().all(|s| s.events == 200 && s.rows_moved == 200 && s.events_per_second() > 0.0));
    assert_eq!(report.scenarios[0].requests - report.scenarios[0].refused, 200, "one status per request");
    println!("{report}");
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM campaign_messages").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the benchmark deletes its campaign");
}

/// A receipt that arrives before the sender recorded its message's provider id (the
/// provider answered; the sender has not written the id yet) is kept, not dropped, and
/// applied once the id is recorded: Evolution receipts (which never echo our id), and
/// Meta statuses without our callback data.
#[tokio::test]
async fn a_receipt_that_beats_the_provider_id_is_applied_once_the_id_is_recorded() {
    let (pool, _) = common::fresh_db().await;
    let (uid, evo_ids) = campaign_on(&pool, "acme", "evo", &["+5511999999999"]).await;
    let (meta_uid, meta_ids) = campaign(&pool, "acme", &["+15550123456"]).await;
    let ids = [evo_ids[0], meta_ids[0]];
    let service = Service::start(pool.clone(), sweeping()).await;
    assert_eq!(service.evolution("acme", fixture("evo_delivered")).await["unknown_id"], 1);
    assert_eq!(service.evolution("acme", fixture("evo_read")).await["unknown_id"], 1);
    assert_eq!(service.evolution("acme", fixture("evo_read")).await["unknown_id"], 1, "a retried receipt is kept once");
    assert_eq!(service.meta("acme", fixture("meta_delivered")).await["unknown_id"], 1);
    assert_eq!(kept(&pool).await, 3);
    assert_eq!(row(&pool, ids[0]).await.status, "sending");

    // the sender records the provider ids, as it does after every block
    mark_sent(&pool, &[(ids[0], EVO_SENT_ID), (ids[1], RTCA)]).await;
    eventually("the kept receipts applied", || async { kept(&pool).await == 0 }).await;
    let evo = row(&pool, ids[0]).await;
    assert_eq!(evo.status, "read");
    let statuses: Vec<&str> = evo.history.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["sent", "delivered", "read"], "the sender's entry, then the receipts in order");
    let meta = row(&pool, ids[1]).await;
    assert_eq!(meta.status, "delivered");
    assert_eq!(
        meta.webhook_history(),
        vec![entry("delivered", "2025-06-18T16:22:59Z")],
        "with the provider's own time"
    );
    assert_counters_match(&pool, uid).await;
    assert_counters_match(&pool, meta_uid).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    let meta_counters = campaigns::counters(&pool, meta_uid).await.unwrap().unwrap();
    assert_eq!((counters.sent + meta_counters.sent, meta_counters.delivered, counters.read), (0, 1, 1));

    // from now on they are found at once
    assert_eq!(service.evolution("acme", fixture("evo_read")).await["duplicate"], 1);
    assert_eq!(kept(&pool).await, 0);
    let (_, metrics) = service.get("/metrics").await;
    assert!(metrics.contains("disparo_webhook_kept_receipts_applied_total 3"), "{metrics}");
    service.stop().await;
}

/// A kept receipt whose message never shows up within a day is dropped.
#[tokio::test]
async fn a_kept_receipt_older_than_a_day_is_dropped() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign_on(&pool, "acme", "evo", &["+5511999999999", "+5511977776666"]).await;
    let service = Service::start(pool.clone(), sweeping()).await;
    assert_eq!(service.evolution("acme", fixture("evo_delivered")).await["unknown_id"], 1);
    sqlx::query("UPDATE unmatched_receipts SET received_at = now() - interval '25 hours'")
        .execute(&pool)
        .await
        .unwrap();
    // a receipt of the other message, kept just now, is still applied: the sweep ran
    assert_eq!(service.evolution("acme", fixture("evo_failed")).await["unknown_id"], 1);
    mark_sent(&pool, &[(ids[0], EVO_SENT_ID), (ids[1], EVO_FAILED_ID)]).await;
    eventually("the sweep", || async { kept(&pool).await == 0 && row(&pool, ids[1]).await.status == "failed" }).await;
    assert_eq!(row(&pool, ids[0]).await.status, "sent", "a day-old receipt is not applied");
    assert_counters_match(&pool, uid).await;
    let (_, metrics) = service.get("/metrics").await;
    assert!(metrics.contains("disparo_webhook_kept_receipts_expired_total 1"), "{metrics}");
    service.stop().await;
}

/// An Evolution message whose outcome is `unknown` (the send timed out, so its provider
/// id was never recorded) takes the id of a later receipt addressed to its contact on
/// its channel, when it is the only such message; Meta does the same through our id
/// (`biz_opaque_callback_data`).
#[tokio::test]
async fn an_unknown_evolution_message_is_resolved_by_a_later_receipt() {
    let (pool, _) = common::fresh_db().await;
    let phones = ["+5511999999999", "+5511977776666", "+5511955554444"];
    let (uid, ids) = campaign_on(&pool, "acme", "evo", &phones).await;
    let timed_out = |id: i64| (id, messages::Outcome::Unknown { reason: "timeout".into() });
    messages::record_outcomes(&pool, &[timed_out(ids[0]), timed_out(ids[1])], "test-run").await.unwrap();
    // another campaign on the channel also left an unknown message to the second contact
    let (other_uid, other) = campaign_on(&pool, "acme", "evo", &[phones[1]]).await;
    messages::record_outcomes(&pool, &[timed_out(other[0])], "test-run").await.unwrap();
    let service = Service::start(pool.clone(), sweeping()).await;

    // a receipt posted for another channel or organization does not reach this one
    assert_eq!(service.evolution_on("acme", "evo2", fixture("evo_sent")).await["unknown_id"], 1);
    assert_eq!(service.evolution("beta", fixture("evo_sent")).await["unknown_id"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "unknown");
    // SERVER_ACK to 5511999999999 on `evo`: the only unknown message to that contact there
    assert_eq!(service.evolution("acme", fixture("evo_sent")).await["applied"], 1);
    let m = row(&pool, ids[0]).await;
    assert_eq!((m.status.as_str(), m.provider_message_id.as_deref()), ("sent", Some(EVO_SENT_ID)));
    assert_eq!(service.evolution("acme", fixture("evo_read")).await["applied"], 1, "later receipts find it by its id");
    assert_eq!(row(&pool, ids[0]).await.status, "read");

    // two unknown messages to 5511977776666 on `evo`: which one is meant cannot be told
    assert_eq!(service.evolution("acme", fixture("evo_failed")).await["unknown_id"], 1);
    assert_eq!(
        (row(&pool, ids[1]).await.status, row(&pool, other[0]).await.status),
        ("unknown".into(), "unknown".into())
    );

    // a message still `sending` is not taken by its contact: its sender records the id
    let to_third = fixture("evo_delivered").replace(EVO_SENT_ID, "3EB0THIRD").replace("5511999999999", "5511955554444");
    assert_eq!(service.evolution("acme", &to_third).await["unknown_id"], 1);
    assert_eq!(row(&pool, ids[2]).await.provider_message_id, None);
    // ...but once its sender is known dead (`unknown`), the kept receipt resolves it
    let (batch,): (i32,) = sqlx::query_as("SELECT batch_index FROM campaign_messages WHERE id = $1")
        .bind(ids[2])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(messages::recover_interrupted(&pool, uid, batch).await.unwrap(), 1);
    eventually("the kept receipt resolving the unknown message", || async {
        row(&pool, ids[2]).await.status == "delivered"
    })
    .await;
    assert_eq!(row(&pool, ids[2]).await.provider_message_id.as_deref(), Some("3EB0THIRD"));
    assert_counters_match(&pool, uid).await;
    assert_counters_match(&pool, other_uid).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.unknown, counters.read, counters.delivered), (1, 1, 1));
    service.stop().await;
}

/// Meta's 131050 ("user has stopped marketing messages") is an opt-out, found by the
/// recipient's number or, failing that, through the message's contact; and so is the
/// "Stop promotions" quick reply of marketing templates.
#[tokio::test]
async fn a_user_who_stopped_marketing_messages_is_opted_out() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550199999", "+15550123456", "+5511900000009"]).await;
    mark_sent(&pool, &[(ids[0], NDGA), (ids[1], RTCA)]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    let stopped = fixture("meta_failed")
        .replace("131026", "131050")
        .replace("Message undeliverable", "User has stopped marketing messages");
    assert_eq!(service.meta("acme", &stopped).await["applied"], 1);
    let m = row(&pool, ids[0]).await;
    assert_eq!((m.status.as_str(), m.code.as_deref()), ("failed", Some("131050")));
    assert!(opted_out(&pool, "acme", "+15550199999").await);
    assert!(!opted_out(&pool, "acme", "+15550123456").await);

    // without a recipient number (or with one that is not a phone), the message's contact
    let anonymous = stopped.replace(NDGA, RTCA).replace("\"recipient_id\": \"15550199999\",", "");
    assert!(!anonymous.contains("recipient_id"));
    assert_eq!(service.meta("acme", &anonymous).await["applied"], 1);
    assert!(opted_out(&pool, "acme", "+15550123456").await);
    // any other failure is not an opt-out
    assert!(!opted_out(&pool, "acme", "+5511900000009").await);

    // the quick-reply button of a marketing template
    let button = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messages": [{"from": "5511900000009", "id": "wamid.button", "timestamp": "1750264100", "type": "button",
                      "button": {"text": "Stop promotions", "payload": "Stop promotions"}}]}}]}]});
    assert_eq!(service.meta("acme", &button.to_string()).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+5511900000009").await);
    assert_counters_match(&pool, uid).await;
    service.stop().await;
}

/// The sender records outcomes while receipts for the same messages are applied, both
/// over the same rows in opposite orders: both lock rows in ascending id order, so
/// neither ever fails with a deadlock (the store is called directly: the service would
/// retry a deadlock and hide it).
#[tokio::test]
async fn the_webhook_and_the_sender_never_deadlock_over_the_same_messages() {
    let (pool, _) = common::fresh_db().await;
    let phones: Vec<String> = (0..6000).map(common::phone).collect();
    let phone_refs: Vec<&str> = phones.iter().map(String::as_str).collect();
    let (uid, ids) = campaign(&pool, "acme", &phone_refs).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for block in ids.chunks(1000) {
        let mut shuffled = block.to_vec();
        shuffled.shuffle(&mut rng);
        let outcomes: Vec<(i64, messages::Outcome)> = shuffled
            .iter()
            .map(|id| (*id, messages::Outcome::Sent { provider_message_id: format!("wamid.d.{id}") }))
            .collect();
        shuffled.shuffle(&mut rng);
        let events: Vec<disparo::store::receipts::StatusEvent> = shuffled
            .iter()
            .map(|id| disparo::store::receipts::StatusEvent {
                provider: disparo::store::receipts::Provider::Meta,
                organization: "acme".into(),
                channel: "wa".into(),
                provider_message_id: format!("wamid.d.{id}"),
                message_id: Some(*id),
                campaign: Some(uid),
                status: disparo::store::receipts::ReceiptStatus::Delivered,
                at: Utc::now(),
                error: None,
                recipient: None,
                opts_out: false,
                recipient_bsuid: None,
                pricing: None,
            })
            .collect();
        let sender = tokio::spawn({
            let pool = pool.clone();
            async move { messages::record_outcomes(&pool, &outcomes, "test-run").await }
        });
        let webhook = tokio::spawn({
            let pool = pool.clone();
            async move { disparo::store::receipts::apply(&pool, &events, &[]).await }
        });
        sender.await.unwrap().expect("the sender's record");
        webhook.await.unwrap().expect("the webhook's apply");
    }
    for id in &ids {
        assert_eq!(row(&pool, *id).await.status, "delivered", "message {id}");
    }
    assert_counters_match(&pool, uid).await;
}

/// More kept receipts than one sweep transaction takes: every one is applied.
#[tokio::test]
async fn kept_receipts_beyond_one_sweep_page_are_all_applied() {
    let (pool, _) = common::fresh_db().await;
    let n = 1234;
    let phones: Vec<String> = (0..n).map(common::phone).collect();
    let phone_refs: Vec<&str> = phones.iter().map(String::as_str).collect();
    let (uid, ids) = campaign_on(&pool, "acme", "evo", &phone_refs).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    // one Evolution request may carry many updates; none finds its message yet
    let items: Vec<Value> = ids
        .iter()
        .map(|id| json!({"keyId": format!("3EB0{id:016}"), "fromMe": true, "status": "DELIVERY_ACK"}))
        .collect();
    let body = json!({"event": "messages.update", "instance": "i", "data": items}).to_string();
    assert_eq!(service.evolution("acme", &body).await["unknown_id"], n);
    service.stop().await;
    assert_eq!(kept(&pool).await, n as i64);
    let sent: Vec<(i64, String)> = ids.iter().map(|id| (*id, format!("3EB0{id:016}"))).collect();
    mark_sent(&pool, &sent.iter().map(|(id, pid)| (*id, pid.as_str())).collect::<Vec<_>>()).await;
    let report = disparo::store::receipts::sweep_unmatched(&pool, disparo::store::receipts::UNMATCHED_RECEIPT_TTL)
        .await
        .unwrap();
    assert_eq!((report.applied, report.expired), (n as u64, 0));
    assert_eq!(kept(&pool).await, 0);
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!(counters.delivered, n as i64);
    assert_counters_match(&pool, uid).await;
}

/// What an answer tells a client: status, content type and body.
async fn answer(response: reqwest::Response) -> (StatusCode, Option<String>, String) {
    let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    (response.status(), kind, response.text().await.unwrap())
}

/// Nobody learns from the webhook URLs which organizations and channels exist: an
/// unknown namespace, an unknown channel and a channel of the other provider answer a
/// request exactly as a real channel answers a bad signature, token or verify token.
#[tokio::test]
async fn unknown_and_real_channels_answer_unauthenticated_requests_alike() {
    let (pool, _) = common::fresh_db().await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    let before = snapshot(&pool).await;
    let body = fixture("meta_delivered");
    let signed = sign_meta(APP_SECRET.as_bytes(), body.as_bytes());
    let forged = sign_meta(b"not-the-app-secret", body.as_bytes());
    let post = |path: &str, headers: Vec<(&'static str, String)>| {
        let mut request =
            service.http.post(service.url(path)).header("content-type", "application/json").body(body.to_owned());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { answer(request.send().await.unwrap()).await }
    };
    let reference = post("/webhooks/meta/acme/wa", vec![("x-hub-signature-256", forged.clone())]).await;
    assert_eq!(reference.0, StatusCode::UNAUTHORIZED);
    let token = || vec![("x-disparo-token", EVOLUTION_TOKEN.to_owned())];
    let cases = [
        ("real Meta channel, no signature", post("/webhooks/meta/acme/wa", vec![]).await),
        (
            "unknown namespace, valid signature",
            post("/webhooks/meta/nobody/wa", vec![("x-hub-signature-256", signed.clone())]).await,
        ),
        (
            "unknown channel, valid signature",
            post("/webhooks/meta/acme/nope", vec![("x-hub-signature-256", signed.clone())]).await,
        ),
        (
            "unknown channel, forged signature",
            post("/webhooks/meta/acme/nope", vec![("x-hub-signature-256", forged.clone())]).await,
        ),
        (
            "an Evolution channel on the Meta path",
            post("/webhooks/meta/acme/evo", vec![("x-hub-signature-256", signed.clone())]).await,
        ),
        (
            "real Evolution channel, wrong token",
            post("/webhooks/evolution/acme/evo", vec![("x-disparo-token", "wrong".into())]).await,
        ),
        ("real Evolution channel, no token", post("/webhooks/evolution/acme/evo/messages-update", vec![]).await),
        ("unknown namespace, Evolution", post("/webhooks/evolution/nobody/evo", token()).await),
        ("unknown channel, Evolution", post("/webhooks/evolution/acme/nope", token()).await),
        ("unknown channel, Evolution by event", post("/webhooks/evolution/acme/nope/messages-update", token()).await),
        ("a Meta channel on the Evolution path", post("/webhooks/evolution/acme/wa", token()).await),
    ];
    for (case, got) in cases {
        assert_eq!(got, reference, "{case}");
    }

    // The subscription handshake likewise.
    let handshake = |org: &str, channel: &str, token: &str| {
        let url = service.url(&format!(
            "/webhooks/meta/{org}/{channel}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}"
        ));
        let request = service.http.get(url);
        async move { answer(request.send().await.unwrap()).await }
    };
    let refused = handshake("acme", "wa", "wrong").await;
    assert_eq!(refused.0, StatusCode::FORBIDDEN);
    for (org, channel) in [("nobody", "wa"), ("acme", "nope"), ("acme", "evo")] {
        assert_eq!(handshake(org, channel, VERIFY_TOKEN).await, refused, "{org}/{channel}");
    }
    assert_eq!(snapshot(&pool).await, before);
    service.stop().await;
}

/// POSTs a signed Meta body to a channel of an organization.
async fn meta_at(service: &Service, org: &str, channel: &str, body: &str) -> Value {
    let response = service
        .http
        .post(service.url(&format!("/webhooks/meta/{org}/{channel}")))
        .header("x-hub-signature-256", sign_meta(APP_SECRET.as_bytes(), body.as_bytes()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// The credentials of one channel reach that channel's messages only: a receipt posted
/// at channel C for a message sent through channel D of the same organization (found
/// by provider id, by our id in `biz_opaque_callback_data`, or by contact) changes
/// nothing, now or at any later sweep; posted at D, it applies.
#[tokio::test]
async fn a_receipt_posted_at_one_channel_never_changes_another_channels_messages() {
    let (pool, _) = common::fresh_db().await;
    let phones = ["+15550123456", "+5511900000001", "+5511999999999"];
    // Sent through wa2 (Meta): one with its provider id, one whose id was never recorded.
    let (meta_uid, on_wa2) = campaign_on(&pool, "acme", "wa2", &phones[..2]).await;
    mark_sent(&pool, &[(on_wa2[0], RTCA)]).await;
    messages::record_outcomes(
        &pool,
        &[(on_wa2[1], messages::Outcome::Unknown { reason: "timeout".into() })],
        "test-run",
    )
    .await
    .unwrap();
    // Sent through evo2 (Evolution): one with its id, one left unknown.
    let (evo_uid, on_evo2) = campaign_on(&pool, "acme", "evo2", &phones[1..]).await;
    mark_sent(&pool, &[(on_evo2[1], EVO_SENT_ID)]).await;
    messages::record_outcomes(
        &pool,
        &[(on_evo2[0], messages::Outcome::Unknown { reason: "timeout".into() })],
        "test-run",
    )
    .await
    .unwrap();
    let service = Service::start(pool.clone(), sweeping()).await;
    let before = snapshot(&pool).await;

    // At channel wa: by provider id, and by our id.
    let by_our_id = fixture("meta_sent")
        .replace(RTCA, "wamid.recovered")
        .replace("disparo:campaign=spring-sale:msg=42", &format!("disparo:{}", on_wa2[1]));
    assert_eq!(meta_at(&service, "acme", "wa", fixture("meta_delivered")).await["unknown_id"], 1);
    assert_eq!(meta_at(&service, "acme", "wa", &by_our_id).await["unknown_id"], 1);
    // At channel evo: by provider id, and by contact (5511900000001's unknown message).
    assert_eq!(service.evolution_on("acme", "evo", fixture("evo_delivered")).await["unknown_id"], 1);
    let by_contact = fixture("evo_sent").replace(EVO_SENT_ID, "3EB0OTHER").replace("5511999999999", "5511900000001");
    assert_eq!(service.evolution_on("acme", "evo", &by_contact).await["unknown_id"], 1);
    // Kept, swept many times over, never applied.
    assert_eq!(kept(&pool).await, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(snapshot(&pool).await, before, "nothing of wa2's or evo2's messages changed");

    // Posted at their own channels, the same receipts apply.
    assert_eq!(meta_at(&service, "acme", "wa2", fixture("meta_delivered")).await["applied"], 1);
    assert_eq!(meta_at(&service, "acme", "wa2", &by_our_id).await["applied"], 1);
    assert_eq!(service.evolution_on("acme", "evo2", fixture("evo_delivered")).await["applied"], 1);
    assert_eq!(service.evolution_on("acme", "evo2", &by_contact).await["applied"], 1);
    assert_eq!(row(&pool, on_wa2[0]).await.status, "delivered");
    assert_eq!(row(&pool, on_wa2[1]).await.provider_message_id.as_deref(), Some("wamid.recovered"));
    assert_eq!(row(&pool, on_evo2[1]).await.status, "delivered");
    assert_eq!(row(&pool, on_evo2[0]).await.provider_message_id.as_deref(), Some("3EB0OTHER"));
    assert_counters_match(&pool, meta_uid).await;
    assert_counters_match(&pool, evo_uid).await;
    service.stop().await;
}

/// Opens a connection to the service and starts a POST of a Meta notification whose
/// body is `declared` bytes long, sending only its first byte: the upload holds its room
/// until it is dropped (or the read timeout ends it).
async fn stalled_upload(service: &Service, declared: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/meta/acme/wa HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// Meta posts one status per request, many at once: the room for request bodies is
/// counted in bytes (`max_concurrent_requests` bodies of the largest size), so small
/// notifications are not held to that count of requests.
#[tokio::test]
async fn small_notifications_are_not_held_to_the_count_of_large_bodies() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550123456"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let config = ServiceConfig {
        max_concurrent_requests: 2,
        request_wait: Duration::from_millis(300),
        ..ServiceConfig::default()
    };
    let service = Service::start(pool.clone(), config).await;
    // Three small uploads in flight at once, more than the count of large bodies...
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_upload(&service, 600).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... and a fourth small request is still handled at once.
    assert_eq!(service.meta("acme", fixture("meta_delivered")).await["applied"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "delivered");
    assert_counters_match(&pool, uid).await;
    drop(stalled);
    service.stop().await;
}

/// When the room for bodies is full, a request waits `request_wait` for room, then gets
/// 503 with `Retry-After` and changes nothing; Meta retries any answer but 2xx, and the
/// retry, once there is room, is applied: an overload delays statuses, never loses them.
#[tokio::test]
async fn a_full_service_answers_503_and_applies_the_retry() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550123456"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let config = ServiceConfig {
        max_concurrent_requests: 1,
        max_body_bytes: 64 * 1024,
        request_wait: Duration::from_millis(300),
        ..ServiceConfig::default()
    };
    let service = Service::start(pool.clone(), config).await;
    // one upload of the largest size takes all the room
    let stalled = stalled_upload(&service, 64 * 1024).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = service
        .http
        .post(service.url("/webhooks/meta/acme/wa"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign_meta(APP_SECRET.as_bytes(), fixture("meta_delivered").as_bytes()))
        .body(fixture("meta_delivered"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()), Some("5".into()));
    assert_eq!(row(&pool, ids[0]).await.status, "sent", "a refused request changes nothing");
    // the upload goes away; Meta's retry finds room
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.meta("acme", fixture("meta_delivered")).await["applied"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "delivered");
    assert_counters_match(&pool, uid).await;
    service.stop().await;
}

// ---------------------------------------------------------------------------------------
// Account health: Meta's account, number and template fields; pricing; business-scoped
// user ids; the per-user marketing limit (131049).

const WABA: &str = "102290129340398";
const BSUID: &str = "BR.1502576394655843";

// The example bodies of docs/providers.md, "Account health signals".
const QUALITY_FLAGGED: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"phone_number_quality_update",
 "value":{"display_phone_number":"15550783881","event":"FLAGGED","current_limit":"TIER_10K","max_daily_conversations_per_business":10000}}]}]}"#;
const TEMPLATE_PAUSED: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"message_template_status_update",
 "value":{"event":"PAUSED","message_template_id":594425479261596,"message_template_name":"welcome",
 "message_template_language":"pt_BR","reason":"LOW_QUALITY","message_template_category":"MARKETING"}}]}]}"#;
const RESTRICTED: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"account_update",
 "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[{"restriction_type":"RESTRICTED_BIZ_INITIATED_MESSAGING","expiration":1767225600}]}}]}]}"#;

/// A one-change body of an account field for a WABA.
fn account_change(waba: &str, field: &str, value: Value) -> String {
    json!({"object": "whatsapp_business_account", "entry": [{"id": waba, "changes": [{"field": field, "value": value}]}]})
        .to_string()
}

/// What the controller records of a Channel (its WABA, display number, portfolio).
async fn channel_row(pool: &PgPool, org: &str, channel: &str, waba: &str, phone: &str, portfolio: &str) {
    sqlx::query(
        r#"INSERT INTO channel_state (organization, channel, waba_id, display_phone, portfolio) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (organization, channel) DO UPDATE SET waba_id = $3, display_phone = $4, portfolio = $5"#,
    )
    .bind(org)
    .bind(channel)
    .bind(waba)
    .bind(phone)
    .bind(portfolio)
    .execute(pool)
    .await
    .unwrap();
}

/// Everything account signals could change.
async fn health(pool: &PgPool) -> Value {
    let (v,): (Value,) = sqlx::query_as(
        r#"SELECT jsonb_build_object(
             'channels', (SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY organization, channel), '[]') FROM channel_state s),
             'portfolios', (SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY organization, portfolio), '[]') FROM portfolios p),
             'templates', (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY organization, waba_id, name, language), '[]') FROM template_state t))"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    v
}

/// A channel's quality columns: (event, flagged, changed).
async fn quality(pool: &PgPool, org: &str, channel: &str) -> (Option<String>, bool, bool) {
    sqlx::query_as(
        "SELECT quality_event, quality_flagged, quality_changed_at IS NOT NULL FROM channel_state WHERE organization = $1 AND channel = $2",
    )
    .bind(org)
    .bind(channel)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Portfolio {
    tier: Option<String>,
    daily_limit: Option<i32>,
    limit_source: Option<String>,
    restricted_until: Option<chrono::DateTime<Utc>>,
    restriction: Option<String>,
    budget_spent: bool,
}

async fn portfolio(pool: &PgPool, org: &str, portfolio: &str) -> Option<Portfolio> {
    sqlx::query_as(
        r#"SELECT tier, daily_limit, limit_source, restricted_until, restriction, budget_spent_until IS NOT NULL AS budget_spent
           FROM portfolios WHERE organization = $1 AND portfolio = $2"#,
    )
    .bind(org)
    .bind(portfolio)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// (status, reason, quality) of a template.
async fn template(pool: &PgPool, org: &str, name: &str) -> Option<(Option<String>, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT status, reason, quality FROM template_state WHERE organization = $1 AND waba_id = $2 AND name = $3 AND language = 'pt_BR'",
    )
    .bind(org)
    .bind(WABA)
    .bind(name)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn account_fields_change_exactly_the_rows_they_concern() {
    let (pool, _) = common::fresh_db().await;
    // acme: two numbers of the WABA in portfolio bp1, a third channel of another WABA (bp2)
    channel_row(&pool, "acme", "wa", WABA, "+1 555-078-3881", "bp1").await;
    channel_row(&pool, "acme", "wa2", WABA, "15550783882", "bp1").await;
    channel_row(&pool, "acme", "evo", "999", "15550783881", "bp2").await;
    // beta has a channel of the same WABA: acme's webhooks never reach it
    channel_row(&pool, "beta", "wa", WABA, "15550783881", "bp1").await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;

    // A forged or unsigned account change: 401, nothing changes
    let before = health(&pool).await;
    for body in [QUALITY_FLAGGED, TEMPLATE_PAUSED, RESTRICTED] {
        assert_eq!(service.meta_post("acme", body, None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(service.meta_post("acme", body, Some("wrong_secret")).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(health(&pool).await, before);

    // FLAGGED for 15550783881: that number's channel only, and the portfolio's limit
    let summary = service.meta("acme", QUALITY_FLAGGED).await;
    assert_eq!(summary["signals"], 1, "{summary}");
    assert_eq!(quality(&pool, "acme", "wa").await, (Some("FLAGGED".into()), true, true));
    assert_eq!(quality(&pool, "acme", "wa2").await, (None, false, false));
    assert_eq!(quality(&pool, "acme", "evo").await, (None, false, false));
    assert_eq!(quality(&pool, "beta", "wa").await, (None, false, false));
    let tier_10k = Portfolio {
        tier: Some("TIER_10K".into()),
        daily_limit: Some(10_000),
        limit_source: Some("webhook".into()),
        restricted_until: None,
        restriction: None,
        budget_spent: false,
    };
    assert_eq!(portfolio(&pool, "acme", "bp1").await, Some(tier_10k));
    assert_eq!(portfolio(&pool, "acme", "bp2").await, None);
    assert_eq!(portfolio(&pool, "beta", "bp1").await, None);

    // UNFLAGGED lifts it; a number no channel recorded: every channel of the WABA
    let unflagged = account_change(
        WABA,
        "phone_number_quality_update",
        json!({"display_phone_number": "15550783881", "event": "UNFLAGGED"}),
    );
    service.meta("acme", &unflagged).await;
    assert_eq!(quality(&pool, "acme", "wa").await, (Some("UNFLAGGED".into()), false, true));
    let downgrade = account_change(
        WABA,
        "phone_number_quality_update",
        json!({"display_phone_number": "15550000000", "event": "DOWNGRADE"}),
    );
    service.meta("acme", &downgrade).await;
    assert_eq!(quality(&pool, "acme", "wa").await, (Some("DOWNGRADE".into()), true, true));
    assert_eq!(quality(&pool, "acme", "wa2").await, (Some("DOWNGRADE".into()), true, true));
    assert_eq!(quality(&pool, "acme", "evo").await, (None, false, false));
    // an event that says nothing of the flag leaves it
    let onboarding = account_change(
        WABA,
        "phone_number_quality_update",
        json!({"display_phone_number": "15550783882", "event": "ONBOARDING"}),
    );
    service.meta("acme", &onboarding).await;
    assert_eq!(quality(&pool, "acme", "wa2").await, (Some("ONBOARDING".into()), true, true));

    // a WABA no channel recorded: the URL's channel, its row created
    let elsewhere = account_change("777", "phone_number_quality_update", json!({"event": "FLAGGED"}));
    assert_eq!(meta_at(&service, "beta", "wa2", &elsewhere).await["signals"], 1);
    assert_eq!(quality(&pool, "beta", "wa2").await, (Some("FLAGGED".into()), true, true));
    assert_eq!(quality(&pool, "beta", "wa").await, (None, false, false));

    // business_capability_update: a smaller limit keeps a spent budget spent; a larger one frees it
    sqlx::query("UPDATE portfolios SET budget_spent_until = now() + interval '1 hour' WHERE organization = 'acme' AND portfolio = 'bp1'")
        .execute(&pool)
        .await
        .unwrap();
    let capability = |limit: Value| {
        account_change(
            WABA,
            "business_capability_update",
            json!({"max_daily_conversations_per_business": limit, "max_phone_numbers_per_business": 2}),
        )
    };
    service.meta("acme", &capability(json!(2000))).await;
    let bp1 = portfolio(&pool, "acme", "bp1").await.unwrap();
    assert_eq!((bp1.tier.as_deref(), bp1.daily_limit, bp1.budget_spent), (Some("TIER_2K"), Some(2000), true));
    service.meta("acme", &capability(json!(-1))).await;
    let bp1 = portfolio(&pool, "acme", "bp1").await.unwrap();
    assert_eq!((bp1.tier.as_deref(), bp1.daily_limit, bp1.budget_spent), (Some("TIER_UNLIMITED"), None, false));
    service.meta("acme", &capability(json!(5000))).await;
    let bp1 = portfolio(&pool, "acme", "bp1").await.unwrap();
    assert_eq!((bp1.tier, bp1.daily_limit, bp1.limit_source.as_deref()), (None, Some(5000), Some("webhook")));
    assert_eq!(portfolio(&pool, "acme", "bp2").await, None, "another WABA's portfolio is untouched");

    // account_update: the business-initiated restriction on the WABA's portfolios
    service.meta("acme", RESTRICTED).await;
    let bp1 = portfolio(&pool, "acme", "bp1").await.unwrap();
    assert_eq!(
        (bp1.restricted_until.map(|t| t.timestamp()), bp1.restriction.as_deref()),
        (Some(1_767_225_600), Some("RESTRICTED_BIZ_INITIATED_MESSAGING"))
    );
    assert_eq!(portfolio(&pool, "beta", "bp1").await, None);
    // other restriction types and events record nothing
    let before = health(&pool).await;
    let other = account_change(
        WABA,
        "account_update",
        json!({"event": "ACCOUNT_RESTRICTION", "restriction_info": [{"restriction_type": "RESTRICTED_ADD_PHONE_NUMBER_ACTION", "expiration": 1767225600}]}),
    );
    assert_eq!(service.meta("acme", &other).await["signals"], 0);
    let violation = account_change(WABA, "account_update", json!({"event": "ACCOUNT_VIOLATION"}));
    assert_eq!(service.meta("acme", &violation).await["signals"], 0);
    assert_eq!(health(&pool).await, before);

    // templates: status, then quality, then approved again
    service.meta("acme", TEMPLATE_PAUSED).await;
    assert_eq!(
        template(&pool, "acme", "welcome").await,
        Some((Some("PAUSED".into()), Some("LOW_QUALITY".into()), None))
    );
    let yellow = account_change(
        WABA,
        "message_template_quality_update",
        json!({"previous_quality_score": "GREEN", "new_quality_score": "YELLOW", "message_template_id": 594425479261596u64,
               "message_template_name": "welcome", "message_template_language": "pt_BR"}),
    );
    service.meta("acme", &yellow).await;
    assert_eq!(
        template(&pool, "acme", "welcome").await,
        Some((Some("PAUSED".into()), Some("LOW_QUALITY".into()), Some("YELLOW".into())))
    );
    let approved = TEMPLATE_PAUSED.replace("PAUSED", "APPROVED").replace("LOW_QUALITY", "NONE");
    service.meta("acme", &approved).await;
    assert_eq!(template(&pool, "acme", "welcome").await, Some((Some("APPROVED".into()), None, Some("YELLOW".into()))));
    assert_eq!(template(&pool, "beta", "welcome").await, None);
    // a template change without its name is acknowledged and changes nothing
    let before = health(&pool).await;
    let nameless = account_change(WABA, "message_template_status_update", json!({"event": "DISABLED"}));
    assert_eq!(service.meta("acme", &nameless).await["signals"], 0);
    assert_eq!(health(&pool).await, before);

    let (_, metrics) = service.get("/metrics").await;
    for line in [
        r#"disparo_webhook_account_signals_total{field="phone_number_quality_update",outcome="applied"} 5"#,
        r#"disparo_webhook_account_signals_total{field="business_capability_update",outcome="applied"} 3"#,
        r#"disparo_webhook_account_signals_total{field="account_update",outcome="applied"} 1"#,
        r#"disparo_webhook_account_signals_total{field="account_update",outcome="not_recorded"} 2"#,
        r#"disparo_webhook_account_signals_total{field="message_template_status_update",outcome="applied"} 2"#,
        r#"disparo_webhook_account_signals_total{field="message_template_status_update",outcome="invalid"} 1"#,
        r#"disparo_webhook_account_signals_total{field="message_template_quality_update",outcome="applied"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    service.stop().await;
}

/// (category, type) of a message's pricing.
async fn pricing(pool: &PgPool, id: i64) -> (Option<String>, Option<String>) {
    sqlx::query_as("SELECT pricing_category, pricing_type FROM campaign_messages WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn pricing_is_stored_the_latest_given_wins_and_a_kept_receipt_keeps_it() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550123456", "+15550123457"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let service = Service::start(pool.clone(), sweeping()).await;
    let marketing = (Some("marketing".to_owned()), Some("regular".to_owned()));

    // A5.1 `sent` of a message already sent: a duplicate, but its pricing is recorded
    assert_eq!(service.meta("acme", fixture("meta_sent")).await["duplicate"], 1);
    assert_eq!(pricing(&pool, ids[0]).await, marketing);
    // A5.3 `read` carries none: kept
    assert_eq!(service.meta("acme", fixture("meta_read")).await["applied"], 1);
    assert_eq!(pricing(&pool, ids[0]).await, marketing);
    // a later one that says otherwise wins (here a stale `delivered`)
    let free = fixture("meta_delivered")
        .replace(r#""type": "regular""#, r#""type": "free_entry_point""#)
        .replace(r#""category": "marketing""#, r#""category": "utility""#);
    assert_eq!(service.meta("acme", &free).await["stale"], 1);
    assert_eq!(pricing(&pool, ids[0]).await, (Some("utility".into()), Some("free_entry_point".into())));
    assert_eq!(row(&pool, ids[0]).await.status, "read");

    // a `delivered` with pricing that beats its message's provider id is kept with it
    let early = fixture("meta_delivered").replace(RTCA, MJAA);
    assert_eq!(service.meta("acme", &early).await["unknown_id"], 1);
    assert_eq!(pricing(&pool, ids[1]).await, (None, None));
    mark_sent(&pool, &[(ids[1], MJAA)]).await;
    eventually("the kept receipt applied", || async { row(&pool, ids[1]).await.status == "delivered" }).await;
    assert_eq!(pricing(&pool, ids[1]).await, marketing);
    assert_counters_match(&pool, uid).await;
    service.stop().await;
}

/// A Meta status body naming the recipient by BSUID only (no `recipient_id`).
fn bsuid_only(body: &str, phone: &str, bsuid: &str) -> String {
    let mut value: Value = serde_json::from_str(body).unwrap();
    for status in value["entry"][0]["changes"][0]["value"]["statuses"].as_array_mut().unwrap() {
        let status = status.as_object_mut().unwrap();
        assert_eq!(status.remove("recipient_id"), Some(json!(phone)));
        status.insert("recipient_user_id".into(), json!(bsuid));
    }
    value.to_string()
}

async fn contact_bsuid(pool: &PgPool, org: &str, phone: &str) -> Option<String> {
    let (bsuid,): (Option<String>,) =
        sqlx::query_as("SELECT bsuid FROM contacts WHERE organization = $1 AND phone = $2")
            .bind(org)
            .bind(phone)
            .fetch_one(pool)
            .await
            .unwrap();
    bsuid
}

#[tokio::test]
async fn a_status_naming_only_a_bsuid_applies_like_one_with_the_phone_and_records_the_bsuid() {
    let (pool, _) = common::fresh_db().await;
    // the same statuses to two campaigns: one with the phone, one with the BSUID only
    let (uid, with_phone) = campaign(&pool, "acme", &["+15550123456"]).await;
    let (other_uid, with_bsuid) = campaign(&pool, "beta", &["+15550123456"]).await;
    mark_sent(&pool, &[(with_phone[0], RTCA), (with_bsuid[0], RTCA)]).await;
    let service = Service::start(pool.clone(), sweeping()).await;
    for name in ["meta_delivered", "meta_read"] {
        assert_eq!(service.meta("acme", fixture(name)).await["applied"], 1, "{name}");
        let body = bsuid_only(fixture(name), "15550123456", BSUID);
        assert_eq!(service.meta("beta", &body).await["applied"], 1, "{name} by BSUID");
    }
    let (a, b) = (row(&pool, with_phone[0]).await, row(&pool, with_bsuid[0]).await);
    assert_eq!((a.status.as_str(), a.webhook_history()), (b.status.as_str(), b.webhook_history()));
    assert_eq!(pricing(&pool, with_bsuid[0]).await, pricing(&pool, with_phone[0]).await);
    assert_eq!(contact_bsuid(&pool, "beta", "+15550123456").await.as_deref(), Some(BSUID));
    assert_eq!(contact_bsuid(&pool, "acme", "+15550123456").await, None, "acme was never told one");

    // an `unknown` message (its id never recorded, no echo of our id) is found through
    // the contact that has the BSUID, on the message's channel
    let (next_uid, next) = campaign(&pool, "beta", &["+15550123456"]).await;
    messages::record_outcomes(&pool, &[(next[0], messages::Outcome::Unknown { reason: "timeout".into() })], "test-run")
        .await
        .unwrap();
    // (a receipt finds an `unknown` message by contact only within a day of its attempt)
    let now = Utc::now().timestamp().to_string();
    let sent = bsuid_only(
        &fixture("meta_sent").replace(RTCA, "wamid.unknown").replace("1750263773", &now),
        "15550123456",
        BSUID,
    )
    .replace("disparo:campaign=spring-sale:msg=42", "not ours");
    assert_eq!(meta_at(&service, "beta", "wa2", &sent).await["unknown_id"], 1, "not through another channel");
    assert_eq!(service.meta("beta", &sent).await["applied"], 1);
    let m = row(&pool, next[0]).await;
    assert_eq!((m.status.as_str(), m.provider_message_id.as_deref()), ("sent", Some("wamid.unknown")));
    // another BSUID finds nothing
    let (_, stranger) = campaign(&pool, "beta", &["+15550123457"]).await;
    messages::record_outcomes(
        &pool,
        &[(stranger[0], messages::Outcome::Unknown { reason: "timeout".into() })],
        "test-run",
    )
    .await
    .unwrap();
    let nobody = bsuid_only(
        &fixture("meta_sent").replace(RTCA, "wamid.nobody").replace("1750263773", &now),
        "15550123456",
        "BR.999",
    )
    .replace("disparo:campaign=spring-sale:msg=42", "not ours");
    assert_eq!(service.meta("beta", &nobody).await["unknown_id"], 1);
    assert_eq!(row(&pool, stranger[0]).await.status, "unknown");
    for uid in [uid, other_uid, next_uid] {
        assert_counters_match(&pool, uid).await;
    }
    service.stop().await;
}

#[tokio::test]
async fn a_stop_from_a_sender_named_by_bsuid_only_opts_the_contact_out() {
    let (pool, _) = common::fresh_db().await;
    let (_, ids) = campaign(&pool, "acme", &["+15550123456", "+15550123457"]).await;
    campaign(&pool, "beta", &["+15550123456"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    // a status tells the contact's BSUID (beta's contact with the same phone is not told)
    assert_eq!(service.meta("acme", &bsuid_only(fixture("meta_delivered"), "15550123456", BSUID)).await["applied"], 1);
    sqlx::query("UPDATE contacts SET bsuid = $1 WHERE organization = 'beta'")
        .bind("BR.other")
        .execute(&pool)
        .await
        .unwrap();

    let stop = |contacts: Value, message: Value| {
        json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "contacts": contacts,
            "messages": [message]}}]}]})
        .to_string()
    };
    // "parar" from BSUID only, in `contacts[].user_id`, not matching anyone: acknowledged
    let unknown = stop(
        json!([{"profile": {"name": "Sheena"}, "user_id": "BR.nobody"}]),
        json!({"id": "wamid.in1", "timestamp": "1750264100", "type": "text", "text": {"body": "parar"}}),
    );
    assert_eq!(service.meta("acme", &unknown).await["opted_out"], 0);
    // "STOP" from `from_user_id`, no phone anywhere
    let body = stop(
        json!([{"profile": {"name": "Sheena"}, "user_id": BSUID}]),
        json!({"from_user_id": BSUID, "id": "wamid.in2", "timestamp": "1750264100", "type": "text", "text": {"body": "STOP"}}),
    );
    assert!(!body.contains("15550123456"));
    assert_eq!(service.meta("acme", &body).await["opted_out"], 1);
    assert!(opted_out(&pool, "acme", "+15550123456").await);
    assert!(!opted_out(&pool, "acme", "+15550123457").await);
    assert!(!opted_out(&pool, "beta", "+15550123456").await, "only the organization the webhook belongs to");
    service.stop().await;
}

async fn requeue_state(pool: &PgPool, id: i64) -> (String, Option<String>, i16, Option<String>, chrono::DateTime<Utc>) {
    sqlx::query_as(
        "SELECT status::text, provider_message_id, marketing_requeues, last_error_code, next_attempt_at FROM campaign_messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A `failed` status with Meta's per-user marketing limit for a WAMID, echoing our id.
fn marketing_limit(pid: &str, id: i64) -> String {
    fixture("meta_failed").replace(NDGA, pid).replace("131026", "131049").replace(
        r#""recipient_id": "15550199999","#,
        &format!(r#""recipient_id": "15550199999", "biz_opaque_callback_data": "disparo:{id}","#),
    )
}

/// A status of a WAMID, echoing our id.
fn status_of(name: &str, pid: &str, id: i64) -> String {
    fixture(name).replace(RTCA, pid).replace("disparo:campaign=spring-sale:msg=42", &format!("disparo:{id}"))
}

#[tokio::test]
async fn a_131049_puts_the_message_back_24_48_96_hours_later_and_the_fourth_fails() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550199999", "+15550199998"]).await;
    let id = ids[0];
    mark_sent(&pool, &[(id, "wamid.try1")]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.sent, counters.sending, counters.succeeded_first_attempt), (1, 1, 1));

    for (attempt, hours) in [(1i16, 24), (2, 48), (3, 96)] {
        let pid = format!("wamid.try{attempt}");
        let before = Utc::now();
        assert_eq!(service.meta("acme", &marketing_limit(&pid, id)).await["applied"], 1, "attempt {attempt}");
        let after = Utc::now();
        let (status, provider_id, requeues, code, due) = requeue_state(&pool, id).await;
        assert_eq!(
            (status.as_str(), provider_id, requeues, code.as_deref()),
            ("pending", None, attempt, Some("131049"))
        );
        let delay = chrono::Duration::hours(hours);
        assert!(due >= before + delay - chrono::Duration::seconds(1) && due <= after + delay, "due {due}, {hours} h");
        let entry = row(&pool, id).await.history.last().cloned().unwrap();
        assert_eq!(
            (&entry["status"], &entry["code"], &entry["requeue"]),
            (&json!("pending"), &json!("131049"), &json!(attempt))
        );
        assert_eq!(entry["requeuedProviderId"], json!(pid));
        assert_counters_match(&pool, uid).await;
        let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
        assert_eq!((counters.pending, counters.sent, counters.failed), (1, 0, 0), "sent down, pending up");
        assert_eq!(counters.succeeded_first_attempt + counters.succeeded_after_retry, 0, "no longer a success");
        assert_eq!(counters.retries_scheduled, i64::from(attempt));

        // late receipts of the attempt it ended change nothing: the 131049 again, a stale `sent`
        let kept = row(&pool, id).await;
        assert_eq!(service.meta("acme", &marketing_limit(&pid, id)).await["stale"], 1);
        assert_eq!(service.meta("acme", &status_of("meta_sent", &pid, id)).await["stale"], 1);
        assert_eq!(row(&pool, id).await, kept);

        // time passes; the sender claims it again: the ended attempt's receipts do not reach the new one
        sqlx::query("UPDATE campaign_messages SET next_attempt_at = now() WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        let claimed = messages::claim_due(&pool, uid, 0, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|m| (m.id, m.attempts)).collect::<Vec<_>>(), vec![(id, i32::from(attempt) + 1)]);
        assert_eq!(service.meta("acme", &status_of("meta_delivered", &pid, id)).await["stale"], 1);
        assert_eq!(row(&pool, id).await.status, "sending");
        mark_sent(&pool, &[(id, &format!("wamid.try{}", attempt + 1))]).await;
        assert_counters_match(&pool, uid).await;
    }
    // the fourth 131049 fails it, as any permanent error
    assert_eq!(service.meta("acme", &marketing_limit("wamid.try4", id)).await["applied"], 1);
    let (status, provider_id, requeues, code, _) = requeue_state(&pool, id).await;
    assert_eq!(
        (status.as_str(), provider_id.as_deref(), requeues, code.as_deref()),
        ("failed", Some("wamid.try4"), 3, Some("131049"))
    );
    assert_counters_match(&pool, uid).await;
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!(
        (counters.failed, counters.succeeded_first_attempt, counters.succeeded_after_retry),
        (1, 0, 1),
        "counted once, as the retry that reached `sent` before Meta gave up"
    );
    let breakdown = campaigns::error_breakdown(&pool, uid, 10).await.unwrap();
    assert_eq!(breakdown, vec![("131049".to_owned(), 4)], "each attempt's 131049 counted once");

    // a message whose send ended `unknown` is put back too, found through our id
    messages::record_outcomes(&pool, &[(ids[1], messages::Outcome::Unknown { reason: "timeout".into() })], "test-run")
        .await
        .unwrap();
    assert_eq!(service.meta("acme", &marketing_limit("wamid.other", ids[1])).await["applied"], 1);
    let (status, provider_id, requeues, _, _) = requeue_state(&pool, ids[1]).await;
    assert_eq!((status.as_str(), provider_id, requeues), ("pending", None, 1));
    assert_counters_match(&pool, uid).await;
    service.stop().await;
}

/// Migration 0008 opens one way back, and only that one: a `sent` or `unknown` message
/// to `pending` with one more marketing requeue and without its provider id.
#[tokio::test]
async fn the_schema_allows_only_the_marketing_requeue_back_to_pending() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550123456", "+15550123457"]).await;
    mark_sent(&pool, &[(ids[0], RTCA), (ids[1], MJAA)]).await;
    sqlx::query("UPDATE campaign_messages SET status = 'delivered' WHERE id = $1")
        .bind(ids[1])
        .execute(&pool)
        .await
        .unwrap();
    let requeue = "status = 'pending', marketing_requeues = marketing_requeues + 1, provider_message_id = NULL";
    for (id, set) in [
        (ids[0], "status = 'pending'"),
        (ids[0], "status = 'pending', provider_message_id = NULL"),
        (ids[0], "status = 'pending', marketing_requeues = marketing_requeues + 1"),
        (ids[0], "status = 'pending', marketing_requeues = marketing_requeues + 2, provider_message_id = NULL"),
        (ids[0], "status = 'sending', marketing_requeues = marketing_requeues + 1, provider_message_id = NULL"),
        (ids[1], requeue),
    ] {
        let refused = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE campaign_messages SET {set} WHERE id = $1")))
            .bind(id)
            .execute(&pool)
            .await
            .unwrap_err();
        let code = refused.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("23514"), "{set}: {refused}");
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE campaign_messages SET {requeue} WHERE id = $1")))
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(row(&pool, ids[0]).await.status, "pending");
    assert_counters_match(&pool, uid).await;
}

/// Meta echoes the campaign with our id (`disparo:<id>:<campaign uid>`, docs/providers.md
/// A1): the receipt is looked up in that campaign's partition, however long ago the
/// campaign last changed. One naming no campaign (the older `disparo:<id>`) is looked up
/// in the channel's campaigns still taking receipts only (docs/architecture.md,
/// "Partitions"): past that, it is kept, not applied.
#[tokio::test]
async fn a_meta_receipt_naming_its_campaign_finds_it_after_a_day() {
    let (pool, _) = common::fresh_db().await;
    let (uid, ids) = campaign(&pool, "acme", &["+15550199999"]).await;
    mark_sent(&pool, &[(ids[0], RTCA)]).await;
    let service = Service::start(pool.clone(), ServiceConfig::default()).await;
    // a `read` echoing `callback` for message 0
    let read = |callback: &str| {
        fixture("meta_delivered")
            .replace(r#""status": "delivered""#, r#""status": "read""#)
            .replace("disparo:campaign=spring-sale:msg=42", callback)
    };
    // within the day, the older format finds it
    assert_eq!(service.meta("acme", &status_of("meta_delivered", RTCA, ids[0])).await["applied"], 1);
    // the campaign's last change a day ago: nothing left to send or resolve
    sqlx::query("UPDATE campaign_counters SET updated_at = now() - interval '25 hours' WHERE campaign_uid = $1")
        .bind(uid)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(service.meta("acme", &read(&format!("disparo:{}", ids[0]))).await["unknown_id"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "delivered");
    assert_eq!(service.meta("acme", &read(&format!("disparo:{}:{uid}", ids[0]))).await["applied"], 1);
    assert_eq!(row(&pool, ids[0]).await.status, "read");
    assert_eq!(service.meta("acme", &read(&format!("disparo:{}:{uid}", ids[0]))).await["duplicate"], 1);
    // naming another campaign, it is looked up there only
    let elsewhere = read(&format!("disparo:{}:{}", ids[0], Uuid::new_v4()));
    assert_eq!(service.meta("acme", &elsewhere).await["unknown_id"], 1);
    assert_counters_match(&pool, uid).await;
    service.stop().await;
}
