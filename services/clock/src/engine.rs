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
//! # Layout, for speed and memory
//! The engine holds millions of open clocks, so its state is compact (see docs/architecture.md,
//! "engine state layout"): referrals live in a slab addressed by a `u32` slot; label values are
//! interned once per engine; a clock is a fixed-size `Copy` struct of nanosecond timestamps and
//! small indices (its id and instance strings sit in a per-referral table); seen event ids are
//! 64-bit XXH3 hashes; each running clock has exactly one timer (its next warning or its
//! deadline) in a binary heap, so a tick costs O(log n) per due timer and nothing for clocks that
//! are not due. The core ([`Engine::apply_event`], [`Engine::fire_due`]) emits compact
//! [`Transition`]s; [`Engine::materialize`] turns one into the published [`SlaEvent`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use jiff::{SignedDuration, Timestamp};
use safeclock_calendar::Target;
use safeclock_common::config::ClockLimits;
use safeclock_common::event::kind_name;
use safeclock_common::event::Rejection;
use safeclock_common::ids::derive_id;
pub use safeclock_common::policy::CalendarBook;
use safeclock_common::rules::{Condition, LabelField, Rule, RuleSet, Warning};
use safeclock_common::schema::v1::{
    referral_event::Kind, AgeBand, Category, ClockState, EarlyStopState, OnlinePriority,
    ReferralEvent, ReferralState, RiskGrade, SlaEvent, SlaLabels, SlaTransition,
};
use safeclock_common::schema::{
    duration_to_jiff, enum_label, to_jiff, ProtoDuration, ProtoTimestamp,
};

use crate::attribute::attribute;

/// `Clock::paused_since` when the clock runs.
const RUNNING: i64 = i64::MIN;

/// Nanoseconds since the Unix epoch (1677..2262), saturating outside.
fn nanos(t: Timestamp) -> i64 {
    i64::try_from(t.as_nanosecond()).unwrap_or(if t > Timestamp::UNIX_EPOCH {
        i64::MAX
    } else {
        i64::MIN + 1
    })
}

fn timestamp(n: i64) -> Timestamp {
    Timestamp::from_nanosecond(i128::from(n)).unwrap_or(Timestamp::MAX)
}

fn duration_nanos(d: SignedDuration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(if d.is_negative() {
        i64::MIN + 1
    } else {
        i64::MAX
    })
}

