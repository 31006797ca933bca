//! The lifecycle promises on the real stack (control plane, node agent running sender
//! pods, Postgres, sandbox over HTTP): what people do every day — pause, edit, resume,
//! fix a refused credential, delete a channel, resume a failed campaign — works.
//!
//! Each test has its own namespace, controller and node agent, so they run in parallel.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::HashSet;
use std::time::Duration;

use common::stack::{
    Stack, campaign, fast, is_true_with, meta_channel, phase, recipients, sandbox_with, uid, wait_for_sends,
};
use disparo::sandbox::TemplateSpec;
use serde_json::json;

const LONG: Duration = Duration::from_secs(180);

fn only_template(name: &str) -> Vec<TemplateSpec> {
    vec![serde_json::from_value(json!({"name": name, "languages": ["pt_BR"]})).unwrap()]
}

/// Pause, edit the message and the channel, resume: every message sent after the resume
/// uses the edited message through the edited channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_edit_resume_sends_the_edited_message_through_the_edited_channel() {
    let stack = Stack::start("edit").await;
    common::seed_contacts(&stack.pool, &stack.org, 300, |_| (vec![], json!({}))).await;
    // Each sandbox approves one template only: a message sent with the other is refused.
    let old = sandbox_with(|c| c.meta.templates = only_template("promo")).await;
    let new = sandbox_with(|c| c.meta.templates = only_template("promo_v2")).await;
    stack.apply(&meta_channel("old", &old.base_url(), "111", &fast(60)));
    stack.apply(&meta_channel("new", &new.base_url(), "222", &fast(0)));
    stack.apply(&campaign("spring", "old", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &old, 20).await;

    stack.patch("campaign", "spring", r#"{"spec":{"suspend":true}}"#);
    let c = stack.wait_for("campaign", "spring", "Paused", LONG, |c| phase(c) == "Paused").await;
    stack.wait_for_no_pods(&uid(&c)).await;
    let sent_before = old.ledger().accepted_count();
    assert!(sent_before < 300, "paused before the end");
    stack.patch(
        "campaign",
        "spring",
        r#"{"spec":{"channelRef":{"name":"new"},"message":{"template":{"name":"promo_v2","language":"pt_BR","bodyParameters":["{{contact.name}}"]}}}}"#,
    );
    stack.patch("campaign", "spring", r#"{"spec":{"suspend":false}}"#);
    let c = stack.wait_for("campaign", "spring", "Completed", LONG, |c| phase(c) == "Completed").await;

    assert_eq!(old.ledger().accepted_count(), sent_before, "nothing went through the old channel after the resume");
    assert_eq!(
        new.ledger().accepted_count() + sent_before,
        300,
        "the rest went through the new channel, with the new template"
    );
    assert_eq!(c["status"]["messages"]["failed"], 0, "no message was refused for its template: {}", c["status"]);
    let all: Vec<String> = recipients(&old).into_iter().chain(recipients(&new)).collect();
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 300, "nobody got two messages");
}

/// Caps edited on a Channel reach the senders already running within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edited_channel_caps_reach_running_senders() {
    let stack = Stack::start("caps").await;
    common::seed_contacts(&stack.pool, &stack.org, 400, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(50)));
    stack.apply(&campaign("capped", "main", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &sandbox, 20).await;
    stack.patch(
        "channel",
        "main",
        r#"{"spec":{"rateLimits":{"perMinute":5,"perHour":null,"perDay":null,"mode":"Hard","minIntervalMillis":0}}}"#,
    );
    let edited = chrono::Utc::now();
    stack.wait_for("campaign", "capped", "RateLimited", Duration::from_secs(90), |c| phase(c) == "RateLimited").await;
    // Give running senders a few seconds to read the new caps, then no calendar minute
    // holds more than 5 sends.
    let settled = edited + chrono::Duration::seconds(5);
    tokio::time::sleep(Duration::from_secs(70)).await;
    let mut per_minute = std::collections::BTreeMap::<i64, usize>::new();
    for entry in sandbox.ledger().entries().into_iter().filter(|e| e.at > settled) {
        *per_minute.entry(entry.at.timestamp() / 60).or_default() += 1;
    }
    assert!(!per_minute.is_empty(), "sending went on under the new caps\n{}", stack.logs());
    assert!(per_minute.values().all(|n| *n <= 5), "over the edited cap of 5 per minute: {per_minute:?}");
    assert!(sandbox.ledger().accepted_count() < 400);
}

