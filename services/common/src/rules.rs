//! SLA rules as data: which events start, stop, pause, resume, reset or cancel a clock, how long
//! it may run on which calendar, when to warn, and how bad a breach is.
//!
//! Rules live in TOML files (`deploy/rules/*.toml`, compiled into the binary as the default pack;
//! operators point `rules.paths` at their own). Loading validates every rule against the event
//! contract itself (event kinds and attribute names and types come from the compiled schema), so
//! a typo is an error at start-up naming the file, the rule id and the field, never a clock that
//! silently never starts. See `docs/rules.md` for the format.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use jiff::SignedDuration;
use safeclock_calendar::Target;
use serde::Deserialize;

use crate::schema::v1::Severity;
use crate::schema::{event_kinds, AttributeType, EventKindInfo};

/// The default rule pack, compiled in. Each file cites its sources.
pub const DEFAULT_PACK: [(&str, &str); 5] = [
    (
        "deploy/rules/multi-agency.toml",
        include_str!("../../../deploy/rules/multi-agency.toml"),
    ),
    (
        "deploy/rules/police.toml",
        include_str!("../../../deploy/rules/police.toml"),
    ),
    (
        "deploy/rules/custody.toml",
        include_str!("../../../deploy/rules/custody.toml"),
    ),
    (
        "deploy/rules/missing.toml",
        include_str!("../../../deploy/rules/missing.toml"),
    ),
    (
        "deploy/rules/encompass.toml",
        include_str!("../../../deploy/rules/encompass.toml"),
    ),
];

/// Why a rule file was refused: always names the file, and the rule and field where known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: rule `{rule}`: field `{field}`: {message}")]
    Invalid {
        file: String,
        rule: String,
        field: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The file format (what operators write).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    title: String,
    source: String,
    #[serde(default)]
    local: bool,
    #[serde(default)]
    unconfirmed: bool,
    severity: String,
    #[serde(default = "default_calendar")]
    calendar: String,
    target: String,
    #[serde(default)]
    targets_by_risk: BTreeMap<String, String>,
    #[serde(default)]
    warnings: Vec<String>,
    #[serde(default)]
    applies_to: BTreeMap<String, Vec<String>>,
    start: Vec<ConditionSpec>,
    stop: Vec<ConditionSpec>,
    #[serde(default)]
    pause: Vec<ConditionSpec>,
    #[serde(default)]
    resume: Vec<ConditionSpec>,
    #[serde(default)]
    reset: Vec<ConditionSpec>,
    #[serde(default)]
    cancel: Vec<ConditionSpec>,
    #[serde(default)]
    repeat: bool,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    overrides: BTreeMap<String, OverrideSpec>,
}

fn default_calendar() -> String {
    "24x7".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionSpec {
    event: String,
    #[serde(default, rename = "where")]
    predicates: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideSpec {
    target: Option<String>,
    #[serde(default)]
    targets_by_risk: BTreeMap<String, String>,
    calendar: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The compiled model (what the engine runs).

/// Which calendar a rule counts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalendarChoice {
    /// A named calendar (`24x7`, `england-and-wales`, `england-and-wales-schools`, ...).
    Named(String),
    /// The working-day calendar of the referral's force.
    Force,
}

/// When to warn before a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warning {
    /// At this percentage of the time from start to deadline.
    Percent(u32),
    /// This long before the deadline.
    Before(SignedDuration),
}

impl Warning {
    /// A stable name for ids and labels: `75pct`, `7200s-before`.
    pub fn label(&self) -> String {
        match self {
            Warning::Percent(p) => format!("{p}pct"),
            Warning::Before(d) => format!("{}s-before", d.as_secs()),
        }
    }
}

/// An event kind plus attribute predicates.
#[derive(Debug, Clone)]
pub struct Condition {
    /// Event kind (contract field name, e.g. `suspect_identified`).
    pub event: String,
    /// (proto3 JSON attribute name, accepted JSON values). All must hold.
    pub predicates: Vec<(String, Vec<serde_json::Value>)>,
}

/// A label of the referral that `applies_to` can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelField {
    Force,
    Category,
    Risk,
    ChildAgeBand,
    Area,
    Team,
}

