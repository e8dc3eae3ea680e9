//! The SLA engine core: pure, synchronous, no Kafka.
//!
//! [`Engine::on_event`] applies one referral event (event time decides deadlines) and
//! [`Engine::on_tick`] fires every warning and deadline due by the wall clock, so a quiet topic
//! still breaches. Both return the SLA events to publish. Everything the engine emits carries an
//! id derived from its cause, so replaying the same input yields the same records.
//!
//! Semantics, each unit-tested on simulated time:
//! - rules are data ([`RuleSet`]): start, stop, pause, resume, reset and cancel conditions are
//!   event kinds with attribute predicates; `applies_to` tests the referral's labels;
//! - the deadline is computed from the start event's `occurred_at` on the rule's calendar
//!   (24x7, the force's working days, school days) with the force's override, if any;
//! - duplicates (same event id) are ignored;
//! - warnings already past when a clock starts are skipped; the deadline always fires;
//! - pause/resume shifts the deadline by the time paused;
//! - re-grading the referral's risk recomputes the target of graded rules, and may breach at
//!   once (the deadline timer is then already due);
//! - reset restarts the clock from the reset event (the old clock is cancelled);
//! - a stop whose `occurred_at` is at or before the deadline is `met`, even if it arrives after
//!   the breach fired, in which case a `corrected` record names the breach it corrects;
//! - a stop after the deadline is `met_late`, and the clock's single `breached` is emitted first
//!   if the timer had not fired yet;
//! - a stop that arrives before its start is remembered and completes the clock when the start
//!   arrives;
//! - repeating rules start the next clock at the stop time;
//! - cancel events (e.g. referral closed) cancel open clocks.
//!
//! Timers sit in an ordered set keyed by due time, so a tick costs O(log n) per due timer and
//! nothing for clocks that are not due.

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use jiff::{SignedDuration, Timestamp};
use safeclock_common::event::kind_name;
use safeclock_common::ids::derive_id;
pub use safeclock_common::policy::CalendarBook;
use safeclock_common::rules::{Condition, LabelField, Rule, RuleSet, Warning};
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Category, ClockState, EarlyStopState, OnlinePriority,
    ReferralEvent, ReferralState, RiskGrade, SlaEvent, SlaLabels, SlaTransition,
};
use safeclock_common::schema::{
    duration_from_jiff, duration_to_jiff, enum_label, from_jiff, to_jiff,
};

/// How many stop events that arrived before their start are remembered per referral.
const MAX_EARLY_STOPS: usize = 16;

#[derive(Debug)]
struct Clock {
    rule: usize,
    /// Tells clocks of one rule apart (e.g. the device reference); empty when the rule has none.
    instance: String,
    /// The id of the event that started this clock: part of every record id it causes.
    clock_id: String,
    started_at: Timestamp,
    /// Deadline from the calendar, before pauses.
    base_deadline: Timestamp,
    paused_total: SignedDuration,
    paused_since: Option<Timestamp>,
    /// Id of the `breached` record, once emitted.
    breach_id: Option<String>,
    /// Bit i set: warning i fired or was skipped.
    warned: u32,
    /// How many times the clock has been paused.
    pauses: u32,
    /// Timers carry the generation they were set for; anything that reschedules bumps it.
    generation: u64,
}

impl Clock {
    fn deadline(&self) -> Timestamp {
        self.base_deadline
            .saturating_add(self.paused_total)
            .unwrap_or(self.base_deadline)
    }

    /// Time counted against the target up to `at`: wall time minus pauses.
    fn elapsed(&self, at: Timestamp) -> SignedDuration {
        let mut paused = self.paused_total;
        if let Some(since) = self.paused_since {
            paused += at.duration_since(since).max(SignedDuration::ZERO);
        }
        at.duration_since(self.started_at) - paused
    }

    fn allowed(&self) -> SignedDuration {
        self.base_deadline.duration_since(self.started_at)
    }
}

#[derive(Debug)]
struct EarlyStop {
    rule: usize,
    instance: String,
    occurred_at: Timestamp,
    event_id: String,
}

#[derive(Debug, Default)]
struct Referral {
    labels: SlaLabels,
    seen_event_ids: HashSet<String>,
    clocks: Vec<Clock>,
    early_stops: Vec<EarlyStop>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Warning(usize),
    Deadline,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Timestamp,
    seq: u64,
    referral_id: String,
    generation: u64,
    kind: TimerKind,
}

