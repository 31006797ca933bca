//! The one HTTP path of every provider call: the shared client, its timeouts, and the
//! mapping of what happened on the wire into a [`SendOutcome`].
//!
//! The line that matters is *was the message refused?* A connect failure proves the
//! request never left, and the provider's own error body proves it refused the
//! message: retrying those is safe. Anything else after the request was written (a
//! timeout, a reset, a 2xx we cannot read, a gateway's 5xx page, the provider's own
//! "timed out") may hide an accepted message, and neither provider has an idempotency
//! key: that is `Unknown`, never a silent retry.

use std::time::Duration;

use super::classify::Answer;
use super::{Error, ProviderError, Result, SendOutcome};

/// How long a provider call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP/TLS connection. A connect that times out provably sent
    /// nothing, so it is retryable; keep it well under `request`.
    pub connect: Duration,
    /// The whole exchange, connect included. Past it the outcome is unknown.
    pub request: Duration,
}

impl Timeouts {
    const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
}

impl Default for Timeouts {
    /// 5 s to connect, 30 s in all: Meta answers in well under a second, Evolution
    /// checks the number on WhatsApp first and can take a few seconds; a generous total
    /// keeps `Unknown` outcomes rare.
    fn default() -> Self {
        Timeouts { connect: Self::DEFAULT_CONNECT, request: Duration::from_secs(30) }
    }
}

impl From<Duration> for Timeouts {
    /// A request timeout alone; the connect timeout is 5 s or half the request
    /// timeout, whichever is shorter.
    fn from(request: Duration) -> Self {
        Timeouts { connect: Self::DEFAULT_CONNECT.min(request / 2), request }
    }
}

/// Builds the pooled HTTP client every provider client shares (one per process: the
/// pool keeps TLS connections warm across thousands of sends).
///
/// Installs the rustls crypto provider first (idempotent), so a library user cannot
/// forget it.
pub fn http_client(timeouts: impl Into<Timeouts>) -> Result<reqwest::Client> {
    let timeouts = timeouts.into();
    if timeouts.connect.is_zero() || timeouts.connect >= timeouts.request {
        return Err(Error::InvalidTimeouts { connect: timeouts.connect, request: timeouts.request });
    }
    crate::telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        .redirect(same_origin_redirects())
        .user_agent(concat!("disparo/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(Error::HttpClient)
}

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Whether two URLs have the same origin: scheme, host and port.
fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

/// Redirects are followed within the origin of the request only (a proxy adding a
/// trailing slash, a moved path), up to [`MAX_REDIRECTS`]. A redirect to another host,
/// port or scheme is not followed and comes back as the answer: the client strips
/// `Authorization` across hosts but would carry Evolution's `apikey` header (and any
/// other custom credential header) to wherever the `Location` points, and a `baseUrl`
/// is written by whoever writes the Channel. Not following any redirect would do too,
/// but would break a same-host redirect that leaks nothing.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let stays = attempt.previous().first().is_some_and(|first| same_origin(first, attempt.url()));
        if !stays || attempt.previous().len() > MAX_REDIRECTS { attempt.stop() } else { attempt.follow() }
    })
}

/// The refusal of an answer that is a redirect the client did not follow (to another
/// origin, or too many): the provider did not take the request, and every request of
/// the channel would end the same, so a person must point the channel at the final
/// address.
pub(crate) fn unfollowed_redirect(reply: &Reply) -> Option<ProviderError> {
    if !(300..400).contains(&reply.status) {
        return None;
    }
    let to = reply.location.as_deref().unwrap_or("nowhere");
    Some(ProviderError {
        class: super::ErrorClass::StopChannel,
        code: "redirect_not_followed".to_owned(),
        message: format!(
            "the provider answered HTTP {} redirecting to {to}; credentials are never sent to another host, port or scheme: set the channel's base URL to the final address",
            reply.status
        ),
        retry_after: None,
    })
}

/// `base` with path segments appended, each percent-encoded (an Evolution instance
/// name may hold spaces). A base that is not a URL is joined as text: the request then
/// fails to build and the send ends `StopChannel`.
pub(crate) fn endpoint(base: &str, segments: &[&str]) -> String {
    let base = base.trim_end_matches('/');
    if let Ok(mut url) = reqwest::Url::parse(base) {
        let appended = url.path_segments_mut().map(|mut path| {
            path.pop_if_empty().extend(segments);
        });
        if appended.is_ok() {
            return url.into();
        }
    }
    format!("{base}/{}", segments.join("/"))
}

