//! The store against a real Postgres: forward-only statuses, counters that equal a
//! recount, audience materialization per kind, tenant isolation, rate windows.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::sync::Arc;

use chrono::Utc;
use disparo::api::{AttributeOperator, RateLimitMode};
use disparo::store::audience::{self, AttributeFilter, AudienceQuery, CampaignKey};
use disparo::store::blocks;
use disparo::store::campaigns;
use disparo::store::export::{self, ExportFilter, ExportRow};
use disparo::store::messages::{self, Outcome};
use disparo::store::rate::{self, Limits};
use disparo::store::receipts::MessageStatus;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

async fn freeze(pool: &PgPool, org: &str, audience: &AudienceQuery, batch_size: u32) -> (Uuid, audience::Frozen) {
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: org, name: &format!("c-{uid}"), channel: "ch", batch_size };
    let frozen = audience::materialize(pool, &key, audience).await.unwrap();
    (uid, frozen)
}

async fn phones_of(pool: &PgPool, campaign: Uuid) -> Vec<String> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT c.phone FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 ORDER BY c.phone",
    )
    .bind(campaign)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(p,)| p).collect()
}

async fn status_of(pool: &PgPool, id: i64) -> String {
    let (s,): (String,) = sqlx::query_as("SELECT status::text FROM campaign_messages WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    s
}

#[tokio::test]
async fn each_audience_kind_materializes_exactly_the_expected_contacts() {
    let (pool, _) = common::fresh_db().await;
    // 0..20: tags by residue, city by parity; contact 19 opts out
    let phones = common::seed_contacts(&pool, "acme", 20, |i| {
        let mut tags = vec![];
        if i % 2 == 0 {
            tags.push("even".to_owned());
        }
        if i % 3 == 0 {
            tags.push("three".to_owned());
        }
        if i % 5 == 0 {
            tags.push("five".to_owned());
        }
        let attrs = if i % 4 == 0 { json!({"city": "SP", "tier": i}) } else { json!({"city": "RJ"}) };
        (tags, attrs)
    })
    .await;
    disparo::store::contacts::opt_out(&pool, "acme", &phones[19]).await.unwrap();
    let expect = |pred: &dyn Fn(usize) -> bool| -> Vec<String> {
        let mut v: Vec<String> = (0..19).filter(|i| pred(*i)).map(common::phone).collect();
        v.sort();
        v
    };

    let (all, frozen) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 7).await;
    assert_eq!(phones_of(&pool, all).await, expect(&|_| true));
    assert_eq!((frozen.messages, frozen.batches), (19, 3));

    let tags = AudienceQuery::Tags {
        any_of: vec!["three".into(), "five".into()],
        all_of: vec!["even".into()],
        none_of: vec!["five".into()],
    };
    let (t, _) = freeze(&pool, "acme", &tags, 100).await;
    // anyOf three|five, allOf even, noneOf five: multiples of 3 that are even and not of 5.
    assert_eq!(phones_of(&pool, t).await, expect(&|i| i % 3 == 0 && i % 2 == 0 && i % 5 != 0));

    let segment = AudienceQuery::Segment(vec![
        AttributeFilter { key: "city".into(), operator: AttributeOperator::In, values: vec!["SP".into()] },
        AttributeFilter { key: "tier".into(), operator: AttributeOperator::Exists, values: vec![] },
        AttributeFilter { key: "tier".into(), operator: AttributeOperator::NotIn, values: vec!["8".into()] },
    ]);
    let (s, _) = freeze(&pool, "acme", &segment, 100).await;
    assert_eq!(phones_of(&pool, s).await, expect(&|i| i % 4 == 0 && i != 8));

    let no_tier = AudienceQuery::Segment(vec![AttributeFilter {
        key: "tier".into(),
        operator: AttributeOperator::DoesNotExist,
        values: vec![],
    }]);
    let (nt, _) = freeze(&pool, "acme", &no_tier, 100).await;
    assert_eq!(phones_of(&pool, nt).await, expect(&|i| i % 4 != 0));

    let explicit = AudienceQuery::Contacts(vec![
        phones[1].clone(),
        phones[2].clone(),
        phones[19].clone(),
        "+5511988887777".into(),
    ]);
    let (e, frozen) = freeze(&pool, "acme", &explicit, 100).await;
    assert_eq!(
        phones_of(&pool, e).await,
        vec![phones[1].clone(), phones[2].clone()],
        "opted-out and unknown numbers are excluded"
    );
    assert_eq!(frozen.messages, 2);

    // fromCampaign: fail two messages of the explicit campaign, then target its failures
    let claimed = messages::claim_due(&pool, e, 0, 10).await.unwrap();
    let outcomes: Vec<(i64, Outcome)> = claimed
        .iter()
        .map(|m| {
            (
                m.id,
                if m.phone == phones[1] {
                    Outcome::Failed { code: "131026".into(), message: "undeliverable".into() }
                } else {
                    Outcome::Sent { provider_message_id: "wamid.x".into() }
                },
            )
        })
        .collect();
    messages::record_outcomes(&pool, &outcomes, "test-run").await.unwrap();
    let name: (String,) =
        sqlx::query_as("SELECT name FROM campaigns WHERE uid = $1").bind(e).fetch_one(&pool).await.unwrap();
    let from = AudienceQuery::FromCampaign { name: name.0, statuses: vec!["failed"], error_codes: vec![] };
    let (f, _) = freeze(&pool, "acme", &from, 100).await;
    assert_eq!(phones_of(&pool, f).await, vec![phones[1].clone()]);

    let missing =
        AudienceQuery::FromCampaign { name: "never-ran".into(), statuses: vec!["failed"], error_codes: vec![] };
    let err = audience::materialize(
        &pool,
        &CampaignKey { uid: Uuid::new_v4(), organization: "acme", name: "x", channel: "ch", batch_size: 10 },
        &missing,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("never-ran"), "{err}");
}

#[tokio::test]
async fn materializing_twice_changes_nothing() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 30, |_| (vec![], json!({}))).await;
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: "acme", name: "again", channel: "ch", batch_size: 10 };
    let first = audience::materialize(&pool, &key, &AudienceQuery::AllContacts).await.unwrap();
    common::seed_contacts(&pool, "acme", 40, |_| (vec![], json!({}))).await; // 10 new contacts appear
    let second = audience::materialize(&pool, &key, &AudienceQuery::AllContacts).await.unwrap();
    assert!(first.newly_frozen && !second.newly_frozen);
    assert_eq!((second.messages, second.batches), (30, 3));
    assert_eq!(campaigns::recount(&pool, uid).await.unwrap().total, 30);
    let batches: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT batch_index, count(*) FROM campaign_messages WHERE campaign_uid = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(uid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(batches, vec![(0, 10), (1, 10), (2, 10)]);
}

