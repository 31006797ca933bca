//! The batch loop: reserve tokens, claim that many due messages, send them
//! concurrently, record the outcomes in one statement, repeat until every message of the
//! batch is final.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::backoff::Backoff;
use super::decide::{Effect, decide};
use super::metrics::SenderMetrics;
use super::render::{ContactView, render};
use super::{Error, Result};
use crate::providers::{Content, OutboundMessage, ProviderClient, SendOutcome};
use crate::store::{self, messages, rate};

/// The message as configured (before per-contact rendering).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MessageTemplate {
    /// A Meta template with parameters that may use contact variables.
    Template {
        /// Template name.
        name: String,
        /// Language code.
        language: String,
        /// Body parameters.
        body_parameters: Vec<String>,
    },
    /// Plain text that may use contact variables.
    Text(String),
}

/// Everything one batch needs, besides the provider client.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// The campaign's UID.
    pub campaign: Uuid,
    /// Its namespace (organization).
    pub organization: String,
    /// Its channel's name (the rate windows are the channel's).
    pub channel: String,
    /// The batch index.
    pub batch: i32,
    /// What to send.
    pub message: MessageTemplate,
    /// Retry policy.
    pub backoff: Backoff,
    /// The channel's caps.
    pub limits: rate::Limits,
    /// Messages sent concurrently per lane (and claimed per block).
    pub block_size: u32,
    /// Blocks in flight at once.
    pub lanes: u32,
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnd {
    /// Every message is final.
    Done,
    /// The channel's day window is spent until this instant.
    RateLimited(DateTime<Utc>),
    /// The provider refused the channel's credentials, permissions or account.
    ChannelStopped(String),
    /// Asked to stop (SIGTERM): unfinished messages stay for a later run.
    Interrupted,
}

/// How long a channel stopped by an error that needs a person stays paused, unless a
/// person clears it earlier.
const STOPPED_CHANNEL_PAUSE: chrono::Duration = chrono::Duration::days(3650);

/// Tokens are not spent this close to the end of their window, so a request in flight
/// cannot land in the next window.
const TOKEN_MARGIN: chrono::Duration = chrono::Duration::milliseconds(300);

