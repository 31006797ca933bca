//! Audience materialization: one set-based statement turns a campaign's audience into
//! one message row per contact, with its batch index. The audience is frozen the first
//! time; running it again changes nothing.

use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::{Error, Result};
use crate::api::{self, AttributeOperator};

/// The audience as the store queries it (converted once from the wire type).
#[derive(Debug, Clone, PartialEq)]
pub enum AudienceQuery {
    /// Every contact that has not opted out.
    AllContacts,
    /// By tags.
    Tags {
        /// At least one of these (ignored when empty).
        any_of: Vec<String>,
        /// All of these.
        all_of: Vec<String>,
        /// None of these.
        none_of: Vec<String>,
    },
    /// By attribute filters, all of which must hold.
    Segment(Vec<AttributeFilter>),
    /// An explicit list of E.164 numbers.
    Contacts(Vec<String>),
    /// Contacts of another campaign's messages with one of these statuses.
    FromCampaign {
        /// Name of the source campaign (same organization).
        name: String,
        /// Statuses selected (`failed`, `sent`, ...).
        statuses: Vec<&'static str>,
        /// Only messages whose last error code is one of these (empty: any).
        error_codes: Vec<String>,
    },
}

/// One attribute filter.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeFilter {
    /// Attribute key.
    pub key: String,
    /// Operator.
    pub operator: AttributeOperator,
    /// Values compared as text.
    pub values: Vec<String>,
}

impl AudienceQuery {
    /// Converts the spec's audience. The CRD schema already guarantees exactly one kind;
    /// this refuses a spec that bypassed it.
    pub(crate) fn from_spec(audience: &api::Audience) -> Result<Self> {
        let mut kinds = Vec::new();
        if audience.all_contacts == Some(true) {
            kinds.push(AudienceQuery::AllContacts);
        }
        if let Some(tags) = &audience.tags {
            kinds.push(AudienceQuery::Tags {
                any_of: tags.any_of.iter().map(|t| t.0.clone()).collect(),
                all_of: tags.all_of.iter().map(|t| t.0.clone()).collect(),
                none_of: tags.none_of.iter().map(|t| t.0.clone()).collect(),
            });
        }
        if let Some(segment) = &audience.segment {
            kinds.push(AudienceQuery::Segment(
                segment
                    .attributes
                    .iter()
                    .map(|f| AttributeFilter {
                        key: f.key.clone(),
                        operator: f.operator,
                        values: f.values.iter().map(|v| v.0.clone()).collect(),
                    })
                    .collect(),
            ));
        }
        if let Some(contacts) = &audience.contacts {
            kinds.push(AudienceQuery::Contacts(contacts.iter().map(|p| p.0.clone()).collect()));
        }
        if let Some(from) = &audience.from_campaign {
            kinds.push(AudienceQuery::FromCampaign {
                name: from.name.clone(),
                statuses: from.statuses.iter().map(|s| s.as_str()).collect(),
                error_codes: from.error_codes.iter().map(|c| c.0.clone()).collect(),
            });
        }
        match kinds.len() {
            1 => Ok(kinds.remove(0)),
            0 => Err(Error::Invalid(
                "the audience selects nothing: set one of allContacts, tags, segment, contacts, fromCampaign".into(),
            )),
            _ => Err(Error::Invalid("the audience sets more than one kind".into())),
        }
    }
}

