//! Where notifications go: a log line, a signed webhook, PagerDuty Events API v2, Alertmanager
//! API v2, or email over SMTP.
//!
//! Each receiver makes exactly **one attempt** per call and says whether a failure is worth
//! retrying; retries, backoff, the circuit breaker, the rate limit and the fallback are the
//! delivery layer's job (`delivery.rs`), the same for every kind.
//!
//! URLs, routing keys, HMAC secrets and SMTP passwords are never logged: errors are built with
//! `reqwest::Error::without_url`, and receivers are named by their configured name.
//!
//! HTTP receivers **follow no redirects**: a 3xx answer is a permanent failure of the attempt
//! ("redirects are not followed"), so the signed body, its signature and a PagerDuty routing key
//! only ever go to the configured address. The configuration refuses `http://` URLs except to a
//! loopback address (or with `allow_http` for a trusted private network), an empty HMAC secret,
//! and an SMTP password without TLS (`config.rs`).
//!
//! **What a receiver sees is its payload policy** (`payload`, [`redact`]): by default codes,
//! times and the opaque escalation id, never the referral id, because pagers, mailboxes and
//! webhooks are often run by third parties; a force that allows a receiver the referral id says
//! `payload = "referral"`. An acknowledgement's free-text note stays in the audit log and is
//! never sent to a receiver.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use safeclock_common::config::{
    Payload, ReceiverKind, ReceiverSettings, SmtpTls, PAGERDUTY_EVENTS_URL,
};
use safeclock_common::event::transition_label;
use safeclock_common::schema::v1::{NotificationKind, SlaEvent, SlaTransition};
use safeclock_common::schema::{enum_label, to_jiff};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::engine::{kind_label, Job};

/// Header carrying the signature of a webhook body: `sha256=<hex>` of HMAC-SHA256 over
/// `"{timestamp}.{body}"` with the receiver's secret.
pub const SIGNATURE_HEADER: &str = "x-safeclock-signature";
/// Header carrying the unix time (seconds) the signature was made; receivers should refuse old
/// ones to stop replays.
pub const TIMESTAMP_HEADER: &str = "x-safeclock-timestamp";

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    /// Whether trying again may help (timeouts, connection errors, 408, 429, 5xx).
    pub retryable: bool,
    /// In words, with no URL or secret.
    pub message: String,
}

impl AttemptError {
    fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }
}

/// A one-line summary: codes, and the referral id when the event carries one (see [`redact`]).
pub fn summary(event: &SlaEvent) -> String {
    let labels = event.labels.clone().unwrap_or_default();
    let deadline = event
        .deadline
        .as_ref()
        .and_then(to_jiff)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let referral = if event.referral_id.is_empty() {
        String::new()
    } else {
        format!(" referral {}", event.referral_id)
    };
    format!(
        "{} {} ({}){referral} force {} category {} risk {} deadline {}",
        transition_label(event.transition()).to_uppercase(),
        event.rule_id,
        event.rule_title,
        labels.force_id,
        labels.category,
        labels.risk,
        deadline
    )
}

/// The job as a receiver with `payload` may see it. `codes` drops everything that names or
/// points at the referral: its id, the clock id and instance (a reference such as a device or
/// suspect), and the id of the source system's event. The escalation id stays: an opaque
/// reference that the acknowledgement API resolves for those allowed to see it.
pub fn redact(job: &Job, payload: Payload) -> Cow<'_, Job> {
    match payload {
        Payload::Referral => Cow::Borrowed(job),
        Payload::Codes => {
            let mut job = job.clone();
            let e = &mut job.event;
            e.referral_id.clear();
            e.clock_id.clear();
            e.instance.clear();
            e.cause_event_id.clear();
            Cow::Owned(job)
        }
    }
}

fn severity_label(event: &SlaEvent) -> String {
    enum_label(event.severity().as_str_name(), "SEVERITY_")
}

