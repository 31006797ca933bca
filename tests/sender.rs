//! `disparo send` against a real Postgres and the sandbox over real HTTP: counts match
//! the sandbox's ledger, retries follow the policy, concurrent senders respect the
//! channel's cap, a SIGKILL mid-batch neither duplicates nor loses, and a spent day
//! window exits with the distinct code.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

mod send_scenarios;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::pgbouncer::Reach;
use disparo::api::{RateLimitMode, RateLimitsSpec, RetryPolicy};
use disparo::sandbox::{Faults, SandboxHandle};
use disparo::sender::{self, SendConfig};
use disparo::store::campaigns;
use send_scenarios::{campaign, config, run_in_process, sandbox, sender_process, statuses, unlimited};
use sqlx::PgPool;
use uuid::Uuid;

#[tokio::test]
async fn ten_thousand_messages_match_the_ledger() {
    send_scenarios::ten_thousand_messages_match_the_ledger(&Reach::direct().await).await;
}

#[tokio::test]
async fn retryable_errors_retry_with_the_delays_and_permanent_ones_fail_at_once() {
    let (pool, _) = common::fresh_db().await;
    // every send fails: half retryable (131000), half permanent (131026)
    let faults = Faults { retryable: 0.5, permanent: 0.5, ..Default::default() };
    let sandbox = sandbox(0, faults).await;
    let (uid, _) = campaign(&pool, 40, 100).await;
    let retry = RetryPolicy { max_attempts: 3, base_delay_seconds: 1, max_delay_seconds: 2 };
    let cfg = config(uid, "main", &sandbox, retry, unlimited(), 8);
    let started = std::time::Instant::now();
    assert_eq!(run_in_process(&pool, &cfg, 0).await, sender::BatchEnd::Done);
    let elapsed = started.elapsed();
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!(counters.failed, 40, "every message ends failed");
    // permanent failures: one attempt and code 131026; retried ones: up to three attempts
    let rows: Vec<(i32, String, serde_json::Value)> = sqlx::query_as(
        "SELECT attempts, last_error_code, status_history FROM campaign_messages WHERE campaign_uid = $1",
    )
    .bind(uid)
    .fetch_all(&pool)
    .await
    .unwrap();
    for (attempts, code, history) in &rows {
        assert!(*attempts >= 1 && *attempts <= 3, "attempts {attempts}");
        if *attempts == 3 && code == "131000" {
            // one history entry per attempt, numbered; the delays between attempts follow
            // the policy: ≥ half of 1 s, then ≥ half of 2 s
            let entries: Vec<&serde_json::Value> =
                history.as_array().unwrap().iter().filter(|h| h.get("startedAt").is_some()).collect();
            assert_eq!(
                entries.iter().map(|h| h["attempt"].as_i64().unwrap()).collect::<Vec<_>>(),
                vec![1, 2, 3],
                "{history}"
            );
            assert!(entries.iter().all(|h| h["run"].is_string() && h["status"] != "sent"), "{history}");
            let at: Vec<chrono::DateTime<chrono::Utc>> =
                entries.iter().map(|h| h["startedAt"].as_str().unwrap().parse().unwrap()).collect();
            assert!(at[1] - at[0] >= chrono::Duration::milliseconds(500), "{at:?}");
            assert!(at[2] - at[1] >= chrono::Duration::milliseconds(1000), "{at:?}");
        }
        if code == "131026" {
            // a permanent error is never retried after it happens
            let attempt_entries = history.as_array().unwrap().iter().filter(|h| h.get("startedAt").is_some()).count();
            assert_eq!(attempt_entries as i32, *attempts);
            assert_eq!(history.as_array().unwrap().last().unwrap()["status"], "failed", "{history}");
        }
    }
    assert!(rows.iter().any(|(a, c, _)| *a == 1 && c == "131026"));
    assert!(rows.iter().any(|(a, c, _)| *a == 3 && c == "131000"));
    assert!(elapsed >= Duration::from_millis(1500), "retries waited for their delays");
    let errors = campaigns::error_breakdown(&pool, uid, 10).await.unwrap();
    assert!(errors.iter().any(|(c, _)| c == "131026") && errors.iter().any(|(c, _)| c == "131000"), "{errors:?}");
}

