//! Contacts of an organization (a Kubernetes namespace): upserts in batches and opt-outs.

use serde_json::Value;
use sqlx::PgPool;

use super::Result;

/// A contact to insert or update, already validated (phone in E.164).
#[derive(Debug, Clone, PartialEq)]
pub struct NewContact {
    /// E.164 phone number, e.g. `+5511999999999`.
    pub phone: String,
    /// Display name.
    pub name: Option<String>,
    /// Tags (replace the stored ones).
    pub tags: Vec<String>,
    /// Attributes (merged over the stored ones; a JSON object, anything else counts as none).
    pub attributes: Value,
    /// WhatsApp id if known.
    pub whatsapp_id: Option<String>,
}

/// What one upsert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpsertReport {
    /// Rows that did not exist.
    pub inserted: u64,
    /// Rows that existed and were updated.
    pub updated: u64,
}

/// A contact as an import states it: what is `None` (or, for attributes, absent) was
/// not in the file and leaves the stored value alone, so re-importing a file without a
/// `tags` column keeps everyone's tags.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContactUpdate {
    /// E.164 phone number, the key.
    pub phone: String,
    /// Display name, when given.
    pub name: Option<String>,
    /// Tags, when given: they replace the stored ones (an empty list clears them).
    pub tags: Option<Vec<String>>,
    /// Attributes merged over the stored ones, key by key.
    pub attributes: serde_json::Map<String, Value>,
    /// WhatsApp id, when given.
    pub whatsapp_id: Option<String>,
}

impl ContactUpdate {
    /// Folds a later row for the same phone into this one: what the later row gives
    /// wins, what it leaves out stays as the earlier row gave it (the same result as
    /// applying the two rows one after the other).
    pub fn merge(&mut self, later: ContactUpdate) {
        if later.name.is_some() {
            self.name = later.name;
        }
        if later.tags.is_some() {
            self.tags = later.tags;
        }
        if later.whatsapp_id.is_some() {
            self.whatsapp_id = later.whatsapp_id;
        }
        self.attributes.extend(later.attributes);
    }
}

impl From<&NewContact> for ContactUpdate {
    fn from(contact: &NewContact) -> Self {
        ContactUpdate {
            phone: contact.phone.clone(),
            name: contact.name.clone(),
            tags: Some(contact.tags.clone()),
            attributes: contact.attributes.as_object().cloned().unwrap_or_default(),
            whatsapp_id: contact.whatsapp_id.clone(),
        }
    }
}

/// Inserts or updates `contacts` of `organization`: tags replace the stored ones, a
/// missing name or WhatsApp id keeps the stored one, attributes merge. Opt-outs are
/// kept: importing a list never re-subscribes someone who said STOP.
pub async fn upsert(pool: &PgPool, organization: &str, contacts: &[NewContact]) -> Result<UpsertReport> {
    let updates: Vec<ContactUpdate> = contacts.iter().map(ContactUpdate::from).collect();
    upsert_given(pool, organization, &updates).await
}

/// Rounds of [`upsert_given`] before giving up on rows that concurrent writers keep
/// inserting and deleting under it.
const UPSERT_ROUNDS: usize = 5;

/// Inserts or updates contacts of `organization`, changing only what each update gives
/// (see [`ContactUpdate`]). Phones must be unique within `contacts`.
///
/// `INSERT ... ON CONFLICT DO UPDATE` cannot tell "no tags given" from "no tags" (its
/// proposed row must satisfy `tags NOT NULL`), so one statement inserts the new phones
/// (`ON CONFLICT DO NOTHING`) and updates those that existed when it started, with the
/// given-or-not of every field at hand. A phone that another transaction inserts
/// meanwhile is neither: it is retried in a fresh statement, which then updates it.
pub(crate) async fn upsert_given(
    pool: &PgPool,
    organization: &str,
    contacts: &[ContactUpdate],
) -> Result<UpsertReport> {
    let mut report = UpsertReport::default();
    let mut todo: Vec<&ContactUpdate> = contacts.iter().collect();
    for _ in 0..UPSERT_ROUNDS {
        if todo.is_empty() {
            return Ok(report);
        }
        let done = upsert_round(pool, organization, &todo).await?;
        report.inserted += done.iter().filter(|(_, inserted)| *inserted).count() as u64;
        report.updated += done.iter().filter(|(_, inserted)| !*inserted).count() as u64;
        let done: std::collections::HashSet<&str> = done.iter().map(|(phone, _)| phone.as_str()).collect();
        todo.retain(|c| !done.contains(c.phone.as_str()));
    }
    if todo.is_empty() {
        return Ok(report);
    }
    Err(super::Error::Invalid(format!(
        "{} contact(s) kept changing under concurrent writers; import them again",
        todo.len()
    )))
}

