//! Posting status webhooks the way the providers do: later, signed (Meta) or with a
//! shared-secret header (Evolution), retried on failure, sometimes twice, sometimes
//! out of order.
//!
//! Each accepted message gets one background task that walks its [`Post`] plan. The
//! tasks are bounded by a semaphore: when `max_in_flight` messages are pending, a new
//! message gets no webhooks (counted as dropped) instead of an unbounded task pile.
//! Shutdown cancels the tasks and waits for every one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::behaviour::{Post, Status};
use super::config::WebhookBehaviour;
use super::{Error, Result};
use crate::providers::signature::{META_SIGNATURE_HEADER, meta_signature};
use crate::providers::{Secret, Timeouts};

/// Where one provider's webhooks go and how they authenticate.
#[derive(Debug)]
pub struct Target {
    /// The receiver's URL.
    pub url: String,
    /// How the receiver can tell the POST is genuine.
    pub auth: Auth,
    /// Answers after which the provider stops retrying (Evolution: 400, 401, 403, 404,
    /// 422; Meta retries everything that is not a 200).
    pub give_up_on: &'static [u16],
}

/// Webhook authentication.
#[derive(Debug)]
pub(crate) enum Auth {
    /// Meta: `X-Hub-Signature-256` over the raw body with the app secret.
    MetaSignature(Secret),
    /// Evolution: a static header from `webhook.headers` (the value is marked sensitive).
    Header(HeaderName, HeaderValue),
}

/// Webhook counters, shown with the ledger.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    posted: AtomicU64,
    given_up: AtomicU64,
    dropped: AtomicU64,
}

/// Webhook counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WebhookCounts {
    /// POSTs the receiver answered with 2xx.
    pub posted: u64,
    /// POSTs abandoned after the last attempt or a non-retryable answer.
    pub given_up: u64,
    /// Messages that got no webhooks because too many were pending.
    pub dropped: u64,
}

impl Stats {
    /// Current counts.
    pub fn snapshot(&self) -> WebhookCounts {
        WebhookCounts {
            posted: self.posted.load(Ordering::Relaxed),
            given_up: self.given_up.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The webhook poster.
#[derive(Debug)]
pub(crate) struct Webhooks {
    http: reqwest::Client,
    behaviour: WebhookBehaviour,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
}

impl Webhooks {
    /// A poster whose tasks stop when `shutdown` is cancelled.
    pub fn new(behaviour: WebhookBehaviour, shutdown: CancellationToken) -> Result<Self> {
        let request = Duration::from_millis(behaviour.request_timeout_ms);
        let http = crate::providers::http_client(Timeouts::from(request)).map_err(Error::HttpClient)?;
        Ok(Webhooks {
            http,
            permits: Arc::new(Semaphore::new(behaviour.max_in_flight as usize)),
            behaviour,
            shutdown,
            stats: Arc::default(),
        })
    }

    /// Counters so far.
    pub fn counts(&self) -> WebhookCounts {
        self.stats.snapshot()
    }

    /// Posts a message's webhooks in the background, following `posts`; `body` renders
    /// the statuses of one post into the exact bytes sent (and signed).
    pub(crate) fn dispatch<F>(&self, target: Arc<Target>, posts: Vec<Post>, body: F)
    where
        F: Fn(&[Status]) -> Vec<u8> + Send + 'static,
    {
        if posts.is_empty() {
            return;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            warn!("too many pending webhooks; this message gets none");
            return;
        };
        let (http, behaviour, shutdown, stats) =
            (self.http.clone(), self.behaviour.clone(), self.shutdown.clone(), self.stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let start = tokio::time::Instant::now();
            for post in posts {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(start + post.after) => {}
                }
                let bytes = body(&post.statuses);
                deliver(&http, &target, bytes, &behaviour, &shutdown, &stats).await;
            }
        });
    }

    /// Posts one body now, with the provider's retries, and answers whether the
    /// receiver took it (2xx). For the control endpoints: a rehearsal that announces an
    /// account change wants to know the receiver has it before it goes on.
    pub(crate) async fn post_now(&self, target: &Target, body: Vec<u8>) -> bool {
        deliver(&self.http, target, body, &self.behaviour, &self.shutdown, &self.stats).await
    }

    /// Waits until every webhook task has ended (after the shutdown token is cancelled).
    pub(crate) async fn drain(&self) {
        // The semaphore is never closed, so this only waits.
        let _ = self.permits.acquire_many(self.behaviour.max_in_flight).await;
    }
}

/// One POST with the provider's retries; true when the receiver answered 2xx.
async fn deliver(
    http: &reqwest::Client,
    target: &Target,
    body: Vec<u8>,
    behaviour: &WebhookBehaviour,
    shutdown: &CancellationToken,
    stats: &Stats,
) -> bool {
    let mut wait = Duration::from_millis(behaviour.retry_base_ms);
    for attempt in 1..=behaviour.max_attempts {
        let mut request = http.post(&target.url).header(CONTENT_TYPE, "application/json").body(body.clone());
        request = match &target.auth {
            Auth::MetaSignature(secret) => {
                request.header(META_SIGNATURE_HEADER, meta_signature(secret.expose().as_bytes(), &body))
            }
            Auth::Header(name, value) => request.header(name.clone(), value.clone()),
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return false,
            outcome = request.send() => outcome,
        };
        match outcome {
            Ok(response) if response.status().is_success() => {
                stats.posted.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(response) if target.give_up_on.contains(&response.status().as_u16()) => {
                warn!(status = response.status().as_u16(), "webhook refused; not retrying");
                stats.given_up.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Ok(response) => debug!(status = response.status().as_u16(), attempt, "webhook answered with an error"),
            Err(error) => debug!(%error, attempt, "webhook POST failed"),
        }
        if attempt < behaviour.max_attempts {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = wait.saturating_mul(2);
        }
    }
    warn!(attempts = behaviour.max_attempts, "webhook abandoned after its last attempt");
    stats.given_up.fetch_add(1, Ordering::Relaxed);
    false
}
