//! SLA rules: which event starts a clock, which stops it, and how long it may run.
//!
//! A rule is data. This foundation ships one built-in rule; the rule pack in `deploy/rules/`
//! (files loaded through configuration, with calendars, pauses and per-force overrides) replaces
//! [`builtin_rules`] without changing the engine's interface.

use crate::schema::v1::Severity;
use jiff::SignedDuration;

/// One timescale.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Stable id, used in metric labels, SLA events and record ids.
    pub id: String,
    /// What a supervisor reads in a notification.
    pub title: String,
    /// Where the timescale comes from; `LOCAL` ones are force practice, not national law.
    pub source: String,
    pub severity: Severity,
    /// Event kinds (contract names, e.g. `referral_received`) that start the clock.
    pub start: Vec<String>,
    /// Event kinds that stop it (met, or met late).
    pub stop: Vec<String>,
    /// Event kinds that cancel it (the referral no longer needs it).
    pub cancel: Vec<String>,
    /// Calendar time from start to deadline.
    pub target: SignedDuration,
    /// Warnings at these percentages of the target, ascending.
    pub warnings_percent: Vec<u32>,
}

impl Rule {
    pub fn starts_on(&self, kind: &str) -> bool {
        self.start.iter().any(|k| k == kind)
    }
    pub fn stops_on(&self, kind: &str) -> bool {
        self.stop.iter().any(|k| k == kind)
    }
    pub fn cancels_on(&self, kind: &str) -> bool {
        self.cancel.iter().any(|k| k == kind)
    }
}

/// The built-in rule set of the foundation: first contact with the child victim within 24 hours
/// of a child-protection referral. The origin case (a grooming report about a 13-year-old answered
/// after five days) breaches it on day one.
pub fn builtin_rules() -> Vec<Rule> {
    vec![Rule {
        id: "victim-contact".into(),
        title: "Child victim contacted within 24 hours of the referral".into(),
        source: "LOCAL: first response to a child-protection referral; HMIC Nottinghamshire \
                 child protection inspection (2015) judged five days a failure"
            .into(),
        severity: Severity::High,
        start: vec!["referral_received".into()],
        stop: vec!["victim_contacted".into()],
        cancel: vec!["referral_closed".into()],
        target: SignedDuration::from_hours(24),
        warnings_percent: vec![75],
    }]
}

/// Bounds a label value to a known set: anything else becomes `other`, so a bad input cannot
/// create unbounded metric series.
#[derive(Debug, Clone)]
pub struct LabelSet {
    known: std::collections::HashSet<String>,
}

impl LabelSet {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(values: I) -> Self {
        Self {
            known: values.into_iter().map(Into::into).collect(),
        }
    }

    /// `value` if known, else `"other"`.
    pub fn bound<'a>(&'a self, value: &'a str) -> &'a str {
        if self.known.contains(value) {
            value
        } else {
            "other"
        }
    }
}