/// One statement of [`upsert_given`]: the phones it inserted (`true`) or updated.
async fn upsert_round(pool: &PgPool, organization: &str, contacts: &[&ContactUpdate]) -> Result<Vec<(String, bool)>> {
    let phones: Vec<&str> = contacts.iter().map(|c| c.phone.as_str()).collect();
    let names: Vec<Option<&str>> = contacts.iter().map(|c| c.name.as_deref()).collect();
    // Postgres has no arrays of arrays of different lengths: tags travel as JSON, NULL
    // when not given.
    let tags: Vec<Option<Value>> = contacts.iter().map(|c| c.tags.clone().map(Value::from)).collect();
    let attributes: Vec<Value> = contacts.iter().map(|c| Value::Object(c.attributes.clone())).collect();
    let wa_ids: Vec<Option<&str>> = contacts.iter().map(|c| c.whatsapp_id.as_deref()).collect();
    let rows: Vec<(String, bool)> = sqlx::query_as(
        r#"
        WITH v AS (
            SELECT * FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::text[])
                AS v(phone, name, tags, attributes, wa_id)
        ), inserted AS (
            INSERT INTO contacts (organization, phone, name, tags, attributes, whatsapp_id)
            SELECT $1, v.phone, v.name, ARRAY(SELECT jsonb_array_elements_text(coalesce(v.tags, '[]'))), v.attributes, v.wa_id
            FROM v
            ON CONFLICT (organization, phone) DO NOTHING
            RETURNING phone
        ), updated AS (
            -- rows inserted above are invisible here: this updates what existed before
            UPDATE contacts c SET
                name = coalesce(v.name, c.name),
                tags = CASE WHEN v.tags IS NULL THEN c.tags ELSE ARRAY(SELECT jsonb_array_elements_text(v.tags)) END,
                attributes = c.attributes || v.attributes,
                whatsapp_id = coalesce(v.wa_id, c.whatsapp_id),
                updated_at = now()
            FROM v
            WHERE c.organization = $1 AND c.phone = v.phone
            RETURNING c.phone
        )
        SELECT phone, TRUE FROM inserted
        UNION ALL
        SELECT phone, FALSE FROM updated
        "#,
    )
    .bind(organization)
    .bind(&phones)
    .bind(&names)
    .bind(&tags)
    .bind(&attributes)
    .bind(&wa_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Marks the contact with this phone number or WhatsApp id (digits, as providers send
/// them) as opted out. Returns whether a contact matched.
pub async fn opt_out(pool: &PgPool, organization: &str, phone_or_wa_id: &str) -> Result<bool> {
    let digits: String = phone_or_wa_id.chars().filter(|c| c.is_ascii_digit()).collect();
    let e164 = format!("+{digits}");
    let result = sqlx::query(
        r#"
        UPDATE contacts SET opted_out = TRUE, opted_out_at = coalesce(opted_out_at, now()), updated_at = now()
        WHERE organization = $1 AND (phone = $2 OR whatsapp_id = $3)
        "#,
    )
    .bind(organization)
    .bind(&e164)
    .bind(&digits)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() > 0)
}

/// Number of contacts of an organization.
pub async fn count(pool: &PgPool, organization: &str) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM contacts WHERE organization = $1")
        .bind(organization)
        .fetch_one(pool)
        .await?;
    Ok(n)
}
