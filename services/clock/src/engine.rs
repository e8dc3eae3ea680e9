//! The SLA engine core: pure, synchronous, no Kafka.
//!
//! [`Engine::on_event`] applies one referral event (event time decides deadlines) and
//! [`Engine::on_tick`] fires every warning and deadline due by the wall clock, so a quiet topic
//! still breaches. Both return the SLA events to publish. Everything the engine emits carries an
//! id derived from its cause, so replaying the same input yields the same records.
//!
//! Semantics kept here, each unit-tested on simulated time:
//! - duplicates (same event id) are ignored;
//! - warnings already past when a clock starts are skipped; the deadline always fires;
//! - a stop whose `occurred_at` is at or before the deadline is `met`, even if it arrives after the
//!   breach fired, in which case a `corrected` record names the breach it corrects;
//! - a stop after the deadline is `met_late`, and the clock's single `breached` is emitted first if
//!   the timer had not fired yet;
//! - a stop that arrives before its start is remembered and completes the clock when the start
//!   arrives;
//! - a cancel event (e.g. referral closed) cancels open clocks.
//!
//! Timers sit in an ordered set keyed by due time, so a tick costs O(log n) per due timer and
//! nothing for clocks that are not due.

use std::collections::{BTreeSet, HashMap, HashSet};

use jiff::{SignedDuration, Timestamp};
use safeclock_common::event::kind_name;
use safeclock_common::ids::derive_id;
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Category, ReferralEvent, RiskGrade, SlaEvent, SlaLabels,
    SlaTransition,
};
use safeclock_common::schema::{duration_from_jiff, enum_label, from_jiff, to_jiff};

use safeclock_common::rules::Rule;

/// How many stop events that arrived before their start are remembered per referral.
const MAX_EARLY_STOPS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClockStatus {
    Running,
    Breached,
}

#[derive(Debug)]
struct Clock {
    /// The start event's id: distinguishes successive clocks of one rule on one referral.
    clock_id: String,
    started_at: Timestamp,
    deadline: Timestamp,
    status: ClockStatus,
    /// Id of the `breached` record, for the correction a late `met` issues.
    breach_id: Option<String>,
    /// Timers carry the generation they were set for; a finished clock's timers are ignored.
    generation: u64,
}

#[derive(Debug)]
struct EarlyStop {
    rule: usize,
    occurred_at: Timestamp,
    event_id: String,
}

#[derive(Debug, Default)]
struct Referral {
    labels: SlaLabels,
    seen_event_ids: HashSet<String>,
    /// One slot per rule.
    clocks: Vec<Option<Clock>>,
    early_stops: Vec<EarlyStop>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// Index into the rule's `warnings_percent`.
    Warning(usize),
    Deadline,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Timestamp,
    seq: u64,
    referral_id: String,
    rule: usize,
    generation: u64,
    kind: TimerKind,
}

/// Counts of what the engine holds, for gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub open_clocks: usize,
    pub breached_open_clocks: usize,
    pub pending_timers: usize,
}

