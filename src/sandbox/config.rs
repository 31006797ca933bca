//! What the sandbox simulates: credentials, latency, injected errors, webhook behaviour.
//!
//! Loaded from a small YAML file (`--config`), then overridden by flags. Every field
//! has a default, so `disparo sandbox` alone answers both providers on port 8089 with
//! the sandbox credentials below and no injected errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::account::{Quality, TemplateCategory, TemplateStatus, ThroughputLevel, Tier};
use super::{Error, Result};
use crate::providers::Secret;
use crate::providers::evolution::ConnectionState;

/// The whole sandbox configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Address to listen on; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// The simulated Meta Cloud API.
    pub meta: MetaSandbox,
    /// The simulated Evolution API.
    pub evolution: EvolutionSandbox,
    /// How long each send takes to answer.
    pub latency: Latency,
    /// Errors to inject into sends.
    pub faults: Faults,
    /// Numbers (E.164, with or without `+`) that are not on WhatsApp: Meta accepts them
    /// and then posts a `failed` webhook with 131026; Evolution refuses them with
    /// `exists: false`, as the real services do.
    pub not_on_whatsapp: Vec<String>,
    /// What happens after a message is accepted.
    pub webhooks: WebhookBehaviour,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8089)),
            meta: MetaSandbox::default(),
            evolution: EvolutionSandbox::default(),
            latency: Latency::default(),
            faults: Faults::default(),
            not_on_whatsapp: Vec::new(),
            webhooks: WebhookBehaviour::default(),
        }
    }
}

/// The simulated Meta Cloud API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaSandbox {
    /// The only access token accepted (`Authorization: Bearer ...`); others get 401/190.
    pub access_token: Secret,
    /// The app secret webhooks are signed with (`X-Hub-Signature-256`).
    pub app_secret: Secret,
    /// Phone number ids that exist; empty accepts any. Others get 400/100 like Graph.
    pub phone_number_ids: Vec<String>,
    /// Approved templates; empty accepts any name. Others get 404/132001.
    pub templates: Vec<TemplateSpec>,
    /// Where status webhooks are posted; none posts nothing.
    pub webhook_url: Option<String>,
    /// WABA id put in `entry[].id`.
    pub waba_id: String,
    /// Business number put in `metadata.display_phone_number`.
    pub display_phone_number: String,
    /// Business name of the Graph read's `verified_name`.
    pub verified_name: String,
    /// The portfolio's messaging limit (docs/providers.md A3, A6): template sends to
    /// more unique recipients in a moving 24 h are refused with 131048. Changeable at
    /// run time (`PUT /_sandbox/meta/account`).
    pub tier: Tier,
    /// The numbers' quality rating (Graph `quality_rating`).
    pub quality_rating: Quality,
    /// The numbers' throughput level (Graph `throughput.level`).
    pub throughput_level: ThroughputLevel,
    /// Recipients (E.164, with or without `+`) under Meta's per-user marketing limit:
    /// a MARKETING template to them is accepted, then fails by webhook with 131049.
    /// Replaceable at run time (`PUT /_sandbox/meta/marketing-limited`).
    pub marketing_limited_recipients: Vec<String>,
    /// Recipients (E.164, with or without `+`) whose status webhooks carry only
    /// `recipient_user_id` (their BSUID), no `recipient_id` (docs/providers.md A6).
    pub bsuid_only_recipients: Vec<String>,
}

impl Default for MetaSandbox {
    fn default() -> Self {
        MetaSandbox {
            access_token: Secret::new("sandbox-meta-token"),
            app_secret: Secret::new("sandbox-app-secret"),
            phone_number_ids: Vec::new(),
            templates: Vec::new(),
            webhook_url: None,
            waba_id: "102290129340398".to_owned(),
            display_phone_number: "15550783881".to_owned(),
            verified_name: "Disparo Sandbox".to_owned(),
            tier: Tier::default(),
            quality_rating: Quality::default(),
            throughput_level: ThroughputLevel::default(),
            marketing_limited_recipients: Vec::new(),
            bsuid_only_recipients: Vec::new(),
        }
    }
}

