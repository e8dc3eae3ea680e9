//! The escalation state machine on simulated time: levels, repeats, acknowledgement and its
//! expiry, automatic and manual resolution, fallback, duplicates, and state round trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use safeclock_common::config::Settings;
use safeclock_common::schema::v1::{
    EscalationAction, EscalationStatus, NotificationKind, Severity, SlaEvent, SlaLabels,
    SlaTransition,
};

use super::*;
use crate::routing::Routing;

const CONFIG: &str = r#"
[escalator]
log_receiver = false
escalate_warnings = false

[[escalator.receivers]]
name = "team"
kind = "webhook"
url = "http://127.0.0.1:1/team"
fallback = "backup"
[[escalator.receivers]]
name = "inspector"
kind = "pagerduty"
routing_key = "rk-0123456789"
[[escalator.receivers]]
name = "superintendent"
kind = "email"
smtp_host = "127.0.0.1"
from = "safeclock@force.example"
to = ["duty@force.example"]
[[escalator.receivers]]
name = "backup"
kind = "log"
[[escalator.receivers]]
name = "am"
kind = "alertmanager"
url = "http://127.0.0.1:1"
refresh_interval_secs = 60

[[escalator.policies]]
name = "breach"
repeat_interval_secs = 1800
repeat_limit = 2
ack_expiry_secs = 7200
  [[escalator.policies.levels]]
  delay_secs = 0
  receivers = ["team", "am"]
  [[escalator.policies.levels]]
  delay_secs = 900
  receivers = ["inspector"]
  [[escalator.policies.levels]]
  delay_secs = 1800
  receivers = ["superintendent"]

[[escalator.policies]]
name = "warning"
  [[escalator.policies.levels]]
  receivers = ["team"]

[escalator.default_route]
breach_policy = "breach"
warning_policy = "warning"
"#;

fn routing() -> Arc<Routing> {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, CONFIG.as_bytes()).unwrap();
    let s = Settings::load_with_env(Some(f.path()), Vec::new()).unwrap();
    Arc::new(Routing::new(&s.escalator))
}

fn engine() -> Engine {
    Engine::new(0, routing(), 86_400)
}

fn t0() -> Timestamp {
    "2026-11-30T09:00:00Z".parse().unwrap()
}

fn at(minutes: i64) -> Timestamp {
    t0() + SignedDuration::from_mins(minutes)
}

fn sla(transition: SlaTransition, id: &str) -> SlaEvent {
    SlaEvent {
        sla_event_id: id.into(),
        referral_id: "R-1".into(),
        rule_id: "victim-contact".into(),
        clock_id: "c-1".into(),
        transition: transition as i32,
        severity: Severity::High as i32,
        labels: Some(SlaLabels {
            force_id: "nottinghamshire".into(),
            risk: "high".into(),
            ..SlaLabels::default()
        }),
        ..SlaEvent::default()
    }
}

fn breach() -> SlaEvent {
    sla(SlaTransition::Breached, "s-breach")
}

/// (receiver, kind, level, repeat) of every delivery asked for.
fn deliveries(actions: &[Action]) -> Vec<(String, NotificationKind, u32, u32)> {
    all_deliveries(actions)
        .into_iter()
        .filter(|x| x.1 != NotificationKind::Refresh)
        .collect()
}

/// Like [`deliveries`], Alertmanager refreshes included.
fn all_deliveries(actions: &[Action]) -> Vec<(String, NotificationKind, u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(j) => Some((
                j.pending.receiver.clone(),
                j.kind(),
                j.pending.level,
                j.pending.repeat,
            )),
            _ => None,
        })
        .collect()
}

fn jobs(actions: &[Action]) -> Vec<Job> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

fn audits(actions: &[Action]) -> Vec<EscalationAction> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Audit(r) => Some(r.action()),
            _ => None,
        })
        .collect()
}

fn d(
    receiver: &str,
    kind: NotificationKind,
    level: u32,
    repeat: u32,
) -> (String, NotificationKind, u32, u32) {
    (receiver.to_string(), kind, level, repeat)
}

/// Delivers every job in `actions` successfully; returns the follow-up actions.
fn deliver_all(e: &mut Engine, actions: &[Action], now: Timestamp) -> Vec<Action> {
    let mut out = Vec::new();
    for j in jobs(actions) {
        out.extend(e.on_outcome(
            &j.escalation_id,
            &j.pending.delivery_id,
            &Outcome::Delivered { attempts: 1 },
            now,
        ));
    }
    out
}

use NotificationKind::{Acknowledge, Refresh, Resolve, Trigger};

