//! The length and the alphabet of every string field of a referral event.
//!
//! A string a source system sends can end up in the clock's state (references become clock
//! instances, codes become labels), in every SLA event, in metrics labels and in notifications
//! to third parties. So no string field is free text:
//! - **ids** (`eventId`, `referralId`, `forceId`): pseudonymous references, checked by
//!   [`crate::event::validate_referral_event`]; limited here;
//! - **references** (`deviceRef`, `suspectRef`, every `*Ref`): the same alphabet as ids
//!   (letters, digits, `- _ . : /`);
//! - **codes** (everything else: `area`, `team`, `referrer`, `outcome`, `sourceSystem`, ...):
//!   lower-case letters, digits, `-`, `_` and `.`, starting with a letter or digit; and, where
//!   `[validation.codes]` or `[validation.force_codes.<force>]` lists a field's values, one of
//!   them.
//!
//! A name and address typed into `area` is therefore refused, not carried to a pager. Each kind
//! of string has its own length limit in `[validation]`. Errors name the field and the rule,
//! never the value: a wrong value may be personal data, and errors end up in logs and answers.
//!
//! Which fields are strings comes from the compiled contract itself
//! ([`crate::schema::event_kinds`]), so a field added to the contract is checked the day it is
//! added; enum values and timestamps, which the JSON form also writes as strings, are not
//! user text and are skipped. The check walks the event's generated `Serialize` implementation
//! (no JSON is built) and stops at the first field that breaks a rule.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
    /// The allowed values of code fields, by the field's JSON name, for every force.
    codes: HashMap<String, HashSet<String>>,
    /// Per force, lists that replace those of `codes` for the fields they name.
    force_codes: HashMap<String, HashMap<String, HashSet<String>>>,
}

/// Allowed values of code fields by field name (`[validation.codes]`).
pub type CodeLists = BTreeMap<String, Vec<String>>;

/// What kind of string a field holds, and so which rules apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Id,
    Reference,
    Code,
}

/// The top-level string fields of a referral event that hold ids.
const ID_FIELDS: [&str; 3] = ["eventId", "referralId", "forceId"];
/// The other top-level string fields.
const TOP_STRINGS: [&str; 1] = ["sourceSystem"];

/// Why a string field is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringProblem {
    TooLong(TooLong),
    /// Not in the alphabet of its kind of string.
    NotACode {
        /// The field's path in the JSON form.
        field: String,
        /// What the field must be, in words.
        rule: &'static str,
    },
    /// A code not among the configured values of its field.
    Unlisted {
        field: String,
        /// The setting that lists the values, e.g. `validation.force_codes.nottinghamshire.team`.
        setting: String,
    },
}

/// The rule of references, in words.
const REFERENCE_RULE: &str =
    "a reference is letters, digits and - _ . : / only (a pseudonymous reference, not a name)";
/// The rule of codes, in words.
const CODE_RULE: &str = "a code is lower-case letters, digits, - _ and . only, starting with a \
                         letter or digit (a code, not free text)";

