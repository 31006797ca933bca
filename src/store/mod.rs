//! Postgres, the system of record. Every SQL statement of Disparo lives in this module,
//! in functions named for their effect. The rules that must hold whoever writes (status
//! only moves forward, counters equal a recount) are enforced in the schema itself
//! (`migrations/`), not only here.

pub mod audience;
pub mod campaigns;
pub mod contacts;
pub mod messages;
pub mod pauses;
pub mod rate;
pub mod receipts;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// What can go wrong talking to Postgres.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or a statement failed.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A `fromCampaign` audience names a campaign that never ran in this namespace.
    #[error("campaign {name:?} has no messages in namespace {organization:?} (it never started here)")]
    SourceCampaignNotFound {
        /// The namespace.
        organization: String,
        /// The campaign name.
        name: String,
    },
    /// An audience or batch parameter is out of range.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl Error {
    /// Whether retrying later may succeed (connection problems), as opposed to a bad
    /// request or a violated rule.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The migrations compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a connection pool. `max_connections` bounds what one process takes from Postgres.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    Ok(pool)
}

/// Opens a pool without connecting yet, so a service can start (and answer 503) while
/// Postgres is down, and recover by itself when it comes back.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(url)?;
    Ok(pool)
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock while migrating, so
/// concurrent runs (two controller replicas, a Helm hook) are safe: one migrates, the
/// others wait and find nothing left to do.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether Postgres answers (for readiness probes).
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
