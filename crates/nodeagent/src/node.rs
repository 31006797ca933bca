//! The `Node` this agent stands for: registration, heartbeat, and going `NotReady`.
//!
//! The node lifecycle controller taints a node whose heartbeat goes stale and then
//! evicts its pods, which would pull Job pods out from under running processes. The
//! agent therefore renews both signals the controller reads: the `Ready` condition's
//! `lastHeartbeatTime` and the node's `Lease` in `kube-node-lease`, every
//! [`HEARTBEAT_INTERVAL`]. Everything is server-side applied with one field manager,
//! so a restarted agent simply takes its node over again.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Error, FIELD_MANAGER, LOCAL_IP, Result};

/// How often the node's heartbeat and lease are renewed; well inside the lifecycle
/// controller's grace period (40-50 s depending on the version).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// The lease duration kubelet uses.
const LEASE_DURATION_SECONDS: i32 = 40;
/// Namespace of node leases.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Reported as the runtime, so `kubectl get nodes -o wide` says what runs pods here.
const RUNTIME_VERSION: &str = concat!("disparo-node-agent://", env!("CARGO_PKG_VERSION"));
/// A semver-valid version that tells a reader this is not a real kubelet.
const KUBELET_VERSION: &str = concat!("v0.0.0-disparo-node-agent.", env!("CARGO_PKG_VERSION"));

/// The labels kubelet puts on its node, which `nodeSelector`s commonly use.
pub fn node_labels(node_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node_name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), go_arch().to_string()),
    ])
}

/// The architecture in Go's (and so Kubernetes') spelling.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Whether the node is offering to run pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Ready,
    NotReady,
}

/// A registered node whose status the agent owns.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    nodes: Api<Node>,
    leases: Api<Lease>,
    name: String,
    uid: String,
    max_pods: usize,
    /// When the node last became Ready; kept as the condition's transition time.
    ready_since: Timestamp,
}

/// Creates or takes over the Node, marks it Ready and takes its lease.
pub async fn register(client: Client, name: &str, max_pods: usize) -> Result<NodeHandle> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta { name: Some(name.to_string()), labels: Some(node_labels(name)), ..Default::default() },
        ..Default::default()
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = nodes.patch(name, &params, &Patch::Apply(&node)).await?;
    let uid = applied.metadata.uid.ok_or(Error::MissingObjectKey { kind: "Node", field: "metadata.uid" })?;
    let handle = NodeHandle {
        nodes,
        leases: Api::namespaced(client, NODE_LEASE_NAMESPACE),
        name: name.to_string(),
        uid,
        max_pods,
        ready_since: Timestamp::now(),
    };
    handle.apply_status(Readiness::Ready, handle.ready_since).await?;
    if let Err(error) = handle.renew_lease().await {
        // The Ready heartbeat alone keeps the node healthy; the lease is a second signal.
        warn!(error = %error, node = name, "could not take the node lease; relying on the Ready heartbeat");
    }
    info!(node = name, "node registered and Ready");
    Ok(handle)
}

impl NodeHandle {
    /// Keeps the heartbeat and lease fresh until `shutdown`. Failures are logged and
    /// retried at the next tick: a missed beat is harmless, and there is no caller
    /// that could do better than trying again.
    pub async fn keep_alive(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.apply_status(Readiness::Ready, self.ready_since).await {
                warn!(error = %error, node = %self.name, "node heartbeat failed");
            }
            if let Err(error) = self.renew_lease().await {
                warn!(error = %error, node = %self.name, "node lease renewal failed");
            }
        }
    }

    /// Marks the node NotReady so nothing mistakes it for a live node once the agent
    /// is gone.
    pub async fn mark_not_ready(&self) -> Result<()> {
        self.apply_status(Readiness::NotReady, Timestamp::now()).await?;
        info!(node = %self.name, "node marked NotReady");
        Ok(())
    }

    async fn apply_status(&self, readiness: Readiness, since: Timestamp) -> Result<()> {
        let node = Node {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
            status: Some(node_status(&self.name, readiness, since, Timestamp::now(), self.max_pods)),
            ..Default::default()
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.nodes.patch_status(&self.name, &params, &Patch::Apply(&node)).await?;
        Ok(())
    }

    async fn renew_lease(&self) -> Result<()> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(NODE_LEASE_NAMESPACE.to_string()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".to_string(),
                    kind: "Node".to_string(),
                    name: self.name.clone(),
                    uid: self.uid.clone(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.name.clone()),
                lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.leases.patch(&self.name, &params, &Patch::Apply(&lease)).await?;
        Ok(())
    }
}