fn proto_timestamp(n: i64) -> ProtoTimestamp {
    ProtoTimestamp {
        seconds: n.div_euclid(1_000_000_000),
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

fn proto_duration(n: i64) -> ProtoDuration {
    ProtoDuration {
        seconds: n / 1_000_000_000,
        nanos: (n % 1_000_000_000) as i32,
    }
}

/// The 64-bit hash of an event id kept for duplicate detection (stable across versions and
/// machines: it is part of the changelog).
fn event_hash(event_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(event_id.as_bytes())
}

/// The in-memory index's hash of a referral id (never persisted, so it may change between
/// versions).
fn index_hash(id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(id)
}

/// An interned label value; 0 is the empty string.
type Sym = u32;

/// Label values (forces, categories, risk grades, areas, teams) are few; each referral holds
/// numbers instead of strings.
#[derive(Debug)]
struct Symbols {
    names: Vec<Box<str>>,
    index: HashMap<Box<str>, Sym>,
    /// Contract enum names (`CATEGORY_GROOMING`) -> the symbol of their label (`grooming`).
    enums: HashMap<&'static str, Sym>,
}

impl Symbols {
    fn new() -> Self {
        let mut s = Self {
            names: Vec::new(),
            index: HashMap::default(),
            enums: HashMap::default(),
        };
        s.intern("");
        s
    }

    fn intern(&mut self, name: &str) -> Sym {
        if let Some(&sym) = self.index.get(name) {
            return sym;
        }
        let sym = Sym::try_from(self.names.len()).unwrap_or(Sym::MAX);
        self.names.push(name.into());
        self.index.insert(name.into(), sym);
        sym
    }

    /// The label of a contract enum value, e.g. `grooming` for `CATEGORY_GROOMING`.
    fn enum_label(&mut self, full_name: &'static str, prefix: &str) -> Sym {
        if let Some(&sym) = self.enums.get(full_name) {
            return sym;
        }
        let sym = self.intern(&enum_label(full_name, prefix));
        self.enums.insert(full_name, sym);
        sym
    }

    fn name(&self, sym: Sym) -> &str {
        self.names.get(sym as usize).map_or("", |n| n)
    }

    /// Whether interning `name` would add a value to a table already holding `max`.
    fn is_full_for(&self, name: &str, max: usize) -> bool {
        self.names.len() >= max && !self.index.contains_key(name)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Labels {
    force: Sym,
    category: Sym,
    risk: Sym,
    child_age_band: Sym,
    area: Sym,
    team: Sym,
}

impl Labels {
    fn get(&self, field: LabelField) -> Sym {
        match field {
            LabelField::Force => self.force,
            LabelField::Category => self.category,
            LabelField::Risk => self.risk,
            LabelField::ChildAgeBand => self.child_age_band,
            LabelField::Area => self.area,
            LabelField::Team => self.team,
        }
    }

    fn to_proto(self, symbols: &Symbols) -> SlaLabels {
        SlaLabels {
            force_id: symbols.name(self.force).to_string(),
            category: symbols.name(self.category).to_string(),
            risk: symbols.name(self.risk).to_string(),
            child_age_band: symbols.name(self.child_age_band).to_string(),
            area: symbols.name(self.area).to_string(),
            team: symbols.name(self.team).to_string(),
        }
    }

    fn from_proto(labels: &SlaLabels, symbols: &mut Symbols) -> Self {
        Self {
            force: symbols.intern(&labels.force_id),
            category: symbols.intern(&labels.category),
            risk: symbols.intern(&labels.risk),
            child_age_band: symbols.intern(&labels.child_age_band),
            area: symbols.intern(&labels.area),
            team: symbols.intern(&labels.team),
        }
    }
}

/// One open clock: 56 bytes, no heap of its own.
#[derive(Debug, Clone, Copy)]
struct Clock {
    started_at: i64,
    /// Deadline from the calendar, before pauses.
    base_deadline: i64,
    paused_total: i64,
    /// When the current pause began, or [`RUNNING`].
    paused_since: i64,
    /// Timers carry the generation they were set for; anything that reschedules bumps it.
    generation: u64,
    /// Bit i set: warning i fired or was skipped.
    warned: u32,
    rule: u16,
    /// Index in the referral's string table of the clock id (the id of the event that started
    /// it, part of every record id it causes).
    clock_id: u16,
    /// 1 + index in the referral's string table of the instance (e.g. the device reference);
    /// 0 when the rule has none.
    instance: u16,
    /// How many times the clock has been paused.
    pauses: u16,
    /// Whether the `breached` record was emitted (its id derives from the clock).
    breached: bool,
}

impl Clock {
    fn deadline(&self) -> i64 {
        self.base_deadline.saturating_add(self.paused_total)
    }

    fn paused(&self) -> bool {
        self.paused_since != RUNNING
    }

    /// Time paused up to `at`, including a pause still running.
    fn paused_until(&self, at: i64) -> i64 {
        let mut paused = self.paused_total;
        if self.paused() {
            paused = paused.saturating_add(at.saturating_sub(self.paused_since).max(0));
        }
        paused
    }

    /// Time counted against the target up to `at`: wall time minus pauses.
    fn elapsed(&self, at: i64) -> i64 {
        at.saturating_sub(self.started_at)
            .saturating_sub(self.paused_until(at))
    }

    fn allowed(&self) -> i64 {
        self.base_deadline.saturating_sub(self.started_at)
    }
}

#[derive(Debug)]
struct EarlyStop {
    rule: u16,
    instance: Box<str>,
    occurred_at: i64,
    event_id: Box<str>,
}

/// One remembered event: its id's hash and when it occurred (seconds since 2000-01-01 UTC,
/// saturating, so 1999 and 2137 read as the edges). 12 bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct SeenEvent {
    hash: u64,
    at: u32,
}

/// Unix seconds of 2000-01-01T00:00:00Z, the origin of [`SeenEvent::at`].
const SEEN_EPOCH: i64 = 946_684_800;

fn seen_seconds(unix_seconds: i64) -> u32 {
    u32::try_from(unix_seconds.saturating_sub(SEEN_EPOCH).max(0)).unwrap_or(u32::MAX)
}

/// No dedup horizon yet: every event time is accepted.
const NO_HORIZON: u32 = 0;

#[derive(Debug, Default)]
struct Referral {
    id: Box<str>,
    labels: Labels,
    /// The event ids applied (hashed) with their event times: at most
    /// `ClockLimits::max_seen_events`, the oldest event times dropped first.
    seen: Vec<SeenEvent>,
    /// Events that occurred at or before this second ([`SeenEvent::at`] scale) may have had their
    /// ids dropped from `seen`, so they are refused; [`NO_HORIZON`] when nothing was dropped.
    horizon: u32,
    clocks: Vec<Clock>,
    /// Clock ids and instances the clocks refer to.
    strings: Vec<Box<str>>,
    early_stops: Vec<EarlyStop>,
}

impl Referral {
    fn has_seen(&self, hash: u64) -> bool {
        self.seen.iter().any(|e| {
            let h = e.hash;
            h == hash
        })
    }

    /// Remembers an applied event; past `max` entries, drops the oldest eighth by event time
    /// and moves the horizon up to the newest time dropped.
    fn remember(&mut self, hash: u64, at: u32, max: usize) {
        if self.seen.len() == self.seen.capacity() {
            self.seen.reserve_exact(self.seen.len().clamp(1, 8));
        }
        self.seen.push(SeenEvent { hash, at });
        if self.seen.len() > max {
            self.forget_oldest_seen(max - (max / 8).max(1));
        }
    }

    /// Keeps the `keep` most recent (by event time) remembered events.
    fn forget_oldest_seen(&mut self, keep: usize) {
        if self.seen.len() <= keep {
            return;
        }
        let drop = self.seen.len() - keep;
        let mut times: Vec<u32> = self.seen.iter().map(|e| e.at).collect();
        let (_, cut, _) = times.select_nth_unstable(drop - 1);
        let cut = *cut;
        // Everything at or before `cut` goes: ties are dropped together, so the horizon is
        // exact (an event at `cut` that stayed could not be told from one that went).
        self.seen.retain(|e| e.at > cut);
        self.seen.shrink_to_fit();
        self.horizon = self.horizon.max(cut);
    }

    fn string(&self, index: u16) -> &str {
        self.strings.get(usize::from(index)).map_or("", |s| s)
    }

    fn instance(&self, clock: &Clock) -> &str {
        match clock.instance {
            0 => "",
            i => self.string(i - 1),
        }
    }

    fn intern(&mut self, s: &str) -> u16 {
        if let Some(i) = self.strings.iter().position(|x| &**x == s) {
            return u16::try_from(i).unwrap_or(u16::MAX);
        }
        self.strings.reserve_exact(1);
        self.strings.push(s.into());
        u16::try_from(self.strings.len() - 1).unwrap_or(u16::MAX)
    }

    /// Drops strings no clock refers to any more. Called before an event is applied, never
    /// between a transition and its materialization.
    fn collect_strings(&mut self) {
        let live = self.clocks.len() * 2;
        if self.strings.len() <= live.max(4) {
            return;
        }
        let old = std::mem::take(&mut self.strings);
        let mut clocks = std::mem::take(&mut self.clocks);
        for c in &mut clocks {
            c.clock_id = self.intern(old.get(usize::from(c.clock_id)).map_or("", |s| s));
            if c.instance != 0 {
                c.instance =
                    1 + self.intern(old.get(usize::from(c.instance - 1)).map_or("", |s| s));
            }
        }
        self.clocks = clocks;
        self.strings.shrink_to_fit();
    }
}

/// Referral id -> slab slot, keyed by the id's 64-bit hash: the id itself is stored once, in
/// the slab, and compared there. Ids whose hash collides with another's go to a small exact map.
#[derive(Debug, Default)]
struct ReferralIndex {
    by_hash: HashMap<u64, u32>,
    collided: HashMap<Box<str>, u32>,
    len: usize,
}

impl ReferralIndex {
    fn get(&self, slab: &[Referral], id: &str) -> Option<u32> {
        let hash = index_hash(id);
        if let Some(&slot) = self.by_hash.get(&hash) {
            if slab.get(slot as usize).is_some_and(|r| &*r.id == id) {
                return Some(slot);
            }
        }
        self.collided.get(id).copied()
    }

    /// Adds an id not yet present.
    fn insert(&mut self, id: &str, slot: u32) {
        let hash = index_hash(id);
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(slot);
        } else {
            self.collided.insert(id.into(), slot);
        }
        self.len += 1;
    }

    fn remove(&mut self, slab: &[Referral], id: &str) -> Option<u32> {
        let hash = index_hash(id);
        let slot = match self.by_hash.get(&hash) {
            Some(&slot) if slab.get(slot as usize).is_some_and(|r| &*r.id == id) => {
                self.by_hash.remove(&hash);
                Some(slot)
            }
            _ => self.collided.remove(id),
        };
        if slot.is_some() {
            self.len -= 1;
        }
        slot
    }
}

/// A clock's next warning or deadline. Ordered by due time, then generation (deterministic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: i64,
    generation: u64,
    slot: u32,
}

/// What the engine decided, before it becomes an [`SlaEvent`] (see [`Engine::materialize`]).
#[derive(Debug, Clone)]
pub struct Transition {
    slot: u32,
    what: SlaTransition,
    /// The clock as it was at this transition.
    clock: Clock,
    occurred_at: i64,
    now: i64,
    cause: Cause,
    /// The warning's index, for warnings.
    warning: u8,
    /// A `corrected` record: it names the clock's breach.
    corrects_breach: bool,
}

impl Transition {
    pub fn what(&self) -> SlaTransition {
        self.what
    }
}

/// The event a transition is attributed to.
#[derive(Debug, Clone)]
enum Cause {
    /// The wall clock (warnings, deadlines).
    None,
    /// The event being applied.
    Input,
    /// An earlier event (a stop that arrived before its start).
    Earlier(Box<str>),
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

/// What state an open clock is in, for the `state` label of the open-clock gauge: the first
/// that holds of breached, paused, warned (past a warning threshold), running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpenState {
    Running,
    Warned,
    Paused,
    Breached,
}

impl OpenState {
    pub fn label(self) -> &'static str {
        match self {
            OpenState::Running => "running",
            OpenState::Warned => "warned",
            OpenState::Paused => "paused",
            OpenState::Breached => "breached",
        }
    }
}

/// Force, rule, category, risk and state of a group of open clocks.
pub type CensusKey = (String, String, String, String, OpenState);

/// Open clocks counted by labels and state, and the oldest breach per force and rule.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Census {
    /// ((force, rule, category, risk, state), open clocks).
    pub open: Vec<(CensusKey, u64)>,
    /// ((force, rule), the earliest deadline among open breached clocks).
    pub oldest_breach: Vec<((String, String), Timestamp)>,
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

/// The rules that react to one event kind.
#[derive(Debug)]
struct KindRules {
    /// The kind's field name in the event's JSON form, where its attributes sit.
    json_name: String,
    rules: Vec<Reacting>,
    /// How many of `rules` can start a clock on this kind: the most clocks one event of it
    /// can open.
    starts: usize,
    /// Whether any of `rules` can pause a clock on this kind.
    pauses: bool,
}

/// One rule reacting to one event kind: for each role (start, stop, pause, resume, reset,
/// cancel), the indices of the rule's conditions on that kind.
#[derive(Debug)]
struct Reacting {
    rule: u16,
    roles: [Vec<u16>; 6],
}

impl Reacting {
    fn matched(&self, rule: &Rule, event: &ReferralEvent, json_name: &str) -> Matched {
        let lists = [
            &rule.start,
            &rule.stop,
            &rule.pause,
            &rule.resume,
            &rule.reset,
            &rule.cancel,
        ];
        let test = |role: usize| {
            self.roles[role].iter().any(|&i| {
                let c = &lists[role][usize::from(i)];
                c.predicates.is_empty() || matches(event, json_name, c)
            })
        };
        Matched {
            start: test(0),
            stop: test(1),
            pause: test(2),
            resume: test(3),
            reset: test(4),
            cancel: test(5),
        }
    }
}

