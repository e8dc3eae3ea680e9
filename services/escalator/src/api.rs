//! The acknowledgement API: list open escalations, acknowledge one, resolve one.
//!
//! Served on its own listener (`escalator.api.listen`), not on the ops endpoint: `/metrics` and
//! the health checks are unauthenticated and often exposed to a scraper network, while this API
//! changes who gets paged and must only be reachable by people's tools. Every request needs
//! `Authorization: Bearer <token>`; tokens come from configuration (`escalator.api.tokens`, one
//! per operator or tool, whose id is recorded as who acknowledged) and are compared in constant
//! time. Tokens are never logged.
//!
//! The state belongs to the service loop (one engine per partition), so handlers send it a
//! [`Command`] and wait for the answer; the loop answers only once the change is durable in the
//! changelog and the audit log.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use safeclock_common::secret::Secret;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
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
    tokens: Vec<(String, Secret)>,
    commands: mpsc::Sender<Command>,
}

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

/// The API router.
pub fn router(tokens: &BTreeMap<String, Secret>, commands: mpsc::Sender<Command>) -> Router {
    let state = ApiState {
        tokens: tokens
            .iter()
            .map(|(actor, t)| (actor.clone(), t.clone()))
            .collect(),
        commands,
    };
    Router::new()
        .route("/v1/escalations", get(list))
        .route("/v1/escalations/{id}/ack", post(acknowledge))
        .route("/v1/escalations/{id}/resolve", post(resolve))
        .with_state(state)
}

/// Binds the API on `listen`; returns the bound address and the serving task.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(
    listen: SocketAddr,
    tokens: &BTreeMap<String, Secret>,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the escalation API on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let app = router(tokens, commands);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|e| anyhow::anyhow!("escalation API failed: {e}"))
    });
    tracing::info!(%addr, "escalation API listening (/v1/escalations)");
    Ok((addr, task))
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn boxed_problem(status: StatusCode, message: impl Into<String>) -> Box<Response> {
    Box::new(problem(status, message))
}

/// The operator id of the bearer token, compared in constant time against every token.
fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let unauthorized = || {
        let mut r = problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Box::new(r)
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?
        .trim()
        .as_bytes();
    let mut found: Option<&str> = None;
    for (actor, token) in &state.tokens {
        // Check every token, whatever matched, so timing says nothing about which one did.
        if bool::from(token.expose().as_bytes().ct_eq(presented)) {
            found = Some(actor);
        }
    }
    found.map(str::to_string).ok_or_else(unauthorized)
}

async fn list(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&state, &headers) {
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
    headers: HeaderMap,
    id: String,
    body: Bytes,
    make: impl FnOnce(
        String,
        String,
        String,
        oneshot::Sender<Result<EscalationView, CommandError>>,
    ) -> Command,
) -> Response {
    let token_actor = match authenticate(&state, &headers) {
        Ok(a) => a,
        Err(r) => return *r,
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    command(state, headers, id, body, |id, actor, note, reply| {
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    command(state, headers, id, body, |id, actor, note, reply| {
        Command::Resolve {
            id,
            actor,
            note,
            reply,
        }
    })
    .await
}