impl MetaSandbox {
    /// The configured template of that name and language, if any (with no templates
    /// configured, the sandbox accepts any name: check `templates.is_empty()` first).
    pub fn template(&self, name: &str, language: &str) -> Option<&TemplateSpec> {
        self.templates
            .iter()
            .find(|t| t.name == name && (t.languages.is_empty() || t.languages.iter().any(|l| l == language)))
    }
}

/// One template.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Template name.
    pub name: String,
    /// Approved languages; empty accepts any.
    #[serde(default)]
    pub languages: Vec<String>,
    /// Number of body variables (`{{1}}`...); a different count gets 400/132000.
    /// Unset accepts any count.
    #[serde(default)]
    pub body_parameters: Option<usize>,
    /// Review status it starts in (APPROVED unless set): PAUSED sends get 132015,
    /// DISABLED 132016, PENDING or REJECTED 132001. Changeable at run time
    /// (`PUT /_sandbox/meta/templates/{name}/{language}`).
    #[serde(default)]
    pub status: TemplateStatus,
    /// Category (MARKETING unless set): the `pricing.category` of its statuses, and
    /// whether the per-user marketing limit applies.
    #[serde(default)]
    pub category: TemplateCategory,
}

/// The simulated Evolution API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvolutionSandbox {
    /// The accepted `apikey` (global key); others get 401.
    pub api_key: Secret,
    /// Instances that exist, with their connection state; others get 404.
    pub instances: Vec<InstanceSpec>,
    /// Where `messages.update` webhooks are posted; none posts nothing.
    pub webhook_url: Option<String>,
    /// Header carrying the shared secret on every webhook (Evolution's `webhook.headers`).
    pub webhook_header: String,
    /// The shared secret itself.
    pub webhook_secret: Secret,
    /// The instance's own number, put in the envelope's `sender`.
    pub owner_number: String,
}

impl Default for EvolutionSandbox {
    fn default() -> Self {
        EvolutionSandbox {
            api_key: Secret::new("sandbox-api-key"),
            instances: vec![InstanceSpec { name: "sandbox".to_owned(), state: ConnectionState::Open }],
            webhook_url: None,
            webhook_header: "x-disparo-token".to_owned(),
            webhook_secret: Secret::new("sandbox-webhook-secret"),
            owner_number: "5511988887777".to_owned(),
        }
    }
}

/// One Evolution instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Instance name (the path segment).
    pub name: String,
    /// Connection state; sends to an instance that is not `open` fail with
    /// "Connection Closed". Can be changed at run time.
    #[serde(default = "open")]
    pub state: ConnectionState,
}

fn open() -> ConnectionState {
    ConnectionState::Open
}

/// Answer time of a send, uniform in `[min_ms, max_ms]` (equal bounds: fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    /// Shortest answer time.
    pub min_ms: u64,
    /// Longest answer time.
    pub max_ms: u64,
}

impl Default for Latency {
    /// Roughly what the Cloud API takes.
    fn default() -> Self {
        Latency { min_ms: 20, max_ms: 120 }
    }
}

