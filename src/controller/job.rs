//! The campaign's sending Job: one Indexed Job whose completions are the batches, each
//! index running `disparo send` for one batch. Built by a pure function so its shape is
//! tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use super::{Error, Result};
use crate::api::{Campaign, Channel, Provider, SecretKeyRef};
use crate::sender::{IGNORED_EXIT_CODES, MessageTemplate, ProviderTarget, SendConfig};

/// Port of a sender's `/metrics` while its batch runs.
pub(crate) const SENDER_METRICS_PORT: i32 = 9102;
/// Name of that port, which the chart's PodMonitor scrapes.
pub(crate) const SENDER_METRICS_PORT_NAME: &str = "metrics";

/// Label on everything Disparo creates for a campaign, holding the Campaign's UID: a
/// label value holds at most 63 characters and a Campaign name up to 253.
pub(crate) const CAMPAIGN_LABEL: &str = "disparo.io/campaign-uid";
/// Annotation with the Campaign's name, for people.
pub(crate) const CAMPAIGN_NAME_ANNOTATION: &str = "disparo.io/campaign";
/// Annotation with a digest of what the Job was built from (send configuration,
/// credential reference, image, resources): when it differs from the spec's now, the Job
/// is replaced, so an edit made while paused is what the senders use after resume.
pub(crate) const SEND_CONFIG_ANNOTATION: &str = "disparo.io/send-config-digest";
/// Name of the sender container (the pod failure policy refers to it).
pub(crate) const SENDER_CONTAINER: &str = "sender";

/// Operator-wide settings for sender pods.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    /// Image of the sender (the operator's own image).
    pub image: String,
    /// Secret (in the campaign's namespace) holding the Postgres URL.
    pub database_secret: String,
    /// Key of the Postgres URL in that Secret.
    pub database_secret_key: String,
    /// Messages in flight per sender.
    pub block_size: u32,
    /// Provider request timeout.
    pub request_timeout_millis: u64,
    /// Seconds a finished Job is kept.
    pub ttl_seconds_after_finished: i32,
    /// How senders reach Postgres (`DISPARO_DB_POOLER`).
    pub db_pooler: crate::store::Pooler,
    /// Where senders reach Postgres, when not where the operator does (written into the
    /// namespaces' database URLs, see `tenant`).
    pub db_address: Option<String>,
}

/// The Job's name for a campaign: stable (a restarted controller finds it) and unique
/// per Campaign object: a readable prefix of the name, then part of the UID, so two
/// campaigns sharing a long prefix, or a campaign re-created under the same name, never
/// share a Job. At most 63 characters, as the Job's pods carry it in a label.
pub fn job_name(campaign: &str, uid: &str) -> String {
    let mut name: String = campaign.chars().take(44).collect();
    name = name.trim_end_matches(['-', '.']).to_owned();
    let id: String = uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_ascii_lowercase();
    format!("{name}-{id}-send")
}

