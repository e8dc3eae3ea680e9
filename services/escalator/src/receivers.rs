//! Where escalations go: a log line, and HTTP webhooks.
//!
//! A webhook gets a JSON body with the escalation's ids and the SLA event in proto3 JSON. Failed
//! attempts (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff
//! and jitter up to the receiver's attempt budget; other 4xx answers are permanent. URLs can hold
//! tokens, so they are never logged: receivers are named by their configured name.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use safeclock_common::config::WebhookSettings;
use safeclock_common::event::transition_label;
use safeclock_common::schema::v1::SlaEvent;
use serde_json::json;

use crate::metrics::EscalatorMetrics;

/// One notification to deliver: an SLA event at an escalation level.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Stable per referral + rule + clock.
    pub escalation_id: String,
    /// Escalation level (1 = first line).
    pub level: u32,
    pub event: SlaEvent,
}

impl Notification {
    /// Stable per escalation + threshold + level + receiver: receivers de-duplicate on it, so an
    /// at-least-once redelivery never pages a person twice.
    pub fn dedup_key(&self, receiver: &str) -> String {
        safeclock_common::ids::derive_id(&[
            &self.escalation_id,
            transition_label(self.event.transition()),
            // The threshold: the SLA event's id is unique per warning of a clock (and per breach).
            &self.event.sla_event_id,
            &self.level.to_string(),
            receiver,
        ])
    }

    /// A one-line summary with codes only (no personal data).
    pub fn summary(&self) -> String {
        let e = &self.event;
        let labels = e.labels.clone().unwrap_or_default();
        let deadline = e
            .deadline
            .as_ref()
            .and_then(safeclock_common::schema::to_jiff)
            .map(|t| t.to_string())
            .unwrap_or_default();
        format!(
            "{} {} ({}) referral {} force {} category {} risk {} deadline {}",
            transition_label(e.transition()).to_uppercase(),
            e.rule_id,
            e.rule_title,
            e.referral_id,
            labels.force_id,
            labels.category,
            labels.risk,
            deadline
        )
    }
}

/// The final result of delivering to one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { attempts: u32 },
    Failed { attempts: u32, error: String },
}

/// A configured receiver.
#[derive(Debug, Clone)]
pub enum Receiver {
    /// Writes the escalation as a structured log line.
    Log,
    Webhook(Webhook),
}

impl Receiver {
    pub fn name(&self) -> &str {
        match self {
            Receiver::Log => "log",
            Receiver::Webhook(w) => &w.settings.name,
        }
    }

    /// Delivers `n`, retrying as the receiver allows, and records metrics.
    pub async fn deliver(&self, n: &Notification, metrics: &EscalatorMetrics) -> Outcome {
        let started = Instant::now();
        let outcome = match self {
            Receiver::Log => {
                let labels = n.event.labels.clone().unwrap_or_default();
                tracing::warn!(
                    target: "safeclock::escalation",
                    escalation_id = %n.escalation_id,
                    referral_id = %n.event.referral_id,
                    rule_id = %n.event.rule_id,
                    transition = transition_label(n.event.transition()),
                    force = %labels.force_id,
                    level = n.level,
                    "escalation: {}",
                    n.summary()
                );
                Outcome::Delivered { attempts: 1 }
            }
            Receiver::Webhook(w) => w.deliver(n, metrics).await,
        };
        let result = match outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Failed { .. } => "failed",
        };
        metrics
            .notifications
            .with_label_values(&[self.name(), result])
            .inc();
        metrics
            .delivery_seconds
            .with_label_values(&[self.name()])
            .observe(started.elapsed().as_secs_f64());
        outcome
    }
}

/// An HTTP webhook receiver.
#[derive(Debug, Clone)]
pub struct Webhook {
    settings: WebhookSettings,
    client: reqwest::Client,
}

#[derive(Debug)]
struct AttemptError {
    retryable: bool,
    message: String,
}

