//! The secrets a webhook is checked against, per channel: Meta's app secret and verify
//! token, Evolution's shared header token. In a cluster they come from `Channel` and
//! `Secret` objects through watch-backed caches and are resolved on every request, so
//! a rotated Secret takes effect as soon as the watch delivers it, without a restart.
//! Tests use [`StaticCredentials`].
//!
//! The Secret cache holds only Secrets labelled `disparo.io/credentials: "true"`: the
//! API server filters the watch, so this internet-facing service never holds (nor
//! spends memory on) the cluster's other Secrets, such as Helm release records or the
//! tenants' database credentials, and a Channel naming an unlabelled Secret cannot be
//! verified (its webhooks are refused like those of an unknown channel).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::http::HeaderName;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{Channel, Provider, SecretKeyRef};

/// Secret bytes that never show in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    /// Wraps secret bytes. Surrounding whitespace is dropped: a Secret created with
    /// `echo token | kubectl create secret ... --from-file` ends in a newline nobody meant.
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(bytes.as_ref().trim_ascii().to_vec())
    }

    /// The bytes, for comparing or keying an HMAC.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// What a Meta channel's webhooks are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaSecrets {
    /// Keys `X-Hub-Signature-256`.
    pub app_secret: SecretValue,
    /// Answers the `hub.verify_token` of the subscription handshake.
    pub verify_token: SecretValue,
}

/// What an Evolution channel's webhooks are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvolutionSecrets {
    /// The custom header configured in Evolution's `webhook.headers`.
    pub header_name: HeaderName,
    /// The shared secret expected in that header (also the HS256 key when Evolution is
    /// configured with `jwt_key`).
    pub token: SecretValue,
}

/// Why a channel's secrets are not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No such channel in the namespace, or it uses the other provider. Answered like
    /// a request that fails authentication, so that nobody learns which namespaces and
    /// channels exist.
    #[error("no such channel")]
    NotFound,
    /// The channel exists but its credentials cannot be read: a referenced Secret is
    /// missing or not labelled for Disparo, a key is missing or empty. Answered like
    /// [`LookupError::NotFound`] (the reason is logged for the operator); the provider
    /// retries, and a retry after the fix goes through.
    #[error("channel credentials unusable: {0}")]
    Misconfigured(String),
    /// Nothing can be checked right now (the caches are not synced yet). Answered 503,
    /// the same for every URL, so the provider retries.
    #[error("channel credentials unavailable: {0}")]
    Unavailable(String),
}

/// Where the webhook service finds channel secrets.
#[async_trait::async_trait]
pub trait ChannelCredentials: Send + Sync + 'static {
    /// The secrets of a Meta channel.
    async fn meta(&self, namespace: &str, channel: &str) -> Result<MetaSecrets, LookupError>;
    /// The secrets of an Evolution channel.
    async fn evolution(&self, namespace: &str, channel: &str) -> Result<EvolutionSecrets, LookupError>;
    /// Whether the source has synced (readiness).
    fn is_ready(&self) -> bool;
}

/// Fixed in-memory credentials (tests, benchmarks, rehearsals). Changes take effect at
/// once, like a rotated Secret does in a cluster.
#[derive(Debug, Default)]
pub struct StaticCredentials {
    meta: RwLock<HashMap<(String, String), MetaSecrets>>,
    evolution: RwLock<HashMap<(String, String), EvolutionSecrets>>,
}

impl StaticCredentials {
    /// No channels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a Meta channel.
    pub fn set_meta(&self, namespace: &str, channel: &str, app_secret: &str, verify_token: &str) {
        let secrets =
            MetaSecrets { app_secret: SecretValue::new(app_secret), verify_token: SecretValue::new(verify_token) };
        if let Ok(mut map) = self.meta.write() {
            map.insert((namespace.to_owned(), channel.to_owned()), secrets);
        }
    }

    /// Adds or replaces an Evolution channel.
    pub fn set_evolution(&self, namespace: &str, channel: &str, header_name: HeaderName, token: &str) {
        let secrets = EvolutionSecrets { header_name, token: SecretValue::new(token) };
        if let Ok(mut map) = self.evolution.write() {
            map.insert((namespace.to_owned(), channel.to_owned()), secrets);
        }
    }
}

#[async_trait::async_trait]
impl ChannelCredentials for StaticCredentials {
    async fn meta(&self, namespace: &str, channel: &str) -> Result<MetaSecrets, LookupError> {
        let map = self.meta.read().map_err(|_| LookupError::Unavailable("lock poisoned".into()))?;
        map.get(&(namespace.to_owned(), channel.to_owned())).cloned().ok_or(LookupError::NotFound)
    }

