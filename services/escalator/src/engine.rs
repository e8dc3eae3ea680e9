//! The escalation state machine: pure, synchronous, driven by an injected "now".
//!
//! One [`Engine`] per assigned `sla-events` partition holds the escalations of that partition's
//! clocks. It decides *what* to notify and *when*; it never talks to a network or to Kafka. The
//! service feeds it SLA events, ticks, acknowledgements, resolutions and delivery outcomes, and
//! carries out the [`Action`]s it returns. Because time is an argument, levels, repeats and
//! acknowledgement expiry are tested on simulated time (`engine_tests.rs`).
//!
//! # Model
//! - One escalation per clock (referral + rule + clock id), so a warning that becomes a breach
//!   is one escalation whose threshold moves up: the breach restarts the policy at level 1 and
//!   clears any acknowledgement of the warning (a breach is news).
//! - The route tree picks one or more policies; each is a *track* with its own level, repeat
//!   count and next due time.
//! - Level n+1 is paged `levels[n].delay` after level n. After the last level the last level is
//!   paged again every `repeat_interval` up to `repeat_limit` times.
//! - An acknowledgement stops every track. If the policy says so, it lapses after
//!   `ack_expiry` while the clock is still breached: the current level is paged again and the
//!   chain resumes.
//! - Met, met late, cancelled and corrected resolve the escalation automatically; the API can
//!   resolve it by hand. Every receiver that was paged gets a resolve notification.
//!
//! # Notifications are state
//! A notification is first recorded as *pending* in the escalation's state; the service writes
//! that state to the changelog before it delivers anything. The delivery outcome moves it to
//! *done* (and, for a trigger, to the escalation's pages). A restart therefore re-drives pending
//! notifications and never re-sends one that is done. Each has a `delivery_id` derived from its
//! cause, so deciding twice (a replayed SLA event) yields the same id and is ignored.
//!
//! # A tick costs what is due, not what is open
//! Escalations stay open until a clock is met or someone resolves them, so a force with a
//! backlog (or a benchmark with a million breaches) holds many. Each escalation's next due
//! instant (its next level or repeat, the lapse of its acknowledgement, its Alertmanager
//! refresh, the end of its retention once resolved) is kept in a timer index, recomputed
//! whenever the escalation changes; a tick visits only the escalations due by then. Visiting
//! every escalation every tick took tens of milliseconds per 100,000, during which no SLA event
//! was read: pages fell seconds behind their breaches at a million open escalations.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use jiff::Timestamp;
use safeclock_common::config::ReceiverKind;
use safeclock_common::event::transition_label;
use safeclock_common::ids::derive_id;
use safeclock_common::schema::from_jiff;
use safeclock_common::schema::v1::{
    EscalationAction, EscalationRecord, EscalationState, EscalationStatus, EscalationTrack,
    NotificationKind, Page, PendingNotification, SlaEvent, SlaTransition,
};

use crate::routing::{Routing, Threshold};

/// The escalation id of a clock: stable across retries, restarts and levels.
pub fn escalation_id(event: &SlaEvent) -> String {
    derive_id(&[
        &event.referral_id,
        &event.rule_id,
        &event.clock_id,
        "escalation",
    ])
}

/// The label of a notification kind, as written in bodies and records.
pub fn kind_label(kind: NotificationKind) -> &'static str {
    match kind {
        NotificationKind::Trigger | NotificationKind::Unspecified => "trigger",
        NotificationKind::Acknowledge => "acknowledge",
        NotificationKind::Resolve => "resolve",
        NotificationKind::Refresh => "refresh",
    }
}

/// A notification to deliver to one receiver, with everything the receiver shows.
#[derive(Debug, Clone)]
pub struct Job {
    pub escalation_id: String,
    pub partition: i32,
    pub pending: PendingNotification,
    /// The threshold event of the escalation.
    pub event: SlaEvent,
    /// Who acknowledged or resolved (an operator id, `clock` for automatic resolution).
    pub actor: String,
    /// Why it was resolved (`met`, `met_late`, `cancelled`, `corrected`, `manual`).
    pub resolution: String,
    /// When the escalation opened (unix ms), for Alertmanager's `startsAt`.
    pub opened_at_ms: i64,
}

impl Job {
    pub fn kind(&self) -> NotificationKind {
        self.pending.kind()
    }
}

/// How a delivery ended, as the delivery layer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { attempts: u32 },
    Failed { attempts: u32, error: String },
}

