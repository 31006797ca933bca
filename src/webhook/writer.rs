//! The single writer of a webhook process: request handlers hand it their events and
//! wait; it groups whatever is queued into one transaction, commits, and only then
//! answers each handler, which only then answers the provider. A crash before the
//! commit therefore loses nothing: the provider got no 200 and retries.
//!
//! Grouping costs no latency when the service is idle (a lone request is applied at
//! once, unless `max_delay` asks to wait for company) and, under load, turns many small
//! transactions into few large ones: requests arriving while a transaction runs form
//! the next batch.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use super::metrics::WebhookMetrics;
use crate::store::receipts::{self, OptOut, ReceiptsReport, StatusEvent};

/// How the writer groups work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Stop adding requests to a batch once it holds this many events (a single
    /// request larger than this is still applied whole).
    pub max_events: usize,
    /// How long to wait for more requests once the queue is empty (zero: never wait).
    pub max_delay: Duration,
    /// Requests that may wait in the queue; beyond it, handlers wait to enqueue.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_events: 1000, max_delay: Duration::ZERO, queue: 4096 }
    }
}

/// Why events were not applied. Cloned to every request of a failed batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WriteError {
    /// Postgres is unreachable, shutting down, or kept losing races for the rows
    /// (`store::Error::is_transient`), or did not answer in time: the provider should
    /// retry (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Postgres refused the statement (a bug or unexpected data): 500, logged.
    #[error("database error: {0}")]
    Failed(String),
    /// The writer has stopped (the service is shutting down): 503.
    #[error("writer stopped")]
    Stopped,
}

/// Where a request waits for its part of a batch's result.
type Reply = oneshot::Sender<Result<ReceiptsReport, WriteError>>;

struct Job {
    statuses: Vec<StatusEvent>,
    opt_outs: Vec<OptOut>,
    reply: Reply,
}

impl Job {
    fn events(&self) -> usize {
        self.statuses.len() + self.opt_outs.len()
    }
}

/// A handle to the writer task. Cheap to clone; the task ends when every handle is gone.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task.
    pub fn spawn(pool: PgPool, config: BatchConfig, metrics: Arc<WebhookMetrics>) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let task = tokio::spawn(run(pool, config, metrics, rx));
        (Writer { tx }, task)
    }

    /// Applies events and opt-outs; returns once they are committed, or why not.
    /// Gives up after `timeout` (the events may still be applied later: a provider
    /// retry then finds them duplicates).
    pub(crate) async fn submit(
        &self,
        statuses: Vec<StatusEvent>,
        opt_outs: Vec<OptOut>,
        timeout: Duration,
    ) -> Result<ReceiptsReport, WriteError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { statuses, opt_outs, reply };
        let wait = async {
            self.tx.send(job).await.map_err(|_| WriteError::Stopped)?;
            answer.await.map_err(|_| WriteError::Stopped)?
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(WriteError::Unavailable(format!("not committed within {timeout:?}"))),
        }
    }
}

async fn run(pool: PgPool, config: BatchConfig, metrics: Arc<WebhookMetrics>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut events = first.events();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while events < config.max_events {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) if !config.max_delay.is_zero() => {
                    tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                }
                Err(_) => None,
            };
            let Some(job) = next else { break };
            events += job.events();
            jobs.push(job);
        }
        apply_jobs(&pool, jobs, &metrics).await;
    }
}

/// Applies a batch in one transaction. If Postgres rejects it for a reason other than
/// being unavailable, each request is retried alone, so one bad request cannot keep
/// failing the requests that happened to share its batch.
async fn apply_jobs(pool: &PgPool, jobs: Vec<Job>, metrics: &WebhookMetrics) {
    let mut statuses = Vec::new();
    let mut opt_outs = Vec::new();
    let mut parts: Vec<(Range<usize>, Range<usize>, Reply)> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let s = statuses.len()..statuses.len() + job.statuses.len();
        let o = opt_outs.len()..opt_outs.len() + job.opt_outs.len();
        statuses.extend(job.statuses);
        opt_outs.extend(job.opt_outs);
        parts.push((s, o, job.reply));
    }
    metrics.batch_requests.observe(parts.len() as f64);
    match apply_with_retry(pool, &statuses, &opt_outs, metrics).await {
        Ok(report) => {
            for (s, o, reply) in parts {
                let own =
                    ReceiptsReport { outcomes: report.outcomes[s].to_vec(), opted_out: report.opted_out[o].to_vec() };
                let _ = reply.send(Ok(own));
            }
        }
        Err(error @ WriteError::Failed(_)) if parts.len() > 1 => {
            warn!(%error, requests = parts.len(), "batch refused; applying its requests one by one");
            for (s, o, reply) in parts {
                let result = apply_with_retry(pool, &statuses[s], &opt_outs[o], metrics).await;
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            for (_, _, reply) in parts {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Attempts at a batch that failed for a transient reason (another replica or a sender
/// won a race for the same rows, a connection dropped) before answering 503.
const TRANSIENT_ATTEMPTS: usize = 3;

/// A batch is retried at once only within this time from its first attempt: a lost race
/// fails fast and wins on retry, while waiting out a pool that found no connection
/// again would only hold up the batches queued behind it.
const RETRY_WITHIN: Duration = Duration::from_secs(1);

async fn apply_with_retry(
    pool: &PgPool,
    statuses: &[StatusEvent],
    opt_outs: &[OptOut],
    metrics: &WebhookMetrics,
) -> Result<ReceiptsReport, WriteError> {
    let mut attempt = 0;
    let first = Instant::now();
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = receipts::apply(pool, statuses, opt_outs).await;
        metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(report) => {
                metrics.batch_events.observe((statuses.len() + opt_outs.len()) as f64);
                return Ok(report);
            }
            Err(error) if error.is_transient() && attempt < TRANSIENT_ATTEMPTS && first.elapsed() < RETRY_WITHIN => {
                continue;
            }
            Err(error) => {
                metrics.batch_failures.inc();
                let unavailable = error.is_transient();
                warn!(%error, unavailable, events = statuses.len() + opt_outs.len(), "applying webhook events failed");
                return Err(if unavailable {
                    WriteError::Unavailable(crate::telemetry::chain(&error))
                } else {
                    WriteError::Failed(crate::telemetry::chain(&error))
                });
            }
        }
    }
}