/// The values a webhook template can use (see `config::TEMPLATE_FIELDS`).
pub fn template_context(job: &Job) -> BTreeMap<&'static str, Value> {
    let e = &job.event;
    let labels = e.labels.clone().unwrap_or_default();
    let p = &job.pending;
    let deadline = e
        .deadline
        .as_ref()
        .and_then(to_jiff)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let status = match p.kind() {
        NotificationKind::Resolve => "resolved",
        NotificationKind::Acknowledge => "acknowledged",
        _ => "firing",
    };
    BTreeMap::from([
        ("escalation_id", json!(job.escalation_id)),
        ("dedup_key", json!(p.dedup_key)),
        ("delivery_id", json!(p.delivery_id)),
        ("notification", json!(kind_label(p.kind()))),
        ("receiver", json!(p.receiver)),
        ("level", json!(p.level)),
        ("repeat", json!(p.repeat)),
        ("policy", json!(p.policy)),
        ("summary", json!(summary(e))),
        ("referral_id", json!(e.referral_id)),
        ("rule_id", json!(e.rule_id)),
        ("rule_title", json!(e.rule_title)),
        ("transition", json!(transition_label(e.transition()))),
        ("severity", json!(severity_label(e))),
        ("force", json!(labels.force_id)),
        ("area", json!(labels.area)),
        ("category", json!(labels.category)),
        ("risk", json!(labels.risk)),
        ("team", json!(labels.team)),
        ("deadline", json!(deadline)),
        ("status", json!(status)),
        ("actor", json!(job.actor)),
        ("sla_event", serde_json::to_value(e).unwrap_or(Value::Null)),
    ])
}

