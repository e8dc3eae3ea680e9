//! Bank-holiday data, read from the GOV.UK feed format.
//!
//! Holidays are data, not code: they change by proclamation (2020-05-08, 2022-06-03,
//! 2022-09-19, 2023-05-08) and differ between England & Wales, Scotland and Northern Ireland.
//! The engine therefore reads the format GOV.UK publishes at
//! <https://www.gov.uk/bank-holidays.json>:
//!
//! ```json
//! {"england-and-wales": {"division": "england-and-wales",
//!   "events": [{"title": "Christmas Day", "date": "2026-12-25", "notes": "", "bunting": true}]}}
//! ```
//!
//! A copy covering England & Wales for 2015 to 2030 ships in
//! `deploy/calendars/bank-holidays.json` and is compiled in ([`BUILTIN_FEED_JSON`]), so the
//! engine works with no files at all. Operators add files in the same format: by default a
//! division in a later file *extends* the earlier data (its dates are added), which is what a
//! freshly downloaded GOV.UK feed needs; a division object with `"replace": true` (an extension
//! GOV.UK never sets) *replaces* the earlier dates for that division, which is how a cancelled
//! or wrongly listed holiday is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jiff::civil::Date;
use serde::Deserialize;

/// The shipped England & Wales bank holidays, 2015 to 2030 (`deploy/calendars/bank-holidays.json`).
pub const BUILTIN_FEED_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/calendars/bank-holidays.json"
));

/// Bank holidays by division ("england-and-wales", "scotland", "northern-ireland", ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holidays {
    divisions: BTreeMap<String, BTreeSet<Date>>,
    /// Divisions whose dates replace, rather than extend, earlier data when merged.
    replacing: BTreeSet<String>,
}

/// Why holiday data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HolidaysError {
    /// The feed is not JSON in the expected shape, or a date is invalid.
    #[error(
        "bank-holiday feed{} is not in the GOV.UK format \
         ({{\"<division>\": {{\"division\": ..., \"events\": [{{\"date\": \"YYYY-MM-DD\", ...}}]}}}}): {source}",
        describe_path(path.as_deref())
    )]
    Format {
        /// The file, when the feed came from one.
        path: Option<PathBuf>,
        /// What the JSON parser reported.
        #[source]
        source: serde_json::Error,
    },
    /// A division's `division` field disagrees with its key.
    #[error(
        "bank-holiday feed{} lists division \"{field}\" under the key \"{key}\"; they must match",
        describe_path(path.as_deref())
    )]
    DivisionMismatch {
        /// The file, when the feed came from one.
        path: Option<PathBuf>,
        /// The object key.
        key: String,
        /// The `division` field.
        field: String,
    },
    /// The file could not be read.
    #[error("cannot read bank-holiday feed {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn describe_path(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct FeedDivision {
    #[serde(default)]
    division: Option<String>,
    events: Vec<FeedEvent>,
    #[serde(default)]
    replace: bool,
}

#[derive(Deserialize)]
struct FeedEvent {
    date: Date,
}

impl Holidays {
    /// The shipped England & Wales holidays ([`BUILTIN_FEED_JSON`]).
    ///
    /// # Errors
    ///
    /// [`HolidaysError::Format`] if the compiled-in file is malformed (a unit test makes sure
    /// it is not).
    pub fn builtin() -> Result<Holidays, HolidaysError> {
        Holidays::from_feed_json(BUILTIN_FEED_JSON.as_bytes())
    }

    /// Parses a feed in the GOV.UK format. Event fields other than `date` are ignored; a
    /// division object may carry `"replace": true` (see the [module docs](self)). Repeated
    /// dates are kept once.
    ///
    /// # Errors
    ///
    /// [`HolidaysError::Format`] for invalid JSON, a missing `events` list or an invalid
    /// date; [`HolidaysError::DivisionMismatch`] when a division's `division` field is not its
    /// key.
    pub fn from_feed_json(bytes: &[u8]) -> Result<Holidays, HolidaysError> {
        Holidays::parse(bytes, None)
    }

