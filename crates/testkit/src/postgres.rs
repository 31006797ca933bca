//! Postgres servers from `scripts/pg`: the shared one every test of a run uses (see
//! [`crate::server_url`]), and servers of one test's own.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/pg <command>`, with its state in `state` (default: the shared
/// server's), and returns what it printed; panics with its error when it fails.
fn scripts_pg(command: &str, state: Option<&Path>) -> String {
    let script = crate::bin::workspace_root().join("scripts/pg");
    let mut pg = Command::new(&script);
    pg.arg(command);
    if let Some(state) = state {
        pg.env("DISPARO_PG_DIR", state);
    }
    let out = pg.output().unwrap_or_else(|error| panic!("running {} {command}: {error}", script.display()));
    assert!(
        out.status.success(),
        "scripts/pg {command} failed (is Postgres installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `scripts/pg up` (idempotent): the server's `DATABASE_URL` (database `disparo`).
pub(crate) fn up(state: Option<&Path>) -> String {
    database_url(&scripts_pg("up", state))
}

fn database_url(printed: &str) -> String {
    printed
        .lines()
        .find_map(|l| l.strip_prefix("export DATABASE_URL="))
        .expect("scripts/pg printed no DATABASE_URL")
        .trim()
        .to_owned()
}

/// A Postgres server of one test's own, for tests that stop and start it (the shared
/// one must stay up for the others): `scripts/pg` with its state in a temporary
/// directory. Stopped and deleted on drop, whatever happens. Its methods block: call
/// them from `spawn_blocking` in async tests.
pub struct OwnPostgres {
    state: tempfile::TempDir,
    url: String,
}

impl OwnPostgres {
    /// Creates and starts the server.
    pub fn init() -> OwnPostgres {
        // Under /tmp: the server's socket lives in the state directory, and socket
        // paths are short.
        let state = tempfile::Builder::new()
            .prefix("disparo-own-pg")
            .tempdir_in("/tmp")
            .expect("creating a Postgres state directory");
        let url = up(Some(state.path()));
        OwnPostgres { state, url }
    }

    /// Starts it again, on the same port, after [`OwnPostgres::stop`].
    pub fn start(&self) {
        scripts_pg("start", Some(self.state.path()));
    }

    /// Stops it (fast shutdown), keeping its data.
    pub fn stop(&self) {
        scripts_pg("stop", Some(self.state.path()));
    }

    /// Its `DATABASE_URL` (a superuser, database `disparo`).
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let script = crate::bin::workspace_root().join("scripts/pg");
        let _ = Command::new(script).arg("down").env("DISPARO_PG_DIR", self.state.path()).output();
    }
}