#[test]
fn levels_fire_after_their_delays_then_the_last_level_repeats_up_to_the_limit() {
    let mut e = engine();
    let a = e.on_sla_event(&breach(), at(0));
    assert_eq!(
        deliveries(&a),
        [d("team", Trigger, 1, 0), d("am", Trigger, 1, 0)]
    );
    deliver_all(&mut e, &a, at(0));
    assert!(
        deliveries(&e.on_tick(at(14))).is_empty(),
        "level 2 not before 15 min"
    );
    let a = e.on_tick(at(15));
    assert_eq!(deliveries(&a), [d("inspector", Trigger, 2, 0)]);
    deliver_all(&mut e, &a, at(15));
    assert!(deliveries(&e.on_tick(at(44))).is_empty());
    let a = e.on_tick(at(45));
    assert_eq!(deliveries(&a), [d("superintendent", Trigger, 3, 0)]);
    deliver_all(&mut e, &a, at(45));
    // Repeats of the last level every 30 min, twice.
    let a = e.on_tick(at(75));
    assert_eq!(deliveries(&a), [d("superintendent", Trigger, 3, 1)]);
    deliver_all(&mut e, &a, at(75));
    let a = e.on_tick(at(105));
    assert_eq!(deliveries(&a), [d("superintendent", Trigger, 3, 2)]);
    deliver_all(&mut e, &a, at(105));
    let later: Vec<_> = deliveries(&e.on_tick(at(600)))
        .into_iter()
        .filter(|x| x.1 == Trigger)
        .collect();
    assert!(later.is_empty(), "repeat limit reached: {later:?}");
    // A tick that jumps past several due times pages each of them once, in order.
    let mut e = engine();
    let a = e.on_sla_event(&breach(), at(0));
    deliver_all(&mut e, &a, at(0));
    let a = e.on_tick(at(60));
    assert_eq!(
        deliveries(&a)
            .into_iter()
            .filter(|x| x.1 == Trigger)
            .collect::<Vec<_>>(),
        [
            d("inspector", Trigger, 2, 0),
            d("superintendent", Trigger, 3, 0)
        ]
    );
}

#[test]
fn acknowledgement_stops_the_chain_and_tells_receivers_that_support_it() {
    let mut e = engine();
    let id = escalation_id(&breach());
    let a = e.on_sla_event(&breach(), at(0));
    deliver_all(&mut e, &a, at(0));
    let a = e.on_tick(at(15));
    deliver_all(&mut e, &a, at(15));
    let a = e
        .acknowledge(&id, "duty-desk", "taking it", at(20))
        .unwrap();
    // PagerDuty and webhooks hear of it; Alertmanager has no acknowledgement.
    let mut got = deliveries(&a);
    got.sort();
    assert_eq!(
        got,
        [
            d("inspector", Acknowledge, 2, 0),
            d("team", Acknowledge, 1, 0)
        ]
    );
    assert_eq!(audits(&a), [EscalationAction::Acknowledged]);
    assert!(a.iter().any(
        |x| matches!(x, Action::Acknowledged { after_secs } if (*after_secs - 1200.0).abs() < 1e-6)
    ));
    assert_eq!(e.get(&id).unwrap().status(), EscalationStatus::Acknowledged);
    // No level 3 while acknowledged (the ack lapses only after 2 h).
    let triggers: Vec<_> = deliveries(&e.on_tick(at(100)))
        .into_iter()
        .filter(|x| x.1 == Trigger)
        .collect();
    assert!(triggers.is_empty(), "{triggers:?}");
}

#[test]
fn an_acknowledgement_lapses_and_escalation_resumes_while_the_clock_is_breached() {
    let mut e = engine();
    let id = escalation_id(&breach());
    let a = e.on_sla_event(&breach(), at(0));
    deliver_all(&mut e, &a, at(0));
    let a = e.acknowledge(&id, "duty-desk", "", at(5)).unwrap();
    deliver_all(&mut e, &a, at(5));
    assert!(deliveries(&e.on_tick(at(124))).is_empty());
    // 2 h after the acknowledgement: level 1 is paged again and the chain continues.
    let a = e.on_tick(at(125));
    assert_eq!(audits(&a), [EscalationAction::AckExpired]);
    let triggers: Vec<_> = deliveries(&a)
        .into_iter()
        .filter(|x| x.1 == Trigger)
        .collect();
    assert_eq!(triggers, [d("team", Trigger, 1, 1), d("am", Trigger, 1, 1)]);
    assert_eq!(e.get(&id).unwrap().status(), EscalationStatus::Open);
    deliver_all(&mut e, &a, at(125));
    let a = e.on_tick(at(140));
    assert_eq!(deliveries(&a), [d("inspector", Trigger, 2, 0)]);
}