#[tokio::test]
async fn four_senders_on_a_hard_channel_respect_its_minute_cap() {
    let (pool, _) = common::fresh_db().await;
    let sandbox = Arc::new(sandbox(5, Faults::default()).await);
    let (uid, batches) = campaign(&pool, 48, 12).await;
    assert_eq!(batches, 4);
    let limits = RateLimitsSpec {
        per_minute: Some(20),
        per_hour: Some(1000),
        per_day: Some(5000),
        mode: Some(RateLimitMode::Hard),
        min_interval_millis: Some(0),
    };
    let cfg = config(uid, "hard", &sandbox, RetryPolicy::default(), limits, 4);
    let mut tasks = Vec::new();
    for batch in 0..4 {
        let pool = pool.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move { run_in_process(&pool, &cfg, batch).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), sender::BatchEnd::Done);
    }
    let timestamps = sandbox.ledger().timestamps();
    assert_eq!(timestamps.len(), 48);
    let mut per_minute = BTreeMap::<i64, usize>::new();
    for (at, _) in &timestamps {
        *per_minute.entry(at.timestamp() / 60).or_default() += 1;
    }
    assert!(per_minute.values().all(|n| *n <= 20), "calendar minutes over the cap: {per_minute:?}");
    assert!(per_minute.len() >= 3, "48 messages at 20/min need at least three minutes: {per_minute:?}");
}

#[tokio::test]
async fn sigkill_mid_batch_neither_duplicates_nor_loses() {
    send_scenarios::sigkill_mid_batch_neither_duplicates_nor_loses(&Reach::direct().await).await;
}

#[tokio::test]
async fn a_spent_day_window_exits_with_the_rate_limit_code() {
    let (pool, url) = common::fresh_db().await;
    let sandbox = sandbox(0, Faults::default()).await;
    let (uid, _) = campaign(&pool, 10, 100).await;
    let limits = RateLimitsSpec {
        per_minute: None,
        per_hour: None,
        per_day: Some(4),
        mode: Some(RateLimitMode::Hard),
        min_interval_millis: Some(0),
    };
    let cfg = config(uid, "tiny", &sandbox, RetryPolicy::default(), limits, 8);
    let status = sender_process(&url, &cfg, 0).wait().await.unwrap();
    assert_eq!(status.code(), Some(sender::EXIT_RATE_LIMITED));
    assert_eq!(sandbox.ledger().accepted_count(), 4);
    let pause =
        disparo::store::pauses::channel_pause(&pool, "acme", "tiny").await.unwrap().expect("the channel is paused");
    let until = disparo::store::rate::WindowKind::Day.start_of(chrono::Utc::now()) + chrono::Duration::days(1);
    assert_eq!(pause, disparo::store::pauses::ChannelPause::WindowSpent { until });
    assert_eq!(statuses(&pool, uid).await.get("pending"), Some(&6));
}

