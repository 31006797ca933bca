//! Promises a person relies on, on the real stack (control plane, controller, node agent
//! running sender pods, Postgres, sandbox over HTTP): the send window, Drafts, retention
//! on deletion, the Events on a Campaign, and the plugin's verbs doing what their help
//! says.
//!
//! Each test has its own namespace, controller and node agent, so they run in parallel.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use common::stack::{Stack, campaign, fast, meta_channel, phase, recipients, sandbox_with, uid, wait_for_sends};
use disparo::sandbox::Faults;
use serde_json::{Value, json};
use sqlx::PgPool;

const LONG: Duration = Duration::from_secs(180);

async fn sleep_until(at: DateTime<Utc>) {
    if let Ok(wait) = (at - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
}

/// Runs the plugin and returns its stdout; panics with its stderr when it fails.
fn plugin_ok(stack: &Stack, args: &[&str]) -> String {
    let out = stack.plugin(args);
    assert!(
        out.status.success(),
        "kubectl disparo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The help of a plugin command.
fn help(stack: &Stack, command: &str) -> String {
    plugin_ok(stack, &[command, "--help"])
}

/// The reasons of the Events whose involved object is `name`, as `kubectl get events` shows them.
fn event_reasons(stack: &Stack, name: &str) -> Vec<String> {
    let out =
        stack.kubectl(&["get", "events", "--field-selector", &format!("involvedObject.name={name}"), "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str().map(str::to_owned)).collect()
}

/// Rows of the campaign in each Postgres table that holds campaign data.
async fn rows(pool: &PgPool, campaign_uid: &str) -> [(&'static str, i64); 4] {
    let uid: uuid::Uuid = campaign_uid.parse().unwrap();
    let mut out = [("campaigns", 0), ("campaign_messages", 0), ("campaign_counters", 0), ("campaign_error_counts", 0)];
    for (table, count) in out.iter_mut() {
        let column = if *table == "campaigns" { "uid" } else { "campaign_uid" };
        let query = format!("SELECT count(*) FROM {table} WHERE {column} = $1");
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(query)).bind(uid).fetch_one(pool).await.unwrap();
        *count = n;
    }
    out
}

/// The phones of a campaign's messages with the given status.
async fn phones_with_status(pool: &PgPool, campaign_uid: &str, status: &str) -> BTreeSet<String> {
    let uid: uuid::Uuid = campaign_uid.parse().unwrap();
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT c.phone FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 AND m.status::text = $2",
    )
    .bind(uid)
    .bind(status)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(p,)| p).collect()
}

/// Every phone of a campaign's messages.
async fn audience_phones(pool: &PgPool, campaign_uid: &str) -> BTreeSet<String> {
    let uid: uuid::Uuid = campaign_uid.parse().unwrap();
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT c.phone FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1",
    )
    .bind(uid)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(p,)| p).collect()
}

fn count(object: &Value, field: &str) -> i64 {
    object["status"]["messages"][field].as_i64().unwrap_or(0)
}

/// A daily window `[open, open + 1 min)` in UTC, as spec lines.
fn one_minute_window(open: DateTime<Utc>) -> String {
    let close = open + chrono::Duration::minutes(1);
    format!(
        "  schedule:\n    window: {{start: '{}', end: '{}', timeZone: UTC}}\n",
        open.format("%H:%M"),
        close.format("%H:%M")
    )
}

/// The next whole minute at least `lead` from now.
fn next_minute(lead: chrono::Duration) -> DateTime<Utc> {
    let floor = (Utc::now() + lead).duration_trunc(chrono::Duration::minutes(1)).unwrap();
    if floor < Utc::now() + lead { floor + chrono::Duration::minutes(1) } else { floor }
}

/// A one-minute daily send window on a channel too slow to finish inside it: nothing is
/// sent before it opens, sending stops when it closes (phase `Scheduled`), and goes on
/// when the window opens again.
///
/// Tolerance at the closing edge: the sender pods do not know the window; the
/// controller sees it closed at its next look at the running campaign (it refreshes
/// every 3 s), then suspends the Job, whose pods get SIGTERM and finish the send in
/// flight. Sends up to `EDGE` after the close are accepted; at the opening edge the
/// controller waits until the opening instant itself, so nothing is sent before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_window_stops_sends_when_it_closes_and_the_campaign_goes_on_when_it_reopens() {
    const EDGE: chrono::Duration = chrono::Duration::seconds(10);
    let stack = Stack::start("window").await;
    common::seed_contacts(&stack.pool, &stack.org, 1500, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    // 200 ms spacing: at most 300 sends a minute, so 1500 cannot finish in one window.
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(200)));
    let open = next_minute(chrono::Duration::seconds(20));
    let close = open + chrono::Duration::minutes(1);
    stack.apply(&campaign("windowed", "main", "promo", "{allContacts: true}", &one_minute_window(open)));

    let c = stack
        .wait_for("campaign", "windowed", "Scheduled before the window", Duration::from_secs(30), |c| {
            phase(c) == "Scheduled"
        })
        .await;
    assert!(Utc::now() < open, "the test chose the window too close to now");
    assert_eq!(c["spec"]["suspend"], false);
    stack
        .wait_for("campaign", "windowed", "Running once the window opens", Duration::from_secs(120), |c| {
            phase(c) == "Running"
        })
        .await;
    assert!(Utc::now() >= open, "running before the window opened");

    sleep_until(close).await;
    let c = stack
        .wait_for("campaign", "windowed", "Scheduled when the window closes", Duration::from_secs(30), |c| {
            phase(c) == "Scheduled"
        })
        .await;
    stack.wait_for_no_pods(&uid(&c)).await;
    sleep_until(close + EDGE + chrono::Duration::seconds(3)).await;
    let first = sandbox.ledger().entries();
    assert!(first.len() >= 50, "the window was used: {} sends\n{}", first.len(), stack.logs());
    assert!(first.len() < 1500, "the campaign could not finish in one window");
    let early: Vec<_> = first.iter().filter(|e| e.at < open).map(|e| e.at).collect();
    assert!(early.is_empty(), "sent before the window opened at {open}: {early:?}");
    let late: Vec<_> = first.iter().filter(|e| e.at >= close + EDGE).map(|e| e.at).collect();
    assert!(late.is_empty(), "sent after the window closed at {close} (tolerance {EDGE}): {late:?}");
    let c = stack.get("campaign", "windowed");
    assert!(count(&c, "pending") > 0, "messages are left for the next window: {}", c["status"]);

    // The window is daily; a person moves it to the next minute rather than the test
    // waiting a day. The campaign picks up when that window opens, not before.
    let reopen = next_minute(chrono::Duration::seconds(15));
    let stopped = sandbox.ledger().accepted_count();
    stack.patch("campaign", "windowed", &json!({"spec": {"schedule": {"window": {"start": reopen.format("%H:%M").to_string(), "end": (reopen + chrono::Duration::minutes(1)).format("%H:%M").to_string(), "timeZone": "UTC"}}}}).to_string());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase(&stack.get("campaign", "windowed")), "Scheduled", "still waiting for the moved window");
    stack
        .wait_for("campaign", "windowed", "Running in the next window", Duration::from_secs(120), |c| {
            phase(c) == "Running"
        })
        .await;
    wait_for_sends(&stack, &sandbox, stopped + 20).await;
    let again: Vec<_> = sandbox.ledger().entries().into_iter().skip(stopped).map(|e| e.at).collect();
    assert!(again.iter().all(|at| *at >= reopen), "sent before the next window opened at {reopen}: {again:?}");
    assert_eq!(
        recipients(&sandbox).iter().collect::<HashSet<_>>().len(),
        sandbox.ledger().accepted_count(),
        "nobody got two messages"
    );
}

