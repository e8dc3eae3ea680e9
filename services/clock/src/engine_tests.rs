//! Engine semantics on simulated time: every transition is driven by explicit `now` values.

use super::*;
use safeclock_common::schema::duration_to_jiff;

const RULES: &str = r#"
[[rule]]
id = "victim-contact"
title = "Child victim contacted within 24 hours of the referral"
source = "LOCAL"
local = true
severity = "high"
target = "24h"
warnings = ["75%"]
[[rule.start]]
event = "referral_received"
[[rule.stop]]
event = "victim_contacted"
[[rule.pause]]
event = "child_missing_reported"
[[rule.resume]]
event = "missing_child_found"
[[rule.cancel]]
event = "referral_closed"

[[rule]]
id = "online-cse-referral"
title = "Investigation action on an online child abuse referral"
source = "HMICFRS 2023"
severity = "high"
target = "30 days"
targets_by_risk = { very_high = "1 day", high = "7 days", medium = "14 days" }
[[rule.start]]
event = "online_abuse_referral_received"
[[rule.stop]]
event = "investigation_action_started"

[[rule]]
id = "referral-decision"
title = "Decision on a referral within one working day"
source = "WT2018"
severity = "warning"
calendar = "force"
target = "1 working day"
[[rule.start]]
event = "referral_received"
[[rule.stop]]
event = "referral_decision_made"
[[rule.cancel]]
event = "referral_closed"
[rule.overrides.metropolitan]
target = "24h"
calendar = "24x7"

[[rule]]
id = "device-examination"
title = "Seized device examined within 28 days"
source = "LOCAL"
local = true
severity = "high"
target = "28 days"
warnings = ["7 days before"]
instance = "device_ref"
applies_to = { category = ["grooming", "indecent_images", "online_abuse"] }
[[rule.start]]
event = "device_seized"
[[rule.stop]]
event = "device_examined"

[[rule]]
id = "detention-review-next"
title = "Detention reviewed every 9 hours"
source = "PACE s40"
severity = "critical"
target = "9h"
repeat = true
[[rule.start]]
event = "child_detained"
[[rule.start]]
event = "detention_reviewed"
[[rule.stop]]
event = "detention_reviewed"
[[rule.cancel]]
event = "child_released"

[[rule]]
id = "strategy-discussion"
title = "Strategy discussion within 24 hours of significant harm suspected"
source = "LOCAL"
severity = "high"
target = "24h"
[[rule.start]]
event = "significant_harm_suspected"
[[rule.stop]]
event = "strategy_discussion_held"
[[rule.reset]]
event = "risk_assessed"
where = { risk = "very_high" }
"#;

fn engine() -> Engine {
    let rules = RuleSet::from_sources([("test.toml".to_string(), RULES.to_string())]).unwrap();
    Engine::new(rules, CalendarBook::builtin())
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn event(id: &str, at: &str, kind: &str) -> ReferralEvent {
    event_for("R-1", "nottinghamshire", id, at, kind)
}

fn event_for(referral: &str, force: &str, id: &str, at: &str, kind: &str) -> ReferralEvent {
    let json = format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"{force}","occurredAt":"{at}",{kind}}}"#
    );
    safeclock_common::event::decode_referral_event(json.as_bytes()).unwrap()
}

const RECEIVED: &str = r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","childAgeBand":"AGE_BAND_AGED_13_TO_15","area":"city","team":"mash"}"#;
const CONTACTED: &str = r#""victimContacted":{}"#;

fn of_rule<'a>(events: &'a [SlaEvent], rule: &str) -> Vec<&'a SlaEvent> {
    events.iter().filter(|e| e.rule_id == rule).collect()
}

fn transitions(events: &[SlaEvent], rule: &str) -> Vec<SlaTransition> {
    of_rule(events, rule)
        .iter()
        .map(|e| e.transition())
        .collect()
}