#[tokio::test]
async fn a_campaign_never_reaches_another_namespace() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "team-a", 5, |_| (vec!["vip".into()], json!({"city": "SP"}))).await;
    // the same phone numbers exist in team-b too
    common::seed_contacts(&pool, "team-b", 8, |_| (vec!["vip".into()], json!({"city": "SP"}))).await;
    for query in [
        AudienceQuery::AllContacts,
        AudienceQuery::Tags { any_of: vec!["vip".into()], all_of: vec![], none_of: vec![] },
        AudienceQuery::Segment(vec![AttributeFilter {
            key: "city".into(),
            operator: AttributeOperator::In,
            values: vec!["SP".into()],
        }]),
        AudienceQuery::Contacts((0..8).map(common::phone).collect()),
    ] {
        let (uid, frozen) = freeze(&pool, "team-a", &query, 100).await;
        assert_eq!(frozen.messages, 5, "{query:?}");
        let (foreign,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 AND c.organization <> 'team-a'",
        )
        .bind(uid)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(foreign, 0);
    }
}

#[tokio::test]
async fn statuses_only_move_forward() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 1, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let claimed = messages::claim_due(&pool, uid, 0, 10).await.unwrap();
    let id = claimed[0].id;
    messages::record_outcomes(&pool, &[(id, Outcome::Sent { provider_message_id: "wamid.1".into() })], "test-run")
        .await
        .unwrap();
    sqlx::query("UPDATE campaign_messages SET status = 'read' WHERE id = $1").bind(id).execute(&pool).await.unwrap();
    // a late 'delivered' after 'read' is refused by the database itself
    let err = sqlx::query("UPDATE campaign_messages SET status = 'delivered' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot move from read to delivered"), "{err}");
    // and a second outcome for a message no longer 'sending' changes nothing
    let changed = messages::record_outcomes(
        &pool,
        &[(id, Outcome::Failed { code: "x".into(), message: "late".into() })],
        "test-run",
    )
    .await
    .unwrap();
    assert_eq!(changed, 0);
    assert_eq!(status_of(&pool, id).await, "read");
    let recount = campaigns::recount(&pool, uid).await.unwrap();
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.read, counters.sent), (1, 0));
    assert_eq!((recount.read, recount.sent), (1, 0));
}

#[tokio::test]
async fn counters_equal_a_recount_after_random_changes() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 300, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 50).await;
    // some contacts opt out after the freeze: their messages end skipped
    for phone in phones.iter().step_by(29) {
        disparo::store::contacts::opt_out(&pool, "acme", phone).await.unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..40 {
        let batch = rng.random_range(0..6);
        // the sender's one-write blocks, and the two-write path tools still use
        let limit = rng.random_range(1..20);
        let (intent, claimed) = if round % 2 == 0 {
            let block = claim(&pool, uid, batch, limit, "test-run").await;
            (block.intent, block.messages)
        } else {
            (None, messages::claim_due(&pool, uid, batch, limit).await.unwrap())
        };
        let outcomes: Vec<(i64, Outcome)> = claimed
            .iter()
            .map(|m| {
                let outcome = match rng.random_range(0..5) {
                    0 => Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() },
                    1 => Outcome::Failed { code: "131026".into(), message: "undeliverable".into() },
                    2 => Outcome::Unknown { reason: "timeout".into() },
                    3 => Outcome::Requeue { at: Utc::now() },
                    _ => Outcome::Sent { provider_message_id: format!("wamid.{}", m.id) },
                };
                (m.id, outcome)
            })
            .collect();
        match intent {
            Some(intent) => blocks::record(&pool, intent, &outcomes, "test-run").await.unwrap(),
            None => messages::record_outcomes(&pool, &outcomes, "test-run").await.unwrap(),
        };
        // webhook-like moves on random sent messages, some stale
        let target = ["delivered", "read", "failed"][round % 3];
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE campaign_messages SET status = '{target}' WHERE id IN (SELECT id FROM campaign_messages WHERE campaign_uid = $1 AND message_transition_allowed(status, '{target}') AND status IN ('sent','delivered','unknown') ORDER BY random() LIMIT 5)"
        )))
        .bind(uid)
        .execute(&pool)
        .await
        .unwrap();
        if round == 30 {
            messages::cancel_pending(&pool, uid).await.unwrap();
        }
    }
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    let recount = campaigns::recount(&pool, uid).await.unwrap();
    assert_eq!(
        (
            counters.total,
            counters.pending,
            counters.sending,
            counters.unknown,
            counters.sent,
            counters.delivered,
            counters.read,
            counters.failed,
            counters.cancelled,
            counters.skipped
        ),
        (
            recount.total,
            recount.pending,
            recount.sending,
            recount.unknown,
            recount.sent,
            recount.delivered,
            recount.read,
            recount.failed,
            recount.cancelled,
            recount.skipped
        )
    );
    assert!(counters.cancelled > 0 && counters.failed > 0 && counters.read > 0 && counters.skipped > 0);
    // every recorded error counts once, whichever path recorded it
    let errors = campaigns::error_breakdown(&pool, uid, 10).await.unwrap();
    let (recorded,): (i64,) = sqlx::query_as(
        r#"SELECT count(*) FROM campaign_messages m, jsonb_array_elements(m.status_history) h
           WHERE m.campaign_uid = $1 AND h->>'code' = '131026'"#,
    )
    .bind(uid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(recorded > 0);
    assert!(errors.iter().any(|(code, n)| code == "131026" && *n == recorded), "{errors:?} vs {recorded}");
}

#[tokio::test]
async fn parallel_claims_never_overlap() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 500, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 500).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = messages::claim_due(&pool, uid, 0, 7).await.unwrap();
                if claimed.is_empty() {
                    break;
                }
                mine.extend(claimed.into_iter().map(|m| m.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 500);
    assert_eq!(unique.len(), 500);
}

#[tokio::test]
async fn concurrent_reservations_never_exceed_the_caps() {
    let (pool, _) = common::fresh_db().await;
    let limits = Limits {
        per_minute: Some(37),
        per_hour: Some(1000),
        per_day: Some(5000),
        mode: RateLimitMode::Hard,
        min_interval: std::time::Duration::ZERO,
    };
    let pool = Arc::new(pool);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..10 {
                let r = rate::reserve(&pool, "acme", "meta-main", &limits, 3).await.unwrap();
                got.extend(r.slots);
            }
            got
        }));
    }
    let mut slots = Vec::new();
    for t in tasks {
        slots.extend(t.await.unwrap());
    }
    // group grants by calendar minute: no minute ever holds more than the cap
    let mut per_minute = std::collections::BTreeMap::<i64, usize>::new();
    for s in &slots {
        *per_minute.entry(s.timestamp() / 60).or_default() += 1;
    }
    assert!(per_minute.values().all(|n| *n <= 37), "{per_minute:?}");
    assert!(slots.len() >= 37 || per_minute.len() > 1);
    let usage = rate::usage(&pool, "acme", "meta-main").await.unwrap();
    assert!(usage[0].used <= 37);
}

#[tokio::test]
async fn a_spent_day_window_reports_its_reset() {
    let (pool, _) = common::fresh_db().await;
    let limits = Limits {
        per_minute: None,
        per_hour: None,
        per_day: Some(3),
        mode: RateLimitMode::Hard,
        min_interval: std::time::Duration::ZERO,
    };
    let first = rate::reserve(&pool, "acme", "tiny", &limits, 5).await.unwrap();
    assert_eq!(first.granted(), 3);
    let second = rate::reserve(&pool, "acme", "tiny", &limits, 1).await.unwrap();
    assert_eq!(second.granted(), 0);
    assert!(second.day_spent);
    let reset = second.blocked_until.unwrap();
    assert_eq!(reset, rate::WindowKind::Day.start_of(Utc::now()) + chrono::Duration::days(1));
}

