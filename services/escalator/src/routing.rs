//! Which escalation policies an SLA event goes to: an ordered route tree on its labels.
//!
//! Modelled on Alertmanager's routing, which on-call teams already know: routes are tried in
//! order and the first that matches wins, unless it says `continue`, in which case the next
//! siblings are tried too. A matching route's children are tried in turn; if none matches, the
//! route itself applies. Children inherit their parent's policies unless they name their own.
//! When no top-level route matches, the default route applies.
//!
//! A route names a policy for breaches and, separately, for warnings, so a warning can page a
//! team's queue while a breach goes to the duty inspector. A route that matches but names no
//! policy for the event's threshold deliberately escalates nothing.

use std::collections::HashMap;

use safeclock_common::config::{
    EscalatorSettings, PolicySettings, ReceiverKind, ReceiverSettings, RouteMatch, RouteSettings,
};
use safeclock_common::schema::enum_label;
use safeclock_common::schema::v1::{SlaEvent, SlaTransition};

/// Which kind of threshold an SLA event crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    Warning,
    Breach,
}

impl Threshold {
    /// The threshold of `event`, if it is one that escalates.
    pub fn of(event: &SlaEvent) -> Option<Self> {
        match event.transition() {
            SlaTransition::Warning => Some(Threshold::Warning),
            SlaTransition::Breached => Some(Threshold::Breach),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Threshold::Warning => "warning",
            Threshold::Breach => "breach",
        }
    }
}

/// What the engine needs to know about a receiver.
#[derive(Debug, Clone)]
pub struct ReceiverInfo {
    pub kind: ReceiverKind,
    pub fallback: Option<String>,
    /// Alertmanager: how often firing alerts are posted again, in ms.
    pub refresh_ms: i64,
}

/// The routing table, policies and receivers, validated by the configuration.
#[derive(Debug, Clone)]
pub struct Routing {
    routes: Vec<RouteSettings>,
    default_policy: Policies,
    escalate_warnings: bool,
    policies: HashMap<String, PolicySettings>,
    receivers: HashMap<String, ReceiverInfo>,
}

/// The policies a route names.
#[derive(Debug, Clone, Default)]
struct Policies {
    policy: Option<String>,
    warning: Option<String>,
    breach: Option<String>,
}

impl Policies {
    fn inherit(&self, r: &RouteSettings) -> Policies {
        // A child that names any policy replaces its parent's set; otherwise it inherits it.
        if r.policy.is_some() || r.warning_policy.is_some() || r.breach_policy.is_some() {
            Policies {
                policy: r.policy.clone(),
                warning: r.warning_policy.clone(),
                breach: r.breach_policy.clone(),
            }
        } else {
            self.clone()
        }
    }

    fn for_threshold(&self, t: Threshold, escalate_warnings: bool) -> Option<&String> {
        match t {
            Threshold::Breach => self.breach.as_ref().or(self.policy.as_ref()),
            Threshold::Warning => self
                .warning
                .as_ref()
                .or(self.policy.as_ref().filter(|_| escalate_warnings)),
        }
    }
}

impl Routing {
    /// Builds the routing from validated settings.
    pub fn new(settings: &EscalatorSettings) -> Self {
        let receivers = settings
            .all_receivers()
            .into_iter()
            .map(|r: ReceiverSettings| {
                let info = ReceiverInfo {
                    kind: r.kind,
                    fallback: r.fallback.clone(),
                    refresh_ms: i64::try_from(r.refresh_interval_secs.saturating_mul(1000))
                        .unwrap_or(i64::MAX),
                };
                (r.name, info)
            })
            .collect();
        Self {
            routes: settings.routes.clone(),
            default_policy: Policies {
                policy: settings.default_route.policy.clone(),
                warning: settings.default_route.warning_policy.clone(),
                breach: settings.default_route.breach_policy.clone(),
            },
            escalate_warnings: settings.escalate_warnings,
            policies: settings
                .all_policies()
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            receivers,
        }
    }

    pub fn policy(&self, name: &str) -> Option<&PolicySettings> {
        self.policies.get(name)
    }

    pub fn receiver(&self, name: &str) -> Option<&ReceiverInfo> {
        self.receivers.get(name)
    }

    /// The most levels any policy has (bounds the `level` metric label).
    pub fn max_levels(&self) -> usize {
        self.policies
            .values()
            .map(|p| p.levels.len())
            .max()
            .unwrap_or(1)
    }

    /// The policies `event` escalates through, in route order, without duplicates. Empty when
    /// the event does not escalate.
    pub fn policies_for(&self, event: &SlaEvent) -> Vec<String> {
        let Some(threshold) = Threshold::of(event) else {
            return Vec::new();
        };
        let facts = Facts::of(event, threshold);
        let mut matched = Vec::new();
        collect(&self.routes, &facts, &self.default_policy, &mut matched);
        if matched.is_empty() {
            matched.push(self.default_policy.clone());
        }
        let mut out: Vec<String> = Vec::new();
        for p in matched {
            if let Some(name) = p.for_threshold(threshold, self.escalate_warnings) {
                if !out.contains(name) && self.policies.contains_key(name) {
                    out.push(name.clone());
                }
            }
        }
        out
    }
}

/// The values routes match on.
struct Facts<'a> {
    force: &'a str,
    area: &'a str,
    team: &'a str,
    category: &'a str,
    risk: &'a str,
    rule: &'a str,
    severity: String,
    threshold: &'static str,
}

