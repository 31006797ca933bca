//! A container's environment, resolved the way kubelet resolves it.
//!
//! Resolution is split in two so the rules can be tested without an API server:
//! [`references`] says which Secrets and ConfigMaps a container reads, the caller
//! fetches them into [`Sources`], and [`resolve`] applies kubelet's rules: `envFrom`
//! first, then `env` in order (a later name overrides an earlier one), `$(VAR)`
//! expansion of literal values from what is defined so far, optional references that
//! are missing skipped, required ones failing the container with
//! `CreateContainerConfigError`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod};

use super::{LOCAL_IP, command::expand, pod_ip};

/// Why a container's configuration could not be built; reported on the pod as
/// `CreateContainerConfigError` with this text, as kubelet does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required Secret does not exist.
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    /// A required key is missing from a Secret.
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        /// The pod's namespace.
        namespace: String,
        /// The Secret.
        name: String,
        /// The missing key.
        key: String,
    },
    /// A required ConfigMap does not exist.
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    /// A required key is missing from a ConfigMap.
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        /// The pod's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The missing key.
        key: String,
    },
    /// A `fieldRef` names a field this agent cannot provide.
    #[error("unsupported fieldRef fieldPath {0:?}")]
    UnsupportedFieldPath(String),
    /// `resourceFieldRef` needs resource accounting the agent does not do.
    #[error("resourceFieldRef (variable {0}) is not supported by the node agent")]
    UnsupportedResourceField(String),
    /// An `env` entry has neither `value` nor a supported `valueFrom`.
    #[error("environment variable {0} has an empty valueFrom")]
    EmptyValueFrom(String),
}

