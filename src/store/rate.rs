//! Rate-limit windows shared by every sender of a channel.
//!
//! Windows are fixed calendar windows in UTC (the current minute, hour and day), one row
//! each per channel. A sender reserves a small block of tokens under the rows' locks, so
//! any number of sender pods together never exceed a cap, and a spent day window has a
//! well-defined reset instant (`resumeAt`). Tokens are only good until the end of the
//! smallest capped window they were taken from; a sender drops what it could not use in
//! time instead of spilling it into the next window.
//!
//! The decision is the pure function [`plan`]; [`reserve`] does the I/O around it.

use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, TimeDelta, Utc};
use sqlx::PgPool;

use super::Result;
use crate::api::{Provider, RateLimitMode, RateLimitsSpec};

/// The caps in force for a channel, after provider defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages per calendar minute.
    pub per_minute: Option<u32>,
    /// Messages per calendar hour.
    pub per_hour: Option<u32>,
    /// Messages per calendar day (UTC).
    pub per_day: Option<u32>,
    /// Hard or Graceful.
    pub mode: RateLimitMode,
    /// Smallest gap between two sends of the channel.
    pub min_interval: Duration,
}

impl Limits {
    /// The reference system's defaults: Meta 20/min, 100/h, 500/day Hard; Evolution
    /// 1000/h Graceful with 500 ms spacing.
    pub(crate) fn provider_default(provider: Provider) -> Self {
        match provider {
            Provider::Meta => Limits {
                per_minute: Some(20),
                per_hour: Some(100),
                per_day: Some(500),
                mode: RateLimitMode::Hard,
                min_interval: Duration::ZERO,
            },
            Provider::Evolution => Limits {
                per_minute: None,
                per_hour: Some(1000),
                per_day: None,
                mode: RateLimitMode::Graceful,
                min_interval: Duration::from_millis(500),
            },
        }
    }

    /// The spec's caps over the provider's defaults.
    pub(crate) fn effective(provider: Provider, spec: &RateLimitsSpec) -> Self {
        let base = Self::provider_default(provider);
        let any_cap = spec.per_minute.is_some() || spec.per_hour.is_some() || spec.per_day.is_some();
        Limits {
            // Caps given in the spec replace the defaults as a set, so a user who writes
            // only perDay: 100000 is not silently held to the default 20/min.
            per_minute: if any_cap { spec.per_minute } else { base.per_minute },
            per_hour: if any_cap { spec.per_hour } else { base.per_hour },
            per_day: if any_cap { spec.per_day } else { base.per_day },
            mode: spec.mode.unwrap_or(base.mode),
            min_interval: spec
                .min_interval_millis
                .map(|ms| Duration::from_millis(ms.into()))
                .unwrap_or(base.min_interval),
        }
    }

    /// No caps and no spacing (benchmarks, trusted sandboxes).
    pub fn unlimited() -> Self {
        Limits {
            per_minute: None,
            per_hour: None,
            per_day: None,
            mode: RateLimitMode::Graceful,
            min_interval: Duration::ZERO,
        }
    }

    /// Whether nothing limits the channel (its tokens are only counted, never withheld).
    pub(crate) fn is_unlimited(&self) -> bool {
        self.per_minute.is_none() && self.per_hour.is_none() && self.per_day.is_none() && self.min_interval.is_zero()
    }
}

/// The three calendar windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WindowKind {
    /// The current UTC minute.
    Minute,
    /// The current UTC hour.
    Hour,
    /// The current UTC day.
    Day,
}

impl WindowKind {
    /// All windows, smallest first.
    pub(crate) const ALL: [WindowKind; 3] = [WindowKind::Minute, WindowKind::Hour, WindowKind::Day];