#[tokio::test]
async fn spaced_channels_get_spaced_slots_across_senders() {
    let (pool, _) = common::fresh_db().await;
    let limits = Limits {
        per_minute: None,
        per_hour: Some(1000),
        per_day: None,
        mode: RateLimitMode::Graceful,
        min_interval: std::time::Duration::from_millis(500),
    };
    let a = rate::reserve(&pool, "acme", "evo", &limits, 10).await.unwrap();
    let b = rate::reserve(&pool, "acme", "evo", &limits, 10).await.unwrap();
    assert_eq!(a.granted(), 4, "2 s of lookahead at 500 ms");
    let mut all: Vec<_> = a.slots.iter().chain(b.slots.iter()).copied().collect();
    all.sort();
    for pair in all.windows(2) {
        assert!(pair[1] - pair[0] >= chrono::Duration::milliseconds(500), "{all:?}");
    }
}

#[tokio::test]
async fn unused_tokens_go_back_to_their_window() {
    let (pool, _) = common::fresh_db().await;
    let limits = Limits {
        per_minute: None,
        per_hour: Some(10),
        per_day: None,
        mode: RateLimitMode::Hard,
        min_interval: std::time::Duration::ZERO,
    };
    let first = rate::reserve(&pool, "acme", "meta-main", &limits, 10).await.unwrap();
    assert_eq!(first.granted(), 10);
    assert_eq!(rate::reserve(&pool, "acme", "meta-main", &limits, 1).await.unwrap().granted(), 0, "the hour is spent");
    // only 6 messages were due: the other 4 tokens are given back and can be taken again
    rate::release(&pool, "acme", "meta-main", &first, 4).await.unwrap();
    assert_eq!(rate::usage(&pool, "acme", "meta-main").await.unwrap()[1].used, 6);
    assert_eq!(rate::reserve(&pool, "acme", "meta-main", &limits, 10).await.unwrap().granted(), 4);
}

#[tokio::test]
async fn an_uncapped_channel_grants_everything_and_shows_what_it_counted() {
    let (pool, _) = common::fresh_db().await;
    let granted = rate::reserve(&pool, "acme", "sandbox", &Limits::unlimited(), 5000).await.unwrap();
    assert_eq!(granted.granted(), 5000);
    assert_eq!(granted.expires_at, None);
    rate::count_usage(&pool, "acme", "sandbox", 700).await.unwrap();
    rate::count_usage(&pool, "acme", "sandbox", 300).await.unwrap();
    let usage = rate::usage(&pool, "acme", "sandbox").await.unwrap();
    // the day counts both (a minute may have rolled over between the two counts)
    assert_eq!(usage[2].used, 1000, "{usage:?}");
    assert!(usage[0].used == 1000 || usage[0].used == 300, "{usage:?}");
}

async fn statuses_by_phone(pool: &PgPool, campaign: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT c.phone, m.status::text FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 ORDER BY c.phone",
    )
    .bind(campaign)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn assert_counters_equal_recount(pool: &PgPool, campaign: Uuid) -> campaigns::Counters {
    let c = campaigns::counters(pool, campaign).await.unwrap().unwrap();
    let r = campaigns::recount(pool, campaign).await.unwrap();
    assert_eq!(
        (c.total, c.pending, c.sending, c.unknown, c.sent, c.delivered, c.read, c.failed, c.cancelled, c.skipped),
        (r.total, r.pending, r.sending, r.unknown, r.sent, r.delivered, r.read, r.failed, r.cancelled, r.skipped)
    );
    c
}

#[tokio::test]
async fn contacts_who_opted_out_after_the_freeze_are_skipped_not_sent() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 5, |_| (vec![], json!({}))).await;
    let (uid, frozen) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    assert_eq!(frozen.messages, 5);
    // two contacts opt out after the audience was frozen
    disparo::store::contacts::opt_out(&pool, "acme", &phones[1]).await.unwrap();
    disparo::store::contacts::opt_out(&pool, "acme", &phones[3]).await.unwrap();

    let claimed = messages::claim_due(&pool, uid, 0, 10).await.unwrap();
    let mut sent_to: Vec<String> = claimed.iter().map(|m| m.phone.clone()).collect();
    sent_to.sort();
    assert_eq!(sent_to, vec![phones[0].clone(), phones[2].clone(), phones[4].clone()]);
    let statuses = statuses_by_phone(&pool, uid).await;
    assert_eq!(statuses[1], (phones[1].clone(), "skipped".to_owned()));
    assert_eq!(statuses[3], (phones[3].clone(), "skipped".to_owned()));
    let (attempts,): (i32,) =
        sqlx::query_as("SELECT max(attempts) FROM campaign_messages WHERE campaign_uid = $1 AND status = 'skipped'")
            .bind(uid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "a skipped message was never attempted");

    let outcomes: Vec<(i64, Outcome)> =
        claimed.iter().map(|m| (m.id, Outcome::Sent { provider_message_id: format!("wamid.{}", m.id) })).collect();
    messages::record_outcomes(&pool, &outcomes, "test-run").await.unwrap();
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.skipped, counters.sent, counters.pending), (2, 3, 0));
    assert_eq!(counters.finished(), counters.total, "skipped messages are finished");
    assert_eq!(messages::batch_remaining(&pool, uid, 0).await.unwrap().pending, 0);
}

#[tokio::test]
async fn a_batch_whose_remaining_contacts_all_opted_out_finishes() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 4, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 2).await;
    // batch 1 holds contacts 2 and 3; both opt out
    disparo::store::contacts::opt_out(&pool, "acme", &phones[2]).await.unwrap();
    disparo::store::contacts::opt_out(&pool, "acme", &phones[3]).await.unwrap();
    assert!(messages::claim_due(&pool, uid, 1, 10).await.unwrap().is_empty());
    assert_eq!(messages::batch_remaining(&pool, uid, 1).await.unwrap().pending, 0);
    let first = messages::claim_due(&pool, uid, 0, 10).await.unwrap();
    assert_eq!(first.len(), 2);
    let outcomes: Vec<(i64, Outcome)> = first
        .iter()
        .map(|m| (m.id, Outcome::Failed { code: "131026".into(), message: "undeliverable".into() }))
        .collect();
    messages::record_outcomes(&pool, &outcomes, "test-run").await.unwrap();
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.skipped, counters.failed, counters.pending + counters.sending), (2, 2, 0));
    assert_eq!(counters.finished(), counters.total);
}

