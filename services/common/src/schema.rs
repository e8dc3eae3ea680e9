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
