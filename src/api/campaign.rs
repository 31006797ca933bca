//! The `Campaign` custom resource: who to reach, what to send, through which Channel,
//! and when. The CEL rules here are the admission contract: the API server rejects
//! what would make a campaign ambiguous or rewrite history.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a Campaign.
// kube-derive's `printcolumn(...)` repeats `type_ = ...` once per column, which clippy
// reads as a duplicated attribute; the columns are distinct.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "disparo.io",
    version = "v1alpha1",
    kind = "Campaign",
    namespaced,
    status = "CampaignStatus",
    shortname = "camp",
    category = "disparo",
    doc = "A WhatsApp messaging campaign: an audience, a message and a Channel, sent in parallel batch Jobs within the channel's rate limits.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.percentage"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.messages.total"),
    printcolumn(name = "Sent", type_ = "integer", json_path = ".status.messages.sent"),
    printcolumn(name = "Delivered", type_ = "integer", json_path = ".status.messages.delivered"),
    printcolumn(name = "Read", type_ = "integer", json_path = ".status.messages.read"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.messages.failed"),
    printcolumn(
        name = "Cost",
        type_ = "number",
        json_path = ".status.cost.estimated",
        description = "estimated cost of the delivered messages, in the rate card's currency"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!(has(oldSelf.cancel) && oldSelf.cancel) || (has(self.cancel) && self.cancel)").message("spec.cancel cannot be undone: a cancelled campaign stays cancelled (create a new campaign instead)").field_path(".cancel"))]
#[x_kube(validation = Rule::new("(has(oldSelf.suspend) && oldSelf.suspend) || self.message == oldSelf.message").message("spec.message cannot change while the campaign is not suspended: set spec.suspend to true, edit, then resume").field_path(".message"))]
#[x_kube(validation = Rule::new("(has(oldSelf.suspend) && oldSelf.suspend) || self.audience == oldSelf.audience").message("spec.audience cannot change while the campaign is not suspended: set spec.suspend to true, edit, then resume").field_path(".audience"))]
#[x_kube(validation = Rule::new("(has(oldSelf.suspend) && oldSelf.suspend) || self.channelRef == oldSelf.channelRef").message("spec.channelRef cannot change while the campaign is not suspended: set spec.suspend to true, edit, then resume").field_path(".channelRef"))]
#[serde(rename_all = "camelCase")]
pub struct CampaignSpec {
    /// The Channel (same namespace) the campaign sends through.
    pub channel_ref: ChannelRef,
    /// What to send: a Meta template or plain text.
    pub message: MessageSpec,
    /// Who receives it. Frozen into Postgres when the campaign first starts; later edits
    /// are reported in status, not applied.
    pub audience: Audience,
    /// When to send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Pause (true) or resume (false). A campaign created suspended is a Draft. Edits of
    /// the message, channel or retry policy made while suspended apply to every message
    /// sent after the resume. Pauses the operator decides itself (failure threshold,
    /// provider refusals) live in status, never here: `kubectl disparo resume` lifts them.
    #[serde(default)]
    pub suspend: bool,
    /// Stop for good: unsent messages are cancelled. Cannot be set back to false.
    #[serde(default)]
    pub cancel: bool,
    /// How the sending Job is shaped.
    #[serde(default)]
    pub execution: Execution,
    /// How failed sends are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Pauses the campaign when failures run away instead of burning the audience.
    #[serde(default)]
    pub failure_threshold: FailureThreshold,
    /// What happens to the campaign's messages in Postgres when the Campaign is deleted.
    #[serde(default)]
    pub retention: Retention,
    /// A cost limit, applied with the rate card (see `kubectl disparo status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// A per-contact marketing frequency cap across the namespace's campaigns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_cap: Option<FrequencyCap>,
}

/// Reference to a Channel in the Campaign's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelRef {
    /// Name of the Channel.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The message. Exactly one of `template` or `text`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.template) != has(self.text)").message("set exactly one of message.template or message.text"))]
#[serde(rename_all = "camelCase")]
pub struct MessageSpec {
    /// An approved Meta template (the only kind Meta allows outside the 24-hour window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateMessage>,
    /// Plain text (Evolution, or Meta inside the customer-service window). Variables such
    /// as `{{contact.name}}` are rendered per contact.
    #[schemars(length(min = 1, max = 4096))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A Meta message template with per-contact parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMessage {
    /// Template name as approved in WhatsApp Manager.
    #[schemars(length(min = 1, max = 512))]
    pub name: String,
    /// Template language code, e.g. `pt_BR` or `en_US`.
    #[schemars(length(min = 2, max = 16))]
    pub language: String,
    /// Body parameters in order (`{{1}}`, `{{2}}`, ...). Each may use `{{contact.name}}`,
    /// `{{contact.phone}}` or `{{contact.attributes.KEY}}`.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub body_parameters: Vec<TemplateParameter>,
    /// The template's category as approved by Meta: what Meta charges for it, and whether
    /// the channel's quality policy holds it back (marketing only).
    #[serde(default)]
    pub category: TemplateCategory,
}

/// A Meta template category (docs/providers.md, "Pricing in status webhooks").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum TemplateCategory {
    /// Promotions and offers: counted by Meta's per-user marketing limit, held back
    /// first when a number's quality drops.
    #[default]
    #[serde(alias = "MARKETING")]
    Marketing,
    /// Updates about something the user did or asked for.
    #[serde(alias = "UTILITY")]
    Utility,
    /// One-time passwords.
    #[serde(alias = "AUTHENTICATION")]
    Authentication,
}

impl TemplateCategory {
    /// The name of Meta's template webhooks (`message_template_category`).
    pub fn as_meta(self) -> &'static str {
        match self {
            TemplateCategory::Marketing => "MARKETING",
            TemplateCategory::Utility => "UTILITY",
            TemplateCategory::Authentication => "AUTHENTICATION",
        }
    }

    /// The name Meta uses in `pricing.category` and rate cards.
    pub(crate) fn as_pricing(self) -> &'static str {
        match self {
            TemplateCategory::Marketing => "marketing",
            TemplateCategory::Utility => "utility",
            TemplateCategory::Authentication => "authentication",
        }
    }
}

