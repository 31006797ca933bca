//! A real Prometheus (the Debian package's binary) for one test: its own data
//! directory and port, the configuration and rules the test gives, stopped on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::free_port;

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The binary: on PATH, or where Debian installs it. Panics with what to install.
fn binary(name: &str) -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/sbin"]) {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate.to_string_lossy().into_owned();
        }
    }
    panic!(
        "{name} not found: the monitoring tests need a real Prometheus (apt-get install prometheus; scripts/test installs it)"
    )
}

/// `promtool check rules FILE`: Ok, or promtool's complaint.
pub fn check_rules(file: &Path) -> Result<String, String> {
    let out = Command::new(binary("promtool")).args(["check", "rules"]).arg(file).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(text) }
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML; a `rule_files` entry may name `rules.yml`,
    /// which is written beside it from `rules`) and waits until it is ready.
    pub async fn start(config: &str, rules: Option<&str>) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        if let Some(rules) = rules {
            std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        }
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary("prometheus"))
            .current_dir(dir.path())
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, url: format!("http://127.0.0.1:{port}"), log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = reqwest::get(format!("{}/-/ready", prometheus.url)).await
                && response.status().is_success()
            {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "Prometheus did not get ready:\n{}", prometheus.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The end of its log, for a failure.
    pub fn logs(&self) -> String {
        crate::process::tail(&self.log, 40)
    }

    /// An instant query (`/api/v1/query`); panics if Prometheus refuses the expression.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/query", self.url), &[("query", expr)]).unwrap();
        let response: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(response["status"], "success", "Prometheus refused {expr}: {response}");
        response["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A range query (`/api/v1/query_range`) over the last `seconds`, one point every
    /// `step` seconds; panics if Prometheus refuses the expression.
    pub async fn query_range(&self, expr: &str, seconds: u64, step: u64) -> Vec<Value> {
        let end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let params = [
            ("query", expr.to_owned()),
            ("start", (end - seconds).to_string()),
            ("end", end.to_string()),
            ("step", step.to_string()),
        ];
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/query_range", self.url), &params).unwrap();
        let response: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(response["status"], "success", "Prometheus refused {expr}: {response}");
        response["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A GET of an API path, as JSON.
    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.url)).await.unwrap().json().await.unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
