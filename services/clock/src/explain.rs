//! `safeclock explain`: replay referral events offline through the engine and show each clock's
//! timeline, for the inspector who asks "why was this late?".
//!
//! Events are applied in the order the force's systems recorded them (`recorded_at`, falling back
//! to `occurred_at`), with the wall clock set to each event's recorded time, so warnings and
//! breaches fire exactly when they would have fired live. Nothing is read from or written to
//! Kafka.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use jiff::{SignedDuration, Timestamp};
use safeclock_common::event::{decode_referral_event, kind_name, transition_label, Rejection};
use safeclock_common::policy::Policy;
use safeclock_common::rules::Condition;
use safeclock_common::schema::v1::{ReferralEvent, SlaEvent, SlaTransition};
use safeclock_common::schema::{duration_to_jiff, to_jiff};

use crate::engine::{Engine, OpenClock};

/// A line of the input that is not a valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub rejection: Rejection,
}

/// One clock's story.
#[derive(Debug, Clone)]
pub struct ClockTimeline {
    pub referral_id: String,
    pub rule_id: String,
    pub clock_id: String,
    /// Every transition, in the order the engine emitted them.
    pub transitions: Vec<SlaEvent>,
    /// Set when the clock is still open at the end of the replay.
    pub open: Option<OpenClock>,
}

impl ClockTimeline {
    /// The breach, if the clock breached.
    pub fn breach(&self) -> Option<&SlaEvent> {
        self.transitions
            .iter()
            .find(|e| e.transition() == SlaTransition::Breached)
    }

    /// The final outcome in words.
    pub fn outcome(&self) -> &'static str {
        let last = self
            .transitions
            .iter()
            .rev()
            .map(SlaEvent::transition)
            .find(|t| {
                matches!(
                    t,
                    SlaTransition::Met
                        | SlaTransition::MetLate
                        | SlaTransition::Cancelled
                        | SlaTransition::Corrected
                )
            });
        match (last, &self.open) {
            (Some(SlaTransition::Met | SlaTransition::Corrected), _) => "met",
            (Some(SlaTransition::MetLate), _) => "met late",
            (Some(SlaTransition::Cancelled), _) => "cancelled",
            (_, Some(o)) if o.breached => "still open, breached",
            (_, Some(_)) => "still open",
            _ => "unknown",
        }
    }
}

/// The result of a replay.
#[derive(Debug, Clone, Default)]
pub struct Explanation {
    pub clocks: Vec<ClockTimeline>,
    pub bad_lines: Vec<BadLine>,
    /// Events the engine refused (past a `[clock.limits]` limit): (event id, why).
    pub refused: Vec<(String, crate::engine::LimitExceeded)>,
    /// The events read, by id (to say which event caused what).
    pub events: HashMap<String, ReferralEvent>,
    /// The wall-clock time the replay ran up to.
    pub until: Option<Timestamp>,
}

fn arrival(e: &ReferralEvent) -> Option<Timestamp> {
    e.recorded_at
        .as_ref()
        .and_then(to_jiff)
        .or_else(|| e.occurred_at.as_ref().and_then(to_jiff))
}

/// Replays the JSON-lines `input` through `policy`, optionally for one referral and up to
/// `until` (default: the last event's recorded time).
pub fn replay(
    policy: &Policy,
    input: &str,
    referral: Option<&str>,
    until: Option<Timestamp>,
) -> Explanation {
    let mut out = Explanation::default();
    let mut events = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with("//") {
            continue;
        }
        match decode_referral_event(line.as_bytes()) {
            Ok(e) => {
                if referral.is_none_or(|r| r == e.referral_id) {
                    events.push(e);
                }
            }
            Err(rejection) => out.bad_lines.push(BadLine {
                line: i + 1,
                rejection,
            }),
        }
    }
    events.sort_by_key(arrival);
    let mut engine = Engine::with_limits(
        policy.rules.clone(),
        policy.calendars.clone(),
        policy.limits,
    );
    let mut emitted: Vec<SlaEvent> = Vec::new();
    for e in &events {
        let Some(now) = arrival(e) else { continue };
        emitted.extend(engine.on_tick(now));
        match engine.on_event(e, now) {
            Ok(out) => emitted.extend(out),
            Err(why) => out.refused.push((e.event_id.clone(), why)),
        }
    }
    let end = until.or_else(|| events.iter().filter_map(arrival).max());
    if let Some(end) = end {
        emitted.extend(engine.on_tick(end));
    }
    out.until = end;

    let mut by_clock: BTreeMap<(String, String, String), Vec<SlaEvent>> = BTreeMap::new();
    for ev in emitted {
        by_clock
            .entry((
                ev.referral_id.clone(),
                ev.rule_id.clone(),
                ev.clock_id.clone(),
            ))
            .or_default()
            .push(ev);
    }
    for ((referral_id, rule_id, clock_id), transitions) in by_clock {
        let open = engine
            .open_clocks(&referral_id)
            .into_iter()
            .find(|c| c.rule_id == rule_id && c.clock_id == clock_id);
        out.clocks.push(ClockTimeline {
            referral_id,
            rule_id,
            clock_id,
            transitions,
            open,
        });
    }
    out.events = events
        .into_iter()
        .map(|e| (e.event_id.clone(), e))
        .collect();
    out
}

fn london(ts: Timestamp) -> String {
    let tz = safeclock_calendar::london();
    ts.to_zoned(tz).strftime("%a %Y-%m-%d %H:%M %Z").to_string()
}

