//! Webhook metrics: events by provider, status and outcome; account signals by field
//! and outcome; requests by answer;
//! batch sizes and commit latency; request latency. Every label value comes from a
//! fixed set (no ids, namespaces or numbers), so cardinality stays bounded whatever
//! is posted.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the events counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabels {
    /// `meta` or `evolution`.
    pub provider: &'static str,
    /// `sent`, `delivered`, `read`, `failed`, `inbound`, or `none` (not parsed, ignored items).
    pub status: &'static str,
    /// `applied`, `duplicate`, `stale`, `unknown_id`, `rejected_signature`, `opted_out`,
    /// `unknown_contact`, `not_opt_out`, or why an item was ignored.
    pub outcome: &'static str,
}

/// Labels of the account signals counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SignalLabels {
    /// Meta's `field`: `phone_number_quality_update`, `business_capability_update`,
    /// `account_update`, `message_template_status_update`, `message_template_quality_update`.
    pub field: &'static str,
    /// `applied`, `no_portfolio`, `not_recorded`, or `invalid`.
    pub outcome: &'static str,
}

/// Labels of the requests counter and latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// `meta` or `evolution`.
    pub provider: &'static str,
    /// HTTP status code answered.
    pub code: u16,
}

/// Labels by provider only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProviderLabels {
    /// `meta` or `evolution`.
    pub provider: &'static str,
}

/// The webhook service's metrics.
#[derive(Clone)]
pub(crate) struct WebhookMetrics {
    /// Events by provider, status and outcome.
    pub events: Family<EventLabels, Counter>,
    /// Account health signals (Meta's account, number and template fields) by field and outcome.
    pub signals: Family<SignalLabels, Counter>,
    /// Requests by provider and answer.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from request to answer, by provider.
    pub request_seconds: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    /// Events (statuses and opt-outs) per committed transaction.
    pub batch_events: Histogram,
    /// Requests grouped into one transaction.
    pub batch_requests: Histogram,
    /// Seconds per batch transaction (begin to commit).
    pub batch_seconds: Histogram,
    /// Batch transactions that failed (each failed request was answered 503 or 500).
    pub batch_failures: Counter,
    /// Kept receipts (no message had their id when they came) applied by a sweep.
    pub kept_applied: Counter,
    /// Kept receipts dropped unapplied after a day.
    pub kept_expired: Counter,
    /// Sweeps of kept receipts that failed (retried at the next sweep).
    pub sweep_failures: Counter,
    /// Seconds from the provider's timestamp of a status to its application, by
    /// provider: how far receipts lag behind what happened.
    pub receipt_lag_seconds: Family<ProviderLabels, Histogram, fn() -> Histogram>,
}

fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 16))
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl WebhookMetrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = WebhookMetrics {
            events: Family::default(),
            signals: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            batch_requests: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            batch_seconds: latency_histogram(),
            batch_failures: Counter::default(),
            kept_applied: Counter::default(),
            kept_expired: Counter::default(),
            sweep_failures: Counter::default(),
            receipt_lag_seconds: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
        };
        registry.register(
            "disparo_webhook_events",
            "Webhook events by provider, status and outcome",
            metrics.events.clone(),
        );
        registry.register(
            "disparo_webhook_account_signals",
            "Account health signals (number quality, messaging limits, restrictions, templates) by field and outcome",
            metrics.signals.clone(),
        );
        registry.register(
            "disparo_webhook_requests",
            "Webhook requests by provider and HTTP status",
            metrics.requests.clone(),
        );
        registry.register(
            "disparo_webhook_request_seconds",
            "Webhook request latency",
            metrics.request_seconds.clone(),
        );
        registry.register(
            "disparo_webhook_batch_events",
            "Events applied per database transaction",
            metrics.batch_events.clone(),
        );
        registry.register(
            "disparo_webhook_batch_requests",
            "Requests grouped per database transaction",
            metrics.batch_requests.clone(),
        );
        registry.register(
            "disparo_webhook_batch_seconds",
            "Seconds per batch transaction",
            metrics.batch_seconds.clone(),
        );
        registry.register(
            "disparo_webhook_batch_failures",
            "Batch transactions that failed",
            metrics.batch_failures.clone(),
        );
        registry.register(
            "disparo_webhook_kept_receipts_applied",
            "Receipts that came before their message's provider id was recorded, applied later",
            metrics.kept_applied.clone(),
        );
        registry.register(
            "disparo_webhook_kept_receipts_expired",
            "Kept receipts dropped after a day unapplied",
            metrics.kept_expired.clone(),
        );
        registry.register(
            "disparo_webhook_sweep_failures",
            "Sweeps of kept receipts that failed",
            metrics.sweep_failures.clone(),
        );
        // Alerts take the increase of rejections: the series must exist at zero before
        // the first one, or that first burst would not count.
        for provider in ["meta", "evolution"] {
            metrics
                .events
                .get_or_create(&EventLabels { provider, status: "none", outcome: "rejected_signature" })
                .inc_by(0);
        }
        registry.register(
            "disparo_webhook_receipt_lag_seconds",
            "Seconds from a status's provider timestamp to its application",
            metrics.receipt_lag_seconds.clone(),
        );
        metrics
    }

    /// Counts `n` events.
    pub fn count(&self, provider: &'static str, status: &'static str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.events.get_or_create(&EventLabels { provider, status, outcome }).inc_by(n);
        }
    }
}
