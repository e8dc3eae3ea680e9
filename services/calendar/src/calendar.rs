//! Calendars: turning a clock start and a [`Target`] into a deadline.
//!
//! A deadline depends on more than the target: "15 working days" needs to know which days are
//! bank holidays, and "next school day" needs term dates. A [`Calendar`] carries that data, and
//! [`Calendar::deadline`] is the single implementation of the product's conventions, so every
//! service computes the same instant for the same clock.
//!
//! All civil reasoning happens in Europe/London ([`london`]): instants are stored as UTC
//! [`Timestamp`]s, converted to London dates and wall-clock times to apply the rules, and
//! converted back. Searches over days are bounded by [`MAX_SEARCH_DAYS`], so bad holiday or
//! closure data produces an error rather than an endless loop.

use std::collections::BTreeSet;
use std::num::{NonZeroU32, NonZeroU64};

use jiff::civil::{Date, Time, Weekday};
use jiff::{SignedDuration, Timestamp};

use crate::london;
use crate::target::{CivilUnit, Target};

/// The name of the [`Calendar::TwentyFourSeven`] calendar.
pub const TWENTY_FOUR_SEVEN: &str = "24x7";

/// Default local start of the school day (08:30 Europe/London).
pub const DEFAULT_SCHOOL_START_OF_DAY: Time = jiff::civil::time(8, 30, 0, 0);

/// The longest run of calendar days a deadline search walks before giving up (about ten
/// years). A working-day target therefore has a practical maximum of roughly 2,500 working
/// days, far above any safeguarding timescale.
pub const MAX_SEARCH_DAYS: i64 = 3660;

/// A set of rules for which days count, used to compute deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Calendar {
    /// Every day counts. Exact durations and calendar periods behave as on any calendar;
    /// working days are every calendar day (so "1 working day" from any time on Monday is
    /// 00:00 on Wednesday); there are no school days.
    TwentyFourSeven,
    /// Monday to Friday, excluding bank holidays.
    WorkingDays {
        /// Calendar name, usually the holiday division ("england-and-wales").
        name: String,
        /// Bank holidays (dates in Europe/London).
        holidays: BTreeSet<Date>,
    },
    /// Working days for working-day targets, plus school days (working days outside school
    /// closures) for "next school day".
    SchoolDays {
        /// Calendar name ("england-and-wales-schools").
        name: String,
        /// Bank holidays (dates in Europe/London).
        holidays: BTreeSet<Date>,
        /// School holidays as inclusive `(first, last)` date ranges. They do not affect
        /// working days.
        closures: Vec<(Date, Date)>,
        /// Local start of the school day; [`DEFAULT_SCHOOL_START_OF_DAY`] unless configured.
        start_of_day: Time,
    },
}

/// Why a deadline could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// The deadline would fall outside the range of dates jiff can represent.
    #[error("the deadline for \"{target}\" from {start} falls outside the supported date range")]
    OutOfRange {
        /// The target being computed.
        target: Target,
        /// The clock start.
        start: Timestamp,
    },
    /// "next school day" was asked of a calendar without school days.
    #[error(
        "calendar \"{calendar}\" has no school days, so \"next school day\" cannot be computed \
         on it; use a school-days calendar such as \"england-and-wales-schools\""
    )]
    NoSchoolDays {
        /// The calendar's name.
        calendar: String,
    },
    /// The search for the deadline walked [`MAX_SEARCH_DAYS`] days without finishing.
    #[error(
        "no deadline for \"{target}\" within {days} days of {start_date} on calendar \
         \"{calendar}\": the target is too long or the calendar's holiday or closure data \
         leaves too few {kind}"
    )]
    SearchExhausted {
        /// The calendar's name.
        calendar: String,
        /// The target being computed.
        target: Target,
        /// The London date the clock started on.
        start_date: Date,
        /// How many days were searched.
        days: i64,
        /// "working days" or "school days".
        kind: &'static str,
    },
}

