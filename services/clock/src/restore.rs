//! Restoring a partition's clocks from the compacted changelog.
//!
//! Reads the changelog partition from its beginning to its end
//! ([`safeclock_common::kafka::read_compacted_partition`]), keeps the latest record per referral
//! (a tombstone deletes it), and imports the result into a fresh [`Engine`]. The input partition is not processed until this returns, so no record is
//! applied to state older than the record's own effects.

use std::sync::Arc;

use anyhow::Context;
use safeclock_common::config::Settings;
use safeclock_common::kafka::{read_compacted_partition, Topic};
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::ReferralState;

use crate::engine::Engine;

/// Restores partition `partition` of the changelog into a new engine; returns it and the number
/// of changelog records read.
///
/// # Errors
/// When the changelog cannot be read to its end, or a record is not a valid state.
pub async fn restore_partition(
    settings: Arc<Settings>,
    policy: Policy,
    partition: i32,
) -> anyhow::Result<(Engine, usize)> {
    tokio::task::spawn_blocking(move || restore_blocking(&settings, policy, partition))
        .await
        .context("restore task failed")?
}

fn restore_blocking(
    settings: &Settings,
    policy: Policy,
    partition: i32,
) -> anyhow::Result<(Engine, usize)> {
    let topic = settings.topic(Topic::ClockState);
    let mut engine = Engine::with_limits(policy.rules, policy.calendars, policy.limits);
    let (latest, records) = read_compacted_partition(
        settings,
        &topic,
        partition,
        &format!("{}-restore", settings.clock.group_id),
    )?;
    for (referral_id, value) in latest {
        if let Some(bytes) = value {
            let state: ReferralState =
                prost::Message::decode(bytes.as_slice()).with_context(|| {
                    format!(
                        "invalid state record for referral {referral_id} in {topic}[{partition}]"
                    )
                })?;
            engine.import(state);
        }
    }
    Ok((engine, records))
}