#[tokio::test]
async fn skipped_is_terminal_and_counted_through_every_change() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 3, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    disparo::store::contacts::opt_out(&pool, "acme", &phones[0]).await.unwrap();
    messages::claim_due(&pool, uid, 0, 1).await.unwrap();
    let (id,): (i64,) =
        sqlx::query_as("SELECT id FROM campaign_messages WHERE campaign_uid = $1 AND status = 'skipped'")
            .bind(uid)
            .fetch_one(&pool)
            .await
            .unwrap();
    for to in ["pending", "sending", "sent", "cancelled"] {
        let err =
            sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE campaign_messages SET status = '{to}' WHERE id = $1")))
                .bind(id)
                .execute(&pool)
                .await
                .unwrap_err();
        assert!(err.to_string().contains(&format!("cannot move from skipped to {to}")), "{err}");
    }
    // pending -> skipped by hand is allowed, and the counters follow it and a delete
    sqlx::query("UPDATE campaign_messages SET status = 'skipped' WHERE campaign_uid = $1 AND status = 'pending'")
        .bind(uid)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.skipped, 3);
    sqlx::query("DELETE FROM campaign_messages WHERE id = $1").bind(id).execute(&pool).await.unwrap();
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.skipped, 2);
}

#[tokio::test]
async fn a_cancelled_campaign_claims_nothing_and_its_retries_are_cancelled() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 6, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    assert!(!campaigns::is_cancelled(&pool, uid).await.unwrap());
    // a sender still running holds three messages when the campaign is cancelled
    let claimed = messages::claim_due(&pool, uid, 0, 3).await.unwrap();
    assert_eq!(claimed.len(), 3);
    assert_eq!(messages::cancel_pending(&pool, uid).await.unwrap(), 3);
    assert!(campaigns::is_cancelled(&pool, uid).await.unwrap());
    let outcomes = vec![
        (claimed[0].id, Outcome::Sent { provider_message_id: "wamid.in-flight".into() }),
        (claimed[1].id, Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() }),
        (claimed[2].id, Outcome::Requeue { at: Utc::now() }),
    ];
    assert_eq!(messages::record_outcomes(&pool, &outcomes, "test-run").await.unwrap(), 3);
    assert_eq!(status_of(&pool, claimed[0].id).await, "sent", "a message in flight finishes normally");
    assert_eq!(
        status_of(&pool, claimed[1].id).await,
        "cancelled",
        "a retry of a cancelled campaign is never scheduled"
    );
    assert_eq!(
        status_of(&pool, claimed[2].id).await,
        "cancelled",
        "a requeue of a cancelled campaign is never scheduled"
    );
    assert!(messages::claim_due(&pool, uid, 0, 10).await.unwrap().is_empty());
    // even a pending message written afterwards by hand is never claimed
    let seventh = common::seed_contacts(&pool, "acme", 7, |_| (vec![], json!({}))).await;
    sqlx::query("INSERT INTO campaign_messages (campaign_uid, organization, contact_id, batch_index) SELECT $1, 'acme', id, 0 FROM contacts WHERE phone = $2")
        .bind(uid)
        .bind(&seventh[6])
        .execute(&pool)
        .await
        .unwrap();
    assert!(messages::claim_due(&pool, uid, 0, 10).await.unwrap().is_empty());
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.sent, counters.cancelled, counters.sending), (1, 5, 0));
    // cancelling again changes nothing and keeps the first instant
    let first: (Option<chrono::DateTime<Utc>>,) =
        sqlx::query_as("SELECT cancelled_at FROM campaigns WHERE uid = $1").bind(uid).fetch_one(&pool).await.unwrap();
    messages::cancel_pending(&pool, uid).await.unwrap();
    let again: (Option<chrono::DateTime<Utc>>,) =
        sqlx::query_as("SELECT cancelled_at FROM campaigns WHERE uid = $1").bind(uid).fetch_one(&pool).await.unwrap();
    assert_eq!(first, again);
}

/// Waits until `task` is blocked on a lock in Postgres (true) or has finished (false).
async fn blocked_on_a_lock<T>(pool: &PgPool, task: &tokio::task::JoinHandle<T>) -> bool {
    loop {
        if task.is_finished() {
            return false;
        }
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_retry_recorded_while_the_cancel_commits_is_cancelled() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 2, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let claimed = messages::claim_due(&pool, uid, 0, 1).await.unwrap();
    // A cancel is under way: the campaign is marked and its pending messages cancelled,
    // but not committed yet.
    let mut cancel = pool.begin().await.unwrap();
    sqlx::query("UPDATE campaigns SET cancelled_at = now() WHERE uid = $1")
        .bind(uid)
        .execute(&mut *cancel)
        .await
        .unwrap();
    sqlx::query("UPDATE campaign_messages SET status = 'cancelled' WHERE campaign_uid = $1 AND status = 'pending'")
        .bind(uid)
        .execute(&mut *cancel)
        .await
        .unwrap();
    let recording = {
        let pool = pool.clone();
        let id = claimed[0].id;
        tokio::spawn(async move {
            messages::record_outcomes(
                &pool,
                &[(id, Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() })],
                "test-run",
            )
            .await
        })
    };
    // the recording has started (it waits for a lock) or finished before the commit
    blocked_on_a_lock(&pool, &recording).await;
    cancel.commit().await.unwrap();
    assert_eq!(recording.await.unwrap().unwrap(), 1);
    assert_eq!(status_of(&pool, claimed[0].id).await, "cancelled");
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.pending, 0);
}

#[tokio::test]
async fn recording_outcomes_locks_rows_in_ascending_id_order() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 2, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let claimed = messages::claim_due(&pool, uid, 0, 2).await.unwrap();
    let (low, high) = (claimed[0].id.min(claimed[1].id), claimed[0].id.max(claimed[1].id));
    // another writer holds the higher row
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM campaign_messages WHERE id = $1 FOR UPDATE")
        .bind(high)
        .execute(&mut *other)
        .await
        .unwrap();
    let recording = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let outcomes = [high, low].map(|id| (id, Outcome::Sent { provider_message_id: format!("wamid.{id}") }));
            messages::record_outcomes(&pool, &outcomes, "test-run").await
        })
    };
    assert!(blocked_on_a_lock(&pool, &recording).await);
    // the recording took the lower row first, so that is locked now: a writer that
    // also goes in ascending order waits here instead of deadlocking
    let probe =
        sqlx::query("SELECT id FROM campaign_messages WHERE id = $1 FOR UPDATE NOWAIT").bind(low).execute(&pool).await;
    assert!(probe.is_err(), "the lower row is locked before the higher one");
    other.commit().await.unwrap();
    assert_eq!(recording.await.unwrap().unwrap(), 2);
}

