//! A container as a local process group.
//!
//! Each container runs as the leader of its own process group (`process_group(0)`),
//! so a signal sent to the group reaches whatever the container spawned (`sh -c`
//! children included), as a signal to a container's PID namespace would. Signals go
//! through the `kill(1)` utility: the crate has neither `nix` nor `libc` as a direct
//! dependency, and tokio's `Child::start_kill` only reaches the leader (it is kept as
//! the fallback should `kill(1)` be missing). Leftover group members are killed as
//! soon as the leader exits, as a runtime tears down a container, and a guard kills
//! the whole group if the handle is dropped early: no orphan outlives its pod.

use std::{
    fs::OpenOptions,
    io,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::process::{Child, Command};

/// Where the `kill(1)` utility is looked up (the agent's own `PATH`).
const KILL_UTILITY: &str = "kill";

/// Everything needed to start a container's process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The complete environment; nothing is inherited from the agent.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// File that receives stdout and stderr, appended across restarts.
    pub log_path: PathBuf,
}

/// Signals the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Self::Term => "-TERM",
            Self::Kill => "-KILL",
        }
    }
}

/// A running container: the group leader and, through its id, its group.
#[derive(Debug)]
pub struct ProcessGroup {
    child: Child,
    /// The leader's pid, which is also the group id.
    pgid: u32,
    /// Set once the leader is reaped and the group swept: from then on the id may be
    /// reused and must not be signalled again.
    finished: bool,
}

/// Starts `launch` as a new process group.
pub fn spawn(launch: &Launch) -> io::Result<ProcessGroup> {
    let log = OpenOptions::new().create(true).append(true).open(&launch.log_path)?;
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn()?;
    let pgid = child.id().ok_or_else(|| io::Error::other("process exited before its id was read"))?;
    Ok(ProcessGroup { child, pgid, finished: false })
}

impl ProcessGroup {
    /// The leader's pid.
    pub fn pid(&self) -> u32 {
        self.pgid
    }

    /// Waits for the leader to exit, then kills whatever it left behind in its group.
    /// Cancel-safe: dropping the future leaves the process running and the handle usable.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.sweep().await;
        Ok(status)
    }

    /// Sends SIGTERM to the group, waits up to `grace` for the leader to exit, then
    /// SIGKILLs the group; returns how the leader ended.
    pub async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            self.sweep().await;
            return Ok(status);
        }
        signal_group(self.pgid, Signal::Term).await;
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            let status = status?;
            self.sweep().await;
            return Ok(status);
        }
        signal_group(self.pgid, Signal::Kill).await;
        // Should `kill(1)` be unavailable, at least the leader goes.
        let _ = self.child.start_kill();
        let status = self.child.wait().await?;
        self.sweep().await;
        Ok(status)
    }

    /// Kills what is left of the group after its leader was reaped. The group id
    /// cannot have been reused while members remain, so this reaches only them.
    async fn sweep(&mut self) {
        if !self.finished {
            signal_group(self.pgid, Signal::Kill).await;
            self.finished = true;
        }
    }
}

impl Drop for ProcessGroup {
    /// A handle dropped mid-run (a cancelled task, a panic) still takes its whole group
    /// down; `kill_on_drop` alone would reach only the leader. Blocking briefly on
    /// `kill(1)` is acceptable on this rare path.
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::process::Command::new(KILL_UTILITY)
                .args([Signal::Kill.flag(), "--", &format!("-{}", self.pgid)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends `signal` to every process in group `pgid`. A group already gone is not an
/// error: that is what the caller wanted.
async fn signal_group(pgid: u32, signal: Signal) {
    let result = Command::new(KILL_UTILITY)
        .args([signal.flag(), "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(error) = result {
        tracing::warn!(%error, pgid, "could not run kill(1) to signal a process group");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::status::Exit;

    fn launch(dir: &std::path::Path, script: &str) -> Launch {
        Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("GREETING".into(), "hi".into())],
            cwd: dir.to_path_buf(),
            log_path: dir.join("out.log"),
        }
    }

    fn is_alive(pid: &str) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|stat| !stat.contains(") Z ")).unwrap_or(false)
    }

    /// Waits for the script to write its background child's pid.
    async fn read_pid(path: &std::path::Path) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pid = std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
            if !pid.is_empty() {
                return Ok(pid);
            }
            anyhow::ensure!(Instant::now() < deadline, "no pid in {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn reports_exit_code_and_logs_with_only_the_given_env() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut group = spawn(&launch(dir.path(), "echo $GREETING ${HOME:-nohome}; echo oops >&2; exit 3"))?;
        let exit = Exit::from_status(group.wait().await?);
        assert_eq!(exit, Exit { code: 3, signal: None });
        let log = std::fs::read_to_string(dir.path().join("out.log"))?;
        assert_eq!(log, "hi nohome\noops\n");
        Ok(())
    }

    #[tokio::test]
    async fn terminate_escalates_to_kill_and_reaches_the_whole_group() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Ignored signals are inherited, so neither the shell nor its children yield to TERM.
        let script = "trap '' TERM; sleep 30 & echo $! > child.pid; sleep 30; wait";
        let mut group = spawn(&launch(dir.path(), script))?;
        let child_pid = read_pid(&dir.path().join("child.pid")).await?;
        assert!(is_alive(&child_pid));

        let started = Instant::now();
        let exit = Exit::from_status(group.terminate(Duration::from_millis(300)).await?);
        assert_eq!(exit, Exit { code: 137, signal: Some(9) });
        assert!(started.elapsed() >= Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(&child_pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!is_alive(&child_pid), "grandchild {child_pid} survived");
        Ok(())
    }

    #[tokio::test]
    async fn terminate_lets_a_cooperative_process_exit_on_term() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut group = spawn(&launch(dir.path(), "trap 'exit 0' TERM; while :; do sleep 0.05; done"))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let exit = Exit::from_status(group.terminate(Duration::from_secs(10)).await?);
        assert_eq!(exit.code, 0);
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_group() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let group = spawn(&launch(dir.path(), "sleep 30 & echo $! > child.pid; wait"))?;
        let child_pid = read_pid(&dir.path().join("child.pid")).await?;
        drop(group);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(&child_pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!is_alive(&child_pid), "grandchild {child_pid} survived the drop");
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_spawn() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut bad = launch(dir.path(), "");
        bad.program = "/nonexistent/disparo-nope".into();
        assert!(spawn(&bad).is_err());
        Ok(())
    }
}
