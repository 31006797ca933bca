//! Figures read from `/proc` for the scale run (tests/scale.rs, docs/architecture.md
//! "The scale run"): CPU time of a Postgres server and the peak resident memory of the
//! processes under test. Parsing is pure and unit-tested; reading `/proc` is at the edges.
//!
//! Linux only: elsewhere every reading is `None` or empty, and the run prints what it
//! could not measure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The fields of `/proc/<pid>/stat` the figures use. Times are in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    /// Time of waited-for children (for a postmaster: its backends that exited).
    pub cutime: u64,
    pub cstime: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and
/// may hold spaces and parentheses itself, so the fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<&str> { fields.get(n - 3).copied() };
    Some(Stat {
        ppid: field(4)?.parse().ok()?,
        utime: field(14)?.parse().ok()?,
        stime: field(15)?.parse().ok()?,
        cutime: field(16)?.parse::<i64>().ok()?.max(0) as u64,
        cstime: field(17)?.parse::<i64>().ok()?.max(0) as u64,
    })
}

/// `VmHWM` (peak resident set, KiB) from the text of `/proc/<pid>/status`.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The arguments of `/proc/<pid>/cmdline` (NUL-separated, NUL-terminated).
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// CPU ticks of a process tree as the figure counts them: the root's own and waited-for
/// children's time, plus the own time of its live children.
pub fn tree_ticks(root: &Stat, live_children: &[Stat]) -> u64 {
    root.utime + root.stime + root.cutime + root.cstime + live_children.iter().map(|c| c.utime + c.stime).sum::<u64>()
}

/// `/proc/<pid>/stat`, parsed.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The peak resident set of a live process, KiB.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    parse_vm_hwm(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The command line of a live process.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok().map(|raw| parse_cmdline(&raw))
}

/// Every live process id.
pub fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The live children of `parent`, with their stat.
pub fn children(parent: u32) -> Vec<(u32, Stat)> {
    pids().into_iter().filter_map(|pid| Some((pid, stat(pid)?))).filter(|(_, s)| s.ppid == parent).collect()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's usual value, if it cannot run).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// CPU seconds a Postgres server used so far: its postmaster's [`tree_ticks`] over its
/// backends and auxiliary processes. None when the postmaster cannot be read (another
/// machine, another user's processes).
pub fn postgres_cpu_seconds(postmaster: u32) -> Option<f64> {
    let root = stat(postmaster)?;
    let live: Vec<Stat> = children(postmaster).into_iter().map(|(_, s)| s).collect();
    Some(tree_ticks(&root, &live) as f64 / clock_ticks() as f64)
}

/// The postmaster of the server `pool` talks to: the parent of this connection's backend.
/// None when the server is not on this machine.
pub async fn postmaster_pid(pool: &sqlx::PgPool) -> Option<u32> {
    let (backend,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(pool).await.ok()?;
    let parent = stat(u32::try_from(backend).ok()?)?.ppid;
    // The backend must be a child of a postgres process, or the pid is another machine's.
    let name = std::fs::read_to_string(format!("/proc/{parent}/comm")).ok()?;
    name.trim().starts_with("postgres").then_some(parent)
}

/// A process the sampler watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peak {
    /// What it is ("controller", "webhook", "sender").
    pub label: String,
    pub pid: u32,
    /// Largest `VmHWM` seen, KiB.
    pub kib: u64,
}

/// Samples `VmHWM` every `every` for fixed processes, and for the children of a parent
/// (the node agent's pod processes) as they come and go, keeping each pid's maximum
/// (the mark only grows while the process lives; the last read before it exits is kept).
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<BTreeMap<u32, Peak>>>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    /// Starts sampling `fixed` (label, pid) and the children of `parent` whose command
    /// line `matches`, labelled `child_label`.
    pub fn start(
        fixed: Vec<(String, u32)>,
        parent: u32,
        child_label: &str,
        matches: impl Fn(&[String]) -> bool + Send + 'static,
        every: Duration,
    ) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Mutex<BTreeMap<u32, Peak>>> = Arc::default();
        let child_label = child_label.to_owned();
        let thread = std::thread::spawn({
            let (stop, peaks) = (stop.clone(), peaks.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut watched = fixed.clone();
                    for (pid, _) in children(parent) {
                        if cmdline(pid).is_some_and(|args| matches(&args)) {
                            watched.push((child_label.clone(), pid));
                        }
                    }
                    for (label, pid) in watched {
                        if let Some(kib) = vm_hwm(pid) {
                            let mut peaks = peaks.lock().unwrap();
                            let peak = peaks.entry(pid).or_insert(Peak { label, pid, kib });
                            peak.kib = peak.kib.max(kib);
                        }
                    }
                    std::thread::sleep(every);
                }
            }
        });
        PeakSampler { stop, peaks, thread: Some(thread) }
    }

    /// Every process seen so far with its peak, by pid.
    pub fn peaks(&self) -> Vec<Peak> {
        self.peaks.lock().unwrap().values().cloned().collect()
    }

    /// Stops sampling and returns the peaks.
    pub fn finish(mut self) -> Vec<Peak> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peaks()
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_after_a_name_with_spaces_and_parentheses() {
        let line = "4242 (postgres: disparo (x) idle) S 1000 4242 4242 0 -1 4194560 900 0 0 0 \
                    17 5 3 2 20 0 1 0 123 456 789 18446744073709551615";
        assert_eq!(parse_stat(line), Some(Stat { ppid: 1000, utime: 17, stime: 5, cutime: 3, cstime: 2 }));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0 1"), None, "too few fields");
    }

    #[test]
    fn a_negative_children_time_counts_as_zero() {
        let line = "7 (a) R 1 7 7 0 -1 0 0 0 0 0 10 20 -1 -2 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(line), Some(Stat { ppid: 1, utime: 10, stime: 20, cutime: 0, cstime: 0 }));
    }

    #[test]
    fn reads_the_peak_resident_set() {
        let status = "Name:\tdisparo\nVmPeak:\t  900000 kB\nVmHWM:\t   23456 kB\nVmRSS:\t   20000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(23456));
        assert_eq!(parse_vm_hwm("Name:\tkthreadd\n"), None, "kernel threads have none");
    }

    #[test]
    fn splits_the_command_line() {
        assert_eq!(parse_cmdline(b"/bin/disparo\0send\0--x\0"), vec!["/bin/disparo", "send", "--x"]);
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn a_tree_counts_the_root_its_reaped_children_and_its_live_children() {
        let root = Stat { ppid: 1, utime: 1, stime: 2, cutime: 30, cstime: 40 };
        let live = [Stat { ppid: 9, utime: 5, stime: 6, cutime: 1000, cstime: 1000 }];
        assert_eq!(tree_ticks(&root, &live), 1 + 2 + 30 + 40 + 5 + 6, "a live child's own children are not counted");
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(stat(me).is_some());
        assert!(vm_hwm(me).is_some_and(|k| k > 0));
        assert!(cmdline(me).is_some_and(|a| !a.is_empty()));
        assert!(clock_ticks() > 0);
    }
}
