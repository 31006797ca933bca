//! The Kubernetes API of Disparo (group `disparo.io`, version `v1alpha1`): the wire
//! types that generate the CRDs, and the small domain types (phases, conditions) the
//! rest of the crate shares.

mod campaign;
mod channel;
pub mod condition;
pub mod time;
mod phase;

pub use campaign::*;
pub use channel::*;
pub use phase::{InvalidTransition, Phase, PhaseEvent, transition};

use kube::CustomResourceExt;

/// The API group.
pub const GROUP: &str = "disparo.io";

/// Both CRDs as one multi-document YAML stream, as `disparo crd` prints it and
/// `crds/` stores it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [Campaign::crd(), Channel::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// File name under `crds/` for each CRD, with its YAML.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        ("campaigns.disparo.io.yaml", serde_yaml::to_string(&Campaign::crd())?),
        ("channels.disparo.io.yaml", serde_yaml::to_string(&Channel::crd())?),
    ])
}