/// Errors injected into sends, as probabilities per request. The class
/// probabilities and the specific codes share one draw, so their sum must not exceed 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Transient server error (Meta 500/131000; Evolution 500).
    pub retryable: f64,
    /// Channel throughput limit (Meta 130429; Evolution `rate-overlimit`).
    pub rate_limit: f64,
    /// Pair rate limit (Meta 131056; Evolution has none and answers like `rate_limit`).
    pub pair_rate: f64,
    /// Permanent refusal (Meta 131026; Evolution `exists: false`).
    pub permanent: f64,
    /// Specific Meta codes and their probabilities, answered with the HTTP status and
    /// title of Meta's table. Evolution ignores them (it has no codes).
    pub codes: BTreeMap<i64, f64>,
    /// Probability that an accepted message's answer is held for `timeout_delay_ms`:
    /// the message *is* sent (ledger, webhooks) but the client times out first. This is
    /// the "request reached the provider, response lost" case.
    pub timeout: f64,
    /// How long such an answer is held; make it longer than the client's timeout.
    pub timeout_delay_ms: u64,
    /// Probability that an accepted message's answer is lost behind a gateway: the
    /// message *is* sent (ledger, webhooks) but the client gets an nginx-style 504 page
    /// instead of the provider's answer, as from a proxy whose upstream was slow. A
    /// client that retries it sends the message twice.
    pub gateway_timeout: f64,
    /// Recipients (E.164, with or without `+`) whose every accepted message meets that
    /// 504, whatever `gateway_timeout` draws: what a test asserts on exactly.
    pub gateway_timeout_recipients: Vec<String>,
    /// At most this many accepted messages in any trailing 60 s; beyond it Meta answers
    /// 130429 and Evolution `rate-overlimit`.
    pub per_minute_cap: Option<u32>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            retryable: 0.0,
            rate_limit: 0.0,
            pair_rate: 0.0,
            permanent: 0.0,
            codes: BTreeMap::new(),
            timeout: 0.0,
            timeout_delay_ms: 60_000,
            gateway_timeout: 0.0,
            gateway_timeout_recipients: Vec::new(),
            per_minute_cap: None,
        }
    }
}

impl Faults {
    /// Checks that every probability is in [0, 1] and that the shared draw adds up.
    pub(crate) fn validate(&self) -> Result<()> {
        let named = [
            ("retryable", self.retryable),
            ("rate_limit", self.rate_limit),
            ("pair_rate", self.pair_rate),
            ("permanent", self.permanent),
            ("timeout", self.timeout),
            ("gateway_timeout", self.gateway_timeout),
        ];
        for (name, p) in named.iter().copied().chain(self.codes.values().map(|p| ("codes", *p))) {
            probability(&format!("faults.{name}"), p)?;
        }
        let total =
            self.retryable + self.rate_limit + self.pair_rate + self.permanent + self.codes.values().sum::<f64>();
        if total > 1.0 + f64::EPSILON {
            return Err(Error::Config(format!("fault probabilities add up to {total}, more than 1")));
        }
        Ok(())
    }
}

/// What the simulated provider reports after accepting a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookBehaviour {
    /// Probability that an accepted message fails asynchronously instead of being sent.
    pub failed: f64,
    /// Meta code of those failures (Evolution only says `ERROR`).
    pub failure_code: i64,
    /// Probability that a sent message is delivered.
    pub delivered: f64,
    /// Probability that a delivered message is read.
    pub read: f64,
    /// Probability that a status is posted twice.
    pub duplicate: f64,
    /// Probability that two consecutive statuses arrive in the wrong order.
    pub out_of_order: f64,
    /// Probability that Meta posts the last two statuses of a message in one body.
    pub batch: f64,
    /// Shortest delay between two statuses of a message.
    pub delay_min_ms: u64,
    /// Longest delay between two statuses of a message.
    pub delay_max_ms: u64,
    /// Attempts per webhook POST (the first included) on errors or non-2xx answers.
    pub max_attempts: u32,
    /// First wait between attempts; doubles each time.
    pub retry_base_ms: u64,
    /// Timeout of one webhook POST.
    pub request_timeout_ms: u64,
    /// Messages whose webhooks may be pending at once; beyond it new messages get no
    /// webhooks (counted as dropped) rather than unbounded tasks.
    pub max_in_flight: u32,
}

impl Default for WebhookBehaviour {
    fn default() -> Self {
        WebhookBehaviour {
            failed: 0.02,
            failure_code: 131026,
            delivered: 0.95,
            read: 0.6,
            duplicate: 0.05,
            out_of_order: 0.05,
            batch: 0.1,
            delay_min_ms: 200,
            delay_max_ms: 2_000,
            max_attempts: 5,
            retry_base_ms: 500,
            request_timeout_ms: 10_000,
            max_in_flight: 10_000,
        }
    }
}

