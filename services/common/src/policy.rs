//! The policy a clock runs: the rule set and the calendars, loaded and cross-checked together.
//!
//! `safeclock check-config` and the clock service both call [`Policy::load`], so a rule that
//! names a calendar nobody configured, or a force mapped to a missing calendar, fails at start-up
//! with the names involved.

use std::collections::HashMap;

use safeclock_calendar::{Calendar, Calendars};

use crate::config::Settings;
use crate::rules::{CalendarChoice, RuleError, RuleSet};

/// Why the policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    // The inner errors are part of the message, not a `source`, so they print once.
    #[error("invalid rules: {0}")]
    Rules(RuleError),
    #[error("invalid calendars: {0}")]
    Calendars(safeclock_calendar::CalendarsError),
    #[error("invalid configuration: `{field}` names calendar {name:?}, which is not defined (known: {known})")]
    UnknownCalendar {
        field: String,
        name: String,
        known: String,
    },
}

impl From<RuleError> for PolicyError {
    fn from(e: RuleError) -> Self {
        PolicyError::Rules(e)
    }
}

impl From<safeclock_calendar::CalendarsError> for PolicyError {
    fn from(e: safeclock_calendar::CalendarsError) -> Self {
        PolicyError::Calendars(e)
    }
}

/// Named calendars plus which working-day calendar each force uses.
#[derive(Debug, Clone)]
pub struct CalendarBook {
    pub calendars: Calendars,
    /// Force id -> calendar name, for rules on the force's calendar.
    pub by_force: HashMap<String, String>,
    /// The calendar of forces not listed in `by_force`.
    pub default_force_calendar: String,
}

impl CalendarBook {
    /// The built-in calendars, every force on England & Wales working days.
    pub fn builtin() -> Self {
        Self {
            calendars: Calendars::builtin(),
            by_force: HashMap::new(),
            default_force_calendar: "england-and-wales".into(),
        }
    }

    /// The calendar a rule's choice means for `force`.
    pub fn resolve(&self, choice: &CalendarChoice, force: &str) -> Option<&Calendar> {
        let name = match choice {
            CalendarChoice::Named(n) => n.as_str(),
            CalendarChoice::Force => self
                .by_force
                .get(force)
                .map_or(self.default_force_calendar.as_str(), String::as_str),
        };
        self.calendars.get(name)
    }
}

/// Rules and calendars, validated against each other.
#[derive(Debug, Clone)]
pub struct Policy {
    pub rules: RuleSet,
    pub calendars: CalendarBook,
    /// How much the clock keeps per referral (`[clock.limits]`).
    pub limits: crate::config::ClockLimits,
}

impl Policy {
    /// Loads the rules and calendars `settings` names (or the built-in ones).
    ///
    /// # Errors
    /// [`PolicyError`] naming the file, rule, field or calendar that is wrong.
    pub fn load(settings: &Settings) -> Result<Self, PolicyError> {
        let rules = if settings.rules.paths.is_empty() {
            RuleSet::default_pack()?
        } else {
            RuleSet::load(&settings.rules.paths)?
        };
        let calendars = Calendars::load(
            &settings.calendars.holiday_files,
            settings.calendars.school_terms_file.as_deref(),
        )?;
        let book = CalendarBook {
            calendars,
            by_force: settings.calendars.by_force.clone().into_iter().collect(),
            default_force_calendar: settings.calendars.default_force_calendar.clone(),
        };
        let policy = Self {
            rules,
            calendars: book,
            limits: settings.clock.limits,
        };
        policy.check()?;
        Ok(policy)
    }

    fn check(&self) -> Result<(), PolicyError> {
        for rule in &self.rules.rules {
            let school_target = rule.target == safeclock_calendar::Target::NextSchoolDay
                || rule
                    .targets_by_risk
                    .values()
                    .any(|t| *t == safeclock_calendar::Target::NextSchoolDay);
            if school_target {
                let ok = match &rule.calendar {
                    CalendarChoice::Named(n) => self
                        .calendars
                        .calendars
                        .get(n)
                        .is_some_and(|c| matches!(c, Calendar::SchoolDays { .. })),
                    CalendarChoice::Force => false,
                };
                if !ok {
                    return Err(PolicyError::Rules(RuleError::Invalid {
                        file: "<rule set>".into(),
                        rule: rule.id.clone(),
                        field: "calendar".into(),
                        message: "a \"next school day\" target needs a school-days calendar such as \"england-and-wales-schools\"".into(),
                    }));
                }
            }
        }
        let unknown = |field: String, name: &str| PolicyError::UnknownCalendar {
            field,
            name: name.to_string(),
            known: self
                .calendars
                .calendars
                .names()
                .collect::<Vec<_>>()
                .join(", "),
        };
        let book = &self.calendars;
        if book.calendars.get(&book.default_force_calendar).is_none() {
            return Err(unknown(
                "calendars.default_force_calendar".into(),
                &book.default_force_calendar,
            ));
        }
        for (force, name) in &book.by_force {
            if book.calendars.get(name).is_none() {
                return Err(unknown(format!("calendars.by_force.{force}"), name));
            }
        }
        for rule in &self.rules.rules {
            if let CalendarChoice::Named(name) = &rule.calendar {
                if book.calendars.get(name).is_none() {
                    return Err(unknown(format!("rule {}: calendar", rule.id), name));
                }
            }
            for (force, o) in &rule.overrides {
                if let Some(CalendarChoice::Named(name)) = &o.calendar {
                    if book.calendars.get(name).is_none() {
                        return Err(unknown(
                            format!("rule {}: overrides.{force}.calendar", rule.id),
                            name,
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
