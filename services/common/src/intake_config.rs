//! Settings of the HTTP intake gateway (`[intake]`) and of the plausibility checks every reader
//! of referral events can apply (`[validation]`).
//!
//! They live in their own module, re-exported from [`crate::config`], so the intake's settings
//! can grow without touching the other services' sections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::secret::Secret;
use crate::server::ServerSettings;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Shortest bearer token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// `[intake]`: the HTTP gateway for force systems that cannot write to Kafka.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// Where `POST /v1/events`, `/openapi.json`, `/healthz` and `/readyz` are served. Loopback
    /// by default; a deployment that serves other hosts says so (`0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// Connection and request limits, timeouts and optional TLS of the intake listener.
    pub server: ServerSettings,
    /// Failed authentications a peer may make at once before it is refused (429) ...
    pub auth_failure_burst: u32,
    /// ... and how many more it may make per minute after that.
    pub auth_failures_per_minute: u32,
    /// Client name -> bearer token. The name (never the token) appears in logs and metrics.
    /// `safeclock run intake` refuses to start with no token.
    #[serde(default)]
    pub tokens: BTreeMap<String, Secret>,
    /// Client name -> what that client may send: every token has a grant here, kept apart from
    /// the tokens so the grants can be reviewed (and versioned) without the secrets.
    #[serde(default)]
    pub clients: BTreeMap<String, IntakeClientGrant>,
    /// Largest request body accepted; larger requests get 413 before any of it is parsed.
    pub max_body_bytes: usize,
    /// Most events in one batch request.
    pub max_batch_events: usize,
    /// Time allowed to receive a request's body; slower requests get 408.
    pub request_timeout_ms: u64,
    /// Time the broker has to acknowledge every event of a request (librdkafka's
    /// `message.timeout.ms` for the intake producer). Past it the request gets 503.
    pub delivery_timeout_ms: u64,
    /// `Retry-After` (seconds) sent with 503.
    pub retry_after_secs: u64,
    /// How many recently accepted event ids are remembered to answer repeats without producing
    /// them again. Consumers de-duplicate by event id anyway; this only saves the broker work.
    pub dedup_window: usize,
}

/// What one intake client may send. An event naming another force, or another source system
/// when `source_systems` is set, is refused with 403 and nothing of its request is produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeClientGrant {
    /// The forces (`forceId`) whose referrals this client may post; `["*"]` for every force (a
    /// regional hub that carries several forces' systems). A list, or one comma-separated
    /// string (`SAFECLOCK__INTAKE__CLIENTS__NICHE-RMS__FORCES=nottinghamshire,derbyshire`).
    #[serde(deserialize_with = "list_or_commas")]
    pub forces: Vec<String>,
    /// The source systems (`sourceSystem`) it may post as; empty for any.
    #[serde(default, deserialize_with = "list_or_commas")]
    pub source_systems: Vec<String>,
}

