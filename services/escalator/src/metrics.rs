//! Escalator metrics: what was delivered where, and how long delivery took.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct EscalatorMetrics {
    /// `safeclock_escalations_total{receiver,outcome}`; outcome is `delivered` or `failed`.
    pub notifications: IntCounterVec,
    /// `safeclock_escalation_delivery_seconds{receiver}`: from first attempt to final outcome.
    pub delivery_seconds: HistogramVec,
    /// `safeclock_escalation_attempts_total{receiver,result}`: every HTTP attempt, retries included.
    pub attempts: IntCounterVec,
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
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["receiver"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "safeclock_escalation_attempts_total",
                "Delivery attempts by receiver and result (ok, retryable, permanent).",
            ),
            &["receiver", "result"],
        )?;
        registry.register(Box::new(notifications.clone()))?;
        registry.register(Box::new(delivery_seconds.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        Ok(Self {
            notifications,
            delivery_seconds,
            attempts,
        })
    }
}
