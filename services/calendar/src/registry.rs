//! The named calendars rules can use, built from holiday and school-term data.
//!
//! Rules name a calendar ("24x7", "england-and-wales", "england-and-wales-schools"); forces in
//! Scotland, Northern Ireland or with their own local-authority term dates need other
//! calendars. [`Calendars`] builds them all from data:
//!
//! - `"24x7"` always exists;
//! - one [`Calendar::WorkingDays`] per bank-holiday division, named after the division;
//! - one [`Calendar::SchoolDays`] per `[[calendar]]` in the school-terms file
//!   ([`SchoolTerms`]), using its division's bank holidays.
//!
//! The shipped data (`deploy/calendars/bank-holidays.json` and
//! `deploy/calendars/school-terms.toml`) is compiled in, so [`Calendars::builtin`] works with no
//! files; [`Calendars::load`] layers operators' files on top of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::civil::{Date, Time};
use serde::Deserialize;

use crate::calendar::{Calendar, DEFAULT_SCHOOL_START_OF_DAY, TWENTY_FOUR_SEVEN};
use crate::holidays::{Holidays, HolidaysError};

/// The shipped default school term closures (`deploy/calendars/school-terms.toml`).
pub const BUILTIN_SCHOOL_TERMS_TOML: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/calendars/school-terms.toml"
));

/// One school calendar as configured: which bank holidays apply, when the school day starts,
/// and when schools are closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchoolCalendarSpec {
    /// Calendar name rules refer to.
    pub name: String,
    /// Bank-holiday division whose holidays apply.
    pub division: String,
    /// Local (Europe/London) start of the school day.
    pub start_of_day: Time,
    /// Inclusive `(first, last)` closure ranges.
    pub closures: Vec<(Date, Date)>,
}

/// School calendars read from a school-terms TOML file:
///
/// ```toml
/// [[calendar]]
/// name = "england-and-wales-schools"
/// division = "england-and-wales"
/// start_of_day = "08:30"          # optional, default 08:30
/// closures = [["2026-12-19", "2027-01-03"], ["2027-02-13", "2027-02-21"]]
/// ```
///
/// Dates and times may be quoted strings or TOML local dates and times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchoolTerms {
    /// The calendars, in file order.
    pub calendars: Vec<SchoolCalendarSpec>,
}

/// Why school term data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchoolTermsError {
    /// Not valid TOML, or not the expected shape.
    #[error("school terms{}: {source}", describe_path(path.as_deref()))]
    Toml {
        /// The file, when the data came from one.
        path: Option<PathBuf>,
        /// What the TOML parser reported.
        #[source]
        source: toml::de::Error,
    },
    /// A value is not a valid date or time, or a calendar is inconsistent.
    #[error("school terms{}: calendar \"{calendar}\": {problem}", describe_path(path.as_deref()))]
    Invalid {
        /// The file, when the data came from one.
        path: Option<PathBuf>,
        /// The calendar's name.
        calendar: String,
        /// What is wrong.
        problem: String,
    },
    /// The file could not be read.
    #[error("cannot read school terms {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a set of calendars could not be built, or a calendar was not found.
#[derive(Debug, thiserror::Error)]
pub enum CalendarsError {
    /// Bank-holiday data could not be loaded.
    #[error(transparent)]
    Holidays(#[from] HolidaysError),
    /// School term data could not be loaded.
    #[error(transparent)]
    SchoolTerms(#[from] SchoolTermsError),
    /// A school calendar refers to a division with no holiday data.
    #[error(
        "school calendar \"{calendar}\" uses bank-holiday division \"{division}\", which no \
         holiday feed provides; known divisions: {known}"
    )]
    UnknownDivision {
        /// The school calendar.
        calendar: String,
        /// The division it named.
        division: String,
        /// Comma-separated known divisions.
        known: String,
    },
    /// Two calendars would have the same name.
    #[error(
        "calendar name \"{name}\" is used twice (\"24x7\" and each holiday division's name are \
         taken); give the school calendar a different name"
    )]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A rule asked for a calendar that does not exist.
    #[error("unknown calendar \"{name}\"; known calendars: {known}")]
    UnknownCalendar {
        /// The name asked for.
        name: String,
        /// Comma-separated known calendar names.
        known: String,
    },
}