    fn as_str(self) -> &'static str {
        match self {
            WindowKind::Minute => "minute",
            WindowKind::Hour => "hour",
            WindowKind::Day => "day",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(WindowKind::Minute),
            "hour" => Some(WindowKind::Hour),
            "day" => Some(WindowKind::Day),
            _ => None,
        }
    }

    fn length(self) -> TimeDelta {
        match self {
            WindowKind::Minute => ChronoDuration::minutes(1),
            WindowKind::Hour => ChronoDuration::hours(1),
            WindowKind::Day => ChronoDuration::days(1),
        }
    }

    /// Start of the window containing `now`.
    pub fn start_of(self, now: DateTime<Utc>) -> DateTime<Utc> {
        now.duration_trunc(self.length()).unwrap_or(now)
    }

    fn cap(self, limits: &Limits) -> Option<u32> {
        match self {
            WindowKind::Minute => limits.per_minute,
            WindowKind::Hour => limits.per_hour,
            WindowKind::Day => limits.per_day,
        }
    }
}

/// A window as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Which window.
    pub kind: WindowKind,
    /// Its start as stored (may be an old window, which then counts as empty).
    pub start: DateTime<Utc>,
    /// Tokens taken in it.
    pub used: u32,
}

/// What a reservation decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Tokens granted (0..=wanted).
    pub granted: u32,
    /// The windows to store back (rolled over and with the grant added).
    pub windows: Vec<WindowState>,
    /// Tokens must be used before this instant (end of the smallest capped window).
    pub expires_at: Option<DateTime<Utc>>,
    /// When nothing was granted: when the exhausted windows all have room again.
    pub blocked_until: Option<DateTime<Utc>>,
    /// The day window is spent (Hard channels pause campaigns until it resets).
    pub day_spent: bool,
}

/// Decides how many of `wanted` tokens can be taken at `now`.
///
/// A stored window that starts after `now` (the clock was read before waiting for the
/// rows' locks, while another sender rolled the window over) moves `now` forward: a
/// window is never rolled back, or its tokens would be counted twice.
pub fn plan(stored: &[WindowState], limits: &Limits, wanted: u32, now: DateTime<Utc>) -> Plan {
    let now = stored.iter().map(|w| w.start).filter(|start| *start > now).max().unwrap_or(now);
    let mut windows: Vec<WindowState> = WindowKind::ALL
        .iter()
        .map(|kind| {
            let start = kind.start_of(now);
            let used = stored.iter().find(|w| w.kind == *kind && w.start == start).map_or(0, |w| w.used);
            WindowState { kind: *kind, start, used }
        })
        .collect();
    let mut available = wanted;
    let mut blocked_until: Option<DateTime<Utc>> = None;
    let mut day_spent = false;
    let mut expires_at = None;
    for window in &windows {
        let Some(cap) = window.kind.cap(limits) else { continue };
        expires_at.get_or_insert(window.start + window.kind.length());
        let room = cap.saturating_sub(window.used);
        if room == 0 {
            let end = window.start + window.kind.length();
            blocked_until = Some(blocked_until.map_or(end, |b| b.max(end)));
            if window.kind == WindowKind::Day {
                day_spent = true;
            }
        }
        available = available.min(room);
    }
    for window in &mut windows {
        window.used += available;
    }
    Plan {
        granted: available,
        windows,
        expires_at,
        blocked_until: if available == 0 && wanted > 0 { blocked_until } else { None },
        day_spent,
    }
}

/// Tokens a sender may spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Send instants, one per granted token (all `now` unless the channel spaces sends).
    pub slots: Vec<DateTime<Utc>>,
    /// The slots are spaced: a send that cannot go out at its slot (within
    /// [`SEND_PRECISION`]) must not go out at all ([`missed_slot`]).
    pub spaced: bool,
    /// Tokens are void after this instant.
    pub expires_at: Option<DateTime<Utc>>,
    /// Nothing granted: try again at this instant.
    pub blocked_until: Option<DateTime<Utc>>,
    /// The day window is spent.
    pub day_spent: bool,
    /// The windows the tokens were counted in, so unused ones can be given back.
    pub taken_from: Vec<(WindowKind, DateTime<Utc>)>,
}