/// Whether `v` is in the alphabet of references (the same as ids').
pub fn is_reference(v: &str) -> bool {
    v.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// Whether `v` is a code: lower-case letters, digits, `-`, `_`, `.`, starting with a letter or
/// digit.
pub fn is_code(v: &str) -> bool {
    let mut bytes = v.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

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
    /// Limits from `[validation]`, fields from the compiled contract, no code lists.
    pub fn new(max_id: usize, max_ref: usize, max_code: usize) -> Self {
        Self::with_codes(
            max_id,
            max_ref,
            max_code,
            &CodeLists::new(),
            &BTreeMap::new(),
        )
    }

    /// Limits and code lists from `[validation]`.
    pub fn with_codes(
        max_id: usize,
        max_ref: usize,
        max_code: usize,
        codes: &CodeLists,
        force_codes: &BTreeMap<String, CodeLists>,
    ) -> Self {
        let sets = |lists: &CodeLists| -> HashMap<String, HashSet<String>> {
            lists
                .iter()
                .map(|(field, values)| (field.clone(), values.iter().cloned().collect()))
                .collect()
        };
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
            codes: sets(codes),
            force_codes: force_codes
                .iter()
                .map(|(force, lists)| (force.clone(), sets(lists)))
                .collect(),
        }
    }

    /// The JSON names of every code field of the contract (`sourceSystem`, `area`, `team`,
    /// ...): what `[validation.codes]` may list.
    pub fn code_fields(&self) -> BTreeSet<&str> {
        TOP_STRINGS
            .iter()
            .copied()
            .chain(self.kind_strings.values().flatten().map(String::as_str))
            .filter(|f| !f.ends_with("Ref"))
            .collect()
    }

    /// The first string field of `event` that breaks a rule, if any.
    ///
    /// # Errors
    /// The [`StringProblem`], naming the field (never quoting its value).
    pub fn check(&self, event: &ReferralEvent) -> Result<(), StringProblem> {
        match event.serialize(Walk {
            limits: self,
            force: &event.force_id,
            parent: None,
            key: "",
        }) {
            Err(Stop::Refused(problem)) => Err(problem),
            Ok(()) | Err(Stop::Other) => Ok(()),
        }
    }

    /// The class of a string field, or `None` when the field is not user text (an enum value
    /// or a timestamp in the JSON form).
    fn class(&self, parent: Option<&str>, key: &str) -> Option<Class> {
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
            Some(Class::Id)
        } else if key.ends_with("Ref") {
            Some(Class::Reference)
        } else {
            Some(Class::Code)
        }
    }

    fn limit(&self, class: Class) -> (usize, &'static str) {
        match class {
            Class::Id => (self.max_id, "validation.max_id_chars"),
            Class::Reference => (self.max_ref, "validation.max_ref_chars"),
            Class::Code => (self.max_code, "validation.max_code_chars"),
        }
    }

    /// The configured values of code field `key` for `force`, and whether they are the force's
    /// own list (rather than `validation.codes`).
    fn listed(&self, force: &str, key: &str) -> Option<(&HashSet<String>, bool)> {
        if let Some(values) = self.force_codes.get(force).and_then(|l| l.get(key)) {
            return Some((values, true));
        }
        self.codes.get(key).map(|values| (values, false))
    }

    /// Checks one string value of class `class` (empty: the field is absent, nothing to check).
    fn check_value(
        &self,
        force: &str,
        parent: Option<&str>,
        key: &str,
        class: Class,
        v: &str,
    ) -> Result<(), StringProblem> {
        let path = || match parent {
            Some(kind) => format!("{kind}.{key}"),
            None => key.to_string(),
        };
        let (max, setting) = self.limit(class);
        // Bytes first: a string of at most `max` bytes has at most `max` characters.
        if v.len() > max {
            let chars = v.chars().count();
            if chars > max {
                return Err(StringProblem::TooLong(TooLong {
                    field: path(),
                    chars,
                    max,
                    setting,
                }));
            }
        }
        if v.is_empty() {
            return Ok(());
        }
        match class {
            // Checked with the event's shape (`validate_referral_event`).
            Class::Id => Ok(()),
            Class::Reference if is_reference(v) => Ok(()),
            Class::Reference => Err(StringProblem::NotACode {
                field: path(),
                rule: REFERENCE_RULE,
            }),
            Class::Code if !is_code(v) => Err(StringProblem::NotACode {
                field: path(),
                rule: CODE_RULE,
            }),
            Class::Code => match self.listed(force, key) {
                // The setting is named (formatted) only for a refusal, not for every code read.
                Some((values, by_force)) if !values.contains(v) => Err(StringProblem::Unlisted {
                    field: path(),
                    setting: if by_force {
                        format!("validation.force_codes.{force}.{key}")
                    } else {
                        format!("validation.codes.{key}")
                    },
                }),
                _ => Ok(()),
            },
        }
    }
}

/// Why the walk stopped: a field that breaks a rule, or a shape this walk does not descend
/// into.
#[derive(Debug)]
enum Stop {
    Refused(StringProblem),
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
    /// The event's force, whose code lists apply.
    force: &'a str,
    parent: Option<&'a str>,
    key: &'a str,
}

