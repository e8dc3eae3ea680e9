//! The origin article's cases (HMIC, Nottinghamshire 2015), written as event files in
//! `tests/cases/`, replayed through `explain` with the default rule pack: each shows the breach an
//! inspector would have wanted flagged, at the instant the rule's target ran out.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use jiff::Timestamp;
use safeclock_clock::explain::{render, replay};
use safeclock_common::config::Settings;
use safeclock_common::policy::Policy;
use safeclock_common::schema::to_jiff;

fn case(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/cases")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_breach(file: &str, rule: &str, at: &str) {
    let policy = Policy::load(&Settings::defaults().unwrap()).unwrap();
    let x = replay(&policy, &case(file), None, None);
    assert!(x.bad_lines.is_empty(), "{file}: {:?}", x.bad_lines);
    let breaches: Vec<_> = x
        .clocks
        .iter()
        .filter(|c| c.rule_id == rule)
        .filter_map(|c| c.breach())
        .collect();
    assert_eq!(
        breaches.len(),
        1,
        "{file}: expected one {rule} breach\n{}",
        render(&policy, &x)
    );
    let when = to_jiff(breaches[0].occurred_at.as_ref().unwrap()).unwrap();
    assert_eq!(
        when,
        at.parse::<Timestamp>().unwrap(),
        "{file}: {rule} breach instant"
    );
    let text = render(&policy, &x);
    assert!(text.contains(&format!("{rule}: ")), "{text}");
    assert!(text.contains("BREACHED"), "{text}");
    // Only the rule the case is about breaches; everything else in the story was on time.
    let others: Vec<_> = x
        .clocks
        .iter()
        .filter(|c| c.rule_id != rule && c.breach().is_some())
        .map(|c| c.rule_id.clone())
        .collect();
    assert!(
        others.is_empty(),
        "{file}: unexpected breaches {others:?}\n{text}"
    );
}

#[test]
fn a_grooming_report_unanswered_for_five_days_breaches_victim_contact() {
    assert_breach(
        "grooming-unanswered-5-days.jsonl",
        "victim-contact",
        "2014-09-09T09:40:00Z",
    );
}

#[test]
fn a_seized_computer_unexamined_for_ten_weeks_breaches_device_examination() {
    assert_breach(
        "device-unexamined-10-weeks.jsonl",
        "device-examination",
        "2014-10-01T11:30:00Z",
    );
}

#[test]
fn an_investigation_taking_six_months_breaches_investigation_progress() {
    assert_breach(
        "investigation-6-months.jsonl",
        "investigation-progress",
        "2014-10-01T10:00:00Z",
    );
}

#[test]
fn a_suspect_with_access_to_children_and_no_safeguarding_action_breaches() {
    assert_breach(
        "suspect-with-access-no-action.jsonl",
        "suspect-with-access",
        "2014-09-17T11:00:00Z",
    );
}

#[test]
fn a_child_held_overnight_after_charge_breaches_custody_transfer() {
    assert_breach(
        "child-held-overnight.jsonl",
        "custody-transfer",
        "2014-09-19T21:00:00Z",
    );
}
