//! The hardened HTTP server every listener runs on, against real sockets on loopback: the
//! header-read timeout closes a silent connection, the connection limit closes the surplus at
//! once, the request limit sheds load with 503, TLS serves https with a certificate made here,
//! and shutdown lets a request in flight finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use safeclock_common::server::{peer_of, HttpServer, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn settings() -> ServerSettings {
    ServerSettings {
        max_connections: 16,
        max_concurrent_requests: 4,
        header_read_timeout_ms: 500,
        keep_alive: true,
        max_header_bytes: 16 * 1024,
        tls_cert_file: None,
        tls_key_file: None,
    }
}

fn app() -> Router {
    Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "slow"
            }),
        )
        .route(
            "/peer",
            get(|request: axum::extract::Request| async move {
                peer_of(&request)
                    .map(|p| p.ip().to_string())
                    .unwrap_or_default()
            }),
        )
}

struct Running {
    addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(settings: ServerSettings) -> Running {
    let registry = Registry::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server =
        HttpServer::from_listener("test", listener, &settings, "test.server", &registry).unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { server.serve(app(), token).await.unwrap() });
    Running {
        addr,
        registry,
        shutdown,
        task,
    }
}

impl Running {
    fn metric(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                label.is_none_or(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == k && l.value() == v)
                })
            })
            .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
            .sum()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }
}

/// Reads until the peer closes the connection (or 10 s pass); returns what arrived and when the
/// connection ended, measured from `since`.
async fn until_closed(stream: &mut TcpStream, since: Instant) -> (Vec<u8>, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = since + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, since.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was not closed within 10 s"),
        }
    }
}

async fn get_ok(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (raw, _) = until_closed(&mut s, Instant::now()).await;
    String::from_utf8_lossy(&raw).to_string()
}

#[tokio::test]
async fn a_connection_that_sends_no_headers_is_closed_after_the_header_timeout() {
    let server = start(settings()).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (_, closed_after) = until_closed(&mut silent, started).await;
    assert!(
        closed_after >= Duration::from_millis(450) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}, the header timeout is 500 ms"
    );

    // Half a request head is no better: the timeout is for the whole head.
    let started = Instant::now();
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = slow.write_all(b"X-Trickle: 1\r\n").await;
    let (_, closed_after) = until_closed(&mut slow, started).await;
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");

    // A kept-alive connection that goes idle after a response is closed the same way.
    let started = Instant::now();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (raw, closed_after) = until_closed(&mut idle, started).await;
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    assert!(
        closed_after >= Duration::from_millis(450) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );
    assert!(get_ok(server.addr, "/ok").await.starts_with("HTTP/1.1 200"));
    server.stop().await;
}

#[tokio::test]
async fn past_the_connection_limit_a_connection_is_closed_at_once_and_the_rest_still_work() {
    let mut s = settings();
    s.max_connections = 8;
    s.max_concurrent_requests = 4;
    s.header_read_timeout_ms = 1500;
    let server = start(s).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Let the server accept all eight before the ninth.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut surplus = TcpStream::connect(server.addr).await.unwrap();
    let (_, closed_after) = until_closed(&mut surplus, started).await;
    assert!(
        closed_after < Duration::from_millis(500),
        "the surplus connection waited {closed_after:?}"
    );
    assert_eq!(
        server.metric(
            "safeclock_http_connections_refused_total",
            Some(("reason", "limit"))
        ),
        1.0
    );
    assert_eq!(server.metric("safeclock_http_connections_open", None), 8.0);
    // Once the idle ones time out, a request is served.
    let started = Instant::now();
    loop {
        let r = get_ok(server.addr, "/ok").await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn past_the_request_limit_requests_get_503_with_retry_after_at_once() {
    let mut s = settings();
    s.max_concurrent_requests = 2;
    let server = start(s).await;
    let url = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(format!("{url}/slow")).send().await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = http.get(format!("{url}/ok")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    for t in slow {
        assert_eq!(t.await.unwrap().status(), 200);
    }
    assert_eq!(
        server.metric("safeclock_http_requests_shed_total", None),
        1.0
    );
    assert_eq!(
        http.get(format!("{url}/ok")).send().await.unwrap().status(),
        200
    );
    // The peer address reaches the handlers.
    let peer = http.get(format!("{url}/peer")).send().await.unwrap();
    assert_eq!(peer.text().await.unwrap(), "127.0.0.1");
    server.stop().await;
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let server = start(settings()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let big = "a".repeat(20 * 1024);
    s.write_all(format!("GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (raw, _) = until_closed(&mut s, Instant::now()).await;
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_and_stops_accepting() {
    let server = start(settings()).await;
    let url = format!("http://{}/slow", server.addr);
    let in_flight = tokio::spawn(async move { reqwest::get(url).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = server.addr;
    server.stop().await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "slow");
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written to files.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, cert_pem)
}

#[tokio::test]
async fn tls_serves_https_with_a_self_signed_certificate_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = self_signed(dir.path());
    let mut s = settings();
    s.tls_cert_file = Some(cert);
    s.tls_key_file = Some(key);
    let server = start(s).await;
    let port = server.addr.port();

    let trusting = |version: reqwest::tls::Version| {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
            .min_tls_version(version)
            .max_tls_version(version)
            .build()
            .unwrap()
    };
    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let r = trusting(version)
            .get(format!("https://localhost:{port}/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{version:?}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // A client that does not trust the certificate gets no answer.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("https://localhost:{port}/ok"))
        .send()
        .await
        .is_err());
    // Plain http to the https port gets no HTTP answer.
    let r = reqwest::get(format!("http://127.0.0.1:{port}/ok")).await;
    assert!(r.is_err(), "{r:?}");
    // A connection that never starts the handshake is closed after the header timeout.
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (_, closed_after) = until_closed(&mut silent, started).await;
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    assert!(
        server.metric(
            "safeclock_http_connections_refused_total",
            Some(("reason", "tls_handshake"))
        ) >= 2.0
    );
    server.stop().await;
}

#[tokio::test]
async fn unusable_tls_files_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _key, _) = self_signed(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = self_signed(other.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    for (cert, key, field) in [
        (cert.clone(), garbage.clone(), "test.server.tls_key_file"),
        (
            garbage.clone(),
            other_key.clone(),
            "test.server.tls_cert_file",
        ),
        (cert.clone(), other_key.clone(), "test.server.tls_key_file"),
    ] {
        let mut s = settings();
        s.tls_cert_file = Some(cert);
        s.tls_key_file = Some(key);
        let err = s.validate("test.server").unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
        assert!(!err.contains("PRIVATE KEY-----"), "{err}");
    }
}

#[tokio::test]
async fn every_listener_of_a_process_registers_its_metrics_in_the_one_registry() {
    let registry = Registry::new();
    let mut servers = Vec::new();
    for name in ["ops", "intake", "escalator-api"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        servers.push(
            HttpServer::from_listener(name, listener, &settings(), "x.server", &registry).unwrap(),
        );
    }
    let families = registry.gather();
    let open = families
        .iter()
        .find(|f| f.name() == "safeclock_http_connections_open")
        .unwrap();
    let listeners: Vec<&str> = open
        .get_metric()
        .iter()
        .flat_map(|m| m.get_label().iter())
        .filter(|l| l.name() == "listener")
        .map(|l| l.value())
        .collect();
    assert_eq!(listeners.len(), 3, "{listeners:?}");
    // The same listener twice is a mistake, and says so.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = HttpServer::from_listener("ops", listener, &settings(), "x.server", &registry)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ops"), "{err}");
}
