//! The acknowledgement API: list open escalations, acknowledge one, resolve one.
//!
//! Served on its own listener (`escalator.api.listen`, loopback by default), not on the ops
//! endpoint: `/metrics` and the health checks are unauthenticated and often exposed to a scraper
//! network, while this API changes who gets paged and must only be reachable by people's tools.
//! The listener is the hardened one of `safeclock_common::server` (header-read timeout,
//! connection and request limits, optional TLS: `[escalator.api.server]`).
//!
//! Every request needs `Authorization: Bearer <token>`; tokens come from configuration
//! (`escalator.api.tokens`, one per operator or tool, whose id is recorded as who acknowledged),
//! are [`Secret`]s and are compared in constant time (`safeclock_common::auth`). A peer that fails
//! authentication `auth_failure_burst` times is answered 429 with `Retry-After`, without its
//! token being checked, until its budget refills at `auth_failures_per_minute`; every failure is
//! counted in `safeclock_escalation_api_auth_failures_total{reason}`. Tokens are never logged.
//!
//! Bodies are tiny (an operator id and a note): at most [`MAX_BODY_BYTES`], read within
//! [`BODY_TIMEOUT`], so a client that trickles a body gets 408 instead of holding a request slot.
//!
//! The state belongs to the service loop (one engine per partition), so handlers send it a
//! [`Command`] and wait for the answer; the loop answers only once the change is durable in the
//! changelog and the audit log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{IntCounterVec, Registry};
use safeclock_common::auth::{AuthFailure, BearerAuth};
use safeclock_common::config::ApiSettings;
use safeclock_common::server::{self, BodyReadError, HttpServer, ServerError};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::engine::CommandError;

/// An escalation as the API shows it: ids, codes and times only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EscalationView {
    pub escalation_id: String,
    pub referral_id: String,
    pub rule_id: String,
    pub clock_id: String,
    /// `warning` or `breached`.
    pub threshold: String,
    pub severity: String,
    pub force: String,
    /// `open`, `acknowledged` or `resolved`.
    pub status: String,
    /// Highest level paged so far.
    pub level: u32,
    pub policies: Vec<String>,
    pub opened_at: String,
    pub deadline: Option<String>,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<String>,
    pub acknowledgement_expires_at: Option<String>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
    /// Receivers paged so far (triggers delivered).
    pub pages: usize,
    /// Notifications not yet delivered.
    pub pending: usize,
}

/// What the API asks of the service loop.
#[derive(Debug)]
pub enum Command {
    List {
        reply: oneshot::Sender<Vec<EscalationView>>,
    },
    Acknowledge {
        id: String,
        actor: String,
        note: String,
        reply: oneshot::Sender<Result<EscalationView, CommandError>>,
    },
    Resolve {
        id: String,
        actor: String,
        note: String,
        reply: oneshot::Sender<Result<EscalationView, CommandError>>,
    },
}

#[derive(Clone)]
struct ApiState {
    auth: Arc<BearerAuth>,
    commands: mpsc::Sender<Command>,
    auth_failures: IntCounterVec,
}

/// Largest acknowledgement or resolution body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Time a request body has to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of an acknowledgement or resolution (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    /// The person behind a shared token (an operator id, not a name).
    #[serde(default)]
    by: Option<String>,
    /// Free text for the audit log; never logged or sent to receivers.
    #[serde(default)]
    note: Option<String>,
}

const MAX_NOTE: usize = 2000;

/// The API router. `auth_failures` is `safeclock_escalation_api_auth_failures_total`.
pub fn router(
    settings: &ApiSettings,
    commands: mpsc::Sender<Command>,
    auth_failures: IntCounterVec,
) -> Router {
    let state = ApiState {
        auth: Arc::new(BearerAuth::new(
            &settings.tokens,
            settings.auth_failure_burst,
            settings.auth_failures_per_minute,
        )),
        commands,
        auth_failures,
    };
    Router::new()
        .route("/v1/escalations", get(list))
        .route("/v1/escalations/{id}/ack", post(acknowledge))
        .route("/v1/escalations/{id}/resolve", post(resolve))
        .with_state(state)
}

