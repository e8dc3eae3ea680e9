//! `[clock.limits]`: how much the clock keeps per referral, and proof that it fits in a record.
//!
//! The clock's state is one changelog record per referral. Whatever a source system sends, that
//! record must stay far below the producer's and the broker's message limits (librdkafka's
//! 1,000,000 bytes by default): a record that cannot be written stops every clock of its
//! partition. So every count that can grow (open clocks, instances of one rule, references,
//! remembered event ids, early stops, pauses) has a limit here, every string the state copies
//! from an event has a length limit in `[validation]`, and [`ClockLimits::validate`] builds the
//! largest record those limits allow and refuses a configuration whose worst case exceeds
//! [`MAX_STATE_RECORD_BYTES`]. An event that would break a limit is refused whole (dead-lettered
//! with its own reason); the referral's other clocks run on.
//!
//! Why one record per referral and not one per clock: every clock of a referral shares its
//! labels, its remembered event ids and its early stops, and one event changes several of its
//! clocks at once. One record keeps that change atomic on restore (no clock restored without
//! the event ids that started it) and keeps a restore to one read per referral. With the counts
//! bounded, the record is bounded too, so splitting it would buy nothing.

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::intake_config::ValidationSettings;
use crate::rules::MAX_RULE_ID_LEN;
use crate::schema::v1::{ClockState, EarlyStopState, ReferralState, SlaLabels};
use crate::schema::{ProtoDuration, ProtoTimestamp};

/// The largest `clock-state` record any accepted configuration can produce: a quarter of
/// librdkafka's default `message.max.bytes` (1,000,000), so no broker or client default is near.
pub const MAX_STATE_RECORD_BYTES: usize = 256 * 1024;

/// The limits on one referral's clock state. Defaults in `defaults.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockLimits {
    /// Open clocks of one referral, all rules together.
    pub max_open_clocks: usize,
    /// Open clocks of one rule on one referral (instances: one per device, per suspect, ...).
    pub max_instances_per_rule: usize,
    /// Distinct instance references (device, suspect, ...) among one referral's open clocks.
    pub max_references: usize,
    /// Event ids remembered per referral for duplicate detection: a window, oldest event time
    /// dropped first; events older than what was dropped are refused.
    pub max_seen_events: usize,
    /// Stops that arrived before their start, remembered per referral (oldest dropped first).
    pub max_early_stops: usize,
    /// Pauses of one clock; a further pause is refused.
    pub max_pauses_per_clock: u32,
    /// Distinct label values (areas, teams, forces) one engine (one input partition) interns.
    pub max_label_values: usize,
}

impl Default for ClockLimits {
    fn default() -> Self {
        Self {
            max_open_clocks: 128,
            max_instances_per_rule: 32,
            max_references: 64,
            max_seen_events: 1000,
            max_early_stops: 16,
            max_pauses_per_clock: 64,
            max_label_values: 100_000,
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: format!("clock.limits.{field}"),
        message: message.into(),
    }
}

impl ClockLimits {
    /// Checks each limit's range, then that the largest state record these limits and the
    /// string limits of `validation` allow stays within [`MAX_STATE_RECORD_BYTES`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the limit.
    pub fn validate(&self, validation: &ValidationSettings) -> Result<(), ConfigError> {
        let ranges: [(&str, usize, usize, usize); 7] = [
            ("max_open_clocks", self.max_open_clocks, 1, 4096),
            (
                "max_instances_per_rule",
                self.max_instances_per_rule,
                1,
                4096,
            ),
            ("max_references", self.max_references, 1, 4096),
            ("max_seen_events", self.max_seen_events, 16, 100_000),
            ("max_early_stops", self.max_early_stops, 0, 1024),
            (
                "max_pauses_per_clock",
                usize::try_from(self.max_pauses_per_clock).unwrap_or(usize::MAX),
                1,
                usize::from(u16::MAX),
            ),
            ("max_label_values", self.max_label_values, 64, 10_000_000),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(invalid(field, format!("must be between {min} and {max}")));
            }
        }
        let worst = self.worst_case_state(validation).encoded_len();
        if worst > MAX_STATE_RECORD_BYTES {
            return Err(invalid(
                "max_open_clocks",
                format!(
                    "together with max_seen_events, max_early_stops and the string limits in \
                     [validation], allows a clock-state record of {worst} bytes, over the \
                     {MAX_STATE_RECORD_BYTES}-byte ceiling: lower them"
                ),
            ));
        }
        Ok(())
    }

    /// The largest record these limits allow: every count at its limit, every string at its
    /// longest, every number at its widest encoding. What a referral's state can never exceed.
    pub fn worst_case_state(&self, v: &ValidationSettings) -> ReferralState {
        let id = "i".repeat(v.max_id_chars);
        let code = "c".repeat(v.max_code_chars);
        let reference = "r".repeat(v.max_ref_chars);
        let rule = "x".repeat(MAX_RULE_ID_LEN);
        // Clock ids are the starting event's id, or `{event id}/{instance}` after a reset.
        let clock_id = format!("{id}/{reference}");
        let wide = ProtoTimestamp {
            seconds: i64::MAX / 2,
            nanos: 999_999_999,
        };
        let wide_duration = ProtoDuration {
            seconds: i64::MAX / 2,
            nanos: 999_999_999,
        };
        ReferralState {
            referral_id: id.clone(),
            labels: Some(SlaLabels {
                force_id: id.clone(),
                category: code.clone(),
                risk: code.clone(),
                child_age_band: code.clone(),
                area: code.clone(),
                team: code.clone(),
            }),
            seen_event_ids: Vec::new(),
            seen_event_hashes: vec![u64::MAX; self.max_seen_events],
            seen_event_seconds: vec![i64::MAX / 2; self.max_seen_events],
            dedup_horizon: Some(wide),
            clocks: (0..self.max_open_clocks)
                .map(|_| ClockState {
                    rule_id: rule.clone(),
                    instance: reference.clone(),
                    clock_id: clock_id.clone(),
                    started_at: Some(wide),
                    base_deadline: Some(wide),
                    paused_total: Some(wide_duration),
                    paused_since: Some(wide),
                    // A UUID in its text form.
                    breach_id: "u".repeat(36),
                    warned: u32::MAX,
                    pauses: self.max_pauses_per_clock,
                })
                .collect(),
            early_stops: (0..self.max_early_stops)
                .map(|_| EarlyStopState {
                    rule_id: rule.clone(),
                    instance: reference.clone(),
                    occurred_at: Some(wide),
                    event_id: id.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn the_default_limits_bound_a_state_record_well_below_the_message_limits() {
        let s = Settings::defaults().unwrap();
        let worst = s.clock.limits.worst_case_state(&s.validation).encoded_len();
        println!("worst-case clock-state record with the default limits: {worst} bytes");
        assert!(worst <= MAX_STATE_RECORD_BYTES, "{worst}");
        assert!(worst < 1_000_000 / 4, "{worst}");
    }

    #[test]
    fn limits_whose_worst_case_does_not_fit_are_refused_by_name() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let err = Settings::load_with_env(
            None,
            env("SAFECLOCK__CLOCK__LIMITS__MAX_OPEN_CLOCKS", "4000"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("clock.limits.max_open_clocks"), "{err}");
        assert!(err.contains("bytes"), "{err}");
        let err =
            Settings::load_with_env(None, env("SAFECLOCK__CLOCK__LIMITS__MAX_SEEN_EVENTS", "3"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("clock.limits.max_seen_events"), "{err}");
    }
}
