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

pub use crate::intake_config::{
    IntakeClientGrant, IntakeSettings, UnknownForces, ValidationSettings,
};
pub use crate::secret::Secret;
pub use crate::server::ServerSettings;
pub use crate::state_limits::ClockLimits;
pub use crate::time::TimeSettings;

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
    /// The wall clock: real, or shifted for a drill or a test.
    pub time: TimeSettings,
    /// Bounds on what a dead letter carries of the record it stands for.
    pub dead_letters: DeadLetterSettings,
    /// Erasing a referral (`safeclock erase`).
    pub erasure: ErasureSettings,
}

/// Erasing a referral: how the `erasures` topic names it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureSettings {
    /// The HMAC key under which erasure requests name a referral, the same for every service
    /// and `safeclock erase`. Unset, the hash is unkeyed and anyone who reads the `erasures`
    /// topic can test a guessed referral id against it: set it (from a secret store) in
    /// production. Changing it forgets which referrals were erased.
    #[serde(default)]
    pub key: Option<Secret>,
}

/// Bounds on a dead letter: every one must fit in a record the producer (and the broker) takes,
/// whatever the refused record was, or the dead letter itself would stop the partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// A value up to this size is kept whole; a larger one is replaced by its first
    /// `prefix_bytes`, with its length and SHA-256 in headers.
    pub max_payload_bytes: usize,
    /// How much of a value (or key) over its bound is kept.
    pub prefix_bytes: usize,
    /// The original headers are kept, in order, while their names and values add up to at most
    /// this; the rest are dropped and counted in a header.
    pub max_header_bytes: usize,
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

/// Retention, in days, of the topics that are not compacted: explicit for each, so that the
/// privacy inventory (docs/privacy.md) can say how long each kind of record is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRetention {
    /// `referral-events`: the input, replayed by a new clock instance or a report.
    pub referral_events_days: u32,
    /// `sla-events`: every clock transition, for the escalator, the exporter and data platforms.
    pub sla_events_days: u32,
    /// `escalation-log`: the audit trail of pages, acknowledgements, resolutions and API requests.
    pub escalation_log_days: u32,
    /// `dead-letter`: refused records, whole; short, because a refused record may hold what the
    /// contract refuses (free text, a name in the wrong field).
    pub dead_letter_days: u32,
    /// `erasures`: the erasure requests, which are also the erasure audit records and the list
    /// of referrals whose replayed records are refused; as long as the audit trail.
    pub erasures_days: u32,
    /// `sla-outcomes` (compacted, so not a topic retention): a closed clock's outcome is
    /// tombstoned this long after the clock stopped by `safeclock outcomes expire`.
    pub sla_outcomes_days: u32,
    /// The same for one force, by force id (its records-management policy).
    #[serde(default)]
    pub sla_outcomes_days_by_force: BTreeMap<String, u32>,
}

impl TopicRetention {
    /// The retention of `topic` in days; `None` for the compacted topics.
    pub fn days(&self, topic: crate::kafka::Topic) -> Option<u32> {
        use crate::kafka::Topic;
        match topic {
            Topic::ReferralEvents => Some(self.referral_events_days),
            Topic::SlaEvents => Some(self.sla_events_days),
            Topic::EscalationLog => Some(self.escalation_log_days),
            Topic::DeadLetter => Some(self.dead_letter_days),
            Topic::Erasures => Some(self.erasures_days),
            _ => None,
        }
    }

    /// How long a closed clock's outcome of `force` is kept.
    pub fn sla_outcomes_days_for(&self, force: &str) -> u32 {
        self.sla_outcomes_days_by_force
            .get(force)
            .copied()
            .unwrap_or(self.sla_outcomes_days)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, days) in [
            ("referral_events_days", self.referral_events_days),
            ("sla_events_days", self.sla_events_days),
            ("escalation_log_days", self.escalation_log_days),
            ("dead_letter_days", self.dead_letter_days),
            ("erasures_days", self.erasures_days),
            ("sla_outcomes_days", self.sla_outcomes_days),
        ]
        .into_iter()
        .chain(
            self.sla_outcomes_days_by_force
                .values()
                .map(|d| ("sla_outcomes_days_by_force", *d)),
        ) {
            if !(1..=36_500).contains(&days) {
                return Err(invalid(
                    format!("kafka.retention.{field}"),
                    "must be between 1 and 36500 days",
                ));
            }
        }
        Ok(())
    }
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
    /// Kafka topic configs (`retention.ms`, ...) of every topic safeclock creates
    /// (`create_topics`); an existing topic is left as it is.
    #[serde(default)]
    pub topic_configs: BTreeMap<String, String>,
    /// Kafka topic configs of the compacted topics safeclock creates (state and outcomes), after
    /// `topic_configs`; `cleanup.policy=compact` is always set.
    #[serde(default)]
    pub compacted_topic_configs: BTreeMap<String, String>,
    /// How long each topic that is not compacted keeps its records (its `retention.ms` at
    /// creation; it wins over a `retention.ms` in `topic_configs`).
    pub retention: TopicRetention,
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
            .field("topic_configs", &self.topic_configs)
            .field("compacted_topic_configs", &self.compacted_topic_configs)
            .field("retention", &self.retention)
            .finish()
    }
}

