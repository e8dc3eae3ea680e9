//! Reading records off the wire: decode, validate, and say clearly what is wrong.
//!
//! Every consumer goes through [`decode_referral_event`] or [`decode_sla_event`], so a record
//! that one service rejects is rejected by all of them for the same [`Rejection`] reason, and the
//! reason is what lands in the dead-letter headers and the invalid-records counter.

use crate::event_strings::StringProblem;
use crate::schema::to_jiff;
use crate::schema::v1::{referral_event::Kind, ReferralEvent, SlaEvent, SlaTransition};

/// Largest record any consumer accepts; bigger ones are dead-lettered unread.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Longest id (event, referral, force) accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why a record was refused. `reason()` is a short fixed code (used as a metric label and in
/// dead-letter headers); `Display` is the human message with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("record is empty")]
    Empty,
    #[error("record is {size} bytes, over the {max}-byte limit")]
    Oversized { size: usize, max: usize },
    #[error("record is not valid JSON for {schema}: {detail}")]
    InvalidJson {
        schema: &'static str,
        detail: String,
    },
    #[error("field `{field}` is required")]
    MissingField { field: &'static str },
    #[error("field `{field}` is invalid: {detail}")]
    InvalidField { field: &'static str, detail: String },
    #[error(
        "event has no known kind: set exactly one of the event kinds in safeclock.v1.ReferralEvent"
    )]
    UnknownKind,
    #[error("field `{field}` is implausible: {detail}")]
    ImplausibleTime { field: &'static str, detail: String },
    #[error("field `forceId` is not a force this deployment knows (configuration `forces`)")]
    UnknownForce,
    #[error("field `{field}` is {chars} characters, over the limit of {max} ({setting})")]
    FieldTooLong {
        field: String,
        chars: usize,
        max: usize,
        setting: &'static str,
    },
    /// A code or reference field holding something else (free text, a name).
    #[error("field `{field}` is refused: {rule}")]
    NotACode { field: String, rule: &'static str },
    /// A code not among the values configured for its field.
    #[error("field `{field}` is not one of the values configured in `{setting}`")]
    UnlistedCode { field: String, setting: String },
    /// The event would take the referral's state past a limit of `[clock.limits]`; it is
    /// refused whole and the referral's other clocks run on.
    #[error("{message}")]
    OverLimit {
        reason: &'static str,
        message: String,
    },
}

impl Rejection {
    /// A short, fixed reason code: safe as a metric label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::Oversized { .. } => "oversized",
            Rejection::InvalidJson { .. } => "invalid_json",
            Rejection::MissingField { .. } => "missing_field",
            Rejection::InvalidField { .. } => "invalid_field",
            Rejection::UnknownKind => "unknown_event_kind",
            Rejection::ImplausibleTime { .. } => "implausible_time",
            Rejection::UnknownForce => "unknown_force",
            Rejection::FieldTooLong { .. } => "field_too_long",
            Rejection::NotACode { .. } => "not_a_code",
            Rejection::UnlistedCode { .. } => "unlisted_code",
            Rejection::OverLimit { reason, .. } => reason,
        }
    }
}

/// The event kind's name as written in the contract (`referral_received`, `victim_contacted`, ...).
pub fn kind_name(kind: &Kind) -> &'static str {
    kind.into()
}

fn check_size(bytes: &[u8]) -> Result<(), Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::Empty);
    }
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(Rejection::Oversized {
            size: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(())
}

fn check_id(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::MissingField { field });
    }
    if value.len() > MAX_ID_LEN {
        return Err(Rejection::InvalidField {
            field,
            detail: format!("longer than {MAX_ID_LEN} characters"),
        });
    }
    if !crate::event_strings::is_reference(value) {
        // The character is not quoted: it may be part of a name typed into the wrong field.
        return Err(Rejection::InvalidField {
            field,
            detail: "ids are pseudonymous references: letters, digits and - _ . : / only".into(),
        });
    }
    Ok(())
}

/// Checks an id field (event, referral, force) the way every reader does: present, at most
/// [`MAX_ID_LEN`] characters, pseudonymous-reference characters only.
///
/// # Errors
/// A [`Rejection`] naming `field`.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), Rejection> {
    check_id(field, value)
}

