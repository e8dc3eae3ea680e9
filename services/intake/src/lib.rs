//! The intake gateway: force systems that cannot write to Kafka `POST /v1/events`.
//!
//! # Contract (docs/intake.md, `openapi.json`)
//! - **Served by the hardened listener** of `safeclock_common::server`: header-read timeout,
//!   connection and request limits, optional TLS (`[intake.server]`). Loopback by default.
//! - **Auth**: `Authorization: Bearer <token>`; tokens per client in `[intake.tokens]`, compared
//!   in constant time. 401 otherwise, and 429 with `Retry-After` for a peer that failed too often
//!   (`safeclock_common::auth`); every failure is counted by reason.
//! - **Shape**: one event (a JSON object) or a batch (an array), proto3 JSON per
//!   `proto/safeclock/v1/referral.proto`. Bodies over `intake.max_body_bytes` get 413 unread; a
//!   body that does not arrive within `intake.request_timeout_ms` gets 408. A batch is counted
//!   while it is split, before any event is decoded, and nesting is bounded (`body.rs`), so a
//!   request costs at most a small multiple of `max_body_bytes`.
//! - **Validation is all-or-nothing per request**: every event is decoded and validated by the
//!   same code the consumers use (`safeclock_common::event`) plus the `[validation]`
//!   plausibility checks; if any event is refused the answer is 400 with one error per refused
//!   event (its index, id, field path and reason) and *nothing* is produced. The sender fixes the
//!   batch and sends all of it again.
//! - **202 means stored**: every accepted event is produced (key: referral id; producer
//!   `acks=all`, idempotent) and the answer waits for the broker's acknowledgement of every one.
//! - **503 means "not known to be stored"**: when the broker does not acknowledge within
//!   `intake.delivery_timeout_ms` (librdkafka `message.timeout.ms`), the answer is 503 with
//!   `Retry-After`. Some events of such a request may be stored anyway; sending the request again
//!   is safe because of the next point.
//! - **Idempotent on (client, event id)**: pairs acknowledged recently (the last
//!   `intake.dedup_window`) are answered `duplicate` without producing again, and every consumer
//!   de-duplicates by event id regardless, so a retried request never counts twice. The first
//!   version of an event wins. Keyed by client too, so one client cannot make another's next
//!   event a "duplicate" by posting its id first.
//!
//! Nothing is ever answered 202 and then dropped: the only path to 202 is through the broker's
//! acknowledgement.

pub mod body;
pub mod metrics;
mod window;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use safeclock_common::auth::{AuthFailure, BearerAuth};
use safeclock_common::config::Settings;
use safeclock_common::event::Plausibility;
use safeclock_common::kafka::{self, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::{Readiness, ReadinessHandle};
use safeclock_common::server::{self, BodyReadError, HttpServer};
use safeclock_common::service::ServiceDeps;
use safeclock_common::time::SharedTime;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{BodyError, FieldError};
use crate::metrics::IntakeMetrics;
use crate::window::RecentIds;

/// The service name in logs, metrics and dead-letter headers.
pub const SERVICE: &str = "intake";

/// The OpenAPI document of this API, served at `/openapi.json` (kept in the repository as
/// `services/intake/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Header naming the intake client that posted a record.
pub const CLIENT_HEADER: &str = "safeclock.intake.client";

/// What a request handler needs.
struct Intake {
    /// Replaced when librdkafka reports a fatal error (e.g. an idempotence sequence lost
    /// across a long outage); requests clone the current one.
    producer: RwLock<FutureProducer>,
    /// When the producer was last replaced after a failed delivery (see [`Intake::renew_producer`]).
    renewed: Mutex<Instant>,
    settings: Arc<Settings>,
    topic: String,
    /// Client tokens, and the limit on failed attempts per peer.
    auth: BearerAuth,
    plausibility: Plausibility,
    /// (client, event id) pairs acknowledged recently: answered `duplicate` without producing
    /// again.
    recent: Mutex<RecentIds>,
    metrics: IntakeMetrics,
    consumer_metrics: ConsumerMetrics,
    readiness: Readiness,
    time: SharedTime,
}

/// The producer of intake: the shared settings (`acks=all`, idempotent, `linger.ms` 1: every
/// request waits for its own events' acknowledgement, and with 16 clients in flight the accepted
/// rate was 0.26 × the raw produce rate at 5 ms, 0.57 × at 1 ms, docs/benchmarks.md), with
/// `message.timeout.ms` bounded unless the operator set it, so a broker outage turns into a 503
/// within a known time instead of a request hanging for librdkafka's default five minutes.
///
/// # Errors
/// When librdkafka refuses the configuration.
pub fn producer(settings: &Settings) -> anyhow::Result<FutureProducer> {
    let mut s = settings.clone();
    let own = &mut s.kafka.producer_properties;
    own.entry("message.timeout.ms".into())
        .or_insert_with(|| settings.intake.delivery_timeout_ms.to_string());
    kafka::producer(&s)
}

/// Runs intake on `intake.listen` until `shutdown`.
///
/// # Errors
/// When no client token is configured, the address cannot be bound, the listener's settings
/// are unusable, or the producer cannot be created.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listen = deps.settings.intake.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind intake on {listen}: {e}"))?;
    serve(listener, deps, consumer_metrics, shutdown).await
}

