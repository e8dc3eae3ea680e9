//! What a rule allows: the target part of "clock start -> clock stop: target".
//!
//! Rule files write targets as short text ("72h", "15 working days", "next school day"), so
//! the parser is the one place that decides what those words mean. Four kinds are
//! deliberately kept apart, because they give different deadlines around clock changes and
//! holidays:
//!
//! - **exact durations** ("15m", "90 minutes", "72h", "1h30m") are elapsed time: a 72-hour
//!   police-protection limit is 72 real hours even across a clock change;
//! - **calendar periods** ("28 days", "2 weeks", "3 months") are civil arithmetic in
//!   Europe/London, so "3 days" from 10:00 ends at 10:00 on the wall clock even if the clocks
//!   changed in between;
//! - **working days** ("15 working days", "5 WD") follow the convention in
//!   [`Calendar::deadline`](crate::Calendar::deadline);
//! - **next school day** ("next school day", "before the start of the next school day") is the
//!   Operation Encompass notification deadline.
//!
//! Text is matched case-insensitively and extra whitespace is ignored. Zero, negative,
//! fractional and unrecognised targets are rejected with a message listing the accepted forms.
//! [`Target`]'s `Display` prints a canonical form that parses back to the same value.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::str::FromStr;

use jiff::{SignedDuration, Span};

/// The forms [`Target::parse`] accepts, quoted in every parse error.
pub const ACCEPTED_FORMS: &str = "accepted forms: exact durations such as \"15m\", \"15 min\", \
\"90 minutes\", \"72h\" or \"1h30m\" (units h, m, s); calendar periods in Europe/London such as \
\"28 days\", \"2 weeks\" or \"3 months\"; working days such as \"15 working days\" or \"5 WD\"; \
or \"next school day\" (also \"before the start of the next school day\")";

/// What a rule allows between clock start and clock stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Exact elapsed time, in whole seconds ("15m", "72h", "1h30m").
    Exact {
        /// Length of the target in seconds.
        seconds: NonZeroU64,
    },
    /// A number of civil days, weeks or months, counted on the Europe/London wall clock
    /// ("28 days", "2 weeks", "3 months").
    Civil {
        /// How many units.
        count: NonZeroU32,
        /// Which unit.
        unit: CivilUnit,
    },
    /// A number of working days ("15 working days", "5 WD").
    WorkingDays(NonZeroU32),
    /// The start of the next school day ("next school day").
    NextSchoolDay,
}

/// The unit of a [`Target::Civil`] period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CivilUnit {
    /// Calendar days: the same wall-clock time N dates later.
    Days,
    /// Weeks of seven calendar days.
    Weeks,
    /// Calendar months; a day past the end of the target month is clamped to its last day
    /// (31 January + 1 month = 28 or 29 February).
    Months,
}

/// Why a target could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The text was empty or only whitespace.
    #[error("the target is empty; {ACCEPTED_FORMS}")]
    Empty,
    /// The target was zero or negative.
    #[error("target \"{input}\" must be greater than zero; {ACCEPTED_FORMS}")]
    NotPositive {
        /// The text as given.
        input: String,
    },
    /// The number is larger than the engine can represent.
    #[error("target \"{input}\" is too large to compute a deadline for")]
    TooLarge {
        /// The text as given.
        input: String,
    },
    /// The text is not one of the accepted forms.
    #[error("cannot understand target \"{input}\": {reason}; {ACCEPTED_FORMS}")]
    Unrecognised {
        /// The text as given.
        input: String,
        /// What in particular was wrong.
        reason: String,
    },
}

const SCHOOL_DAY_PHRASES: [&str; 2] =
    ["next school day", "before the start of the next school day"];

const HOUR_WORDS: [&str; 5] = ["h", "hr", "hrs", "hour", "hours"];
const MINUTE_WORDS: [&str; 5] = ["m", "min", "mins", "minute", "minutes"];
const SECOND_WORDS: [&str; 5] = ["s", "sec", "secs", "second", "seconds"];
const DAY_WORDS: [&str; 3] = ["d", "day", "days"];
const WEEK_WORDS: [&str; 5] = ["w", "wk", "wks", "week", "weeks"];
const MONTH_WORDS: [&str; 4] = ["mo", "mos", "month", "months"];