/// Counts of what the engine holds, for gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub referrals: usize,
    pub open_clocks: usize,
    pub paused_clocks: usize,
    pub breached_open_clocks: usize,
    pub pending_timers: usize,
}

/// An open clock, for `explain` and inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenClock {
    pub rule_id: String,
    pub clock_id: String,
    pub instance: String,
    pub started_at: Timestamp,
    pub deadline: Timestamp,
    pub paused: bool,
    pub breached: bool,
}

/// The event's JSON form, computed only when a predicate or instance needs an attribute.
struct LazyJson<'a> {
    event: &'a ReferralEvent,
    kind_json: String,
    value: Option<serde_json::Value>,
}

impl LazyJson<'_> {
    fn attribute(&mut self, name: &str) -> Option<&serde_json::Value> {
        if self.value.is_none() {
            self.value = Some(serde_json::to_value(self.event).unwrap_or_default());
        }
        self.value.as_ref()?.get(&self.kind_json)?.get(name)
    }

    fn matches(&mut self, condition: &Condition) -> bool {
        condition.predicates.iter().all(|(attr, accepted)| {
            let value = self.attribute(attr).cloned();
            accepted.iter().any(|want| match &value {
                Some(v) => v == want,
                // proto3 JSON omits default values: absent means false, "" or the zero enum.
                None => match want {
                    serde_json::Value::Bool(b) => !b,
                    serde_json::Value::String(s) => s.is_empty() || s.ends_with("_UNSPECIFIED"),
                    _ => false,
                },
            })
        })
    }

    fn instance(&mut self, attr: Option<&str>) -> String {
        attr.and_then(|a| self.attribute(a))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The SLA engine for one rule set.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    calendars: CalendarBook,
    /// Event kind -> the rules that react to it.
    by_kind: HashMap<String, Vec<usize>>,
    referrals: HashMap<String, Referral>,
    timers: BTreeSet<Timer>,
    next_seq: u64,
    next_generation: u64,
    /// Referrals whose state changed since the last [`Engine::take_dirty`].
    dirty: HashSet<String>,
}

/// What one event does to one rule's clocks.
#[derive(Debug, Default, Clone, Copy)]
struct Matched {
    start: bool,
    stop: bool,
    pause: bool,
    resume: bool,
    reset: bool,
    cancel: bool,
}

impl Engine {
    pub fn new(rules: RuleSet, calendars: CalendarBook) -> Self {
        let mut by_kind: HashMap<String, Vec<usize>> = HashMap::default();
        for (i, rule) in rules.rules.iter().enumerate() {
            for kind in rule.kinds() {
                let entry = by_kind.entry(kind.to_string()).or_default();
                if !entry.contains(&i) {
                    entry.push(i);
                }
            }
        }
        Self {
            rules: rules.rules,
            calendars,
            by_kind,
            referrals: HashMap::default(),
            timers: BTreeSet::new(),
            next_seq: 0,
            next_generation: 0,
            dirty: HashSet::default(),
        }
    }

