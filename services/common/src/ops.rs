//! The per-process HTTP ops endpoint: `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive), `/readyz` (every component is consuming).
//!
//! Readiness is a set of named components ([`Readiness`]); a consumer is ready once it has
//! joined its group (received an assignment) and while it can reach a broker, so a load balancer
//! or Kubernetes never routes to, or counts as up, a process that is still joining its group or
//! is cut off from Kafka. The clock is also not ready while it restores state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::server::{HttpServer, ServerError, ServerSettings};

/// Named readiness flags; ready when there is at least one and all are set.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Declares a component, not yet ready.
    pub fn component(&self, name: &str) -> ReadinessHandle {
        self.lock().insert(name.to_string(), false);
        ReadinessHandle {
            readiness: self.clone(),
            name: name.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when every declared component is ready.
    pub fn is_ready(&self) -> bool {
        let c = self.lock();
        !c.is_empty() && c.values().all(|r| *r)
    }

    /// The components that are not ready yet.
    pub fn not_ready(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// One component's readiness flag.
#[derive(Debug, Clone)]
pub struct ReadinessHandle {
    readiness: Readiness,
    name: String,
}

impl ReadinessHandle {
    pub fn set(&self, ready: bool) {
        self.readiness.lock().insert(self.name.clone(), ready);
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    readiness: Readiness,
}

/// The ops router, for embedding or tests.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(OpsState {
            registry,
            readiness,
        })
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            format!("cannot encode metrics: {e}\n").into_bytes(),
        ),
    }
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", state.readiness.not_ready().join(", ")),
        )
    }
}

/// Binds the ops endpoint on the hardened server ([`crate::server`]); returns the bound address
/// (useful with port 0) and the serving task.
///
/// # Errors
/// When the address cannot be bound or the listener's settings are unusable.
pub async fn bind(
    listen: SocketAddr,
    server: &ServerSettings,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>), ServerError> {
    let http = HttpServer::bind("ops", listen, server, "ops.server", &registry).await?;
    let addr = http.local_addr();
    let scheme = http.scheme();
    let app = router(registry, readiness);
    let task = tokio::spawn(async move { Ok(http.serve(app, shutdown).await?) });
    tracing::info!(%addr, scheme, "ops endpoint listening (/metrics, /healthz, /readyz)");
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, raw.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    #[tokio::test]
    async fn ready_only_when_every_component_is_consuming() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("safeclock_test_total", "test").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let server = crate::config::Settings::defaults().unwrap().ops.server;
        let (addr, task) = bind(
            "127.0.0.1:0".parse().unwrap(),
            &server,
            registry,
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(
            get(addr, "/readyz").await.0,
            503,
            "no component declared yet"
        );
        let clock = readiness.component("clock");
        let exporter = readiness.component("exporter");
        clock.set(true);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("exporter"), "{body}");
        exporter.set(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("safeclock_test_total 1"), "{body}");

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
