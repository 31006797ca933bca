//! Commands a person runs in a shell: `contacts import`, `migrate`, `crd`, and the
//! kubectl plugin views.

pub mod import;
pub mod plugin;