/// The node's status: conditions, capacity from this machine, loopback addresses.
fn node_status(name: &str, readiness: Readiness, since: Timestamp, now: Timestamp, max_pods: usize) -> NodeStatus {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    let ready = match readiness {
        Readiness::Ready => condition("Ready", "True", "KubeletReady", "disparo node agent is posting ready status"),
        Readiness::NotReady => condition("Ready", "False", "KubeletNotReady", "disparo node agent stopped"),
    };
    let conditions = vec![
        condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory accounting"),
        condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk accounting"),
        condition("PIDPressure", "False", "KubeletHasSufficientPID", "no pid accounting"),
        ready,
    ];
    let mut capacity = BTreeMap::from([
        ("pods".to_string(), Quantity(max_pods.to_string())),
        ("cpu".to_string(), Quantity(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string())),
    ]);
    if let Some(kib) = memory_kib() {
        capacity.insert("memory".to_string(), Quantity(format!("{kib}Ki")));
    }
    NodeStatus {
        conditions: Some(conditions),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".to_string(), address: LOCAL_IP.to_string() },
            NodeAddress { type_: "Hostname".to_string(), address: name.to_string() },
        ]),
        node_info: Some(system_info()),
        ..Default::default()
    }
}

/// `MemTotal` from `/proc/meminfo`, when readable.
fn memory_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What `kubectl describe node` shows about the machine, read best-effort.
fn system_info() -> NodeSystemInfo {
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".to_string());
    let machine_id = read("/etc/machine-id");
    NodeSystemInfo {
        architecture: go_arch().to_string(),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        container_runtime_version: RUNTIME_VERSION.to_string(),
        kernel_version: read("/proc/sys/kernel/osrelease"),
        kube_proxy_version: String::new(),
        kubelet_version: KUBELET_VERSION.to_string(),
        system_uuid: machine_id.clone(),
        machine_id,
        operating_system: "linux".to_string(),
        os_image,
        swap: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_readiness_capacity_and_loopback() {
        let since = Timestamp::UNIX_EPOCH;
        let now = Timestamp::now();
        let status = node_status("n1", Readiness::Ready, since, now, 7);
        let ready = status.conditions.iter().flatten().find(|c| c.type_ == "Ready");
        let ready = ready.unwrap_or_else(|| panic!("no Ready condition"));
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_heartbeat_time, Some(Time(now)));
        assert_eq!(ready.last_transition_time, Some(Time(since)));
        assert_eq!(status.capacity.as_ref().and_then(|c| c.get("pods")), Some(&Quantity("7".into())));
        assert_eq!(status.capacity, status.allocatable);
        assert!(status.addresses.iter().flatten().any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1"));

        let status = node_status("n1", Readiness::NotReady, now, now, 7);
        let ready = status.conditions.iter().flatten().find(|c| c.type_ == "Ready");
        assert_eq!(ready.map(|c| c.status.as_str()), Some("False"));
    }

    #[test]
    fn labels_name_the_host() {
        let labels = node_labels("n1");
        assert_eq!(labels.get("kubernetes.io/hostname").map(String::as_str), Some("n1"));
        assert_eq!(labels.get("kubernetes.io/os").map(String::as_str), Some("linux"));
    }
}
