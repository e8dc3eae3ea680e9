//! Reading a compacted partition to its end, for restores.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

use super::client::{client_config, retry_blocking};
use crate::config::Settings;

/// How long reading a compacted partition may go without a record before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Key -> latest value (`None`: a tombstone) of a compacted topic's partition.
pub type LatestByKey = HashMap<String, Option<Vec<u8>>>;

/// The latest value per key (`None` for a tombstone) of one partition of a compacted topic,
/// read from its beginning to its end (blocking), and the number of records read. `group_id`
/// names the reading client; it commits nothing.
///
/// # Transactions
/// The partition is read `read_committed`, to its **last stable offset**: records of aborted
/// transactions are skipped, and so are the records of a transaction still open (a writer
/// SIGKILLed mid-transaction, until its transactional id is fenced or the transaction times
/// out): they are not committed, so they are not state. The end is where librdkafka reports the
/// partition's end (`enable.partition.eof`), which it does once its fetch position passes the
/// last stable offset, control records (transaction markers) included. The offset of the last
/// record read cannot say so: a marker occupies the last offset of every committed or aborted
/// transaction and is never delivered, so waiting for the record before the high watermark
/// stalled every restore after a transactional run.
///
/// # Errors
/// When the partition cannot be read to its end.
pub fn read_compacted_partition(
    settings: &Settings,
    topic: &str,
    partition: i32,
    group_id: &str,
) -> anyhow::Result<(LatestByKey, usize)> {
    use anyhow::Context;
    use rdkafka::{Offset, TopicPartitionList};
    let mut cfg = client_config(&settings.kafka, &settings.kafka.consumer_properties);
    cfg.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer = cfg
        .create()
        .with_context(|| format!("cannot create a consumer to read {topic}"))?;
    // The broker may be restarting: retry until the stall timeout, as for the records.
    let (low, high) = retry_blocking(
        STALL_TIMEOUT,
        Duration::from_millis(500),
        &format!("cannot read the watermarks of {topic}[{partition}] yet"),
        || consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)),
    )
    .with_context(|| format!("cannot read the watermarks of {topic}[{partition}]"))?;
    let mut latest = HashMap::new();
    if high <= low {
        return Ok((latest, 0));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut records = 0usize;
    let mut last_progress = std::time::Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = std::time::Instant::now();
                records += 1;
                if let Some(key) = m.key() {
                    latest.insert(
                        String::from_utf8_lossy(key).into_owned(),
                        m.payload().map(<[u8]>::to_vec),
                    );
                }
            }
            // The fetch position passed the last stable offset (markers and aborted records
            // included): everything committed has been read. (Before the tests ran on Apache
            // Kafka, a 300 ms quiet drain followed, for tansu's under-reported watermark.)
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == partition => break,
            // librdkafka reconnects by itself: a broker away for a while (restarting, a network
            // blip) only delays the restore, up to the stall timeout.
            Some(Err(e)) => {
                anyhow::ensure!(
                    last_progress.elapsed() < STALL_TIMEOUT,
                    "cannot read {topic}[{partition}]: no record for {STALL_TIMEOUT:?} before offset {high}; last error: {e}"
                );
                tracing::warn!(topic, partition, error.message = %e, "error while restoring; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {
                anyhow::ensure!(
                    last_progress.elapsed() < STALL_TIMEOUT,
                    "reading {topic}[{partition}] stalled: no record for {STALL_TIMEOUT:?} before offset {high}"
                );
            }
        }
    }
    Ok((latest, records))
}