/// At most `messages` marketing messages per contact in `days` days, across every
/// campaign of the namespace: when the audience is frozen, contacts at the cap are
/// `skipped`, never sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrequencyCap {
    /// Marketing messages allowed per contact in the period.
    #[schemars(range(min = 1, max = 1000))]
    pub messages: u32,
    /// The period, in days.
    #[schemars(range(min = 1, max = 90))]
    pub days: u32,
}

/// A spending limit for the campaign, in the rate card's currency.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Preflight refuses to start the campaign (Stalled: PreflightFailed) when the
    /// audience's estimated cost, with the rate card, reaches this amount.
    #[schemars(range(min = 0.0))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
}

/// One template parameter value (a literal or a contact variable).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct TemplateParameter(#[schemars(length(min = 1, max = 1024))] pub String);

/// Who receives the campaign. Exactly one kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.allContacts), has(self.tags), has(self.segment), has(self.contacts), has(self.fromCampaign)].filter(x, x).size() == 1").message("set exactly one audience kind: allContacts, tags, segment, contacts or fromCampaign"))]
#[serde(rename_all = "camelCase")]
pub struct Audience {
    /// Every contact of the organization (namespace) that has not opted out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_contacts: Option<bool>,
    /// Contacts selected by their tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagSelector>,
    /// Contacts selected by their attributes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    /// An explicit list of phone numbers (E.164) of existing contacts.
    #[schemars(length(min = 1, max = 5000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contacts: Option<Vec<PhoneNumber>>,
    /// Contacts of another campaign's messages, e.g. only the failed ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_campaign: Option<FromCampaign>,
}

/// An E.164 phone number such as `+5511999999999`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct PhoneNumber(#[schemars(length(max = 16), pattern(r"^\+[1-9][0-9]{6,14}$"))] pub String);

