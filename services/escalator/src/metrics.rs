//! Escalator metrics, all defined here and passed in: what was delivered where and how fast, how
//! many escalations are open at which level, and how long people take to acknowledge.
//!
//! Label values come from configuration (receiver names, levels of configured policies) or fixed
//! sets, never from event content.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct EscalatorMetrics {
    /// `safeclock_escalations_total{receiver,outcome}`; outcome is `delivered` or `failed`.
    pub notifications: IntCounterVec,
    /// `safeclock_escalation_delivery_seconds{receiver}`: from first attempt to final outcome.
    pub delivery_seconds: HistogramVec,
    /// `safeclock_escalation_attempts_total{receiver,result}`: every attempt, retries included
    /// (`ok`, `retryable`, `permanent`, `breaker_open` for a job refused by an open breaker).
    pub attempts: IntCounterVec,
    /// `safeclock_escalation_breaker_open{receiver}`: 1 while the receiver's breaker is open.
    pub breaker_open: IntGaugeVec,
    /// `safeclock_escalations_open{level,status}`: open escalations by highest level paged and
    /// status (`open`, `acknowledged`).
    pub open: IntGaugeVec,
    /// `safeclock_escalation_pending_notifications`: decided but not yet delivered.
    pub pending: prometheus::IntGauge,
    /// `safeclock_escalation_time_to_acknowledge_seconds`: from opening to first acknowledgement.
    pub time_to_ack: Histogram,
    /// `safeclock_escalation_dead_letters_total{receiver}`: notifications given up on.
    pub dead_letters: IntCounterVec,
    /// `safeclock_escalator_partitions`: input partitions this instance holds.
    pub partitions: prometheus::IntGauge,
    /// `safeclock_escalation_api_auth_failures_total{reason}`: acknowledgement-API requests
    /// refused for authentication: `missing`, `invalid` or `rate_limited` (the peer failed too
    /// often and was refused without a check); and after it (403, audited): `scope_not_granted`,
    /// `force_not_granted`.
    pub api_auth_failures: IntCounterVec,
}

impl EscalatorMetrics {
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let notifications = IntCounterVec::new(
            Opts::new(
                "safeclock_escalations_total",
                "Escalation notifications by receiver and final outcome (delivered, failed).",
            ),
            &["receiver", "outcome"],
        )?;
        let delivery_seconds = HistogramVec::new(
            HistogramOpts::new(
                "safeclock_escalation_delivery_seconds",
                "Time from the first delivery attempt to the final outcome, retries included.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            &["receiver"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "safeclock_escalation_attempts_total",
                "Delivery attempts by receiver and result (ok, retryable, permanent, breaker_open).",
            ),
            &["receiver", "result"],
        )?;
        let breaker_open = IntGaugeVec::new(
            Opts::new(
                "safeclock_escalation_breaker_open",
                "1 while the receiver's circuit breaker is open.",
            ),
            &["receiver"],
        )?;
        let open = IntGaugeVec::new(
            Opts::new(
                "safeclock_escalations_open",
                "Open escalations by highest level paged and status (open, acknowledged).",
            ),
            &["level", "status"],
        )?;
        let pending = prometheus::IntGauge::new(
            "safeclock_escalation_pending_notifications",
            "Notifications decided on and not yet delivered or given up on.",
        )?;
        let time_to_ack = Histogram::with_opts(
            HistogramOpts::new(
                "safeclock_escalation_time_to_acknowledge_seconds",
                "Time from an escalation opening to its first acknowledgement.",
            )
            .buckets(vec![
                60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
            ]),
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "safeclock_escalation_dead_letters_total",
                "Notifications whose retry budget was spent, by receiver.",
            ),
            &["receiver"],
        )?;
        let partitions = prometheus::IntGauge::new(
            "safeclock_escalator_partitions",
            "sla-events partitions this escalator instance holds (and whose escalations it owns).",
        )?;
        let api_auth_failures = IntCounterVec::new(
            Opts::new(
                "safeclock_escalation_api_auth_failures_total",
                "Acknowledgement-API requests refused, by reason: missing, invalid, rate_limited (401/429), scope_not_granted, force_not_granted (403).",
            ),
            &["reason"],
        )?;
        for reason in safeclock_common::auth::AuthFailure::REASONS
            .into_iter()
            .chain([crate::api::SCOPE_NOT_GRANTED, crate::api::FORCE_NOT_GRANTED])
        {
            api_auth_failures.with_label_values(&[reason]);
        }
        registry.register(Box::new(api_auth_failures.clone()))?;
        registry.register(Box::new(partitions.clone()))?;
        registry.register(Box::new(notifications.clone()))?;
        registry.register(Box::new(delivery_seconds.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(breaker_open.clone()))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(time_to_ack.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        Ok(Self {
            notifications,
            delivery_seconds,
            attempts,
            breaker_open,
            open,
            pending,
            time_to_ack,
            dead_letters,
            partitions,
            api_auth_failures,
        })
    }
}
