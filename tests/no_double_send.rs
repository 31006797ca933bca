//! No double send through intermediaries: a real sender, a real Postgres and the
//! sandbox over HTTP, where a gateway in front of the provider answers 504 after the
//! provider accepted the message. Such a message must end `unknown` and never be sent
//! again, while refusals the provider itself makes are still retried; the sandbox's
//! ledger (what the provider saw) must show no recipient twice. The scenario lives in
//! tests/send_scenarios (tests/pooler.rs runs it through PgBouncer too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod send_scenarios;

use disparo_testkit::pgbouncer::Reach;

#[tokio::test]
async fn a_gateway_504_after_meta_accepted_is_never_resent() {
    send_scenarios::no_recipient_gets_two_messages(&Reach::direct().await, send_scenarios::meta_target).await;
}

#[tokio::test]
async fn a_gateway_504_after_evolution_accepted_is_never_resent() {
    send_scenarios::no_recipient_gets_two_messages(&Reach::direct().await, send_scenarios::evolution_target).await;
}
