//! The one HTTP server every safeclock listener runs on: the ops endpoint, intake and the
//! escalator's acknowledgement API.
//!
//! # Why not `axum::serve`
//! `axum::serve` accepts every connection, waits for request headers forever and has no knob for
//! either. A listener open to force systems (intake) or to people's tools (the acknowledgement
//! API) must survive a client that opens thousands of connections and sends nothing (slowloris),
//! a flood of requests, and a client that trickles bytes. So every listener is served here, with
//! the crates' own settings rather than timers of our own:
//!
//! - **Header-read timeout** (hyper's `http1::Builder::header_read_timeout`, on hyper-util's tokio
//!   timer). It runs from the moment a connection opens and again after every response, so it is
//!   also the keep-alive idle limit: a connection that sends no complete request head within
//!   `header_read_timeout_ms` is closed.
//! - **A global limit on open connections** (`max_connections`). Past it a new connection is
//!   accepted and closed at once, so a client learns immediately instead of waiting in the
//!   kernel's backlog, and the connections already open are not starved.
//! - **A global limit on requests in flight** (`max_concurrent_requests`), with tower's
//!   `GlobalConcurrencyLimitLayer` and `LoadShedLayer`: past it a request is answered
//!   `503 overloaded` with `Retry-After: 1` at once instead of queueing without bound. HTTP/1.1
//!   serves one request at a time per connection (hyper does not run pipelined requests
//!   concurrently), so the per-connection limit is one by construction.
//! - **Bounded request heads** (`max_header_bytes`, hyper's `max_header_size`; 431 past it), so
//!   an idle connection costs a few kilobytes and a busy one a bounded buffer.
//! - **Graceful shutdown** on a [`CancellationToken`]: accepting stops, idle connections close,
//!   requests in flight are answered, then [`HttpServer::serve`] returns.
//! - **Optional TLS** with rustls (TLS 1.2 and 1.3 only; the `ring` provider the rest of the
//!   workspace already uses): set `tls_cert_file` and `tls_key_file` (PEM) and the listener
//!   serves https. The handshake must finish within the header-read timeout too, or the
//!   connection is closed (rustls has no timeout of its own).
//!
//! Each request carries the peer address as [`axum::extract::ConnectInfo<SocketAddr>`], which
//! the bearer-token listeners use to rate-limit failed authentication per peer
//! ([`crate::auth`]).
//!
//! Bodies are the handlers' business: [`read_body`] reads one with a size limit and a deadline,
//! so a client that trickles a body is answered 408 rather than holding a request slot.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::{ServiceBuilder, ServiceExt};

use crate::config::ConfigError;
use crate::metrics::HttpMetrics;

/// The settings of one listener (`[ops.server]`, `[intake.server]`, `[escalator.api.server]`).
/// Every field has a default per listener in `defaults.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Connections open at once. Past it a new connection is accepted and closed at once.
    pub max_connections: usize,
    /// Requests handled at once. Past it a request is answered 503 with `Retry-After: 1`.
    pub max_concurrent_requests: usize,
    /// Time a client has to send a request's head (line and headers), from the moment its
    /// connection opens or its previous response was sent; also the TLS handshake's limit and
    /// so the idle limit of a kept-alive connection.
    pub header_read_timeout_ms: u64,
    /// Keep connections open between requests (HTTP/1.1 keep-alive), within the header-read
    /// timeout. Off: one request per connection.
    pub keep_alive: bool,
    /// Largest request head (line and headers) accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// PEM file with the certificate chain to serve https (with `tls_key_file`). Unset: http.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

