//! Postgres, the system of record. Every SQL statement of Disparo lives in this module,
//! in functions named for their effect. The rules that must hold whoever writes (status
//! only moves forward, counters equal a recount) are enforced in the schema itself
//! (`migrations/`), not only here.

pub mod account;
pub mod audience;
pub mod blocks;
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
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

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

/// How a process reaches Postgres (`--db-pooler`, `DISPARO_DB_POOLER`). See
/// docs/architecture.md, "Connection budget and poolers".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooler {
    /// Straight to Postgres, or through a pooler in session mode: sqlx's defaults
    /// (prepared statements cached per connection).
    #[default]
    Direct,
    /// Through PgBouncer in transaction pooling mode, where consecutive transactions of
    /// one client connection may run on different server connections. sqlx then keeps
    /// no statement cache (a cached statement lives on one server connection), sends no
    /// `extra_float_digits` (PgBouncer 1.18 refuses the startup parameter), and every
    /// store function that runs here issues its statements inside a transaction that
    /// starts by dropping the prepared statements a previous client of the server
    /// connection left behind ([`begin`], [`Autocommit`]).
    PgbouncerTransaction,
}

/// The `application_name` of connections opened for [`Pooler::PgbouncerTransaction`]:
/// how store functions recognise such a pool ([`pooled`]), and how a database
/// administrator tells them apart in `pg_stat_activity`.
pub const POOLED_APPLICATION_NAME: &str = "disparo-pgbouncer-transaction";

/// Set on every connection that keeps prepared statements: Postgres plans each
/// execution with its parameters. With `campaign_messages` partitioned by campaign
/// (docs/architecture.md, "Partitions"), a plan made with the parameters prunes to the
/// named campaigns' partitions, while the generic plan Postgres otherwise builds once
/// per statement and connection, at the sixth execution, to compare costs, covers every
/// partition: with 2,000 partitions that one execution took seconds (27 s for the
/// webhook's receipt statement) and kept tens of MB per statement in the connection.
/// Through a transaction-mode pooler nothing is cached, so every plan is made with the
/// parameters already.
const CUSTOM_PLANS: &str = "SET plan_cache_mode = force_custom_plan";

/// `pool` with [`CUSTOM_PLANS`] run on each new connection.
fn with_custom_plans(pool: PgPoolOptions) -> PgPoolOptions {
    pool.after_connect(|conn, _| {
        Box::pin(async move {
            sqlx::raw_sql(CUSTOM_PLANS).execute(conn).await?;
            Ok(())
        })
    })
}

fn pool_options(url: &str, max_connections: u32, pooler: Pooler) -> Result<(PgPoolOptions, PgConnectOptions)> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new().max_connections(max_connections);
    Ok(match pooler {
        Pooler::Direct => (with_custom_plans(pool), options),
        Pooler::PgbouncerTransaction => (
            // A test query checks the link to PgBouncer, not a server connection
            // (PgBouncer checks those itself): not worth a round trip per acquire.
            pool.test_before_acquire(false),
            options.statement_cache_capacity(0).extra_float_digits(None).application_name(POOLED_APPLICATION_NAME),
        ),
    })
}

/// Opens a connection pool straight to Postgres. `max_connections` bounds what one
/// process takes from Postgres.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    connect_via(url, max_connections, Pooler::Direct).await
}

/// Opens a connection pool to Postgres as `pooler` says it is reached.
pub async fn connect_via(url: &str, max_connections: u32, pooler: Pooler) -> Result<PgPool> {
    let (pool, options) = pool_options(url, max_connections, pooler)?;
    Ok(pool.acquire_timeout(Duration::from_secs(10)).connect_with(options).await?)
}

