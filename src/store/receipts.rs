//! Delivery receipts and opt-outs reported by provider webhooks.
//!
//! Webhooks arrive at least once, in any order, and sometimes several for one message in
//! the same payload. This module turns a batch of reported statuses into one locked
//! read and one set-based `UPDATE`, so a batch costs the same few round trips however
//! many events it holds, and the statement-level counter triggers fire once per batch,
//! in the same transaction as the status changes.
//!
//! What to do with each event is decided by a pure function ([`plan`]) over the
//! message's current status (read under a row lock), so the rules — statuses only move
//! forward, duplicates change nothing, a `failed` after `delivered` is only noted — are
//! tested without a database. The schema enforces the same forward-only rule
//! (`message_transition_allowed`), and the `UPDATE` repeats it in its `WHERE` clause, so
//! no writer can ever attempt an illegal move.
//!
//! A receipt that finds no message is kept (`unmatched_receipts`) rather than dropped:
//! the provider may report a status before the sender has recorded the provider id it
//! got, and a send that timed out leaves its message `unknown` with no id at all.
//! [`sweep_unmatched`] matches kept receipts again, applies them by the same rules, and
//! drops those older than a day. An `unknown` message is also found without its id:
//! through our id when Meta echoes it, through its contact and channel for Evolution.
//!
//! Meta's per-user marketing limit (131049) is not a failure of the message: a `failed`
//! receipt with that code puts it back to `pending`, due after growing delays
//! ([`crate::account::marketing_requeue_at`]), and fails it only after three requeues. The requeue drops
//! the provider id (the next attempt gets its own) and names it in the history entry,
//! so the ended attempt's late receipts are recognised and change nothing. The schema
//! allows that one way back from `sent` or `unknown` (migration 0008).
//!
//! Meta may name a recipient by business-scoped user id (BSUID) instead of phone: the
//! BSUID of a receipt that found its message is stored on the message's contact, finds
//! an `unknown` message through its contact as the phone does, and opts out.
//!
//! A receipt changes only messages of campaigns sent through the channel it was posted
//! for ([`StatusEvent::channel`]), however it is matched: one channel's credentials
//! reach that channel's messages, not the rest of the organization's. Opt-outs are the
//! exception by design: a person who asks one number of an organization to stop is
//! opted out of the organization (a contact is the organization's, not a channel's).
//!
//! Every statement on `campaign_messages` names the campaigns it may touch, so Postgres
//! reads and locks their partitions alone (docs/architecture.md, "Partitions"): the
//! campaign a receipt echoes, or else the campaigns of its channel that may still
//! receive receipts (unfinished, or changed within [`RECEIPT_HORIZON`]).
//!
//! Lock order: campaign messages are locked in ascending id order before any is
//! updated, as the sender does, so the webhook and the sender never deadlock; contacts
//! likewise; kept receipts are deleted only after the messages are locked.
//!
//! Parsing provider payloads and deciding who may post them belong to `webhook`; this
//! module trusts what it is given.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use crate::account::{MARKETING_LIMIT_CODE, marketing_requeue_at};

/// A message's status as stored (the `message_status` enum of the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    /// Waiting to be sent.
    Pending,
    /// Claimed and marked just before the provider call.
    Sending,
    /// The request may have reached the provider.
    Unknown,
    /// Accepted by the provider.
    Sent,
    /// On the recipient's device.
    Delivered,
    /// Read by the recipient.
    Read,
    /// Failed for good (terminal).
    Failed,
    /// Never sent: the campaign was cancelled (terminal).
    Cancelled,
    /// Never attempted: the contact opted out after the audience was frozen (terminal).
    Skipped,
}

impl MessageStatus {
    /// Every status, in the schema's order.
    pub const ALL: [MessageStatus; 9] = [
        MessageStatus::Pending,
        MessageStatus::Sending,
        MessageStatus::Unknown,
        MessageStatus::Sent,
        MessageStatus::Delivered,
        MessageStatus::Read,
        MessageStatus::Failed,
        MessageStatus::Cancelled,
        MessageStatus::Skipped,
    ];

    /// The schema's enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Sending => "sending",
            MessageStatus::Unknown => "unknown",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
            MessageStatus::Failed => "failed",
            MessageStatus::Cancelled => "cancelled",
            MessageStatus::Skipped => "skipped",
        }
    }

    /// Parses the schema's enum label.
    pub fn parse(label: &str) -> Option<Self> {
        Some(match label {
            "pending" => MessageStatus::Pending,
            "sending" => MessageStatus::Sending,
            "unknown" => MessageStatus::Unknown,
            "sent" => MessageStatus::Sent,
            "delivered" => MessageStatus::Delivered,
            "read" => MessageStatus::Read,
            "failed" => MessageStatus::Failed,
            "cancelled" => MessageStatus::Cancelled,
            "skipped" => MessageStatus::Skipped,
            _ => return None,
        })
    }

    /// Whether the status may move from `self` to `new`: the Rust mirror of the
    /// schema's `message_transition_allowed`, used to plan; the database re-checks.
    pub(crate) fn can_move_to(self, new: MessageStatus) -> bool {
        use MessageStatus::*;
        match self {
            Pending => matches!(new, Sending | Failed | Cancelled | Skipped),
            Sending => matches!(new, Pending | Unknown | Sent | Delivered | Read | Failed | Cancelled),
            Unknown => matches!(new, Sent | Delivered | Read | Failed),
            Sent => matches!(new, Delivered | Read | Failed),
            Delivered => matches!(new, Read),
            Read | Failed | Cancelled | Skipped => false,
        }
    }
}

/// A status a provider reports for one of our outbound messages (after mapping the
/// provider's vocabulary: Meta `played` and Evolution `PLAYED` are `Read`, Evolution
/// `SERVER_ACK` is `Sent`, and so on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReceiptStatus {
    /// Accepted by WhatsApp's servers.
    Sent,
    /// On the recipient's device.
    Delivered,
    /// Read (implies delivered: providers may skip `delivered`).
    Read,
    /// Could not be sent or delivered.
    Failed,
}

impl ReceiptStatus {
    /// The status a message takes when this receipt is applied.
    pub(crate) fn message_status(self) -> MessageStatus {
        match self {
            ReceiptStatus::Sent => MessageStatus::Sent,
            ReceiptStatus::Delivered => MessageStatus::Delivered,
            ReceiptStatus::Read => MessageStatus::Read,
            ReceiptStatus::Failed => MessageStatus::Failed,
        }
    }

    /// The lowercase name used in history entries and metric labels.
    pub fn as_str(self) -> &'static str {
        self.message_status().as_str()
    }

    /// Parses [`ReceiptStatus::as_str`].
    pub fn parse(label: &str) -> Option<Self> {
        Some(match label {
            "sent" => ReceiptStatus::Sent,
            "delivered" => ReceiptStatus::Delivered,
            "read" => ReceiptStatus::Read,
            "failed" => ReceiptStatus::Failed,
            _ => return None,
        })
    }

    /// Order in which receipts for one message are considered within a batch. `failed`
    /// comes last so that, when a `failed` and a `delivered`/`read` for the same message
    /// arrive together, the message ends delivered/read with the failure noted — the
    /// same result as if they had arrived in separate requests in that order.
    fn batch_order(self) -> u8 {
        match self {
            ReceiptStatus::Sent => 0,
            ReceiptStatus::Delivered => 1,
            ReceiptStatus::Read => 2,
            ReceiptStatus::Failed => 3,
        }
    }
}

/// The error a provider attached to a `failed` status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// Provider error code, e.g. `131026` (kept as text: Evolution has no numbers).
    pub code: String,
    /// Short human-readable title.
    pub title: String,
}

/// Which provider reported a status: the API's own provider type.
pub use crate::api::Provider;