fn invalid(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl ServerSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// True when the listener serves https.
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// Checks the limits, and that the TLS files (if set) are a usable certificate and key.
    /// `section` is where these settings live (`intake.server`), for the error's field name.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first wrong field.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let field = |f: &str| format!("{section}.{f}");
        if !(1..=100_000).contains(&self.max_connections) {
            return Err(invalid(
                field("max_connections"),
                "must be between 1 and 100000",
            ));
        }
        if !(1..=self.max_connections).contains(&self.max_concurrent_requests) {
            return Err(invalid(
                field("max_concurrent_requests"),
                "must be between 1 and max_connections (one request at a time per connection)",
            ));
        }
        if !(100..=300_000).contains(&self.header_read_timeout_ms) {
            return Err(invalid(
                field("header_read_timeout_ms"),
                "must be between 100 and 300000",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(invalid(
                field("max_header_bytes"),
                "must be between 1024 and 1048576",
            ));
        }
        tls_config(self, section).map(|_| ())
    }

    /// Makes relative TLS file paths relative to `dir` (the configuration file's directory).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for p in [&mut self.tls_cert_file, &mut self.tls_key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// The rustls server configuration of `settings`, or `None` for plain http.
fn tls_config(
    settings: &ServerSettings,
    section: &str,
) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let field = |f: &str| format!("{section}.{f}");
    let (cert_path, key_path) = match (&settings.tls_cert_file, &settings.tls_key_file) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => {
            return Err(invalid(
                field("tls_key_file"),
                "must be set together with tls_cert_file",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                field("tls_cert_file"),
                "must be set together with tls_key_file",
            ))
        }
    };
    let read = |f: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            invalid(
                field(f),
                format!("names {}, which cannot be read: {e}", path.display()),
            )
        })
    };
    let cert_pem = read("tls_cert_file", cert_path)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field("tls_cert_file"), format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            field("tls_cert_file"),
            "holds no CERTIFICATE block",
        ));
    }
    let key_pem = read("tls_key_file", key_path)?;
    // The key file's contents never appear in an error: only what is wrong with it.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        invalid(
            field("tls_key_file"),
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(field("tls_cert_file"), format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            invalid(
                field("tls_key_file"),
                format!("does not go with the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Why a listener could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the {listener} listener on {addr}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the {listener} listener's settings are invalid")]
    Settings {
        listener: &'static str,
        #[source]
        source: ConfigError,
    },
    #[error("cannot register the {listener} listener's metrics")]
    Metrics {
        listener: &'static str,
        #[source]
        source: prometheus::Error,
    },
    #[error("the {listener} listener has no local address")]
    LocalAddr {
        listener: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, ready to serve a router.
pub struct HttpServer {
    name: &'static str,
    listener: TcpListener,
    addr: SocketAddr,
    settings: ServerSettings,
    tls: Option<TlsAcceptor>,
    metrics: HttpMetrics,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `addr` for the listener `name` (`ops`, `intake`, `escalator-api`: the `listener`
    /// label of its metrics). `section` names its settings in errors (`intake.server`).
    ///
    /// # Errors
    /// When the address cannot be bound, the TLS files are unusable, or the metrics are
    /// already registered for this listener name.
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        settings: &ServerSettings,
        section: &str,
        registry: &Registry,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                listener: name,
                addr,
                source,
            })?;
        Self::from_listener(name, listener, settings, section, registry)
    }

    /// Like [`HttpServer::bind`] on a listener bound already (tests bind port 0).
    ///
    /// # Errors
    /// As [`HttpServer::bind`].
    pub fn from_listener(
        name: &'static str,
        listener: TcpListener,
        settings: &ServerSettings,
        section: &str,
        registry: &Registry,
    ) -> Result<Self, ServerError> {
        let settings_error = |source| ServerError::Settings {
            listener: name,
            source,
        };
        settings.validate(section).map_err(settings_error)?;
        let tls = tls_config(settings, section)
            .map_err(settings_error)?
            .map(TlsAcceptor::from);
        let metrics =
            HttpMetrics::register(registry, name).map_err(|source| ServerError::Metrics {
                listener: name,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::LocalAddr {
                listener: name,
                source,
            })?;
        Ok(Self {
            name,
            listener,
            addr,
            settings: settings.clone(),
            tls,
            metrics,
        })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves `router` until `shutdown` is cancelled, then stops accepting, closes idle
    /// connections, lets requests in flight finish and returns.
    ///
    /// # Errors
    /// None today; the result leaves room for a listener that fails for good.
    pub async fn serve(
        self,
        router: Router,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let Self {
            name,
            listener,
            addr,
            settings,
            tls,
            metrics,
        } = self;
        let shed_metrics = metrics.clone();
        let app = ServiceBuilder::new()
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(
                settings.max_concurrent_requests,
            ))
            .service(router);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout())
            .keep_alive(settings.keep_alive)
            .max_header_size(settings.max_header_bytes)
            // The read buffer: at least hyper's minimum, room for the largest head, bounded.
            .max_buf_size((settings.max_header_bytes * 2).max(64 * 1024));
        let connections = Arc::new(Semaphore::new(settings.max_connections));
        let graceful = GracefulShutdown::new();
        tracing::info!(
            listener = name,
            %addr,
            tls = tls.is_some(),
            max_connections = settings.max_connections,
            max_concurrent_requests = settings.max_concurrent_requests,
            header_read_timeout_ms = settings.header_read_timeout_ms,
            "HTTP listener serving"
        );
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close rather than
                    // spin or give up the listener.
                    tracing::warn!(listener = name, error.message = %e, "cannot accept a connection; retrying in 100 ms");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                metrics
                    .connections_refused
                    .with_label_values(&["limit"])
                    .inc();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let watcher = graceful.watcher();
            let http = http.clone();
            let app = app.clone();
            let tls = tls.clone();
            let metrics = metrics.clone();
            let shed = shed_metrics.clone();
            let shutdown = shutdown.clone();
            let handshake_timeout = settings.header_read_timeout();
            tokio::spawn(async move {
                let _permit = permit;
                metrics.connections_open.inc();
                let _open = OpenGuard(metrics.connections_open.clone());
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    let app = app.clone();
                    let shed = shed.clone();
                    async move {
                        let request = request.map(Body::new);
                        Ok::<_, Infallible>(match app.oneshot(request).await {
                            Ok(response) => response,
                            Err(_) => {
                                shed.requests_shed.inc();
                                overloaded()
                            }
                        })
                    }
                });
                match tls {
                    None => serve_connection(&http, stream, service, watcher).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                        let stream = tokio::select! {
                            () = shutdown.cancelled() => return,
                            done = handshake => match done {
                                Ok(Ok(s)) => s,
                                Ok(Err(_)) | Err(_) => {
                                    metrics
                                        .connections_refused
                                        .with_label_values(&["tls_handshake"])
                                        .inc();
                                    return;
                                }
                            },
                        };
                        serve_connection(&http, stream, service, watcher).await;
                    }
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
        tracing::info!(listener = name, %addr, "HTTP listener stopped");
        Ok(())
    }
}