impl SandboxConfig {
    /// Reads a YAML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ReadConfig { path: path.to_owned(), source })?;
        serde_yaml::from_str(&text).map_err(|source| Error::ParseConfig { path: path.to_owned(), source })
    }

    /// Checks ranges and URLs, so a typo fails at start rather than mid-rehearsal.
    pub(crate) fn validate(&self) -> Result<()> {
        self.faults.validate()?;
        let w = &self.webhooks;
        for (name, p) in [
            ("failed", w.failed),
            ("delivered", w.delivered),
            ("read", w.read),
            ("duplicate", w.duplicate),
            ("out_of_order", w.out_of_order),
            ("batch", w.batch),
        ] {
            probability(&format!("webhooks.{name}"), p)?;
        }
        if self.latency.min_ms > self.latency.max_ms {
            return Err(Error::Config("latency.min_ms is above latency.max_ms".to_owned()));
        }
        if w.delay_min_ms > w.delay_max_ms {
            return Err(Error::Config("webhooks.delay_min_ms is above webhooks.delay_max_ms".to_owned()));
        }
        if w.max_attempts == 0 || w.max_in_flight == 0 || w.request_timeout_ms == 0 {
            return Err(Error::Config(
                "webhooks.max_attempts, max_in_flight and request_timeout_ms must be positive".to_owned(),
            ));
        }
        for (name, url) in
            [("meta.webhook_url", &self.meta.webhook_url), ("evolution.webhook_url", &self.evolution.webhook_url)]
        {
            if let Some(url) = url
                && reqwest::Url::parse(url).is_err()
            {
                return Err(Error::Config(format!("{name} is not a URL: {url}")));
            }
        }
        if reqwest::header::HeaderName::from_bytes(self.evolution.webhook_header.as_bytes()).is_err() {
            return Err(Error::Config(format!(
                "evolution.webhook_header {:?} is not a header name",
                self.evolution.webhook_header
            )));
        }
        if self.meta.access_token.is_empty() || self.evolution.api_key.is_empty() {
            return Err(Error::Config("meta.access_token and evolution.api_key must not be empty".to_owned()));
        }
        Ok(())
    }
}

fn probability(name: &str, p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::Config(format!("{name} is a probability: {p} is not in [0, 1]")))
    }
}

/// Arguments of `disparo sandbox`: a config file and the overrides people reach for.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on (default 0.0.0.0:8089).
    #[arg(long, env = "DISPARO_SANDBOX_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// YAML configuration file (see `SandboxConfig`).
    #[arg(long, env = "DISPARO_SANDBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Meta access token the sandbox accepts.
    #[arg(long, env = "DISPARO_SANDBOX_META_TOKEN", hide_env_values = true)]
    pub meta_token: Option<String>,
    /// Meta app secret the sandbox signs webhooks with.
    #[arg(long, env = "DISPARO_SANDBOX_META_APP_SECRET", hide_env_values = true)]
    pub meta_app_secret: Option<String>,
    /// Where to post Meta status webhooks.
    #[arg(long, env = "DISPARO_SANDBOX_META_WEBHOOK_URL")]
    pub meta_webhook_url: Option<String>,
    /// Evolution api key the sandbox accepts.
    #[arg(long, env = "DISPARO_SANDBOX_EVOLUTION_API_KEY", hide_env_values = true)]
    pub evolution_api_key: Option<String>,
    /// Where to post Evolution `messages.update` webhooks.
    #[arg(long, env = "DISPARO_SANDBOX_EVOLUTION_WEBHOOK_URL")]
    pub evolution_webhook_url: Option<String>,
    /// Shared secret sent in the Evolution webhook header.
    #[arg(long, env = "DISPARO_SANDBOX_EVOLUTION_WEBHOOK_SECRET", hide_env_values = true)]
    pub evolution_webhook_secret: Option<String>,
    /// Evolution instances that exist (repeatable; replaces the configured list).
    #[arg(long = "evolution-instance")]
    pub evolution_instances: Vec<String>,
    /// Shortest send latency in milliseconds.
    #[arg(long)]
    pub latency_min_ms: Option<u64>,
    /// Longest send latency in milliseconds.
    #[arg(long)]
    pub latency_max_ms: Option<u64>,
    /// Probability of a retryable error (Meta 131000 / HTTP 500).
    #[arg(long)]
    pub fail_retryable: Option<f64>,
    /// Probability of a throughput rate limit (Meta 130429).
    #[arg(long)]
    pub fail_rate_limit: Option<f64>,
    /// Probability of a pair rate limit (Meta 131056).
    #[arg(long)]
    pub fail_pair_rate: Option<f64>,
    /// Probability of a permanent refusal (Meta 131026, Evolution not-on-WhatsApp).
    #[arg(long)]
    pub fail_permanent: Option<f64>,
    /// Probability that an accepted message's answer is held past the client timeout.
    #[arg(long)]
    pub timeout_probability: Option<f64>,
    /// Probability that an accepted message's answer is replaced by a gateway's 504.
    #[arg(long)]
    pub gateway_timeout_probability: Option<f64>,
    /// Accepted messages allowed in any trailing minute.
    #[arg(long)]
    pub per_minute_cap: Option<u32>,
    /// A number that is not on WhatsApp (repeatable; added to the configured list).
    #[arg(long = "not-on-whatsapp")]
    pub not_on_whatsapp: Vec<String>,
}

