//! Conversions between chrono (what Disparo's logic and sqlx use) and the jiff
//! timestamps inside k8s-openapi's `Time` and `MicroTime`.

use chrono::{DateTime, TimeZone, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp::from_millisecond(at.timestamp_millis()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A Kubernetes `Time` for an instant.
pub fn k8s(at: DateTime<Utc>) -> Time {
    Time(timestamp(at))
}

/// A Kubernetes `MicroTime` for an instant.
pub(crate) fn k8s_micro(at: DateTime<Utc>) -> MicroTime {
    MicroTime(timestamp(at))
}

/// The instant of a jiff timestamp.
pub fn instant(ts: &Timestamp) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ts.as_millisecond()).single().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_millisecond_precision() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 12, 34, 56).unwrap() + chrono::Duration::milliseconds(789);
        assert_eq!(instant(&k8s(at).0), at);
        assert_eq!(instant(&k8s_micro(at).0), at);
    }
}