/// Decrements the open-connections gauge when a connection task ends, however it ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_connection<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    // Errors here are the client's (it hung up, timed out on its headers, sent garbage): hyper
    // has already answered what can be answered. Not worth more than a debug line.
    if let Err(e) = watcher
        .watch(http.serve_connection(TokioIo::new(io), service))
        .await
    {
        tracing::debug!(error.message = %e, "connection ended with an error");
    }
}

/// Errors of `accept` that concern one connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The answer to a request past `max_concurrent_requests`.
fn overloaded() -> Response<Body> {
    let body = serde_json::json!({
        "error": "overloaded",
        "message": "too many requests in progress; send it again in a moment",
    });
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyReadError {
    #[error("the body is over the {0}-byte limit")]
    TooLarge(usize),
    #[error("the body did not arrive in time")]
    Timeout,
    #[error("the body could not be read")]
    Unreadable,
}

/// Reads a request body of at most `max_bytes` within `timeout` (from now). A declared
/// `Content-Length` over the limit is refused before anything is read.
///
/// # Errors
/// [`BodyReadError`] saying which limit was hit.
pub async fn read_body(
    body: Body,
    content_length: Option<&HeaderValue>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, BodyReadError> {
    let declared = content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return Err(BodyReadError::TooLarge(max_bytes));
    }
    let limited = http_body_util::Limited::new(body, max_bytes);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(BodyReadError::Timeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyReadError::TooLarge(max_bytes))
        }
        Ok(Err(_)) => Err(BodyReadError::Unreadable),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The peer address a request came from, when it came through [`HttpServer`].
pub fn peer_of<B>(request: &Request<B>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        ServerSettings {
            max_connections: 10,
            max_concurrent_requests: 5,
            header_read_timeout_ms: 5000,
            keep_alive: true,
            max_header_bytes: 16 * 1024,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }

    #[test]
    fn limits_and_tls_pairs_are_checked_by_field() {
        settings().validate("ops.server").unwrap();
        type Change = fn(&mut ServerSettings);
        let cases: Vec<(Change, &str)> = vec![
            (|s| s.max_connections = 0, "ops.server.max_connections"),
            (
                |s| s.max_concurrent_requests = 11,
                "ops.server.max_concurrent_requests",
            ),
            (
                |s| s.header_read_timeout_ms = 0,
                "ops.server.header_read_timeout_ms",
            ),
            (|s| s.max_header_bytes = 10, "ops.server.max_header_bytes"),
            (
                |s| s.tls_cert_file = Some("/nonexistent/cert.pem".into()),
                "ops.server.tls_key_file",
            ),
            (
                |s| s.tls_key_file = Some("/nonexistent/key.pem".into()),
                "ops.server.tls_cert_file",
            ),
            (
                |s| {
                    s.tls_cert_file = Some("/nonexistent/cert.pem".into());
                    s.tls_key_file = Some("/nonexistent/key.pem".into());
                },
                "ops.server.tls_cert_file",
            ),
        ];
        for (change, field) in cases {
            let mut s = settings();
            change(&mut s);
            let err = s.validate("ops.server").unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn relative_tls_paths_follow_the_config_file() {
        let mut s = settings();
        s.tls_cert_file = Some("tls/cert.pem".into());
        s.tls_key_file = Some("/abs/key.pem".into());
        s.resolve_paths(Path::new("/etc/safeclock"));
        assert_eq!(
            s.tls_cert_file.as_deref(),
            Some(Path::new("/etc/safeclock/tls/cert.pem"))
        );
        assert_eq!(s.tls_key_file.as_deref(), Some(Path::new("/abs/key.pem")));
    }
}