fn describe_path(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchoolTerms {
    #[serde(default)]
    calendar: Vec<RawSchoolCalendar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchoolCalendar {
    name: String,
    division: String,
    #[serde(default)]
    start_of_day: Option<toml::Value>,
    #[serde(default)]
    closures: Vec<[toml::Value; 2]>,
}

impl SchoolTerms {
    /// The shipped default closures ([`BUILTIN_SCHOOL_TERMS_TOML`]): generic England term
    /// dates for 2025-26 to 2027-28, to be replaced by each local authority's published
    /// dates.
    ///
    /// # Errors
    ///
    /// As [`from_toml_str`](SchoolTerms::from_toml_str), if the compiled-in file were
    /// malformed (a unit test makes sure it is not).
    pub fn builtin() -> Result<SchoolTerms, SchoolTermsError> {
        SchoolTerms::from_toml_str(BUILTIN_SCHOOL_TERMS_TOML)
    }

    /// Parses school terms from TOML text.
    ///
    /// # Errors
    ///
    /// [`SchoolTermsError::Toml`] for invalid TOML, missing or unknown keys;
    /// [`SchoolTermsError::Invalid`] for an empty or repeated name, an invalid date or time,
    /// or a closure that ends before it starts.
    pub fn from_toml_str(text: &str) -> Result<SchoolTerms, SchoolTermsError> {
        SchoolTerms::parse(text, None)
    }

    /// Reads and parses a school-terms file.
    ///
    /// # Errors
    ///
    /// [`SchoolTermsError::Io`] when the file cannot be read, otherwise as
    /// [`from_toml_str`](SchoolTerms::from_toml_str).
    pub fn from_file(path: &Path) -> Result<SchoolTerms, SchoolTermsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchoolTermsError::Io {
            path: path.to_owned(),
            source,
        })?;
        SchoolTerms::parse(&text, Some(path))
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<SchoolTerms, SchoolTermsError> {
        let raw: RawSchoolTerms =
            toml::from_str(text).map_err(|source| SchoolTermsError::Toml {
                path: path.map(Path::to_owned),
                source,
            })?;
        let mut calendars: Vec<SchoolCalendarSpec> = Vec::with_capacity(raw.calendar.len());
        for entry in raw.calendar {
            let invalid = |problem: String| SchoolTermsError::Invalid {
                path: path.map(Path::to_owned),
                calendar: entry.name.clone(),
                problem,
            };
            if entry.name.trim().is_empty() {
                return Err(invalid("the name is empty".to_owned()));
            }
            if calendars.iter().any(|c| c.name == entry.name) {
                return Err(invalid(
                    "the name is used by an earlier calendar".to_owned(),
                ));
            }
            let start_of_day = match &entry.start_of_day {
                None => DEFAULT_SCHOOL_START_OF_DAY,
                Some(value) => toml_time(value).ok_or_else(|| {
                    invalid(format!(
                        "start_of_day {value} is not a time of day such as \"08:30\""
                    ))
                })?,
            };
            let mut closures = Vec::with_capacity(entry.closures.len());
            for [first, last] in &entry.closures {
                let date = |value: &toml::Value| {
                    toml_date(value).ok_or_else(|| {
                        invalid(format!(
                            "closure date {value} is not a date such as \"2026-12-19\""
                        ))
                    })
                };
                let (first, last) = (date(first)?, date(last)?);
                if last < first {
                    return Err(invalid(format!(
                        "closure [{first}, {last}] ends before it starts"
                    )));
                }
                closures.push((first, last));
            }
            closures.sort_unstable();
            calendars.push(SchoolCalendarSpec {
                name: entry.name,
                division: entry.division,
                start_of_day,
                closures,
            });
        }
        Ok(SchoolTerms { calendars })
    }

    /// Merges a later source into this one: a calendar with the same name replaces the
    /// earlier one; new names are added.
    pub fn merge(&mut self, overlay: SchoolTerms) {
        for spec in overlay.calendars {
            match self.calendars.iter_mut().find(|c| c.name == spec.name) {
                Some(existing) => *existing = spec,
                None => self.calendars.push(spec),
            }
        }
    }
}

fn toml_date(value: &toml::Value) -> Option<Date> {
    match value {
        toml::Value::String(text) => text.trim().parse().ok(),
        toml::Value::Datetime(dt) if dt.time.is_none() && dt.offset.is_none() => {
            let d = dt.date?;
            Date::new(
                i16::try_from(d.year).ok()?,
                i8::try_from(d.month).ok()?,
                i8::try_from(d.day).ok()?,
            )
            .ok()
        }
        _ => None,
    }
}

fn toml_time(value: &toml::Value) -> Option<Time> {
    match value {
        toml::Value::String(text) => text.trim().parse().ok(),
        toml::Value::Datetime(dt) if dt.date.is_none() && dt.offset.is_none() => {
            let t = dt.time?;
            Time::new(
                i8::try_from(t.hour).ok()?,
                i8::try_from(t.minute).ok()?,
                i8::try_from(t.second).ok()?,
                i32::try_from(t.nanosecond).ok()?,
            )
            .ok()
        }
        _ => None,
    }
}

/// The calendars available to rules, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendars {
    by_name: BTreeMap<String, Calendar>,
}

