//! Which organization a webhook's namespace is: the URL names the namespace (what a
//! person registers with the provider), Postgres keys rows by the namespace's UID. The
//! answer is cached for a short while, so a namespace re-created under the same name
//! (a new organization) is seen within [`TTL`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

/// How long a namespace's organization is remembered.
const TTL: Duration = Duration::from_secs(30);

/// The namespace-to-organization cache.
pub(crate) struct Organizations {
    pool: PgPool,
    cache: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl Organizations {
    pub(crate) fn new(pool: PgPool) -> Self {
        Organizations { pool, cache: Mutex::new(HashMap::new()) }
    }

    /// The organization of `namespace`, if the controller provisioned one.
    pub(crate) async fn of(&self, namespace: &str) -> crate::store::Result<Option<String>> {
        if let Some((org, at)) = self.cache.lock().await.get(namespace)
            && at.elapsed() < TTL
        {
            return Ok(org.clone());
        }
        let org = crate::store::tenancy::organization_of(&self.pool, namespace).await?;
        let mut cache = self.cache.lock().await;
        // Bounded by the namespaces that have Channels; stale entries go on the next write.
        cache.retain(|_, (_, at)| at.elapsed() < TTL);
        cache.insert(namespace.to_owned(), (org.clone(), Instant::now()));
        Ok(org)
    }
}