fn deadline(e: &SlaEvent) -> Timestamp {
    to_jiff(e.deadline.as_ref().unwrap()).unwrap()
}

#[test]
fn origin_case_breaches_at_24_hours_on_a_quiet_topic_then_met_late_at_five_days() {
    let mut e = engine();
    let start = "2026-11-29T10:00:00Z";
    let out = e
        .on_event(&event("e1", start, RECEIVED), ts(start))
        .unwrap();
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Started]
    );
    let started = of_rule(&out, "victim-contact")[0];
    assert_eq!(started.labels.as_ref().unwrap().category, "grooming");
    assert_eq!(
        started.labels.as_ref().unwrap().child_age_band,
        "aged_13_to_15"
    );

    assert!(transitions(&e.on_tick(ts("2026-11-30T03:59:59Z")), "victim-contact").is_empty());
    let warn = e.on_tick(ts("2026-11-30T04:00:00Z"));
    assert_eq!(
        transitions(&warn, "victim-contact"),
        [SlaTransition::Warning]
    );
    assert_eq!(of_rule(&warn, "victim-contact")[0].warning_percent, 75);

    // No records arrive; the wall clock alone breaches it.
    assert!(transitions(&e.on_tick(ts("2026-11-30T09:59:59Z")), "victim-contact").is_empty());
    let breach = e.on_tick(ts("2026-11-30T10:00:00Z"));
    assert_eq!(
        transitions(&breach, "victim-contact"),
        [SlaTransition::Breached]
    );
    assert_eq!(
        deadline(of_rule(&breach, "victim-contact")[0]),
        ts("2026-11-30T10:00:00Z")
    );

    let late = e
        .on_event(
            &event("e2", "2026-12-04T10:00:00Z", CONTACTED),
            ts("2026-12-04T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&late, "victim-contact"),
        [SlaTransition::MetLate]
    );
    let elapsed = duration_to_jiff(
        of_rule(&late, "victim-contact")[0]
            .elapsed
            .as_ref()
            .unwrap(),
    );
    assert_eq!(elapsed, SignedDuration::from_hours(5 * 24));
}

#[test]
fn met_in_time_cancels_pending_timers() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let out = e
        .on_event(
            &event("e2", "2026-11-29T12:00:00Z", CONTACTED),
            ts("2026-11-29T12:00:00Z"),
        )
        .unwrap();
    assert_eq!(transitions(&out, "victim-contact"), [SlaTransition::Met]);
    assert!(transitions(&e.on_tick(ts("2026-12-01T00:00:00Z")), "victim-contact").is_empty());
}

#[test]
fn duplicates_are_ignored_by_event_id() {
    let mut e = engine();
    let now = ts("2026-11-29T10:00:00Z");
    assert!(!e
        .on_event(&event("e1", "2026-11-29T10:00:00Z", RECEIVED), now)
        .unwrap()
        .is_empty());
    assert!(e
        .on_event(&event("e1", "2026-11-29T10:00:00Z", RECEIVED), now)
        .unwrap()
        .is_empty());
}

#[test]
fn warnings_already_past_at_start_are_skipped_but_the_deadline_fires() {
    let mut e = engine();
    // Recorded 20 hours after it occurred: the 75 % warning (18 h) is already past.
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-30T06:00:00Z"),
    )
    .unwrap();
    let out = e.on_tick(ts("2026-11-30T10:00:00Z"));
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Breached]
    );
}

