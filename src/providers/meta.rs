//! The Meta WhatsApp Cloud API client: `POST {base}/{version}/{phone_number_id}/messages`
//! (docs/providers.md A1, A2).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::classify::{Answer, classify_bare_answer, classify_meta, meta_code, meta_retry_after, truncate};
use super::transport::{self, Wire};
use super::{Content, ErrorClass, OutboundMessage, Provider, ProviderClient, ProviderError, Secret, SendOutcome};

/// Meta echoes at most this many bytes of `biz_opaque_callback_data`.
const MAX_CALLBACK_DATA: usize = 512;

/// Prefix of our `biz_opaque_callback_data` (docs/providers.md A1).
const CALLBACK_PREFIX: &str = "disparo:";

/// What the sender puts in `biz_opaque_callback_data` and Meta echoes in every status
/// webhook of the message (docs/providers.md A1): `disparo:<message id>:<campaign uid>`,
/// or `disparo:<message id>` as senders before the campaign was added wrote it. The
/// campaign lets the webhook look the message up in its campaign's partition alone
/// (docs/architecture.md, "Partitions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallbackData {
    /// Our message id.
    pub message_id: i64,
    /// The message's campaign (absent in the older format).
    pub campaign: Option<uuid::Uuid>,
}

impl CallbackData {
    /// The text sent to Meta (at most 64 bytes: well under Meta's 512).
    pub fn encode(&self) -> String {
        match self.campaign {
            Some(campaign) => format!("{CALLBACK_PREFIX}{}:{}", self.message_id, campaign.hyphenated()),
            None => format!("{CALLBACK_PREFIX}{}", self.message_id),
        }
    }

    /// Reads either format; None for anything else (someone else's data, a
    /// non-positive id, a campaign that is not a UUID).
    pub fn parse(data: &str) -> Option<CallbackData> {
        let rest = data.strip_prefix(CALLBACK_PREFIX)?;
        let (id, campaign) = match rest.split_once(':') {
            Some((id, campaign)) => (id, Some(uuid::Uuid::try_parse(campaign).ok()?)),
            None => (rest, None),
        };
        let message_id = id.parse::<i64>().ok().filter(|id| *id > 0)?;
        Some(CallbackData { message_id, campaign })
    }
}

/// Sends through one business phone number of the Cloud API.
///
/// `Debug` is safe to log: the access token is a [`Secret`].
#[derive(Debug, Clone)]
pub struct MetaClient {
    http: reqwest::Client,
    /// `{base}/{version}/{phone_number_id}/messages`, built once.
    endpoint: String,
    /// `{base}/{version}/{phone_number_id}`: the number's own node.
    number_url: String,
    token: Secret,
}

/// The fields of a phone number node the controller reads (docs/providers.md,
/// "Account health signals").
pub(crate) const HEALTH_FIELDS: &str =
    "whatsapp_business_manager_messaging_limit,quality_rating,throughput,display_phone_number";

/// What the Graph API says of a number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct NumberHealth {
    /// The portfolio's messaging limit tier, e.g. `TIER_2K`.
    #[serde(default)]
    pub whatsapp_business_manager_messaging_limit: Option<String>,
    /// GREEN, YELLOW, RED or UNKNOWN.
    #[serde(default)]
    pub quality_rating: Option<String>,
    /// The number's throughput.
    #[serde(default)]
    pub throughput: Option<Throughput>,
    /// The number as Meta shows it.
    #[serde(default)]
    pub display_phone_number: Option<String>,
}

/// `throughput` of a phone number node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Throughput {
    /// STANDARD or HIGH.
    #[serde(default)]
    pub level: Option<String>,
}

impl MetaClient {
    /// A client for one phone number. `base_url` is `https://graph.facebook.com` in
    /// production or a `disparo sandbox` address; `api_version` looks like `v23.0`.
    /// A malformed URL is not an error here: every send then ends `StopChannel`
    /// (`invalid_request`), which pauses the channel for a person to fix.
    pub fn new(
        http: reqwest::Client,
        base_url: String,
        api_version: String,
        phone_number_id: String,
        token: Secret,
    ) -> Self {
        let endpoint = transport::endpoint(&base_url, &[&api_version, &phone_number_id, "messages"]);
        let number_url = transport::endpoint(&base_url, &[&api_version, &phone_number_id]);
        MetaClient { http, endpoint, number_url, token }
    }