/// A tag (contacts carry a set of them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Tag(#[schemars(length(min = 1, max = 63))] pub String);

/// Select contacts by tags. All given clauses must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[x_kube(validation = Rule::new("size(self.anyOf) + size(self.allOf) > 0").message("tags needs at least one tag in anyOf or allOf"))]
#[serde(rename_all = "camelCase")]
pub struct TagSelector {
    /// The contact has at least one of these tags.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub any_of: Vec<Tag>,
    /// The contact has every one of these tags.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub all_of: Vec<Tag>,
    /// The contact has none of these tags.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub none_of: Vec<Tag>,
}

/// Select contacts by attribute filters; all filters must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Segment {
    /// Filters on `contact.attributes`.
    #[schemars(length(min = 1, max = 20))]
    pub attributes: Vec<AttributeFilter>,
}

/// One filter on a contact attribute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.operator == 'Exists' || self.operator == 'DoesNotExist' || size(self.values) > 0").message("operators In, NotIn need at least one value"))]
#[serde(rename_all = "camelCase")]
pub struct AttributeFilter {
    /// Attribute key, e.g. `city`.
    #[schemars(length(min = 1, max = 128))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: AttributeOperator,
    /// Values compared as strings.
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub values: Vec<AttributeValue>,
}

/// A value compared with an attribute (as a string).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct AttributeValue(#[schemars(length(max = 256))] pub String);

/// Operators of an attribute filter, as in Kubernetes label selectors.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttributeOperator {
    /// The attribute's value is one of `values`.
    In,
    /// The attribute is missing or its value is none of `values`.
    NotIn,
    /// The attribute is present.
    Exists,
    /// The attribute is absent.
    DoesNotExist,
}

/// Reach the contacts of another campaign's messages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromCampaign {
    /// Name of the source Campaign in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Which of its messages to take, by final status (default: `failed`).
    #[serde(default = "default_from_statuses")]
    #[schemars(length(min = 1, max = 8))]
    pub statuses: Vec<SourceMessageStatus>,
    /// Only the messages whose last error has one of these codes (provider codes such
    /// as `131026`, or Disparo's own such as `render`). Absent or empty, the statuses
    /// alone decide. Applied when the audience is frozen, like the statuses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub error_codes: Vec<ErrorCode>,
}

/// An error code as messages record it: Meta's numeric codes (`131026`), Evolution's
/// HTTP answers (`http_500`), or Disparo's own (`render`, `max_attempts`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct ErrorCode(#[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9_.-]+$"))] pub String);

impl ErrorCode {
    /// Checks a code as the CRD schema does (1 to 64 letters, digits, `_`, `.`, `-`),
    /// for the command line that fills `errorCodes` and filters by code.
    pub fn parse(code: &str) -> Result<ErrorCode, String> {
        let code = code.trim();
        let fits = (1..=64).contains(&code.len())
            && code.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if fits {
            Ok(ErrorCode(code.to_owned()))
        } else {
            Err(format!("{code:?} is not an error code (1 to 64 letters, digits, '_', '.' or '-', e.g. 131026)"))
        }
    }
}

fn default_from_statuses() -> Vec<SourceMessageStatus> {
    vec![SourceMessageStatus::Failed]
}

/// A message status a `fromCampaign` audience selects on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceMessageStatus {
    /// Failed permanently or after the last retry.
    Failed,
    /// Sent but never confirmed delivered.
    Sent,
    /// Delivered but never read.
    Delivered,
    /// Read.
    Read,
    /// Outcome unknown (the request may or may not have reached the provider).
    Unknown,
    /// Never sent because the campaign was cancelled.
    Cancelled,
}

impl SourceMessageStatus {
    /// Every status, in the order the CRD lists them.
    pub const ALL: [SourceMessageStatus; 6] = [
        SourceMessageStatus::Failed,
        SourceMessageStatus::Sent,
        SourceMessageStatus::Delivered,
        SourceMessageStatus::Read,
        SourceMessageStatus::Unknown,
        SourceMessageStatus::Cancelled,
    ];

