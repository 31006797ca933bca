//! The `Channel` custom resource: one sending identity and its limits, shared by every
//! campaign that uses it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to one key of a Secret in the Channel's namespace. Credentials are only
/// ever referenced, never written inline, so they stay out of the spec, `kubectl get -o
/// yaml`, GitOps repositories and Events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the Channel.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Which provider API a Channel sends through.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The Meta WhatsApp Cloud API (Graph API).
    Meta,
    /// An Evolution API v2 instance (WhatsApp Web through Baileys).
    Evolution,
}

impl Provider {
    /// The lowercase name used in URLs, labels and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Meta => "meta",
            Provider::Evolution => "evolution",
        }
    }

    /// Parses [`Provider::as_str`].
    pub fn parse(label: &str) -> Option<Self> {
        match label {
            "meta" => Some(Provider::Meta),
            "evolution" => Some(Provider::Evolution),
            _ => None,
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of a Meta WhatsApp Cloud API sending identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetaSettings {
    /// Numeric id of the business phone number (not the phone number itself, not the WABA id).
    #[schemars(length(min = 1, max = 64))]
    pub phone_number_id: String,
    /// Graph API version used in the send URL, e.g. `v23.0`.
    #[serde(default = "default_graph_api_version")]
    #[x_kube(validation = Rule::new("self.matches('^v[0-9]+\\\\.[0-9]+$')").message("apiVersion must look like v23.0"))]
    pub api_version: String,
    /// Base URL of the Graph API. Point it at `disparo sandbox` to rehearse without sending.
    #[serde(default = "default_graph_base_url")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("baseUrl must be an http(s) URL"))]
    pub base_url: String,
    /// Secret key holding the access token (system-user token with `whatsapp_business_messaging`).
    pub access_token: SecretKeyRef,
    /// Secret key holding the Meta app secret, used to verify `X-Hub-Signature-256` on webhooks.
    pub app_secret: SecretKeyRef,
    /// Secret key holding the verify token typed into the App Dashboard for the webhook handshake.
    pub verify_token: SecretKeyRef,
    /// Id of the Meta business portfolio the number belongs to. Meta's messaging limit
    /// (unique recipients of business-initiated messages in a moving 24 h window) is the
    /// portfolio's, shared by all its numbers: Channels of a namespace that name the same
    /// portfolio share one budget. Unset: the number is not held to that budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub business_portfolio: Option<String>,
    /// Id of the WhatsApp Business Account: Meta's account webhooks (quality, template
    /// status, restrictions) name it, and Disparo routes them to this Channel by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub waba_id: Option<String>,
}

fn default_graph_api_version() -> String {
    "v23.0".to_owned()
}

fn default_graph_base_url() -> String {
    "https://graph.facebook.com".to_owned()
}

/// Settings of an Evolution API instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvolutionSettings {
    /// Base URL of the Evolution API server.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("baseUrl must be an http(s) URL"))]
    pub base_url: String,
    /// Name of the instance (the WhatsApp number connected by QR code).
    #[schemars(length(min = 1, max = 128))]
    pub instance: String,
    /// Secret key holding the `apikey` (global key or the instance token).
    pub api_key: SecretKeyRef,
    /// Secret key holding the shared secret Evolution sends in the webhook header
    /// (Evolution does not sign its webhooks; configure this value in `webhook.headers`).
    pub webhook_token: SecretKeyRef,
    /// Name of the header carrying the webhook shared secret.
    #[serde(default = "default_webhook_header")]
    pub webhook_header: String,
}

fn default_webhook_header() -> String {
    "x-disparo-token".to_owned()
}

/// What the channel's marketing campaigns do while Meta rates the number's quality low
/// (a `FLAGGED` or `DOWNGRADE` quality webhook, or a polled `RED` rating).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum QualityPolicy {
    /// Marketing campaigns pause until the quality recovers (`UNFLAGGED`, `UPGRADE`).
    #[default]
    Pause,
    /// Marketing campaigns go on at half the channel's caps.
    Slow,
    /// Nothing changes (the condition is still shown).
    Ignore,
}

/// How a channel keeps under its caps.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RateLimitMode {
    /// Never exceed any cap: when a cap is spent, the channel's campaigns go
    /// `RateLimited` until its window resets (`resumeAt`); a wait longer than a minute
    /// suspends their sending Jobs.
    Hard,
    /// Respect the caps by waiting: senders wait for the next token and keep the
    /// minimum spacing; campaigns never pause for a cap.
    Graceful,
}