/// Fills `{{field}}` placeholders with JSON values. Unknown names become `null` (the
/// configuration refuses them before this runs).
pub fn render_template(template: &str, ctx: &BTreeMap<&'static str, Value>) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        out.push_str(&ctx.get(name).unwrap_or(&Value::Null).to_string());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The default webhook body.
pub fn webhook_body(job: &Job) -> Value {
    let p = &job.pending;
    json!({
        "version": "2",
        "escalationId": job.escalation_id,
        "dedupKey": p.dedup_key,
        "deliveryId": p.delivery_id,
        "notification": kind_label(p.kind()),
        "receiver": p.receiver,
        "level": p.level,
        "repeat": p.repeat,
        "policy": p.policy,
        "fallbackFor": p.fallback_for,
        "actor": job.actor,
        "resolution": job.resolution,
        "summary": summary(&job.event),
        "slaEvent": job.event,
    })
}

/// HMAC-SHA256 over `"{timestamp}.{body}"`, hex, prefixed `sha256=`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + bytes.len() * 2);
    hex.push_str("sha256=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// A configured receiver, ready to make attempts.
pub struct Receiver {
    pub settings: ReceiverSettings,
    http: reqwest::Client,
    /// Where its HTTP notifications go, parsed once: parsing it again for every notification
    /// took a tenth of a delivery's time. An address that does not parse is kept as it is and
    /// fails each attempt as before.
    target: Result<reqwest::Url, String>,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// # Errors
    /// When the HTTP client or SMTP transport cannot be built.
    pub fn new(settings: ReceiverSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        // No redirects: a 3xx would otherwise carry the signed body, or the PagerDuty routing
        // key, to whatever address the answer names. It is a failed attempt instead.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(settings.concurrency.max(1))
            .user_agent(concat!("safeclock/", env!("CARGO_PKG_VERSION")))
            .build()?;
        if settings.allow_http
            && settings
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("http://"))
        {
            tracing::warn!(
                receiver = %settings.name,
                "allow_http: notifications to this receiver cross the network unencrypted"
            );
        }
        let smtp = if settings.kind == ReceiverKind::Email {
            let host = settings.smtp_host.clone().unwrap_or_default();
            let mut b = match settings.smtp_tls {
                SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host),
                SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host)
                    .map_err(|e| anyhow::anyhow!("email receiver {}: {e}", settings.name))?,
                SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host)
                    .map_err(|e| anyhow::anyhow!("email receiver {}: {e}", settings.name))?,
            };
            if let Some(port) = settings.smtp_port {
                b = b.port(port);
            }
            if let (Some(u), Some(p)) = (&settings.username, &settings.password) {
                b = b.credentials(Credentials::new(u.clone(), p.clone()));
            }
            Some(b.timeout(Some(timeout)).build())
        } else {
            None
        };
        let target = match settings.kind {
            ReceiverKind::Pagerduty => settings
                .url
                .clone()
                .unwrap_or_else(|| PAGERDUTY_EVENTS_URL.to_string()),
            ReceiverKind::Alertmanager => format!(
                "{}/api/v2/alerts",
                settings
                    .url
                    .as_deref()
                    .unwrap_or_default()
                    .trim_end_matches('/')
            ),
            _ => settings.url.clone().unwrap_or_default(),
        };
        let target = reqwest::Url::parse(&target).map_err(|_| target);
        Ok(Self {
            settings,
            http,
            target,
            smtp,
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Makes one attempt to deliver `job`.
    ///
    /// # Errors
    /// [`AttemptError`] saying whether a retry may help.
    pub async fn attempt(&self, job: &Job, now: SendTime) -> Result<(), AttemptError> {
        let job = redact(job, self.settings.payload());
        let job = job.as_ref();
        match self.settings.kind {
            ReceiverKind::Log => {
                log_line(job);
                Ok(())
            }
            ReceiverKind::Webhook => self.webhook(job, now).await,
            ReceiverKind::Pagerduty => self.pagerduty(job).await,
            ReceiverKind::Alertmanager => self.alertmanager(job, now).await,
            ReceiverKind::Email => self.email(job).await,
        }
    }

    async fn post(&self, body: Vec<u8>, headers: &[(&str, String)]) -> Result<(), AttemptError> {
        let req = match &self.target {
            Ok(url) => self.http.post(url.clone()),
            Err(unparsed) => self.http.post(unparsed.as_str()),
        };
        let mut req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let response = req.send().await.map_err(|e| {
            let e = e.without_url();
            if e.is_timeout() {
                AttemptError::retryable(format!("no answer within {} ms", self.settings.timeout_ms))
            } else if e.is_connect() {
                AttemptError::retryable(format!("cannot connect: {e}"))
            } else {
                AttemptError::retryable(e.to_string())
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            // Never followed, and the target is not logged (it may carry a token).
            return Err(AttemptError::permanent(format!(
                "HTTP {status}: redirects are not followed, so nothing was sent to the address it \
                 names; configure the receiver's final URL"
            )));
        }
        let retryable = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(AttemptError {
            retryable,
            message: format!("HTTP {status}"),
        })
    }

    async fn webhook(&self, job: &Job, now: SendTime) -> Result<(), AttemptError> {
        let body = match &self.settings.template {
            Some(t) => render_template(t, &template_context(job)).into_bytes(),
            None => serde_json::to_vec(&webhook_body(job))
                .map_err(|e| AttemptError::permanent(format!("cannot encode the body: {e}")))?,
        };
        let mut headers = vec![
            ("x-safeclock-dedup-key", job.pending.dedup_key.clone()),
            ("x-safeclock-delivery-id", job.pending.delivery_id.clone()),
        ];
        if let Some(secret) = &self.settings.secret {
            // The receiver checks this against its own clock: the wall clock's.
            let ts = now.wall.as_second();
            headers.push((TIMESTAMP_HEADER, ts.to_string()));
            headers.push((SIGNATURE_HEADER, signature(secret.as_bytes(), ts, &body)));
        }
        self.post(body, &headers).await
    }

    async fn pagerduty(&self, job: &Job) -> Result<(), AttemptError> {
        let body = pagerduty_body(
            self.settings.routing_key.as_deref().unwrap_or_default(),
            job,
        );
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| AttemptError::permanent(format!("cannot encode the event: {e}")))?;
        self.post(bytes, &[]).await
    }

    async fn alertmanager(&self, job: &Job, now: SendTime) -> Result<(), AttemptError> {
        if job.kind() == NotificationKind::Acknowledge {
            // Alertmanager has no acknowledgement (silences are an operator's decision).
            return Ok(());
        }
        let body = alertmanager_body(job, now);
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| AttemptError::permanent(format!("cannot encode the alert: {e}")))?;
        self.post(bytes, &[]).await
    }

    async fn email(&self, job: &Job) -> Result<(), AttemptError> {
        if job.kind() == NotificationKind::Acknowledge || job.kind() == NotificationKind::Refresh {
            return Ok(());
        }
        let Some(smtp) = &self.smtp else {
            return Err(AttemptError::permanent("no SMTP transport"));
        };
        let s = &self.settings;
        let from = s.from.as_deref().unwrap_or_default();
        let subject = email_subject(job);
        let text = format!(
            "{}\n\nescalation {}\ndedup key {}\nlevel {} (repeat {}), policy {}\n",
            summary(&job.event),
            job.escalation_id,
            job.pending.dedup_key,
            job.pending.level,
            job.pending.repeat,
            job.pending.policy
        );
        let mut builder = Message::builder()
            .from(
                from.parse()
                    .map_err(|e| AttemptError::permanent(format!("invalid from address: {e}")))?,
            )
            .subject(subject)
            .header(ContentType::TEXT_PLAIN);
        for to in &s.to {
            builder = builder.to(to
                .parse()
                .map_err(|e| AttemptError::permanent(format!("invalid to address: {e}")))?);
        }
        let message = builder
            .body(text)
            .map_err(|e| AttemptError::permanent(format!("cannot build the message: {e}")))?;
        smtp.send(message).await.map(|_| ()).map_err(|e| {
            if e.is_permanent() {
                AttemptError::permanent(format!("SMTP refused the message: {e}"))
            } else {
                AttemptError::retryable(format!("SMTP: {e}"))
            }
        })
    }
}

/// The subject of an email: the referral id when the payload allows it, else the escalation id.
pub fn email_subject(job: &Job) -> String {
    let reference = if job.event.referral_id.is_empty() {
        format!("escalation {}", job.escalation_id)
    } else {
        job.event.referral_id.clone()
    };
    match job.kind() {
        NotificationKind::Resolve => format!(
            "[safeclock] RESOLVED ({}) {} {reference}",
            job.resolution, job.event.rule_id
        ),
        _ => format!(
            "[safeclock] {} {} {reference} level {}",
            transition_label(job.event.transition()).to_uppercase(),
            job.event.rule_id,
            job.pending.level
        ),
    }
}

/// A log line for the log receiver.
fn log_line(job: &Job) {
    let labels = job.event.labels.clone().unwrap_or_default();
    tracing::warn!(
        target: "safeclock::escalation",
        escalation_id = %job.escalation_id,
        referral_id = %job.event.referral_id,
        rule_id = %job.event.rule_id,
        transition = transition_label(job.event.transition()),
        notification = kind_label(job.kind()),
        force = %labels.force_id,
        level = job.pending.level,
        repeat = job.pending.repeat,
        "escalation: {}",
        summary(&job.event)
    );
}

/// The PagerDuty Events API v2 body: trigger with a payload, acknowledge and resolve by
/// `dedup_key` alone.
pub fn pagerduty_body(routing_key: &str, job: &Job) -> Value {
    let action = match job.kind() {
        NotificationKind::Acknowledge => "acknowledge",
        NotificationKind::Resolve => "resolve",
        _ => "trigger",
    };
    let mut body = json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": job.pending.dedup_key,
    });
    if action == "trigger" {
        let e = &job.event;
        let labels = e.labels.clone().unwrap_or_default();
        let severity = match e.severity() {
            _ if e.transition() == SlaTransition::Warning => "warning",
            safeclock_common::schema::v1::Severity::Critical => "critical",
            safeclock_common::schema::v1::Severity::High => "error",
            safeclock_common::schema::v1::Severity::Info => "info",
            _ => "warning",
        };
        body["payload"] = json!({
            "summary": summary(e),
            "source": format!("safeclock/{}", labels.force_id),
            "severity": severity,
            "component": e.rule_id,
            "group": labels.force_id,
            "class": transition_label(e.transition()),
            "custom_details": {
                "escalation_id": job.escalation_id,
                "rule_id": e.rule_id,
                "level": job.pending.level,
                "repeat": job.pending.repeat,
                "policy": job.pending.policy,
                "category": labels.category,
                "risk": labels.risk,
                "area": labels.area,
                "team": labels.team,
                "deadline": e.deadline.as_ref().and_then(to_jiff).map(|t| t.to_string()),
            },
        });
        if !e.referral_id.is_empty() {
            body["payload"]["custom_details"]["referral_id"] = json!(e.referral_id);
        }
    }
    body
}