/// What the service must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Deliver this notification (recorded as pending in the state first).
    Deliver(Job),
    /// Append this record to `escalation-log`.
    Audit(Box<EscalationRecord>),
    /// The retry budget of this notification is spent: write it to the dead-letter topic.
    DeadLetter { job: Job, error: String },
    /// An escalation was acknowledged this long after it opened (for the metric).
    Acknowledged { after_secs: f64 },
}

/// Why an acknowledgement or resolution was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no open escalation {0} on this instance")]
    NotFound(String),
    #[error("escalation {0} is already resolved")]
    Resolved(String),
    #[error("escalation {0} belongs to a force this token is not granted")]
    ForceNotGranted(String),
}

/// Per-status and per-level counts, for gauges.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// (level, acknowledged) -> open escalations.
    pub open_by_level: HashMap<(u32, bool), usize>,
    pub pending: usize,
    pub escalations: usize,
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn secs_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The escalations of one partition.
#[derive(Debug)]
pub struct Engine {
    partition: i32,
    routing: Arc<Routing>,
    /// Boxed: a state is about a kilobyte, and growing a map of a million of them inline moved
    /// a gigabyte in one go, stalling the loop for seconds. A B-tree, not a hash map: a hash
    /// map grows by rehashing every entry at once, and with the partitions filling evenly all of
    /// them did so in the same second (at 115,000 escalations each): the pages of that second
    /// were up to a second late. A B-tree grows a node at a time.
    escalations: BTreeMap<String, Box<EscalationState>>,
    dirty: HashSet<String>,
    closed_retention_ms: i64,
    /// (due instant in unix ms, escalation id) of every escalation with something due.
    timers: BTreeSet<(i64, String)>,
    /// How each escalation is filed: its due instant in `timers` and what it adds to `counts`
    /// (a B-tree for the same reason as `escalations`).
    filed: BTreeMap<String, Filed>,
    /// Escalations changed since they were last filed.
    unscheduled: HashSet<String>,
    /// The gauges' counts, kept as escalations are filed (a scan of every escalation took half
    /// a second at a million, every time the gauges were read).
    counts: Counts,
}

/// How one escalation is filed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Filed {
    due: Option<i64>,
    /// (highest level paged, acknowledged) while open or acknowledged.
    open: Option<(u32, bool)>,
    pending: usize,
}

/// The sums of every escalation's [`Filed`] contribution.
#[derive(Debug, Default)]
struct Counts {
    open_by_level: HashMap<(u32, bool), usize>,
    pending: usize,
}

impl Counts {
    fn add(&mut self, f: &Filed) {
        if let Some(key) = f.open {
            *self.open_by_level.entry(key).or_default() += 1;
        }
        self.pending += f.pending;
    }

    fn remove(&mut self, f: &Filed) {
        if let Some(key) = f.open {
            if let Some(n) = self.open_by_level.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.open_by_level.remove(&key);
                }
            }
        }
        self.pending = self.pending.saturating_sub(f.pending);
    }
}

impl Engine {
    pub fn new(partition: i32, routing: Arc<Routing>, closed_retention_secs: u64) -> Self {
        Self {
            partition,
            routing,
            escalations: BTreeMap::new(),
            dirty: HashSet::new(),
            closed_retention_ms: secs_ms(closed_retention_secs),
            timers: BTreeSet::new(),
            filed: BTreeMap::new(),
            unscheduled: HashSet::new(),
            counts: Counts::default(),
        }
    }

    /// Marks `id` changed: to be written, and its due instant computed again.
    fn touch(&mut self, id: String) {
        self.unscheduled.insert(id.clone());
        self.dirty.insert(id);
    }

    /// Files every changed escalation under its next due instant (or nowhere), and counts it.
    fn schedule(&mut self) {
        for id in std::mem::take(&mut self.unscheduled) {
            if let Some(old) = self.filed.remove(&id) {
                if let Some(at) = old.due {
                    self.timers.remove(&(at, id.clone()));
                }
                self.counts.remove(&old);
            }
            let Some(st) = self.escalations.get(&id) else {
                continue;
            };
            let status = st.status();
            let filed = Filed {
                due: self.due_at(st),
                open: matches!(
                    status,
                    EscalationStatus::Open | EscalationStatus::Acknowledged
                )
                .then(|| {
                    let level = st.tracks.iter().map(|t| t.level).max().unwrap_or(0);
                    (level, status == EscalationStatus::Acknowledged)
                }),
                pending: st.pending.len(),
            };
            if let Some(at) = filed.due {
                self.timers.insert((at, id.clone()));
            }
            self.counts.add(&filed);
            self.filed.insert(id, filed);
        }
    }

