//! Channel reconciliation: are its Secrets there, is an Evolution instance connected,
//! how full are its windows. The result is the Channel's `Ready` condition, which
//! campaigns wait on, and its usage in status.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::campaign::FIELD_MANAGER;
use super::{Context, Error, Result};
use crate::api::condition::{ConditionType, DesiredCondition, merge_conditions};
use crate::api::{
    Channel, ChannelStatus, EffectiveLimits, Provider, RESUME_ANNOTATION, SecretKeyRef, WindowUsage, time,
};
use crate::store::pauses::{self, ChannelPause};
use crate::store::rate::{Limits, WindowKind};

/// How often a Channel is re-checked (window usage, connection state).
const RECHECK: Duration = Duration::from_secs(15);

/// How often a Channel that cannot send is re-checked.
const RECHECK_NOT_READY: Duration = Duration::from_secs(5);

fn secret_refs(channel: &Channel) -> Vec<(&'static str, &SecretKeyRef)> {
    let mut refs = Vec::new();
    if let Some(meta) = &channel.spec.meta {
        refs.extend([
            ("meta.accessToken", &meta.access_token),
            ("meta.appSecret", &meta.app_secret),
            ("meta.verifyToken", &meta.verify_token),
        ]);
    }
    if let Some(evo) = &channel.spec.evolution {
        refs.extend([("evolution.apiKey", &evo.api_key), ("evolution.webhookToken", &evo.webhook_token)]);
    }
    refs
}

/// What a Channel's reference to a Secret key finds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SecretRead {
    /// No such Secret.
    NoSecret,
    /// The Secret exists but is not labelled for Disparo: its data is not looked at.
    NotMarked,
    /// The Secret is labelled but has no such key.
    NoKey,
    /// The key's value.
    Value(String),
}

/// Whether a Secret is labelled as meant for Disparo.
fn is_marked(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(crate::api::CREDENTIALS_LABEL))
        .is_some_and(|value| value == "true")
}

/// What `r` finds in `secret`. Only a Secret labelled for Disparo is read: otherwise a
/// Channel could name any Secret of its namespace (the namespace's database URL, a TLS
/// key) and the controller would send it as a credential to the Channel's `baseUrl`.
fn read_key(secret: Option<&Secret>, r: &SecretKeyRef) -> SecretRead {
    let Some(secret) = secret else { return SecretRead::NoSecret };
    if !is_marked(secret) {
        return SecretRead::NotMarked;
    }
    let value = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let value = value.or_else(|| secret.string_data.as_ref().and_then(|d| d.get(&r.key)).cloned());
    value.map_or(SecretRead::NoKey, SecretRead::Value)
}

/// Reads one Secret key (see [`read_key`]).
async fn read_secret(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<SecretRead> {
    Ok(read_key(secrets.get_opt(&r.name).await?.as_ref(), r))
}

/// The value of a Secret key the channel references, if it is a labelled value.
pub(super) async fn secret_value(ctx: &Context, namespace: &str, r: &SecretKeyRef) -> Result<Option<String>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(match read_secret(&secrets, r).await? {
        SecretRead::Value(value) => Some(value),
        _ => None,
    })
}

/// Why a reference cannot be used, as the `Ready` condition's reason and message.
fn unusable(field: &str, r: &SecretKeyRef, read: &SecretRead, namespace: &str) -> Option<(&'static str, String)> {
    match read {
        SecretRead::Value(_) => None,
        SecretRead::NoSecret | SecretRead::NoKey => Some((
            "SecretMissing",
            format!("spec.{field} refers to key {:?} of Secret {:?}, which does not exist", r.key, r.name),
        )),
        SecretRead::NotMarked => Some((
            "SecretNotMarked",
            format!(
                "spec.{field} refers to Secret {:?}, which is not labelled {}=true: Disparo reads only Secrets meant for it. \
                 If this Secret holds the channel's credentials, run `kubectl label secret {} {}=true -n {namespace}`",
                r.name,
                crate::api::CREDENTIALS_LABEL,
                r.name,
                crate::api::CREDENTIALS_LABEL,
            ),
        )),
    }
}

/// Whether the channel can send, as its `Ready` condition says it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Readiness {
    /// It can (what a person reads).
    Ready(String),
    /// It cannot: the condition's reason and message.
    NotReady(&'static str, String),
}

