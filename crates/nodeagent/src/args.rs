//! Command-line arguments of `disparo-nodeagent` and the settings resolved from them.

use std::path::{Path, PathBuf};

use super::{Error, Result, command::ENTRYPOINT_NAME, credentials::ApiEndpoint};

/// Arguments of `disparo-nodeagent`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeAgentArgs {
    /// Name of the Node this agent registers and binds pods to. Two agents with
    /// different names can share one control plane.
    #[arg(long, env = "DISPARO_NODE_NAME", default_value = "disparo-local")]
    pub node_name: String,

    /// Executable that stands in for every container image's entrypoint (default: the
    /// `disparo` beside this executable, as in `target/debug`, so `disparo send` pods
    /// run the code under test).
    #[arg(long, env = "DISPARO_NODE_AGENT_BINARY")]
    pub binary: Option<PathBuf>,

    /// Only bind and run pods of this namespace (default: all namespaces), so tests
    /// sharing a control plane do not run each other's pods.
    #[arg(long, env = "DISPARO_NODE_AGENT_NAMESPACE")]
    pub namespace: Option<String>,

    /// Directory for per-container logs, `<namespace>_<pod>_<container>.log`, and
    /// per-pod private state under `pods/<uid>` (default: a directory under the system
    /// temp dir named after the node).
    #[arg(long, env = "DISPARO_NODE_AGENT_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Pods this node runs at once; further pods wait, unbound, like on a full node.
    #[arg(long, env = "DISPARO_NODE_AGENT_MAX_PODS", default_value_t = 32)]
    pub max_pods: u32,
}

/// Arguments with their defaults filled in and checked.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub node_name: String,
    pub binary: PathBuf,
    pub namespace: Option<String>,
    pub work_dir: PathBuf,
    pub max_pods: usize,
    /// What every container's environment starts from, before its own variables:
    /// the agent's `PATH` and `HOME`, standing in for what an image would define.
    /// Nothing else leaks through (no `KUBECONFIG`, no `KUBERNETES_SERVICE_*`), so
    /// containers get no API access unless their spec grants it.
    pub base_env: Vec<(String, String)>,
    /// The API server pods with a ServiceAccount token are pointed at.
    pub api_endpoint: ApiEndpoint,
}

/// `PATH` for containers when the agent itself has none (the usual image default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Settings {
    /// Fills in defaults that need the environment and creates the work directory, so
    /// a bad path fails at start rather than at the first pod.
    pub fn resolve(args: NodeAgentArgs, api_endpoint: ApiEndpoint) -> Result<Self> {
        let NodeAgentArgs { node_name, binary, namespace, work_dir, max_pods } = args;
        if max_pods == 0 {
            return Err(Error::NoCapacity);
        }
        let binary = match binary {
            Some(path) => path,
            None => default_binary(&std::env::current_exe().map_err(Error::CurrentExe)?)?,
        };
        let work_dir = work_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("disparo-node-agent-{node_name}")));
        std::fs::create_dir_all(&work_dir).map_err(|source| Error::WorkDir { path: work_dir.clone(), source })?;
        Ok(Self {
            node_name,
            binary,
            namespace,
            work_dir,
            max_pods: usize::try_from(max_pods).unwrap_or(usize::MAX),
            base_env: inherited_env(),
            api_endpoint,
        })
    }
}

/// The `disparo` beside the agent's own executable, the default `--binary`: cargo puts
/// both in the same directory, and an install puts them side by side. Checked here so
/// a missing one fails at start rather than as every pod's spawn error.
fn default_binary(agent: &Path) -> Result<PathBuf> {
    let binary = agent.with_file_name(ENTRYPOINT_NAME);
    if binary.is_file() { Ok(binary) } else { Err(Error::NoDefaultBinary(binary)) }
}

/// The part of the agent's environment containers inherit; see [`Settings::base_env`].
fn inherited_env() -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
    let mut env = vec![("PATH".to_string(), path)];
    if let Ok(home) = std::env::var("HOME") {
        env.push(("HOME".to_string(), home));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_binary_is_the_disparo_beside_the_agent_and_must_exist() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let agent = dir.path().join("disparo-nodeagent");
        std::fs::write(&agent, "")?;
        let expected = dir.path().join("disparo");
        match default_binary(&agent) {
            Err(Error::NoDefaultBinary(path)) => assert_eq!(path, expected),
            other => panic!("a missing disparo must fail at start, got {other:?}"),
        }
        std::fs::write(&expected, "")?;
        assert_eq!(default_binary(&agent).ok(), Some(expected));
        Ok(())
    }
}
