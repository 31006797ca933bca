//! Disparo: WhatsApp messaging campaigns as Kubernetes custom resources.
//!
//! One crate, one binary, several modes (see `main.rs`). The modules follow the
//! domains of docs/architecture.md, each owning its types, errors and tests:
//!
//! - [`account`]: what Meta says about an account (messaging limit, quality, template
//!   status, restrictions, prices) and what it means for a campaign; pure decisions.
//! - [`api`]: the `Campaign` and `Channel` custom resources (wire types that become
//!   the CRDs) and the domain types logic works with (phases, conditions).
//! - [`store`]: Postgres, the system of record: contacts, campaign messages, counters,
//!   rate-limit windows. All SQL lives here.
//! - [`providers`]: Meta Cloud API and Evolution API clients and the error
//!   classification table.
//! - [`sandbox`]: a provider simulator speaking both wire formats.
//! - [`sender`]: `disparo send`, one batch of one campaign.
//! - [`webhook`]: `disparo webhook`, delivery and read receipts into Postgres.
//! - [`controller`]: `disparo controller`, the campaign lifecycle on Kubernetes.
//! - [`cli`]: the commands a person runs (`contacts import`, `status`, the kubectl plugin).
//! - [`telemetry`]: logging setup shared by every mode.

pub mod account;
pub mod api;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod providers;
pub mod sandbox;
pub mod sender;
pub mod store;
pub mod telemetry;
pub mod webhook;