/// What an Evolution instance's connection state means for its channel: only `open`
/// sends; any other state is a dropped WhatsApp session a person reconnects by scanning
/// the QR code (docs/providers.md B1). The state is shown as Evolution writes it.
fn instance_readiness(
    instance: &str,
    state: Result<crate::providers::evolution::ConnectionState, String>,
) -> Readiness {
    use crate::providers::evolution::ConnectionState;
    match state {
        Ok(ConnectionState::Open) => Readiness::Ready(format!(
            "Evolution instance {instance:?} is connected (connection state \"open\"); the channel can send"
        )),
        Ok(state) => Readiness::NotReady(
            "InstanceNotConnected",
            format!(
                "Evolution instance {instance:?} is not connected (connection state {:?}): its campaigns wait; scan the QR code in Evolution to connect the WhatsApp number again",
                state.as_str()
            ),
        ),
        Err(error) => Readiness::NotReady(
            "InstanceUnreachable",
            format!("cannot ask Evolution for instance {instance:?}'s connection state: {error}"),
        ),
    }
}

/// Whether the channel can send, and why not.
async fn readiness(channel: &Channel, ctx: &Context, namespace: &str) -> Result<Readiness> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for (field, r) in secret_refs(channel) {
        if let Some((reason, message)) = unusable(field, r, &read_secret(&secrets, r).await?, namespace) {
            return Ok(Readiness::NotReady(reason, message));
        }
    }
    if let (Provider::Evolution, Some(evo)) = (channel.spec.provider, &channel.spec.evolution) {
        // Read again: the Secret may have changed since the loop above; whatever is
        // not a labelled value now is not sent anywhere.
        let api_key = match read_secret(&secrets, &evo.api_key).await? {
            SecretRead::Value(value) => value,
            other => {
                // Not a value, so `unusable` always has a reason.
                let (reason, message) = unusable("evolution.apiKey", &evo.api_key, &other, namespace)
                    .unwrap_or(("SecretMissing", String::new()));
                return Ok(Readiness::NotReady(reason, message));
            }
        };
        let client = crate::providers::evolution::EvolutionClient::new(
            ctx.http.clone(),
            evo.base_url.clone(),
            evo.instance.clone(),
            crate::providers::Secret::new(api_key),
        );
        let state = client.connection_state().await.map_err(|error| error.to_string());
        return Ok(instance_readiness(&evo.instance, state));
    }
    Ok(Readiness::Ready("credentials found; the channel can send".to_owned()))
}

/// How soon the channel is looked at again: a channel that cannot send (a dropped
/// Evolution session, a refused credential) often, so that its campaigns go on soon
/// after a person fixed it; otherwise every [`RECHECK`].
fn recheck_after(readiness: &Readiness, pause: Option<&ChannelPause>) -> Duration {
    if matches!(readiness, Readiness::NotReady(..)) || matches!(pause, Some(ChannelPause::ProviderRefused { .. })) {
        RECHECK_NOT_READY
    } else {
        RECHECK
    }
}

/// The version of the channel's credentials: the resourceVersions of the Secrets it
/// references. A person who replaces a refused token changes it, which lifts the stop.
async fn credentials_version(channel: &Channel, ctx: &Context, namespace: &str) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut names: Vec<&str> = secret_refs(channel).iter().map(|(_, r)| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut parts = Vec::with_capacity(names.len());
    for name in names {
        let version = secrets.get_opt(name).await?.and_then(|s| s.metadata.resource_version).unwrap_or_default();
        parts.push(format!("{name}@{version}"));
    }
    Ok(parts.join(","))
}

/// A person's `kubectl disparo resume` on the Channel (a new resume annotation value):
/// lifts its pause. Returns the value taken, if a new one.
async fn take_resume_request(
    channel: &Channel,
    ctx: &Context,
    organization: &str,
    name: &str,
    old: &ChannelStatus,
) -> Result<Option<String>> {
    let Some(value) = channel.annotations().get(RESUME_ANNOTATION) else { return Ok(None) };
    if old.last_resume_request.as_deref() == Some(value.as_str()) {
        return Ok(None);
    }
    if pauses::clear_channel_pause(&ctx.pool, organization, name).await? {
        publish(
            ctx,
            channel,
            EventType::Normal,
            "Resumed",
            "a person resumed the channel: its campaigns send again".into(),
        )
        .await;
    }
    Ok(Some(value.clone()))
}