/// librdkafka's default `message.max.bytes`: the largest record a producer sends.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl KafkaSettings {
    /// Fails when the properties ask for a part of the Kafka client that this build lacks
    /// (`builtin` is librdkafka's `builtin.features`, [`crate::kafka::builtin_features`]):
    /// Kerberos (`sasl.mechanism=GSSAPI`, which is also librdkafka's default mechanism when
    /// `security.protocol` is SASL_* and no mechanism is set) without the cargo feature `gssapi`,
    /// or `sasl.oauthbearer.method=oidc` without `oidc`. librdkafka itself would refuse only when
    /// the first client is created, in its own words.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the property and the cargo feature to build with.
    pub fn check_client_features(&self, builtin: &[String]) -> Result<(), ConfigError> {
        let has = |f: &str| builtin.iter().any(|b| b == f);
        for (section, extra) in [
            ("kafka.consumer_properties", &self.consumer_properties),
            ("kafka.producer_properties", &self.producer_properties),
        ] {
            // Where an effective property comes from: the client's own section wins.
            let lookup = |key: &str| {
                extra
                    .get(key)
                    .map(|v| (format!("{section}.{key}"), v.trim()))
                    .or_else(|| {
                        self.properties
                            .get(key)
                            .map(|v| (format!("kafka.properties.{key}"), v.trim()))
                    })
            };
            let mechanism = lookup("sasl.mechanism").or_else(|| lookup("sasl.mechanisms"));
            if !has("sasl_gssapi") {
                let kerberos = match (&mechanism, lookup("security.protocol")) {
                    (Some((field, m)), _) if m.eq_ignore_ascii_case("GSSAPI") => {
                        Some((field.clone(), "asks for Kerberos (GSSAPI)".to_string(), ""))
                    }
                    (None, Some((field, p))) if p.to_ascii_uppercase().starts_with("SASL_") => {
                        Some((
                            field,
                            format!(
                                "is {p} without `sasl.mechanism`, which librdkafka then takes as \
                                 Kerberos (GSSAPI)"
                            ),
                            ". If Kerberos is not meant, set `sasl.mechanism` (PLAIN, \
                             SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)",
                        ))
                    }
                    _ => None,
                };
                if let Some((field, what, otherwise)) = kerberos {
                    return Err(invalid(
                        field,
                        format!(
                            "{what}, but this safeclock was built without Kerberos support. \
                             Build it with `cargo build --release -p safeclock --features gssapi` \
                             (needs the Cyrus SASL development files and its GSSAPI module: on \
                             Debian, libsasl2-dev and libsasl2-modules-gssapi-mit; \
                             docs/fresh-machine.md){otherwise}"
                        ),
                    ));
                }
            }
            if !has("oidc") {
                if let Some((field, m)) = lookup("sasl.oauthbearer.method") {
                    if m.eq_ignore_ascii_case("oidc") {
                        return Err(invalid(
                            field,
                            "asks for OAUTHBEARER tokens from an OIDC provider, but this \
                             safeclock was built without it. Build it with `cargo build --release \
                             -p safeclock --features oidc` (needs cmake; builds libcurl from \
                             source; docs/fresh-machine.md)",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The largest record safeclock's producers send (`message.max.bytes` of the producer
    /// properties, else of the shared ones, else librdkafka's default).
    pub fn producer_message_max_bytes(&self) -> usize {
        self.producer_properties
            .get("message.max.bytes")
            .or_else(|| self.properties.get("message.max.bytes"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSettings {
    /// Address of the HTTP ops endpoint (/metrics, /healthz, /readyz). Loopback by default:
    /// it has no authentication, so a deployment opens it to its scraper explicitly.
    pub listen: SocketAddr,
    /// Connection and request limits, timeouts and optional TLS of the ops listener.
    pub server: ServerSettings,
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
    /// How much the clock keeps per referral (`[clock.limits]`).
    pub limits: ClockLimits,
    /// Forget a referral that holds no clock (closed, or every clock stopped) this many days
    /// after its newest event: its state is tombstoned on `clock-state`. Needs
    /// `validation.max_past_days` at most as long, so that no event older than that can start
    /// its clocks again. Unset: closed referrals are kept (their state is small, but it names
    /// the referral).
    #[serde(default)]
    pub closed_retention_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalatorSettings {
    pub group_id: String,
    /// Adds a receiver named `log` that writes each notification as a log line.
    pub log_receiver: bool,
    /// Warnings escalate through a route's `policy` (not only an explicit `warning_policy`).
    pub escalate_warnings: bool,
    /// Shorthand for `[[escalator.receivers]]` of kind `webhook` (kept for existing configs).
    #[serde(default)]
    pub webhooks: Vec<WebhookSettings>,
    /// How often (real time) due levels, repeats and expired acknowledgements are checked.
    pub tick_interval_ms: u64,
    /// SLA events handled together before state is written and offsets stored.
    pub max_batch: usize,
    /// How long a resolved escalation is remembered, so a replayed breach does not reopen it.
    pub closed_retention_secs: u64,
    #[serde(default)]
    pub receivers: Vec<ReceiverSettings>,
    #[serde(default)]
    pub policies: Vec<PolicySettings>,
    /// The route tree, tried in order; the first match wins unless it says `continue`.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Where an SLA event goes when no route matches.
    pub default_route: DefaultRouteSettings,
    pub api: ApiSettings,
}

/// What kind of system a receiver talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverKind {
    /// A structured log line (target `safeclock::escalation`).
    Log,
    /// An HTTP POST of a JSON body, signed with HMAC-SHA256 when a secret is set.
    Webhook,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// Prometheus Alertmanager API v2.
    Alertmanager,
    /// Email over SMTP.
    Email,
}

/// How an email receiver secures its SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (a relay on localhost only).
    None,
    /// Upgrade with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// One place notifications can go. Which fields apply depends on `kind`; validation says which
/// are missing. Secret fields (`url`, `routing_key`, `secret`, `password`) may be written
/// `env:NAME` to read them from the environment variable `NAME` at start.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverSettings {
    /// Used in logs, metrics, routes and the escalation log (never the URL). Unique.
    pub name: String,
    pub kind: ReceiverKind,
    /// webhook: where to POST. alertmanager: the base URL (`/api/v2/alerts` is appended).
    /// pagerduty: the Events API endpoint (default `https://events.pagerduty.com/v2/enqueue`).
    #[serde(default)]
    pub url: Option<String>,
    /// pagerduty: the integration's routing key.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// webhook: HMAC-SHA256 key; the body is signed when set.
    #[serde(default)]
    pub secret: Option<String>,
    /// webhook: the JSON body, with `{{field}}` placeholders (see docs/escalation.md).
    #[serde(default)]
    pub template: Option<String>,
    /// alertmanager: how often a firing alert is posted again (Alertmanager forgets alerts that
    /// are not re-sent within its resolve_timeout).
    #[serde(default = "default_refresh_secs")]
    pub refresh_interval_secs: u64,
    /// email: SMTP relay host and port.
    #[serde(default)]
    pub smtp_host: Option<String>,
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default)]
    pub smtp_tls: SmtpTls,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    /// Per attempt.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts in total, the first one included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff before retry n is uniformly random in [0, min(max_backoff, initial * 2^n)].
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Requests per second to this receiver (a token bucket of `burst`).
    #[serde(default = "default_rate")]
    pub rate_per_sec: u32,
    #[serde(default = "default_rate")]
    pub burst: u32,
    /// Notifications in flight to this receiver at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Consecutive failed attempts that open the circuit breaker (0: never).
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker refuses attempts before one trial attempt.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Receiver that gets the notification when this one cannot be reached.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Accept an `http://` url on a host that is not loopback: only for a receiver inside a
    /// private network you trust (a compose network, an in-cluster Alertmanager). The
    /// notification, its signature and any routing key then cross that network unencrypted.
    #[serde(default)]
    pub allow_http: bool,
    /// What the notification may carry: `codes` (rule, force, codes, times and the escalation
    /// id, an opaque reference the acknowledgement API resolves) or `referral` (those and the
    /// referral id, the clock's instance reference and clock id). Unset: `codes` for every kind
    /// but `log`, because pagers, mailboxes and webhooks are often run by third parties.
    #[serde(default)]
    pub payload: Option<Payload>,
}

/// What a receiver's notifications may carry (`escalator.receivers[].payload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// Codes, times and the escalation id: nothing that names a referral.
    Codes,
    /// Codes and the referral id (with the clock id and its instance reference).
    Referral,
}

impl ReceiverSettings {
    /// The payload policy in force: as configured, else `codes` (`referral` for the log).
    pub fn payload(&self) -> Payload {
        self.payload.unwrap_or(match self.kind {
            ReceiverKind::Log => Payload::Referral,
            _ => Payload::Codes,
        })
    }
}

fn default_refresh_secs() -> u64 {
    60
}
fn default_max_backoff_ms() -> u64 {
    30_000
}
fn default_rate() -> u32 {
    50
}
fn default_concurrency() -> usize {
    32
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_ms() -> u64 {
    30_000
}

/// The default PagerDuty Events API v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Placeholders a webhook `template` may use; each is replaced by a JSON value.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "escalation_id",
    "dedup_key",
    "delivery_id",
    "notification",
    "receiver",
    "level",
    "repeat",
    "policy",
    "summary",
    "referral_id",
    "rule_id",
    "rule_title",
    "transition",
    "severity",
    "force",
    "area",
    "category",
    "risk",
    "team",
    "deadline",
    "status",
    "actor",
    "sla_event",
];

impl ReceiverSettings {
    /// A receiver of `kind` named `name` with every other field at its default.
    pub fn new(name: &str, kind: ReceiverKind) -> Self {
        Self {
            name: name.to_string(),
            kind,
            url: None,
            routing_key: None,
            secret: None,
            template: None,
            refresh_interval_secs: default_refresh_secs(),
            smtp_host: None,
            smtp_port: None,
            smtp_tls: SmtpTls::default(),
            username: None,
            password: None,
            from: None,
            to: Vec::new(),
            timeout_ms: default_timeout_ms(),
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            rate_per_sec: default_rate(),
            burst: default_rate(),
            concurrency: default_concurrency(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown_ms(),
            fallback: None,
            allow_http: false,
            payload: None,
        }
    }

    /// A webhook receiver (what a legacy `[[escalator.webhooks]]` entry means).
    pub fn webhook(w: &WebhookSettings) -> Self {
        Self {
            url: Some(w.url.clone()),
            timeout_ms: w.timeout_ms,
            max_attempts: w.max_attempts,
            initial_backoff_ms: w.initial_backoff_ms,
            ..Self::new(&w.name, ReceiverKind::Webhook)
        }
    }
}

impl fmt::Debug for ReceiverSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("ReceiverSettings")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &shown(&self.url))
            .field("routing_key", &shown(&self.routing_key))
            .field("secret", &shown(&self.secret))
            .field("template", &self.template.is_some())
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("smtp_tls", &self.smtp_tls)
            .field("username", &shown(&self.username))
            .field("password", &shown(&self.password))
            .field("to", &self.to.len())
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &self.burst)
            .field("concurrency", &self.concurrency)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown_ms", &self.breaker_cooldown_ms)
            .field("fallback", &self.fallback)
            .field("allow_http", &self.allow_http)
            .field("payload", &self.payload())
            .finish()
    }
}

/// An escalation policy: who is paged, in what order, how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub name: String,
    /// In order; level 1 first.
    pub levels: Vec<LevelSettings>,
    /// After the last level: page it again this often (0: never).
    #[serde(default)]
    pub repeat_interval_secs: u64,
    /// How many repeats at most.
    #[serde(default)]
    pub repeat_limit: u32,
    /// An acknowledgement lapses after this long and escalation resumes if the clock is still
    /// breached. Four hours unless set: an acknowledged breach nobody acts on is paged again
    /// rather than forgotten. 0 makes acknowledgements never lapse (say so on purpose).
    #[serde(default = "default_ack_expiry_secs")]
    pub ack_expiry_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelSettings {
    /// Wait after the previous level (after the escalation opened, for level 1).
    #[serde(default)]
    pub delay_secs: u64,
    pub receivers: Vec<String>,
}

/// One node of the route tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// For logs and docs only.
    #[serde(default)]
    pub name: String,
    /// Every listed key must match (one of its values); an empty match matches everything.
    #[serde(rename = "match", default)]
    pub matchers: RouteMatch,
    /// Policy for breaches (and warnings when `escalate_warnings` is set).
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub warning_policy: Option<String>,
    #[serde(default)]
    pub breach_policy: Option<String>,
    /// Keep trying the next sibling routes after this one matched.
    #[serde(rename = "continue", default)]
    pub continue_matching: bool,
    /// Child routes, tried when this route matches; the route itself applies if none does.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
}

/// Route matchers: each non-empty list must contain the SLA event's value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub force: Vec<String>,
    #[serde(default)]
    pub area: Vec<String>,
    #[serde(default)]
    pub team: Vec<String>,
    #[serde(default)]
    pub category: Vec<String>,
    #[serde(default)]
    pub risk: Vec<String>,
    #[serde(default)]
    pub rule: Vec<String>,
    /// `info`, `warning`, `high`, `critical`.
    #[serde(default)]
    pub severity: Vec<String>,
    /// `warning` or `breach`.
    #[serde(default)]
    pub threshold: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultRouteSettings {
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub warning_policy: Option<String>,
    #[serde(default)]
    pub breach_policy: Option<String>,
}

/// The acknowledgement API (list, acknowledge, resolve escalations).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Where the API listens. It is served only when at least one token is configured.
    pub listen: SocketAddr,
    /// Operator id -> bearer token. The operator id is recorded as who acknowledged; the token
    /// is a [`Secret`], never printed. Give each person (or tool) a token of their own: the id
    /// is the only "who" the audit log has.
    #[serde(default)]
    pub tokens: BTreeMap<String, Secret>,
    /// Operator id -> what that token may do and for which forces; every token has one, kept
    /// apart from the tokens so the grants can be reviewed without the secrets.
    #[serde(default)]
    pub operators: BTreeMap<String, OperatorGrant>,
    /// Failed authentications a peer may make at once before it is refused (429) ...
    pub auth_failure_burst: u32,
    /// ... and how many more it may make per minute after that.
    pub auth_failures_per_minute: u32,
    /// Connection and request limits, timeouts and optional TLS of the API's listener.
    pub server: ServerSettings,
}

/// [`PolicySettings::ack_expiry_secs`] when a policy does not set it: four hours.
pub const DEFAULT_ACK_EXPIRY_SECS: u64 = 4 * 3600;

fn default_ack_expiry_secs() -> u64 {
    DEFAULT_ACK_EXPIRY_SECS
}

/// What an acknowledgement-API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiScope {
    /// List open escalations (`GET /v1/escalations`).
    Read,
    /// Acknowledge one (`POST /v1/escalations/{id}/ack`).
    Acknowledge,
    /// Resolve one by hand (`POST /v1/escalations/{id}/resolve`).
    Resolve,
}