/// A complete HTTP answer.
pub(crate) struct Reply {
    pub status: u16,
    /// `Retry-After` in seconds, when the server sent one.
    pub retry_after: Option<Duration>,
    /// `Location`, when the server sent one (a redirect that was not followed).
    pub location: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why no complete answer arrived.
pub(crate) struct Failure {
    /// Whether the request provably never left.
    pub never_sent: bool,
    pub source: reqwest::Error,
}

impl Failure {
    /// The error and its causes on one line, for the message history.
    pub(crate) fn describe(&self) -> String {
        let mut text = self.source.to_string();
        let mut cause = std::error::Error::source(&self.source);
        while let Some(inner) = cause {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            cause = inner.source();
        }
        text
    }
}

/// Sends a request and reads the whole answer.
pub(crate) async fn exchange(request: reqwest::RequestBuilder) -> std::result::Result<Reply, Failure> {
    let response = request.send().await.map_err(|source| Failure {
        // Connect errors (refused, DNS, connect timeout) happen before a byte of the
        // request is written; a request that could not even be built never left either.
        never_sent: source.is_connect() || source.is_builder(),
        source,
    })?;
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(200).collect());
    let body = response.bytes().await.map_err(|source| Failure { never_sent: false, source })?;
    Ok(Reply { status, retry_after, location, body: body.to_vec() })
}

/// The longest wait a `Retry-After` header is taken at. Anything beyond is a server's
/// mistake or an attack, and a date that far out would overflow the schedule.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A `Retry-After` in seconds (the form both providers use), at most
/// [`MAX_RETRY_AFTER`]; a number too large for any integer is a long wait too. An
/// HTTP date or garbage is ignored (`None`): the sender's own schedule applies.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// How one provider reads its answers.
pub(crate) trait Wire {
    /// The message id of a 2xx answer, or `None` when the body is not what a success
    /// looks like.
    fn accepted_id(&self, body: &[u8]) -> Option<String>;
    /// What a non-2xx answer says: a classified refusal, or nothing conclusive.
    fn rejection(&self, status: u16, body: &[u8]) -> Answer;
}

/// Sends one message request and maps every ending to a [`SendOutcome`].
pub(crate) async fn send(request: reqwest::RequestBuilder, wire: &impl Wire) -> SendOutcome {
    match exchange(request).await {
        Err(failure) if failure.source.is_builder() => SendOutcome::Rejected(ProviderError {
            // A URL that cannot be built fails every message alike: a person must fix
            // the channel's settings.
            class: super::ErrorClass::StopChannel,
            code: "invalid_request".to_owned(),
            message: failure.describe(),
            retry_after: None,
        }),
        Err(failure) if failure.never_sent => SendOutcome::Rejected(ProviderError::network(failure.describe())),
        Err(failure) => {
            SendOutcome::Unknown { reason: format!("no answer after the request was sent: {}", failure.describe()) }
        }
        Ok(reply) if reply.is_success() => match wire.accepted_id(&reply.body) {
            Some(id) => SendOutcome::Accepted { provider_message_id: id },
            None => SendOutcome::Unknown { reason: format!("HTTP {} with an unreadable body", reply.status) },
        },
        Ok(reply) if (300..400).contains(&reply.status) => match unfollowed_redirect(&reply) {
            Some(error) => SendOutcome::Rejected(error),
            None => SendOutcome::Unknown { reason: format!("HTTP {}", reply.status) },
        },
        Ok(reply) => match wire.rejection(reply.status, &reply.body) {
            Answer::Refused(mut error) => {
                if reply.retry_after.is_some() {
                    error.retry_after = reply.retry_after;
                }
                SendOutcome::Rejected(error)
            }
            inconclusive @ Answer::Inconclusive(_) => inconclusive.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_encode_their_segments() {
        assert_eq!(
            endpoint("https://graph.facebook.com/", &["v23.0", "1065", "messages"]),
            "https://graph.facebook.com/v23.0/1065/messages"
        );
        assert_eq!(
            endpoint("http://evo:8080/api", &["message", "sendText", "my instance"]),
            "http://evo:8080/api/message/sendText/my%20instance"
        );
        assert_eq!(endpoint("not a url", &["a"]), "not a url/a");
    }

    #[test]
    fn retry_after_is_clamped_to_a_day() {
        assert_eq!(parse_retry_after("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("10000000000000"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("86401"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-5"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn a_bare_request_timeout_keeps_connects_shorter() {
        let t = Timeouts::from(Duration::from_secs(30));
        assert_eq!(t.connect, Duration::from_secs(5));
        let t = Timeouts::from(Duration::from_secs(2));
        assert_eq!(t.connect, Duration::from_secs(1));
    }

    #[test]
    fn connect_must_be_shorter_than_the_request() {
        let bad = Timeouts { connect: Duration::from_secs(10), request: Duration::from_secs(10) };
        assert!(matches!(http_client(bad), Err(Error::InvalidTimeouts { .. })));
        assert!(http_client(Timeouts::default()).is_ok());
    }
}
