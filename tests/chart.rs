//! The Helm chart and the GitOps health check: lint and render with the real helm,
//! the values schema rejects typos and wrong types, the chart's CRDs equal crds/, the
//! rendered RBAC grants exactly the Kubernetes API calls the code makes (listed below,
//! call by call), and the Argo CD Lua health check judges real status objects.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

use disparo_testkit::bin::helm;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/disparo");

fn run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    assert!(
        out.status.success(),
        "the chart's CRDs drifted from crds/:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Who makes a Kubernetes API call, and so whose rights it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Component {
    /// `disparo controller`: the chart's controller ServiceAccount.
    Controller,
    /// `disparo webhook`: the chart's webhook ServiceAccount.
    Webhook,
    /// `kubectl disparo ...` and `contacts import`: a person's own kubeconfig, never
    /// the chart's ServiceAccounts. Its calls on Disparo's kinds come from the
    /// aggregated roles; those on built-in kinds from the built-in `edit`/`admin`.
    Plugin,
}

/// Where a call lands, so which kind of role must grant it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Any namespace (campaign and tenant namespaces are not known in advance) or a
    /// cluster-scoped kind: a ClusterRole with a ClusterRoleBinding.
    Cluster,
    /// Only the release namespace: a Role with a RoleBinding there.
    Release,
}

/// One Kubernetes API call the code makes.
#[derive(Debug)]
struct Call {
    component: Component,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    scope: Scope,
    /// The one object the call touches, when the code names it (so a rule may and
    /// should be limited to it with resourceNames); None when the name varies. `create`
    /// is always None: RBAC cannot limit a create by name.
    name: Option<&'static str>,
    /// The file that makes the call and a piece of text that shows where.
    file: &'static str,
    site: &'static str,
}

#[allow(clippy::too_many_arguments)] // one argument per column of the call list
const fn call(
    component: Component,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    scope: Scope,
    name: Option<&'static str>,
    file: &'static str,
    site: &'static str,
) -> Call {
    Call { component, group, resource, verb, scope, name, file, site }
}

use Component::{Controller, Plugin, Webhook};
use Scope::{Cluster, Release};

/// The name of the controller's Lease in `helm template disparo`: `<fullname>-controller`.
const LEASE: &str = "disparo-controller";

