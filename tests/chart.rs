//! The Helm chart and the GitOps health check: lint and render with the real helm,
//! the values schema rejects typos and wrong types, the chart's CRDs equal crds/, the
//! rendered RBAC grants nothing beyond what each component needs, and the Argo CD Lua
//! health check judges real status objects.

use std::collections::BTreeSet;
use std::process::Command;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/disparo");

fn helm() -> String {
    if let Ok(helm) = std::env::var("HELM") {
        return helm;
    }
    let cache = std::env::var("DISPARO_CACHE").unwrap_or_else(|_| format!("{}/.cache/disparo", std::env::var("HOME").unwrap_or_default()));
    let cached = format!("{cache}/controlplane/v1.36.3/bin/helm");
    assert!(std::path::Path::new(&cached).exists(), "helm not found at {cached}: run tests/controlplane/build.sh (scripts/test does)");
    cached
}

fn run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn lint_and_template_pass() {
    let (ok, out, err) = run(&helm(), &["lint", "--strict", CHART]);
    assert!(ok, "helm lint failed:\n{out}\n{err}");
    for extra in [&[][..], &["--set", "postgres.bundled.enabled=true"][..]] {
        let mut args = vec!["template", "disparo", CHART];
        args.extend_from_slice(extra);
        let (ok, out, err) = run(&helm(), &args);
        assert!(ok, "helm template {extra:?} failed:\n{err}");
        assert!(out.contains("kind: Deployment") && out.contains("kind: CustomResourceDefinition"));
    }
}

#[test]
fn the_values_schema_rejects_typos_and_wrong_types() {
    let (ok, _, err) = run(&helm(), &["template", "disparo", CHART, "--set", "nope=1"]);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = run(&helm(), &["template", "disparo", CHART, "--set", "controller.replicas=two"]);
    assert!(!ok && err.contains("replicas"), "{err}");
}

#[test]
fn chart_crds_equal_the_generated_ones() {
    let script = format!("{CHART}/sync-crds.sh");
    let out = Command::new("bash").arg(&script).arg("--check").env("HELM", helm()).output().expect("sync-crds.sh");
    assert!(out.status.success(), "the chart's CRDs drifted from crds/:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// (apiGroup, resource, verb) triples granted by the rendered Roles and ClusterRoles,
/// per role name.
fn grants(rendered: &str) -> Vec<(String, BTreeSet<(String, String, String)>)> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        let kind = value["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let mut set = BTreeSet::new();
        for rule in value["rules"].as_sequence().cloned().unwrap_or_default() {
            let list = |k: &str| rule[k].as_sequence().cloned().unwrap_or_default().into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect::<Vec<_>>();
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        set.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
        out.push((name, set));
    }
    out
}

#[test]
fn rbac_grants_nothing_beyond_the_list() {
    let (ok, rendered, err) = run(&helm(), &["template", "disparo", CHART]);
    assert!(ok, "{err}");
    let allowed_controller: BTreeSet<(&str, &str)> = [
        ("disparo.io", "campaigns"),
        ("disparo.io", "campaigns/status"),
        ("disparo.io", "campaigns/finalizers"),
        ("disparo.io", "channels"),
        ("disparo.io", "channels/status"),
        ("batch", "jobs"),
        ("", "events"),
        ("events.k8s.io", "events"),
        ("coordination.k8s.io", "leases"),
        ("", "secrets"),
        ("", "pods"),
    ]
    .into_iter()
    .collect();
    let allowed_webhook: BTreeSet<(&str, &str)> = [("disparo.io", "channels"), ("", "secrets")].into_iter().collect();
    let roles = grants(&rendered);
    assert!(!roles.is_empty());
    for (name, set) in &roles {
        let aggregated = name.ends_with("-admin") || name.ends_with("-edit") || name.ends_with("-view");
        for (group, resource, verb) in set {
            assert!(group != "*" && resource != "*" && verb != "*", "{name} grants a wildcard");
            if aggregated {
                assert_eq!(group, "disparo.io", "{name}: aggregated roles only cover Disparo's kinds");
                if name.ends_with("-view") {
                    assert!(["get", "list", "watch"].contains(&verb.as_str()), "{name} grants {verb}");
                }
            } else if name.contains("webhook") {
                assert!(allowed_webhook.contains(&(group.as_str(), resource.as_str())), "{name} grants {group}/{resource}");
                assert!(["get", "list", "watch"].contains(&verb.as_str()), "the webhook is read-only: {name} grants {verb}");
            } else {
                assert!(allowed_controller.contains(&(group.as_str(), resource.as_str())), "{name} grants {group}/{resource} {verb}");
                if resource == "secrets" || resource == "pods" || resource == "channels" {
                    assert!(["get", "list", "watch"].contains(&verb.as_str()), "{name} may only read {resource}, grants {verb}");
                }
            }
        }
    }
    // sender pods get no API access at all (the Jobs set automountServiceAccountToken: false)
    assert!(!rendered.contains("sender") || !rendered.contains("kind: ServiceAccount\nmetadata:\n  name: disparo-sender"));
}

#[test]
fn the_argo_cd_health_check_judges_real_status_objects() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/argocd/test.sh");
    let out = Command::new("bash").arg(script).output().expect("running deploy/argocd/test.sh");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