/// When a notification is sent, on two clocks: the escalator's (its time source, on which
/// escalations are opened and levels fall due; shifted in a drill, `[time] offset_secs`) and the
/// machine's wall clock, which a receiver compares timestamps with (a webhook's signature time,
/// Alertmanager's `startsAt` and `endsAt`). In production the two are the same.
#[derive(Debug, Clone, Copy)]
pub struct SendTime {
    pub service: Timestamp,
    pub wall: Timestamp,
}

impl SendTime {
    /// Now on both clocks.
    pub fn now(time: &dyn safeclock_common::time::TimeSource) -> Self {
        Self {
            service: time.now(),
            wall: Timestamp::now(),
        }
    }

    /// An instant of the escalator's clock, on the wall clock.
    pub fn to_wall(&self, t: Timestamp) -> Timestamp {
        let shift = self.service.duration_since(self.wall);
        t.checked_sub(shift).unwrap_or(t)
    }
}

/// The Alertmanager API v2 body: one alert per page, identified by its labels; `endsAt` is set
/// on resolve (to now), so Alertmanager resolves it at once. Alertmanager compares `startsAt`
/// and `endsAt` with its own clock, so both are on the wall clock.
pub fn alertmanager_body(job: &Job, now: SendTime) -> Value {
    let e = &job.event;
    let labels = e.labels.clone().unwrap_or_default();
    let alertname = match e.transition() {
        SlaTransition::Warning => "SafeclockSlaWarning",
        _ => "SafeclockSlaBreach",
    };
    let starts = Timestamp::from_millisecond(job.opened_at_ms)
        .map_or(now.wall, |opened| now.to_wall(opened));
    let mut alert = json!({
        "labels": {
            "alertname": alertname,
            "escalation_id": job.escalation_id,
            // `rule` and `force`, as in the exporter's metrics and the Prometheus rules, so
            // Alertmanager groups both the same way.
            "rule": e.rule_id,
            "force": labels.force_id,
            "area": labels.area,
            "category": labels.category,
            "risk": labels.risk,
            "severity": severity_label(e),
            "threshold": transition_label(e.transition()),
            "level": job.pending.level.to_string(),
            "policy": job.pending.policy,
        },
        "annotations": {
            "summary": summary(e),
            "dedup_key": job.pending.dedup_key,
            "deadline": e.deadline.as_ref().and_then(to_jiff).map(|t| t.to_string()).unwrap_or_default(),
        },
        "startsAt": starts.to_string(),
    });
    if !e.referral_id.is_empty() {
        alert["labels"]["referral_id"] = json!(e.referral_id);
    }
    if job.kind() == NotificationKind::Resolve {
        alert["endsAt"] = json!(now.wall.to_string());
    }
    json!([alert])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_times_are_on_the_wall_clock_whatever_the_escalators_clock_says() {
        // A drill two days ahead: the escalation opened ten seconds ago on its clock.
        let wall: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let service = wall + jiff::SignedDuration::from_hours(48);
        let now = SendTime { service, wall };
        let opened = service - jiff::SignedDuration::from_secs(10);
        let job = |kind: NotificationKind| Job {
            escalation_id: "esc-1".into(),
            partition: 0,
            pending: safeclock_common::schema::v1::PendingNotification {
                kind: kind as i32,
                ..safeclock_common::schema::v1::PendingNotification::default()
            },
            event: SlaEvent::default(),
            actor: String::new(),
            resolution: String::new(),
            opened_at_ms: opened.as_millisecond(),
        };
        let body = alertmanager_body(&job(NotificationKind::Trigger), now);
        assert_eq!(body[0]["startsAt"], "2026-12-02T09:59:50Z");
        let body = alertmanager_body(&job(NotificationKind::Resolve), now);
        assert_eq!(body[0]["endsAt"], "2026-12-02T10:00:00Z");
    }

    #[test]
    fn signatures_are_hmac_sha256_over_timestamp_and_body() {
        // Known answer: HMAC-SHA256(key="key", "1.{}").
        let sig = signature(b"key", 1, b"{}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
        assert_eq!(sig, signature(b"key", 1, b"{}"));
        assert_ne!(sig, signature(b"key", 2, b"{}"));
        assert_ne!(sig, signature(b"other", 1, b"{}"));
    }

    /// A breach of "victim contact" for referral R-42, whose clock is about device D-9.
    fn breach_job() -> Job {
        let mut pending = safeclock_common::schema::v1::PendingNotification {
            delivery_id: "d-1".into(),
            dedup_key: "k-1".into(),
            receiver: "duty".into(),
            level: 2,
            policy: "breach".into(),
            ..safeclock_common::schema::v1::PendingNotification::default()
        };
        pending.set_kind(NotificationKind::Trigger);
        Job {
            escalation_id: "esc-1".into(),
            partition: 0,
            pending,
            event: SlaEvent {
                sla_event_id: "s-1".into(),
                referral_id: "R-42".into(),
                rule_id: "device-examined".into(),
                rule_title: "Device examined".into(),
                clock_id: "c-R-42-D-9".into(),
                instance: "D-9".into(),
                cause_event_id: "rms-event-77".into(),
                transition: SlaTransition::Breached as i32,
                severity: safeclock_common::schema::v1::Severity::High as i32,
                labels: Some(safeclock_common::schema::v1::SlaLabels {
                    force_id: "nottinghamshire".into(),
                    category: "grooming".into(),
                    risk: "high".into(),
                    area: "city".into(),
                    team: "pvp-city".into(),
                    ..safeclock_common::schema::v1::SlaLabels::default()
                }),
                deadline: Some(safeclock_common::schema::from_jiff(
                    "2014-09-09T09:40:00Z".parse().unwrap(),
                )),
                ..SlaEvent::default()
            },
            actor: String::new(),
            resolution: String::new(),
            opened_at_ms: 0,
        }
    }

    const CODES_SUMMARY: &str = "BREACHED device-examined (Device examined) force nottinghamshire \
                                 category grooming risk high deadline 2014-09-09T09:40:00Z";

    #[test]
    fn by_default_every_kind_but_the_log_gets_codes_and_the_escalation_id_only() {
        for kind in [
            ReceiverKind::Webhook,
            ReceiverKind::Pagerduty,
            ReceiverKind::Alertmanager,
            ReceiverKind::Email,
        ] {
            assert_eq!(ReceiverSettings::new("r", kind).payload(), Payload::Codes);
        }
        let log = ReceiverSettings::new("log", ReceiverKind::Log);
        assert_eq!(log.payload(), Payload::Referral);
        let job = breach_job();
        let codes = redact(&job, Payload::Codes);
        let wall: Timestamp = "2014-09-09T09:41:00Z".parse().unwrap();
        let now = SendTime {
            service: wall,
            wall,
        };

        assert_eq!(
            webhook_body(&codes),
            json!({
                "version": "2",
                "escalationId": "esc-1",
                "dedupKey": "k-1",
                "deliveryId": "d-1",
                "notification": "trigger",
                "receiver": "duty",
                "level": 2,
                "repeat": 0,
                "policy": "breach",
                "fallbackFor": "",
                "actor": "",
                "resolution": "",
                "summary": CODES_SUMMARY,
                "slaEvent": {
                    "slaEventId": "s-1",
                    "ruleId": "device-examined",
                    "transition": "SLA_TRANSITION_BREACHED",
                    "severity": "SEVERITY_HIGH",
                    "labels": {
                        "forceId": "nottinghamshire",
                        "category": "grooming",
                        "risk": "high",
                        "area": "city",
                        "team": "pvp-city"
                    },
                    // proto3 JSON as pbjson writes it
                    "deadline": "2014-09-09T09:40:00+00:00",
                    "ruleTitle": "Device examined"
                }
            })
        );
        assert_eq!(
            pagerduty_body("RK", &codes),
            json!({
                "routing_key": "RK",
                "event_action": "trigger",
                "dedup_key": "k-1",
                "payload": {
                    "summary": CODES_SUMMARY,
                    "source": "safeclock/nottinghamshire",
                    "severity": "error",
                    "component": "device-examined",
                    "group": "nottinghamshire",
                    "class": "breached",
                    "custom_details": {
                        "escalation_id": "esc-1",
                        "rule_id": "device-examined",
                        "level": 2,
                        "repeat": 0,
                        "policy": "breach",
                        "category": "grooming",
                        "risk": "high",
                        "area": "city",
                        "team": "pvp-city",
                        "deadline": "2014-09-09T09:40:00Z"
                    }
                }
            })
        );
        assert_eq!(
            alertmanager_body(&codes, now),
            json!([{
                "labels": {
                    "alertname": "SafeclockSlaBreach",
                    "escalation_id": "esc-1",
                    "rule": "device-examined",
                    "force": "nottinghamshire",
                    "area": "city",
                    "category": "grooming",
                    "risk": "high",
                    "severity": "high",
                    "threshold": "breached",
                    "level": "2",
                    "policy": "breach"
                },
                "annotations": {
                    "summary": CODES_SUMMARY,
                    "dedup_key": "k-1",
                    "deadline": "2014-09-09T09:40:00Z"
                },
                "startsAt": "1970-01-01T00:00:00Z"
            }])
        );
        assert_eq!(
            email_subject(&codes),
            "[safeclock] BREACHED device-examined escalation esc-1 level 2"
        );
        let ctx = template_context(&codes);
        assert_eq!(ctx["referral_id"], json!(""));
        for leak in ["R-42", "D-9", "rms-event-77"] {
            for shown in [
                webhook_body(&codes).to_string(),
                pagerduty_body("RK", &codes).to_string(),
                alertmanager_body(&codes, now).to_string(),
                email_subject(&codes),
                serde_json::to_string(&ctx).unwrap(),
            ] {
                assert!(!shown.contains(leak), "{leak} in {shown}");
            }
        }
    }

    #[test]
    fn a_receiver_the_force_allows_it_gets_the_referral_id_too() {
        let job = breach_job();
        let full = redact(&job, Payload::Referral);
        let wall: Timestamp = "2014-09-09T09:41:00Z".parse().unwrap();
        let now = SendTime {
            service: wall,
            wall,
        };
        let summary = "BREACHED device-examined (Device examined) referral R-42 force \
                       nottinghamshire category grooming risk high deadline 2014-09-09T09:40:00Z";
        let webhook = webhook_body(&full);
        assert_eq!(webhook["summary"], summary);
        assert_eq!(webhook["slaEvent"]["referralId"], "R-42");
        assert_eq!(webhook["slaEvent"]["instance"], "D-9");
        let pd = pagerduty_body("RK", &full);
        assert_eq!(pd["payload"]["custom_details"]["referral_id"], "R-42");
        assert_eq!(pd["payload"]["summary"], summary);
        assert_eq!(
            alertmanager_body(&full, now)[0]["labels"]["referral_id"],
            "R-42"
        );
        assert_eq!(
            email_subject(&full),
            "[safeclock] BREACHED device-examined R-42 level 2"
        );
    }

    #[test]
    fn templates_fill_json_values() {
        let ctx = BTreeMap::from([("summary", json!("a \"quoted\" text")), ("level", json!(2))]);
        let out = render_template(r#"{"text": {{summary}}, "lvl": {{ level }}}"#, &ctx);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["text"], "a \"quoted\" text");
        assert_eq!(v["lvl"], 2);
    }
}
