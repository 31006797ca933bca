//! The scale run (docs/architecture.md "The scale run"), on the real stack: the control
//! plane, the controller, the node agent running sender pods, Postgres, the webhook
//! service, and the sandbox answering at once and posting delivered/read receipts back.
//! One Meta Channel, one Campaign over every contact in batches, 8 sender pods at a
//! time, through to Completed.
//!
//! - In CI, 20,000 contacts: it asserts behaviour only (Completed, each contact messaged
//!   once, counters equal to a recount, receipts applied) and prints the figures.
//! - On demand (`scripts/bench-e2e`, or `cargo test --test scale -- --ignored
//!   --nocapture --test-threads=1`): the run at `DISPARO_SCALE_CONTACTS` (default
//!   1,000,000), materialization alone at `DISPARO_SCALE_MATERIALIZE` (default
//!   10,000,000), and the controller's memory with 1,000 Campaigns.
//!
//! Figures are printed, never asserted: the machine is shared.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::figures::{self, Row, mib};
use common::procstat::{self, PeakSampler};
use common::stack::{Stack, free_port, is_true_with, meta_channel, phase, sandbox_with, uid};
use disparo::sandbox::{Latency, SandboxHandle, WebhookBehaviour};
use disparo::store::audience::{AudienceQuery, CampaignKey};
use disparo::store::campaigns::{self, Counters};
use sqlx::PgPool;

/// Sender pods at a time (the Campaign's `execution.parallelism`).
const SENDER_PODS: u32 = 8;

/// A channel nothing but a daily cap Meta itself would never reach holds back.
const NO_CAPS: &str = "{perDay: 100000000, mode: Graceful, minIntervalMillis: 0}";

/// Messages whose webhooks the sandbox holds at once. Each waiting post holds a
/// connection to the webhook service (as Meta's do): when receipts come faster than it
/// applies them, the backlog is bounded here rather than by the machine's file limits.
/// The sandbox's own default; each waiting post may hold a file descriptor on both sides.
const WEBHOOK_BACKLOG: u32 = 10_000;

/// Messages in the small campaign the status refresh is timed on, beside the big one.
const SMALL: usize = 1_000;