/// One status reported by a provider webhook, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusEvent {
    /// Who reported it.
    pub provider: Provider,
    /// The organization (Kubernetes namespace) the webhook was posted for: a message is
    /// only ever looked up inside it.
    pub organization: String,
    /// The Channel the webhook was posted for (its URL, which its credentials
    /// verified). Only messages of campaigns sent through this channel are looked up,
    /// by any means: whoever holds one channel's credentials (an Evolution instance,
    /// a Meta app) can change that channel's messages and no other of the
    /// organization. A Meta app with several numbers gives each number its channel's
    /// URL (Meta's per-number callback override); a receipt posted at another
    /// channel's URL is kept and never applied.
    pub channel: String,
    /// WAMID (Meta) or key id (Evolution).
    pub provider_message_id: String,
    /// Our message id, when the provider echoed it back (Meta `biz_opaque_callback_data`).
    /// Used only when no message has the provider id yet: the sender may have died
    /// between the provider call and recording the id, leaving the message `sending` or
    /// `unknown` without one.
    pub message_id: Option<i64>,
    /// The message's campaign, when the provider echoed it (Meta
    /// `biz_opaque_callback_data` in the current format, docs/providers.md A1): the
    /// message is then looked up in that campaign's partition alone, by any means.
    /// Without it, in the campaigns of the channel that may still receive receipts
    /// ([`RECEIPT_HORIZON`]).
    pub campaign: Option<Uuid>,
    /// The reported status.
    pub status: ReceiptStatus,
    /// When the provider says it happened (recorded in the history; orders receipts of
    /// the same status).
    pub at: DateTime<Utc>,
    /// The provider's error, for `failed`.
    pub error: Option<ProviderError>,
    /// The recipient's WhatsApp id (digits), when the provider names it.
    pub recipient: Option<String>,
    /// The failure says the recipient opted out (Meta 131050, "user has stopped
    /// marketing messages"): the message's contact is marked opted out.
    pub opts_out: bool,
    /// The recipient's business-scoped user id (Meta `recipient_user_id`), when the
    /// provider names it. It finds an `unknown` message through its contact like the
    /// phone does, and is stored on the contact of the message the status matched.
    pub recipient_bsuid: Option<String>,
    /// What the provider says it charges for the message (Meta `pricing`).
    pub pricing: Option<Pricing>,
}

/// What Meta says a message is charged as (`statuses[].pricing`, docs/providers.md A4):
/// stored on the message so what a campaign costs can be told from its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// `category`: `marketing`, `utility`, `authentication`, ...
    pub category: Option<String>,
    /// `type`: `regular`, `free_customer_service`, `free_entry_point`.
    pub pricing_type: Option<String>,
}

/// What applying one [`StatusEvent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApplyOutcome {
    /// Accepted: the status moved (or, in a batch that moved further, was passed
    /// through) and the event is in the history.
    Applied,
    /// The message already had this status.
    Duplicate,
    /// Lower than the current status, or the message can no longer move (terminal,
    /// never sent, or put back: about an attempt already dealt with). A `failed` after
    /// `delivered`/`read` is noted in the history.
    Stale,
    /// No message of the organization has this provider id (nor, as a fallback, our id
    /// or its contact, through the recipient's BSUID or, for Evolution, phone): the
    /// receipt is kept for a day, and applied if the message turns up (see
    /// [`sweep_unmatched`]).
    UnknownId,
}

impl ApplyOutcome {
    /// Snake-case name for metric labels and responses.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyOutcome::Applied => "applied",
            ApplyOutcome::Duplicate => "duplicate",
            ApplyOutcome::Stale => "stale",
            ApplyOutcome::UnknownId => "unknown_id",
        }
    }
}

/// A recipient who asked to stop receiving messages, named by WhatsApp id, by
/// business-scoped user id, or both (Meta may leave out the phone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptOut {
    /// The organization the webhook was posted for.
    pub organization: String,
    /// The sender's WhatsApp id (digits, as providers send it).
    pub wa_id: Option<String>,
    /// The sender's business-scoped user id (matches `contacts.bsuid`).
    pub bsuid: Option<String>,
}

/// What one call to [`apply`] did, in the order of its inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptsReport {
    /// One outcome per status event.
    pub outcomes: Vec<ApplyOutcome>,
    /// Per opt-out: whether a contact of the organization matched.
    pub opted_out: Vec<bool>,
}

/// The change planned for one message.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedChange {
    /// New status, or None when only the history grows (a noted late failure).
    pub status: Option<MessageStatus>,
    /// History entries to append, in provider-timestamp order.
    pub entries: Vec<Value>,
    /// The error to record (when the message becomes `failed`, or is put back).
    pub error: Option<ProviderError>,
    /// The message is put back for Meta's per-user marketing limit (see
    /// [`crate::account::marketing_requeue_at`]): it becomes `pending`, due at this instant.
    pub requeue_at: Option<DateTime<Utc>>,
}

/// Code recorded when a provider reports `failed` without saying why, so the failure
/// still shows in the per-code breakdown.
pub(crate) const UNSPECIFIED_ERROR_CODE: &str = "unspecified";

/// The key of a requeue's history entry that names the provider id of the attempt it
/// ended. Late receipts of that attempt are recognised by it (the message's own
/// provider id is cleared, and later holds the next attempt's).
pub(crate) const REQUEUED_PROVIDER_ID_KEY: &str = "requeuedProviderId";

/// Whether a receipt is Meta's per-user marketing limit.
fn is_marketing_limit(event: &StatusEvent) -> bool {
    event.status == ReceiptStatus::Failed && event.error.as_ref().is_some_and(|e| e.code == MARKETING_LIMIT_CODE)
}

/// Decides what a set of receipts does to one message whose current status is
/// `current` and which was put back `marketing_requeues` times. Receipts are considered
/// in rank order (then timestamp), each against the status the previous ones left, so
/// the result does not depend on their order in the payload. Returns the change (None
/// when nothing changes) and one outcome per receipt, in input order.
///
/// A `failed` with 131049 puts the message back ([`crate::account::marketing_requeue_at`], due from
/// `now`) instead of failing it, until it was put back three times; the receipts after
/// it are about the attempt it ended, and change nothing. A `pending` message takes no
/// receipt: whatever it says is about an attempt already dealt with.
pub fn plan(
    current: MessageStatus,
    marketing_requeues: i16,
    events: &[&StatusEvent],
    now: DateTime<Utc>,
) -> (Option<PlannedChange>, Vec<ApplyOutcome>) {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&i| (events[i].status.batch_order(), events[i].at));
    let mut outcomes = vec![ApplyOutcome::Stale; events.len()];
    if current == MessageStatus::Pending {
        return (None, outcomes);
    }
    let mut running = current;
    let mut accepted: Vec<(DateTime<Utc>, Value)> = Vec::new();
    let mut error = None;
    let mut requeue_at = None;
    for i in order {
        let event = events[i];
        let target = event.status.message_status();
        if requeue_at.is_some() {
            if is_marketing_limit(event) {
                outcomes[i] = ApplyOutcome::Duplicate;
            }
            continue;
        }
        if running == target {
            outcomes[i] = ApplyOutcome::Duplicate;
        } else if running.can_move_to(target) {
            outcomes[i] = ApplyOutcome::Applied;
            let again = is_marketing_limit(event).then(|| marketing_requeue_at(marketing_requeues, now)).flatten();
            if let Some(at) = again {
                running = MessageStatus::Pending;
                requeue_at = Some(at);
                error = Some(failure_of(event));
                accepted.push((event.at, requeue_entry(event, marketing_requeues.saturating_add(1), at)));
                continue;
            }
            running = target;
            if target == MessageStatus::Failed {
                error = Some(failure_of(event));
            }
            accepted.push((event.at, history_entry(event, None)));
        } else if target == MessageStatus::Failed && matches!(running, MessageStatus::Delivered | MessageStatus::Read) {
            // Meta documents no such sequence; keep the better status and the evidence.
            accepted.push((event.at, history_entry(event, Some("failed after delivered; status kept"))));
        }
    }
    if accepted.is_empty() {
        return (None, outcomes);
    }
    accepted.sort_by_key(|(at, _)| *at);
    let change = PlannedChange {
        status: (running != current).then_some(running),
        entries: accepted.into_iter().map(|(_, entry)| entry).collect(),
        error,
        requeue_at,
    };
    (Some(change), outcomes)
}

/// The history entry of a requeue: `{"status": "pending", "at", "source": "webhook",
/// "code", "title"?, "requeue": n, "retryAt", "requeuedProviderId"}`.
fn requeue_entry(event: &StatusEvent, requeue: i16, retry_at: DateTime<Utc>) -> Value {
    let mut entry = match history_entry(event, None) {
        Value::Object(entry) => entry,
        _ => Map::new(),
    };
    entry.insert("status".into(), Value::from(MessageStatus::Pending.as_str()));
    entry.insert("requeue".into(), Value::from(requeue));
    entry.insert("retryAt".into(), Value::from(retry_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)));
    entry.insert(REQUEUED_PROVIDER_ID_KEY.into(), Value::from(event.provider_message_id.as_str()));
    Value::Object(entry)
}

fn failure_of(event: &StatusEvent) -> ProviderError {
    event
        .error
        .clone()
        .unwrap_or_else(|| ProviderError { code: UNSPECIFIED_ERROR_CODE.to_owned(), title: String::new() })
}

