//! Protecting the WhatsApp account, on the real stack (control plane, node agent running
//! sender pods, Postgres, the webhook service, the sandbox over HTTP): Meta's portfolio
//! messaging limit is never exceeded, quality, template and restriction signals pause
//! and resume campaigns by themselves, 131049 requeues, costs follow the rate card,
//! and a receipt carrying only a business-scoped user id applies.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::time::Duration;

use common::process::free_port;
use common::stack::{
    Stack, campaign, condition, is_true_with, phase, recipients, sandbox_control, sandbox_with, wait_for_sends,
};
use disparo::sandbox::{SandboxConfig, SandboxHandle, WebhookBehaviour};

use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(240);
const PORTFOLIO_CHANNEL: &str = "  qualityPolicy: Pause\n";

/// A Meta channel of portfolio `pf-1` on the sandbox's WABA.
fn portfolio_channel(name: &str, base_url: &str, phone_number_id: &str, spacing_ms: u32) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: meta\n  meta:\n    phoneNumberId: '{phone_number_id}'\n    baseUrl: {base_url}\n    accessToken: {{name: meta-creds, key: access-token}}\n    appSecret: {{name: meta-creds, key: app-secret}}\n    verifyToken: {{name: meta-creds, key: verify-token}}\n    businessPortfolio: pf-1\n    wabaId: '102290129340398'\n  rateLimits: {{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: {spacing_ms}}}\n{PORTFOLIO_CHANNEL}"
    )
}

/// The stack with its webhook service, and a sandbox posting webhooks to it for `channel`.
async fn stack_with_webhooks(
    prefix: &str,
    controller_args: &[&str],
    channel: &str,
    change: impl FnOnce(&mut SandboxConfig),
) -> (Stack, SandboxHandle) {
    let mut stack = Stack::start_with(prefix, controller_args).await;
    let port = free_port();
    let ns = stack.ns.clone();
    let sandbox = sandbox_with(|c| {
        c.meta.webhook_url = Some(format!("http://127.0.0.1:{port}/webhooks/meta/{ns}/{channel}"));
        // No message fails by webhook (131026): what a test counts is exact.
        c.webhooks.failed = 0.0;
        change(c);
    })
    .await;
    stack.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{port}")]);
    (stack, sandbox)
}

async fn ledger(sandbox: &SandboxHandle) -> Value {
    reqwest::get(format!("{}/_sandbox/ledger", sandbox.base_url())).await.unwrap().json().await.unwrap()
}

/// Two Channels of one portfolio at TIER_250, two campaigns of 200 contacts each: exactly
/// 250 unique recipients are messaged, both campaigns are RateLimited until the oldest
/// counted recipient leaves the window, and they finish once the window moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_portfolio_at_tier_250_messages_250_recipients_then_waits_for_the_window() {
    let stack = Stack::start("tier").await;
    common::seed_contacts(&stack.pool, &stack.org, 400, |i| (vec![if i < 200 { "a" } else { "b" }.into()], json!({})))
        .await;
    let sandbox = sandbox_with(|c| c.meta.tier = disparo::account::Tier::Tier250).await;
    stack.apply(&portfolio_channel("one", &sandbox.base_url(), "111", 0));
    stack.apply(&portfolio_channel("two", &sandbox.base_url(), "222", 0));
    stack.apply(&campaign("first", "one", "promo", "{tags: {anyOf: [a]}}", ""));
    stack.apply(&campaign("second", "two", "promo", "{tags: {anyOf: [b]}}", ""));
    for name in ["first", "second"] {
        let c = stack.wait_for("campaign", name, "RateLimited", LONG, |c| phase(c) == "RateLimited").await;
        // Senders finish the block they were admitted for, end by themselves, and then
        // the Job is suspended.
        stack.wait_for_no_pods(&common::stack::uid(&c)).await;
    }
    let summary = ledger(&sandbox).await;
    let unique: HashSet<String> = recipients(&sandbox).into_iter().collect();
    assert_eq!(unique.len(), 250, "exactly the tier's recipients: {summary}");
    assert_eq!(summary["over_tier_refusals"], 0, "Disparo never asked for more: {summary}");
    assert_eq!(summary["max_unique_recipients_in_any_24h"], 250, "{summary}");
    let (oldest,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT min(last_sent_at) FROM portfolio_recipients WHERE organization = $1")
            .bind(&stack.org)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    for name in ["first", "second"] {
        let c = stack.get("campaign", name);
        let resume: chrono::DateTime<chrono::Utc> =
            c["status"]["rateLimit"]["resumeAt"].as_str().unwrap().parse().unwrap();
        let expected = oldest + chrono::Duration::hours(24);
        assert!((resume - expected).num_seconds().abs() <= 2, "{name} resumes at {resume}, not {expected}");
    }
    // The Channels show the budget at their next check.
    stack
        .wait_for("channel", "one", "budget used", Duration::from_secs(60), |ch| {
            ch["status"]["account"]["budget"]["used24h"] == 250 && ch["status"]["account"]["budget"]["limit"] == 250
        })
        .await;

    // A day passes, for the sandbox and for the recipients Disparo counted.
    sandbox_control(&sandbox, reqwest::Method::POST, "clock", json!({"advance_seconds": 24 * 3600 + 60})).await;
    sqlx::query("UPDATE portfolio_recipients SET last_sent_at = last_sent_at - interval '24 hours 1 minute'")
        .execute(&stack.pool)
        .await
        .unwrap();
    for name in ["first", "second"] {
        stack.wait_for("campaign", name, "Completed", LONG, |c| phase(c) == "Completed").await;
    }
    assert_eq!(sandbox.ledger().accepted_count(), 400, "everyone once, nobody twice");
    assert!(sandbox.ledger().duplicates().is_empty());
}