/// The SLA engine for one set of rules.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    referrals: HashMap<String, Referral>,
    timers: BTreeSet<Timer>,
    next_seq: u64,
    next_generation: u64,
}

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            referrals: HashMap::new(),
            timers: BTreeSet::new(),
            next_seq: 0,
            next_generation: 0,
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What the engine holds now.
    pub fn stats(&self) -> EngineStats {
        let mut s = EngineStats {
            pending_timers: self.timers.len(),
            ..EngineStats::default()
        };
        for r in self.referrals.values() {
            for c in r.clocks.iter().flatten() {
                s.open_clocks += 1;
                if c.status == ClockStatus::Breached {
                    s.breached_open_clocks += 1;
                }
            }
        }
        s
    }

    /// Applies one validated referral event at wall-clock time `now`.
    pub fn on_event(&mut self, event: &ReferralEvent, now: Timestamp) -> Vec<SlaEvent> {
        let mut out = Vec::new();
        let (Some(kind), Some(occurred_at)) = (
            event.kind.as_ref(),
            event.occurred_at.as_ref().and_then(to_jiff),
        ) else {
            return out;
        };
        let rule_count = self.rules.len();
        let referral = self
            .referrals
            .entry(event.referral_id.clone())
            .or_insert_with(|| Referral {
                clocks: (0..rule_count).map(|_| None).collect(),
                ..Referral::default()
            });
        if !referral.seen_event_ids.insert(event.event_id.clone()) {
            return out; // duplicate
        }
        update_labels(&mut referral.labels, &event.force_id, kind);
        let kind = kind_name(kind);

        for rule_idx in 0..rule_count {
            let rule = &self.rules[rule_idx];
            if rule.cancels_on(kind) {
                if let Some(clock) = referral.clocks[rule_idx].take() {
                    out.push(transition(
                        rule,
                        &event.referral_id,
                        &referral.labels,
                        &clock,
                        SlaTransition::Cancelled,
                        occurred_at,
                        now,
                        &event.event_id,
                    ));
                }
                continue;
            }
            if rule.stops_on(kind) {
                match &referral.clocks[rule_idx] {
                    Some(clock) if occurred_at >= clock.started_at => {
                        if let Some(clock) = referral.clocks[rule_idx].take() {
                            complete(
                                rule,
                                &event.referral_id,
                                &referral.labels,
                                clock,
                                occurred_at,
                                now,
                                &event.event_id,
                                &mut out,
                            );
                        }
                    }
                    Some(_) => {} // a stop from before this clock began belongs to an earlier episode
                    None => {
                        if referral.early_stops.len() >= MAX_EARLY_STOPS {
                            referral.early_stops.remove(0);
                        }
                        referral.early_stops.push(EarlyStop {
                            rule: rule_idx,
                            occurred_at,
                            event_id: event.event_id.clone(),
                        });
                    }
                }
            }
            if rule.starts_on(kind) && referral.clocks[rule_idx].is_none() {
                let generation = self.next_generation;
                self.next_generation += 1;
                let clock = Clock {
                    clock_id: event.event_id.clone(),
                    started_at: occurred_at,
                    deadline: occurred_at
                        .saturating_add(rule.target)
                        .unwrap_or(occurred_at),
                    status: ClockStatus::Running,
                    breach_id: None,
                    generation,
                };
                out.push(transition(
                    rule,
                    &event.referral_id,
                    &referral.labels,
                    &clock,
                    SlaTransition::Started,
                    occurred_at,
                    now,
                    &event.event_id,
                ));
                // A stop that arrived first completes the clock at once.
                let early = referral
                    .early_stops
                    .iter()
                    .position(|s| s.rule == rule_idx && s.occurred_at >= occurred_at);
                if let Some(pos) = early {
                    let stop = referral.early_stops.remove(pos);
                    complete(
                        rule,
                        &event.referral_id,
                        &referral.labels,
                        clock,
                        stop.occurred_at,
                        now,
                        &stop.event_id,
                        &mut out,
                    );
                    continue;
                }
                for (i, pct) in rule.warnings_percent.iter().enumerate() {
                    let at = warning_at(&clock, rule.target, *pct);
                    if at > now {
                        self.timers.insert(Timer {
                            at,
                            seq: self.next_seq,
                            referral_id: event.referral_id.clone(),
                            rule: rule_idx,
                            generation,
                            kind: TimerKind::Warning(i),
                        });
                        self.next_seq += 1;
                    }
                }
                self.timers.insert(Timer {
                    at: clock.deadline,
                    seq: self.next_seq,
                    referral_id: event.referral_id.clone(),
                    rule: rule_idx,
                    generation,
                    kind: TimerKind::Deadline,
                });
                self.next_seq += 1;
                referral.clocks[rule_idx] = Some(clock);
            }
        }
        out
    }

    /// Fires every warning and deadline due at or before `now`.
    pub fn on_tick(&mut self, now: Timestamp) -> Vec<SlaEvent> {
        let mut out = Vec::new();
        while self.timers.first().is_some_and(|t| t.at <= now) {
            let Some(timer) = self.timers.pop_first() else {
                break;
            };
            let Some(referral) = self.referrals.get_mut(&timer.referral_id) else {
                continue;
            };
            let rule = &self.rules[timer.rule];
            let Some(clock) = referral.clocks[timer.rule].as_mut() else {
                continue;
            };
            if clock.generation != timer.generation || clock.status != ClockStatus::Running {
                continue;
            }
            match timer.kind {
                TimerKind::Warning(i) => {
                    let pct = rule.warnings_percent[i];
                    let mut ev = transition(
                        rule,
                        &timer.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Warning,
                        timer.at,
                        now,
                        "",
                    );
                    ev.warning_percent = pct;
                    ev.sla_event_id = derive_id(&[
                        &timer.referral_id,
                        &rule.id,
                        &clock.clock_id,
                        "warning",
                        &pct.to_string(),
                    ]);
                    out.push(ev);
                }
                TimerKind::Deadline => {
                    let ev = transition(
                        rule,
                        &timer.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Breached,
                        clock.deadline,
                        now,
                        "",
                    );
                    clock.status = ClockStatus::Breached;
                    clock.breach_id = Some(ev.sla_event_id.clone());
                    out.push(ev);
                }
            }
        }
        out
    }
}

