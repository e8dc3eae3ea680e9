//! Deadlines for safeguarding timescales.
//!
//! Every timescale in the rule set is "clock start -> clock stop: target", and the target is
//! written in one of several currencies: exact hours and minutes (PACE reviews, police
//! protection), calendar days, weeks and months (device examination, review conferences),
//! working days (conferences, assessments, the Victims' Code) and "before the start of the next
//! school day" (Operation Encompass). Getting the deadline wrong by a day, or by an hour at a
//! clock change, misreports a force's performance on a child's case, so this crate is the one
//! place those conventions are implemented (see `shared/domain/timescales.md`, "Working days
//! and calendars"):
//!
//! - [`Target`] parses and prints the target text used in rule files;
//! - [`Calendar`] computes [`deadline`](Calendar::deadline)s and elapsed
//!   [`working_days_between`](Calendar::working_days_between) two instants, in Europe/London,
//!   with the UK legal reading of "within N working days";
//! - [`Holidays`] reads bank holidays in the GOV.UK feed format and [`SchoolTerms`] reads school
//!   closures from TOML, because holidays and term dates are data that operators maintain;
//! - [`Calendars`] names the calendars rules can use, built from the shipped data (compiled in)
//!   and any operator files layered on top.
//!
//! ```
//! use safeclock_calendar::{Calendars, Target};
//!
//! let calendars = Calendars::builtin();
//! let working_days = calendars.require("england-and-wales")?;
//! let start: jiff::Timestamp = "2026-12-23T16:00:00Z".parse()?;
//! let deadline = working_days.deadline(start, &Target::parse("2 working days")?)?;
//! // 25 and 28 December 2026 are bank holidays: Thu 24, then Tue 29 December.
//! assert_eq!(deadline, "2026-12-30T00:00:00Z".parse()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod calendar;
pub mod holidays;
pub mod registry;
pub mod target;

use std::sync::LazyLock;

use jiff::tz::TimeZone;

pub use calendar::{
    Calendar, CalendarError, DEFAULT_SCHOOL_START_OF_DAY, MAX_SEARCH_DAYS, TWENTY_FOUR_SEVEN,
};
pub use holidays::{Holidays, HolidaysError, BUILTIN_FEED_JSON};
pub use registry::{
    Calendars, CalendarsError, SchoolCalendarSpec, SchoolTerms, SchoolTermsError,
    BUILTIN_SCHOOL_TERMS_TOML,
};
pub use target::{CivilUnit, Target, TargetError, ACCEPTED_FORMS};

/// The POSIX rule for UK civil time (GMT, BST from 01:00 UTC on the last Sunday of March to
/// 01:00 UTC on the last Sunday of October), correct for every date since 1996.
const UK_POSIX_RULE: &str = "GMT0BST,M3.5.0/1,M10.5.0";

static LONDON: LazyLock<TimeZone> = LazyLock::new(|| {
    TimeZone::get("Europe/London")
        .or_else(|_| TimeZone::posix(UK_POSIX_RULE))
        .unwrap_or(TimeZone::UTC)
});

/// The Europe/London time zone, in which all civil reasoning happens.
///
/// It comes from the time-zone database compiled into the binary (jiff's
/// `tzdb-bundle-always`), so it does not depend on the host's `/usr/share/zoneinfo`. Should
/// that lookup ever fail, the equivalent POSIX rule for current UK clock changes is used; the
/// unit test `london_is_the_iana_zone` checks that the database entry is the one in use.
#[must_use]
pub fn london() -> TimeZone {
    LONDON.clone()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn london_is_the_iana_zone() {
        assert_eq!(london().iana_name(), Some("Europe/London"));
    }

    #[test]
    fn uk_posix_rule_matches_the_iana_zone_since_1996() {
        let posix = TimeZone::posix(UK_POSIX_RULE).unwrap();
        let tz = london();
        let mut t: jiff::Timestamp = "1996-01-01T00:00:00Z".parse().unwrap();
        let end: jiff::Timestamp = "2040-01-01T00:00:00Z".parse().unwrap();
        while t < end {
            assert_eq!(posix.to_offset(t), tz.to_offset(t), "{t}");
            t = t.checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        }
    }
}