/// A duration in days, hours and minutes.
pub fn human(d: SignedDuration) -> String {
    let total = d.as_secs().abs();
    let sign = if d.is_negative() { "-" } else { "" };
    let (days, hours, mins) = (total / 86_400, (total % 86_400) / 3600, (total % 3600) / 60);
    match (days, hours, mins) {
        (0, 0, m) => format!("{sign}{m} min"),
        (0, h, 0) => format!("{sign}{h} h"),
        (0, h, m) => format!("{sign}{h} h {m} min"),
        (d, 0, _) => format!("{sign}{d} d"),
        (d, h, _) => format!("{sign}{d} d {h} h"),
    }
}

fn describe_condition(c: &Condition) -> String {
    if c.predicates.is_empty() {
        return c.event.clone();
    }
    let preds: Vec<String> = c
        .predicates
        .iter()
        .map(|(k, v)| {
            let vals: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("{k} = {}", vals.join(" | "))
        })
        .collect();
    format!("{} where {}", c.event, preds.join(", "))
}

/// Renders the explanation for people.
pub fn render(policy: &Policy, x: &Explanation) -> String {
    let mut s = String::new();
    for bad in &x.bad_lines {
        let _ = writeln!(s, "line {}: skipped, {}", bad.line, bad.rejection);
    }
    for (event_id, why) in &x.refused {
        let _ = writeln!(s, "event {event_id}: refused ({}), {why}", why.reason());
    }
    let mut current = String::new();
    for clock in &x.clocks {
        if clock.referral_id != current {
            current = clock.referral_id.clone();
            let labels = clock
                .transitions
                .first()
                .and_then(|t| t.labels.clone())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "\nreferral {} ({}; category {}, risk {}, child {})",
                clock.referral_id,
                labels.force_id,
                or_dash(&labels.category),
                or_dash(&labels.risk),
                or_dash(&labels.child_age_band)
            );
        }
        let Some(rule) = policy.rules.get(&clock.rule_id) else {
            continue;
        };
        let first = clock.transitions.first();
        let target = first
            .and_then(|t| t.target.as_ref())
            .map(|d| human(duration_to_jiff(d)))
            .unwrap_or_default();
        let _ = writeln!(s, "\n  {}: {}", rule.id, rule.title);
        let _ = writeln!(
            s,
            "    source: {}{}{}",
            rule.source,
            if rule.local {
                " [LOCAL default, overridable per force]"
            } else {
                ""
            },
            if rule.unconfirmed {
                " [unconfirmed figure]"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "    target: {} ({} allowed for this clock)",
            first
                .and_then(|t| t.labels.as_ref())
                .map_or(&rule.target, |l| rule.target_for(&l.force_id, &l.risk)),
            target
        );
        if let Some(cause) = first.and_then(|t| x.events.get(&t.cause_event_id)) {
            let kind = cause.kind.as_ref().map(kind_name).unwrap_or_default();
            let how = rule
                .start
                .iter()
                .chain(&rule.stop)
                .chain(&rule.reset)
                .find(|c| c.event == kind)
                .map(describe_condition)
                .unwrap_or_else(|| kind.to_string());
            let _ = writeln!(s, "    why: started by event {} ({how})", cause.event_id);
        }
        if !rule.applies_to.is_empty() {
            let conds: Vec<String> = rule
                .applies_to
                .iter()
                .map(|(f, v)| {
                    let mut v: Vec<&String> = v.iter().collect();
                    v.sort();
                    format!("{f:?} in {v:?}").to_lowercase()
                })
                .collect();
            let _ = writeln!(s, "    applies to referrals with {}", conds.join(" and "));
        }
        for t in &clock.transitions {
            let at = t
                .occurred_at
                .as_ref()
                .and_then(to_jiff)
                .map(london)
                .unwrap_or_default();
            let deadline = t
                .deadline
                .as_ref()
                .and_then(to_jiff)
                .map(london)
                .unwrap_or_default();
            let elapsed = t
                .elapsed
                .as_ref()
                .map(|d| human(duration_to_jiff(d)))
                .unwrap_or_default();
            let cause = x
                .events
                .get(&t.cause_event_id)
                .and_then(|e| e.kind.as_ref())
                .map(kind_name)
                .unwrap_or_default();
            let detail = match t.transition() {
                SlaTransition::Started => format!("deadline {deadline}"),
                SlaTransition::Warning => format!(
                    "{}% of the allowed time used, deadline {deadline}",
                    t.warning_percent
                ),
                SlaTransition::Breached => format!(
                    "deadline passed with no {}",
                    rule.stop
                        .iter()
                        .map(|c| c.event.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                SlaTransition::Met => format!("{cause} after {elapsed}, within the target"),
                SlaTransition::MetLate => format!("{cause} after {elapsed}, target was {target}"),
                SlaTransition::Paused => format!("paused by {cause}"),
                SlaTransition::Resumed => format!("resumed by {cause}, deadline now {deadline}"),
                SlaTransition::Cancelled => format!("cancelled by {cause}"),
                SlaTransition::Corrected => {
                    "the breach above is corrected: the stop occurred in time but was recorded late"
                        .to_string()
                }
                SlaTransition::Unspecified => String::new(),
            };
            let _ = writeln!(
                s,
                "    {at}  {:<9} {detail}",
                transition_label(t.transition()).to_uppercase()
            );
        }
        let _ = writeln!(s, "    outcome: {}", clock.outcome());
        if let Some(open) = &clock.open {
            let _ = writeln!(
                s,
                "    open at the end of the replay; deadline {}",
                london(open.deadline)
            );
        }
    }
    if x.clocks.is_empty() {
        let _ = writeln!(s, "no clock started for these events");
    }
    s
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}