impl SandboxArgs {
    /// The configuration: the file (or defaults), then these overrides, validated.
    pub(crate) fn to_config(&self) -> Result<SandboxConfig> {
        let mut config = match &self.config {
            Some(path) => SandboxConfig::load(path)?,
            None => SandboxConfig::default(),
        };
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply(&self, config: &mut SandboxConfig) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(value) = value {
                *target = value.clone();
            }
        }
        set(&mut config.listen, &self.listen);
        let secret = |value: &Option<String>| value.clone().map(Secret::new);
        set(&mut config.meta.access_token, &secret(&self.meta_token));
        set(&mut config.meta.app_secret, &secret(&self.meta_app_secret));
        set(&mut config.evolution.api_key, &secret(&self.evolution_api_key));
        set(&mut config.evolution.webhook_secret, &secret(&self.evolution_webhook_secret));
        if self.meta_webhook_url.is_some() {
            config.meta.webhook_url.clone_from(&self.meta_webhook_url);
        }
        if self.evolution_webhook_url.is_some() {
            config.evolution.webhook_url.clone_from(&self.evolution_webhook_url);
        }
        if !self.evolution_instances.is_empty() {
            config.evolution.instances = self
                .evolution_instances
                .iter()
                .map(|name| InstanceSpec { name: name.clone(), state: ConnectionState::Open })
                .collect();
        }
        set(&mut config.latency.min_ms, &self.latency_min_ms);
        set(&mut config.latency.max_ms, &self.latency_max_ms);
        set(&mut config.faults.retryable, &self.fail_retryable);
        set(&mut config.faults.rate_limit, &self.fail_rate_limit);
        set(&mut config.faults.pair_rate, &self.fail_pair_rate);
        set(&mut config.faults.permanent, &self.fail_permanent);
        set(&mut config.faults.timeout, &self.timeout_probability);
        set(&mut config.faults.gateway_timeout, &self.gateway_timeout_probability);
        if self.per_minute_cap.is_some() {
            config.faults.per_minute_cap = self.per_minute_cap;
        }
        config.not_on_whatsapp.extend(self.not_on_whatsapp.iter().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = SandboxConfig::default();
        assert!(config.validate().is_ok());
        // An account without settings refuses nothing: existing rehearsals are unaffected.
        assert_eq!((config.meta.tier, config.meta.quality_rating), (Tier::Unlimited, Quality::Green));
        assert_eq!(config.meta.throughput_level, ThroughputLevel::Standard);
    }

