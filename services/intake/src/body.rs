//! Parsing a request body into referral events, with an error per event that names the field.
//!
//! A body is one event (a JSON object) or a batch (a JSON array of objects). Each event is
//! decoded with the contract's own proto3 JSON mapping and then validated by
//! `safeclock_common::event`, the same checks every consumer applies, so what intake accepts a
//! consumer never dead-letters for its shape. Errors carry the field path (`referralId`,
//! `referralReceived.category`) and the reason code, never the offending value: a wrong value may
//! be personal data typed into the wrong field, and errors end up in logs.
//!
//! # Bounded work and memory per request
//! The body (at most `intake.max_body_bytes`) is never turned into a tree of
//! `serde_json::Value`s. In order:
//! 1. **Nesting** is checked with one pass over the bytes: deeper than [`MAX_DEPTH`] is refused
//!    at once. A valid event is two levels deep (three in a batch). serde_json alone would not
//!    catch it here: it skips values it keeps raw ([`RawValue`]) and unknown fields
//!    (`IgnoredAny`) with a loop and its own small stack, without its recursion limit of 128,
//!    so a 10,000-deep unknown field inside an otherwise valid event would be accepted and
//!    silently dropped. Its recursion limit still guards every recursive path, so nothing here
//!    can overflow the stack.
//! 2. **The batch is counted while it is split**: the array's elements are taken as
//!    [`RawValue`]s (slices of the body, not copies) and the split stops at element
//!    `max_events + 1` with [`BodyError::TooManyEvents`], before any event is decoded. A 1 MiB
//!    array of numbers costs at most `max_events` slice references.
//! 3. Each element is then decoded straight from its slice into a `ReferralEvent`.
//!
//! Pure functions with no I/O, so they can be fuzzed (`tests/fuzz.rs`).

use std::cell::Cell;

use safeclock_common::event::{validate_referral_event, Rejection, MAX_RECORD_BYTES};
use safeclock_common::schema::v1::ReferralEvent;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::Deserialize;
use serde::Serialize;
use serde_json::value::RawValue;

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
    /// Fixed reason code (the dead-letter reason codes of referral events).
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
    /// More events than allowed (counting stopped at `max + 1`): 413.
    TooManyEvents { max: usize },
}

/// Deepest nesting of arrays and objects accepted in a body. A valid event is two levels deep
/// (the event, its kind), three in a batch; the rest is room for fields added to the contract.
pub const MAX_DEPTH: usize = 32;

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
    let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(whole(
            "empty",
            "the body is empty: send one event or an array of events",
        ));
    };
    if nested_deeper_than(bytes, MAX_DEPTH) {
        return Err(whole(
            "invalid_json",
            format!(
                "the body is nested deeper than {MAX_DEPTH} levels; an event is two levels deep"
            ),
        ));
    }
    let not_json = |e: serde_json::Error| {
        whole(
            "invalid_json",
            format!(
                "the body is not valid JSON: {} at line {} column {}",
                json_category(&e),
                e.line(),
                e.column()
            ),
        )
    };
    match first {
        b'{' => {
            let raw: &RawValue = serde_json::from_slice(bytes).map_err(not_json)?;
            Ok(Parsed {
                shape: Shape::Single,
                events: vec![event(0, raw)],
            })
        }
        b'[' => {
            let too_many = Cell::new(false);
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let items = Batch {
                max: max_events,
                too_many: &too_many,
            }
            .deserialize(&mut de)
            .and_then(|items| de.end().map(|()| items));
            let items = match items {
                Ok(items) => items,
                Err(_) if too_many.get() => {
                    return Err(BodyError::TooManyEvents { max: max_events })
                }
                Err(e) => return Err(not_json(e)),
            };
            if items.is_empty() {
                return Err(whole(
                    "empty",
                    "the batch is empty: send at least one event",
                ));
            }
            Ok(Parsed {
                shape: Shape::Batch,
                events: items
                    .into_iter()
                    .enumerate()
                    .map(|(i, raw)| event(i, raw))
                    .collect(),
            })
        }
        _ => {
            // Say whether it is JSON at all before saying it has the wrong shape.
            serde_json::from_slice::<&RawValue>(bytes).map_err(not_json)?;
            Err(whole(
                "invalid_json",
                "the body must be a JSON object (one event) or an array of events",
            ))
        }
    }
}

