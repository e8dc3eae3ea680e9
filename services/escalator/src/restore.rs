//! Restoring a partition's escalations from the compacted `escalation-state` changelog.
//!
//! The same approach as the clock's restore (and for the same reasons, see docs/architecture.md
//! decision (i)): read the partition from the beginning, keep the latest record per escalation
//! (a tombstone deletes it), and once the reported high watermark has been reached keep reading
//! until the partition has been quiet for a moment, because tansu 0.6 under-reports the
//! watermark. The input partition is not processed until this returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use safeclock_common::config::Settings;
use safeclock_common::kafka::{client_config, Topic};
use safeclock_common::schema::v1::EscalationState;

/// How long a restore may go without a record before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet time after the reported watermark that ends a restore.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

/// Reads partition `partition` of the escalation changelog; returns the live states.
///
/// # Errors
/// When the changelog cannot be read to its end, or a record is not a valid state.
pub async fn restore_partition(
    settings: Arc<Settings>,
    partition: i32,
) -> anyhow::Result<Vec<EscalationState>> {
    tokio::task::spawn_blocking(move || restore_blocking(&settings, partition))
        .await
        .context("restore task failed")?
}

fn restore_blocking(settings: &Settings, partition: i32) -> anyhow::Result<Vec<EscalationState>> {
    let topic = settings.topic(Topic::EscalationState);
    let mut cfg = client_config(&settings.kafka, &settings.kafka.consumer_properties);
    cfg.set(
        "group.id",
        format!("{}-restore", settings.escalator.group_id),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "false")
    .set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer = cfg
        .create()
        .context("cannot create the escalation state restore consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(&topic, partition, Duration::from_secs(30))
        .with_context(|| format!("cannot read the watermarks of {topic}[{partition}]"))?;
    if high <= low {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut latest: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    let mut last_progress = Instant::now();
    let mut reached_watermark = false;
    loop {
        let wait = if reached_watermark {
            DRAIN_QUIET
        } else {
            Duration::from_millis(200)
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                if let Some(key) = m.key() {
                    latest.insert(
                        String::from_utf8_lossy(key).into_owned(),
                        m.payload().map(<[u8]>::to_vec),
                    );
                }
                reached_watermark |= m.offset() >= high - 1;
            }
            Some(Err(e)) => {
                return Err(e).with_context(|| format!("cannot read {topic}[{partition}]"));
            }
            None if reached_watermark => break,
            None => anyhow::ensure!(
                last_progress.elapsed() < STALL_TIMEOUT,
                "restoring {topic}[{partition}] stalled: no record for {STALL_TIMEOUT:?} before offset {high}"
            ),
        }
    }
    let mut out = Vec::with_capacity(latest.len());
    for (id, value) in latest {
        if let Some(bytes) = value {
            let state: EscalationState =
                prost::Message::decode(bytes.as_slice()).with_context(|| {
                    format!("invalid state record for escalation {id} in {topic}[{partition}]")
                })?;
            out.push(state);
        }
    }
    Ok(out)
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
