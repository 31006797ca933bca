//! A namespace as an organization: its identity (the namespace's UID, so a re-created
//! namespace starts empty) and its database credential. The controller holds the admin
//! URL in the release namespace only; each tenant namespace gets a Secret
//! ([`DATABASE_SECRET`]) with a URL for its own Postgres role, which row-level security
//! confines to its own rows. Deleting that Secret rotates the password: the next
//! reconcile sets a new one and writes the Secret again, and pods started afterwards use
//! it (connections already open keep working).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use tracing::info;

use super::{Context, Error, Result};
use crate::store::tenancy;

/// The Secret, in each tenant namespace, holding the organization's database URL.
pub const DATABASE_SECRET: &str = "disparo-database";
/// Key of the URL in it.
pub const URL_KEY: &str = "url";
/// Key of the organization id in it (what `contacts import` writes under).
pub const ORGANIZATION_KEY: &str = "organization";

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
pub async fn ensure(ctx: &Context, namespace: &str) -> Result<String> {
    let organization = organization(ctx, namespace).await?;
    // One provisioning at a time (only the leader reconciles): the role's password and
    // the Secret's must be the same one.
    let _one_at_a_time = ctx.tenancy.lock().await;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = secrets.get_opt(DATABASE_SECRET).await?;
    if existing.as_ref().is_some_and(|s| secret_value(s, ORGANIZATION_KEY).as_deref() == Some(organization.as_str())) {
        return Ok(organization);
    }
    // Missing (first campaign, or deleted to rotate) or from a namespace of the same name
    // that was deleted: a new password for this organization's role.
    let password = tenancy::new_password();
    let role = tenancy::provision(&ctx.pool, &organization, namespace, &password).await?;
    let url = tenancy::scoped_url(&ctx.database_url, &role, &password)?;
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
        data: Some(BTreeMap::from([
            (URL_KEY.to_owned(), ByteString(url.into_bytes())),
            (ORGANIZATION_KEY.to_owned(), ByteString(organization.clone().into_bytes())),
        ])),
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
