//! The clock service's own metrics. (Responsiveness metrics for dashboards come from the
//! exporter, which reads the SLA events this service publishes.)

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct ClockMetrics {
    /// `safeclock_clock_open_clocks`: clocks running or breached and not yet stopped.
    pub open_clocks: IntGauge,
    /// `safeclock_clock_pending_timers`: warnings and deadlines waiting to fire.
    pub pending_timers: IntGauge,
    /// `safeclock_clock_paused_clocks`: open clocks currently paused.
    pub paused_clocks: IntGauge,
    /// `safeclock_clock_breached_open_clocks`: open clocks past their deadline.
    pub breached_open_clocks: IntGauge,
    /// `safeclock_clock_sla_events_emitted_total{transition}`.
    pub emitted: IntCounterVec,
    /// `safeclock_clock_partitions`: input partitions this instance holds.
    pub partitions: IntGauge,
    /// `safeclock_clock_state_writes_total`: referral states written to the changelog.
    pub state_writes: IntCounter,
    /// `safeclock_clock_referrals_forgotten_total`: referrals with no clock forgotten after
    /// `clock.closed_retention_days` (each a tombstone on the changelog).
    pub referrals_forgotten: IntCounter,
    /// `safeclock_clock_restore_seconds`: time to restore one partition from the changelog.
    pub restore_seconds: Histogram,
    /// `safeclock_sla_open_clocks{force,rule,category,risk,state}`: open clocks by state
    /// (running, warned, paused, breached), rebuilt from the engine's state.
    pub sla_open_clocks: IntGaugeVec,
    /// `safeclock_sla_oldest_breach_age_seconds{force,rule}`: how long the oldest open breached
    /// clock has been past its deadline.
    pub oldest_breach_age: GaugeVec,
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
        let partitions = IntGauge::new(
            "safeclock_clock_partitions",
            "Input partitions held (and restored) by this instance.",
        )?;
        let state_writes = IntCounter::new(
            "safeclock_clock_state_writes_total",
            "Referral states (or tombstones) written to the clock-state changelog.",
        )?;
        let restore_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "safeclock_clock_restore_seconds",
                "Time to restore one partition's clocks from the changelog.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
        )?;
        registry.register(Box::new(partitions.clone()))?;
        registry.register(Box::new(state_writes.clone()))?;
        let referrals_forgotten = IntCounter::new(
            "safeclock_clock_referrals_forgotten_total",
            "Referrals holding no clock forgotten after clock.closed_retention_days (a tombstone each).",
        )?;
        registry.register(Box::new(referrals_forgotten.clone()))?;
        registry.register(Box::new(restore_seconds.clone()))?;
        registry.register(Box::new(open_clocks.clone()))?;
        registry.register(Box::new(pending_timers.clone()))?;
        let paused_clocks = IntGauge::new(
            "safeclock_clock_paused_clocks",
            "Open clocks currently paused, held by this instance.",
        )?;
        let breached_open_clocks = IntGauge::new(
            "safeclock_clock_breached_open_clocks",
            "Open clocks past their deadline and not yet stopped, held by this instance.",
        )?;
        registry.register(Box::new(paused_clocks.clone()))?;
        registry.register(Box::new(breached_open_clocks.clone()))?;
        registry.register(Box::new(emitted.clone()))?;
        let sla_open_clocks = IntGaugeVec::new(
            Opts::new(
                "safeclock_sla_open_clocks",
                "Open SLA clocks held by this instance, by force, rule, category, risk and state (running, warned = past a warning threshold, paused, breached).",
            ),
            &["force", "rule", "category", "risk", "state"],
        )?;
        let oldest_breach_age = GaugeVec::new(
            Opts::new(
                "safeclock_sla_oldest_breach_age_seconds",
                "Time since the deadline of the oldest open breached clock, by force and rule (absent when none is breached).",
            ),
            &["force", "rule"],
        )?;
        registry.register(Box::new(sla_open_clocks.clone()))?;
        registry.register(Box::new(oldest_breach_age.clone()))?;
        Ok(Self {
            sla_open_clocks,
            oldest_breach_age,
            open_clocks,
            pending_timers,
            paused_clocks,
            breached_open_clocks,
            emitted,
            partitions,
            state_writes,
            referrals_forgotten,
            restore_seconds,
        })
    }
}