/// Serves intake on an already bound `listener` (tests bind port 0).
///
/// # Errors
/// As [`run`].
pub async fn serve(
    listener: TcpListener,
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let auth = BearerAuth::new(
        &settings.intake.tokens,
        settings.intake.auth_failure_burst,
        settings.intake.auth_failures_per_minute,
    );
    anyhow::ensure!(
        !auth.is_empty(),
        "invalid configuration: `intake.tokens` is empty; give each client a token \
         (e.g. SAFECLOCK__INTAKE__TOKENS__NICHE-RMS=<at least 16 characters>) and a grant \
         ([intake.clients.niche-rms] forces = [\"nottinghamshire\"])"
    );
    settings
        .intake
        .validate_clients(&settings.forces)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let http = HttpServer::from_listener(
        SERVICE,
        listener,
        &settings.intake.server,
        "intake.server",
        &deps.registry,
    )?;
    let metrics = IntakeMetrics::register(&deps.registry)?;
    let ready = deps.readiness.component(SERVICE);
    let intake = Arc::new(Intake {
        producer: RwLock::new(producer(&settings)?),
        renewed: Mutex::new(Instant::now()),
        topic: settings.topic(Topic::ReferralEvents),
        auth,
        plausibility: Plausibility::new(&settings),
        recent: Mutex::new(RecentIds::new(settings.intake.dedup_window)),
        metrics,
        consumer_metrics,
        readiness: deps.readiness.clone(),
        time: deps.time.clone(),
        settings,
    });
    let probe = tokio::spawn(probe_broker(intake.clone(), ready, shutdown.clone()));
    let addr = http.local_addr();
    let scheme = http.scheme();
    tracing::info!(%addr, scheme, clients = intake.auth.len(), "intake listening (POST /v1/events)");
    let served = http
        .serve(router_for(intake.clone()), shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("intake HTTP server failed: {e}"));
    probe.abort();
    // Every 202 already waited for its acknowledgement; this only tidies up.
    let producer = intake.current_producer();
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    served
}

impl Intake {
    /// Replaces the producer after a failed delivery (at most once a second). The old one is
    /// dropped (its queue purged) once the requests holding it have answered 503, so nothing it
    /// still holds is sent after the outage under its old producer id; the new one starts a
    /// fresh idempotent session when the broker is back.
    fn renew_producer(&self) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        if renewed.elapsed() < Duration::from_secs(1) {
            return;
        }
        match producer(&self.settings) {
            Ok(p) => {
                *self.producer.write().unwrap_or_else(|p| p.into_inner()) = p;
                *renewed = Instant::now();
                tracing::info!("intake producer renewed after a failed delivery");
            }
            Err(e) => tracing::error!(error.message = %e, "cannot create a new producer"),
        }
    }

    fn current_producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Marks intake ready while the broker answers metadata requests for the input topic, and
/// replaces the producer if librdkafka declares it unusable.
async fn probe_broker(intake: Arc<Intake>, ready: ReadinessHandle, shutdown: CancellationToken) {
    loop {
        let producer = intake.current_producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::error!(error.code = ?code, error.message = %reason, "intake producer failed fatally; creating a new one");
            match crate::producer(&intake.settings) {
                Ok(p) => *intake.producer.write().unwrap_or_else(|p| p.into_inner()) = p,
                Err(e) => tracing::error!(error.message = %e, "cannot create a new producer"),
            }
        }
        let topic = intake.topic.clone();
        let reachable = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        ready.set(reachable);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

fn router_for(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(intake)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn readyz(State(intake): State<Arc<Intake>>) -> impl IntoResponse {
    if intake.readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", intake.readiness.not_ready().join(", ")),
        )
    }
}

/// An error answer: `{"error": code, "message": ..., "errors": [...]}`.
#[derive(Serialize)]
struct Problem {
    error: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
}

fn problem(status: StatusCode, error: &'static str, message: impl Into<String>) -> Response {
    problem_with(status, error, message, Vec::new())
}