/// Every Kubernetes API call of the controller, the webhook and the kubectl plugin, as
/// read from the code. kube's `Controller` and `watcher` list then watch; its event
/// `Recorder` creates an events.k8s.io/v1 Event and patches it when it repeats; its
/// `finalizer` helper adds and removes the finalizer with a JSON patch. Sender pods
/// make none (no ServiceAccount token).
const CALLS: &[Call] = &[
    // Campaigns: the Campaign controller's watch, its finalizer, its status.
    call(
        Controller,
        "disparo.io",
        "campaigns",
        "list",
        Cluster,
        None,
        "src/controller/mod.rs",
        "Controller::new(campaign_api",
    ),
    call(
        Controller,
        "disparo.io",
        "campaigns",
        "watch",
        Cluster,
        None,
        "src/controller/mod.rs",
        "Controller::new(campaign_api",
    ),
    call(
        Controller,
        "disparo.io",
        "campaigns",
        "patch",
        Cluster,
        None,
        "src/controller/campaign.rs",
        "finalizer(&api, FINALIZER",
    ),
    call(
        Controller,
        "disparo.io",
        "campaigns/status",
        "patch",
        Cluster,
        None,
        "src/controller/campaign.rs",
        "api.patch_status(",
    ),
    // A Job's controller ownerReference sets blockOwnerDeletion, which the
    // OwnerReferencesPermissionEnforcement admission plugin allows only to who may
    // update the owner's finalizers.
    call(
        Controller,
        "disparo.io",
        "campaigns/finalizers",
        "update",
        Cluster,
        None,
        "src/controller/job.rs",
        "controller_owner_ref(",
    ),
    // Channels: the Channel controller's watch and status; a campaign reads its Channel.
    call(
        Controller,
        "disparo.io",
        "channels",
        "list",
        Cluster,
        None,
        "src/controller/mod.rs",
        "Controller::new(channel_api",
    ),
    call(
        Controller,
        "disparo.io",
        "channels",
        "watch",
        Cluster,
        None,
        "src/controller/mod.rs",
        "Controller::new(channel_api",
    ),
    call(Controller, "disparo.io", "channels", "get", Cluster, None, "src/controller/observe.rs", "api.get_opt(name)"),
    call(
        Controller,
        "disparo.io",
        "channels/status",
        "patch",
        Cluster,
        None,
        "src/controller/channel.rs",
        "api.patch_status(",
    ),
    // Sender Jobs in each campaign's namespace.
    call(Controller, "batch", "jobs", "list", Cluster, None, "src/controller/mod.rs", ".owns(job_api"),
    call(Controller, "batch", "jobs", "watch", Cluster, None, "src/controller/mod.rs", ".owns(job_api"),
    call(Controller, "batch", "jobs", "get", Cluster, None, "src/controller/observe.rs", "jobs.get_opt(name)"),
    call(Controller, "batch", "jobs", "create", Cluster, None, "src/controller/campaign.rs", "r.jobs.create("),
    call(Controller, "batch", "jobs", "patch", Cluster, None, "src/controller/campaign.rs", "jobs.patch(name"),
    call(Controller, "batch", "jobs", "delete", Cluster, None, "src/controller/campaign.rs", "jobs.delete("),
    // A running Job's pods, to tell a sender that cannot start.
    call(Controller, "", "pods", "list", Cluster, None, "src/controller/observe.rs", "pods.list("),
    // A namespace's UID is its organization.
    call(Controller, "", "namespaces", "get", Cluster, None, "src/controller/tenant.rs", "namespaces.get(namespace)"),
    // The Secrets a Channel references (do they exist, did they change, Evolution's key).
    call(Controller, "", "secrets", "get", Cluster, None, "src/controller/channel.rs", "secrets.get_opt("),
    // Each tenant namespace's own database credential.
    call(
        Controller,
        "",
        "secrets",
        "get",
        Cluster,
        Some("disparo-database"),
        "src/controller/tenant.rs",
        "secrets.get_opt(DATABASE_SECRET)",
    ),
    call(Controller, "", "secrets", "create", Cluster, None, "src/controller/tenant.rs", "secrets.create("),
    call(
        Controller,
        "",
        "secrets",
        "update",
        Cluster,
        Some("disparo-database"),
        "src/controller/tenant.rs",
        "secrets.replace(DATABASE_SECRET",
    ),
    // Events on Campaigns and Channels, in their namespaces.
    call(
        Controller,
        "events.k8s.io",
        "events",
        "create",
        Cluster,
        None,
        "src/controller/campaign.rs",
        "ctx.recorder.publish(",
    ),
    call(
        Controller,
        "events.k8s.io",
        "events",
        "patch",
        Cluster,
        None,
        "src/controller/campaign.rs",
        "ctx.recorder.publish(",
    ),
    // Leader election: the release's Lease in the release namespace.
    call(
        Controller,
        "coordination.k8s.io",
        "leases",
        "get",
        Release,
        Some(LEASE),
        "src/controller/leader.rs",
        "api.get_opt(&cfg.name)",
    ),
    call(
        Controller,
        "coordination.k8s.io",
        "leases",
        "create",
        Release,
        None,
        "src/controller/leader.rs",
        "api.create(&PostParams::default(), &lease)",
    ),
    call(
        Controller,
        "coordination.k8s.io",
        "leases",
        "update",
        Release,
        Some(LEASE),
        "src/controller/leader.rs",
        "api.replace(&cfg.name",
    ),
    // The webhook resolves a callback's Channel and its Secrets from watch caches.
    call(
        Webhook,
        "disparo.io",
        "channels",
        "list",
        Cluster,
        None,
        "src/webhook/credentials.rs",
        "Api::<Channel>::all(",
    ),
    call(
        Webhook,
        "disparo.io",
        "channels",
        "watch",
        Cluster,
        None,
        "src/webhook/credentials.rs",
        "Api::<Channel>::all(",
    ),
    call(Webhook, "", "secrets", "list", Cluster, None, "src/webhook/credentials.rs", "Api::<Secret>::all("),
    call(Webhook, "", "secrets", "watch", Cluster, None, "src/webhook/credentials.rs", "Api::<Secret>::all("),
    // The plugin, with the person's rights.
    call(Plugin, "disparo.io", "campaigns", "get", Cluster, None, "src/cli/plugin.rs", "api.get_opt(name)"),
    call(Plugin, "disparo.io", "campaigns", "patch", Cluster, None, "src/cli/plugin.rs", "api.patch(&target.name"),
    call(
        Plugin,
        "disparo.io",
        "campaigns",
        "create",
        Cluster,
        None,
        "src/cli/plugin.rs",
        "api.create(&PostParams::default(), &campaign)",
    ),
    call(Plugin, "", "events", "list", Cluster, None, "src/cli/plugin.rs", "api.list(&ListParams::default().fields("),
    // `export` reads the campaign (through plugin.rs's `get`) for its UID.
    call(
        Plugin,
        "disparo.io",
        "campaigns",
        "get",
        Cluster,
        None,
        "src/cli/export.rs",
        "let campaigns: Api<Campaign> = Api::namespaced(client, &namespace)",
    ),
    call(
        Plugin,
        "disparo.io",
        "channels",
        "get",
        Cluster,
        None,
        "src/cli/plugin.rs",
        "channels.get_opt(&campaign.spec.channel_ref.name)",
    ),
    call(
        Plugin,
        "",
        "secrets",
        "get",
        Cluster,
        Some("disparo-database"),
        "src/cli/import.rs",
        "secrets.get_opt(DATABASE_SECRET)",
    ),
];