impl Calendars {
    /// The calendars from the shipped data alone: `"24x7"`, `"england-and-wales"` (working
    /// days) and `"england-and-wales-schools"` (school days with the default closures).
    ///
    /// # Panics
    ///
    /// Only if the data compiled into this crate is malformed, which the unit test
    /// `builtin_calendars_are_24x7_working_days_and_schools` rules out; use
    /// [`try_builtin`](Calendars::try_builtin) to handle that case as an error instead.
    #[must_use]
    pub fn builtin() -> Calendars {
        match Calendars::try_builtin() {
            Ok(calendars) => calendars,
            Err(err) => {
                panic!("the calendar data compiled into safeclock-calendar is invalid: {err}")
            }
        }
    }

    /// As [`builtin`](Calendars::builtin), reporting malformed compiled-in data as an error.
    ///
    /// # Errors
    ///
    /// [`CalendarsError`] if the compiled-in holiday or school-term data does not load.
    pub fn try_builtin() -> Result<Calendars, CalendarsError> {
        Calendars::from_data(&Holidays::builtin()?, &SchoolTerms::builtin()?)
    }

    /// The shipped data with operators' files layered on top.
    ///
    /// Each feed in `feed_paths` (GOV.UK format) is merged in order over the built-in
    /// holidays, extending each division it lists, or replacing it when marked
    /// `"replace": true` (see [`Holidays::merge`]). When `school_terms` is given, each of its
    /// calendars replaces the built-in calendar of the same name or is added.
    ///
    /// # Errors
    ///
    /// [`CalendarsError`] when a file cannot be read or parsed, a school calendar names an
    /// unknown division, or two calendars share a name.
    pub fn load<P: AsRef<Path>>(
        feed_paths: &[P],
        school_terms: Option<&Path>,
    ) -> Result<Calendars, CalendarsError> {
        let mut holidays = Holidays::builtin()?;
        for path in feed_paths {
            holidays.merge(Holidays::from_feed_file(path.as_ref())?);
        }
        let mut terms = SchoolTerms::builtin()?;
        if let Some(path) = school_terms {
            terms.merge(SchoolTerms::from_file(path)?);
        }
        Calendars::from_data(&holidays, &terms)
    }

    /// Builds the calendars from already loaded data: `"24x7"`, one working-days calendar per
    /// holiday division, and one school calendar per school-terms entry.
    ///
    /// # Errors
    ///
    /// [`CalendarsError::UnknownDivision`] when a school calendar's division has no holiday
    /// data; [`CalendarsError::DuplicateName`] when a school calendar is named "24x7" or
    /// after a division.
    pub fn from_data(
        holidays: &Holidays,
        terms: &SchoolTerms,
    ) -> Result<Calendars, CalendarsError> {
        let mut by_name = BTreeMap::new();
        by_name.insert(TWENTY_FOUR_SEVEN.to_owned(), Calendar::TwentyFourSeven);
        for (division, dates) in holidays.as_map() {
            if by_name.contains_key(division) {
                return Err(CalendarsError::DuplicateName {
                    name: division.clone(),
                });
            }
            by_name.insert(
                division.clone(),
                Calendar::WorkingDays {
                    name: division.clone(),
                    holidays: dates.clone(),
                },
            );
        }
        for spec in &terms.calendars {
            let dates = holidays.division(&spec.division).ok_or_else(|| {
                CalendarsError::UnknownDivision {
                    calendar: spec.name.clone(),
                    division: spec.division.clone(),
                    known: holidays.division_names().collect::<Vec<_>>().join(", "),
                }
            })?;
            if by_name.contains_key(&spec.name) {
                return Err(CalendarsError::DuplicateName {
                    name: spec.name.clone(),
                });
            }
            by_name.insert(
                spec.name.clone(),
                Calendar::SchoolDays {
                    name: spec.name.clone(),
                    holidays: dates.clone(),
                    closures: spec.closures.clone(),
                    start_of_day: spec.start_of_day,
                },
            );
        }
        Ok(Calendars { by_name })
    }

