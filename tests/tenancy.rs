//! Tenant isolation enforced by Postgres and Kubernetes, on the real stack: the
//! credential the controller gives a namespace reaches that organization's rows only,
//! whatever SQL it runs; a re-created namespace starts empty; importing contacts needs
//! rights in the namespace.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::time::Duration;

use common::cluster::kubectl_ok;
use common::stack::{Stack, campaign, fast, is_true_with, meta_channel, phase, sandbox_with};
use serde_json::json;
use sqlx::Connection;

const LONG: Duration = Duration::from_secs(180);

/// The namespace's own database URL, as a pod there gets it.
fn namespace_url(stack: &Stack, ns: &str) -> String {
    let secret: serde_json::Value =
        serde_json::from_str(&kubectl_ok(&["-n", ns, "get", "secret", "disparo-database", "-o", "json"], None))
            .unwrap();
    use base64::Engine;
    let encoded = secret["data"]["url"].as_str().unwrap();
    let url = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap();
    assert_ne!(url, stack.url, "the namespace never holds the admin URL");
    url
}

async fn wait_for_secret(ns: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while common::cluster::kubectl(&["-n", ns, "get", "secret", "disparo-database"], None).status.code() != Some(0) {
        assert!(std::time::Instant::now() < deadline, "no disparo-database Secret in {ns}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Rows a statement changed, or the error Postgres gave.
async fn rows(conn: &mut sqlx::PgConnection, sql: &str) -> Result<u64, String> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_credential_reaches_its_own_rows_only() {
    let mut stack = Stack::start("tenant-a").await;
    let (b, b_org) = stack.add_namespace("tenant-b");
    let sandbox = sandbox_with(|_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 60, |_| (vec!["a".into()], json!({}))).await;
    common::seed_contacts(&stack.pool, &b_org, 40, |_| (vec!["b".into()], json!({"secret": "b's"}))).await;
    for ns in [&stack.ns, &b] {
        kubectl_ok(&["-n", ns, "apply", "-f", "-"], Some(&meta_channel("main", &sandbox.base_url(), "111", &fast(0))));
        kubectl_ok(
            &["-n", ns, "apply", "-f", "-"],
            Some(&campaign("hello", "main", "promo", "{allContacts: true}", "")),
        );
    }
    // Both organizations' campaigns complete with their scoped credentials.
    let a = stack.wait_for("campaign", "hello", "Completed", LONG, |c| phase(c) == "Completed").await;
    assert_eq!(a["status"]["messages"]["sent"], 60);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let c: serde_json::Value =
            serde_json::from_str(&kubectl_ok(&["-n", &b, "get", "campaign", "hello", "-o", "json"], None)).unwrap();
        if phase(&c) == "Completed" {
            assert_eq!(c["status"]["messages"]["sent"], 40);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B's campaign never completed: {}\n{}",
            c["status"],
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // What a pod in A holds: A's URL. Whatever it runs, B's rows stay out of reach.
    let mut conn = sqlx::PgConnection::connect(&namespace_url(&stack, &stack.ns)).await.unwrap();
    let (contacts,): (i64,) = sqlx::query_as("SELECT count(*) FROM contacts").fetch_one(&mut conn).await.unwrap();
    assert_eq!(contacts, 60, "A sees its own contacts only");
    let (messages,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM campaign_messages").fetch_one(&mut conn).await.unwrap();
    assert_eq!(messages, 60);
    let (counters,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM campaign_counters").fetch_one(&mut conn).await.unwrap();
    assert_eq!(counters, 1, "A sees its own campaign's counters only");
    let b_lit = format!("'{b_org}'");
    assert_eq!(
        rows(&mut conn, &format!("UPDATE contacts SET name = 'pwned' WHERE organization = {b_lit}")).await,
        Ok(0)
    );
    assert_eq!(rows(&mut conn, &format!("DELETE FROM contacts WHERE organization = {b_lit}")).await, Ok(0));
    assert_eq!(
        rows(&mut conn, &format!("UPDATE campaign_messages SET status = 'failed' WHERE organization = {b_lit}")).await,
        Ok(0)
    );
    assert_eq!(rows(&mut conn, "UPDATE channel_state SET pause_kind = 'provider_refused' WHERE organization <> (SELECT current_organization())").await, Ok(0));
    let insert =
        rows(&mut conn, &format!("INSERT INTO contacts (organization, phone) VALUES ({b_lit}, '+5511911112222')"))
            .await;
    assert!(insert.as_ref().is_err_and(|e| e.contains("row-level security")), "{insert:?}");
    for denied in [
        "DELETE FROM campaign_messages",
        "UPDATE campaign_counters SET sent = 0",
        "DELETE FROM campaigns",
        "SELECT * FROM unmatched_receipts",
        "DROP TABLE contacts",
    ] {
        let result = rows(&mut conn, denied).await;
        assert!(
            result.as_ref().is_err_and(|e| e.contains("permission denied") || e.contains("must be owner")),
            "{denied}: {result:?}"
        );
    }
    let (orgs,): (i64,) = sqlx::query_as("SELECT count(*) FROM organizations").fetch_one(&mut conn).await.unwrap();
    assert_eq!(orgs, 1, "A does not even learn B exists");
    // ... and B's data is untouched.
    let (b_contacts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM contacts WHERE organization = $1 AND name <> 'pwned'")
            .bind(&b_org)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(b_contacts, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_namespace_starts_empty() {
    let mut stack = Stack::start("reborn").await;
    let sandbox = sandbox_with(|_| {}).await;
    common::seed_contacts(&stack.pool, &stack.org, 30, |_| (vec![], json!({}))).await;
    disparo::store::pauses::stop_channel(&stack.pool, &stack.org, "main", "190", "token revoked").await.unwrap();
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    wait_for_secret(&stack.ns).await;
    // The namespace goes away and comes back under the same name: a new organization.
    kubectl_ok(&["delete", "namespace", &stack.ns, "--wait=true", "--timeout=120s"], None);
    kubectl_ok(&["create", "namespace", &stack.ns], None);
    let reborn = common::cluster::namespace_uid(&stack.ns);
    assert_ne!(reborn, stack.org);
    // The first controller's Lease went with the namespace: a new one takes over.
    let ns = stack.ns.clone();
    stack.spawn_controller("controller-2", &ns);
    common::stack::create_meta_credentials(&ns);
    stack.apply(&meta_channel("main", &sandbox.base_url(), "111", &fast(0)));
    stack.apply(&campaign("fresh", "main", "promo", "{allContacts: true}", ""));
    let c = stack
        .wait_for("campaign", "fresh", "PreflightFailed", LONG, |c| is_true_with(c, "Stalled", "PreflightFailed"))
        .await;
    assert_eq!(
        c["status"]["preflight"]["audienceSize"], 0,
        "the old tenant's contacts are not this one's: {}",
        c["status"]
    );
    let channel = stack.wait_for("channel", "main", "Ready", LONG, |ch| is_true_with(ch, "Ready", "Ready")).await;
    assert!(channel["status"]["rateLimitedUntil"].is_null(), "the old tenant's channel stop is not this one's");
    assert_eq!(sandbox.ledger().accepted_count(), 0);
}

/// A person with `edit` rights in namespace A imports into A; into B, where they have
/// no rights, the import fails and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contacts_import_needs_rights_in_the_namespace() {
    let mut stack = Stack::start("import-a").await;
    let (b, b_org) = stack.add_namespace("import-b");
    let sandbox = sandbox_with(|_| {}).await;
    for ns in [&stack.ns, &b] {
        kubectl_ok(&["-n", ns, "apply", "-f", "-"], Some(&meta_channel("main", &sandbox.base_url(), "111", &fast(0))));
        wait_for_secret(ns).await;
    }
    // A person who may edit A only.
    stack.kubectl(&["create", "serviceaccount", "alice"]);
    stack.kubectl(&[
        "create",
        "rolebinding",
        "alice-edit",
        "--clusterrole=edit",
        &format!("--serviceaccount={}:alice", stack.ns),
    ]);
    let token = stack.kubectl(&["create", "token", "alice"]).trim().to_owned();
    let admin: serde_json::Value =
        serde_json::from_str(&kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"], None)).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "alice",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "alice", "user": {"token": token}}],
        "contexts": [{"name": "alice", "context": {"cluster": "c", "user": "alice"}}],
    });
    let path = stack.dir.path().join("alice.kubeconfig");
    std::fs::write(&path, serde_json::to_string(&kubeconfig).unwrap()).unwrap();
    let csv = stack.dir.path().join("contacts.csv");
    std::fs::write(&csv, "phone,name\n+5511987654321,Ana\n+5511987654322,Bia\n").unwrap();
    let import = |ns: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_disparo"))
            .args(["contacts", "import", "-n", ns, csv.to_str().unwrap()])
            .env("KUBECONFIG", &path)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let into_a = import(&stack.ns);
    assert!(into_a.status.success(), "{}", String::from_utf8_lossy(&into_a.stderr));
    let into_b = import(&b);
    assert!(!into_b.status.success());
    let stderr = String::from_utf8_lossy(&into_b.stderr);
    assert!(stderr.contains("may not read Secret disparo-database"), "{stderr}");
    let count = |org: String| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM contacts WHERE organization = $1")
                .bind(org)
                .fetch_one(&pool)
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(count(stack.org.clone()).await, 2);
    assert_eq!(count(b_org).await, 0);
}