/// The elements of a JSON array as raw slices, refusing element `max + 1` before reading it.
struct Batch<'c> {
    max: usize,
    too_many: &'c Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Batch<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Batch<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.max {
                self.too_many.set(true);
                return Err(A::Error::custom("too many events"));
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// Whether arrays and objects in `bytes` nest deeper than `limit` (brackets inside strings do
/// not count). Not a JSON validator: the parser that follows is.
fn nested_deeper_than(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
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

/// The `eventId` of an event, read only when an error needs it; only ids the contract allows
/// are echoed, never arbitrary text.
fn event_id_of(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(rename = "eventId", alias = "event_id")]
        event_id: Option<String>,
    }
    let id = serde_json::from_str::<IdOnly>(raw.get()).ok()?.event_id?;
    safeclock_common::event::validate_id("eventId", &id)
        .ok()
        .map(|()| id)
}

/// Decodes and validates one event of the body, straight from its slice of the body.
fn event(index: usize, raw: &RawValue) -> Result<Valid, FieldError> {
    let fail = |field: String, rejection: &Rejection| FieldError {
        index: Some(index),
        event_id: event_id_of(raw),
        field,
        reason: rejection.reason(),
        message: rejection.to_string(),
    };
    // Most events are valid: decode them directly, and only a refused one a second time with
    // the path tracking that names the field (it costs a quarter of the decode).
    let direct = serde_json::from_str::<ReferralEvent>(raw.get());
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let event: ReferralEvent =
        match direct.map_or_else(|_| serde_path_to_error::deserialize(&mut de), Ok) {
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
                    event_id: event_id_of(raw),
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
        Rejection::FieldTooLong { field, .. }
        | Rejection::NotACode { field, .. }
        | Rejection::UnlistedCode { field, .. } => field.clone(),
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
            BodyError::TooManyEvents { max: 2 }
        );
        // Exactly the limit is fine.
        assert_eq!(parse(big.as_bytes(), 3).unwrap().events.len(), 3);
    }

    #[test]
    fn a_huge_array_is_refused_after_counting_past_the_limit() {
        // A 1 MiB array of numbers: refused at element 501, nothing decoded.
        let mut body = String::from("[1");
        while body.len() < 1024 * 1024 {
            body.push_str(",1");
        }
        body.push(']');
        let started = std::time::Instant::now();
        assert_eq!(
            parse(body.as_bytes(), 500).unwrap_err(),
            BodyError::TooManyEvents { max: 500 }
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Within the limit, numbers are refused one by one.
        let errors = errors("[1, 2, 3]");
        assert_eq!(errors.len(), 3);
        assert!(errors.iter().all(|e| e.reason == "invalid_json"));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing_and_never_overflows_the_stack() {
        let deep_array = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        // Also inside an otherwise valid event, as an unknown field (which serde skips without
        // its recursion limit), and unbalanced.
        let hidden = EVENT.replacen(
            '{',
            &format!(
                r#"{{"x":{}1{},"#,
                r#"{"a":"#.repeat(10_000),
                "}".repeat(10_000)
            ),
            1,
        );
        let unbalanced = "[".repeat(10_000);
        for body in [&deep_array, &deep_object, &hidden, &unbalanced] {
            let started = std::time::Instant::now();
            match parse(body.as_bytes(), 500) {
                Err(BodyError::Invalid(e)) => {
                    assert_eq!(e.reason, "invalid_json");
                    assert!(e.message.contains("nested deeper than 32"), "{}", e.message);
                }
                other => panic!("{other:?}"),
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
        // Brackets inside strings do not count.
        let quoted = EVENT.replace("R-1", &"[".repeat(60));
        assert!(!nested_deeper_than(quoted.as_bytes(), MAX_DEPTH));
        assert!(!nested_deeper_than(br#"{"a":"\"[[[["}"#, 2));
        // 32 levels is allowed, 33 is not.
        let at_limit = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(!nested_deeper_than(at_limit.as_bytes(), MAX_DEPTH));
        assert!(nested_deeper_than(
            format!("[{at_limit}]").as_bytes(),
            MAX_DEPTH
        ));
    }

    #[test]
    fn serde_json_without_the_depth_check_keeps_deep_values_raw_and_limits_recursion() {
        // What the depth check is for, shown on serde_json itself: raw values and skipped
        // fields are read without the recursion limit ...
        let deep = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        assert!(serde_json::from_str::<&RawValue>(&deep).is_ok());
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(&deep).is_ok());
        // ... while building values stops at its limit of 128 with an error, not a crash.
        let err = serde_json::from_str::<serde_json::Value>(&deep).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }
}
