//! The scale run's figures (tests/scale.rs, docs/architecture.md "The scale run"): reading
//! the webhook service's /metrics, a rate from samples of a growing count, and the
//! printed table. Pure, so the arithmetic is unit-tested apart from the run.

use std::fmt::Write as _;
use std::time::Duration;

/// Receipts the webhook service applied so far, from its /metrics text: events with
/// outcome `applied` (any provider and status) plus receipts kept for a message not yet
/// recorded and applied later by the sweeper.
pub fn receipts_applied(metrics: &str) -> u64 {
    let sample = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let total: f64 = metrics
        .lines()
        .filter(|l| {
            (l.starts_with("disparo_webhook_events_total{") && l.contains("outcome=\"applied\""))
                || l.starts_with("disparo_webhook_kept_receipts_applied_total ")
        })
        .map(sample)
        .sum();
    total as u64
}

/// The rate at which a count grew, from `(seconds since some start, count)` samples in
/// time order: the final count over the time from the first sample above zero to the
/// first sample at the final count. None when it never grew or grew within one sample.
pub fn growth_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let last = samples.last()?.1;
    let start = samples.iter().find(|(_, n)| *n > 0)?.0;
    let end = samples.iter().find(|(_, n)| *n == last)?.0;
    (end > start).then(|| last as f64 / (end - start))
}

/// The median of some durations (None when there are none).
pub fn median(mut times: Vec<Duration>) -> Option<Duration> {
    times.sort();
    times.get(times.len() / 2).copied()
}

/// One row of the table: a figure and its value, or why it could not be measured.
pub struct Row {
    pub figure: String,
    pub value: Result<String, String>,
}

impl Row {
    /// A measured figure.
    pub fn ok(figure: impl Into<String>, value: impl Into<String>) -> Row {
        Row { figure: figure.into(), value: Ok(value.into()) }
    }

    /// A figure, or why it is missing.
    pub fn maybe(figure: impl Into<String>, value: Option<String>, why_not: &str) -> Row {
        Row { figure: figure.into(), value: value.ok_or_else(|| format!("not measured: {why_not}")) }
    }
}

/// The table printed at the end of a run, figures aligned.
pub fn table(title: &str, rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.figure.len()).max().unwrap_or(0);
    let mut out = format!("\n=== {title} ===\n");
    for row in rows {
        let value = match &row.value {
            Ok(v) => v.as_str(),
            Err(why) => why.as_str(),
        };
        let _ = writeln!(out, "{:width$}  {value}", row.figure);
    }
    out
}

/// Kibibytes as mebibytes with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_applied_events_and_kept_receipts_applied() {
        let metrics = "# HELP disparo_webhook_events Webhook events\n\
            disparo_webhook_events_total{provider=\"meta\",status=\"delivered\",outcome=\"applied\"} 700\n\
            disparo_webhook_events_total{provider=\"meta\",status=\"read\",outcome=\"applied\"} 300\n\
            disparo_webhook_events_total{provider=\"meta\",status=\"read\",outcome=\"duplicate\"} 12\n\
            disparo_webhook_kept_receipts_applied_total 5\n\
            disparo_webhook_kept_receipts_expired_total 9\n";
        assert_eq!(receipts_applied(metrics), 1005);
        assert_eq!(receipts_applied(""), 0);
    }

    #[test]
    fn a_rate_runs_from_the_first_growth_to_the_final_count() {
        let samples = [(0.0, 0), (1.0, 0), (2.0, 100), (3.0, 250), (4.0, 400), (5.0, 400)];
        assert_eq!(growth_rate(&samples), Some(400.0 / 2.0));
        assert_eq!(growth_rate(&[(0.0, 0), (1.0, 0)]), None, "never grew");
        assert_eq!(growth_rate(&[(0.0, 0), (1.0, 5)]), None, "grew within one sample");
        assert_eq!(growth_rate(&[]), None);
    }

    #[test]
    fn the_median_is_the_middle_time() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(9), ms(1), ms(5)]), Some(ms(5)));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn the_table_aligns_figures_and_says_what_is_missing() {
        let rows = [Row::ok("a", "1"), Row::maybe("longer", None, "no /proc")];
        assert_eq!(table("t", &rows), "\n=== t ===\na       1\nlonger  not measured: no /proc\n");
        assert_eq!(mib(1536), "1.5 MiB");
    }
}
