//! When a campaign may send: `schedule.startAt` and the daily send window, in the
//! window's time zone. Pure, with `now` passed in.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::api::{Schedule, SendWindow, Weekday};

/// Whether sending is allowed now, and if not, when it will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Sending is allowed now; the window (if any) closes at the given instant.
    Open {
        /// When the current window closes (None: no window).
        closes_at: Option<DateTime<Utc>>,
    },
    /// Sending is allowed from this instant.
    OpensAt(DateTime<Utc>),
}

/// A schedule that cannot be understood (the CRD validates formats; a bad time zone
/// name can still get through).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScheduleError {
    /// Unknown IANA time zone.
    #[error("unknown time zone {0:?} in schedule.window.timeZone")]
    TimeZone(String),
    /// Malformed HH:MM.
    #[error("{0:?} is not a HH:MM time")]
    Time(String),
}

fn parse_time(s: &str) -> Result<NaiveTime, ScheduleError> {
    NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| ScheduleError::Time(s.to_owned()))
}

fn weekday_matches(days: &[Weekday], day: chrono::Weekday) -> bool {
    days.is_empty()
        || days.iter().any(|d| {
            matches!(
                (d, day),
                (Weekday::Mon, chrono::Weekday::Mon)
                    | (Weekday::Tue, chrono::Weekday::Tue)
                    | (Weekday::Wed, chrono::Weekday::Wed)
                    | (Weekday::Thu, chrono::Weekday::Thu)
                    | (Weekday::Fri, chrono::Weekday::Fri)
                    | (Weekday::Sat, chrono::Weekday::Sat)
                    | (Weekday::Sun, chrono::Weekday::Sun)
            )
        })
}

/// The window's state at `now`: open (and until when), or when it next opens.
pub(crate) fn window_gate(window: &SendWindow, now: DateTime<Utc>) -> Result<Gate, ScheduleError> {
    let tz: Tz = window.time_zone.parse().map_err(|_| ScheduleError::TimeZone(window.time_zone.clone()))?;
    let start = parse_time(&window.start)?;
    let end = parse_time(&window.end)?;
    let local_now = now.with_timezone(&tz);
    // Look at windows opening from yesterday (a window spanning midnight may still be
    // open) to eight days ahead (the next allowed weekday).
    for offset in -1..=8i64 {
        let date = local_now.date_naive() + Duration::days(offset);
        if !weekday_matches(&window.days, date.weekday()) {
            continue;
        }
        let open_local = date.and_time(start);
        let close_date = if end > start { date } else { date + Duration::days(1) };
        let close_local = close_date.and_time(end);
        // Around DST changes a local time may not exist; take the earliest valid mapping.
        let (Some(open), Some(close)) =
            (tz.from_local_datetime(&open_local).earliest(), tz.from_local_datetime(&close_local).earliest())
        else {
            continue;
        };
        let (open, close) = (open.with_timezone(&Utc), close.with_timezone(&Utc));
        if now >= open && now < close {
            return Ok(Gate::Open { closes_at: Some(close) });
        }
        if open > now {
            return Ok(Gate::OpensAt(open));
        }
    }
    Ok(Gate::Open { closes_at: None })
}

/// The campaign's gate at `now`, combining `startAt` and the window.
pub(crate) fn gate(schedule: Option<&Schedule>, now: DateTime<Utc>) -> Result<Gate, ScheduleError> {
    let Some(schedule) = schedule else { return Ok(Gate::Open { closes_at: None }) };
    let from = match &schedule.start_at {
        Some(start) if crate::api::time::instant(&start.0) > now => crate::api::time::instant(&start.0),
        _ => now,
    };
    let gate = match &schedule.window {
        Some(window) => window_gate(window, from)?,
        None => Gate::Open { closes_at: None },
    };
    Ok(match gate {
        Gate::Open { .. } if from > now => Gate::OpensAt(from),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, end: &str, tz: &str, days: Vec<Weekday>) -> SendWindow {
        SendWindow { start: start.into(), end: end.into(), time_zone: tz.into(), days }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn inside_a_sao_paulo_window() {
        // 2026-11-25 is a Wednesday; São Paulo is UTC-3
        let w = window("09:00", "18:00", "America/Sao_Paulo", vec![]);
        assert_eq!(
            window_gate(&w, utc(2026, 11, 25, 13, 0)).unwrap(),
            Gate::Open { closes_at: Some(utc(2026, 11, 25, 21, 0)) }
        );
    }

    #[test]
    fn before_and_after_the_window() {
        let w = window("09:00", "18:00", "America/Sao_Paulo", vec![]);
        assert_eq!(window_gate(&w, utc(2026, 11, 25, 11, 0)).unwrap(), Gate::OpensAt(utc(2026, 11, 25, 12, 0)));
        assert_eq!(window_gate(&w, utc(2026, 11, 25, 22, 0)).unwrap(), Gate::OpensAt(utc(2026, 11, 26, 12, 0)));
    }

    #[test]
    fn weekdays_skip_the_weekend() {
        let w =
            window("09:00", "18:00", "UTC", vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri]);
        // Friday 2026-11-27 19:00 → Monday 2026-11-30 09:00
        assert_eq!(window_gate(&w, utc(2026, 11, 27, 19, 0)).unwrap(), Gate::OpensAt(utc(2026, 11, 30, 9, 0)));
    }

    #[test]
    fn a_window_spanning_midnight() {
        let w = window("22:00", "02:00", "UTC", vec![]);
        assert_eq!(
            window_gate(&w, utc(2026, 11, 25, 1, 0)).unwrap(),
            Gate::Open { closes_at: Some(utc(2026, 11, 25, 2, 0)) }
        );
        assert_eq!(window_gate(&w, utc(2026, 11, 25, 3, 0)).unwrap(), Gate::OpensAt(utc(2026, 11, 25, 22, 0)));
    }

    #[test]
    fn start_at_in_the_future_waits_then_the_window_applies() {
        let schedule = Schedule {
            start_at: Some(crate::api::time::k8s(utc(2026, 12, 1, 3, 0))),
            window: Some(window("09:00", "18:00", "UTC", vec![])),
        };
        assert_eq!(gate(Some(&schedule), utc(2026, 11, 25, 10, 0)).unwrap(), Gate::OpensAt(utc(2026, 12, 1, 9, 0)));
        let no_window = Schedule { start_at: Some(crate::api::time::k8s(utc(2026, 12, 1, 3, 0))), window: None };
        assert_eq!(gate(Some(&no_window), utc(2026, 11, 25, 10, 0)).unwrap(), Gate::OpensAt(utc(2026, 12, 1, 3, 0)));
        assert!(matches!(gate(Some(&no_window), utc(2026, 12, 2, 0, 0)).unwrap(), Gate::Open { .. }));
    }

    #[test]
    fn bad_time_zones_are_reported() {
        let w = window("09:00", "18:00", "Mars/Olympus", vec![]);
        assert_eq!(window_gate(&w, utc(2026, 11, 25, 13, 0)), Err(ScheduleError::TimeZone("Mars/Olympus".into())));
    }
}