/// `spec.frequencyCap`: contacts other campaigns of the organization already sent the
/// capped number of marketing messages in the period are skipped when the audience is
/// frozen; older messages, other categories and other organizations do not count.
#[tokio::test]
async fn contacts_at_the_marketing_frequency_cap_are_skipped() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 4, |_| (vec![], json!({}))).await;
    let (earlier, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let claimed = messages::claim_due(&pool, earlier, 0, 10).await.unwrap();
    let sent: Vec<(i64, Outcome)> =
        claimed.iter().map(|m| (m.id, Outcome::Sent { provider_message_id: format!("wamid.{}", m.id) })).collect();
    messages::record_outcomes(&pool, &sent, "test-run").await.unwrap();
    // contact 0: a marketing message delivered yesterday; 1: a utility one; 2: a
    // marketing one ten days ago; 3: nothing
    for (i, category, days_ago) in [(0, "marketing", 1), (1, "utility", 1), (2, "marketing", 10)] {
        sqlx::query(
            r#"UPDATE campaign_messages m SET status = 'delivered', pricing_category = $3, pricing_type = 'regular',
                   updated_at = now() - make_interval(days => $4)
               FROM contacts c WHERE c.id = m.contact_id AND m.campaign_uid = $1 AND c.phone = $2"#,
        )
        .bind(earlier)
        .bind(&phones[i])
        .bind(category)
        .bind(days_ago)
        .execute(&pool)
        .await
        .unwrap();
    }
    let uid = Uuid::new_v4();
    let key = CampaignKey { uid, organization: "acme", name: "capped", channel: "ch", batch_size: 10 };
    let cap = audience::FrequencyCap { messages: 1, days: 7 };
    audience::materialize_capped(&pool, &key, &AudienceQuery::AllContacts, Some(cap)).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT c.phone, m.status::text, m.last_error_code FROM campaign_messages m JOIN contacts c ON c.id = m.contact_id WHERE m.campaign_uid = $1 ORDER BY c.phone",
    )
    .bind(uid)
    .fetch_all(&pool)
    .await
    .unwrap();
    let skipped: Vec<&str> = rows.iter().filter(|(_, s, _)| s == "skipped").map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(skipped, vec![phones[0].as_str()], "{rows:?}");
    assert!(rows.iter().all(|(_, s, code)| s == "pending" || code.as_deref() == Some("frequency_cap")));
    let counters = campaigns::counters(&pool, uid).await.unwrap().unwrap();
    assert_eq!((counters.skipped, counters.pending), (1, 3));
}

/// A campaign of `n` contacts whose messages end as `outcome(i)` says (None: left
/// pending); returns its UID, name and the contacts' phones.
async fn campaign_with_outcomes(
    pool: &PgPool,
    org: &str,
    n: usize,
    outcome: impl Fn(usize) -> Option<Outcome>,
) -> (Uuid, String, Vec<String>) {
    let phones = common::seed_contacts(pool, org, n, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(pool, org, &AudienceQuery::AllContacts, 100).await;
    let block = claim(pool, uid, 0, n as i64, "test-run").await;
    let outcomes: Vec<(i64, Outcome)> = block
        .messages
        .iter()
        .filter_map(|m| {
            let i = phones.iter().position(|p| *p == m.phone).unwrap();
            outcome(i).map(|o| (m.id, o))
        })
        .collect();
    // what was claimed and got no outcome stays pending
    blocks::record(pool, block.intent.unwrap(), &outcomes, "test-run").await.unwrap();
    let (name,): (String,) =
        sqlx::query_as("SELECT name FROM campaigns WHERE uid = $1").bind(uid).fetch_one(pool).await.unwrap();
    (uid, name, phones)
}

fn failed(code: &str) -> Option<Outcome> {
    Some(Outcome::Failed { code: code.into(), message: format!("error {code}") })
}

/// `fromCampaign.errorCodes`: the freeze takes the source's messages in the statuses
/// whose last error has one of the codes; no codes, any error.
#[tokio::test]
async fn from_campaign_error_codes_freeze_only_those_failures() {
    let (pool, _) = common::fresh_db().await;
    let (_, source, phones) = campaign_with_outcomes(&pool, "acme", 7, |i| match i {
        0 | 2 => failed("131026"),
        1 => failed("131049"),
        3 => Some(Outcome::Sent { provider_message_id: "wamid.3".into() }),
        4 => Some(Outcome::Unknown { reason: "timed out".into() }),
        5 => failed("render"),
        _ => None,
    })
    .await;
    let from = |statuses: Vec<&'static str>, codes: &[&str]| AudienceQuery::FromCampaign {
        name: source.clone(),
        statuses,
        error_codes: codes.iter().map(|c| (*c).to_owned()).collect(),
    };
    let picked = |ids: &[usize]| ids.iter().map(|i| phones[*i].clone()).collect::<Vec<_>>();

    let (only_131026, frozen) = freeze(&pool, "acme", &from(vec!["failed"], &["131026"]), 100).await;
    assert_eq!(phones_of(&pool, only_131026).await, picked(&[0, 2]));
    assert_eq!(frozen.messages, 2);
    let (two_codes, _) = freeze(&pool, "acme", &from(vec!["failed", "unknown"], &["131026", "unknown"]), 100).await;
    assert_eq!(phones_of(&pool, two_codes).await, picked(&[0, 2, 4]));
    let (any_code, _) = freeze(&pool, "acme", &from(vec!["failed"], &[]), 100).await;
    assert_eq!(phones_of(&pool, any_code).await, picked(&[0, 1, 2, 5]));
    // a code the statuses do not have selects nothing
    let (none, frozen) = freeze(&pool, "acme", &from(vec!["sent"], &["131026"]), 100).await;
    assert!(phones_of(&pool, none).await.is_empty());
    assert_eq!(frozen.messages, 0);
}

async fn export_all(pool: &PgPool, org: &str, uid: Uuid, filter: &ExportFilter, page: i64) -> Vec<ExportRow> {
    let mut rows = Vec::new();
    let mut after = i64::MIN;
    loop {
        let got = export::page(pool, org, uid, filter, after, page).await.unwrap();
        let last = got.len() < page as usize;
        if let Some(row) = got.last() {
            after = row.contact_id;
        }
        rows.extend(got);
        if last {
            return rows;
        }
    }
}