impl LabelField {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "force" => LabelField::Force,
            "category" => LabelField::Category,
            "risk" => LabelField::Risk,
            "child_age_band" => LabelField::ChildAgeBand,
            "area" => LabelField::Area,
            "team" => LabelField::Team,
            _ => return None,
        })
    }
}

/// A per-force replacement of a rule's target or calendar.
#[derive(Debug, Clone, Default)]
pub struct Override {
    pub target: Option<Target>,
    pub targets_by_risk: HashMap<String, Target>,
    pub calendar: Option<CalendarChoice>,
}

/// One timescale, validated.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Stable id, used in metric labels, SLA events and record ids.
    pub id: String,
    /// What a supervisor reads in a notification.
    pub title: String,
    /// Where the timescale comes from.
    pub source: String,
    /// Force practice rather than national law: a default meant to be overridden.
    pub local: bool,
    /// The figure comes from secondary sources.
    pub unconfirmed: bool,
    pub severity: Severity,
    pub calendar: CalendarChoice,
    /// Default target.
    pub target: Target,
    /// Targets by the referral's current risk grade (recomputed when it is re-graded).
    pub targets_by_risk: HashMap<String, Target>,
    pub warnings: Vec<Warning>,
    /// Label predicates on the referral; every one must hold.
    pub applies_to: Vec<(LabelField, HashSet<String>)>,
    pub start: Vec<Condition>,
    pub stop: Vec<Condition>,
    pub pause: Vec<Condition>,
    pub resume: Vec<Condition>,
    pub reset: Vec<Condition>,
    pub cancel: Vec<Condition>,
    /// After a stop, the next clock starts at the stop time (e.g. detention reviews every 9 h).
    pub repeat: bool,
    /// Attribute (proto3 JSON name) that tells separate clocks of this rule apart on one referral
    /// (e.g. `deviceRef`: one clock per seized device).
    pub instance: Option<String>,
    pub overrides: HashMap<String, Override>,
}

impl Rule {
    /// The target for a referral of `force` currently graded `risk`.
    pub fn target_for(&self, force: &str, risk: &str) -> &Target {
        if let Some(o) = self.overrides.get(force) {
            if let Some(t) = o.targets_by_risk.get(risk) {
                return t;
            }
            if let Some(t) = &o.target {
                return t;
            }
        }
        self.targets_by_risk.get(risk).unwrap_or(&self.target)
    }

    /// The calendar for a referral of `force`.
    pub fn calendar_for(&self, force: &str) -> &CalendarChoice {
        self.overrides
            .get(force)
            .and_then(|o| o.calendar.as_ref())
            .unwrap_or(&self.calendar)
    }

    /// Whether the target can change with the risk grade.
    pub fn graded(&self) -> bool {
        !self.targets_by_risk.is_empty()
            || self
                .overrides
                .values()
                .any(|o| !o.targets_by_risk.is_empty())
    }

    /// Event kinds this rule reacts to.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.start
            .iter()
            .chain(&self.stop)
            .chain(&self.pause)
            .chain(&self.resume)
            .chain(&self.reset)
            .chain(&self.cancel)
            .map(|c| c.event.as_str())
    }
}