impl Reservation {
    /// Tokens granted.
    pub fn granted(&self) -> usize {
        self.slots.len()
    }
}

/// How far ahead spaced slots may be reserved, so tokens are not hoarded by one sender.
const SLOT_LOOKAHEAD: Duration = Duration::from_secs(2);

/// How late after its slot a spaced send may still go out; a later one goes back to
/// pending ([`missed_slot`]). A sender wakes for its slot a little late (timers, a busy
/// node), and by a different amount each time: without a bound, one late send and the
/// next one on time are closer than the channel's minimum gap.
pub const SEND_PRECISION: Duration = Duration::from_millis(10);

/// What consecutive spaced slots are apart beyond the channel's minimum gap: a tenth of
/// the gap, at least twice [`SEND_PRECISION`]. Each send goes out within
/// [`SEND_PRECISION`] of its slot, so two sends leave the senders at least the gap plus
/// the guard less [`SEND_PRECISION`] apart; that rest covers the varying time a request
/// takes to reach the provider, so that the gap holds as the provider sees it.
fn slot_guard(min_interval: Duration) -> Duration {
    (min_interval / 10).max(SEND_PRECISION * 2)
}

/// How far after the reservation an idle channel's first slot is: the sender claims its
/// messages in between, and a slot taken at the reservation's instant would already be
/// late when the message is ready to go.
const SLOT_LEAD: Duration = Duration::from_millis(100);

/// The send slots of `count` tokens on a channel spaced by `min_interval`, given the
/// channel's next free slot and the time of the reservation; and the channel's next free
/// slot after them (see [`slot_guard`], [`SLOT_LEAD`]).
pub fn spaced_slots(
    next_free: DateTime<Utc>,
    now: DateTime<Utc>,
    min_interval: Duration,
    count: u32,
) -> (Vec<DateTime<Utc>>, DateTime<Utc>) {
    let step = ChronoDuration::from_std(min_interval + slot_guard(min_interval)).unwrap_or(ChronoDuration::zero());
    let lead = ChronoDuration::from_std(SLOT_LEAD).unwrap_or(ChronoDuration::zero());
    let first = next_free.max(now + lead);
    let slots = (0..count).map(|i| first + step * i as i32).collect();
    (slots, first + step * count as i32)
}

/// Whether a spaced send is too late for its slot at `now` and must go back to pending
/// rather than go out (see [`SEND_PRECISION`]).
pub fn missed_slot(slot: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (now - slot).to_std().is_ok_and(|late| late > SEND_PRECISION)
}

/// The window kinds in the order every statement locks their rows (text order, as
/// `ORDER BY window_kind` sorts them), so concurrent senders never deadlock.
const LOCK_ORDER: [&str; 3] = ["day", "hour", "minute"];

