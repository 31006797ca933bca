//! Sender metrics: messages by outcome and provider code, provider latency, rate-limit
//! waits. Served on `--metrics-addr` while the batch runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// sent, retry, failed, unknown, requeued.
    pub outcome: String,
    /// Provider error code, or empty.
    pub code: String,
}

/// The sender's metrics.
#[derive(Clone)]
pub struct SenderMetrics {
    /// Messages by outcome and code.
    pub messages: Family<OutcomeLabels, Counter>,
    /// Seconds per provider call.
    pub provider_latency: Histogram,
    /// Times the sender waited for a rate window.
    pub rate_limit_waits: Counter,
}

impl SenderMetrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = SenderMetrics {
            messages: Family::default(),
            provider_latency: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            rate_limit_waits: Counter::default(),
        };
        registry.register("disparo_sender_messages", "Messages by outcome and provider code", metrics.messages.clone());
        registry.register(
            "disparo_sender_provider_latency_seconds",
            "Provider call latency",
            metrics.provider_latency.clone(),
        );
        registry.register(
            "disparo_sender_rate_limit_waits",
            "Waits for a rate-limit window",
            metrics.rate_limit_waits.clone(),
        );
        metrics
    }

    /// Counts one outcome.
    pub fn count(&self, outcome: &str, code: &str) {
        self.messages.get_or_create(&OutcomeLabels { outcome: outcome.to_owned(), code: code.to_owned() }).inc();
    }
}