/// A validated set of rules with unique ids.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The default rule pack shipped in `deploy/rules/`.
    ///
    /// # Errors
    /// Only if the shipped pack is invalid (a test guards against that).
    pub fn default_pack() -> Result<Self, RuleError> {
        Self::from_sources(
            DEFAULT_PACK
                .iter()
                .map(|(f, s)| (f.to_string(), s.to_string())),
        )
    }

    /// Loads rules from files and directories (every `*.toml` in a directory, in name order).
    ///
    /// # Errors
    /// [`RuleError`] naming the file (and rule and field) that is wrong.
    pub fn load(paths: &[PathBuf]) -> Result<Self, RuleError> {
        let mut sources = Vec::new();
        for path in paths {
            for file in toml_files(path)? {
                let text = std::fs::read_to_string(&file).map_err(|e| RuleError::Read {
                    file: file.display().to_string(),
                    message: e.to_string(),
                })?;
                sources.push((file.display().to_string(), text));
            }
        }
        Self::from_sources(sources)
    }

    /// Parses and validates rule files given as (name, TOML text).
    ///
    /// # Errors
    /// [`RuleError`] naming the file (and rule and field) that is wrong.
    pub fn from_sources(
        sources: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, RuleError> {
        let kinds = event_kinds().map_err(|e| RuleError::Parse {
            file: "<schema>".into(),
            message: format!("compiled schema is unreadable: {e}"),
        })?;
        let mut rules: Vec<Rule> = Vec::new();
        let mut origin: HashMap<String, String> = HashMap::new();
        for (file, text) in sources {
            let parsed: RuleFile = toml::from_str(&text).map_err(|e| RuleError::Parse {
                file: file.clone(),
                message: e.to_string().trim_end().replace('\n', " "),
            })?;
            for spec in parsed.rule {
                let rule = compile(&file, spec, &kinds)?;
                if let Some(first) = origin.insert(rule.id.clone(), file.clone()) {
                    return Err(RuleError::Invalid {
                        file,
                        rule: rule.id,
                        field: "id".into(),
                        message: format!("already defined in {first}"),
                    });
                }
                rules.push(rule);
            }
        }
        Ok(Self { rules })
    }

    pub fn get(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Every calendar name the rules use (to check against the configured calendars).
    pub fn calendar_names(&self) -> HashSet<&str> {
        let mut out = HashSet::new();
        for r in &self.rules {
            if let CalendarChoice::Named(n) = &r.calendar {
                out.insert(n.as_str());
            }
            for o in r.overrides.values() {
                if let Some(CalendarChoice::Named(n)) = &o.calendar {
                    out.insert(n.as_str());
                }
            }
        }
        out
    }
}

fn toml_files(path: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let err = |e: std::io::Error| RuleError::Read {
        file: path.display().to_string(),
        message: e.to_string(),
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        Err(RuleError::Read {
            file: path.display().to_string(),
            message: "no such file or directory".into(),
        })
    }
}

/// Longest rule id: it is a metric label and part of every clock's state.
pub const MAX_RULE_ID_LEN: usize = 64;

const RISKS: [&str; 4] = ["low", "medium", "high", "very_high"];

fn compile(file: &str, spec: RuleSpec, kinds: &[EventKindInfo]) -> Result<Rule, RuleError> {
    let invalid = |field: &str, message: String| RuleError::Invalid {
        file: file.to_string(),
        rule: spec.id.clone(),
        field: field.to_string(),
        message,
    };
    if spec.id.is_empty()
        || spec.id.len() > MAX_RULE_ID_LEN
        || !spec
            .id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid(
            "id",
            format!(
                "must be 1-{MAX_RULE_ID_LEN} lower-case letters, digits and '-' (it becomes a \
                 metric label)"
            ),
        ));
    }
    if spec.title.trim().is_empty() {
        return Err(invalid("title", "must not be empty".into()));
    }
    if spec.source.trim().is_empty() {
        return Err(invalid(
            "source",
            "must cite where the timescale comes from".into(),
        ));
    }
    let severity = match spec.severity.as_str() {
        "info" => Severity::Info,
        "warning" => Severity::Warning,
        "high" => Severity::High,
        "critical" => Severity::Critical,
        other => {
            return Err(invalid(
                "severity",
                format!("{other:?} is not one of info, warning, high, critical"),
            ))
        }
    };
    let calendar = parse_calendar(&spec.calendar);
    let target = Target::parse(&spec.target).map_err(|e| invalid("target", e.to_string()))?;
    let targets_by_risk = parse_risk_targets(&spec.targets_by_risk)
        .map_err(|(k, m)| invalid(&format!("targets_by_risk.{k}"), m))?;
    if spec.warnings.len() > 32 {
        return Err(invalid("warnings", "at most 32 warnings per rule".into()));
    }
    let mut warnings = Vec::new();
    for (i, w) in spec.warnings.iter().enumerate() {
        warnings.push(parse_warning(w).map_err(|m| invalid(&format!("warnings[{i}]"), m))?);
    }
    let mut applies_to = Vec::new();
    for (label, values) in &spec.applies_to {
        let field = LabelField::parse(label).ok_or_else(|| {
            invalid(
                &format!("applies_to.{label}"),
                "is not a referral label (force, category, risk, child_age_band, area, team)"
                    .into(),
            )
        })?;
        if values.is_empty() {
            return Err(invalid(
                &format!("applies_to.{label}"),
                "lists no values".into(),
            ));
        }
        use crate::schema::v1::{AgeBand, Category, RiskGrade};
        let known: Option<Vec<String>> = match field {
            LabelField::Category => Some(enum_labels::<Category>(|c| c.as_str_name(), "CATEGORY_")),
            LabelField::Risk => Some(enum_labels::<RiskGrade>(|c| c.as_str_name(), "RISK_GRADE_")),
            LabelField::ChildAgeBand => {
                Some(enum_labels::<AgeBand>(|c| c.as_str_name(), "AGE_BAND_"))
            }
            _ => None,
        };
        if let Some(known) = known {
            if let Some(bad) = values.iter().find(|v| !known.contains(v)) {
                return Err(invalid(
                    &format!("applies_to.{label}"),
                    format!("{bad:?} is not one of {}", known.join(", ")),
                ));
            }
        }
        applies_to.push((field, values.iter().cloned().collect()));
    }
    let conditions = |name: &str, specs: &[ConditionSpec]| -> Result<Vec<Condition>, RuleError> {
        specs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                compile_condition(c, kinds).map_err(|(f, m)| invalid(&format!("{name}[{i}]{f}"), m))
            })
            .collect()
    };
    let start = conditions("start", &spec.start)?;
    let stop = conditions("stop", &spec.stop)?;
    if start.is_empty() {
        return Err(invalid("start", "needs at least one event".into()));
    }
    if stop.is_empty() {
        return Err(invalid("stop", "needs at least one event".into()));
    }
    let pause = conditions("pause", &spec.pause)?;
    let resume = conditions("resume", &spec.resume)?;
    if pause.is_empty() != resume.is_empty() {
        return Err(invalid(
            if pause.is_empty() { "pause" } else { "resume" },
            "pause and resume must be given together".into(),
        ));
    }
    let reset = conditions("reset", &spec.reset)?;
    let cancel = conditions("cancel", &spec.cancel)?;
    let instance = match &spec.instance {
        None => None,
        Some(name) => {
            let json = instance_attribute(name, &start, kinds).ok_or_else(|| {
                invalid(
                    "instance",
                    format!("{name:?} is not a string attribute of every start event"),
                )
            })?;
            if instance_attribute(name, &stop, kinds).is_none() {
                return Err(invalid(
                    "instance",
                    format!("{name:?} is not a string attribute of every stop event, so no stop could match its clock"),
                ));
            }
            Some(json)
        }
    };
    let mut overrides = HashMap::new();
    for (force, o) in &spec.overrides {
        let field = |f: &str| format!("overrides.{force}.{f}");
        let target = o
            .target
            .as_deref()
            .map(Target::parse)
            .transpose()
            .map_err(|e| invalid(&field("target"), e.to_string()))?;
        let targets_by_risk = parse_risk_targets(&o.targets_by_risk)
            .map_err(|(k, m)| invalid(&field(&format!("targets_by_risk.{k}")), m))?;
        overrides.insert(
            force.clone(),
            Override {
                target,
                targets_by_risk,
                calendar: o.calendar.as_deref().map(parse_calendar),
            },
        );
    }
    Ok(Rule {
        id: spec.id.clone(),
        title: spec.title.clone(),
        source: spec.source.clone(),
        local: spec.local,
        unconfirmed: spec.unconfirmed,
        severity,
        calendar,
        target,
        targets_by_risk,
        warnings,
        applies_to,
        start,
        stop,
        pause,
        resume,
        reset,
        cancel,
        repeat: spec.repeat,
        instance,
        overrides,
    })
}

