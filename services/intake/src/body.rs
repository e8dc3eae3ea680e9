//! Parsing a request body into referral events, with an error per event that names the field.
//!
//! A body is one event (a JSON object) or a batch (a JSON array of objects). Each event is
//! decoded with the contract's own proto3 JSON mapping and then validated by
//! `safeclock_common::event`, the same checks every consumer applies, so what intake accepts a
//! consumer never dead-letters for its shape. Errors carry the field path (`referralId`,
//! `referralReceived.category`) and the reason code, never the offending value: a wrong value may
//! be personal data typed into the wrong field, and errors end up in logs.
//!
//! Pure functions with no I/O, so they can be fuzzed (`tests/fuzz_body.rs`).

use safeclock_common::event::{validate_referral_event, Rejection, MAX_RECORD_BYTES};
use safeclock_common::schema::v1::ReferralEvent;
use serde::Serialize;

/// One refused event (or the whole body, when `index` is `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldError {
    /// Position in the batch (0 for a single event); absent when the body itself is unusable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The event's id, when it has a usable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Path of the offending field inside the event (`referralReceived.category`); empty for
    /// the event (or body) as a whole.
    pub field: String,
    /// Fixed reason code (the dead-letter reason codes, plus `batch_too_large`).
    pub reason: &'static str,
    /// Human message naming the field, without the offending value.
    pub message: String,
}

/// A valid event and the bytes to produce for it.
#[derive(Debug, Clone)]
pub struct Valid {
    pub event: ReferralEvent,
    /// The event re-encoded as canonical proto3 JSON (what consumers read).
    pub payload: Vec<u8>,
}

/// The body's shape: a single object or an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single,
    Batch,
}

/// The parsed body: one result per event, in order.
#[derive(Debug)]
pub struct Parsed {
    pub shape: Shape,
    pub events: Vec<Result<Valid, FieldError>>,
}

/// Why the body as a whole is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, not an object or array, or an empty array: 400.
    Invalid(FieldError),
    /// More events than allowed: 413.
    TooManyEvents { count: usize, max: usize },
}

fn whole(reason: &'static str, message: impl Into<String>) -> BodyError {
    BodyError::Invalid(FieldError {
        index: None,
        event_id: None,
        field: String::new(),
        reason,
        message: message.into(),
    })
}

/// Parses `bytes` as one event or a batch of at most `max_events`.
///
/// # Errors
/// [`BodyError`] when the body as a whole is unusable; per-event problems are in
/// [`Parsed::events`].
pub fn parse(bytes: &[u8], max_events: usize) -> Result<Parsed, BodyError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(whole(
            "empty",
            "the body is empty: send one event or an array of events",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        whole(
            "invalid_json",
            format!(
                "the body is not valid JSON: {} at line {} column {}",
                json_category(&e),
                e.line(),
                e.column()
            ),
        )
    })?;
    match value {
        serde_json::Value::Object(_) => Ok(Parsed {
            shape: Shape::Single,
            events: vec![event(0, &value)],
        }),
        serde_json::Value::Array(items) => {
            if items.is_empty() {
                return Err(whole(
                    "empty",
                    "the batch is empty: send at least one event",
                ));
            }
            if items.len() > max_events {
                return Err(BodyError::TooManyEvents {
                    count: items.len(),
                    max: max_events,
                });
            }
            Ok(Parsed {
                shape: Shape::Batch,
                events: items.iter().enumerate().map(|(i, v)| event(i, v)).collect(),
            })
        }
        _ => Err(whole(
            "invalid_json",
            "the body must be a JSON object (one event) or an array of events",
        )),
    }
}

fn json_category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong type or value",
        serde_json::error::Category::Eof => "unexpected end of input",
    }
}

/// What serde says was expected, without what it found: its messages quote the found value
/// (`invalid type: string "Jane", expected ...`), which may be personal data.
fn expected_only(message: &str) -> String {
    if let Some(field) = message.strip_prefix("missing field ") {
        return format!("missing field {field}");
    }
    if let Some(field) = message.strip_prefix("duplicate field ") {
        return format!("duplicate field {field}");
    }
    match message.rfind(", expected ") {
        Some(i) => {
            let expected = &message[i + ", expected ".len()..];
            // An expectation is schema text; if it carries a quote it may echo input, so drop it.
            if expected.contains('"') || expected.len() > 2000 {
                "wrong type or value".into()
            } else {
                format!("wrong type or value, expected {expected}")
            }
        }
        None => "wrong type or value".into(),
    }
}

fn event_id_of(value: &serde_json::Value) -> Option<String> {
    let id = value
        .get("eventId")
        .or_else(|| value.get("event_id"))?
        .as_str()?;
    // Echo only ids the contract allows, never arbitrary text.
    safeclock_common::event::validate_id("eventId", id)
        .ok()
        .map(|()| id.to_string())
}