impl ApiScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiScope::Read => "read",
            ApiScope::Acknowledge => "acknowledge",
            ApiScope::Resolve => "resolve",
        }
    }
}

impl std::str::FromStr for ApiScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(ApiScope::Read),
            "acknowledge" => Ok(ApiScope::Acknowledge),
            "resolve" => Ok(ApiScope::Resolve),
            _ => Err("a scope is read, acknowledge or resolve".to_string()),
        }
    }
}

/// What one operator's API token may do, and for which forces' escalations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorGrant {
    /// `read`, `acknowledge`, `resolve`: a list, or one comma-separated string.
    #[serde(deserialize_with = "scopes")]
    pub scopes: Vec<ApiScope>,
    /// The forces whose escalations it sees and acts on; `["*"]` for every force.
    #[serde(deserialize_with = "crate::intake_config::list_or_commas")]
    pub forces: Vec<String>,
}

impl OperatorGrant {
    /// Every scope, every force (tests, the demo).
    pub fn everything() -> Self {
        Self {
            scopes: vec![ApiScope::Read, ApiScope::Acknowledge, ApiScope::Resolve],
            forces: vec![crate::auth::ALL_FORCES.to_string()],
        }
    }

    pub fn allows(&self, scope: ApiScope) -> bool {
        self.scopes.contains(&scope)
    }

    pub fn permits_force(&self, force: &str) -> bool {
        crate::auth::force_permitted(&self.forces, force)
    }
}