/// The export's pages: every message once, in contact order, through any page size;
/// the status and error code filters; the instants from the history; pricing; and
/// nothing of another organization or campaign.
#[tokio::test]
async fn export_pages_every_message_once_with_its_filters_and_history() {
    let (pool, _) = common::fresh_db().await;
    let (uid, _, phones) = campaign_with_outcomes(&pool, "acme", 9, |i| match i {
        0..=2 => Some(Outcome::Sent { provider_message_id: format!("wamid.{i}") }),
        3 | 4 => failed("131026"),
        5 => failed("131049"),
        6 => Some(Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "try later".into() }),
        7 => Some(Outcome::Unknown { reason: "timed out".into() }),
        _ => None,
    })
    .await;
    // another organization's campaign over the same numbers, and another of acme's
    let (other_org, _, _) = campaign_with_outcomes(&pool, "globex", 9, |_| failed("131026")).await;
    let (other, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 100).await;
    // receipts: 0 delivered then read (marketing, charged), 1 delivered (service, free)
    for (i, statuses, category, pricing) in [
        (0, &["delivered", "read"][..], "marketing", "regular"),
        (1, &["delivered"][..], "service", "free_customer_service"),
    ] {
        for (n, status) in statuses.iter().enumerate() {
            sqlx::query(
                r#"UPDATE campaign_messages m SET status = $3::message_status, pricing_category = $4, pricing_type = $5,
                       status_history = m.status_history || jsonb_build_array(jsonb_build_object(
                           'status', $3::text, 'at', '2025-06-18T16:23:0' || $6::text || 'Z', 'source', 'webhook'))
                   FROM contacts c WHERE c.id = m.contact_id AND m.campaign_uid = $1 AND c.phone = $2"#,
            )
            .bind(uid)
            .bind(&phones[i])
            .bind(*status)
            .bind(category)
            .bind(pricing)
            .bind(n.to_string())
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    sqlx::query("UPDATE contacts SET name = NULL WHERE organization = 'acme' AND phone = $1")
        .bind(&phones[8])
        .execute(&pool)
        .await
        .unwrap();

    let everything = ExportFilter::default();
    let all = export_all(&pool, "acme", uid, &everything, 2).await;
    assert_eq!(all.iter().map(|r| r.phone.clone()).collect::<Vec<_>>(), phones, "each message once, by contact");
    assert_eq!(export_all(&pool, "acme", uid, &everything, 1000).await, all, "any page size");
    assert_eq!(export::count(&pool, "acme", uid, &everything).await.unwrap(), 9);
    let status: Vec<&str> = all.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(
        status,
        ["read", "delivered", "sent", "failed", "failed", "failed", "pending", "unknown", "pending"],
        "{all:#?}"
    );

    let read = &all[0];
    assert_eq!(read.provider_message_id.as_deref(), Some("wamid.0"));
    assert_eq!(read.attempts, 1);
    assert_eq!((read.pricing_category.as_deref(), read.pricing_type.as_deref()), (Some("marketing"), Some("regular")));
    assert_eq!(read.delivered_at.unwrap().to_rfc3339(), "2025-06-18T16:23:00+00:00");
    assert_eq!(read.read_at.unwrap().to_rfc3339(), "2025-06-18T16:23:01+00:00");
    assert!(read.sent_at.is_some_and(|at| at >= read.created_at) && read.failed_at.is_none());
    assert_eq!(read.name.as_deref(), Some("Contact 0"));
    let failure = &all[3];
    assert_eq!(
        (failure.error_code.as_deref(), failure.error_message.as_deref()),
        (Some("131026"), Some("error 131026"))
    );
    assert!(failure.failed_at.is_some() && failure.sent_at.is_none() && failure.provider_message_id.is_none());
    assert_eq!(all[6].error_code.as_deref(), Some("131000"), "a retry keeps its last error");
    assert_eq!(all[7].error_code.as_deref(), Some("unknown"));
    assert_eq!((all[8].name.as_deref(), all[8].attempts, all[8].sent_at), (None, 0, None));

    let filter = |statuses: &[MessageStatus], codes: &[&str]| ExportFilter {
        statuses: statuses.to_vec(),
        error_codes: codes.iter().map(|c| (*c).to_owned()).collect(),
    };
    let phones_for = |f: ExportFilter| {
        let pool = pool.clone();
        async move {
            let rows = export_all(&pool, "acme", uid, &f, 2).await;
            assert_eq!(export::count(&pool, "acme", uid, &f).await.unwrap(), rows.len() as i64);
            rows.into_iter().map(|r| r.phone).collect::<Vec<_>>()
        }
    };
    let picked = |ids: &[usize]| ids.iter().map(|i| phones[*i].clone()).collect::<Vec<_>>();
    assert_eq!(phones_for(filter(&[MessageStatus::Failed], &[])).await, picked(&[3, 4, 5]));
    assert_eq!(phones_for(filter(&[MessageStatus::Failed], &["131026"])).await, picked(&[3, 4]));
    assert_eq!(phones_for(filter(&[], &["131049", "131000"])).await, picked(&[5, 6]));
    assert_eq!(phones_for(filter(&[MessageStatus::Failed, MessageStatus::Unknown], &[])).await, picked(&[3, 4, 5, 7]));
    assert_eq!(phones_for(filter(&[MessageStatus::Pending], &[])).await, picked(&[6, 8]));
    assert!(phones_for(filter(&[MessageStatus::Skipped], &[])).await.is_empty());
    assert!(phones_for(filter(&[MessageStatus::Delivered], &["131026"])).await.is_empty());

    // other organizations and campaigns stay out
    assert!(export_all(&pool, "acme", other_org, &everything, 100).await.is_empty());
    assert!(export_all(&pool, "globex", uid, &everything, 100).await.is_empty());
    assert_eq!(export_all(&pool, "globex", other_org, &everything, 100).await.len(), 9);
    assert!(export_all(&pool, "acme", other, &everything, 100).await.iter().all(|r| r.status == "pending"));
    assert!(export::is_frozen(&pool, "acme", uid).await.unwrap());
    assert!(!export::is_frozen(&pool, "globex", uid).await.unwrap(), "another organization's campaign");
    assert!(!export::is_frozen(&pool, "acme", Uuid::new_v4()).await.unwrap(), "never frozen");
}

async fn intents_of(pool: &PgPool, campaign: Uuid) -> i64 {
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM send_intents WHERE campaign_uid = $1")
        .bind(campaign)
        .fetch_one(pool)
        .await
        .unwrap();
    count
}

async fn claim(pool: &PgPool, campaign: Uuid, batch: i32, limit: i64, run: &str) -> blocks::Block {
    blocks::claim(pool, campaign, batch, limit, run, Uuid::new_v4()).await.unwrap()
}

fn all_sent(ids: &[i64]) -> Vec<(i64, Outcome)> {
    ids.iter().map(|id| (*id, Outcome::Sent { provider_message_id: format!("wamid.{id}") })).collect()
}

/// The sender's block: its messages go from `pending` straight to their outcome, with
/// one history entry and the attempt spent; the intent names them until then.
#[tokio::test]
async fn a_block_writes_each_outcome_once() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 6, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let block = claim(&pool, uid, 0, 4, "run-a").await;
    assert_eq!(block.messages.len(), 4);
    assert!(block.messages.iter().all(|m| m.attempts == 1), "the attempt about to be made");
    assert_eq!(intents_of(&pool, uid).await, 1, "the intent is committed with the claim");
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.pending, 6, "nothing else was written");
    let other = claim(&pool, uid, 0, 10, "run-b").await;
    assert_eq!(other.messages.len(), 2, "a block's messages are not claimed twice");
    blocks::record(&pool, other.intent.unwrap(), &[], "run-b").await.unwrap();
    let ids: Vec<i64> = block.messages.iter().map(|m| m.id).collect();
    let outcomes = vec![
        (ids[0], Outcome::Sent { provider_message_id: "wamid.0".into() }),
        (ids[1], Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() }),
        (ids[2], Outcome::Failed { code: "131026".into(), message: "undeliverable".into() }),
        (ids[3], Outcome::Requeue { at: Utc::now() }),
    ];
    let intent = block.intent.unwrap();
    assert_eq!(blocks::record(&pool, intent, &outcomes, "run-a").await.unwrap(), 4);
    assert_eq!(blocks::record(&pool, intent, &outcomes, "run-a").await.unwrap(), 0, "recording again writes nothing");
    assert_eq!(intents_of(&pool, uid).await, 0);
    let rows: Vec<(String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT status::text, attempts, status_history FROM campaign_messages WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    let got: Vec<(&str, i32, usize)> =
        rows.iter().map(|(s, a, h)| (s.as_str(), *a, h.as_array().unwrap().len())).collect();
    assert_eq!(got, vec![("sent", 1, 1), ("pending", 1, 1), ("failed", 1, 1), ("pending", 0, 1)]);
    assert_eq!(rows[0].2[0]["run"], "run-a");
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.succeeded_first_attempt, counters.retries_scheduled), (1, 1));
    let mut errors = campaigns::error_breakdown(&pool, uid, 10).await.unwrap();
    errors.sort();
    assert_eq!(errors, vec![("131000".to_owned(), 1), ("131026".to_owned(), 1)]);
}