    #[test]
    fn yaml_files_override_defaults() {
        let yaml = r#"
listen: 127.0.0.1:0
meta:
  access_token: tok
  templates:
    - name: order_update_v1
      languages: [en_US]
      body_parameters: 2
    - name: otp
      status: PAUSED
      category: AUTHENTICATION
  tier: TIER_250
  quality_rating: YELLOW
  throughput_level: HIGH
  marketing_limited_recipients: ["+5511900000002"]
  bsuid_only_recipients: ["5511900000003"]
evolution:
  instances:
    - name: loja
    - name: offline
      state: close
latency: { min_ms: 0, max_ms: 0 }
faults:
  retryable: 0.1
  codes: { 131049: 0.05 }
  per_minute_cap: 20
  gateway_timeout: 0.1
  gateway_timeout_recipients: ["+5511900000001"]
not_on_whatsapp: ["+5511900000000"]
webhooks: { read: 0.0 }
"#;
        let config: Result<SandboxConfig, _> = serde_yaml::from_str(yaml);
        let Ok(config) = config else { panic!("{config:?}") };
        assert!(config.validate().is_ok());
        assert_eq!(config.meta.access_token.expose(), "tok");
        assert_eq!(config.meta.app_secret.expose(), "sandbox-app-secret");
        assert_eq!(config.meta.templates[0].body_parameters, Some(2));
        assert_eq!(config.meta.templates[0].status, TemplateStatus::Approved);
        assert_eq!(config.meta.templates[0].category, TemplateCategory::Marketing);
        assert_eq!(config.meta.templates[1].status, TemplateStatus::Paused);
        assert_eq!(config.meta.templates[1].category, TemplateCategory::Authentication);
        assert_eq!(config.meta.tier, Tier::Tier250);
        assert_eq!(config.meta.quality_rating, Quality::Yellow);
        assert_eq!(config.meta.throughput_level, ThroughputLevel::High);
        assert_eq!(config.meta.marketing_limited_recipients, ["+5511900000002"]);
        assert_eq!(config.meta.bsuid_only_recipients, ["5511900000003"]);
        assert_eq!(config.evolution.instances[1].state, ConnectionState::Close);
        assert_eq!(config.faults.codes.get(&131049), Some(&0.05));
        assert_eq!(config.faults.gateway_timeout, 0.1);
        assert_eq!(config.faults.gateway_timeout_recipients, vec!["+5511900000001".to_owned()]);
        assert_eq!(config.webhooks.read, 0.0);
        assert_eq!(config.webhooks.delivered, 0.95);
    }

    #[test]
    fn unknown_fields_and_bad_probabilities_are_refused() {
        assert!(serde_yaml::from_str::<SandboxConfig>("lisen: 127.0.0.1:0").is_err());
        let mut config = SandboxConfig::default();
        config.faults.retryable = 0.7;
        config.faults.permanent = 0.5;
        assert!(matches!(config.validate(), Err(Error::Config(_))));
        let mut config = SandboxConfig::default();
        config.faults.gateway_timeout = 1.5;
        assert!(config.validate().is_err());
        let mut config = SandboxConfig::default();
        config.webhooks.read = 1.5;
        assert!(config.validate().is_err());
        let mut config = SandboxConfig::default();
        config.meta.webhook_url = Some("not a url".into());
        assert!(config.validate().is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let args = SandboxArgs {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            meta_token: Some("flag-token".into()),
            evolution_instances: vec!["a".into(), "b".into()],
            fail_retryable: Some(0.25),
            not_on_whatsapp: vec!["+551100".into()],
            ..SandboxArgs::default()
        };
        let Ok(config) = args.to_config() else { panic!("config") };
        assert_eq!(config.meta.access_token.expose(), "flag-token");
        assert_eq!(config.evolution.instances.len(), 2);
        assert_eq!(config.faults.retryable, 0.25);
        assert_eq!(config.not_on_whatsapp, vec!["+551100".to_owned()]);
    }
}