/// A campaign created with `spec.suspend: true` is a Draft: it freezes nothing and
/// sends nothing; un-suspended, it runs to Completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draft_sends_nothing_and_runs_to_completion_when_unsuspended() {
    let stack = Stack::start("draft").await;
    common::seed_contacts(&stack.pool, &stack.org, 120, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    stack.apply(&campaign("later", "main", "promo", "{allContacts: true}", "  suspend: true\n"));
    let c = stack.wait_for("campaign", "later", "Draft", LONG, |c| phase(c) == "Draft").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(phase(&stack.get("campaign", "later")), "Draft", "a Draft stays a Draft");
    assert_eq!(sandbox.ledger().accepted_count(), 0, "a Draft sends nothing");
    assert_eq!(stack.kubectl(&["get", "jobs", "-o", "name"]).trim(), "", "a Draft has no sending Job");
    assert_eq!(rows(&stack.pool, &uid(&c)).await[1], ("campaign_messages", 0), "a Draft's audience is not frozen");

    stack.patch("campaign", "later", r#"{"spec":{"suspend":false}}"#);
    let c = stack.wait_for("campaign", "later", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(count(&c, "sent"), 120, "{}", c["status"]);
    assert_eq!(recipients(&sandbox).iter().collect::<HashSet<_>>().len(), 120);
    assert_eq!(sandbox.ledger().accepted_count(), 120, "each contact once");
}

/// `retention: Delete` removes the campaign's rows from Postgres when the Campaign is
/// deleted (finished or still sending); the default, `Retain`, keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_delete_removes_the_rows_and_the_default_keeps_them() {
    let stack = Stack::start("retain").await;
    common::seed_contacts(&stack.pool, &stack.org, 600, |i| (vec![["a", "b", "c"][i % 3].into()], json!({}))).await;
    // Some failures, so that error counts exist too.
    let sandbox = sandbox_with(|c| c.faults.permanent = 0.2).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    let lenient = "  failureThreshold: {maxFailurePercent: 100, minSample: 1}\n";
    stack.apply(&campaign("gone", "main", "promo", "{tags: {anyOf: [a]}}", &format!("{lenient}  retention: Delete\n")));
    stack.apply(&campaign("kept", "main", "promo", "{tags: {anyOf: [b]}}", lenient));
    let gone = stack.wait_for("campaign", "gone", "Completed", LONG, |c| phase(c) == "Completed").await;
    let kept = stack.wait_for("campaign", "kept", "Completed", LONG, |c| phase(c) == "Completed").await;
    let (gone_uid, kept_uid) = (uid(&gone), uid(&kept));
    let before = rows(&stack.pool, &gone_uid).await;
    assert!(before.iter().all(|(_, n)| *n > 0), "the rows exist before deletion: {before:?}");
    let kept_before = rows(&stack.pool, &kept_uid).await;
    assert!(kept_before.iter().all(|(_, n)| *n > 0), "{kept_before:?}");

    stack.kubectl(&["delete", "campaign", "gone", "kept", "--timeout=60s"]);
    assert!(
        rows(&stack.pool, &gone_uid).await.iter().all(|(_, n)| *n == 0),
        "retention: Delete left rows: {:?}",
        rows(&stack.pool, &gone_uid).await
    );
    assert_eq!(rows(&stack.pool, &kept_uid).await, kept_before, "the default retention keeps every row");

    // Deleted while its senders are still sending.
    let sandbox_slow = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("slow", &sandbox_slow.base_url(), "222", &fast(100)));
    stack.apply(&campaign("midway", "slow", "promo", "{tags: {anyOf: [c]}}", "  retention: Delete\n"));
    wait_for_sends(&stack, &sandbox_slow, 10).await;
    let midway = stack.get("campaign", "midway");
    assert_eq!(phase(&midway), "Running");
    stack.kubectl(&["delete", "campaign", "midway", "--timeout=60s"]);
    stack.wait_for_no_pods(&uid(&midway)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rows(&stack.pool, &uid(&midway)).await.iter().all(|(_, n)| *n == 0),
        "rows came back after the deletion: {:?}\n{}",
        rows(&stack.pool, &uid(&midway)).await,
        stack.logs()
    );
    let after = sandbox_slow.ledger().accepted_count();
    assert!(after < 200, "sending stopped with the deletion: {after}");
}

