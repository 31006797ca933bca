//! The error classification table: what each provider error means for a campaign.
//!
//! One place for every code of docs/providers.md A2 and C, so the sender (synchronous
//! errors), the webhook service (asynchronous `failed` statuses) and the sandbox (which
//! answers with these codes, titles and HTTP statuses) cannot drift apart. Branch on
//! Meta's `code`, never on the HTTP status or the title: the status only decides for
//! codes we have never seen.

use std::time::Duration;

use serde_json::Value;

use super::{ErrorClass, ProviderError, SendOutcome};

/// One row of Meta's error-code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaCode {
    /// `error.code`.
    pub code: i64,
    /// Meta's title (also what the sandbox puts in `(#code) title`).
    pub title: &'static str,
    /// The HTTP status Meta's table lists for it (the sandbox answers with it).
    pub http_status: u16,
    /// What the sender should do.
    pub class: ErrorClass,
    /// A suggested wait when Meta documents one.
    pub retry_after: Option<Duration>,
}

const fn row(code: i64, title: &'static str, http_status: u16, class: ErrorClass) -> MetaCode {
    MetaCode { code, title, http_status, class, retry_after: None }
}

const fn wait(code: i64, title: &'static str, http_status: u16, class: ErrorClass, secs: u64) -> MetaCode {
    MetaCode { code, title, http_status, class, retry_after: Some(Duration::from_secs(secs)) }
}

use ErrorClass::{
    MarketingLimited, Permanent, RateLimitedChannel, RateLimitedRecipient, Retryable, StopCampaign, StopChannel,
};

/// Meta's codes (docs/providers.md A2), except the 200–299 permission range, which
/// [`meta_code`] answers for.
pub(crate) const META_CODES: &[MetaCode] = &[
    row(0, "AuthException", 401, StopChannel),
    // "Retry a few times, then permanent": the sender's bounded attempts do exactly that.
    row(1, "API Unknown", 400, Retryable),
    row(2, "API Service", 503, Retryable),
    row(3, "API Method", 500, StopChannel),
    // Graph call budgets are counted over a rolling hour; a minute is a cautious first wait.
    wait(4, "API Too Many Calls", 429, RateLimitedChannel, 60),
    row(10, "Permission Denied", 403, StopChannel),
    row(100, "Invalid parameter", 400, Permanent),
    row(190, "Access token has expired", 401, StopChannel),
    row(368, "Temporarily blocked for policies violations", 403, StopChannel),
    // On-Premises only; kept so old payloads classify the same as 131047.
    row(470, "Re-engagement message", 400, Permanent),
    wait(80007, "Rate limit issues", 400, RateLimitedChannel, 60),
    // Throughput recovers within seconds; the sender picks the wait.
    row(130429, "Rate limit hit", 400, RateLimitedChannel),
    row(130472, "User's number is part of an experiment", 400, Permanent),
    row(130497, "Business account is restricted from messaging users in this country", 403, Permanent),
    row(131000, "Something went wrong", 500, Retryable),
    row(131005, "Access denied", 403, StopChannel),
    row(131008, "Required parameter is missing", 400, Permanent),
    row(131009, "Parameter value is not valid", 400, Permanent),
    row(131016, "Service unavailable", 500, Retryable),
    row(131021, "Recipient cannot be sender", 400, Permanent),
    row(131026, "Message Undeliverable", 400, Permanent),
    row(131030, "Recipient phone number not in allowed list", 400, Permanent),
    row(131031, "Account has been locked", 403, StopChannel),
    row(131042, "Business eligibility payment issue", 400, StopChannel),
    row(131045, "Incorrect certificate", 500, StopChannel),
    row(131047, "Re-engagement message", 400, Permanent),
    // Spam/quality limit: a long pause (and an alert), not a failure of the message.
    wait(131048, "Spam rate limit hit", 400, RateLimitedChannel, 3600),
    // Not a failure: Meta advises no new attempt sooner than 24 h, then longer ones.
    wait(131049, "Meta chose not to deliver", 400, MarketingLimited, 24 * 3600),
    row(131050, "User has stopped marketing messages", 400, Permanent),
    row(131051, "Unsupported message type", 400, Permanent),
    row(131052, "Media download error", 400, Permanent),
    row(131053, "Media upload error", 400, Permanent),
    // The wait grows per consecutive hit on the pair: see `pair_rate_backoff`.
    row(131056, "(Business Account, Consumer Account) pair rate limit hit", 400, RateLimitedRecipient),
    wait(131057, "Account in maintenance mode", 500, Retryable, 60),
    row(132000, "Template Param Count Mismatch", 400, Permanent),
    row(132001, "Template does not exist", 404, Permanent),
    row(132005, "Template Hydrated Text Too Long", 400, Permanent),
    row(132007, "Template Format Character Policy Violated", 400, Permanent),
    row(132012, "Template Parameter Format Mismatch", 400, Permanent),
    // A paused or disabled template fails every message of its campaign alike, and
    // only that campaign: stop it (never the channel) until a person acts.
    row(132015, "Template is Paused", 400, StopCampaign),
    row(132016, "Template is Disabled", 400, StopCampaign),
    row(132068, "Flow is blocked", 400, Permanent),
    wait(132069, "Flow is throttled", 400, RateLimitedChannel, 60),
    row(133004, "Server Temporarily Unavailable", 503, Retryable),
    row(133010, "Phone number Not Registered", 400, StopChannel),
    // An operations error: if a send meets it, someone is (de)registering the number.
    row(133016, "Account register deregister rate limit exceeded", 400, StopChannel),
    row(135000, "Generic user error", 400, Permanent),
];