#[test]
fn warnings_do_not_lapse_and_a_breach_reopens_an_acknowledged_warning() {
    let mut e = engine();
    let w = sla(SlaTransition::Warning, "s-warn");
    let id = escalation_id(&w);
    let a = e.on_sla_event(&w, at(0));
    assert_eq!(deliveries(&a), [d("team", Trigger, 1, 0)]);
    deliver_all(&mut e, &a, at(0));
    e.acknowledge(&id, "duty-desk", "", at(1)).unwrap();
    assert!(deliveries(&e.on_tick(at(1000))).is_empty());
    // The breach is news: the breach policy starts from level 1, the warning's ack is cleared.
    let a = e.on_sla_event(&breach(), at(1001));
    assert_eq!(
        deliveries(&a),
        [d("team", Trigger, 1, 0), d("am", Trigger, 1, 0)]
    );
    let st = e.get(&id).unwrap();
    assert_eq!(st.status(), EscalationStatus::Open);
    assert!(st.acked_by.is_empty());
    assert_eq!(st.tracks[0].policy, "breach");
    // A late warning never downgrades the breach.
    let late = sla(SlaTransition::Warning, "s-warn-2");
    assert!(e.on_sla_event(&late, at(1002)).is_empty());
}

#[test]
fn resolving_a_warning_never_silences_the_breach_that_follows() {
    let mut e = engine();
    let w = sla(SlaTransition::Warning, "s-warn");
    let id = escalation_id(&w);
    let a = e.on_sla_event(&w, at(0));
    deliver_all(&mut e, &a, at(0));
    let a = e.resolve(&id, "op-7", "", at(5)).unwrap();
    deliver_all(&mut e, &a, at(5));
    assert_eq!(e.get(&id).unwrap().status(), EscalationStatus::Resolved);
    // The breach pages from level 1 of the breach policy, as if the warning had not been seen.
    let a = e.on_sla_event(&breach(), at(60));
    assert_eq!(
        deliveries(&a),
        [d("team", Trigger, 1, 0), d("am", Trigger, 1, 0)]
    );
    let st = e.get(&id).unwrap();
    assert_eq!(st.status(), EscalationStatus::Open);
    assert!(st.resolved_by.is_empty() && st.resolution.is_empty());
    deliver_all(&mut e, &a, at(60));
    // ... and climbs its levels.
    assert_eq!(
        deliveries(&e.on_tick(at(75))),
        [d("inspector", Trigger, 2, 0)]
    );
    // Resolving the breach itself does hold: a replay of it pages nobody.
    let a = e.resolve(&id, "op-7", "", at(80)).unwrap();
    deliver_all(&mut e, &a, at(80));
    assert!(deliveries(&e.on_sla_event(&breach(), at(81))).is_empty());
}

#[test]
fn met_met_late_and_cancelled_resolve_and_every_paged_receiver_hears_it() {
    for (t, label) in [
        (SlaTransition::Met, "met"),
        (SlaTransition::MetLate, "met_late"),
        (SlaTransition::Cancelled, "cancelled"),
    ] {
        let mut e = engine();
        let id = escalation_id(&breach());
        let a = e.on_sla_event(&breach(), at(0));
        deliver_all(&mut e, &a, at(0));
        let a = e.on_tick(at(15));
        deliver_all(&mut e, &a, at(15));
        let a = e.on_sla_event(&sla(t, "s-stop"), at(20));
        assert_eq!(audits(&a), [EscalationAction::Resolved], "{label}");
        let mut got = deliveries(&a);
        got.sort();
        assert_eq!(
            got,
            [
                d("am", Resolve, 1, 0),
                d("inspector", Resolve, 2, 0),
                d("team", Resolve, 1, 0)
            ],
            "{label}"
        );
        let st = e.get(&id).unwrap();
        assert_eq!(st.status(), EscalationStatus::Resolved);
        assert_eq!(st.resolution, label);
        assert_eq!(st.resolved_by, "clock");
        // Nothing more is paged, and a replayed breach does not reopen it.
        deliver_all(&mut e, &a, at(20));
        assert!(deliveries(&e.on_tick(at(500))).is_empty());
        assert!(deliveries(&e.on_sla_event(&breach(), at(501))).is_empty());
        // Forgotten after the retention (1 day), as a tombstone.
        e.take_dirty();
        e.on_tick(at(20 + 24 * 60));
        assert!(e.get(&id).is_none());
        assert_eq!(e.take_dirty(), vec![id.clone()]);
        assert!(e.export(&id).is_none());
    }
}