/// `{"status", "at", "source": "webhook", "code"?, "title"?, "note"?}`.
fn history_entry(event: &StatusEvent, note: Option<&str>) -> Value {
    let mut entry = Map::new();
    entry.insert("status".into(), Value::from(event.status.as_str()));
    entry.insert("at".into(), Value::from(event.at.to_rfc3339_opts(SecondsFormat::AutoSi, true)));
    entry.insert("source".into(), Value::from("webhook"));
    if event.status == ReceiptStatus::Failed {
        let failure = failure_of(event);
        entry.insert("code".into(), Value::from(failure.code));
        if !failure.title.is_empty() {
            entry.insert("title".into(), Value::from(failure.title));
        }
    }
    if let Some(note) = note {
        entry.insert("note".into(), Value::from(note));
    }
    Value::Object(entry)
}

/// How long a receipt that found no message is kept: a sender records provider ids
/// within seconds of the provider's answer, and a kept receipt older than this is for a
/// message that is not ours.
pub const UNMATCHED_RECEIPT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long after its last status change a campaign with nothing left to send or
/// resolve still takes receipts that do not name it: a day, as long as the controller
/// follows a completed campaign's receipts. A campaign with messages `pending`,
/// `sending` or `unknown` takes them whenever they come. A receipt that names its
/// campaign (Meta's current `biz_opaque_callback_data`) finds it at any age.
pub const RECEIPT_HORIZON: Duration = Duration::from_secs(24 * 60 * 60);

/// The SQL condition, on `campaign_counters n`, of a campaign that may still take
/// receipts not naming it; `$3` is the horizon in seconds ([`RECEIPT_HORIZON`]).
const TAKES_RECEIPTS: &str =
    "(n.pending + n.sending + n.unknown > 0 OR n.updated_at >= now() - make_interval(secs => $3))";

/// The campaigns a batch of receipts is looked up in.
#[derive(Debug, Default)]
struct Candidates {
    /// Every campaign any receipt of the batch may belong to: the statements name
    /// these, so Postgres plans, locks and reads their partitions alone. Sorted.
    all: Vec<Uuid>,
    /// The campaigns a receipt that names none may belong to: of its organization and
    /// channel, and still taking receipts ([`RECEIPT_HORIZON`]). A receipt that names
    /// its campaign is looked up in that one only.
    unnamed: Vec<Uuid>,
}

impl Candidates {
    fn new(named: impl IntoIterator<Item = Uuid>, mut unnamed: Vec<Uuid>) -> Candidates {
        unnamed.sort_unstable();
        unnamed.dedup();
        let mut all: Vec<Uuid> = named.into_iter().chain(unnamed.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        Candidates { all, unnamed }
    }
}

/// The campaigns a batch of events may belong to ([`Candidates`]): those the events
/// name, and for the events that name none, the campaigns of their organization and
/// channel that may still take receipts within `horizon`.
async fn receipt_campaigns(
    tx: &mut sqlx::PgConnection,
    events: &[StatusEvent],
    horizon: Duration,
) -> Result<Candidates> {
    let named: Vec<Uuid> = events.iter().filter_map(|e| e.campaign).collect();
    let mut unnamed = Vec::new();
    let mut channels: Vec<(&str, &str)> =
        events.iter().filter(|e| e.campaign.is_none()).map(|e| (e.organization.as_str(), e.channel.as_str())).collect();
    channels.sort_unstable();
    channels.dedup();
    if !channels.is_empty() {
        let (orgs, names): (Vec<&str>, Vec<&str>) = channels.into_iter().unzip();
        let live: Vec<(Uuid,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            r#"SELECT k.uid FROM campaigns k JOIN campaign_counters n ON n.campaign_uid = k.uid
               WHERE (k.organization, k.channel) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                 AND {TAKES_RECEIPTS}"#
        )))
        .bind(&orgs)
        .bind(&names)
        .bind(horizon.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        unnamed.extend(live.into_iter().map(|(uid,)| uid));
    }
    Ok(Candidates::new(named, unnamed))
}

/// Applies status events and opt-outs in one transaction: when it returns `Ok`, every
/// change is committed (so a webhook may be acknowledged), including the receipts kept
/// because no message has their id yet; on `Err` nothing is.
pub async fn apply(pool: &PgPool, events: &[StatusEvent], opt_outs: &[OptOut]) -> Result<ReceiptsReport> {
    let mut tx = super::begin(pool).await?;
    let campaigns = if events.is_empty() {
        Candidates::default()
    } else {
        receipt_campaigns(&mut tx, events, RECEIPT_HORIZON).await?
    };
    let applied = apply_events(&mut tx, events, &campaigns).await?;
    keep_unmatched(&mut tx, events, &applied.outcomes).await?;
    let opted_out = apply_opt_outs(&mut tx, opt_outs, &applied.opting_out).await?;
    // Last: the messages' update locks the campaigns' counters rows (their statement
    // trigger), which every sender's record needs too; held from here to the commit.
    applied.updates.apply(&mut tx).await?;
    tx.commit().await?;
    Ok(ReceiptsReport { outcomes: applied.outcomes, opted_out })
}

/// What [`apply_events`] did, and the messages' update it leaves to its caller.
struct Applied<'a> {
    /// One per event.
    outcomes: Vec<ApplyOutcome>,
    /// Messages (campaign, id) whose contact is to be opted out ([`StatusEvent::opts_out`]).
    opting_out: Vec<(Uuid, i64)>,
    /// The messages' changes, to apply as the transaction's last statement: applying
    /// them takes the counters rows' locks, which senders' records wait for.
    updates: MessageUpdates<'a>,
}

/// A message an event resolved to, as read under its row lock.
#[derive(Debug, sqlx::FromRow)]
struct Resolved {
    /// The event's position in the input, from 1.
    idx: i64,
    campaign_uid: Uuid,
    id: i64,
    status: String,
    provider_message_id: Option<String>,
    marketing_requeues: i16,
    /// The event is about an attempt of this message that ended in a marketing requeue.
    superseded: bool,
}

/// The events that resolved to one message.
struct Found {
    campaign: Uuid,
    status: MessageStatus,
    provider_message_id: Option<String>,
    marketing_requeues: i16,
    /// Events about its current attempt (or about it, when it has no provider id yet).
    current: Vec<usize>,
    /// Events about an attempt that ended in a marketing requeue: stale.
    superseded: Vec<usize>,
}

