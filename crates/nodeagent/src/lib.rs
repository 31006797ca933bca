//! `disparo-nodeagent`: a stand-in for kube-scheduler and kubelet on this machine.
//!
//! A crate of its own, apart from the product: the `disparo` binary and image never
//! contain it. Only the tests and the demo run it, next to the `disparo` binary whose
//! pods it runs.
//!
//! The project tests against a real kube-apiserver and kube-controller-manager, but
//! there is no scheduler, no kubelet and no container runtime. Without them the Pods
//! the Job controller creates stay `Pending` forever. This agent closes that gap just
//! far enough for the operator's lifecycle (Indexed Jobs, suspend, delete, pod failure
//! policy) to be exercised for real:
//!
//! - `node` registers a `Node`, keeps its `Ready` heartbeat and node `Lease` fresh
//!   so the node lifecycle controller never taints or evicts, and marks it `NotReady`
//!   on the way out.
//! - `scheduling` binds pending, unassigned pods to that node (`pods/binding`),
//!   oldest first, up to `--max-pods`.
//! - `pod` supervises one bound pod: resolves its environment ([`env`](mod@env)), builds its
//!   command line ([`command`]), runs it as a local process group (`process`),
//!   reports its status like kubelet would ([`status`]), restarts it per
//!   `restartPolicy`, and honours graceful deletion.
//! - `agent` owns the pod watch and dispatches pods to binding and supervision.
//!
//! What it deliberately leaves out: images (every container runs `--binary`, by
//! default the `disparo` beside this executable, or an absolute host path named in
//! `command`), init containers and sidecars (only the first regular container runs),
//! volumes, probes (a running process counts as ready), networking (every pod's IP is 127.0.0.1), resource limits, node affinity
//! and taints (only `nodeSelector` is honoured), and the in-cluster service
//! environment (`KUBERNETES_SERVICE_*` is never set). Pods that mount a ServiceAccount
//! token get API access through a per-pod kubeconfig instead ([`credentials`]).

mod agent;
mod args;
pub mod command;
pub mod credentials;
pub mod env;
mod node;
mod pod;
mod process;
mod scheduling;
pub mod status;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub use args::NodeAgentArgs;

/// The field manager for every write the agent makes, so `managedFields` shows who
/// owns the node, its lease and the pod statuses.
const FIELD_MANAGER: &str = "disparo-node-agent";

/// The node's address: processes share the host's network namespace, so loopback is
/// the honest answer.
const LOCAL_IP: &str = "127.0.0.1";

/// A pod's own address, derived from its UID: every address of 127.0.0.0/8 is loopback
/// on Linux, so each pod gets one of its own. Two pods that bind the same port on their
/// pod IP (a sender's metrics port, found by Prometheus through `status.podIP`) then do
/// not collide, as they would not in separate network namespaces. A process binding
/// 0.0.0.0 still shares the host's ports, as under `hostNetwork`.
fn pod_ip(uid: &str) -> std::net::Ipv4Addr {
    // FNV-1a: stable across builds, so an agent restarted on a running pod reports the
    // address that pod was given.
    let hash = uid.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let [a, b, c, _] = hash.to_be_bytes();
    std::net::Ipv4Addr::new(127, 1 + a % 254, b, 1 + c % 254)
}

#[cfg(test)]
mod pod_ip_tests {
    use super::pod_ip;

    #[test]
    fn pods_get_distinct_loopback_addresses_that_never_are_the_node_s() {
        let addresses: std::collections::HashSet<_> = (0..1000).map(|i| pod_ip(&format!("uid-{i}"))).collect();
        assert!(addresses.len() >= 999, "almost no collisions among 1,000 pods");
        assert!(addresses.iter().all(|ip| ip.is_loopback() && ip.octets()[1] != 0 && ip.octets()[3] != 0));
        assert_eq!(pod_ip("same"), pod_ip("same"));
    }
}

/// Why the node agent could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed.
    #[error("kubernetes API request failed")]
    Kube(#[from] kube::Error),
    /// No kubeconfig or in-cluster configuration was found.
    #[error("could not find a kubernetes configuration (KUBECONFIG or in-cluster)")]
    Config(#[source] kube::config::InferConfigError),
    /// Building a kube client from the configuration failed.
    #[error("could not build a kubernetes client from the configuration")]
    Client(#[source] kube::Error),
    /// `--binary` was not given and the agent's own executable could not be found.
    #[error("could not locate the node agent's own executable to find `disparo` beside it (pass --binary)")]
    CurrentExe(#[source] std::io::Error),
    /// `--binary` was not given and no `disparo` stands beside the agent's executable.
    #[error("no `disparo` executable at {0} (build it with `cargo build -p disparo`, or pass --binary)")]
    NoDefaultBinary(PathBuf),
    /// The directory for per-pod logs could not be created.
    #[error("could not create work directory {path}")]
    WorkDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An object came back from the API without a field the API always sets.
    #[error("{kind} is missing {field}")]
    MissingObjectKey {
        /// The kind of object.
        kind: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// The pod watch stream ended, which a healthy watcher never does.
    #[error("the pod watch ended unexpectedly")]
    WatchEnded,
    /// `--max-pods` was zero, so the agent could never run anything.
    #[error("--max-pods must be at least 1")]
    NoCapacity,
}

/// Result alias for the node agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the node agent against the cluster the environment points at (`KUBECONFIG`
/// or the in-cluster config) until `shutdown` is cancelled.
///
/// On return every process the agent started has been terminated and the node is
/// marked `NotReady`.
pub async fn run(args: NodeAgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.map_err(Error::Config)?;
    run_with_config(config, args, shutdown).await?;
    Ok(())
}

/// Like [`run`], with a configuration the caller built. The configuration's server
/// and trust settings, never its credentials, are also what pods with a
/// ServiceAccount token use to reach the API server.
pub async fn run_with_config(config: kube::Config, args: NodeAgentArgs, shutdown: CancellationToken) -> Result<()> {
    let endpoint = credentials::ApiEndpoint::from_config(&config);
    let client = kube::Client::try_from(config).map_err(Error::Client)?;
    let settings = args::Settings::resolve(args, endpoint)?;
    agent::run(client, settings, shutdown).await
}
