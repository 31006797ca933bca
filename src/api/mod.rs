//! The Kubernetes API of Disparo (group `disparo.io`, version `v1alpha1`): the wire
//! types that generate the CRDs, and the small domain types (phases, conditions) the
//! rest of the crate shares.

mod campaign;
mod channel;
pub mod condition;
mod phase;
pub mod time;

pub use campaign::*;
pub use channel::*;
pub use phase::{InvalidTransition, Phase, PhaseEvent, transition};

use kube::CustomResourceExt;

/// The API group.
pub const GROUP: &str = "disparo.io";

/// Annotation by which a person asks a paused, stalled or failed Campaign (or a stopped
/// Channel) to go on: `kubectl disparo resume` sets it to the current time. The
/// controller acts once per value and records it in `status.lastResumeRequest`, so the
/// request works the same under GitOps (the spec is never rewritten).
pub(crate) const RESUME_ANNOTATION: &str = "disparo.io/resume-requested-at";

/// Label that marks a Secret as meant for Disparo (value `"true"`). The controller and
/// the webhook read only Secrets so labelled: a Channel cannot point them at any other
/// Secret of its namespace (a database URL, a TLS key) and have it sent to a URL the
/// Channel's author chose.
pub(crate) const CREDENTIALS_LABEL: &str = "disparo.io/credentials";

/// The label selector of the Secrets Disparo reads.
pub(crate) const CREDENTIALS_SELECTOR: &str = "disparo.io/credentials=true";

/// OpenAPI formats Kubernetes knows for integers are `int32` and `int64`; schemars
/// writes `uint32` for `u32`, which kubectl warns about. Unsigned fields all carry a
/// `minimum`, so `int64` loses nothing.
fn kubernetes_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(format)) = map.get_mut("format")
                && matches!(format.as_str(), "uint" | "uint8" | "uint16" | "uint32" | "uint64")
            {
                *format = "int64".to_owned();
            }
            map.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

fn to_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml::Error> {
    let mut value = serde_json::to_value(crd).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    kubernetes_formats(&mut value);
    serde_yaml::to_string(&value)
}

/// Both CRDs as one multi-document YAML stream, as `disparo crd` prints it and
/// `crds/` stores it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for (_, yaml) in crd_files()? {
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}

/// File name under `crds/` for each CRD, with its YAML.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        ("campaigns.disparo.io.yaml", to_yaml(&Campaign::crd())?),
        ("channels.disparo.io.yaml", to_yaml(&Channel::crd())?),
    ])
}