/// Graceful: a spent cap makes the sender wait for the next token; nothing pauses and
/// the run does not end. Hard: the same cap pauses the channel until the window ends.
#[tokio::test]
async fn graceful_waits_for_the_next_token_and_hard_pauses_the_channel() {
    let (pool, _) = common::fresh_db().await;
    let sandbox = sandbox(0, Faults::default()).await;
    let (uid, _) = campaign(&pool, 10, 100).await;
    let graceful = RateLimitsSpec {
        per_minute: Some(3),
        per_hour: None,
        per_day: None,
        mode: Some(RateLimitMode::Graceful),
        min_interval_millis: Some(0),
    };
    let cfg = config(uid, "soft", &sandbox, RetryPolicy::default(), graceful, 8);
    let run = tokio::spawn({
        let pool = pool.clone();
        async move { run_in_process(&pool, &cfg, 0).await }
    });
    // Three go in this minute; the sender then waits instead of ending or pausing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sandbox.ledger().accepted_count() < 3 {
        assert!(std::time::Instant::now() < deadline, "the sender made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "a Graceful sender waits for the next token");
    assert_eq!(
        disparo::store::pauses::channel_pause(&pool, "acme", "soft").await.unwrap(),
        None,
        "Graceful never pauses the channel"
    );
    run.abort();

    let (uid, _) = campaign(&pool, 10, 100).await;
    let hard = RateLimitsSpec {
        per_minute: Some(3),
        per_hour: None,
        per_day: None,
        mode: Some(RateLimitMode::Hard),
        min_interval_millis: Some(0),
    };
    let cfg = config(uid, "strict", &sandbox, RetryPolicy::default(), hard, 8);
    let run = tokio::spawn({
        let pool = pool.clone();
        async move { run_in_process(&pool, &cfg, 0).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let pause = loop {
        if let Some(pause) = disparo::store::pauses::channel_pause(&pool, "acme", "strict").await.unwrap() {
            break pause;
        }
        assert!(std::time::Instant::now() < deadline, "a Hard channel whose cap is spent pauses");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let minute_end =
        disparo::store::rate::WindowKind::Minute.start_of(chrono::Utc::now()) + chrono::Duration::minutes(1);
    assert!(
        matches!(pause, disparo::store::pauses::ChannelPause::WindowSpent { until } if until <= minute_end),
        "{pause:?}"
    );
    run.abort();
}

/// A campaign of 40 on a spaced channel whose next 30 s of send slots other senders
/// hold: a sender's first block waits that long for its turn.
async fn waiting_for_slots(pool: &PgPool, sandbox: &SandboxHandle) -> (Uuid, SendConfig) {
    let (uid, _) = campaign(pool, 40, 100).await;
    sqlx::query("INSERT INTO channel_state (organization, channel, next_slot_at) VALUES ('acme', 'spaced', now() + interval '30 seconds')")
        .execute(pool)
        .await
        .unwrap();
    let spaced = RateLimitsSpec {
        per_minute: None,
        per_hour: None,
        per_day: Some(1_000_000),
        mode: Some(RateLimitMode::Graceful),
        min_interval_millis: Some(400),
    };
    (uid, config(uid, "spaced", sandbox, RetryPolicy::default(), spaced, 16))
}

/// On a spaced channel, SIGTERM while messages wait for their send slot ends the run
/// without sending them, and they go back to pending: none is sent late, none is left
/// `unknown`.
#[tokio::test]
async fn sigterm_during_the_slot_wait_requeues_instead_of_sending() {
    let (pool, url) = common::fresh_db().await;
    let sandbox = sandbox(0, Faults::default()).await;
    let (uid, cfg) = waiting_for_slots(&pool, &sandbox).await;
    let mut child = sender_process(&url, &cfg, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blocks_in_flight(&pool, uid).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the sender claimed nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(sender::EXIT_INTERRUPTED));
    assert_eq!(sandbox.ledger().accepted_count(), 0, "a message waiting for its slot is not sent after SIGTERM");
    let by_status = statuses(&pool, uid).await;
    assert_eq!(by_status.get("pending"), Some(&40), "every message is pending again: {by_status:?}");
    let (attempts,): (i64,) = sqlx::query_as("SELECT sum(attempts) FROM campaign_messages WHERE campaign_uid = $1")
        .bind(uid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "a requeued wait spends no attempt");
}

/// A TCP proxy in front of Postgres that can drop every connection and refuse new ones
/// for a while: what a Postgres restart or failover looks like to a sender.
struct FlakyProxy {
    port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::broadcast::Sender<()>,
}

impl FlakyProxy {
    async fn start(target: std::net::SocketAddr) -> FlakyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::broadcast::channel(4);
        let (accept_down, accept_cut) = (down.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if accept_down.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused, as by a restarting server
                }
                let mut cut = accept_cut.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        FlakyProxy { port, down, cut }
    }

    /// Drops every connection and refuses new ones for `outage`.
    async fn outage(&self, outage: Duration) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.cut.send(());
        tokio::time::sleep(outage).await;
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Postgres going away mid-batch (connections reset, refused for a few seconds) costs a
/// pause, not a failed pod: the sender retries, finishes, sends nobody twice and loses
/// nothing.
#[tokio::test]
async fn a_postgres_outage_mid_batch_is_retried_without_duplicates() {
    let (pool, url) = common::fresh_db().await;
    let sandbox = sandbox(5, Faults::default()).await;
    let (uid, _) = campaign(&pool, 600, 1000).await;
    // postgres://user:pass@HOST:PORT/db: the same URL through the proxy.
    let (head, rest) = url.split_once('@').unwrap();
    let (address, db) = rest.split_once('/').unwrap();
    let proxy = FlakyProxy::start(address.parse().unwrap()).await;
    let through = format!("{head}@127.0.0.1:{}/{db}", proxy.port);
    let cfg = config(uid, "main", &sandbox, RetryPolicy::default(), unlimited(), 8);
    let mut child = sender_process(&through, &cfg, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sandbox.ledger().accepted_count() < 100 {
        assert!(std::time::Instant::now() < deadline, "the sender made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.outage(Duration::from_secs(3)).await;
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(0), "the sender rode out the outage");
    let ledger = sandbox.ledger();
    assert!(ledger.duplicates().is_empty(), "nobody got two messages: {:?}", ledger.duplicates());
    let by_status = statuses(&pool, uid).await;
    assert_eq!(by_status.get("pending"), None, "{by_status:?}");
    assert_eq!(by_status.get("sending"), None, "{by_status:?}");
    let sent = by_status.get("sent").copied().unwrap_or(0);
    let unknown = by_status.get("unknown").copied().unwrap_or(0);
    assert_eq!(sent + unknown, 600, "{by_status:?}");
    assert!(ledger.accepted_count() as i64 >= sent && ledger.accepted_count() as i64 <= sent + unknown);
    let by_status =
        |c: &campaigns::Counters| (c.total, c.pending, c.sending, c.unknown, c.sent, c.failed, c.cancelled, c.skipped);
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!(
        by_status(&counters),
        by_status(&campaigns::recount(&pool, uid).await.unwrap()),
        "counters equal a recount"
    );
}

/// The retry schedule as a real sender runs it: with base 1 s, a message that keeps
/// failing is sent 4 times (the default count), the retries no sooner than 1, 2 and
/// 4 s after the previous send (jitter never shortens) and no later than a fifth more
/// plus the loop's own slack; then it is failed.
#[tokio::test]
async fn a_failing_message_is_retried_after_one_two_four_seconds_then_failed() {
    let (pool, _) = common::fresh_db().await;
    let sandbox = sandbox(0, Faults { retryable: 1.0, ..Default::default() }).await;
    let (uid, _) = campaign(&pool, 3, 100).await;
    let retry = RetryPolicy { base_delay_seconds: 1, ..RetryPolicy::default() };
    assert_eq!(retry.max_attempts, 4, "the default is the first send and three retries");
    let cfg = config(uid, "main", &sandbox, retry, unlimited(), 8);
    assert_eq!(run_in_process(&pool, &cfg, 0).await, sender::BatchEnd::Done);

    let rows: Vec<(String, i32, serde_json::Value)> =
        sqlx::query_as("SELECT status::text, attempts, status_history FROM campaign_messages WHERE campaign_uid = $1")
            .bind(uid)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3);
    let time = |entry: &serde_json::Value, field: &str| -> chrono::DateTime<chrono::Utc> {
        entry[field].as_str().unwrap_or_else(|| panic!("no {field} in {entry}")).parse().unwrap()
    };
    let slack = chrono::Duration::milliseconds(750);
    for (status, attempts, history) in &rows {
        assert_eq!((status.as_str(), *attempts), ("failed", 4), "{history}");
        let sends: Vec<&serde_json::Value> =
            history.as_array().unwrap().iter().filter(|h| h.get("startedAt").is_some()).collect();
        assert_eq!(sends.len(), 4, "{history}");
        for (i, delay_ms) in [1_000i64, 2_000, 4_000].into_iter().enumerate() {
            let (previous, next) = (sends[i], sends[i + 1]);
            let delay = chrono::Duration::milliseconds(delay_ms);
            // The retry was decided after the previous send started: no sooner than the
            // un-jittered delay after that start.
            assert!(
                time(next, "startedAt") - time(previous, "startedAt") >= delay,
                "retry {} too early: {history}",
                i + 1
            );
            assert!(time(next, "startedAt") >= time(previous, "retryAt"), "sent before its retry time: {history}");
            // And no later than the jittered delay after the failure was recorded.
            let max = chrono::Duration::milliseconds(delay_ms * 6 / 5) + slack;
            assert!(time(next, "startedAt") - time(previous, "at") <= max, "retry {} too late: {history}", i + 1);
        }
        assert_eq!(sends[3]["status"], "failed", "{history}");
    }
    assert_eq!(sandbox.ledger().accepted_count(), 0);
}

/// A cancel observed mid-block sends nothing more: messages waiting for their send slot
/// are given back and end `cancelled`, and the run ends.
#[tokio::test]
async fn a_cancel_mid_block_sends_nothing_more() {
    let (pool, _) = common::fresh_db().await;
    let sandbox = sandbox(0, Faults::default()).await;
    let (uid, cfg) = waiting_for_slots(&pool, &sandbox).await;
    let run = tokio::spawn({
        let pool = pool.clone();
        async move { run_in_process(&pool, &cfg, 0).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blocks_in_flight(&pool, uid).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the sender claimed nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    disparo::store::messages::cancel_pending(&pool, uid).await.unwrap();
    assert_eq!(run.await.unwrap(), sender::BatchEnd::Done);
    assert_eq!(sandbox.ledger().accepted_count(), 0, "nothing is sent after the cancel");
    assert_eq!(statuses(&pool, uid).await, BTreeMap::from([("cancelled".to_owned(), 40)]));
}

/// Meta's per-user marketing limit answered on send (131049) is not a failure: the
/// message goes back to pending for a day without spending an attempt, and the batch
/// ends instead of idling a pod for a day (a later Job sends it).
#[tokio::test]
async fn a_131049_answer_puts_the_message_back_for_a_day_and_ends_the_batch() {
    let (pool, _) = common::fresh_db().await;
    let faults = Faults { codes: [(131049, 1.0)].into_iter().collect(), ..Default::default() };
    let sandbox = sandbox(0, faults).await;
    let (uid, _) = campaign(&pool, 5, 100).await;
    let cfg = config(uid, "main", &sandbox, RetryPolicy::default(), unlimited(), 8);
    let ended = tokio::time::timeout(Duration::from_secs(60), run_in_process(&pool, &cfg, 0)).await;
    assert_eq!(ended.expect("the batch ends, it does not wait a day"), sender::BatchEnd::Done);
    type Row = (String, i32, i16, Option<String>, chrono::DateTime<chrono::Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT status::text, attempts, marketing_requeues, last_error_code, next_attempt_at FROM campaign_messages WHERE campaign_uid = $1",
    )
    .bind(uid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 5);
    for (status, attempts, requeues, code, at) in rows {
        assert_eq!((status.as_str(), attempts, requeues, code.as_deref()), ("pending", 0, 1, Some("131049")));
        let hours = (at - chrono::Utc::now()).num_minutes() as f64 / 60.0;
        assert!((23.0..=24.1).contains(&hours), "due again in a day, not {hours} h");
    }
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.pending, counters.failed), (5, 0));
}

/// Blocks of the campaign a sender has claimed and is sending (their intents).
async fn blocks_in_flight(pool: &PgPool, uid: Uuid) -> i64 {
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM send_intents WHERE campaign_uid = $1")
        .bind(uid)
        .fetch_one(pool)
        .await
        .unwrap();
    count
}