    /// The name the CRD uses (`failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMessageStatus::Failed => "failed",
            SourceMessageStatus::Sent => "sent",
            SourceMessageStatus::Delivered => "delivered",
            SourceMessageStatus::Read => "read",
            SourceMessageStatus::Unknown => "unknown",
            SourceMessageStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the CRD's name, or says which names there are.
    pub fn parse(label: &str) -> Result<SourceMessageStatus, String> {
        let label = label.trim();
        Self::ALL.into_iter().find(|s| s.as_str() == label).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
            format!("{label:?} is not a status a campaign can be aimed at: one of {}", names.join(", "))
        })
    }
}

/// When the campaign sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Do not start before this instant (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_at: Option<Time>,
    /// Only send inside this daily window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<SendWindow>,
}

/// A daily sending window in a time zone, e.g. 09:00–18:00 America/Sao_Paulo.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.start != self.end").message("window start and end must differ"))]
#[serde(rename_all = "camelCase")]
pub struct SendWindow {
    /// Opening time, `HH:MM` (24 h).
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')").message("start must be HH:MM"))]
    pub start: String,
    /// Closing time, `HH:MM` (24 h). Before `start` means the window spans midnight.
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')").message("end must be HH:MM"))]
    pub end: String,
    /// IANA time zone, e.g. `America/Sao_Paulo`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// Days of the week the window opens (default: every day).
    #[serde(default)]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// A day of the week.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

/// The largest batch a Campaign may ask for: one sender pod sends at most this many
/// messages.
pub(crate) const MAX_BATCH_SIZE: u32 = 10_000;

/// Shape of the sending Job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    /// Messages per batch (one Job index each).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
    /// Batches sent at the same time (sender pods).
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: u32,
    /// Pod restarts allowed per batch before that batch counts as failed.
    #[serde(default = "default_backoff_limit_per_index")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit_per_index: u32,
    /// Resources of each sender pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            parallelism: default_parallelism(),
            backoff_limit_per_index: default_backoff_limit_per_index(),
            resources: None,
        }
    }
}

fn default_batch_size() -> u32 {
    100
}
fn default_parallelism() -> u32 {
    2
}
fn default_backoff_limit_per_index() -> u32 {
    3
}

/// Retries of failed sends worth retrying (the provider refused the message for a
/// reason that may pass), with exponential backoff and jitter. The defaults are the
/// reference schedule: a send that keeps failing is retried after 60 s, 120 s and
/// 240 s, then failed for good.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.maxDelaySeconds >= self.baseDelaySeconds").message("retry.maxDelaySeconds must be at least baseDelaySeconds"))]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Sends per message, the first one included: the default 4 is the first send and
    /// up to 3 retries. When the last one fails too, the message is failed. A send
    /// whose fate is unknown (the provider may have accepted it) is never retried, and
    /// channel rate limits spend no attempt.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles before each further retry (60, 120, 240
    /// seconds by default). Jitter adds 0 to 20 % to each delay, never less; a wait the
    /// provider asks for (`Retry-After`, a documented wait) replaces the delay.
    #[serde(default = "default_base_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub base_delay_seconds: u32,
    /// Longest delay before jitter (which can add up to 20 % to it).
    #[serde(default = "default_max_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_delay_seconds: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            base_delay_seconds: default_base_delay(),
            max_delay_seconds: default_max_delay(),
        }
    }
}

/// The first send and three retries: the reference's 60 s, 120 s, 240 s.
fn default_max_attempts() -> u32 {
    4
}
fn default_base_delay() -> u32 {
    60
}
fn default_max_delay() -> u32 {
    3600
}

/// Pause when the failure ratio passes `maxFailurePercent` after `minSample` finished messages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureThreshold {
    /// Highest tolerated percentage of failed among finished messages.
    #[serde(default = "default_max_failure_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub max_failure_percent: u32,
    /// Finished messages needed before the ratio is judged.
    #[serde(default = "default_min_sample")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_sample: u32,
}