/// The rule set, prepared for matching: never changes after [`Engine::new`].
#[derive(Debug)]
struct Policy {
    rules: Vec<Rule>,
    limits: ClockLimits,
    /// Per rule: `applies_to` with interned values.
    applies_to: Vec<Vec<(LabelField, Vec<Sym>)>>,
    calendars: CalendarBook,
    by_kind: HashMap<String, KindRules>,
}

impl Policy {
    fn applies(&self, rule: u16, labels: &Labels) -> bool {
        self.applies_to[usize::from(rule)]
            .iter()
            .all(|(field, values)| values.contains(&labels.get(*field)))
    }
}

/// The parts of an input event every transition needs.
struct Ctx<'a> {
    slot: u32,
    event_id: &'a str,
    /// The event's `occurred_at`.
    at: i64,
    /// Wall-clock time of processing.
    now: i64,
}

/// The SLA engine for one rule set.
#[derive(Debug)]
pub struct Engine {
    policy: Policy,
    state: State,
}

/// Everything that changes.
#[derive(Debug)]
struct State {
    symbols: Symbols,
    index: ReferralIndex,
    slab: Vec<Referral>,
    free: Vec<u32>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// Rebuild the timer heap without stale entries once it grows past this.
    compact_timers_at: usize,
    next_generation: u64,
    /// Slots whose state changed since the last [`Engine::take_dirty`].
    dirty: HashSet<u32>,
    /// Referrals forgotten since the last [`Engine::take_dirty`]: their tombstones are due.
    forgotten: Vec<Box<str>>,
    /// Where the next [`Engine::forget_closed`] sweep starts in the slab.
    sweep_from: usize,
    deadlines: DeadlineMemo,
}

impl Engine {
    /// An engine with the default `[clock.limits]`.
    pub fn new(rules: RuleSet, calendars: CalendarBook) -> Self {
        Self::with_limits(rules, calendars, ClockLimits::default())
    }

    /// An engine that refuses events which would take a referral past `limits`.
    pub fn with_limits(rules: RuleSet, calendars: CalendarBook, limits: ClockLimits) -> Self {
        let mut symbols = Symbols::new();
        let mut by_kind: HashMap<String, KindRules> = HashMap::default();
        for (i, rule) in rules.rules.iter().enumerate() {
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            let lists = [
                &rule.start,
                &rule.stop,
                &rule.pause,
                &rule.resume,
                &rule.reset,
                &rule.cancel,
            ];
            for kind in rule.kinds() {
                let entry = by_kind
                    .entry(kind.to_string())
                    .or_insert_with(|| KindRules {
                        json_name: camel(kind),
                        rules: Vec::new(),
                        starts: 0,
                        pauses: false,
                    });
                if entry.rules.iter().any(|r| r.rule == i) {
                    continue;
                }
                let roles: [Vec<u16>; 6] = lists.map(|conds| {
                    (0..conds.len())
                        .filter(|&c| conds[c].event == kind)
                        .map(|c| u16::try_from(c).unwrap_or(u16::MAX))
                        .collect()
                });
                // A repeating rule also starts its next clock on its stop events.
                let starts = !roles[0].is_empty() || (rule.repeat && !roles[1].is_empty());
                entry.starts += usize::from(starts);
                entry.pauses |= !roles[2].is_empty();
                entry.rules.push(Reacting { rule: i, roles });
            }
        }
        let applies_to = rules
            .rules
            .iter()
            .map(|r| {
                r.applies_to
                    .iter()
                    .map(|(field, values)| {
                        let mut syms: Vec<Sym> = values.iter().map(|v| symbols.intern(v)).collect();
                        syms.sort_unstable();
                        (*field, syms)
                    })
                    .collect()
            })
            .collect();
        Self {
            policy: Policy {
                rules: rules.rules,
                limits,
                applies_to,
                calendars,
                by_kind,
            },
            state: State {
                symbols,
                index: ReferralIndex::default(),
                slab: Vec::new(),
                free: Vec::new(),
                timers: BinaryHeap::new(),
                compact_timers_at: 1024,
                next_generation: 0,
                dirty: HashSet::default(),
                forgotten: Vec::new(),
                sweep_from: 0,
                deadlines: DeadlineMemo::default(),
            },
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.policy.rules
    }

    /// Whether any referral's state changed since the last [`Engine::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.state.dirty.is_empty() || !self.state.forgotten.is_empty()
    }

    /// The referrals whose state changed since the last call: their new state (or its absence)
    /// must reach the changelog before the inputs that changed them are committed.
    pub fn take_dirty(&mut self) -> Vec<String> {
        // Order does not matter: each referral's record is independent.
        let State {
            dirty,
            slab,
            forgotten,
            ..
        } = &mut self.state;
        dirty
            .drain()
            .filter_map(|slot| slab.get(slot as usize))
            .map(|r| r.id.to_string())
            .chain(forgotten.drain(..).map(String::from))
            .collect()
    }

    fn referral(&self, referral_id: &str) -> Option<&Referral> {
        let slot = self.state.index.get(&self.state.slab, referral_id)?;
        self.state.slab.get(slot as usize)
    }

    /// The durable form of a referral's state; `None` once the engine holds nothing for it
    /// (write a tombstone).
    pub fn export(&self, referral_id: &str) -> Option<ReferralState> {
        let r = self.referral(referral_id)?;
        let rules = &self.policy.rules;
        Some(ReferralState {
            referral_id: referral_id.to_string(),
            labels: Some(r.labels.to_proto(&self.state.symbols)),
            seen_event_ids: Vec::new(),
            seen_event_hashes: r.seen.iter().map(|e| e.hash).collect(),
            seen_event_seconds: r
                .seen
                .iter()
                .map(|e| i64::from(e.at) + SEEN_EPOCH)
                .collect(),
            dedup_horizon: (r.horizon != NO_HORIZON).then(|| ProtoTimestamp {
                seconds: i64::from(r.horizon) + SEEN_EPOCH,
                nanos: 0,
            }),
            clocks: r
                .clocks
                .iter()
                .map(|c| {
                    let rule = &rules[usize::from(c.rule)];
                    let clock_id = r.string(c.clock_id);
                    ClockState {
                        rule_id: rule.id.clone(),
                        instance: r.instance(c).to_string(),
                        clock_id: clock_id.to_string(),
                        started_at: Some(proto_timestamp(c.started_at)),
                        base_deadline: Some(proto_timestamp(c.base_deadline)),
                        paused_total: Some(proto_duration(c.paused_total)),
                        paused_since: c.paused().then(|| proto_timestamp(c.paused_since)),
                        breach_id: if c.breached {
                            breach_id(referral_id, &rule.id, clock_id)
                        } else {
                            String::new()
                        },
                        warned: c.warned,
                        pauses: u32::from(c.pauses),
                    }
                })
                .collect(),
            early_stops: r
                .early_stops
                .iter()
                .map(|s| EarlyStopState {
                    rule_id: rules[usize::from(s.rule)].id.clone(),
                    instance: s.instance.to_string(),
                    occurred_at: Some(proto_timestamp(s.occurred_at)),
                    event_id: s.event_id.to_string(),
                })
                .collect(),
        })
    }