/// Applies `events` to their messages, looked up in `campaigns` alone (from
/// [`receipt_campaigns`] or, for kept receipts, [`sweep_campaigns`]).
async fn apply_events<'a>(
    tx: &mut sqlx::PgConnection,
    events: &'a [StatusEvent],
    campaigns: &Candidates,
) -> Result<Applied<'a>> {
    let mut outcomes = vec![ApplyOutcome::UnknownId; events.len()];
    if events.is_empty() {
        return Ok(Applied { outcomes, opting_out: Vec::new(), updates: MessageUpdates::default() });
    }
    let orgs: Vec<&str> = events.iter().map(|e| e.organization.as_str()).collect();
    let pids: Vec<&str> = events.iter().map(|e| e.provider_message_id.as_str()).collect();
    let our_ids: Vec<Option<i64>> = events.iter().map(|e| e.message_id).collect();
    let channels: Vec<&str> = events.iter().map(|e| e.channel.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
    let bsuids: Vec<Option<&str>> = events.iter().map(|e| e.recipient_bsuid.as_deref()).collect();
    let named: Vec<Option<Uuid>> = events.iter().map(|e| e.campaign).collect();
    // Evolution never echoes our id: an unknown message is found through its contact.
    let (phones, alt_phones): (Vec<Option<String>>, Vec<Option<String>>) = events
        .iter()
        .map(|e| match (&e.recipient, e.provider) {
            (Some(recipient), Provider::Evolution) => {
                let (phone, alternative) = phone_candidates(recipient);
                (Some(phone), alternative)
            }
            _ => (None, None),
        })
        .unzip();
    // Resolve every event to its message and lock the messages in id order (the lock
    // is taken above the sort), so concurrent writers — other replicas, the sender —
    // queue instead of deadlocking. Only messages of the event's channel: by provider
    // id first; then, through our id, a message one of whose attempts had this provider
    // id and ended in a marketing requeue (the event is stale: it must never reach the
    // next attempt); failing that, for a message that has no provider id yet: by our id
    // (a message waiting for its outcome), or by contact, through the recipient's
    // business-scoped user id, then (Evolution) phone (an `unknown` message, the only
    // one to that contact on the channel whose attempt ended within a day of the
    // receipt).
    //
    // The resolution is materialized before the join that locks: joined on the
    // expression itself, the planner hashes the whole table for a large batch (a full
    // scan of campaign_messages per transaction), where a lookup by primary key per
    // event is what it takes.
    //
    // Every lookup is within `campaigns` ($11, known when the statement is planned, so
    // only their partitions are planned, locked and read), and within the event's own
    // campaign when it names one. Each way of finding the message is a lateral join
    // run only when the ways before it found nothing (its condition on the earlier
    // results is checked before it reads anything), and returns the campaign with the
    // id, so the locking join reads one partition per event.
    let rows: Vec<Resolved> = sqlx::query_as(
        r#"
        WITH r AS MATERIALIZED (
        SELECT v.idx, v.pid,
               coalesce(a.campaign_uid, b.campaign_uid, c.campaign_uid, d.campaign_uid, e.campaign_uid) AS campaign_uid,
               coalesce(a.id, b.id, c.id, d.id, e.id) AS id
        FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $9::text[],
                    $12::uuid[])
             WITH ORDINALITY AS v(org, pid, our_id, channel, phone, alt_phone, at, bsuid, campaign, idx)
        LEFT JOIN LATERAL (
            SELECT x.campaign_uid, x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
            WHERE x.campaign_uid = ANY($11)
              AND (x.campaign_uid = v.campaign OR v.campaign IS NULL AND x.campaign_uid = ANY($13))
              AND x.organization = v.org AND x.provider_message_id = v.pid AND k.channel = v.channel
            ORDER BY x.id LIMIT 1
        ) a ON TRUE
        LEFT JOIN LATERAL (
            SELECT x.campaign_uid, x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
            WHERE a.id IS NULL AND v.our_id IS NOT NULL
              AND x.campaign_uid = ANY($11)
              AND (x.campaign_uid = v.campaign OR v.campaign IS NULL AND x.campaign_uid = ANY($13))
              AND x.id = v.our_id AND x.organization = v.org AND k.channel = v.channel
              AND x.marketing_requeues > 0
              AND x.status_history @> jsonb_build_array(jsonb_build_object($10::text, v.pid))
            LIMIT 1
        ) b ON TRUE
        LEFT JOIN LATERAL (
            SELECT x.campaign_uid, x.id FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
            WHERE a.id IS NULL AND b.id IS NULL AND v.our_id IS NOT NULL
              AND x.campaign_uid = ANY($11)
              AND (x.campaign_uid = v.campaign OR v.campaign IS NULL AND x.campaign_uid = ANY($13))
              AND x.id = v.our_id AND x.organization = v.org AND k.channel = v.channel
              AND x.provider_message_id IS NULL AND x.status IN ('sending', 'unknown')
            LIMIT 1
        ) c ON TRUE
        LEFT JOIN LATERAL (
            SELECT (array_agg(x.campaign_uid))[1] AS campaign_uid, min(x.id) AS id FROM contacts t
            JOIN campaign_messages x ON x.contact_id = t.id
            JOIN campaigns k ON k.uid = x.campaign_uid
            WHERE a.id IS NULL AND b.id IS NULL AND c.id IS NULL AND v.bsuid IS NOT NULL
              AND t.organization = v.org AND t.bsuid = v.bsuid
              AND x.campaign_uid = ANY($11)
              AND (x.campaign_uid = v.campaign OR v.campaign IS NULL AND x.campaign_uid = ANY($13))
              AND x.status = 'unknown' AND x.provider_message_id IS NULL AND x.organization = v.org
              AND k.channel = v.channel
              AND x.updated_at BETWEEN v.at - make_interval(secs => $8) AND v.at + make_interval(secs => $8)
            HAVING count(*) = 1
        ) d ON TRUE
        LEFT JOIN LATERAL (
            SELECT (array_agg(x.campaign_uid))[1] AS campaign_uid, min(x.id) AS id FROM contacts t
            JOIN campaign_messages x ON x.contact_id = t.id
            JOIN campaigns k ON k.uid = x.campaign_uid
            WHERE a.id IS NULL AND b.id IS NULL AND c.id IS NULL AND d.id IS NULL AND v.phone IS NOT NULL
              AND t.organization = v.org AND t.phone IN (v.phone, v.alt_phone)
              AND x.campaign_uid = ANY($11)
              AND (x.campaign_uid = v.campaign OR v.campaign IS NULL AND x.campaign_uid = ANY($13))
              AND x.status = 'unknown' AND x.provider_message_id IS NULL AND x.organization = v.org
              AND k.channel = v.channel
              AND x.updated_at BETWEEN v.at - make_interval(secs => $8) AND v.at + make_interval(secs => $8)
            HAVING count(*) = 1
        ) e ON TRUE
        )
        SELECT r.idx, m.campaign_uid, m.id, m.status::text AS status, m.provider_message_id, m.marketing_requeues,
               (m.marketing_requeues > 0 AND m.provider_message_id IS DISTINCT FROM r.pid
                AND m.status_history @> jsonb_build_array(jsonb_build_object($10::text, r.pid))) AS superseded
        FROM r JOIN campaign_messages m
          ON m.campaign_uid = ANY($11) AND m.campaign_uid = r.campaign_uid AND m.id = r.id
        ORDER BY m.id
        FOR UPDATE OF m
        "#,
    )
    .bind(&orgs)
    .bind(&pids)
    .bind(&our_ids)
    .bind(&channels)
    .bind(&phones)
    .bind(&alt_phones)
    .bind(&ats)
    .bind(UNMATCHED_RECEIPT_TTL.as_secs_f64())
    .bind(&bsuids)
    .bind(REQUEUED_PROVIDER_ID_KEY)
    .bind(&campaigns.all)
    .bind(&named)
    .bind(&campaigns.unnamed)
    .fetch_all(&mut *tx)
    .await?;

    // Group the events by message, keeping the locked state.
    let mut by_message: HashMap<i64, Found> = HashMap::new();
    for row in rows {
        let Some(status) = MessageStatus::parse(&row.status) else { continue };
        let Some(i) = usize::try_from(row.idx - 1).ok().filter(|i| *i < events.len()) else { continue };
        let found = by_message.entry(row.id).or_insert_with(|| Found {
            campaign: row.campaign_uid,
            status,
            provider_message_id: row.provider_message_id,
            marketing_requeues: row.marketing_requeues,
            current: Vec::new(),
            superseded: Vec::new(),
        });
        if row.superseded { found.superseded.push(i) } else { found.current.push(i) }
    }

    let now = Utc::now();
    let mut update = MessageUpdates::default();
    let mut opting_out = Vec::new();
    let mut bsuid_of: Vec<(Uuid, i64, &str)> = Vec::new();
    let mut message_ids: Vec<i64> = by_message.keys().copied().collect();
    message_ids.sort_unstable();
    for id in message_ids {
        let Some(found) = by_message.get(&id) else { continue };
        for &i in &found.superseded {
            outcomes[i] = ApplyOutcome::Stale;
        }
        let current = unambiguous(events, found.provider_message_id.as_deref(), &found.current).unwrap_or_default();
        let group: Vec<&StatusEvent> = current.iter().map(|&i| &events[i]).collect();
        // The contact's business-scoped id, from the latest receipt about the message that names one.
        let latest_bsuid = current
            .iter()
            .chain(&found.superseded)
            .map(|&i| &events[i])
            .filter(|e| e.recipient_bsuid.is_some())
            .max_by_key(|e| e.at)
            .and_then(|e| e.recipient_bsuid.as_deref());
        if let Some(bsuid) = latest_bsuid {
            bsuid_of.push((found.campaign, id, bsuid));
        }
        if group.is_empty() {
            continue;
        }
        if group.iter().any(|e| e.opts_out) {
            opting_out.push((found.campaign, id));
        }
        let (change, group_outcomes) = plan(found.status, found.marketing_requeues, &group, now);
        for (&i, outcome) in current.iter().zip(group_outcomes) {
            outcomes[i] = outcome;
        }
        // The latest pricing any receipt of the attempt gives (a stale one too: the
        // pricing is the attempt's, whatever its status).
        let pricing =
            group.iter().filter(|e| e.pricing.is_some()).max_by_key(|e| e.at).and_then(|e| e.pricing.as_ref());
        if change.is_some() || pricing.is_some() {
            update.push(
                found.campaign,
                id,
                found.marketing_requeues,
                group[0].provider_message_id.as_str(),
                change,
                pricing,
            );
        }
    }
    record_bsuids(tx, &bsuid_of).await?;
    Ok(Applied { outcomes, opting_out, updates: update })
}

/// The changes of a batch of messages, as columns for one `UPDATE ... FROM unnest`.
#[derive(Default)]
struct MessageUpdates<'a> {
    campaigns: Vec<Uuid>,
    ids: Vec<i64>,
    statuses: Vec<Option<&'static str>>,
    pids: Vec<&'a str>,
    codes: Vec<Option<String>>,
    titles: Vec<Option<String>>,
    entries: Vec<Value>,
    requeues: Vec<i16>,
    requeue_at: Vec<Option<DateTime<Utc>>>,
    categories: Vec<Option<&'a str>>,
    pricing_types: Vec<Option<&'a str>>,
}