/// Describes a JSON error by its kind and position only: serde's own message can quote the
/// offending value, and a value in a bad record may be personal data that must not reach logs or
/// dead-letter headers. The original bytes stay in the dead-letter record for an operator.
fn json_error(schema: &'static str, e: serde_json::Error) -> Rejection {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong field type or value",
        serde_json::error::Category::Eof => "unexpected end of input",
    };
    Rejection::InvalidJson {
        schema,
        detail: format!("{kind} at line {} column {}", e.line(), e.column()),
    }
}

/// Decodes and validates a referral event from its proto3 JSON bytes.
///
/// # Errors
/// A [`Rejection`] naming the field when the record is empty, oversized, not JSON, lacks a
/// required field, carries an id with disallowed characters, or has no known event kind.
pub fn decode_referral_event(bytes: &[u8]) -> Result<ReferralEvent, Rejection> {
    check_size(bytes)?;
    let event: ReferralEvent =
        serde_json::from_slice(bytes).map_err(|e| json_error("safeclock.v1.ReferralEvent", e))?;
    validate_referral_event(&event)?;
    Ok(event)
}

/// Checks the fields every referral event must carry.
///
/// # Errors
/// A [`Rejection`] naming the first field found wrong.
pub fn validate_referral_event(event: &ReferralEvent) -> Result<(), Rejection> {
    check_id("eventId", &event.event_id)?;
    check_id("referralId", &event.referral_id)?;
    check_id("forceId", &event.force_id)?;
    let occurred = event.occurred_at.as_ref().ok_or(Rejection::MissingField {
        field: "occurredAt",
    })?;
    if to_jiff(occurred).is_none() {
        return Err(Rejection::InvalidField {
            field: "occurredAt",
            detail: "timestamp out of range".into(),
        });
    }
    if event.kind.is_none() {
        return Err(Rejection::UnknownKind);
    }
    Ok(())
}

/// Checks of a referral event's content that depend on the deployment and on "now": event
/// times within a plausible window, and (optionally) a force this deployment knows. Built once
/// from `[validation]` and `forces`; shared by intake and every reader of referral events, so
/// all of them refuse the same records for the same reasons.
#[derive(Debug, Clone)]
pub struct Plausibility {
    max_future: jiff::SignedDuration,
    not_before: jiff::Timestamp,
    max_past: Option<jiff::SignedDuration>,
    /// `None` when unknown forces are accepted.
    forces: Option<std::collections::HashSet<String>>,
    strings: crate::event_strings::StringLimits,
}

impl Plausibility {
    pub fn new(settings: &crate::config::Settings) -> Self {
        let v = &settings.validation;
        Self {
            max_future: jiff::SignedDuration::from_secs(
                i64::try_from(v.max_future_secs).unwrap_or(i64::MAX),
            ),
            not_before: v.not_before,
            max_past: v
                .max_past_days
                .map(|d| jiff::SignedDuration::from_hours(i64::from(d) * 24)),
            forces: (v.unknown_forces == crate::config::UnknownForces::Reject)
                .then(|| settings.forces.iter().cloned().collect()),
            strings: crate::event_strings::StringLimits::with_codes(
                v.max_id_chars,
                v.max_ref_chars,
                v.max_code_chars,
                &v.codes,
                &v.force_codes,
            ),
        }
    }

    /// [`decode_referral_event`], then [`Plausibility::check`]: what every reader of referral
    /// events applies.
    ///
    /// # Errors
    /// The first [`Rejection`] found.
    pub fn decode(&self, bytes: &[u8], now: jiff::Timestamp) -> Result<ReferralEvent, Rejection> {
        let event = decode_referral_event(bytes)?;
        self.check(&event, now)?;
        Ok(event)
    }