impl Calendar {
    /// The calendar's name, as rules refer to it ("24x7", "england-and-wales", ...).
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Calendar::TwentyFourSeven => TWENTY_FOUR_SEVEN,
            Calendar::WorkingDays { name, .. } | Calendar::SchoolDays { name, .. } => name,
        }
    }

    /// Whether `date` (a Europe/London date) is a working day: every day on a
    /// [`TwentyFourSeven`](Calendar::TwentyFourSeven) calendar; otherwise Monday to Friday
    /// and not a bank holiday. School closures do not matter.
    #[must_use]
    pub fn is_working_day(&self, date: Date) -> bool {
        match self {
            Calendar::TwentyFourSeven => true,
            Calendar::WorkingDays { holidays, .. } | Calendar::SchoolDays { holidays, .. } => {
                is_weekday(date) && !holidays.contains(&date)
            }
        }
    }

    /// Whether `date` is a school day: a working day outside every school closure. Always
    /// `false` on calendars without school data.
    #[must_use]
    pub fn is_school_day(&self, date: Date) -> bool {
        match self {
            Calendar::SchoolDays { closures, .. } => {
                self.is_working_day(date)
                    && !closures
                        .iter()
                        .any(|&(first, last)| first <= date && date <= last)
            }
            Calendar::TwentyFourSeven | Calendar::WorkingDays { .. } => false,
        }
    }

    /// The instant by which a clock that started at `start` must stop to meet `target`.
    ///
    /// - **Exact durations** are added to `start` as elapsed time, on any calendar.
    /// - **Calendar periods** are added on the Europe/London wall clock, on any calendar:
    ///   "3 days" from 10:00 GMT ends at 10:00 BST if the clocks went forward in between. If
    ///   the resulting wall-clock time does not exist (it falls in the spring-forward gap) the
    ///   later time is used; if it occurs twice, the earlier.
    /// - **N working days** follow the UK legal reading of "within N working days"
    ///   (FOIA's "Nth working day following the date of receipt"): the London date on which
    ///   the clock starts never counts, whether or not it is a working day; the deadline is
    ///   the end of the Nth working day after that date, i.e. 00:00 Europe/London at the start
    ///   of the next calendar day. See [`is_working_day`](Calendar::is_working_day) for what
    ///   counts on each calendar.
    /// - **Next school day** is the start of the school day on the first school day whose
    ///   start is strictly after `start`: an incident at 07:00 on a school day is due at 08:30
    ///   that day, one at 09:00 at 08:30 on the next school day. Weekends, bank holidays and
    ///   school closures are skipped. Only [`SchoolDays`](Calendar::SchoolDays) calendars
    ///   have school days.
    ///
    /// # Errors
    ///
    /// - [`CalendarError::NoSchoolDays`] for "next school day" on a calendar without school
    ///   days;
    /// - [`CalendarError::SearchExhausted`] when no deadline is found within
    ///   [`MAX_SEARCH_DAYS`] days (a very long working-day target, or data that closes every
    ///   day);
    /// - [`CalendarError::OutOfRange`] when the deadline is beyond the dates jiff supports.
    pub fn deadline(&self, start: Timestamp, target: &Target) -> Result<Timestamp, CalendarError> {
        let out_of_range = || CalendarError::OutOfRange {
            target: *target,
            start,
        };
        match *target {
            Target::Exact { seconds } => exact_deadline(start, seconds).ok_or_else(out_of_range),
            Target::Civil { count, unit } => {
                civil_deadline(start, count, unit).map_err(|_| out_of_range())
            }
            Target::WorkingDays(n) => self.working_day_deadline(start, n, target),
            Target::NextSchoolDay => self.next_school_day(start, target),
        }
    }

    /// The number of whole working days elapsed between `start` and `end`, counted the same
    /// way as working-day deadlines: the working days strictly after `start`'s London date and
    /// strictly before `end`'s London date. A working day counts once the midnight that ends
    /// it has passed, so for every `n`,
    /// `working_days_between(start, deadline(start, n working days)) == n`.
    ///
    /// Never negative: 0 when `end` is on or before the day after `start`'s date.
    #[must_use]
    pub fn working_days_between(&self, start: Timestamp, end: Timestamp) -> i64 {
        let tz = london();
        let start_date = tz.to_datetime(start).date();
        let end_date = tz.to_datetime(end).date();
        // Dates strictly between the two.
        let between = start_date.duration_until(end_date).as_hours() / 24 - 1;
        if between <= 0 {
            return 0;
        }
        let (Ok(first), Ok(last)) = (start_date.tomorrow(), end_date.yesterday()) else {
            return 0;
        };
        match self {
            Calendar::TwentyFourSeven => between,
            Calendar::WorkingDays { holidays, .. } | Calendar::SchoolDays { holidays, .. } => {
                let weekday_holidays = holidays
                    .range(first..=last)
                    .filter(|&&date| is_weekday(date))
                    .count();
                weekdays_in(first, between) - i64::try_from(weekday_holidays).unwrap_or(i64::MAX)
            }
        }
    }

    fn working_day_deadline(
        &self,
        start: Timestamp,
        n: NonZeroU32,
        target: &Target,
    ) -> Result<Timestamp, CalendarError> {
        let out_of_range = || CalendarError::OutOfRange {
            target: *target,
            start,
        };
        let start_date = london().to_datetime(start).date();
        let mut remaining = n.get();
        let mut day = start_date;
        let mut walked = 0;
        while remaining > 0 {
            if walked >= MAX_SEARCH_DAYS {
                return Err(CalendarError::SearchExhausted {
                    calendar: self.name().to_owned(),
                    target: *target,
                    start_date,
                    days: MAX_SEARCH_DAYS,
                    kind: "working days",
                });
            }
            day = day.tomorrow().map_err(|_| out_of_range())?;
            walked += 1;
            if self.is_working_day(day) {
                remaining -= 1;
            }
        }
        let following = day.tomorrow().map_err(|_| out_of_range())?;
        london_instant(following, Time::midnight()).ok_or_else(out_of_range)
    }

    fn next_school_day(
        &self,
        start: Timestamp,
        target: &Target,
    ) -> Result<Timestamp, CalendarError> {
        let Calendar::SchoolDays { start_of_day, .. } = self else {
            return Err(CalendarError::NoSchoolDays {
                calendar: self.name().to_owned(),
            });
        };
        let out_of_range = || CalendarError::OutOfRange {
            target: *target,
            start,
        };
        let start_date = london().to_datetime(start).date();
        let mut day = start_date;
        for _ in 0..=MAX_SEARCH_DAYS {
            if self.is_school_day(day) {
                let opens = london_instant(day, *start_of_day).ok_or_else(out_of_range)?;
                if opens > start {
                    return Ok(opens);
                }
            }
            day = day.tomorrow().map_err(|_| out_of_range())?;
        }
        Err(CalendarError::SearchExhausted {
            calendar: self.name().to_owned(),
            target: *target,
            start_date,
            days: MAX_SEARCH_DAYS,
            kind: "school days",
        })
    }
}

