//! Postgres, the system of record. Every SQL statement of Disparo lives in this module,
//! in functions named for their effect. The rules that must hold whoever writes (status
//! only moves forward, counters equal a recount) are enforced in the schema itself
//! (`migrations/`), not only here.

pub mod account;
pub mod audience;
pub mod campaigns;
pub mod contacts;
pub mod export;
pub mod messages;
pub mod pauses;
pub mod rate;
pub mod receipts;
pub mod signals;
pub mod tenancy;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// What can go wrong talking to Postgres.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or a statement failed.
    #[error("postgres")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("applying the migrations")]
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
    /// Whether retrying later may succeed, as opposed to a bad request or a violated
    /// rule: the connection failed or timed out; Postgres reported a lost race that a
    /// retry wins (serialization failure 40001, deadlock 40P01), that it is shutting down
    /// or starting (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect
    /// now), a connection exception (class 08), or too many connections (53300).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                matches!(code.as_ref(), "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300")
                    || code.starts_with("08")
            }),
            Error::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The migrations compiled into the binary.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a connection pool. `max_connections` bounds what one process takes from Postgres.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    Ok(pool)
}

/// Opens a pool that verifies the server against `ca_pem` (a PEM bundle), for callers
/// that hold the CA as text rather than as a file (an organization's Secret).
pub(crate) async fn connect_with_ca(url: &str, max_connections: u32, ca_pem: &str) -> Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let options = options.ssl_root_cert_from_pem(ca_pem.as_bytes().to_vec());
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
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
pub(crate) async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::Error;

    /// An error as Postgres reports it: only its SQLSTATE matters here.
    #[derive(Debug)]
    struct Reported(&'static str);

    impl std::fmt::Display for Reported {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Reported {}

    impl sqlx::error::DatabaseError for Reported {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn reported(code: &'static str) -> Error {
        Error::Database(sqlx::Error::Database(Box::new(Reported(code))))
    }

    #[test]
    fn lost_races_shutdowns_and_lost_connections_are_transient() {
        for code in ["40001", "40P01", "57P01", "57P02", "57P03", "08000", "08003", "08006", "08P01", "53300"] {
            assert!(reported(code).is_transient(), "{code}");
        }
        // a violated rule, bad SQL, a cancelled statement: retrying changes nothing
        for code in ["23505", "23514", "42601", "42P01", "22P02", "57014", "53100", "XX000"] {
            assert!(!reported(code).is_transient(), "{code}");
        }
        assert!(Error::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(
            Error::Database(sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))).is_transient()
        );
        assert!(!Error::Database(sqlx::Error::RowNotFound).is_transient());
        assert!(!Error::Invalid("batch size".into()).is_transient());
    }
}
