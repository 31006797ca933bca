//! The batch loop: reserve tokens, claim that many due messages with the intent to send
//! them (giving back the tokens of messages that were not due), send them concurrently,
//! write the outcomes and drop the intent in one transaction, repeat until every message
//! of the batch is final (`store::blocks`, and docs/architecture.md, "One write per
//! message"). On an uncapped channel nothing is reserved and nothing counted first: a
//! block is two transactions, its claim and its record.

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
use crate::account;
use crate::api::{QualityPolicy, RateLimitMode, TemplateCategory};
use crate::providers::meta::CallbackData;
use crate::providers::{Content, OutboundMessage, ProviderClient, SendOutcome};
use crate::store::{self, blocks, messages, pauses, rate};

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
        /// Meta's category of the template.
        #[serde(default)]
        category: TemplateCategory,
    },
    /// Plain text that may use contact variables.
    Text(String),
}

impl MessageTemplate {
    /// The message a Campaign's spec describes: the one conversion from the API type
    /// (None: the spec has neither a template nor a text, which the CRD forbids).
    pub(crate) fn from_spec(spec: &crate::api::MessageSpec) -> Option<Self> {
        match (&spec.template, &spec.text) {
            (Some(t), _) => Some(MessageTemplate::Template {
                name: t.name.clone(),
                language: t.language.clone(),
                body_parameters: t.body_parameters.iter().map(|p| p.0.clone()).collect(),
                category: t.category,
            }),
            (None, Some(text)) => Some(MessageTemplate::Text(text.clone())),
            (None, None) => None,
        }
    }

    /// The template's category; None for a text message (not business-initiated).
    pub fn category(&self) -> Option<TemplateCategory> {
        match self {
            MessageTemplate::Template { category, .. } => Some(*category),
            MessageTemplate::Text(_) => None,
        }
    }

    /// The template's name and language, if a template.
    pub(crate) fn template_key(&self) -> Option<(&str, &str)> {
        match self {
            MessageTemplate::Template { name, language, .. } => Some((name, language)),
            MessageTemplate::Text(_) => None,
        }
    }

    /// The strings rendered per contact (they may use contact variables).
    pub(crate) fn rendered_texts(&self) -> Vec<&str> {
        match self {
            MessageTemplate::Template { body_parameters, .. } => body_parameters.iter().map(String::as_str).collect(),
            MessageTemplate::Text(text) => vec![text.as_str()],
        }
    }
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
    /// What Meta's account signals mean for this batch (Meta channels only).
    pub account: Option<AccountSettings>,
}

/// How a Meta channel's account signals apply to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSettings {
    /// The portfolio whose 24 h unique-recipient budget templates count in.
    pub portfolio: Option<String>,
    /// What a degraded quality does to marketing messages.
    pub quality_policy: QualityPolicy,
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
    /// The provider refused this campaign's message (a paused template, a message type
    /// the provider cannot send): this campaign stops, the channel goes on.
    CampaignStopped(String),
    /// Asked to stop (SIGTERM): unfinished messages stay for a later run.
    Interrupted,
    /// Meta's account signals hold the campaign back (a degraded number, a paused
    /// template, a restriction): the controller pauses it until they lift (why).
    Held(String),
}

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