fn problem_with(
    status: StatusCode,
    error: &'static str,
    message: impl Into<String>,
    errors: Vec<FieldError>,
) -> Response {
    let body = Problem {
        error,
        message: message.into(),
        errors,
    };
    (status, axum::Json(body)).into_response()
}

/// Whether the client's grant covers the event's force and source system; if not, the reason
/// goes to `forbidden`. A client without a grant (settings changed in code after validation)
/// is granted nothing.
fn permitted(
    grant: Option<&safeclock_common::config::IntakeClientGrant>,
    event: &safeclock_common::schema::v1::ReferralEvent,
    index: usize,
    forbidden: &mut Vec<FieldError>,
) -> bool {
    let refusal = |field: &str, reason: &'static str, message: &str| FieldError {
        index: Some(index),
        event_id: Some(event.event_id.clone()),
        field: field.to_string(),
        reason,
        message: message.to_string(),
    };
    if !grant.is_some_and(|g| g.permits_force(&event.force_id)) {
        forbidden.push(refusal(
            "forceId",
            "force_not_granted",
            "field `forceId` names a force this token may not send for",
        ));
        return false;
    }
    if !grant.is_some_and(|g| g.permits_source_system(&event.source_system)) {
        forbidden.push(refusal(
            "sourceSystem",
            "source_system_not_granted",
            "field `sourceSystem` names a source system this token may not send as",
        ));
        return false;
    }
    true
}

/// One event's result in a 202 answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventResult {
    index: usize,
    event_id: String,
    /// `accepted` (stored now) or `duplicate` (stored before; not produced again).
    status: &'static str,
}

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    duplicates: usize,
    events: Vec<EventResult>,
}

async fn post_events(State(intake): State<Arc<Intake>>, request: Request) -> Response {
    let started = Instant::now();
    let peer = server::peer_of(&request);
    let (parts, body) = request.into_parts();
    let response = intake.handle(peer, &parts.headers, body).await;
    let code = response.status().as_str().to_string();
    intake.metrics.requests.with_label_values(&[&code]).inc();
    intake
        .metrics
        .seconds
        .with_label_values(&[&code])
        .observe(started.elapsed().as_secs_f64());
    response
}