/// One rule of a rendered Role or ClusterRole, flattened: (apiGroup, resource, verb,
/// resourceNames).
type Grant = (String, String, String, Vec<String>);

/// A rendered Role or ClusterRole.
#[derive(Debug)]
struct Role {
    kind: String,
    name: String,
    /// Its `app.kubernetes.io/component` label; empty for the aggregated roles.
    component: String,
    grants: Vec<Grant>,
}

fn docs(rendered: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("yaml"))
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value.as_sequence().cloned().unwrap_or_default().into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
}

fn roles(rendered: &str) -> Vec<Role> {
    let mut out = Vec::new();
    for value in docs(rendered) {
        let kind = value["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let mut grants = Vec::new();
        for rule in value["rules"].as_sequence().cloned().unwrap_or_default() {
            let names = strings(&rule["resourceNames"]);
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        grants.push((g.clone(), r.clone(), v, names.clone()));
                    }
                }
            }
        }
        out.push(Role {
            kind: kind.to_owned(),
            name: value["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            component: value["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            grants,
        });
    }
    out
}

fn component_of(label: &str) -> Option<Component> {
    match label {
        "controller" => Some(Controller),
        "webhook" => Some(Webhook),
        _ => None,
    }
}

fn scope_of(role: &Role) -> Scope {
    if role.kind == "ClusterRole" { Cluster } else { Release }
}

/// The same call site, for the rule checks.
fn matches(c: &Call, component: Component, scope: Scope, (group, resource, verb, _): &Grant) -> bool {
    c.component == component && c.scope == scope && c.group == group && c.resource == resource && c.verb == verb
}

/// Whether `grant` is needed by `c` and no broader than it: a rule limited by name only
/// serves calls on those names, and an unlimited rule must serve a call whose object's
/// name varies (else it should have been limited).
fn needed_by(c: &Call, grant: &Grant) -> bool {
    let names = &grant.3;
    if names.is_empty() { c.name.is_none() } else { c.name.is_some_and(|n| names.iter().any(|x| x == n)) }
}

/// Whether `grant` allows `c`.
fn allows(c: &Call, grant: &Grant) -> bool {
    let names = &grant.3;
    names.is_empty() || c.name.is_some_and(|n| names.iter().any(|x| x == n))
}

fn render(extra: &[&str]) -> String {
    let mut args = vec!["template", "disparo", CHART, "--namespace", "disparo-system"];
    args.extend_from_slice(extra);
    let (ok, rendered, err) = run(&helm(), &args);
    assert!(ok, "helm template {extra:?} failed:\n{err}");
    rendered
}

