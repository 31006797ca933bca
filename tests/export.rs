//! `kubectl disparo export` and `retry-failed --reason` on the real stack (control plane,
//! controller, node agent, Postgres, sandbox): a million messages stream out through the
//! namespace's own credential in bounded memory, numbers masked unless `--unmask`,
//! filtered by status and error code; a retry aimed at one error code freezes exactly
//! the contacts whose messages failed with it.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::stack::{Stack, campaign, fast, meta_channel, phase, sandbox_with, uid};
use serde_json::Value;
use sqlx::PgPool;

const LONG: Duration = Duration::from_secs(180);

/// The messages seeded: contact `i` has a message whose outcome is chosen by `i % 10`.
const MESSAGES: i64 = 1_000_000;

/// Waits for the namespace's database credential, written by the controller once the
/// namespace has a Channel.
async fn wait_for_secret(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::cluster::kubectl(&["-n", ns, "get", "secret", "disparo-database"], None).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "no disparo-database Secret in {ns}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A Channel on a sandbox and a suspended Campaign (a Draft: the controller freezes
/// nothing for it), whose rows the test then writes itself as if it had run. Returns the
/// campaign's UID.
async fn draft_campaign(stack: &Stack, sandbox_url: &str, name: &str) -> uuid::Uuid {
    stack.apply(&meta_channel("main", sandbox_url, "111", &fast(0)));
    wait_for_secret(&stack.ns).await;
    stack.apply(&campaign(name, "main", "promo", "{allContacts: true}", "  suspend: true\n"));
    let draft = stack.wait_for("campaign", name, "Draft", LONG, |c| phase(c) == "Draft").await;
    uid(&draft).parse().unwrap()
}

/// Registers the campaign as frozen and gives every contact of the organization whose
/// phone is `+55119` and eight digits `i` one message, its outcome by `i % 10`:
/// 0-1 delivered (marketing, charged), 2 read, 3 failed 131026, 4 failed 131049,
/// 5 sent, 6 unknown, 7 pending, 8 failed 131000, 9 skipped.
async fn seed_messages(pool: &PgPool, org: &str, campaign: uuid::Uuid, name: &str) {
    sqlx::query(
        "INSERT INTO campaigns (uid, organization, name, channel, batch_size, batches, audience_frozen_at) VALUES ($1, $2, $3, 'main', 1000, 1000, now())",
    )
    .bind(campaign)
    .bind(org)
    .bind(name)
    .execute(pool)
    .await
    .unwrap();
    // its partition of campaign_messages, as a freeze creates it
    sqlx::query("SELECT campaign_messages_partition($1)").bind(campaign).execute(pool).await.unwrap();
    sqlx::query(
        r#"
        INSERT INTO campaign_messages (campaign_uid, organization, contact_id, batch_index, status, attempts,
                                       provider_message_id, last_error_code, last_error_message, status_history,
                                       pricing_category, pricing_type)
        SELECT $1, $2, c.id, c.i / 1000,
               (ARRAY['delivered', 'delivered', 'read', 'failed', 'failed', 'sent', 'unknown', 'pending', 'failed',
                      'skipped'])[c.i % 10 + 1]::message_status,
               CASE WHEN c.i % 10 IN (7, 9) THEN 0 ELSE 1 + c.i % 3 END,
               CASE WHEN c.i % 10 IN (0, 1, 2, 5) THEN 'wamid.' || c.i END,
               (ARRAY[NULL, NULL, NULL, '131026', '131049', NULL, 'unknown', NULL, '131000', NULL])[c.i % 10 + 1],
               (ARRAY[NULL, NULL, NULL, 'Message undeliverable', 'Not delivered to maintain healthy ecosystem engagement',
                      NULL, 'timed out', NULL, 'Something went wrong', NULL])[c.i % 10 + 1],
               CASE c.i % 10
                   WHEN 0 THEN jsonb_build_array(jsonb_build_object('status', 'sent', 'at', c.at),
                                                 jsonb_build_object('status', 'delivered', 'at', c.at + interval '2 s'))
                   WHEN 1 THEN jsonb_build_array(jsonb_build_object('status', 'sent', 'at', c.at),
                                                 jsonb_build_object('status', 'delivered', 'at', c.at + interval '2 s'))
                   WHEN 2 THEN jsonb_build_array(jsonb_build_object('status', 'sent', 'at', c.at),
                                                 jsonb_build_object('status', 'read', 'at', c.at + interval '2 s'))
                   WHEN 5 THEN jsonb_build_array(jsonb_build_object('status', 'sent', 'at', c.at))
                   WHEN 3 THEN jsonb_build_array(jsonb_build_object('status', 'failed', 'at', c.at, 'code', '131026'))
                   ELSE '[]'::jsonb END,
               CASE WHEN c.i % 10 IN (0, 1, 2) THEN 'marketing' END,
               CASE WHEN c.i % 10 IN (0, 1, 2) THEN 'regular' END
        FROM (SELECT id, substr(phone, 7)::bigint AS i, now() - substr(phone, 7)::bigint * interval '1 ms' AS at
              FROM contacts WHERE organization = $2) c
        "#,
    )
    .bind(campaign)
    .bind(org)
    .execute(pool)
    .await
    .unwrap();
}

/// A directory holding `kubectl-disparo`, the binary under the name kubectl runs plugins by.
fn plugin_dir(stack: &Stack) -> PathBuf {
    let dir = stack.dir.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-disparo");
    if !link.exists() {
        std::os::unix::fs::symlink(common::bin::disparo(), &link).unwrap();
    }
    dir
}

/// Peak resident memory of a process, in KiB: its `VmHWM` (the kernel's high-water
/// mark of its resident set) read until it exits.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `kubectl-disparo ARGS` (the plugin as kubectl runs it: the same binary, named
/// `kubectl-disparo`) with the admin kubeconfig and no database URL; returns its output
/// and peak RSS in KiB. The peak is the last `VmHWM` read before the process exited
/// (read every 2 ms; the mark only grows).
fn run_plugin(stack: &Stack, args: &[&str]) -> (Output, u64) {
    let mut child = Command::new(plugin_dir(stack).join("kubectl-disparo"))
        .args(args)
        .args(["-n", &stack.ns])
        .env("KUBECONFIG", common::cluster::kubeconfig())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    // stdout and stderr are read by threads, so a full pipe never blocks the child
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).unwrap();
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).unwrap();
        buf
    });
    let status = loop {
        if let Some(hwm) = vm_hwm(pid) {
            peak = peak.max(hwm);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }, peak)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every phone of the organization by contact id.
