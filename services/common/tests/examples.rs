//! Every file in `proto/examples/` decodes with the decoders the services use, says what its name
//! says, survives a round trip, and every event kind, SLA transition and escalation action of the
//! schema has an example.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safeclock_common::event::{
    decode_referral_event, decode_sla_event, kind_name, transition_label,
};
use safeclock_common::schema::v1::{EscalationAction, EscalationRecord};

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn examples() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_path("proto/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// The field names of `oneof kind` in referral.proto: the event kinds of the contract.
fn kinds_in_schema() -> BTreeSet<String> {
    let proto = std::fs::read_to_string(repo_path("proto/safeclock/v1/referral.proto")).unwrap();
    let body = proto.split("oneof kind {").nth(1).unwrap();
    let body = &body[..body.find("\n  }").unwrap()];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn every_example_decodes_and_matches_its_name() {
    let examples = examples();
    assert!(examples.len() > 40, "examples missing: {}", examples.len());
    for (name, bytes) in &examples {
        let stem = name.trim_end_matches(".json");
        let (record, variant) = stem.split_once('.').unwrap();
        match record {
            "referral-event" => {
                let e = decode_referral_event(bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
                assert_eq!(kind_name(e.kind.as_ref().unwrap()), variant, "{name}");
                let again = decode_referral_event(&serde_json::to_vec(&e).unwrap()).unwrap();
                assert_eq!(again, e, "{name} round trip");
            }
            "sla-event" => {
                let e = decode_sla_event(bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
                assert_eq!(transition_label(e.transition()), variant, "{name}");
                let again = decode_sla_event(&serde_json::to_vec(&e).unwrap()).unwrap();
                assert_eq!(again, e, "{name} round trip");
            }
            "escalation-record" => {
                let r: EscalationRecord =
                    serde_json::from_slice(bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
                let action = r
                    .action()
                    .as_str_name()
                    .trim_start_matches("ESCALATION_ACTION_");
                assert_eq!(action.to_ascii_lowercase(), variant, "{name}");
                // A list is about no one escalation.
                if r.action() != EscalationAction::Listed {
                    assert!(!r.escalation_id.is_empty(), "{name}");
                }
            }
            "sla-outcome" => {
                let o: safeclock_common::schema::v1::SlaOutcome =
                    serde_json::from_slice(bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
                let status = o
                    .status()
                    .as_str_name()
                    .trim_start_matches("OUTCOME_STATUS_");
                assert_eq!(status.to_ascii_lowercase(), variant, "{name}");
                assert!(!o.outcome_id.is_empty(), "{name}");
            }
            other => panic!("{name}: unknown record type {other}"),
        }
    }
}

#[test]
fn every_kind_transition_and_action_has_an_example() {
    let names: BTreeSet<String> = examples().into_iter().map(|(n, _)| n).collect();
    let kinds = kinds_in_schema();
    assert!(kinds.len() > 40, "parsed {} kinds", kinds.len());
    for kind in kinds {
        assert!(
            names.contains(&format!("referral-event.{kind}.json")),
            "no example for {kind}"
        );
    }
    for t in 1..=9 {
        let t = safeclock_common::schema::v1::SlaTransition::try_from(t).unwrap();
        let file = format!("sla-event.{}.json", transition_label(t));
        assert!(names.contains(&file), "no example {file}");
    }
    for s in 1..=5 {
        let s = safeclock_common::schema::v1::OutcomeStatus::try_from(s).unwrap();
        let file = format!(
            "sla-outcome.{}.json",
            s.as_str_name()
                .trim_start_matches("OUTCOME_STATUS_")
                .to_ascii_lowercase()
        );
        assert!(names.contains(&file), "no example {file}");
    }
    for a in 1..=9 {
        let a = EscalationAction::try_from(a).unwrap();
        let file = format!(
            "escalation-record.{}.json",
            a.as_str_name()
                .trim_start_matches("ESCALATION_ACTION_")
                .to_ascii_lowercase()
        );
        assert!(names.contains(&file), "no example {file}");
    }
}