/// The table row for a Meta code, if the code is known.
pub(crate) fn meta_code(code: i64) -> Option<MetaCode> {
    if (200..=299).contains(&code) {
        return Some(row(code, "API Permission", 403, StopChannel));
    }
    META_CODES.iter().find(|row| row.code == code).copied()
}

/// The class of a Meta error. Unknown codes fall back on the HTTP status: 5xx is
/// retryable (bounded by the sender's attempts), 429 slows the channel, any other 4xx
/// is permanent for the message.
pub fn classify_meta(code: i64, http_status: u16) -> ErrorClass {
    match meta_code(code) {
        Some(row) => row.class,
        None if http_status >= 500 => Retryable,
        None if http_status == 429 => RateLimitedChannel,
        None => Permanent,
    }
}

/// The class of an error carried by a `failed` status webhook (no HTTP status exists
/// there). An unknown code is permanent: Meta has already given up on that message.
pub fn classify_meta_webhook(code: i64) -> ErrorClass {
    classify_meta(code, 400)
}

/// The documented wait for a Meta code, if any.
pub(crate) fn meta_retry_after(code: i64) -> Option<Duration> {
    meta_code(code).and_then(|row| row.retry_after)
}

/// How long to leave a recipient alone after `consecutive` earlier pair-rate errors
/// (131056) in a row: 4^x seconds (1, 4, 16, 64, 256, ...), as Meta recommends, capped
/// at 4^5 s (about 17 minutes) so a recipient is never parked for hours.
pub fn pair_rate_backoff(consecutive: u32) -> Duration {
    Duration::from_secs(4u64.pow(consecutive.min(5)))
}

/// What an error answer to a send says about the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The provider refused the message and said why: it was not accepted.
    Refused(ProviderError),
    /// Nothing in the answer shows that the message was refused: a gateway's 5xx page in
    /// front of the provider, or the provider's own "timed out". The provider may have
    /// accepted it, and neither provider has an idempotency key, so the send ends
    /// `Unknown` and is never repeated.
    Inconclusive(String),
}

impl From<Answer> for SendOutcome {
    fn from(answer: Answer) -> Self {
        match answer {
            Answer::Refused(error) => SendOutcome::Rejected(error),
            Answer::Inconclusive(reason) => SendOutcome::Unknown { reason },
        }
    }
}