/// Sleeps until `until` or until shutdown; returns false on shutdown.
async fn sleep_until(until: DateTime<Utc>, shutdown: &CancellationToken) -> bool {
    let wait = (until - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

fn render_content(template: &MessageTemplate, contact: &ContactView<'_>) -> std::result::Result<Content, super::render::RenderError> {
    Ok(match template {
        MessageTemplate::Template { name, language, body_parameters } => Content::Template {
            name: name.clone(),
            language: language.clone(),
            body_parameters: body_parameters.iter().map(|p| render(p, contact)).collect::<std::result::Result<_, _>>()?,
        },
        MessageTemplate::Text(text) => Content::Text(render(text, contact)?),
    })
}

/// Runs one batch to its end.
pub async fn run_batch(
    pool: &PgPool,
    job: &BatchJob,
    client: Arc<dyn ProviderClient>,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
) -> Result<BatchEnd> {
    let run_id = Uuid::new_v4().simple().to_string();
    let interrupted = messages::recover_interrupted(pool, job.campaign, job.batch).await?;
    if interrupted > 0 {
        warn!(interrupted, "messages left mid-send by a previous run are now unknown (never re-sent)");
    }
    // Lanes overlap one block's database round trips with another block's provider
    // calls. Each lane claims its own messages (SKIP LOCKED) and reserves its own
    // tokens, so the caps hold whatever the number of lanes.
    let stop_lanes = shutdown.child_token();
    let lanes = (0..job.lanes.max(1)).map(|_| {
        let client = client.clone();
        let stop_lanes = stop_lanes.clone();
        let run_id = run_id.clone();
        async move {
            let end = lane(pool, job, client, metrics, &stop_lanes, &run_id).await;
            // One lane hitting the channel's limits (or an error) ends the batch.
            if !matches!(end, Ok(BatchEnd::Done)) {
                stop_lanes.cancel();
            }
            end
        }
    });
    let ends = futures::future::join_all(lanes).await;
    let mut outcome = BatchEnd::Done;
    for end in ends {
        match end? {
            BatchEnd::Done => {}
            BatchEnd::Interrupted if !shutdown.is_cancelled() => {}
            other if outcome == BatchEnd::Done || outcome == BatchEnd::Interrupted => outcome = other,
            _ => {}
        }
    }
    if shutdown.is_cancelled() && outcome == BatchEnd::Done {
        let remaining = messages::batch_remaining(pool, job.campaign, job.batch).await?;
        if remaining.pending > 0 {
            return Ok(BatchEnd::Interrupted);
        }
    }
    Ok(outcome)
}

/// How often a lane looks at the channel's pause (a person or another sender may set it).
const PAUSE_CHECK_EVERY: Duration = Duration::from_secs(1);

async fn lane(
    pool: &PgPool,
    job: &BatchJob,
    client: Arc<dyn ProviderClient>,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    run_id: &str,
) -> Result<BatchEnd> {
    let mut pause_checked: Option<std::time::Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(BatchEnd::Interrupted);
        }
        if pause_checked.is_none_or(|at| at.elapsed() >= PAUSE_CHECK_EVERY) {
            pause_checked = Some(std::time::Instant::now());
            if let Some((until, reason)) = rate::channel_pause(pool, &job.organization, &job.channel).await? {
                // The controller suspends the Job; until then, wait instead of burning restarts.
                info!(%until, %reason, "channel paused; waiting");
                if !sleep_until(until.min(Utc::now() + chrono::Duration::seconds(30)), shutdown).await {
                    return Ok(BatchEnd::Interrupted);
                }
                pause_checked = None;
                continue;
            }
        }
        let remaining = messages::batch_remaining(pool, job.campaign, job.batch).await?;
        if remaining.pending == 0 {
            return Ok(BatchEnd::Done);
        }
        if let Some(due) = remaining.next_due.filter(|due| *due > Utc::now()) {
            if !sleep_until(due, shutdown).await {
                return Ok(BatchEnd::Interrupted);
            }
            continue;
        }
        let want = (job.block_size as i64).min(remaining.pending).max(1) as u32;
        let reservation = rate::reserve(pool, &job.organization, &job.channel, &job.limits, want).await?;
        if reservation.granted() == 0 {
            let until = reservation.blocked_until.unwrap_or_else(|| Utc::now() + chrono::Duration::seconds(1));
            if reservation.day_spent {
                rate::pause_channel(pool, &job.organization, &job.channel, until, "the channel's day window is spent").await?;
                return Ok(BatchEnd::RateLimited(until));
            }
            metrics.rate_limit_waits.inc();
            if !sleep_until(until, shutdown).await {
                return Ok(BatchEnd::Interrupted);
            }
            continue;
        }
        let claimed = messages::claim_due(pool, job.campaign, job.batch, reservation.granted() as i64, run_id).await?;
        if claimed.is_empty() {
            // Another lane holds the due messages for a moment.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let slots = reservation.slots.clone();
        let expires_at = reservation.expires_at;
        let results: Vec<(i64, messages::Outcome, Effect)> = futures::stream::iter(claimed.into_iter().zip(slots))
            .map(|(message, slot)| {
                let client = client.clone();
                async move {
                    let now = Utc::now();
                    if slot > now {
                        tokio::time::sleep((slot - now).to_std().unwrap_or(Duration::ZERO)).await;
                    }
                    // A token from a window that has ended is void: spending it would put
                    // this send into the next window, over its cap.
                    if expires_at.is_some_and(|end| Utc::now() + TOKEN_MARGIN >= end) {
                        return (message.id, messages::Outcome::Requeue { at: Utc::now() }, Effect::Continue);
                    }
                    let contact = ContactView { name: message.name.as_deref(), phone: &message.phone, attributes: &message.attributes };
                    let content = match render_content(&job.message, &contact) {
                        Ok(content) => content,
                        Err(error) => {
                            return (message.id, messages::Outcome::Failed { code: "render".into(), message: error.to_string() }, Effect::Continue);
                        }
                    };
                    let outbound = OutboundMessage { to: message.phone.clone(), content, callback_data: format!("disparo:{}", message.id) };
                    let started = std::time::Instant::now();
                    let answer = client.send(&outbound).await;
                    metrics.provider_latency.observe(started.elapsed().as_secs_f64());
                    let (outcome, effect) = decide(&answer, message.attempts.max(1) as u32, &job.backoff, Utc::now(), rand::random::<f64>());
                    let code = match &answer {
                        SendOutcome::Rejected(e) => e.code.as_str(),
                        _ => "",
                    };
                    metrics.count(outcome_label(&outcome), code);
                    (message.id, outcome, effect)
                }
            })
            .buffer_unordered(job.block_size.max(1) as usize)
            .collect()
            .await;
        let outcomes: Vec<(i64, messages::Outcome)> = results.iter().map(|(id, o, _)| (*id, o.clone())).collect();
        messages::record_outcomes(pool, &outcomes).await?;
        let mut slow_down = Duration::ZERO;
        for (_, _, effect) in &results {
            match effect {
                Effect::Continue => {}
                Effect::SlowDown(d) => slow_down = slow_down.max(*d),
                Effect::StopChannel { code, message } => {
                    let reason = format!("provider error {code}: {message}");
                    rate::pause_channel(pool, &job.organization, &job.channel, Utc::now() + STOPPED_CHANNEL_PAUSE, &reason).await?;
                    return Ok(BatchEnd::ChannelStopped(reason));
                }
            }
        }
        if !slow_down.is_zero() {
            metrics.rate_limit_waits.inc();
            if !sleep_until(Utc::now() + chrono::Duration::from_std(slow_down).unwrap_or_default(), shutdown).await {
                return Ok(BatchEnd::Interrupted);
            }
        }
    }
}

fn outcome_label(outcome: &messages::Outcome) -> &'static str {
    match outcome {
        messages::Outcome::Sent { .. } => "sent",
        messages::Outcome::RetryAt { .. } => "retry",
        messages::Outcome::Requeue { .. } => "requeued",
        messages::Outcome::Failed { .. } => "failed",
        messages::Outcome::Unknown { .. } => "unknown",
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(e)
    }
}
