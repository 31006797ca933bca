//! Leader election with a coordination.k8s.io Lease, so two controller replicas can run
//! and only one reconciles. The holder renews every `renew`; a standby takes over once
//! the lease has not been renewed for `duration`. A leader that stops cleanly releases
//! the lease so its successor takes over at once.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::time;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
}

/// Whether `identity` may take a lease in state `spec` at `now`.
pub(crate) fn may_acquire(spec: Option<&LeaseSpec>, identity: &str, now: chrono::DateTime<Utc>) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = chrono::Duration::seconds(spec.lease_duration_seconds.unwrap_or(15).into());
            match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
                Some(renewed) => now - time::instant(&renewed.0) > duration,
                None => true,
            }
        }
    }
}

async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaseConfig) -> kube::Result<bool> {
    let now = Utc::now();
    let existing = api.get_opt(&cfg.name).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
                acquire_time: Some(time::k8s_micro(now)),
                renew_time: Some(time::k8s_micro(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    if !may_acquire(lease.spec.as_ref(), &cfg.identity, now) {
        return Ok(false);
    }
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.acquire_time = Some(time::k8s_micro(now));
        spec.holder_identity = Some(cfg.identity.clone());
    }
    spec.renew_time = Some(time::k8s_micro(now));
    spec.lease_duration_seconds = Some(cfg.duration.as_secs() as i32);
    lease.spec = Some(spec);
    // replace carries the resourceVersion: a concurrent writer makes this fail with 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the lease (or shutdown: returns false).
pub(crate) async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig, shutdown: &CancellationToken) -> bool {
    loop {
        match try_acquire_or_renew(api, cfg).await {
            Ok(true) => {
                info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
                return true;
            }
            Ok(false) => {}
            Err(error) => warn!(%error, "lease acquisition failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Renews the lease until shutdown or until it is lost; cancels `lost` when it is lost.
pub async fn hold(api: Api<Lease>, cfg: LeaseConfig, shutdown: CancellationToken, lost: CancellationToken) {
    let mut last_renewed = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(cfg.renew) => {}
        }
        match try_acquire_or_renew(&api, &cfg).await {
            Ok(true) => last_renewed = std::time::Instant::now(),
            Ok(false) => {
                warn!("lost the lease to another replica");
                lost.cancel();
                return;
            }
            Err(error) => {
                warn!(%error, "lease renewal failed");
                if last_renewed.elapsed() > cfg.duration {
                    lost.cancel();
                    return;
                }
            }
        }
    }
    release(&api, &cfg).await;
}

/// Gives the lease up (on clean shutdown) so a standby takes over at once.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(error) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
            warn!(%error, "could not release the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64, now: chrono::DateTime<Utc>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(time::k8s_micro(now - chrono::Duration::seconds(renewed_secs_ago))),
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_respected() {
        let now = Utc::now();
        assert!(!may_acquire(Some(&spec("a", 5, now)), "b", now));
        assert!(may_acquire(Some(&spec("a", 16, now)), "b", now));
        assert!(may_acquire(Some(&spec("b", 5, now)), "b", now));
        assert!(may_acquire(None, "b", now));
        assert!(may_acquire(Some(&LeaseSpec::default()), "b", now));
    }
}
