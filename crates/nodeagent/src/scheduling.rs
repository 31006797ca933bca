//! The scheduler's half: which pending pods this node takes, and binding them.
//!
//! There is a single node, so scheduling is admission: a pod is taken if it is
//! waiting for the default scheduler, is not gated, and its `nodeSelector` matches
//! this node's labels. Affinity, taints and resource fit are not evaluated; capacity
//! is the pod count (`--max-pods`), enforced by the caller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

use super::status::Phase;

/// The scheduler name pods get by default; pods naming another scheduler are left to it.
const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Whether this node should bind `pod`.
pub fn is_bindable(pod: &Pod, node_labels: &BTreeMap<String, String>) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return false };
    let unassigned = spec.node_name.as_deref().is_none_or(str::is_empty);
    let ours = spec.scheduler_name.as_deref().is_none_or(|name| name == DEFAULT_SCHEDULER);
    let ungated = spec.scheduling_gates.as_ref().is_none_or(Vec::is_empty);
    let alive = pod.metadata.deletion_timestamp.is_none();
    let pending = pod
        .status
        .as_ref()
        .and_then(|status| Phase::parse(status.phase.as_deref()))
        .is_none_or(|phase| phase == Phase::Pending);
    let fits = spec.node_selector.iter().flatten().all(|(key, value)| node_labels.get(key) == Some(value));
    unassigned && ours && ungated && alive && pending && fits
}

/// The order pending pods are bound in: oldest first, as a FIFO queue would.
pub fn queue_key(pod: &Pod) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        pod.metadata.creation_timestamp.as_ref().map(|time| time.0),
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// What came of a binding attempt.
#[derive(Debug)]
pub enum BindOutcome {
    /// The pod is now assigned to this node.
    Bound,
    /// It was assigned elsewhere or deleted meanwhile; nothing to do.
    Lost,
}

/// Binds pod `name` in `api`'s namespace to `node` through `pods/binding`, as the
/// scheduler does (which also sets the `PodScheduled` condition).
pub async fn bind(api: &Api<Pod>, name: &str, node: &str) -> Result<BindOutcome, kube::Error> {
    let binding = Binding {
        metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
        target: ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    };
    let result: Result<serde_json::Value, _> =
        api.create_subresource("binding", name, &PostParams::default(), &binding).await;
    match result {
        Ok(_) => Ok(BindOutcome::Bound),
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_not_found() => Ok(BindOutcome::Lost),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSchedulingGate, PodSpec, PodStatus};

    use super::*;

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/os".to_string(), "linux".to_string())])
    }

    fn pending() -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some("p".into()), namespace: Some("ns".into()), ..Default::default() },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus { phase: Some("Pending".into()), ..Default::default() }),
        }
    }

    fn with_spec(edit: impl FnOnce(&mut PodSpec)) -> Pod {
        let mut pod = pending();
        if let Some(spec) = pod.spec.as_mut() {
            edit(spec);
        }
        pod
    }

    #[test]
    fn binds_only_what_a_scheduler_would_hand_this_node() {
        let deleting = {
            let mut pod = pending();
            pod.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            pod
        };
        let failed = {
            let mut pod = pending();
            pod.status = Some(PodStatus { phase: Some("Failed".into()), ..Default::default() });
            pod
        };
        let cases = [
            ("plain pending pod", pending(), true),
            ("no status yet", Pod { status: None, ..pending() }, true),
            ("empty nodeName", with_spec(|s| s.node_name = Some(String::new())), true),
            ("default scheduler", with_spec(|s| s.scheduler_name = Some("default-scheduler".into())), true),
            (
                "matching nodeSelector",
                with_spec(|s| s.node_selector = Some(BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]))),
                true,
            ),
            ("already assigned", with_spec(|s| s.node_name = Some("other".into())), false),
            ("other scheduler", with_spec(|s| s.scheduler_name = Some("volcano".into())), false),
            (
                "scheduling gate",
                with_spec(|s| s.scheduling_gates = Some(vec![PodSchedulingGate { name: "wait".into() }])),
                false,
            ),
            (
                "foreign nodeSelector",
                with_spec(|s| s.node_selector = Some(BTreeMap::from([("gpu".into(), "true".into())]))),
                false,
            ),
            ("being deleted", deleting, false),
            ("already failed", failed, false),
            ("no spec", Pod { spec: None, ..pending() }, false),
        ];
        for (what, pod, expected) in cases {
            assert_eq!(is_bindable(&pod, &labels()), expected, "{what}");
        }
    }
}
