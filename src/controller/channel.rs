//! Channel reconciliation: are its Secrets there, is an Evolution instance connected,
//! how full are its windows. The result is the Channel's `Ready` condition, which
//! campaigns wait on, and its usage in status.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::campaign::FIELD_MANAGER;
use super::{Context, Error, Result};
use crate::api::condition::{ConditionType, DesiredCondition, merge_conditions};
use crate::api::{Channel, ChannelStatus, EffectiveLimits, Provider, SecretKeyRef, WindowUsage, time};
use crate::store::rate::{Limits, WindowKind};

/// How often a Channel is re-checked (window usage, connection state).
const RECHECK: Duration = Duration::from_secs(15);

fn secret_refs(channel: &Channel) -> Vec<(&'static str, &SecretKeyRef)> {
    let mut refs = Vec::new();
    if let Some(meta) = &channel.spec.meta {
        refs.extend([("meta.accessToken", &meta.access_token), ("meta.appSecret", &meta.app_secret), ("meta.verifyToken", &meta.verify_token)]);
    }
    if let Some(evo) = &channel.spec.evolution {
        refs.extend([("evolution.apiKey", &evo.api_key), ("evolution.webhookToken", &evo.webhook_token)]);
    }
    refs
}

/// Reads one Secret key (None: the Secret or key is missing).
async fn read_secret(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<Option<String>> {
    let Some(secret) = secrets.get_opt(&r.name).await? else { return Ok(None) };
    let value = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let value = value.or_else(|| secret.string_data.as_ref().and_then(|d| d.get(&r.key)).cloned());
    Ok(value)
}

/// Why the channel cannot send, if it cannot.
async fn readiness(channel: &Channel, ctx: &Context, namespace: &str) -> Result<Option<(&'static str, String)>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for (field, r) in secret_refs(channel) {
        if read_secret(&secrets, r).await?.is_none() {
            return Ok(Some(("SecretMissing", format!("spec.{field} refers to key {:?} of Secret {:?}, which does not exist", r.key, r.name))));
        }
    }
    if let (Provider::Evolution, Some(evo)) = (channel.spec.provider, &channel.spec.evolution) {
        let Some(api_key) = read_secret(&secrets, &evo.api_key).await? else { return Ok(None) };
        let client = crate::providers::evolution::EvolutionClient::new(
            ctx.http.clone(),
            evo.base_url.clone(),
            evo.instance.clone(),
            crate::providers::Secret::new(api_key),
        );
        match client.connection_state().await {
            Ok(crate::providers::evolution::ConnectionState::Open) => {}
            Ok(state) => {
                return Ok(Some((
                    "InstanceNotConnected",
                    format!("Evolution instance {:?} is {state:?}, not Open: scan the QR code in Evolution to connect the WhatsApp number", evo.instance),
                )));
            }
            Err(error) => return Ok(Some(("InstanceUnreachable", format!("cannot ask Evolution for the instance's state: {error}")))),
        }
    }
    Ok(None)
}

/// Entry point of the Channel controller.
#[instrument(skip_all, fields(namespace = channel.namespace().unwrap_or_default(), channel = channel.name_any()))]
pub async fn reconcile(channel: Arc<Channel>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("Channel");
    let namespace = channel.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = channel.name_any();
    let old = channel.status.clone().unwrap_or_default();
    let not_ready = readiness(&channel, &ctx, &namespace).await?;
    let limits = Limits::effective(channel.spec.provider, &channel.spec.rate_limits);
    let windows = crate::store::rate::usage(&ctx.pool, &namespace, &name).await?;
    let used = |k: WindowKind| windows.iter().find(|w| w.kind == k).map_or(0, |w| w.used);
    let pause = crate::store::rate::channel_pause(&ctx.pool, &namespace, &name).await?;
    let condition = match &not_ready {
        Some((reason, message)) => DesiredCondition::falsy(ConditionType::Ready, reason, message.clone()),
        None => DesiredCondition::truthy(ConditionType::Ready, "Ready", "credentials found; the channel can send"),
    };
    let mut status = ChannelStatus {
        observed_generation: channel.meta().generation,
        conditions: merge_conditions(&old.conditions, &[condition], channel.meta().generation, &time::k8s(Utc::now())),
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
        rate_limited_until: pause.as_ref().map(|(until, _)| time::k8s(*until)),
        webhook_path: Some(format!("/webhooks/{}/{namespace}/{name}", channel.spec.provider)),
    };
    if let Some((_, reason)) = &pause
        && !reason.contains("day window")
    {
        status.conditions = merge_conditions(
            &status.conditions,
            &[DesiredCondition::falsy(ConditionType::Ready, "ProviderRefused", format!("sending stopped: {reason}; fix the credentials or account, then clear with `kubectl disparo resume`"))],
            channel.meta().generation,
            &time::k8s(Utc::now()),
        );
    }
    if status != old {
        let api: Api<Channel> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "disparo.io/v1alpha1", "kind": "Channel", "status": status});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(Action::requeue(RECHECK))
}