/// Binds the API on `settings.listen` with the hardened listener; returns the bound address
/// and the serving task.
///
/// # Errors
/// When the address cannot be bound or the listener's settings are unusable.
pub async fn bind(
    settings: &ApiSettings,
    registry: &Registry,
    auth_failures: IntCounterVec,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>), ServerError> {
    let http = HttpServer::bind(
        "escalator-api",
        settings.listen,
        &settings.server,
        "escalator.api.server",
        registry,
    )
    .await?;
    let addr = http.local_addr();
    let scheme = http.scheme();
    let app = router(settings, commands, auth_failures);
    let task = tokio::spawn(async move { Ok(http.serve(app, shutdown).await?) });
    tracing::info!(%addr, scheme, "escalation API listening (/v1/escalations)");
    Ok((addr, task))
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn boxed_problem(status: StatusCode, message: impl Into<String>) -> Box<Response> {
    Box::new(problem(status, message))
}

/// The operator id of the bearer token (compared in constant time against every token), or
/// 401, or 429 for a peer that failed too often; failures are counted by reason.
fn authenticate(state: &ApiState, request: &Request) -> Result<String, Box<Response>> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match state.auth.check(server::peer_of(request), authorization) {
        Ok(actor) => Ok(actor.to_string()),
        Err(failure) => {
            state
                .auth_failures
                .with_label_values(&[failure.reason()])
                .inc();
            Err(Box::new(unauthenticated(failure)))
        }
    }
}

fn unauthenticated(failure: AuthFailure) -> Response {
    if let Some(secs) = failure.retry_after_secs() {
        let mut r = problem(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from your address; try again in {secs} s"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    let mut r = problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn list(State(state): State<ApiState>, request: Request) -> Response {
    if let Err(r) = authenticate(&state, &request) {
        return *r;
    }
    let (reply, rx) = oneshot::channel();
    if state.commands.send(Command::List { reply }).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping");
    }
    match rx.await {
        Ok(views) => Json(serde_json::json!({ "escalations": views })).into_response(),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping"),
    }
}

fn parse_body(token_actor: &str, body: &Bytes) -> Result<(String, String), Box<Response>> {
    let b: CommandBody = if body.iter().all(u8::is_ascii_whitespace) {
        CommandBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            boxed_problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON like {{\"by\": \"op-123\", \"note\": \"...\"}}: {e}"
                ),
            )
        })?
    };
    let note = b.note.unwrap_or_default();
    if note.chars().count() > MAX_NOTE {
        return Err(boxed_problem(
            StatusCode::BAD_REQUEST,
            format!("note must be at most {MAX_NOTE} characters"),
        ));
    }
    let actor = match b.by {
        Some(by) if !by.is_empty() => {
            let ok = by.len() <= 64
                && by
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
            if !ok {
                return Err(boxed_problem(
                    StatusCode::BAD_REQUEST,
                    "by must be an operator id (letters, digits, - _ . @, up to 64)",
                ));
            }
            format!("{token_actor}/{by}")
        }
        _ => token_actor.to_string(),
    };
    Ok((actor, note))
}

async fn command(
    state: ApiState,
    id: String,
    request: Request,
    make: impl FnOnce(
        String,
        String,
        String,
        oneshot::Sender<Result<EscalationView, CommandError>>,
    ) -> Command,
) -> Response {
    let token_actor = match authenticate(&state, &request) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let (parts, body) = request.into_parts();
    let body = match server::read_body(
        body,
        parts.headers.get(header::CONTENT_LENGTH),
        MAX_BODY_BYTES,
        BODY_TIMEOUT,
    )
    .await
    {
        Ok(b) => b,
        Err(e @ BodyReadError::TooLarge(_)) => {
            return problem(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e @ BodyReadError::Timeout) => {
            return problem(StatusCode::REQUEST_TIMEOUT, e.to_string())
        }
        Err(e @ BodyReadError::Unreadable) => {
            return problem(StatusCode::BAD_REQUEST, e.to_string())
        }
    };
    let (actor, note) = match parse_body(&token_actor, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (reply, rx) = oneshot::channel();
    if state
        .commands
        .send(make(id, actor, note, reply))
        .await
        .is_err()
    {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping");
    }
    match rx.await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e @ CommandError::NotFound(_))) => problem(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e @ CommandError::Resolved(_))) => problem(StatusCode::CONFLICT, e.to_string()),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the escalator stopped before the change was durable; try again",
        ),
    }
}

async fn acknowledge(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    command(state, id, request, |id, actor, note, reply| {
        Command::Acknowledge {
            id,
            actor,
            note,
            reply,
        }
    })
    .await
}

async fn resolve(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    command(state, id, request, |id, actor, note, reply| {
        Command::Resolve {
            id,
            actor,
            note,
            reply,
        }
    })
    .await
}