/// Opens a pool that verifies the server against `ca_pem` (a PEM bundle), for callers
/// that hold the CA as text rather than as a file (an organization's Secret).
pub(crate) async fn connect_with_ca(url: &str, max_connections: u32, ca_pem: &str) -> Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let options = options.ssl_root_cert_from_pem(ca_pem.as_bytes().to_vec());
    let pool = with_custom_plans(PgPoolOptions::new())
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Opens a pool straight to Postgres without connecting yet, so a service can start
/// (and answer 503) while Postgres is down, and recover by itself when it comes back.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool> {
    connect_lazy_via(url, max_connections, Pooler::Direct)
}

/// [`connect_lazy`] as `pooler` says Postgres is reached.
pub fn connect_lazy_via(url: &str, max_connections: u32, pooler: Pooler) -> Result<PgPool> {
    let (pool, options) = pool_options(url, max_connections, pooler)?;
    Ok(pool.acquire_timeout(Duration::from_secs(3)).connect_lazy_with(options))
}

/// Whether `pool` was opened for [`Pooler::PgbouncerTransaction`].
pub fn pooled(pool: &PgPool) -> bool {
    pool.connect_options().get_application_name() == Some(POOLED_APPLICATION_NAME)
}

/// The statement that opens a transaction behind a transaction-mode pooler. The server
/// connection may have served another client a moment ago, and sqlx names the
/// statements it prepares `sqlx_s_1`, `sqlx_s_2`, … on every connection, never closing
/// them when it keeps no cache: without the `DEALLOCATE ALL`, a name that client left
/// makes our `Parse` fail ("prepared statement already exists"). Prepared statements are
/// not transactional, so it takes effect at once; one round trip with the `BEGIN`.
const POOLED_BEGIN: &str = "BEGIN; DEALLOCATE ALL";

/// Begins a transaction on `pool` (see [`POOLED_BEGIN`] for a pooled one).
pub(crate) async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    Ok(if pooled(pool) { pool.begin_with(POOLED_BEGIN).await? } else { pool.begin().await? })
}

/// Where a store function runs statements that commit on their own. Straight to
/// Postgres it is a connection of the pool, exactly what `.execute(pool)` takes. Behind
/// a transaction-mode pooler it is a transaction ([`begin`]): sqlx sends a statement's
/// `Parse` and its `Bind` in two exchanges, each ending in `Sync`, and outside a
/// transaction the pooler may give the server connection to another client in between,
/// whose next statement would then run with our parameters, or ours with theirs.
pub(crate) struct Autocommit(Held);

enum Held {
    Direct(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Pooled(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Autocommit {
    /// Takes a connection (direct) or begins a transaction (pooled).
    pub(crate) async fn open(pool: &PgPool) -> Result<Autocommit> {
        Ok(Autocommit(if pooled(pool) {
            Held::Pooled(begin(pool).await?)
        } else {
            Held::Direct(pool.acquire().await?)
        }))
    }

    /// The connection to run statements on.
    pub(crate) fn conn(&mut self) -> &mut sqlx::PgConnection {
        match &mut self.0 {
            Held::Direct(conn) => conn,
            Held::Pooled(tx) => tx,
        }
    }

    /// Commits what ran (pooled); a no-op straight to Postgres, where each statement
    /// committed by itself. Dropping it instead rolls back what a pooled one ran.
    pub(crate) async fn commit(self) -> Result<()> {
        if let Held::Pooled(tx) = self.0 {
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock while migrating, so
/// concurrent runs (two controller replicas, a Helm hook) are safe: one migrates, the
/// others wait and find nothing left to do.
///
/// The lock is a session's: migrations need a direct connection, never one through a
/// transaction-mode pooler (refused here).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    if pooled(pool) {
        return Err(Error::Invalid(
            "migrations hold a session-level advisory lock: run them on a direct connection, not through a transaction-mode pooler".into(),
        ));
    }
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether Postgres answers (for readiness probes). A simple query, one message: safe
/// through a transaction-mode pooler too.
pub(crate) async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql("SELECT 1").execute(pool).await?;
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
