//! The provider clients against an in-process `disparo sandbox`, over real HTTP on
//! loopback: the same client code that talks to Meta and Evolution must read the
//! sandbox's answers and webhooks the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use disparo::providers::evolution::{ConnectionState, EvolutionClient};
use disparo::providers::meta::MetaClient;
use disparo::providers::signature::verify_meta_signature;
use disparo::providers::{
    Content, ErrorClass, OutboundMessage, ProviderClient, ProviderError, Secret, SendOutcome, Timeouts, http_client,
};
use disparo::sandbox::{self, Faults, SandboxConfig, SandboxHandle, TemplateSpec, WebhookBehaviour};
use serde_json::Value;
use tokio::sync::mpsc;

const META_TOKEN: &str = "test-meta-token";
const APP_SECRET: &str = "test_app_secret";
const API_KEY: &str = "test-api-key";
const INSTANCE: &str = "loja";
const HOOK_HEADER: &str = "x-disparo-token";
const HOOK_SECRET: &str = "test-hook-secret";

fn config() -> SandboxConfig {
    let mut config = SandboxConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..SandboxConfig::default() };
    config.meta.access_token = Secret::new(META_TOKEN);
    config.meta.app_secret = Secret::new(APP_SECRET);
    config.evolution.api_key = Secret::new(API_KEY);
    config.evolution.instances = vec![sandbox::InstanceSpec { name: INSTANCE.into(), state: ConnectionState::Open }];
    config.evolution.webhook_header = HOOK_HEADER.into();
    config.evolution.webhook_secret = Secret::new(HOOK_SECRET);
    config.latency = sandbox::Latency { min_ms: 0, max_ms: 5 };
    config
}

/// Every status, in order, quickly: what the webhook tests want to observe.
fn orderly_webhooks() -> WebhookBehaviour {
    WebhookBehaviour {
        failed: 0.0,
        delivered: 1.0,
        read: 1.0,
        duplicate: 0.0,
        out_of_order: 0.0,
        batch: 0.0,
        delay_min_ms: 5,
        delay_max_ms: 20,
        retry_base_ms: 20,
        ..WebhookBehaviour::default()
    }
}

async fn start(config: SandboxConfig) -> SandboxHandle {
    disparo::telemetry::install_crypto_provider();
    sandbox::start(config).await.expect("sandbox starts")
}

fn http(request_timeout: Duration) -> reqwest::Client {
    disparo::telemetry::install_crypto_provider();
    http_client(Timeouts { connect: Duration::from_millis(500), request: request_timeout }).expect("http client")
}

fn meta(base_url: String, token: &str, timeout: Duration) -> MetaClient {
    MetaClient::new(http(timeout), base_url, "v23.0".into(), "106540352242922".into(), Secret::new(token))
}

fn evolution(base_url: String, instance: &str, key: &str) -> EvolutionClient {
    EvolutionClient::new(http(Duration::from_secs(5)), base_url, instance.into(), Secret::new(key))
}

fn template(to: &str, callback: &str) -> OutboundMessage {
    OutboundMessage {
        to: to.into(),
        content: Content::Template {
            name: "order_update_v1".into(),
            language: "en_US".into(),
            body_parameters: vec!["Alex".into(), "A12345".into()],
        },
        callback_data: callback.into(),
    }
}

fn text(to: &str) -> OutboundMessage {
    OutboundMessage {
        to: to.into(),
        content: Content::Text("Olá! Sua promoção chegou.".into()),
        callback_data: "m-1".into(),
    }
}

