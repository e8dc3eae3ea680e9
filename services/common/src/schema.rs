//! The event contract, generated at build time from `proto/safeclock/v1/*.proto`.
//!
//! Never hand-copy these types: change the `.proto` files and rebuild. Serde implementations follow
//! the proto3 JSON mapping (camelCase field names, enums as their names, RFC 3339 timestamps,
//! durations as `"1.5s"`), and unknown fields are ignored so newer producers do not break older
//! consumers.

/// `safeclock.v1`: referral events, SLA events and escalation records.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/safeclock.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/safeclock.v1.serde.rs"));
}

pub use pbjson_types::{Duration as ProtoDuration, Timestamp as ProtoTimestamp};

/// Converts a protobuf timestamp to a [`jiff::Timestamp`]; `None` when out of range.
pub fn to_jiff(ts: &ProtoTimestamp) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(ts.seconds, ts.nanos).ok()
}

/// Converts a [`jiff::Timestamp`] to a protobuf timestamp.
pub fn from_jiff(ts: jiff::Timestamp) -> ProtoTimestamp {
    ProtoTimestamp {
        seconds: ts.as_second(),
        nanos: ts.subsec_nanosecond(),
    }
}

/// Converts a signed duration to a protobuf duration.
pub fn duration_from_jiff(d: jiff::SignedDuration) -> ProtoDuration {
    ProtoDuration {
        seconds: d.as_secs(),
        nanos: d.subsec_nanos(),
    }
}

/// Converts a protobuf duration to a signed duration.
pub fn duration_to_jiff(d: &ProtoDuration) -> jiff::SignedDuration {
    jiff::SignedDuration::new(d.seconds, d.nanos)
}

/// A contract enum's name as a short label value: `CATEGORY_GROOMING` with prefix `CATEGORY_`
/// becomes `grooming`. Label values therefore come only from the schema's fixed sets.
pub fn enum_label(full_name: &str, prefix: &str) -> String {
    full_name
        .strip_prefix(prefix)
        .unwrap_or(full_name)
        .to_ascii_lowercase()
}

/// Every category label value (`grooming`, ..., and `unspecified`).
pub fn category_labels() -> Vec<String> {
    (0..64)
        .filter_map(|i| v1::Category::try_from(i).ok())
        .map(|c| enum_label(c.as_str_name(), "CATEGORY_"))
        .collect()
}

/// Every risk label value (`low`, `medium`, `high`, `very_high`, and `unspecified`).
pub fn risk_labels() -> Vec<String> {
    (0..64)
        .filter_map(|i| v1::RiskGrade::try_from(i).ok())
        .map(|r| enum_label(r.as_str_name(), "RISK_GRADE_"))
        .collect()
}

/// The compiled schema (a `FileDescriptorSet`), for validating rule files against the contract.
pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/safeclock_descriptor.bin"));

/// The type of an event attribute, as far as rule predicates care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeType {
    Bool,
    String,
    /// An enum, with its value names (e.g. `RESPONSE_GRADE_EMERGENCY`).
    Enum(Vec<String>),
    /// Anything else (numbers, messages): not usable in predicates.
    Other,
}

/// One attribute of an event kind.
#[derive(Debug, Clone)]
pub struct AttributeInfo {
    /// Proto field name (`suspect_has_access_to_children`).
    pub name: String,
    /// proto3 JSON name (`suspectHasAccessToChildren`).
    pub json_name: String,
    pub kind: AttributeType,
}

/// One event kind of `ReferralEvent.kind`, with its attributes.
#[derive(Debug, Clone)]
pub struct EventKindInfo {
    /// Proto field name of the kind (`suspect_identified`).
    pub name: String,
    /// proto3 JSON name (`suspectIdentified`).
    pub json_name: String,
    pub attributes: Vec<AttributeInfo>,
}

/// Every event kind in the contract, read from the compiled schema.
///
/// # Errors
/// Only if the compiled-in descriptor is corrupt (a build problem).
pub fn event_kinds() -> Result<Vec<EventKindInfo>, prost::DecodeError> {
    use prost::Message;
    use prost_types::field_descriptor_proto::Type;
    let set = prost_types::FileDescriptorSet::decode(DESCRIPTOR)?;
    let files: Vec<_> = set
        .file
        .iter()
        .filter(|f| f.package() == "safeclock.v1")
        .collect();
    let message = |full: &str| {
        let short = full.trim_start_matches(".safeclock.v1.");
        files
            .iter()
            .flat_map(|f| f.message_type.iter())
            .find(|m| m.name() == short)
    };
    let enum_values = |full: &str| -> Vec<String> {
        let short = full.trim_start_matches(".safeclock.v1.");
        files
            .iter()
            .flat_map(|f| f.enum_type.iter())
            .find(|e| e.name() == short)
            .map(|e| e.value.iter().map(|v| v.name().to_string()).collect())
            .unwrap_or_default()
    };
    let Some(event) = message("ReferralEvent") else {
        return Ok(Vec::new());
    };
    let kind_oneof = event
        .oneof_decl
        .iter()
        .position(|o| o.name() == "kind")
        .and_then(|i| i32::try_from(i).ok());
    let mut out = Vec::new();
    for field in event
        .field
        .iter()
        .filter(|f| f.oneof_index.is_some() && f.oneof_index == kind_oneof)
    {
        let attributes = message(field.type_name())
            .map(|m| {
                m.field
                    .iter()
                    .map(|a| AttributeInfo {
                        name: a.name().to_string(),
                        json_name: a.json_name().to_string(),
                        kind: match a.r#type() {
                            Type::Bool => AttributeType::Bool,
                            Type::String => AttributeType::String,
                            Type::Enum => AttributeType::Enum(enum_values(a.type_name())),
                            _ => AttributeType::Other,
                        },
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(EventKindInfo {
            name: field.name().to_string(),
            json_name: field.json_name().to_string(),
            attributes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_lists_event_kinds_with_typed_attributes() {
        let kinds = event_kinds().unwrap();
        assert!(kinds.len() > 40);
        let suspect = kinds
            .iter()
            .find(|k| k.name == "suspect_identified")
            .unwrap();
        assert_eq!(suspect.json_name, "suspectIdentified");
        let access = suspect
            .attributes
            .iter()
            .find(|a| a.name == "suspect_has_access_to_children")
            .unwrap();
        assert_eq!(access.json_name, "suspectHasAccessToChildren");
        assert_eq!(access.kind, AttributeType::Bool);
        let graded = kinds.iter().find(|k| k.name == "incident_graded").unwrap();
        assert!(
            matches!(&graded.attributes[0].kind, AttributeType::Enum(v) if v.contains(&"RESPONSE_GRADE_EMERGENCY".to_string()))
        );
    }
}
