//! The real control plane for end-to-end tests: `scripts/test` starts it and exports
//! `DISPARO_TEST_KUBECONFIG`; tests share it and isolate themselves by namespace.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The admin kubeconfig of the test control plane. Fails loudly when it is missing.
pub fn kubeconfig() -> String {
    std::env::var("DISPARO_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!("DISPARO_TEST_KUBECONFIG is not set: these tests need the real control plane; run them through scripts/test (or `eval $(scripts/cluster up)` and export DISPARO_TEST_KUBECONFIG=$KUBECONFIG)")
    })
}

/// Runs kubectl against the test control plane with optional stdin.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing to kubectl");
    }
    child.wait_with_output().expect("waiting for kubectl")
}

/// Runs kubectl and panics with its stderr when it fails.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(out.status.success(), "kubectl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs the CRDs from crds/ with server-side apply (once per test process).
pub fn ensure_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = crate::bin::workspace_root().join("crds");
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &dir.to_string_lossy()], None);
        for crd in ["campaigns.disparo.io", "channels.disparo.io"] {
            kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}")], None);
        }
    });
}

/// A new namespace for one test.
pub fn fresh_namespace(prefix: &str) -> String {
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    kubectl_ok(&["create", "namespace", &name], None);
    name
}

/// A kube client for the test control plane.
pub async fn client() -> kube::Client {
    disparo::telemetry::install_crypto_provider();
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()).expect("reading the test kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(config).expect("kube client")
}

/// The UID of a namespace: the id of its organization in Postgres.
pub fn namespace_uid(namespace: &str) -> String {
    kubectl_ok(&["get", "namespace", namespace, "-o", "jsonpath={.metadata.uid}"], None).trim().to_owned()
}