fn rejected(outcome: SendOutcome) -> ProviderError {
    match outcome {
        SendOutcome::Rejected(error) => error,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn accepted(outcome: SendOutcome) -> String {
    match outcome {
        SendOutcome::Accepted { provider_message_id } => provider_message_id,
        other => panic!("expected acceptance, got {other:?}"),
    }
}

/// Waits (up to 5 s) for a condition that another task makes true.
async fn eventually(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A webhook receiver: every POST's headers and raw body, in arrival order.
struct Receiver {
    url: String,
    posts: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>,
}

impl Receiver {
    async fn start() -> Self {
        let (tx, posts) = mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(|State(tx): State<mpsc::UnboundedSender<(HeaderMap, Bytes)>>, headers: HeaderMap, body: Bytes| async move {
                let _ = tx.send((headers, body));
                "ok"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app.with_state(tx)).await });
        Receiver { url, posts }
    }

    /// The next POST, or a failure after a few seconds.
    async fn next(&mut self) -> (HeaderMap, Bytes) {
        tokio::time::timeout(Duration::from_secs(5), self.posts.recv())
            .await
            .expect("a webhook within 5 s")
            .expect("receiver open")
    }
}

#[tokio::test]
async fn meta_accepts_with_wamids_and_the_ledger_counts_per_recipient() {
    let sandbox = start(config()).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    let mut ids = Vec::new();
    for (to, id) in [("+15551234567", "m-1"), ("+15551234568", "m-2"), ("+15551234567", "m-3")] {
        ids.push(accepted(client.send(&template(to, id)).await));
    }
    assert!(ids.iter().all(|id| id.starts_with("wamid.")));
    assert_ne!(ids[0], ids[2]);
    accepted(client.send(&text("+15551234569")).await);

    let ledger = sandbox.ledger();
    assert_eq!(ledger.accepted_count(), 4);
    assert_eq!(ledger.per_recipient().get("+15551234567"), Some(&2));
    assert_eq!(ledger.duplicates(), vec!["+15551234567".to_owned()]);
    assert_eq!(ledger.max_in_any_minute_window(), 4);
    assert_eq!(ledger.entries()[1].callback_data.as_deref(), Some("m-2"));

    let summary: Value =
        reqwest::get(format!("{}/_sandbox/ledger", sandbox.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(summary["total_accepted"], 4);
    assert_eq!(summary["duplicates"][0], "+15551234567");
    assert_eq!(summary["accepted"].as_array().map(Vec::len), Some(4));
    let reset = reqwest::Client::new().post(format!("{}/_sandbox/reset", sandbox.base_url())).send().await.unwrap();
    assert_eq!(reset.status(), 204);
    assert_eq!(ledger.accepted_count(), 0);
    let health = reqwest::get(format!("{}/healthz", sandbox.base_url())).await.unwrap();
    assert_eq!(health.status(), 200);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wrong_meta_token_stops_the_channel() {
    let sandbox = start(config()).await;
    let error = rejected(
        meta(sandbox.base_url(), "not-the-token", Duration::from_secs(5)).send(&template("+15551234567", "m")).await,
    );
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopChannel, "190"));
    assert_eq!(sandbox.ledger().accepted_count(), 0);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn injected_meta_errors_arrive_classified() {
    let sandbox = start(config()).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    let cases = [
        (Faults { codes: BTreeMap::from([(131000, 1.0)]), ..Faults::default() }, ErrorClass::Retryable, "131000"),
        (Faults { retryable: 1.0, ..Faults::default() }, ErrorClass::Retryable, "131000"),
        (Faults { rate_limit: 1.0, ..Faults::default() }, ErrorClass::RateLimitedChannel, "130429"),
        (Faults { pair_rate: 1.0, ..Faults::default() }, ErrorClass::RateLimitedRecipient, "131056"),
        (Faults { permanent: 1.0, ..Faults::default() }, ErrorClass::Permanent, "131026"),
        (Faults { codes: BTreeMap::from([(131057, 1.0)]), ..Faults::default() }, ErrorClass::Retryable, "131057"),
        (Faults { codes: BTreeMap::from([(131031, 1.0)]), ..Faults::default() }, ErrorClass::StopChannel, "131031"),
    ];
    for (faults, class, code) in cases {
        sandbox.set_faults(faults).unwrap();
        let error = rejected(client.send(&template("+15551234567", "m")).await);
        assert_eq!((error.class, error.code.as_str()), (class, code));
        if code == "131057" {
            assert_eq!(error.retry_after, Some(Duration::from_secs(60)), "131057 hints a minute");
        }
    }
    assert_eq!(sandbox.ledger().accepted_count(), 0);

    // Faults can also be changed over HTTP, as a rehearsal script would.
    let put = reqwest::Client::new()
        .put(format!("{}/_sandbox/faults", sandbox.base_url()))
        .json(&serde_json::json!({ "retryable": 0.0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    accepted(client.send(&template("+15551234567", "m")).await);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_per_minute_cap_answers_130429() {
    let mut config = config();
    config.faults.per_minute_cap = Some(2);
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    accepted(client.send(&template("+15551234567", "a")).await);
    accepted(client.send(&template("+15551234568", "b")).await);
    let error = rejected(client.send(&template("+15551234569", "c")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::RateLimitedChannel, "130429"));
    assert_eq!(sandbox.ledger().max_in_any_minute_window(), 2);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn meta_templates_are_checked_when_configured() {
    let mut config = config();
    config.meta.templates = vec![TemplateSpec {
        name: "order_update_v1".into(),
        languages: vec!["en_US".into()],
        body_parameters: Some(2),
    }];
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    accepted(client.send(&template("+15551234567", "m")).await);

    let mut unknown = template("+15551234567", "m");
    unknown.content = Content::Template { name: "nope".into(), language: "en_US".into(), body_parameters: vec![] };
    let error = rejected(client.send(&unknown).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Permanent, "132001"));

    let mut short = template("+15551234567", "m");
    short.content = Content::Template {
        name: "order_update_v1".into(),
        language: "en_US".into(),
        body_parameters: vec!["Alex".into()],
    };
    let error = rejected(client.send(&short).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Permanent, "132000"));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lost_answer_after_acceptance_is_unknown_and_still_in_the_ledger() {
    let mut config = config();
    config.faults.timeout = 1.0;
    config.faults.timeout_delay_ms = 10_000;
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(1));
    let outcome = client.send(&template("+15551234567", "m")).await;
    assert!(matches!(outcome, SendOutcome::Unknown { .. }), "{outcome:?}");
    assert_eq!(sandbox.ledger().accepted_count(), 1, "the provider did send it");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_gateway_504_after_acceptance_is_unknown_for_both_providers() {
    let mut config = config();
    config.faults.gateway_timeout_recipients = vec!["+15551234567".into(), "5511999999999".into()];
    let sandbox = start(config).await;

    let outcome =
        meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15551234567", "m")).await;
    assert!(matches!(outcome, SendOutcome::Unknown { ref reason } if reason.contains("504")), "{outcome:?}");
    let outcome = evolution(sandbox.base_url(), INSTANCE, API_KEY).send(&text("+5511999999999")).await;
    assert!(matches!(outcome, SendOutcome::Unknown { ref reason } if reason.contains("504")), "{outcome:?}");
    assert_eq!(sandbox.ledger().accepted_count(), 2, "the provider did send both");

    // Others are answered normally; the probability form reaches everyone.
    accepted(meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15551234568", "m")).await);
    sandbox.set_faults(Faults { gateway_timeout: 1.0, ..Faults::default() }).unwrap();
    let outcome =
        meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15551234569", "m")).await;
    assert!(matches!(outcome, SendOutcome::Unknown { .. }), "{outcome:?}");
    assert_eq!(sandbox.ledger().accepted_count(), 4);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_template_on_an_evolution_channel_stops_the_campaign_without_a_request() {
    let sandbox = start(config()).await;
    let error = rejected(evolution(sandbox.base_url(), INSTANCE, API_KEY).send(&template("+5511999999999", "m")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopCampaign, "evolution_template_unsupported"));
    assert_eq!(sandbox.ledger().accepted_count(), 0);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn paused_and_disabled_meta_templates_stop_the_campaign() {
    let sandbox = start(config()).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    for code in [132015, 132016] {
        sandbox.set_faults(Faults { codes: BTreeMap::from([(code, 1.0)]), ..Faults::default() }).unwrap();
        let error = rejected(client.send(&template("+15551234567", "m")).await);
        assert_eq!((error.class, error.code), (ErrorClass::StopCampaign, code.to_string()));
    }
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_network_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = rejected(
        meta(format!("http://{addr}"), META_TOKEN, Duration::from_secs(2)).send(&template("+15551234567", "m")).await,
    );
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Retryable, "network"));
    let error = rejected(evolution(format!("http://{addr}"), INSTANCE, API_KEY).send(&text("+5511999999999")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Retryable, "network"));
}

#[tokio::test]
async fn evolution_accepts_and_refuses_like_evolution() {
    let mut config = config();
    config.not_on_whatsapp = vec!["+5511900000000".into()];
    let sandbox = start(config).await;
    let client = evolution(sandbox.base_url(), INSTANCE, API_KEY);

    let id = accepted(client.send(&text("+5511999999999")).await);
    assert!(id.starts_with("3EB0"), "{id}");
    assert_eq!(sandbox.ledger().per_recipient().get("+5511999999999"), Some(&1));

    let error = rejected(client.send(&text("+5511900000000")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Permanent, "evolution_not_on_whatsapp"));

    let error = rejected(evolution(sandbox.base_url(), INSTANCE, "wrong").send(&text("+5511999999999")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopChannel, "evolution_unauthorized"));

    let error = rejected(evolution(sandbox.base_url(), "other", API_KEY).send(&text("+5511999999999")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopChannel, "evolution_instance_not_found"));

    sandbox.set_faults(Faults { retryable: 1.0, ..Faults::default() }).unwrap();
    let error = rejected(client.send(&text("+5511999999999")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Retryable, "http_500"));

    assert_eq!(sandbox.ledger().accepted_count(), 1);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_disconnected_evolution_instance_pauses_the_channel() {
    let sandbox = start(config()).await;
    let client = evolution(sandbox.base_url(), INSTANCE, API_KEY);
    assert_eq!(client.connection_state().await.unwrap(), ConnectionState::Open);

    sandbox.set_connection_state(INSTANCE, ConnectionState::Close).unwrap();
    assert_eq!(client.connection_state().await.unwrap(), ConnectionState::Close);
    let error = rejected(client.send(&text("+5511999999999")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::RateLimitedChannel, "evolution_connection_closed"));

    let put = reqwest::Client::new()
        .put(format!("{}/_sandbox/evolution/{INSTANCE}/state", sandbox.base_url()))
        .json(&serde_json::json!({ "state": "connecting" }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let error = rejected(client.send(&text("+5511999999999")).await);
    assert_eq!(error.code, "evolution_connection_closed");

    let wrong_key = evolution(sandbox.base_url(), INSTANCE, "wrong");
    assert!(matches!(wrong_key.connection_state().await, Err(disparo::providers::Error::Rejected { .. })));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn meta_webhooks_are_signed_and_follow_the_message() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    let wamid = accepted(client.send(&template("+15551234567", "msg-42")).await);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (headers, body) = receiver.next().await;
        let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok()).expect("signed");
        assert!(
            verify_meta_signature(APP_SECRET.as_bytes(), &body, signature),
            "signature verifies with the app secret"
        );
        assert!(!verify_meta_signature(b"another secret", &body, signature));
        let payload: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(payload["object"], "whatsapp_business_account");
        let value = &payload["entry"][0]["changes"][0]["value"];
        assert_eq!(value["metadata"]["phone_number_id"], "106540352242922");
        let status = &value["statuses"][0];
        assert_eq!(status["id"], wamid.as_str());
        assert_eq!(status["recipient_id"], "15551234567");
        assert_eq!(status["biz_opaque_callback_data"], "msg-42");
        statuses.push(status["status"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(statuses, ["sent", "delivered", "read"]);
    eventually(|| sandbox.webhook_counts().posted == 3).await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn meta_numbers_not_on_whatsapp_are_accepted_then_fail_by_webhook() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    config.not_on_whatsapp = vec!["15550199999".into()];
    let sandbox = start(config).await;
    let wamid = accepted(
        meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15550199999", "m-9")).await,
    );
    let (_, body) = receiver.next().await;
    let payload: Value = serde_json::from_slice(&body).unwrap();
    let status = &payload["entry"][0]["changes"][0]["value"]["statuses"][0];
    assert_eq!(status["id"], wamid.as_str());
    assert_eq!(status["status"], "failed");
    assert_eq!(status["errors"][0]["code"], 131026);
    assert_eq!(disparo::providers::classify_meta_webhook(131026), ErrorClass::Permanent);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn evolution_webhooks_carry_the_shared_secret_header() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.evolution.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    let sandbox = start(config).await;
    let key_id = accepted(evolution(sandbox.base_url(), INSTANCE, API_KEY).send(&text("+5511999999999")).await);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (headers, body) = receiver.next().await;
        assert_eq!(headers.get(HOOK_HEADER).and_then(|v| v.to_str().ok()), Some(HOOK_SECRET));
        let payload: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(payload["event"], "messages.update");
        assert_eq!(payload["instance"], INSTANCE);
        assert_eq!(payload["data"]["keyId"], key_id.as_str());
        assert_eq!(payload["data"]["remoteJid"], "5511999999999@s.whatsapp.net");
        assert_eq!(payload["data"]["fromMe"], true);
        statuses.push(payload["data"]["status"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(statuses, ["SERVER_ACK", "DELIVERY_ACK", "READ"]);
    eventually(|| sandbox.webhook_counts().posted == 3).await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn failing_receivers_get_retries() {
    // A receiver that refuses the first two POSTs with 503, then accepts.
    let (tx, mut posts) = mpsc::unbounded_channel::<()>();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = Router::new().route(
        "/hook",
        post(move |State(hits): State<std::sync::Arc<std::sync::atomic::AtomicU32>>| {
            let tx = tx.clone();
            async move {
                let n = hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send(());
                if n < 2 { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app.with_state(hits)).await });

    let mut config = config();
    config.meta.webhook_url = Some(url);
    config.webhooks = WebhookBehaviour { delivered: 0.0, ..orderly_webhooks() };
    let sandbox = start(config).await;
    accepted(meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15551234567", "m")).await);
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), posts.recv()).await.expect("a retry within 5 s");
    }
    eventually(|| sandbox.webhook_counts().posted == 1).await;
    assert_eq!(sandbox.webhook_counts().given_up, 0);
    sandbox.shutdown().await.unwrap();
}

#[test]
fn fixtures_are_the_documented_payloads() {
    let meta = [
        include_str!("fixtures/meta/sent.json"),
        include_str!("fixtures/meta/delivered.json"),
        include_str!("fixtures/meta/read.json"),
        include_str!("fixtures/meta/failed_131026.json"),
        include_str!("fixtures/meta/batch_out_of_order.json"),
        include_str!("fixtures/meta/inbound_stop.json"),
    ];
    for body in meta {
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["object"], "whatsapp_business_account");
    }
    let failed: Value = serde_json::from_str(meta[3]).unwrap();
    assert_eq!(failed["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"][0]["code"], 131026);

    let evolution = [
        (include_str!("fixtures/evolution/update_sent.json"), "SERVER_ACK"),
        (include_str!("fixtures/evolution/update_delivered.json"), "DELIVERY_ACK"),
        (include_str!("fixtures/evolution/update_read.json"), "READ"),
        (include_str!("fixtures/evolution/update_error.json"), "ERROR"),
    ];
    for (body, status) in evolution {
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["event"], "messages.update");
        assert_eq!(value["data"]["status"], status);
    }
}