    /// Reads the number's messaging limit tier, quality rating and throughput
    /// (`GET /{phone-number-id}?fields=...`).
    pub(crate) async fn number_health(&self) -> super::Result<NumberHealth> {
        let url = format!("{}?fields={HEALTH_FIELDS}", self.number_url);
        let request = self.http.get(url).bearer_auth(self.token.expose());
        let reply = transport::exchange(request)
            .await
            .map_err(|failure| super::Error::Transport { provider: Provider::Meta, source: failure.source })?;
        if !reply.is_success() {
            return Err(match MetaWire.rejection(reply.status, &reply.body) {
                Answer::Refused(error) => super::Error::Rejected { provider: Provider::Meta, error },
                Answer::Inconclusive(reason) => {
                    super::Error::UnexpectedResponse { provider: Provider::Meta, status: reply.status, reason }
                }
            });
        }
        serde_json::from_slice(&reply.body).map_err(|e| super::Error::UnexpectedResponse {
            provider: Provider::Meta,
            status: reply.status,
            reason: e.to_string(),
        })
    }
}

#[async_trait]
impl ProviderClient for MetaClient {
    async fn send(&self, msg: &OutboundMessage) -> SendOutcome {
        let body = match request_body(msg) {
            Ok(body) => body,
            Err(error) => return SendOutcome::Rejected(error),
        };
        let request = self.http.post(&self.endpoint).bearer_auth(self.token.expose()).json(&body);
        transport::send(request, &MetaWire).await
    }

    fn provider(&self) -> Provider {
        Provider::Meta
    }
}

/// The JSON body of a send (docs/providers.md A1).
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct SendBody<'a> {
    messaging_product: &'static str,
    recipient_type: &'static str,
    /// Digits only: Meta tolerates a `+`, but its `contacts[].input` echo is then
    /// inconsistent with `wa_id`.
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<TextBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<TemplateBody<'a>>,
    #[serde(skip_serializing_if = "str::is_empty")]
    biz_opaque_callback_data: &'a str,
}

#[derive(Debug, Serialize, PartialEq)]
struct TextBody<'a> {
    preview_url: bool,
    body: &'a str,
}

#[derive(Debug, Serialize, PartialEq)]
struct TemplateBody<'a> {
    name: &'a str,
    language: Language<'a>,
    /// Omitted for templates without variables: an empty parameter list is a 132000.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    components: Vec<Component<'a>>,
}

#[derive(Debug, Serialize, PartialEq)]
struct Language<'a> {
    code: &'a str,
}

#[derive(Debug, Serialize, PartialEq)]
struct Component<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    parameters: Vec<Parameter<'a>>,
}

#[derive(Debug, Serialize, PartialEq)]
struct Parameter<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// Builds the body for a message, or the permanent refusal of a message that cannot
/// be sent at all (a recipient that is not a number, oversized callback data).
pub(crate) fn request_body(msg: &OutboundMessage) -> Result<SendBody<'_>, ProviderError> {
    let to = super::recipient_digits(&msg.to).ok_or_else(|| super::invalid_recipient(&msg.to))?;
    if msg.callback_data.len() > MAX_CALLBACK_DATA {
        return Err(ProviderError {
            class: ErrorClass::Permanent,
            code: "invalid_callback_data".to_owned(),
            message: format!(
                "callback data is {} bytes; Meta accepts at most {MAX_CALLBACK_DATA}",
                msg.callback_data.len()
            ),
            retry_after: None,
        });
    }
    let mut body = SendBody {
        messaging_product: "whatsapp",
        recipient_type: "individual",
        to,
        kind: "text",
        text: None,
        template: None,
        biz_opaque_callback_data: &msg.callback_data,
    };
    match &msg.content {
        Content::Text(text) => body.text = Some(TextBody { preview_url: false, body: text }),
        Content::Template { name, language, body_parameters } => {
            body.kind = "template";
            let components = if body_parameters.is_empty() {
                Vec::new()
            } else {
                let parameters = body_parameters.iter().map(|text| Parameter { kind: "text", text }).collect();
                vec![Component { kind: "body", parameters }]
            };
            body.template = Some(TemplateBody { name, language: Language { code: language }, components });
        }
    }
    Ok(body)
}

/// How Meta answers.
struct MetaWire;

#[derive(Deserialize)]
struct SuccessBody {
    messages: Vec<MessageRef>,
}

#[derive(Deserialize)]
struct MessageRef {
    id: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: GraphError,
}

#[derive(Deserialize)]
struct GraphError {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    error_data: Option<ErrorData>,
}

#[derive(Deserialize)]
struct ErrorData {
    #[serde(default)]
    details: Option<String>,
}

