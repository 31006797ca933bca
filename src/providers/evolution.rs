//! The Evolution API v2 client: `POST {base}/message/sendText/{instance}` and
//! `GET {base}/instance/connectionState/{instance}` (docs/providers.md B1).

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};

use super::classify::{Answer, classify_evolution};
use super::transport::{self, Wire};
use super::{
    Content, Error, ErrorClass, OutboundMessage, Provider, ProviderClient, ProviderError, Result, Secret, SendOutcome,
};

/// The header Evolution reads its api key from.
pub(crate) const API_KEY_HEADER: &str = "apikey";

/// Sends through one Evolution instance (one WhatsApp number connected by QR code).
///
/// `Debug` is safe to log: the api key is a [`Secret`].
#[derive(Debug, Clone)]
pub struct EvolutionClient {
    http: reqwest::Client,
    send_url: String,
    state_url: String,
    api_key: Secret,
}

impl EvolutionClient {
    /// A client for one instance. `api_key` is the global key or the instance token.
    pub fn new(http: reqwest::Client, base_url: String, instance: String, api_key: Secret) -> Self {
        EvolutionClient {
            http,
            send_url: transport::endpoint(&base_url, &["message", "sendText", &instance]),
            state_url: transport::endpoint(&base_url, &["instance", "connectionState", &instance]),
            api_key,
        }
    }

    /// Whether the instance's WhatsApp session is up. Evolution reports a dropped
    /// session only as "Connection Closed" errors on send; the controller asks this
    /// before resuming a channel paused for that reason.
    pub async fn connection_state(&self) -> Result<ConnectionState> {
        let key = self.api_key_header().map_err(|error| Error::Rejected { provider: Provider::Evolution, error })?;
        let request = self.http.get(&self.state_url).header(API_KEY_HEADER, key);
        let reply = transport::exchange(request)
            .await
            .map_err(|failure| Error::Transport { provider: Provider::Evolution, source: failure.source })?;
        if let Some(error) = transport::unfollowed_redirect(&reply) {
            return Err(Error::Rejected { provider: Provider::Evolution, error });
        }
        if !reply.is_success() {
            return Err(match classify_evolution(reply.status, &reply.body) {
                Answer::Refused(error) => Error::Rejected { provider: Provider::Evolution, error },
                Answer::Inconclusive(reason) => {
                    Error::UnexpectedResponse { provider: Provider::Evolution, status: reply.status, reason }
                }
            });
        }
        serde_json::from_slice::<StateBody>(&reply.body).map(|body| body.instance.state).map_err(|e| {
            Error::UnexpectedResponse { provider: Provider::Evolution, status: reply.status, reason: e.to_string() }
        })
    }

    fn api_key_header(&self) -> std::result::Result<HeaderValue, ProviderError> {
        let mut value = HeaderValue::from_str(self.api_key.expose()).map_err(|_| ProviderError {
            class: ErrorClass::StopChannel,
            code: "invalid_credential".to_owned(),
            message: "the Evolution api key contains characters a header cannot carry".to_owned(),
            retry_after: None,
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

#[async_trait]
impl ProviderClient for EvolutionClient {
    async fn send(&self, msg: &OutboundMessage) -> SendOutcome {
        let body = match request_body(msg) {
            Ok(body) => body,
            Err(error) => return SendOutcome::Rejected(error),
        };
        let key = match self.api_key_header() {
            Ok(key) => key,
            Err(error) => return SendOutcome::Rejected(error),
        };
        let request = self.http.post(&self.send_url).header(API_KEY_HEADER, key).json(&body);
        transport::send(request, &EvolutionWire).await
    }

    fn provider(&self) -> Provider {
        Provider::Evolution
    }
}

/// State of an instance's WhatsApp session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Connected: sends go out.
    Open,
    /// Reconnecting: sends fail with "Connection Closed" for now.
    Connecting,
    /// Disconnected (often logged out: a person must scan the QR code again).
    Close,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

impl ConnectionState {
    /// The state as Evolution writes it (`open`, `connecting`, `close`; `unknown` for a
    /// state this client does not know).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Open => "open",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Close => "close",
            ConnectionState::Unknown => "unknown",
        }
    }
}

#[derive(Deserialize)]
struct StateBody {
    instance: StateInstance,
}

#[derive(Deserialize)]
struct StateInstance {
    state: ConnectionState,
}

/// The JSON body of `sendText` (docs/providers.md B1).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SendBody<'a> {
    /// Digits with country code.
    number: &'a str,
    text: &'a str,
    /// Previews fetch the link from the instance's phone; campaigns keep them off.
    link_preview: bool,
}

/// Builds the body for a message, or the refusal of one Evolution cannot send.
pub(crate) fn request_body(msg: &OutboundMessage) -> std::result::Result<SendBody<'_>, ProviderError> {
    let number = super::recipient_digits(&msg.to).ok_or_else(|| super::invalid_recipient(&msg.to))?;
    match &msg.content {
        Content::Text(text) => Ok(SendBody { number, text, link_preview: false }),
        // Every message of this campaign would fail alike, and only this campaign's:
        // stop the campaign for a person, never the channel its neighbours share.
        Content::Template { .. } => Err(ProviderError {
            class: ErrorClass::StopCampaign,
            code: "evolution_template_unsupported".to_owned(),
            message: "Evolution channels send plain text only; Meta templates need a Meta channel".to_owned(),
            retry_after: None,
        }),
    }
}