/// A FLAGGED quality webhook pauses the channel's marketing campaigns within seconds;
/// UNFLAGGED resumes them, and nobody gets a message twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flagged_number_pauses_its_marketing_and_unflagged_resumes_it() {
    let (stack, sandbox) = stack_with_webhooks("flag", &[], "main", |_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 300, |_| (vec![], json!({}))).await;
    stack.apply(&portfolio_channel("main", &sandbox.base_url(), "111", 100));
    stack.apply(&campaign("promo", "main", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &sandbox, 20).await;
    sandbox_control(&sandbox, reqwest::Method::POST, "meta/quality", json!({"event": "FLAGGED"})).await;
    let c = stack
        .wait_for("campaign", "promo", "Held", Duration::from_secs(60), |c| is_true_with(c, "Held", "QualityDegraded"))
        .await;
    assert_eq!(phase(&c), "Paused");
    stack
        .wait_for("channel", "main", "QualityDegraded", Duration::from_secs(60), |ch| {
            is_true_with(ch, "QualityDegraded", "QualityDegraded")
        })
        .await;
    stack.wait_for_no_pods(&common::stack::uid(&c)).await;
    let held_at = sandbox.ledger().accepted_count();
    assert!(held_at < 300, "paused before the end");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.ledger().accepted_count(), held_at, "nothing is sent while the number is flagged");

    sandbox_control(&sandbox, reqwest::Method::POST, "meta/quality", json!({"event": "UNFLAGGED"})).await;
    stack.wait_for("campaign", "promo", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(sandbox.ledger().accepted_count(), 300);
    assert!(sandbox.ledger().duplicates().is_empty(), "no duplicate after the resume");
}