    /// The calendar called `name`, if there is one.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Calendar> {
        self.by_name.get(name)
    }

    /// The calendar called `name`.
    ///
    /// # Errors
    ///
    /// [`CalendarsError::UnknownCalendar`], listing the known names, when there is none.
    pub fn require(&self, name: &str) -> Result<&Calendar, CalendarsError> {
        self.get(name)
            .ok_or_else(|| CalendarsError::UnknownCalendar {
                name: name.to_owned(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })
    }

    /// The calendar names, in alphabetical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jiff::civil::{date, time};

    #[test]
    fn builtin_calendars_are_24x7_working_days_and_schools() {
        let calendars = Calendars::try_builtin().unwrap();
        assert_eq!(
            calendars.names().collect::<Vec<_>>(),
            ["24x7", "england-and-wales", "england-and-wales-schools"]
        );
        assert_eq!(calendars.get("24x7"), Some(&Calendar::TwentyFourSeven));
        assert!(matches!(
            calendars.get("england-and-wales"),
            Some(Calendar::WorkingDays { .. })
        ));
        let Some(Calendar::SchoolDays {
            start_of_day,
            closures,
            holidays,
            ..
        }) = calendars.get("england-and-wales-schools")
        else {
            panic!("expected the school calendar");
        };
        assert_eq!(*start_of_day, time(8, 30, 0, 0));
        assert!(closures.contains(&(date(2026, 12, 19), date(2027, 1, 3))));
        assert!(holidays.contains(&date(2026, 12, 25)));
        assert_eq!(calendars, Calendars::builtin());
    }

    #[test]
    fn shipped_school_terms_cover_every_break_of_2025_26_to_2027_28() {
        let terms = SchoolTerms::builtin().unwrap();
        let [spec] = terms.calendars.as_slice() else {
            panic!("expected one calendar");
        };
        assert_eq!(spec.division, "england-and-wales");
        // Six breaks a year for three academic years, in order and not overlapping.
        assert_eq!(spec.closures.len(), 18);
        for pair in spec.closures.windows(2) {
            assert!(pair[0].1 < pair[1].0, "{pair:?} overlap");
        }
        assert!(spec.closures[0].0 >= date(2025, 9, 1));
        assert!(spec.closures[17].1 <= date(2028, 9, 30));
    }

    #[test]
    fn unknown_calendar_error_lists_known_names() {
        let err = Calendars::builtin().require("scotland").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"scotland\""), "{text}");
        assert!(
            text.contains("24x7, england-and-wales, england-and-wales-schools"),
            "{text}"
        );
        assert!(Calendars::builtin().get("scotland").is_none());
    }

    #[test]
    fn school_terms_accept_strings_and_toml_dates_and_default_the_start_of_day() {
        let terms = SchoolTerms::from_toml_str(
            r#"
            [[calendar]]
            name = "kent-schools"
            division = "england-and-wales"
            closures = [[2026-10-26, 2026-10-30], ["2026-12-21", "2027-01-01"]]

            [[calendar]]
            name = "late-start"
            division = "england-and-wales"
            start_of_day = 09:00:00
            "#,
        )
        .unwrap();
        assert_eq!(
            terms.calendars[0],
            SchoolCalendarSpec {
                name: "kent-schools".to_owned(),
                division: "england-and-wales".to_owned(),
                start_of_day: time(8, 30, 0, 0),
                closures: vec![
                    (date(2026, 10, 26), date(2026, 10, 30)),
                    (date(2026, 12, 21), date(2027, 1, 1)),
                ],
            }
        );
        assert_eq!(terms.calendars[1].start_of_day, time(9, 0, 0, 0));
        assert!(terms.calendars[1].closures.is_empty());
    }

    #[test]
    fn invalid_school_terms_are_rejected_with_the_calendar_named() {
        let cases = [
            (
                r#"[[calendar]]
                name = "a"
                division = "england-and-wales"
                closures = [["2026-12-21", "2026-12-01"]]"#,
                "ends before it starts",
            ),
            (
                r#"[[calendar]]
                name = "a"
                division = "england-and-wales"
                closures = [["2026-02-30", "2026-03-01"]]"#,
                "not a date",
            ),
            (
                r#"[[calendar]]
                name = "a"
                division = "england-and-wales"
                start_of_day = "half eight""#,
                "not a time of day",
            ),
            (
                r#"[[calendar]]
                name = "a"
                division = "england-and-wales"
                [[calendar]]
                name = "a"
                division = "england-and-wales""#,
                "used by an earlier calendar",
            ),
        ];
        for (text, expected) in cases {
            let err = SchoolTerms::from_toml_str(text).unwrap_err();
            assert!(matches!(err, SchoolTermsError::Invalid { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("calendar \"a\""), "{message}");
        }
        // Misspelt keys are caught rather than silently ignored.
        let err = SchoolTerms::from_toml_str(
            "[[calendar]]\nname = \"a\"\ndivision = \"england-and-wales\"\nclosure = []\n",
        )
        .unwrap_err();
        assert!(matches!(err, SchoolTermsError::Toml { .. }), "{err:?}");
    }

    #[test]
    fn school_calendar_with_an_unknown_division_is_rejected() {
        let terms = SchoolTerms::from_toml_str(
            "[[calendar]]\nname = \"glasgow-schools\"\ndivision = \"scotland\"\n",
        )
        .unwrap();
        let err = Calendars::from_data(&Holidays::builtin().unwrap(), &terms).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"scotland\""), "{message}");
        assert!(
            message.contains("known divisions: england-and-wales"),
            "{message}"
        );
    }

    #[test]
    fn school_calendar_cannot_take_a_reserved_name() {
        for name in ["24x7", "england-and-wales"] {
            let terms = SchoolTerms::from_toml_str(&format!(
                "[[calendar]]\nname = \"{name}\"\ndivision = \"england-and-wales\"\n"
            ))
            .unwrap();
            let err = Calendars::from_data(&Holidays::builtin().unwrap(), &terms).unwrap_err();
            assert!(
                matches!(err, CalendarsError::DuplicateName { .. }),
                "{err:?}"
            );
        }
    }

    fn scratch_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("safeclock-calendar-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_layers_operator_files_over_the_builtin_data() {
        let dir = scratch_dir("load");
        let feed = dir.join("bank-holidays.json");
        std::fs::write(
            &feed,
            r#"{"scotland": {"division": "scotland", "events": [
                   {"title": "St Andrew's Day", "date": "2026-11-30", "notes": "", "bunting": true}]},
                "england-and-wales": {"division": "england-and-wales", "events": [
                   {"title": "New Year's Day", "date": "2031-01-01", "notes": "", "bunting": true}]}}"#,
        )
        .unwrap();
        let terms = dir.join("school-terms.toml");
        std::fs::write(
            &terms,
            r#"
            [[calendar]]
            name = "england-and-wales-schools"
            division = "england-and-wales"
            start_of_day = "08:45"
            closures = [["2026-12-19", "2027-01-05"]]

            [[calendar]]
            name = "glasgow-schools"
            division = "scotland"
            "#,
        )
        .unwrap();

        let calendars = Calendars::load(&[&feed], Some(&terms)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(
            calendars.names().collect::<Vec<_>>(),
            [
                "24x7",
                "england-and-wales",
                "england-and-wales-schools",
                "glasgow-schools",
                "scotland"
            ]
        );
        let ew = calendars.get("england-and-wales").unwrap();
        assert!(!ew.is_working_day(date(2031, 1, 1)), "extended");
        assert!(!ew.is_working_day(date(2026, 12, 25)), "built-in kept");
        assert!(!calendars
            .get("scotland")
            .unwrap()
            .is_working_day(date(2026, 11, 30)));
        let Some(Calendar::SchoolDays {
            start_of_day,
            closures,
            ..
        }) = calendars.get("england-and-wales-schools")
        else {
            panic!("expected the school calendar");
        };
        assert_eq!(
            *start_of_day,
            time(8, 45, 0, 0),
            "operator's calendar replaced the default"
        );
        assert_eq!(closures, &[(date(2026, 12, 19), date(2027, 1, 5))]);
    }

    #[test]
    fn load_with_no_files_is_the_builtin_data() {
        let none: &[&Path] = &[];
        assert_eq!(Calendars::load(none, None).unwrap(), Calendars::builtin());
    }

    #[test]
    fn load_reports_missing_files_with_their_path() {
        let err = Calendars::load(&[Path::new("/nonexistent/feed.json")], None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/feed.json"), "{err}");
        let none: &[&Path] = &[];
        let err = Calendars::load(none, Some(Path::new("/nonexistent/terms.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/terms.toml"), "{err}");
    }
}