/// The short label values of a contract enum (`grooming`, `very_high`, ...), zero value excluded.
fn enum_labels<E: TryFrom<i32>>(name: impl Fn(E) -> &'static str, prefix: &str) -> Vec<String> {
    (1..256)
        .filter_map(|i| E::try_from(i).ok())
        .map(|e| crate::schema::enum_label(name(e), prefix))
        .collect()
}

fn parse_calendar(name: &str) -> CalendarChoice {
    if name == "force" {
        CalendarChoice::Force
    } else {
        CalendarChoice::Named(name.to_string())
    }
}

fn parse_risk_targets(
    map: &BTreeMap<String, String>,
) -> Result<HashMap<String, Target>, (String, String)> {
    let mut out = HashMap::new();
    for (risk, target) in map {
        if !RISKS.contains(&risk.as_str()) {
            return Err((
                risk.clone(),
                format!("{risk:?} is not a risk grade (low, medium, high, very_high)"),
            ));
        }
        let t = Target::parse(target).map_err(|e| (risk.clone(), e.to_string()))?;
        out.insert(risk.clone(), t);
    }
    Ok(out)
}

fn parse_warning(text: &str) -> Result<Warning, String> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let pct: u32 = p
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: expected a percentage like \"75%\""))?;
        if pct == 0 || pct >= 100 {
            return Err(format!(
                "{text:?}: a warning percentage must be between 1 and 99"
            ));
        }
        return Ok(Warning::Percent(pct));
    }
    if let Some(d) = t.strip_suffix("before") {
        // Lead times are exact: "2h", "90 minutes", or whole days/weeks of 24 hours.
        let d = match Target::parse(d.trim()) {
            Ok(Target::Exact { seconds }) => i64::try_from(seconds.get())
                .ok()
                .map(SignedDuration::from_secs),
            Ok(Target::Civil {
                count,
                unit: safeclock_calendar::CivilUnit::Days,
            }) => Some(SignedDuration::from_hours(24 * i64::from(count.get()))),
            Ok(Target::Civil {
                count,
                unit: safeclock_calendar::CivilUnit::Weeks,
            }) => Some(SignedDuration::from_hours(7 * 24 * i64::from(count.get()))),
            _ => None,
        }
        .ok_or_else(|| {
            format!("{text:?}: expected a lead time like \"2h before\" or \"7 days before\"")
        })?;
        if d <= SignedDuration::ZERO {
            return Err(format!("{text:?}: a lead time must be positive"));
        }
        return Ok(Warning::Before(d));
    }
    Err(format!(
        "{text:?}: expected a percentage (\"75%\") or a lead time (\"2h before\")"
    ))
}

