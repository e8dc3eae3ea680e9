//! The length limit of every string field of a referral event.
//!
//! A string a source system sends can end up in the clock's state (references become clock
//! instances, codes become labels), in every SLA event, and in notifications. An unbounded one
//! grows a state record past the broker's message limit, so every string field is limited:
//! ids, references (`*Ref`) and everything else (codes), each with its own limit in
//! `[validation]`. Which fields are strings comes from the compiled contract itself
//! ([`crate::schema::event_kinds`]), so a field added to the contract is limited the day it is
//! added; enum values and timestamps, which the JSON form also writes as strings, are not
//! user text and are skipped. The check walks the event's generated `Serialize` implementation
//! (no JSON is built) and stops at the first field over its limit.

use std::collections::{HashMap, HashSet};

use serde::ser::{self, Serialize};

use crate::schema::v1::ReferralEvent;
use crate::schema::AttributeType;

/// The string fields of the contract and their limits.
#[derive(Debug, Clone)]
pub struct StringLimits {
    /// The JSON names of every string attribute, by the JSON name of its event kind (two levels,
    /// so that a lookup while walking an event allocates nothing).
    kind_strings: HashMap<String, HashSet<String>>,
    max_id: usize,
    max_ref: usize,
    max_code: usize,
}

/// The top-level string fields of a referral event that hold ids.
const ID_FIELDS: [&str; 3] = ["eventId", "referralId", "forceId"];
/// The other top-level string fields.
const TOP_STRINGS: [&str; 1] = ["sourceSystem"];

/// A field over its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// The field's path in the JSON form, e.g. `deviceSeized.deviceRef`.
    pub field: String,
    pub chars: usize,
    pub max: usize,
    /// The setting that holds the limit, e.g. `validation.max_ref_chars`.
    pub setting: &'static str,
}

impl StringLimits {
    /// Limits from `[validation]`, fields from the compiled contract.
    pub fn new(max_id: usize, max_ref: usize, max_code: usize) -> Self {
        let kind_strings = crate::schema::event_kinds()
            .unwrap_or_default()
            .into_iter()
            .map(|k| {
                let strings = k
                    .attributes
                    .into_iter()
                    .filter(|a| a.kind == AttributeType::String)
                    .map(|a| a.json_name)
                    .collect();
                (k.json_name, strings)
            })
            .collect();
        Self {
            kind_strings,
            max_id,
            max_ref,
            max_code,
        }
    }

    /// The first string field of `event` over its limit, if any.
    pub fn check(&self, event: &ReferralEvent) -> Result<(), TooLong> {
        match event.serialize(Walk {
            limits: self,
            parent: None,
            key: "",
        }) {
            Err(Stop::TooLong(t)) => Err(t),
            Ok(()) | Err(Stop::Other) => Ok(()),
        }
    }

    /// The limit of a string field, or `None` when the field is not user text (an enum value
    /// or a timestamp in the JSON form).
    fn limit(&self, parent: Option<&str>, key: &str) -> Option<(usize, &'static str)> {
        let is_string = match parent {
            None => ID_FIELDS.contains(&key) || TOP_STRINGS.contains(&key),
            Some(kind) => self
                .kind_strings
                .get(kind)
                .is_some_and(|strings| strings.contains(key)),
        };
        if !is_string {
            None
        } else if parent.is_none() && ID_FIELDS.contains(&key) {
            Some((self.max_id, "validation.max_id_chars"))
        } else if key.ends_with("Ref") {
            Some((self.max_ref, "validation.max_ref_chars"))
        } else {
            Some((self.max_code, "validation.max_code_chars"))
        }
    }
}

/// Why the walk stopped: a field over its limit, or a shape this walk does not descend into.
#[derive(Debug)]
enum Stop {
    TooLong(TooLong),
    Other,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("string limit walk stopped")
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Stop::Other
    }
}

/// Serializes one value found under `key` (in the kind `parent`, or at the top level).
struct Walk<'a> {
    limits: &'a StringLimits,
    parent: Option<&'a str>,
    key: &'a str,
}

struct WalkStruct<'a> {
    limits: &'a StringLimits,
    /// The key of this struct in its parent (the kind's JSON name for a kind).
    key: &'a str,
    depth: usize,
}

impl ser::SerializeStruct for WalkStruct<'_> {
    type Ok = ();
    type Error = Stop;

    fn serialize_field<V: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &V,
    ) -> Result<(), Stop> {
        // The event's own fields, then one level down the kind's attributes. Deeper structs
        // (timestamps as objects) hold no user text.
        let parent = match self.depth {
            0 => None,
            1 => Some(self.key),
            _ => return Ok(()),
        };
        value.serialize(Walk {
            limits: self.limits,
            parent,
            key,
        })
    }

    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

