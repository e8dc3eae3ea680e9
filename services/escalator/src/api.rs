//! The acknowledgement API: list open escalations, acknowledge one, resolve one.
//!
//! Served on its own listener (`escalator.api.listen`, loopback by default), not on the ops
//! endpoint: `/metrics` and the health checks are unauthenticated and often exposed to a scraper
//! network, while this API changes who gets paged and must only be reachable by people's tools.
//! The listener is the hardened one of `safeclock_common::server` (header-read timeout,
//! connection and request limits, optional TLS: `[escalator.api.server]`).
//!
//! Every request needs `Authorization: Bearer <token>`; tokens come from configuration
//! (`escalator.api.tokens`, one per operator or tool, whose id is recorded as who acknowledged,
//! and `escalator.api.operators`, what each may do: scopes `read`, `acknowledge`, `resolve`, and
//! the forces whose escalations it sees and acts on; anything else is 403 and audited),
//! are [`Secret`]s and are compared in constant time (`safeclock_common::auth`). A peer that fails
//! authentication `auth_failure_burst` times is answered 429 with `Retry-After`, without its
//! token being checked, until its budget refills at `auth_failures_per_minute`; every failure is
//! counted in `safeclock_escalation_api_auth_failures_total{reason}`. Tokens are never logged.
//!
//! Bodies are tiny (a note code at most): at most [`MAX_BODY_BYTES`], read within
//! [`BODY_TIMEOUT`], so a client that trickles a body gets 408 instead of holding a request slot.
//!
//! The state belongs to the service loop (one engine per partition), so handlers send it a
//! [`Command`] and wait for the answer; the loop answers only once the change is durable in the
//! changelog and the audit log.

use std::collections::BTreeMap;
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
use safeclock_common::config::{ApiScope, ApiSettings, OperatorGrant};
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

/// What the API asks of the service loop. Every command carries the operator (the token's id)
/// and the forces the token is granted; the loop acts only within them and writes an audit
/// record of each.
#[derive(Debug)]
pub enum Command {
    List {
        actor: String,
        forces: Vec<String>,
        reply: oneshot::Sender<Vec<EscalationView>>,
    },
    Acknowledge {
        id: String,
        actor: String,
        forces: Vec<String>,
        note: String,
        reply: oneshot::Sender<Result<EscalationView, CommandError>>,
    },
    Resolve {
        id: String,
        actor: String,
        forces: Vec<String>,
        note: String,
        reply: oneshot::Sender<Result<EscalationView, CommandError>>,
    },
    /// A request refused for want of a scope: only audited.
    Denied {
        actor: String,
        id: Option<String>,
        reason: &'static str,
    },
}

/// The `reason` of a request denied because the token lacks the scope (audit and metric).
pub const SCOPE_NOT_GRANTED: &str = "scope_not_granted";
/// The `reason` of a request denied because the escalation's force is not the token's.
pub const FORCE_NOT_GRANTED: &str = "force_not_granted";

#[derive(Clone)]
struct ApiState {
    auth: Arc<BearerAuth>,
    operators: Arc<BTreeMap<String, OperatorGrant>>,
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
    /// Refused: who acted is the token's operator id, never a claim in the body.
    #[serde(default)]
    by: Option<serde::de::IgnoredAny>,
    /// A code for the audit log (`officer_attending`, `allocated`, `duplicate`): never free
    /// text, which could carry a name into a log kept for years; never logged or sent to
    /// receivers.
    #[serde(default)]
    note: Option<String>,
}

/// The longest note code.
const MAX_NOTE: usize = 64;

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
        operators: Arc::new(settings.operators.clone()),
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

/// Who is asking and what they may do.
struct Operator {
    id: String,
    forces: Vec<String>,
}

