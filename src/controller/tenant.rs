//! A namespace as an organization: its identity (the namespace's UID, so a re-created
//! namespace starts empty) and its database credential. The controller holds the admin
//! URL in the release namespace only; each tenant namespace gets a Secret
//! ([`DATABASE_SECRET`]) with a URL for its own Postgres role, which row-level security
//! confines to its own rows. Deleting that Secret rotates the password: the next
//! reconcile sets a new one and writes the Secret again, and pods started afterwards use
//! it (connections already open keep working).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tracing::info;

use super::{Context, Error, Result};
use crate::store::tenancy;

/// The Secret, in each tenant namespace, holding the organization's database URL.
pub const DATABASE_SECRET: &str = "disparo-database";
/// Key of the URL in it.
pub(crate) const URL_KEY: &str = "url";
/// Key of the organization id in it (what `contacts import` writes under).
pub(crate) const ORGANIZATION_KEY: &str = "organization";
/// Key of the CA bundle that verifies Postgres, when the admin connection has one.
pub(crate) const CA_KEY: &str = "ca.crt";

/// The CA bundle the admin connection verifies Postgres with (`PGSSLROOTCERT`: a file,
/// as the chart mounts it, or the PEM itself), handed on to the tenants.
fn admin_ca() -> Option<String> {
    let value = std::env::var("PGSSLROOTCERT").ok().filter(|v| !v.is_empty())?;
    if value.contains("-----BEGIN") {
        return Some(value);
    }
    match std::fs::read_to_string(&value) {
        Ok(pem) => Some(pem),
        Err(error) => {
            tracing::warn!(%error, path = %value, "PGSSLROOTCERT cannot be read; tenant credentials carry no CA");
            None
        }
    }
}

/// The organization id of a namespace: its UID.
pub async fn organization(ctx: &Context, namespace: &str) -> Result<String> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let ns = namespaces.get(namespace).await?;
    ns.metadata.uid.ok_or(Error::MissingObjectKey("namespace metadata.uid"))
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

/// Makes sure the namespace's organization has its role and the namespace its Secret;
/// returns the organization id. Cheap when both are in place (one read of the Secret).
pub(crate) async fn ensure(ctx: &Context, namespace: &str) -> Result<String> {
    let organization = organization(ctx, namespace).await?;
    // One provisioning at a time (only the leader reconciles): the role's password and
    // the Secret's must be the same one.
    let _one_at_a_time = ctx.tenancy.lock().await;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = secrets.get_opt(DATABASE_SECRET).await?;
    let ca = admin_ca();
    let address = ctx.sender.db_address.as_deref();
    let wanted_address = tenancy::address_of(&tenancy::scoped_url(&ctx.database_url, "r", "p", None, address)?);
    if let Some(current) =
        existing.as_ref().filter(|s| secret_value(s, ORGANIZATION_KEY).as_deref() == Some(organization.as_str()))
    {
        let url = secret_value(current, URL_KEY);
        let moved = url.as_deref().and_then(tenancy::address_of) != wanted_address;
        if secret_value(current, CA_KEY) == ca && !moved {
            return Ok(organization);
        }
        // The CA changed (rotated, or TLS turned on), or senders are to reach Postgres
        // elsewhere (a pooler): hand on the new one, same password.
        let mut updated = current.clone();
        let data = updated.data.get_or_insert_with(BTreeMap::new);
        match &ca {
            Some(pem) => data.insert(CA_KEY.to_owned(), ByteString(pem.clone().into_bytes())),
            None => data.remove(CA_KEY),
        };
        if let (true, Some(url), Some(wanted)) = (moved, url, wanted_address.as_deref()) {
            let url = url::Url::parse(&url).map_err(|e| {
                crate::store::Error::Invalid(format!("the namespace's database URL cannot be parsed: {e}"))
            })?;
            let url = tenancy::at_address(url, wanted)?;
            data.insert(URL_KEY.to_owned(), ByteString(String::from(url).into_bytes()));
        }
        secrets.replace(DATABASE_SECRET, &PostParams::default(), &updated).await?;
        return Ok(organization);
    }
    // Missing (first campaign, or deleted to rotate) or from a namespace of the same name
    // that was deleted: a new password for this organization's role.
    let password = tenancy::new_password();
    let role = tenancy::provision(&ctx.pool, &organization, namespace, &password).await?;
    let ssl_mode = std::env::var("PGSSLMODE").ok();
    let url = tenancy::scoped_url(&ctx.database_url, &role, &password, ssl_mode.as_deref(), address)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(DATABASE_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_owned(), "disparo".to_owned()),
                ("app.kubernetes.io/name".to_owned(), "disparo".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                "disparo.io/description".to_owned(),
                "this namespace's own Postgres credential, written by the Disparo controller; delete it to rotate the password".to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(
            [
                Some((URL_KEY.to_owned(), ByteString(url.into_bytes()))),
                Some((ORGANIZATION_KEY.to_owned(), ByteString(organization.clone().into_bytes()))),
                ca.map(|pem| (CA_KEY.to_owned(), ByteString(pem.into_bytes()))),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    match existing {
        Some(old) => {
            let mut replaced = secret;
            replaced.metadata.resource_version = old.metadata.resource_version;
            secrets.replace(DATABASE_SECRET, &PostParams::default(), &replaced).await?;
        }
        None => {
            secrets.create(&PostParams::default(), &secret).await?;
        }
    }
    info!(namespace, role, "database credential written for the namespace's organization");
    Ok(organization)
}