    async fn evolution(&self, namespace: &str, channel: &str) -> Result<EvolutionSecrets, LookupError> {
        let map = self.evolution.read().map_err(|_| LookupError::Unavailable("lock poisoned".into()))?;
        map.get(&(namespace.to_owned(), channel.to_owned())).cloned().ok_or(LookupError::NotFound)
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Credentials read from the Kubernetes API: reflectors over every `Channel` and the
/// `Secret`s labelled for Disparo, resolved on each lookup.
#[derive(Clone)]
pub struct KubeCredentials {
    channels: Store<Channel>,
    secrets: Store<Secret>,
    ready: Arc<AtomicBool>,
}

impl KubeCredentials {
    /// Starts the watches. The returned task runs until `shutdown`; lookups answer
    /// `Unavailable` until both caches have their first full list.
    pub fn start(client: Client, shutdown: CancellationToken) -> (Self, JoinHandle<()>) {
        let (channels, channel_writer) = reflector::store::<Channel>();
        let (secrets, secret_writer) = reflector::store::<Secret>();
        let ready = Arc::new(AtomicBool::new(false));
        // Only the spec is needed.
        let channel_stream = reflector::reflector(
            channel_writer,
            watcher(Api::<Channel>::all(client.clone()), watcher::Config::default()).modify(|channel: &mut Channel| {
                channel.managed_fields_mut().clear();
                channel.annotations_mut().clear();
                channel.status = None;
            }),
        )
        .default_backoff()
        .for_each(|event| async move {
            if let Err(error) = event {
                warn!(%error, "watching Channels");
            }
        });
        // Only Secrets meant for Disparo, selected by the API server; of those only the
        // data is needed: drop what only costs memory (and, for the last-applied
        // annotation, would keep a second copy of the secret values).
        let secret_stream = reflector::reflector(
            secret_writer,
            watcher(Api::<Secret>::all(client), watcher::Config::default().labels(crate::api::CREDENTIALS_SELECTOR))
                .modify(|secret: &mut Secret| {
                    secret.managed_fields_mut().clear();
                    secret.annotations_mut().clear();
                    secret.labels_mut().clear();
                }),
        )
        .default_backoff()
        .for_each(|event| async move {
            if let Err(error) = event {
                warn!(%error, "watching Secrets");
            }
        });
        let task = {
            let (channels, secrets, ready) = (channels.clone(), secrets.clone(), ready.clone());
            tokio::spawn(async move {
                let synced = async {
                    if channels.wait_until_ready().await.is_ok() && secrets.wait_until_ready().await.is_ok() {
                        ready.store(true, Ordering::Release);
                        info!("channel and secret caches synced");
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = channel_stream => {}
                    _ = secret_stream => {}
                    _ = synced => {}
                }
            })
        };
        (Self { channels, secrets, ready }, task)
    }

    fn channel(&self, namespace: &str, name: &str, provider: Provider) -> Result<Arc<Channel>, LookupError> {
        if !self.is_ready() {
            return Err(LookupError::Unavailable("caches not synced yet".into()));
        }
        self.channels
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|channel| channel.spec.provider == provider)
            .ok_or(LookupError::NotFound)
    }

    fn secret(&self, namespace: &str, key_ref: &SecretKeyRef) -> Result<SecretValue, LookupError> {
        let secret = self.secrets.get(&ObjectRef::new(&key_ref.name).within(namespace)).ok_or_else(|| {
            LookupError::Misconfigured(format!(
                "Secret {}/{} not found, or not labelled {}=true",
                namespace,
                key_ref.name,
                crate::api::CREDENTIALS_LABEL
            ))
        })?;
        let value = secret.data.as_ref().and_then(|data| data.get(&key_ref.key)).ok_or_else(|| {
            LookupError::Misconfigured(format!("Secret {}/{} has no key {:?}", namespace, key_ref.name, key_ref.key))
        })?;
        let value = SecretValue::new(&value.0);
        if value.expose().is_empty() {
            return Err(LookupError::Misconfigured(format!(
                "Secret {}/{} key {:?} is empty",
                namespace, key_ref.name, key_ref.key
            )));
        }
        Ok(value)
    }
}

#[async_trait::async_trait]
impl ChannelCredentials for KubeCredentials {
    async fn meta(&self, namespace: &str, channel: &str) -> Result<MetaSecrets, LookupError> {
        let found = self.channel(namespace, channel, Provider::Meta)?;
        let settings = found.spec.meta.as_ref().ok_or(LookupError::NotFound)?;
        Ok(MetaSecrets {
            app_secret: self.secret(namespace, &settings.app_secret)?,
            verify_token: self.secret(namespace, &settings.verify_token)?,
        })
    }

    async fn evolution(&self, namespace: &str, channel: &str) -> Result<EvolutionSecrets, LookupError> {
        let found = self.channel(namespace, channel, Provider::Evolution)?;
        let settings = found.spec.evolution.as_ref().ok_or(LookupError::NotFound)?;
        let header_name = HeaderName::try_from(settings.webhook_header.as_str()).map_err(|_| {
            LookupError::Misconfigured(format!(
                "webhookHeader {:?} is not a valid header name",
                settings.webhook_header
            ))
        })?;
        Ok(EvolutionSecrets { header_name, token: self.secret(namespace, &settings.webhook_token)? })
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
