//! The responsiveness metrics Grafana dashboards and alert rules read.
//!
//! Labels come from small fixed sets only: force (configured forces, else `other`), rule (known
//! rules, else `other`), category and risk (contract enums, else `other`), transition and
//! severity. Never a referral id or anything personal. docs/metrics.md lists every series.
//!
//! The time-to-stop histogram has buckets per rule, placed at the rule's targets and their
//! multiples, so "how many were stopped within the target" is one bucket for every rule, whether
//! its target is 15 minutes or 6 months. Prometheus allows bucket bounds to differ between the
//! series of one histogram. The values live in [`crate::totals`], which survives restarts.

use std::collections::HashMap;

use prometheus::Registry;
use safeclock_calendar::{CivilUnit, Target};
use safeclock_common::rules::Rule;

use crate::totals::TotalsMetrics;

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

/// Registers the exporter's metrics, with time-to-stop buckets for each of `rules`.
///
/// # Errors
/// When a metric of the same name is already registered.
pub fn register(registry: &Registry, rules: &[Rule]) -> prometheus::Result<TotalsMetrics> {
    let buckets: HashMap<String, Vec<f64>> = rules
        .iter()
        .map(|r| (r.id.clone(), rule_buckets(r)))
        .collect();
    let metrics = TotalsMetrics::new(buckets, OTHER_RULE_BUCKETS.to_vec());
    metrics.register(registry)?;
    Ok(metrics)
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
    fn every_rule_gets_its_own_buckets_under_one_metric_name() {
        let pack = RuleSet::default_pack().unwrap();
        let registry = Registry::new();
        let metrics = register(&registry, &pack.rules).unwrap();
        let mut totals = crate::totals::Totals::default();
        for rule in &pack.rules {
            let labels = [rule.id.as_str(), "f", "grooming", "high"];
            totals.time_to_stop(metrics.bounds(&rule.id), labels, Some(60.0));
        }
        metrics
            .lock()
            .insert((crate::totals::Input::SlaEvents, 0), totals);
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == crate::totals::TIME_TO_STOP)
            .unwrap();
        assert_eq!(family.get_metric().len(), pack.rules.len());
    }
}
