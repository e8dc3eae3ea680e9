//! The engine's limits (`[clock.limits]`) on the default rule pack: an event past a limit is
//! refused whole, the referral's other clocks run on, and no sequence of events takes a
//! referral's state record past the bound the limits promise.

use super::*;
use prost::Message;
use safeclock_common::config::Settings;
use safeclock_common::event::Plausibility;

fn engine_with(limits: ClockLimits) -> Engine {
    Engine::with_limits(
        RuleSet::default_pack().unwrap(),
        CalendarBook::builtin(),
        limits,
    )
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn ev(referral: &str, id: &str, at: Timestamp, kind: &str) -> ReferralEvent {
    let json = format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}",{kind}}}"#
    );
    safeclock_common::event::decode_referral_event(json.as_bytes()).unwrap()
}

const RECEIVED: &str = r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","area":"city","team":"mash"}"#;

fn seized(device: &str) -> String {
    format!(r#""deviceSeized":{{"deviceRef":"{device}"}}"#)
}

fn suspect(s: &str) -> String {
    format!(r#""suspectIdentified":{{"suspectRef":"{s}","suspectHasAccessToChildren":true}}"#)
}

fn rules_of(engine: &Engine, referral: &str) -> Vec<String> {
    engine
        .open_clocks(referral)
        .into_iter()
        .map(|c| c.rule_id)
        .collect()
}

#[test]
fn a_rule_opens_at_most_its_instances_and_the_referral_keeps_its_other_clocks() {
    let limits = ClockLimits {
        max_instances_per_rule: 3,
        ..ClockLimits::default()
    };
    let mut e = engine_with(limits);
    let t = ts("2026-11-02T09:00:00Z");
    let now = t + SignedDuration::from_mins(10);
    e.on_event(&ev("R-1", "e0", t, RECEIVED), now).unwrap();
    let before = rules_of(&e, "R-1").len();
    for i in 1..=3 {
        let out = e
            .on_event(
                &ev("R-1", &format!("d{i}"), t, &seized(&format!("DEV-{i}"))),
                now,
            )
            .unwrap();
        assert_eq!(out.len(), 1, "device {i} gets its clock");
    }
    let state = e.export("R-1").unwrap();
    let refused = e.on_event(&ev("R-1", "d4", t, &seized("DEV-4")), now);
    assert_eq!(
        refused,
        Err(LimitExceeded::InstancesPerRule {
            rule: "device-examination".into(),
            max: 3
        })
    );
    let rejection = Rejection::from(refused.unwrap_err());
    assert_eq!(rejection.reason(), "limit_instances_per_rule");
    assert!(rejection
        .to_string()
        .contains("clock.limits.max_instances_per_rule"));
    // Nothing of the refused event was kept: not even its id.
    assert_eq!(e.export("R-1").unwrap(), state);
    assert_eq!(rules_of(&e, "R-1").len(), before + 3);
    // The other clocks run on: the victim-contact deadline still breaches.
    let breached = e.on_tick(t + SignedDuration::from_hours(25));
    assert!(breached
        .iter()
        .any(|s| s.rule_id == "victim-contact" && s.transition() == SlaTransition::Breached));
    // A device examined frees its slot for the next one.
    let examined = r#""deviceExamined":{"deviceRef":"DEV-1"}"#;
    e.on_event(&ev("R-1", "x1", t, examined), now).unwrap();
    assert_eq!(
        e.on_event(&ev("R-1", "d4", t, &seized("DEV-4")), now)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn references_and_open_clocks_are_bounded_per_referral() {
    let mut e = engine_with(ClockLimits {
        max_references: 4,
        ..ClockLimits::default()
    });
    let t = ts("2026-11-02T09:00:00Z");
    for i in 0..2 {
        e.on_event(
            &ev("R-2", &format!("d{i}"), t, &seized(&format!("D{i}"))),
            t,
        )
        .unwrap();
        e.on_event(
            &ev("R-2", &format!("s{i}"), t, &suspect(&format!("S{i}"))),
            t,
        )
        .unwrap();
    }
    assert_eq!(
        e.on_event(&ev("R-2", "s9", t, &suspect("S9")), t),
        Err(LimitExceeded::References { max: 4 })
    );
    // A reference already open is no new reference: a repeated seizure of D0 is fine.
    assert!(e.on_event(&ev("R-2", "d0b", t, &seized("D0")), t).is_ok());

    let mut e = engine_with(ClockLimits {
        max_open_clocks: 5,
        ..ClockLimits::default()
    });
    e.on_event(&ev("R-3", "e0", t, RECEIVED), t).unwrap();
    let open = rules_of(&e, "R-3").len();
    assert!(open < 5, "{open}");
    let mut refused = None;
    for i in 0..10 {
        if let Err(why) = e.on_event(
            &ev("R-3", &format!("d{i}"), t, &seized(&format!("D{i}"))),
            t,
        ) {
            refused = Some(why);
            break;
        }
    }
    assert_eq!(refused, Some(LimitExceeded::OpenClocks { max: 5 }));
    assert_eq!(rules_of(&e, "R-3").len(), 5);
}

#[test]
fn a_clock_is_paused_at_most_its_limit() {
    let mut e = engine_with(ClockLimits {
        max_pauses_per_clock: 2,
        ..ClockLimits::default()
    });
    let t = ts("2026-11-02T09:00:00Z");
    e.on_event(&ev("R-4", "e0", t, RECEIVED), t).unwrap();
    let missing = r#""childMissingReported":{"risk":"RISK_GRADE_HIGH"}"#;
    let found = r#""missingChildFound":{}"#;
    let mut at = t;
    for i in 0..2 {
        at += SignedDuration::from_mins(5);
        e.on_event(&ev("R-4", &format!("m{i}"), at, missing), at)
            .unwrap();
        at += SignedDuration::from_mins(5);
        e.on_event(&ev("R-4", &format!("f{i}"), at, found), at)
            .unwrap();
    }
    at += SignedDuration::from_mins(5);
    assert_eq!(
        e.on_event(&ev("R-4", "m9", at, missing), at),
        Err(LimitExceeded::Pauses {
            rule: "victim-contact".into(),
            max: 2
        })
    );
}

#[test]
fn the_seen_window_forgets_the_oldest_events_and_refuses_what_it_can_no_longer_recognise() {
    let mut e = engine_with(ClockLimits {
        max_seen_events: 16,
        ..ClockLimits::default()
    });
    let t = ts("2026-11-02T09:00:00Z");
    let at = |i: i64| t + SignedDuration::from_mins(i);
    let risk = r#""riskAssessed":{"risk":"RISK_GRADE_HIGH"}"#;
    e.on_event(&ev("R-5", "e0", at(0), RECEIVED), at(0))
        .unwrap();
    for i in 1..=16 {
        e.on_event(&ev("R-5", &format!("r{i}"), at(i), risk), at(16))
            .unwrap();
    }
    let state = e.export("R-5").unwrap();
    // 17 events through a window of 16: it shrinks to 14 (an eighth below the limit, so not
    // every event sorts), dropping the three oldest; the horizon is the newest dropped.
    assert_eq!(state.seen_event_hashes.len(), 14);
    assert_eq!(state.seen_event_seconds.len(), 14);
    assert_eq!(state.dedup_horizon.as_ref().and_then(to_jiff), Some(at(2)));
    // An event at or before the horizon could be a repeat of one forgotten: refused.
    assert_eq!(
        e.on_event(&ev("R-5", "r1", at(1), risk), at(20)),
        Err(LimitExceeded::BeforeDedupHorizon { horizon: at(2) })
    );
    assert_eq!(
        Rejection::from(
            e.on_event(&ev("R-5", "new", at(0), risk), at(20))
                .unwrap_err()
        )
        .reason(),
        "before_dedup_horizon"
    );
    // A repeat still in the window is a duplicate, as before; a new later event is applied.
    assert_eq!(
        e.on_event(&ev("R-5", "r16", at(16), risk), at(20)),
        Ok(vec![])
    );
    e.on_event(&ev("R-5", "r17", at(17), risk), at(20)).unwrap();
    // The window and the horizon survive the changelog.
    let state = e.export("R-5").unwrap();
    let mut restored = engine_with(ClockLimits {
        max_seen_events: 16,
        ..ClockLimits::default()
    });
    restored.import(state.clone());
    assert_eq!(restored.export("R-5").unwrap(), state);
    assert!(restored
        .on_event(&ev("R-5", "r1", at(1), risk), at(20))
        .is_err());
    assert_eq!(
        restored.on_event(&ev("R-5", "r17", at(17), risk), at(20)),
        Ok(vec![])
    );
}

#[test]
fn a_record_from_before_event_times_were_kept_restores_with_a_window() {
    let mut e = engine_with(ClockLimits::default());
    let t = ts("2026-11-02T09:00:00Z");
    e.on_event(&ev("R-6", "e0", t, RECEIVED), t).unwrap();
    let mut old = e.export("R-6").unwrap();
    old.seen_event_seconds.clear();
    old.dedup_horizon = None;
    old.seen_event_ids = vec!["e-older".into()];
    let mut restored = engine_with(ClockLimits::default());
    restored.import(old);
    let state = restored.export("R-6").unwrap();
    assert_eq!(state.seen_event_hashes.len(), 2);
    // Unknown times count as the newest clock start.
    assert!(state.seen_event_seconds.iter().all(|&s| s == t.as_second()));
    assert_eq!(
        restored.on_event(&ev("R-6", "e-older", t, RECEIVED), t),
        Ok(vec![])
    );
}

#[test]
fn label_values_are_bounded_per_engine() {
    let mut e = engine_with(ClockLimits {
        max_label_values: 64,
        ..ClockLimits::default()
    });
    let t = ts("2026-11-02T09:00:00Z");
    let mut refused = None;
    for i in 0..100 {
        let kind = format!(
            r#""referralReceived":{{"category":"CATEGORY_NEGLECT","area":"area-{i}","team":"mash"}}"#
        );
        if let Err(why) = e.on_event(&ev(&format!("R-L{i}"), "e0", t, &kind), t) {
            refused = Some((i, why));
            break;
        }
    }
    let (i, why) = refused.expect("the label table fills up");
    assert_eq!(why.reason(), "limit_label_values");
    // The refused referral was new: nothing is kept of it.
    assert!(e.export(&format!("R-L{i}")).is_none());
    // Known values still work.
    let known =
        r#""referralReceived":{"category":"CATEGORY_NEGLECT","area":"area-0","team":"mash"}"#;
    assert!(e.on_event(&ev("R-L-next", "e0", t, known), t).is_ok());
}

/// One random event for one referral: any kind the default pack reacts to, a few references,
/// and strings up to twice their limits (the plausibility check refuses the longer ones first,
/// as every reader does).
fn arbitrary_event() -> impl proptest::strategy::Strategy<Value = (u8, u16, u16, u16)> {
    (0u8..14, 0u16..400, 0u16..200, 0u16..3000)
}

fn build(i: usize, referral: &str, (kind, reference, len, minutes): (u8, u16, u16, u16)) -> String {
    let reference = format!(
        "{reference:0>width$}",
        width = usize::from(len % 130).max(1)
    );
    let code = "c".repeat(usize::from(len));
    let kind = match kind {
        0 => format!(
            r#""referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_MEDIUM","area":"{code}","team":"t"}}"#
        ),
        1 => seized(&reference),
        2 => format!(r#""deviceExamined":{{"deviceRef":"{reference}"}}"#),
        3 => suspect(&reference),
        4 => format!(r#""safeguardingActionRecorded":{{"suspectRef":"{reference}","action":"a"}}"#),
        5 => r#""childMissingReported":{"risk":"RISK_GRADE_HIGH"}"#.into(),
        6 => r#""missingChildFound":{}"#.into(),
        7 => r#""childDetained":{}"#.into(),
        8 => r#""detentionReviewed":{}"#.into(),
        9 => r#""riskAssessed":{"risk":"RISK_GRADE_VERY_HIGH"}"#.into(),
        10 => format!(r#""allocated":{{"team":"{code}","specialistTrained":true}}"#),
        11 => r#""victimContacted":{}"#.into(),
        12 => r#""investigationOpened":{}"#.into(),
        _ => format!(r#""referralClosed":{{"outcome":"{code}"}}"#),
    };
    let at = ts("2026-11-02T09:00:00Z") + SignedDuration::from_mins(i64::from(minutes));
    let id = format!("ev-{i}-{}", "x".repeat(usize::from(len % 120)));
    format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}","sourceSystem":"s",{kind}}}"#
    )
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever one referral is sent, its state record never exceeds the bound its limits
    /// promise (the worst case `ClockLimits::validate` checks against the broker's limits).
    #[test]
    fn no_event_sequence_takes_a_state_record_past_the_bound(
        events in proptest::collection::vec(arbitrary_event(), 1..600),
        small in proptest::bool::ANY,
        referral_len in 1usize..128,
    ) {
        let referral = "R".repeat(referral_len);
        let mut settings = Settings::defaults().unwrap();
        if small {
            // Small limits, so the sequences reach every one of them.
            settings.clock.limits = ClockLimits {
                max_open_clocks: 12,
                max_instances_per_rule: 4,
                max_references: 6,
                max_seen_events: 32,
                max_early_stops: 3,
                max_pauses_per_clock: 2,
                max_label_values: 64,
            };
        }
        settings.validate().unwrap();
        let bound = settings.clock.limits.worst_case_state(&settings.validation).encoded_len();
        let plausibility = Plausibility::new(&settings);
        let mut engine = engine_with(settings.clock.limits);
        let now = ts("2026-11-04T09:00:00Z");
        let mut largest = 0;
        for (i, e) in events.into_iter().enumerate() {
            let json = build(i, &referral, e);
            let Ok(event) = plausibility.decode(json.as_bytes(), now) else { continue };
            let _ = engine.on_event(&event, now);
            engine.on_tick(now);
            for id in engine.take_dirty() {
                if let Some(state) = engine.export(&id) {
                    largest = largest.max(state.encoded_len());
                }
            }
        }
        proptest::prop_assert!(largest <= bound, "{largest} > {bound}");
    }
}
