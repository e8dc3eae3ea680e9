//! The responsiveness metrics Grafana dashboards and alert rules read.
//!
//! Labels come from small fixed sets only: force (configured forces, else `other`), rule (known
//! rules, else `other`), category and risk (contract enums, else `other`), transition and
//! severity. Never a referral id or anything personal. docs/metrics.md lists every series.
//!
//! The time-to-stop histogram has buckets per rule, placed at the rule's targets and their
//! multiples, so "how many were stopped within the target" is one bucket for every rule, whether
//! its target is 15 minutes or 6 months. Prometheus allows bucket bounds to differ between the
//! series of one histogram; each rule is registered as its own collector under the same name,
//! with `rule` as a constant label.

use std::collections::HashMap;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use safeclock_calendar::{CivilUnit, Target};
use safeclock_common::rules::Rule;

/// Multiples of a rule's target that get a bucket bound.
pub const TARGET_MULTIPLES: [f64; 8] = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0];

/// Buckets for SLA events of rules the exporter does not know (`rule="other"`): 15 minutes to
/// 26 weeks.
pub const OTHER_RULE_BUCKETS: [f64; 12] = [
    900.0,
    3_600.0,
    4.0 * 3_600.0,
    24.0 * 3_600.0,
    72.0 * 3_600.0,
    7.0 * 86_400.0,
    14.0 * 86_400.0,
    28.0 * 86_400.0,
    70.0 * 86_400.0,
    91.0 * 86_400.0,
    182.0 * 86_400.0,
    365.0 * 86_400.0,
];

const TIME_TO_STOP: &str = "safeclock_sla_time_to_stop_seconds";
const TIME_TO_STOP_HELP: &str =
    "Time from clock start to the stop event (met or met late), in event time, minus pauses.";

/// A target's nominal length in seconds, for bucket placement: working days count 7/5 of a
/// calendar day (a week of five working days is seven days long), months 30.44 days, the next
/// school day one day.
pub fn nominal_seconds(target: &Target) -> f64 {
    const DAY: f64 = 86_400.0;
    match *target {
        Target::Exact { seconds } => seconds.get() as f64,
        Target::Civil { count, unit } => {
            let days = match unit {
                CivilUnit::Days => 1.0,
                CivilUnit::Weeks => 7.0,
                CivilUnit::Months => 30.44,
            };
            f64::from(count.get()) * days * DAY
        }
        Target::WorkingDays(n) => f64::from(n.get()) * DAY * 7.0 / 5.0,
        Target::NextSchoolDay => DAY,
    }
}

/// Bucket bounds for a rule: every target it can have (default, by risk, per force) times
/// [`TARGET_MULTIPLES`], sorted, without near-duplicates.
pub fn rule_buckets(rule: &Rule) -> Vec<f64> {
    let mut targets: Vec<&Target> = vec![&rule.target];
    targets.extend(rule.targets_by_risk.values());
    for o in rule.overrides.values() {
        targets.extend(o.target.iter());
        targets.extend(o.targets_by_risk.values());
    }
    let mut bounds: Vec<f64> = targets
        .into_iter()
        .flat_map(|t| {
            let s = nominal_seconds(t);
            TARGET_MULTIPLES.iter().map(move |m| (s * m).round())
        })
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup_by(|a, b| (*a - *b).abs() < 1.0);
    bounds
}

#[derive(Clone)]
pub struct ExporterMetrics {
    /// `safeclock_referrals_received_total{force,category,risk}`
    pub referrals_received: IntCounterVec,
    /// `safeclock_sla_transitions_total{force,rule,category,risk,transition}`: clocks started,
    /// warned, breached, met, met late, cancelled, corrected, paused, resumed.
    pub transitions: IntCounterVec,
    /// `safeclock_sla_breaches_total{force,rule,severity}`
    pub breaches: IntCounterVec,
    /// `safeclock_sla_time_to_stop_seconds{force,category,risk}` per rule (constant label
    /// `rule`): clock start to stop (met or met late).
    time_to_stop: HashMap<String, HistogramVec>,
    /// The same for rules not known to this exporter (`rule="other"`).
    time_to_stop_other: HistogramVec,
}

impl ExporterMetrics {
    /// Registers the exporter's metrics, with time-to-stop buckets for each of `rules`.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry, rules: &[Rule]) -> prometheus::Result<Self> {
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
                "SLA clock transitions (started, warning, breached, met, met_late, cancelled, corrected, paused, resumed), by force, rule, category and risk.",
            ),
            &["force", "rule", "category", "risk", "transition"],
        )?;
        let breaches = IntCounterVec::new(
            Opts::new(
                "safeclock_sla_breaches_total",
                "SLA clocks that passed their deadline, by force, rule and severity.",
            ),
            &["force", "rule", "severity"],
        )?;
        registry.register(Box::new(referrals_received.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(breaches.clone()))?;
        let histogram = |rule: &str, buckets: Vec<f64>| -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(
                HistogramOpts::new(TIME_TO_STOP, TIME_TO_STOP_HELP)
                    .const_label("rule", rule)
                    .buckets(buckets),
                &["force", "category", "risk"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let mut time_to_stop = HashMap::new();
        for rule in rules {
            time_to_stop.insert(rule.id.clone(), histogram(&rule.id, rule_buckets(rule))?);
        }
        let time_to_stop_other = histogram("other", OTHER_RULE_BUCKETS.to_vec())?;
        Ok(Self {
            referrals_received,
            transitions,
            breaches,
            time_to_stop,
            time_to_stop_other,
        })
    }

    /// The time-to-stop histogram of `rule` (the `other` one for unknown rules).
    pub fn time_to_stop(&self, rule: &str) -> &HistogramVec {
        self.time_to_stop
            .get(rule)
            .unwrap_or(&self.time_to_stop_other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeclock_common::rules::RuleSet;

    #[test]
    fn buckets_sit_at_each_target_and_its_multiples() {
        let pack = RuleSet::default_pack().unwrap();
        for rule in &pack.rules {
            let buckets = rule_buckets(rule);
            let target = nominal_seconds(&rule.target).round();
            assert!(
                buckets.iter().any(|b| (b - target).abs() < 1.0),
                "{}: no bucket at the target {target} s in {buckets:?}",
                rule.id
            );
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{}", rule.id);
        }
        let victim = pack.get("victim-contact-24h");
        if let Some(rule) = victim {
            assert!(rule_buckets(rule).contains(&86_400.0));
        }
    }

    #[test]
    fn every_rule_registers_under_one_metric_name() {
        let pack = RuleSet::default_pack().unwrap();
        let registry = Registry::new();
        let metrics = ExporterMetrics::register(&registry, &pack.rules).unwrap();
        for rule in &pack.rules {
            metrics
                .time_to_stop(&rule.id)
                .with_label_values(&["f", "grooming", "high"])
                .observe(60.0);
        }
        let families = registry.gather();
        let family = families.iter().find(|f| f.name() == TIME_TO_STOP).unwrap();
        assert_eq!(family.get_metric().len(), pack.rules.len());
    }
}