/// The class of an HTTP error answer that did not carry the provider's own error body
/// (a proxy's page, an empty body), or `None` when such an answer does not show that
/// the message was refused.
///
/// Only the provider's own body proves anything about the channel, so no bare status
/// stops it: a 401/403/404 from a proxy, an ingress or a wrong base path means the
/// request never reached the provider's send logic, which is worth a bounded retry
/// (a person reading the `http_4xx` errors fixes the path). A 5xx from something in
/// front of the provider (502, 504) may come after the provider accepted the message:
/// `None`, so the send ends `Unknown`.
pub(crate) fn classify_http_status(http_status: u16) -> Option<ErrorClass> {
    match http_status {
        401 | 403 | 404 | 407 | 408 => Some(Retryable),
        // A 429 refuses the request by definition (RFC 6585), whoever answers it.
        429 => Some(RateLimitedChannel),
        s if s >= 500 => None,
        _ => Some(Permanent),
    }
}

/// Reads an HTTP error answer without the provider's own error body, by its status
/// (see [`classify_http_status`]); the code is `http_<status>`.
pub(crate) fn classify_bare_answer(http_status: u16, body: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let said = if text.is_empty() { format!("HTTP {http_status}") } else { format!("HTTP {http_status}: {text}") };
    match classify_http_status(http_status) {
        Some(class) => Answer::Refused(ProviderError {
            class,
            code: format!("http_{http_status}"),
            message: truncate(said),
            retry_after: None,
        }),
        None => Answer::Inconclusive(truncate(format!(
            "{said} (not the provider's error body: the message may have been accepted)"
        ))),
    }
}

/// How long to wait before trying a disconnected Evolution instance again.
const EVOLUTION_RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// Classifies an Evolution API error answer (docs/providers.md B1 and C). Evolution has no
/// error codes, so the `code` is an `evolution_*` name chosen here, or `http_<status>`.
///
/// Only Evolution's own error envelope (`{"status", "error", "response": {"message"}}`)
/// is read as Evolution speaking; any other body is a bare answer
/// ([`classify_bare_answer`]), so a proxy's 401 or 502 neither stops the channel nor
/// triggers a re-send.
///
/// "Connection Closed" (400 or 500, either body form) means the instance's WhatsApp
/// session dropped: no message can go out until it reconnects, and the message itself
/// is fine, so it is `RateLimitedChannel` (pause the channel, keep the message pending,
/// spend no attempt) with a 30 s hint; the controller can confirm with
/// `EvolutionClient::connection_state`. Baileys' `rate-overlimit` is treated the same.
/// "Error: Timed Out" is Baileys giving up waiting for WhatsApp's acknowledgement of a
/// message it already relayed: inconclusive, never retried.
pub fn classify_evolution(http_status: u16, body: &[u8]) -> Answer {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let Some(message) = parsed.as_ref().and_then(|v| v.pointer("/response/message")) else {
        return classify_bare_answer(http_status, body);
    };
    let texts = collect_texts(message);
    let text = texts.join("; ");
    let contains = |needle: &str| texts.iter().any(|t| t.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()));
    let error = |class: ErrorClass, code: &str, message: String| {
        Answer::Refused(ProviderError {
            class,
            code: code.to_owned(),
            message: truncate(if message.is_empty() { format!("HTTP {http_status}") } else { message }),
            retry_after: None,
        })
    };
    let waiting = |class: ErrorClass, code: &str, wait: Duration| {
        Answer::Refused(ProviderError {
            class,
            code: code.to_owned(),
            message: truncate(text.clone()),
            retry_after: Some(wait),
        })
    };

    if says_not_on_whatsapp(message) {
        // The body repeats the number: keep it out of the stored message.
        return error(Permanent, "evolution_not_on_whatsapp", "number is not on WhatsApp".to_owned());
    }
    match http_status {
        401 => return error(StopChannel, "evolution_unauthorized", text),
        403 => return error(StopChannel, "evolution_forbidden", text),
        _ => {}
    }
    if contains("Connection Closed") {
        return waiting(RateLimitedChannel, "evolution_connection_closed", EVOLUTION_RECONNECT_WAIT);
    }
    if contains("rate-overlimit") {
        return waiting(RateLimitedChannel, "evolution_rate_overlimit", Duration::from_secs(60));
    }
    if contains("Timed Out") {
        return Answer::Inconclusive(truncate(format!(
            "Evolution answered HTTP {http_status} \"{text}\": the message may have been relayed"
        )));
    }
    match http_status {
        404 if contains("does not exist") => error(StopChannel, "evolution_instance_not_found", text),
        404 if contains("not found") && contains("group") => error(Permanent, "evolution_group_not_found", text),
        // Evolution's own 404 otherwise names a route or instance of the channel's settings.
        404 => error(StopChannel, "evolution_not_found", text),
        400 if contains("Text is required") || contains("requires property") || is_schema_error(message) => {
            error(Permanent, "evolution_invalid_request", text)
        }
        // Any Baileys error while relaying is wrapped as "Error: ...": often transient.
        400 if texts.iter().any(|t| t.starts_with("Error:")) => error(Retryable, "evolution_send_error", text),
        400 => error(Permanent, "evolution_bad_request", text),
        // Evolution's own error handler caught a failure: it answered, so it is up;
        // relay failures come wrapped as 400s, so this one happened outside the relay.
        status if status >= 500 => error(Retryable, &format!("http_{status}"), text),
        status => error(classify_http_status(status).unwrap_or(Permanent), &format!("http_{status}"), text),
    }
}

