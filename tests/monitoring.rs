//! Monitoring against the real thing: the chart's monitoring resources rendered by the
//! real helm, its alert rules checked by `promtool`, and a real Prometheus scraping the
//! test stack (the controller, the webhook service, and sender pods found through the
//! API server the way the chart's PodMonitor finds them) while campaigns run. Every
//! dashboard panel's PromQL is evaluated by that Prometheus, and every alert expression
//! too: the faults the test provokes (a channel the provider refuses, forged webhook
//! signatures) fire their alerts, and the others stay quiet.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::bin::helm;
use common::process::free_port;
use common::prometheus::{Prometheus, check_rules};
use common::stack::{Stack, campaign, is_true_with, phase, sandbox_with, wait_for_sends};
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/disparo");

/// The chart rendered with every monitoring resource, as JSON documents.
fn render_monitoring() -> Vec<Value> {
    let out = std::process::Command::new(helm())
        .args(["template", "disparo", CHART, "--namespace", "disparo-system"])
        .args(["--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true"])
        .args(["--set", "monitoring.grafanaDashboard.create=true", "--set", "monitoring.prometheusRule.enabled=true"])
        .args(["--set", "monitoring.prometheusRule.runbookBaseUrl=https://example.org/disparo/docs/runbooks"])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The dashboard, from the ConfigMap the sidecar would pick up.
fn dashboard(docs: &[Value]) -> Value {
    let config_map = of_kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a ConfigMap labelled for Grafana's dashboard sidecar");
    serde_json::from_str(config_map["data"]["disparo.json"].as_str().unwrap()).unwrap()
}

/// The PromQL of every panel's targets, by panel title.
fn panel_queries(dashboard: &Value) -> BTreeMap<String, Vec<String>> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| {
            let exprs = p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned());
            (p["title"].as_str().unwrap().to_owned(), exprs.collect())
        })
        .collect()
}

/// Grafana's variables as the dashboard's "All" and a short rate window give them.
fn with_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s").replace("$namespace", ".*").replace("$campaign", ".*")
}

/// The alert rules of the rendered PrometheusRule, as a Prometheus rule file.
fn rule_file(docs: &[Value]) -> (String, Vec<(String, String)>) {
    let rule = of_kind(docs, "PrometheusRule");
    assert_eq!(rule.len(), 1, "one PrometheusRule");
    let groups = &rule[0]["spec"]["groups"];
    let alerts = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| (r["alert"].as_str().unwrap().to_owned(), r["expr"].as_str().unwrap().to_owned()))
        .collect();
    (serde_yaml::to_string(&serde_json::json!({ "groups": groups })).unwrap(), alerts)
}

/// The Prometheus scrape job the chart's PodMonitor amounts to, as the Prometheus
/// Operator writes it (keep the selector's labels and the named port, label with the
/// namespace and pod), over the pods that `discovery` lists.
///
/// Debian builds Prometheus without Kubernetes service discovery, so the pods come
/// through HTTP service discovery from [`serve_pod_discovery`], which reads them from
/// the API server and labels them with the `__meta_kubernetes_pod_*` names Kubernetes
/// discovery uses.
fn pod_monitor_job(pod_monitor: &Value, discovery: &str) -> Value {
    let spec = &pod_monitor["spec"];
    assert_eq!(spec["namespaceSelector"]["any"], true, "senders run in every campaign namespace");
    let endpoint = &spec["podMetricsEndpoints"][0];
    let mut relabel: Vec<Value> = spec["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(label, value)| {
            serde_json::json!({"source_labels": [pod_label_meta(label)], "regex": value, "action": "keep"})
        })
        .collect();
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"], "action": "keep"}));
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Running", "action": "keep"}));
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}));
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}));
    serde_json::json!({
        "job_name": "disparo-senders",
        "metrics_path": endpoint["path"],
        "http_sd_configs": [{"url": discovery, "refresh_interval": "1s"}],
        "relabel_configs": relabel,
    })
}