    /// Reads and parses a feed file.
    ///
    /// # Errors
    ///
    /// [`HolidaysError::Io`] when the file cannot be read, otherwise as
    /// [`from_feed_json`](Holidays::from_feed_json).
    pub fn from_feed_file(path: &Path) -> Result<Holidays, HolidaysError> {
        let bytes = std::fs::read(path).map_err(|source| HolidaysError::Io {
            path: path.to_owned(),
            source,
        })?;
        Holidays::parse(&bytes, Some(path))
    }

    fn parse(bytes: &[u8], path: Option<&Path>) -> Result<Holidays, HolidaysError> {
        let feed: BTreeMap<String, FeedDivision> =
            serde_json::from_slice(bytes).map_err(|source| HolidaysError::Format {
                path: path.map(Path::to_owned),
                source,
            })?;
        let mut holidays = Holidays::default();
        for (key, division) in feed {
            if let Some(field) = division.division {
                if field != key {
                    return Err(HolidaysError::DivisionMismatch {
                        path: path.map(Path::to_owned),
                        key,
                        field,
                    });
                }
            }
            if division.replace {
                holidays.replacing.insert(key.clone());
            }
            holidays
                .divisions
                .insert(key, division.events.into_iter().map(|e| e.date).collect());
        }
        Ok(holidays)
    }

    /// Merges a later source into this one: each of `overlay`'s divisions extends this one's
    /// dates, or replaces them when the overlay marked the division `"replace": true`.
    /// Divisions only in `self` are kept.
    pub fn merge(&mut self, overlay: Holidays) {
        for (division, dates) in overlay.divisions {
            if overlay.replacing.contains(&division) {
                self.divisions.insert(division, dates);
            } else {
                self.divisions.entry(division).or_default().extend(dates);
            }
        }
    }

    /// The holidays of one division, if it is known.
    #[must_use]
    pub fn division(&self, name: &str) -> Option<&BTreeSet<Date>> {
        self.divisions.get(name)
    }

    /// Known division names, in alphabetical order.
    pub fn division_names(&self) -> impl Iterator<Item = &str> {
        self.divisions.keys().map(String::as_str)
    }

    /// All divisions and their holidays.
    #[must_use]
    pub fn as_map(&self) -> &BTreeMap<String, BTreeSet<Date>> {
        &self.divisions
    }