/// `response.message[*].exists == false`: Evolution's "not on WhatsApp" answer.
fn says_not_on_whatsapp(message: &Value) -> bool {
    message.as_array().is_some_and(|items| items.iter().any(|item| item.get("exists") == Some(&Value::Bool(false))))
}

/// Schema violations come as an array of arrays of strings.
fn is_schema_error(message: &Value) -> bool {
    message.as_array().is_some_and(|items| items.iter().any(Value::is_array))
}

/// Every string inside `response.message` (a string, an array, nested arrays).
fn collect_texts(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(collect_texts).collect(),
        _ => Vec::new(),
    }
}

/// Provider messages are stored with each failure; keep them short.
pub(crate) fn truncate(mut message: String) -> String {
    const MAX: usize = 500;
    if message.len() > MAX {
        let mut end = MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of docs/providers.md A2/C with the class section C gives it.
    const EXPECTED: &[(i64, ErrorClass)] = &[
        (0, StopChannel),
        (1, Retryable),
        (2, Retryable),
        (3, StopChannel),
        (4, RateLimitedChannel),
        (10, StopChannel),
        (100, Permanent),
        (190, StopChannel),
        (200, StopChannel),
        (250, StopChannel),
        (299, StopChannel),
        (368, StopChannel),
        (470, Permanent),
        (80007, RateLimitedChannel),
        (130429, RateLimitedChannel),
        (130472, Permanent),
        (130497, Permanent),
        (131000, Retryable),
        (131005, StopChannel),
        (131008, Permanent),
        (131009, Permanent),
        (131016, Retryable),
        (131021, Permanent),
        (131026, Permanent),
        (131030, Permanent),
        (131031, StopChannel),
        (131042, StopChannel),
        (131045, StopChannel),
        (131047, Permanent),
        (131048, RateLimitedChannel),
        (131049, MarketingLimited),
        (131050, Permanent),
        (131051, Permanent),
        (131052, Permanent),
        (131053, Permanent),
        (131056, RateLimitedRecipient),
        (131057, Retryable),
        (132000, Permanent),
        (132001, Permanent),
        (132005, Permanent),
        (132007, Permanent),
        (132012, Permanent),
        (132015, StopCampaign),
        (132016, StopCampaign),
        (132068, Permanent),
        (132069, RateLimitedChannel),
        (133004, Retryable),
        (133010, StopChannel),
        (133016, StopChannel),
        (135000, Permanent),
    ];

    #[test]
    fn every_listed_meta_code_has_its_class_whatever_the_http_status() {
        for &(code, class) in EXPECTED {
            for status in [200, 400, 403, 429, 500, 503] {
                assert_eq!(classify_meta(code, status), class, "code {code} with HTTP {status}");
            }
            assert_eq!(classify_meta_webhook(code), class, "code {code} by webhook");
        }
    }

    #[test]
    fn the_table_and_the_expectations_list_the_same_codes() {
        for row in META_CODES {
            assert!(EXPECTED.iter().any(|(code, _)| *code == row.code), "code {} untested", row.code);
        }
        let mut codes: Vec<i64> = META_CODES.iter().map(|r| r.code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), META_CODES.len(), "a code appears twice in the table");
    }

    #[test]
    fn unknown_meta_codes_fall_back_on_the_http_status() {
        assert_eq!(classify_meta(999_999, 500), Retryable);
        assert_eq!(classify_meta(999_999, 503), Retryable);
        assert_eq!(classify_meta(999_999, 400), Permanent);
        assert_eq!(classify_meta(999_999, 404), Permanent);
        assert_eq!(classify_meta(999_999, 429), RateLimitedChannel);
        assert_eq!(classify_meta_webhook(999_999), Permanent);
        assert_eq!(classify_meta(300, 403), Permanent, "the permission range ends at 299");
    }

    #[test]
    fn documented_waits_are_hinted() {
        assert_eq!(meta_retry_after(131057), Some(Duration::from_secs(60)));
        assert_eq!(meta_retry_after(131048), Some(Duration::from_secs(3600)));
        assert_eq!(meta_retry_after(131000), None);
        assert_eq!(meta_code(132001).map(|r| r.http_status), Some(404));
        assert_eq!(meta_code(190).map(|r| r.http_status), Some(401));
    }

    #[test]
    fn pair_rate_backoff_is_four_to_the_x_seconds() {
        let waits: Vec<u64> = (0..7).map(|x| pair_rate_backoff(x).as_secs()).collect();
        assert_eq!(waits, vec![1, 4, 16, 64, 256, 1024, 1024]);
        assert_eq!(pair_rate_backoff(u32::MAX).as_secs(), 1024);
    }

    #[test]
    fn bodyless_answers_never_stop_the_channel_and_5xx_may_hide_an_acceptance() {
        assert_eq!(classify_http_status(401), Some(Retryable));
        assert_eq!(classify_http_status(403), Some(Retryable));
        assert_eq!(classify_http_status(404), Some(Retryable));
        assert_eq!(classify_http_status(408), Some(Retryable));
        assert_eq!(classify_http_status(422), Some(Permanent));
        assert_eq!(classify_http_status(429), Some(RateLimitedChannel));
        for status in [500, 502, 503, 504] {
            assert_eq!(classify_http_status(status), None, "HTTP {status}");
        }
        for status in 100..600 {
            assert_ne!(classify_http_status(status), Some(StopChannel), "HTTP {status}");
        }
        let Answer::Refused(error) = classify_bare_answer(401, b"<html>401 Authorization Required</html>") else {
            panic!("refused")
        };
        assert_eq!((error.class, error.code.as_str()), (Retryable, "http_401"));
        assert!(
            matches!(classify_bare_answer(504, b"<html>504 Gateway Time-out</html>"), Answer::Inconclusive(ref r) if r.contains("504"))
        );
        assert!(matches!(classify_bare_answer(502, b""), Answer::Inconclusive(_)));
    }

    fn evolution(status: u16, body: &str) -> ProviderError {
        match classify_evolution(status, body.as_bytes()) {
            Answer::Refused(error) => error,
            Answer::Inconclusive(reason) => panic!("HTTP {status} {body}: inconclusive ({reason})"),
        }
    }

    #[test]
    fn evolution_answers_that_may_hide_an_acceptance_are_inconclusive() {
        let cases: &[(u16, &str)] = &[
            // Baileys gave up waiting for WhatsApp's ack of a message it had relayed.
            (400, r#"{"status":400,"error":"Bad Request","response":{"message":["Error: Timed Out"]}}"#),
            (500, r#"{"status":500,"error":"Internal Server Error","response":{"message":"Timed Out"}}"#),
            // Something in front of Evolution.
            (502, "<html>Bad Gateway</html>"),
            (504, "<html><body><h1>504 Gateway Time-out</h1></body></html>"),
            (500, ""),
            (503, r#"{"message":"upstream unavailable"}"#),
        ];
        for (status, body) in cases {
            assert!(
                matches!(classify_evolution(*status, body.as_bytes()), Answer::Inconclusive(_)),
                "HTTP {status} {body}"
            );
        }
    }

    #[test]
    fn evolution_errors_of_providers_md_b1() {
        let cases: &[(u16, &str, ErrorClass, &str)] = &[
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":[{"jid":"5511999999999@s.whatsapp.net","exists":false,"number":"5511999999999"}]}}"#,
                Permanent,
                "evolution_not_on_whatsapp",
            ),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":[["instance requires property \"text\""]]}}"#,
                Permanent,
                "evolution_invalid_request",
            ),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":["Text is required"]}}"#,
                Permanent,
                "evolution_invalid_request",
            ),
            (
                500,
                r#"{"status":500,"error":"Internal Server Error","response":{"message":"Connection Closed"}}"#,
                RateLimitedChannel,
                "evolution_connection_closed",
            ),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":["Error: Connection Closed"]}}"#,
                RateLimitedChannel,
                "evolution_connection_closed",
            ),
            (
                500,
                r#"{"status":500,"error":"Internal Server Error","response":{"message":["Connection Closed"]}}"#,
                RateLimitedChannel,
                "evolution_connection_closed",
            ),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":["Error: Stream Errored (conflict)"]}}"#,
                Retryable,
                "evolution_send_error",
            ),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":["Error: rate-overlimit"]}}"#,
                RateLimitedChannel,
                "evolution_rate_overlimit",
            ),
            (
                404,
                r#"{"status":404,"error":"Not Found","response":{"message":["The \"my-instance\" instance does not exist"]}}"#,
                StopChannel,
                "evolution_instance_not_found",
            ),
            (
                404,
                r#"{"status":404,"error":"Not Found","response":{"message":["Group not found"]}}"#,
                Permanent,
                "evolution_group_not_found",
            ),
            (
                401,
                r#"{"status":401,"error":"Unauthorized","response":{"message":"Unauthorized"}}"#,
                StopChannel,
                "evolution_unauthorized",
            ),
            (
                403,
                r#"{"status":403,"error":"Forbidden","response":{"message":"Forbidden"}}"#,
                StopChannel,
                "evolution_forbidden",
            ),
            (
                500,
                r#"{"status":500,"error":"Internal Server Error","response":{"message":"boom"}}"#,
                Retryable,
                "http_500",
            ),
            // A proxy's or ingress' answer is not Evolution's: it proves nothing about the channel.
            (404, "", Retryable, "http_404"),
            (401, "<html>401 Authorization Required</html>", Retryable, "http_401"),
            (403, r#"{"message":"Forbidden"}"#, Retryable, "http_403"),
            (
                400,
                r#"{"status":400,"error":"Bad Request","response":{"message":["Owned media must be a url"]}}"#,
                Permanent,
                "evolution_bad_request",
            ),
        ];
        for (status, body, class, code) in cases {
            let error = evolution(*status, body);
            assert_eq!((error.class, error.code.as_str()), (*class, *code), "HTTP {status} {body}");
        }
    }

    #[test]
    fn evolution_not_on_whatsapp_keeps_the_number_out_of_the_message() {
        let error = evolution(
            400,
            r#"{"status":400,"error":"Bad Request","response":{"message":[{"jid":"5511999999999@s.whatsapp.net","exists":false,"number":"5511999999999"}]}}"#,
        );
        assert!(!error.message.contains("5511999999999"));
    }

    #[test]
    fn evolution_disconnection_hints_a_wait() {
        let error = evolution(
            500,
            r#"{"status":500,"error":"Internal Server Error","response":{"message":"Connection Closed"}}"#,
        );
        assert_eq!(error.retry_after, Some(EVOLUTION_RECONNECT_WAIT));
        assert_eq!(error.message, "Connection Closed");
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(400);
        let short = truncate(long);
        assert!(short.len() <= 504);
        assert!(short.ends_with('…'));
    }
}