/// A sender that dies mid-block leaves its intent: the block's messages are never
/// claimed again, and the next run of the batch makes them `unknown`.
#[tokio::test]
async fn a_block_left_by_a_dead_sender_becomes_unknown_and_is_never_sent_again() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 5, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let dead = claim(&pool, uid, 0, 3, "dead-run").await;
    let ids: Vec<i64> = dead.messages.iter().map(|m| m.id).collect();
    let again = claim(&pool, uid, 0, 10, "dead-run").await;
    assert_eq!(again.messages.len(), 2, "messages named by an intent are not claimed");
    blocks::record(&pool, again.intent.unwrap(), &[], "dead-run").await.unwrap();
    assert_eq!(blocks::recover(&pool, uid, 0, "next-run").await.unwrap(), 3);
    for id in &ids {
        assert_eq!(status_of(&pool, *id).await, "unknown", "it may have been sent: never re-sent");
    }
    assert_eq!(intents_of(&pool, uid).await, 0);
    assert_eq!(blocks::recover(&pool, uid, 0, "next-run").await.unwrap(), 0, "recovering twice changes nothing");
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.unknown, counters.pending), (3, 2));
    // a run's own intents are its blocks in flight
    let mine = claim(&pool, uid, 0, 1, "live-run").await;
    assert_eq!(blocks::recover(&pool, uid, 0, "live-run").await.unwrap(), 0);
    let id = mine.messages[0].id;
    blocks::record(&pool, mine.intent.unwrap(), &all_sent(&[id]), "live-run").await.unwrap();
    assert_eq!(status_of(&pool, id).await, "sent");
}

/// A claim whose commit answer was lost may have left its intent: forgetting it lets
/// its messages be claimed again (no call was made).
#[tokio::test]
async fn a_forgotten_claim_gives_its_messages_back() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 3, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let intent = Uuid::new_v4();
    let lost = blocks::claim(&pool, uid, 0, 3, "run", intent).await.unwrap();
    assert_eq!(lost.messages.len(), 3);
    assert!(claim(&pool, uid, 0, 3, "run").await.messages.is_empty());
    assert_eq!(blocks::forget(&pool, intent).await.unwrap(), 1);
    let again = claim(&pool, uid, 0, 3, "run").await;
    assert_eq!(again.messages.len(), 3);
    let ids: Vec<i64> = again.messages.iter().map(|m| m.id).collect();
    blocks::record(&pool, again.intent.unwrap(), &all_sent(&ids), "run").await.unwrap();
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.sent, 3);
}

/// A cancel while a block is being sent leaves the block to its sender: its sends
/// finish, its retries and requeues end `cancelled`; opted-out contacts are skipped.
#[tokio::test]
async fn a_cancel_during_a_block_cancels_its_retries() {
    let (pool, _) = common::fresh_db().await;
    let phones = common::seed_contacts(&pool, "acme", 6, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    disparo::store::contacts::opt_out(&pool, "acme", &phones[0]).await.unwrap();
    let block = claim(&pool, uid, 0, 4, "run").await;
    assert_eq!((block.messages.len(), block.skipped), (3, 1), "the opted-out contact is not sent to");
    let ids: Vec<i64> = block.messages.iter().map(|m| m.id).collect();
    assert_eq!(messages::cancel_pending(&pool, uid).await.unwrap(), 2, "only what no block holds");
    let outcomes = vec![
        (ids[0], Outcome::Sent { provider_message_id: "wamid.in-flight".into() }),
        (ids[1], Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() }),
        (ids[2], Outcome::Requeue { at: Utc::now() }),
    ];
    assert_eq!(blocks::record(&pool, block.intent.unwrap(), &outcomes, "run").await.unwrap(), 3);
    let got: Vec<String> = futures::future::join_all(ids.iter().map(|id| status_of(&pool, *id))).await;
    assert_eq!(got, vec!["sent", "cancelled", "cancelled"]);
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.sent, counters.cancelled, counters.skipped, counters.pending), (1, 4, 1, 0));
    assert!(claim(&pool, uid, 0, 10, "run").await.messages.is_empty());
}

/// A cancel that commits while a block records its retries: the retries end
/// `cancelled`, whichever waits for the other.
#[tokio::test]
async fn a_block_recorded_while_the_cancel_commits_cancels_its_retries() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 3, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let block = claim(&pool, uid, 0, 1, "run").await;
    let id = block.messages[0].id;
    let cancel = {
        let pool = pool.clone();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE campaigns SET cancelled_at = now() WHERE uid = $1")
            .bind(uid)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    };
    let recording = {
        let pool = pool.clone();
        let intent = block.intent.unwrap();
        tokio::spawn(async move {
            let retry = Outcome::RetryAt { at: Utc::now(), code: "131000".into(), message: "boom".into() };
            blocks::record(&pool, intent, &[(id, retry)], "run").await
        })
    };
    assert!(blocked_on_a_lock(&pool, &recording).await, "the record waits for the cancel's campaign row");
    cancel.commit().await.unwrap();
    assert_eq!(recording.await.unwrap().unwrap(), 1);
    assert_eq!(status_of(&pool, id).await, "cancelled");
    messages::cancel_pending(&pool, uid).await.unwrap();
    let counters = assert_counters_equal_recount(&pool, uid).await;
    assert_eq!((counters.cancelled, counters.pending), (3, 0));
}

/// Parallel blocks never share a message.
#[tokio::test]
async fn parallel_blocks_never_overlap() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 300, |_| (vec![], json!({}))).await;
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 300).await;
    let tasks: Vec<_> = (0..6)
        .map(|lane| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let run = format!("lane-{lane}");
                loop {
                    let block = claim(&pool, uid, 0, 7, &run).await;
                    let Some(intent) = block.intent else { break };
                    let ids: Vec<i64> = block.messages.iter().map(|m| m.id).collect();
                    blocks::record(&pool, intent, &all_sent(&ids), &run).await.unwrap();
                    mine.extend(ids);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (300, 300));
    assert_eq!(assert_counters_equal_recount(&pool, uid).await.sent, 300);
}

#[tokio::test]
async fn deleting_a_campaign_drops_its_partition_and_leaves_the_others() {
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 5, |_| (vec![], json!({}))).await;
    let (kept, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let (gone, frozen) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let partition = format!("campaign_messages_{}", gone.simple());
    let exists = |name: String| {
        let pool = pool.clone();
        async move {
            let (found,): (bool,) =
                sqlx::query_as("SELECT to_regclass($1) IS NOT NULL").bind(name).fetch_one(&pool).await.unwrap();
            found
        }
    };
    assert!(exists(partition.clone()).await, "the freeze created the campaign's partition");
    assert_eq!(campaigns::delete(&pool, gone).await.unwrap(), frozen.messages as u64);
    assert!(!exists(partition).await, "the partition is dropped, not emptied row by row");
    assert!(phones_of(&pool, gone).await.is_empty());
    assert_eq!(phones_of(&pool, kept).await.len(), 5, "another campaign's messages stay");
    assert!(campaigns::counters(&pool, gone).await.unwrap().is_none());
    // deleting again finds nothing and fails nothing
    assert_eq!(campaigns::delete(&pool, gone).await.unwrap(), 0);
}

