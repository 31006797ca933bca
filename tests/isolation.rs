//! Tenant isolation on the real stack, as the controller and the webhook service see it:
//! they read only Secrets labelled for Disparo (a Channel cannot make them send another
//! Secret to a URL of its author's choosing), and the internet-facing webhook holds
//! only what it needs and stays up under slow or large requests.

// A panic is how a test fails: tests may unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use disparo_testkit as common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stack::{Stack, campaign, condition, is_true_with};
use serde_json::Value;
use tokio::io::AsyncReadExt;

const LONG: Duration = Duration::from_secs(120);

/// A plain TCP listener on loopback that records every connection it gets (the bytes
/// the client sent first) and closes it without answering.
struct Listener {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    async fn start() -> Listener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let n = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    log.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                });
            }
        });
        Listener { port, seen }
    }

    fn connections(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn evolution_channel(name: &str, base_url: &str, secret: &str, api_key: &str) -> String {
    format!(
        "apiVersion: disparo.io/v1alpha1\nkind: Channel\nmetadata: {{name: {name}}}\nspec:\n  provider: evolution\n  evolution:\n    baseUrl: {base_url}\n    instance: shop\n    apiKey: {{name: {secret}, key: {api_key}}}\n    webhookToken: {{name: {secret}, key: {api_key}}}\n"
    )
}

fn ready(channel: &Value) -> (String, String, String) {
    let c = condition(channel, "Ready").cloned().unwrap_or_default();
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    (text("status"), text("reason"), text("message"))
}

/// A Channel that names a Secret without the `disparo.io/credentials` label (the
/// namespace's database credential, or a Secret nobody labelled) is not Ready, says
/// how to label it, and its `baseUrl` never hears from the controller; its campaigns
/// are Stalled. Labelling the Secret makes it usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_naming_an_unlabelled_secret_never_sends_it_anywhere() {
    let stack = Stack::start("iso-mark").await;
    let listener = Listener::start().await;
    let base_url = format!("http://127.0.0.1:{}", listener.port);
    stack.kubectl(&["create", "secret", "generic", "evo-creds", "--from-literal=api-key=evolution-key-of-evo"]);
    // The confused deputy: the namespace's own database URL as an api key.
    stack.apply(&evolution_channel("exfil", &base_url, "disparo-database", "url"));
    stack.apply(&evolution_channel("evo", &base_url, "evo-creds", "api-key"));
    stack.apply(&campaign("on-exfil", "exfil", "promo", "{allContacts: true}", ""));

    for (name, secret) in [("exfil", "disparo-database"), ("evo", "evo-creds")] {
        let channel =
            stack.wait_for("channel", name, "SecretNotMarked", LONG, |ch| ready(ch).1 == "SecretNotMarked").await;
        let (status, _, message) = ready(&channel);
        assert_eq!(status, "False");
        let fix = format!("kubectl label secret {secret} disparo.io/credentials=true -n {}", stack.ns);
        assert!(message.contains(&fix), "{message}");
    }
    let c = stack.wait_for("campaign", "on-exfil", "Stalled", LONG, |c| is_true_with(c, "Stalled", "Blocked")).await;
    let stalled = condition(&c, "Stalled").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(stalled.contains("not labelled disparo.io/credentials=true"), "{stalled}");

    // About 20 s of reconciles (each change of the Channels is one more).
    let until = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while Instant::now() < until {
        for name in ["exfil", "evo"] {
            stack.kubectl(&["annotate", "--overwrite", "channel", name, &format!("test/poke={i}")]);
        }
        i += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(listener.connections(), Vec::<String>::new(), "the baseUrl was contacted");
    assert_eq!(ready(&stack.get("channel", "exfil")).1, "SecretNotMarked");

    // Labelled, the Secret is used: the controller asks Evolution with its key.
    stack.kubectl(&["label", "secret", "evo-creds", "disparo.io/credentials=true"]);
    stack.kubectl(&["annotate", "--overwrite", "channel", "evo", "test/poke=labelled"]);
    let deadline = Instant::now() + LONG;
    while listener.connections().is_empty() {
        assert!(Instant::now() < deadline, "the labelled Secret was never used\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let channel = stack
        .wait_for("channel", "evo", "another reason", LONG, |ch| {
            !matches!(ready(ch).1.as_str(), "SecretNotMarked" | "")
        })
        .await;
    assert_eq!(ready(&channel).1, "InstanceUnreachable", "{}", channel["status"]);
    let connections = listener.connections();
    assert!(
        connections
            .iter()
            .all(|c| c.contains("/instance/connectionState/shop") && c.contains("apikey: evolution-key-of-evo")),
        "{connections:?}"
    );
    assert!(!connections.iter().any(|c| c.contains("postgres")), "{connections:?}");
    assert_eq!(ready(&stack.get("channel", "exfil")).1, "SecretNotMarked");
}

/// The resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

const MIB: u64 = 1024 * 1024;

/// Starts `disparo webhook` of the build under test on a free port with `extra` flags;
/// returns its address and pid once /readyz answers 200.
async fn start_webhook(stack: &mut Stack, extra: &[&str]) -> (String, u32) {
    let addr = format!("127.0.0.1:{}", common::stack::free_port());
    let mut args = vec!["webhook", "--listen", addr.as_str()];
    args.extend_from_slice(extra);
    let index = stack.spawn("webhook", &args);
    let pid = stack.procs[index].child.id().unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok(response) = http.get(format!("http://{addr}/readyz")).send().await
            && response.status() == 200
        {
            return (addr, pid);
        }
        assert!(Instant::now() < deadline, "the webhook never got ready\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `n` Secrets of `size` bytes each, like Helm release records: nothing Disparo reads.
async fn unrelated_secrets(ns: &str, prefix: &str, n: usize, size: usize) {
    use futures::StreamExt;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    let api: Api<Secret> = Api::namespaced(common::cluster::client().await, ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut secret = Secret::default();
                secret.metadata.name = Some(format!("sh.helm.release.v1.{prefix}.v{i}"));
                secret.metadata.labels = Some([("owner".to_owned(), "helm".to_owned())].into());
                secret.type_ = Some("helm.sh/release.v1".to_owned());
                let fill = (i % 251) as u8;
                secret.data = Some([("release".to_owned(), ByteString(vec![fill; size]))].into());
                api.create(&PostParams::default(), &secret).await.unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// Signs and POSTs an empty Meta notification to a channel; returns the status.
async fn post_meta(http: &reqwest::Client, addr: &str, ns: &str, channel: &str, app_secret: &str) -> u16 {
    let body = r#"{"object":"whatsapp_business_account","entry":[]}"#;
    let signature = disparo::webhook::signature::sign_meta(app_secret.as_bytes(), body.as_bytes());
    let response = http
        .post(format!("http://{addr}/webhooks/meta/{ns}/{channel}"))
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// The internet-facing webhook caches the Secrets labelled for Disparo and no other:
/// with 300 Secrets of 1 MiB in the namespace (250 before it starts, 50 while it runs)
/// it stays under 64 MiB resident and ready. The bound: the idle process is well under
/// 64 MiB (a few tens of MiB: runtime, TLS, HTTP and Kubernetes clients, a pool), while
/// caching the unrelated Secrets would take at least their 300 MiB. A Channel whose
/// Secret carries the label is verified; one whose Secret does not is refused like an
/// unknown channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_webhook_holds_only_secrets_labelled_for_disparo() {
    let mut stack = Stack::start("iso-mem").await;
    let size = 1024 * 1024 - 4096; // the API server's 1 MiB cap on a Secret's data
    unrelated_secrets(&stack.ns, "before", 250, size).await;
    stack.kubectl(&[
        "create",
        "secret",
        "generic",
        "plain-creds",
        "--from-literal=app-secret=plain-secret",
        "--from-literal=verify-token=v",
        "--from-literal=access-token=t",
    ]);
    stack.apply(&common::stack::meta_channel("main", "http://127.0.0.1:9", "111", &common::stack::fast(0)));
    stack.apply(
        &common::stack::meta_channel("plain", "http://127.0.0.1:9", "222", &common::stack::fast(0))
            .replace("meta-creds", "plain-creds"),
    );
    // The controller provisions the namespace's organization (with the first Channel).
    stack.wait_for("channel", "main", "Ready", LONG, |ch| is_true_with(ch, "Ready", "Ready")).await;
    let (addr, pid) = start_webhook(&mut stack, &[]).await;
    unrelated_secrets(&stack.ns, "after", 50, size).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let resident = rss(pid);
    println!("webhook resident with 300 unrelated Secrets of 1 MiB: {} MiB", resident / MIB);
    assert!(resident < 64 * MIB, "the webhook holds {} MiB", resident / MIB);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(http.get(format!("http://{addr}/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(post_meta(&http, &addr, &stack.ns, "main", "sandbox-app-secret").await, 200, "{}", stack.logs());
    assert_eq!(
        post_meta(&http, &addr, &stack.ns, "plain", "plain-secret").await,
        401,
        "an unlabelled Secret is not read"
    );
    assert_eq!(post_meta(&http, &addr, &stack.ns, "nope", "plain-secret").await, 401);

    // Labelled, the Secret is seen (the watch delivers it) and the channel verified.
    stack.kubectl(&["label", "secret", "plain-creds", "disparo.io/credentials=true"]);
    let deadline = Instant::now() + LONG;
    while post_meta(&http, &addr, &stack.ns, "plain", "plain-secret").await != 200 {
        assert!(Instant::now() < deadline, "the labelled Secret never reached the webhook\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Uploads that trickle in (150 clients each sending 3 MiB slowly to a made-up
/// channel's URL, others trickling their headers) neither exhaust the webhook's memory
/// nor keep it from answering /healthz; trickled headers are cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_uploads_to_made_up_paths_leave_the_webhook_answering() {
    use tokio::io::AsyncWriteExt;
    let mut stack = Stack::start("iso-slow").await;
    let (addr, pid) = start_webhook(&mut stack, &[]).await;
    let idle = rss(pid);
    const BODY: usize = 3 * 1024 * 1024;
    let mut uploads = Vec::new();
    for i in 0..150 {
        let addr = addr.clone();
        let path = if i % 3 == 0 { "/made/up/path".to_owned() } else { format!("/webhooks/meta/nobody-{i}/nothing") };
        uploads.push(tokio::spawn(async move {
            let Ok(mut socket) = tokio::net::TcpStream::connect(&addr).await else { return };
            let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n");
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // 3 MiB at 64 KiB/s: 48 s, longer than the server waits for a body.
            let chunk = vec![b'7'; 16 * 1024];
            for _ in 0..BODY / chunk.len() {
                if socket.write_all(&chunk).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }
    // Clients that send their headers a byte at a time and never finish them.
    let mut trickles = Vec::new();
    for _ in 0..20 {
        let addr = addr.clone();
        trickles.push(tokio::spawn(async move {
            let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!("POST /webhooks/meta/x/y HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {}", "a".repeat(200));
            for byte in head.bytes() {
                if socket.write_all(&[byte]).await.is_err() {
                    return true;
                }
                let mut buf = [0u8; 64];
                // A read that ends (EOF or reset) means the server closed the connection.
                match tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    _ => {}
                }
            }
            false
        }));
    }

    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let health = http.get(format!("http://{addr}/healthz")).send().await;
        assert!(health.as_ref().is_ok_and(|r| r.status() == 200), "/healthz: {health:?}");
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for upload in uploads {
        upload.await.unwrap();
    }
    for trickle in trickles {
        assert!(trickle.await.unwrap(), "a connection trickling its headers was never cut off");
    }
    assert_eq!(http.get(format!("http://{addr}/readyz")).send().await.unwrap().status(), 200);
    println!("webhook resident: {} MiB idle, {} MiB at most under 150 slow uploads", idle / MIB, peak / MIB);
    // At most 32 bodies (the default) of at most 3 MiB are held at once.
    assert!(peak < idle + 32 * 3 * MIB, "resident went from {} MiB to {} MiB", idle / MIB, peak / MIB);
}
