//! Processes tests start: the binaries under test with their logs, and node agents
//! that run a namespace's pods on this machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{kubeconfig, kubectl};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The last `n` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(error) => format!("<{}: {error}>", path.display()),
    }
}

/// A process of a binary under test, with its log.
pub struct Proc {
    pub name: &'static str,
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Proc {
    /// The last lines of its log.
    pub fn tail(&self) -> String {
        tail(&self.log, 40)
    }
}

/// A `disparo-nodeagent` serving one namespace on a node of its own (`node-<namespace>`),
/// running that namespace's pods as processes of the `disparo` binary of this build.
/// Stopped with SIGTERM, so it stops every pod process it started, and its node
/// deleted, when dropped.
pub struct NodeAgent {
    child: Child,
    pub node: String,
    pub log: PathBuf,
    /// Where it keeps each container's log (`<namespace>_<pod>_<container>.log`).
    pub work_dir: PathBuf,
}

impl NodeAgent {
    /// Starts the agent for `namespace`, with its log and work directory under `dir`.
    pub fn start(namespace: &str, dir: &Path) -> std::io::Result<NodeAgent> {
        let node = format!("node-{namespace}");
        let work_dir = dir.join(&node);
        let log = dir.join(format!("agent-{namespace}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(crate::bin::node_agent())
            .arg("--binary")
            .arg(crate::bin::disparo())
            .args(["--namespace", namespace, "--node-name", &node, "--work-dir"])
            .arg(&work_dir)
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "info,kube=warn,hyper=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(NodeAgent { child, node, log, work_dir })
    }

    /// The agent's process id: its pod processes are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, so the agent stops every pod process it started before it exits (a
    /// SIGKILL would orphan them); SIGKILL only if it does not stop in time.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's log and every container log it kept.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("----- node agent {} -----\n{}\n", self.log.display(), tail(&self.log, 60));
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.work_dir)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        for log in logs {
            let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push_str(&format!("----- pod log {name} -----\n{}\n", tail(&log, 40)));
        }
        out
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = kubectl(&["delete", "node", &self.node, "--wait=false"], None);
    }
}
