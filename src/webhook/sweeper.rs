//! Kept receipts, swept: a receipt that arrived before its message's provider id was
//! recorded is kept by the writer (`unmatched_receipts`); this task matches kept
//! receipts again every `interval` and drops those older than `max_age`
//! (`store::receipts::sweep_unmatched`). A sweep rather than a trigger on the sender's
//! write keeps the rules for applying receipts in one place and the sender's statement
//! as cheap as it is (see `migrations/0004_unmatched_receipts.sql`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::WebhookMetrics;
use crate::store::receipts;

/// Starts the sweeper; it ends when `stop` is cancelled.
pub(crate) fn spawn(
    pool: PgPool,
    interval: Duration,
    max_age: Duration,
    metrics: Arc<WebhookMetrics>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let interval = interval.max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match receipts::sweep_unmatched(&pool, max_age).await {
                Ok(report) => {
                    metrics.kept_applied.inc_by(report.applied);
                    metrics.kept_expired.inc_by(report.expired);
                    if report.applied > 0 || report.expired > 0 {
                        debug!(applied = report.applied, expired = report.expired, "kept receipts swept");
                    }
                }
                Err(error) => {
                    metrics.sweep_failures.inc();
                    if error.is_transient() {
                        debug!(error = %crate::telemetry::chain(&error), "sweeping kept receipts failed; retrying at the next sweep");
                    } else {
                        warn!(error = %crate::telemetry::chain(&error), "sweeping kept receipts failed; retrying at the next sweep");
                    }
                }
            }
        }
    })
}