impl Intake {
    async fn handle(&self, peer: Option<SocketAddr>, headers: &HeaderMap, body: Body) -> Response {
        let limits = &self.settings.intake;
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let client = match self.auth.check(peer, authorization) {
            Ok(client) => client,
            Err(failure) => return self.unauthenticated(failure),
        };
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the events as `Content-Type: application/json`",
            );
        }
        let content_length = headers.get(header::CONTENT_LENGTH);
        let read = server::read_body(
            body,
            content_length,
            limits.max_body_bytes,
            limits.request_timeout(),
        );
        let bytes = match read.await {
            Ok(bytes) => bytes,
            Err(BodyReadError::TooLarge(max)) => {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body is over the {max}-byte limit: send fewer events per request"),
                )
            }
            Err(BodyReadError::Timeout) => {
                return problem(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the body did not arrive in time",
                )
            }
            Err(BodyReadError::Unreadable) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "the body could not be read",
                )
            }
        };
        let parsed = match body::parse(&bytes, limits.max_batch_events) {
            Ok(p) => p,
            Err(BodyError::TooManyEvents { max }) => {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_many_events",
                    format!(
                    "the batch has more than {max} events; at most {max} are accepted per request"
                ),
                )
            }
            Err(BodyError::Invalid(e)) => {
                self.count_refused(std::slice::from_ref(&e));
                return problem_with(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    e.message.clone(),
                    vec![e],
                );
            }
        };
        let now = self.time.now();
        let grant = self.settings.intake.clients.get(client);
        let mut valid = Vec::with_capacity(parsed.events.len());
        let mut errors = Vec::new();
        let mut forbidden = Vec::new();
        for (index, result) in parsed.events.into_iter().enumerate() {
            match result {
                Ok(v) if !permitted(grant, &v.event, index, &mut forbidden) => {}
                Ok(v) => match self.plausibility.check(&v.event, now) {
                    Ok(()) => valid.push((index, v)),
                    Err(r) => errors.push(FieldError {
                        index: Some(index),
                        event_id: Some(v.event.event_id.clone()),
                        field: body::rejection_field(&r),
                        reason: r.reason(),
                        message: r.to_string(),
                    }),
                },
                Err(e) => errors.push(e),
            }
        }
        if !forbidden.is_empty() {
            self.metrics
                .events
                .with_label_values(&["forbidden"])
                .inc_by((forbidden.len() + errors.len() + valid.len()) as u64);
            tracing::warn!(
                client,
                forbidden = forbidden.len(),
                events = forbidden.len() + errors.len() + valid.len(),
                "request refused: events outside the client's grant (nothing produced)"
            );
            let message = format!(
                "{} event(s) are for a force or source system this token is not granted \
                 (intake.clients.{client}); nothing was stored",
                forbidden.len()
            );
            return problem_with(
                StatusCode::FORBIDDEN,
                "forbidden_events",
                message,
                forbidden,
            );
        }
        if !errors.is_empty() {
            self.count_refused(&errors);
            tracing::info!(
                client,
                refused = errors.len(),
                events = valid.len() + errors.len(),
                "request refused: invalid events (nothing produced)"
            );
            let message = format!(
                "{} of {} event(s) refused; nothing was stored: fix them and send the request again",
                errors.len(),
                valid.len() + errors.len()
            );
            return problem_with(StatusCode::BAD_REQUEST, "invalid_events", message, errors);
        }
        self.produce(client, valid).await
    }

    /// 401, or 429 with `Retry-After` for a peer that failed too often; counted by reason.
    fn unauthenticated(&self, failure: AuthFailure) -> Response {
        self.metrics
            .auth_failures
            .with_label_values(&[failure.reason()])
            .inc();
        if let Some(secs) = failure.retry_after_secs() {
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_auth_failures",
                format!("too many failed authentications from your address; try again in {secs} s"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return r;
        }
        let mut r = problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>` with a token configured for your system",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"safeclock-intake\""),
        );
        r
    }

    fn count_refused(&self, errors: &[FieldError]) {
        for e in errors {
            self.consumer_metrics
                .invalid
                .with_label_values(&[SERVICE, e.reason])
                .inc();
        }
        self.metrics
            .events
            .with_label_values(&["refused"])
            .inc_by(errors.len() as u64);
    }

    /// Produces every event not already accepted, and answers 202 once the broker has
    /// acknowledged all of them, 503 otherwise.
    async fn produce(&self, client: &str, valid: Vec<(usize, body::Valid)>) -> Response {
        let mut results = Vec::with_capacity(valid.len());
        let mut to_send = Vec::new();
        {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let mut in_request = std::collections::HashSet::with_capacity(valid.len());
            for (index, v) in valid {
                let id = &v.event.event_id;
                let duplicate =
                    recent.contains(client, id) || !in_request.insert(id.as_str().to_owned());
                results.push(EventResult {
                    index,
                    event_id: id.clone(),
                    status: if duplicate { "duplicate" } else { "accepted" },
                });
                if !duplicate {
                    to_send.push(v);
                }
            }
        }
        let producer = self.current_producer();
        let deliver = async {
            let mut deliveries = Vec::with_capacity(to_send.len());
            for v in &to_send {
                let headers = OwnedHeaders::new().insert(Header {
                    key: CLIENT_HEADER,
                    value: Some(client),
                });
                let record = FutureRecord::<str, [u8]>::to(&self.topic)
                    .key(&v.event.referral_id)
                    .payload(&v.payload)
                    .headers(headers);
                deliveries.push(kafka::enqueue(&producer, record).await?);
            }
            kafka::await_deliveries(deliveries).await
        };
        // librdkafka times each record out after delivery_timeout; the margin covers enqueueing
        // behind a full local queue.
        let bound = self.settings.intake.delivery_timeout() + Duration::from_secs(1);
        let outcome = tokio::time::timeout(bound, deliver).await;
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no acknowledgement within {bound:?}")),
        };
        if let Some(reason) = failure {
            drop(producer);
            self.renew_producer();
            self.metrics
                .events
                .with_label_values(&["unavailable"])
                .inc_by(to_send.len() as u64);
            tracing::warn!(client, events = to_send.len(), error.message = %reason, "broker did not acknowledge; answered 503");
            let mut r = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "the events could not be stored now; send the same request again later \
                 (repeats are recognised by event id)",
            );
            let retry = self.settings.intake.retry_after_secs.to_string();
            if let Ok(v) = HeaderValue::from_str(&retry) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            for v in &to_send {
                recent.insert(client, &v.event.event_id);
            }
        }
        let accepted = to_send.len();
        let duplicates = results.len() - accepted;
        self.metrics
            .events
            .with_label_values(&["accepted"])
            .inc_by(accepted as u64);
        self.metrics
            .events
            .with_label_values(&["duplicate"])
            .inc_by(duplicates as u64);
        tracing::debug!(client, accepted, duplicates, "events stored");
        (
            StatusCode::ACCEPTED,
            axum::Json(Accepted {
                accepted,
                duplicates,
                events: results,
            }),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_document_is_the_file_in_the_repository() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let file = std::fs::read_to_string(path).unwrap();
        assert_eq!(OPENAPI, file);
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert!(doc["paths"]["/v1/events"]["post"].is_object());
    }
}
