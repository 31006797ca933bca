//! Organizations as Postgres sees them: one login role per organization, confined to
//! its own rows by row-level security (`migrations/0006_tenancy.sql`). The controller
//! provisions the role with the admin connection and hands the organization's namespace
//! a URL for that role only; nothing else in a tenant namespace reaches Postgres.

use rand::distr::{Alphanumeric, SampleString};
use sqlx::PgPool;

use super::{Error, Result};

/// The login role of an organization (its id is a namespace UID): `disparo_org_` and
/// the UID's hex digits, so the name needs no quoting and fits Postgres' 63 bytes.
pub fn role_name(organization: &str) -> Result<String> {
    let digits: String = organization.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_ascii_lowercase();
    if digits.len() != 32 {
        return Err(Error::Invalid(format!("organization id {organization:?} is not a namespace UID")));
    }
    Ok(format!("disparo_org_{digits}"))
}

/// A new random password: 40 letters and digits, so it needs no escaping in a URL or in
/// SQL.
pub(crate) fn new_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 40)
}

/// The admin URL with the organization's role and password in place of the admin's.
/// The TLS mode the admin connection uses (`ssl_mode`, from `PGSSLMODE`) is written into
/// the URL when the admin URL does not name one, so a tenant connection is never less
/// protected than the admin's: without it, a sender would use `prefer`, which falls back
/// to plaintext.
pub(crate) fn scoped_url(
    admin_url: &str,
    role: &str,
    password: &str,
    ssl_mode: Option<&str>,
    address: Option<&str>,
) -> Result<String> {
    let mut url = url::Url::parse(admin_url)
        .map_err(|e| Error::Invalid(format!("the admin database URL cannot be parsed: {e}")))?;
    if let Some(address) = address {
        url = at_address(url, address)?;
    }
    url.set_username(role).map_err(|()| Error::Invalid("the admin database URL cannot carry a user name".into()))?;
    url.set_password(Some(password))
        .map_err(|()| Error::Invalid("the admin database URL cannot carry a password".into()))?;
    let named = url.query_pairs().any(|(k, _)| k == "sslmode" || k == "ssl-mode");
    if let (false, Some(mode)) = (named, ssl_mode.filter(|m| !m.is_empty())) {
        url.query_pairs_mut().append_pair("sslmode", mode);
    }
    Ok(url.into())
}

/// `url` pointed at `address` (`host:port`, or `host` for the URL's port): where senders
/// reach Postgres when that is not where the operator does (a pooler in front of it, see
/// docs/architecture.md, "Connection budget and poolers").
pub(crate) fn at_address(mut url: url::Url, address: &str) -> Result<url::Url> {
    let invalid = || Error::Invalid(format!("the sender database address {address:?} is not host or host:port"));
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || (host.starts_with('[') && host.ends_with(']')) => {
            (host, Some(port.parse::<u16>().map_err(|_| invalid())?))
        }
        _ => (address, None),
    };
    if host.is_empty() {
        return Err(invalid());
    }
    url.set_host(Some(host)).map_err(|_| invalid())?;
    if let Some(port) = port {
        url.set_port(Some(port)).map_err(|()| invalid())?;
    }
    Ok(url)
}

/// The `host:port` of a database URL (the port 5432 when it names none).
pub(crate) fn address_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    Some(format!("{}:{}", url.host_str()?, url.port().unwrap_or(5432)))
}

/// Creates the organization's role with `password`, or sets its password if it exists,
/// and records the organization. Idempotent; concurrent calls for one organization are
/// serialized by an advisory lock.
pub(crate) async fn provision(pool: &PgPool, organization: &str, namespace: &str, password: &str) -> Result<String> {
    let role = role_name(organization)?;
    if !password.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Error::Invalid("a role password must be letters and digits".into()));
    }
    let mut tx = super::begin(pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('disparo.tenancy'), hashtext($1))")
        .bind(organization)
        .execute(&mut *tx)
        .await?;
    let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(&role)
        .fetch_one(&mut *tx)
        .await?;
    // DDL takes no bind parameters; the role name is hex digits and the password letters
    // and digits, both checked above.
    let ddl = if exists {
        format!("ALTER ROLE {role} WITH LOGIN PASSWORD '{password}'")
    } else {
        format!("CREATE ROLE {role} WITH LOGIN PASSWORD '{password}' IN ROLE disparo_tenant")
    };
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    record(&mut *tx, organization, namespace, &role).await?;
    tx.commit().await?;
    Ok(role)
}

