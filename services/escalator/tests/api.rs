//! The acknowledgement API's listener, without Kafka: a stand-in for the service loop answers
//! its commands. Tokens are Secrets, failed authentication is rate-limited per address and
//! counted, bodies are bounded, idle connections are closed, and it serves https itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use prometheus::Registry;
use safeclock_common::config::{ApiScope, ApiSettings, OperatorGrant, Secret, Settings};
use safeclock_escalator::api::{self, Command};
use safeclock_escalator::engine::CommandError;
use safeclock_escalator::metrics::EscalatorMetrics;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "duty-desk-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";

struct Running {
    base: String,
    addr: std::net::SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    seen: Seen,
}

/// What reached the stand-in loop: (command, actor, forces, reason of a denial).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<String>, String)>>>;

fn settings() -> ApiSettings {
    let mut s = Settings::defaults().unwrap().escalator.api;
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.add_operator("duty-desk", Secret::new(TOKEN), OperatorGrant::everything());
    s.add_operator(
        "viewer",
        Secret::new(VIEWER),
        OperatorGrant {
            scopes: vec![ApiScope::Read],
            forces: vec!["nottinghamshire".into()],
        },
    );
    s.auth_failure_burst = 2;
    s.auth_failures_per_minute = 1;
    s.server.header_read_timeout_ms = 500;
    s
}

/// Binds the API with a stand-in loop: lists nothing, knows no escalation.
async fn start(settings: ApiSettings) -> Running {
    let registry = Registry::new();
    let metrics = EscalatorMetrics::register(&registry).unwrap();
    let (tx, mut rx) = mpsc::channel::<Command>(8);
    let seen: Seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            let mut log = log.lock().unwrap();
            match command {
                Command::List {
                    actor,
                    forces,
                    reply,
                } => {
                    log.push(("list".into(), actor, forces, String::new()));
                    let _ = reply.send(Vec::new());
                }
                Command::Acknowledge {
                    id,
                    actor,
                    forces,
                    reply,
                    ..
                }
                | Command::Resolve {
                    id,
                    actor,
                    forces,
                    reply,
                    ..
                } => {
                    log.push(("act".into(), actor, forces, String::new()));
                    let _ = reply.send(Err(CommandError::NotFound(id)));
                }
                Command::Denied { actor, reason, .. } => {
                    log.push(("denied".into(), actor, Vec::new(), reason.into()));
                }
            }
        }
    });
    let shutdown = CancellationToken::new();
    let tls = settings.server.tls();
    let (addr, task) = api::bind(
        &settings,
        &registry,
        metrics.api_auth_failures.clone(),
        tx,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let base = if tls {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    };
    Running {
        base,
        addr,
        registry,
        shutdown,
        task,
        seen,
    }
}

impl Running {
    fn failures(&self, reason: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "safeclock_escalation_api_auth_failures_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address_and_counted() {
    let api = start(settings()).await;
    let list = format!("{}/v1/escalations", api.base);
    let attacker = from("127.0.0.1");
    assert_eq!(attacker.get(&list).send().await.unwrap().status(), 401);
    let r = attacker
        .get(&list)
        .bearer_auth("not-the-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // Third failure: over the burst of 2.
    let r = attacker
        .post(format!("{}/v1/escalations/e-1/ack", api.base))
        .bearer_auth("still-not-the-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The right token is not even checked from there now; elsewhere it works.
    let r = attacker.get(&list).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let r = from("127.0.0.2")
        .get(&list)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["escalations"], serde_json::json!([]));
    assert_eq!(api.failures("missing"), 1.0);
    assert_eq!(api.failures("invalid"), 1.0);
    assert_eq!(api.failures("rate_limited"), 2.0);
    api.stop().await;
}

#[tokio::test]
async fn bodies_are_bounded_and_commands_reach_the_loop() {
    let api = start(settings()).await;
    let http = from("127.0.0.1");
    let ack = format!("{}/v1/escalations/e-1/ack", api.base);
    let r = http
        .post(&ack)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"note": "x".repeat(20_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = http
        .post(&ack)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"note": "Spoke to Jane Smith at 12 Acacia Avenue"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a note is a code, not free text");
    let text = r.text().await.unwrap();
    assert!(text.contains("note must be a code"), "{text}");
    assert!(!text.contains("Jane") && !text.contains("Acacia"), "{text}");
    let r = http
        .post(&ack)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"note": "officer_attending"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the stand-in loop knows no escalation");
    api.stop().await;
}

#[tokio::test]
async fn a_token_acts_only_within_its_scopes_and_as_itself() {
    let api = start(settings()).await;
    let http = from("127.0.0.1");
    let ack = format!("{}/v1/escalations/e-1/ack", api.base);
    let resolve = format!("{}/v1/escalations/e-1/resolve", api.base);
    // A read-only token lists (its forces go with the command) but may not act: 403, audited.
    let r = http
        .get(format!("{}/v1/escalations", api.base))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for url in [&ack, &resolve] {
        let r = http.post(url).bearer_auth(VIEWER).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("not granted"),
            "{body}"
        );
    }
    // `by` is not a claim a caller can make: the token is who acted.
    let r = http
        .post(&ack)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"by": "someone-else", "note": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.post(&ack).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // The loop audits the denials with a little delay (try_send): wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while api.seen.lock().unwrap().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("list", "viewer", vec!["nottinghamshire"], ""),
            ("denied", "viewer", vec![], "scope_not_granted"),
            ("denied", "viewer", vec![], "scope_not_granted"),
            ("act", "duty-desk", vec!["*"], ""),
        ]
        .map(|(c, a, f, r)| (
            c.to_string(),
            a.to_string(),
            f.into_iter().map(String::from).collect::<Vec<_>>(),
            r.to_string()
        ))
    );
    assert_eq!(api.failures("scope_not_granted"), 2.0);
    api.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let api = start(settings()).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(450) && after < Duration::from_secs(3),
        "{after:?}"
    );
    api.stop().await;
}

#[tokio::test]
async fn the_api_serves_https_itself_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = certified.cert.pem();
    std::fs::write(dir.path().join("api.crt"), &cert_pem).unwrap();
    std::fs::write(
        dir.path().join("api.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut s = settings();
    s.server.tls_cert_file = Some(dir.path().join("api.crt"));
    s.server.tls_key_file = Some(dir.path().join("api.key"));
    let api = start(s).await;
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = https
        .get(format!("{}/v1/escalations", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(reqwest::get(format!("http://{}/v1/escalations", api.addr))
        .await
        .is_err());
    api.stop().await;
}

#[test]
fn api_tokens_never_print() {
    let s = settings();
    let shown = format!("{s:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("duty-desk"), "{shown}");
}