/// Atomically takes up to `wanted` tokens from the channel's windows (and, for spaced
/// channels, the next free send slots).
///
/// An uncapped channel grants everything without touching the database: nothing can be
/// refused, so its senders only tally what they sent and add it with [`count_usage`]
/// now and then, keeping the send path free of a statement per block.
pub async fn reserve(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    limits: &Limits,
    wanted: u32,
) -> Result<Reservation> {
    if limits.is_unlimited() {
        return Ok(Reservation {
            slots: vec![Utc::now(); wanted as usize],
            spaced: false,
            expires_at: None,
            blocked_until: None,
            day_spent: false,
            taken_from: Vec::new(),
        });
    }
    let wanted = if limits.min_interval.is_zero() {
        wanted
    } else {
        let fit = (SLOT_LOOKAHEAD.as_millis() / limits.min_interval.as_millis().max(1)) as u32;
        wanted.min(fit.max(1))
    };
    let mut tx = super::begin(pool).await?;
    // A fresh row's start is irrelevant: a window whose start is not the current one
    // counts as empty.
    sqlx::query(
        r#"INSERT INTO channel_rate_windows (organization, channel, window_kind, window_start)
           SELECT $1, $2, k, 'epoch' FROM unnest($3::text[]) AS k
           ON CONFLICT DO NOTHING"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(LOCK_ORDER)
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, DateTime<Utc>, i32, DateTime<Utc>)> = sqlx::query_as(
        r#"SELECT window_kind, window_start, used, clock_timestamp() FROM channel_rate_windows
           WHERE organization = $1 AND channel = $2 ORDER BY window_kind FOR UPDATE"#,
    )
    .bind(organization)
    .bind(channel)
    .fetch_all(&mut *tx)
    .await?;
    let now = rows.first().map(|row| row.3).unwrap_or_else(Utc::now);
    let stored: Vec<WindowState> = rows
        .iter()
        .filter_map(|(kind, start, used, _)| {
            Some(WindowState { kind: WindowKind::parse(kind)?, start: *start, used: (*used).max(0) as u32 })
        })
        .collect();
    let decided = plan(&stored, limits, wanted, now);
    if decided.granted > 0 {
        let kinds: Vec<&str> = decided.windows.iter().map(|w| w.kind.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = decided.windows.iter().map(|w| w.start).collect();
        let used: Vec<i32> = decided.windows.iter().map(|w| w.used as i32).collect();
        sqlx::query(
            r#"UPDATE channel_rate_windows w SET window_start = v.start, used = v.used
               FROM unnest($3::text[], $4::timestamptz[], $5::int[]) AS v(kind, start, used)
               WHERE w.organization = $1 AND w.channel = $2 AND w.window_kind = v.kind"#,
        )
        .bind(organization)
        .bind(channel)
        .bind(&kinds)
        .bind(&starts)
        .bind(&used)
        .execute(&mut *tx)
        .await?;
    }
    let mut slots = vec![now; decided.granted as usize];
    if decided.granted > 0 && !limits.min_interval.is_zero() {
        sqlx::query("INSERT INTO channel_state (organization, channel) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(organization)
            .bind(channel)
            .execute(&mut *tx)
            .await?;
        let (next_free,): (DateTime<Utc>,) = sqlx::query_as(
            "SELECT greatest(next_slot_at, $3) FROM channel_state WHERE organization = $1 AND channel = $2 FOR UPDATE",
        )
        .bind(organization)
        .bind(channel)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let next;
        (slots, next) = spaced_slots(next_free, now, limits.min_interval, decided.granted);
        sqlx::query(
            "UPDATE channel_state SET next_slot_at = $3, updated_at = now() WHERE organization = $1 AND channel = $2",
        )
        .bind(organization)
        .bind(channel)
        .bind(next)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let taken_from =
        if decided.granted > 0 { decided.windows.iter().map(|w| (w.kind, w.start)).collect() } else { Vec::new() };
    Ok(Reservation {
        slots,
        spaced: !limits.min_interval.is_zero(),
        expires_at: decided.expires_at,
        blocked_until: decided.blocked_until,
        day_spent: decided.day_spent,
        taken_from,
    })
}

/// Adds `sent` messages to the channel's current windows (a rolled-over window restarts
/// from them) without checking any cap: the usage of an uncapped channel, for status.
pub async fn count_usage(pool: &PgPool, organization: &str, channel: &str, sent: u32) -> Result<()> {
    if sent == 0 {
        return Ok(());
    }
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query(
        r#"INSERT INTO channel_rate_windows AS w (organization, channel, window_kind, window_start, used)
           SELECT $1, $2, k, date_trunc(k, clock_timestamp(), 'UTC'), $4 FROM unnest($3::text[]) AS k
           ON CONFLICT (organization, channel, window_kind) DO UPDATE SET
               used = CASE WHEN EXCLUDED.window_start > w.window_start THEN EXCLUDED.used ELSE w.used + EXCLUDED.used END,
               window_start = greatest(w.window_start, EXCLUDED.window_start)"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(LOCK_ORDER)
    .bind(i32::try_from(sent).unwrap_or(i32::MAX))
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(())
}

/// Gives back `unused` tokens of a reservation (fewer messages were due than tokens
/// taken), in the windows they came from if those are still current. Spaced send slots
/// are not given back: they only leave a gap of at most the slot lookahead.
pub async fn release(
    pool: &PgPool,
    organization: &str,
    channel: &str,
    reservation: &Reservation,
    unused: u32,
) -> Result<()> {
    if unused == 0 || reservation.taken_from.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = reservation.taken_from.iter().map(|(kind, _)| kind.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = reservation.taken_from.iter().map(|(_, start)| *start).collect();
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query(
        r#"WITH locked AS (
               SELECT w.window_kind FROM channel_rate_windows w
               JOIN unnest($3::text[], $4::timestamptz[]) AS v(kind, start) ON w.window_kind = v.kind AND w.window_start = v.start
               WHERE w.organization = $1 AND w.channel = $2
               ORDER BY w.window_kind FOR UPDATE OF w
           )
           UPDATE channel_rate_windows w SET used = greatest(w.used - $5, 0)
           FROM locked WHERE w.organization = $1 AND w.channel = $2 AND w.window_kind = locked.window_kind"#,
    )
    .bind(organization)
    .bind(channel)
    .bind(&kinds)
    .bind(&starts)
    .bind(i32::try_from(unused).unwrap_or(i32::MAX))
    .execute(db.conn())
    .await?;
    db.commit().await?;
    Ok(())
}

/// Current usage of a channel's windows (zero for windows that rolled over).
pub async fn usage(pool: &PgPool, organization: &str, channel: &str) -> Result<Vec<WindowState>> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("SELECT clock_timestamp()").fetch_one(pool).await?;
    let rows: Vec<(String, DateTime<Utc>, i32)> = sqlx::query_as(
        "SELECT window_kind, window_start, used FROM channel_rate_windows WHERE organization = $1 AND channel = $2",
    )
    .bind(organization)
    .bind(channel)
    .fetch_all(pool)
    .await?;
    Ok(WindowKind::ALL
        .iter()
        .map(|kind| {
            let start = kind.start_of(now);
            let used = rows
                .iter()
                .find(|(k, s, _)| WindowKind::parse(k) == Some(*kind) && *s == start)
                .map_or(0, |(_, _, used)| (*used).max(0) as u32);
            WindowState { kind: *kind, start, used }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
    }

    fn meta() -> Limits {
        Limits::provider_default(Provider::Meta)
    }

    #[test]
    fn grants_up_to_the_smallest_room() {
        let now = at(10, 0, 30);
        let stored = [WindowState { kind: WindowKind::Minute, start: at(10, 0, 0), used: 18 }];
        let p = plan(&stored, &meta(), 5, now);
        assert_eq!(p.granted, 2);
        assert_eq!(p.expires_at, Some(at(10, 1, 0)));
        assert_eq!(p.windows.iter().find(|w| w.kind == WindowKind::Minute).unwrap().used, 20);
        assert_eq!(p.windows.iter().find(|w| w.kind == WindowKind::Day).unwrap().used, 2);
    }

    #[test]
    fn an_old_window_counts_as_empty() {
        let stored = [WindowState { kind: WindowKind::Minute, start: at(9, 59, 0), used: 20 }];
        let p = plan(&stored, &meta(), 5, at(10, 0, 1));
        assert_eq!(p.granted, 5);
    }

    #[test]
    fn a_full_minute_blocks_until_the_next_minute() {
        let stored = [WindowState { kind: WindowKind::Minute, start: at(10, 0, 0), used: 20 }];
        let p = plan(&stored, &meta(), 5, at(10, 0, 42));
        assert_eq!(p.granted, 0);
        assert_eq!(p.blocked_until, Some(at(10, 1, 0)));
        assert!(!p.day_spent);
    }

    #[test]
    fn a_window_rolled_over_by_another_sender_is_never_rolled_back() {
        // our clock says 10:00:59.9, but another sender already counted 20 in 10:01
        let now = at(10, 0, 59) + ChronoDuration::milliseconds(900);
        let stored = [WindowState { kind: WindowKind::Minute, start: at(10, 1, 0), used: 20 }];
        let p = plan(&stored, &meta(), 5, now);
        assert_eq!(p.granted, 0);
        assert_eq!(p.blocked_until, Some(at(10, 2, 0)));
        assert_eq!(p.windows.iter().find(|w| w.kind == WindowKind::Minute).unwrap().start, at(10, 1, 0));
    }

    #[test]
    fn a_spent_day_is_reported_with_its_reset() {
        let stored = [WindowState { kind: WindowKind::Day, start: at(0, 0, 0), used: 500 }];
        let p = plan(&stored, &meta(), 1, at(13, 5, 0));
        assert_eq!(p.granted, 0);
        assert!(p.day_spent);
        assert_eq!(p.blocked_until, Some(Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap()));
    }

    #[test]
    fn uncapped_channels_grant_everything() {
        let p = plan(&[], &Limits::unlimited(), 1000, at(1, 2, 3));
        assert_eq!(p.granted, 1000);
        assert_eq!(p.expires_at, None);
    }

    #[test]
    fn spaced_slots_keep_the_gap_with_a_guard_and_leave_time_to_claim() {
        let now = at(10, 0, 0);
        let ms = ChronoDuration::milliseconds;
        // An idle channel: the first slot leaves the sender time to claim its messages.
        let (slots, next) = spaced_slots(now - ms(5000), now, Duration::from_millis(500), 3);
        assert_eq!(slots, vec![now + ms(100), now + ms(650), now + ms(1200)]);
        assert_eq!(next, now + ms(1750));
        // A busy channel: the slots follow the ones other senders hold.
        let (slots, next) = spaced_slots(now + ms(800), now, Duration::from_millis(500), 2);
        assert_eq!(slots, vec![now + ms(800), now + ms(1350)]);
        assert_eq!(next, now + ms(1900));
        // A short gap gets at least twice the send precision.
        let (slots, _) = spaced_slots(now, now, Duration::from_millis(40), 2);
        assert_eq!(slots[1] - slots[0], ms(60));
    }

    #[test]
    fn sends_late_for_their_slot_by_more_than_the_precision_are_missed() {
        let slot = at(10, 0, 0);
        let ms = ChronoDuration::milliseconds;
        assert!(!missed_slot(slot, slot - ms(3)));
        assert!(!missed_slot(slot, slot));
        assert!(!missed_slot(slot, slot + ms(10)));
        assert!(missed_slot(slot, slot + ms(11)));
        // Two sends of consecutive slots, the first as late as allowed, the second on
        // time, are still more than the minimum gap apart.
        for gap in [10, 40, 500, 60_000] {
            let (slots, _) = spaced_slots(slot, slot, Duration::from_millis(gap), 2);
            let latest_first = slots[0] + ChronoDuration::from_std(SEND_PRECISION).unwrap();
            assert!(slots[1] - latest_first >= ms(gap as i64) + ms(10), "{gap} ms");
        }
    }

    #[test]
    fn spec_caps_replace_defaults_as_a_set() {
        let spec = RateLimitsSpec { per_day: Some(5), ..Default::default() };
        let limits = Limits::effective(Provider::Meta, &spec);
        assert_eq!((limits.per_minute, limits.per_hour, limits.per_day), (None, None, Some(5)));
        assert_eq!(limits.mode, RateLimitMode::Hard);
        let defaults = Limits::effective(Provider::Evolution, &RateLimitsSpec::default());
        assert_eq!(defaults, Limits::provider_default(Provider::Evolution));
    }
}