    /// Restores a referral's state from the changelog and sets its timers; deadlines already
    /// passed fire on the next tick. Clocks of rules that no longer exist are dropped.
    pub fn import(&mut self, state: ReferralState) {
        let rule_index: HashMap<&str, u16> = self
            .policy
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), u16::try_from(i).unwrap_or(u16::MAX)))
            .collect();
        let slot = self.state.slot_for(&state.referral_id);
        let labels = Labels::from_proto(&state.labels.unwrap_or_default(), &mut self.state.symbols);
        // Records written before event times were kept (0.2) have none: their events count as
        // old as the referral's newest clock start, which is when the newest of them can have
        // occurred at the earliest that matters.
        let unknown_at = seen_seconds(
            state
                .clocks
                .iter()
                .filter_map(|c| c.started_at.as_ref().map(|t| t.seconds))
                .max()
                .unwrap_or(SEEN_EPOCH),
        );
        let times = &state.seen_event_seconds;
        let mut seen: Vec<SeenEvent> = state
            .seen_event_hashes
            .iter()
            .enumerate()
            .map(|(i, &hash)| SeenEvent {
                hash,
                at: times.get(i).map_or(unknown_at, |&t| seen_seconds(t)),
            })
            .collect();
        // Records written before hashes were kept name the ids themselves.
        seen.extend(state.seen_event_ids.iter().map(|id| SeenEvent {
            hash: event_hash(id),
            at: unknown_at,
        }));
        let mut referral = Referral {
            id: state.referral_id.as_str().into(),
            labels,
            seen,
            horizon: state
                .dedup_horizon
                .as_ref()
                .map_or(NO_HORIZON, |t| seen_seconds(t.seconds)),
            ..Referral::default()
        };
        // A window lowered since the record was written applies now.
        referral.forget_oldest_seen(self.policy.limits.max_seen_events);
        referral.clocks.reserve_exact(state.clocks.len());
        for c in state.clocks {
            let Some(&rule) = rule_index.get(c.rule_id.as_str()) else {
                tracing::warn!(rule = %c.rule_id, "restored clock of an unknown rule dropped");
                continue;
            };
            let (Some(started_at), Some(base_deadline)) = (
                c.started_at.as_ref().and_then(to_jiff),
                c.base_deadline.as_ref().and_then(to_jiff),
            ) else {
                continue;
            };
            let clock_id = referral.intern(&c.clock_id);
            let instance = if c.instance.is_empty() {
                0
            } else {
                1 + referral.intern(&c.instance)
            };
            referral.clocks.push(Clock {
                started_at: nanos(started_at),
                base_deadline: nanos(base_deadline),
                paused_total: c
                    .paused_total
                    .as_ref()
                    .map_or(0, |d| duration_nanos(duration_to_jiff(d))),
                paused_since: c
                    .paused_since
                    .as_ref()
                    .and_then(to_jiff)
                    .map_or(RUNNING, nanos),
                generation: self.state.next_generation(),
                warned: c.warned,
                rule,
                clock_id,
                instance,
                pauses: u16::try_from(c.pauses).unwrap_or(u16::MAX),
                breached: !c.breach_id.is_empty(),
            });
        }
        referral.early_stops = state
            .early_stops
            .into_iter()
            .filter_map(|s| {
                Some(EarlyStop {
                    rule: *rule_index.get(s.rule_id.as_str())?,
                    instance: s.instance.into(),
                    occurred_at: nanos(s.occurred_at.as_ref().and_then(to_jiff)?),
                    event_id: s.event_id.into(),
                })
            })
            .collect();
        let clocks = referral.clocks.clone();
        self.state.slab[slot as usize] = referral;
        for clock in &clocks {
            self.state.schedule(&self.policy, slot, clock);
        }
    }

    /// Forgets a referral: [`Engine::take_dirty`] then names it, so its tombstone is written.
    pub fn forget(&mut self, referral_id: &str) {
        let State {
            index,
            slab,
            free,
            dirty,
            forgotten,
            ..
        } = &mut self.state;
        if let Some(slot) = index.remove(slab, referral_id) {
            slab[slot as usize] = Referral::default();
            free.push(slot);
            dirty.remove(&slot);
            forgotten.push(referral_id.into());
        }
    }

    /// Forgets every referral whose id `matches` (an erasure: open clocks too), queueing their
    /// tombstones; returns how many. Looks at every referral once.
    pub fn forget_matching(&mut self, mut matches: impl FnMut(&str) -> bool) -> usize {
        let ids: Vec<String> = self
            .state
            .slab
            .iter()
            .filter(|r| !r.id.is_empty() && matches(&r.id))
            .map(|r| r.id.to_string())
            .collect();
        for id in &ids {
            self.forget(id);
        }
        ids.len()
    }

    /// Forgets the referrals that hold no clock and whose newest event occurred before
    /// `before` (the retention of closed referrals): looks at `budget` slots of the slab from
    /// where the last sweep stopped, so a sweep costs the same whatever the number of
    /// referrals, and a whole pass takes `referrals / budget` sweeps. Returns how many it
    /// forgot. Their tombstones come with the next [`Engine::take_dirty`].
    ///
    /// Safe only with an event-time horizon at least as recent as `before` (the configuration
    /// refuses `clock.closed_retention_days` without `validation.max_past_days` at most as
    /// long): an event older than it could otherwise start the forgotten referral's clocks again.
    pub fn forget_closed(&mut self, before: Timestamp, budget: usize) -> usize {
        let before = seen_seconds(before.as_second());
        let len = self.state.slab.len();
        if len == 0 {
            return 0;
        }
        let mut closed = Vec::new();
        let start = self.state.sweep_from.min(len);
        for i in 0..budget.min(len) {
            let r = &self.state.slab[(start + i) % len];
            if r.id.is_empty() || !r.clocks.is_empty() {
                continue;
            }
            let newest = r
                .seen
                .iter()
                .map(|e| e.at)
                .max()
                .unwrap_or(0)
                .max(r.horizon);
            if newest < before {
                closed.push(r.id.to_string());
            }
        }
        self.state.sweep_from = (start + budget.min(len)) % len;
        for id in &closed {
            self.forget(id);
        }
        closed.len()
    }

    /// What the engine holds now.
    pub fn stats(&self) -> EngineStats {
        let mut s = EngineStats {
            referrals: self.state.index.len,
            pending_timers: self.state.timers.len(),
            ..EngineStats::default()
        };
        for c in self.state.slab.iter().flat_map(|r| &r.clocks) {
            s.open_clocks += 1;
            if c.paused() {
                s.paused_clocks += 1;
            }
            if c.breached {
                s.breached_open_clocks += 1;
            }
        }
        s
    }

    /// Counts the open clocks by force, rule, category, risk and state, and finds the oldest
    /// breach of each force and rule: the gauges dashboards read, rebuilt from state (so right
    /// after a restart too).
    pub fn census(&self) -> Census {
        let mut open: HashMap<(Sym, u16, Sym, Sym, OpenState), u64> = HashMap::default();
        let mut oldest: HashMap<(Sym, u16), i64> = HashMap::default();
        for r in &self.state.slab {
            for c in &r.clocks {
                let state = if c.breached {
                    OpenState::Breached
                } else if c.paused() {
                    OpenState::Paused
                } else if c.warned != 0 {
                    OpenState::Warned
                } else {
                    OpenState::Running
                };
                let l = r.labels;
                *open
                    .entry((l.force, c.rule, l.category, l.risk, state))
                    .or_default() += 1;
                if c.breached {
                    let d = oldest.entry((l.force, c.rule)).or_insert(i64::MAX);
                    *d = (*d).min(c.deadline());
                }
            }
        }
        let name = |s: Sym| self.state.symbols.name(s).to_string();
        let rule = |r: u16| self.policy.rules[usize::from(r)].id.clone();
        Census {
            open: open
                .into_iter()
                .map(|((f, ru, c, ri, st), n)| ((name(f), rule(ru), name(c), name(ri), st), n))
                .collect(),
            oldest_breach: oldest
                .into_iter()
                .map(|((f, ru), d)| ((name(f), rule(ru)), timestamp(d)))
                .collect(),
        }
    }

    /// The open clocks of a referral.
    pub fn open_clocks(&self, referral_id: &str) -> Vec<OpenClock> {
        let Some(r) = self.referral(referral_id) else {
            return Vec::new();
        };
        r.clocks
            .iter()
            .map(|c| OpenClock {
                rule_id: self.policy.rules[usize::from(c.rule)].id.clone(),
                clock_id: r.string(c.clock_id).to_string(),
                instance: r.instance(c).to_string(),
                started_at: timestamp(c.started_at),
                deadline: timestamp(c.deadline()),
                paused: c.paused(),
                breached: c.breached,
            })
            .collect()
    }

    /// Applies one validated referral event at wall-clock time `now` and returns the SLA events
    /// to publish.
    ///
    /// # Errors
    /// [`LimitExceeded`] when the event would take the referral past a limit of
    /// `[clock.limits]`: nothing of it is applied (not even its id is remembered), so the
    /// referral's clocks run on as before.
    pub fn on_event(
        &mut self,
        event: &ReferralEvent,
        now: Timestamp,
    ) -> Result<Vec<SlaEvent>, LimitExceeded> {
        let mut transitions = Vec::new();
        self.apply_event(event, now, &mut transitions)?;
        Ok(transitions
            .iter()
            .map(|t| self.materialize(t, Some(event)))
            .collect())
    }

    /// Fires every warning and deadline due at or before `now` and returns the SLA events.
    pub fn on_tick(&mut self, now: Timestamp) -> Vec<SlaEvent> {
        let mut transitions = Vec::new();
        self.fire_due(now, &mut transitions);
        transitions
            .iter()
            .map(|t| self.materialize(t, None))
            .collect()
    }

    /// The core of [`Engine::on_event`]: appends the transitions `event` causes to `out`. Each
    /// must be materialized before the next call that changes the engine.
    ///
    /// # Errors
    /// [`LimitExceeded`], with nothing applied.
    pub fn apply_event(
        &mut self,
        event: &ReferralEvent,
        now: Timestamp,
        out: &mut Vec<Transition>,
    ) -> Result<(), LimitExceeded> {
        let (Some(kind), Some(at)) = (
            event.kind.as_ref(),
            event.occurred_at.as_ref().and_then(to_jiff),
        ) else {
            return Ok(());
        };
        let Engine { policy, state } = self;
        let slot = state.slot_for(&event.referral_id);
        let hash = event_hash(&event.event_id);
        if state.slab[slot as usize].has_seen(hash) {
            return Ok(()); // duplicate
        }
        let kind_name = kind_name(kind);
        let reacting = policy.by_kind.get(kind_name);
        // Every check before any change: a refused event leaves no trace.
        let labels = match state.admit_labels(policy, slot, event, kind, at) {
            Ok(labels) => labels,
            Err(e) => {
                state.release_if_empty(slot, &event.referral_id);
                return Err(e);
            }
        };
        // Far from every limit (the usual case), no event of this kind can reach one. Near a
        // limit, the rules are matched once more first, and the event is admitted or refused
        // before anything changes.
        if let Some(reacting) = reacting {
            if state.near_limit(policy, slot, reacting) {
                if let Err(e) = state.admit_clocks(policy, slot, event, &labels, reacting) {
                    state.release_if_empty(slot, &event.referral_id);
                    return Err(e);
                }
            }
        }
        let referral = &mut state.slab[slot as usize];
        referral.remember(
            hash,
            seen_seconds(at.as_second()),
            policy.limits.max_seen_events,
        );
        referral.collect_strings();
        state.dirty.insert(slot);
        let regraded = labels.risk != referral.labels.risk;
        referral.labels = labels;

        let ctx = Ctx {
            slot,
            event_id: &event.event_id,
            at: nanos(at),
            now: nanos(now),
        };
        if let Some(reacting) = reacting {
            for reaction in &reacting.rules {
                let rule = &policy.rules[usize::from(reaction.rule)];
                let m = reaction.matched(rule, event, &reacting.json_name);
                let instance = instance_of(rule, event, &reacting.json_name);
                state.apply(policy, reaction.rule, m, &instance, &ctx, out);
            }
        }
        if regraded {
            state.regrade(policy, &ctx);
        }
        // A closed referral keeps its seen event ids (no clocks), so a replayed or late duplicate
        // cannot reopen clocks. Forgetting closed referrals after a retention period is future
        // work (see the engine's memory figures).
        Ok(())
    }

    /// When the next warning or deadline falls due, if any clock has one: the clock service
    /// sleeps until then rather than for a fixed tick. It may be a little early (a timer whose
    /// clock has since stopped or moved is discarded only when it comes due), never late.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.state
            .timers
            .peek()
            .map(|Reverse(timer)| timestamp(timer.at))
    }

    /// The core of [`Engine::on_tick`]: appends the transitions due at or before `now`.
    pub fn fire_due(&mut self, now: Timestamp, out: &mut Vec<Transition>) {
        let Engine { policy, state } = self;
        state.fire_due(policy, nanos(now), out);
    }

    /// The SLA event for a transition from the last [`Engine::apply_event`] (whose input is
    /// `input`) or [`Engine::fire_due`] (`input` is `None`).
    pub fn materialize(&self, t: &Transition, input: Option<&ReferralEvent>) -> SlaEvent {
        let referral = &self.state.slab[t.slot as usize];
        let clock = &t.clock;
        let rule = &self.policy.rules[usize::from(clock.rule)];
        let clock_id = referral.string(clock.clock_id);
        let cause = match &t.cause {
            Cause::None => "",
            Cause::Input => input.map_or("", |e| e.event_id.as_str()),
            Cause::Earlier(id) => id,
        };
        let name = t.what.as_str_name();
        let sla_event_id = match t.what {
            SlaTransition::Warning => {
                let label = rule
                    .warnings
                    .get(usize::from(t.warning))
                    .map(Warning::label)
                    .unwrap_or_default();
                derive_id(&[&referral.id, &rule.id, clock_id, "warning", &label])
            }
            SlaTransition::Paused => {
                derive_id(&[&referral.id, &rule.id, clock_id, "paused", cause])
            }
            SlaTransition::Resumed => {
                derive_id(&[&referral.id, &rule.id, clock_id, "resumed", cause])
            }
            _ => derive_id(&[&referral.id, &rule.id, clock_id, name]),
        };
        let breach = if t.what == SlaTransition::Breached {
            sla_event_id.clone()
        } else if clock.breached || t.corrects_breach {
            breach_id(&referral.id, &rule.id, clock_id)
        } else {
            String::new()
        };
        let (breach_sla_event_id, corrects_sla_event_id) = if t.corrects_breach {
            (String::new(), breach)
        } else {
            (breach, String::new())
        };
        let elapsed = match t.what {
            SlaTransition::Breached => clock.allowed(),
            _ => clock.elapsed(t.occurred_at),
        };
        let warning_percent = match t.what {
            SlaTransition::Warning if clock.allowed() > 0 => {
                (100.0 * clock.elapsed(t.occurred_at) as f64 / clock.allowed() as f64)
                    .round()
                    .clamp(0.0, 100.0) as u32
            }
            _ => 0,
        };
        SlaEvent {
            breached: !breach_sla_event_id.is_empty(),
            breach_sla_event_id,
            paused_total: Some(proto_duration(clock.paused_until(t.occurred_at))),
            instance: referral.instance(clock).to_string(),
            pauses: u32::from(clock.pauses),
            sla_event_id,
            referral_id: referral.id.to_string(),
            rule_id: rule.id.clone(),
            clock_id: clock_id.to_string(),
            transition: t.what as i32,
            severity: rule.severity as i32,
            labels: Some(referral.labels.to_proto(&self.state.symbols)),
            started_at: Some(proto_timestamp(clock.started_at)),
            deadline: Some(proto_timestamp(clock.deadline())),
            occurred_at: Some(proto_timestamp(t.occurred_at)),
            emitted_at: Some(proto_timestamp(t.now)),
            elapsed: Some(proto_duration(elapsed)),
            target: Some(proto_duration(clock.allowed())),
            warning_percent,
            cause_event_id: cause.to_string(),
            corrects_sla_event_id,
            rule_title: rule.title.clone(),
        }
    }
}