fn warning_at(clock: &Clock, target: SignedDuration, pct: u32) -> Timestamp {
    let nanos = target.as_nanos() * i128::from(pct) / 100;
    let offset = SignedDuration::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
    clock
        .started_at
        .saturating_add(offset)
        .unwrap_or(clock.deadline)
}

/// Ends `clock` with a stop that occurred at `stopped_at`.
#[allow(clippy::too_many_arguments)]
fn complete(
    rule: &Rule,
    referral_id: &str,
    labels: &SlaLabels,
    mut clock: Clock,
    stopped_at: Timestamp,
    now: Timestamp,
    cause: &str,
    out: &mut Vec<SlaEvent>,
) {
    if stopped_at <= clock.deadline {
        out.push(transition(
            rule,
            referral_id,
            labels,
            &clock,
            SlaTransition::Met,
            stopped_at,
            now,
            cause,
        ));
        if let Some(breach_id) = clock.breach_id.take() {
            let mut correction = transition(
                rule,
                referral_id,
                labels,
                &clock,
                SlaTransition::Corrected,
                stopped_at,
                now,
                cause,
            );
            correction.corrects_sla_event_id = breach_id;
            out.push(correction);
        }
    } else {
        if clock.status != ClockStatus::Breached {
            // The timer had not fired yet (or the stop arrived before the tick): the clock still
            // breached, exactly once.
            let breach = transition(
                rule,
                referral_id,
                labels,
                &clock,
                SlaTransition::Breached,
                clock.deadline,
                now,
                "",
            );
            clock.status = ClockStatus::Breached;
            out.push(breach);
        }
        out.push(transition(
            rule,
            referral_id,
            labels,
            &clock,
            SlaTransition::MetLate,
            stopped_at,
            now,
            cause,
        ));
    }
}

/// Builds an SLA event for `clock`; its id depends only on the cause.
#[allow(clippy::too_many_arguments)]
fn transition(
    rule: &Rule,
    referral_id: &str,
    labels: &SlaLabels,
    clock: &Clock,
    what: SlaTransition,
    occurred_at: Timestamp,
    now: Timestamp,
    cause_event_id: &str,
) -> SlaEvent {
    let name = what.as_str_name();
    let elapsed = match what {
        SlaTransition::Breached => rule.target,
        _ => occurred_at.duration_since(clock.started_at),
    };
    SlaEvent {
        sla_event_id: derive_id(&[referral_id, &rule.id, &clock.clock_id, name]),
        referral_id: referral_id.to_string(),
        rule_id: rule.id.clone(),
        clock_id: clock.clock_id.clone(),
        transition: what as i32,
        severity: rule.severity as i32,
        labels: Some(labels.clone()),
        started_at: Some(from_jiff(clock.started_at)),
        deadline: Some(from_jiff(clock.deadline)),
        occurred_at: Some(from_jiff(occurred_at)),
        emitted_at: Some(from_jiff(now)),
        elapsed: Some(duration_from_jiff(elapsed)),
        target: Some(duration_from_jiff(rule.target)),
        warning_percent: 0,
        cause_event_id: cause_event_id.to_string(),
        corrects_sla_event_id: String::new(),
        rule_title: rule.title.clone(),
    }
}

