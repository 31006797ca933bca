//! The CRDs on a real API server: valid campaigns are accepted; invalid ones are
//! rejected with a message that names the field; every example applies.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use common::cluster::{ensure_crds, fresh_namespace, kubectl, kubectl_ok};

fn campaign(ns: &str, name: &str, extra_spec: &str, audience: &str) -> String {
    format!(
        r#"apiVersion: disparo.io/v1alpha1
kind: Campaign
metadata:
  name: {name}
  namespace: {ns}
spec:
  channelRef: {{name: main}}
  message:
    template: {{name: promo, language: pt_BR, bodyParameters: ["{{{{contact.name}}}}"]}}
  audience: {audience}
{extra_spec}
"#
    )
}

fn rejected(yaml: &str) -> String {
    let out = kubectl(&["apply", "-f", "-"], Some(yaml));
    assert!(!out.status.success(), "the API server accepted:\n{yaml}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn admission_rules_name_the_field() {
    ensure_crds();
    let ns = fresh_namespace("admission");
    kubectl_ok(&["apply", "-f", "-"], Some(&campaign(&ns, "ok", "", "{allContacts: true}")));

    let err = rejected(&campaign(&ns, "two-kinds", "", "{allContacts: true, tags: {anyOf: [vip]}}"));
    assert!(err.contains("spec.audience") && err.contains("exactly one audience kind"), "{err}");

    let err = rejected(&campaign(&ns, "bad-phone", "", "{contacts: [\"5511999999999\"]}"));
    assert!(err.contains("spec.audience.contacts[0]"), "{err}");

    let err =
        rejected(&campaign(&ns, "too-big", "  execution: {batchSize: 0, parallelism: 500}", "{allContacts: true}"));
    assert!(err.contains("spec.execution.batchSize") && err.contains("spec.execution.parallelism"), "{err}");

    // editing the message of a campaign that is not suspended
    let edited = campaign(&ns, "ok", "", "{allContacts: true}").replace("promo", "other");
    let err = rejected(&edited);
    assert!(err.contains("spec.message") && err.contains("suspend"), "{err}");
    // pause, edit, resume works
    kubectl_ok(&["-n", &ns, "patch", "campaign", "ok", "--type", "merge", "-p", r#"{"spec":{"suspend":true}}"#], None);
    kubectl_ok(&["apply", "-f", "-"], Some(&edited.replace("spec:\n", "spec:\n  suspend: true\n")));

    // cancel cannot be undone
    kubectl_ok(&["-n", &ns, "patch", "campaign", "ok", "--type", "merge", "-p", r#"{"spec":{"cancel":true}}"#], None);
    let out =
        kubectl(&["-n", &ns, "patch", "campaign", "ok", "--type", "merge", "-p", r#"{"spec":{"cancel":false}}"#], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.cancel") && err.contains("cannot be undone"), "{err}");

    // channels: settings must match the provider, credentials only as Secret references
    let err = rejected(&format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: c, namespace: {ns}}}\nspec:\n  provider: evolution\n  meta: {{phoneNumberId: '1', accessToken: {{name: s, key: t}}, appSecret: {{name: s, key: a}}, verifyToken: {{name: s, key: v}}}}\n"
    ));
    assert!(err.contains("spec.provider"), "{err}");
    let err = rejected(&format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: c, namespace: {ns}}}\nspec:\n  provider: meta\n  meta: {{phoneNumberId: '1', accessToken: 'EAAG-inline-token', appSecret: {{name: s, key: a}}, verifyToken: {{name: s, key: v}}}}\n"
    ));
    assert!(err.contains("spec.meta.accessToken"), "{err}");
    kubectl_ok(&["delete", "namespace", &ns, "--wait=false"], None);
}

#[test]
fn every_example_is_accepted() {
    ensure_crds();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out =
                kubectl(&["apply", "--dry-run=server", "-n", "default", "-f", path.to_str().expect("path")], None);
            assert!(out.status.success(), "{} rejected:\n{}", path.display(), String::from_utf8_lossy(&out.stderr));
            count += 1;
        }
    }
    assert!(count >= 8, "expected the examples of every audience kind, found {count}");
}