/// Why an event was refused: it would take its referral past a limit of `[clock.limits]`.
/// Nothing of the event is applied; it is dead-lettered with [`LimitExceeded::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error(
        "the event would open more than {max} clocks of rule `{rule}` on this referral \
         (clock.limits.max_instances_per_rule)"
    )]
    InstancesPerRule { rule: String, max: usize },
    #[error("the event would open more than {max} clocks on this referral (clock.limits.max_open_clocks)")]
    OpenClocks { max: usize },
    #[error(
        "the event would give this referral's open clocks more than {max} distinct references \
         (clock.limits.max_references)"
    )]
    References { max: usize },
    #[error(
        "the event would pause a clock of rule `{rule}` more than {max} times \
         (clock.limits.max_pauses_per_clock)"
    )]
    Pauses { rule: String, max: u32 },
    #[error(
        "the event occurred at or before {horizon}, the oldest event time this referral still \
         remembers ids from (clock.limits.max_seen_events): a repeat could not be recognised"
    )]
    BeforeDedupHorizon { horizon: Timestamp },
    #[error(
        "the event brings a new label value (`{field}`) to a clock engine that already holds \
         {max} (clock.limits.max_label_values)"
    )]
    LabelValues { field: &'static str, max: usize },
}

impl LimitExceeded {
    /// A short, fixed reason code (dead-letter header, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            LimitExceeded::InstancesPerRule { .. } => "limit_instances_per_rule",
            LimitExceeded::OpenClocks { .. } => "limit_open_clocks",
            LimitExceeded::References { .. } => "limit_references",
            LimitExceeded::Pauses { .. } => "limit_pauses",
            LimitExceeded::BeforeDedupHorizon { .. } => "before_dedup_horizon",
            LimitExceeded::LabelValues { .. } => "limit_label_values",
        }
    }
}