/// Why a Job found under the campaign's Job name is not the campaign's own, if it is not.
pub(crate) fn foreign_job(job: &Job, campaign_uid: &str) -> Option<String> {
    let owned = job
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.uid == campaign_uid && r.controller == Some(true)));
    (!owned).then(|| {
        format!(
            "a Job named {:?} exists and is not owned by this campaign; delete or rename it",
            job.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// The digest of what a Job is built from, as stored in [`SEND_CONFIG_ANNOTATION`].
/// The channel's caps are left out: senders read them live from Postgres.
pub(crate) fn send_config_digest(
    campaign: &Campaign,
    channel: &Channel,
    organization: &str,
    settings: &SenderSettings,
) -> Result<String> {
    use sha2::Digest;
    let mut config = send_config(campaign, channel, organization, settings)?;
    config.rate_limits = Default::default();
    let material = serde_json::json!({
        "config": config,
        "credential": provider_credential(channel)?,
        "image": settings.image,
        "database": [settings.database_secret.as_str(), settings.database_secret_key.as_str()],
        "resources": campaign.spec.execution.resources,
    });
    let bytes = serde_json::to_vec(&material)
        .map_err(|e| Error::InvalidCampaign(format!("serializing the send configuration: {e}")))?;
    Ok(hex::encode(&sha2::Sha256::digest(&bytes)[..12]))
}

/// Whether the Job was built from another send configuration than `digest`. A Job
/// without the annotation (made by an older controller) is left alone.
pub(crate) fn is_stale(job: &Job, digest: &str) -> bool {
    job.metadata.annotations.as_ref().and_then(|a| a.get(SEND_CONFIG_ANNOTATION)).is_some_and(|d| d != digest)
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The send configuration for a campaign on a channel.
pub(crate) fn send_config(
    campaign: &Campaign,
    channel: &Channel,
    organization: &str,
    settings: &SenderSettings,
) -> Result<SendConfig> {
    let uid = campaign.meta().uid.as_deref().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let campaign_uid = uid.parse().map_err(|_| Error::MissingObjectKey("metadata.uid (not a UUID)"))?;
    let target = match channel.spec.provider {
        Provider::Meta => {
            let meta =
                channel.spec.meta.as_ref().ok_or(Error::InvalidChannel("provider meta without spec.meta".into()))?;
            ProviderTarget::Meta {
                base_url: meta.base_url.clone(),
                api_version: meta.api_version.clone(),
                phone_number_id: meta.phone_number_id.clone(),
            }
        }
        Provider::Evolution => {
            let evo = channel
                .spec
                .evolution
                .as_ref()
                .ok_or(Error::InvalidChannel("provider evolution without spec.evolution".into()))?;
            ProviderTarget::Evolution { base_url: evo.base_url.clone(), instance: evo.instance.clone() }
        }
    };
    let message = MessageTemplate::from_spec(&campaign.spec.message)
        .ok_or_else(|| Error::InvalidCampaign("spec.message has neither template nor text".into()))?;
    Ok(SendConfig {
        campaign_uid,
        organization: organization.to_owned(),
        channel: channel.meta().name.clone().ok_or(Error::MissingObjectKey("channel metadata.name"))?,
        target,
        message,
        retry: campaign.spec.retry.clone(),
        rate_limits: channel.spec.rate_limits.clone(),
        block_size: settings.block_size,
        request_timeout_millis: settings.request_timeout_millis,
        portfolio: channel.spec.meta.as_ref().and_then(|m| m.business_portfolio.clone()),
        quality_policy: channel.spec.quality_policy,
    })
}

/// The credential a sender needs: the Meta access token or the Evolution api key.
pub(crate) fn provider_credential(channel: &Channel) -> Result<&SecretKeyRef> {
    match channel.spec.provider {
        Provider::Meta => channel.spec.meta.as_ref().map(|m| &m.access_token),
        Provider::Evolution => channel.spec.evolution.as_ref().map(|e| &e.api_key),
    }
    .ok_or_else(|| Error::InvalidChannel("the channel has no settings for its provider".into()))
}

/// The command-line name of a pooler setting (what `DISPARO_DB_POOLER` takes).
fn pooler_name(pooler: crate::store::Pooler) -> String {
    use clap::ValueEnum;
    pooler.to_possible_value().map_or_else(|| "direct".to_owned(), |v| v.get_name().to_owned())
}

/// Builds the sending Job.
pub(crate) fn build_job(
    campaign: &Campaign,
    channel: &Channel,
    organization: &str,
    batches: i32,
    suspend: bool,
    settings: &SenderSettings,
) -> Result<Job> {
    let name = campaign.meta().name.clone().ok_or(Error::MissingObjectKey("metadata.name"))?;
    let namespace = campaign.meta().namespace.clone().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let owner: OwnerReference = campaign.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let config = send_config(campaign, channel, organization, settings)?;
    let config_json = serde_json::to_string(&config)
        .map_err(|e| Error::InvalidCampaign(format!("serializing the send configuration: {e}")))?;
    let uid = campaign.meta().uid.clone().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "disparo".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "sender".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "disparo".to_owned()),
        (CAMPAIGN_LABEL.to_owned(), uid.clone()),
    ]);
    let annotations = BTreeMap::from([
        (CAMPAIGN_NAME_ANNOTATION.to_owned(), name.clone()),
        (SEND_CONFIG_ANNOTATION.to_owned(), send_config_digest(campaign, channel, organization, settings)?),
    ]);
    let execution = &campaign.spec.execution;
    let container = Container {
        name: SENDER_CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        command: Some(vec!["disparo".to_owned(), "send".to_owned()]),
        env: Some(vec![
            secret_env(
                "DATABASE_URL",
                &SecretKeyRef { name: settings.database_secret.clone(), key: settings.database_secret_key.clone() },
            ),
            secret_env("DISPARO_PROVIDER_TOKEN", provider_credential(channel)?),
            // The CA that verifies Postgres, when the operator's connection uses one:
            // Postgres' client settings take the PEM itself.
            EnvVar {
                name: "PGSSLROOTCERT".to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: settings.database_secret.clone(),
                        key: super::tenant::CA_KEY.to_owned(),
                        optional: Some(true),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar { name: "DISPARO_SEND_CONFIG".to_owned(), value: Some(config_json), ..Default::default() },
            EnvVar { name: "DISPARO_LOG_FORMAT".to_owned(), value: Some("json".to_owned()), ..Default::default() },
            // Metrics on the pod's own IP, where a PodMonitor finds them.
            EnvVar {
                name: "DISPARO_METRICS_HOST".to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: "status.podIP".to_owned(), api_version: None }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar {
                name: "DISPARO_METRICS_PORT".to_owned(),
                value: Some(SENDER_METRICS_PORT.to_string()),
                ..Default::default()
            },
            EnvVar { name: "DISPARO_CAMPAIGN_NAME".to_owned(), value: Some(name.clone()), ..Default::default() },
            EnvVar {
                name: "DISPARO_DB_POOLER".to_owned(),
                value: Some(pooler_name(settings.db_pooler)),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(SENDER_METRICS_PORT_NAME.to_owned()),
            container_port: SENDER_METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        resources: execution.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let batches = batches.max(1);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name, &uid)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".to_owned()),
            completions: Some(batches),
            parallelism: Some((execution.parallelism as i32).min(batches)),
            backoff_limit_per_index: Some(execution.backoff_limit_per_index as i32),
            // One pod per index at a time: a replacement starts only once the old pod is
            // gone, so two senders never work the same batch.
            pod_replacement_policy: Some("Failed".to_owned()),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![
                    PodFailurePolicyRule {
                        action: "Ignore".to_owned(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: Some(SENDER_CONTAINER.to_owned()),
                            operator: "In".to_owned(),
                            values: IGNORED_EXIT_CODES.to_vec(),
                        }),
                        on_pod_conditions: None,
                    },
                    PodFailurePolicyRule {
                        action: "Ignore".to_owned(),
                        on_exit_codes: None,
                        on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                            type_: "DisruptionTarget".to_owned(),
                            status: "True".to_owned(),
                        }]),
                    },
                ],
            }),
            suspend: Some(suspend),
            ttl_seconds_after_finished: Some(settings.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign() -> Campaign {
        let mut c: Campaign = serde_json::from_value(serde_json::json!({
            "apiVersion": "disparo.io/v1alpha1", "kind": "Campaign",
            "metadata": {"name": "spring-sale", "namespace": "acme", "uid": "6b1f7c1e-9a4e-4c2b-8f55-0c8b5d8f2a11"},
            "spec": {
                "channelRef": {"name": "main"},
                "message": {"template": {"name": "promo", "language": "pt_BR", "bodyParameters": ["{{contact.name}}"]}},
                "audience": {"allContacts": true},
                "execution": {"batchSize": 100, "parallelism": 8, "backoffLimitPerIndex": 2}
            }
        }))
        .unwrap();
        c.metadata.uid = Some("6b1f7c1e-9a4e-4c2b-8f55-0c8b5d8f2a11".into());
        c
    }

    fn channel() -> Channel {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "disparo.io/v1alpha1", "kind": "Channel",
            "metadata": {"name": "main", "namespace": "acme"},
            "spec": {"provider": "meta", "meta": {
                "phoneNumberId": "106540352242922", "accessToken": {"name": "meta", "key": "token"},
                "appSecret": {"name": "meta", "key": "app-secret"}, "verifyToken": {"name": "meta", "key": "verify"}}}
        }))
        .unwrap()
    }

    fn settings() -> SenderSettings {
        SenderSettings {
            image: "disparo:test".into(),
            database_secret: "disparo-postgres".into(),
            database_secret_key: "url".into(),
            block_size: 16,
            request_timeout_millis: 10_000,
            ttl_seconds_after_finished: 3600,
            db_pooler: crate::store::Pooler::Direct,
            db_address: None,
        }
    }

    #[test]
    fn an_indexed_job_with_one_completion_per_batch() {
        let job = build_job(&campaign(), &channel(), "acme", 20, false, &settings()).unwrap();
        let spec = job.spec.unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("spring-sale-6b1f7c1e-send"));
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((spec.completions, spec.parallelism, spec.backoff_limit_per_index), (Some(20), Some(8), Some(2)));
        assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
        let rules = spec.pod_failure_policy.unwrap().rules;
        assert_eq!(rules[0].on_exit_codes.as_ref().unwrap().values, vec![75, 76, 77, 78]);
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let owner = &job.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Campaign", Some(true)));
    }

    #[test]
    fn credentials_travel_as_secret_references_only() {
        let job = build_job(&campaign(), &channel(), "acme", 2, true, &settings()).unwrap();
        let env = job.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let token = env.iter().find(|e| e.name == "DISPARO_PROVIDER_TOKEN").unwrap();
        assert!(token.value.is_none());
        assert_eq!(token.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "meta");
        let config: SendConfig =
            serde_json::from_str(env.iter().find(|e| e.name == "DISPARO_SEND_CONFIG").unwrap().value.as_ref().unwrap())
                .unwrap();
        assert_eq!(config.organization, "acme");
        assert!(
            matches!(config.message, MessageTemplate::Template { ref body_parameters, .. } if body_parameters == &["{{contact.name}}"])
        );
    }

    #[test]
    fn parallelism_never_exceeds_the_batches() {
        let job = build_job(&campaign(), &channel(), "acme", 3, false, &settings()).unwrap();
        assert_eq!(job.spec.unwrap().parallelism, Some(3));
    }

    #[test]
    fn senders_serve_metrics_on_a_named_port_of_their_pod_ip() {
        let job = build_job(&campaign(), &channel(), "acme", 2, false, &settings()).unwrap();
        let container = &job.spec.unwrap().template.spec.unwrap().containers[0];
        let port = &container.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("metrics"), SENDER_METRICS_PORT));
        let env = |name: &str| container.env.iter().flatten().find(|e| e.name == name).cloned().unwrap();
        assert_eq!(env("DISPARO_METRICS_PORT").value.as_deref(), Some("9102"));
        assert_eq!(env("DISPARO_DB_POOLER").value.as_deref(), Some("direct"));
        let pooled = SenderSettings { db_pooler: crate::store::Pooler::PgbouncerTransaction, ..settings() };
        let job = build_job(&campaign(), &channel(), "acme", 2, false, &pooled).unwrap();
        let pod = job.spec.and_then(|s| s.template.spec).unwrap();
        let pooler = pod.containers[0].env.as_ref().unwrap().iter().find(|e| e.name == "DISPARO_DB_POOLER").cloned();
        assert_eq!(pooler.and_then(|e| e.value).as_deref(), Some("pgbouncer-transaction"), "what `disparo send` takes");
        let host = env("DISPARO_METRICS_HOST").value_from.unwrap().field_ref.unwrap();
        assert_eq!(host.field_path, "status.podIP");
        assert_eq!(env("DISPARO_CAMPAIGN_NAME").value, campaign().metadata.name);
    }

    #[test]
    fn job_names_are_unique_per_campaign_and_fit_a_label() {
        let long = "x".repeat(253);
        let a = job_name(&long, "6b1f7c1e-9a4e-4c2b-8f55-0c8b5d8f2a11");
        let b = job_name(&long, "0c8b5d8f-9a4e-4c2b-8f55-6b1f7c1e2a11");
        assert_ne!(a, b, "two campaigns sharing a long prefix share no Job");
        assert!(a.len() <= 63, "{a}");
        let mut c = campaign();
        c.metadata.name = Some(long);
        let job = build_job(&c, &channel(), "acme", 2, false, &settings()).unwrap();
        assert!(job.metadata.labels.unwrap().values().all(|v| v.len() <= 63), "label values fit");
    }

    #[test]
    fn an_edit_of_the_message_or_channel_makes_the_job_stale() {
        let job = build_job(&campaign(), &channel(), "acme", 2, false, &settings()).unwrap();
        let same = send_config_digest(&campaign(), &channel(), "acme", &settings()).unwrap();
        assert!(!is_stale(&job, &same));
        let mut edited = campaign();
        edited.spec.message.template.as_mut().unwrap().name = "promo_v2".into();
        assert!(is_stale(&job, &send_config_digest(&edited, &channel(), "acme", &settings()).unwrap()));
        let mut other = channel();
        other.spec.meta.as_mut().unwrap().phone_number_id = "999".into();
        assert!(is_stale(&job, &send_config_digest(&campaign(), &other, "acme", &settings()).unwrap()));
        let mut capped = channel();
        capped.spec.rate_limits.per_minute = Some(5);
        assert!(
            !is_stale(&job, &send_config_digest(&campaign(), &capped, "acme", &settings()).unwrap()),
            "caps reach senders live, not by a new Job"
        );
    }

    #[test]
    fn a_job_owned_by_another_campaign_is_foreign() {
        let job = build_job(&campaign(), &channel(), "acme", 2, false, &settings()).unwrap();
        assert_eq!(foreign_job(&job, "6b1f7c1e-9a4e-4c2b-8f55-0c8b5d8f2a11"), None);
        assert!(foreign_job(&job, "another-uid").is_some());
    }
}
