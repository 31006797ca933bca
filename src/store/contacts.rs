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
    /// Attributes (merged over the stored ones).
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

/// Inserts or updates `contacts` of `organization` in one statement. Opt-outs are kept:
/// importing a list never re-subscribes someone who said STOP.
pub async fn upsert(pool: &PgPool, organization: &str, contacts: &[NewContact]) -> Result<UpsertReport> {
    if contacts.is_empty() {
        return Ok(UpsertReport::default());
    }
    let phones: Vec<&str> = contacts.iter().map(|c| c.phone.as_str()).collect();
    let names: Vec<Option<&str>> = contacts.iter().map(|c| c.name.as_deref()).collect();
    // Postgres has no arrays of arrays of different lengths: tags travel as JSON.
    let tags: Vec<Value> = contacts.iter().map(|c| Value::from(c.tags.clone())).collect();
    let attributes: Vec<Value> = contacts.iter().map(|c| c.attributes.clone()).collect();
    let wa_ids: Vec<Option<&str>> = contacts.iter().map(|c| c.whatsapp_id.as_deref()).collect();
    let rows: Vec<(bool,)> = sqlx::query_as(
        r#"
        INSERT INTO contacts AS c (organization, phone, name, tags, attributes, whatsapp_id)
        SELECT $1, v.phone, v.name,
               ARRAY(SELECT jsonb_array_elements_text(v.tags)),
               v.attributes, v.wa_id
        FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::text[])
             AS v(phone, name, tags, attributes, wa_id)
        ON CONFLICT (organization, phone) DO UPDATE SET
            name = coalesce(EXCLUDED.name, c.name),
            tags = EXCLUDED.tags,
            attributes = c.attributes || EXCLUDED.attributes,
            whatsapp_id = coalesce(EXCLUDED.whatsapp_id, c.whatsapp_id),
            updated_at = now()
        RETURNING (xmax = 0)
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
    let inserted = rows.iter().filter(|(fresh,)| *fresh).count() as u64;
    Ok(UpsertReport { inserted, updated: rows.len() as u64 - inserted })
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