macro_rules! ignore {
    ($($name:ident: $t:ty),*) => {
        $(fn $name(self, _v: $t) -> Result<(), Stop> { Ok(()) })*
    };
}

impl<'a> ser::Serializer for Walk<'a> {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = ser::Impossible<(), Stop>;
    type SerializeTuple = ser::Impossible<(), Stop>;
    type SerializeTupleStruct = ser::Impossible<(), Stop>;
    type SerializeTupleVariant = ser::Impossible<(), Stop>;
    type SerializeMap = ser::Impossible<(), Stop>;
    type SerializeStruct = WalkStruct<'a>;
    type SerializeStructVariant = ser::Impossible<(), Stop>;

    ignore!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_f32: f32, serialize_f64: f64, serialize_char: char,
        serialize_bytes: &[u8]);

    fn serialize_str(self, v: &str) -> Result<(), Stop> {
        // Every limit is at least 8 characters: most strings are decided without a lookup.
        if v.len() <= 8 {
            return Ok(());
        }
        let Some((max, setting)) = self.limits.limit(self.parent, self.key) else {
            return Ok(());
        };
        let chars = v.chars().count();
        if chars <= max {
            return Ok(());
        }
        let field = match self.parent {
            Some(kind) => format!("{kind}.{}", self.key),
            None => self.key.to_string(),
        };
        Err(Stop::TooLong(TooLong {
            field,
            chars,
            max,
            setting,
        }))
    }

    fn serialize_none(self) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
    ) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<(), Stop> {
        Err(Stop::Other)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Stop> {
        Err(Stop::Other)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Stop> {
        Err(Stop::Other)
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Stop> {
        Err(Stop::Other)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Stop> {
        Err(Stop::Other)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Stop> {
        Err(Stop::Other)
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Stop> {
        Ok(WalkStruct {
            limits: self.limits,
            key: self.key,
            depth: match self.parent {
                // The event itself (key "") or a kind under it.
                None if self.key.is_empty() => 0,
                None => 1,
                Some(_) => 2,
            },
        })
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Stop> {
        Err(Stop::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::v1::{referral_event::Kind, DeviceSeized, ReferralReceived};

    fn event(kind: Kind) -> ReferralEvent {
        ReferralEvent {
            event_id: "e-1".into(),
            referral_id: "R-1".into(),
            force_id: "nottinghamshire".into(),
            source_system: "niche-rms".into(),
            kind: Some(kind),
            ..ReferralEvent::default()
        }
    }

    #[test]
    fn every_string_field_has_its_limit_and_the_error_names_field_and_setting() {
        let limits = StringLimits::new(128, 64, 32);
        let ok = event(Kind::DeviceSeized(DeviceSeized {
            device_ref: "DEV-0001".into(),
        }));
        assert_eq!(limits.check(&ok), Ok(()));
        let long_ref = event(Kind::DeviceSeized(DeviceSeized {
            device_ref: "D".repeat(60 * 1024),
        }));
        assert_eq!(
            limits.check(&long_ref),
            Err(TooLong {
                field: "deviceSeized.deviceRef".into(),
                chars: 60 * 1024,
                max: 64,
                setting: "validation.max_ref_chars",
            })
        );
        let long_area = event(Kind::ReferralReceived(ReferralReceived {
            area: "a".repeat(33),
            ..ReferralReceived::default()
        }));
        let err = limits.check(&long_area).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.max, err.setting),
            ("referralReceived.area", 32, "validation.max_code_chars")
        );
        let mut long_source = ok.clone();
        long_source.source_system = "s".repeat(33);
        assert_eq!(
            limits.check(&long_source).unwrap_err().field,
            "sourceSystem"
        );
        // Characters, not bytes.
        let accents = event(Kind::DeviceSeized(DeviceSeized {
            device_ref: "é".repeat(64),
        }));
        assert_eq!(limits.check(&accents), Ok(()));
    }

    #[test]
    fn enum_values_and_timestamps_are_not_user_text() {
        // Limits shorter than every enum name and timestamp: none of them is checked.
        let limits = StringLimits::new(8, 8, 8);
        let mut e = event(Kind::ReferralReceived(ReferralReceived {
            category: crate::schema::v1::Category::ChildSexualAbuse as i32,
            ..ReferralReceived::default()
        }));
        e.event_id = "e".into();
        e.referral_id = "R".into();
        e.force_id = "notts".into();
        e.source_system = "rms".into();
        e.occurred_at = Some(crate::schema::from_jiff(
            "2026-11-29T10:00:00Z".parse().unwrap(),
        ));
        assert_eq!(limits.check(&e), Ok(()));
    }
}
