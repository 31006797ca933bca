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
use disparo::sandbox::{
    self, Faults, SandboxConfig, SandboxHandle, TemplateCategory, TemplateSpec, TemplateStatus, Tier, WebhookBehaviour,
    bsuid_for,
};
use serde_json::{Value, json};
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
        status: TemplateStatus::Approved,
        category: TemplateCategory::Marketing,
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

/// A control call: `method` `path` with a JSON body; the status and the JSON answer
/// (`null` when there is none).
async fn control(sandbox: &SandboxHandle, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", sandbox.base_url()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn summary(sandbox: &SandboxHandle) -> Value {
    control(sandbox, reqwest::Method::GET, "/_sandbox/ledger", None).await.1
}

/// The next webhook, checked to be signed with the app secret, as JSON.
async fn next_signed(receiver: &mut Receiver) -> Value {
    let (headers, body) = receiver.next().await;
    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok()).expect("signed");
    assert!(verify_meta_signature(APP_SECRET.as_bytes(), &body, signature), "signed with the app secret");
    serde_json::from_slice(&body).unwrap()
}

/// `changes[0]` of an account webhook, after checking the A6 envelope.
fn account_change(payload: &Value) -> &Value {
    assert_eq!(payload["object"], "whatsapp_business_account");
    assert_eq!(payload["entry"][0]["id"], "102290129340398", "the WABA id");
    assert!(payload["entry"][0]["time"].is_i64());
    &payload["entry"][0]["changes"][0]
}

fn template_named(to: &str, name: &str, parameters: usize) -> OutboundMessage {
    OutboundMessage {
        to: to.into(),
        content: Content::Template {
            name: name.into(),
            language: "en_US".into(),
            body_parameters: (0..parameters).map(|i| format!("p{i}")).collect(),
        },
        callback_data: format!("{name}-{to}"),
    }
}

fn spec(name: &str, category: TemplateCategory) -> TemplateSpec {
    TemplateSpec {
        name: name.into(),
        languages: vec!["en_US".into()],
        body_parameters: None,
        status: TemplateStatus::Approved,
        category,
    }
}

