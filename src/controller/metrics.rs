//! Controller metrics beside the controller: reconciles by kind and result, durations,
//! errors by cause, campaigns by phase.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::Phase;

/// Labels for reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Campaign or Channel.
    pub kind: String,
}

/// Labels for errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Campaign or Channel.
    pub kind: String,
    /// The error variant.
    pub error: String,
}

/// Labels for the phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase.
    pub phase: String,
}

/// The controller's metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconcile failures by cause.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile durations.
    pub duration: Family<KindLabels, Histogram>,
    /// Campaigns by phase.
    pub phases: Family<PhaseLabels, Gauge>,
    known: Mutex<HashMap<String, Phase>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 12))),
            phases: Family::default(),
            known: Mutex::new(HashMap::new()),
        };
        registry.register("disparo_controller_reconciles", "Reconciles run", metrics.reconciles.clone());
        registry.register(
            "disparo_controller_reconcile_failures",
            "Reconcile failures by cause",
            metrics.failures.clone(),
        );
        registry.register(
            "disparo_controller_reconcile_duration_seconds",
            "Reconcile duration",
            metrics.duration.clone(),
        );
        registry.register("disparo_campaigns", "Campaigns by phase", metrics.phases.clone());
        for phase in Phase::ALL {
            metrics.phases.get_or_create(&PhaseLabels { phase: phase.to_string() }).set(0);
        }
        metrics
    }

    /// Records the phase of a campaign (keyed by namespace/name), keeping the gauge exact.
    pub(crate) fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let Ok(mut known) = self.known.lock() else { return };
        let previous = match phase {
            Some(p) => known.insert(key.to_owned(), p),
            None => known.remove(key),
        };
        if previous == phase {
            return;
        }
        if let Some(p) = previous {
            self.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).dec();
        }
        if let Some(p) = phase {
            self.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).inc();
        }
    }

    /// Starts timing a reconcile; the duration is observed when the guard drops.
    pub fn start(&self, kind: &str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
        ReconcileTimer { metrics: self, kind: kind.to_owned(), started: std::time::Instant::now() }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: String,
    started: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&KindLabels { kind: self.kind.clone() })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_gauge_follows_transitions() {
        let m = Metrics::new(&mut Registry::default());
        m.set_phase("a/x", Some(Phase::Running));
        m.set_phase("a/x", Some(Phase::Running));
        m.set_phase("a/y", Some(Phase::Running));
        m.set_phase("a/x", Some(Phase::Completed));
        let get = |p: Phase| m.phases.get_or_create(&PhaseLabels { phase: p.to_string() }).get();
        assert_eq!((get(Phase::Running), get(Phase::Completed)), (1, 1));
        m.set_phase("a/y", None);
        assert_eq!(get(Phase::Running), 0);
    }
}