fn compile_condition(
    spec: &ConditionSpec,
    kinds: &[EventKindInfo],
) -> Result<Condition, (String, String)> {
    let kind = kinds.iter().find(|k| k.name == spec.event).ok_or_else(|| {
        (
            ".event".to_string(),
            format!(
                "{:?} is not an event kind of safeclock.v1.ReferralEvent (e.g. referral_received, victim_contacted)",
                spec.event
            ),
        )
    })?;
    let mut predicates = Vec::new();
    for (name, value) in &spec.predicates {
        let field = format!(".where.{name}");
        let attr = kind
            .attributes
            .iter()
            .find(|a| &a.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = kind.attributes.iter().map(|a| a.name.as_str()).collect();
                (
                    field.clone(),
                    format!(
                        "{} has no attribute {name:?} (it has: {})",
                        kind.name,
                        known.join(", ")
                    ),
                )
            })?;
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let mut accepted = Vec::new();
        for v in values {
            accepted.push(match (&attr.kind, v) {
                (AttributeType::Bool, toml::Value::Boolean(b)) => serde_json::Value::Bool(*b),
                (AttributeType::String, toml::Value::String(s)) => {
                    serde_json::Value::String(s.clone())
                }
                (AttributeType::Enum(names), toml::Value::String(s)) => {
                    // Accept the full name or the short one: "RESPONSE_GRADE_EMERGENCY" or
                    // "emergency" (the enum's common prefix, taken from its zero value, plus the
                    // short name: "high" never matches VERY_HIGH).
                    let prefix = names
                        .iter()
                        .find_map(|n| n.strip_suffix("UNSPECIFIED"))
                        .unwrap_or_default();
                    let short = format!("{prefix}{}", s.to_ascii_uppercase());
                    let full = names
                        .iter()
                        .find(|n| *n == s || **n == short)
                        .ok_or_else(|| {
                            (
                                field.clone(),
                                format!("{s:?} is not one of {}", names.join(", ")),
                            )
                        })?;
                    serde_json::Value::String(full.clone())
                }
                (t, v) => {
                    return Err((
                        field.clone(),
                        format!("{v} does not fit the attribute's type ({t:?})"),
                    ))
                }
            });
        }
        predicates.push((attr.json_name.clone(), accepted));
    }
    Ok(Condition {
        event: kind.name.clone(),
        predicates,
    })
}

