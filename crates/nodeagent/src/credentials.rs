//! Kubernetes API access for pods, granted the way kubelet grants it.
//!
//! The API server's ServiceAccount admission plugin already decided which containers
//! get a token: unless the pod or its ServiceAccount sets
//! `automountServiceAccountToken: false` (the pod's setting wins), it adds a projected
//! `kube-api-access-*` volume with a `serviceAccountToken` source and mounts it into
//! every container. Kubelet then fills that volume with a token bound to the pod,
//! requested through the TokenRequest API (`serviceaccounts/token`), and refreshes it
//! before it expires. This agent reads the same decision from the pod spec
//! ([`token_projection`]) and does the same, except that processes here have no
//! mount namespace and no cluster DNS, so instead of files at
//! `/var/run/secrets/kubernetes.io/serviceaccount` each such pod gets a private
//! directory holding the token and a kubeconfig that points at the agent's own API
//! server, and `KUBECONFIG` names it (kube clients read `KUBECONFIG` before trying the
//! in-cluster config). Pods without the volume, such as Disparo's sender Jobs, get
//! nothing.
//!
//! Requesting tokens needs `create` on `serviceaccounts/token`; the admin kubeconfig
//! the agent runs with on the test control plane has it.

use std::{
    fs::{DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{Container, Pod, ServiceAccount, ServiceAccountTokenProjection},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::PostParams,
    config::{AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext},
};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info, warn};

/// Where the API server's admission plugin mounts the ServiceAccount token; a
/// projection mounted here is preferred over any other token projection.
const SERVICE_ACCOUNT_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Token lifetime when the projection does not set one (the API default).
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Kubelet refreshes a token once 80 % of its lifetime has passed ...
const REFRESH_AT_PERCENT: u32 = 80;
/// ... or once it is a day old, whichever comes first.
const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// Delay before trying again after a failed refresh.
const REFRESH_RETRY: Duration = Duration::from_secs(10);
/// File names inside a pod's credentials directory.
const TOKEN_FILE: &str = "token";
const KUBECONFIG_FILE: &str = "kubeconfig";

/// Why a pod's API credentials could not be prepared. Reported on the pod as a
/// container configuration error and retried, like a missing Secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The TokenRequest was refused or failed.
    #[error("failed to fetch token for service account {namespace}/{account}: {source}")]
    Request {
        /// The pod's namespace.
        namespace: String,
        /// The ServiceAccount.
        account: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The API server answered a TokenRequest without a token.
    #[error("the token request for service account {namespace}/{account} returned no token")]
    NoToken {
        /// The pod's namespace.
        namespace: String,
        /// The ServiceAccount.
        account: String,
    },
    /// A credentials file or directory could not be written.
    #[error("could not write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kubeconfig could not be serialized.
    #[error("could not serialize the pod kubeconfig")]
    Serialize(#[source] serde_json::Error),
}

/// How containers reach the API server: the agent's own server and trust settings,
/// without its credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiEndpoint {
    /// The API server URL.
    pub server: String,
    /// `certificate-authority-data`: base64 of the PEM bundle the agent trusts.
    pub certificate_authority_data: Option<String>,
    /// A CA bundle file the agent reads (in-cluster agents), used when there is no data.
    pub certificate_authority: Option<PathBuf>,
    /// Whether the agent itself skips TLS verification.
    pub insecure_skip_tls_verify: bool,
    /// The server name the agent verifies the certificate against.
    pub tls_server_name: Option<String>,
}

impl ApiEndpoint {
    /// Takes the server and its trust settings from the agent's client configuration.
    pub fn from_config(config: &kube::Config) -> Self {
        let certificate_authority_data = config.root_cert.as_ref().filter(|certs| !certs.is_empty()).map(|certs| {
            let pem: String = certs
                .iter()
                .map(|der| {
                    pem::encode_config(
                        &pem::Pem::new("CERTIFICATE", der.as_slice()),
                        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                    )
                })
                .collect();
            base64::engine::general_purpose::STANDARD.encode(pem)
        });
        Self {
            server: config.cluster_url.to_string().trim_end_matches('/').to_string(),
            certificate_authority_data,
            certificate_authority: config.root_cert_file.clone(),
            insecure_skip_tls_verify: config.accept_invalid_certs,
            tls_server_name: config.tls_server_name.clone(),
        }
    }
}

/// The token a container gets, as the pod spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// `spec.serviceAccountName` (`default` when unset, as admission would set it).
    pub account: String,
    /// The token's audiences; empty means the API server's own.
    pub audiences: Vec<String>,
    /// Requested lifetime.
    pub expiration_seconds: i64,
}