/// Entry point of the Channel controller.
#[instrument(skip_all, fields(namespace = channel.namespace().unwrap_or_default(), channel = channel.name_any()))]
pub(crate) async fn reconcile(channel: Arc<Channel>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("Channel");
    let namespace = channel.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = channel.name_any();
    let old = channel.status.clone().unwrap_or_default();
    // A namespace with a Channel gets its organization's credential, so that people can
    // import contacts before the first campaign.
    let organization = super::tenant::ensure(&ctx, &namespace).await?;
    let resume = take_resume_request(&channel, &ctx, &organization, &name, &old).await?;
    let readiness = readiness(&channel, &ctx, &namespace).await?;
    let limits = Limits::effective(channel.spec.provider, &channel.spec.rate_limits);
    // The caps reach running senders through Postgres; new credentials lift a stop.
    if pauses::observe_channel(
        &ctx.pool,
        &organization,
        &name,
        &limits,
        &credentials_version(&channel, &ctx, &namespace).await?,
    )
    .await?
    {
        publish(
            &ctx,
            &channel,
            EventType::Normal,
            "CredentialsChanged",
            "the channel's credentials changed: the provider's refusal is lifted and its campaigns send again".into(),
        )
        .await;
    }
    let windows = crate::store::rate::usage(&ctx.pool, &organization, &name).await?;
    let used = |k: WindowKind| windows.iter().find(|w| w.kind == k).map_or(0, |w| w.used);
    let pause = pauses::channel_pause(&ctx.pool, &organization, &name).await?;
    let account =
        super::account::observe(&channel, &ctx, &namespace, &organization, &name, old.account.as_ref()).await?;
    let condition = match (&readiness, &pause) {
        (Readiness::NotReady(reason, message), _) => {
            DesiredCondition::falsy(ConditionType::Ready, reason, message.clone())
        }
        (Readiness::Ready(_), Some(ChannelPause::ProviderRefused { code, message })) => DesiredCondition::falsy(
            ConditionType::Ready,
            "ProviderRefused",
            format!(
                "sending stopped: the provider refused the channel (error {code}: {message}); fix the credentials or account, then `kubectl disparo resume` a campaign of this channel or replace the credentials' Secret"
            ),
        ),
        (Readiness::Ready(message), _) => DesiredCondition::truthy(ConditionType::Ready, "Ready", message.clone()),
    };
    let status = ChannelStatus {
        observed_generation: channel.meta().generation,
        conditions: merge_conditions(
            &old.conditions,
            &[Some(condition), account.as_ref().map(|a| a.condition.clone())].into_iter().flatten().collect::<Vec<_>>(),
            channel.meta().generation,
            &time::k8s(Utc::now()),
        ),
        usage: Some(WindowUsage {
            minute: used(WindowKind::Minute),
            hour: used(WindowKind::Hour),
            day: used(WindowKind::Day),
            limits: Some(EffectiveLimits {
                per_minute: limits.per_minute,
                per_hour: limits.per_hour,
                per_day: limits.per_day,
                mode: Some(limits.mode),
                min_interval_millis: limits.min_interval.as_millis() as u32,
            }),
        }),
        rate_limited_until: match &pause {
            Some(ChannelPause::WindowSpent { until }) => Some(time::k8s(*until)),
            _ => None,
        },
        webhook_path: Some(format!("/webhooks/{}/{namespace}/{name}", channel.spec.provider)),
        last_resume_request: resume.or(old.last_resume_request.clone()),
        account: account.as_ref().map(|a| a.status.clone()),
    };
    if let Some(account) = &account {
        announce_quality(&ctx, &channel, &old, &account.condition).await;
    }
    if status != old {
        let api: Api<Channel> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "disparo.io/v1alpha1", "kind": "Channel", "status": status});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    let caps = [("minute", limits.per_minute), ("hour", limits.per_hour), ("day", limits.per_day)];
    ctx.metrics.observe_channel(&namespace, &name, &status, &caps);
    Ok(Action::requeue(recheck_after(&readiness, pause.as_ref())))
}