#[test]
fn manual_resolution_and_commands_on_unknown_or_resolved_escalations() {
    let mut e = engine();
    let id = escalation_id(&breach());
    assert_eq!(
        e.acknowledge("nope", "a", "", at(0)).unwrap_err(),
        CommandError::NotFound("nope".into())
    );
    let a = e.on_sla_event(&breach(), at(0));
    deliver_all(&mut e, &a, at(0));
    let a = e
        .resolve(&id, "duty-desk/op-7", "false alarm", at(3))
        .unwrap();
    assert_eq!(audits(&a), [EscalationAction::Resolved]);
    assert_eq!(deliveries(&a).len(), 2);
    assert_eq!(e.get(&id).unwrap().resolution, "manual");
    assert!(matches!(
        e.acknowledge(&id, "a", "", at(4)),
        Err(CommandError::Resolved(_))
    ));
    assert!(matches!(
        e.resolve(&id, "a", "", at(4)),
        Err(CommandError::Resolved(_))
    ));
}

#[test]
fn a_failed_delivery_is_dead_lettered_and_goes_to_the_fallback_once() {
    let mut e = engine();
    let id = escalation_id(&breach());
    let a = e.on_sla_event(&breach(), at(0));
    let team = jobs(&a)
        .into_iter()
        .find(|j| j.pending.receiver == "team")
        .unwrap();
    let failed = Outcome::Failed {
        attempts: 5,
        error: "HTTP 500".into(),
    };
    let b = e.on_outcome(&id, &team.pending.delivery_id, &failed, at(1));
    assert_eq!(
        audits(&b),
        [
            EscalationAction::DeliveryFailed,
            EscalationAction::DeadLettered
        ]
    );
    assert!(b
        .iter()
        .any(|x| matches!(x, Action::DeadLetter { error, .. } if error == "HTTP 500")));
    let fb = jobs(&b);
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0].pending.receiver, "backup");
    assert_eq!(fb[0].pending.fallback_for, "team");
    // Reporting the same outcome twice changes nothing.
    assert!(e
        .on_outcome(&id, &team.pending.delivery_id, &failed, at(1))
        .is_empty());
    // The fallback was paged, so it is resolved too.
    deliver_all(&mut e, &b, at(2));
    let r = e.resolve(&id, "x", "", at(3)).unwrap();
    assert!(deliveries(&r).contains(&d("backup", Resolve, 1, 0)));
    assert!(
        !deliveries(&r).iter().any(|x| x.0 == "team"),
        "team was never paged"
    );
}

#[test]
fn duplicates_are_ignored_and_a_replay_decides_the_same_ids() {
    let mut e1 = engine();
    let mut e2 = engine();
    let a1 = e1.on_sla_event(&breach(), at(0));
    let a2 = e2.on_sla_event(&breach(), at(0));
    let ids = |a: &[Action]| {
        jobs(a)
            .into_iter()
            .map(|j| (j.pending.delivery_id, j.pending.dedup_key))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a1), ids(&a2), "same cause, same ids");
    assert!(
        e1.on_sla_event(&breach(), at(1)).is_empty(),
        "same SLA event id again"
    );
}

#[test]
fn state_round_trips_with_pending_notifications_and_never_resends_done_ones() {
    let mut e = engine();
    let id = escalation_id(&breach());
    let a = e.on_sla_event(&breach(), at(0));
    let js = jobs(&a);
    // "team" delivered before the crash, "am" still pending.
    let team = js.iter().find(|j| j.pending.receiver == "team").unwrap();
    e.on_outcome(
        &id,
        &team.pending.delivery_id,
        &Outcome::Delivered { attempts: 1 },
        at(0),
    );
    let bytes = prost::Message::encode_to_vec(&e.export(&id).unwrap());
    let mut restored = engine();
    restored.import(prost::Message::decode(bytes.as_slice()).unwrap());
    let pending = restored.pending_jobs();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].pending.receiver, "am");
    // A replay of the breach after the restore decides nothing new.
    assert!(restored.on_sla_event(&breach(), at(1)).is_empty());
    // The chain continues where it was.
    let a = restored.on_tick(at(15));
    assert_eq!(
        deliveries(&a)
            .into_iter()
            .filter(|x| x.1 == Trigger)
            .collect::<Vec<_>>(),
        [d("inspector", Trigger, 2, 0)]
    );
}