/// Appends `SELECT c.id, c.phone FROM contacts c WHERE ...` for `audience` in `organization`.
/// Opted-out contacts are always excluded; contacts are unique per organization, so the
/// selection has no duplicates.
fn push_selection(
    qb: &mut QueryBuilder<Postgres>,
    organization: &str,
    audience: &AudienceQuery,
    source_uid: Option<Uuid>,
) {
    qb.push("SELECT c.id FROM contacts c WHERE c.organization = ");
    qb.push_bind(organization);
    qb.push(" AND NOT c.opted_out");
    match audience {
        AudienceQuery::AllContacts => {}
        AudienceQuery::Tags { any_of, all_of, none_of } => {
            if !any_of.is_empty() {
                qb.push(" AND c.tags && ").push_bind(any_of).push("::text[]");
            }
            if !all_of.is_empty() {
                qb.push(" AND c.tags @> ").push_bind(all_of).push("::text[]");
            }
            if !none_of.is_empty() {
                qb.push(" AND NOT (c.tags && ").push_bind(none_of).push("::text[])");
            }
        }
        AudienceQuery::Segment(filters) => {
            for filter in filters {
                match filter.operator {
                    AttributeOperator::In => {
                        qb.push(" AND (c.attributes ->> ")
                            .push_bind(&filter.key)
                            .push(") = ANY(")
                            .push_bind(&filter.values)
                            .push("::text[])");
                    }
                    AttributeOperator::NotIn => {
                        qb.push(" AND NOT coalesce((c.attributes ->> ")
                            .push_bind(&filter.key)
                            .push(") = ANY(")
                            .push_bind(&filter.values)
                            .push("::text[]), FALSE)");
                    }
                    AttributeOperator::Exists => {
                        qb.push(" AND c.attributes ? ").push_bind(&filter.key);
                    }
                    AttributeOperator::DoesNotExist => {
                        qb.push(" AND NOT (c.attributes ? ").push_bind(&filter.key).push(")");
                    }
                }
            }
        }
        AudienceQuery::Contacts(phones) => {
            qb.push(" AND c.phone = ANY(").push_bind(phones).push("::text[])");
        }
        AudienceQuery::FromCampaign { statuses, error_codes, .. } => {
            let statuses: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
            qb.push(" AND c.id IN (SELECT m.contact_id FROM campaign_messages m WHERE m.organization = ")
                .push_bind(organization)
                .push(" AND m.campaign_uid = ")
                .push_bind(source_uid)
                .push(" AND m.status::text = ANY(")
                .push_bind(statuses)
                .push("::text[])");
            if !error_codes.is_empty() {
                qb.push(" AND m.last_error_code = ANY(").push_bind(error_codes.clone()).push("::text[])");
            }
            qb.push(")");
        }
    }
}

/// Resolves a `fromCampaign` name to the UID of the latest campaign of that name in the
/// organization.
async fn resolve_source(pool: &PgPool, organization: &str, audience: &AudienceQuery) -> Result<Option<Uuid>> {
    let AudienceQuery::FromCampaign { name, .. } = audience else { return Ok(None) };
    let row: Option<(Uuid,)> = sqlx::query_as(
        "SELECT uid FROM campaigns WHERE organization = $1 AND name = $2 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(organization)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    match row {
        Some((uid,)) => Ok(Some(uid)),
        None => Err(Error::SourceCampaignNotFound { organization: organization.to_owned(), name: name.clone() }),
    }
}

/// How many contacts the audience selects now (preflight; nothing is written).
pub(crate) async fn preview_size(pool: &PgPool, organization: &str, audience: &AudienceQuery) -> Result<i64> {
    let source = resolve_source(pool, organization, audience).await?;
    let mut qb = QueryBuilder::new("SELECT count(*) FROM (");
    push_selection(&mut qb, organization, audience, source);
    qb.push(") s");
    let (n,): (i64,) = qb.build_query_as().fetch_one(pool).await?;
    Ok(n)
}

/// How many selected contacts lack at least one of `attribute_keys` or a name when
/// `needs_name` (preflight: those messages would fail to render).
pub(crate) async fn count_missing_variables(
    pool: &PgPool,
    organization: &str,
    audience: &AudienceQuery,
    needs_name: bool,
    attribute_keys: &[String],
) -> Result<i64> {
    if !needs_name && attribute_keys.is_empty() {
        return Ok(0);
    }
    let source = resolve_source(pool, organization, audience).await?;
    let mut qb = QueryBuilder::new("SELECT count(*) FROM contacts x WHERE x.id IN (");
    push_selection(&mut qb, organization, audience, source);
    qb.push(") AND (");
    qb.push(if needs_name { "x.name IS NULL OR x.name = ''" } else { "FALSE" });
    if !attribute_keys.is_empty() {
        qb.push(" OR NOT (x.attributes ?& ").push_bind(attribute_keys.to_vec()).push("::text[])");
    }
    qb.push(")");
    let (n,): (i64,) = qb.build_query_as().fetch_one(pool).await?;
    Ok(n)
}