fn size_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().map(|v| v.replace('_', "").parse().expect(name)).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_contacts_each_get_one_message_and_their_receipts() {
    run_at_scale(20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "on demand: scripts/bench-e2e (a million contacts take 10-20 minutes)"]
async fn scale_run_on_demand() {
    run_at_scale(size_from_env("DISPARO_SCALE_CONTACTS", 1_000_000)).await;
}

/// Loads `n` contacts `+55119` and eight digits, named `Contact i`, in one set-based
/// statement (a million take seconds; one insert per row would take minutes).
async fn load_contacts(pool: &PgPool, organization: &str, n: usize) -> Duration {
    let start = Instant::now();
    sqlx::query(
        "INSERT INTO contacts (organization, phone, name) SELECT $1, '+55119' || lpad(i::text, 8, '0'), 'Contact ' || i FROM generate_series(0, $2 - 1) i",
    )
    .bind(organization)
    .bind(n as i64)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE contacts").execute(pool).await.unwrap();
    start.elapsed()
}

/// Messages per batch: about 40 batches, so the 8 pods take turns, within the CRD's range.
fn batch_size(contacts: usize) -> usize {
    (contacts / 40).clamp(100, 10_000)
}

fn campaign_yaml(name: &str, batch_size: usize) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Campaign\nmetadata: {{name: {name}}}\nspec:\n  channelRef: {{name: main}}\n  message:\n    template: {{name: promo, language: pt_BR, bodyParameters: [\"{{{{contact.name}}}}\"]}}\n  audience: {{allContacts: true}}\n  execution: {{batchSize: {batch_size}, parallelism: {SENDER_PODS}}}\n  retry: {{maxAttempts: 3, baseDelaySeconds: 1, maxDelaySeconds: 2}}\n"
    )
}

/// The statements the controller runs for a campaign's status at each refresh
/// (src/controller/campaign: the counters row, the error breakdown, the requeued count),
/// timed together; the median of 21 runs.
async fn status_refresh_time(pool: &PgPool, campaign: uuid::Uuid) -> Duration {
    let mut times = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        campaigns::counters(pool, campaign).await.unwrap().unwrap();
        campaigns::error_breakdown(pool, campaign, 10).await.unwrap();
        campaigns::marketing_limited(pool, campaign).await.unwrap();
        times.push(start.elapsed());
    }
    figures::median(times).unwrap()
}

/// The counts a recount can check.
fn by_status(c: &Counters) -> [i64; 10] {
    [c.total, c.pending, c.sending, c.unknown, c.sent, c.delivered, c.read, c.failed, c.cancelled, c.skipped]
}

/// Polls the webhook service's /metrics every 200 ms until `done`: (seconds since
/// `start`, receipts applied) samples.
fn sample_receipts(
    metrics_url: String,
    start: Instant,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(f64, u64)>> {
    tokio::spawn(async move {
        // A short timeout: a service refusing work may be slow to answer /metrics too,
        // and one hung request must not stop the sampling.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let mut samples = Vec::new();
        while !done.load(Ordering::Relaxed) {
            if let Ok(response) = http.get(&metrics_url).send().await
                && let Ok(text) = response.text().await
            {
                samples.push((start.elapsed().as_secs_f64(), figures::receipts_applied(&text)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    })
}

/// Waits for the campaign's phase to be `want` (polled every second: at scale a
/// kubectl every 300 ms would be a load of its own).
async fn wait_for_phase(stack: &Stack, name: &str, want: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let c = tokio::task::block_in_place(|| stack.get("campaign", name));
        if phase(&c) == want {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "campaign {name} not {want} after {timeout:?}; status:\n{}\n{}",
            serde_json::to_string_pretty(&c["status"]).unwrap(),
            stack.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The sandbox: answers at once, approves any template, posts every message's delivered
/// receipt (and a read receipt for half of them) to the stack's webhook service, never
/// fails one, duplicates or reorders nothing (so what is counted is exact). Up to
/// [`WEBHOOK_BACKLOG`] messages' webhooks wait at once; past that a message gets none
/// (the sandbox counts it dropped) and stays `sent`.
///
/// It runs on a runtime of its own: on the test's, 73 sends of one run timed out (their
/// outcome `unknown`, rightly never re-sent), most likely queued behind a worker blocked
/// by a `kubectl` call: that measured the harness, not Disparo.
fn sandbox_posting_to(webhook_url: String) -> SandboxHandle {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let sandbox = sandbox_with(|c| {
                c.latency = Latency { min_ms: 0, max_ms: 0 };
                c.meta.webhook_url = Some(webhook_url);
                c.webhooks = WebhookBehaviour {
                    failed: 0.0,
                    delivered: 1.0,
                    read: 0.5,
                    duplicate: 0.0,
                    out_of_order: 0.0,
                    batch: 0.0,
                    delay_min_ms: 0,
                    delay_max_ms: 50,
                    max_in_flight: WEBHOOK_BACKLOG,
                    ..Default::default()
                };
            })
            .await;
            handle_tx.send(sandbox).unwrap();
            // Serves until the test process ends.
            std::future::pending::<()>().await;
        });
    });
    handle_rx.recv().unwrap()
}

/// One Meta Channel on the zero-latency sandbox with its webhooks on, `contacts`
/// contacts, one Campaign over all of them in batches over 8 sender pods, to Completed
/// with every receipt applied. Asserts behaviour; prints the figures.
async fn run_at_scale(contacts: usize) {
    let mut stack = Stack::start("scale").await;
    let port = free_port();
    let sandbox = sandbox_posting_to(format!("http://127.0.0.1:{port}/webhooks/meta/{}/main", stack.ns));
    let webhook = stack.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{port}")]);
    let postmaster = procstat::postmaster_pid(&stack.pool).await;

    let load_time = load_contacts(&stack.pool, &stack.org, contacts).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", NO_CAPS));
    stack.wait_for("channel", "main", "Ready", Duration::from_secs(120), |ch| is_true_with(ch, "Ready", "Ready")).await;

    let controller_pid = stack.procs[0].child.id().unwrap();
    let webhook_pid = stack.procs[webhook].child.id().unwrap();
    let sampler = PeakSampler::start(
        vec![("controller".into(), controller_pid), ("webhook".into(), webhook_pid)],
        stack.agents[0].pid(),
        "sender",
        |args| args.iter().any(|a| a == "send"),
        Duration::from_millis(200),
    );
    let cpu_before = postmaster.and_then(procstat::postgres_cpu_seconds);
    let start = Instant::now();
    let receipts_done = Arc::new(AtomicBool::new(false));
    let receipts = sample_receipts(format!("http://127.0.0.1:{port}/metrics"), start, receipts_done.clone());
    let batch_size = batch_size(contacts);
    stack.apply(&campaign_yaml("big", batch_size));

    // Materialization: the campaign's audience frozen in Postgres (the Campaign applied
    // with its contacts loaded and its Channel ready; preflight included).
    let frozen_deadline = Instant::now() + Duration::from_secs(600 + contacts as u64 / 1_000);
    let materialization = loop {
        let frozen: Option<(bool,)> = sqlx::query_as(
            "SELECT audience_frozen_at IS NOT NULL FROM campaigns WHERE organization = $1 AND name = 'big'",
        )
        .bind(&stack.org)
        .fetch_optional(&stack.pool)
        .await
        .unwrap();
        if frozen == Some((true,)) {
            break start.elapsed();
        }
        assert!(Instant::now() < frozen_deadline, "the audience was never frozen\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let timeout = Duration::from_secs(600 + contacts as u64 / 100);
    let c = wait_for_phase(&stack, "big", "Completed", timeout).await;
    let completed_after = start.elapsed();
    let campaign: uuid::Uuid = uid(&c).parse().unwrap();

    // The receipts settle: the sandbox posts nothing more (a post, a refusal or a retry
    // given up) for 15 s, longer than its longest wait between attempts, and the
    // webhook's sweeper has had its turn at receipts kept for a message not yet recorded.
    // Counted from the sandbox, not from Postgres: a recount would load the Postgres
    // being measured.
    let deadline = Instant::now() + timeout;
    let counts = |s: &SandboxHandle| {
        let c = s.webhook_counts();
        (c.posted, c.given_up)
    };
    let mut seen = counts(&sandbox);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counts(&sandbox);
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
        assert!(Instant::now() < deadline, "the sandbox kept posting webhooks\n{}", stack.logs());
    }
    let receipts_after = start.elapsed() - quiet_since.elapsed();
    let counters = campaigns::counters(&stack.pool, campaign).await.unwrap().unwrap();
    let cpu_after = postmaster.and_then(procstat::postgres_cpu_seconds);
    receipts_done.store(true, Ordering::Relaxed);
    let receipt_samples = receipts.await.unwrap();
    // The sender pods' last reads of their peaks come before they end.
    stack.wait_for_no_pods(&campaign.to_string()).await;
    let peaks = sampler.finish();

    // --- figures, printed before the behaviour is asserted so a long run always says them
    let ledger = sandbox.ledger();
    let recount = campaigns::recount(&stack.pool, campaign).await.unwrap();
    let posted = sandbox.webhook_counts();
    let small = materialize_small(&stack, contacts.min(SMALL)).await;
    let refresh_small = status_refresh_time(&stack.pool, small).await;
    let refresh_big = status_refresh_time(&stack.pool, campaign).await;
    let sends: Vec<chrono::DateTime<chrono::Utc>> = ledger.entries().into_iter().map(|e| e.at).collect();
    let (first, last) = (sends.iter().min().copied().unwrap(), sends.iter().max().copied().unwrap());
    let send_seconds = (last - first).num_milliseconds() as f64 / 1000.0;
    let cpu = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let mut rows = vec![
        Row::ok("contacts", format!("{contacts} (batches of {batch_size}, {SENDER_PODS} sender pods at a time)")),
        Row::ok("contacts loaded", format!("{:.1} s (one INSERT ... SELECT)", load_time.as_secs_f64())),
        Row::ok(
            "materialization (Campaign applied -> audience frozen)",
            format!("{:.2} s", materialization.as_secs_f64()),
        ),
        Row::ok(
            "end-to-end (first send -> last send, sandbox ledger)",
            format!("{:.0} messages/s ({contacts} in {send_seconds:.1} s)", contacts as f64 / send_seconds.max(0.001)),
        ),
        Row::ok(
            "Campaign applied -> Completed",
            format!(
                "{:.1} s ({:.0} messages/s)",
                completed_after.as_secs_f64(),
                contacts as f64 / completed_after.as_secs_f64()
            ),
        ),
        Row::maybe(
            "receipts applied/s (Postgres, first -> last applied)",
            receipts_in_postgres(&stack.pool, campaign).await.map(|(receipts, seconds)| {
                format!("{:.0}/s ({receipts} receipts in {seconds:.1} s)", receipts as f64 / seconds)
            }),
            "fewer than two receipts applied",
        ),
        Row::maybe(
            "receipts applied/s (webhook /metrics, first -> last)",
            figures::growth_rate(&receipt_samples).map(|r| {
                format!(
                    "{r:.0}/s ({} receipts; all applied {:.1} s after apply)",
                    receipt_samples.last().map_or(0, |s| s.1),
                    receipts_after.as_secs_f64()
                )
            }),
            "the webhook's /metrics gave no growing count",
        ),
        Row::maybe(
            "Postgres CPU per 1,000 messages (apply -> last receipt)",
            cpu.map(|s| format!("{:.3} s ({s:.1} CPU s in all)", s * 1000.0 / contacts as f64)),
            "the postmaster's /proc entry is not readable (Postgres on another machine?)",
        ),
    ];
    for label in ["controller", "webhook"] {
        let peak = peaks.iter().find(|p| p.label == label).map(|p| mib(p.kib));
        rows.push(Row::maybe(format!("peak RSS {label}"), peak, "its /proc entry was never read"));
    }
    rows.extend(sender_rows(&peaks));
    rows.push(Row::ok(
        "messages delivered or read / only sent / unknown",
        format!("{} / {} / {}", recount.delivered + recount.read, recount.sent, recount.unknown),
    ));
    rows.push(Row::ok(
        "sandbox webhooks",
        format!(
            "{} posts answered 2xx, {} given up after the last retry; {} messages got none (over the {WEBHOOK_BACKLOG}-message backlog)",
            posted.posted, posted.given_up, posted.dropped
        ),
    ));
    rows.push(Row::ok(
        format!("status refresh, {} messages", contacts.min(SMALL)),
        format!("{:.2} ms (median of 21)", refresh_small.as_secs_f64() * 1000.0),
    ));
    rows.push(Row::ok(
        format!("status refresh, {contacts} messages"),
        format!("{:.2} ms (median of 21)", refresh_big.as_secs_f64() * 1000.0),
    ));
    println!("{}", figures::table(&format!("scale run: {contacts} contacts"), &rows));

    // --- behaviour
    assert_eq!(phase(&c), "Completed");
    assert_eq!(by_status(&counters), by_status(&recount), "the counters equal a recount");
    assert_eq!(recount.failed + recount.pending + recount.sending + recount.cancelled + recount.skipped, 0);
    assert!(ledger.duplicates().is_empty(), "nobody got two messages");
    let expected: HashSet<String> =
        (0..contacts).map(|i| common::phone(i).trim_start_matches('+').to_owned()).collect();
    let got: HashSet<String> =
        ledger.per_recipient().into_keys().map(|r| r.trim_start_matches('+').to_owned()).collect();
    if recount.unknown == 0 {
        assert_eq!(ledger.accepted_count(), contacts, "one message per contact");
        assert!(got == expected, "the ledger's recipients are exactly the contacts");
    } else {
        // A send that timed out is `unknown` by design (never re-sent): the sandbox may or
        // may not have recorded it. On a loaded machine a few do; the rest is exact.
        assert!(got.is_subset(&expected), "the ledger holds only contacts");
        assert!(
            ledger.accepted_count() as i64 >= contacts as i64 - recount.unknown,
            "every known send reached the sandbox"
        );
    }
    let dropped = posted.dropped as i64;
    assert!(recount.delivered + recount.read > 0, "receipts applied");
    if posted.given_up == 0 {
        // Every post the sandbox made was answered 2xx: exactly the messages it posted
        // no webhooks for are still only sent (or unknown, when their send timed out).
        assert_eq!(recount.sent + recount.unknown, dropped, "every delivered receipt applied: {posted:?}");
    }
    // The Campaign shows the recount at its next status refresh.
    stack
        .wait_for("campaign", "big", "status equal to the recount", Duration::from_secs(120), |c| {
            let m = &c["status"]["messages"];
            m["total"] == recount.total
                && m["sent"] == recount.at_least_sent()
                && m["delivered"] == recount.delivered + recount.read
                && m["read"] == recount.read
                && m["failed"] == recount.failed
                && m["unknown"] == recount.unknown
                && m["pending"] == recount.pending + recount.sending
        })
        .await;
}

/// Receipts Postgres applied for the campaign and the seconds from the first to the
/// last: each delivered message took one, each read one two (its delivered and its
/// read; the sandbox posts them in order), and a receipt's application sets the row's
/// `updated_at`.
async fn receipts_in_postgres(pool: &PgPool, campaign: uuid::Uuid) -> Option<(i64, f64)> {
    let (delivered, read, seconds): (i64, i64, Option<f64>) = sqlx::query_as(
        r#"SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FILTER (WHERE status = 'read'),
                  extract(epoch FROM max(updated_at) - min(updated_at))::float8
           FROM campaign_messages WHERE campaign_uid = $1 AND status IN ('delivered', 'read')"#,
    )
    .bind(campaign)
    .fetch_one(pool)
    .await
    .unwrap();
    seconds.filter(|s| *s > 0.0).map(|s| (delivered + 2 * read, s))
}

/// The senders' peaks: how many pod processes ran, the largest, the median, and each.
fn sender_rows(peaks: &[procstat::Peak]) -> Vec<Row> {
    let mut kib: Vec<u64> = peaks.iter().filter(|p| p.label == "sender").map(|p| p.kib).collect();
    if kib.is_empty() {
        return vec![Row::maybe("peak RSS sender pods", None, "no sender process was seen (ended within 200 ms?)")];
    }
    kib.sort();
    let each: Vec<String> = kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
    vec![
        Row::ok(
            "peak RSS sender pods",
            format!("{} processes: max {}, median {}", kib.len(), mib(kib[kib.len() - 1]), mib(kib[kib.len() / 2])),
        ),
        Row::ok("peak RSS each sender (MiB, sorted)", each.join(" ")),
    ]
}

/// A campaign of the first `n` contacts frozen by the store (as the controller freezes
/// one), for timing the status refresh on a small campaign; its messages stay pending.
async fn materialize_small(stack: &Stack, n: usize) -> uuid::Uuid {
    let uid = uuid::Uuid::new_v4();
    let key = CampaignKey { uid, organization: &stack.org, name: "refresh-small", channel: "main", batch_size: 100 };
    let phones = (0..n).map(common::phone).collect();
    let frozen =
        disparo::store::audience::materialize(&stack.pool, &key, &AudienceQuery::Contacts(phones)).await.unwrap();
    assert_eq!(frozen.messages, n as i64);
    uid
}

/// Materialization alone at `DISPARO_SCALE_MATERIALIZE` contacts (default 10,000,000):
/// contacts loaded, then the audience frozen by the store function the controller calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "on demand: scripts/bench-e2e (ten million contacts take minutes and gigabytes)"]
async fn materialization_on_demand() {
    let contacts = size_from_env("DISPARO_SCALE_MATERIALIZE", 10_000_000);
    let (pool, url) = common::fresh_db().await;
    let organization = "scale-materialize";
    let load_time = load_contacts(&pool, organization, contacts).await;
    let key = CampaignKey { uid: uuid::Uuid::new_v4(), organization, name: "big", channel: "main", batch_size: 10_000 };
    let start = Instant::now();
    let frozen = disparo::store::audience::materialize(&pool, &key, &AudienceQuery::AllContacts).await.unwrap();
    let materialization = start.elapsed();
    assert_eq!(frozen.messages, contacts as i64);
    let rows = [
        Row::ok("contacts loaded", format!("{:.1} s (one INSERT ... SELECT)", load_time.as_secs_f64())),
        Row::ok(
            "materialization (store::audience::materialize)",
            format!(
                "{:.1} s ({:.0} messages/s, {} batches)",
                materialization.as_secs_f64(),
                contacts as f64 / materialization.as_secs_f64(),
                frozen.batches
            ),
        ),
    ];
    println!("{}", figures::table(&format!("materialization: {contacts} contacts"), &rows));
    drop_database(pool, &url).await;
}

/// Drops a test's database: ten million contacts and their messages take gigabytes of a
/// shared disk.
async fn drop_database(pool: PgPool, url: &str) {
    pool.close().await;
    let name = url.rsplit('/').next().unwrap();
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&common::server_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&admin).await.unwrap();
}

/// The controller's peak memory with 1,000 Campaign objects reconciled: each over the
/// same 10 contacts, scheduled a day ahead (so each is checked and shown Scheduled, and
/// no sender pod runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "on demand: scripts/bench-e2e"]
async fn controller_memory_with_a_thousand_campaigns() {
    const CAMPAIGNS: usize = 1_000;
    let stack = Stack::start("many").await;
    load_contacts(&stack.pool, &stack.org, 10).await;
    let sandbox = sandbox_with(|c| c.latency = Latency { min_ms: 0, max_ms: 0 }).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", NO_CAPS));
    let controller_pid = stack.procs[0].child.id().unwrap();
    let sampler = PeakSampler::start(
        vec![("controller".into(), controller_pid)],
        stack.agents[0].pid(),
        "sender",
        |args| args.iter().any(|a| a == "send"),
        Duration::from_millis(200),
    );
    let before = procstat::vm_hwm(controller_pid);
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let start = Instant::now();
    let manifests: Vec<String> = (0..CAMPAIGNS)
        .map(|i| format!("{}  schedule: {{startAt: '{tomorrow}'}}\n", campaign_yaml(&format!("c{i:04}"), 100)))
        .collect();
    for chunk in manifests.chunks(100) {
        stack.apply(&chunk.join("---\n"));
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&stack.kubectl(&["get", "campaigns", "-o", "json"])).unwrap();
        let scheduled = list["items"].as_array().unwrap().iter().filter(|c| phase(c) == "Scheduled").count();
        if scheduled == CAMPAIGNS {
            break;
        }
        assert!(Instant::now() < deadline, "{scheduled} of {CAMPAIGNS} Scheduled\n{}", stack.logs());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let reconciled_after = start.elapsed();
    // A little longer: the periodic requeues of 1,000 objects, not only the first pass.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let peaks = sampler.finish();
    let controller = peaks.iter().find(|p| p.label == "controller").map(|p| p.kib);
    assert!(peaks.iter().all(|p| p.label != "sender"), "no sender pod ran for a scheduled campaign");
    let rows = [
        Row::maybe("controller peak RSS before the campaigns", before.map(mib), "its /proc entry is not readable"),
        Row::ok("all Scheduled after", format!("{:.1} s", reconciled_after.as_secs_f64())),
        Row::maybe(
            format!("controller peak RSS with {CAMPAIGNS} Campaigns (30 s after)"),
            controller.map(mib),
            "its /proc entry is not readable",
        ),
    ];
    println!("{}", figures::table(&format!("controller with {CAMPAIGNS} campaigns"), &rows));
}
