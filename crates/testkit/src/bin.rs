//! The executables tests spawn, found where cargo puts them: `disparo` (the product)
//! and `disparo-nodeagent` (the stand-in kubelet of crates/nodeagent). Only a test of
//! the binary's own package can name it with `env!("CARGO_BIN_EXE_...")`, and
//! `cargo test -p disparo` does not build the node agent, so a missing binary is built
//! here, once per test process (`cargo test --workspace` has built both already).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root directory (scripts/, crds/, charts/).
pub fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// Where cargo put this test's profile (`target/debug` unless `CARGO_TARGET_DIR` or a
/// profile says otherwise): a test runs as `<profile dir>/deps/<test>-<hash>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let beside_deps = exe.as_deref().and_then(Path::parent).filter(|dir| dir.ends_with("deps")).and_then(Path::parent);
    match beside_deps {
        Some(dir) => dir.to_path_buf(),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("debug"),
    }
}

/// The `disparo` binary of this build.
pub fn disparo() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| built("disparo", "disparo")).clone()
}

/// The `disparo-nodeagent` binary of this build.
pub fn node_agent() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| built("disparo-nodeagent", "disparo-nodeagent")).clone()
}

/// The binary `name` of `package` in [`profile_dir`], built with cargo when missing;
/// panics with the command to run when that fails.
fn built(package: &str, name: &str) -> PathBuf {
    let dir = profile_dir();
    let path = dir.join(name);
    if path.is_file() {
        return path;
    }
    let mut args = vec!["build".to_string(), "-p".into(), package.into(), "--bin".into(), name.into()];
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => args.push("--release".into()),
        Some(profile) => args.extend(["--profile".into(), profile.into()]),
    }
    if let Some(target) = dir.parent() {
        args.extend(["--target-dir".into(), target.display().to_string()]);
    }
    let command = format!("cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo).args(&args).current_dir(workspace_root()).status();
    match status {
        Ok(status) if status.success() && path.is_file() => path,
        Ok(status) => {
            panic!("{} is missing and `{command}` ended with {status}: run it and look at its errors", path.display())
        }
        Err(error) => panic!("{} is missing and `{command}` could not run ({error}): run it yourself", path.display()),
    }
}

/// The helm binary: `$HELM`, or the one tests/controlplane/build.sh caches.
pub fn helm() -> String {
    if let Ok(helm) = std::env::var("HELM") {
        return helm;
    }
    let cache = std::env::var("DISPARO_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/disparo", std::env::var("HOME").unwrap_or_default()));
    let cached = format!("{cache}/controlplane/v1.36.3/bin/helm");
    assert!(
        Path::new(&cached).exists(),
        "helm not found at {cached}: run tests/controlplane/build.sh (scripts/test does)"
    );
    cached
}