/// A list of strings, or one string of comma-separated entries (what an environment variable
/// can hold).
pub(crate) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCommas {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match ListOrCommas::deserialize(deserializer)? {
        ListOrCommas::List(list) => list,
        ListOrCommas::Commas(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

impl IntakeClientGrant {
    /// A grant for every force and source system (tests, the demo).
    pub fn all_forces() -> Self {
        Self {
            forces: vec![crate::auth::ALL_FORCES.to_string()],
            source_systems: Vec::new(),
        }
    }

    pub fn permits_force(&self, force: &str) -> bool {
        crate::auth::force_permitted(&self.forces, force)
    }

    pub fn permits_source_system(&self, system: &str) -> bool {
        self.source_systems.is_empty() || self.source_systems.iter().any(|s| s == system)
    }
}

impl IntakeSettings {
    /// Adds client `name` with `token` and `grant` (tests and the demo build settings in code).
    pub fn add_client(&mut self, name: &str, token: Secret, grant: IntakeClientGrant) {
        self.tokens.insert(name.to_string(), token);
        self.clients.insert(name.to_string(), grant);
    }

    /// Every token has a grant and every grant a token; granted forces are known ones.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the client.
    pub fn validate_clients(&self, forces: &[String]) -> Result<(), ConfigError> {
        crate::auth::check_paired(
            &self.tokens,
            &self.clients,
            "intake.tokens",
            "intake.clients",
            "[intake.clients.NAME] forces = [\"nottinghamshire\"] (or [\"*\"] for every force)",
        )?;
        for (name, grant) in &self.clients {
            let field = format!("intake.clients.{name}");
            crate::auth::validate_forces(&format!("{field}.forces"), &grant.forces, forces)?;
            if let Some(i) = grant
                .source_systems
                .iter()
                .position(|s| !crate::event_strings::is_code(s))
            {
                return Err(invalid(
                    format!("{field}.source_systems"),
                    format!("entry number {} is not a code", i + 1),
                ));
            }
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }

    /// # Errors
    /// [`ConfigError::Invalid`] naming the first wrong field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, token) in &self.tokens {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(invalid(
                    format!("intake.tokens.{name}"),
                    "client names may contain only letters, digits, '-', '_' and '.'",
                ));
            }
            if token.expose().len() < MIN_TOKEN_LEN {
                return Err(invalid(
                    format!("intake.tokens.{name}"),
                    format!("must be at least {MIN_TOKEN_LEN} characters"),
                ));
            }
            if token.expose().chars().any(|c| !c.is_ascii_graphic()) {
                return Err(invalid(
                    format!("intake.tokens.{name}"),
                    "must be printable ASCII without spaces (it travels in an HTTP header)",
                ));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(invalid(
                "intake.max_body_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if !(1..=10_000).contains(&self.max_batch_events) {
            return Err(invalid(
                "intake.max_batch_events",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=300_000).contains(&self.request_timeout_ms) {
            return Err(invalid(
                "intake.request_timeout_ms",
                "must be between 100 and 300000",
            ));
        }
        if !(100..=300_000).contains(&self.delivery_timeout_ms) {
            return Err(invalid(
                "intake.delivery_timeout_ms",
                "must be between 100 and 300000",
            ));
        }
        if self.auth_failure_burst == 0 {
            return Err(invalid("intake.auth_failure_burst", "must be at least 1"));
        }
        if self.auth_failures_per_minute == 0 {
            return Err(invalid(
                "intake.auth_failures_per_minute",
                "must be at least 1",
            ));
        }
        self.server.validate("intake.server")?;
        if !(1..=3600).contains(&self.retry_after_secs) {
            return Err(invalid(
                "intake.retry_after_secs",
                "must be between 1 and 3600",
            ));
        }
        Ok(())
    }
}

/// What to do with a referral event whose `forceId` is not in `forces`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownForces {
    /// Refuse it (`unknown_force`): a typo in a source system never starts clocks on the wrong
    /// calendar.
    Reject,
    /// Accept it; metrics still report the force as `other`.
    Accept,
}

/// `[validation]`: checks on a referral event's content beyond its shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSettings {
    /// `occurredAt`/`recordedAt` later than now plus this are refused (`implausible_time`):
    /// clock skew is minutes, a wrong time zone hours; a day more is a bug in the sender.
    pub max_future_secs: u64,
    /// `occurredAt`/`recordedAt` before this instant are refused (`implausible_time`): zero
    /// and epoch timestamps from defaulted fields.
    pub not_before: jiff::Timestamp,
    /// Optionally, also refuse event times older than this many days before now (unset: only
    /// `not_before` applies, so back-loading old referrals still works).
    #[serde(default)]
    pub max_past_days: Option<u32>,
    /// `reject` or `accept` events whose `forceId` is not in `forces`.
    pub unknown_forces: UnknownForces,
    /// Longest id (`eventId`, `referralId`, `forceId`) in characters; the contract's ceiling is
    /// 128.
    pub max_id_chars: usize,
    /// Longest reference (`deviceRef`, `suspectRef`, every `*Ref` field) in characters.
    pub max_ref_chars: usize,
    /// Longest code or other string field (`area`, `team`, `referrer`, `outcome`, ...) in
    /// characters.
    pub max_code_chars: usize,
    /// The allowed values of code fields, by the field's JSON name (`area`, `team`,
    /// `sourceSystem`, ...), for every force. A field not listed takes any code.
    #[serde(default)]
    pub codes: crate::event_strings::CodeLists,
    /// Per force, lists that replace those of `codes` for the fields they name (the areas and
    /// teams of each force).
    #[serde(default)]
    pub force_codes: std::collections::BTreeMap<String, crate::event_strings::CodeLists>,
}

impl ValidationSettings {
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first wrong field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_future_secs > 366 * 86_400 {
            return Err(invalid(
                "validation.max_future_secs",
                "must be at most 31622400 (366 days)",
            ));
        }
        if self.max_past_days == Some(0) {
            return Err(invalid(
                "validation.max_past_days",
                "must be at least 1 (or unset)",
            ));
        }
        for (field, value, max) in [
            (
                "validation.max_id_chars",
                self.max_id_chars,
                crate::event::MAX_ID_LEN,
            ),
            ("validation.max_ref_chars", self.max_ref_chars, 256),
            ("validation.max_code_chars", self.max_code_chars, 256),
        ] {
            if !(8..=max).contains(&value) {
                return Err(invalid(field, format!("must be between 8 and {max}")));
            }
        }
        let fields = crate::event_strings::StringLimits::new(8, 8, 8);
        let fields = fields.code_fields();
        let lists = self
            .codes
            .iter()
            .map(|l| ("validation.codes".to_string(), l));
        let force_lists = self.force_codes.iter().flat_map(|(force, lists)| {
            lists
                .iter()
                .map(move |l| (format!("validation.force_codes.{force}"), l))
        });
        for (section, (field, values)) in lists.chain(force_lists) {
            let setting = format!("{section}.{field}");
            if !fields.contains(field.as_str()) {
                return Err(invalid(
                    &setting,
                    format!(
                        "`{field}` is not a code field of the contract; code fields are: {}",
                        fields.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if values.is_empty() {
                return Err(invalid(
                    &setting,
                    "is empty: list the allowed codes, or remove it to allow any code",
                ));
            }
            if let Some(i) = values
                .iter()
                .position(|v| !crate::event_strings::is_code(v) || v.len() > self.max_code_chars)
            {
                return Err(invalid(
                    &setting,
                    format!(
                        "value number {} is not a code (lower-case letters, digits, - _ . only, \
                         at most validation.max_code_chars)",
                        i + 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tokens_come_from_the_environment_and_never_print() {
        let s = Settings::load_with_env(
            None,
            env(&[
                (
                    "SAFECLOCK__INTAKE__TOKENS__NICHE-RMS",
                    "s3cret-token-0123456789",
                ),
                ("SAFECLOCK__INTAKE__CLIENTS__NICHE-RMS__FORCES", "*"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.intake.tokens["niche-rms"].expose(),
            "s3cret-token-0123456789"
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("niche-rms"), "{shown}");
    }

    #[test]
    fn every_intake_token_needs_a_grant_of_known_forces() {
        let token = (
            "SAFECLOCK__INTAKE__TOKENS__NICHE-RMS",
            "s3cret-token-0123456789",
        );
        let err = Settings::load_with_env(None, env(&[token]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intake.clients.niche-rms"), "{err}");
        let s = Settings::load_with_env(
            None,
            env(&[
                token,
                (
                    "SAFECLOCK__INTAKE__CLIENTS__NICHE-RMS__FORCES",
                    "nottinghamshire, derbyshire",
                ),
                (
                    "SAFECLOCK__INTAKE__CLIENTS__NICHE-RMS__SOURCE_SYSTEMS",
                    "niche",
                ),
            ]),
        )
        .unwrap();
        let grant = &s.intake.clients["niche-rms"];
        assert!(grant.permits_force("derbyshire") && !grant.permits_force("kent"));
        assert!(grant.permits_source_system("niche") && !grant.permits_source_system("rms"));
        for (forces, wrong) in [("atlantis", "not a force"), ("", "is empty")] {
            let err = Settings::load_with_env(
                None,
                env(&[
                    token,
                    ("SAFECLOCK__INTAKE__CLIENTS__NICHE-RMS__FORCES", forces),
                ]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("intake.clients.niche-rms.forces"), "{err}");
            assert!(err.contains(wrong), "{err}");
        }
        let err = Settings::load_with_env(
            None,
            env(&[("SAFECLOCK__INTAKE__CLIENTS__ORPHAN__FORCES", "*")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("has no token"), "{err}");
    }

    #[test]
    fn short_tokens_and_bad_limits_are_refused_by_name() {
        let err = Settings::load_with_env(None, env(&[("SAFECLOCK__INTAKE__TOKENS__A", "short")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intake.tokens.a"), "{err}");
        assert!(!err.contains("short"), "the token never appears: {err}");
        let err =
            Settings::load_with_env(None, env(&[("SAFECLOCK__INTAKE__MAX_BODY_BYTES", "10")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("intake.max_body_bytes"), "{err}");
        let err = Settings::load_with_env(
            None,
            env(&[("SAFECLOCK__VALIDATION__UNKNOWN_FORCES", "maybe")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown_forces"), "{err}");
    }
}