async fn phones_by_contact(pool: &PgPool, org: &str) -> HashMap<i64, String> {
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, phone FROM contacts WHERE organization = $1")
        .bind(org)
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().collect()
}

/// The seeded index `i` of a phone `+55119` and eight digits.
fn index_of(phone: &str) -> i64 {
    phone[6..].parse().unwrap()
}

/// One exported CSV row: (contact id, phone, status, error code).
type CsvRow = (i64, String, String, String);

/// Reads an exported CSV: its header and its rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<CsvRow>) {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (contact, phone, status, code) = (col("contact_id"), col("phone"), col("status"), col("error_code"));
    let rows = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[contact].parse().unwrap(), r[phone].to_owned(), r[status].to_owned(), r[code].to_owned())
        })
        .collect();
    (header, rows)
}

/// The longest run of consecutive ASCII digits in `bytes`.
fn longest_digit_run(bytes: &[u8]) -> usize {
    let (mut longest, mut run) = (0, 0);
    for b in bytes {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_messages_export_masked_filtered_and_in_bounded_memory() {
    let stack = Stack::start("export").await;
    let sandbox = sandbox_with(|_| {}).await;
    let campaign_uid = draft_campaign(&stack, &sandbox.base_url(), "big").await;

    // Before its audience is frozen, and for a campaign that does not exist: clear refusals.
    let (draft, _) = run_plugin(&stack, &["export", "big"]);
    assert!(!draft.status.success());
    let stderr = String::from_utf8_lossy(&draft.stderr);
    assert!(stderr.contains("has not frozen its audience yet") && stderr.contains("Draft"), "{stderr}");
    let (missing, _) = run_plugin(&stack, &["export", "nope"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("campaign \"nope\" not found"));
    let (bad_status, _) = run_plugin(&stack, &["export", "big", "--status", "failed,bounced"]);
    let stderr = String::from_utf8_lossy(&bad_status.stderr);
    assert!(!bad_status.status.success() && stderr.contains("\"bounced\" is not a message status"), "{stderr}");

    let seeding = Instant::now();
    sqlx::query(
        "INSERT INTO contacts (organization, phone, name) SELECT $1, '+55119' || lpad(i::text, 8, '0'), CASE WHEN i % 7 = 0 THEN NULL ELSE 'Contact ' || i END FROM generate_series(0, $2 - 1) i",
    )
    .bind(&stack.org)
    .bind(MESSAGES)
    .execute(&stack.pool)
    .await
    .unwrap();
    seed_messages(&stack.pool, &stack.org, campaign_uid, "big").await;
    eprintln!("seeded {MESSAGES} contacts and messages in {:.1} s", seeding.elapsed().as_secs_f64());
    let phones = phones_by_contact(&stack.pool, &stack.org).await;
    assert_eq!(phones.len() as i64, MESSAGES);

    // Everything, masked (the default), as CSV to a file: the measured run.
    let masked = stack.dir.path().join("masked.csv");
    let started = Instant::now();
    let (out, peak_kib) =
        run_plugin(&stack, &["export", "big", "-o", "csv", "--output-file", masked.to_str().unwrap()]);
    let elapsed = started.elapsed();
    assert_ok(&out, "export");
    assert!(out.stdout.is_empty(), "the file gets the rows, stdout nothing");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("exported {MESSAGES} messages")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::metadata(&masked).unwrap().len();
    eprintln!(
        "export of {MESSAGES} messages: {:.1} s, {:.0} rows/s, {:.1} MiB of CSV, peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        MESSAGES as f64 / elapsed.as_secs_f64(),
        bytes as f64 / (1024.0 * 1024.0),
        peak_kib as f64 / 1024.0
    );
    assert!(peak_kib > 0, "the export's memory was read");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB: the export must not hold the rows");

    let (header, rows) = read_csv(&masked);
    assert_eq!(header.first().map(String::as_str), Some("message_id"));
    assert_eq!(rows.len() as i64, MESSAGES, "one row per message");
    let contacts: HashSet<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(contacts.len() as i64, MESSAGES, "each message once");
    for (contact, shown, _, _) in &rows {
        let phone = &phones[contact];
        let expected = format!("+55{}{}", "*".repeat(phone.len() - 7), &phone[phone.len() - 4..]);
        assert_eq!(shown, &expected, "contact {contact}");
    }
    // No full number anywhere in the file, in any column: a number is thirteen digits in
    // a row, and nothing in the masked export has more than seven (the ids).
    let longest = longest_digit_run(&std::fs::read(&masked).unwrap());
    assert!(longest <= 7, "a run of {longest} digits in the masked export");

    // --unmask shows every number in full.
    let unmasked = stack.dir.path().join("unmasked.csv");
    let (out, _) = run_plugin(&stack, &["export", "big", "--unmask", "--output-file", unmasked.to_str().unwrap()]);
    assert_ok(&out, "export --unmask");
    let (_, rows) = read_csv(&unmasked);
    assert_eq!(rows.len() as i64, MESSAGES);
    assert!(rows.iter().all(|(contact, phone, _, _)| &phones[contact] == phone), "unmasked numbers are the contacts'");

    // --status failed --reason 131026: exactly the seeded ones (i % 10 == 3).
    let filtered = stack.dir.path().join("filtered.csv");
    let (out, _) = run_plugin(
        &stack,
        &["export", "big", "--status", "failed", "--reason", "131026", "--output-file", filtered.to_str().unwrap()],
    );
    assert_ok(&out, "export --status failed --reason 131026");
    let (_, rows) = read_csv(&filtered);
    let got: BTreeSet<i64> = rows.iter().map(|r| r.0).collect();
    let expected: BTreeSet<i64> =
        phones.iter().filter(|(_, phone)| index_of(phone) % 10 == 3).map(|(contact, _)| *contact).collect();
    assert_eq!(got.len(), 100_000);
    assert_eq!(got, expected);
    assert!(rows.iter().all(|r| r.2 == "failed" && r.3 == "131026"));

    // JSON lines through kubectl itself (the plugin on PATH), to stdout: every line parses.
    let path = format!("{}:{}", plugin_dir(&stack).display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("kubectl")
        .args(["disparo", "export", "big", "-n", &stack.ns, "-o", "jsonl", "--status", "failed,unknown"])
        .env("KUBECONFIG", common::cluster::kubeconfig())
        .env("PATH", &path)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_ok(&out, "kubectl disparo export -o jsonl");
    let mut by_code: HashMap<String, usize> = HashMap::new();
    let mut lines = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        lines += 1;
        let phone = row["phone"].as_str().unwrap();
        let contact = row["contact_id"].as_i64().unwrap();
        assert!(phone.contains("****") && phone != phones[&contact], "masked: {row}");
        assert!(row["status"] == "failed" || row["status"] == "unknown", "{row}");
        *by_code.entry(row["error_code"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert_eq!(lines, 400_000, "failed (3, 4, 8) and unknown (6)");
    assert_eq!(by_code.len(), 4, "{by_code:?}");
    assert!(by_code.values().all(|n| *n == 100_000), "{by_code:?}");
}

/// `retry-failed --reason 131026`: the new campaign's `fromCampaign.errorCodes` is
/// stored, and its frozen audience is exactly the contacts whose messages failed with
/// that code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_failed_by_reason_freezes_exactly_those_contacts() {
    let stack = Stack::start("retry-reason").await;
    let sandbox = sandbox_with(|_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 40, |_| (vec![], serde_json::json!({}))).await;
    let source = draft_campaign(&stack, &sandbox.base_url(), "source").await;
    seed_messages(&stack.pool, &stack.org, source, "source").await;

    let out = stack.plugin(&["retry-failed", "source", "--reason", "131026"]);
    assert_ok(&out, "retry-failed --reason 131026");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("the failed messages of source whose last error is 131026"), "{said}");
    let retry = stack
        .wait_for("campaign", "source-retry", "its audience frozen", LONG, |c| {
            c["status"]["messages"]["total"].as_i64().unwrap_or(0) > 0
        })
        .await;
    assert_eq!(retry["spec"]["audience"]["fromCampaign"]["errorCodes"], serde_json::json!(["131026"]));
    assert_eq!(retry["spec"]["audience"]["fromCampaign"]["statuses"], serde_json::json!(["failed"]));
    let frozen: Vec<(String,)> = sqlx::query_as(
        "SELECT c.phone FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 ORDER BY c.phone",
    )
    .bind(uid(&retry).parse::<uuid::Uuid>().unwrap())
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let frozen: Vec<String> = frozen.into_iter().map(|(p,)| p).collect();
    let expected: Vec<String> = (0..40).filter(|i| i % 10 == 3).map(common::phone).collect();
    assert_eq!(frozen, expected, "exactly the contacts whose message failed with 131026");
    // it sends to them, and completes
    let done = stack.wait_for("campaign", "source-retry", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(done["status"]["messages"]["sent"], 4, "{}", done["status"]);
}
