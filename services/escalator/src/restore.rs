//! Restoring a partition's escalations from the compacted `escalation-state` changelog.
//!
//! The same approach as the clock's restore (and for the same reasons, see docs/architecture.md
//! decision (i)), through the shared `kafka::read_compacted_partition`: read the partition from
//! the beginning, `read_committed`, to the partition's end, and keep the latest record per
//! escalation (a tombstone deletes it). The input partition is not processed until this returns.

use std::sync::Arc;

use anyhow::Context;
use safeclock_common::config::Settings;
use safeclock_common::kafka::{read_compacted_partition, Topic};
use safeclock_common::schema::v1::EscalationState;

/// Reads partition `partition` of the escalation changelog; returns the live states.
///
/// # Errors
/// When the changelog cannot be read to its end, or a record is not a valid state.
pub async fn restore_partition(
    settings: Arc<Settings>,
    partition: i32,
) -> anyhow::Result<Vec<EscalationState>> {
    tokio::task::spawn_blocking(move || {
        let topic = settings.topic(Topic::EscalationState);
        let group = format!("{}-restore", settings.escalator.group_id);
        let (latest, _records) = read_compacted_partition(&settings, &topic, partition, &group)?;
        let mut out = Vec::with_capacity(latest.len());
        for (id, value) in latest {
            if let Some(bytes) = value {
                let state: EscalationState = prost::Message::decode(bytes.as_slice())
                    .with_context(|| {
                        format!("invalid state record for escalation {id} in {topic}[{partition}]")
                    })?;
                out.push(state);
            }
        }
        Ok(out)
    })
    .await
    .context("restore task failed")?
}