/// The ServiceAccount token `container` mounts, if any: a `serviceAccountToken`
/// source of a projected volume the container mounts, preferring the one at the
/// standard path. `None` means the pod gets no API credentials.
pub fn token_projection(pod: &Pod, container: &Container) -> Option<TokenGrant> {
    let spec = pod.spec.as_ref()?;
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let projection_of = |volume_name: &str| -> Option<&ServiceAccountTokenProjection> {
        let volume = volumes.iter().find(|v| v.name == volume_name)?;
        let sources = volume.projected.as_ref()?.sources.as_deref()?;
        sources.iter().find_map(|source| source.service_account_token.as_ref())
    };
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let standard = mounts
        .iter()
        .filter(|m| m.mount_path.trim_end_matches('/') == SERVICE_ACCOUNT_MOUNT_PATH)
        .find_map(|m| projection_of(&m.name));
    let projection = standard.or_else(|| mounts.iter().find_map(|m| projection_of(&m.name)))?;
    let account = spec.service_account_name.clone().filter(|name| !name.is_empty());
    Some(TokenGrant {
        account: account.unwrap_or_else(|| "default".to_string()),
        audiences: projection.audience.iter().filter(|a| !a.is_empty()).cloned().collect(),
        expiration_seconds: projection.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS),
    })
}

/// A kubeconfig for a pod: the agent's server and trust settings, the pod's
/// namespace as default, and the token read from `token_file` (kube clients re-read
/// it, so refreshes reach running processes).
pub fn pod_kubeconfig(endpoint: &ApiEndpoint, namespace: &str, token_file: &Path) -> Kubeconfig {
    const NAME: &str = "in-cluster";
    let cluster = Cluster {
        server: Some(endpoint.server.clone()),
        certificate_authority_data: endpoint.certificate_authority_data.clone(),
        certificate_authority: match endpoint.certificate_authority_data {
            Some(_) => None,
            None => endpoint.certificate_authority.as_ref().map(|p| p.display().to_string()),
        },
        insecure_skip_tls_verify: endpoint.insecure_skip_tls_verify.then_some(true),
        tls_server_name: endpoint.tls_server_name.clone(),
        ..Default::default()
    };
    let user = AuthInfo { token_file: Some(token_file.display().to_string()), ..Default::default() };
    let context = Context {
        cluster: NAME.to_string(),
        user: Some(NAME.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    };
    Kubeconfig {
        api_version: Some("v1".to_string()),
        kind: Some("Config".to_string()),
        clusters: vec![NamedCluster { name: NAME.to_string(), cluster: Some(cluster), ..Default::default() }],
        auth_infos: vec![NamedAuthInfo { name: NAME.to_string(), auth_info: Some(user), ..Default::default() }],
        contexts: vec![NamedContext { name: NAME.to_string(), context: Some(context), ..Default::default() }],
        current_context: Some(NAME.to_string()),
        ..Default::default()
    }
}

/// When to refresh a token issued at `issued` that expires at `expires`: after 80 %
/// of its lifetime, at most a day later, as kubelet does.
pub fn refresh_after(issued: Timestamp, expires: Timestamp) -> Duration {
    let lifetime = Duration::try_from(expires.duration_since(issued)).unwrap_or(Duration::ZERO);
    (lifetime * REFRESH_AT_PERCENT / 100).min(MAX_REFRESH_INTERVAL)
}

/// The pod a token is bound to: the API server invalidates the token when it goes.
#[derive(Debug, Clone)]
pub struct BoundPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

/// A token and when it expires. No `Debug`: the token must never reach a log.
struct IssuedToken {
    token: String,
    expires: Timestamp,
}

/// A pod's credentials on disk, kept fresh for as long as this value lives. Dropping
/// it stops the refresh and removes the directory.
#[derive(Debug)]
pub struct PodCredentials {
    dir: PathBuf,
    kubeconfig: PathBuf,
    refresher: JoinHandle<()>,
}

impl PodCredentials {
    /// Requests the first token, writes it and the kubeconfig into `dir` (created
    /// private to the agent's user), and starts refreshing the token.
    pub async fn issue(
        client: Client,
        endpoint: &ApiEndpoint,
        pod: BoundPod,
        grant: TokenGrant,
        dir: PathBuf,
    ) -> Result<Self, CredentialError> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &pod.namespace);
        let issued_at = Timestamp::now();
        let first = request_token(&accounts, &pod, &grant).await?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| CredentialError::Write { path: dir.clone(), source })?;
        let token_path = dir.join(TOKEN_FILE);
        let kubeconfig_path = dir.join(KUBECONFIG_FILE);
        write_private(&token_path, first.token.as_bytes())?;
        let kubeconfig = pod_kubeconfig(endpoint, &pod.namespace, &token_path);
        let kubeconfig_json = serde_json::to_vec_pretty(&kubeconfig).map_err(CredentialError::Serialize)?;
        write_private(&kubeconfig_path, &kubeconfig_json)?;
        info!(account = %grant.account, expires = %first.expires, "service account token issued");

        let delay = refresh_after(issued_at, first.expires);
        let refresher = tokio::spawn(keep_fresh(accounts, pod, grant, token_path, delay).in_current_span());
        Ok(Self { dir, kubeconfig: kubeconfig_path, refresher })
    }

    /// The kubeconfig file to hand the container as `KUBECONFIG`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }
}

