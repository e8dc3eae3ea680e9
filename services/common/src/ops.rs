//! The per-process HTTP ops endpoint: `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive), `/readyz` (every component is consuming).
//!
//! Readiness is a set of named components ([`Readiness`]); a consumer marks itself ready once it
//! has been assigned partitions, so a load balancer or Kubernetes never routes to, or counts as
//! up, a process that is still joining its group.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// Binds the ops endpoint; returns the bound address (useful with port 0) and the serving task.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(
    listen: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the ops endpoint on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let app = router(registry, readiness);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|e| anyhow::anyhow!("ops endpoint failed: {e}"))
    });
    tracing::info!(%addr, "ops endpoint listening (/metrics, /healthz, /readyz)");
    Ok((addr, task))
}