impl From<LimitExceeded> for Rejection {
    fn from(e: LimitExceeded) -> Self {
        Rejection::OverLimit {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

/// The id of a clock's `breached` record: derived, so the engine keeps only a flag.
fn breach_id(referral_id: &str, rule_id: &str, clock_id: &str) -> String {
    derive_id(&[
        referral_id,
        rule_id,
        clock_id,
        SlaTransition::Breached.as_str_name(),
    ])
}

/// The instance an event names for `rule` (the value of its `instance` attribute), or "".
fn instance_of(rule: &Rule, event: &ReferralEvent, json_name: &str) -> String {
    rule.instance
        .as_deref()
        .and_then(|a| attribute(event, json_name, a))
        .and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        })
        .unwrap_or_default()
}

fn matches(event: &ReferralEvent, json_name: &str, condition: &Condition) -> bool {
    condition.predicates.iter().all(|(attr, accepted)| {
        let value = attribute(event, json_name, attr);
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

impl State {
    fn next_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// The slot of `referral_id`, allocated if new.
    fn slot_for(&mut self, referral_id: &str) -> u32 {
        if let Some(slot) = self.index.get(&self.slab, referral_id) {
            return slot;
        }
        let referral = Referral {
            id: referral_id.into(),
            ..Referral::default()
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = referral;
                slot
            }
            None => {
                self.slab.push(referral);
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index.insert(referral_id, slot);
        slot
    }

    /// Drops the slot [`State::slot_for`] allocated for an event that was then refused, if the
    /// referral holds nothing (it was new).
    fn release_if_empty(&mut self, slot: u32, referral_id: &str) {
        let r = &self.slab[slot as usize];
        if r.seen.is_empty() && r.clocks.is_empty() && r.early_stops.is_empty() {
            if let Some(slot) = self.index.remove(&self.slab, referral_id) {
                self.slab[slot as usize] = Referral::default();
                self.free.push(slot);
                self.dirty.remove(&slot);
            }
        }
    }

    /// The first half of admitting `event`: its time against the referral's dedup horizon, and
    /// its label values against the engine's table. Returns the referral's labels after the
    /// event (interning the values it brings, nothing else).
    fn admit_labels(
        &mut self,
        policy: &Policy,
        slot: u32,
        event: &ReferralEvent,
        kind: &Kind,
        at: Timestamp,
    ) -> Result<Labels, LimitExceeded> {
        let referral = &self.slab[slot as usize];
        if referral.horizon != NO_HORIZON && seen_seconds(at.as_second()) <= referral.horizon {
            return Err(LimitExceeded::BeforeDedupHorizon {
                horizon: Timestamp::from_second(i64::from(referral.horizon) + SEEN_EPOCH)
                    .unwrap_or(Timestamp::MAX),
            });
        }
        let mut labels = referral.labels;
        update_labels(
            &mut self.symbols,
            &mut labels,
            &event.force_id,
            kind,
            policy.limits.max_label_values,
        )?;
        Ok(labels)
    }

    /// Whether an event of `kind` could take the referral past a limit on clocks: it opens at
    /// most `kind.starts` clocks (each with at most one new reference), and pauses a clock at
    /// most once. If not, [`State::admit_clocks`] need not run.
    fn near_limit(&self, policy: &Policy, slot: u32, kind: &KindRules) -> bool {
        let limits = &policy.limits;
        let clocks = &self.slab[slot as usize].clocks;
        let open = clocks.len();
        (kind.starts > 0
            && (open + kind.starts > limits.max_open_clocks
                || open + kind.starts > limits.max_references
                || open + 1 > limits.max_instances_per_rule))
            || (kind.pauses
                && clocks
                    .iter()
                    .any(|c| u32::from(c.pauses) >= limits.max_pauses_per_clock))
    }

    /// The second half of admitting `event`, near a limit: checks that applying it keeps the
    /// referral within `policy.limits`, without changing anything.
    ///
    /// Counted conservatively: a start counts as a new clock when the rule applies to the
    /// referral's labels after the event and no clock of that rule and instance is open (a
    /// start that a stop in the same event frees a slot for, or that an early stop completes at
    /// once, may be counted although it ends up adding nothing). Only events that would add a
    /// clock are held to the counts, so a referral already past a lowered limit can still stop
    /// and cancel its clocks.
    fn admit_clocks(
        &self,
        policy: &Policy,
        slot: u32,
        event: &ReferralEvent,
        labels: &Labels,
        reacting: &KindRules,
    ) -> Result<(), LimitExceeded> {
        let limits = &policy.limits;
        let referral = &self.slab[slot as usize];
        // Per reacting rule: whether the event opens a clock of it, and the instance it names.
        let mut matched: Vec<(bool, String)> = Vec::with_capacity(reacting.rules.len());
        let mut opening = 0usize;
        for reaction in &reacting.rules {
            let rule_idx = reaction.rule;
            let rule = &policy.rules[usize::from(rule_idx)];
            let m = reaction.matched(rule, event, &reacting.json_name);
            let instance = instance_of(rule, event, &reacting.json_name);
            if m.pause && !m.cancel && !m.reset {
                let max = limits.max_pauses_per_clock;
                let over = referral.clocks.iter().any(|c| {
                    c.rule == rule_idx
                        && (instance.is_empty() || referral.instance(c) == instance)
                        && !c.paused()
                        && !c.breached
                        && u32::from(c.pauses) >= max
                });
                if over {
                    return Err(LimitExceeded::Pauses {
                        rule: rule.id.clone(),
                        max,
                    });
                }
            }
            let opens = m.start
                && !m.cancel
                && !m.reset
                && policy.applies(rule_idx, labels)
                && !referral
                    .clocks
                    .iter()
                    .any(|c| c.rule == rule_idx && referral.instance(c) == instance);
            opening += usize::from(opens);
            matched.push((opens, instance));
        }
        if opening > 0 {
            let clocks = &referral.clocks;
            if clocks.len() + opening > limits.max_open_clocks {
                return Err(LimitExceeded::OpenClocks {
                    max: limits.max_open_clocks,
                });
            }
            let opened = reacting
                .rules
                .iter()
                .zip(matched.iter())
                .filter(|(_, (opens, _))| *opens);
            // A rule reacts to a kind once, so each opens one clock at most.
            for (reaction, _) in opened.clone() {
                let of_rule = 1 + clocks.iter().filter(|c| c.rule == reaction.rule).count();
                if of_rule > limits.max_instances_per_rule {
                    return Err(LimitExceeded::InstancesPerRule {
                        rule: policy.rules[usize::from(reaction.rule)].id.clone(),
                        max: limits.max_instances_per_rule,
                    });
                }
            }
            let open_refs = || {
                clocks
                    .iter()
                    .map(|c| referral.instance(c))
                    .filter(|i| !i.is_empty())
            };
            let new_refs = opened
                .map(|(_, (_, i))| i.as_str())
                .filter(|i| !i.is_empty() && !open_refs().any(|o| o == *i));
            if new_refs.clone().next().is_some() {
                let mut all: Vec<&str> = open_refs().chain(new_refs).collect();
                all.sort_unstable();
                all.dedup();
                if all.len() > limits.max_references {
                    return Err(LimitExceeded::References {
                        max: limits.max_references,
                    });
                }
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        policy: &Policy,
        rule_idx: u16,
        m: Matched,
        instance: &str,
        ctx: &Ctx<'_>,
        out: &mut Vec<Transition>,
    ) {
        let rule = &policy.rules[usize::from(rule_idx)];
        let referral = &mut self.slab[ctx.slot as usize];
        // An instance-less event affects every clock of the rule; one that names an instance,
        // only that clock.
        let affects = |r: &Referral, c: &Clock| {
            c.rule == rule_idx && (instance.is_empty() || r.instance(c) == instance)
        };

        // Cancel ends the rule's clocks; reset ends them and starts them again from this event.
        if m.cancel || m.reset {
            if !referral.clocks.iter().any(|c| affects(referral, c)) {
                return;
            }
            let mut ended = Vec::new();
            let mut kept = Vec::with_capacity(referral.clocks.len());
            for c in &referral.clocks {
                if affects(referral, c) {
                    ended.push(*c);
                } else {
                    kept.push(*c);
                }
            }
            referral.clocks = kept;
            for clock in &ended {
                out.push(transition(
                    ctx.slot,
                    SlaTransition::Cancelled,
                    *clock,
                    ctx.at,
                    ctx.now,
                    Cause::Input,
                ));
            }
            if m.reset {
                let restart: Vec<String> = ended
                    .iter()
                    .map(|c| referral.instance(c).to_string())
                    .collect();
                for inst in restart {
                    // One reset event can restart several instances: each gets its own clock id.
                    let clock_id = if inst.is_empty() {
                        ctx.event_id.to_string()
                    } else {
                        format!("{}/{inst}", ctx.event_id)
                    };
                    self.start_clock(policy, rule_idx, &inst, &clock_id, ctx, out);
                }
            }
            return;
        }
        if m.stop {
            let pos = referral.clocks.iter().position(|c| {
                c.rule == rule_idx && referral.instance(c) == instance && ctx.at >= c.started_at
            });
            match pos {
                Some(pos) => {
                    let clock = referral.clocks.remove(pos);
                    complete(ctx.slot, clock, ctx.at, ctx.now, Cause::Input, out);
                    if rule.repeat {
                        self.start_clock(policy, rule_idx, instance, ctx.event_id, ctx, out);
                        return;
                    }
                }
                // An event that both stops and starts the rule (a review that also opens the next
                // review period) starts a clock below; it is not an early stop.
                None if m.start => {}
                None => {
                    if policy.limits.max_early_stops == 0 {
                        return;
                    }
                    if referral.early_stops.len() >= policy.limits.max_early_stops {
                        referral.early_stops.remove(0);
                    }
                    referral.early_stops.push(EarlyStop {
                        rule: rule_idx,
                        instance: instance.into(),
                        occurred_at: ctx.at,
                        event_id: ctx.event_id.into(),
                    });
                }
            }
        }
        if m.pause {
            let referral = &mut self.slab[ctx.slot as usize];
            for i in 0..referral.clocks.len() {
                let c = referral.clocks[i];
                if affects(referral, &c) && !c.paused() && !c.breached {
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    let clock = &mut referral.clocks[i];
                    clock.paused_since = ctx.at;
                    clock.pauses = clock.pauses.saturating_add(1);
                    clock.generation = generation;
                    out.push(transition(
                        ctx.slot,
                        SlaTransition::Paused,
                        *clock,
                        ctx.at,
                        ctx.now,
                        Cause::Input,
                    ));
                }
            }
        }
        if m.resume {
            let referral = &mut self.slab[ctx.slot as usize];
            let mut resumed = Vec::new();
            for i in 0..referral.clocks.len() {
                let c = referral.clocks[i];
                if affects(referral, &c) && c.paused() {
                    let clock = &mut referral.clocks[i];
                    clock.paused_total = clock
                        .paused_total
                        .saturating_add(ctx.at.saturating_sub(clock.paused_since).max(0));
                    clock.paused_since = RUNNING;
                    out.push(transition(
                        ctx.slot,
                        SlaTransition::Resumed,
                        *clock,
                        ctx.at,
                        ctx.now,
                        Cause::Input,
                    ));
                    resumed.push(*clock);
                }
            }
            for clock in &resumed {
                self.schedule(policy, ctx.slot, clock);
            }
        }
        if m.start {
            let referral = &self.slab[ctx.slot as usize];
            let open = referral
                .clocks
                .iter()
                .any(|c| c.rule == rule_idx && referral.instance(c) == instance);
            if !open {
                self.start_clock(policy, rule_idx, instance, ctx.event_id, ctx, out);
            }
        }
    }

    /// Starts a clock of `rule_idx` at `ctx.at` if the rule applies to the referral.
    fn start_clock(
        &mut self,
        policy: &Policy,
        rule_idx: u16,
        instance: &str,
        clock_id: &str,
        ctx: &Ctx<'_>,
        out: &mut Vec<Transition>,
    ) {
        let rule = &policy.rules[usize::from(rule_idx)];
        let referral = &mut self.slab[ctx.slot as usize];
        if !policy.applies(rule_idx, &referral.labels) {
            return;
        }
        let Some(base_deadline) = deadline_for(
            &policy.calendars,
            &mut self.deadlines,
            rule,
            self.symbols.name(referral.labels.force),
            self.symbols.name(referral.labels.risk),
            timestamp(ctx.at),
        ) else {
            return;
        };
        let mut clock = Clock {
            started_at: ctx.at,
            base_deadline: nanos(base_deadline),
            paused_total: 0,
            paused_since: RUNNING,
            generation: self.next_generation,
            warned: 0,
            rule: rule_idx,
            clock_id: referral.intern(clock_id),
            instance: if instance.is_empty() {
                0
            } else {
                1 + referral.intern(instance)
            },
            pauses: 0,
            breached: false,
        };
        self.next_generation += 1;
        out.push(transition(
            ctx.slot,
            SlaTransition::Started,
            clock,
            ctx.at,
            ctx.now,
            Cause::Input,
        ));
        // A stop that arrived first completes the clock at once.
        let early = referral.early_stops.iter().position(|s| {
            s.rule == rule_idx && &*s.instance == instance && s.occurred_at >= ctx.at
        });
        if let Some(pos) = early {
            let stop = referral.early_stops.remove(pos);
            complete(
                ctx.slot,
                clock,
                stop.occurred_at,
                ctx.now,
                Cause::Earlier(stop.event_id),
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
        if referral.clocks.len() == referral.clocks.capacity() {
            referral.clocks.reserve_exact(1);
        }
        referral.clocks.push(clock);
        self.schedule(policy, ctx.slot, &clock);
    }

    /// Recomputes the deadlines of graded rules after the referral's risk changed.
    fn regrade(&mut self, policy: &Policy, ctx: &Ctx<'_>) {
        let referral = &mut self.slab[ctx.slot as usize];
        let force = self.symbols.name(referral.labels.force);
        let risk = self.symbols.name(referral.labels.risk);
        let mut changed = Vec::new();
        for clock in &mut referral.clocks {
            let rule = &policy.rules[usize::from(clock.rule)];
            if !rule.graded() || clock.breached {
                continue;
            }
            let Some(base) = deadline_for(
                &policy.calendars,
                &mut self.deadlines,
                rule,
                force,
                risk,
                timestamp(clock.started_at),
            ) else {
                continue;
            };
            let base = nanos(base);
            if base != clock.base_deadline {
                clock.base_deadline = base;
                clock.generation = self.next_generation;
                self.next_generation += 1;
                changed.push(*clock);
            }
        }
        for clock in &changed {
            self.schedule(policy, ctx.slot, clock);
        }
    }

    /// Sets the one timer of a running clock: its next pending warning, else its deadline. Older
    /// timers of the clock are left to expire unread (their generation no longer matches).
    fn schedule(&mut self, policy: &Policy, slot: u32, clock: &Clock) {
        if clock.paused() {
            return;
        }
        let rule = &policy.rules[usize::from(clock.rule)];
        if let Some((at, _)) = next_due(rule, clock) {
            self.timers.push(Reverse(Timer {
                at,
                generation: clock.generation,
                slot,
            }));
            if self.timers.len() >= self.compact_timers_at {
                self.compact_timers();
            }
        }
    }

    /// Drops timers whose clock has been rescheduled, stopped or paused, so rescheduling far in
    /// the future cannot make the heap grow without bound.
    fn compact_timers(&mut self) {
        let slab = &self.slab;
        let live = |t: &Timer| {
            slab.get(t.slot as usize).is_some_and(|r| {
                r.clocks
                    .iter()
                    .any(|c| c.generation == t.generation && !c.paused())
            })
        };
        let timers = std::mem::take(&mut self.timers).into_vec();
        let kept: Vec<Reverse<Timer>> = timers.into_iter().filter(|t| live(&t.0)).collect();
        self.compact_timers_at = (kept.len() * 2).max(1024);
        self.timers = BinaryHeap::from(kept);
    }

    fn fire_due(&mut self, policy: &Policy, now: i64, out: &mut Vec<Transition>) {
        while let Some(&Reverse(timer)) = self.timers.peek() {
            if timer.at > now {
                break;
            }
            self.timers.pop();
            let Some(referral) = self.slab.get_mut(timer.slot as usize) else {
                continue;
            };
            let Some(clock) = referral
                .clocks
                .iter_mut()
                .find(|c| c.generation == timer.generation)
            else {
                continue;
            };
            if clock.paused() || clock.breached {
                continue;
            }
            let rule = &policy.rules[usize::from(clock.rule)];
            let Some((at, due)) = next_due(rule, clock) else {
                continue;
            };
            if at > now {
                // Not due after all (defensive: the clock changed without a new generation).
                self.timers.push(Reverse(Timer { at, ..timer }));
                continue;
            }
            self.dirty.insert(timer.slot);
            match due {
                Due::Warning(i) => {
                    clock.warned |= 1 << i;
                    let mut t = transition(
                        timer.slot,
                        SlaTransition::Warning,
                        *clock,
                        at,
                        now,
                        Cause::None,
                    );
                    t.warning = i;
                    out.push(t);
                }
                Due::Deadline => {
                    out.push(transition(
                        timer.slot,
                        SlaTransition::Breached,
                        *clock,
                        at,
                        now,
                        Cause::None,
                    ));
                    clock.breached = true;
                }
            }
            let clock = *clock;
            self.schedule(policy, timer.slot, &clock);
        }
    }
}

fn transition(
    slot: u32,
    what: SlaTransition,
    clock: Clock,
    occurred_at: i64,
    now: i64,
    cause: Cause,
) -> Transition {
    Transition {
        slot,
        what,
        clock,
        occurred_at,
        now,
        cause,
        warning: 0,
        corrects_breach: false,
    }
}

#[derive(Debug, Clone, Copy)]
enum Due {
    Warning(u8),
    Deadline,
}

/// The clock's next pending warning or, after the last, its deadline (if not breached).
fn next_due(rule: &Rule, clock: &Clock) -> Option<(i64, Due)> {
    let mut next: Option<(i64, Due)> = None;
    for (i, w) in rule.warnings.iter().enumerate().take(32) {
        if clock.warned & (1 << i) != 0 {
            continue;
        }
        if let Some(at) = warning_at(clock, *w) {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, Due::Warning(i as u8)));
            }
        }
    }
    if next.is_none() && !clock.breached {
        next = Some((clock.deadline(), Due::Deadline));
    }
    next
}

/// Working-day deadlines depend only on the London date of the start, which is constant within
/// each UTC hour (London's midnight is always 00:00 or 23:00 UTC), so they are memoized per
/// (calendar, N, hour of start): most clocks then skip the day-by-day calendar walk.
#[derive(Debug, Default)]
struct DeadlineMemo {
    working_days: HashMap<(usize, u32, i64), Timestamp>,
}

const DEADLINE_MEMO_MAX: usize = 1 << 14;

fn deadline_for(
    book: &CalendarBook,
    memo: &mut DeadlineMemo,
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
    let key = match target {
        Target::WorkingDays(n) => Some((
            std::ptr::from_ref(calendar) as usize,
            n.get(),
            start.as_second().div_euclid(3600),
        )),
        _ => None,
    };
    if let Some(d) = key.and_then(|k| memo.working_days.get(&k)) {
        return Some(*d);
    }
    match calendar.deadline(start, target) {
        Ok(d) => {
            if let Some(k) = key {
                if memo.working_days.len() >= DEADLINE_MEMO_MAX {
                    memo.working_days.clear();
                }
                memo.working_days.insert(k, d);
            }
            Some(d)
        }
        Err(e) => {
            tracing::error!(rule = %rule.id, force, error.message = %e, "cannot compute a deadline; clock not started");
            None
        }
    }
}

fn warning_at(clock: &Clock, warning: Warning) -> Option<i64> {
    let at = match warning {
        Warning::Percent(pct) => {
            let offset = i128::from(clock.allowed()) * i128::from(pct) / 100;
            let offset = i64::try_from(offset).ok()?;
            clock
                .started_at
                .saturating_add(clock.paused_total)
                .saturating_add(offset)
        }
        Warning::Before(lead) => clock.deadline().saturating_sub(duration_nanos(lead)),
    };
    (at > clock.started_at && at < clock.deadline()).then_some(at)
}

/// Ends `clock` with a stop that occurred at `stopped_at`.
fn complete(
    slot: u32,
    mut clock: Clock,
    stopped_at: i64,
    now: i64,
    cause: Cause,
    out: &mut Vec<Transition>,
) {
    if clock.paused() {
        clock.paused_total = clock
            .paused_total
            .saturating_add(stopped_at.saturating_sub(clock.paused_since).max(0));
        clock.paused_since = RUNNING;
    }
    if stopped_at <= clock.deadline() {
        out.push(transition(
            slot,
            SlaTransition::Met,
            clock,
            stopped_at,
            now,
            cause.clone(),
        ));
        if clock.breached {
            clock.breached = false;
            let mut correction = transition(
                slot,
                SlaTransition::Corrected,
                clock,
                stopped_at,
                now,
                cause,
            );
            correction.corrects_breach = true;
            out.push(correction);
        }
    } else {
        if !clock.breached {
            // The timer had not fired yet: the clock still breached, exactly once.
            out.push(transition(
                slot,
                SlaTransition::Breached,
                clock,
                clock.deadline(),
                now,
                Cause::None,
            ));
            clock.breached = true;
        }
        out.push(transition(
            slot,
            SlaTransition::MetLate,
            clock,
            stopped_at,
            now,
            cause,
        ));
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

/// Keeps the referral's labels current from the attributes events carry.
///
/// # Errors
/// [`LimitExceeded::LabelValues`] when a new value would be interned into a full table; the
/// labels are then left as they were.
fn update_labels(
    symbols: &mut Symbols,
    labels: &mut Labels,
    force_id: &str,
    kind: &Kind,
    max_values: usize,
) -> Result<(), LimitExceeded> {
    let fits = |symbols: &Symbols, field: &'static str, value: &str| {
        if symbols.is_full_for(value, max_values) {
            Err(LimitExceeded::LabelValues {
                field,
                max: max_values,
            })
        } else {
            Ok(())
        }
    };
    // Free-text labels are checked before anything is interned; enum labels come from the
    // contract's small fixed sets.
    fits(symbols, "forceId", force_id)?;
    match kind {
        Kind::ReferralReceived(r) => {
            fits(symbols, "referralReceived.area", &r.area)?;
            fits(symbols, "referralReceived.team", &r.team)?;
        }
        Kind::Allocated(a) => fits(symbols, "allocated.team", &a.team)?,
        _ => {}
    }
    if symbols.name(labels.force) != force_id {
        labels.force = symbols.intern(force_id);
    }
    let enum_sym =
        |symbols: &mut Symbols, full: &str, prefix: &str| symbols.intern(&enum_label(full, prefix));
    let set_risk = |symbols: &mut Symbols, labels: &mut Labels, risk: i32| {
        let risk = RiskGrade::try_from(risk).unwrap_or(RiskGrade::Unspecified);
        if risk != RiskGrade::Unspecified {
            labels.risk = symbols.enum_label(risk.as_str_name(), "RISK_GRADE_");
        }
    };
    match kind {
        Kind::ReferralReceived(r) => {
            let category = Category::try_from(r.category).unwrap_or(Category::Unspecified);
            labels.category = enum_sym(symbols, category.as_str_name(), "CATEGORY_");
            set_risk(symbols, labels, r.risk);
            let age = AgeBand::try_from(r.child_age_band).unwrap_or(AgeBand::Unspecified);
            labels.child_age_band = enum_sym(symbols, age.as_str_name(), "AGE_BAND_");
            labels.area = symbols.intern(&r.area);
            labels.team = symbols.intern(&r.team);
        }
        Kind::RiskAssessed(r) => set_risk(symbols, labels, r.risk),
        Kind::ChildMissingReported(r) => set_risk(symbols, labels, r.risk),
        Kind::MissingRiskReviewed(r) => set_risk(symbols, labels, r.risk),
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
            set_risk(symbols, labels, risk as i32);
        }
        Kind::ChildDetained(d) => {
            let age = AgeBand::try_from(d.child_age_band).unwrap_or(AgeBand::Unspecified);
            if age != AgeBand::Unspecified {
                labels.child_age_band = enum_sym(symbols, age.as_str_name(), "AGE_BAND_");
            }
        }
        Kind::Allocated(a) if !a.team.is_empty() => labels.team = symbols.intern(&a.team),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "limits_tests.rs"]
mod limits_tests;