impl<'a> Facts<'a> {
    fn of(event: &'a SlaEvent, threshold: Threshold) -> Self {
        let (force, area, team, category, risk) = match &event.labels {
            Some(l) => (
                l.force_id.as_str(),
                l.area.as_str(),
                l.team.as_str(),
                l.category.as_str(),
                l.risk.as_str(),
            ),
            None => ("", "", "", "", ""),
        };
        Facts {
            force,
            area,
            team,
            category,
            risk,
            rule: &event.rule_id,
            severity: enum_label(event.severity().as_str_name(), "SEVERITY_"),
            threshold: threshold.label(),
        }
    }

    fn matches(&self, m: &RouteMatch) -> bool {
        let ok = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        ok(&m.force, self.force)
            && ok(&m.area, self.area)
            && ok(&m.team, self.team)
            && ok(&m.category, self.category)
            && ok(&m.risk, self.risk)
            && ok(&m.rule, self.rule)
            && ok(&m.severity, &self.severity)
            && ok(&m.threshold, self.threshold)
    }
}

fn collect(
    routes: &[RouteSettings],
    facts: &Facts<'_>,
    parent: &Policies,
    out: &mut Vec<Policies>,
) {
    for r in routes {
        if !facts.matches(&r.matchers) {
            continue;
        }
        let mine = parent.inherit(r);
        let before = out.len();
        collect(&r.routes, facts, &mine, out);
        if out.len() == before {
            out.push(mine);
        }
        if !r.continue_matching {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeclock_common::config::Settings;
    use safeclock_common::schema::v1::{Severity, SlaLabels};

    /// Escalator settings from `toml`, with the `log` receiver on (the tests route to it).
    fn settings(toml: &str) -> EscalatorSettings {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, toml.as_bytes()).unwrap();
        let log = ("SAFECLOCK__ESCALATOR__LOG_RECEIVER".into(), "true".into());
        Settings::load_with_env(Some(f.path()), vec![log])
            .unwrap()
            .escalator
    }

    fn event(t: SlaTransition, force: &str, risk: &str, rule: &str) -> SlaEvent {
        SlaEvent {
            transition: t as i32,
            rule_id: rule.into(),
            severity: Severity::High as i32,
            labels: Some(SlaLabels {
                force_id: force.into(),
                risk: risk.into(),
                category: "grooming".into(),
                ..SlaLabels::default()
            }),
            ..SlaEvent::default()
        }
    }

    const CONFIG: &str = r#"
[[escalator.receivers]]
name = "a"
kind = "log"
[[escalator.receivers]]
name = "b"
kind = "log"
[[escalator.policies]]
name = "notts"
levels = [{ receivers = ["a"] }]
[[escalator.policies]]
name = "notts-high"
levels = [{ receivers = ["b"] }]
[[escalator.policies]]
name = "queue"
levels = [{ receivers = ["a"] }]
[[escalator.policies]]
name = "audit"
levels = [{ receivers = ["b"] }]

[[escalator.routes]]
name = "everything is audited"
policy = "audit"
continue = true

[[escalator.routes]]
match = { force = ["nottinghamshire"] }
policy = "notts"
warning_policy = "queue"
  [[escalator.routes.routes]]
  match = { risk = ["high", "critical"], threshold = ["breach"] }
  breach_policy = "notts-high"
  [[escalator.routes.routes]]
  match = { rule = ["quiet-rule"] }
"#;

    #[test]
    fn first_match_continue_children_and_inheritance() {
        let r = Routing::new(&settings(CONFIG));
        let b =
            |force, risk, rule| r.policies_for(&event(SlaTransition::Breached, force, risk, rule));
        // The audit route continues; the force route's high-risk child wins for a high breach.
        assert_eq!(b("nottinghamshire", "high", "x"), ["audit", "notts-high"]);
        // Its low-risk breach: no child matches, so the force route applies.
        assert_eq!(b("nottinghamshire", "low", "x"), ["audit", "notts"]);
        // A child without policies inherits its parent's.
        assert_eq!(
            b("nottinghamshire", "low", "quiet-rule"),
            ["audit", "notts"]
        );
        // Another force: only the audit route (it matched, so the default route does not apply).
        assert_eq!(b("derbyshire", "high", "x"), ["audit"]);
        // Warnings go to the warning policy; the audit route names none for warnings.
        let w = r.policies_for(&event(
            SlaTransition::Warning,
            "nottinghamshire",
            "high",
            "x",
        ));
        assert_eq!(w, ["queue"]);
        // Transitions that do not escalate route nowhere.
        assert!(r
            .policies_for(&event(SlaTransition::Met, "nottinghamshire", "high", "x"))
            .is_empty());
    }

    #[test]
    fn default_route_and_warnings_follow_escalate_warnings() {
        let mut s = settings("");
        let r = Routing::new(&s);
        let e = |t| event(t, "kent", "low", "x");
        assert_eq!(r.policies_for(&e(SlaTransition::Breached)), ["default"]);
        assert!(r.policies_for(&e(SlaTransition::Warning)).is_empty());
        s.escalate_warnings = true;
        let r = Routing::new(&s);
        assert_eq!(r.policies_for(&e(SlaTransition::Warning)), ["default"]);
        // The implicit default policy pages every receiver at once.
        assert_eq!(
            r.policy("default").unwrap().levels[0].receivers,
            vec!["log".to_string()]
        );
    }

    #[test]
    fn severity_matches_its_short_code() {
        let r = Routing::new(&settings(
            r#"
[[escalator.policies]]
name = "p"
levels = [{ receivers = ["log"] }]
[[escalator.routes]]
match = { severity = ["high"] }
policy = "p"
"#,
        ));
        assert_eq!(
            r.policies_for(&event(SlaTransition::Breached, "kent", "low", "x")),
            ["p"]
        );
    }
}
