//! Reads one attribute of a referral event by its proto3 JSON name, without building JSON.
//!
//! Rule predicates and instance keys name attributes as they appear in the event's JSON form
//! (`referrerAcknowledged`, `deviceRef`). Converting the whole event to a `serde_json::Value`
//! for every predicate cost more than the rest of the engine together, so this walks the event's
//! generated `Serialize` implementation instead: a serializer that ignores every field except
//! the one on the path, and turns the scalar at its end into a JSON value. Fields the proto3 JSON
//! mapping omits (default values) read as absent, exactly as in the JSON form.

use serde::ser::{self, Impossible, Serialize};

/// The value of `kind_field.attribute` in `event`'s proto3 JSON form, if present and scalar.
pub fn attribute<T: Serialize>(
    event: &T,
    kind_field: &str,
    attribute: &str,
) -> Option<serde_json::Value> {
    event
        .serialize(Path {
            path: [kind_field, attribute],
            depth: 0,
        })
        .ok()
        .flatten()
}

#[derive(Debug)]
struct NotFound;

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("attribute not found")
    }
}

impl std::error::Error for NotFound {}

impl ser::Error for NotFound {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        NotFound
    }
}

/// Descends through structs along `path`; anything else on the way means "not there".
struct Path<'a> {
    path: [&'a str; 2],
    depth: usize,
}

struct PathStruct<'a> {
    path: [&'a str; 2],
    depth: usize,
    found: Option<serde_json::Value>,
}

impl ser::SerializeStruct for PathStruct<'_> {
    type Ok = Option<serde_json::Value>;
    type Error = NotFound;

    fn serialize_field<V: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &V,
    ) -> Result<(), NotFound> {
        if self.found.is_some() || key != self.path[self.depth] {
            return Ok(());
        }
        self.found = if self.depth + 1 == self.path.len() {
            value
                .serialize(serde_json::value::Serializer)
                .ok()
                .filter(|v| !v.is_object() && !v.is_array())
        } else {
            value
                .serialize(Path {
                    path: self.path,
                    depth: self.depth + 1,
                })
                .ok()
                .flatten()
        };
        Ok(())
    }

    fn end(self) -> Result<Self::Ok, NotFound> {
        Ok(self.found)
    }
}

macro_rules! not_a_struct {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $arg),*) -> Result<Self::Ok, NotFound> { Err(NotFound) })*
    };
}

impl<'a> ser::Serializer for Path<'a> {
    type Ok = Option<serde_json::Value>;
    type Error = NotFound;
    type SerializeSeq = Impossible<Self::Ok, NotFound>;
    type SerializeTuple = Impossible<Self::Ok, NotFound>;
    type SerializeTupleStruct = Impossible<Self::Ok, NotFound>;
    type SerializeTupleVariant = Impossible<Self::Ok, NotFound>;
    type SerializeMap = Impossible<Self::Ok, NotFound>;
    type SerializeStruct = PathStruct<'a>;
    type SerializeStructVariant = Impossible<Self::Ok, NotFound>;

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<PathStruct<'a>, NotFound> {
        Ok(PathStruct {
            path: self.path,
            depth: self.depth,
            found: None,
        })
    }

    not_a_struct!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<V: ?Sized + Serialize>(self, value: &V) -> Result<Self::Ok, NotFound> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<V: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &V,
    ) -> Result<Self::Ok, NotFound> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<V: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &V,
    ) -> Result<Self::Ok, NotFound> {
        Err(NotFound)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotFound> {
        Err(NotFound)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotFound> {
        Err(NotFound)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotFound> {
        Err(NotFound)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotFound> {
        Err(NotFound)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotFound> {
        Err(NotFound)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotFound> {
        Err(NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeclock_common::schema::v1::{
        referral_event::Kind, DeviceSeized, ReferralDecisionMade, ReferralEvent,
    };

    fn event(kind: Kind) -> ReferralEvent {
        ReferralEvent {
            event_id: "e1".into(),
            referral_id: "R-1".into(),
            kind: Some(kind),
            ..ReferralEvent::default()
        }
    }

    /// The extractor agrees with the full JSON form on every attribute of these events.
    #[test]
    fn reads_what_the_json_form_holds() {
        let events = [
            event(Kind::ReferralDecisionMade(ReferralDecisionMade {
                decision: "section-47".into(),
                referrer_acknowledged: true,
            })),
            event(Kind::ReferralDecisionMade(ReferralDecisionMade::default())),
            event(Kind::DeviceSeized(DeviceSeized {
                device_ref: "DEV-1".into(),
            })),
        ];
        for e in &events {
            let json = serde_json::to_value(e).unwrap();
            for kind in ["referralDecisionMade", "deviceSeized", "allocated"] {
                for attr in ["decision", "referrerAcknowledged", "deviceRef", "missing"] {
                    assert_eq!(
                        attribute(e, kind, attr),
                        json.get(kind).and_then(|k| k.get(attr)).cloned(),
                        "{kind}.{attr}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_level_fields_and_nested_messages_are_not_attributes() {
        let e = event(Kind::DeviceSeized(DeviceSeized {
            device_ref: "DEV-1".into(),
        }));
        assert_eq!(attribute(&e, "referralId", "x"), None);
        assert_eq!(attribute(&e, "occurredAt", "seconds"), None);
    }
}
