//! The batch loop: reserve tokens, claim that many due messages (giving back the tokens
//! of messages that were not due), send them concurrently, record the outcomes in one
//! statement, repeat until every message of the batch is final. On an uncapped channel
//! nothing is reserved and nothing counted first: a block is two statements, its claim
//! and its record.

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
            let mut usage = UsageTally::new();
            let sent = send_blocks(pool, job, client, metrics, &stop_lanes, &run_id, &mut usage).await;
            let counted = usage.flush(pool, job).await;
            let end = sent.and_then(|end| counted.map(|()| end));
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

/// How often a lane on an uncapped channel adds what it sent to the channel's usage.
const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What a lane sent on an uncapped channel and has not yet added to the channel's
/// usage: counting once a second instead of once a block keeps a statement off the
/// send path, and the usage is only shown, never enforced, on such a channel.
struct UsageTally {
    uncounted: u32,
    flushed_at: std::time::Instant,
}

impl UsageTally {
    fn new() -> Self {
        UsageTally { uncounted: 0, flushed_at: std::time::Instant::now() }
    }

    async fn add(&mut self, pool: &PgPool, job: &BatchJob, sent: usize) -> Result<()> {
        self.uncounted = self.uncounted.saturating_add(u32::try_from(sent).unwrap_or(u32::MAX));
        if self.flushed_at.elapsed() >= USAGE_FLUSH_EVERY {
            self.flush(pool, job).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, pool: &PgPool, job: &BatchJob) -> Result<()> {
        rate::count_usage(pool, &job.organization, &job.channel, self.uncounted).await?;
        self.uncounted = 0;
        self.flushed_at = std::time::Instant::now();
        Ok(())
    }
}

/// Sends block after block until the batch is done, the channel stops it, or shutdown.
async fn send_blocks(
    pool: &PgPool,
    job: &BatchJob,
    client: Arc<dyn ProviderClient>,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    run_id: &str,
    usage: &mut UsageTally,
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
        let (reservation, claimed) = if job.limits.is_unlimited() {
            let claimed = messages::claim_due(pool, job.campaign, job.batch, i64::from(job.block_size)).await?;
            usage.add(pool, job, claimed.len()).await?;
            (rate::reserve(pool, &job.organization, &job.channel, &job.limits, claimed.len() as u32).await?, claimed)
        } else {
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
            // Reserving no more than is pending leaves the rest of a window to the
            // channel's other senders, even for the moment before unused tokens go back.
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
            let claimed = messages::claim_due(pool, job.campaign, job.batch, reservation.granted() as i64).await?;
            (reservation, claimed)
        };
        if claimed.len() < reservation.granted() {
            let unused = (reservation.granted() - claimed.len()) as u32;
            rate::release(pool, &job.organization, &job.channel, &reservation, unused).await?;
        }
        if claimed.is_empty() {
            let remaining = messages::batch_remaining(pool, job.campaign, job.batch).await?;
            if remaining.pending == 0 {
                return Ok(BatchEnd::Done);
            }
            match remaining.next_due.filter(|due| *due > Utc::now()) {
                Some(due) => {
                    if !sleep_until(due, shutdown).await {
                        return Ok(BatchEnd::Interrupted);
                    }
                }
                // Another lane holds the due messages for a moment.
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
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
        messages::record_outcomes(pool, &outcomes, run_id).await?;
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