    /// The first instant at which a tick has something to do for `st`: exactly the conditions
    /// [`Engine::on_tick`] acts on, so an escalation is visited when, and only when, it is due.
    fn due_at(&self, st: &EscalationState) -> Option<i64> {
        let mut due: Option<i64> = None;
        let mut at = |t: i64| due = Some(due.map_or(t, |d| d.min(t)));
        match st.status() {
            EscalationStatus::Acknowledged => {
                if let Some(t) = ack_lapses_at(st) {
                    at(t);
                }
            }
            EscalationStatus::Open => {
                for t in st.tracks.iter().filter(|t| t.next_at_ms != 0) {
                    at(t.next_at_ms);
                }
            }
            EscalationStatus::Resolved => {
                if st.pending.is_empty() {
                    at(st.resolved_at_ms.saturating_add(self.closed_retention_ms));
                }
            }
            EscalationStatus::Unspecified => {}
        }
        if st.status() != EscalationStatus::Resolved {
            if let Some(interval) = refresh_interval(&self.routing, st) {
                at(if st.refreshed_at_ms == 0 {
                    i64::MIN
                } else {
                    st.refreshed_at_ms.saturating_add(interval)
                });
            }
        }
        due
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Applies one SLA event.
    pub fn on_sla_event(&mut self, event: &SlaEvent, now: Timestamp) -> Vec<Action> {
        let now = ms(now);
        let id = escalation_id(event);
        let mut actions = Vec::new();
        if let Some(st) = self.escalations.get(&id) {
            if st.seen_sla_event_ids.contains(&event.sla_event_id) {
                return actions;
            }
        }
        match event.transition() {
            SlaTransition::Warning | SlaTransition::Breached => {
                self.open_or_raise(id, event, now, &mut actions);
            }
            SlaTransition::Met
            | SlaTransition::MetLate
            | SlaTransition::Cancelled
            | SlaTransition::Corrected => {
                if let Some(st) = self.escalations.get_mut(&id) {
                    st.seen_sla_event_ids.push(event.sla_event_id.clone());
                    if st.status() != EscalationStatus::Resolved {
                        let resolution = transition_label(event.transition());
                        resolve_state(st, "clock", resolution, "", now, &mut actions);
                    }
                    self.touch(id);
                }
            }
            _ => {}
        }
        actions
    }

    fn open_or_raise(&mut self, id: String, event: &SlaEvent, now: i64, actions: &mut Vec<Action>) {
        let Some(threshold) = Threshold::of(event) else {
            return;
        };
        if let Some(st) = self.escalations.get(&id) {
            let current = st.event.as_ref().and_then(Threshold::of_opt);
            // A warning never downgrades a breach, and a resolved escalation stays resolved,
            // except that a breach reopens a resolved warning: resolving the warning ("seen,
            // on it") must never silence the breach page that follows.
            let raised = current == Some(Threshold::Warning) && threshold == Threshold::Breach;
            if (st.status() == EscalationStatus::Resolved && !raised)
                || (current == Some(Threshold::Breach) && threshold == Threshold::Warning)
            {
                if let Some(st) = self.escalations.get_mut(&id) {
                    st.seen_sla_event_ids.push(event.sla_event_id.clone());
                    self.touch(id);
                }
                return;
            }
        }
        let policies = self.routing.policies_for(event);
        if policies.is_empty() {
            return;
        }
        let st = self.escalations.entry(id.clone()).or_insert_with(|| {
            Box::new(EscalationState {
                escalation_id: id.clone(),
                partition: self.partition,
                opened_at_ms: now,
                ..EscalationState::default()
            })
        });
        st.event = Some(event.clone());
        st.seen_sla_event_ids.push(event.sla_event_id.clone());
        st.set_status(EscalationStatus::Open);
        st.resolved_by.clear();
        st.resolution.clear();
        st.resolved_at_ms = 0;
        st.acked_by.clear();
        st.ack_note.clear();
        st.acked_at_ms = 0;
        st.ack_expires_at_ms = 0;
        st.tracks = policies
            .into_iter()
            .filter_map(|name| {
                let first = self.routing.policy(&name)?.levels.first()?.delay_secs;
                Some(EscalationTrack {
                    policy: name,
                    level: 0,
                    repeats: 0,
                    next_at_ms: now.saturating_add(secs_ms(first)),
                })
            })
            .collect();
        advance(&self.routing, st, now, actions);
        self.touch(id);
    }

    /// Fires every level, repeat, lapsed acknowledgement and Alertmanager refresh due at `now`,
    /// and forgets resolved escalations past their retention.
    pub fn on_tick(&mut self, now: Timestamp) -> Vec<Action> {
        let now = ms(now);
        self.schedule();
        let mut actions = Vec::new();
        let mut forget = Vec::new();
        while self.timers.first().is_some_and(|(at, _)| *at <= now) {
            let Some((_, id)) = self.timers.pop_first() else {
                break;
            };
            if let Some(filed) = self.filed.get_mut(&id) {
                // Out of `timers` now; filed again (and recounted) below.
                filed.due = None;
            }
            let Some(st) = self.escalations.get_mut(&id) else {
                continue;
            };
            let before = actions.len();
            let mut changed = false;
            match st.status() {
                EscalationStatus::Acknowledged => {
                    if ack_lapses_at(st).is_some_and(|t| now >= t) {
                        resume_after_ack(&self.routing, st, now, &mut actions);
                        changed = true;
                    }
                }
                EscalationStatus::Open => {
                    changed |= advance(&self.routing, st, now, &mut actions);
                }
                EscalationStatus::Resolved => {
                    if st.pending.is_empty()
                        && now.saturating_sub(st.resolved_at_ms) >= self.closed_retention_ms
                    {
                        forget.push(id.clone());
                    }
                }
                EscalationStatus::Unspecified => {}
            }
            changed |= refresh(&self.routing, st, now, &mut actions);
            if changed || actions.len() != before {
                self.dirty.insert(id.clone());
            }
            // Due again later (or never): filed again below, after this tick's visits.
            self.unscheduled.insert(id);
        }
        for id in forget {
            self.escalations.remove(&id);
            self.touch(id);
        }
        self.schedule();
        actions
    }

    /// Forgets every escalation of a referral that `matches` (an erasure), open or resolved,
    /// with its pending notifications; their tombstones come with the next
    /// [`Engine::take_dirty`]. Returns how many. Looks at every escalation once.
    pub fn forget_matching(&mut self, mut matches: impl FnMut(&str) -> bool) -> usize {
        let ids: Vec<String> = self
            .escalations
            .iter()
            .filter(|(_, st)| st.event.as_ref().is_some_and(|e| matches(&e.referral_id)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.escalations.remove(id);
            self.touch(id.clone());
        }
        self.schedule();
        ids.len()
    }

    /// Acknowledges escalation `id`: no further levels or repeats until it lapses.
    ///
    /// # Errors
    /// When this engine holds no such escalation, or it is resolved.
    pub fn acknowledge(
        &mut self,
        id: &str,
        actor: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Vec<Action>, CommandError> {
        let now = ms(now);
        let st = self
            .escalations
            .get_mut(id)
            .ok_or_else(|| CommandError::NotFound(id.to_string()))?;
        if st.status() == EscalationStatus::Resolved {
            return Err(CommandError::Resolved(id.to_string()));
        }
        let mut actions = Vec::new();
        let first_ack = st.status() == EscalationStatus::Open;
        st.set_status(EscalationStatus::Acknowledged);
        st.acked_by = actor.to_string();
        st.ack_note = note.to_string();
        st.acked_at_ms = now;
        let expiry = st
            .tracks
            .iter()
            .filter_map(|t| self.routing.policy(&t.policy))
            .map(|p| p.ack_expiry_secs)
            .filter(|s| *s > 0)
            .min();
        st.ack_expires_at_ms = expiry.map_or(0, |s| now.saturating_add(secs_ms(s)));
        if first_ack {
            actions.push(Action::Acknowledged {
                after_secs: (now.saturating_sub(st.opened_at_ms)) as f64 / 1000.0,
            });
        }
        actions.push(Action::Audit(Box::new(record(
            st,
            EscalationAction::Acknowledged,
            now,
        ))));
        let pages = st.pages.clone();
        for page in pages {
            let kind = self.routing.receiver(&page.receiver).map(|r| r.kind);
            if matches!(
                kind,
                Some(ReceiverKind::Pagerduty | ReceiverKind::Webhook | ReceiverKind::Log)
            ) {
                let round = now.to_string();
                queue(
                    st,
                    &page,
                    NotificationKind::Acknowledge,
                    &round,
                    "",
                    now,
                    &mut actions,
                );
            }
        }
        self.touch(id.to_string());
        Ok(actions)
    }

    /// Resolves escalation `id` by hand.
    ///
    /// # Errors
    /// When this engine holds no such escalation, or it is already resolved.
    pub fn resolve(
        &mut self,
        id: &str,
        actor: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Vec<Action>, CommandError> {
        let now = ms(now);
        let st = self
            .escalations
            .get_mut(id)
            .ok_or_else(|| CommandError::NotFound(id.to_string()))?;
        if st.status() == EscalationStatus::Resolved {
            return Err(CommandError::Resolved(id.to_string()));
        }
        let mut actions = Vec::new();
        resolve_state(st, actor, "manual", note, now, &mut actions);
        self.touch(id.to_string());
        Ok(actions)
    }

    /// Records how a delivery ended: done, paged, failed over to the fallback, dead-lettered.
    pub fn on_outcome(
        &mut self,
        escalation_id: &str,
        delivery_id: &str,
        outcome: &Outcome,
        now: Timestamp,
    ) -> Vec<Action> {
        let now = ms(now);
        let mut actions = Vec::new();
        let Some(st) = self.escalations.get_mut(escalation_id) else {
            return actions;
        };
        let Some(pos) = st.pending.iter().position(|p| p.delivery_id == delivery_id) else {
            return actions;
        };
        let p = st.pending.remove(pos);
        self.unscheduled.insert(escalation_id.to_string());
        self.dirty.insert(escalation_id.to_string());
        let kind = p.kind();
        if kind != NotificationKind::Refresh {
            st.done.push(p.delivery_id.clone());
        }
        match outcome {
            Outcome::Delivered { attempts } => {
                if kind == NotificationKind::Refresh {
                    return actions;
                }
                let mut r = record(st, EscalationAction::Notified, now);
                fill_delivery(&mut r, &p, *attempts);
                actions.push(Action::Audit(Box::new(r)));
                if kind == NotificationKind::Trigger {
                    let page = Page {
                        receiver: p.receiver.clone(),
                        dedup_key: p.dedup_key.clone(),
                        level: p.level,
                        policy: p.policy.clone(),
                    };
                    if !st.pages.contains(&page) {
                        st.pages.push(page.clone());
                    }
                    // Paged after it was resolved: that page must be resolved too.
                    if st.status() == EscalationStatus::Resolved {
                        queue(
                            st,
                            &page,
                            NotificationKind::Resolve,
                            "",
                            "",
                            now,
                            &mut actions,
                        );
                    }
                }
            }
            Outcome::Failed { attempts, error } => {
                if kind == NotificationKind::Refresh {
                    return actions;
                }
                let mut r = record(st, EscalationAction::DeliveryFailed, now);
                fill_delivery(&mut r, &p, *attempts);
                r.error = error.clone();
                actions.push(Action::Audit(Box::new(r)));
                let mut dl = record(st, EscalationAction::DeadLettered, now);
                fill_delivery(&mut dl, &p, *attempts);
                dl.error = error.clone();
                actions.push(Action::Audit(Box::new(dl)));
                actions.push(Action::DeadLetter {
                    job: job_for(st, &p),
                    error: error.clone(),
                });
                let fallback = self
                    .routing
                    .receiver(&p.receiver)
                    .and_then(|r| r.fallback.clone());
                if let Some(fb) = fallback.filter(|_| {
                    kind == NotificationKind::Trigger
                        && p.fallback_for.is_empty()
                        && st.status() != EscalationStatus::Resolved
                }) {
                    let page = Page {
                        receiver: fb.clone(),
                        dedup_key: derive_id(&[&p.dedup_key, "fallback", &fb]),
                        level: p.level,
                        policy: p.policy.clone(),
                    };
                    let round = p.repeat.to_string();
                    queue(st, &page, kind, &round, &p.receiver, now, &mut actions);
                }
            }
        }
        actions
    }

    /// Every pending notification, to re-drive after a restore.
    pub fn pending_jobs(&self) -> Vec<Job> {
        self.escalations
            .values()
            .flat_map(|st| st.pending.iter().map(|p| job_for(st, p)))
            .collect()
    }

    /// The escalations that are not resolved, for the API.
    pub fn open(&self) -> impl Iterator<Item = &EscalationState> {
        self.escalations
            .values()
            .map(|s| &**s)
            .filter(|s| s.status() != EscalationStatus::Resolved)
    }

    pub fn get(&self, id: &str) -> Option<&EscalationState> {
        self.escalations.get(id).map(|s| &**s)
    }

    /// The gauges' counts: kept as escalations change, so reading them costs nothing like a
    /// scan.
    pub fn stats(&mut self) -> Stats {
        self.schedule();
        Stats {
            escalations: self.escalations.len(),
            pending: self.counts.pending,
            open_by_level: self.counts.open_by_level.clone(),
        }
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The escalations changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<String> {
        self.dirty.drain().collect()
    }

    /// Marks `id` to be written again with the next changes (its current state, or a tombstone
    /// when it is gone): for a write the broker may not have taken.
    pub fn mark_dirty(&mut self, id: &str) {
        self.dirty.insert(id.to_string());
    }

    /// The encoded state to write for `id` (without copying it first); `None` means a
    /// tombstone.
    pub fn encode(&self, id: &str) -> Option<Vec<u8>> {
        self.escalations
            .get(id)
            .map(|s| prost::Message::encode_to_vec(&**s))
    }

    /// The state to write for `id`; `None` means a tombstone.
    pub fn export(&self, id: &str) -> Option<EscalationState> {
        self.escalations.get(id).map(|s| (**s).clone())
    }

    /// Adopts a restored state.
    pub fn import(&mut self, mut state: EscalationState) {
        state.partition = self.partition;
        self.unscheduled.insert(state.escalation_id.clone());
        self.escalations
            .insert(state.escalation_id.clone(), Box::new(state));
    }
}

impl Threshold {
    fn of_opt(event: &SlaEvent) -> Option<Threshold> {
        Threshold::of(event)
    }
}

/// Pages every level and repeat due by `now`. Returns whether anything changed.
fn advance(
    routing: &Routing,
    st: &mut EscalationState,
    now: i64,
    actions: &mut Vec<Action>,
) -> bool {
    let mut changed = false;
    for i in 0..st.tracks.len() {
        loop {
            let t = &st.tracks[i];
            if t.next_at_ms == 0 || t.next_at_ms > now {
                break;
            }
            let Some(policy) = routing.policy(&t.policy) else {
                st.tracks[i].next_at_ms = 0;
                break;
            };
            let due = t.next_at_ms;
            let levels = policy.levels.len() as u32;
            let (level, repeat) = if t.level < levels {
                (t.level + 1, 0)
            } else if t.repeats < policy.repeat_limit {
                (t.level, t.repeats + 1)
            } else {
                st.tracks[i].next_at_ms = 0;
                break;
            };
            let next = if level < levels {
                due.saturating_add(secs_ms(policy.levels[level as usize].delay_secs))
            } else if repeat < policy.repeat_limit && policy.repeat_interval_secs > 0 {
                due.saturating_add(secs_ms(policy.repeat_interval_secs))
            } else {
                0
            };
            let receivers = policy.levels[(level - 1) as usize].receivers.clone();
            let name = policy.name.clone();
            let t = &mut st.tracks[i];
            t.level = level;
            t.repeats = repeat;
            t.next_at_ms = next;
            page_level(st, &name, level, repeat, &receivers, now, actions);
            changed = true;
        }
    }
    changed
}

/// Queues a trigger for each receiver of a level.
fn page_level(
    st: &mut EscalationState,
    policy: &str,
    level: u32,
    repeat: u32,
    receivers: &[String],
    now: i64,
    actions: &mut Vec<Action>,
) {
    let event = st.event.clone().unwrap_or_default();
    for receiver in receivers {
        let page = Page {
            receiver: receiver.clone(),
            dedup_key: dedup_key(&st.escalation_id, &event, level, receiver),
            level,
            policy: policy.to_string(),
        };
        let round = repeat.to_string();
        queue(
            st,
            &page,
            NotificationKind::Trigger,
            &round,
            "",
            now,
            actions,
        );
    }
}

/// Stable per escalation + threshold + level + receiver: receivers de-duplicate on it, and
/// PagerDuty acknowledges and resolves by it.
pub fn dedup_key(escalation_id: &str, event: &SlaEvent, level: u32, receiver: &str) -> String {
    derive_id(&[
        escalation_id,
        transition_label(event.transition()),
        // The threshold: the SLA event's id is unique per warning of a clock and per breach.
        &event.sla_event_id,
        &level.to_string(),
        receiver,
    ])
}

/// Records a pending notification (unless the same one is pending or done) and asks for it to
/// be delivered.
fn queue(
    st: &mut EscalationState,
    page: &Page,
    kind: NotificationKind,
    round: &str,
    fallback_for: &str,
    now: i64,
    actions: &mut Vec<Action>,
) {
    let delivery_id = derive_id(&[&page.dedup_key, kind_label(kind), round]);
    if st.done.contains(&delivery_id) || st.pending.iter().any(|p| p.delivery_id == delivery_id) {
        return;
    }
    let repeat = match kind {
        NotificationKind::Trigger => round.parse().unwrap_or(0),
        _ => 0,
    };
    let mut p = PendingNotification {
        delivery_id,
        dedup_key: page.dedup_key.clone(),
        receiver: page.receiver.clone(),
        kind: 0,
        level: page.level,
        repeat,
        policy: page.policy.clone(),
        fallback_for: fallback_for.to_string(),
        created_at_ms: now,
    };
    p.set_kind(kind);
    actions.push(Action::Deliver(job_for(st, &p)));
    st.pending.push(p);
}

fn job_for(st: &EscalationState, p: &PendingNotification) -> Job {
    Job {
        escalation_id: st.escalation_id.clone(),
        partition: st.partition,
        pending: p.clone(),
        event: st.event.clone().unwrap_or_default(),
        actor: if st.status() == EscalationStatus::Resolved {
            st.resolved_by.clone()
        } else {
            st.acked_by.clone()
        },
        resolution: st.resolution.clone(),
        opened_at_ms: st.opened_at_ms,
    }
}

fn resolve_state(
    st: &mut EscalationState,
    actor: &str,
    resolution: &str,
    note: &str,
    now: i64,
    actions: &mut Vec<Action>,
) {
    st.set_status(EscalationStatus::Resolved);
    st.resolved_by = actor.to_string();
    st.resolution = resolution.to_string();
    st.resolved_at_ms = now;
    for t in &mut st.tracks {
        t.next_at_ms = 0;
    }
    let mut r = record(st, EscalationAction::Resolved, now);
    r.note = note.to_string();
    actions.push(Action::Audit(Box::new(r)));
    // Alertmanager and email have no acknowledgement, but every receiver paged hears the end.
    for page in st.pages.clone() {
        queue(st, &page, NotificationKind::Resolve, "", "", now, actions);
    }
}

fn resume_after_ack(
    routing: &Routing,
    st: &mut EscalationState,
    now: i64,
    actions: &mut Vec<Action>,
) {
    st.set_status(EscalationStatus::Open);
    let mut r = record(st, EscalationAction::AckExpired, now);
    r.actor = st.acked_by.clone();
    actions.push(Action::Audit(Box::new(r)));
    st.acked_by.clear();
    st.ack_note.clear();
    st.acked_at_ms = 0;
    st.ack_expires_at_ms = 0;
    for i in 0..st.tracks.len() {
        let Some(policy) = routing.policy(&st.tracks[i].policy) else {
            continue;
        };
        let t = &mut st.tracks[i];
        let level = t.level.max(1);
        t.level = level;
        t.repeats += 1;
        let repeat = t.repeats;
        let levels = policy.levels.len() as u32;
        t.next_at_ms = if level < levels {
            now.saturating_add(secs_ms(policy.levels[level as usize].delay_secs))
        } else if repeat < policy.repeat_limit && policy.repeat_interval_secs > 0 {
            now.saturating_add(secs_ms(policy.repeat_interval_secs))
        } else {
            0
        };
        let receivers = policy.levels[(level - 1) as usize].receivers.clone();
        let name = policy.name.clone();
        page_level(st, &name, level, repeat, &receivers, now, actions);
    }
}

/// When the acknowledgement of `st` lapses: only an acknowledged breach with an expiry lapses.
fn ack_lapses_at(st: &EscalationState) -> Option<i64> {
    let breached = st.event.as_ref().and_then(Threshold::of_opt) == Some(Threshold::Breach);
    (st.ack_expires_at_ms > 0 && breached).then_some(st.ack_expires_at_ms)
}

fn is_alertmanager(routing: &Routing, receiver: &str) -> bool {
    routing
        .receiver(receiver)
        .is_some_and(|r| r.kind == ReceiverKind::Alertmanager)
}

/// How often the pages of `st` are posted again: the shortest refresh interval of the
/// Alertmanager receivers it paged, or `None` when it paged none.
fn refresh_interval(routing: &Routing, st: &EscalationState) -> Option<i64> {
    st.pages
        .iter()
        .filter_map(|p| routing.receiver(&p.receiver))
        .filter(|r| r.kind == ReceiverKind::Alertmanager)
        .map(|r| r.refresh_ms)
        .min()
}

/// Alertmanager forgets a firing alert that is not posted again: re-post the pages of open
/// escalations to Alertmanager receivers every `refresh_interval`.
fn refresh(
    routing: &Routing,
    st: &mut EscalationState,
    now: i64,
    actions: &mut Vec<Action>,
) -> bool {
    if st.status() == EscalationStatus::Resolved {
        return false;
    }
    let Some(interval) = refresh_interval(routing, st) else {
        return false;
    };
    let am_pages: Vec<Page> = st
        .pages
        .iter()
        .filter(|p| is_alertmanager(routing, &p.receiver))
        .cloned()
        .collect();
    if st.refreshed_at_ms == 0 {
        st.refreshed_at_ms = now;
        return true;
    }
    if now.saturating_sub(st.refreshed_at_ms) < interval {
        return false;
    }
    st.refreshed_at_ms = now;
    let mut changed = true;
    for page in am_pages {
        let busy = st
            .pending
            .iter()
            .any(|p| p.dedup_key == page.dedup_key && p.receiver == page.receiver);
        if !busy {
            queue(
                st,
                &page,
                NotificationKind::Refresh,
                &now.to_string(),
                "",
                now,
                actions,
            );
            changed = true;
        }
    }
    changed
}

fn fill_delivery(r: &mut EscalationRecord, p: &PendingNotification, attempts: u32) {
    r.receiver = p.receiver.clone();
    r.dedup_key = p.dedup_key.clone();
    r.level = p.level;
    r.attempt = attempts;
    r.notification = kind_label(p.kind()).to_string();
    r.repeat = p.repeat;
    r.delivery_id = p.delivery_id.clone();
    r.policy = p.policy.clone();
}

/// An audit record of `st` (delivery fields empty).
pub fn record(st: &EscalationState, action: EscalationAction, now_ms: i64) -> EscalationRecord {
    let none = SlaEvent::default();
    let e = st.event.as_ref().unwrap_or(&none);
    let at = Timestamp::from_millisecond(now_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    let mut r = EscalationRecord {
        escalation_id: st.escalation_id.clone(),
        level: st.tracks.iter().map(|t| t.level).max().unwrap_or(0),
        sla_event_id: e.sla_event_id.clone(),
        transition: e.transition,
        referral_id: e.referral_id.clone(),
        rule_id: e.rule_id.clone(),
        severity: e.severity,
        labels: e.labels.clone(),
        deadline: e.deadline,
        at: Some(from_jiff(at)),
        ..EscalationRecord::default()
    };
    r.set_action(action);
    match action {
        EscalationAction::Acknowledged => {
            r.actor = st.acked_by.clone();
            r.note = st.ack_note.clone();
        }
        EscalationAction::Resolved => {
            r.actor = st.resolved_by.clone();
            r.resolution = st.resolution.clone();
        }
        _ => {}
    }
    r
}

/// An audit record of one notification (an attempt, or its outcome).
pub fn job_record(
    job: &Job,
    action: EscalationAction,
    attempts: u32,
    error: &str,
    now: Timestamp,
) -> EscalationRecord {
    let e = &job.event;
    let mut r = EscalationRecord {
        escalation_id: job.escalation_id.clone(),
        sla_event_id: e.sla_event_id.clone(),
        transition: e.transition,
        referral_id: e.referral_id.clone(),
        rule_id: e.rule_id.clone(),
        severity: e.severity,
        labels: e.labels.clone(),
        deadline: e.deadline,
        at: Some(from_jiff(now)),
        error: error.to_string(),
        ..EscalationRecord::default()
    };
    r.set_action(action);
    fill_delivery(&mut r, &job.pending, attempts);
    r
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod engine_tests;