/// Decodes and validates one event of the body.
fn event(index: usize, value: &serde_json::Value) -> Result<Valid, FieldError> {
    let event_id = event_id_of(value);
    let fail = |field: String, rejection: &Rejection| FieldError {
        index: Some(index),
        event_id: event_id.clone(),
        field,
        reason: rejection.reason(),
        message: rejection.to_string(),
    };
    let event: ReferralEvent = match serde_path_to_error::deserialize(value) {
        Ok(e) => e,
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            let detail = expected_only(&e.inner().to_string());
            let message = if field.is_empty() {
                format!("the event is not a safeclock.v1.ReferralEvent: {detail}")
            } else {
                format!("field `{field}`: {detail}")
            };
            return Err(FieldError {
                index: Some(index),
                event_id,
                field,
                reason: "invalid_json",
                message,
            });
        }
    };
    if let Err(r) = validate_referral_event(&event) {
        return Err(fail(rejection_field(&r), &r));
    }
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => p,
        Err(_) => {
            let r = Rejection::InvalidField {
                field: "occurredAt",
                detail: "cannot be encoded as proto3 JSON".into(),
            };
            return Err(fail(String::new(), &r));
        }
    };
    if payload.len() > MAX_RECORD_BYTES {
        let r = Rejection::Oversized {
            size: payload.len(),
            max: MAX_RECORD_BYTES,
        };
        return Err(fail(String::new(), &r));
    }
    Ok(Valid { event, payload })
}

/// The field a rejection is about (empty for the event as a whole).
pub fn rejection_field(r: &Rejection) -> String {
    match r {
        Rejection::MissingField { field }
        | Rejection::InvalidField { field, .. }
        | Rejection::ImplausibleTime { field, .. } => (*field).to_string(),
        Rejection::UnknownForce => "forceId".into(),
        Rejection::FieldTooLong { field, .. } => field.clone(),
        Rejection::Empty
        | Rejection::Oversized { .. }
        | Rejection::InvalidJson { .. }
        | Rejection::UnknownKind
        | Rejection::OverLimit { .. } => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"eventId":"e-1","referralId":"R-1","forceId":"nottinghamshire",
        "occurredAt":"2026-11-29T10:00:00Z","referralReceived":{"category":"CATEGORY_GROOMING"}}"#;

    fn errors(body: &str) -> Vec<FieldError> {
        parse(body.as_bytes(), 10)
            .unwrap()
            .events
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    #[test]
    fn one_event_or_a_batch() {
        let p = parse(EVENT.as_bytes(), 10).unwrap();
        assert_eq!(p.shape, Shape::Single);
        let v = p.events[0].as_ref().unwrap();
        assert_eq!(v.event.referral_id, "R-1");
        let canonical: serde_json::Value = serde_json::from_slice(&v.payload).unwrap();
        assert_eq!(
            canonical["referralReceived"]["category"],
            "CATEGORY_GROOMING"
        );

        let p = parse(format!("[{EVENT},{EVENT}]").as_bytes(), 10).unwrap();
        assert_eq!(p.shape, Shape::Batch);
        assert_eq!(p.events.len(), 2);
    }

    #[test]
    fn errors_name_the_field_and_the_event_but_never_the_value() {
        let bad_enum = EVENT.replace("CATEGORY_GROOMING", "Jane Smith");
        let e = &errors(&format!("[{EVENT},{bad_enum}]"))[0];
        assert_eq!(e.index, Some(1));
        assert_eq!(e.event_id.as_deref(), Some("e-1"));
        assert_eq!(e.field, "referralReceived.category");
        assert_eq!(e.reason, "invalid_json");
        assert!(!e.message.contains("Jane"), "{}", e.message);

        let no_ref = EVENT.replace(r#""referralId":"R-1","#, "");
        let e = &errors(&no_ref)[0];
        assert_eq!(
            (e.field.as_str(), e.reason),
            ("referralId", "missing_field")
        );

        let bad_time = EVENT.replace("2026-11-29T10:00:00Z", "Jane Smith");
        let e = &errors(&bad_time)[0];
        assert_eq!(e.field, "occurredAt");
        assert!(!e.message.contains("Jane"), "{}", e.message);

        let wrong_type = EVENT.replace(r#""R-1""#, "42");
        let e = &errors(&wrong_type)[0];
        assert_eq!(e.field, "referralId");

        let no_kind = r#"{"eventId":"e-1","referralId":"R-1","forceId":"x","occurredAt":"2026-11-29T10:00:00Z"}"#;
        assert_eq!(errors(no_kind)[0].reason, "unknown_event_kind");

        let e = &errors("[1]")[0];
        assert_eq!((e.field.as_str(), e.reason), ("", "invalid_json"));
    }

    #[test]
    fn unusable_bodies_are_refused_whole() {
        for body in ["", "  ", "[]", "nope", "\"x\"", "{"] {
            assert!(
                matches!(parse(body.as_bytes(), 10), Err(BodyError::Invalid(_))),
                "{body:?}"
            );
        }
        let big = format!("[{}]", [EVENT; 3].join(","));
        assert_eq!(
            parse(big.as_bytes(), 2).unwrap_err(),
            BodyError::TooManyEvents { count: 3, max: 2 }
        );
    }
}