struct WalkStruct<'a> {
    limits: &'a StringLimits,
    force: &'a str,
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
            force: self.force,
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
        let Some(class) = self.limits.class(self.parent, self.key) else {
            return Ok(());
        };
        self.limits
            .check_value(self.force, self.parent, self.key, class, v)
            .map_err(Stop::Refused)
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
            force: self.force,
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
            Err(StringProblem::TooLong(TooLong {
                field: "deviceSeized.deviceRef".into(),
                chars: 60 * 1024,
                max: 64,
                setting: "validation.max_ref_chars",
            }))
        );
        let long_area = event(Kind::ReferralReceived(ReferralReceived {
            area: "a".repeat(33),
            ..ReferralReceived::default()
        }));
        let Err(StringProblem::TooLong(err)) = limits.check(&long_area) else {
            panic!("a long area is too long");
        };
        assert_eq!(
            (err.field.as_str(), err.max, err.setting),
            ("referralReceived.area", 32, "validation.max_code_chars")
        );
        let mut long_source = ok.clone();
        long_source.source_system = "s".repeat(33);
        let Err(StringProblem::TooLong(err)) = limits.check(&long_source) else {
            panic!("a long source system is too long");
        };
        assert_eq!(err.field, "sourceSystem");
        // Characters, not bytes: 64 two-byte characters are not too long (but not a reference).
        let accents = event(Kind::DeviceSeized(DeviceSeized {
            device_ref: "é".repeat(64),
        }));
        assert!(matches!(
            limits.check(&accents),
            Err(StringProblem::NotACode { .. })
        ));
    }

    #[test]
    fn codes_and_references_are_not_free_text_and_errors_never_quote_the_value() {
        let limits = StringLimits::new(128, 64, 64);
        let received = |area: &str| {
            event(Kind::ReferralReceived(ReferralReceived {
                area: area.into(),
                team: "pvp-city".into(),
                referrer: "school".into(),
                ..ReferralReceived::default()
            }))
        };
        assert_eq!(limits.check(&received("city")), Ok(()));
        assert_eq!(limits.check(&received("")), Ok(()), "absent");
        for free_text in [
            "Jane Smith, 12 Acacia Avenue",
            "City",
            "-city",
            "city centre",
            "city\n",
            "jane@example.org",
        ] {
            let err = limits.check(&received(free_text)).unwrap_err();
            let StringProblem::NotACode { field, rule } = &err else {
                panic!("{err:?}");
            };
            assert_eq!(field, "referralReceived.area");
            assert!(!rule.contains(free_text) && !format!("{err:?}").contains(free_text));
        }
        let mut source = received("city");
        source.source_system = "Niche RMS".into();
        assert!(matches!(
            limits.check(&source),
            Err(StringProblem::NotACode { field, .. }) if field == "sourceSystem"
        ));
        let device = |r: &str| {
            event(Kind::DeviceSeized(DeviceSeized {
                device_ref: r.into(),
            }))
        };
        assert_eq!(limits.check(&device("DEV-01/2014:a_b.c")), Ok(()));
        assert!(matches!(
            limits.check(&device("John's phone")),
            Err(StringProblem::NotACode { field, .. }) if field == "deviceSeized.deviceRef"
        ));
    }

    #[test]
    fn configured_lists_apply_to_every_force_and_a_force_list_replaces_them() {
        let codes: CodeLists = [("area".to_string(), vec!["city".into(), "county".into()])].into();
        let force_codes = [(
            "nottinghamshire".to_string(),
            CodeLists::from([("team".to_string(), vec!["mash".to_string()])]),
        )]
        .into();
        let limits = StringLimits::with_codes(128, 64, 64, &codes, &force_codes);
        let received = |force: &str, area: &str, team: &str| {
            let mut e = event(Kind::ReferralReceived(ReferralReceived {
                area: area.into(),
                team: team.into(),
                ..ReferralReceived::default()
            }));
            e.force_id = force.into();
            e
        };
        assert_eq!(
            limits.check(&received("nottinghamshire", "city", "mash")),
            Ok(())
        );
        assert_eq!(
            limits.check(&received("nottinghamshire", "suburb", "mash")),
            Err(StringProblem::Unlisted {
                field: "referralReceived.area".into(),
                setting: "validation.codes.area".into(),
            })
        );
        assert_eq!(
            limits.check(&received("nottinghamshire", "city", "pvp")),
            Err(StringProblem::Unlisted {
                field: "referralReceived.team".into(),
                setting: "validation.force_codes.nottinghamshire.team".into(),
            })
        );
        // Another force has no team list: any code.
        assert_eq!(
            limits.check(&received("derbyshire", "county", "pvp")),
            Ok(())
        );
        assert!(limits.code_fields().contains("area"));
        assert!(limits.code_fields().contains("sourceSystem"));
        assert!(!limits.code_fields().contains("deviceRef"));
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