    /// Consumes the data, giving the divisions and their holidays.
    #[must_use]
    pub fn into_map(self) -> BTreeMap<String, BTreeSet<Date>> {
        self.divisions
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jiff::civil::date;

    const EW: &str = "england-and-wales";

    fn builtin_ew() -> BTreeSet<Date> {
        Holidays::builtin().unwrap().division(EW).unwrap().clone()
    }

    #[test]
    fn shipped_feed_parses_and_covers_2015_to_2030_with_at_least_8_holidays_a_year() {
        let dates = builtin_ew();
        for year in 2015..=2030 {
            let count = dates.range(date(year, 1, 1)..=date(year, 12, 31)).count();
            assert!(count >= 8, "{year} has only {count} holidays");
        }
    }

    #[test]
    fn shipped_feed_has_no_duplicate_dates_and_all_fall_on_weekdays() {
        let raw: serde_json::Value = serde_json::from_str(BUILTIN_FEED_JSON).unwrap();
        let events = raw[EW]["events"].as_array().unwrap();
        let dates: Vec<Date> = events
            .iter()
            .map(|e| e["date"].as_str().unwrap().parse().unwrap())
            .collect();
        let unique: BTreeSet<Date> = dates.iter().copied().collect();
        assert_eq!(
            dates.len(),
            unique.len(),
            "duplicate dates in the shipped feed"
        );
        for d in &dates {
            assert!(
                !matches!(
                    d.weekday(),
                    jiff::civil::Weekday::Saturday | jiff::civil::Weekday::Sunday
                ),
                "{d} is a weekend"
            );
        }
        assert_eq!(raw[EW]["division"], EW);
        for field in ["title", "notes", "bunting"] {
            assert!(
                events.iter().all(|e| !e[field].is_null()),
                "{field} missing"
            );
        }
    }

    #[test]
    fn shipped_feed_has_the_known_substitute_and_one_off_days() {
        let dates = builtin_ew();
        let present = [
            date(2026, 12, 25),
            date(2026, 12, 28),
            date(2020, 5, 8),
            date(2022, 6, 2),
            date(2022, 6, 3),
            date(2022, 9, 19),
            date(2023, 5, 8),
            date(2027, 12, 27),
            date(2027, 12, 28),
            date(2022, 1, 3),
            date(2023, 1, 2),
            date(2016, 12, 27),
            date(2024, 3, 29),
            date(2024, 4, 1),
        ];
        for d in present {
            assert!(dates.contains(&d), "{d} should be a bank holiday");
        }
        let absent = [
            date(2020, 5, 4),
            date(2022, 5, 30),
            date(2026, 12, 26),
            date(2027, 12, 25),
        ];
        for d in absent {
            assert!(!dates.contains(&d), "{d} should not be a bank holiday");
        }
    }

    #[test]
    fn merging_a_feed_extends_a_division_and_adds_new_ones() {
        let mut holidays = Holidays::builtin().unwrap();
        let extra = Holidays::from_feed_json(
            br#"{"england-and-wales": {"division": "england-and-wales", "events": [
                    {"title": "Extra", "date": "2031-01-01", "notes": "", "bunting": true}]},
                 "scotland": {"division": "scotland", "events": [
                    {"title": "St Andrew's Day", "date": "2026-11-30", "notes": "", "bunting": true}]}}"#,
        )
        .unwrap();
        holidays.merge(extra);
        let ew = holidays.division(EW).unwrap();
        assert!(ew.contains(&date(2031, 1, 1)));
        assert!(ew.contains(&date(2026, 12, 25)), "built-in dates are kept");
        assert_eq!(
            holidays.division_names().collect::<Vec<_>>(),
            ["england-and-wales", "scotland"]
        );
    }

    #[test]
    fn merging_a_division_marked_replace_replaces_its_dates() {
        let mut holidays = Holidays::builtin().unwrap();
        let replacement = Holidays::from_feed_json(
            br#"{"england-and-wales": {"division": "england-and-wales", "replace": true,
                 "events": [{"date": "2026-12-25"}]}}"#,
        )
        .unwrap();
        holidays.merge(replacement);
        assert_eq!(
            holidays
                .division(EW)
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [date(2026, 12, 25)]
        );
    }

    #[test]
    fn malformed_feeds_are_rejected_with_the_expected_format_in_the_message() {
        for bad in [
            &b"not json"[..],
            br#"{"england-and-wales": {"division": "england-and-wales"}}"#,
            br#"{"england-and-wales": {"events": [{"date": "2026-02-30"}]}}"#,
            br#"{"england-and-wales": {"events": [{"date": "25/12/2026"}]}}"#,
        ] {
            let err = Holidays::from_feed_json(bad).unwrap_err();
            assert!(matches!(err, HolidaysError::Format { .. }), "{err:?}");
            assert!(err.to_string().contains("GOV.UK format"), "{err}");
        }
        let err = Holidays::from_feed_json(
            br#"{"england-and-wales": {"division": "scotland", "events": []}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, HolidaysError::DivisionMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_feed_file_names_the_path() {
        let err =
            Holidays::from_feed_file(Path::new("/nonexistent/bank-holidays.json")).unwrap_err();
        assert!(matches!(err, HolidaysError::Io { .. }));
        assert!(
            err.to_string().contains("/nonexistent/bank-holidays.json"),
            "{err}"
        );
    }
}