/// The pod fields a `fieldRef` can read, taken from the pod once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFields {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `spec.serviceAccountName`.
    pub service_account_name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations` (the Job controller puts the completion index here).
    pub annotations: BTreeMap<String, String>,
}

impl PodFields {
    /// Takes the readable fields from a pod; absent ones read as empty, like kubelet.
    pub fn of(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        Self {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account_name: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }

    /// The value of a `fieldRef`; the pod's IP is its own loopback address.
    fn get(&self, selector: &ObjectFieldSelector) -> Result<String, ConfigError> {
        let path = selector.field_path.as_str();
        let value = match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account_name.clone(),
            "status.podIP" | "status.podIPs" => pod_ip(&self.uid).to_string(),
            "status.hostIP" | "status.hostIPs" => LOCAL_IP.to_string(),
            _ => {
                if let Some(key) = subscript(path, "metadata.annotations") {
                    self.annotations.get(key).cloned().unwrap_or_default()
                } else if let Some(key) = subscript(path, "metadata.labels") {
                    self.labels.get(key).cloned().unwrap_or_default()
                } else {
                    return Err(ConfigError::UnsupportedFieldPath(path.to_string()));
                }
            }
        };
        Ok(value)
    }
}

/// The key of a `prefix['key']` field path, if `path` has that form.
fn subscript<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")
}

/// The Secrets and ConfigMaps a container reads, by name, in its pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Secret names.
    pub secrets: BTreeSet<String>,
    /// ConfigMap names.
    pub config_maps: BTreeSet<String>,
}

/// Lists what [`resolve`] will need to look up for `container`.
pub fn references(container: &Container) -> References {
    let mut refs = References::default();
    for from in container.env_from.iter().flatten() {
        if let Some(secret) = &from.secret_ref {
            refs.secrets.insert(secret.name.clone());
        }
        if let Some(config_map) = &from.config_map_ref {
            refs.config_maps.insert(config_map.name.clone());
        }
    }
    for source in container.env.iter().flatten().filter_map(|var| var.value_from.as_ref()) {
        if let Some(secret) = &source.secret_key_ref {
            refs.secrets.insert(secret.name.clone());
        }
        if let Some(config_map) = &source.config_map_key_ref {
            refs.config_maps.insert(config_map.name.clone());
        }
    }
    refs
}

/// The contents of the referenced objects at the time the container is prepared;
/// a name mapped to `None` does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// Secret data, already base64-decoded.
    pub secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    /// ConfigMap `data`.
    pub config_maps: HashMap<String, Option<BTreeMap<String, String>>>,
}

impl Sources {
    fn secret(&self, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.secrets.get(name).and_then(Option::as_ref)
    }

    fn config_map(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.config_maps.get(name).and_then(Option::as_ref)
    }
}

/// An ordered environment in which a later definition replaces an earlier one in place.
#[derive(Debug, Default)]
struct Environment {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Environment {
    fn set(&mut self, name: String, value: String) {
        match self.index.get(&name) {
            Some(&at) => self.vars[at].1 = value,
            None => {
                self.index.insert(name.clone(), self.vars.len());
                self.vars.push((name, value));
            }
        }
    }

    fn as_map(&self) -> HashMap<String, String> {
        self.vars.iter().cloned().collect()
    }
}

/// Resolves `container`'s environment from the pod's fields and the fetched objects.
///
/// The result keeps declaration order, each name once. Secret bytes that are not
/// UTF-8 are converted lossily: environment values here are text.
pub fn resolve(
    container: &Container,
    fields: &PodFields,
    sources: &Sources,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Environment::default();
    let optional = |flag: Option<bool>| flag.unwrap_or(false);

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(source) = &from.config_map_ref {
            match sources.config_map(&source.name) {
                Some(data) => {
                    for (key, value) in data {
                        env.set(format!("{prefix}{key}"), value.clone());
                    }
                }
                None if optional(source.optional) => {}
                None => return Err(ConfigError::ConfigMapNotFound(source.name.clone())),
            }
        }
        if let Some(source) = &from.secret_ref {
            match sources.secret(&source.name) {
                Some(data) => {
                    for (key, value) in data {
                        env.set(format!("{prefix}{key}"), String::from_utf8_lossy(value).into_owned());
                    }
                }
                None if optional(source.optional) => {}
                None => return Err(ConfigError::SecretNotFound(source.name.clone())),
            }
        }
    }

    for var in container.env.iter().flatten() {
        let literal = var.value.as_deref().unwrap_or("");
        let value = match &var.value_from {
            // kubelet expands only non-empty literals, from what is defined so far.
            _ if !literal.is_empty() => Some(expand(literal, &env.as_map())),
            None => Some(String::new()),
            Some(source) => {
                if let Some(field) = &source.field_ref {
                    Some(fields.get(field)?)
                } else if let Some(key_ref) = &source.secret_key_ref {
                    let value = sources.secret(&key_ref.name).map(|data| data.get(&key_ref.key));
                    match value {
                        Some(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
                        _ if optional(key_ref.optional) => None,
                        None => return Err(ConfigError::SecretNotFound(key_ref.name.clone())),
                        Some(None) => {
                            return Err(ConfigError::SecretKeyNotFound {
                                namespace: fields.namespace.clone(),
                                name: key_ref.name.clone(),
                                key: key_ref.key.clone(),
                            });
                        }
                    }
                } else if let Some(key_ref) = &source.config_map_key_ref {
                    let value = sources.config_map(&key_ref.name).map(|data| data.get(&key_ref.key));
                    match value {
                        Some(Some(text)) => Some(text.clone()),
                        _ if optional(key_ref.optional) => None,
                        None => return Err(ConfigError::ConfigMapNotFound(key_ref.name.clone())),
                        Some(None) => {
                            return Err(ConfigError::ConfigMapKeyNotFound {
                                namespace: fields.namespace.clone(),
                                name: key_ref.name.clone(),
                                key: key_ref.key.clone(),
                            });
                        }
                    }
                } else if source.resource_field_ref.is_some() {
                    return Err(ConfigError::UnsupportedResourceField(var.name.clone()));
                } else {
                    return Err(ConfigError::EmptyValueFrom(var.name.clone()));
                }
            }
        };
        if let Some(value) = value {
            env.set(var.name.clone(), value);
        }
    }
    Ok(env.vars)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ResourceFieldSelector,
        SecretEnvSource, SecretKeySelector,
    };

    use super::*;

    const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

    fn fields() -> PodFields {
        PodFields {
            name: "camp-a-0-x7k2p".into(),
            namespace: "acme".into(),
            uid: "0b4c-uid".into(),
            node_name: "disparo-local".into(),
            service_account_name: "default".into(),
            labels: [("app".to_string(), "sender".to_string())].into(),
            annotations: [(INDEX_ANNOTATION.to_string(), "3".to_string())].into(),
        }
    }

    fn sources() -> Sources {
        Sources {
            secrets: HashMap::from([
                (
                    "meta".to_string(),
                    Some(BTreeMap::from([
                        ("token".to_string(), b"s3cr3t".to_vec()),
                        ("APP_SECRET".to_string(), b"app".to_vec()),
                    ])),
                ),
                ("gone".to_string(), None),
            ]),
            config_maps: HashMap::from([
                (
                    "settings".to_string(),
                    Some(BTreeMap::from([
                        ("RATE".to_string(), "20".to_string()),
                        ("MODE".to_string(), "hard".to_string()),
                    ])),
                ),
                ("absent".to_string(), None),
            ]),
        }
    }

    fn literal(name: &str, value: &str) -> EnvVar {
        EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar { name: name.into(), value: None, value_from: Some(source) }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector { api_version: None, field_path: path.into() }),
            ..Default::default()
        }
    }

    fn secret_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: name.into(), key: key.into(), optional }),
            ..Default::default()
        }
    }

    fn config_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector { name: name.into(), key: key.into(), optional }),
            ..Default::default()
        }
    }

    fn container(env: Vec<EnvVar>, env_from: Vec<EnvFromSource>) -> Container {
        Container { name: "sender".into(), env: Some(env), env_from: Some(env_from), ..Default::default() }
    }

    fn resolved(container: &Container) -> Result<Vec<(String, String)>, ConfigError> {
        resolve(container, &fields(), &sources())
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn resolves_literals_fields_secrets_and_config_maps() {
        let c = container(
            vec![
                literal("GREETING", "hello"),
                from("JOB_COMPLETION_INDEX", field(&format!("metadata.annotations['{INDEX_ANNOTATION}']"))),
                from("POD_NAME", field("metadata.name")),
                from("POD_NAMESPACE", field("metadata.namespace")),
                from("POD_UID", field("metadata.uid")),
                from("NODE", field("spec.nodeName")),
                from("POD_IP", field("status.podIP")),
                from("APP", field("metadata.labels['app']")),
                from("NO_SUCH_LABEL", field("metadata.labels['nope']")),
                from("TOKEN", secret_key("meta", "token", None)),
                from("RATE_LIMIT", config_key("settings", "RATE", None)),
                literal("BATCH", "batch-$(JOB_COMPLETION_INDEX)-$(UNDEFINED)"),
                EnvVar { name: "EMPTY".into(), value: None, value_from: None },
            ],
            vec![],
        );
        let expected = pairs(&[
            ("GREETING", "hello"),
            ("JOB_COMPLETION_INDEX", "3"),
            ("POD_NAME", "camp-a-0-x7k2p"),
            ("POD_NAMESPACE", "acme"),
            ("POD_UID", "0b4c-uid"),
            ("NODE", "disparo-local"),
            ("POD_IP", &crate::pod_ip("0b4c-uid").to_string()),
            ("APP", "sender"),
            ("NO_SUCH_LABEL", ""),
            ("TOKEN", "s3cr3t"),
            ("RATE_LIMIT", "20"),
            ("BATCH", "batch-3-$(UNDEFINED)"),
            ("EMPTY", ""),
        ]);
        assert_eq!(resolved(&c), Ok(expected));
    }

    #[test]
    fn env_from_comes_first_and_env_overrides_it() {
        let c = container(
            vec![literal("MODE", "graceful"), literal("SUMMARY", "$(CFG_RATE)/$(APP_SECRET)")],
            vec![
                EnvFromSource {
                    prefix: Some("CFG_".into()),
                    config_map_ref: Some(ConfigMapEnvSource { name: "settings".into(), optional: None }),
                    secret_ref: None,
                },
                EnvFromSource {
                    prefix: None,
                    config_map_ref: Some(ConfigMapEnvSource { name: "settings".into(), optional: None }),
                    secret_ref: Some(SecretEnvSource { name: "meta".into(), optional: None }),
                },
                EnvFromSource {
                    prefix: None,
                    config_map_ref: Some(ConfigMapEnvSource { name: "absent".into(), optional: Some(true) }),
                    secret_ref: Some(SecretEnvSource { name: "gone".into(), optional: Some(true) }),
                },
            ],
        );
        let expected = pairs(&[
            ("CFG_MODE", "hard"),
            ("CFG_RATE", "20"),
            ("MODE", "graceful"),
            ("RATE", "20"),
            ("APP_SECRET", "app"),
            ("token", "s3cr3t"),
            ("SUMMARY", "20/app"),
        ]);
        assert_eq!(resolved(&c), Ok(expected));
    }

    #[test]
    fn optional_references_that_are_missing_are_skipped() {
        let c = container(
            vec![
                from("A", secret_key("gone", "token", Some(true))),
                from("B", secret_key("meta", "nope", Some(true))),
                from("C", config_key("absent", "RATE", Some(true))),
                from("D", config_key("settings", "nope", Some(true))),
                from("E", secret_key("never-fetched", "k", Some(true))),
            ],
            vec![],
        );
        assert_eq!(resolved(&c), Ok(vec![]));
    }

    #[test]
    fn required_references_that_are_missing_fail() {
        let resource = EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector { resource: "limits.cpu".into(), ..Default::default() }),
            ..Default::default()
        };
        let cases = [
            (from("A", secret_key("gone", "token", None)), ConfigError::SecretNotFound("gone".into())),
            (
                from("A", secret_key("meta", "nope", Some(false))),
                ConfigError::SecretKeyNotFound { namespace: "acme".into(), name: "meta".into(), key: "nope".into() },
            ),
            (from("A", config_key("absent", "RATE", None)), ConfigError::ConfigMapNotFound("absent".into())),
            (
                from("A", config_key("settings", "nope", None)),
                ConfigError::ConfigMapKeyNotFound {
                    namespace: "acme".into(),
                    name: "settings".into(),
                    key: "nope".into(),
                },
            ),
            (from("A", field("status.phase")), ConfigError::UnsupportedFieldPath("status.phase".into())),
            (from("A", resource), ConfigError::UnsupportedResourceField("A".into())),
            (from("A", EnvVarSource::default()), ConfigError::EmptyValueFrom("A".into())),
        ];
        for (var, expected) in cases {
            assert_eq!(resolved(&container(vec![var], vec![])), Err(expected));
        }
        let missing_env_from = container(
            vec![],
            vec![EnvFromSource {
                prefix: None,
                config_map_ref: None,
                secret_ref: Some(SecretEnvSource { name: "gone".into(), optional: None }),
            }],
        );
        assert_eq!(resolved(&missing_env_from), Err(ConfigError::SecretNotFound("gone".into())));
    }

    #[test]
    fn lists_references() {
        let c = container(
            vec![from("A", secret_key("meta", "token", None)), from("B", config_key("settings", "RATE", None))],
            vec![EnvFromSource {
                prefix: None,
                config_map_ref: Some(ConfigMapEnvSource { name: "extra".into(), optional: None }),
                secret_ref: None,
            }],
        );
        let refs = references(&c);
        assert_eq!(refs.secrets, BTreeSet::from(["meta".to_string()]));
        assert_eq!(refs.config_maps, BTreeSet::from(["extra".to_string(), "settings".to_string()]));
    }
}