/// The chart's controller and webhook roles grant exactly what [`CALLS`] says their code
/// calls: each rule is needed by some call (nothing unused, nothing broader than the
/// call's object), each call is allowed by some rule of the right scope (nothing
/// missing), and each role is bound to its own component's ServiceAccount only.
#[test]
fn rbac_grants_exactly_the_api_calls_the_code_makes() {
    for extra in [
        &[][..],
        &[
            "--set",
            "postgres.bundled.enabled=true",
            "--set",
            "monitoring.serviceMonitor.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
        ][..],
    ] {
        let rendered = render(extra);
        let roles = roles(&rendered);
        let mut unused = Vec::new();
        for role in &roles {
            for grant in &role.grants {
                assert!(
                    grant.0 != "*" && grant.1 != "*" && grant.2 != "*",
                    "{} grants a wildcard: {grant:?}",
                    role.name
                );
            }
            let Some(component) = component_of(&role.component) else { continue };
            for grant in &role.grants {
                if !CALLS.iter().any(|c| matches(c, component, scope_of(role), grant) && needed_by(c, grant)) {
                    unused.push(format!(
                        "{} {} grants {grant:?}, which no {component:?} call needs",
                        role.kind, role.name
                    ));
                }
            }
        }
        let mut missing = Vec::new();
        for c in CALLS.iter().filter(|c| c.component != Plugin) {
            let granted = roles.iter().any(|role| {
                component_of(&role.component) == Some(c.component)
                    && role.grants.iter().any(|g| matches(c, c.component, scope_of(role), g) && allows(c, g))
            });
            if !granted {
                missing.push(format!("{c:?} is not granted"));
            }
        }
        assert!(
            unused.is_empty() && missing.is_empty(),
            "with {extra:?}:\n{}\n{}",
            unused.join("\n"),
            missing.join("\n")
        );

        // Each role is bound to its own component's ServiceAccount, ClusterRoles by a
        // ClusterRoleBinding, Roles by a RoleBinding in the release namespace.
        for binding in docs(&rendered) {
            let kind = binding["kind"].as_str().unwrap_or_default();
            if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
                continue;
            }
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            let role = roles
                .iter()
                .find(|r| r.name == role_name)
                .unwrap_or_else(|| panic!("{kind} binds {role_name}, which the chart does not render"));
            assert_eq!(role.kind, binding["roleRef"]["kind"].as_str().unwrap_or_default());
            assert_eq!((kind == "ClusterRoleBinding"), (role.kind == "ClusterRole"), "{kind} of {role_name}");
            if kind == "RoleBinding" {
                assert_eq!(binding["metadata"]["namespace"].as_str(), Some("disparo-system"));
            }
            let subjects = binding["subjects"].as_sequence().cloned().unwrap_or_default();
            assert_eq!(subjects.len(), 1, "{kind} {role_name}: {subjects:?}");
            assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
            assert_eq!(
                subjects[0]["name"].as_str(),
                Some(format!("disparo-{}", role.component).as_str()),
                "{kind} {role_name} binds another component's account"
            );
            assert_eq!(subjects[0]["namespace"].as_str(), Some("disparo-system"));
        }
    }
}

/// The plugin works with the person's own rights: the aggregated `edit` and `admin`
/// roles carry its calls on Disparo's kinds (the built-in ones carry events and
/// Secrets), `view` only reads, and the aggregated roles give nothing outside Disparo.
#[test]
fn aggregated_roles_carry_the_plugins_calls_and_nothing_else() {
    let roles = roles(&render(&[]));
    for suffix in ["-admin", "-edit", "-view"] {
        let role = roles
            .iter()
            .find(|r| r.component.is_empty() && r.name.ends_with(suffix))
            .unwrap_or_else(|| panic!("no aggregated role {suffix}"));
        for (group, _, verb, _) in &role.grants {
            assert_eq!(group, "disparo.io", "{}: aggregated roles only cover Disparo's kinds", role.name);
            if suffix == "-view" {
                assert!(["get", "list", "watch"].contains(&verb.as_str()), "{} grants {verb}", role.name);
            }
        }
        if suffix != "-view" {
            for c in CALLS.iter().filter(|c| c.component == Plugin && c.group == "disparo.io") {
                assert!(
                    role.grants.iter().any(|g| g.0 == c.group && g.1 == c.resource && g.2 == c.verb && allows(c, g)),
                    "{} does not allow {c:?}",
                    role.name
                );
            }
        }
    }
}