impl Drop for PodCredentials {
    fn drop(&mut self) {
        self.refresher.abort();
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            debug!(dir = %self.dir.display(), %error, "could not remove the pod's credentials");
        }
    }
}

/// Replaces the token file before each token expires, until aborted.
async fn keep_fresh(
    accounts: Api<ServiceAccount>,
    pod: BoundPod,
    grant: TokenGrant,
    token_path: PathBuf,
    mut delay: Duration,
) {
    loop {
        tokio::time::sleep(delay).await;
        let issued_at = Timestamp::now();
        let refreshed = match request_token(&accounts, &pod, &grant).await {
            Ok(issued) => write_private(&token_path, issued.token.as_bytes()).map(|()| issued.expires),
            Err(error) => Err(error),
        };
        delay = match refreshed {
            Ok(expires) => {
                debug!(account = %grant.account, %expires, "service account token refreshed");
                refresh_after(issued_at, expires)
            }
            Err(error) => {
                warn!(%error, "could not refresh the service account token; retrying");
                REFRESH_RETRY
            }
        };
    }
}

async fn request_token(
    accounts: &Api<ServiceAccount>,
    pod: &BoundPod,
    grant: &TokenGrant,
) -> Result<IssuedToken, CredentialError> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: grant.audiences.clone(),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_string()),
                kind: Some("Pod".to_string()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
            }),
            expiration_seconds: Some(grant.expiration_seconds),
        },
        ..Default::default()
    };
    let response =
        accounts.create_token_request(&grant.account, &PostParams::default(), &request).await.map_err(|source| {
            CredentialError::Request { namespace: pod.namespace.clone(), account: grant.account.clone(), source }
        })?;
    match response.status {
        Some(status) if !status.token.is_empty() => {
            Ok(IssuedToken { token: status.token, expires: status.expiration_timestamp.0 })
        }
        _ => Err(CredentialError::NoToken { namespace: pod.namespace.clone(), account: grant.account.clone() }),
    }
}