    /// The referrals whose state changed since the last call: their new state (or its absence)
    /// must reach the changelog before the inputs that changed them are committed.
    /// Whether any referral's state changed since the last [`Engine::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn take_dirty(&mut self) -> Vec<String> {
        // Order does not matter: each referral's record is independent.
        self.dirty.drain().collect()
    }

    /// The durable form of a referral's state; `None` once the engine holds nothing for it
    /// (write a tombstone).
    pub fn export(&self, referral_id: &str) -> Option<ReferralState> {
        let r = self.referrals.get(referral_id)?;
        let mut seen: Vec<String> = r.seen_event_ids.iter().cloned().collect();
        seen.sort();
        Some(ReferralState {
            referral_id: referral_id.to_string(),
            labels: Some(r.labels.clone()),
            seen_event_ids: seen,
            clocks: r
                .clocks
                .iter()
                .map(|c| ClockState {
                    rule_id: self.rules[c.rule].id.clone(),
                    instance: c.instance.clone(),
                    clock_id: c.clock_id.clone(),
                    started_at: Some(from_jiff(c.started_at)),
                    base_deadline: Some(from_jiff(c.base_deadline)),
                    paused_total: Some(duration_from_jiff(c.paused_total)),
                    paused_since: c.paused_since.map(from_jiff),
                    breach_id: c.breach_id.clone().unwrap_or_default(),
                    warned: c.warned,
                    pauses: c.pauses,
                })
                .collect(),
            early_stops: r
                .early_stops
                .iter()
                .map(|s| EarlyStopState {
                    rule_id: self.rules[s.rule].id.clone(),
                    instance: s.instance.clone(),
                    occurred_at: Some(from_jiff(s.occurred_at)),
                    event_id: s.event_id.clone(),
                })
                .collect(),
        })
    }

    /// Restores a referral's state from the changelog and sets its timers; deadlines already
    /// passed fire on the next tick. Clocks of rules that no longer exist are dropped.
    pub fn import(&mut self, state: ReferralState) {
        let rule_index: HashMap<&str, usize> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        let mut clocks = Vec::with_capacity(state.clocks.len());
        for c in state.clocks {
            let Some(&rule) = rule_index.get(c.rule_id.as_str()) else {
                tracing::warn!(rule = %c.rule_id, referral_id = %state.referral_id, "restored clock of an unknown rule dropped");
                continue;
            };
            let (Some(started_at), Some(base_deadline)) = (
                c.started_at.as_ref().and_then(to_jiff),
                c.base_deadline.as_ref().and_then(to_jiff),
            ) else {
                continue;
            };
            clocks.push(Clock {
                rule,
                instance: c.instance,
                clock_id: c.clock_id,
                started_at,
                base_deadline,
                paused_total: c
                    .paused_total
                    .as_ref()
                    .map(duration_to_jiff)
                    .unwrap_or_default(),
                paused_since: c.paused_since.as_ref().and_then(to_jiff),
                breach_id: (!c.breach_id.is_empty()).then_some(c.breach_id),
                warned: c.warned,
                pauses: c.pauses,
                generation: self.next_generation,
            });
            self.next_generation += 1;
        }
        let early_stops = state
            .early_stops
            .into_iter()
            .filter_map(|s| {
                Some(EarlyStop {
                    rule: *rule_index.get(s.rule_id.as_str())?,
                    instance: s.instance,
                    occurred_at: s.occurred_at.as_ref().and_then(to_jiff)?,
                    event_id: s.event_id,
                })
            })
            .collect();
        let generations: Vec<u64> = clocks.iter().map(|c| c.generation).collect();
        self.referrals.insert(
            state.referral_id.clone(),
            Referral {
                labels: state.labels.unwrap_or_default(),
                seen_event_ids: state.seen_event_ids.into_iter().collect(),
                clocks,
                early_stops,
            },
        );
        for generation in generations {
            self.reschedule(&state.referral_id, generation);
        }
    }

    /// Forgets a referral (a tombstone in the changelog).
    pub fn forget(&mut self, referral_id: &str) {
        self.referrals.remove(referral_id);
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What the engine holds now.
    pub fn stats(&self) -> EngineStats {
        let mut s = EngineStats {
            referrals: self.referrals.len(),
            pending_timers: self.timers.len(),
            ..EngineStats::default()
        };
        for c in self.referrals.values().flat_map(|r| &r.clocks) {
            s.open_clocks += 1;
            if c.paused_since.is_some() {
                s.paused_clocks += 1;
            }
            if c.breach_id.is_some() {
                s.breached_open_clocks += 1;
            }
        }
        s
    }

    /// The open clocks of a referral.
    pub fn open_clocks(&self, referral_id: &str) -> Vec<OpenClock> {
        self.referrals
            .get(referral_id)
            .map(|r| {
                r.clocks
                    .iter()
                    .map(|c| OpenClock {
                        rule_id: self.rules[c.rule].id.clone(),
                        clock_id: c.clock_id.clone(),
                        instance: c.instance.clone(),
                        started_at: c.started_at,
                        deadline: c.deadline(),
                        paused: c.paused_since.is_some(),
                        breached: c.breach_id.is_some(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies one validated referral event at wall-clock time `now`.
    pub fn on_event(&mut self, event: &ReferralEvent, now: Timestamp) -> Vec<SlaEvent> {
        let mut out = Vec::new();
        let (Some(kind), Some(at)) = (
            event.kind.as_ref(),
            event.occurred_at.as_ref().and_then(to_jiff),
        ) else {
            return out;
        };
        let kind_name = kind_name(kind);
        let reacting = self.by_kind.get(kind_name).cloned().unwrap_or_default();
        let referral = self.referrals.entry(event.referral_id.clone()).or_default();
        if !referral.seen_event_ids.insert(event.event_id.clone()) {
            return out; // duplicate
        }
        self.dirty.insert(event.referral_id.clone());
        let risk_before = referral.labels.risk.clone();
        update_labels(&mut referral.labels, &event.force_id, kind);
        let regraded = referral.labels.risk != risk_before;

        let mut json = LazyJson {
            event,
            kind_json: camel(kind_name),
            value: None,
        };
        let ctx = Ctx {
            referral_id: &event.referral_id,
            event_id: &event.event_id,
            at,
            now,
        };
        for rule_idx in reacting {
            let rule = &self.rules[rule_idx];
            let test = |conds: &[Condition], json: &mut LazyJson<'_>| {
                conds
                    .iter()
                    .any(|c| c.event == kind_name && json.matches(c))
            };
            let m = Matched {
                start: test(&rule.start, &mut json),
                stop: test(&rule.stop, &mut json),
                pause: test(&rule.pause, &mut json),
                resume: test(&rule.resume, &mut json),
                reset: test(&rule.reset, &mut json),
                cancel: test(&rule.cancel, &mut json),
            };
            let instance = json.instance(rule.instance.as_deref());
            self.apply(rule_idx, m, &instance, &ctx, &mut out);
        }
        if regraded {
            self.regrade(&ctx);
        }
        // A closed referral keeps its seen event ids (no clocks), so a replayed or late duplicate
        // cannot reopen clocks. Forgetting closed referrals after a retention period is future
        // work (see the engine's memory figures).
        out
    }

    fn apply(
        &mut self,
        rule_idx: usize,
        m: Matched,
        instance: &str,
        ctx: &Ctx<'_>,
        out: &mut Vec<SlaEvent>,
    ) {
        let Some(referral) = self.referrals.get_mut(ctx.referral_id) else {
            return;
        };
        // An instance-less event affects every clock of the rule; one that names an instance,
        // only that clock.
        let affects =
            |c: &Clock| c.rule == rule_idx && (instance.is_empty() || c.instance == instance);
        let rule = &self.rules[rule_idx];

        // Cancel ends the rule's clocks; reset ends them and starts them again from this event.
        if m.cancel || m.reset {
            let (ended, kept): (Vec<Clock>, Vec<Clock>) = std::mem::take(&mut referral.clocks)
                .into_iter()
                .partition(|c| affects(c));
            referral.clocks = kept;
            let restart: Vec<String> = if m.cancel {
                Vec::new()
            } else {
                ended.iter().map(|c| c.instance.clone()).collect()
            };
            for clock in ended {
                out.push(record(
                    rule,
                    ctx.referral_id,
                    &referral.labels,
                    &clock,
                    SlaTransition::Cancelled,
                    ctx.at,
                    ctx.now,
                    ctx.event_id,
                ));
            }
            for inst in restart {
                // One reset event can restart several instances: each gets its own clock id.
                let clock_id = if inst.is_empty() {
                    ctx.event_id.to_string()
                } else {
                    format!("{}/{inst}", ctx.event_id)
                };
                self.start_clock(rule_idx, &inst, &clock_id, ctx, out);
            }
            return;
        }
        if m.stop {
            let pos = referral.clocks.iter().position(|c| {
                c.rule == rule_idx && c.instance == instance && ctx.at >= c.started_at
            });
            match pos {
                Some(pos) => {
                    let clock = referral.clocks.remove(pos);
                    complete(
                        rule,
                        ctx.referral_id,
                        &referral.labels,
                        clock,
                        ctx.at,
                        ctx.now,
                        ctx.event_id,
                        out,
                    );
                    if rule.repeat {
                        self.start_clock(rule_idx, instance, ctx.event_id, ctx, out);
                        return;
                    }
                }
                // An event that both stops and starts the rule (a review that also opens the next
                // review period) starts a clock below; it is not an early stop.
                None if m.start => {}
                None => {
                    if referral.early_stops.len() >= MAX_EARLY_STOPS {
                        referral.early_stops.remove(0);
                    }
                    referral.early_stops.push(EarlyStop {
                        rule: rule_idx,
                        instance: instance.to_string(),
                        occurred_at: ctx.at,
                        event_id: ctx.event_id.to_string(),
                    });
                }
            }
        }
        if m.pause {
            for clock in referral.clocks.iter_mut().filter(|c| affects(c)) {
                if clock.paused_since.is_none() && clock.breach_id.is_none() {
                    clock.paused_since = Some(ctx.at);
                    clock.pauses += 1;
                    clock.generation = self.next_generation;
                    self.next_generation += 1;
                    let mut ev = record(
                        rule,
                        ctx.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Paused,
                        ctx.at,
                        ctx.now,
                        ctx.event_id,
                    );
                    distinguish(&mut ev, "paused", ctx.event_id);
                    out.push(ev);
                }
            }
        }
        if m.resume {
            let mut resumed = Vec::new();
            for clock in referral.clocks.iter_mut().filter(|c| affects(c)) {
                if let Some(since) = clock.paused_since.take() {
                    clock.paused_total += ctx.at.duration_since(since).max(SignedDuration::ZERO);
                    let mut ev = record(
                        rule,
                        ctx.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Resumed,
                        ctx.at,
                        ctx.now,
                        ctx.event_id,
                    );
                    distinguish(&mut ev, "resumed", ctx.event_id);
                    out.push(ev);
                    resumed.push(clock.generation);
                }
            }
            for generation in resumed {
                self.reschedule(ctx.referral_id, generation);
            }
        }
        if m.start {
            let referral = &self.referrals[ctx.referral_id];
            let open = referral
                .clocks
                .iter()
                .any(|c| c.rule == rule_idx && c.instance == instance);
            if !open {
                self.start_clock(rule_idx, instance, ctx.event_id, ctx, out);
            }
        }
    }

    /// Starts a clock of `rule_idx` at `ctx.at` if the rule applies to the referral.
    fn start_clock(
        &mut self,
        rule_idx: usize,
        instance: &str,
        clock_id: &str,
        ctx: &Ctx<'_>,
        out: &mut Vec<SlaEvent>,
    ) {
        let rule = &self.rules[rule_idx];
        let Some(referral) = self.referrals.get_mut(ctx.referral_id) else {
            return;
        };
        if !applies(rule, &referral.labels) {
            return;
        }
        let force = referral.labels.force_id.clone();
        let Some(base_deadline) =
            deadline_for(&self.calendars, rule, &force, &referral.labels.risk, ctx.at)
        else {
            return;
        };
        let mut clock = Clock {
            rule: rule_idx,
            instance: instance.to_string(),
            clock_id: clock_id.to_string(),
            started_at: ctx.at,
            base_deadline,
            paused_total: SignedDuration::ZERO,
            paused_since: None,
            breach_id: None,
            warned: 0,
            pauses: 0,
            generation: self.next_generation,
        };
        self.next_generation += 1;
        out.push(record(
            rule,
            ctx.referral_id,
            &referral.labels,
            &clock,
            SlaTransition::Started,
            ctx.at,
            ctx.now,
            ctx.event_id,
        ));
        // A stop that arrived first completes the clock at once.
        let early = referral
            .early_stops
            .iter()
            .position(|s| s.rule == rule_idx && s.instance == instance && s.occurred_at >= ctx.at);
        if let Some(pos) = early {
            let stop = referral.early_stops.remove(pos);
            complete(
                rule,
                ctx.referral_id,
                &referral.labels,
                clock,
                stop.occurred_at,
                ctx.now,
                &stop.event_id,
                out,
            );
            return;
        }
        // Warnings already past at start are skipped for good.
        for (i, w) in rule.warnings.iter().enumerate() {
            if warning_at(&clock, *w).is_none_or(|t| t <= ctx.now) {
                clock.warned |= 1 << i;
            }
        }
        let generation = clock.generation;
        referral.clocks.push(clock);
        self.reschedule(ctx.referral_id, generation);
    }

    /// Recomputes the deadlines of graded rules after the referral's risk changed.
    fn regrade(&mut self, ctx: &Ctx<'_>) {
        let Some(referral) = self.referrals.get_mut(ctx.referral_id) else {
            return;
        };
        let mut changed = Vec::new();
        for clock in &mut referral.clocks {
            let rule = &self.rules[clock.rule];
            if !rule.graded() || clock.breach_id.is_some() {
                continue;
            }
            let Some(base) = deadline_for(
                &self.calendars,
                rule,
                &referral.labels.force_id,
                &referral.labels.risk,
                clock.started_at,
            ) else {
                continue;
            };
            if base != clock.base_deadline {
                clock.base_deadline = base;
                clock.generation = self.next_generation;
                self.next_generation += 1;
                changed.push(clock.generation);
            }
        }
        for generation in changed {
            self.reschedule(ctx.referral_id, generation);
        }
    }

    /// Sets timers for the clock of `generation`: its pending warnings and its deadline. Old
    /// timers of the clock are left to expire unread (their generation no longer matches).
    fn reschedule(&mut self, referral_id: &str, generation: u64) {
        let Some(referral) = self.referrals.get(referral_id) else {
            return;
        };
        let Some(clock) = referral.clocks.iter().find(|c| c.generation == generation) else {
            return;
        };
        if clock.paused_since.is_some() {
            return;
        }
        let rule = &self.rules[clock.rule];
        let mut due = Vec::new();
        for (i, w) in rule.warnings.iter().enumerate() {
            if clock.warned & (1 << i) == 0 {
                if let Some(at) = warning_at(clock, *w) {
                    due.push((at, TimerKind::Warning(i)));
                }
            }
        }
        if clock.breach_id.is_none() {
            due.push((clock.deadline(), TimerKind::Deadline));
        }
        for (at, kind) in due {
            self.timers.insert(Timer {
                at,
                seq: self.next_seq,
                referral_id: referral_id.to_string(),
                generation,
                kind,
            });
            self.next_seq += 1;
        }
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
            let Some(clock) = referral
                .clocks
                .iter_mut()
                .find(|c| c.generation == timer.generation)
            else {
                continue;
            };
            if clock.paused_since.is_some() || clock.breach_id.is_some() {
                continue;
            }
            self.dirty.insert(timer.referral_id.clone());
            let rule = &self.rules[clock.rule];
            match timer.kind {
                TimerKind::Warning(i) => {
                    if clock.warned & (1 << i) != 0 {
                        continue;
                    }
                    clock.warned |= 1 << i;
                    let mut ev = record(
                        rule,
                        &timer.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Warning,
                        timer.at,
                        now,
                        "",
                    );
                    let allowed = clock.allowed().as_secs_f64();
                    ev.warning_percent = if allowed > 0.0 {
                        (100.0 * clock.elapsed(timer.at).as_secs_f64() / allowed)
                            .round()
                            .clamp(0.0, 100.0) as u32
                    } else {
                        0
                    };
                    distinguish(&mut ev, "warning", &rule.warnings[i].label());
                    out.push(ev);
                }
                TimerKind::Deadline => {
                    let deadline = clock.deadline();
                    let ev = record(
                        rule,
                        &timer.referral_id,
                        &referral.labels,
                        clock,
                        SlaTransition::Breached,
                        deadline,
                        now,
                        "",
                    );
                    clock.breach_id = Some(ev.sla_event_id.clone());
                    out.push(ev);
                }
            }
        }
        out
    }
}

/// The parts of an input event every transition needs.
struct Ctx<'a> {
    referral_id: &'a str,
    event_id: &'a str,
    /// The event's `occurred_at`.
    at: Timestamp,
    /// Wall-clock time of processing.
    now: Timestamp,
}

fn applies(rule: &Rule, labels: &SlaLabels) -> bool {
    rule.applies_to.iter().all(|(field, values)| {
        let value = match field {
            LabelField::Force => &labels.force_id,
            LabelField::Category => &labels.category,
            LabelField::Risk => &labels.risk,
            LabelField::ChildAgeBand => &labels.child_age_band,
            LabelField::Area => &labels.area,
            LabelField::Team => &labels.team,
        };
        values.contains(value)
    })
}

fn deadline_for(
    book: &CalendarBook,
    rule: &Rule,
    force: &str,
    risk: &str,
    start: Timestamp,
) -> Option<Timestamp> {
    let target = rule.target_for(force, risk);
    let Some(calendar) = book.resolve(rule.calendar_for(force), force) else {
        tracing::error!(rule = %rule.id, force, "no calendar for this rule and force; clock not started");
        return None;
    };
    match calendar.deadline(start, target) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(rule = %rule.id, force, error.message = %e, "cannot compute a deadline; clock not started");
            None
        }
    }
}

fn warning_at(clock: &Clock, warning: Warning) -> Option<Timestamp> {
    let at = match warning {
        Warning::Percent(pct) => {
            let nanos = clock.allowed().as_nanos() * i128::from(pct) / 100;
            let offset = SignedDuration::from_nanos(i64::try_from(nanos).ok()?);
            clock
                .started_at
                .saturating_add(clock.paused_total)
                .ok()?
                .saturating_add(offset)
                .ok()?
        }
        Warning::Before(lead) => clock.deadline().saturating_sub(lead).ok()?,
    };
    (at > clock.started_at && at < clock.deadline()).then_some(at)
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
    if let Some(since) = clock.paused_since.take() {
        clock.paused_total += stopped_at.duration_since(since).max(SignedDuration::ZERO);
    }
    if stopped_at <= clock.deadline() {
        out.push(record(
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
            let mut correction = record(
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
        if clock.breach_id.is_none() {
            // The timer had not fired yet: the clock still breached, exactly once.
            let deadline = clock.deadline();
            let breach = record(
                rule,
                referral_id,
                labels,
                &clock,
                SlaTransition::Breached,
                deadline,
                now,
                "",
            );
            clock.breach_id = Some(breach.sla_event_id.clone());
            out.push(breach);
        }
        out.push(record(
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

/// Re-derives the id of a transition that can happen more than once per clock (warnings,
/// pauses, resumes) from one more part: the warning or the causing event.
fn distinguish(ev: &mut SlaEvent, name: &str, part: &str) {
    ev.sla_event_id = derive_id(&[&ev.referral_id, &ev.rule_id, &ev.clock_id, name, part]);
}

/// Builds an SLA event for `clock`; its id depends only on the cause.
#[allow(clippy::too_many_arguments)]
fn record(
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
        SlaTransition::Breached => clock.allowed(),
        _ => clock.elapsed(occurred_at),
    };
    let sla_event_id = derive_id(&[referral_id, &rule.id, &clock.clock_id, name]);
    let breach_sla_event_id = match (&clock.breach_id, what) {
        (Some(id), _) => id.clone(),
        (None, SlaTransition::Breached) => sla_event_id.clone(),
        (None, _) => String::new(),
    };
    let mut paused_total = clock.paused_total;
    if let Some(since) = clock.paused_since {
        paused_total += occurred_at.duration_since(since).max(SignedDuration::ZERO);
    }
    SlaEvent {
        breached: !breach_sla_event_id.is_empty(),
        breach_sla_event_id,
        paused_total: Some(duration_from_jiff(paused_total)),
        instance: clock.instance.clone(),
        pauses: clock.pauses,
        sla_event_id,
        referral_id: referral_id.to_string(),
        rule_id: rule.id.clone(),
        clock_id: clock.clock_id.clone(),
        transition: what as i32,
        severity: rule.severity as i32,
        labels: Some(labels.clone()),
        started_at: Some(from_jiff(clock.started_at)),
        deadline: Some(from_jiff(clock.deadline())),
        occurred_at: Some(from_jiff(occurred_at)),
        emitted_at: Some(from_jiff(now)),
        elapsed: Some(duration_from_jiff(elapsed)),
        target: Some(duration_from_jiff(clock.allowed())),
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
        Kind::ChildMissingReported(r) => set_risk(labels, r.risk),
        Kind::MissingRiskReviewed(r) => set_risk(labels, r.risk),
        Kind::OnlineAbuseReferralReceived(r) => {
            // NCA/CEOP priorities map onto the same four grades.
            let risk =
                match OnlinePriority::try_from(r.priority).unwrap_or(OnlinePriority::Unspecified) {
                    OnlinePriority::Unspecified => RiskGrade::Unspecified,
                    OnlinePriority::Low => RiskGrade::Low,
                    OnlinePriority::Medium => RiskGrade::Medium,
                    OnlinePriority::High => RiskGrade::High,
                    OnlinePriority::VeryHigh => RiskGrade::VeryHigh,
                };
            set_risk(labels, risk as i32);
        }
        Kind::ChildDetained(d) => {
            let age = AgeBand::try_from(d.child_age_band).unwrap_or(AgeBand::Unspecified);
            if age != AgeBand::Unspecified {
                labels.child_age_band = enum_label(age.as_str_name(), "AGE_BAND_");
            }
        }
        Kind::Allocated(a) if !a.team.is_empty() => labels.team = a.team.clone(),
        _ => {}
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