impl Target {
    /// Parses a target written in a rule file.
    ///
    /// See the [module documentation](self) for the accepted forms.
    ///
    /// # Errors
    ///
    /// [`TargetError`] when the text is empty, zero or negative, too large to compute with, or
    /// not one of the accepted forms; the message says which forms are accepted.
    pub fn parse(text: &str) -> Result<Target, TargetError> {
        let normalised = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        if normalised.is_empty() {
            return Err(TargetError::Empty);
        }
        if SCHOOL_DAY_PHRASES.contains(&normalised.as_str()) {
            return Ok(Target::NextSchoolDay);
        }
        let unrecognised = |reason: &str| TargetError::Unrecognised {
            input: text.to_owned(),
            reason: reason.to_owned(),
        };
        let tokens = tokenise(&normalised).map_err(|problem| match problem {
            TokenProblem::Negative => TargetError::NotPositive {
                input: text.to_owned(),
            },
            TokenProblem::Overflow => TargetError::TooLarge {
                input: text.to_owned(),
            },
            TokenProblem::Fraction => {
                unrecognised("fractions are not accepted, use a smaller unit (\"1h30m\")")
            }
            TokenProblem::Unexpected(c) => unrecognised(&format!("unexpected character {c:?}")),
        })?;

        let not_positive = || TargetError::NotPositive {
            input: text.to_owned(),
        };
        let too_large = || TargetError::TooLarge {
            input: text.to_owned(),
        };

        match tokens.as_slice() {
            [Token::Number(n), Token::Word("working"), Token::Word("day" | "days")]
            | [Token::Number(n), Token::Word("wd" | "wds")] => {
                let n = u32::try_from(*n).map_err(|_| too_large())?;
                let n = NonZeroU32::new(n).ok_or_else(not_positive)?;
                Ok(Target::WorkingDays(n))
            }
            [Token::Number(n), Token::Word(word)] if civil_unit(word).is_some() => {
                let unit = civil_unit(word).ok_or_else(|| unrecognised("unknown unit"))?;
                let count = u32::try_from(*n).map_err(|_| too_large())?;
                let count = NonZeroU32::new(count).ok_or_else(not_positive)?;
                // Reject counts jiff cannot turn into a span, so every parsed target can be
                // used (and printed and re-parsed) without surprises later.
                unit.span(count).map_err(|_| too_large())?;
                Ok(Target::Civil { count, unit })
            }
            _ => parse_exact(&tokens).map_err(|problem| match problem {
                ExactProblem::NotPositive => not_positive(),
                ExactProblem::Overflow => too_large(),
                ExactProblem::Shape(reason) => unrecognised(reason),
            }),
        }
    }

    /// The length of an [`Exact`](Target::Exact) target; `None` for the other kinds.
    #[must_use]
    pub fn exact_duration(&self) -> Option<SignedDuration> {
        match *self {
            Target::Exact { seconds } => Some(SignedDuration::from_secs(
                i64::try_from(seconds.get()).unwrap_or(i64::MAX),
            )),
            _ => None,
        }
    }
}

impl CivilUnit {
    /// The jiff span for `count` of this unit.
    ///
    /// # Errors
    ///
    /// A jiff error when `count` is beyond what a span can hold (about 20,000 years).
    pub fn span(self, count: NonZeroU32) -> Result<Span, jiff::Error> {
        let count = i64::from(count.get());
        match self {
            CivilUnit::Days => Span::new().try_days(count),
            CivilUnit::Weeks => Span::new().try_weeks(count),
            CivilUnit::Months => Span::new().try_months(count),
        }
    }

    fn name(self, count: u32) -> &'static str {
        match (self, count == 1) {
            (CivilUnit::Days, true) => "day",
            (CivilUnit::Days, false) => "days",
            (CivilUnit::Weeks, true) => "week",
            (CivilUnit::Weeks, false) => "weeks",
            (CivilUnit::Months, true) => "month",
            (CivilUnit::Months, false) => "months",
        }
    }
}

fn civil_unit(word: &str) -> Option<CivilUnit> {
    if DAY_WORDS.contains(&word) {
        Some(CivilUnit::Days)
    } else if WEEK_WORDS.contains(&word) {
        Some(CivilUnit::Weeks)
    } else if MONTH_WORDS.contains(&word) {
        Some(CivilUnit::Months)
    } else {
        None
    }
}

/// Seconds per unit, and the unit's rank (hours before minutes before seconds).
fn exact_unit(word: &str) -> Option<(u64, u8)> {
    if HOUR_WORDS.contains(&word) {
        Some((3600, 0))
    } else if MINUTE_WORDS.contains(&word) {
        Some((60, 1))
    } else if SECOND_WORDS.contains(&word) {
        Some((1, 2))
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Number(u64),
    Word(&'a str),
}

enum TokenProblem {
    Negative,
    Fraction,
    Overflow,
    Unexpected(char),
}

/// Splits normalised (lower-case) text into numbers and words; "1h30m" and "1 h 30 m" give
/// the same tokens.
fn tokenise(text: &str) -> Result<Vec<Token<'_>>, TokenProblem> {
    let mut tokens = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
        } else if c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let number = rest[..end]
                .parse::<u64>()
                .map_err(|_| TokenProblem::Overflow)?;
            tokens.push(Token::Number(number));
            rest = &rest[end..];
        } else if c.is_ascii_alphabetic() {
            let end = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            tokens.push(Token::Word(&rest[..end]));
            rest = &rest[end..];
        } else if c == '-' {
            return Err(TokenProblem::Negative);
        } else if c == '.' || c == ',' {
            return Err(TokenProblem::Fraction);
        } else {
            return Err(TokenProblem::Unexpected(c));
        }
    }
    Ok(tokens)
}