fn render_content(
    template: &MessageTemplate,
    contact: &ContactView<'_>,
) -> std::result::Result<Content, super::render::RenderError> {
    Ok(match template {
        MessageTemplate::Template { name, language, body_parameters, .. } => Content::Template {
            name: name.clone(),
            language: language.clone(),
            body_parameters: body_parameters
                .iter()
                .map(|p| render(p, contact))
                .collect::<std::result::Result<_, _>>()?,
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
    let interrupted = retrying("recovering interrupted sends", || blocks::recover(pool, job.campaign, job.batch, &run_id))
        .await?
        // rows a sender of an earlier version left `sending`
        + retrying("recovering interrupted sends", || messages::recover_interrupted(pool, job.campaign, job.batch))
            .await?;
    if interrupted > 0 {
        warn!(interrupted, "messages left mid-send by a previous run are now unknown (never re-sent)");
    }
    let outcome = run_lanes(pool, job, client.clone(), metrics, shutdown, &run_id).await?;
    if shutdown.is_cancelled() && outcome == BatchEnd::Done {
        let remaining =
            retrying("counting what remains", || messages::batch_remaining(pool, job.campaign, job.batch)).await?;
        if remaining.pending > 0 {
            return Ok(BatchEnd::Interrupted);
        }
    }
    Ok(outcome)
}

/// Runs the lanes until each ends; the first end other than `Done` wins.
async fn run_lanes(
    pool: &PgPool,
    job: &BatchJob,
    client: Arc<dyn ProviderClient>,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    run_id: &str,
) -> Result<BatchEnd> {
    // Lanes overlap one block's database round trips with another block's provider
    // calls. Each lane claims its own messages (SKIP LOCKED) and reserves its own
    // tokens, so the caps hold whatever the number of lanes.
    let stop_lanes = shutdown.child_token();
    // A cancel or a hold by Meta's signals stops the lanes at once, even mid-block:
    // messages still waiting for their send slot are given back (a cancelled campaign
    // records them `cancelled`).
    let watcher = tokio::spawn(watch(pool.clone(), job.clone(), stop_lanes.clone()));
    let lanes = (0..job.lanes.max(1)).map(|_| {
        let client = client.clone();
        let stop_lanes = stop_lanes.clone();
        async move {
            let mut usage = UsageTally::new();
            let sent = send_blocks(pool, job, client, metrics, &stop_lanes, run_id, &mut usage).await;
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
    let held = if watcher.is_finished() {
        watcher.await.ok().flatten()
    } else {
        watcher.abort();
        None
    };
    let mut outcome = held.unwrap_or(BatchEnd::Done);
    for end in ends {
        match end? {
            BatchEnd::Done => {}
            BatchEnd::Interrupted if !shutdown.is_cancelled() => {}
            other if outcome == BatchEnd::Done || outcome == BatchEnd::Interrupted => outcome = other,
            _ => {}
        }
    }
    Ok(outcome)
}

/// Cancels `lanes` when the campaign is cancelled, or when Meta's signals hold it back
/// (then returns how the batch ends), looking every second.
async fn watch(pool: PgPool, job: BatchJob, lanes: CancellationToken) -> Option<BatchEnd> {
    loop {
        tokio::select! {
            _ = lanes.cancelled() => return None,
            _ = tokio::time::sleep(PAUSE_CHECK_EVERY) => {}
        }
        // A failed look is tried again a second later; the lanes report store errors.
        if store::campaigns::is_cancelled(&pool, job.campaign).await.unwrap_or(false) {
            info!("the campaign was cancelled; stopping");
            lanes.cancel();
            return None;
        }
        let Some(settings) = &job.account else { continue };
        let key = job.message.template_key();
        if let Ok((_, signals)) = store::account::signals(&pool, &job.organization, &job.channel, key).await
            && let Some(hold) = account::hold(&signals, settings.quality_policy, job.message.category(), Utc::now())
        {
            info!(reason = hold.reason(), "Meta's signals hold the campaign back; stopping mid-block");
            lanes.cancel();
            return Some(BatchEnd::Held(hold.message()));
        }
    }
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
        let uncounted = self.uncounted;
        retrying("counting usage", || rate::count_usage(pool, &job.organization, &job.channel, uncounted)).await?;
        self.uncounted = 0;
        self.flushed_at = std::time::Instant::now();
        Ok(())
    }
}

/// How long a Hard channel's sender waits in place for a spent window; a longer wait
/// ends the run (exit 75) so the controller suspends the Job instead of idling a pod.
const WAIT_IN_PLACE: chrono::Duration = chrono::Duration::seconds(60);

/// What a lane does after looking at the shared state.
enum Look {
    /// Send.
    Go,
    /// The state was waited out (or the look changed the caps): look again.
    Again,
    /// End the lane.
    End(BatchEnd),
}

/// Looks at what other parts of the system decided: a channel pause (by a sender or a
/// person), a stop of this campaign, a cancel, and the channel's current caps (an edited
/// Channel reaches running senders here).
async fn look(pool: &PgPool, job: &BatchJob, caps: &mut Caps, shutdown: &CancellationToken) -> Result<Look> {
    let state =
        retrying("reading the send state", || pauses::send_state(pool, &job.organization, &job.channel, job.campaign))
            .await?;
    if let Some(new) = state.limits
        && new != caps.channel
    {
        info!(?new, "the channel's caps changed; using them from now on");
        caps.channel = new;
    }
    caps.in_force = caps.channel;
    if state.cancelled {
        // Nothing more is claimed for a cancelled campaign; what is pending was cancelled.
        return Ok(Look::End(BatchEnd::Done));
    }
    if let Some((code, message)) = state.campaign_stop {
        return Ok(Look::End(BatchEnd::CampaignStopped(format!("provider error {code}: {message}"))));
    }
    match state.channel_pause {
        None => match &job.account {
            Some(settings) => look_at_account(pool, job, settings, caps, shutdown).await,
            None => Ok(Look::Go),
        },
        Some(pauses::ChannelPause::ProviderRefused { code, message }) => {
            Ok(Look::End(BatchEnd::ChannelStopped(format!("provider error {code}: {message}"))))
        }
        Some(pauses::ChannelPause::WindowSpent { until }) => {
            if until - Utc::now() > WAIT_IN_PLACE {
                return Ok(Look::End(BatchEnd::RateLimited(until)));
            }
            info!(%until, "a cap of the channel is spent; waiting");
            Ok(if sleep_until(until, shutdown).await { Look::Again } else { Look::End(BatchEnd::Interrupted) })
        }
    }
}

/// The caps a lane keeps: the channel's, and those in force (the channel's, slowed
/// while a degraded number's policy says so).
struct Caps {
    channel: rate::Limits,
    in_force: rate::Limits,
}

/// Waits in place for a hold that ends within [`WAIT_IN_PLACE`], or ends the lane.
async fn wait_or_end(until: DateTime<Utc>, end: BatchEnd, shutdown: &CancellationToken) -> Look {
    if until - Utc::now() > WAIT_IN_PLACE {
        return Look::End(end);
    }
    if sleep_until(until, shutdown).await { Look::Again } else { Look::End(BatchEnd::Interrupted) }
}

/// Looks at what Meta said of the account (docs/providers.md, "Account health
/// signals"): a hold ends the lane, a spent portfolio budget rate-limits it, a degraded
/// number under the `Slow` policy halves the caps.
async fn look_at_account(
    pool: &PgPool,
    job: &BatchJob,
    settings: &AccountSettings,
    caps: &mut Caps,
    shutdown: &CancellationToken,
) -> Result<Look> {
    let (view, signals) = retrying("reading the account's signals", || {
        store::account::signals(pool, &job.organization, &job.channel, job.message.template_key())
    })
    .await?;
    let category = job.message.category();
    if let Some(hold) = account::hold(&signals, settings.quality_policy, category, Utc::now()) {
        info!(reason = hold.reason(), "Meta's signals hold the campaign back");
        return Ok(match hold.until() {
            Some(until) => wait_or_end(until, BatchEnd::Held(hold.message()), shutdown).await,
            None => Look::End(BatchEnd::Held(hold.message())),
        });
    }
    if category.is_some()
        && settings.portfolio.is_some()
        && let Some(until) = view.budget_spent_until
    {
        info!(%until, "the portfolio's 24 h messaging limit is spent; waiting");
        return Ok(wait_or_end(until, BatchEnd::RateLimited(until), shutdown).await);
    }
    if account::slows_down(&signals, settings.quality_policy, category) {
        caps.in_force = account::slowed(&caps.channel);
    }
    Ok(Look::Go)
}

/// Counts the block's recipients in the portfolio's 24 h unique-recipient budget
/// (templates on a channel that names its portfolio). Returns the messages admitted, the
/// requeues of the others, and when the budget has room again if some were refused.
async fn admit_to_budget(
    pool: &PgPool,
    job: &BatchJob,
    claimed: Vec<messages::ClaimedMessage>,
) -> Result<(Vec<messages::ClaimedMessage>, Vec<(i64, messages::Outcome)>, Option<DateTime<Utc>>)> {
    let Some(portfolio) = job.account.as_ref().and_then(|a| a.portfolio.as_deref()) else {
        return Ok((claimed, Vec::new(), None));
    };
    if job.message.category().is_none() || claimed.is_empty() {
        return Ok((claimed, Vec::new(), None));
    }
    let recipients: Vec<&str> = claimed.iter().map(|m| m.phone.as_str()).collect();
    let admission = retrying("counting recipients in the messaging limit", || {
        store::account::admit(pool, &job.organization, portfolio, &recipients)
    })
    .await?;
    let Some(until) = admission.blocked_until else { return Ok((claimed, Vec::new(), None)) };
    let (admitted, refused): (Vec<_>, Vec<_>) =
        claimed.into_iter().zip(admission.admitted).partition(|(_, admitted)| *admitted);
    // Due again at once: the campaign is RateLimited until the budget has room, and room
    // may come before `until` (a higher tier), so the messages must not wait for it.
    let now = Utc::now();
    let requeues = refused.into_iter().map(|(m, _)| (m.id, messages::Outcome::Requeue { at: now })).collect();
    Ok((admitted.into_iter().map(|(m, _)| m).collect(), requeues, Some(until)))
}

/// Runs a store operation, retrying transient failures (connection lost, Postgres
/// restarting, serialization failures, deadlocks) with backoff for a few minutes, so a
/// database restart costs a pause instead of a failed pod. Every operation retried here
/// is safe to repeat: a claim writes nothing (a failed one's locks go with its
/// transaction), and settling a block's outcomes writes them only while its intent is
/// there.
async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = store::Result<T>>,
{
    let mut delay = Duration::from_millis(250);
    let give_up = std::time::Instant::now() + STORE_RETRY_FOR;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && std::time::Instant::now() < give_up => {
                warn!(error = %crate::telemetry::chain(&error), what, retry_in = ?delay, "Postgres failed; retrying");
                // Shutdown does not cut this short: an outcome must be recorded before
                // the process exits, or its message would end `unknown`.
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// How long transient store failures are retried before the sender gives up.
const STORE_RETRY_FOR: Duration = Duration::from_secs(300);

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
    let mut caps = Caps { channel: job.limits, in_force: job.limits };
    let mut looked_at: Option<std::time::Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(BatchEnd::Interrupted);
        }
        if looked_at.is_none_or(|at| at.elapsed() >= PAUSE_CHECK_EVERY) {
            looked_at = Some(std::time::Instant::now());
            match look(pool, job, &mut caps, shutdown).await? {
                Look::Go => {}
                Look::Again => {
                    looked_at = None;
                    continue;
                }
                Look::End(end) => return Ok(end),
            }
        }
        let (reservation, intent, claimed) =
            match take_block(pool, job, &caps.in_force, metrics, shutdown, usage, run_id).await? {
                Taken::Block(reservation, intent, claimed) => (reservation, intent, claimed),
                Taken::Again => continue,
                Taken::End(end) => return Ok(end),
            };
        let (claimed, over_budget, budget_until) = admit_to_budget(pool, job, claimed).await?;
        if !over_budget.is_empty() {
            let unused = over_budget.len() as u32;
            retrying("giving back tokens", || {
                rate::release(pool, &job.organization, &job.channel, &reservation, unused)
            })
            .await?;
        }
        if claimed.is_empty() {
            retrying("recording outcomes", || blocks::record(pool, intent, &over_budget, run_id)).await?;
            if let Some(until) = budget_until {
                metrics.rate_limit_waits.inc();
                info!(%until, "the portfolio's 24 h messaging limit is spent");
                match wait_or_end(until, BatchEnd::RateLimited(until), shutdown).await {
                    Look::End(end) => return Ok(end),
                    Look::Go | Look::Again => looked_at = None,
                }
            }
            continue;
        }
        let results = send_block(job, &client, metrics, shutdown, claimed, &reservation).await;
        let outcomes: Vec<(i64, messages::Outcome)> =
            over_budget.into_iter().chain(results.iter().map(|(id, o, _)| (*id, o.clone()))).collect();
        retrying("recording outcomes", || blocks::record(pool, intent, &outcomes, run_id)).await?;
        if let Some(end) = apply_effects(pool, job, metrics, shutdown, &results).await? {
            return Ok(end);
        }
    }
}

/// Claims a block of up to `limit` messages with the intent to send them. A claim that
/// failed may have committed its intent without the answer arriving: that intent is
/// deleted (no call was made for it) before claiming again.
async fn claim_block(pool: &PgPool, job: &BatchJob, limit: i64, run_id: &str) -> Result<blocks::Block> {
    let give_up = std::time::Instant::now() + STORE_RETRY_FOR;
    loop {
        let intent = Uuid::new_v4();
        match blocks::claim(pool, job.campaign, job.batch, limit, run_id, intent).await {
            Ok(block) => return Ok(block),
            Err(error) if error.is_transient() && std::time::Instant::now() < give_up => {
                warn!(error = %crate::telemetry::chain(&error), "claiming messages failed; retrying");
                retrying("forgetting a failed claim", || blocks::forget(pool, intent)).await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// What taking a block gave.
enum Taken {
    /// Tokens, the intent, and the messages claimed with them (never empty).
    Block(rate::Reservation, blocks::Intent, Vec<messages::ClaimedMessage>),
    /// Nothing due yet, or the caps made the lane wait: go round again.
    Again,
    /// The lane ends.
    End(BatchEnd),
}

/// Reserves tokens and claims that many due messages (an uncapped channel claims first
/// and only counts). Waits for the next due message or token when there is none.
async fn take_block(
    pool: &PgPool,
    job: &BatchJob,
    limits: &rate::Limits,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    usage: &mut UsageTally,
    run_id: &str,
) -> Result<Taken> {
    let (reservation, claimed) = if limits.is_unlimited() {
        let claimed = claim_block(pool, job, i64::from(job.block_size), run_id).await?;
        usage.add(pool, job, claimed.messages.len()).await?;
        let counted = claimed.messages.len() as u32;
        (
            retrying("reserving tokens", || rate::reserve(pool, &job.organization, &job.channel, limits, counted))
                .await?,
            claimed,
        )
    } else {
        let remaining =
            retrying("counting what remains", || messages::batch_remaining(pool, job.campaign, job.batch)).await?;
        if remaining.pending == 0 {
            return Ok(Taken::End(BatchEnd::Done));
        }
        if let Some(due) = remaining.next_due.filter(|due| *due > Utc::now()) {
            return Ok(wait_for_due(due, shutdown).await);
        }
        // Reserving no more than is pending leaves the rest of a window to the
        // channel's other senders, even for the moment before unused tokens go back.
        let want = (job.block_size as i64).min(remaining.pending).max(1) as u32;
        let reservation =
            retrying("reserving tokens", || rate::reserve(pool, &job.organization, &job.channel, limits, want)).await?;
        if reservation.granted() == 0 {
            let until = reservation.blocked_until.unwrap_or_else(|| Utc::now() + chrono::Duration::seconds(1));
            return blocked(pool, job, limits, metrics, shutdown, until).await;
        }
        let granted = reservation.granted() as i64;
        (reservation, claim_block(pool, job, granted, run_id).await?)
    };
    if claimed.messages.len() < reservation.granted() {
        let unused = (reservation.granted() - claimed.messages.len()) as u32;
        retrying("giving back tokens", || rate::release(pool, &job.organization, &job.channel, &reservation, unused))
            .await?;
    }
    if let Some(intent) = claimed.intent {
        return Ok(Taken::Block(reservation, intent, claimed.messages));
    }
    let remaining =
        retrying("counting what remains", || messages::batch_remaining(pool, job.campaign, job.batch)).await?;
    if remaining.pending == 0 {
        return Ok(Taken::End(BatchEnd::Done));
    }
    match remaining.next_due.filter(|due| *due > Utc::now()) {
        Some(due) => Ok(wait_for_due(due, shutdown).await),
        // Another lane holds the due messages for a moment.
        None => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Taken::Again)
        }
    }
}

/// The longest a sender waits in place for its next due message (a retry's backoff).
/// A later one (a message Meta's per-user marketing limit put back for a day) ends the
/// batch: the controller sends it with a new Job when it is due, instead of a pod
/// idling for a day.
const WAIT_FOR_DUE_IN_PLACE: chrono::Duration = chrono::Duration::minutes(15);

/// Waits for the next due message, or ends the batch when it is far off.
async fn wait_for_due(due: DateTime<Utc>, shutdown: &CancellationToken) -> Taken {
    if due - Utc::now() > WAIT_FOR_DUE_IN_PLACE {
        info!(%due, "the next message is due much later; a later Job sends it");
        return Taken::End(BatchEnd::Done);
    }
    if sleep_until(due, shutdown).await { Taken::Again } else { Taken::End(BatchEnd::Interrupted) }
}

/// A cap is spent until `until`. Hard: the channel pauses (its campaigns show
/// `RateLimited`), and a long wait ends the run so the controller suspends the Job.
/// Graceful: the sender waits for the next token.
async fn blocked(
    pool: &PgPool,
    job: &BatchJob,
    limits: &rate::Limits,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    until: DateTime<Utc>,
) -> Result<Taken> {
    metrics.rate_limit_waits.inc();
    if limits.mode == RateLimitMode::Hard {
        retrying("pausing the channel", || pauses::pause_for_window(pool, &job.organization, &job.channel, until))
            .await?;
        if until - Utc::now() > WAIT_IN_PLACE {
            return Ok(Taken::End(BatchEnd::RateLimited(until)));
        }
    }
    Ok(if sleep_until(until, shutdown).await { Taken::Again } else { Taken::End(BatchEnd::Interrupted) })
}

/// Sends one block concurrently, each message at its reserved slot. A message still
/// waiting for its slot when the lane is told to stop is requeued, never left to be
/// killed mid-wait (which would make it `unknown`); so is one that woke too late for
/// its spaced slot: sent now, it would be closer than the channel's minimum gap to the
/// next slot's send (`rate::missed_slot`).
async fn send_block(
    job: &BatchJob,
    client: &Arc<dyn ProviderClient>,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    claimed: Vec<messages::ClaimedMessage>,
    reservation: &rate::Reservation,
) -> Vec<(i64, messages::Outcome, Effect)> {
    let (expires_at, spaced) = (reservation.expires_at, reservation.spaced);
    futures::stream::iter(claimed.into_iter().zip(reservation.slots.clone()))
        .map(|(message, slot)| {
            let client = client.clone();
            async move {
                let wait = (slot - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                let waited = tokio::select! {
                    _ = shutdown.cancelled() => false,
                    _ = tokio::time::sleep(wait) => true,
                };
                // A token from a window that has ended is void: spending it would put
                // this send into the next window, over its cap.
                let now = Utc::now();
                if !waited
                    || expires_at.is_some_and(|end| now + TOKEN_MARGIN >= end)
                    || (spaced && rate::missed_slot(slot, now))
                {
                    return (message.id, messages::Outcome::Requeue { at: now }, Effect::Continue);
                }
                send_one(job, client.as_ref(), metrics, message).await
            }
        })
        .buffer_unordered(job.block_size.max(1) as usize)
        .collect()
        .await
}

/// Renders and sends one message, and decides what its answer means.
async fn send_one(
    job: &BatchJob,
    client: &dyn ProviderClient,
    metrics: &SenderMetrics,
    message: messages::ClaimedMessage,
) -> (i64, messages::Outcome, Effect) {
    let contact = ContactView { name: message.name.as_deref(), phone: &message.phone, attributes: &message.attributes };
    let content = match render_content(&job.message, &contact) {
        Ok(content) => content,
        Err(error) => {
            return (
                message.id,
                messages::Outcome::Failed { code: "render".into(), message: error.to_string() },
                Effect::Continue,
            );
        }
    };
    let outbound = OutboundMessage {
        to: message.phone.clone(),
        content,
        callback_data: CallbackData { message_id: message.id, campaign: Some(job.campaign) }.encode(),
    };
    let started = std::time::Instant::now();
    let answer = client.send(&outbound).await;
    metrics.provider_latency.observe(started.elapsed().as_secs_f64());
    let (outcome, effect) = decide(
        &answer,
        message.attempts.max(1) as u32,
        message.marketing_requeues,
        &job.backoff,
        Utc::now(),
        rand::random::<f64>(),
    );
    let code = match &answer {
        SendOutcome::Rejected(e) => e.code.as_str(),
        _ => "",
    };
    metrics.count(outcome_label(&outcome), code);
    (message.id, outcome, effect)
}

/// Carries out what the block's answers mean for the rest of the batch: stop the
/// channel, stop this campaign, or slow down. Returns how the lane ends, if it does.
async fn apply_effects(
    pool: &PgPool,
    job: &BatchJob,
    metrics: &SenderMetrics,
    shutdown: &CancellationToken,
    results: &[(i64, messages::Outcome, Effect)],
) -> Result<Option<BatchEnd>> {
    let mut slow_down = Duration::ZERO;
    for (_, _, effect) in results {
        match effect {
            Effect::Continue => {}
            Effect::SlowDown(d) => slow_down = slow_down.max(*d),
            Effect::StopChannel { code, message } => {
                retrying("stopping the channel", || {
                    pauses::stop_channel(pool, &job.organization, &job.channel, code, message)
                })
                .await?;
                return Ok(Some(BatchEnd::ChannelStopped(format!("provider error {code}: {message}"))));
            }
            Effect::StopCampaign { code, message } => {
                if let Some(end) = hold_for_template(pool, job, code, message).await? {
                    return Ok(Some(end));
                }
                retrying("stopping the campaign", || pauses::stop_campaign(pool, job.campaign, code, message)).await?;
                return Ok(Some(BatchEnd::CampaignStopped(format!("provider error {code}: {message}"))));
            }
        }
    }
    if !slow_down.is_zero() {
        metrics.rate_limit_waits.inc();
        if !sleep_until(Utc::now() + chrono::Duration::from_std(slow_down).unwrap_or_default(), shutdown).await {
            return Ok(Some(BatchEnd::Interrupted));
        }
    }
    Ok(None)
}

/// Meta refused the campaign's template because it paused or disabled it (132015,
/// 132016): that is the template's status, which Meta's `APPROVED` webhook lifts, so it
/// is recorded as such and the campaign is held rather than stopped for a person. Only
/// when the channel's WABA is known (the webhook routes by it).
async fn hold_for_template(pool: &PgPool, job: &BatchJob, code: &str, message: &str) -> Result<Option<BatchEnd>> {
    let status = match code {
        "132015" => "PAUSED",
        "132016" => "DISABLED",
        _ => return Ok(None),
    };
    let Some(template) = job.message.template_key().filter(|_| job.account.is_some()) else { return Ok(None) };
    let recorded = retrying("recording the template's status", || {
        store::account::record_template_refusal(pool, &job.organization, &job.channel, template, status)
    })
    .await?;
    Ok(recorded.then(|| BatchEnd::Held(format!("Meta refused the template ({code}: {message})"))))
}

fn outcome_label(outcome: &messages::Outcome) -> &'static str {
    match outcome {
        messages::Outcome::Sent { .. } => "sent",
        messages::Outcome::RetryAt { .. } => "retry",
        messages::Outcome::Requeue { .. } => "requeued",
        messages::Outcome::MarketingHeld { .. } => "marketing_limited",
        messages::Outcome::Failed { .. } => "failed",
        messages::Outcome::Unknown { .. } => "unknown",
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(e)
    }
}
