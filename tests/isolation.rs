//! Tenant isolation on the real stack, as the controller and the webhook service see it:
//! they read only Secrets labelled for Disparo (a Channel cannot make them send another
//! Secret to a URL of its author's choosing), and the internet-facing webhook holds
//! only what it needs and stays up under slow or large requests.

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
                    let n = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await.ok().and_then(Result::ok).unwrap_or(0);
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
        let channel = stack.wait_for("channel", name, "SecretNotMarked", LONG, |ch| ready(ch).1 == "SecretNotMarked").await;
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
    let channel = stack.wait_for("channel", "evo", "another reason", LONG, |ch| !matches!(ready(ch).1.as_str(), "SecretNotMarked" | "")).await;
    assert_eq!(ready(&channel).1, "InstanceUnreachable", "{}", channel["status"]);
    let connections = listener.connections();
    assert!(connections.iter().all(|c| c.contains("/instance/connectionState/shop") && c.contains("apikey: evolution-key-of-evo")), "{connections:?}");
    assert!(!connections.iter().any(|c| c.contains("postgres")), "{connections:?}");
    assert_eq!(ready(&stack.get("channel", "exfil")).1, "SecretNotMarked");
}