#[test]
fn a_pause_shifts_the_deadline_by_the_time_paused() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let paused = e
        .on_event(
            &event(
                "e2",
                "2026-11-29T12:00:00Z",
                r#""childMissingReported":{"risk":"RISK_GRADE_HIGH"}"#,
            ),
            ts("2026-11-29T12:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&paused, "victim-contact"),
        [SlaTransition::Paused]
    );
    // While paused nothing fires, not even the original deadline.
    assert!(transitions(&e.on_tick(ts("2026-11-30T10:00:00Z")), "victim-contact").is_empty());
    let resumed = e
        .on_event(
            &event("e3", "2026-11-30T18:00:00Z", r#""missingChildFound":{}"#),
            ts("2026-11-30T18:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&resumed, "victim-contact"),
        [SlaTransition::Resumed]
    );
    // Paused for 30 hours: the deadline moves from 30 Nov 10:00 to 1 Dec 16:00.
    let resumed = of_rule(&resumed, "victim-contact")[0];
    assert_eq!(deadline(resumed), ts("2026-12-01T16:00:00Z"));
    // The 75 % warning is at 18 h of counted time: 2 h before the pause + 16 h after it.
    assert_eq!(
        transitions(&e.on_tick(ts("2026-12-01T09:59:59Z")), "victim-contact"),
        []
    );
    assert_eq!(
        transitions(&e.on_tick(ts("2026-12-01T10:00:00Z")), "victim-contact"),
        [SlaTransition::Warning]
    );
    assert_eq!(
        transitions(&e.on_tick(ts("2026-12-01T16:00:00Z")), "victim-contact"),
        [SlaTransition::Breached]
    );
}

#[test]
fn regrading_the_risk_recomputes_the_target_and_may_breach_at_once() {
    let mut e = engine();
    let received = r#""onlineAbuseReferralReceived":{"priority":"ONLINE_PRIORITY_MEDIUM"}"#;
    let out = e
        .on_event(
            &event("e1", "2026-11-02T10:00:00Z", received),
            ts("2026-11-02T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        deadline(of_rule(&out, "online-cse-referral")[0]),
        ts("2026-11-16T10:00:00Z"),
        "medium: 14 days"
    );
    // Three days later it is re-graded very high (1 day): already overdue, so it breaches at
    // the next tick.
    e.on_event(
        &event(
            "e2",
            "2026-11-05T10:00:00Z",
            r#""riskAssessed":{"risk":"RISK_GRADE_VERY_HIGH"}"#,
        ),
        ts("2026-11-05T10:00:00Z"),
    )
    .unwrap();
    let out = e.on_tick(ts("2026-11-05T10:00:01Z"));
    assert_eq!(
        transitions(&out, "online-cse-referral"),
        [SlaTransition::Breached]
    );
    assert_eq!(
        deadline(of_rule(&out, "online-cse-referral")[0]),
        ts("2026-11-03T10:00:00Z")
    );
}

#[test]
fn working_day_rules_use_the_force_calendar_and_overrides() {
    let mut e = engine();
    // Sun 29 Nov 2026 10:00: the first working day following is Mon 30 Nov; deadline 1 Dec 00:00.
    let out = e
        .on_event(
            &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
            ts("2026-11-29T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        deadline(of_rule(&out, "referral-decision")[0]),
        ts("2026-12-01T00:00:00Z")
    );
    // The Met overrides it to 24 hours on a 24x7 calendar.
    let out = e
        .on_event(
            &event_for(
                "R-2",
                "metropolitan",
                "m1",
                "2026-11-29T10:00:00Z",
                RECEIVED,
            ),
            ts("2026-11-29T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        deadline(of_rule(&out, "referral-decision")[0]),
        ts("2026-11-30T10:00:00Z")
    );
}

#[test]
fn instances_run_separate_clocks_and_applies_to_filters_referrals() {
    let mut e = engine();
    let now = ts("2026-11-02T10:00:00Z");
    e.on_event(&event("e1", "2026-11-02T09:00:00Z", RECEIVED), now)
        .unwrap();
    let seized = |id: &str, dev: &str| {
        event(
            id,
            "2026-11-02T10:00:00Z",
            &format!(r#""deviceSeized":{{"deviceRef":"{dev}"}}"#),
        )
    };
    let out = [
        e.on_event(&seized("d1", "DEV-1"), now).unwrap(),
        e.on_event(&seized("d2", "DEV-2"), now).unwrap(),
    ]
    .concat();
    assert_eq!(
        transitions(&out, "device-examination"),
        [SlaTransition::Started, SlaTransition::Started]
    );
    let examined = event(
        "d3",
        "2026-11-20T10:00:00Z",
        r#""deviceExamined":{"deviceRef":"DEV-2"}"#,
    );
    let out = e.on_event(&examined, ts("2026-11-20T10:00:00Z")).unwrap();
    assert_eq!(
        transitions(&out, "device-examination"),
        [SlaTransition::Met]
    );
    // DEV-1 is still open: its 7-days-before warning, then its breach at 28 days.
    let out = e.on_tick(ts("2026-11-23T10:00:00Z"));
    assert_eq!(
        transitions(&out, "device-examination"),
        [SlaTransition::Warning]
    );
    let out = e.on_tick(ts("2026-12-31T00:00:00Z"));
    let breach = of_rule(&out, "device-examination");
    assert_eq!(
        transitions(&out, "device-examination"),
        [SlaTransition::Breached]
    );
    assert_eq!(breach[0].clock_id, "d1");
    assert_eq!(deadline(breach[0]), ts("2026-11-30T10:00:00Z"));

    // A neglect referral's seized device is not a device-examination case.
    let out = e
        .on_event(
            &event_for(
                "R-9",
                "nottinghamshire",
                "n1",
                "2026-11-02T09:00:00Z",
                r#""referralReceived":{"category":"CATEGORY_NEGLECT"}"#,
            ),
            now,
        )
        .unwrap();
    assert!(transitions(&out, "device-examination").is_empty());
    let out = e
        .on_event(
            &event_for(
                "R-9",
                "nottinghamshire",
                "n2",
                "2026-11-02T10:00:00Z",
                r#""deviceSeized":{"deviceRef":"DEV-9"}"#,
            ),
            now,
        )
        .unwrap();
    assert!(transitions(&out, "device-examination").is_empty());
}

#[test]
fn repeating_rules_start_the_next_clock_at_the_stop() {
    let mut e = engine();
    let now = ts("2026-11-02T20:00:00Z");
    e.on_event(
        &event("e1", "2026-11-02T08:00:00Z", r#""childDetained":{}"#),
        now,
    )
    .unwrap();
    let out = e
        .on_event(
            &event("e2", "2026-11-02T16:00:00Z", r#""detentionReviewed":{}"#),
            now,
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "detention-review-next"),
        [SlaTransition::Met, SlaTransition::Started]
    );
    assert_eq!(
        deadline(of_rule(&out, "detention-review-next")[1]),
        ts("2026-11-03T01:00:00Z")
    );
    // The second review is late.
    let out = e.on_tick(ts("2026-11-03T01:00:00Z"));
    assert_eq!(
        transitions(&out, "detention-review-next"),
        [SlaTransition::Breached]
    );
    let out = e
        .on_event(
            &event("e3", "2026-11-03T02:00:00Z", r#""detentionReviewed":{}"#),
            ts("2026-11-03T02:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "detention-review-next"),
        [SlaTransition::MetLate, SlaTransition::Started]
    );
    let out = e
        .on_event(
            &event("e4", "2026-11-03T03:00:00Z", r#""childReleased":{}"#),
            ts("2026-11-03T03:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "detention-review-next"),
        [SlaTransition::Cancelled]
    );
}

#[test]
fn reset_restarts_the_clock_from_the_reset_event() {
    let mut e = engine();
    e.on_event(
        &event(
            "e1",
            "2026-11-02T08:00:00Z",
            r#""significantHarmSuspected":{}"#,
        ),
        ts("2026-11-02T08:00:00Z"),
    )
    .unwrap();
    // A re-grade to high does not reset; very high does.
    let out = e
        .on_event(
            &event(
                "e2",
                "2026-11-02T10:00:00Z",
                r#""riskAssessed":{"risk":"RISK_GRADE_HIGH"}"#,
            ),
            ts("2026-11-02T10:00:00Z"),
        )
        .unwrap();
    assert!(transitions(&out, "strategy-discussion").is_empty());
    let out = e
        .on_event(
            &event(
                "e3",
                "2026-11-02T12:00:00Z",
                r#""riskAssessed":{"risk":"RISK_GRADE_VERY_HIGH"}"#,
            ),
            ts("2026-11-02T12:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "strategy-discussion"),
        [SlaTransition::Cancelled, SlaTransition::Started]
    );
    assert_eq!(
        deadline(of_rule(&out, "strategy-discussion")[1]),
        ts("2026-11-03T12:00:00Z")
    );
}

#[test]
fn a_late_arriving_stop_that_occurred_in_time_is_met_with_a_correction() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let breach = e.on_tick(ts("2026-11-30T10:00:01Z"));
    let breach = of_rule(&breach, "victim-contact")
        .into_iter()
        .find(|e| e.transition() == SlaTransition::Breached)
        .unwrap()
        .clone();
    let out = e
        .on_event(
            &event("e2", "2026-11-30T09:00:00Z", CONTACTED),
            ts("2026-11-30T11:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Met, SlaTransition::Corrected]
    );
    assert_eq!(
        of_rule(&out, "victim-contact")[1].corrects_sla_event_id,
        breach.sla_event_id
    );
}

#[test]
fn a_stop_arriving_before_its_start_completes_the_clock_when_the_start_arrives() {
    let mut e = engine();
    let now = ts("2026-11-29T13:00:00Z");
    assert!(e
        .on_event(&event("e2", "2026-11-29T12:00:00Z", CONTACTED), now)
        .unwrap()
        .is_empty());
    let out = e
        .on_event(&event("e1", "2026-11-29T10:00:00Z", RECEIVED), now)
        .unwrap();
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Started, SlaTransition::Met]
    );
    assert!(transitions(&e.on_tick(ts("2026-12-30T00:00:00Z")), "victim-contact").is_empty());
}

#[test]
fn a_stop_after_the_deadline_before_the_tick_still_breaches_exactly_once() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let out = e
        .on_event(
            &event("e2", "2026-12-01T10:00:00Z", CONTACTED),
            ts("2026-12-01T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Breached, SlaTransition::MetLate]
    );
    assert!(transitions(&e.on_tick(ts("2026-12-30T00:00:00Z")), "victim-contact").is_empty());
}

#[test]
fn closing_the_referral_cancels_its_clocks_and_forgets_it() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let out = e
        .on_event(
            &event(
                "e9",
                "2026-11-29T11:00:00Z",
                r#""referralClosed":{"outcome":"no-further-action"}"#,
            ),
            ts("2026-11-29T11:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        transitions(&out, "victim-contact"),
        [SlaTransition::Cancelled]
    );
    assert!(transitions(&e.on_tick(ts("2026-12-30T00:00:00Z")), "victim-contact").is_empty());
}

#[test]
fn replaying_the_same_input_reproduces_the_same_ids() {
    let run = || {
        let mut e = engine();
        let mut ids: Vec<String> = e
            .on_event(
                &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
                ts("2026-11-29T10:00:00Z"),
            )
            .unwrap()
            .into_iter()
            .map(|x| x.sla_event_id)
            .collect();
        ids.extend(
            e.on_tick(ts("2026-12-01T00:00:00Z"))
                .into_iter()
                .map(|x| x.sla_event_id),
        );
        ids
    };
    let first = run();
    assert!(first.len() >= 4);
    assert_eq!(first, run());
}

#[test]
fn state_restored_from_the_changelog_continues_the_clock_and_fires_overdue_deadlines() {
    let mut a = engine();
    a.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    a.on_event(
        &event("e2", "2026-11-29T12:00:00Z", r#""childMissingReported":{}"#),
        ts("2026-11-29T12:00:00Z"),
    )
    .unwrap();
    a.on_event(
        &event("e3", "2026-11-29T14:00:00Z", r#""missingChildFound":{}"#),
        ts("2026-11-29T14:00:00Z"),
    )
    .unwrap();
    let warned = a.on_tick(ts("2026-11-30T06:00:00Z"));
    assert_eq!(
        transitions(&warned, "victim-contact"),
        [SlaTransition::Warning]
    );
    let dirty = a.take_dirty();
    assert_eq!(dirty, ["R-1"]);
    let state = a.export("R-1").unwrap();
    // Through the wire format and back, as the changelog carries it.
    let bytes = prost::Message::encode_to_vec(&state);
    let state: ReferralState = prost::Message::decode(bytes.as_slice()).unwrap();

    // The same story continued without a restart...
    let expected = a.on_tick(ts("2026-12-02T00:00:00Z"));
    // ...and after a crash, restored into a new engine long after the deadline.
    let mut b = engine();
    b.import(state);
    let restored = b.on_tick(ts("2026-12-02T00:00:00Z"));
    assert_eq!(
        transitions(&restored, "victim-contact"),
        [SlaTransition::Breached],
        "the overdue deadline fires at once, the warning does not repeat"
    );
    let ids = |v: &[SlaEvent]| v.iter().map(|e| e.sla_event_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&restored),
        ids(&expected),
        "identical ids, so consumers de-duplicate"
    );
    assert_eq!(
        deadline(of_rule(&restored, "victim-contact")[0]),
        ts("2026-11-30T12:00:00Z"),
        "the 2 h pause survives the restore"
    );
    // Duplicates are still recognised after the restore.
    assert!(b
        .on_event(
            &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
            ts("2026-12-02T00:00:00Z")
        )
        .unwrap()
        .is_empty());
}

#[test]
fn a_closed_referral_keeps_no_clocks_but_still_recognises_replayed_events() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    e.on_event(
        &event("e2", "2026-11-29T11:00:00Z", r#""referralClosed":{}"#),
        ts("2026-11-29T11:00:00Z"),
    )
    .unwrap();
    assert_eq!(e.take_dirty(), ["R-1"]);
    assert!(e.export("R-1").unwrap().clocks.is_empty());
    // A replay of the referral's first event after the close does not reopen its clocks.
    assert!(e
        .on_event(
            &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
            ts("2026-11-29T12:00:00Z")
        )
        .unwrap()
        .is_empty());
    assert!(e.on_tick(ts("2026-12-30T00:00:00Z")).is_empty());
}

#[test]
fn census_counts_open_clocks_by_state_and_finds_the_oldest_breach() {
    let mut e = engine();
    e.on_event(
        &event("e1", "2026-11-29T10:00:00Z", RECEIVED),
        ts("2026-11-29T10:00:00Z"),
    )
    .unwrap();
    let state_of = |census: &Census, rule: &str| -> Vec<(OpenState, u64)> {
        census
            .open
            .iter()
            .filter(|((force, r, category, risk, _), _)| {
                r == rule && force == "nottinghamshire" && category == "grooming" && risk == "high"
            })
            .map(|((.., state), n)| (*state, *n))
            .collect()
    };
    assert_eq!(
        state_of(&e.census(), "victim-contact"),
        [(OpenState::Running, 1)]
    );
    // 18 h in: past the 75 % warning.
    e.on_tick(ts("2026-11-30T04:00:00Z"));
    assert_eq!(
        state_of(&e.census(), "victim-contact"),
        [(OpenState::Warned, 1)]
    );
    e.on_tick(ts("2026-11-30T10:00:00Z"));
    let census = e.census();
    assert_eq!(
        state_of(&census, "victim-contact"),
        [(OpenState::Breached, 1)]
    );
    assert!(census.oldest_breach.contains(&(
        ("nottinghamshire".to_string(), "victim-contact".to_string()),
        ts("2026-11-30T10:00:00Z")
    )));
    // Stopped: no longer open.
    e.on_event(
        &event("e2", "2026-11-30T11:00:00Z", r#""victimContacted":{}"#),
        ts("2026-11-30T11:00:00Z"),
    )
    .unwrap();
    assert!(state_of(&e.census(), "victim-contact").is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// For a calendar-duration rule, a pause of length p moves the deadline by exactly p, and the
    /// breach fires at the moved deadline, not a nanosecond before.
    #[test]
    fn a_pause_of_length_p_moves_the_deadline_by_exactly_p(
        start_offset in 0i64..(400 * 86_400),
        pause_after in 1i64..(24 * 3600 - 1),
        p in 1i64..(90 * 86_400),
    ) {
        let start = ts("2025-01-01T00:00:00Z") + SignedDuration::from_secs(start_offset);
        let pause_at = start + SignedDuration::from_secs(pause_after);
        let resume_at = pause_at + SignedDuration::from_secs(p);
        let mut e = engine();
        let started = e.on_event(&event("e1", &start.to_string(), RECEIVED), start).unwrap();
        let original = deadline(of_rule(&started, "victim-contact")[0]);
        e.on_event(
            &event("e2", &pause_at.to_string(), r#""childMissingReported":{"risk":"RISK_GRADE_HIGH"}"#),
            pause_at,
        ).unwrap();
        let resumed = e.on_event(
            &event("e3", &resume_at.to_string(), r#""missingChildFound":{}"#),
            resume_at,
        ).unwrap();
        let moved = deadline(of_rule(&resumed, "victim-contact")[0]);
        proptest::prop_assert_eq!(moved, original + SignedDuration::from_secs(p));
        let before = e.on_tick(moved - SignedDuration::from_nanos(1));
        proptest::prop_assert!(!transitions(&before, "victim-contact").contains(&SlaTransition::Breached));
        let at = e.on_tick(moved);
        proptest::prop_assert!(transitions(&at, "victim-contact").contains(&SlaTransition::Breached));
    }
}

#[test]
fn closed_referrals_are_forgotten_after_their_retention_with_a_tombstone_and_open_ones_never() {
    let mut e = engine();
    let at = ts("2026-11-29T10:00:00Z");
    for (referral, id) in [("R-CLOSED", "c1"), ("R-OPEN", "o1")] {
        e.on_event(
            &event_for(
                referral,
                "nottinghamshire",
                id,
                "2026-11-29T10:00:00Z",
                RECEIVED,
            ),
            at,
        )
        .unwrap();
    }
    e.on_event(
        &event_for(
            "R-CLOSED",
            "nottinghamshire",
            "c2",
            "2026-11-29T11:00:00Z",
            r#""referralClosed":{}"#,
        ),
        at,
    )
    .unwrap();
    e.take_dirty();
    // Not yet: its last event (11:00) is not before the cut.
    assert_eq!(e.forget_closed(ts("2026-11-29T11:00:00Z"), 100), 0);
    assert!(!e.has_dirty());
    // A sweep looks at `budget` slots at a time and goes round the slab.
    let before = ts("2027-03-01T00:00:00Z");
    let mut forgotten = 0;
    for _ in 0..2 {
        forgotten += e.forget_closed(before, 1);
    }
    assert_eq!(forgotten, 1);
    assert!(e.has_dirty());
    assert_eq!(e.take_dirty(), ["R-CLOSED"]);
    assert!(
        e.export("R-CLOSED").is_none(),
        "its changelog record is a tombstone"
    );
    // The referral with a running clock stays, however old.
    assert!(e.export("R-OPEN").is_some());
    assert_eq!(e.forget_closed(ts("2030-01-01T00:00:00Z"), 100), 0);
    assert_eq!(e.stats().referrals, 1);
}