/// How Evolution answers.
struct EvolutionWire;

#[derive(Deserialize)]
struct SuccessBody {
    key: MessageKey,
}

#[derive(Deserialize)]
struct MessageKey {
    id: String,
}

impl Wire for EvolutionWire {
    fn accepted_id(&self, body: &[u8]) -> Option<String> {
        let success: SuccessBody = serde_json::from_slice(body).ok()?;
        Some(success.key.id).filter(|id| !id.is_empty())
    }

    fn rejection(&self, status: u16, body: &[u8]) -> Answer {
        classify_evolution(status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(to: &str, body: &str) -> OutboundMessage {
        OutboundMessage { to: to.into(), content: Content::Text(body.into()), callback_data: "m-1".into() }
    }

    #[test]
    fn send_text_body_matches_providers_md() {
        let msg = text("+5511999999999", "Olá! Sua promoção chegou.");
        let body = request_body(&msg).ok().and_then(|b| serde_json::to_value(b).ok());
        assert_eq!(
            body,
            Some(json!({ "number": "5511999999999", "text": "Olá! Sua promoção chegou.", "linkPreview": false }))
        );
    }

    #[test]
    fn templates_and_bad_numbers_are_refused_before_any_request() {
        let msg = OutboundMessage {
            to: "+5511999999999".into(),
            content: Content::Template { name: "t".into(), language: "pt_BR".into(), body_parameters: vec![] },
            callback_data: String::new(),
        };
        assert!(matches!(request_body(&msg), Err(ProviderError { class: ErrorClass::StopCampaign, .. })));
        assert!(matches!(request_body(&text("abc", "hi")), Err(ProviderError { class: ErrorClass::Permanent, .. })));
    }

    #[test]
    fn success_answers_give_the_key_id() {
        let current = br#"{"key":{"remoteJid":"5511999999999@s.whatsapp.net","fromMe":true,"id":"3EB0A1B2C3D4E5F60718"},"pushName":"Voc\u00ea","status":"PENDING","message":{"conversation":"Ol\u00e1"},"contextInfo":null,"messageType":"conversation","messageTimestamp":1750263773,"instanceId":"0b5c8e3e-2f0f-4a5e-9a3f-7c1d2e3f4a5b","source":"web"}"#;
        assert_eq!(EvolutionWire.accepted_id(current).as_deref(), Some("3EB0A1B2C3D4E5F60718"));
        // Older releases: extendedTextMessage and a string timestamp.
        let older = br#"{"key":{"remoteJid":"5511999999999@s.whatsapp.net","fromMe":true,"id":"BAE594145F4C59B4"},"message":{"extendedTextMessage":{"text":"x"}},"messageTimestamp":"1717689097","status":"PENDING"}"#;
        assert_eq!(EvolutionWire.accepted_id(older).as_deref(), Some("BAE594145F4C59B4"));
        assert_eq!(EvolutionWire.accepted_id(b"{}"), None);
    }

    #[test]
    fn connection_states_parse() {
        for (state, expected) in [
            ("open", ConnectionState::Open),
            ("connecting", ConnectionState::Connecting),
            ("close", ConnectionState::Close),
            ("refused", ConnectionState::Unknown),
        ] {
            let body = format!(r#"{{"instance":{{"instanceName":"my-instance","state":"{state}"}}}}"#);
            let parsed = serde_json::from_str::<StateBody>(&body).map(|b| b.instance.state).ok();
            assert_eq!(parsed, Some(expected));
            if expected != ConnectionState::Unknown {
                assert_eq!(expected.as_str(), state);
            }
        }
    }

    /// A loopback server that records the `apikey` header of every request it gets and
    /// answers each path with `answer(path, own address)`.
    async fn recording_server(
        answer: impl Fn(&str, std::net::SocketAddr) -> axum::response::Response + Clone + Send + Sync + 'static,
    ) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<(String, String, Option<String>)>>>) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else { panic!("bind") };
        let Ok(addr) = listener.local_addr() else { panic!("addr") };
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                if let Ok(mut log) = log.lock() {
                    log.push((
                        header("host").unwrap_or_default(),
                        request.uri().path().to_owned(),
                        header(API_KEY_HEADER),
                    ));
                }
                answer(request.uri().path(), addr)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, seen)
    }