/// The Rust files under `path`, recursively.
fn rust_files(path: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("source dir") {
            rust_files(&entry.expect("dir entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The text of a module named as `src/a/b.rs`, also once it is split into `src/a/b/`.
fn module_text(root: &str, file: &str) -> String {
    let mut files = Vec::new();
    rust_files(std::path::Path::new(&format!("{root}/{file}")), &mut files);
    rust_files(std::path::Path::new(&format!("{root}/{}", file.trim_end_matches(".rs"))), &mut files);
    assert!(!files.is_empty(), "{file} is gone: update CALLS (and the chart's RBAC)");
    files.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The list above points at real code: each call's text is still in its module, and
/// every file of the controller, the webhook and the plugin that builds an `Api` is in
/// the list. A call that goes away or a new module that talks to the API server fails
/// here until the list (and so the chart's RBAC) follows.
#[test]
fn the_api_call_list_points_at_real_code() {
    let root = env!("CARGO_MANIFEST_DIR");
    // Compared without white space: rustfmt may break a call chain across lines.
    let compact = |text: &str| text.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    for c in CALLS {
        assert!(
            compact(&module_text(root, c.file)).contains(&compact(c.site)),
            "{} no longer contains {:?}: update CALLS (and the chart's RBAC) for {c:?}",
            c.file,
            c.site
        );
    }
    let mut files = Vec::new();
    for dir in ["src/controller", "src/webhook", "src/cli"] {
        rust_files(std::path::Path::new(&format!("{root}/{dir}")), &mut files);
    }
    assert!(files.len() > 10, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let relative = path.strip_prefix(root).expect("under the crate").to_string_lossy().replace('\\', "/");
        let builds_api =
            ["Api::all(", "Api::namespaced(", "Api::default_namespaced(", "Api::<"].iter().any(|p| text.contains(p));
        let listed = CALLS
            .iter()
            .any(|c| relative == c.file || relative.starts_with(&format!("{}/", c.file.trim_end_matches(".rs"))));
        assert!(!builds_api || listed, "{relative} calls the Kubernetes API but has no entry in CALLS");
    }
}

/// Every container that reads DATABASE_URL, as (workload name, pod spec, container).
fn database_clients(rendered: &str) -> Vec<(String, serde_yaml::Value, serde_yaml::Value)> {
    let mut out = Vec::new();
    for doc in docs(rendered) {
        let pod = &doc["spec"]["template"]["spec"];
        for container in pod["containers"].as_sequence().cloned().unwrap_or_default() {
            let env = container["env"].as_sequence().cloned().unwrap_or_default();
            if env.iter().any(|e| e["name"].as_str() == Some("DATABASE_URL")) {
                out.push((doc["metadata"]["name"].as_str().unwrap_or_default().to_owned(), pod.clone(), container));
            }
        }
    }
    out
}

fn env_value(container: &serde_yaml::Value, name: &str) -> Option<String> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

/// The CA file a container gets: (Secret, key in it, path in the container), from the
/// volume mounted over PGSSLROOTCERT's directory.
fn mounted_ca(pod: &serde_yaml::Value, container: &serde_yaml::Value) -> Option<(String, String, String)> {
    let path = env_value(container, "PGSSLROOTCERT")?;
    for mount in container["volumeMounts"].as_sequence()? {
        let dir = mount["mountPath"].as_str()?;
        let Some(file) = path.strip_prefix(&format!("{dir}/")) else { continue };
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "the CA is mounted writable: {mount:?}");
        let volume = pod["volumes"].as_sequence()?.iter().find(|v| v["name"] == mount["name"])?;
        let item = volume["secret"]["items"].as_sequence()?.iter().find(|i| i["path"].as_str() == Some(file))?;
        return Some((volume["secret"]["secretName"].as_str()?.to_owned(), item["key"].as_str()?.to_owned(), path));
    }
    None
}

/// Postgres TLS: verify-full by default, a CA from a Secret mounted into every pod that
/// holds the admin URL (controller, webhook, migration Job) and named by PGSSLROOTCERT,
/// the bundled Postgres plaintext, and no mode that silently falls back to plaintext.
#[test]
fn postgres_tls_is_verified_by_default_and_the_ca_is_mounted() {
    let names = |clients: &[(String, serde_yaml::Value, serde_yaml::Value)]| {
        clients.iter().map(|c| c.0.clone()).collect::<BTreeSet<_>>()
    };
    let expected: BTreeSet<String> =
        ["disparo-controller", "disparo-webhook", "disparo-migrate"].into_iter().map(str::to_owned).collect();

    let default = database_clients(&render(&[]));
    assert_eq!(names(&default), expected);
    for (name, pod, container) in &default {
        assert_eq!(env_value(container, "PGSSLMODE").as_deref(), Some("verify-full"), "{name}");
        assert_eq!(env_value(container, "PGSSLROOTCERT"), None, "{name}: no CA was given, the public roots apply");
        assert!(!serde_yaml::to_string(pod).expect("yaml").contains("postgres-ca"), "{name} mounts a CA nobody gave");
    }

    let with_ca = database_clients(&render(&[
        "--set",
        "postgres.tls.caSecret=rds-ca",
        "--set",
        "postgres.tls.caKey=global-bundle.pem",
    ]));
    assert_eq!(names(&with_ca), expected);
    for (name, pod, container) in &with_ca {
        assert_eq!(env_value(container, "PGSSLMODE").as_deref(), Some("verify-full"), "{name}");
        let (secret, key, path) = mounted_ca(pod, container)
            .unwrap_or_else(|| panic!("{name}: PGSSLROOTCERT does not name the mounted CA: {container:?}"));
        assert_eq!((secret.as_str(), key.as_str()), ("rds-ca", "global-bundle.pem"), "{name} mounts {path}");
    }
    let verify_ca =
        database_clients(&render(&["--set", "postgres.tls.mode=verify-ca", "--set", "postgres.tls.caSecret=rds-ca"]));
    for (name, pod, container) in &verify_ca {
        assert_eq!(env_value(container, "PGSSLMODE").as_deref(), Some("verify-ca"), "{name}");
        assert_eq!(
            mounted_ca(pod, container).map(|c| (c.0, c.1)),
            Some(("rds-ca".to_owned(), "ca.crt".to_owned())),
            "{name}"
        );
    }

    // A URL on the loopback may say so.
    for (name, _, container) in &database_clients(&render(&["--set", "postgres.tls.mode=disable"])) {
        assert_eq!(env_value(container, "PGSSLMODE").as_deref(), Some("disable"), "{name}");
    }
    // The bundled Postgres has no TLS: plaintext whatever postgres.tls says, in its URL too
    // (the URL the controller derives tenant URLs from).
    let bundled = render(&["--set", "postgres.bundled.enabled=true", "--set", "postgres.tls.caSecret=rds-ca"]);
    for (name, pod, container) in &database_clients(&bundled) {
        assert_eq!(env_value(container, "PGSSLMODE").as_deref(), Some("disable"), "{name}");
        assert!(mounted_ca(pod, container).is_none() && env_value(container, "PGSSLROOTCERT").is_none(), "{name}");
    }
    assert!(bundled.contains("sslmode=disable"), "the bundled URL names its mode");

    // No silent fallback, no CA that nothing checks, no typo.
    for (set, needle) in [
        ("postgres.tls.mode=prefer", "mode"),
        ("postgres.tls.mode=allow", "mode"),
        ("postgres.tls.mode=VERIFY-FULL", "mode"),
        ("postgres.tls.cert=x", "cert"),
    ] {
        let (ok, _, err) = run(&helm(), &["template", "disparo", CHART, "--set", set]);
        assert!(!ok && err.contains(needle), "{set} was accepted: {err}");
    }
    let (ok, _, err) = run(
        &helm(),
        &["template", "disparo", CHART, "--set", "postgres.tls.mode=require", "--set", "postgres.tls.caSecret=rds-ca"],
    );
    assert!(!ok && err.contains("only verify-ca and verify-full"), "{err}");
}

#[test]
fn the_argo_cd_health_check_judges_real_status_objects() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/argocd/test.sh");
    let out = Command::new("bash").arg(script).output().expect("running deploy/argocd/test.sh");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