impl Wire for MetaWire {
    fn accepted_id(&self, body: &[u8]) -> Option<String> {
        let success: SuccessBody = serde_json::from_slice(body).ok()?;
        success.messages.into_iter().next().map(|m| m.id).filter(|id| !id.is_empty())
    }

    /// Meta's error JSON is Meta speaking: its code decides. An unknown code on a 5xx
    /// proves nothing (Meta documents its retryable server errors by code), and any
    /// other body is not Meta's at all: both may hide an accepted message.
    fn rejection(&self, status: u16, body: &[u8]) -> Answer {
        let Ok(ErrorEnvelope { error }) = serde_json::from_slice::<ErrorEnvelope>(body) else {
            return classify_bare_answer(status, body);
        };
        let details = error.error_data.and_then(|d| d.details).filter(|d| !d.is_empty());
        let message = match details {
            Some(details) if details != error.message => format!("{}: {details}", error.message),
            _ => error.message,
        };
        if meta_code(error.code).is_none() && status >= 500 {
            return Answer::Inconclusive(truncate(format!(
                "HTTP {status} with unknown code {}: {message}",
                error.code
            )));
        }
        Answer::Refused(ProviderError {
            class: classify_meta(error.code, status),
            code: error.code.to_string(),
            message: truncate(message),
            retry_after: meta_retry_after(error.code),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn callback_data_carries_the_campaign_and_reads_both_formats() {
        let campaign = uuid::Uuid::parse_str("6f1c2a3e-0d4b-4c5a-9e8f-1a2b3c4d5e6f").unwrap();
        let data = CallbackData { message_id: 42, campaign: Some(campaign) };
        assert_eq!(data.encode(), "disparo:42:6f1c2a3e-0d4b-4c5a-9e8f-1a2b3c4d5e6f");
        assert_eq!(CallbackData::parse(&data.encode()), Some(data));
        assert!(data.encode().len() <= MAX_CALLBACK_DATA);
        // the format of senders before the campaign was carried
        assert_eq!(CallbackData::parse("disparo:42"), Some(CallbackData { message_id: 42, campaign: None }));
        assert_eq!(CallbackData { message_id: 42, campaign: None }.encode(), "disparo:42");
        for other in [
            "disparo:campaign=spring-sale:msg=42",
            "disparo:-1",
            "disparo:0",
            "42",
            "disparo:42:spring-sale",
            "disparo:",
        ] {
            assert_eq!(CallbackData::parse(other), None, "{other}");
        }
    }

    fn message(content: Content) -> OutboundMessage {
        OutboundMessage { to: "+15551234567".into(), content, callback_data: String::new() }
    }

    fn body_json(msg: &OutboundMessage) -> Value {
        request_body(msg).ok().and_then(|b| serde_json::to_value(b).ok()).unwrap_or(Value::Null)
    }

    #[test]
    fn text_body_matches_providers_md() {
        let msg = message(Content::Text("Hello! Your order #12345 has shipped.".into()));
        let expected = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "15551234567",
            "type": "text",
            "text": { "preview_url": false, "body": "Hello! Your order #12345 has shipped." }
        });
        assert_eq!(body_json(&msg), expected);
    }

    #[test]
    fn template_body_matches_providers_md_and_carries_our_id() {
        let mut msg = message(Content::Template {
            name: "order_update_v1".into(),
            language: "en_US".into(),
            body_parameters: vec!["Alex".into(), "A12345".into()],
        });
        msg.callback_data = "msg-42".into();
        let expected = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "15551234567",
            "type": "template",
            "template": {
                "name": "order_update_v1",
                "language": { "code": "en_US" },
                "components": [
                    { "type": "body", "parameters": [ { "type": "text", "text": "Alex" }, { "type": "text", "text": "A12345" } ] }
                ]
            },
            "biz_opaque_callback_data": "msg-42"
        });
        assert_eq!(body_json(&msg), expected);
    }

    #[test]
    fn templates_without_variables_have_no_components() {
        let msg = message(Content::Template {
            name: "hello_world".into(),
            language: "en_US".into(),
            body_parameters: vec![],
        });
        assert_eq!(body_json(&msg)["template"], json!({ "name": "hello_world", "language": { "code": "en_US" } }));
    }

    #[test]
    fn unsendable_messages_are_refused_before_any_request() {
        let mut msg = message(Content::Text("hi".into()));
        msg.to = "+55 11 9999-9999".into();
        assert!(
            matches!(request_body(&msg), Err(ProviderError { class: ErrorClass::Permanent, ref code, .. }) if code == "invalid_recipient")
        );
        let mut msg = message(Content::Text("hi".into()));
        msg.callback_data = "x".repeat(513);
        assert!(matches!(request_body(&msg), Err(ProviderError { ref code, .. }) if code == "invalid_callback_data"));
    }

    #[test]
    fn success_answers_give_the_wamid() {
        let body = br#"{"messaging_product":"whatsapp","contacts":[{"input":"15551234567","wa_id":"15551234567"}],"messages":[{"id":"wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA","message_status":"accepted"}]}"#;
        assert_eq!(
            MetaWire.accepted_id(body).as_deref(),
            Some("wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA")
        );
        assert_eq!(MetaWire.accepted_id(br#"{"messages":[]}"#), None);
        assert_eq!(MetaWire.accepted_id(b"<html>"), None);
    }

    fn refused(answer: Answer) -> ProviderError {
        match answer {
            Answer::Refused(error) => error,
            Answer::Inconclusive(reason) => panic!("expected a refusal, got an inconclusive answer: {reason}"),
        }
    }

    #[test]
    fn error_answers_are_classified_by_code() {
        let body = br#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,"error_data":{"messaging_product":"whatsapp","details":"Message failed to send because there were too many messages sent from this phone number in a short period of time"},"error_subcode":2494055,"fbtrace_id":"Az8or2yhqkZfEZ-_4Qn_Bam"}}"#;
        let error = refused(MetaWire.rejection(400, body));
        assert_eq!(error.class, ErrorClass::RateLimitedChannel);
        assert_eq!(error.code, "130429");
        assert!(error.message.starts_with("(#130429) Rate limit hit: Message failed to send"));

        let error = refused(
            MetaWire.rejection(500, br#"{"error":{"message":"(#131057) Account in maintenance mode","code":131057}}"#),
        );
        assert_eq!((error.class, error.retry_after), (ErrorClass::Retryable, Some(std::time::Duration::from_secs(60))));

        let error = refused(MetaWire.rejection(401, br#"{"error":{"message":"Invalid OAuth access token - Cannot parse access token","type":"OAuthException","code":190,"fbtrace_id":"x"}}"#));
        assert_eq!((error.class, error.code.as_str()), (ErrorClass::StopChannel, "190"));
    }

    #[test]
    fn paused_and_disabled_templates_stop_the_campaign_not_the_channel() {
        for code in [132015, 132016] {
            let body = format!(
                r#"{{"error":{{"message":"(#{code}) Template is Paused","type":"OAuthException","code":{code},"fbtrace_id":"x"}}}}"#
            );
            let error = refused(MetaWire.rejection(400, body.as_bytes()));
            assert_eq!((error.class, error.code), (ErrorClass::StopCampaign, code.to_string()));
        }
    }

    #[test]
    fn bodyless_errors_keep_the_http_status() {
        let error = refused(MetaWire.rejection(404, b"<html>Not Found</html>"));
        assert_eq!((error.class, error.code.as_str()), (ErrorClass::Retryable, "http_404"));
        let error = refused(MetaWire.rejection(401, b""));
        assert_eq!(
            (error.class, error.code.as_str()),
            (ErrorClass::Retryable, "http_401"),
            "a proxy's 401 proves nothing about the token"
        );
    }

    #[test]
    fn gateway_errors_and_unknown_server_codes_may_hide_an_acceptance() {
        assert!(matches!(MetaWire.rejection(502, b"<html>Bad Gateway</html>"), Answer::Inconclusive(_)));
        assert!(matches!(MetaWire.rejection(504, b""), Answer::Inconclusive(_)));
        // A gateway's own JSON, shaped like Graph's by chance.
        assert!(matches!(
            MetaWire.rejection(504, br#"{"error":{"code":504,"message":"Gateway Timeout"}}"#),
            Answer::Inconclusive(_)
        ));
        // Meta's documented server errors are retried.
        let error = refused(
            MetaWire.rejection(500, br#"{"error":{"message":"(#131000) Something went wrong","code":131000}}"#),
        );
        assert_eq!(error.class, ErrorClass::Retryable);
    }

    #[test]
    fn debug_output_hides_the_token() {
        let Ok(http) = super::super::http_client(super::super::Timeouts::default()) else { panic!("http client") };
        let client = MetaClient::new(
            http,
            "https://graph.facebook.com/".into(),
            "v23.0".into(),
            "106540352242922".into(),
            Secret::new("EAAG-secret"),
        );
        assert_eq!(client.endpoint, "https://graph.facebook.com/v23.0/106540352242922/messages");
        assert!(!format!("{client:?}").contains("EAAG-secret"));
    }
}