#[test]
fn alertmanager_pages_are_posted_again_while_open_and_not_after_resolution() {
    let mut e = engine();
    let id = escalation_id(&breach());
    let a = e.on_sla_event(&breach(), at(0));
    deliver_all(&mut e, &a, at(0));
    let secs = |s: i64| t0() + SignedDuration::from_secs(s);
    e.on_tick(secs(1));
    assert!(all_deliveries(&e.on_tick(secs(30))).is_empty());
    let a = e.on_tick(secs(61));
    assert_eq!(all_deliveries(&a), [d("am", Refresh, 1, 0)]);
    // Not again while that refresh is still pending.
    assert!(all_deliveries(&e.on_tick(secs(122))).is_empty());
    deliver_all(&mut e, &a, secs(123));
    assert_eq!(
        all_deliveries(&e.on_tick(secs(183))),
        [d("am", Refresh, 1, 0)]
    );
    e.resolve(&id, "x", "", secs(200)).unwrap();
    assert!(!all_deliveries(&e.on_tick(secs(1000)))
        .iter()
        .any(|x| x.1 == Refresh));
}

#[test]
fn events_that_route_nowhere_open_nothing() {
    let mut e = Engine::new(
        0,
        Arc::new(Routing::new(&{
            let mut s = Settings::defaults().unwrap().escalator;
            s.default_route.policy = None;
            s
        })),
        60,
    );
    assert!(e.on_sla_event(&breach(), at(0)).is_empty());
    assert_eq!(e.stats().escalations, 0);
}

#[test]
fn each_escalation_is_visited_when_due_and_forgotten_after_its_retention() {
    let mut e = engine();
    let of = |i: usize, transition: SlaTransition, id: &str| SlaEvent {
        clock_id: format!("c-{i}"),
        ..sla(transition, &format!("{id}-{i}"))
    };
    // 600 escalations opened over an hour, ten a minute.
    for i in 0..600 {
        let opened = at(i64::try_from(i / 10).unwrap());
        let a = e.on_sla_event(&of(i, SlaTransition::Breached, "b"), opened);
        deliver_all(&mut e, &a, opened);
    }
    // Level 2 pages 15 min after each opened: ten a minute, each exactly once, none early.
    for minute in 0..=80 {
        let a = e.on_tick(at(minute));
        let paged = deliveries(&a)
            .into_iter()
            .filter(|x| *x == d("inspector", Trigger, 2, 0))
            .count();
        let expected = if (15..75).contains(&minute) { 10 } else { 0 };
        assert_eq!(paged, expected, "level 2 pages at minute {minute}");
        deliver_all(&mut e, &a, at(minute));
    }
    // The gauges' counts, kept as escalations change, agree with a count of the states.
    let stats = e.stats();
    assert_eq!(stats.open_by_level.values().sum::<usize>(), 600);
    assert_eq!(stats.pending, 0, "every notification delivered");
    let by_level = |level: u32| {
        e.open()
            .filter(|st| st.tracks.iter().map(|t| t.level).max() == Some(level))
            .count()
    };
    for ((level, acked), n) in &stats.open_by_level {
        assert!(!acked);
        assert_eq!(*n, by_level(*level), "level {level}");
    }
    // Acknowledged: counted as such, its notifications pending until delivered.
    let first = escalation_id(&of(0, SlaTransition::Breached, "b"));
    let a = e.acknowledge(&first, "duty", "", at(81)).unwrap();
    let stats = e.stats();
    let acked: usize = stats
        .open_by_level
        .iter()
        .filter(|((_, acked), _)| *acked)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(acked, 1);
    assert!(stats.pending > 0);
    assert_eq!(stats.pending, jobs(&a).len());
    deliver_all(&mut e, &a, at(81));
    assert_eq!(e.stats().pending, 0);
    // Every clock met: resolved, each paged receiver told, then kept a day and forgotten.
    for i in 0..600 {
        let a = e.on_sla_event(&of(i, SlaTransition::Met, "m"), at(100));
        deliver_all(&mut e, &a, at(100));
    }
    e.take_dirty();
    let day = SignedDuration::from_hours(24);
    e.on_tick(at(99) + day);
    assert_eq!(e.stats().escalations, 600, "kept for the retention");
    e.on_tick(at(100) + day);
    let stats = e.stats();
    assert_eq!(stats.escalations, 0, "forgotten after the retention");
    assert!(stats.open_by_level.is_empty() && stats.pending == 0);
    assert_eq!(
        e.take_dirty().len(),
        600,
        "each forgotten one is written (a tombstone)"
    );
    assert!(
        e.timers.is_empty() && e.filed.is_empty(),
        "nothing left in the timer index"
    );
}
