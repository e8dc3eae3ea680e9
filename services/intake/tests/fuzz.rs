//! Property-based fuzzing (proptest, on stable Rust) of the three parsers hostile input reaches:
//! the intake body parser, the shared referral-event decoder (with the plausibility checks), and
//! the rule parser. Properties: none of them panics on any input; what intake accepts, every
//! consumer's decoder accepts too (so an event answered 202 is never dead-lettered for its
//! shape); errors carry a known reason code and never quote a value.
//!
//! `cargo test -p safeclock-intake --test fuzz` runs 256 cases per property;
//! `scripts/fuzz.sh` runs many more for a bounded time (`PROPTEST_CASES`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use safeclock_common::event::{decode_referral_event, Plausibility};
use safeclock_common::rules::RuleSet;

/// Every reason the decoder can give. `field_too_long`, `not_a_code` and `unlisted_code` were
/// missing once, and random inputs found them in CI.
const REASONS: [&str; 11] = [
    "empty",
    "oversized",
    "invalid_json",
    "missing_field",
    "invalid_field",
    "unknown_event_kind",
    "implausible_time",
    "unknown_force",
    "field_too_long",
    "not_a_code",
    "unlisted_code",
];

const VALID: &str = r#"{"eventId":"e-1","referralId":"R-1","forceId":"nottinghamshire",
  "occurredAt":"2026-11-29T10:00:00Z","recordedAt":"2026-11-29T10:05:00Z","sourceSystem":"rms",
  "referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH",
  "childAgeBand":"AGE_BAND_AGED_13_TO_15","area":"city","team":"mash"}}"#;

/// A marker no generated value may ever be echoed in an error message.
const SECRET: &str = "Jane Q Secret";

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("eventId"),
        Just("referralId"),
        Just("forceId"),
        Just("occurredAt"),
        Just("recordedAt"),
        Just("sourceSystem"),
        Just("referralReceived"),
        Just("victimContacted"),
        Just("deviceSeized"),
        Just("incidentGraded"),
        Just("category"),
        Just("risk"),
        Just("childAgeBand"),
        Just("deviceRef"),
        Just("grade"),
        Just("rural"),
        Just("event_id"),
        Just("occurred_at"),
        Just("seconds"),
    ]
    .prop_map(String::from)
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(SECRET.to_string()),
        Just("2026-11-29T10:00:00Z".to_string()),
        Just("1970-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59Z".to_string()),
        Just("0001-01-01T00:00:00Z".to_string()),
        Just("2026-02-30T25:61:61+99:99".to_string()),
        Just("CATEGORY_GROOMING".to_string()),
        Just("RISK_GRADE_HIGH".to_string()),
        Just("nottinghamshire".to_string()),
        Just(String::new()),
        "[A-Za-z0-9._:/ -]{0,40}",
        any::<String>(),
    ]
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(field_name(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The valid event with one field (possibly nested) replaced or removed.
fn mutated_event() -> impl Strategy<Value = serde_json::Value> {
    (field_name(), proptest::option::of(json()), any::<bool>()).prop_map(
        |(field, value, nested)| {
            let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
            let target = if nested {
                &mut v["referralReceived"]
            } else {
                &mut v
            };
            let obj = target.as_object_mut().unwrap();
            match value {
                Some(x) => obj.insert(field, x),
                None => obj.remove(&field),
            };
            v
        },
    )
}

fn check_intake_body(bytes: &[u8]) {
    let settings = safeclock_common::config::Settings::defaults().unwrap();
    let plausibility = Plausibility::new(&settings);
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    match safeclock_intake::body::parse(bytes, 50) {
        Err(safeclock_intake::body::BodyError::Invalid(e)) => {
            assert!(REASONS.contains(&e.reason), "{e:?}");
            assert!(!e.message.contains(SECRET), "{e:?}");
        }
        Err(safeclock_intake::body::BodyError::TooManyEvents { max }) => {
            assert_eq!(max, 50)
        }
        Ok(parsed) => {
            for result in parsed.events {
                match result {
                    Ok(valid) => {
                        // What intake stores, every consumer decodes to the same event.
                        let decoded = decode_referral_event(&valid.payload)
                            .expect("an event intake accepts is accepted by consumers");
                        assert_eq!(decoded, valid.event);
                        // Refused or not, no message quotes a value.
                        if let Err(r) = plausibility.check(&decoded, now) {
                            assert!(!r.to_string().contains(SECRET), "{r:?}");
                        }
                    }
                    Err(e) => {
                        assert!(REASONS.contains(&e.reason), "{e:?}");
                        assert!(!e.message.contains(SECRET), "{e:?}");
                        assert!(!e.field.contains(SECRET), "{e:?}");
                    }
                }
            }
        }
    }
}

fn rule_pack() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rules");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"".to_string()),
        Just("=".to_string()),
        Just("[[rule]]\n".to_string()),
        Just("[rule.overrides.kent]\n".to_string()),
        Just("\n".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("\"0 working days\"".to_string()),
        Just("\"18446744073709551615h\"".to_string()),
        Just("\"next school day\"".to_string()),
        Just("\"1.5 days\"".to_string()),
        Just("target = \"\"".to_string()),
        Just("warn_at = [200, -5]".to_string()),
        "[a-z_ =\"\\[\\]0-9.\n-]{0,12}",
    ]
}

proptest! {
    #[test]
    fn intake_body_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_intake_body(&bytes);
    }

    #[test]
    fn intake_body_parser_on_any_json(v in json()) {
        check_intake_body(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn intake_body_parser_on_mutated_events(events in prop::collection::vec(mutated_event(), 1..4), single in any::<bool>()) {
        let body = if single { events[0].clone() } else { serde_json::Value::from(events) };
        check_intake_body(&serde_json::to_vec(&body).unwrap());
    }

    #[test]
    fn event_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096), v in mutated_event(), now in -62_000_000_000i64..250_000_000_000i64) {
        let settings = safeclock_common::config::Settings::defaults().unwrap();
        let plausibility = Plausibility::new(&settings);
        let now = jiff::Timestamp::from_second(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        for input in [bytes, serde_json::to_vec(&v).unwrap()] {
            match plausibility.decode(&input, now) {
                Ok(_) => {}
                Err(r) => {
                    prop_assert!(REASONS.contains(&r.reason()));
                    prop_assert!(!r.to_string().contains(SECRET), "{}", r);
                }
            }
        }
    }

    #[test]
    fn rule_parser_never_panics_on_mutated_rule_files(
        file in 0usize..5,
        at in any::<prop::sample::Index>(),
        cut in 0usize..40,
        insert in token(),
    ) {
        let mut pack = rule_pack();
        let file = file % pack.len();
        let text = &mut pack[file].1;
        let mut pos = at.index(text.len().max(1)).min(text.len());
        while !text.is_char_boundary(pos) {
            pos -= 1;
        }
        let mut end = (pos + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.replace_range(pos..end, &insert);
        if let Err(e) = RuleSet::from_sources(pack) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn rule_parser_never_panics_on_any_text(text in any::<String>()) {
        let _ = RuleSet::from_sources([("fuzz.toml".to_string(), text)]);
    }
}