impl Webhook {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.timeout_ms.min(5_000)))
            .user_agent(concat!("safeclock/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { settings, client })
    }

    fn body(&self, n: &Notification) -> serde_json::Value {
        json!({
            "version": "1",
            "escalationId": n.escalation_id,
            "dedupKey": n.dedup_key(&self.settings.name),
            "receiver": self.settings.name,
            "level": n.level,
            "summary": n.summary(),
            "slaEvent": n.event,
        })
    }

    async fn attempt(&self, body: &serde_json::Value) -> Result<(), AttemptError> {
        let response = self
            .client
            .post(&self.settings.url)
            .json(body)
            .send()
            .await
            .map_err(|e| AttemptError {
                retryable: true,
                // without_url: the URL may carry a token.
                message: e.without_url().to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retryable = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(AttemptError {
            retryable,
            message: format!("HTTP {status}"),
        })
    }

    async fn deliver(&self, n: &Notification, metrics: &EscalatorMetrics) -> Outcome {
        let body = self.body(n);
        let name = self.settings.name.as_str();
        let mut attempts = 0u32;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.initial_backoff_ms))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.settings.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        let result = (|| {
            attempts += 1;
            self.attempt(&body)
        })
        .retry(backoff)
        .when(|e: &AttemptError| e.retryable)
        .notify(|e: &AttemptError, wait: Duration| {
            metrics.attempts.with_label_values(&[name, "retryable"]).inc();
            tracing::info!(receiver = name, error.message = %e.message, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed; retrying");
        })
        .await;
        match result {
            Ok(()) => {
                metrics.attempts.with_label_values(&[name, "ok"]).inc();
                Outcome::Delivered { attempts }
            }
            Err(e) => {
                let kind = if e.retryable {
                    "retryable"
                } else {
                    "permanent"
                };
                metrics.attempts.with_label_values(&[name, kind]).inc();
                tracing::warn!(receiver = name, attempts, error.message = %e.message, escalation_id = %n.escalation_id, "webhook delivery failed for good");
                Outcome::Failed {
                    attempts,
                    error: e.message,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::post;
    use prometheus::Registry;
    use safeclock_common::schema::v1::SlaTransition;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A local webhook answering the given statuses in turn, then 200; counts calls.
    async fn webhook_answering(statuses: Vec<u16>) -> (String, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |body: axum::Json<serde_json::Value>| {
                let c = c.clone();
                let statuses = statuses.clone();
                async move {
                    assert!(body["dedupKey"].is_string());
                    let n = c.fetch_add(1, Ordering::SeqCst) as usize;
                    let code = statuses.get(n).copied().unwrap_or(200);
                    StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/hook"), calls)
    }

    fn webhook(url: String, max_attempts: u32) -> Webhook {
        Webhook::new(WebhookSettings {
            name: "duty".into(),
            url,
            timeout_ms: 1000,
            max_attempts,
            initial_backoff_ms: 1,
        })
        .unwrap()
    }

    fn notification() -> Notification {
        Notification {
            escalation_id: "esc-1".into(),
            level: 1,
            event: SlaEvent {
                sla_event_id: "s-1".into(),
                referral_id: "R-1".into(),
                rule_id: "victim-contact".into(),
                transition: SlaTransition::Breached as i32,
                ..SlaEvent::default()
            },
        }
    }

    #[tokio::test]
    async fn server_errors_are_retried_until_delivered() {
        let (url, calls) = webhook_answering(vec![500, 503]).await;
        let metrics = EscalatorMetrics::register(&Registry::new()).unwrap();
        let out = webhook(url, 5).deliver(&notification(), &metrics).await;
        assert_eq!(out, Outcome::Delivered { attempts: 3 });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let (url, calls) = webhook_answering(vec![400]).await;
        let metrics = EscalatorMetrics::register(&Registry::new()).unwrap();
        let out = webhook(url, 5).deliver(&notification(), &metrics).await;
        assert!(
            matches!(out, Outcome::Failed { attempts: 1, .. }),
            "{out:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connection_refused_fails_after_the_attempt_budget_without_leaking_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let metrics = EscalatorMetrics::register(&Registry::new()).unwrap();
        let out = webhook(format!("http://{addr}/hook?token=s3cret"), 3)
            .deliver(&notification(), &metrics)
            .await;
        match out {
            Outcome::Failed { attempts, error } => {
                assert_eq!(attempts, 3);
                assert!(!error.contains("s3cret"), "{error}");
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn dedup_keys_are_stable_and_differ_by_receiver() {
        let n = notification();
        assert_eq!(n.dedup_key("a"), n.dedup_key("a"));
        assert_ne!(n.dedup_key("a"), n.dedup_key("b"));
    }
}
