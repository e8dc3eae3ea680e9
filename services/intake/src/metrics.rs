//! The intake's metrics, registered once into the process registry and passed to the handlers.
//! Refused events are also counted in the shared `safeclock_records_invalid_total{service="intake",
//! reason}`, beside every consumer's, so one panel shows bad input wherever it was caught.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct IntakeMetrics {
    /// `safeclock_intake_requests_total{code}`: requests answered, by HTTP status code.
    pub requests: IntCounterVec,
    /// `safeclock_intake_events_total{result}`: events by `accepted` (acknowledged by the
    /// broker), `duplicate` (already accepted; not produced again), `refused` (invalid),
    /// `forbidden` (a request with an event outside its client's grant: every event of it) and
    /// `unavailable` (the broker did not acknowledge in time; the sender was told 503).
    pub events: IntCounterVec,
    /// `safeclock_intake_request_seconds{code}`: from request to answer.
    pub seconds: HistogramVec,
    /// `safeclock_intake_auth_failures_total{reason}`: requests refused before their body was
    /// read: `missing` (no bearer token), `invalid` (not a configured token), `rate_limited`
    /// (the peer failed too often and was refused without a check).
    pub auth_failures: IntCounterVec,
}

impl IntakeMetrics {
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "safeclock_intake_requests_total",
                "Intake requests answered, by HTTP status code.",
            ),
            &["code"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "safeclock_intake_events_total",
                "Events posted to intake, by result: accepted, duplicate, refused, forbidden, unavailable.",
            ),
            &["result"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "safeclock_intake_request_seconds",
                "Time from an intake request to its answer (for 202: until the broker acknowledged every event).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["code"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "safeclock_intake_auth_failures_total",
                "Intake requests refused for authentication, by reason: missing, invalid, rate_limited.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        for reason in safeclock_common::auth::AuthFailure::REASONS {
            auth_failures.with_label_values(&[reason]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        for result in [
            "accepted",
            "duplicate",
            "refused",
            "forbidden",
            "unavailable",
        ] {
            events.with_label_values(&[result]);
        }
        Ok(Self {
            requests,
            events,
            seconds,
            auth_failures,
        })
    }
}