/// A provider refusal stops the channel; new credentials lift the stop by themselves,
/// and a person's `kubectl disparo resume` lifts it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_channel_restarts_when_its_credentials_change_or_a_person_resumes() {
    let stack = Stack::start("stop").await;
    common::seed_contacts(&stack.pool, &stack.org, 200, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.kubectl(&[
        "create",
        "secret",
        "generic",
        "bad-creds",
        "--from-literal=access-token=revoked",
        "--from-literal=app-secret=x",
        "--from-literal=verify-token=v",
    ]);
    stack.kubectl(&["label", "secret", "bad-creds", "disparo.io/credentials=true"]);
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(10)).replace("meta-creds", "bad-creds"));
    stack.apply(&campaign("refused", "main", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "refused", "ChannelStopped", LONG, |c| is_true_with(c, "Stalled", "ChannelStopped"))
        .await;
    assert_eq!(phase(&c), "Paused");
    // The Channel says so too, at its next check.
    stack
        .wait_for("channel", "main", "ProviderRefused", Duration::from_secs(60), |ch| {
            common::stack::condition(ch, "Ready")
                .is_some_and(|r| r["status"] == "False" && r["reason"] == "ProviderRefused")
        })
        .await;
    assert_eq!(sandbox.ledger().accepted_count(), 0);

    // A person replaces the token: the stop lifts without any other action.
    let fixed = stack.kubectl(&[
        "create",
        "secret",
        "generic",
        "bad-creds",
        "--from-literal=access-token=sandbox-meta-token",
        "--from-literal=app-secret=x",
        "--from-literal=verify-token=v",
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    stack.apply(&fixed);
    stack.wait_for("campaign", "refused", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(sandbox.ledger().accepted_count(), 200);

    // A refusal that a person resolved at the provider (same token): `kubectl disparo resume`.
    common::seed_contacts(&stack.pool, &stack.org, 300, |i| {
        (if i >= 200 { vec!["second".into()] } else { vec![] }, json!({}))
    })
    .await;
    disparo::store::pauses::stop_channel(&stack.pool, &stack.org, "main", "131031", "Business account locked")
        .await
        .unwrap();
    stack.apply(&campaign("second", "main", "promo", "{tags: {anyOf: [second]}}", ""));
    stack
        .wait_for("campaign", "second", "ChannelStopped", LONG, |c| is_true_with(c, "Stalled", "ChannelStopped"))
        .await;
    let out = stack.plugin(&["resume", "second"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stack.wait_for("campaign", "second", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(sandbox.ledger().accepted_count(), 300);
}

/// A deleted Channel stops the sending; the campaign goes on when it is back. A sender
/// pod that cannot start shows on the Campaign with the pod's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_means_not_sending_and_stuck_pods_show() {
    let stack = Stack::start("stall").await;
    common::seed_contacts(&stack.pool, &stack.org, 300, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|_| {}).await;
    let channel = meta_channel("main", &sandbox.base_url(), "111", &fast(60));
    stack.apply(&channel);
    stack.apply(&campaign("orphan", "main", "promo", "{allContacts: true}", ""));
    wait_for_sends(&stack, &sandbox, 20).await;
    stack.kubectl(&["delete", "channel", "main"]);
    let c = stack.wait_for("campaign", "orphan", "Stalled", LONG, |c| is_true_with(c, "Stalled", "Blocked")).await;
    stack.wait_for_no_pods(&uid(&c)).await;
    let frozen = sandbox.ledger().accepted_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.ledger().accepted_count(), frozen, "nothing is sent while the channel is gone");
    assert!(frozen < 300);
    stack.apply(&channel);
    stack.wait_for("campaign", "orphan", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(recipients(&sandbox).iter().collect::<HashSet<_>>().len(), 300);

    // The sender pods' database credential is broken (a person edited the Secret): their
    // pods crash, the campaign says so; deleting the Secret makes the controller write a
    // new one with a new password (rotation), and the campaign completes.
    common::seed_contacts(&stack.pool, &stack.org, 320, |i| {
        (if i >= 300 { vec!["late".into()] } else { vec![] }, json!({}))
    })
    .await;
    break_database_secret(&stack);
    stack.apply(&campaign("stuck", "main", "promo", "{tags: {anyOf: [late]}}", ""));
    let c = stack
        .wait_for("campaign", "stuck", "SenderPodsFailing", LONG, |c| is_true_with(c, "Stalled", "SenderPodsFailing"))
        .await;
    let message = common::stack::condition(&c, "Stalled").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("sender pods crashed"), "{message}");
    stack.kubectl(&["delete", "secret", "disparo-database"]);
    stack.wait_for("campaign", "stuck", "Completed", LONG, |c| phase(c) == "Completed").await;
}

/// Replaces the namespace's database URL with one whose password is wrong, keeping the
/// organization key (so the controller leaves the Secret alone until it is deleted).
fn break_database_secret(stack: &Stack) {
    let secret = stack.get("secret", "disparo-database");
    let organization = secret["data"]["organization"].as_str().unwrap().to_owned();
    stack.kubectl(&["delete", "secret", "disparo-database"]);
    let broken = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: disparo-database}}\ndata: {{organization: {organization}}}\nstringData: {{url: 'postgres://nobody:wrong@127.0.0.1:1/none'}}\n"
    );
    stack.apply(&broken);
}

/// The failure threshold pauses in status, never in the spec (GitOps would revert it);
/// `kubectl disparo resume` lets the campaign go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failure_threshold_pauses_in_status_and_a_person_resumes() {
    let stack = Stack::start("thresh").await;
    common::seed_contacts(&stack.pool, &stack.org, 200, |_| (vec![], json!({}))).await;
    let sandbox = sandbox_with(|c| c.faults.permanent = 1.0).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(20)));
    stack.apply(&campaign(
        "burning",
        "main",
        "promo",
        "{allContacts: true}",
        "  failureThreshold: {maxFailurePercent: 50, minSample: 20}\n",
    ));
    let c = stack
        .wait_for("campaign", "burning", "paused for failures", LONG, |c| {
            is_true_with(c, "Stalled", "FailureThresholdExceeded")
        })
        .await;
    assert_eq!(phase(&c), "Paused");
    assert_eq!(c["spec"]["suspend"], false, "the spec is never rewritten");
    assert_eq!(c["status"]["automaticPause"]["reason"], "FailureThresholdExceeded");
    stack.wait_for_no_pods(&uid(&c)).await;
    let failed = c["status"]["messages"]["failed"].as_i64().unwrap_or(0);
    assert!(failed < 200, "paused before the whole audience burned: {}", c["status"]);
    // Re-applying the Git manifest (what a GitOps self-heal does) leaves the pause alone.
    stack.apply(&campaign(
        "burning",
        "main",
        "promo",
        "{allContacts: true}",
        "  failureThreshold: {maxFailurePercent: 50, minSample: 20}\n",
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase(&stack.get("campaign", "burning")), "Paused");

    let out = stack.plugin(&["resume", "burning"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Everything still fails: it sends the next sample, then pauses again.
    let c = stack
        .wait_for("campaign", "burning", "second pause", LONG, |c| {
            c["status"]["messages"]["failed"].as_i64().unwrap_or(0) > failed
                && is_true_with(c, "Stalled", "FailureThresholdExceeded")
        })
        .await;
    assert_eq!(phase(&c), "Paused");
}

/// A campaign whose Job failed can be resumed once the cause is fixed; a preflight a
/// person can fix leaves the campaign Stalled, and it starts once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_campaign_resumes_and_a_fixable_preflight_waits() {
    let stack = Stack::start("failed").await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    // Nobody to send to yet: Stalled, not Failed.
    stack.apply(&campaign("early", "main", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "early", "PreflightFailed", LONG, |c| is_true_with(c, "Stalled", "PreflightFailed"))
        .await;
    assert_ne!(phase(&c), "Failed");
    common::seed_contacts(&stack.pool, &stack.org, 150, |_| (vec![], json!({}))).await;
    stack.wait_for("campaign", "early", "Completed", LONG, |c| phase(c) == "Completed").await;

    // Sender pods that cannot reach Postgres crash past their retries: the Job fails.
    common::seed_contacts(&stack.pool, &stack.org, 300, |i| {
        (if i >= 150 { vec!["late".into()] } else { vec![] }, json!({}))
    })
    .await;
    break_database_secret(&stack);
    stack.apply(
        &campaign("doomed", "main", "promo", "{tags: {anyOf: [late]}}", "")
            .replace("parallelism: 2}", "parallelism: 2, backoffLimitPerIndex: 0}"),
    );
    stack.wait_for("campaign", "doomed", "Failed", LONG, |c| phase(c) == "Failed").await;
    // Deleting the broken Secret rotates the credential: the controller writes a good one.
    stack.kubectl(&["delete", "secret", "disparo-database"]);
    let out = stack.plugin(&["resume", "doomed"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = stack.wait_for("campaign", "doomed", "Completed after resume", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(c["status"]["messages"]["sent"], 150);
    assert_eq!(recipients(&sandbox).iter().collect::<HashSet<_>>().len(), 300, "each contact once");
}

/// Two campaigns whose names share a long prefix get their own Jobs; a name of 200
/// characters works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_campaign_names_get_their_own_jobs() {
    let stack = Stack::start("names").await;
    common::seed_contacts(&stack.pool, &stack.org, 100, |i| {
        (vec![if i < 50 { "a".into() } else { "b".into() }], json!({}))
    })
    .await;
    let sandbox = sandbox_with(|_| {}).await;
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    let prefix = "spring-sale-for-the-customers-who-bought-twice-in-the-last-year";
    let a = format!("{prefix}-a");
    let b = format!("{prefix}-{}", "b".repeat(130));
    stack.apply(&campaign(&a, "main", "promo", "{tags: {anyOf: [a]}}", ""));
    stack.apply(&campaign(&b, "main", "promo", "{tags: {anyOf: [b]}}", ""));
    for name in [&a, &b] {
        let c = stack.wait_for("campaign", name, "Completed", LONG, |c| phase(c) == "Completed").await;
        assert_eq!(c["status"]["messages"]["sent"], 50, "{name}");
    }
    let jobs = stack.kubectl(&["get", "jobs", "-o", "name"]);
    assert_eq!(jobs.lines().count(), 2, "{jobs}");
    assert_eq!(recipients(&sandbox).iter().collect::<HashSet<_>>().len(), 100);
}

/// A template Meta paused stops only the campaign using it, never the channel; a
/// template on an Evolution channel is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_message_stops_only_its_campaign() {
    let stack = Stack::start("tmpl").await;
    common::seed_contacts(&stack.pool, &stack.org, 100, |_| (vec![], json!({}))).await;
    let paused = sandbox_with(|c| {
        c.faults.codes.insert(132015, 1.0);
    })
    .await;
    stack.apply(&meta_channel("main", &paused.base_url(), "111", &fast(0)));
    stack.apply(&campaign("paused-template", "main", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "paused-template", "MessageRejected", LONG, |c| {
            is_true_with(c, "Stalled", "MessageRejected")
        })
        .await;
    assert_eq!(phase(&c), "Paused");
    let channel = stack.get("channel", "main");
    assert!(
        is_true_with(&channel, "Ready", "Ready"),
        "the channel stays ready for other campaigns: {}",
        channel["status"]
    );
    let stopped: Option<(String,)> = sqlx::query_as("SELECT pause_kind::text FROM channel_state WHERE organization = $1 AND channel = 'main' AND pause_kind IS NOT NULL")
        .bind(&stack.org)
        .fetch_optional(&stack.pool)
        .await
        .unwrap();
    assert_eq!(stopped, None, "the channel was not paused");

    common::stack::create_evolution_credentials(&stack.ns, "t");
    let evolution = format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: evo}}\nspec:\n  provider: evolution\n  evolution:\n    baseUrl: {}\n    instance: sandbox\n    apiKey: {{name: evo-creds, key: api-key}}\n    webhookToken: {{name: evo-creds, key: webhook-token}}\n",
        paused.base_url()
    );
    stack.apply(&evolution);
    stack.apply(&campaign("wrong-type", "evo", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "wrong-type", "PreflightFailed", LONG, |c| is_true_with(c, "Stalled", "PreflightFailed"))
        .await;
    let message = common::stack::condition(&c, "Stalled").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("spec.message.template") && message.contains("Evolution"), "{message}");
}