fn instance_attribute(name: &str, start: &[Condition], kinds: &[EventKindInfo]) -> Option<String> {
    let mut json = None;
    for c in start {
        let kind = kinds.iter().find(|k| k.name == c.event)?;
        let attr = kind.attributes.iter().find(|a| a.name == name)?;
        if attr.kind != AttributeType::String {
            return None;
        }
        json = Some(attr.json_name.clone());
    }
    json
}

/// Bounds a label value to a known set: anything else becomes `other`, so a bad input cannot
/// create unbounded metric series.
#[derive(Debug, Clone)]
pub struct LabelSet {
    known: HashSet<String>,
}

impl LabelSet {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(values: I) -> Self {
        Self {
            known: values.into_iter().map(Into::into).collect(),
        }
    }

    /// `value` if known, else `"other"`.
    pub fn bound<'a>(&'a self, value: &'a str) -> &'a str {
        if self.known.contains(value) {
            value
        } else {
            "other"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<RuleSet, RuleError> {
        RuleSet::from_sources([("test.toml".to_string(), text.to_string())])
    }

    const MINIMAL: &str = r#"
[[rule]]
id = "suspect-with-access"
title = "Safeguarding action within 24 h of identifying a suspect with access to children"
source = "LOCAL"
severity = "critical"
target = "24h"
warnings = ["50%", "2h before"]
instance = "suspect_ref"
[[rule.start]]
event = "suspect_identified"
where = { suspect_has_access_to_children = true }
[[rule.stop]]
event = "safeguarding_action_recorded"
[rule.overrides.nottinghamshire]
target = "12h"
"#;

    #[test]
    fn a_valid_rule_compiles_with_predicates_instances_and_overrides() {
        let set = load(MINIMAL).unwrap();
        let r = set.get("suspect-with-access").unwrap();
        assert_eq!(
            r.start[0].predicates,
            vec![(
                "suspectHasAccessToChildren".to_string(),
                vec![serde_json::Value::Bool(true)]
            )]
        );
        assert_eq!(r.instance.as_deref(), Some("suspectRef"));
        assert_eq!(
            r.warnings,
            vec![
                Warning::Percent(50),
                Warning::Before(SignedDuration::from_hours(2))
            ]
        );
        assert_eq!(
            r.target_for("nottinghamshire", "high").to_string(),
            Target::parse("12h").unwrap().to_string()
        );
        assert_eq!(
            r.target_for("derbyshire", "high").to_string(),
            Target::parse("24h").unwrap().to_string()
        );
    }

    #[test]
    fn errors_name_the_file_the_rule_and_the_field() {
        let cases = [
            (
                MINIMAL.replace(
                    "event = \"suspect_identified\"",
                    "event = \"suspect_spotted\"",
                ),
                "start[0].event",
            ),
            (
                MINIMAL.replace("suspect_has_access_to_children = true", "has_access = true"),
                "start[0].where.has_access",
            ),
            (
                MINIMAL.replace(
                    "suspect_has_access_to_children = true",
                    "suspect_has_access_to_children = \"yes\"",
                ),
                "start[0].where.suspect_has_access_to_children",
            ),
            (
                MINIMAL.replace("target = \"24h\"", "target = \"soon\""),
                "target",
            ),
            (MINIMAL.replace("\"50%\"", "\"150%\""), "warnings[0]"),
            (
                MINIMAL.replace("severity = \"critical\"", "severity = \"dire\""),
                "severity",
            ),
            (
                MINIMAL.replace("target = \"12h\"", "target = \"12 parsecs\""),
                "overrides.nottinghamshire.target",
            ),
            (
                MINIMAL.replace("instance = \"suspect_ref\"", "instance = \"shoe_size\""),
                "instance",
            ),
        ];
        for (text, field) in cases {
            let err = load(&text).unwrap_err();
            let shown = err.to_string();
            assert!(
                shown.starts_with("test.toml: rule `suspect-with-access`: field `"),
                "{shown}"
            );
            assert!(
                shown.contains(&format!("`{field}`")),
                "expected field {field}: {shown}"
            );
        }
        let misspelt = MINIMAL.replace(
            "instance = \"suspect_ref\"",
            "instance = \"suspect_ref\"\napplies_to = { category = [\"groomng\"] }",
        );
        let err = load(&misspelt).unwrap_err().to_string();
        assert!(
            err.contains("`applies_to.category`") && err.contains("groomng"),
            "{err}"
        );
        let err = load(&MINIMAL.replace("severity =", "sevrity =")).unwrap_err();
        assert!(
            err.to_string().starts_with("test.toml:") && err.to_string().contains("sevrity"),
            "{err}"
        );
        let twice = format!(
            "{MINIMAL}\n{}",
            MINIMAL.replace("[rule.overrides.nottinghamshire]\ntarget = \"12h\"\n", "")
        );
        assert!(load(&twice)
            .unwrap_err()
            .to_string()
            .contains("already defined"));
    }

    #[test]
    fn enum_predicates_accept_short_names() {
        let text = r#"
[[rule]]
id = "emergency-response"
title = "Officer attends an emergency within 15 minutes"
source = "LOCAL"
local = true
severity = "critical"
target = "15m"
[[rule.start]]
event = "incident_graded"
where = { grade = "emergency" }
[[rule.stop]]
event = "officer_attended"
"#;
        let set = load(text).unwrap();
        assert_eq!(
            set.rules[0].start[0].predicates[0].1,
            vec![serde_json::Value::String("RESPONSE_GRADE_EMERGENCY".into())]
        );
    }

    #[test]
    fn the_default_pack_is_valid() {
        let set = RuleSet::default_pack().unwrap();
        assert!(set.rules.len() >= 20, "{} rules", set.rules.len());
    }
}