#[tokio::test]
async fn the_tier_refuses_a_new_recipient_beyond_250_until_the_clock_moves_a_day() {
    let mut config = config();
    config.meta.tier = Tier::Tier250;
    config.latency = sandbox::Latency { min_ms: 0, max_ms: 0 };
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    for i in 0..250 {
        accepted(client.send(&template(&format!("+1555100{i:04}"), "m")).await);
    }
    let error = rejected(client.send(&template("+15551009999", "m")).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::RateLimitedChannel, "131048"));
    accepted(client.send(&template("+15551000007", "again")).await);
    accepted(client.send(&text("+15551009999")).await);

    let ledger = summary(&sandbox).await;
    assert_eq!(ledger["unique_recipients_24h"], 250);
    assert_eq!(ledger["max_unique_recipients_in_any_24h"], 250);
    assert_eq!(ledger["over_tier_refusals"], 1);
    assert_eq!(ledger["total_accepted"], 252);

    let (_, before) = control(&sandbox, reqwest::Method::GET, "/_sandbox/clock", None).await;
    let (status, after) =
        control(&sandbox, reqwest::Method::POST, "/_sandbox/clock", Some(json!({ "advance_seconds": 86_400 }))).await;
    assert_eq!(status, 200);
    let parse = |v: &Value| chrono::DateTime::parse_from_rfc3339(v["now"].as_str().unwrap()).unwrap();
    assert!(parse(&after) - parse(&before) >= chrono::TimeDelta::hours(24));
    assert_eq!(summary(&sandbox).await["unique_recipients_24h"], 0, "a day later the window is empty");
    accepted(client.send(&template("+15551009999", "m")).await);
    let ledger = summary(&sandbox).await;
    assert_eq!(ledger["unique_recipients_24h"], 1);
    assert_eq!(ledger["max_unique_recipients_in_any_24h"], 250, "never more than the tier");
    let (status, _) =
        control(&sandbox, reqwest::Method::POST, "/_sandbox/clock", Some(json!({ "advance_seconds": -1 }))).await;
    assert_eq!(status, 400, "the clock does not go back");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_marketing_limited_recipient_is_accepted_then_fails_with_131049() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = WebhookBehaviour { read: 0.0, delivered: 0.0, ..orderly_webhooks() };
    config.meta.templates =
        vec![spec("promo", TemplateCategory::Marketing), spec("receipt", TemplateCategory::Utility)];
    config.meta.marketing_limited_recipients = vec!["5511900000001".into()];
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));

    let wamid = accepted(client.send(&template_named("+5511900000001", "promo", 1)).await);
    let payload = next_signed(&mut receiver).await;
    let status = &payload["entry"][0]["changes"][0]["value"]["statuses"][0];
    assert_eq!(status["id"], wamid.as_str());
    assert_eq!(status["status"], "failed");
    assert_eq!(status["errors"][0]["code"], 131049);
    assert_eq!(
        status["errors"][0]["title"],
        "This message was not delivered to maintain healthy ecosystem engagement."
    );
    assert_eq!(disparo::providers::classify_meta_webhook(131049), ErrorClass::MarketingLimited);

    // A utility template to the same recipient is not a marketing message.
    accepted(client.send(&template_named("+5511900000001", "receipt", 1)).await);
    assert_eq!(next_signed(&mut receiver).await["entry"][0]["changes"][0]["value"]["statuses"][0]["status"], "sent");

    // The list is replaced at run time.
    let (status, _) =
        control(&sandbox, reqwest::Method::PUT, "/_sandbox/meta/marketing-limited", Some(json!(["+5511900000002"])))
            .await;
    assert_eq!(status, 204);
    accepted(client.send(&template_named("+5511900000001", "promo", 1)).await);
    assert_eq!(next_signed(&mut receiver).await["entry"][0]["changes"][0]["value"]["statuses"][0]["status"], "sent");
    accepted(client.send(&template_named("5511900000002", "promo", 1)).await);
    let failed = next_signed(&mut receiver).await;
    assert_eq!(failed["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"][0]["code"], 131049);

    let ledger = summary(&sandbox).await;
    assert_eq!(ledger["marketing_limited"], 2);
    assert_eq!(ledger["total_accepted"], 4, "withheld messages were accepted");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_paused_template_fails_132015_and_its_status_update_is_signed() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    config.meta.templates = vec![spec("welcome", TemplateCategory::Marketing)];
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    let path = "/_sandbox/meta/templates/welcome/en_US";

    let (status, answer) =
        control(&sandbox, reqwest::Method::PUT, path, Some(json!({ "status": "PAUSED", "reason": "LOW_QUALITY" })))
            .await;
    assert_eq!(status, 200);
    assert_eq!(answer["webhooks"], json!([{ "field": "message_template_status_update", "delivered": true }]));
    assert_eq!(answer["template"]["status"], "PAUSED");
    let payload = next_signed(&mut receiver).await;
    let change = account_change(&payload);
    assert_eq!(change["field"], "message_template_status_update");
    let value = &change["value"];
    assert_eq!(value["event"], "PAUSED");
    assert_eq!(value["message_template_name"], "welcome");
    assert_eq!(value["message_template_language"], "en_US");
    assert_eq!(value["reason"], "LOW_QUALITY");
    assert_eq!(value["message_template_category"], "MARKETING");
    let template_id = value["message_template_id"].as_u64().expect("a numeric template id");

    let error = rejected(client.send(&template_named("+15551234567", "welcome", 0)).await);
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopCampaign, "132015"));
    for (state, code) in [("DISABLED", "132016"), ("REJECTED", "132001")] {
        control(&sandbox, reqwest::Method::PUT, path, Some(json!({ "status": state }))).await;
        let update = next_signed(&mut receiver).await;
        assert_eq!(account_change(&update)["value"]["event"], state);
        assert_eq!(account_change(&update)["value"]["message_template_id"].as_u64(), Some(template_id), "stable id");
        let error = rejected(client.send(&template_named("+15551234567", "welcome", 0)).await);
        assert_eq!(error.code, code);
    }
    control(&sandbox, reqwest::Method::PUT, path, Some(json!({ "status": "APPROVED" }))).await;
    assert_eq!(account_change(&next_signed(&mut receiver).await)["value"]["reason"], "NONE");
    accepted(client.send(&template_named("+15551234567", "welcome", 0)).await);
    assert_eq!(sandbox.ledger().accepted_count(), 1, "refused sends are not in the ledger");
    for _ in 0..3 {
        next_signed(&mut receiver).await; // the accepted message's statuses
    }

    let (status, _) =
        control(&sandbox, reqwest::Method::POST, &format!("{path}/quality"), Some(json!({ "score": "RED" }))).await;
    assert_eq!(status, 200);
    let quality = next_signed(&mut receiver).await;
    let change = account_change(&quality);
    assert_eq!(change["field"], "message_template_quality_update");
    assert_eq!(change["value"]["previous_quality_score"], "UNKNOWN");
    assert_eq!(change["value"]["new_quality_score"], "RED");
    assert_eq!(change["value"]["message_template_id"].as_u64(), Some(template_id));

    let (status, _) = control(
        &sandbox,
        reqwest::Method::PUT,
        "/_sandbox/meta/templates/nope/en_US",
        Some(json!({ "status": "PAUSED" })),
    )
    .await;
    assert_eq!(status, 404, "not a configured template");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_graph_read_answers_the_requested_fields() {
    let mut config = config();
    config.meta.phone_number_ids = vec!["106540352242922".into()];
    config.meta.tier = Tier::Tier250;
    let sandbox = start(config).await;
    let read = |token: &str, id: &str, fields: &str| {
        let url = format!("{}/v23.0/{id}?fields={fields}", sandbox.base_url());
        let request = reqwest::Client::new().get(url).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let fields = "whatsapp_business_manager_messaging_limit,quality_rating,throughput";
    let (status, body) = read(META_TOKEN, "106540352242922", fields).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "id": "106540352242922",
            "whatsapp_business_manager_messaging_limit": "TIER_250",
            "quality_rating": "GREEN",
            "throughput": { "level": "STANDARD" },
        })
    );
    let (_, body) = read(META_TOKEN, "106540352242922", "display_phone_number").await;
    assert_eq!(body, json!({ "id": "106540352242922", "display_phone_number": "+1 555-078-3881" }));

    let (status, body) = read("wrong", "106540352242922", fields).await;
    assert_eq!((status, body["error"]["code"].clone()), (401, json!(190)));
    let (status, body) = read(META_TOKEN, "999", fields).await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(100)));
    let (status, body) = read(META_TOKEN, "106540352242922", "quality_rating,nope").await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(100)));

    let (status, _) = control(
        &sandbox,
        reqwest::Method::PUT,
        "/_sandbox/meta/account",
        Some(json!({ "tier": "TIER_2K", "throughput_level": "HIGH" })),
    )
    .await;
    assert_eq!(status, 200);
    control(&sandbox, reqwest::Method::POST, "/_sandbox/meta/quality", Some(json!({ "event": "FLAGGED" }))).await;
    let (_, body) = read(META_TOKEN, "106540352242922", fields).await;
    assert_eq!(body["whatsapp_business_manager_messaging_limit"], "TIER_2K");
    assert_eq!(body["quality_rating"], "RED");
    assert_eq!(body["throughput"]["level"], "HIGH");

    // The send route next to it is unchanged.
    accepted(meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+15551234567", "m")).await);
    let (status, _) =
        control(&sandbox, reqwest::Method::PUT, "/_sandbox/meta/account", Some(json!({ "tier": "TIER_3" }))).await;
    assert_eq!(status, 400);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn statuses_carry_pricing_and_the_recipient_user_id() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    config.meta.templates = vec![spec("code", TemplateCategory::Authentication)];
    let sandbox = start(config).await;
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    let template_id = accepted(client.send(&template_named("+5511999990001", "code", 0)).await);
    let text_id = accepted(client.send(&text("+5511999990002")).await);

    let mut seen = 0;
    while seen < 6 {
        let payload = next_signed(&mut receiver).await;
        for status in payload["entry"][0]["changes"][0]["value"]["statuses"].as_array().unwrap() {
            seen += 1;
            let (recipient, pricing) = if status["id"] == template_id.as_str() {
                (
                    "5511999990001",
                    json!({ "billable": true, "pricing_model": "PMP", "type": "regular", "category": "authentication" }),
                )
            } else {
                assert_eq!(status["id"], text_id.as_str());
                (
                    "5511999990002",
                    json!({ "billable": false, "pricing_model": "PMP", "type": "free_customer_service", "category": "service" }),
                )
            };
            assert_eq!(status["pricing"], pricing, "{status}");
            assert_eq!(status["recipient_id"], recipient);
            assert_eq!(status["recipient_user_id"], bsuid_for(recipient));
            assert!(status["recipient_user_id"].as_str().unwrap().starts_with("BR."));
        }
    }
    let ledger = summary(&sandbox).await;
    assert_eq!(
        ledger["billable_delivered"],
        json!([{ "recipient": "+5511999990001", "category": "authentication", "message_id": template_id }])
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn bsuid_only_recipients_get_no_recipient_id() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = orderly_webhooks();
    config.meta.bsuid_only_recipients = vec!["+5511999990003".into()];
    let sandbox = start(config).await;
    accepted(meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5)).send(&template("+5511999990003", "m")).await);
    for _ in 0..3 {
        let payload = next_signed(&mut receiver).await;
        let status = &payload["entry"][0]["changes"][0]["value"]["statuses"][0];
        assert!(status.get("recipient_id").is_none(), "{status}");
        assert_eq!(status["recipient_user_id"], bsuid_for("5511999990003"));
    }
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn account_changes_post_signed_account_webhooks() {
    let mut receiver = Receiver::start().await;
    let mut config = config();
    config.meta.webhook_url = Some(receiver.url.clone());
    config.webhooks = WebhookBehaviour { delivered: 0.0, ..orderly_webhooks() };
    config.meta.tier = Tier::Tier10K;
    let sandbox = start(config).await;

    let (status, answer) =
        control(&sandbox, reqwest::Method::PUT, "/_sandbox/meta/account", Some(json!({ "tier": "TIER_250" }))).await;
    assert_eq!(status, 200);
    assert_eq!(answer["account"]["tier"], "TIER_250");
    assert_eq!(answer["webhooks"].as_array().map(Vec::len), Some(2));
    let capability = next_signed(&mut receiver).await;
    assert_eq!(
        account_change(&capability),
        &json!({ "field": "business_capability_update", "value": { "max_daily_conversations_per_business": 250 } })
    );
    let quality = next_signed(&mut receiver).await;
    let change = account_change(&quality);
    assert_eq!(change["field"], "phone_number_quality_update");
    assert_eq!(
        change["value"],
        json!({
            "display_phone_number": "15550783881",
            "event": "DOWNGRADE",
            "current_limit": "TIER_250",
            "old_limit": "TIER_10K",
            "max_daily_conversations_per_business": 250,
        })
    );

    control(&sandbox, reqwest::Method::POST, "/_sandbox/meta/quality", Some(json!({ "event": "FLAGGED" }))).await;
    let flagged = next_signed(&mut receiver).await;
    assert_eq!(account_change(&flagged)["value"]["event"], "FLAGGED");
    assert_eq!(account_change(&flagged)["value"]["max_daily_conversations_per_business"], 250);

    // A restriction: template sends are still accepted, and counted.
    let now = sandbox.clock().now().timestamp();
    let (status, _) = control(
        &sandbox,
        reqwest::Method::POST,
        "/_sandbox/meta/restriction",
        Some(json!({ "restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": now + 3600 })),
    )
    .await;
    assert_eq!(status, 200);
    let restriction = next_signed(&mut receiver).await;
    assert_eq!(
        account_change(&restriction),
        &json!({ "field": "account_update", "value": { "event": "ACCOUNT_RESTRICTION", "restriction_info": [
            { "restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": now + 3600 }
        ] } })
    );
    let client = meta(sandbox.base_url(), META_TOKEN, Duration::from_secs(5));
    accepted(client.send(&template("+15551234567", "m")).await);
    accepted(client.send(&text("+15551234567")).await);
    control(&sandbox, reqwest::Method::POST, "/_sandbox/clock", Some(json!({ "advance_seconds": 3600 }))).await;
    accepted(client.send(&template("+15551234567", "m")).await);
    assert_eq!(summary(&sandbox).await["sent_while_restricted"], 1, "only the template inside the restriction");

    // Any body, signed and posted as is.
    let inbound = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"messages","value":{"contacts":[{"user_id":"BR.1502576394655843"}]}}]}]}"#;
    let response = reqwest::Client::new()
        .post(format!("{}/_sandbox/meta/webhook", sandbox.base_url()))
        .header("content-type", "application/json")
        .body(inbound)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["webhooks"][0]["delivered"], true);
    let mut raw = None;
    while raw.is_none() {
        let (headers, body) = receiver.next().await;
        if body.as_ref() == inbound.as_bytes() {
            let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok()).unwrap();
            assert!(verify_meta_signature(APP_SECRET.as_bytes(), &body, signature));
            raw = Some(body);
        }
    }
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
