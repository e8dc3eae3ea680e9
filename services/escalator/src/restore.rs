//! Restoring a partition's escalations from the compacted `escalation-state` changelog.
//!
//! The same approach as the clock's restore (and for the same reasons, see docs/architecture.md
//! decision (i)), through the shared `kafka::read_compacted_partition`: read the partition from
//! the beginning, keep the latest record per escalation (a tombstone deletes it), and once the
//! reported high watermark has been reached keep reading until the partition has been quiet for
//! a moment, because tansu 0.6 under-reports the watermark. The input partition is not processed
//! until this returns.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use safeclock_common::config::Settings;
use safeclock_common::kafka::{client_config, read_compacted_partition, Topic};
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

/// Checks that the changelog has at least as many partitions as `sla-events`.
///
/// # Errors
/// When the topics cannot be described or the changelog has too few partitions.
pub async fn check_copartitioned(settings: &Settings) -> anyhow::Result<()> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            client_config(&settings.kafka, &settings.kafka.consumer_properties)
                .create()
                .context("cannot create a metadata client")?;
        let count = |topic: &str| -> anyhow::Result<usize> {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(30))
                .with_context(|| format!("cannot describe topic {topic}"))?;
            Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
        };
        let input = settings.topic(Topic::SlaEvents);
        let changelog = settings.topic(Topic::EscalationState);
        let (n_in, n_state) = (count(&input)?, count(&changelog)?);
        anyhow::ensure!(
            n_state >= n_in,
            "the changelog {changelog} has {n_state} partitions but {input} has {n_in}: create \
             {changelog} (compacted) with at least {n_in} partitions"
        );
        Ok(())
    })
    .await
    .context("metadata task failed")?
}
