//! Recipient-level results of one campaign (`kubectl disparo export`): every message
//! with its contact, status, attempts, last error, provider id, the instants its history
//! records, and what Meta said about its pricing.
//!
//! Read in pages by keyset on `contact_id`, never in one statement: each page is one
//! short query, so an export of millions of rows holds no snapshot open for minutes
//! (which would keep vacuum from the rows the senders and the webhook rewrite all the
//! time) and runs the same through a transaction-pooling proxy, where a cursor or a
//! long-lived portal would not. The key is the contact, not the message id, because the
//! `(campaign_uid, contact_id)` unique index already serves `WHERE campaign_uid = $1 AND
//! contact_id > $2 ORDER BY contact_id LIMIT n` directly, and an index on
//! `(campaign_uid, id)` would cost every status update of the send path one more index
//! entry. Contacts are immutable in a message and unique per campaign, so every message
//! appears exactly once; pages are not one snapshot, so a message whose status changes
//! during the export shows the status its page read.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use super::receipts::MessageStatus;

/// Rows per page: large enough that the round trips do not dominate, small enough that
/// a page (a few MB at most) is all the memory an export needs.
pub const PAGE_SIZE: i64 = 5_000;

/// Which messages to export. Empty lists select everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Messages in one of these statuses.
    pub statuses: Vec<MessageStatus>,
    /// Messages whose last error code is one of these.
    pub error_codes: Vec<String>,
}

impl ExportFilter {
    fn status_labels(&self) -> Vec<&'static str> {
        self.statuses.iter().map(|s| s.as_str()).collect()
    }
}

/// One message of a campaign, as exported.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExportRow {
    /// Our message id (Meta echoes it as `biz_opaque_callback_data`).
    pub message_id: i64,
    /// The contact's id.
    pub contact_id: i64,
    /// The contact's number, E.164.
    pub phone: String,
    /// The contact's name, if any.
    pub name: Option<String>,
    /// The message's status (the schema's label).
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last error's code (a provider code, or Disparo's own such as `render`).
    pub error_code: Option<String>,
    /// The last error's text.
    pub error_message: Option<String>,
    /// The provider's id of the current attempt.
    pub provider_message_id: Option<String>,
    /// When the audience was frozen with this message.
    pub created_at: DateTime<Utc>,
    /// The last change.
    pub updated_at: DateTime<Utc>,
    /// The instant of the last `sent` entry of the message's history.
    pub sent_at: Option<DateTime<Utc>>,
    /// ... `delivered`.
    pub delivered_at: Option<DateTime<Utc>>,
    /// ... `read`.
    pub read_at: Option<DateTime<Utc>>,
    /// ... `failed` (a failure reported after delivery is noted, not applied).
    pub failed_at: Option<DateTime<Utc>>,
    /// Meta's pricing category (`marketing`, `utility`, ...), from its receipts.
    pub pricing_category: Option<String>,
    /// Meta's pricing type (`regular` is charged; `free_customer_service`, ... are not).
    pub pricing_type: Option<String>,
    /// Times Meta's per-user marketing limit (131049) put it back.
    pub marketing_requeues: i16,
}

/// Whether the campaign (by its UID, in the organization) has frozen its audience: only
/// then does it have messages. False too when it never reached the store.
pub async fn is_frozen(pool: &PgPool, organization: &str, campaign: Uuid) -> Result<bool> {
    let row: Option<(bool,)> =
        sqlx::query_as("SELECT audience_frozen_at IS NOT NULL FROM campaigns WHERE uid = $1 AND organization = $2")
            .bind(campaign)
            .bind(organization)
            .fetch_optional(pool)
            .await?;
    Ok(row.is_some_and(|(frozen,)| frozen))
}

/// How many messages of the campaign the filter selects (one scan, for a progress bar).
pub async fn count(pool: &PgPool, organization: &str, campaign: Uuid, filter: &ExportFilter) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        r#"SELECT count(*) FROM campaign_messages m
           WHERE m.campaign_uid = $1 AND m.organization = $2
             AND (cardinality($3::text[]) = 0 OR m.status = ANY($3::text[]::message_status[]))
             AND (cardinality($4::text[]) = 0 OR m.last_error_code = ANY($4::text[]))"#,
    )
    .bind(campaign)
    .bind(organization)
    .bind(filter.status_labels())
    .bind(&filter.error_codes)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// The next page: up to `limit` messages the filter selects whose contact id is above
/// `after_contact` (`i64::MIN` for the first page), in contact id order. The page after
/// it starts at the last row's `contact_id`; a page shorter than `limit` is the last.
///
/// The instants are the `at` of the last history entry of each status (entries are
/// appended as they happen; a requeued message's last `sent` is its current attempt's),
/// found by a JSON path: expanding each history into rows and aggregating them cost
/// Postgres seven times as much (300 ms a page of 5,000 against 44).
///
/// `c.id > $3` repeats `m.contact_id > $3` for the planner: without it, the merge join
/// with `contacts` read that table's primary key from its first row on every page, so
/// a page cost grew with its position (170 ms at the middle of a million, against 12).
pub async fn page(
    pool: &PgPool,
    organization: &str,
    campaign: Uuid,
    filter: &ExportFilter,
    after_contact: i64,
    limit: i64,
) -> Result<Vec<ExportRow>> {
    Ok(sqlx::query_as(
        r#"
        SELECT m.id AS message_id, m.contact_id, c.phone, c.name, m.status::text AS status, m.attempts,
               m.last_error_code AS error_code, m.last_error_message AS error_message, m.provider_message_id,
               m.created_at, m.updated_at,
               (jsonb_path_query_array(m.status_history, '$[*] ? (@.status == "sent").at') ->> -1)::timestamptz AS sent_at,
               (jsonb_path_query_array(m.status_history, '$[*] ? (@.status == "delivered").at') ->> -1)::timestamptz
                   AS delivered_at,
               (jsonb_path_query_array(m.status_history, '$[*] ? (@.status == "read").at') ->> -1)::timestamptz AS read_at,
               (jsonb_path_query_array(m.status_history, '$[*] ? (@.status == "failed").at') ->> -1)::timestamptz AS failed_at,
               m.pricing_category, m.pricing_type, m.marketing_requeues
        FROM campaign_messages m
        JOIN contacts c ON c.id = m.contact_id
        WHERE m.campaign_uid = $1 AND m.organization = $2 AND m.contact_id > $3 AND c.id > $3
          AND (cardinality($4::text[]) = 0 OR m.status = ANY($4::text[]::message_status[]))
          AND (cardinality($5::text[]) = 0 OR m.last_error_code = ANY($5::text[]))
        ORDER BY m.contact_id
        LIMIT $6
        "#,
    )
    .bind(campaign)
    .bind(organization)
    .bind(after_contact)
    .bind(filter.status_labels())
    .bind(&filter.error_codes)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