/// The meta label Kubernetes discovery gives a pod label.
fn pod_label_meta(label: &str) -> String {
    let sanitized: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("__meta_kubernetes_pod_label_{sanitized}")
}

/// Serves the pods of `namespace` as Prometheus HTTP service discovery targets: one per
/// declared container port, at the pod's IP, with the meta labels of Kubernetes pod
/// discovery. Returns the URL.
async fn serve_pod_discovery(namespace: &str) -> String {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> = kube::Api::namespaced(common::cluster::client().await, namespace);
    let targets = move || {
        let pods = pods.clone();
        async move {
            let mut groups = Vec::new();
            for pod in pods.list(&Default::default()).await.map(|l| l.items).unwrap_or_default() {
                let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else { continue };
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
                    for port in container.ports.iter().flatten() {
                        let mut labels = serde_json::Map::new();
                        labels.insert("__meta_kubernetes_namespace".into(), pod.metadata.namespace.clone().into());
                        labels.insert("__meta_kubernetes_pod_name".into(), pod.metadata.name.clone().into());
                        labels.insert("__meta_kubernetes_pod_phase".into(), phase.clone().into());
                        labels.insert("__meta_kubernetes_pod_container_port_name".into(), port.name.clone().into());
                        for (label, value) in pod.metadata.labels.iter().flatten() {
                            labels.insert(pod_label_meta(label), value.clone().into());
                        }
                        groups.push(
                            serde_json::json!({"targets": [format!("{ip}:{}", port.container_port)], "labels": labels}),
                        );
                    }
                }
            }
            axum::Json(Value::Array(groups))
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/targets", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().route("/targets", axum::routing::get(targets))).await.unwrap();
    });
    url
}

#[test]
fn the_rendered_rules_pass_promtool_and_name_their_runbooks() {
    let docs = render_monitoring();
    let (rules, alerts) = rule_file(&docs);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let checked = check_rules(&file).unwrap_or_else(|e| panic!("promtool check rules:\n{e}"));
    assert!(checked.contains(&format!("{} rules found", alerts.len())), "{checked}");
    let rule = &of_kind(&docs, "PrometheusRule")[0]["spec"]["groups"];
    for r in rule.as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()) {
        let name = r["alert"].as_str().unwrap();
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        assert_eq!(url, format!("https://example.org/disparo/docs/runbooks/{name}.md"));
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("docs/runbooks/{name}.md"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|_| panic!("{name} has no runbook {}", page.display()));
        for section in ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"] {
            assert!(text.contains(section), "{name}'s runbook lacks {section}");
        }
        assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap()), "{name}");
    }
    assert_eq!(of_kind(&docs, "ServiceMonitor").len(), 2, "controller and webhook");
    for monitor in of_kind(&docs, "ServiceMonitor") {
        assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true, "series keep their campaign's namespace");
    }
    assert_eq!(of_kind(&docs, "PodMonitor").len(), 1, "the senders");
}

#[test]
fn the_dashboard_has_unique_panels_a_datasource_variable_and_no_fixed_namespace() {
    let dashboard = dashboard(&render_monitoring());
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: Vec<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "panel ids are unique");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource")
    );
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(dashboard["schemaVersion"].as_i64().unwrap() >= 30);
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(panel["gridPos"]["w"].as_i64().is_some() && panel["gridPos"]["h"].as_i64().is_some(), "{title}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title} uses the datasource variable");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(!expr.contains("namespace=\"") && !expr.contains("namespace=~\"disparo"), "{title}: {expr}");
            if expr.contains("disparo_campaign") || expr.contains("disparo_channel") || expr.contains("disparo_sender")
            {
                assert!(
                    expr.contains("namespace=~\"$namespace\""),
                    "{title} filters by the namespace variable: {expr}"
                );
            }
        }
    }
    assert!(panel_queries(&dashboard).len() >= 15);
}

