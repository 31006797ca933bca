//! Commands a person runs in a shell: `contacts import`, `migrate`, `crd`, and the
//! kubectl plugin views and the export of a campaign's results.

pub mod export;
pub mod import;
pub mod plugin;
