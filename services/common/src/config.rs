//! Typed, layered, validated configuration.
//!
//! Layers, later ones winning: the built-in defaults (`defaults.toml`, compiled in), then an
//! optional `--config FILE` (TOML), then `SAFECLOCK__SECTION__KEY` environment variables. The
//! result is deserialized into [`Settings`] with unknown keys refused (a typo is an error, not a
//! silently ignored setting), then [`Settings::validate`] checks what types cannot. Every error
//! names the field. `safeclock check-config` runs exactly this.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::intake_config::{IntakeSettings, Secret, UnknownForces, ValidationSettings};

const DEFAULTS: &str = include_str!("defaults.toml");

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: `{field}` {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Everything a safeclock process can be told.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Force ids allowed as metric label values; others become "other".
    pub forces: Vec<String>,
    pub kafka: KafkaSettings,
    pub ops: OpsSettings,
    pub telemetry: TelemetrySettings,
    pub shutdown: ShutdownSettings,
    pub clock: ClockSettings,
    pub escalator: EscalatorSettings,
    pub exporter: ExporterSettings,
    pub rules: RulesSettings,
    pub calendars: CalendarSettings,
    /// The HTTP intake gateway (`safeclock run intake`).
    pub intake: IntakeSettings,
    /// Plausibility checks on referral events beyond their shape (event time, known force).
    pub validation: ValidationSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesSettings {
    /// Rule files or directories of `*.toml`; empty means the built-in default pack.
    /// Relative paths in a config file are relative to that file.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarSettings {
    /// Extra holiday feeds (published bank-holidays JSON format) merged over the built-in one.
    #[serde(default)]
    pub holiday_files: Vec<PathBuf>,
    /// School term closures (TOML) replacing or adding school calendars.
    #[serde(default)]
    pub school_terms_file: Option<PathBuf>,
    /// The working-day calendar of forces not listed in `by_force`.
    pub default_force_calendar: String,
    /// Force id -> working-day calendar name (e.g. a Scottish force -> "scotland").
    #[serde(default)]
    pub by_force: BTreeMap<String, String>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Create missing topics at start.
    pub create_topics: bool,
    /// Partitions of topics created at start.
    pub partitions: i32,
    /// Replication factor of topics created at start.
    pub replication_factor: i32,
    /// librdkafka properties for every client.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for producers only.
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

/// Property names whose values are secrets and never printed.
fn is_secret_key(key: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "keystore",
        "sasl.jaas",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| key.contains(s))
}

fn redacted(map: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter()
        .map(|(k, v)| {
            let shown = if is_secret_key(k) {
                "<redacted>"
            } else {
                v.as_str()
            };
            (k.as_str(), shown)
        })
        .collect()
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("properties", &redacted(&self.properties))
            .field("consumer_properties", &redacted(&self.consumer_properties))
            .field("producer_properties", &redacted(&self.producer_properties))
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSettings {
    /// Address of the HTTP ops endpoint (/metrics, /healthz, /readyz).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_period_secs: u64,
}

impl ShutdownSettings {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockSettings {
    pub group_id: String,
    pub tick_interval_ms: u64,
    pub max_batch: usize,
    /// Set to write outputs, state and input offsets in one Kafka transaction per batch (the
    /// broker must support transactions). Unique per clock instance. Unset: at-least-once with
    /// ordered acknowledgements and de-duplication by id, which needs no transactions.
    #[serde(default)]
    pub transactional_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalatorSettings {
    pub group_id: String,
    pub log_receiver: bool,
    pub escalate_warnings: bool,
    #[serde(default)]
    pub webhooks: Vec<WebhookSettings>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Name used in logs, metrics and the escalation log (never the URL).
    pub name: String,
    /// Where to POST; may carry a secret token, so it is never logged.
    pub url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff_ms() -> u64 {
    200
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("url", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExporterSettings {
    pub group_id: String,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("forces", &self.forces.len())
            .field("kafka", &self.kafka)
            .field("ops", &self.ops)
            .field("telemetry", &self.telemetry)
            .field("shutdown", &self.shutdown)
            .field("clock", &self.clock)
            .field("escalator", &self.escalator)
            .field("exporter", &self.exporter)
            .field("rules", &self.rules)
            .field("calendars", &self.calendars)
            .field("intake", &self.intake)
            .field("validation", &self.validation)
            .finish()
    }
}

/// librdkafka property names have no underscores, so `security_protocol` (as environment
/// variables must spell it) means `security.protocol`.
fn normalise_property_keys(map: &mut BTreeMap<String, String>) {
    let owned = std::mem::take(map);
    *map = owned
        .into_iter()
        .map(|(k, v)| (k.replace('_', "."), v))
        .collect();
}

impl Settings {
    /// Loads defaults, then `file` if given, then `SAFECLOCK__...` environment variables, and
    /// validates the result.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or field that is wrong.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or field that is wrong.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(invalid(
                    "--config",
                    format!("names {}, which is not a readable file", path.display()),
                ));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SAFECLOCK__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("SAFECLOCK")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("forces")
                .try_parsing(true)
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        if let Some(dir) = file.and_then(Path::parent) {
            settings.resolve_paths(dir);
        }
        normalise_property_keys(&mut settings.kafka.properties);
        normalise_property_keys(&mut settings.kafka.consumer_properties);
        normalise_property_keys(&mut settings.kafka.producer_properties);
        settings.validate()?;
        Ok(settings)
    }

    /// Makes relative data paths relative to the config file's directory, never to the
    /// process's working directory.
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        self.rules.paths.iter_mut().for_each(fix);
        self.calendars.holiday_files.iter_mut().for_each(fix);
        if let Some(p) = self.calendars.school_terms_file.as_mut() {
            fix(p);
        }
    }

    /// Built-in defaults only (the demo and tests start from these).
    ///
    /// # Errors
    /// Only if the compiled-in defaults are themselves invalid.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_with_env(None, std::iter::empty())
    }

    /// Checks what the types alone cannot.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first wrong field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must list at least one host:port"));
        }
        for b in self.kafka.brokers.split(',') {
            let b = b.trim();
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(invalid(
                    "kafka.brokers",
                    format!("entry {b:?} is not host:port"),
                ));
            }
        }
        let prefix_ok = self
            .kafka
            .topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !prefix_ok {
            return Err(invalid(
                "kafka.topic_prefix",
                "may contain only letters, digits, '.', '_' and '-'",
            ));
        }
        if self.kafka.partitions < 1 {
            return Err(invalid("kafka.partitions", "must be at least 1"));
        }
        if self.kafka.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        for (section, map) in [
            ("kafka.properties", &self.kafka.properties),
            ("kafka.consumer_properties", &self.kafka.consumer_properties),
            ("kafka.producer_properties", &self.kafka.producer_properties),
        ] {
            for key in map.keys() {
                if matches!(
                    key.as_str(),
                    "bootstrap.servers"
                        | "group.id"
                        | "enable.auto.offset.store"
                        | "enable.auto.commit"
                ) {
                    return Err(invalid(
                        format!("{section}.{key}"),
                        "is set by safeclock itself: offsets are stored only once effects are \
                         durable and committed by librdkafka (use kafka.brokers, <service>.group_id)",
                    ));
                }
            }
        }
        if self.forces.is_empty() {
            return Err(invalid("forces", "must name at least one force"));
        }
        if let Some(f) = self.forces.iter().find(|f| {
            f.is_empty()
                || !f
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        }) {
            return Err(invalid(
                "forces",
                format!("entry {f:?} must be a lower-case code like \"nottinghamshire\""),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.filter).is_err() {
            return Err(invalid(
                "telemetry.filter",
                "is not a valid tracing filter (e.g. \"info,rdkafka=warn\")",
            ));
        }
        for (field, group) in [
            ("clock.group_id", &self.clock.group_id),
            ("escalator.group_id", &self.escalator.group_id),
            ("exporter.group_id", &self.exporter.group_id),
        ] {
            if group.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        if !(10..=60_000).contains(&self.clock.tick_interval_ms) {
            return Err(invalid(
                "clock.tick_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.clock.max_batch == 0 {
            return Err(invalid("clock.max_batch", "must be at least 1"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.escalator.webhooks.iter().enumerate() {
            let field = |f: &str| format!("escalator.webhooks[{i}].{f}");
            if w.name.trim().is_empty() {
                return Err(invalid(field("name"), "must not be empty"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is used twice", w.name),
                ));
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid(field("url"), "must be an http:// or https:// URL"));
            }
            if w.max_attempts == 0 {
                return Err(invalid(field("max_attempts"), "must be at least 1"));
            }
            if w.timeout_ms == 0 {
                return Err(invalid(field("timeout_ms"), "must be at least 1"));
            }
        }
        self.intake.validate()?;
        self.validation.validate()?;
        Ok(())
    }

    /// The full name of a topic: the configured prefix plus its versioned name.
    pub fn topic(&self, topic: crate::kafka::Topic) -> String {
        format!("{}{}", self.kafka.topic_prefix, topic.base_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert!(s.forces.contains(&"nottinghamshire".to_string()));
    }

    #[test]
    fn file_then_env_override_defaults() {
        let f = file("[kafka]\nbrokers = \"file:9092\"\n[clock]\ntick_interval_ms = 250\n");
        let s = Settings::load_with_env(
            Some(f.path()),
            env(&[
                ("SAFECLOCK__KAFKA__BROKERS", "env:9093"),
                (
                    "SAFECLOCK__KAFKA__PROPERTIES__SECURITY_PROTOCOL",
                    "SASL_SSL",
                ),
                ("SAFECLOCK__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "env:9093");
        assert_eq!(s.clock.tick_interval_ms, 250);
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2"),
            "secrets must not print: {shown}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[clock]\ntick_interval_ms = \"soon\"\n", "tick_interval_ms"),
            ("[clock]\ntick_interval_ms = 1\n", "clock.tick_interval_ms"),
            ("[kafka]\nbrokers = \"nohostport\"\n", "kafka.brokers"),
            ("[kafka]\nbrokerz = \"a:1\"\n", "brokerz"),
            (
                "[[escalator.webhooks]]\nname = \"duty\"\nurl = \"ftp://x\"\n",
                "escalator.webhooks[0].url",
            ),
            ("[ops]\nlisten = \"not an address\"\n", "listen"),
        ];
        for (contents, field) in cases {
            let f = file(contents);
            let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
            assert!(
                err.to_string().contains(field),
                "error for {contents:?} should name {field}: {err}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/safeclock.toml")), env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("--config"), "{err}");
    }
}