fn scopes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<ApiScope>, D::Error> {
    crate::intake_config::list_or_commas(deserializer)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl ApiSettings {
    /// Adds operator `id` with `token` and `grant` (tests build settings in code).
    pub fn add_operator(&mut self, id: &str, token: Secret, grant: OperatorGrant) {
        self.tokens.insert(id.to_string(), token);
        self.operators.insert(id.to_string(), grant);
    }

    /// Every token has a grant with at least one scope, every grant a token; granted forces
    /// are known ones.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the operator.
    pub fn validate_operators(&self, forces: &[String]) -> Result<(), ConfigError> {
        crate::auth::check_paired(
            &self.tokens,
            &self.operators,
            "escalator.api.tokens",
            "escalator.api.operators",
            "[escalator.api.operators.ID] scopes = [\"read\", \"acknowledge\"] \
             forces = [\"nottinghamshire\"]",
        )?;
        for (id, grant) in &self.operators {
            let field = format!("escalator.api.operators.{id}");
            if grant.scopes.is_empty() {
                return Err(invalid(
                    format!("{field}.scopes"),
                    "is empty: name at least one of read, acknowledge, resolve",
                ));
            }
            crate::auth::validate_forces(&format!("{field}.forces"), &grant.forces, forces)?;
        }
        Ok(())
    }
}

/// The name of the receiver `log_receiver` adds.
pub const LOG_RECEIVER: &str = "log";

/// Most levels in one escalation policy.
pub const MAX_POLICY_LEVELS: usize = 16;
/// Most receivers on one level.
pub const MAX_LEVEL_RECEIVERS: usize = 16;
/// Most repeats of a policy's last level.
pub const MAX_REPEAT_LIMIT: u32 = 1000;
/// The policy used when none is configured.
pub const DEFAULT_POLICY: &str = "default";

impl EscalatorSettings {
    /// Every receiver: `log` (if `log_receiver`), the legacy webhooks, then `receivers`.
    pub fn all_receivers(&self) -> Vec<ReceiverSettings> {
        let mut out = Vec::new();
        if self.log_receiver && !self.receivers.iter().any(|r| r.name == LOG_RECEIVER) {
            out.push(ReceiverSettings::new(LOG_RECEIVER, ReceiverKind::Log));
        }
        out.extend(self.webhooks.iter().map(ReceiverSettings::webhook));
        out.extend(self.receivers.iter().cloned());
        out
    }

    /// The configured policies, plus an implicit `default` (one level, at once, every receiver
    /// that is not only someone's fallback, no repeats) when none is named so.
    pub fn all_policies(&self) -> Vec<PolicySettings> {
        let mut out = self.policies.clone();
        if !out.iter().any(|p| p.name == DEFAULT_POLICY) {
            let receivers = self.all_receivers();
            let fallbacks: std::collections::HashSet<&str> = receivers
                .iter()
                .filter_map(|r| r.fallback.as_deref())
                .collect();
            out.push(PolicySettings {
                name: DEFAULT_POLICY.to_string(),
                levels: vec![LevelSettings {
                    delay_secs: 0,
                    receivers: receivers
                        .iter()
                        .filter(|r| !fallbacks.contains(r.name.as_str()))
                        .map(|r| r.name.clone())
                        .collect(),
                }],
                repeat_interval_secs: 0,
                repeat_limit: 0,
                ack_expiry_secs: DEFAULT_ACK_EXPIRY_SECS,
            });
        }
        out
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(10..=60_000).contains(&self.tick_interval_ms) {
            return Err(invalid(
                "escalator.tick_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.max_batch == 0 {
            return Err(invalid("escalator.max_batch", "must be at least 1"));
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let field = |f: &str| format!("escalator.webhooks[{i}].{f}");
            if w.name.trim().is_empty() {
                return Err(invalid(field("name"), "must not be empty"));
            }
            check_receiver_url(&w.url, false).map_err(|m| invalid(field("url"), m))?;
            if w.max_attempts == 0 {
                return Err(invalid(field("max_attempts"), "must be at least 1"));
            }
            if w.timeout_ms == 0 {
                return Err(invalid(field("timeout_ms"), "must be at least 1"));
            }
        }
        let receivers = self.all_receivers();
        let mut names = std::collections::HashSet::new();
        for r in &receivers {
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    receiver_field(self, &r.name, "name"),
                    format!("{:?} is used by two receivers", r.name),
                ));
            }
        }
        for (i, r) in self.receivers.iter().enumerate() {
            validate_receiver(i, r, &names)?;
        }
        let policies = self.all_policies();
        let mut policy_names = std::collections::HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let field = |f: &str| format!("escalator.policies[{i}].{f}");
            if !valid_name(&p.name) {
                return Err(invalid(field("name"), NAME_RULE));
            }
            if !policy_names.insert(p.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is used twice", p.name),
                ));
            }
            if p.levels.is_empty() {
                return Err(invalid(field("levels"), "must have at least one level"));
            }
            // An escalation's state records every notification it sent: these caps bound it.
            if p.levels.len() > MAX_POLICY_LEVELS {
                return Err(invalid(
                    field("levels"),
                    format!("must have at most {MAX_POLICY_LEVELS} levels"),
                ));
            }
            if p.repeat_limit > MAX_REPEAT_LIMIT {
                return Err(invalid(
                    field("repeat_limit"),
                    format!("must be at most {MAX_REPEAT_LIMIT}"),
                ));
            }
            for (l, level) in p.levels.iter().enumerate() {
                if level.receivers.len() > MAX_LEVEL_RECEIVERS {
                    return Err(invalid(
                        field(&format!("levels[{l}].receivers")),
                        format!("must name at most {MAX_LEVEL_RECEIVERS} receivers"),
                    ));
                }
                if level.receivers.is_empty() {
                    return Err(invalid(
                        field(&format!("levels[{l}].receivers")),
                        "must name at least one receiver",
                    ));
                }
                for r in &level.receivers {
                    if !names.contains(r.as_str()) {
                        return Err(invalid(
                            field(&format!("levels[{l}].receivers")),
                            format!("names {r:?}, which is not a configured receiver"),
                        ));
                    }
                }
            }
            if p.repeat_limit > 0 && p.repeat_interval_secs == 0 {
                return Err(invalid(
                    field("repeat_interval_secs"),
                    "must be set (at least 1) when repeat_limit is",
                ));
            }
        }
        let known: std::collections::HashSet<&str> =
            policies.iter().map(|p| p.name.as_str()).collect();
        let check_policy = |field: String, p: &Option<String>| -> Result<(), ConfigError> {
            match p {
                Some(name) if !known.contains(name.as_str()) => Err(invalid(
                    field,
                    format!("names {name:?}, which is not a configured policy"),
                )),
                _ => Ok(()),
            }
        };
        fn walk(
            routes: &[RouteSettings],
            path: &str,
            check: &PolicyCheck<'_>,
        ) -> Result<(), ConfigError> {
            for (i, r) in routes.iter().enumerate() {
                let here = format!("{path}[{i}]");
                check(format!("{here}.policy"), &r.policy)?;
                check(format!("{here}.warning_policy"), &r.warning_policy)?;
                check(format!("{here}.breach_policy"), &r.breach_policy)?;
                for t in &r.matchers.threshold {
                    if !matches!(t.as_str(), "warning" | "breach") {
                        return Err(invalid(
                            format!("{here}.match.threshold"),
                            format!("value {t:?} must be \"warning\" or \"breach\""),
                        ));
                    }
                }
                for s in &r.matchers.severity {
                    if !matches!(s.as_str(), "info" | "warning" | "high" | "critical") {
                        return Err(invalid(
                            format!("{here}.match.severity"),
                            format!("value {s:?} must be info, warning, high or critical"),
                        ));
                    }
                }
                walk(&r.routes, &format!("{here}.routes"), check)?;
            }
            Ok(())
        }
        walk(&self.routes, "escalator.routes", &check_policy)?;
        check_policy(
            "escalator.default_route.policy".into(),
            &self.default_route.policy,
        )?;
        check_policy(
            "escalator.default_route.warning_policy".into(),
            &self.default_route.warning_policy,
        )?;
        check_policy(
            "escalator.default_route.breach_policy".into(),
            &self.default_route.breach_policy,
        )?;
        for (actor, token) in &self.api.tokens {
            if !valid_name(actor) {
                return Err(invalid(format!("escalator.api.tokens.{actor}"), NAME_RULE));
            }
            if token.expose().len() < crate::intake_config::MIN_TOKEN_LEN {
                return Err(invalid(
                    format!("escalator.api.tokens.{actor}"),
                    "must be at least 16 characters (use a random token)",
                ));
            }
            if token.expose().chars().any(|c| !c.is_ascii_graphic()) {
                return Err(invalid(
                    format!("escalator.api.tokens.{actor}"),
                    "must be printable ASCII without spaces (it travels in an HTTP header)",
                ));
            }
        }
        if self.api.auth_failure_burst == 0 {
            return Err(invalid(
                "escalator.api.auth_failure_burst",
                "must be at least 1",
            ));
        }
        if self.api.auth_failures_per_minute == 0 {
            return Err(invalid(
                "escalator.api.auth_failures_per_minute",
                "must be at least 1",
            ));
        }
        self.api.server.validate("escalator.api.server")?;
        if self.closed_retention_secs == 0 {
            return Err(invalid(
                "escalator.closed_retention_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Checks that a route's policy name exists.
type PolicyCheck<'a> = dyn Fn(String, &Option<String>) -> Result<(), ConfigError> + 'a;

const NAME_RULE: &str = "must be 1-64 characters: lower-case letters, digits, '-' or '_'";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn receiver_field(s: &EscalatorSettings, name: &str, field: &str) -> String {
    match s.receivers.iter().position(|r| r.name == name) {
        Some(i) => format!("escalator.receivers[{i}].{field}"),
        None => format!("escalator.webhooks.{field}"),
    }
}

fn validate_receiver(
    i: usize,
    r: &ReceiverSettings,
    names: &std::collections::HashSet<&str>,
) -> Result<(), ConfigError> {
    let field = |f: &str| format!("escalator.receivers[{i}].{f}");
    if !valid_name(&r.name) {
        return Err(invalid(field("name"), NAME_RULE));
    }
    let http_url = |u: &Option<String>, required: bool| -> Result<(), ConfigError> {
        match u {
            None if required => Err(invalid(field("url"), "is required for this kind")),
            Some(u) => check_receiver_url(u, r.allow_http).map_err(|m| invalid(field("url"), m)),
            None => Ok(()),
        }
    };
    let not_for_kind = |present: bool, f: &str| -> Result<(), ConfigError> {
        if present {
            Err(invalid(
                field(f),
                format!("does not apply to a receiver of kind {:?}", r.kind),
            ))
        } else {
            Ok(())
        }
    };
    match r.kind {
        ReceiverKind::Log => {
            not_for_kind(r.url.is_some(), "url")?;
        }
        ReceiverKind::Webhook => {
            http_url(&r.url, true)?;
            if r.secret.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(invalid(
                    field("secret"),
                    "must not be empty: an empty HMAC key signs nothing anyone could not forge \
                     (leave it unset to send unsigned bodies)",
                ));
            }
            if let Some(t) = &r.template {
                check_template(t).map_err(|m| invalid(field("template"), m))?;
                if r.payload() == Payload::Codes && t.contains("referral_id") {
                    return Err(invalid(
                        field("template"),
                        "uses {{referral_id}}, but this receiver's payload is `codes`: set \
                         payload = \"referral\" if the force allows it the referral id",
                    ));
                }
            }
        }
        ReceiverKind::Pagerduty => {
            http_url(&r.url, false)?;
            match &r.routing_key {
                None => return Err(invalid(field("routing_key"), "is required for pagerduty")),
                Some(k) if k.trim().is_empty() => {
                    return Err(invalid(field("routing_key"), "must not be empty"))
                }
                _ => {}
            }
            not_for_kind(r.template.is_some(), "template")?;
        }
        ReceiverKind::Alertmanager => {
            http_url(&r.url, true)?;
            if r.refresh_interval_secs == 0 {
                return Err(invalid(
                    field("refresh_interval_secs"),
                    "must be at least 1",
                ));
            }
            not_for_kind(r.template.is_some(), "template")?;
        }
        ReceiverKind::Email => {
            not_for_kind(r.url.is_some(), "url")?;
            if r.smtp_host.as_deref().is_none_or(|h| h.trim().is_empty()) {
                return Err(invalid(field("smtp_host"), "is required for email"));
            }
            if r.from.as_deref().is_none_or(|f| !f.contains('@')) {
                return Err(invalid(field("from"), "must be an email address"));
            }
            if r.to.is_empty() {
                return Err(invalid(field("to"), "must list at least one address"));
            }
            if let Some(t) = r.to.iter().find(|t| !t.contains('@')) {
                return Err(invalid(
                    field("to"),
                    format!("{t:?} is not an email address"),
                ));
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(invalid(
                    field("password"),
                    "username and password must be set together",
                ));
            }
            if r.password.is_some() && r.smtp_tls == SmtpTls::None {
                return Err(invalid(
                    field("password"),
                    "must not be sent over plain SMTP: set smtp_tls to \"starttls\" or \"tls\"",
                ));
            }
        }
    }
    if r.max_attempts == 0 {
        return Err(invalid(field("max_attempts"), "must be at least 1"));
    }
    if r.timeout_ms == 0 {
        return Err(invalid(field("timeout_ms"), "must be at least 1"));
    }
    if r.max_backoff_ms < r.initial_backoff_ms {
        return Err(invalid(
            field("max_backoff_ms"),
            "must be at least initial_backoff_ms",
        ));
    }
    if r.rate_per_sec == 0 || r.burst == 0 {
        return Err(invalid(
            field("rate_per_sec"),
            "rate_per_sec and burst must be at least 1",
        ));
    }
    if r.concurrency == 0 {
        return Err(invalid(field("concurrency"), "must be at least 1"));
    }
    if let Some(fb) = &r.fallback {
        if fb == &r.name {
            return Err(invalid(field("fallback"), "must name another receiver"));
        }
        if !names.contains(fb.as_str()) {
            return Err(invalid(
                field("fallback"),
                format!("names {fb:?}, which is not a configured receiver"),
            ));
        }
    }
    Ok(())
}

/// Checks a receiver URL: `https://`, or `http://` only to a loopback address (127.0.0.0/8,
/// `::1`, `localhost`) unless `allow_http` says the network in between is trusted. The message
/// never quotes the URL: it may carry a token.
fn check_receiver_url(u: &str, allow_http: bool) -> Result<(), String> {
    let url = url::Url::parse(u).map_err(|e| format!("is not a valid URL ({e})"))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.eq_ignore_ascii_case("localhost.")
        }
        None => return Err("must name a host".into()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_http => Ok(()),
        "http" => Err(
            "must be an https:// URL: http:// is accepted only to a loopback address \
             (127.0.0.0/8, ::1, localhost), or with allow_http = true for a receiver inside a \
             private network"
                .into(),
        ),
        _ => Err("must be an https:// URL".into()),
    }
}

/// Checks a webhook template: known placeholders only, and valid JSON once they are filled.
fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    let mut filled = String::new();
    while let Some(start) = rest.find("{{") {
        filled.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "has a \"{{\" without a closing \"}}\"".to_string())?;
        let name = after[..end].trim();
        if !TEMPLATE_FIELDS.contains(&name) {
            return Err(format!(
                "uses {{{{{name}}}}}, which is not one of {}",
                TEMPLATE_FIELDS.join(", ")
            ));
        }
        filled.push_str("null");
        rest = &after[end + 2..];
    }
    filled.push_str(rest);
    serde_json::from_str::<serde_json::Value>(&filled)
        .map(|_| ())
        .map_err(|e| format!("is not JSON once its placeholders are filled: {e}"))
}