/// Writes `contents` to `path` readable by the agent's user only, replacing it
/// atomically so a client re-reading the token never sees half a file.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), CredentialError> {
    let staging = path.with_extension("tmp");
    let error = |source| CredentialError::Write { path: path.to_path_buf(), source };
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&staging).map_err(error)?;
    file.write_all(contents).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&staging, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context as _, Result};
    use serde_json::json;

    /// A pod as the ServiceAccount admission plugin leaves it.
    fn admitted_pod(
        volumes: serde_json::Value,
        mounts: serde_json::Value,
        account: Option<&str>,
    ) -> Result<(Pod, Container)> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "serviceAccountName": account,
                "containers": [{"name": "main", "volumeMounts": mounts}],
                "volumes": volumes,
            },
        }))?;
        let container = pod.spec.as_ref().and_then(|s| s.containers.first()).context("no container")?.clone();
        Ok((pod, container))
    }

    fn api_access_volume(name: &str, token: serde_json::Value) -> serde_json::Value {
        json!({"name": name, "projected": {"sources": [
            {"serviceAccountToken": token},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ]}})
    }

    #[test]
    fn the_admission_volume_grants_a_token_for_the_pods_account() -> Result<()> {
        let (pod, container) = admitted_pod(
            json!([api_access_volume("kube-api-access-x", json!({"expirationSeconds": 3607, "path": "token"}))]),
            json!([{"name": "kube-api-access-x", "mountPath": SERVICE_ACCOUNT_MOUNT_PATH, "readOnly": true}]),
            Some("controller"),
        )?;
        let grant = token_projection(&pod, &container);
        let expected = TokenGrant { account: "controller".into(), audiences: vec![], expiration_seconds: 3607 };
        assert_eq!(grant, Some(expected));
        Ok(())
    }

    #[test]
    fn no_mounted_token_means_no_credentials() -> Result<()> {
        // automountServiceAccountToken: false (pod or account): admission adds nothing.
        let (pod, container) = admitted_pod(json!([]), json!([]), Some("default"))?;
        assert_eq!(token_projection(&pod, &container), None);
        // A token volume the container does not mount is not its business.
        let (pod, container) = admitted_pod(
            json!([api_access_volume("kube-api-access-x", json!({"path": "token"}))]),
            json!([]),
            Some("default"),
        )?;
        assert_eq!(token_projection(&pod, &container), None);
        // Nor is a projected volume without a token.
        let (pod, container) = admitted_pod(
            json!([{"name": "cfg", "projected": {"sources": [{"configMap": {"name": "c"}}]}}]),
            json!([{"name": "cfg", "mountPath": "/etc/cfg"}]),
            None,
        )?;
        assert_eq!(token_projection(&pod, &container), None);
        Ok(())
    }

    #[test]
    fn the_standard_mount_wins_and_audience_and_defaults_carry_over() -> Result<()> {
        let (pod, container) = admitted_pod(
            json!([
                api_access_volume("vault", json!({"audience": "vault", "expirationSeconds": 600, "path": "t"})),
                api_access_volume("kube-api-access-y", json!({"path": "token"})),
            ]),
            json!([
                {"name": "vault", "mountPath": "/var/run/vault"},
                {"name": "kube-api-access-y", "mountPath": format!("{SERVICE_ACCOUNT_MOUNT_PATH}/")},
            ]),
            None,
        )?;
        let expected = TokenGrant { account: "default".into(), audiences: vec![], expiration_seconds: 3600 };
        assert_eq!(token_projection(&pod, &container), Some(expected));

        let (pod, container) = admitted_pod(
            json!([api_access_volume("vault", json!({"audience": "vault", "expirationSeconds": 600, "path": "t"}))]),
            json!([{"name": "vault", "mountPath": "/var/run/vault"}]),
            Some("app"),
        )?;
        let expected = TokenGrant { account: "app".into(), audiences: vec!["vault".into()], expiration_seconds: 600 };
        assert_eq!(token_projection(&pod, &container), Some(expected));
        Ok(())
    }

    #[test]
    fn the_kubeconfig_points_at_the_agents_server_and_reads_the_token_file() -> Result<()> {
        let endpoint = ApiEndpoint {
            server: "https://127.0.0.1:6443".into(),
            certificate_authority_data: Some("Q0E=".into()),
            certificate_authority: Some("/etc/ca.crt".into()),
            insecure_skip_tls_verify: false,
            tls_server_name: None,
        };
        let config = pod_kubeconfig(&endpoint, "team-a", Path::new("/state/pod/token"));
        let value = serde_json::to_value(&config)?;
        assert_eq!(value["current-context"], "in-cluster");
        assert_eq!(value["clusters"][0]["cluster"]["server"], "https://127.0.0.1:6443");
        assert_eq!(value["clusters"][0]["cluster"]["certificate-authority-data"], "Q0E=");
        assert!(value["clusters"][0]["cluster"].get("certificate-authority").is_none(), "data wins over a file");
        assert!(value["clusters"][0]["cluster"].get("insecure-skip-tls-verify").is_none());
        assert_eq!(value["users"][0]["user"], json!({"tokenFile": "/state/pod/token"}));
        assert_eq!(value["contexts"][0]["context"]["namespace"], "team-a");
        // What kube reads back is the same configuration.
        let read: Kubeconfig = serde_yaml::from_slice(&serde_json::to_vec(&config)?)?;
        let user = read.auth_infos.first().and_then(|a| a.auth_info.as_ref()).context("no user")?;
        assert_eq!(user.token_file.as_deref(), Some("/state/pod/token"));
        Ok(())
    }

    #[test]
    fn the_endpoint_carries_the_agents_trust_as_pem() -> Result<()> {
        let mut config = kube::Config::new("https://127.0.0.1:6443/".parse()?);
        config.root_cert = Some(vec![vec![1, 2, 3]]);
        let endpoint = ApiEndpoint::from_config(&config);
        assert_eq!(endpoint.server, "https://127.0.0.1:6443");
        let data = endpoint.certificate_authority_data.context("no CA data")?;
        let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data)?)?;
        assert_eq!(pem, "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n");
        Ok(())
    }

    #[test]
    fn tokens_are_refreshed_at_80_percent_of_their_life_and_at_least_daily() -> Result<()> {
        let issued = Timestamp::from_second(1_000_000)?;
        let at = |seconds: i64| Timestamp::from_second(1_000_000 + seconds);
        assert_eq!(refresh_after(issued, at(3600)?), Duration::from_secs(2880));
        assert_eq!(refresh_after(issued, at(365 * 24 * 3600)?), MAX_REFRESH_INTERVAL);
        assert_eq!(refresh_after(issued, at(-5)?), Duration::ZERO);
        Ok(())
    }
}