/// A status event for `tests/store.rs`: `delivered`/`read` of `pid` on channel `ch`.
fn receipt(
    provider: disparo::store::receipts::Provider,
    pid: &str,
    message_id: Option<i64>,
    campaign: Option<Uuid>,
    status: disparo::store::receipts::ReceiptStatus,
) -> disparo::store::receipts::StatusEvent {
    disparo::store::receipts::StatusEvent {
        provider,
        organization: "acme".into(),
        channel: "ch".into(),
        provider_message_id: pid.into(),
        message_id,
        campaign,
        status,
        at: Utc::now(),
        error: None,
        recipient: None,
        opts_out: false,
        recipient_bsuid: None,
        pricing: None,
    }
}

/// Receipts are looked up in named partitions (docs/architecture.md, "Partitions"): one
/// that names its campaign (Meta's current callback data) finds its message there, at
/// any age, and nowhere else; one that names none (Evolution, Meta's older format)
/// finds it among the channel's campaigns that may still take receipts; both whatever
/// other campaigns' partitions hold, including messages of the same provider ids.
#[tokio::test]
async fn a_receipt_finds_its_message_in_its_campaigns_partition_among_others() {
    use disparo::store::receipts::{self, ApplyOutcome, Provider, ReceiptStatus};
    let (pool, _) = common::fresh_db().await;
    common::seed_contacts(&pool, "acme", 6, |_| (vec![], json!({}))).await;
    // other campaigns, of this channel and of another, each with sent messages
    let mut others = Vec::new();
    for channel in ["ch", "ch", "other", "ch"] {
        let uid = Uuid::new_v4();
        let key = CampaignKey { uid, organization: "acme", name: &format!("o-{uid}"), channel, batch_size: 10 };
        audience::materialize(&pool, &key, &AudienceQuery::AllContacts).await.unwrap();
        let claimed = messages::claim_due(&pool, uid, 0, 10).await.unwrap();
        let sent: Vec<(i64, Outcome)> = claimed
            .iter()
            .map(|m| (m.id, Outcome::Sent { provider_message_id: format!("wamid.other.{}", m.id) }))
            .collect();
        messages::record_campaign_outcomes(&pool, uid, &sent, "test-run").await.unwrap();
        others.push(uid);
    }
    let (uid, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let ids: Vec<i64> = messages::claim_due(&pool, uid, 0, 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 6);
    let pid = |id: i64| format!("wamid.{id}");
    // 0, 1, 4: sent with their provider ids; 2, 3: unknown, no id; 5: still sending
    let outcomes: Vec<(i64, Outcome)> = ids[..5]
        .iter()
        .enumerate()
        .map(|(i, id)| match i {
            2 | 3 => (*id, Outcome::Unknown { reason: "timed out".into() }),
            _ => (*id, Outcome::Sent { provider_message_id: pid(*id) }),
        })
        .collect();
    messages::record_campaign_outcomes(&pool, uid, &outcomes, "test-run").await.unwrap();
    // a campaign of this channel that another partition holds a message of the same provider id
    let (copycat, _) = freeze(&pool, "acme", &AudienceQuery::AllContacts, 10).await;
    let copied = messages::claim_due(&pool, copycat, 0, 1).await.unwrap()[0].id;
    let sent = [(copied, Outcome::Sent { provider_message_id: pid(ids[4]) })];
    messages::record_campaign_outcomes(&pool, copycat, &sent, "test-run").await.unwrap();

    let delivered = ReceiptStatus::Delivered;
    let events = vec![
        // named (Meta): by provider id, and by our id for an unknown message
        receipt(Provider::Meta, &pid(ids[0]), Some(ids[0]), Some(uid), delivered),
        receipt(Provider::Meta, "wamid.late.3", Some(ids[3]), Some(uid), delivered),
        // not named (Evolution by provider id; Meta's older format by our id)
        receipt(Provider::Evolution, &pid(ids[1]), None, None, delivered),
        receipt(Provider::Meta, "wamid.late.2", Some(ids[2]), None, delivered),
        // named, but another campaign: not looked up in this one
        receipt(Provider::Meta, &pid(ids[4]), Some(ids[4]), Some(others[0]), delivered),
    ];
    let report = receipts::apply(&pool, &events, &[]).await.unwrap();
    use ApplyOutcome::{Applied, UnknownId};
    assert_eq!(report.outcomes, vec![Applied, Applied, Applied, Applied, UnknownId]);
    for (i, id) in ids[..4].iter().enumerate() {
        assert_eq!(status_of(&pool, *id).await, "delivered", "message {i}");
    }
    assert_eq!(status_of(&pool, ids[4]).await, "sent", "named another campaign: kept, not applied");
    // named in its campaign, it is found there (not in the copycat's partition)
    let named = receipt(Provider::Meta, &pid(ids[4]), Some(ids[4]), Some(uid), delivered);
    assert_eq!(receipts::apply(&pool, &[named], &[]).await.unwrap().outcomes, vec![Applied]);
    assert_eq!(status_of(&pool, ids[4]).await, "delivered");

    // a receipt naming its campaign, ahead of the sender's record, is kept with its
    // campaign and swept once the message has its provider id
    let early = receipt(Provider::Meta, &pid(ids[5]), None, Some(uid), delivered);
    assert_eq!(receipts::apply(&pool, &[early], &[]).await.unwrap().outcomes, vec![UnknownId]);
    let sent = [(ids[5], Outcome::Sent { provider_message_id: pid(ids[5]) })];
    messages::record_campaign_outcomes(&pool, uid, &sent, "test-run").await.unwrap();
    let swept = receipts::sweep_unmatched(&pool, receipts::UNMATCHED_RECEIPT_TTL).await.unwrap();
    assert_eq!(swept.applied, 1);
    assert_eq!(status_of(&pool, ids[5]).await, "delivered");

    // a day after its last change, with nothing left to send or resolve, the campaign
    // takes receipts only when they name it
    sqlx::query("UPDATE campaign_counters SET updated_at = now() - interval '25 hours' WHERE campaign_uid = $1")
        .bind(uid)
        .execute(&pool)
        .await
        .unwrap();
    let read = ReceiptStatus::Read;
    let events = vec![
        receipt(Provider::Evolution, &pid(ids[0]), None, None, read),
        receipt(Provider::Meta, &pid(ids[1]), Some(ids[1]), Some(uid), read),
    ];
    assert_eq!(receipts::apply(&pool, &events, &[]).await.unwrap().outcomes, vec![UnknownId, Applied]);
    assert_eq!(status_of(&pool, ids[0]).await, "delivered", "kept: the campaign is past the horizon");
    assert_eq!(status_of(&pool, ids[1]).await, "read");
    assert_counters_equal_recount(&pool, uid).await;
}