fn is_weekday(date: Date) -> bool {
    !matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday)
}

/// Monday-to-Friday dates among the `count` consecutive dates starting at `first`.
fn weekdays_in(first: Date, count: i64) -> i64 {
    let offset = i64::from(first.weekday().to_monday_zero_offset());
    let partial = (0..count % 7).filter(|i| (offset + i) % 7 < 5).count();
    count / 7 * 5 + i64::try_from(partial).unwrap_or(0)
}

/// The instant of a Europe/London wall-clock time: the later reading in a spring-forward gap,
/// the earlier in an autumn overlap.
fn london_instant(date: Date, time: Time) -> Option<Timestamp> {
    london()
        .to_ambiguous_timestamp(date.to_datetime(time))
        .compatible()
        .ok()
}

fn exact_deadline(start: Timestamp, seconds: NonZeroU64) -> Option<Timestamp> {
    let seconds = i64::try_from(seconds.get()).ok()?;
    start.checked_add(SignedDuration::from_secs(seconds)).ok()
}

fn civil_deadline(
    start: Timestamp,
    count: NonZeroU32,
    unit: CivilUnit,
) -> Result<Timestamp, jiff::Error> {
    let span = unit.span(count)?;
    Ok(start.to_zoned(london()).checked_add(span)?.timestamp())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::Calendars;
    use jiff::civil::date;
    use jiff::Zoned;
    use proptest::prelude::*;

    fn calendars() -> Calendars {
        Calendars::builtin()
    }

    fn working_days() -> Calendar {
        calendars().get("england-and-wales").unwrap().clone()
    }

    fn schools() -> Calendar {
        calendars()
            .get("england-and-wales-schools")
            .unwrap()
            .clone()
    }

    /// An instant given as London wall-clock text with its offset, e.g.
    /// "2022-05-27T10:00:00+01:00".
    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn target(text: &str) -> Target {
        Target::parse(text).unwrap()
    }

    /// RFC 3339 text of an instant in Europe/London's offset.
    fn london_rfc3339(ts: Timestamp) -> String {
        ts.to_zoned(london())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }

    fn assert_deadline(calendar: &Calendar, start: &str, target_text: &str, expected: &str) {
        let deadline = calendar.deadline(at(start), &target(target_text)).unwrap();
        assert_eq!(deadline, at(expected), "{target_text} from {start}");
        assert_eq!(
            london_rfc3339(deadline),
            expected,
            "{target_text} from {start}"
        );
    }

    #[test]
    fn worked_example_15_working_days_from_friday_27_may_2022_skips_jubilee_holidays() {
        assert_deadline(
            &working_days(),
            "2022-05-27T10:00:00+01:00",
            "15 working days",
            "2022-06-22T00:00:00+01:00",
        );
    }

    #[test]
    fn worked_example_1_working_day_from_sunday_29_nov_2026_is_end_of_monday() {
        assert_deadline(
            &working_days(),
            "2026-11-29T10:00:00+00:00",
            "1 working day",
            "2026-12-01T00:00:00+00:00",
        );
    }

    #[test]
    fn worked_example_2_working_days_from_23_dec_2026_skips_christmas_and_boxing_day_substitute() {
        assert_deadline(
            &working_days(),
            "2026-12-23T16:00:00+00:00",
            "2 working days",
            "2026-12-30T00:00:00+00:00",
        );
    }

    #[test]
    fn worked_examples_hold_on_the_school_calendar_because_closures_do_not_affect_working_days() {
        let schools = schools();
        // 23 Dec 2026 to 3 Jan 2027 is a school closure in the default term dates.
        assert_deadline(
            &schools,
            "2026-12-23T16:00:00+00:00",
            "2 working days",
            "2026-12-30T00:00:00+00:00",
        );
        assert_deadline(
            &schools,
            "2022-05-27T10:00:00+01:00",
            "15 working days",
            "2022-06-22T00:00:00+01:00",
        );
    }

    #[test]
    fn civil_days_keep_the_wall_clock_across_the_spring_clock_change() {
        let cal = working_days();
        assert_deadline(
            &cal,
            "2026-03-27T10:00:00+00:00",
            "3 days",
            "2026-03-30T10:00:00+01:00",
        );
        assert_deadline(
            &cal,
            "2026-03-27T10:00:00+00:00",
            "72h",
            "2026-03-30T11:00:00+01:00",
        );
    }

    #[test]
    fn civil_weeks_and_months_keep_the_wall_clock_across_the_autumn_clock_change() {
        let cal = Calendar::TwentyFourSeven;
        assert_deadline(
            &cal,
            "2026-10-20T09:15:00+01:00",
            "1 week",
            "2026-10-27T09:15:00+00:00",
        );
        assert_deadline(
            &cal,
            "2026-08-31T12:00:00+01:00",
            "3 months",
            "2026-11-30T12:00:00+00:00",
        );
        assert_deadline(
            &cal,
            "2026-10-24T12:00:00+01:00",
            "24h",
            "2026-10-25T11:00:00+00:00",
        );
    }

    #[test]
    fn working_day_deadline_crossing_the_autumn_clock_change_lands_at_local_midnight() {
        // Clocks go back on Sun 25 Oct 2026; Mon 26 Oct is the first working day following.
        assert_deadline(
            &working_days(),
            "2026-10-23T10:00:00+01:00",
            "1 working day",
            "2026-10-27T00:00:00+00:00",
        );
        // Spring: clocks go forward on Sun 29 Mar 2026.
        assert_deadline(
            &working_days(),
            "2026-03-27T23:30:00+00:00",
            "1 WD",
            "2026-03-31T00:00:00+01:00",
        );
    }

    #[test]
    fn clock_start_date_is_taken_in_london_not_utc() {
        // 23:30 UTC on Thu 25 Jun 2026 is already Fri 26 Jun in London (BST), so Friday is the
        // start date and Monday 29 Jun is the first working day following.
        assert_deadline(
            &working_days(),
            "2026-06-25T23:30:00+00:00",
            "1 working day",
            "2026-06-30T00:00:00+01:00",
        );
    }

    #[test]
    fn one_off_bank_holidays_are_respected() {
        let cal = working_days();
        assert!(!cal.is_working_day(date(2022, 6, 2)));
        assert!(!cal.is_working_day(date(2022, 6, 3)));
        assert!(
            cal.is_working_day(date(2022, 5, 30)),
            "late May holiday moved to 2 June"
        );
        assert!(!cal.is_working_day(date(2022, 9, 19)));
        assert!(!cal.is_working_day(date(2023, 5, 8)));
        assert!(!cal.is_working_day(date(2020, 5, 8)));
        assert!(
            cal.is_working_day(date(2020, 5, 4)),
            "early May holiday moved to 8 May"
        );
    }

    #[test]
    fn twenty_four_seven_counts_every_day_as_a_working_day() {
        let cal = Calendar::TwentyFourSeven;
        assert!(cal.is_working_day(date(2026, 12, 25)));
        assert!(cal.is_working_day(date(2026, 11, 28)));
        assert_deadline(
            &cal,
            "2026-12-24T16:00:00+00:00",
            "2 working days",
            "2026-12-27T00:00:00+00:00",
        );
        assert_eq!(cal.name(), "24x7");
    }

    #[test]
    fn exact_and_civil_targets_work_on_every_calendar() {
        for cal in [Calendar::TwentyFourSeven, working_days(), schools()] {
            assert_deadline(
                &cal,
                "2026-12-25T10:00:00+00:00",
                "15m",
                "2026-12-25T10:15:00+00:00",
            );
            assert_deadline(
                &cal,
                "2026-12-25T10:00:00+00:00",
                "28 days",
                "2027-01-22T10:00:00+00:00",
            );
        }
    }

    #[test]
    fn next_school_day_before_start_of_day_is_due_the_same_morning() {
        assert_deadline(
            &schools(),
            "2026-03-04T07:00:00+00:00",
            "next school day",
            "2026-03-04T08:30:00+00:00",
        );
    }

    #[test]
    fn next_school_day_after_start_of_day_is_due_the_next_morning() {
        let cal = schools();
        assert_deadline(
            &cal,
            "2026-03-04T09:00:00+00:00",
            "next school day",
            "2026-03-05T08:30:00+00:00",
        );
        // Exactly at the start of the day is too late for that day.
        assert_deadline(
            &cal,
            "2026-03-04T08:30:00+00:00",
            "next school day",
            "2026-03-05T08:30:00+00:00",
        );
    }

    #[test]
    fn next_school_day_from_friday_evening_is_monday_morning() {
        assert_deadline(
            &schools(),
            "2026-03-06T19:00:00+00:00",
            "next school day",
            "2026-03-09T08:30:00+00:00",
        );
    }

    #[test]
    fn next_school_day_inside_a_closure_is_the_first_day_back() {
        // Christmas closure 19 Dec 2026 to 3 Jan 2027; schools reopen Mon 4 Jan.
        assert_deadline(
            &schools(),
            "2026-12-20T22:00:00+00:00",
            "next school day",
            "2027-01-04T08:30:00+00:00",
        );
        // Last day of term, after school has started: due on the first day back.
        assert_deadline(
            &schools(),
            "2026-12-18T15:00:00+00:00",
            "next school day",
            "2027-01-04T08:30:00+00:00",
        );
    }

    #[test]
    fn next_school_day_skips_a_bank_holiday_monday() {
        // Early May bank holiday, Mon 4 May 2026, is in term time.
        assert_deadline(
            &schools(),
            "2026-05-03T20:00:00+01:00",
            "next school day",
            "2026-05-05T08:30:00+01:00",
        );
        assert_deadline(
            &schools(),
            "2026-05-04T07:00:00+01:00",
            "before the start of the next school day",
            "2026-05-05T08:30:00+01:00",
        );
    }

    #[test]
    fn next_school_day_uses_the_configured_start_of_day() {
        let Calendar::SchoolDays {
            name,
            holidays,
            closures,
            ..
        } = schools()
        else {
            panic!("expected a school calendar");
        };
        let cal = Calendar::SchoolDays {
            name,
            holidays,
            closures,
            start_of_day: jiff::civil::time(8, 45, 0, 0),
        };
        assert_deadline(
            &cal,
            "2026-03-04T08:40:00+00:00",
            "next school day",
            "2026-03-04T08:45:00+00:00",
        );
    }

    #[test]
    fn next_school_day_on_a_calendar_without_school_days_is_an_error_naming_it() {
        for cal in [Calendar::TwentyFourSeven, working_days()] {
            let err = cal
                .deadline(at("2026-03-04T07:00:00+00:00"), &Target::NextSchoolDay)
                .unwrap_err();
            assert_eq!(
                err,
                CalendarError::NoSchoolDays {
                    calendar: cal.name().to_owned()
                }
            );
            assert!(err.to_string().contains(cal.name()), "{err}");
            assert!(err.to_string().contains("no school days"), "{err}");
        }
    }

    #[test]
    fn school_closures_that_never_end_give_an_error_not_a_hang() {
        let cal = Calendar::SchoolDays {
            name: "closed-forever".to_owned(),
            holidays: BTreeSet::new(),
            closures: vec![(date(2000, 1, 1), date(2099, 12, 31))],
            start_of_day: DEFAULT_SCHOOL_START_OF_DAY,
        };
        let err = cal
            .deadline(at("2026-03-04T07:00:00+00:00"), &Target::NextSchoolDay)
            .unwrap_err();
        assert!(
            matches!(err, CalendarError::SearchExhausted { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("closed-forever"), "{err}");
    }

    #[test]
    fn holidays_on_every_weekday_give_an_error_not_a_hang() {
        let start = date(2026, 1, 1);
        let holidays: BTreeSet<Date> = (0..5000)
            .map(|i| start.checked_add(jiff::Span::new().days(i)).unwrap())
            .collect();
        let cal = Calendar::WorkingDays {
            name: "no-working-days".to_owned(),
            holidays,
        };
        let err = cal
            .deadline(at("2026-03-04T07:00:00+00:00"), &target("1 WD"))
            .unwrap_err();
        assert!(
            matches!(err, CalendarError::SearchExhausted { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn very_long_working_day_targets_give_an_error_and_long_ones_work() {
        let cal = working_days();
        let start = at("2026-01-05T09:00:00+00:00");
        assert!(cal.deadline(start, &target("2000 working days")).is_ok());
        let err = cal
            .deadline(start, &target("100000 working days"))
            .unwrap_err();
        assert!(
            matches!(err, CalendarError::SearchExhausted { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn deadlines_beyond_the_representable_range_are_errors() {
        let cal = Calendar::TwentyFourSeven;
        let start = at("9999-12-29T00:00:00+00:00");
        for text in ["72h", "3 months", "45 working days"] {
            let err = cal.deadline(start, &target(text)).unwrap_err();
            assert!(
                matches!(err, CalendarError::OutOfRange { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn working_days_between_counts_days_strictly_between_the_dates() {
        let cal = working_days();
        // Fri 27 May 2022 to 00:00 Wed 22 June: 15 working days (the deadline instant).
        assert_eq!(
            cal.working_days_between(
                at("2022-05-27T10:00:00+01:00"),
                at("2022-06-22T00:00:00+01:00")
            ),
            15
        );
        // One second earlier, 21 June has not finished.
        assert_eq!(
            cal.working_days_between(
                at("2022-05-27T10:00:00+01:00"),
                at("2022-06-21T23:59:59+01:00")
            ),
            14
        );
        // Same day, next day and reversed intervals elapse nothing.
        let monday = at("2026-03-02T09:00:00+00:00");
        assert_eq!(cal.working_days_between(monday, monday), 0);
        assert_eq!(
            cal.working_days_between(monday, at("2026-03-03T17:00:00+00:00")),
            0
        );
        assert_eq!(
            cal.working_days_between(monday, at("2026-03-04T00:00:00+00:00")),
            1
        );
        assert_eq!(
            cal.working_days_between(at("2026-03-10T09:00:00+00:00"), monday),
            0
        );
        // Over Christmas 2026: 24, 29, 30, 31 Dec are working days before 1 Jan 2027.
        assert_eq!(
            cal.working_days_between(
                at("2026-12-23T16:00:00+00:00"),
                at("2027-01-01T12:00:00+00:00")
            ),
            4
        );
        assert_eq!(
            Calendar::TwentyFourSeven.working_days_between(
                at("2026-12-23T16:00:00+00:00"),
                at("2027-01-01T12:00:00+00:00")
            ),
            8
        );
    }

    #[test]
    fn is_school_day_excludes_closures_weekends_and_holidays() {
        let cal = schools();
        assert!(cal.is_school_day(date(2026, 3, 4)));
        assert!(!cal.is_school_day(date(2026, 3, 7)), "Saturday");
        assert!(!cal.is_school_day(date(2026, 5, 4)), "bank holiday");
        assert!(!cal.is_school_day(date(2026, 8, 12)), "summer closure");
        assert!(
            cal.is_working_day(date(2026, 8, 12)),
            "closures are still working days"
        );
        assert!(!working_days().is_school_day(date(2026, 3, 4)));
        assert!(!Calendar::TwentyFourSeven.is_school_day(date(2026, 3, 4)));
    }

    /// Instants from 2015-01-01 to 2030-12-31 (UTC).
    fn start_2015_to_2030() -> impl Strategy<Value = Timestamp> {
        (1_420_070_400i64..1_924_992_000i64).prop_map(|s| Timestamp::from_second(s).unwrap())
    }

    fn working_target() -> impl Strategy<Value = (u32, Target)> {
        (1u32..=60).prop_map(|n| (n, Target::WorkingDays(NonZeroU32::new(n).unwrap())))
    }

    fn any_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            (1u64..=400 * 86_400).prop_map(|s| Target::Exact {
                seconds: NonZeroU64::new(s).unwrap()
            }),
            (
                1u32..=400,
                prop_oneof![
                    Just(CivilUnit::Days),
                    Just(CivilUnit::Weeks),
                    Just(CivilUnit::Months)
                ]
            )
                .prop_map(|(n, unit)| Target::Civil {
                    count: NonZeroU32::new(n).unwrap(),
                    unit
                }),
            working_target().prop_map(|(_, t)| t),
            Just(Target::NextSchoolDay),
        ]
    }

    fn naive_working_days_between(cal: &Calendar, start: Timestamp, end: Timestamp) -> i64 {
        let first = london().to_datetime(start).date();
        let last = london().to_datetime(end).date();
        let mut day = first.tomorrow().unwrap();
        let mut count = 0;
        while day < last {
            if cal.is_working_day(day) {
                count += 1;
            }
            day = day.tomorrow().unwrap();
        }
        count
    }

    proptest! {
        #[test]
        fn working_day_deadlines_never_decrease_as_the_start_increases(
            a in start_2015_to_2030(),
            b in start_2015_to_2030(),
            (_, target) in working_target(),
        ) {
            let cal = working_days();
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(cal.deadline(early, &target).unwrap() <= cal.deadline(late, &target).unwrap());
        }

        #[test]
        fn deadline_is_always_strictly_after_start(
            start in start_2015_to_2030(),
            target in any_target(),
        ) {
            prop_assert!(schools().deadline(start, &target).unwrap() > start);
            if target != Target::NextSchoolDay {
                for cal in [working_days(), Calendar::TwentyFourSeven] {
                    prop_assert!(cal.deadline(start, &target).unwrap() > start);
                }
            }
        }

        #[test]
        fn shifting_the_start_of_an_exact_target_shifts_the_deadline_equally(
            start in start_2015_to_2030(),
            shift in -10_000_000i64..10_000_000,
            seconds in 1u64..=10_000_000,
        ) {
            let target = Target::Exact { seconds: NonZeroU64::new(seconds).unwrap() };
            let shift = SignedDuration::from_secs(shift);
            let cal = working_days();
            let base = cal.deadline(start, &target).unwrap();
            let shifted = cal.deadline(start.checked_add(shift).unwrap(), &target).unwrap();
            prop_assert_eq!(shifted, base.checked_add(shift).unwrap());
        }

        #[test]
        fn working_day_deadline_is_at_midnight_in_london(
            start in start_2015_to_2030(),
            (_, target) in working_target(),
        ) {
            let deadline: Zoned = working_days().deadline(start, &target).unwrap().to_zoned(london());
            prop_assert_eq!(deadline.time(), Time::midnight());
        }

        #[test]
        fn the_day_before_a_working_day_deadline_is_a_working_day(
            start in start_2015_to_2030(),
            (_, target) in working_target(),
        ) {
            for cal in [working_days(), schools(), Calendar::TwentyFourSeven] {
                let deadline = cal.deadline(start, &target).unwrap();
                let last_day = london().to_datetime(deadline).date().yesterday().unwrap();
                prop_assert!(cal.is_working_day(last_day), "{} on {}", last_day, cal.name());
            }
        }

        #[test]
        fn working_days_between_start_and_deadline_is_the_target(
            start in start_2015_to_2030(),
            (n, target) in working_target(),
        ) {
            for cal in [working_days(), Calendar::TwentyFourSeven] {
                let deadline = cal.deadline(start, &target).unwrap();
                prop_assert_eq!(cal.working_days_between(start, deadline), i64::from(n));
                let just_before = deadline.checked_sub(SignedDuration::from_secs(1)).unwrap();
                prop_assert_eq!(cal.working_days_between(start, just_before), i64::from(n) - 1);
            }
        }

        #[test]
        fn working_days_between_matches_a_day_by_day_count(
            a in start_2015_to_2030(),
            days in 0i64..800,
        ) {
            let b = a.checked_add(SignedDuration::from_hours(days * 24)).unwrap();
            let cal = working_days();
            prop_assert_eq!(cal.working_days_between(a, b), naive_working_days_between(&cal, a, b));
        }

        #[test]
        fn next_school_day_is_a_school_day_at_the_start_of_day(start in start_2015_to_2030()) {
            let cal = schools();
            let deadline = cal.deadline(start, &Target::NextSchoolDay).unwrap().to_zoned(london());
            prop_assert!(cal.is_school_day(deadline.date()));
            prop_assert_eq!(deadline.time(), DEFAULT_SCHOOL_START_OF_DAY);
            // No earlier school day opened after the start.
            let mut day = london().to_datetime(start).date();
            while day < deadline.date() {
                if cal.is_school_day(day) {
                    let opens = london_instant(day, DEFAULT_SCHOOL_START_OF_DAY).unwrap();
                    prop_assert!(opens <= start, "{} opened after start", day);
                }
                day = day.tomorrow().unwrap();
            }
        }
    }
}