/// The Events a person reads on a Campaign (`kubectl get events`): the audience frozen,
/// started, paused and resumed by a person, completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_events_a_person_relies_on_appear_on_the_campaign() {
    let stack = Stack::start("events").await;
    common::seed_contacts(&stack.pool, &stack.org, 300, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(30)));
    stack.apply(&campaign("told", "main", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &sandbox, 20).await;
    plugin_ok(&stack, &["pause", "told"]);
    let c = stack.wait_for("campaign", "told", "Paused", LONG, |c| phase(c) == "Paused").await;
    stack.wait_for_no_pods(&uid(&c)).await;
    plugin_ok(&stack, &["resume", "told"]);
    stack.wait_for("campaign", "told", "Completed", LONG, |c| phase(c) == "Completed").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = ["AudienceFrozen", "Started", "Paused", "ResumeRequested", "Resumed", "Completed"];
    loop {
        let reasons = event_reasons(&stack, "told");
        let missing: Vec<_> = wanted.iter().filter(|w| !reasons.iter().any(|r| r == *w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "events missing: {missing:?}; got {reasons:?}\n{}", stack.logs());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // `kubectl disparo status` shows them as well.
    let view = plugin_ok(&stack, &["status", "told"]);
    assert!(view.contains("Recent events") && view.contains("Completed"), "{view}");
}

/// `pause`, `resume` and `cancel` do what their help says: pause suspends the sending
/// Job, resume continues it, cancel refuses without `--yes` when not on a terminal and
/// with it stops for good. `status` shows the progress, counts and phase, also as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plugin_verbs_pause_resume_and_cancel_do_what_their_help_says() {
    let stack = Stack::start("verbs").await;
    common::seed_contacts(&stack.pool, &stack.org, 800, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(40)));
    stack.apply(&campaign("verbs", "main", "promo", "{allContacts: true}", ""));

    assert!(help(&stack, "pause").contains("suspends its sending Job"));
    assert!(help(&stack, "cancel").contains("required when not on a terminal"));
    assert!(help(&stack, "status").contains("Keep watching until the campaign reaches a final phase"));

    wait_for_sends(&stack, &sandbox, 30).await;
    let c = stack
        .wait_for("campaign", "verbs", "progress in status", LONG, |c| phase(c) == "Running" && count(c, "sent") > 0)
        .await;
    let view = plugin_ok(&stack, &["status", "verbs"]);
    assert!(view.contains(&format!("Campaign  {}/verbs", stack.ns)), "{view}");
    assert!(view.contains("Phase     Running"), "{view}");
    assert!(view.contains("Progress  ") && view.contains("msg/min"), "{view}");
    assert!(view.contains("Messages  total 800  pending "), "{view}");
    let json_view: Value = serde_json::from_str(&plugin_ok(&stack, &["status", "verbs", "-o", "json"])).unwrap();
    assert_eq!(json_view["metadata"]["uid"], c["metadata"]["uid"]);
    assert_eq!(json_view["status"]["messages"]["total"], 800);
    assert!(json_view["status"]["progress"]["percentage"].is_string(), "{}", json_view["status"]);

    // pause: spec.suspend, the Job suspended, nothing sent.
    let out = plugin_ok(&stack, &["pause", "verbs"]);
    assert!(out.contains("paused"), "{out}");
    let c = stack.wait_for("campaign", "verbs", "Paused", LONG, |c| phase(c) == "Paused").await;
    assert_eq!(c["spec"]["suspend"], true);
    let job = c["status"]["batches"]["jobName"].as_str().map(str::to_owned).unwrap_or_default();
    let job = stack.get("job", &job);
    assert_eq!(job["spec"]["suspend"], true, "the sending Job is suspended");
    stack.wait_for_no_pods(&uid(&c)).await;
    let paused_at = sandbox.ledger().accepted_count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(sandbox.ledger().accepted_count(), paused_at, "nothing is sent while paused");
    assert!(plugin_ok(&stack, &["status", "verbs"]).contains("Phase     Paused"));

    // resume: sending goes on.
    let out = plugin_ok(&stack, &["resume", "verbs"]);
    assert!(out.contains("resumed"), "{out}");
    let c = stack.wait_for("campaign", "verbs", "Running again", LONG, |c| phase(c) == "Running").await;
    assert_eq!(c["spec"]["suspend"], false);
    wait_for_sends(&stack, &sandbox, paused_at + 20).await;

    // cancel without --yes, not on a terminal: refused, nothing changes.
    let out = stack.plugin(&["cancel", "verbs"]);
    assert!(!out.status.success(), "cancel without --yes off a terminal must refuse");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"), "{}", String::from_utf8_lossy(&out.stderr));
    let c = stack.get("campaign", "verbs");
    assert_eq!(c["spec"]["cancel"], false);
    assert_ne!(phase(&c), "Cancelled");

    // cancel --yes: for good.
    let out = plugin_ok(&stack, &["cancel", "verbs", "--yes"]);
    assert!(out.contains("cancelled"), "{out}");
    let c = stack.wait_for("campaign", "verbs", "Cancelled", LONG, |c| phase(c) == "Cancelled").await;
    stack.wait_for_no_pods(&uid(&c)).await;
    let cancelled_at = sandbox.ledger().accepted_count();
    assert!(cancelled_at < 800, "cancelled before the end");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(sandbox.ledger().accepted_count(), cancelled_at, "nothing is sent after a cancel");
    // The final counts add up and match what the provider accepted.
    let c = stack
        .wait_for("campaign", "verbs", "final counts", Duration::from_secs(30), |c| {
            count(c, "pending") == 0
                && count(c, "sent")
                    + count(c, "failed")
                    + count(c, "unknown")
                    + count(c, "cancelled")
                    + count(c, "skipped")
                    == 800
        })
        .await;
    assert!(count(&c, "cancelled") > 0, "{}", c["status"]);
    let (sent, unknown) = (count(&c, "sent") as usize, count(&c, "unknown") as usize);
    assert!(
        sent <= cancelled_at && cancelled_at <= sent + unknown,
        "status counts what the provider accepted ({cancelled_at}): {}",
        c["status"]
    );
    let view = plugin_ok(&stack, &["status", "verbs"]);
    assert!(
        view.contains("Phase     Cancelled") && view.contains(&format!("cancelled {}", count(&c, "cancelled"))),
        "{view}"
    );
    // `--watch` waits for a final phase, also off a terminal (a script): this one is final.
    let watched = plugin_ok(&stack, &["status", "verbs", "--watch"]);
    assert!(watched.contains("Phase     Cancelled"), "{watched}");
    // Cancel cannot be undone, and resume does not bring it back.
    let _ = stack.plugin(&["resume", "verbs"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase(&stack.get("campaign", "verbs")), "Cancelled");
    assert_eq!(sandbox.ledger().accepted_count(), cancelled_at);
}

/// `status` shows counts, rates, retries and the error breakdown (also as JSON and
/// YAML); `retry-failed` creates a campaign whose audience is exactly the failed
/// messages, and it sends to them only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_the_failures_and_retry_failed_sends_to_exactly_those() {
    let stack = Stack::start("retry").await;
    common::seed_contacts(&stack.pool, &stack.org, 200, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|c| c.faults.permanent = 0.3).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    stack.apply(&campaign(
        "flaky",
        "main",
        "promo",
        "{allContacts: true}",
        "  failureThreshold: {maxFailurePercent: 100, minSample: 1}\n",
    ));
    let c = stack.wait_for("campaign", "flaky", "Completed", LONG, |c| phase(c) == "Completed").await;
    let failed = phones_with_status(&stack.pool, &uid(&c), "failed").await;
    assert!(!failed.is_empty() && failed.len() < 200, "some failed: {}", failed.len());
    assert_eq!(count(&c, "failed") as usize, failed.len(), "{}", c["status"]);
    let accepted: BTreeSet<String> = recipients(&sandbox).into_iter().collect();
    assert!(accepted.is_disjoint(&failed), "a failed message was accepted by the provider");

    assert!(help(&stack, "status").contains("errors"));
    let view = plugin_ok(&stack, &["status", "flaky"]);
    let counts = format!("Messages  total 200  pending 0  sent {}  ", count(&c, "sent"));
    assert!(view.contains("Phase     Completed") && view.contains(&counts), "{view}");
    assert!(view.contains(&format!("failed {}", failed.len())), "{view}");
    assert!(view.contains("Rates     delivery") && view.contains("Retries   first attempt"), "{view}");
    assert!(
        view.lines().any(|l| l.trim_start().starts_with("131026") && l.trim_end().ends_with(&failed.len().to_string())),
        "the error breakdown: {view}"
    );
    let as_json: Value = serde_json::from_str(&plugin_ok(&stack, &["status", "flaky", "-o", "json"])).unwrap();
    assert_eq!(as_json["status"]["messages"]["failed"], failed.len());
    let as_yaml: Value = serde_yaml::from_str(&plugin_ok(&stack, &["status", "flaky", "-o", "yaml"])).unwrap();
    assert_eq!(as_yaml["status"]["phase"], "Completed");

    // retry-failed, with the provider fixed.
    assert!(help(&stack, "retry-failed").contains("failed messages"));
    sandbox.set_faults(Faults::default()).unwrap();
    let before = sandbox.ledger().accepted_count();
    let out = plugin_ok(&stack, &["retry-failed", "flaky"]);
    assert!(out.contains("flaky-retry"), "{out}");
    let retry = stack.wait_for("campaign", "flaky-retry", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(retry["metadata"]["labels"]["disparo.io/retry-of"], "flaky");
    assert_eq!(retry["spec"]["audience"]["fromCampaign"]["name"], "flaky");
    assert_eq!(audience_phones(&stack.pool, &uid(&retry)).await, failed, "the audience is exactly the failed messages");
    assert_eq!(count(&retry, "sent") as usize, failed.len(), "{}", retry["status"]);
    let resent: BTreeSet<String> = sandbox.ledger().entries().into_iter().skip(before).map(|e| e.recipient).collect();
    assert_eq!(resent, failed, "the retry sent to the failed contacts, and only them");
    assert_eq!(sandbox.ledger().accepted_count() - before, failed.len(), "each once");

    // --suspended makes a Draft that sends nothing; --new-name names it.
    let out = plugin_ok(&stack, &["retry-failed", "flaky", "--new-name", "review-first", "--suspended"]);
    assert!(out.contains("review-first"), "{out}");
    let draft = stack.wait_for("campaign", "review-first", "Draft", LONG, |c| phase(c) == "Draft").await;
    assert_eq!(draft["spec"]["suspend"], true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.ledger().accepted_count() - before, failed.len(), "a Draft sends nothing");
    // Creating the same retry twice is refused rather than sending twice.
    let again = stack.plugin(&["retry-failed", "flaky"]);
    assert!(!again.status.success(), "a second retry-failed with the same name must be refused");
}