/// Reads `env:NAME` values from the environment.
fn resolve_env_value(
    value: &mut Option<String>,
    field: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    if let Some(name) = value.as_deref().and_then(|v| v.strip_prefix("env:")) {
        match env.get(name) {
            Some(v) if !v.is_empty() => *value = Some(v.clone()),
            _ => {
                return Err(invalid(
                    field,
                    format!("reads the environment variable {name}, which is not set"),
                ))
            }
        }
    }
    Ok(())
}

/// A legacy `[[escalator.webhooks]]` entry: a webhook receiver with default delivery settings.
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
            .field("dead_letters", &self.dead_letters)
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
        let all_env: BTreeMap<String, String> = env.into_iter().collect();
        let env: config::Map<String, String> = all_env
            .iter()
            .filter(|(k, _)| k.starts_with("SAFECLOCK__"))
            .map(|(k, v)| (k.clone(), v.clone()))
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
        normalise_property_keys(&mut settings.kafka.topic_configs);
        normalise_property_keys(&mut settings.kafka.compacted_topic_configs);
        for (i, r) in settings.escalator.receivers.iter_mut().enumerate() {
            let field = |f: &str| format!("escalator.receivers[{i}].{f}");
            resolve_env_value(&mut r.url, &field("url"), &all_env)?;
            resolve_env_value(&mut r.routing_key, &field("routing_key"), &all_env)?;
            resolve_env_value(&mut r.secret, &field("secret"), &all_env)?;
            resolve_env_value(&mut r.password, &field("password"), &all_env)?;
        }
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
        self.ops.server.resolve_paths(dir);
        self.intake.server.resolve_paths(dir);
        self.escalator.api.server.resolve_paths(dir);
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
        self.kafka.retention.validate()?;
        if let Some(force) = self
            .kafka
            .retention
            .sla_outcomes_days_by_force
            .keys()
            .find(|f| !self.forces.contains(f))
        {
            return Err(invalid(
                format!("kafka.retention.sla_outcomes_days_by_force.{force}"),
                "is not a force listed in `forces`",
            ));
        }
        if let Some(policy) = self.kafka.compacted_topic_configs.get("cleanup.policy") {
            if !policy.split(',').any(|p| p.trim() == "compact") {
                return Err(invalid(
                    "kafka.compacted_topic_configs.cleanup.policy",
                    "must include compact: the state and outcome topics keep the latest record per key",
                ));
            }
        }
        self.kafka
            .check_client_features(&crate::kafka::builtin_features())?;
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
        self.clock.limits.validate(&self.validation)?;
        if let Some(days) = self.clock.closed_retention_days {
            if !(1..=36_500).contains(&days) {
                return Err(invalid(
                    "clock.closed_retention_days",
                    "must be between 1 and 36500 (or unset)",
                ));
            }
            if self.validation.max_past_days.is_none_or(|p| p > days) {
                return Err(invalid(
                    "clock.closed_retention_days",
                    "needs validation.max_past_days set and at most as long: otherwise a \
                     replayed event older than the retention would start a forgotten referral's \
                     clocks again",
                ));
            }
        }
        self.ops.server.validate("ops.server")?;
        self.escalator.validate()?;
        if !self.escalator.api.tokens.is_empty() && self.escalator.api.listen == self.ops.listen {
            return Err(invalid(
                "escalator.api.listen",
                "must differ from ops.listen: the acknowledgement API has a listener of its own",
            ));
        }
        self.escalator.api.validate_operators(&self.forces)?;
        self.intake.validate()?;
        self.intake.validate_clients(&self.forces)?;
        self.validation.validate()?;
        self.time
            .validate()
            .map_err(|m| invalid("time.offset_secs", m))?;
        self.validate_dead_letters()?;
        Ok(())
    }

    /// Room a dead letter needs besides the kept value, key and original headers: safeclock's
    /// own headers (reason, error, service, source, length, hash) and the record's framing.
    pub const DEAD_LETTER_OVERHEAD: usize = 8 * 1024;

    fn validate_dead_letters(&self) -> Result<(), ConfigError> {
        let d = &self.dead_letters;
        if d.max_payload_bytes < 1024 {
            return Err(invalid(
                "dead_letters.max_payload_bytes",
                "must be at least 1024",
            ));
        }
        if d.prefix_bytes > d.max_payload_bytes {
            return Err(invalid(
                "dead_letters.prefix_bytes",
                "must not exceed dead_letters.max_payload_bytes",
            ));
        }
        let largest = d
            .max_payload_bytes
            .saturating_add(d.max_header_bytes)
            .saturating_add(d.prefix_bytes)
            .saturating_add(Self::DEAD_LETTER_OVERHEAD);
        let limit = self.kafka.producer_message_max_bytes();
        if largest > limit {
            return Err(invalid(
                "dead_letters.max_payload_bytes",
                format!(
                    "with max_header_bytes, a key of prefix_bytes and {} bytes of safeclock's own \
                     headers, a dead letter could be {largest} bytes, over the producer's \
                     message.max.bytes ({limit}): a dead letter must always fit",
                    Self::DEAD_LETTER_OVERHEAD
                ),
            ));
        }
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
    fn a_topic_config_set_in_the_file_or_the_environment_wins_over_the_default() {
        let quoted = file("[kafka.compacted_topic_configs]\n\"segment.ms\" = \"10000\"\n");
        let s = Settings::load_with_env(Some(quoted.path()), env(&[])).unwrap();
        assert_eq!(s.kafka.compacted_topic_configs["segment.ms"], "10000");
        let underscored = file("[kafka.compacted_topic_configs]\nsegment_ms = \"20000\"\n");
        let s = Settings::load_with_env(Some(underscored.path()), env(&[])).unwrap();
        assert_eq!(s.kafka.compacted_topic_configs["segment.ms"], "20000");
        let s = Settings::load_with_env(
            None,
            env(&[(
                "SAFECLOCK__KAFKA__COMPACTED_TOPIC_CONFIGS__SEGMENT_MS",
                "30000",
            )]),
        )
        .unwrap();
        assert_eq!(s.kafka.compacted_topic_configs["segment.ms"], "30000");
        let s = Settings::defaults().unwrap();
        assert_eq!(s.kafka.compacted_topic_configs["segment.ms"], "21600000");
        assert_eq!(s.kafka.compacted_topic_configs.len(), 2);
    }

    #[test]
    fn a_dead_letter_always_fits_in_what_the_producer_sends() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.dead_letters.max_payload_bytes, 256 * 1024);
        assert_eq!(s.kafka.producer_message_max_bytes(), 1_000_000);
        let err = Settings::load_with_env(
            None,
            env(&[(
                "SAFECLOCK__KAFKA__PRODUCER_PROPERTIES__MESSAGE_MAX_BYTES",
                "200000",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dead_letters.max_payload_bytes"), "{err}");
        assert!(err.contains("200000"), "{err}");
        let s = Settings::load_with_env(
            None,
            env(&[
                (
                    "SAFECLOCK__KAFKA__PRODUCER_PROPERTIES__MESSAGE_MAX_BYTES",
                    "200000",
                ),
                ("SAFECLOCK__DEAD_LETTERS__MAX_PAYLOAD_BYTES", "65536"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.producer_message_max_bytes(), 200_000);
        let err = Settings::load_with_env(
            None,
            env(&[("SAFECLOCK__DEAD_LETTERS__PREFIX_BYTES", "300000")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dead_letters.prefix_bytes"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert!(s.forces.contains(&"nottinghamshire".to_string()));
    }

    #[test]
    fn every_listener_binds_loopback_unless_told_otherwise() {
        let s = Settings::defaults().unwrap();
        for (name, addr) in [
            ("ops.listen", s.ops.listen),
            ("intake.listen", s.intake.listen),
            ("escalator.api.listen", s.escalator.api.listen),
        ] {
            assert!(addr.ip().is_loopback(), "{name} = {addr}");
        }
        let s = Settings::load_with_env(
            None,
            env(&[
                ("SAFECLOCK__OPS__LISTEN", "0.0.0.0:9464"),
                ("SAFECLOCK__INTAKE__SERVER__MAX_CONNECTIONS", "2000"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ops.listen.to_string(), "0.0.0.0:9464");
        assert_eq!(s.intake.server.max_connections, 2000);
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
                (
                    "SAFECLOCK__KAFKA__PROPERTIES__SASL_MECHANISM",
                    "SCRAM-SHA-512",
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
            (
                "[intake.server]\nmax_connections = 0\n",
                "intake.server.max_connections",
            ),
            (
                "[ops.server]\ntls_cert_file = \"cert.pem\"\n",
                "ops.server.tls_key_file",
            ),
            (
                "[escalator.api.server]\nheader_read_timeout_ms = 1\n",
                "escalator.api.server.header_read_timeout_ms",
            ),
            (
                "[intake]\nauth_failure_burst = 0\n",
                "intake.auth_failure_burst",
            ),
            (
                "[escalator.api]\nauth_failures_per_minute = 0\n",
                "escalator.api.auth_failures_per_minute",
            ),
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
    fn escalator_errors_name_the_field() {
        let receivers = r#"
[[escalator.receivers]]
name = "pd"
kind = "pagerduty"
routing_key = "rk-0123456789"
[[escalator.receivers]]
name = "am"
kind = "alertmanager"
url = "http://am:9093"
allow_http = true
[[escalator.receivers]]
name = "hook"
kind = "webhook"
url = "https://hooks.example/x"
secret = "hmac-secret"
[[escalator.receivers]]
name = "local"
kind = "webhook"
url = "http://127.0.0.2:8080/x"
[[escalator.receivers]]
name = "local6"
kind = "webhook"
url = "http://[::1]:8080/x"
[[escalator.receivers]]
name = "localname"
kind = "webhook"
url = "http://LOCALHOST:8080/x"
[[escalator.receivers]]
name = "relay"
kind = "email"
smtp_host = "127.0.0.1"
smtp_tls = "none"
from = "a@b"
to = ["c@d"]
"#;
        let cases = [
            ("[[escalator.receivers]]\nname = \"x\"\nkind = \"pagerduty\"\n", "escalator.receivers[0].routing_key"),
            ("[[escalator.receivers]]\nname = \"x\"\nkind = \"webhook\"\n", "escalator.receivers[0].url"),
            ("[[escalator.receivers]]\nname = \"x\"\nkind = \"carrier-pigeon\"\n", "kind"),
            ("[[escalator.receivers]]\nname = \"Bad Name\"\nkind = \"log\"\n", "escalator.receivers[0].name"),
            ("[[escalator.receivers]]\nname = \"log\"\nkind = \"log\"\n[[escalator.receivers]]\nname = \"log\"\nkind = \"log\"\n", "escalator.receivers[0].name"),
            ("[[escalator.receivers]]\nname = \"m\"\nkind = \"email\"\nsmtp_host = \"mx\"\nfrom = \"a@b\"\n", "escalator.receivers[0].to"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"https://x\"\ntemplate = \"{ {{nope}} }\"\n", "escalator.receivers[0].template"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"https://x\"\ntemplate = \"{\\\"a\\\": {{summary}}\"\n", "escalator.receivers[0].template"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"https://x\"\nfallback = \"nobody\"\n", "escalator.receivers[0].fallback"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"env:NOT_SET_ANYWHERE\"\n", "escalator.receivers[0].url"),
            ("[[escalator.policies]]\nname = \"p\"\nlevels = []\n", "escalator.policies[0].levels"),
            ("[[escalator.policies]]\nname = \"p\"\nlevels = [{ receivers = [\"ghost\"] }]\n", "escalator.policies[0].levels[0].receivers"),
            ("[escalator]\nlog_receiver = true\n[[escalator.policies]]\nname = \"p\"\nrepeat_limit = 3\nlevels = [{ receivers = [\"log\"] }]\n", "escalator.policies[0].repeat_interval_secs"),
            ("[[escalator.routes]]\npolicy = \"ghost\"\n", "escalator.routes[0].policy"),
            ("[[escalator.routes]]\n[[escalator.routes.routes]]\nmatch = { threshold = [\"breached\"] }\n", "escalator.routes[0].routes[0].match.threshold"),
            ("[[escalator.routes]]\nmatch = { colour = [\"red\"] }\n", "colour"),
            ("[escalator.default_route]\nbreach_policy = \"ghost\"\n", "escalator.default_route.breach_policy"),
            ("[escalator.api.tokens]\nduty = \"short\"\n", "escalator.api.tokens.duty"),
            ("[clock]\nclosed_retention_days = 30\n", "clock.closed_retention_days"),
            ("[clock]\nclosed_retention_days = 30\n[validation]\nmax_past_days = 31\n", "clock.closed_retention_days"),
            ("[kafka.retention]\nreferral_events_days = 0\nsla_events_days = 1\nescalation_log_days = 1\ndead_letter_days = 1\n", "kafka.retention.referral_events_days"),
            ("[kafka.retention.sla_outcomes_days_by_force]\natlantis = 3650\n", "kafka.retention.sla_outcomes_days_by_force.atlantis"),
            ("[kafka.retention.sla_outcomes_days_by_force]\nderbyshire = 0\n", "kafka.retention.sla_outcomes_days_by_force"),
            ("[escalator.api.tokens]\nduty = \"long-enough-token-0123\"\n", "escalator.api.operators.duty"),
            ("[escalator.api.tokens]\nduty = \"long-enough-token-0123\"\n[escalator.api.operators.duty]\nscopes = [\"admin\"]\nforces = [\"*\"]\n", "read, acknowledge or resolve"),
            ("[escalator.api.tokens]\nduty = \"long-enough-token-0123\"\n[escalator.api.operators.duty]\nscopes = []\nforces = [\"*\"]\n", "escalator.api.operators.duty.scopes"),
            ("[escalator.api.tokens]\nduty = \"long-enough-token-0123\"\n[escalator.api.operators.duty]\nscopes = [\"read\"]\nforces = [\"atlantis\"]\n", "escalator.api.operators.duty.forces"),
            // Outbound: https except on loopback, a real HMAC key, no SMTP password in clear.
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://hooks.example/t0ps3cret\"\n", "escalator.receivers[0].url"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1.example/x\"\n", "escalator.receivers[0].url"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://10.0.0.1/x\"\n", "escalator.receivers[0].url"),
            ("[[escalator.receivers]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://alertmanager:9093\"\n", "escalator.receivers[0].url"),
            ("[[escalator.receivers]]\nname = \"pd\"\nkind = \"pagerduty\"\nrouting_key = \"rk-0123\"\nurl = \"http://events.example/v2/enqueue\"\n", "escalator.receivers[0].url"),
            ("[[escalator.webhooks]]\nname = \"duty\"\nurl = \"http://duty.example/hook\"\n", "escalator.webhooks[0].url"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"https://hooks.example/x\"\nsecret = \"\"\n", "escalator.receivers[0].secret"),
            ("[[escalator.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"https://hooks.example/x\"\nsecret = \"   \"\n", "escalator.receivers[0].secret"),
            ("[[escalator.receivers]]\nname = \"m\"\nkind = \"email\"\nsmtp_host = \"mx\"\nsmtp_tls = \"none\"\nfrom = \"a@b\"\nto = [\"c@d\"]\nusername = \"u\"\npassword = \"hunter2\"\n", "escalator.receivers[0].password"),
        ];
        for (contents, field) in cases {
            let f = file(contents);
            let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
            assert!(
                err.to_string().contains(field),
                "error for {contents:?} should name {field}: {err}"
            );
        }
        let f = file(receivers);
        Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
    }

    #[test]
    fn receiver_urls_need_https_except_on_loopback() {
        for ok in [
            "https://hooks.example/x",
            "https://10.0.0.1/x",
            "http://127.0.0.1:9093",
            "http://127.255.0.9/x",
            "http://[::1]:8080/x",
            "http://localhost/x",
            "http://LocalHost./x",
        ] {
            check_receiver_url(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for refused in [
            "http://hooks.example/t0ps3cret",
            "http://10.0.0.1/t0ps3cret",
            "http://[::2]/t0ps3cret",
            "http://localhost.example/t0ps3cret",
            "http://127.0.0.1.nip.example/t0ps3cret",
            "ftp://127.0.0.1/t0ps3cret",
            "t0ps3cret",
        ] {
            let e = check_receiver_url(refused, false).unwrap_err();
            assert!(!e.contains("t0ps3cret"), "the URL is never quoted: {e}");
        }
        check_receiver_url("http://alertmanager:9093", true).unwrap();
        assert!(check_receiver_url("ftp://alertmanager:9093", true).is_err());
    }

    #[test]
    fn receiver_secrets_come_from_the_environment_and_never_print() {
        let f = file(
            r#"
[[escalator.receivers]]
name = "pd"
kind = "pagerduty"
routing_key = "env:PD_ROUTING_KEY"
[[escalator.receivers]]
name = "hook"
kind = "webhook"
url = "https://hooks.example/t0ps3cret-url"
secret = "env:HOOK_SECRET"
"#,
        );
        let s = Settings::load_with_env(
            Some(f.path()),
            env(&[
                ("PD_ROUTING_KEY", "pd-key-from-env-123"),
                ("HOOK_SECRET", "hmac-secret-from-env"),
                (
                    "SAFECLOCK__ESCALATOR__API__TOKENS__DUTY_DESK",
                    "api-token-from-env-0123456789",
                ),
                (
                    "SAFECLOCK__ESCALATOR__API__OPERATORS__DUTY_DESK__SCOPES",
                    "read,acknowledge",
                ),
                (
                    "SAFECLOCK__ESCALATOR__API__OPERATORS__DUTY_DESK__FORCES",
                    "nottinghamshire",
                ),
            ]),
        )
        .unwrap();
        let grant = &s.escalator.api.operators["duty_desk"];
        assert!(grant.allows(ApiScope::Acknowledge) && !grant.allows(ApiScope::Resolve));
        assert!(grant.permits_force("nottinghamshire") && !grant.permits_force("derbyshire"));
        let r = &s.escalator.receivers;
        assert_eq!(r[0].routing_key.as_deref(), Some("pd-key-from-env-123"));
        assert_eq!(r[1].secret.as_deref(), Some("hmac-secret-from-env"));
        assert_eq!(
            s.escalator.api.tokens["duty_desk"].expose(),
            "api-token-from-env-0123456789"
        );
        let shown = format!("{s:?}");
        for secret in [
            "pd-key-from-env-123",
            "hmac-secret-from-env",
            "t0ps3cret",
            "api-token-from-env",
        ] {
            assert!(!shown.contains(secret), "{secret} printed: {shown}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/safeclock.toml")), env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("--config"), "{err}");
    }

    fn kafka_with(props: &[(&str, &str)], consumer: &[(&str, &str)]) -> KafkaSettings {
        let mut k = Settings::defaults().unwrap().kafka;
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        k.properties = map(props);
        k.consumer_properties = map(consumer);
        k
    }

    fn features(list: &str) -> Vec<String> {
        list.split(',').map(str::to_string).collect()
    }

    #[test]
    fn kerberos_and_oidc_need_their_cargo_features_and_name_them() {
        let without =
            features("gzip,snappy,ssl,sasl,regex,lz4,sasl_plain,sasl_scram,zstd,sasl_oauthbearer");
        let with =
            features("gzip,ssl,sasl,sasl_gssapi,sasl_plain,sasl_scram,sasl_oauthbearer,oidc");
        let field_of = |k: &KafkaSettings, b: &[String]| match k.check_client_features(b) {
            Err(ConfigError::Invalid { field, message }) => Some((field, message)),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        let cases = [
            (
                kafka_with(
                    &[
                        ("security.protocol", "SASL_SSL"),
                        ("sasl.mechanism", "GSSAPI"),
                    ],
                    &[],
                ),
                Some(("kafka.properties.sasl.mechanism", "--features gssapi")),
            ),
            (
                kafka_with(&[("sasl.mechanisms", "gssapi")], &[]),
                Some(("kafka.properties.sasl.mechanisms", "--features gssapi")),
            ),
            // librdkafka's default mechanism is GSSAPI.
            (
                kafka_with(&[("security.protocol", "sasl_ssl")], &[]),
                Some(("kafka.properties.security.protocol", "--features gssapi")),
            ),
            // The consumer's own section wins over the shared one.
            (
                kafka_with(
                    &[
                        ("security.protocol", "SASL_SSL"),
                        ("sasl.mechanism", "SCRAM-SHA-512"),
                    ],
                    &[("sasl.mechanism", "GSSAPI")],
                ),
                Some((
                    "kafka.consumer_properties.sasl.mechanism",
                    "--features gssapi",
                )),
            ),
            (
                kafka_with(
                    &[
                        ("security.protocol", "SASL_SSL"),
                        ("sasl.mechanism", "OAUTHBEARER"),
                    ],
                    &[("sasl.oauthbearer.method", "oidc")],
                ),
                Some((
                    "kafka.consumer_properties.sasl.oauthbearer.method",
                    "--features oidc",
                )),
            ),
            (
                kafka_with(
                    &[
                        ("security.protocol", "SASL_SSL"),
                        ("sasl.mechanism", "SCRAM-SHA-512"),
                    ],
                    &[],
                ),
                None,
            ),
            (kafka_with(&[("security.protocol", "SSL")], &[]), None),
            (kafka_with(&[], &[]), None),
        ];
        for (k, expected) in &cases {
            let got = field_of(k, &without);
            match expected {
                Some((field, feature)) => {
                    let (f, m) = got.unwrap_or_else(|| panic!("{k:?} passed"));
                    assert_eq!(&f, field);
                    assert!(m.contains(feature), "{m}");
                }
                None => assert!(got.is_none(), "{k:?}: {got:?}"),
            }
            assert!(field_of(k, &with).is_none(), "{k:?} with every feature");
        }
    }

    #[test]
    fn the_check_uses_what_librdkafka_was_really_built_with() {
        let built = crate::kafka::builtin_features();
        assert!(built.iter().any(|f| f == "ssl"), "{built:?}");
        assert!(built.iter().any(|f| f == "sasl_scram"), "{built:?}");
        assert!(built.iter().any(|f| f == "zstd"), "{built:?}");
        let kerberos = kafka_with(&[("sasl.mechanism", "GSSAPI")], &[]);
        assert_eq!(
            kerberos.check_client_features(&built).is_ok(),
            built.iter().any(|f| f == "sasl_gssapi"),
            "{built:?}"
        );
    }
}