impl<'a> MessageUpdates<'a> {
    fn push(
        &mut self,
        campaign: Uuid,
        id: i64,
        requeues: i16,
        pid: &'a str,
        change: Option<PlannedChange>,
        pricing: Option<&'a Pricing>,
    ) {
        let change = change.unwrap_or(PlannedChange { status: None, entries: vec![], error: None, requeue_at: None });
        self.campaigns.push(campaign);
        self.ids.push(id);
        self.statuses.push(change.status.map(MessageStatus::as_str));
        self.pids.push(pid);
        self.codes.push(change.error.as_ref().map(|e| e.code.clone()));
        self.titles.push(change.error.map(|e| e.title));
        self.entries.push(Value::Array(change.entries));
        self.requeues.push(requeues);
        self.requeue_at.push(change.requeue_at);
        self.categories.push(pricing.and_then(|p| p.category.as_deref()));
        self.pricing_types.push(pricing.and_then(|p| p.pricing_type.as_deref()));
    }

    /// One statement for the whole batch: the counter triggers fire once. A row whose
    /// status moves gets its entries as planned (a forward move is new by definition);
    /// a row that only gains a note (a late failure) gets only the entries it does not
    /// have yet, so a retried late failure is not noted twice. Pricing is the latest
    /// given: a receipt without it leaves it alone. A requeue drops the provider id
    /// and the pricing, which were the ended attempt's. The statement names the
    /// messages' campaigns (`$11`), so only their partitions are planned and locked.
    async fn apply(&self, tx: &mut sqlx::PgConnection) -> Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let mut partitions = self.campaigns.clone();
        partitions.sort_unstable();
        partitions.dedup();
        sqlx::query(
            r#"
            UPDATE campaign_messages m SET
                status = coalesce(v.status::message_status, m.status),
                provider_message_id = CASE WHEN v.requeue_at IS NOT NULL THEN NULL
                                           ELSE coalesce(m.provider_message_id, v.pid) END,
                last_error_code = CASE WHEN v.status IN ('failed', 'pending') THEN v.code ELSE m.last_error_code END,
                last_error_message = CASE WHEN v.status IN ('failed', 'pending') THEN nullif(v.title, '')
                                          ELSE m.last_error_message END,
                next_attempt_at = coalesce(v.requeue_at, m.next_attempt_at),
                marketing_requeues = m.marketing_requeues + CASE WHEN v.requeue_at IS NOT NULL THEN 1 ELSE 0 END,
                pricing_category = CASE WHEN v.requeue_at IS NOT NULL THEN NULL
                                        ELSE coalesce(v.category, m.pricing_category) END,
                pricing_type = CASE WHEN v.requeue_at IS NOT NULL THEN NULL
                                    ELSE coalesce(v.pricing_type, m.pricing_type) END,
                updated_at = now(),
                status_history = m.status_history || CASE WHEN v.status IS NOT NULL THEN v.entries ELSE coalesce(
                    (SELECT jsonb_agg(x.entry ORDER BY x.ord)
                     FROM jsonb_array_elements(v.entries) WITH ORDINALITY AS x(entry, ord)
                     WHERE NOT m.status_history @> jsonb_build_array(x.entry)),
                    '[]'::jsonb) END
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::smallint[],
                        $8::timestamptz[], $9::text[], $10::text[], $12::uuid[])
                 AS v(id, status, pid, code, title, entries, requeues, requeue_at, category, pricing_type, campaign)
            WHERE m.campaign_uid = ANY($11) AND m.campaign_uid = v.campaign AND m.id = v.id
              AND CASE WHEN v.requeue_at IS NOT NULL THEN m.marketing_requeues = v.requeues
                            AND m.status IN ('sending', 'unknown', 'sent')
                       WHEN v.status IS NOT NULL THEN message_transition_allowed(m.status, v.status::message_status)
                       ELSE NOT m.status_history @> v.entries
                            OR coalesce(v.category, m.pricing_category) IS DISTINCT FROM m.pricing_category
                            OR coalesce(v.pricing_type, m.pricing_type) IS DISTINCT FROM m.pricing_type END
            "#,
        )
        .bind(&self.ids)
        .bind(&self.statuses)
        .bind(&self.pids)
        .bind(&self.codes)
        .bind(&self.titles)
        .bind(&self.entries)
        .bind(&self.requeues)
        .bind(&self.requeue_at)
        .bind(&self.categories)
        .bind(&self.pricing_types)
        .bind(&partitions)
        .bind(&self.campaigns)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Stores the business-scoped user id receipts gave on the contacts of the messages
/// they matched (`(message id, bsuid)`), so that a later receipt or opt-out naming only
/// the BSUID finds the contact. A user who changes number gets a new BSUID: the
/// latest wins. Contacts are locked in id order, as the opt-outs lock them.
async fn record_bsuids(tx: &mut sqlx::PgConnection, bsuid_of: &[(Uuid, i64, &str)]) -> Result<()> {
    if bsuid_of.is_empty() {
        return Ok(());
    }
    let campaigns: Vec<Uuid> = bsuid_of.iter().map(|(campaign, _, _)| *campaign).collect();
    let ids: Vec<i64> = bsuid_of.iter().map(|(_, id, _)| *id).collect();
    let bsuids: Vec<&str> = bsuid_of.iter().map(|(_, _, bsuid)| *bsuid).collect();
    let mut partitions = campaigns.clone();
    partitions.sort_unstable();
    partitions.dedup();
    sqlx::query(
        r#"
        WITH v AS (
            SELECT DISTINCT ON (m.contact_id) m.contact_id, v.bsuid
            FROM unnest($1::bigint[], $2::text[], $3::uuid[]) AS v(message_id, bsuid, campaign)
            JOIN campaign_messages m
              ON m.campaign_uid = ANY($4) AND m.campaign_uid = v.campaign AND m.id = v.message_id
            ORDER BY m.contact_id, v.message_id DESC
        ), locked AS (
            SELECT c.id FROM contacts c JOIN v ON v.contact_id = c.id
            WHERE c.bsuid IS DISTINCT FROM v.bsuid
            ORDER BY c.id
            FOR UPDATE OF c
        )
        UPDATE contacts c SET bsuid = v.bsuid, updated_at = now()
        FROM v, locked l
        WHERE c.id = v.contact_id AND l.id = c.id
        "#,
    )
    .bind(&ids)
    .bind(&bsuids)
    .bind(&campaigns)
    .bind(&partitions)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The events of one message that may be applied to it. A message with a provider id
/// takes the events that carry that id. A message found without one (through our id or
/// its contact) takes the events only when they all carry the same provider id: two
/// different ids reaching one such message in a batch cannot both be its own, and which
/// one is cannot be told, so all of them stay unmatched (kept).
fn unambiguous<'a>(events: &[StatusEvent], pid: Option<&str>, indices: &'a [usize]) -> Option<&'a [usize]> {
    let mut ids = indices.iter().map(|&i| events[i].provider_message_id.as_str());
    let first = ids.next()?;
    let same = ids.all(|id| id == first);
    match pid {
        Some(pid) => (same && first == pid).then_some(indices),
        None => same.then_some(indices),
    }
}