/// A campaign about to be frozen.
#[derive(Debug, Clone)]
pub struct CampaignKey<'a> {
    /// The Campaign object's UID.
    pub uid: Uuid,
    /// Its namespace.
    pub organization: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its channel's name.
    pub channel: &'a str,
    /// Messages per batch.
    pub batch_size: u32,
}

/// The frozen audience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frozen {
    /// Messages materialized.
    pub messages: i64,
    /// Batches (Job completions).
    pub batches: i32,
    /// Whether this call froze it (false: it was frozen before and nothing changed).
    pub newly_frozen: bool,
}

/// Freezes the audience into message rows, in one transaction: registers the campaign,
/// inserts one pending message per selected contact with `batch_index = n / batch_size`,
/// and records the batch count. Idempotent: a campaign already frozen returns what was
/// frozen.
pub async fn materialize(pool: &PgPool, key: &CampaignKey<'_>, audience: &AudienceQuery) -> Result<Frozen> {
    materialize_capped(pool, key, audience, None).await
}

/// A per-contact cap on marketing messages across the organization's campaigns: at
/// most `messages` in the last `days` days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyCap {
    /// Marketing messages allowed in the period.
    pub messages: u32,
    /// The period.
    pub days: u32,
}

/// [`materialize`], and in the same transaction, contacts that other campaigns of the
/// organization already sent `cap.messages` marketing messages in the last `cap.days`
/// days (by Meta's pricing category, as its receipts say) are `skipped`, never sent.
pub async fn materialize_capped(
    pool: &PgPool,
    key: &CampaignKey<'_>,
    audience: &AudienceQuery,
    cap: Option<FrequencyCap>,
) -> Result<Frozen> {
    if key.batch_size == 0 {
        return Err(Error::Invalid("batch size must be positive".into()));
    }
    let source = resolve_source(pool, key.organization, audience).await?;
    // The campaign's partition of campaign_messages, in a transaction of its own before
    // the freeze (docs/architecture.md, "Partitions"): attaching it briefly locks
    // campaigns and contacts against writes, which must not last as long as the freeze.
    let mut part = super::begin(pool).await?;
    let (partition,): (String,) =
        sqlx::query_as("SELECT campaign_messages_partition($1)::text").bind(key.uid).fetch_one(&mut *part).await?;
    part.commit().await?;
    let mut tx = super::begin(pool).await?;
    sqlx::query(
        "INSERT INTO campaigns (uid, organization, name, channel, batch_size) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (uid) DO NOTHING",
    )
    .bind(key.uid)
    .bind(key.organization)
    .bind(key.name)
    .bind(key.channel)
    .bind(key.batch_size as i32)
    .execute(&mut *tx)
    .await?;
    let (frozen_at, batches): (Option<chrono::DateTime<chrono::Utc>>, i32) =
        sqlx::query_as("SELECT audience_frozen_at, batches FROM campaigns WHERE uid = $1 FOR UPDATE")
            .bind(key.uid)
            .fetch_one(&mut *tx)
            .await?;
    if frozen_at.is_some() {
        let (messages,): (i64,) =
            sqlx::query_as("SELECT coalesce((SELECT total FROM campaign_counters WHERE campaign_uid = $1), 0)")
                .bind(key.uid)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        return Ok(Frozen { messages, batches, newly_frozen: false });
    }
    let mut qb = QueryBuilder::new(
        "INSERT INTO campaign_messages (campaign_uid, organization, contact_id, batch_index) SELECT ",
    );
    qb.push_bind(key.uid)
        .push(", ")
        .push_bind(key.organization)
        .push(", s.id, ((row_number() OVER (ORDER BY s.id)) - 1) / ");
    qb.push_bind(key.batch_size as i64).push(" FROM (");
    push_selection(&mut qb, key.organization, audience, source);
    qb.push(") s ON CONFLICT (campaign_uid, contact_id) DO NOTHING");
    let messages = qb.build().execute(&mut *tx).await?.rows_affected() as i64;
    let batches = ((messages + key.batch_size as i64 - 1) / key.batch_size as i64) as i32;
    sqlx::query("INSERT INTO campaign_counters (campaign_uid) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(key.uid)
        .execute(&mut *tx)
        .await?;
    if let Some(cap) = cap {
        sqlx::query(
            r#"UPDATE campaign_messages m SET status = 'skipped', last_error_code = 'frequency_cap',
                   last_error_message = 'the contact already got the most marketing messages spec.frequencyCap allows',
                   updated_at = now(),
                   status_history = m.status_history || jsonb_build_array(jsonb_build_object('status', 'skipped', 'at', now(), 'code', 'frequency_cap'))
               WHERE m.campaign_uid = $1 AND m.status = 'pending' AND m.contact_id IN (
                   SELECT o.contact_id FROM campaign_messages o
                   WHERE o.organization = $2 AND o.campaign_uid <> $1 AND o.pricing_category = 'marketing'
                     AND o.status IN ('sent', 'delivered', 'read') AND o.updated_at > now() - make_interval(days => $4)
                   GROUP BY o.contact_id HAVING count(*) >= $3)"#,
        )
        .bind(key.uid)
        .bind(key.organization)
        .bind(i64::from(cap.messages))
        .bind(cap.days as i32)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE campaigns SET audience_frozen_at = now(), batches = $2 WHERE uid = $1")
        .bind(key.uid)
        .bind(batches)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Statistics of the new partition at once: without them the planner takes a block's
    // `id = ANY(...)` for most of the partition and scans all of it for every record
    // (50 ms instead of 11 for 500 messages of 100,000), until autovacuum analyzes it.
    // The name is the partition function's own (`campaign_messages_<hex>`).
    let mut db = super::Autocommit::open(pool).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {partition}"))).execute(db.conn()).await?;
    db.commit().await?;
    Ok(Frozen { messages, batches, newly_frozen: true })
}

/// The selected contacts by the first three digits of their number (for a cost estimate
/// with the rate card).
pub(crate) async fn size_by_prefix(
    pool: &PgPool,
    organization: &str,
    audience: &AudienceQuery,
) -> Result<Vec<(String, i64)>> {
    let source = resolve_source(pool, organization, audience).await?;
    let mut qb = QueryBuilder::new("SELECT substr(x.phone, 2, 3), count(*) FROM contacts x WHERE x.id IN (");
    push_selection(&mut qb, organization, audience, source);
    qb.push(") GROUP BY 1");
    Ok(qb.build_query_as().fetch_all(pool).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Audience, Tag, TagSelector};

    fn empty() -> Audience {
        Audience { all_contacts: None, tags: None, segment: None, contacts: None, from_campaign: None }
    }

    #[test]
    fn converts_exactly_one_kind() {
        let audience =
            Audience { tags: Some(TagSelector { any_of: vec![Tag("vip".into())], ..Default::default() }), ..empty() };
        assert_eq!(
            AudienceQuery::from_spec(&audience).unwrap(),
            AudienceQuery::Tags { any_of: vec!["vip".into()], all_of: vec![], none_of: vec![] }
        );
        assert!(AudienceQuery::from_spec(&empty()).is_err());
        let two = Audience { all_contacts: Some(true), ..audience };
        assert!(AudienceQuery::from_spec(&two).is_err());
    }
}