/// Records that `namespace` is organization `organization`, served by `role` (the
/// benchmarks record organizations that have no role of their own).
pub async fn record<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    organization: &str,
    namespace: &str,
    role: &str,
) -> Result<()> {
    sqlx::query(
        r#"INSERT INTO organizations (id, namespace, role_name) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO UPDATE SET namespace = EXCLUDED.namespace"#,
    )
    .bind(organization)
    .bind(namespace)
    .bind(role)
    .execute(executor)
    .await?;
    Ok(())
}

/// The current organization id of a namespace name (the most recently provisioned one:
/// a re-created namespace is a new organization).
pub(crate) async fn organization_of(pool: &PgPool, namespace: &str) -> Result<Option<String>> {
    let mut db = super::Autocommit::open(pool).await?;
    let row: Option<(String,)> =
        sqlx::query_as("SELECT id FROM organizations WHERE namespace = $1 ORDER BY created_at DESC LIMIT 1")
            .bind(namespace)
            .fetch_optional(db.conn())
            .await?;
    db.commit().await?;
    Ok(row.map(|(id,)| id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_can_be_pointed_at_a_pooler() {
        let admin = "postgres://admin:secret@db.example:5432/disparo?sslmode=verify-full";
        let url = scoped_url(admin, "disparo_org_ab", "pw", None, Some("pooler.disparo.svc:6432")).unwrap();
        assert_eq!(url, "postgres://disparo_org_ab:pw@pooler.disparo.svc:6432/disparo?sslmode=verify-full");
        let url = scoped_url(admin, "disparo_org_ab", "pw", None, Some("pooler")).unwrap();
        assert_eq!(url, "postgres://disparo_org_ab:pw@pooler:5432/disparo?sslmode=verify-full", "the URL's port kept");
        assert_eq!(address_of(&url).as_deref(), Some("pooler:5432"));
        assert_eq!(address_of("postgres://a:b@db/x").as_deref(), Some("db:5432"));
        for bad in ["", ":6432", "pooler:port", "pooler:99999"] {
            assert!(scoped_url(admin, "disparo_org_ab", "pw", None, Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn role_names_come_from_the_namespace_uid() {
        assert_eq!(
            role_name("6B1F7C1E-9a4e-4c2b-8f55-0c8b5d8f2a11").unwrap(),
            "disparo_org_6b1f7c1e9a4e4c2b8f550c8b5d8f2a11"
        );
        assert!(role_name("acme").is_err());
        assert!(role_name("x'; DROP TABLE contacts; --").is_err());
    }

    #[test]
    fn the_scoped_url_keeps_host_database_and_options() {
        let url = scoped_url(
            "postgres://admin:secret@db.example:5432/disparo?sslmode=verify-full",
            "disparo_org_ab",
            "pw123",
            Some("disable"),
            None,
        )
        .unwrap();
        assert_eq!(
            url, "postgres://disparo_org_ab:pw123@db.example:5432/disparo?sslmode=verify-full",
            "the URL's own mode wins"
        );
    }

    #[test]
    fn the_admin_tls_mode_reaches_the_scoped_url() {
        let url =
            scoped_url("postgres://admin:secret@db.example/disparo", "disparo_org_ab", "pw", Some("verify-full"), None)
                .unwrap();
        assert_eq!(url, "postgres://disparo_org_ab:pw@db.example/disparo?sslmode=verify-full");
        let url = scoped_url("postgres://admin:secret@127.0.0.1/disparo", "disparo_org_ab", "pw", None, None).unwrap();
        assert_eq!(url, "postgres://disparo_org_ab:pw@127.0.0.1/disparo");
    }

    #[test]
    fn passwords_are_long_and_plain() {
        let a = new_password();
        assert_eq!(a.len(), 40);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, new_password());
    }
}