enum ExactProblem {
    NotPositive,
    Overflow,
    Shape(&'static str),
}

/// Parses "<number><unit>" pairs with units hours, minutes, seconds, each at most once and
/// in that order.
fn parse_exact(tokens: &[Token<'_>]) -> Result<Target, ExactProblem> {
    if tokens.is_empty() || !tokens.len().is_multiple_of(2) {
        return Err(ExactProblem::Shape(
            "expected a number followed by a unit, e.g. \"15m\"",
        ));
    }
    let mut total: u64 = 0;
    let mut last_rank: Option<u8> = None;
    for pair in tokens.chunks_exact(2) {
        let [Token::Number(n), Token::Word(word)] = pair else {
            return Err(ExactProblem::Shape(
                "expected a number followed by a unit, e.g. \"15m\"",
            ));
        };
        let Some((unit_seconds, rank)) = exact_unit(word) else {
            let calendar_word = civil_unit(word).is_some() || matches!(*word, "working" | "wd");
            return Err(if calendar_word && tokens.len() > 2 {
                ExactProblem::Shape(
                    "days, weeks, months and working days cannot be combined with other units",
                )
            } else {
                ExactProblem::Shape("unknown unit")
            });
        };
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(ExactProblem::Shape(
                "units must go from hours to minutes to seconds, each used once",
            ));
        }
        last_rank = Some(rank);
        total = n
            .checked_mul(unit_seconds)
            .and_then(|part| total.checked_add(part))
            .ok_or(ExactProblem::Overflow)?;
    }
    if i64::try_from(total).is_err() {
        return Err(ExactProblem::Overflow);
    }
    let seconds = NonZeroU64::new(total).ok_or(ExactProblem::NotPositive)?;
    Ok(Target::Exact { seconds })
}

impl fmt::Display for Target {
    /// Canonical text: "1h30m", "28 days", "1 working day", "next school day".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Target::Exact { seconds } => {
                let total = seconds.get();
                let (hours, minutes, secs) = (total / 3600, total % 3600 / 60, total % 60);
                if hours > 0 {
                    write!(f, "{hours}h")?;
                }
                if minutes > 0 {
                    write!(f, "{minutes}m")?;
                }
                if secs > 0 {
                    write!(f, "{secs}s")?;
                }
                Ok(())
            }
            Target::Civil { count, unit } => {
                write!(f, "{count} {}", unit.name(count.get()))
            }
            Target::WorkingDays(n) if n.get() == 1 => f.write_str("1 working day"),
            Target::WorkingDays(n) => write!(f, "{n} working days"),
            Target::NextSchoolDay => f.write_str("next school day"),
        }
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Target, TargetError> {
        Target::parse(text)
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Target, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Target::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(seconds: u64) -> Target {
        Target::Exact {
            seconds: NonZeroU64::new(seconds).unwrap(),
        }
    }

    fn civil(count: u32, unit: CivilUnit) -> Target {
        Target::Civil {
            count: NonZeroU32::new(count).unwrap(),
            unit,
        }
    }

    fn working(n: u32) -> Target {
        Target::WorkingDays(NonZeroU32::new(n).unwrap())
    }

    #[test]
    fn exact_duration_forms_parse_to_seconds() {
        let cases = [
            ("15m", 900),
            ("15 min", 900),
            ("15 mins", 900),
            ("90 minutes", 5400),
            ("72h", 72 * 3600),
            ("72 hours", 72 * 3600),
            ("9h", 9 * 3600),
            ("1h30m", 5400),
            ("1h 30m", 5400),
            ("1 hour 30 minutes", 5400),
            ("  24H ", 24 * 3600),
            ("45s", 45),
            ("2h0m", 7200),
        ];
        for (text, seconds) in cases {
            assert_eq!(Target::parse(text).unwrap(), exact(seconds), "{text}");
        }
    }

    #[test]
    fn civil_period_forms_parse_to_days_weeks_months() {
        let cases = [
            ("28 days", civil(28, CivilUnit::Days)),
            ("1 day", civil(1, CivilUnit::Days)),
            ("30d", civil(30, CivilUnit::Days)),
            ("2 weeks", civil(2, CivilUnit::Weeks)),
            ("1 week", civil(1, CivilUnit::Weeks)),
            ("3 months", civil(3, CivilUnit::Months)),
            ("6 Months", civil(6, CivilUnit::Months)),
        ];
        for (text, target) in cases {
            assert_eq!(Target::parse(text).unwrap(), target, "{text}");
        }
    }

    #[test]
    fn working_day_forms_parse() {
        let cases = [
            ("15 working days", working(15)),
            ("1 working day", working(1)),
            ("5 WD", working(5)),
            ("5wd", working(5)),
            ("45  Working   Days", working(45)),
        ];
        for (text, target) in cases {
            assert_eq!(Target::parse(text).unwrap(), target, "{text}");
        }
    }

    #[test]
    fn next_school_day_and_its_alias_parse() {
        for text in [
            "next school day",
            "Next School Day",
            "before the start of the next school day",
        ] {
            assert_eq!(
                Target::parse(text).unwrap(),
                Target::NextSchoolDay,
                "{text}"
            );
        }
    }

    #[test]
    fn zero_and_negative_targets_are_rejected_as_not_positive() {
        for text in [
            "0m",
            "0 days",
            "0 working days",
            "0h0m",
            "-5m",
            "-1 day",
            "0 WD",
        ] {
            let err = Target::parse(text).unwrap_err();
            assert!(
                matches!(err, TargetError::NotPositive { .. }),
                "{text}: {err:?}"
            );
            assert!(err.to_string().contains("greater than zero"), "{err}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_the_accepted_forms() {
        for text in [
            "soon",
            "15",
            "m",
            "1.5h",
            "15 fortnights",
            "1 day 3h",
            "3h 1 day",
            "30m 1h",
            "1h 1h",
            "working days",
            "5 working",
            "next working day",
            "15m!",
        ] {
            let err = Target::parse(text).unwrap_err();
            assert!(
                matches!(err, TargetError::Unrecognised { .. }),
                "{text}: {err:?}"
            );
            assert!(err.to_string().contains("accepted forms"), "{err}");
        }
        assert_eq!(Target::parse("   ").unwrap_err(), TargetError::Empty);
    }

    #[test]
    fn oversized_numbers_are_rejected_as_too_large() {
        for text in [
            "99999999999999999999999h",
            "5124095576030432h",
            "9999999 days",
            "4294967296 working days",
            "300000 months",
        ] {
            let err = Target::parse(text).unwrap_err();
            assert!(
                matches!(err, TargetError::TooLarge { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn display_prints_canonical_forms() {
        let cases = [
            ("90 minutes", "1h30m"),
            ("72 hours", "72h"),
            ("15 min", "15m"),
            ("3661s", "1h1m1s"),
            ("1 day", "1 day"),
            ("28d", "28 days"),
            ("1 week", "1 week"),
            ("3 months", "3 months"),
            ("1 WD", "1 working day"),
            ("5 WD", "5 working days"),
            ("before the start of the next school day", "next school day"),
        ];
        for (text, printed) in cases {
            assert_eq!(Target::parse(text).unwrap().to_string(), printed, "{text}");
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let target: Target = serde_json::from_str("\"15 working days\"").unwrap();
        assert_eq!(target, working(15));
        assert_eq!(
            serde_json::to_string(&target).unwrap(),
            "\"15 working days\""
        );
        assert!(serde_json::from_str::<Target>("\"fortnight\"").is_err());
    }

    #[test]
    fn exact_duration_is_only_for_exact_targets() {
        assert_eq!(
            Target::parse("1h30m").unwrap().exact_duration(),
            Some(SignedDuration::from_mins(90))
        );
        assert_eq!(Target::parse("1 day").unwrap().exact_duration(), None);
    }

    fn any_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            (1..=i64::MAX as u64).prop_map(exact),
            (1u64..=1_000_000).prop_map(exact),
            (1u32..=7_304_484).prop_map(|n| civil(n, CivilUnit::Days)),
            (1u32..=1_043_497).prop_map(|n| civil(n, CivilUnit::Weeks)),
            (1u32..=239_976).prop_map(|n| civil(n, CivilUnit::Months)),
            (1u32..=u32::MAX).prop_map(working),
            Just(Target::NextSchoolDay),
        ]
    }

    proptest! {
        #[test]
        fn display_round_trips_through_parse(target in any_target()) {
            prop_assert_eq!(Target::parse(&target.to_string()).unwrap(), target);
        }

        #[test]
        fn parse_never_panics_on_arbitrary_text(text in "\\PC{0,40}") {
            let _ = Target::parse(&text);
        }
    }
}