/// Keeps the referral's labels current from the attributes events carry.
fn update_labels(labels: &mut SlaLabels, force_id: &str, kind: &Kind) {
    if labels.force_id != force_id {
        labels.force_id = force_id.to_string();
    }
    let set_risk = |labels: &mut SlaLabels, risk: i32| {
        let risk = RiskGrade::try_from(risk).unwrap_or(RiskGrade::Unspecified);
        if risk != RiskGrade::Unspecified {
            labels.risk = enum_label(risk.as_str_name(), "RISK_GRADE_");
        }
    };
    match kind {
        Kind::ReferralReceived(r) => {
            let category = Category::try_from(r.category).unwrap_or(Category::Unspecified);
            labels.category = enum_label(category.as_str_name(), "CATEGORY_");
            set_risk(labels, r.risk);
            let age = AgeBand::try_from(r.child_age_band).unwrap_or(AgeBand::Unspecified);
            labels.child_age_band = enum_label(age.as_str_name(), "AGE_BAND_");
            labels.area = r.area.clone();
            labels.team = r.team.clone();
        }
        Kind::RiskAssessed(r) => set_risk(labels, r.risk),
        Kind::Allocated(a) if !a.team.is_empty() => labels.team = a.team.clone(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeclock_common::rules::builtin_rules;
    use safeclock_common::schema::v1::{ReferralClosed, ReferralReceived, VictimContacted};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn event(id: &str, referral: &str, at: &str, kind: Kind) -> ReferralEvent {
        ReferralEvent {
            event_id: id.into(),
            referral_id: referral.into(),
            force_id: "nottinghamshire".into(),
            occurred_at: Some(from_jiff(ts(at))),
            recorded_at: Some(from_jiff(ts(at))),
            source_system: "test".into(),
            kind: Some(kind),
        }
    }

    fn received(id: &str, at: &str) -> ReferralEvent {
        event(
            id,
            "R-1",
            at,
            Kind::ReferralReceived(ReferralReceived {
                category: Category::Grooming as i32,
                risk: RiskGrade::High as i32,
                child_age_band: AgeBand::Aged13To15 as i32,
                area: "city".into(),
                team: "mash".into(),
                referrer: "school".into(),
            }),
        )
    }

    fn contacted(id: &str, at: &str) -> ReferralEvent {
        event(id, "R-1", at, Kind::VictimContacted(VictimContacted {}))
    }

    fn transitions(events: &[SlaEvent]) -> Vec<SlaTransition> {
        events.iter().map(|e| e.transition()).collect()
    }

    #[test]
    fn origin_case_breaches_at_24_hours_on_a_quiet_topic_then_met_late_at_five_days() {
        let mut engine = Engine::new(builtin_rules());
        let start = "2026-11-29T10:00:00Z";
        let out = engine.on_event(&received("e1", start), ts(start));
        assert_eq!(transitions(&out), [SlaTransition::Started]);
        let started = &out[0];
        assert_eq!(started.labels.as_ref().unwrap().category, "grooming");
        assert_eq!(
            started.labels.as_ref().unwrap().child_age_band,
            "aged_13_to_15"
        );

        // Nothing due before 75 % of the target.
        assert!(engine.on_tick(ts("2026-11-30T03:59:59Z")).is_empty());
        let warn = engine.on_tick(ts("2026-11-30T04:00:00Z"));
        assert_eq!(transitions(&warn), [SlaTransition::Warning]);
        assert_eq!(warn[0].warning_percent, 75);

        // No records arrive; the wall clock alone breaches it.
        assert!(engine.on_tick(ts("2026-11-30T09:59:59Z")).is_empty());
        let breach = engine.on_tick(ts("2026-11-30T10:00:00Z"));
        assert_eq!(transitions(&breach), [SlaTransition::Breached]);
        assert_eq!(
            breach[0].deadline,
            Some(from_jiff(ts("2026-11-30T10:00:00Z")))
        );
        assert_eq!(engine.stats().breached_open_clocks, 1);

        let late = engine.on_event(
            &contacted("e2", "2026-12-04T10:00:00Z"),
            ts("2026-12-04T10:00:00Z"),
        );
        assert_eq!(transitions(&late), [SlaTransition::MetLate]);
        assert_eq!(
            duration_to_secs(late[0].elapsed.as_ref()),
            5 * 24 * 3600,
            "elapsed is measured in event time"
        );
        assert_eq!(engine.stats().open_clocks, 0);
        assert!(engine.on_tick(ts("2027-01-01T00:00:00Z")).is_empty());
    }

    fn duration_to_secs(d: Option<&safeclock_common::schema::ProtoDuration>) -> i64 {
        d.map(|d| d.seconds).unwrap_or_default()
    }

    #[test]
    fn met_in_time_cancels_pending_timers() {
        let mut engine = Engine::new(builtin_rules());
        engine.on_event(
            &received("e1", "2026-11-29T10:00:00Z"),
            ts("2026-11-29T10:00:00Z"),
        );
        let out = engine.on_event(
            &contacted("e2", "2026-11-29T12:00:00Z"),
            ts("2026-11-29T12:00:00Z"),
        );
        assert_eq!(transitions(&out), [SlaTransition::Met]);
        assert!(engine.on_tick(ts("2026-12-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn duplicates_are_ignored_by_event_id() {
        let mut engine = Engine::new(builtin_rules());
        let now = ts("2026-11-29T10:00:00Z");
        assert_eq!(
            engine
                .on_event(&received("e1", "2026-11-29T10:00:00Z"), now)
                .len(),
            1
        );
        assert!(engine
            .on_event(&received("e1", "2026-11-29T10:00:00Z"), now)
            .is_empty());
        assert_eq!(engine.stats().open_clocks, 1);
    }

    #[test]
    fn warnings_already_past_at_start_are_skipped_but_the_deadline_fires() {
        let mut engine = Engine::new(builtin_rules());
        // Recorded 20 hours after it occurred: the 75 % warning (18 h) is already past.
        engine.on_event(
            &received("e1", "2026-11-29T10:00:00Z"),
            ts("2026-11-30T06:00:00Z"),
        );
        let out = engine.on_tick(ts("2026-11-30T10:00:00Z"));
        assert_eq!(transitions(&out), [SlaTransition::Breached]);
    }

    #[test]
    fn a_late_arriving_stop_that_occurred_in_time_is_met_with_a_correction() {
        let mut engine = Engine::new(builtin_rules());
        engine.on_event(
            &received("e1", "2026-11-29T10:00:00Z"),
            ts("2026-11-29T10:00:00Z"),
        );
        let breach = engine.on_tick(ts("2026-11-30T10:00:01Z"));
        let breach = breach
            .iter()
            .find(|e| e.transition() == SlaTransition::Breached)
            .unwrap();
        let out = engine.on_event(
            &contacted("e2", "2026-11-30T09:00:00Z"),
            ts("2026-11-30T11:00:00Z"),
        );
        assert_eq!(
            transitions(&out),
            [SlaTransition::Met, SlaTransition::Corrected]
        );
        assert_eq!(out[1].corrects_sla_event_id, breach.sla_event_id);
    }

    #[test]
    fn a_stop_arriving_before_its_start_completes_the_clock_when_the_start_arrives() {
        let mut engine = Engine::new(builtin_rules());
        let now = ts("2026-11-29T13:00:00Z");
        assert!(engine
            .on_event(&contacted("e2", "2026-11-29T12:00:00Z"), now)
            .is_empty());
        let out = engine.on_event(&received("e1", "2026-11-29T10:00:00Z"), now);
        assert_eq!(
            transitions(&out),
            [SlaTransition::Started, SlaTransition::Met]
        );
        assert_eq!(engine.stats().open_clocks, 0);
        assert!(engine.on_tick(ts("2026-12-30T00:00:00Z")).is_empty());
    }

    #[test]
    fn a_stop_after_the_deadline_before_the_tick_still_breaches_exactly_once() {
        let mut engine = Engine::new(builtin_rules());
        engine.on_event(
            &received("e1", "2026-11-29T10:00:00Z"),
            ts("2026-11-29T10:00:00Z"),
        );
        let out = engine.on_event(
            &contacted("e2", "2026-12-01T10:00:00Z"),
            ts("2026-12-01T10:00:00Z"),
        );
        assert_eq!(
            transitions(&out),
            [SlaTransition::Breached, SlaTransition::MetLate]
        );
        assert!(engine.on_tick(ts("2026-12-30T00:00:00Z")).is_empty());
    }

    #[test]
    fn closing_the_referral_cancels_its_clocks() {
        let mut engine = Engine::new(builtin_rules());
        engine.on_event(
            &received("e1", "2026-11-29T10:00:00Z"),
            ts("2026-11-29T10:00:00Z"),
        );
        let closed = event(
            "e9",
            "R-1",
            "2026-11-29T11:00:00Z",
            Kind::ReferralClosed(ReferralClosed {
                outcome: "no-further-action".into(),
            }),
        );
        let out = engine.on_event(&closed, ts("2026-11-29T11:00:00Z"));
        assert_eq!(transitions(&out), [SlaTransition::Cancelled]);
        assert!(engine.on_tick(ts("2026-12-30T00:00:00Z")).is_empty());
    }

    #[test]
    fn replaying_the_same_input_reproduces_the_same_ids() {
        let run = || {
            let mut engine = Engine::new(builtin_rules());
            let mut ids = Vec::new();
            for e in engine.on_event(
                &received("e1", "2026-11-29T10:00:00Z"),
                ts("2026-11-29T10:00:00Z"),
            ) {
                ids.push(e.sla_event_id);
            }
            for e in engine.on_tick(ts("2026-12-01T00:00:00Z")) {
                ids.push(e.sla_event_id);
            }
            ids
        };
        let first = run();
        assert_eq!(first.len(), 3);
        assert_eq!(first, run());
    }
}