/// A Warning Event when the number's quality drops, a Normal one when it recovers.
async fn announce_quality(ctx: &Context, channel: &Channel, old: &ChannelStatus, now: &DesiredCondition) {
    let was = crate::api::condition::find(&old.conditions, ConditionType::QualityDegraded)
        .is_some_and(|c| c.status == "True");
    match (was, now.status) {
        (false, true) => publish(ctx, channel, EventType::Warning, "QualityDegraded", now.message.clone()).await,
        (true, false) => {
            publish(
                ctx,
                channel,
                EventType::Normal,
                "QualityRecovered",
                "Meta lifted the number's quality flag".into(),
            )
            .await;
        }
        _ => {}
    }
}

async fn publish(ctx: &Context, channel: &Channel, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &channel.object_ref(&())).await {
        tracing::warn!(%error, reason, "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(labels: &[(&str, &str)], data: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        s.data = Some(
            data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect::<BTreeMap<_, _>>(),
        );
        s
    }

    fn key(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef { name: name.into(), key: key.into() }
    }

    #[test]
    fn only_secrets_labelled_for_disparo_are_read() {
        let r = key("creds", "api-key");
        let marked = secret(&[("disparo.io/credentials", "true")], &[("api-key", "k")]);
        assert_eq!(read_key(Some(&marked), &r), SecretRead::Value("k".into()));
        assert_eq!(read_key(Some(&marked), &key("creds", "other")), SecretRead::NoKey);
        assert_eq!(read_key(None, &r), SecretRead::NoSecret);
        for labels in [
            &[][..],
            &[("disparo.io/credentials", "false")][..],
            &[("disparo.io/credentials", "True")][..],
            &[("app", "disparo")][..],
        ] {
            assert_eq!(read_key(Some(&secret(labels, &[("api-key", "k")])), &r), SecretRead::NotMarked, "{labels:?}");
        }
    }

    #[test]
    fn an_instance_is_ready_only_when_open_and_says_its_state() {
        use crate::providers::evolution::ConnectionState;
        let Readiness::Ready(message) = instance_readiness("shop", Ok(ConnectionState::Open)) else {
            panic!("open is ready")
        };
        assert!(message.contains("\"shop\"") && message.contains("\"open\""), "{message}");
        for (state, shown) in [
            (ConnectionState::Close, "close"),
            (ConnectionState::Connecting, "connecting"),
            (ConnectionState::Unknown, "unknown"),
        ] {
            match instance_readiness("shop", Ok(state)) {
                Readiness::NotReady(reason, message) => {
                    assert_eq!(reason, "InstanceNotConnected");
                    assert!(message.contains(&format!("\"{shown}\"")) && message.contains("QR code"), "{message}");
                }
                other => panic!("{state:?}: {other:?}"),
            }
        }
        assert!(matches!(
            instance_readiness("shop", Err("connection refused".into())),
            Readiness::NotReady("InstanceUnreachable", m) if m.contains("connection refused")
        ));
    }

    #[test]
    fn a_channel_that_cannot_send_is_looked_at_often() {
        let ready = Readiness::Ready(String::new());
        let dropped = Readiness::NotReady("InstanceNotConnected", String::new());
        let refused = ChannelPause::ProviderRefused { code: "190".into(), message: String::new() };
        let spent = ChannelPause::WindowSpent { until: Utc::now() };
        assert_eq!(recheck_after(&ready, None), RECHECK);
        assert_eq!(recheck_after(&ready, Some(&spent)), RECHECK);
        assert_eq!(recheck_after(&dropped, None), RECHECK_NOT_READY);
        assert_eq!(recheck_after(&ready, Some(&refused)), RECHECK_NOT_READY);
    }

    #[test]
    fn an_unmarked_secret_says_how_to_mark_it() {
        let r = key("disparo-database", "url");
        let (reason, message) = unusable("evolution.apiKey", &r, &SecretRead::NotMarked, "shop").unwrap_or_default();
        assert_eq!(reason, "SecretNotMarked");
        assert!(
            message.contains("`kubectl label secret disparo-database disparo.io/credentials=true -n shop`"),
            "{message}"
        );
        assert!(message.contains("spec.evolution.apiKey"), "{message}");
        assert_eq!(
            unusable("meta.appSecret", &r, &SecretRead::NoKey, "shop").map(|(reason, _)| reason),
            Some("SecretMissing")
        );
        assert_eq!(unusable("meta.appSecret", &r, &SecretRead::Value("v".into()), "shop"), None);
    }
}
