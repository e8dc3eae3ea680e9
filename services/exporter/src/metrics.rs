//! The responsiveness metrics Grafana dashboards and alert rules read.
//!
//! Labels come from small fixed sets only: force (configured forces, else `other`), rule (known
//! rules, else `other`), category and risk (contract enums), transition and severity. Never a
//! referral id or anything personal.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Bucket bounds in seconds: 15 min up to 26 weeks, covering every target in the rule pack
/// (minutes for emergency response, hours for first contact, weeks for device examination and
/// months for investigations).
pub const TIME_TO_STOP_BUCKETS: [f64; 16] = [
    900.0,
    3_600.0,
    4.0 * 3_600.0,
    12.0 * 3_600.0,
    18.0 * 3_600.0,
    24.0 * 3_600.0,
    48.0 * 3_600.0,
    72.0 * 3_600.0,
    5.0 * 86_400.0,
    7.0 * 86_400.0,
    14.0 * 86_400.0,
    28.0 * 86_400.0,
    42.0 * 86_400.0,
    70.0 * 86_400.0,
    91.0 * 86_400.0,
    182.0 * 86_400.0,
];

#[derive(Clone)]
pub struct ExporterMetrics {
    /// `safeclock_referrals_received_total{force,category,risk}`
    pub referrals_received: IntCounterVec,
    /// `safeclock_sla_transitions_total{force,rule,transition}`
    pub transitions: IntCounterVec,
    /// `safeclock_sla_breaches_total{force,rule,severity}`
    pub breaches: IntCounterVec,
    /// `safeclock_sla_time_to_stop_seconds{force,rule}`: clock start to stop (met or met late).
    pub time_to_stop: HistogramVec,
}

impl ExporterMetrics {
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let referrals_received = IntCounterVec::new(
            Opts::new(
                "safeclock_referrals_received_total",
                "Child-protection referrals received, by force, category and risk grade.",
            ),
            &["force", "category", "risk"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "safeclock_sla_transitions_total",
                "SLA clock transitions (started, warning, breached, met, met_late, cancelled, corrected), by force and rule.",
            ),
            &["force", "rule", "transition"],
        )?;
        let breaches = IntCounterVec::new(
            Opts::new(
                "safeclock_sla_breaches_total",
                "SLA clocks that passed their deadline, by force, rule and severity.",
            ),
            &["force", "rule", "severity"],
        )?;
        let time_to_stop = HistogramVec::new(
            HistogramOpts::new(
                "safeclock_sla_time_to_stop_seconds",
                "Time from clock start to the stop event (met or met late), in event time.",
            )
            .buckets(TIME_TO_STOP_BUCKETS.to_vec()),
            &["force", "rule"],
        )?;
        registry.register(Box::new(referrals_received.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(breaches.clone()))?;
        registry.register(Box::new(time_to_stop.clone()))?;
        Ok(Self {
            referrals_received,
            transitions,
            breaches,
            time_to_stop,
        })
    }
}
