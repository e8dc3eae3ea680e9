//! The clock service's own metrics. (Responsiveness metrics for dashboards come from the
//! exporter, which reads the SLA events this service publishes.)

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct ClockMetrics {
    /// `safeclock_clock_open_clocks`: clocks running or breached and not yet stopped.
    pub open_clocks: IntGauge,
    /// `safeclock_clock_pending_timers`: warnings and deadlines waiting to fire.
    pub pending_timers: IntGauge,
    /// `safeclock_clock_sla_events_emitted_total{transition}`.
    pub emitted: IntCounterVec,
}

impl ClockMetrics {
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open_clocks = IntGauge::new(
            "safeclock_clock_open_clocks",
            "Clocks started and not yet met, met late or cancelled, held by this instance.",
        )?;
        let pending_timers = IntGauge::new(
            "safeclock_clock_pending_timers",
            "Warnings and deadlines waiting to fire, held by this instance.",
        )?;
        let emitted = IntCounterVec::new(
            Opts::new(
                "safeclock_clock_sla_events_emitted_total",
                "SLA events published by the clock, by transition.",
            ),
            &["transition"],
        )?;
        registry.register(Box::new(open_clocks.clone()))?;
        registry.register(Box::new(pending_timers.clone()))?;
        registry.register(Box::new(emitted.clone()))?;
        Ok(Self {
            open_clocks,
            pending_timers,
            emitted,
        })
    }
}