/// Writes every panel's series over the test's run to `path`, for
/// `scripts/dashboard-png` to draw the README's picture from (set
/// `DISPARO_DASHBOARD_SNAPSHOT=path` to make one).
async fn snapshot(prometheus: &Prometheus, dashboard: &Value, seconds: u64, path: &str) {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let mut targets = Vec::new();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = with_grafana_variables(target["expr"].as_str().unwrap());
            let series = prometheus.query_range(&expr, seconds, 2).await;
            targets.push(serde_json::json!({"legend": target["legendFormat"], "series": series}));
        }
        panels.push(serde_json::json!({
            "title": panel["title"], "type": panel["type"], "gridPos": panel["gridPos"],
            "unit": panel["fieldConfig"]["defaults"]["unit"], "targets": targets,
        }));
    }
    std::fs::write(
        path,
        serde_json::to_string(&serde_json::json!({"title": dashboard["title"], "panels": panels})).unwrap(),
    )
    .unwrap();
}

/// A Meta channel of a portfolio spacing its sends by `spacing_ms`, with the stack's
/// credentials or another Secret's.
fn channel(name: &str, base_url: &str, secret: &str, spacing_ms: u32) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: meta\n  meta:\n    phoneNumberId: '111'\n    baseUrl: {base_url}\n    accessToken: {{name: {secret}, key: access-token}}\n    appSecret: {{name: {secret}, key: app-secret}}\n    verifyToken: {{name: {secret}, key: verify-token}}\n    businessPortfolio: pf-1\n    wabaId: '102290129340398'\n  rateLimits: {{perMinute: 100000, perHour: 1000000, perDay: 10000000, mode: Graceful, minIntervalMillis: {spacing_ms}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_evaluates_every_panel_and_the_provoked_faults_fire_their_alerts() {
    let docs = render_monitoring();
    let (rules, alerts) = rule_file(&docs);
    let queries = panel_queries(&dashboard(&docs));

    let started = Instant::now();
    let mut stack = Stack::start("mon").await;
    let ns = stack.ns.clone();
    let webhook_port = free_port();
    let sandbox = sandbox_with(|c| {
        c.meta.webhook_url = Some(format!("http://127.0.0.1:{webhook_port}/webhooks/meta/{ns}/main"));
        c.webhooks.failed = 0.0;
        // Some transient errors (retries) and a few permanent ones (errors by code).
        c.faults.retryable = 0.05;
        c.faults.permanent = 0.02;
    })
    .await;
    stack.spawn("webhook", &["webhook", "--listen", &format!("127.0.0.1:{webhook_port}")]);
    common::seed_contacts(&stack.pool, &stack.org, 105, |i| {
        (vec![if i < 100 { "a" } else { "b" }.into()], serde_json::json!({}))
    })
    .await;
    stack.kubectl(&[
        "create",
        "secret",
        "generic",
        "revoked-creds",
        "--from-literal=access-token=revoked-token",
        "--from-literal=app-secret=other",
        "--from-literal=verify-token=other",
    ]);
    stack.kubectl(&["label", "secret", "revoked-creds", "disparo.io/credentials=true"]);

    let config = serde_json::json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {"job_name": "disparo-controller", "honor_labels": true,
             "static_configs": [{"targets": [stack.controller_metrics[0]], "labels": {"namespace": ns}}]},
            {"job_name": "disparo-webhook", "honor_labels": true,
             "static_configs": [{"targets": [format!("127.0.0.1:{webhook_port}")]}]},
            pod_monitor_job(of_kind(&docs, "PodMonitor")[0], &serve_pod_discovery(&ns).await),
        ],
    });
    let prometheus = Prometheus::start(&serde_yaml::to_string(&config).unwrap(), Some(&rules)).await;

    // Sends spaced over about half a minute: sender pods live long enough for several
    // scrapes, as a campaign's do at any real pace.
    stack.apply(&channel("main", &sandbox.base_url(), "meta-creds", 300));
    stack.apply(&channel("revoked", &sandbox.base_url(), "revoked-creds", 0));
    stack.apply(&campaign("promo", "main", "promo", "{tags: {anyOf: [a]}}", ""));
    stack.apply(&campaign("doomed", "revoked", "promo", "{tags: {anyOf: [b]}}", ""));

    // Forged receipts, in two bursts so the rejections' increase is seen.
    let forge = |n: usize| {
        let url = format!("http://127.0.0.1:{webhook_port}/webhooks/meta/{}/main", stack.ns);
        async move {
            let client = reqwest::Client::new();
            for _ in 0..n {
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header(
                        "x-hub-signature-256",
                        "sha256=0000000000000000000000000000000000000000000000000000000000000000",
                    )
                    .body(r#"{"object":"whatsapp_business_account","entry":[]}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 401, "a forged signature is refused");
            }
        }
    };
    wait_for_sends(&stack, &sandbox, 5).await;
    // Prometheus applies discovered targets every few seconds: the rejections must come
    // after its first scrape of the webhook, as they would in a running cluster.
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query("up{job=\"disparo-webhook\"} == 1").await.is_empty() {
        assert!(Instant::now() < deadline, "Prometheus never scraped the webhook\n{}", prometheus.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    forge(12).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    forge(12).await;

    // While the campaign runs, every panel must show data at some evaluation.
    let mut shown: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while shown.len() < queries.len() && Instant::now() < deadline {
        for (title, exprs) in &queries {
            for expr in exprs {
                if !prometheus.query(&with_grafana_variables(expr)).await.is_empty() {
                    shown.insert(title.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let empty: Vec<&String> = queries.keys().filter(|t| !shown.contains(*t)).collect();
    assert!(empty.is_empty(), "panels that never showed data: {empty:?}\n{}\n{}", prometheus.logs(), stack.logs());

    // The faults: a channel the provider refuses stops, its campaign stalls.
    stack
        .wait_for("channel", "revoked", "ProviderRefused", Duration::from_secs(120), |c| {
            common::stack::condition(c, "Ready")
                .is_some_and(|r| r["status"] == "False" && r["reason"] == "ProviderRefused")
        })
        .await;
    stack
        .wait_for("campaign", "doomed", "ChannelStopped", Duration::from_secs(60), |c| {
            is_true_with(c, "Stalled", "ChannelStopped")
        })
        .await;
    stack.wait_for("campaign", "promo", "Completed", Duration::from_secs(240), |c| phase(c) == "Completed").await;

    // Every alert expression evaluates; exactly the provoked ones return series.
    let expected: BTreeSet<&str> =
        ["DisparoChannelStopped", "DisparoCampaignStalled", "DisparoWebhookRejectingSignatures"].into();
    let deadline = Instant::now() + Duration::from_secs(30);
    let fired = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut fired = BTreeSet::new();
        for (name, expr) in &alerts {
            let series = prometheus.query(expr).await;
            if !series.is_empty() {
                eprintln!("{name}: {}", Value::Array(series));
                fired.insert(name.as_str());
            }
        }
        if fired == expected || Instant::now() > deadline {
            break fired;
        }
    };
    let rejections = prometheus.query("disparo_webhook_events_total{outcome=\"rejected_signature\"}[10m]").await;
    assert_eq!(fired, expected, "alerts whose expression holds; rejections: {rejections:?}\n{}", prometheus.logs());

    // Prometheus itself loaded every rule, evaluates them without error, and fires the
    // one without a `for` delay.
    let groups = prometheus.get("/api/v1/rules").await;
    let loaded: Vec<&Value> =
        groups["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(loaded.len(), alerts.len());
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{}", rule);
    }
    let firing = prometheus.get("/api/v1/alerts").await;
    assert!(
        firing["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == "DisparoWebhookRejectingSignatures" && a["state"] == "firing"),
        "{firing}"
    );
    if let Ok(path) = std::env::var("DISPARO_DASHBOARD_SNAPSHOT") {
        snapshot(&prometheus, &dashboard(&docs), started.elapsed().as_secs(), &path).await;
    }
    // The sender pods were scraped through the API server's pod IPs, one per pod.
    let senders = prometheus.query("count by (pod) (last_over_time(disparo_sender_rate_limit_waits_total[10m]))").await;
    assert!(!senders.is_empty(), "sender pods were scraped");
    drop(stack);
}