impl Default for FailureThreshold {
    fn default() -> Self {
        Self { max_failure_percent: default_max_failure_percent(), min_sample: default_min_sample() }
    }
}

fn default_max_failure_percent() -> u32 {
    50
}
fn default_min_sample() -> u32 {
    50
}

/// What to do with the campaign's rows in Postgres when the Campaign is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Retention {
    /// Keep the message history (default): reports and `fromCampaign` audiences still work.
    #[default]
    Retain,
    /// Delete the campaign's messages and counters.
    Delete,
}

/// Observed state of a Campaign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignStatus {
    /// Where the campaign is in its lifecycle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<super::Phase>,
    /// The generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` and specific conditions, per Kubernetes conventions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Message counts by status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessageCounts>,
    /// Progress, rate and ETA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Delivery, read and failure rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
    /// Retry statistics and the error breakdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryStats>,
    /// Rate-limit pauses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitInfo>,
    /// Batch Job counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchCounts>,
    /// What the preflight found before the campaign started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preflight: Option<Preflight>,
    /// The audience as frozen at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<AudienceStatus>,
    /// Failed and finished counts when the campaign last paused for failures: the
    /// failure threshold judges only what happened after a person resumed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_baseline: Option<FailureBaseline>,
    /// A pause the operator decided (the failure threshold), kept in status so that a
    /// Git-managed spec is never rewritten. Lifted by `kubectl disparo resume` (the
    /// `disparo.io/resume-requested-at` annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub automatic_pause: Option<AutomaticPause>,
    /// The value of the `disparo.io/resume-requested-at` annotation last acted on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_resume_request: Option<String>,
    /// Estimated cost of the delivered messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostStatus>,
    /// When sending started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the campaign reached a final phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}

/// A pause the operator decided, until a person resumes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutomaticPause {
    /// Machine-readable cause, e.g. `FailureThresholdExceeded`.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
    /// When it paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// Message counts. `sent` counts every message that reached at least `sent`, so
/// `delivered <= sent`; `read <= delivered`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageCounts {
    /// Messages in the frozen audience.
    pub total: i64,
    /// Not sent yet (including those waiting for a retry).
    pub pending: i64,
    /// Reached at least `sent`.
    pub sent: i64,
    /// Reached at least `delivered`.
    pub delivered: i64,
    /// Read.
    pub read: i64,
    /// Failed for good.
    pub failed: i64,
    /// Outcome unknown: the request may have reached the provider; never re-sent
    /// silently, resolved by a later webhook.
    pub unknown: i64,
    /// Never sent because the contact opted out after the audience was frozen.
    /// Defaults to 0 so a status written before this count existed still reads.
    #[serde(default)]
    pub skipped: i64,
    /// Never sent because the campaign was cancelled.
    pub cancelled: i64,
    /// Pending again because Meta withheld them under its per-user marketing limit
    /// (131049): sent later, after growing delays (part of `pending`).
    #[serde(default)]
    pub marketing_limited: i64,
}

/// Progress of sending.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Finished messages over total, e.g. `42%`.
    pub percentage: String,
    /// Messages sent per minute recently.
    pub rate_per_minute: f64,
    /// Estimated time of completion at the current rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<Time>,
}

/// Outcome rates, as fractions of sent messages (failure: of finished messages).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rates {
    /// delivered / sent.
    pub delivery: f64,
    /// read / delivered.
    pub read: f64,
    /// failed / finished.
    pub failure: f64,
}

/// Retry statistics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryStats {
    /// Sent on the first attempt.
    pub succeeded_first_attempt: i64,
    /// Sent after at least one retry.
    pub succeeded_after_retry: i64,
    /// Failed for good.
    pub permanent_failures: i64,
    /// Retries scheduled so far.
    pub retries_scheduled: i64,
    /// Failures by provider error code, most frequent first.
    #[serde(default)]
    pub errors: Vec<ErrorCount>,
}