/// The operator of the bearer token (compared in constant time against every token) if it is
/// granted `scope`; else 401, 429 for a peer that failed too often, or 403 (audited) for a
/// token without the scope. Failures are counted by reason.
fn authorize(
    state: &ApiState,
    request: &Request,
    scope: ApiScope,
    id: Option<&str>,
) -> Result<Operator, Box<Response>> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match state.auth.check(server::peer_of(request), authorization) {
        Ok(actor) => {
            // Validated at start: every token has a grant; a missing one grants nothing.
            let grant = state.operators.get(actor);
            if let Some(grant) = grant.filter(|g| g.allows(scope)) {
                return Ok(Operator {
                    id: actor.to_string(),
                    forces: grant.forces.clone(),
                });
            }
            state
                .auth_failures
                .with_label_values(&[SCOPE_NOT_GRANTED])
                .inc();
            let _ = state.commands.try_send(Command::Denied {
                actor: actor.to_string(),
                id: id.map(str::to_string),
                reason: SCOPE_NOT_GRANTED,
            });
            Err(boxed_problem(
                StatusCode::FORBIDDEN,
                format!(
                    "this token is not granted `{}` (escalator.api.operators.{actor}.scopes)",
                    scope.as_str()
                ),
            ))
        }
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
    let operator = match authorize(&state, &request, ApiScope::Read, None) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let (reply, rx) = oneshot::channel();
    let command = Command::List {
        actor: operator.id,
        forces: operator.forces,
        reply,
    };
    if state.commands.send(command).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping");
    }
    match rx.await {
        Ok(views) => Json(serde_json::json!({ "escalations": views })).into_response(),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping"),
    }
}

fn parse_note(body: &Bytes) -> Result<String, Box<Response>> {
    let b: CommandBody = if body.iter().all(u8::is_ascii_whitespace) {
        CommandBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            boxed_problem(
                StatusCode::BAD_REQUEST,
                format!("the body must be JSON like {{\"note\": \"officer_attending\"}}: {e}"),
            )
        })?
    };
    if b.by.is_some() {
        return Err(boxed_problem(
            StatusCode::BAD_REQUEST,
            "`by` is not accepted: who acted is the operator id of your token \
             (give each person a token of their own)",
        ));
    }
    let note = b.note.unwrap_or_default();
    if note.len() > MAX_NOTE || !(note.is_empty() || safeclock_common::erasure::is_code(&note)) {
        // The value is never quoted: it is what may hold a name.
        return Err(boxed_problem(
            StatusCode::BAD_REQUEST,
            format!(
                "note must be a code of at most {MAX_NOTE} characters (lower-case letters, digits, - _ and ., e.g. officer_attending), not free text"
            ),
        ));
    }
    Ok(note)
}

/// What an acknowledgement or resolution asks of the loop.
struct CommandRequest {
    id: String,
    actor: String,
    forces: Vec<String>,
    note: String,
    reply: oneshot::Sender<Result<EscalationView, CommandError>>,
}

async fn command(
    state: ApiState,
    id: String,
    request: Request,
    scope: ApiScope,
    make: impl FnOnce(CommandRequest) -> Command,
) -> Response {
    let operator = match authorize(&state, &request, scope, Some(&id)) {
        Ok(o) => o,
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
    let note = match parse_note(&body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (reply, rx) = oneshot::channel();
    let request = CommandRequest {
        id,
        actor: operator.id,
        forces: operator.forces,
        note,
        reply,
    };
    if state.commands.send(make(request)).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the escalator is stopping");
    }
    match rx.await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e @ CommandError::NotFound(_))) => problem(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e @ CommandError::Resolved(_))) => problem(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ CommandError::ForceNotGranted(_))) => {
            state
                .auth_failures
                .with_label_values(&[FORCE_NOT_GRANTED])
                .inc();
            problem(StatusCode::FORBIDDEN, e.to_string())
        }
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
    command(state, id, request, ApiScope::Acknowledge, |r| {
        Command::Acknowledge {
            id: r.id,
            actor: r.actor,
            forces: r.forces,
            note: r.note,
            reply: r.reply,
        }
    })
    .await
}

async fn resolve(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    command(state, id, request, ApiScope::Resolve, |r| {
        Command::Resolve {
            id: r.id,
            actor: r.actor,
            forces: r.forces,
            note: r.note,
            reply: r.reply,
        }
    })
    .await
}