/// Caps on how many messages the channel sends. Unset caps take the provider's
/// defaults (Meta: 20/min, 100/h, 500/day, Hard; Evolution: 1000/h, Graceful, 500 ms).
/// Edits reach the senders already running within seconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// Most messages in one calendar minute (UTC).
    #[schemars(range(min = 1, max = 1_000_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    /// Most messages in one calendar hour (UTC).
    #[schemars(range(min = 1, max = 10_000_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u32>,
    /// Most messages in one calendar day (UTC).
    #[schemars(range(min = 1, max = 100_000_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u32>,
    /// `Hard` or `Graceful`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<RateLimitMode>,
    /// Smallest gap between two sends of the channel, across all senders, in milliseconds.
    #[schemars(range(min = 0, max = 3_600_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_interval_millis: Option<u32>,
}

/// Desired state of a Channel.
// kube-derive's `printcolumn(...)` repeats `type_ = ...` once per column, which clippy
// reads as a duplicated attribute; the columns are distinct.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "disparo.io",
    version = "v1alpha1",
    kind = "Channel",
    namespaced,
    status = "ChannelStatus",
    shortname = "chan",
    category = "disparo",
    doc = "A WhatsApp sending identity (Meta Cloud API number or Evolution instance) and its rate limits, shared by the campaigns that use it.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Tier", type_ = "string", json_path = ".status.account.tier"),
    printcolumn(name = "Quality", type_ = "string", json_path = ".status.account.qualityRating"),
    printcolumn(
        name = "Budget",
        type_ = "integer",
        json_path = ".status.account.budget.used24h",
        description = "unique recipients counted in the portfolio's moving 24 h window"
    ),
    printcolumn(
        name = "Today",
        type_ = "integer",
        json_path = ".status.usage.day",
        description = "messages sent in the current day window"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.provider == 'meta' ? has(self.meta) && !has(self.evolution) : has(self.evolution) && !has(self.meta)").message("set exactly the settings block matching spec.provider (meta or evolution)").field_path(".provider"))]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    /// `meta` or `evolution`.
    pub provider: Provider,
    /// Meta Cloud API settings; required when provider is `meta`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaSettings>,
    /// Evolution API settings; required when provider is `evolution`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evolution: Option<EvolutionSettings>,
    /// Sending caps; unset fields take the provider's defaults.
    #[serde(default)]
    pub rate_limits: RateLimitsSpec,
    /// What marketing campaigns do while the number's quality is degraded.
    #[serde(default)]
    pub quality_policy: QualityPolicy,
}

/// Messages counted in the channel's current windows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowUsage {
    /// Messages reserved in the current minute.
    pub minute: u32,
    /// Messages reserved in the current hour.
    pub hour: u32,
    /// Messages reserved in the current day.
    pub day: u32,
    /// The caps in force (after provider defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<EffectiveLimits>,
}

/// Caps in force after applying provider defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveLimits {
    /// Messages per minute, if capped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    /// Messages per hour, if capped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u32>,
    /// Messages per day, if capped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u32>,
    /// `Hard` or `Graceful`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<RateLimitMode>,
    /// Minimum spacing between sends, in milliseconds.
    pub min_interval_millis: u32,
}

/// Observed state of a Channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    /// The generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` says whether campaigns can send through this channel, and why not.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Current rate-window usage, shared by every campaign on the channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<WindowUsage>,
    /// When a spent day window resets, if it is spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limited_until: Option<Time>,
    /// Path on the webhook service to register with the provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_path: Option<String>,
    /// The value of the `disparo.io/resume-requested-at` annotation last acted on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_resume_request: Option<String>,
    /// What Meta says about the number and its portfolio (Meta channels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountStatus>,
}

/// What Meta says about a number and its business portfolio: read from the Graph API
/// and from Meta's account webhooks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountStatus {
    /// The portfolio's messaging limit tier: TIER_250, TIER_2K, TIER_10K, TIER_100K, TIER_UNLIMITED.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// GREEN, YELLOW, RED or UNKNOWN (Meta's rating of the last 7 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality_rating: Option<String>,
    /// The last quality event Meta announced (FLAGGED, UNFLAGGED, DOWNGRADE, UPGRADE, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality_event: Option<String>,
    /// STANDARD (80 messages/s) or HIGH (1,000 messages/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_level: Option<String>,
    /// The portfolio's 24 h unique-recipient budget, as Disparo keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<PortfolioBudget>,
    /// Business-initiated messaging is restricted until this instant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restricted_until: Option<Time>,
    /// When the Graph API was last read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    /// Why the Graph API could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_error: Option<String>,
}

/// A portfolio's messaging limit and how much of it the last 24 h used.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortfolioBudget {
    /// The portfolio.
    pub portfolio: String,
    /// Unique recipients allowed per moving 24 h (unset: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Unique recipients counted in the last 24 h, across the portfolio's Channels of this namespace.
    #[serde(rename = "used24h")]
    pub used_24h: i64,
    /// When the oldest counted recipient leaves the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Time>,
}