/// Keeps the events that found no message (see [`sweep_unmatched`]). A receipt already
/// kept is kept once (the provider retries; the first copy stands).
async fn keep_unmatched(tx: &mut sqlx::PgConnection, events: &[StatusEvent], outcomes: &[ApplyOutcome]) -> Result<()> {
    let mut seen = HashSet::new();
    let unmatched: Vec<&StatusEvent> = events
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| **outcome == ApplyOutcome::UnknownId)
        .map(|(event, _)| event)
        .filter(|e| seen.insert((&e.organization, &e.provider_message_id, e.provider, &e.channel, e.status)))
        .collect();
    if unmatched.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&StatusEvent) -> Option<String>| unmatched.iter().map(|e| f(e)).collect::<Vec<_>>();
    sqlx::query(
        r#"
        INSERT INTO unmatched_receipts
            (organization, provider_message_id, provider, channel, status, at, error_code, error_title, message_id, recipient, opts_out,
             bsuid, pricing_category, pricing_type, campaign_uid)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                             $7::text[], $8::text[], $9::bigint[], $10::text[], $11::bool[], $12::text[], $13::text[], $14::text[],
                             $15::uuid[])
        ON CONFLICT DO NOTHING
        "#,
    )
    .bind(column(|e| Some(e.organization.clone())))
    .bind(column(|e| Some(e.provider_message_id.clone())))
    .bind(column(|e| Some(e.provider.as_str().to_owned())))
    .bind(column(|e| Some(e.channel.clone())))
    .bind(column(|e| Some(e.status.as_str().to_owned())))
    .bind(unmatched.iter().map(|e| e.at).collect::<Vec<_>>())
    .bind(column(|e| e.error.as_ref().map(|x| x.code.clone())))
    .bind(column(|e| e.error.as_ref().map(|x| x.title.clone())))
    .bind(unmatched.iter().map(|e| e.message_id).collect::<Vec<_>>())
    .bind(column(|e| e.recipient.clone()))
    .bind(unmatched.iter().map(|e| e.opts_out).collect::<Vec<_>>())
    .bind(column(|e| e.recipient_bsuid.clone()))
    .bind(column(|e| e.pricing.as_ref().and_then(|p| p.category.clone())))
    .bind(column(|e| e.pricing.as_ref().and_then(|p| p.pricing_type.clone())))
    .bind(unmatched.iter().map(|e| e.campaign).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What one [`sweep_unmatched`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Kept receipts that found their message and were applied (whatever the outcome:
    /// a kept `delivered` that meets a message already `read` is done with too).
    pub applied: u64,
    /// Kept receipts dropped for being older than the time they are kept.
    pub expired: u64,
}

/// Kept receipts looked at per transaction of a sweep.
const SWEEP_PAGE: i64 = 500;

/// Advisory lock key that lets one sweep run at a time across replicas.
const SWEEP_LOCK: i64 = 0x6469_7370_6172_6f01; // "disparo" + 1

/// Applies the kept receipts whose message has turned up (its provider id recorded, or
/// an `unknown` message of theirs resolvable), and drops those older than `max_age`.
/// Each page is one transaction that locks its messages before deleting what it
/// applied; a page that another replica is sweeping at the same moment is left to it.
pub async fn sweep_unmatched(pool: &PgPool, max_age: Duration) -> Result<SweepReport> {
    let max_age_secs = max_age.as_secs_f64();
    let mut db = super::Autocommit::open(pool).await?;
    let expired = sqlx::query("DELETE FROM unmatched_receipts WHERE received_at < now() - make_interval(secs => $1)")
        .bind(max_age_secs)
        .execute(db.conn())
        .await?
        .rows_affected();
    db.commit().await?;
    let mut report = SweepReport { applied: 0, expired };
    // keyset pagination, so receipts that still find nothing never hide later ones
    let mut after: Option<(DateTime<Utc>, String, String, String, String, String)> = None;
    loop {
        let mut tx = super::begin(pool).await?;
        let (locked,): (bool,) =
            sqlx::query_as("SELECT pg_try_advisory_xact_lock($1)").bind(SWEEP_LOCK).fetch_one(&mut *tx).await?;
        if !locked {
            return Ok(report);
        }
        let campaigns = sweep_campaigns(&mut tx, max_age).await?;
        let rows: Vec<KeptRow> = sqlx::query_as(
            r#"
            SELECT u.received_at, u.organization, u.provider_message_id, u.provider, u.channel, u.status,
                   u.at, u.error_code, u.error_title, u.message_id, u.recipient, u.opts_out,
                   u.bsuid, u.pricing_category, u.pricing_type, u.campaign_uid
            FROM unmatched_receipts u
            WHERE u.received_at >= now() - make_interval(secs => $1)
              AND ($2::timestamptz IS NULL
                   OR (u.received_at, u.organization, u.provider_message_id, u.provider, u.channel, u.status)
                      > ($2, $3, $4, $5, $6, $7))
              AND (EXISTS (SELECT 1 FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
                           WHERE x.campaign_uid = ANY($10)
                             AND (x.campaign_uid = u.campaign_uid OR u.campaign_uid IS NULL AND x.campaign_uid = ANY($11))
                             AND x.organization = u.organization AND x.provider_message_id = u.provider_message_id
                             AND k.channel = u.channel)
                   OR u.message_id IS NOT NULL AND EXISTS (
                           SELECT 1 FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
                           WHERE x.campaign_uid = ANY($10)
                             AND (x.campaign_uid = u.campaign_uid OR u.campaign_uid IS NULL AND x.campaign_uid = ANY($11))
                             AND x.id = u.message_id AND x.organization = u.organization AND k.channel = u.channel
                             AND (x.provider_message_id IS NULL
                                  OR x.marketing_requeues > 0
                                     AND x.status_history @> jsonb_build_array(jsonb_build_object($9::text, u.provider_message_id))))
                   OR u.bsuid IS NOT NULL AND EXISTS (
                           SELECT 1 FROM contacts c
                           JOIN campaign_messages x ON x.contact_id = c.id
                           JOIN campaigns k ON k.uid = x.campaign_uid
                           WHERE x.campaign_uid = ANY($10)
                             AND (x.campaign_uid = u.campaign_uid OR u.campaign_uid IS NULL AND x.campaign_uid = ANY($11))
                             AND c.organization = u.organization AND c.bsuid = u.bsuid
                             AND x.status = 'unknown' AND x.provider_message_id IS NULL AND x.organization = u.organization
                             AND k.channel = u.channel
                             AND x.updated_at BETWEEN u.at - make_interval(secs => $1) AND u.at + make_interval(secs => $1))
                   OR u.provider = 'evolution' AND u.recipient IS NOT NULL AND EXISTS (
                           SELECT 1 FROM campaign_messages x JOIN campaigns k ON k.uid = x.campaign_uid
                           WHERE x.campaign_uid = ANY($10)
                             AND (x.campaign_uid = u.campaign_uid OR u.campaign_uid IS NULL AND x.campaign_uid = ANY($11))
                             AND x.status = 'unknown' AND x.provider_message_id IS NULL AND x.organization = u.organization
                             AND k.channel = u.channel
                             AND x.updated_at BETWEEN u.at - make_interval(secs => $1) AND u.at + make_interval(secs => $1)))
            ORDER BY u.received_at, u.organization, u.provider_message_id, u.provider, u.channel, u.status
            LIMIT $8
            "#,
        )
        .bind(max_age_secs)
        .bind(after.as_ref().map(|a| a.0))
        .bind(after.as_ref().map(|a| a.1.as_str()))
        .bind(after.as_ref().map(|a| a.2.as_str()))
        .bind(after.as_ref().map(|a| a.3.as_str()))
        .bind(after.as_ref().map(|a| a.4.as_str()))
        .bind(after.as_ref().map(|a| a.5.as_str()))
        .bind(SWEEP_PAGE)
        .bind(REQUEUED_PROVIDER_ID_KEY)
        .bind(&campaigns.all)
        .bind(&campaigns.unnamed)
        .fetch_all(&mut *tx)
        .await?;
        let full_page = rows.len() as i64 >= SWEEP_PAGE;
        if let Some(last) = rows.last() {
            after = Some((
                last.received_at,
                last.organization.clone(),
                last.provider_message_id.clone(),
                last.provider.clone(),
                last.channel.clone(),
                last.status.clone(),
            ));
        }
        let kept: Vec<(&KeptRow, StatusEvent)> =
            rows.iter().filter_map(|row| row.event().map(|event| (row, event))).collect();
        let events: Vec<StatusEvent> = kept.iter().map(|(_, event)| event.clone()).collect();
        let applied = apply_events(&mut tx, &events, &campaigns).await?;
        let done: Vec<&KeptRow> = kept
            .iter()
            .zip(&applied.outcomes)
            .filter(|(_, outcome)| **outcome != ApplyOutcome::UnknownId)
            .map(|((row, _), _)| *row)
            .collect();
        apply_opt_outs(&mut tx, &[], &applied.opting_out).await?;
        applied.updates.apply(&mut tx).await?;
        if !done.is_empty() {
            let key = |f: fn(&KeptRow) -> &str| done.iter().map(|row| f(row)).collect::<Vec<&str>>();
            sqlx::query(
                r#"
                DELETE FROM unmatched_receipts u
                USING unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS d(org, pid, provider, channel, status)
                WHERE (u.organization, u.provider_message_id, u.provider, u.channel, u.status) = (d.org, d.pid, d.provider, d.channel, d.status)
                "#,
            )
            .bind(key(|r| &r.organization))
            .bind(key(|r| &r.provider_message_id))
            .bind(key(|r| &r.provider))
            .bind(key(|r| &r.channel))
            .bind(key(|r| &r.status))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        report.applied += done.len() as u64;
        if !full_page {
            return Ok(report);
        }
    }
}

/// The campaigns kept receipts may belong to: those they name, and for those that
/// name none, the campaigns of their organization and channel that may still take
/// receipts, with the horizon widened by `max_age` (a kept receipt was posted up to
/// `max_age` ago, when its campaign was within [`RECEIPT_HORIZON`]).
async fn sweep_campaigns(tx: &mut sqlx::PgConnection, max_age: Duration) -> Result<Candidates> {
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"SELECT k.uid, FALSE FROM campaigns k JOIN campaign_counters n ON n.campaign_uid = k.uid
           WHERE (k.organization, k.channel) IN (
                     SELECT organization, channel FROM unmatched_receipts
                     WHERE campaign_uid IS NULL AND received_at >= now() - make_interval(secs => $1))
             AND {TAKES_RECEIPTS}
           UNION
           SELECT campaign_uid, TRUE FROM unmatched_receipts
           WHERE campaign_uid IS NOT NULL AND received_at >= now() - make_interval(secs => $2)"#
    )))
    .bind(max_age.as_secs_f64())
    .bind(max_age.as_secs_f64())
    .bind((RECEIPT_HORIZON + max_age).as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let named = rows.iter().filter(|(_, named)| *named).map(|(uid, _)| *uid);
    let unnamed = rows.iter().filter(|(_, named)| !*named).map(|(uid, _)| *uid).collect();
    Ok(Candidates::new(named, unnamed))
}

/// A row of `unmatched_receipts`.
#[derive(Debug, sqlx::FromRow)]
struct KeptRow {
    received_at: DateTime<Utc>,
    organization: String,
    provider_message_id: String,
    provider: String,
    channel: String,
    status: String,
    at: DateTime<Utc>,
    error_code: Option<String>,
    error_title: Option<String>,
    message_id: Option<i64>,
    recipient: Option<String>,
    opts_out: bool,
    bsuid: Option<String>,
    pricing_category: Option<String>,
    pricing_type: Option<String>,
    campaign_uid: Option<Uuid>,
}

impl KeptRow {
    /// The event as it was posted (None for a row no version of this code wrote).
    fn event(&self) -> Option<StatusEvent> {
        Some(StatusEvent {
            provider: Provider::parse(&self.provider)?,
            organization: self.organization.clone(),
            channel: self.channel.clone(),
            provider_message_id: self.provider_message_id.clone(),
            message_id: self.message_id,
            campaign: self.campaign_uid,
            status: ReceiptStatus::parse(&self.status)?,
            at: self.at,
            error: self
                .error_code
                .clone()
                .map(|code| ProviderError { code, title: self.error_title.clone().unwrap_or_default() }),
            recipient: self.recipient.clone(),
            opts_out: self.opts_out,
            recipient_bsuid: self.bsuid.clone(),
            pricing: (self.pricing_category.is_some() || self.pricing_type.is_some())
                .then(|| Pricing { category: self.pricing_category.clone(), pricing_type: self.pricing_type.clone() }),
        })
    }
}

/// The E.164 forms a WhatsApp id may stand for. Brazilian mobile numbers registered
/// before the ninth digit was added keep an 8-digit WhatsApp id (`55 DD 8xxxxxxx`)
/// while the contact list holds the 9-digit number (`+55 DD 98xxxxxxx`).
pub(crate) fn phone_candidates(wa_id: &str) -> (String, Option<String>) {
    let digits: String = wa_id.chars().filter(char::is_ascii_digit).collect();
    let primary = format!("+{digits}");
    let alternative = match digits.strip_prefix("55") {
        Some(rest) if rest.len() == 10 && rest[2..].starts_with(['6', '7', '8', '9']) => {
            Some(format!("+55{}9{}", &rest[..2], &rest[2..]))
        }
        _ => None,
    };
    (primary, alternative)
}

/// Marks opted out the contacts the opt-outs name (by phone, WhatsApp id or
/// business-scoped user id) and the
/// contacts of the messages (campaign, id) in `messages`, locking them in id order
/// first. The messages are read in their campaigns' partitions alone.
async fn apply_opt_outs(
    tx: &mut sqlx::PgConnection,
    opt_outs: &[OptOut],
    messages: &[(Uuid, i64)],
) -> Result<Vec<bool>> {
    let mut matched = vec![false; opt_outs.len()];
    if opt_outs.is_empty() && messages.is_empty() {
        return Ok(matched);
    }
    let message_ids: Vec<i64> = messages.iter().map(|(_, id)| *id).collect();
    let mut partitions: Vec<Uuid> = messages.iter().map(|(campaign, _)| *campaign).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let orgs: Vec<&str> = opt_outs.iter().map(|o| o.organization.as_str()).collect();
    let mut phones = Vec::with_capacity(opt_outs.len());
    let mut alternatives = Vec::with_capacity(opt_outs.len());
    let mut wa_ids = Vec::with_capacity(opt_outs.len());
    for opt_out in opt_outs {
        let (phone, alternative) = match opt_out.wa_id.as_deref().map(phone_candidates) {
            Some((phone, alternative)) => (Some(phone), alternative),
            None => (None, None),
        };
        phones.push(phone);
        alternatives.push(alternative);
        wa_ids.push(opt_out.wa_id.as_ref().map(|id| id.chars().filter(char::is_ascii_digit).collect::<String>()));
    }
    let bsuids: Vec<Option<&str>> = opt_outs.iter().map(|o| o.bsuid.as_deref()).collect();
    let rows: Vec<(i64,)> = sqlx::query_as(
        r#"
        WITH v AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $6::text[]) WITH ORDINALITY
                AS v(org, phone, alt_phone, wa_id, bsuid, idx)
        ), matched AS (
            SELECT v.idx, c.id
            FROM v JOIN contacts c ON c.organization = v.org
             AND (c.phone = v.phone OR c.phone = v.alt_phone OR c.whatsapp_id = v.wa_id OR c.bsuid = v.bsuid)
        ), locked AS (
            SELECT c.id FROM contacts c
            WHERE (c.id IN (SELECT id FROM matched)
                   OR c.id IN (SELECT m.contact_id FROM campaign_messages m WHERE m.campaign_uid = ANY($7) AND m.id = ANY($5)))
              AND NOT c.opted_out
            ORDER BY c.id
            FOR UPDATE
        ), marked AS (
            UPDATE contacts c SET opted_out = TRUE, opted_out_at = coalesce(c.opted_out_at, now()), updated_at = now()
            FROM locked l WHERE c.id = l.id
        )
        SELECT DISTINCT idx FROM matched
        "#,
    )
    .bind(&orgs)
    .bind(&phones)
    .bind(&alternatives)
    .bind(&wa_ids)
    .bind(&message_ids)
    .bind(&bsuids)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await?;
    for (idx,) in rows {
        if let Some(slot) = usize::try_from(idx - 1).ok().and_then(|i| matched.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(matched)
}

/// The plainest batched status update of `campaign_messages`: one `UPDATE ... FROM
/// unnest` by provider id, with the table's indexes and triggers but without the
/// locking read, the history or the ordering rules of [`apply`]. For the benchmark only,
/// to show what the schema itself costs beside what `apply` adds; it trusts that every
/// move is allowed (the schema still refuses any that is not).
pub(crate) async fn baseline_update(
    pool: &PgPool,
    organization: &str,
    provider_ids: &[String],
    status: ReceiptStatus,
) -> Result<u64> {
    let result = sqlx::query(
        r#"
        UPDATE campaign_messages m SET status = $3::message_status, updated_at = now()
        FROM unnest($2::text[]) AS v(pid)
        WHERE m.organization = $1 AND m.provider_message_id = v.pid
          AND message_transition_allowed(m.status, $3::message_status)
        "#,
    )
    .bind(organization)
    .bind(provider_ids)
    .bind(status.as_str())
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event(status: ReceiptStatus, at: i64) -> StatusEvent {
        StatusEvent {
            provider: Provider::Meta,
            organization: "acme".into(),
            channel: "wa".into(),
            provider_message_id: "wamid.1".into(),
            message_id: None,
            campaign: None,
            status,
            at: Utc.timestamp_opt(at, 0).single().unwrap_or_default(),
            error: (status == ReceiptStatus::Failed)
                .then(|| ProviderError { code: "131026".into(), title: "Message undeliverable".into() }),
            recipient: None,
            opts_out: false,
            recipient_bsuid: None,
            pricing: None,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_750_300_000, 0).single().unwrap_or_default()
    }

    use ApplyOutcome::*;
    use MessageStatus as M;
    use ReceiptStatus as R;

    #[test]
    fn receipts_move_forward_only() {
        // (current, receipts in arrival order, final status, outcomes, history statuses)
        type Case = (M, Vec<(R, i64)>, M, Vec<ApplyOutcome>, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            (M::Sent, vec![(R::Delivered, 2)], M::Delivered, vec![Applied], vec!["delivered"]),
            (M::Sent, vec![(R::Sent, 1)], M::Sent, vec![Duplicate], vec![]),
            (M::Read, vec![(R::Delivered, 2)], M::Read, vec![Stale], vec![]),
            (M::Sending, vec![(R::Read, 3)], M::Read, vec![Applied], vec!["read"]),
            (M::Unknown, vec![(R::Failed, 3)], M::Failed, vec![Applied], vec!["failed"]),
            // A5.5: read, delivered, sent for one WAMID, currently sent
            (
                M::Sent,
                vec![(R::Read, 10), (R::Delivered, 2), (R::Sent, 1)],
                M::Read,
                vec![Applied, Applied, Duplicate],
                vec!["delivered", "read"],
            ),
            (
                M::Sending,
                vec![(R::Read, 10), (R::Delivered, 2), (R::Sent, 1)],
                M::Read,
                vec![Applied, Applied, Applied],
                vec!["sent", "delivered", "read"],
            ),
            // duplicates within one batch
            (
                M::Sent,
                vec![(R::Delivered, 2), (R::Delivered, 2)],
                M::Delivered,
                vec![Applied, Duplicate],
                vec!["delivered"],
            ),
            // failed after delivered: noted, not moved
            (M::Delivered, vec![(R::Failed, 5)], M::Delivered, vec![Stale], vec!["failed"]),
            (
                M::Sent,
                vec![(R::Failed, 5), (R::Delivered, 4)],
                M::Delivered,
                vec![Stale, Applied],
                vec!["delivered", "failed"],
            ),
            (M::Sent, vec![(R::Failed, 5), (R::Sent, 4)], M::Failed, vec![Applied, Duplicate], vec!["failed"]),
            // terminal and never-sent messages do not move
            (M::Failed, vec![(R::Delivered, 5)], M::Failed, vec![Stale], vec![]),
            (M::Failed, vec![(R::Failed, 5)], M::Failed, vec![Duplicate], vec![]),
            (M::Pending, vec![(R::Sent, 5)], M::Pending, vec![Stale], vec![]),
            (M::Cancelled, vec![(R::Read, 5)], M::Cancelled, vec![Stale], vec![]),
        ];
        for (current, receipts, expected, expected_outcomes, history) in cases {
            let events: Vec<StatusEvent> = receipts.iter().map(|(s, at)| event(*s, *at)).collect();
            let refs: Vec<&StatusEvent> = events.iter().collect();
            let (change, outcomes) = plan(current, 0, &refs, now());
            assert_eq!(outcomes, expected_outcomes, "{current:?} {receipts:?}");
            let final_status = change.as_ref().and_then(|c| c.status).unwrap_or(current);
            assert_eq!(final_status, expected, "{current:?} {receipts:?}");
            let recorded: Vec<&str> = change
                .as_ref()
                .map(|c| c.entries.iter().filter_map(|e| e["status"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(recorded, history, "{current:?} {receipts:?}");
            if let Some(change) = &change {
                assert_eq!(change.status.is_none(), final_status == current);
            }
        }
    }

    #[test]
    fn a_failure_records_code_title_and_provider_time() {
        let events = [event(R::Failed, 1_750_263_785)];
        let (change, _) = plan(M::Sent, 0, &[&events[0]], now());
        let change = change.unwrap();
        assert_eq!(change.error, Some(ProviderError { code: "131026".into(), title: "Message undeliverable".into() }));
        assert_eq!(
            change.entries,
            vec![
                serde_json::json!({"status": "failed", "at": "2025-06-18T16:23:05Z", "source": "webhook", "code": "131026", "title": "Message undeliverable"})
            ]
        );
        let mut bare = event(R::Failed, 1);
        bare.error = None;
        let (change, _) = plan(M::Sent, 0, &[&bare], now());
        assert_eq!(change.unwrap().error.unwrap().code, UNSPECIFIED_ERROR_CODE);
    }

    fn marketing_limit(at: i64) -> StatusEvent {
        StatusEvent {
            error: Some(ProviderError { code: MARKETING_LIMIT_CODE.into(), title: "healthy ecosystem".into() }),
            ..event(R::Failed, at)
        }
    }

    #[test]
    fn a_131049_puts_the_message_back_until_the_fourth() {
        for current in [M::Sent, M::Sending, M::Unknown] {
            let failed = marketing_limit(7);
            let (change, outcomes) = plan(current, 0, &[&failed], now());
            let change = change.unwrap();
            assert_eq!(outcomes, vec![Applied]);
            assert_eq!(change.status, Some(M::Pending), "{current:?}");
            assert_eq!(change.requeue_at, Some(now() + chrono::Duration::hours(24)));
            assert_eq!(change.error.as_ref().map(|e| e.code.as_str()), Some("131049"));
            assert_eq!(
                change.entries,
                vec![serde_json::json!({
                    "status": "pending", "at": "1970-01-01T00:00:07Z", "source": "webhook", "code": "131049",
                    "title": "healthy ecosystem", "requeue": 1, "retryAt": "2025-06-20T02:26:40Z",
                    "requeuedProviderId": "wamid.1"
                })]
            );
        }
        let (change, _) = plan(M::Sent, 2, &[&marketing_limit(7)], now());
        assert_eq!(change.unwrap().requeue_at, Some(now() + chrono::Duration::hours(96)));
        // the fourth fails as any permanent error
        let (change, outcomes) = plan(M::Sent, 3, &[&marketing_limit(7)], now());
        let change = change.unwrap();
        assert_eq!((change.status, change.requeue_at, outcomes), (Some(M::Failed), None, vec![Applied]));
        assert_eq!(change.entries[0]["status"], "failed");
        // after delivery, only noted
        let (change, outcomes) = plan(M::Delivered, 0, &[&marketing_limit(7)], now());
        assert_eq!((change.as_ref().and_then(|c| c.status), outcomes), (None, vec![Stale]));
        assert_eq!(change.unwrap().requeue_at, None);
    }

    #[test]
    fn receipts_of_a_requeued_attempt_change_nothing() {
        // in one batch: what the attempt said before the 131049 applies, a repeat of it is a duplicate
        let events = [marketing_limit(9), event(R::Sent, 3), marketing_limit(9)];
        let refs: Vec<&StatusEvent> = events.iter().collect();
        let (change, outcomes) = plan(M::Sending, 0, &refs, now());
        let change = change.unwrap();
        assert_eq!(outcomes, vec![Applied, Applied, Duplicate]);
        assert_eq!(change.status, Some(M::Pending));
        let recorded: Vec<&str> = change.entries.iter().filter_map(|e| e["status"].as_str()).collect();
        assert_eq!(recorded, vec!["sent", "pending"]);
        // later: a pending message takes no receipt (a stale `sent`, a repeated 131049)
        for late in [event(R::Sent, 3), marketing_limit(9), event(R::Read, 11)] {
            let (change, outcomes) = plan(M::Pending, 1, &[&late], now());
            assert_eq!((change, outcomes), (None, vec![Stale]), "{late:?}");
        }
    }

    #[test]
    fn the_rust_transition_rule_matches_the_schema() {
        // The schema's function, transcribed: keep both in step.
        let allowed = [
            ("pending", "sending failed cancelled skipped"),
            ("sending", "pending unknown sent delivered read failed cancelled"),
            ("unknown", "sent delivered read failed"),
            ("sent", "delivered read failed"),
            ("delivered", "read"),
        ];
        let all = ["pending", "sending", "unknown", "sent", "delivered", "read", "failed", "cancelled", "skipped"];
        for old in all {
            for new in all {
                let expected = allowed.iter().any(|(o, ns)| *o == old && ns.split(' ').any(|n| n == new));
                assert_eq!(M::parse(old).unwrap().can_move_to(M::parse(new).unwrap()), expected, "{old} -> {new}");
            }
        }
    }

    #[test]
    fn a_message_without_a_provider_id_takes_events_of_one_id_only() {
        let with_id = |pid: &str| StatusEvent { provider_message_id: pid.into(), ..event(R::Delivered, 1) };
        let events = [with_id("A"), with_id("A"), with_id("B")];
        assert_eq!(unambiguous(&events, None, &[0, 1]), Some(&[0, 1][..]));
        assert_eq!(unambiguous(&events, None, &[0, 2]), None, "two ids for one message: neither is applied");
        assert_eq!(unambiguous(&events, Some("A"), &[0, 1]), Some(&[0, 1][..]));
        assert_eq!(unambiguous(&events, Some("B"), &[0]), None);
        assert_eq!(unambiguous(&events, None, &[]), None);
    }

    #[test]
    fn brazilian_whatsapp_ids_without_the_ninth_digit_match_the_contact() {
        assert_eq!(phone_candidates("551188887777"), ("+551188887777".into(), Some("+5511988887777".into())));
        assert_eq!(phone_candidates("5511988887777"), ("+5511988887777".into(), None));
        assert_eq!(phone_candidates("551133334444"), ("+551133334444".into(), None), "landlines keep 8 digits");
        assert_eq!(phone_candidates("15550123456"), ("+15550123456".into(), None));
    }
}