/// How often one provider error code occurred.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorCount {
    /// Provider error code (e.g. `131026`) or Disparo's own (`render`, `timeout`).
    pub code: String,
    /// Occurrences.
    pub count: i64,
}

/// Rate-limit pauses of this campaign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitInfo {
    /// Times the campaign paused because the channel's day window was spent.
    pub pauses: i64,
    /// When the current pause ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_at: Option<Time>,
}

/// Batch Job counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCounts {
    /// Batches (Job completions).
    pub total: i32,
    /// Sender pods running.
    pub active: i32,
    /// Batches finished.
    pub succeeded: i32,
    /// Batches that failed after their retries.
    pub failed: i32,
    /// Name of the sending Job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
}

/// What the machine checked before sending (the reference system's pre-dispatch checklist).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Preflight {
    /// Contacts the audience selects after opt-outs and de-duplication.
    pub audience_size: i64,
    /// Contacts missing a variable the message uses (they will fail with `render`).
    pub missing_variables: i64,
    /// Estimated sending duration given the channel's caps and window, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_duration_seconds: Option<i64>,
    /// Other campaigns currently sharing the channel.
    pub sharing_channel_with: i32,
    /// What the audience would cost if every message were delivered, with the rate card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<f64>,
    /// The rate card's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Days the audience needs at the portfolio's messaging limit, e.g. "needs 5 days at TIER_2K".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging_limit: Option<String>,
}

/// What the campaign's delivered messages cost, estimated with the rate card (Meta
/// sends the pricing category of each message, never an amount).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CostStatus {
    /// The estimate, in `currency`.
    pub estimated: f64,
    /// The rate card's currency (ISO 4217).
    pub currency: String,
    /// The estimate by pricing category (`marketing`, `utility`, ...).
    #[serde(default)]
    pub by_category: std::collections::BTreeMap<String, f64>,
    /// Delivered messages Meta charges for (`pricing.type: regular`).
    pub billable_messages: i64,
    /// Billable messages whose country the rate card has no price for (not in `estimated`).
    #[serde(default)]
    pub unpriced_messages: i64,
    /// The rate card's version.
    pub rate_card_version: String,
}

/// The frozen audience.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AudienceStatus {
    /// When the audience was frozen into Postgres.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_at: Option<Time>,
    /// The spec generation whose audience was frozen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_generation: Option<i64>,
    /// Messages materialized.
    pub size: i64,
    /// Set when spec.audience changed after freezing: the change is not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
}

/// Counts at the moment the failure threshold paused a campaign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureBaseline {
    /// Failed messages then.
    pub failed: i64,
    /// Finished messages (cancelled excluded) then.
    pub finished: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_short_words() {
        assert_eq!(ErrorCode::parse(" 131026 "), Ok(ErrorCode("131026".into())));
        assert!(ErrorCode::parse("http_500").is_ok() && ErrorCode::parse("max_attempts").is_ok());
        for bad in ["", "a b", "13;1", &"9".repeat(65), "código"] {
            assert!(ErrorCode::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ErrorCode::parse(&"9".repeat(64)).is_ok());
    }

    #[test]
    fn source_statuses_parse_by_their_crd_names() {
        for status in SourceMessageStatus::ALL {
            assert_eq!(SourceMessageStatus::parse(status.as_str()), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        let err = SourceMessageStatus::parse("pending").unwrap_err();
        assert!(err.contains("failed, sent, delivered, read, unknown, cancelled"), "{err}");
    }

    #[test]
    fn from_campaign_error_codes_are_optional() {
        let from: FromCampaign = serde_json::from_value(serde_json::json!({"name": "spring"})).unwrap();
        assert!(from.error_codes.is_empty());
        assert_eq!(serde_json::to_value(&from).unwrap(), serde_json::json!({"name": "spring", "statuses": ["failed"]}));
        let from: FromCampaign =
            serde_json::from_value(serde_json::json!({"name": "spring", "errorCodes": ["131026"]})).unwrap();
        assert_eq!(from.error_codes, vec![ErrorCode("131026".into())]);
    }
}
