//! The test harness of the workspace's integration suites (the root package's
//! `tests/` write `use disparo_testkit as common;`):
//!
//! - here: a real Postgres (the throwaway server `scripts/pg` starts, or `DATABASE_URL`
//!   when given) with one fresh, migrated database per test, and contacts to seed it;
//! - [`postgres`]: a Postgres server of one test's own, to stop and start;
//! - [`pgbouncer`]: a real PgBouncer in transaction pooling mode in front of a test Postgres;
//! - [`cluster`]: kubectl, the CRDs and namespaces on the shared control plane;
//! - [`bin`]: the executables tests spawn (`disparo`, `disparo-nodeagent`);
//! - [`process`]: processes with their logs, free ports, node agents;
//! - [`figures`]: the scale run's figures and their table;
//! - [`procstat`]: CPU time and peak memory of processes, read from `/proc`;
//! - [`stack`]: the real stack for one test (controller, node agent, database).

// A harness fails the test it serves by panicking, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bin;
pub mod cluster;
pub mod figures;
pub mod pgbouncer;
pub mod postgres;
pub mod process;
pub mod procstat;
pub mod prometheus;
pub mod stack;

use std::sync::OnceLock;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The server URL (database `disparo`), starting the throwaway cluster if needed.
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        postgres::up(None)
    })
    .clone()
}

/// A URL for database `name` on the same server.
pub fn url_for(name: &str) -> String {
    let server = server_url();
    match server.rfind('/') {
        Some(slash) => format!("{}/{name}", &server[..slash]),
        None => panic!("DATABASE_URL {server:?} has no database part"),
    }
}

/// A fresh, empty database (no migrations applied); returns its URL.
pub async fn empty_db() -> String {
    disparo::telemetry::install_crypto_provider();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin =
        PgPoolOptions::new().max_connections(1).connect(&server_url()).await.expect("connecting to the test Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("creating a test database");
    // Roles belong to the whole Postgres cluster: when tests migrate fresh databases at
    // once, two `CREATE ROLE disparo_tenant` of migration 0006 can race, and the loser
    // fails on the catalog's unique index instead of `duplicate_object`. Creating the
    // role first, tolerating both errors, leaves the migration only `duplicate_object`.
    sqlx::query(
        "DO $$ BEGIN CREATE ROLE disparo_tenant NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
    )
    .execute(&admin)
    .await
    .expect("creating the tenant group role");
    admin.close().await;
    url_for(&name)
}

/// A fresh database with the migrations applied; returns its pool and URL.
pub async fn fresh_db() -> (PgPool, String) {
    let url = empty_db().await;
    let pool = PgPoolOptions::new().max_connections(20).connect(&url).await.expect("connecting to the test database");
    disparo::store::migrate(&pool).await.expect("migrating the test database");
    (pool, url)
}

/// Inserts contacts `+5511900000000 + i` for i in 0..n into an organization, with the
/// given tags and attributes chosen by `f(i)`.
pub async fn seed_contacts(
    pool: &PgPool,
    organization: &str,
    n: usize,
    f: impl Fn(usize) -> (Vec<String>, serde_json::Value),
) -> Vec<String> {
    let mut phones = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        let phone = phone(i);
        let (tags, attributes) = f(i);
        phones.push(phone.clone());
        batch.push(disparo::store::contacts::NewContact {
            phone,
            name: Some(format!("Contact {i}")),
            tags,
            attributes,
            whatsapp_id: None,
        });
        if batch.len() == 5000 {
            disparo::store::contacts::upsert(pool, organization, &batch).await.expect("seeding contacts");
            batch.clear();
        }
    }
    disparo::store::contacts::upsert(pool, organization, &batch).await.expect("seeding contacts");
    phones
}

/// The i-th test phone number (valid Brazilian mobile numbers).
pub fn phone(i: usize) -> String {
    format!("+55119{:08}", i)
}