    /// Checks `event` (already shape-validated): the length and alphabet of every string field
    /// (codes against their configured lists), then event times against the window around
    /// `now`, then the force.
    ///
    /// # Errors
    /// [`Rejection::FieldTooLong`], [`Rejection::NotACode`], [`Rejection::UnlistedCode`] or
    /// [`Rejection::ImplausibleTime`] naming the field, or [`Rejection::UnknownForce`].
    pub fn check(&self, event: &ReferralEvent, now: jiff::Timestamp) -> Result<(), Rejection> {
        match self.strings.check(event) {
            Ok(()) => {}
            Err(StringProblem::TooLong(t)) => {
                return Err(Rejection::FieldTooLong {
                    field: t.field,
                    chars: t.chars,
                    max: t.max,
                    setting: t.setting,
                })
            }
            Err(StringProblem::NotACode { field, rule }) => {
                return Err(Rejection::NotACode { field, rule })
            }
            Err(StringProblem::Unlisted { field, setting }) => {
                return Err(Rejection::UnlistedCode { field, setting })
            }
        }
        for (field, ts) in [
            ("occurredAt", event.occurred_at.as_ref()),
            ("recordedAt", event.recorded_at.as_ref()),
        ] {
            let Some(ts) = ts else { continue };
            let Some(t) = to_jiff(ts) else {
                return Err(Rejection::InvalidField {
                    field,
                    detail: "timestamp out of range".into(),
                });
            };
            if t < self.not_before {
                return Err(Rejection::ImplausibleTime {
                    field,
                    detail: format!("before {}", self.not_before),
                });
            }
            if let Some(max_past) = self.max_past {
                if now.as_second() - t.as_second() > max_past.as_secs() {
                    return Err(Rejection::ImplausibleTime {
                        field,
                        detail: format!("more than {} days in the past", max_past.as_hours() / 24),
                    });
                }
            }
            if t.as_second() - now.as_second() > self.max_future.as_secs() {
                return Err(Rejection::ImplausibleTime {
                    field,
                    detail: format!("more than {} s in the future", self.max_future.as_secs()),
                });
            }
        }
        if let Some(forces) = &self.forces {
            if !forces.contains(&event.force_id) {
                return Err(Rejection::UnknownForce);
            }
        }
        Ok(())
    }
}

impl Plausibility {
    /// [`decode_sla_event`], then the same window on its `occurredAt` (not before
    /// `validation.not_before`, not further ahead than `validation.max_future_secs`; SLA events
    /// of old clocks are legitimately old, so no `max_past`) and, when unknown forces are
    /// refused, the force in its labels: what the escalator applies to SLA events.
    ///
    /// # Errors
    /// The first [`Rejection`] found.
    pub fn decode_sla(&self, bytes: &[u8], now: jiff::Timestamp) -> Result<SlaEvent, Rejection> {
        let event = decode_sla_event(bytes)?;
        if let Some(ts) = event.occurred_at.as_ref() {
            let Some(t) = to_jiff(ts) else {
                return Err(Rejection::InvalidField {
                    field: "occurredAt",
                    detail: "timestamp out of range".into(),
                });
            };
            if t < self.not_before {
                return Err(Rejection::ImplausibleTime {
                    field: "occurredAt",
                    detail: format!("before {}", self.not_before),
                });
            }
            if t.as_second() - now.as_second() > self.max_future.as_secs() {
                return Err(Rejection::ImplausibleTime {
                    field: "occurredAt",
                    detail: format!("more than {} s in the future", self.max_future.as_secs()),
                });
            }
        }
        if let Some(forces) = &self.forces {
            let force = event.labels.as_ref().map_or("", |l| l.force_id.as_str());
            if !forces.contains(force) {
                return Err(Rejection::UnknownForce);
            }
        }
        Ok(event)
    }
}

/// Decodes and validates an SLA event from its proto3 JSON bytes.
///
/// # Errors
/// A [`Rejection`] naming the field when the record is not a usable SLA event.
pub fn decode_sla_event(bytes: &[u8]) -> Result<SlaEvent, Rejection> {
    check_size(bytes)?;
    let event: SlaEvent =
        serde_json::from_slice(bytes).map_err(|e| json_error("safeclock.v1.SlaEvent", e))?;
    check_id("slaEventId", &event.sla_event_id)?;
    check_id("referralId", &event.referral_id)?;
    check_id("ruleId", &event.rule_id)?;
    if event.transition() == SlaTransition::Unspecified {
        return Err(Rejection::MissingField {
            field: "transition",
        });
    }
    Ok(event)
}

