//! A real PgBouncer in transaction pooling mode in front of a test Postgres, the way
//! docs/architecture.md ("Connection budget and poolers") says Disparo may be deployed:
//! senders and the webhook connect through it, with `DISPARO_DB_POOLER=pgbouncer-transaction`.
//!
//! The binary is the Debian package's (`/usr/sbin/pgbouncer`, or `pgbouncer` on the
//! PATH); scripts/test installs it. A missing binary fails the test that asked for it,
//! with the command that installs it: the suite never skips.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The password every user has towards PgBouncer (the test Postgres trusts its
/// loopback clients, so PgBouncer's own check is the one that runs).
pub const PASSWORD: &str = "disparo";

/// A PgBouncer process in transaction pooling mode, listening on a free loopback port,
/// forwarding every database to the Postgres of the URL it was started for. Stopped
/// (SIGKILL) and its directory deleted on drop.
pub struct PgBouncer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

/// Where the binary is: the PATH first, then where Debian installs it.
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file());
    let debian = PathBuf::from("/usr/sbin/pgbouncer");
    match on_path {
        Some(path) => path,
        None if debian.is_file() => debian,
        None => panic!("pgbouncer not found on the PATH nor at /usr/sbin/pgbouncer: apt-get install pgbouncer"),
    }
}

/// When this process runs as root: the uid and gid of `postgres` (the user scripts/pg
/// runs Postgres as) to run PgBouncer as instead.
fn unprivileged_user() -> Option<(u32, u32)> {
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX) != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("running id");
        assert!(out.status.success(), "running as root, and there is no user postgres to run pgbouncer as");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// Host and port of a `postgres://user:password@host:port/database` URL.
fn host_and_port(url: &str) -> (String, u16) {
    let parsed = url::Url::parse(url).unwrap_or_else(|error| panic!("{url:?} is not a URL: {error}"));
    let host = parsed.host_str().expect("the Postgres URL names no host").to_owned();
    (host, parsed.port().unwrap_or(5432))
}

impl PgBouncer {
    /// Starts PgBouncer in front of the server of `server_url` (any database of it:
    /// PgBouncer forwards every database name), with SCRAM authentication of `users`
    /// (each with [`PASSWORD`]) and at most `pool_size` server connections per
    /// database and user. Waits until it accepts connections.
    pub fn start(server_url: &str, users: &[&str], pool_size: u32) -> PgBouncer {
        let (host, server_port) = host_and_port(server_url);
        let dir = tempfile::Builder::new().prefix("disparo-pgbouncer").tempdir_in("/tmp").expect("a temp dir");
        let port = crate::process::free_port();
        let mut userlist = std::fs::File::create(dir.path().join("userlist.txt")).expect("writing userlist.txt");
        for user in users {
            writeln!(userlist, "\"{user}\" \"{PASSWORD}\"").expect("writing userlist.txt");
        }
        // Deliberately no `ignore_startup_parameters`: the client's pooler setting must
        // send nothing PgBouncer 1.18 refuses (it refuses `extra_float_digits`).
        let ini = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 2000\n\
             max_db_connections = 0\n\
             server_lifetime = 3600\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n\
             admin_users = {admin}\n",
            dir = dir.path().display(),
            admin = users.first().copied().unwrap_or("disparo"),
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), ini).expect("writing pgbouncer.ini");
        let mut command = Command::new(binary());
        command.arg(dir.path().join("pgbouncer.ini"));
        if let Some((uid, gid)) = unprivileged_user() {
            // PgBouncer refuses to run as root: as the user scripts/pg runs Postgres as,
            // in a directory it may write its log and pid file to.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
            command.uid(uid).gid(gid);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting pgbouncer: {error}"));
        let mut bouncer = PgBouncer { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                panic!("pgbouncer exited ({status}) at start:\n{}", bouncer.log());
            }
            assert!(Instant::now() < deadline, "pgbouncer did not listen within 20 s:\n{}", bouncer.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    /// A URL for `database` on the server, as `user`, through PgBouncer.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}:{PASSWORD}@127.0.0.1:{}/{database}", self.port)
    }

    /// `url` (a URL of the server PgBouncer fronts) with its host and port replaced by
    /// PgBouncer's, and its password by [`PASSWORD`].
    pub fn through(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap_or_else(|error| panic!("{url:?} is not a URL: {error}"));
        parsed.set_host(Some("127.0.0.1")).expect("a host");
        parsed.set_port(Some(self.port)).expect("a port");
        parsed.set_password(Some(PASSWORD)).expect("a password");
        parsed.to_string()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of its log.
    pub fn log(&self) -> String {
        crate::process::tail(&self.dir.path().join("pgbouncer.log"), 60)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh migrated database and how a process under test reaches it: straight to
/// Postgres, or through a [`PgBouncer`] in transaction pooling mode in front of it. The
/// harness itself always goes straight ([`Reach::pool`]), to seed and to check.
pub struct Reach {
    /// The harness's own pool, straight to Postgres.
    pub pool: sqlx::PgPool,
    /// The URL the process under test connects with.
    pub url: String,
    /// How that URL reaches Postgres (what `DISPARO_DB_POOLER` says).
    pub pooler: disparo::store::Pooler,
    bouncer: Option<PgBouncer>,
}

impl Reach {
    /// Straight to Postgres.
    pub async fn direct() -> Reach {
        let (pool, url) = crate::fresh_db().await;
        Reach { pool, url, pooler: disparo::store::Pooler::Direct, bouncer: None }
    }

    /// Through a PgBouncer in transaction mode with `server_connections` connections to
    /// Postgres: fewer than the clients' connections, so that consecutive transactions
    /// of one client run on different server connections.
    pub async fn through_pgbouncer(server_connections: u32) -> Reach {
        let (pool, url) = crate::fresh_db().await;
        let server = url.clone();
        let bouncer = tokio::task::spawn_blocking(move || PgBouncer::start(&server, &["disparo"], server_connections))
            .await
            .expect("starting pgbouncer");
        let url = bouncer.through(&url);
        Reach { pool, url, pooler: disparo::store::Pooler::PgbouncerTransaction, bouncer: Some(bouncer) }
    }

    /// A pool of the process under test: its URL, its pooler setting.
    pub async fn connect(&self, max_connections: u32) -> sqlx::PgPool {
        disparo::store::connect_via(&self.url, max_connections, self.pooler)
            .await
            .unwrap_or_else(|error| panic!("connecting to {}: {error}{}", self.describe(), self.log()))
    }

    /// The environment of a `disparo` process under test: `DATABASE_URL` and
    /// `DISPARO_DB_POOLER`.
    pub fn env(&self) -> [(&'static str, String); 2] {
        let pooler = match self.pooler {
            disparo::store::Pooler::Direct => "direct",
            disparo::store::Pooler::PgbouncerTransaction => "pgbouncer-transaction",
        };
        [("DATABASE_URL", self.url.clone()), ("DISPARO_DB_POOLER", pooler.to_owned())]
    }

    /// "straight to Postgres" or "through pgbouncer", for assertion messages.
    pub fn describe(&self) -> &'static str {
        if self.bouncer.is_some() { "through pgbouncer" } else { "straight to Postgres" }
    }

    /// PgBouncer's log (empty straight to Postgres), for assertion messages.
    pub fn log(&self) -> String {
        self.bouncer.as_ref().map(|b| format!("\npgbouncer log:\n{}", b.log())).unwrap_or_default()
    }
}
