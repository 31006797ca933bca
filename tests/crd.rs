//! The CRDs come from the Rust types: `crds/` must equal `disparo crd`, and the generated
//! schemas must carry the admission rules, printer columns and names users rely on.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo::api::{Campaign, Channel};
use kube::CustomResourceExt;

#[test]
fn crds_directory_matches_the_types() {
    for (file, yaml) in disparo::api::crd_files().unwrap() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds").join(file);
        let stored = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            stored == yaml,
            "{} is out of date with the Rust types: run `cargo run -- crd --out-dir crds`",
            path.display()
        );
    }
}

fn rules(crd: &serde_json::Value) -> Vec<String> {
    let mut found = Vec::new();
    fn walk(v: &serde_json::Value, found: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Array(rules)) = map.get("x-kubernetes-validations") {
                    for r in rules {
                        found.push(r["rule"].as_str().unwrap_or_default().to_owned());
                    }
                }
                map.values().for_each(|x| walk(x, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|x| walk(x, found)),
            _ => {}
        }
    }
    walk(crd, &mut found);
    found
}

#[test]
fn campaign_schema_carries_the_admission_rules() {
    let crd = serde_json::to_value(Campaign::crd()).unwrap();
    let rules = rules(&crd);
    let has = |needle: &str| rules.iter().any(|r| r.contains(needle));
    assert!(
        has("has(self.allContacts), has(self.tags), has(self.segment), has(self.contacts), has(self.fromCampaign)"),
        "exactly one audience"
    );
    assert!(has("oldSelf.cancel"), "cancel cannot be undone");
    assert!(has("self.message == oldSelf.message"), "message frozen unless suspended");
    assert!(has("self.audience == oldSelf.audience"), "audience frozen unless suspended");
    assert!(has("self.channelRef == oldSelf.channelRef"), "channel frozen unless suspended");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["execution"]["properties"]["batchSize"]["maximum"], 10000.0);
    assert_eq!(spec["execution"]["properties"]["parallelism"]["maximum"], 64.0);
    assert!(spec["audience"]["description"].as_str().unwrap().contains("Who receives"));
    let codes = &spec["audience"]["properties"]["fromCampaign"]["properties"]["errorCodes"];
    assert_eq!(codes["maxItems"], 50, "fromCampaign.errorCodes is bounded: {codes}");
    assert_eq!(codes["items"]["maxLength"], 64);
    assert_eq!(codes["items"]["pattern"], "^[A-Za-z0-9_.-]+$");
}

#[test]
fn channel_schema_requires_secret_references() {
    let crd = serde_json::to_value(Channel::crd()).unwrap();
    let meta = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["meta"];
    let required: Vec<&str> = meta["required"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for field in ["accessToken", "appSecret", "verifyToken", "phoneNumberId"] {
        assert!(required.contains(&field), "{field} required: {required:?}");
    }
    let token = &meta["properties"]["accessToken"];
    assert_eq!(token["required"], serde_json::json!(["key", "name"]));
    assert!(rules(&crd).iter().any(|r| r.contains("self.provider == 'meta'")));
}

#[test]
fn names_columns_and_categories() {
    let crd = Campaign::crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["camp".to_owned()]));
    assert_eq!(crd.spec.names.categories, Some(vec!["disparo".to_owned()]));
    let version = &crd.spec.versions[0];
    let columns: Vec<&str> =
        version.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Phase", "Progress", "Total", "Sent", "Delivered", "Read", "Failed", "Cost", "Age"]);
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    assert_eq!(Channel::crd().spec.names.short_names, Some(vec!["chan".to_owned()]));
}