/// The transition's short name (`breached`, `met_late`, ...): for labels, logs and lines people read.
pub fn transition_label(t: SlaTransition) -> &'static str {
    match t {
        SlaTransition::Unspecified => "unspecified",
        SlaTransition::Started => "started",
        SlaTransition::Warning => "warning",
        SlaTransition::Breached => "breached",
        SlaTransition::Met => "met",
        SlaTransition::MetLate => "met_late",
        SlaTransition::Paused => "paused",
        SlaTransition::Resumed => "resumed",
        SlaTransition::Cancelled => "cancelled",
        SlaTransition::Corrected => "corrected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"eventId":"e-1","referralId":"R-1","forceId":"nottinghamshire",
        "occurredAt":"2026-11-29T10:00:00Z","sourceSystem":"rms","referralReceived":{"category":"CATEGORY_GROOMING"}}"#;

    #[test]
    fn decodes_a_valid_event_and_names_its_kind() {
        let e = decode_referral_event(VALID.as_bytes()).unwrap();
        assert_eq!(kind_name(e.kind.as_ref().unwrap()), "referral_received");
    }

    #[test]
    fn accepts_original_proto_field_names_too() {
        let json = r#"{"event_id":"e-1","referral_id":"R-1","force_id":"x","occurred_at":"2026-11-29T10:00:00Z","victim_contacted":{}}"#;
        let e = decode_referral_event(json.as_bytes()).unwrap();
        assert_eq!(kind_name(e.kind.as_ref().unwrap()), "victim_contacted");
    }

    #[test]
    fn rejections_name_the_field() {
        let no_ref = VALID.replace(r#""referralId":"R-1","#, "");
        let err = decode_referral_event(no_ref.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            Rejection::MissingField {
                field: "referralId"
            }
        );
        assert!(err.to_string().contains("referralId"));

        let no_kind = VALID.replace(
            r#","referralReceived":{"category":"CATEGORY_GROOMING"}"#,
            "",
        );
        assert_eq!(
            decode_referral_event(no_kind.as_bytes()).unwrap_err(),
            Rejection::UnknownKind
        );

        let bad_time = VALID.replace("2026-11-29T10:00:00Z", "yesterday");
        assert_eq!(
            decode_referral_event(bad_time.as_bytes())
                .unwrap_err()
                .reason(),
            "invalid_json"
        );

        // A wrong value never appears in the error: it could be personal data.
        let name_as_enum = VALID.replace("CATEGORY_GROOMING", "Jane Smith");
        let err = decode_referral_event(name_as_enum.as_bytes()).unwrap_err();
        assert!(!err.to_string().contains("Jane"), "{err}");
        assert!(err.to_string().contains("at line"), "{err}");

        let name_in_id = VALID.replace("R-1", "Jane Smith");
        let err = decode_referral_event(name_in_id.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "invalid_field");
    }

    #[test]
    fn garbage_and_oversized_records_are_refused() {
        assert_eq!(decode_referral_event(b"").unwrap_err(), Rejection::Empty);
        assert_eq!(
            decode_referral_event(b"\xff\xfe not json")
                .unwrap_err()
                .reason(),
            "invalid_json"
        );
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(
            decode_referral_event(&big).unwrap_err().reason(),
            "oversized"
        );
    }

    #[test]
    fn implausible_times_and_unknown_forces_are_refused_with_their_own_reasons() {
        let settings = crate::config::Settings::defaults().unwrap();
        let p = Plausibility::new(&settings);
        let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let ok = decode_referral_event(VALID.as_bytes()).unwrap();
        p.check(&ok, now).unwrap();

        let future = VALID.replace("2026-11-29T10:00:00Z", "2026-12-01T10:00:00Z");
        let e = decode_referral_event(future.as_bytes()).unwrap();
        let err = p.check(&e, now).unwrap_err();
        assert_eq!(err.reason(), "implausible_time");
        assert!(err.to_string().contains("occurredAt"), "{err}");

        let epoch = VALID.replace("2026-11-29T10:00:00Z", "1970-01-01T00:00:00Z");
        let e = decode_referral_event(epoch.as_bytes()).unwrap();
        assert_eq!(p.check(&e, now).unwrap_err().reason(), "implausible_time");

        let typo = VALID.replace("nottinghamshire", "notinghamshire");
        let e = decode_referral_event(typo.as_bytes()).unwrap();
        assert_eq!(p.check(&e, now).unwrap_err(), Rejection::UnknownForce);

        let mut lenient = settings.clone();
        lenient.validation.unknown_forces = crate::config::UnknownForces::Accept;
        lenient.validation.max_past_days = Some(1);
        let p = Plausibility::new(&lenient);
        p.check(&e, now).unwrap();
        let old = VALID.replace("2026-11-29T10:00:00Z", "2026-11-20T10:00:00Z");
        let e = decode_referral_event(old.as_bytes()).unwrap();
        assert_eq!(p.check(&e, now).unwrap_err().reason(), "implausible_time");
    }
}