    fn redirect(to: String) -> axum::response::Response {
        use axum::response::IntoResponse;
        (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, to)]).into_response()
    }

    fn open_state() -> axum::response::Response {
        use axum::response::IntoResponse;
        axum::Json(json!({"instance": {"instanceName": "i", "state": "open"}})).into_response()
    }

    #[tokio::test]
    async fn the_api_key_never_follows_a_redirect_to_another_host() {
        let Ok(http) = super::super::http_client(super::super::Timeouts::default()) else { panic!("http client") };
        let (elsewhere, reached) = recording_server(|_, _| open_state()).await;
        let (evolution, asked) = recording_server(move |path, own| match path {
            // Another host name for the same loopback address, and another port.
            p if p.ends_with("/by-name") => {
                redirect(format!("http://localhost:{}/instance/connectionState/by-name", own.port()))
            }
            p if p.ends_with("/by-port") => {
                redirect(format!("http://127.0.0.1:{}/instance/connectionState/by-port", elsewhere.port()))
            }
            p if p.ends_with("/by-scheme") => {
                redirect(format!("https://127.0.0.1:{}/instance/connectionState/by-scheme", own.port()))
            }
            p if p.starts_with("/moved/") => open_state(),
            p => redirect(format!("/moved{p}")),
        })
        .await;
        let client = |instance: &str| {
            EvolutionClient::new(
                http.clone(),
                format!("http://127.0.0.1:{}", evolution.port()),
                instance.into(),
                Secret::new("B6D9-key"),
            )
        };

        for instance in ["by-name", "by-port", "by-scheme"] {
            match client(instance).connection_state().await {
                Err(Error::Rejected { error, .. }) => {
                    assert_eq!(error.code, "redirect_not_followed", "{instance}");
                    assert_eq!(error.class, ErrorClass::StopChannel);
                    assert!(!error.message.contains("B6D9-key"));
                }
                other => panic!("{instance}: {other:?}"),
            }
            let outcome = client(instance).send(&text("+5511999999999", "hi")).await;
            assert!(
                matches!(&outcome, SendOutcome::Rejected(ProviderError { class: ErrorClass::StopChannel, .. })),
                "{instance}: {outcome:?}"
            );
        }
        let by_name = asked
            .lock()
            .map(|l| l.iter().filter(|(_, p, _)| p.ends_with("/by-name")).cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(by_name.len(), 2, "the two requests made, none followed: {by_name:?}");
        assert!(
            by_name.iter().all(|(host, _, _)| host.starts_with("127.0.0.1:")),
            "nothing reached it as localhost: {by_name:?}"
        );
        assert!(reached.lock().map(|l| l.is_empty()).unwrap_or(false), "nothing reached the other port: {reached:?}");

        // A redirect within the same origin is followed, with the key.
        assert!(matches!(client("same").connection_state().await, Ok(ConnectionState::Open)));
        let followed = asked
            .lock()
            .map(|l| {
                l.iter()
                    .any(|(_, p, k)| p == "/moved/instance/connectionState/same" && k.as_deref() == Some("B6D9-key"))
            })
            .unwrap_or(false);
        assert!(followed, "{asked:?}");
    }

    #[test]
    fn urls_and_debug_output() {
        crate::telemetry::install_crypto_provider();
        let Ok(http) = super::super::http_client(super::super::Timeouts::default()) else { panic!("http client") };
        let client =
            EvolutionClient::new(http, "http://evo:8080/".into(), "my-instance".into(), Secret::new("B6D9-key"));
        assert_eq!(client.send_url, "http://evo:8080/message/sendText/my-instance");
        assert_eq!(client.state_url, "http://evo:8080/instance/connectionState/my-instance");
        assert!(!format!("{client:?}").contains("B6D9-key"));
    }
}