/// Meta pausing one template pauses only the campaigns that use it; APPROVED resumes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_template_pauses_only_its_campaigns() {
    let (stack, sandbox) = stack_with_webhooks("tmpl", &[], "main", |_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 200, |i| (vec![if i < 100 { "a" } else { "b" }.into()], json!({})))
        .await;
    stack.apply(&portfolio_channel("main", &sandbox.base_url(), "111", 50));
    stack.apply(&campaign("paused-one", "main", "promo", "{tags: {anyOf: [a]}}", ""));
    stack.apply(&campaign("other", "main", "welcome", "{tags: {anyOf: [b]}}", ""));
    wait_for_sends(&stack, &sandbox, 10).await;
    // Meta rates the template RED first: a warning on the campaigns using it.
    sandbox_control(&sandbox, reqwest::Method::POST, "meta/templates/promo/pt_BR/quality", json!({"score": "RED"}))
        .await;
    stack
        .wait_for("campaign", "paused-one", "TemplateQualityLow", Duration::from_secs(60), |c| {
            is_true_with(c, "TemplateQualityLow", "QualityRed")
        })
        .await;
    assert!(!is_true_with(&stack.get("campaign", "other"), "TemplateQualityLow", "QualityRed"));
    sandbox_control(
        &sandbox,
        reqwest::Method::PUT,
        "meta/templates/promo/pt_BR",
        json!({"status": "PAUSED", "reason": "LOW_QUALITY"}),
    )
    .await;
    let c = stack
        .wait_for("campaign", "paused-one", "TemplatePaused", Duration::from_secs(60), |c| {
            is_true_with(c, "Held", "TemplatePaused")
        })
        .await;
    assert!(condition(&c, "Held").unwrap()["message"].as_str().unwrap().contains("LOW_QUALITY"), "{}", c["status"]);
    stack.wait_for("campaign", "other", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(phase(&stack.get("campaign", "paused-one")), "Paused", "still held");

    sandbox_control(&sandbox, reqwest::Method::PUT, "meta/templates/promo/pt_BR", json!({"status": "APPROVED"})).await;
    let c = stack.wait_for("campaign", "paused-one", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(c["status"]["messages"]["failed"], 0, "{}", c["status"]);
    assert_eq!(sandbox.ledger().accepted_count(), 200);
}

/// A restriction on business-initiated messaging pauses the portfolio's campaigns until
/// it expires, then they resume by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restriction_pauses_the_portfolio_until_it_expires() {
    let (stack, sandbox) = stack_with_webhooks("restrict", &[], "main", |_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 200, |_| (vec![], json!({}))).await;
    stack.apply(&portfolio_channel("main", &sandbox.base_url(), "111", 100));
    stack.apply(&campaign("promo", "main", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &sandbox, 10).await;
    // Meta's expiration is in whole seconds: the restriction ends at the second itself.
    let expiration =
        chrono::DateTime::from_timestamp((chrono::Utc::now() + chrono::Duration::seconds(45)).timestamp(), 0).unwrap();
    sandbox_control(
        &sandbox,
        reqwest::Method::POST,
        "meta/restriction",
        json!({"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": expiration.timestamp()}),
    )
    .await;
    let c = stack
        .wait_for("campaign", "promo", "AccountRestricted", Duration::from_secs(60), |c| {
            is_true_with(c, "Held", "AccountRestricted")
        })
        .await;
    assert_eq!(phase(&c), "Paused");
    // Senders look at the signals every second, even mid-block, and the controller may
    // show the hold just before their look: from two seconds after the campaign shows
    // it (a look, and a send already on the wire), nothing is sent until it expires.
    let held = chrono::Utc::now() + chrono::Duration::seconds(2);
    let c = stack.wait_for("campaign", "promo", "Completed", LONG, |c| phase(c) == "Completed").await;
    let during: Vec<_> = sandbox.ledger().entries().into_iter().filter(|e| e.at > held && e.at < expiration).collect();
    assert!(during.is_empty(), "{} sends while restricted: {during:?}", during.len());
    assert_eq!(c["status"]["messages"]["sent"], 200);
}

/// Receipts carry pricing and business-scoped user ids: the campaign's cost is the rate
/// card applied to the sandbox's billable deliveries, a receipt with only a BSUID
/// applies, and recipients Meta withholds under its per-user marketing limit (131049)
/// are requeued, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn costs_bsuid_receipts_and_the_marketing_limit() {
    let limited = [common::phone(3), common::phone(7)];
    let bsuid_only = common::phone(5);
    let card = std::env::temp_dir().join(format!("disparo-rates-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&card, "version: '2026-10'\ncurrency: USD\nrates:\n  marketing: {'55': 0.0625, default: 0.05}\n")
        .unwrap();
    let (stack, sandbox) = stack_with_webhooks("cost", &["--rate-card", card.to_str().unwrap()], "main", |c| {
        c.meta.marketing_limited_recipients = limited.to_vec();
        c.meta.bsuid_only_recipients = vec![bsuid_only.clone()];
        // Every accepted message is delivered (and none read), so the counts are exact.
        c.webhooks = WebhookBehaviour { failed: 0.0, delivered: 1.0, read: 0.0, ..Default::default() };
    })
    .await;
    common::seed_contacts(&stack.pool, &stack.org, 60, |_| (vec![], json!({}))).await;
    stack.apply(&portfolio_channel("main", &sandbox.base_url(), "111", 0));
    stack.apply(&campaign("priced", "main", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "priced", "withheld and delivered", LONG, |c| {
            c["status"]["messages"]["marketingLimited"] == 2 && c["status"]["messages"]["delivered"] == 58
        })
        .await;
    assert_eq!(c["status"]["messages"]["failed"], 0, "131049 is not a failure: {}", c["status"]);
    let due: Vec<(chrono::DateTime<chrono::Utc>,)> = sqlx::query_as(
        "SELECT m.next_attempt_at FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE c.phone = ANY($1)",
    )
    .bind(limited.to_vec())
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    for (at,) in due {
        let hours = (at - chrono::Utc::now()).num_minutes() as f64 / 60.0;
        assert!((23.0..=24.1).contains(&hours), "requeued a day later, not {hours} h");
    }
    // The receipt of the BSUID-only recipient applied and taught us the contact's BSUID.
    let (status, bsuid): (String, Option<String>) = sqlx::query_as(
        "SELECT m.status::text, c.bsuid FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE c.phone = $1",
    )
    .bind(&bsuid_only)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(status == "delivered" || status == "read", "{status}");
    assert_eq!(bsuid.as_deref(), Some(disparo::sandbox::bsuid_for(&bsuid_only).as_str()));
    // The cost is the card applied to what the sandbox delivered as billable.
    let summary = ledger(&sandbox).await;
    let billable = summary["billable_delivered"].as_array().unwrap().len();
    assert_eq!(billable, 58, "{summary}");
    let c = stack
        .wait_for("campaign", "priced", "costed", Duration::from_secs(90), |c| {
            c["status"]["cost"]["billableMessages"] == 58
        })
        .await;
    assert_eq!(c["status"]["cost"]["estimated"].as_f64(), Some(58.0 * 0.0625), "{}", c["status"]["cost"]);
    assert_eq!(c["status"]["cost"]["currency"], "USD");
    let status = stack.plugin(&["status", "priced"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("USD estimated for 58 billable messages"), "{text}");
    assert!(text.contains("withheld by Meta's per-user marketing limit"), "{text}");
    assert!(text.contains("Budget"), "{text}");

    // A campaign whose audience alone would cost more than its budget does not start.
    stack.apply(&campaign("too-dear", "main", "promo", "{allContacts: true}", "  budget: {maxCost: 1.5}\n"));
    let c = stack
        .wait_for("campaign", "too-dear", "PreflightFailed", Duration::from_secs(60), |c| {
            is_true_with(c, "Stalled", "PreflightFailed")
        })
        .await;
    let why = condition(&c, "Stalled").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(why.contains("3.75 USD") && why.contains("maxCost 1.50"), "{why}");
    assert_eq!(c["status"]["preflight"]["estimatedCost"], 3.75);

    // A day later the withheld messages are due: a new Job sends them, Meta withholds
    // them again, and they wait two days this time.
    stack.wait_for("campaign", "priced", "Job complete", LONG, |c| c["status"]["batches"]["succeeded"] == 2).await;
    sqlx::query("UPDATE campaign_messages SET next_attempt_at = now() WHERE marketing_requeues > 0")
        .execute(&stack.pool)
        .await
        .unwrap();
    wait_for_sends(&stack, &sandbox, 62).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let requeues: Vec<(i16, chrono::DateTime<chrono::Utc>)> = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the withheld messages were not put back a second time\n{}",
            stack.logs()
        );
        let rows: Vec<(i16, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT marketing_requeues, next_attempt_at FROM campaign_messages WHERE marketing_requeues > 0 AND status = 'pending'",
        )
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        if rows.len() == 2 && rows.iter().all(|(n, _)| *n == 2) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (_, at) in requeues {
        let hours = (at - chrono::Utc::now()).num_minutes() as f64 / 60.0;
        assert!((47.0..=48.1).contains(&hours), "the second requeue waits two days, not {hours} h");
    }
    assert_eq!(sandbox.ledger().duplicates().len(), 2, "only the withheld recipients were messaged again");
}
