//! The offsets a batch handled, stored once its effects are durable.

use std::collections::BTreeMap;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

/// The highest offset handled per partition in a batch; stored once the batch's effects are
/// durable.
#[derive(Debug, Default)]
pub struct OffsetBook {
    next: BTreeMap<(String, i32), i64>,
}

impl OffsetBook {
    /// Notes that `message` has been handled (its effects are in the batch being awaited).
    pub fn handled(&mut self, message: &BorrowedMessage<'_>) {
        let e = self
            .next
            .entry((message.topic().to_string(), message.partition()))
            .or_insert(i64::MIN);
        *e = (*e).max(message.offset());
    }

    /// Stores the noted offsets on `consumer` (committed by auto-commit or on shutdown).
    /// Partitions revoked meanwhile are skipped: their new owner re-processes, and outputs
    /// de-duplicate by id.
    pub fn store<C: ConsumerContext>(self, consumer: &StreamConsumer<C>) {
        for ((topic, partition), offset) in self.next {
            if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                tracing::debug!(topic, partition, offset, error.message = %e, "offset not stored (partition revoked?)");
            }
        }
    }

    /// Drops what was noted for `topic`/`partition` (its effects could not be made durable, so
    /// its offset must not be stored).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.next.remove(&(topic.to_string(), partition));
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    /// The offsets to commit (the next offset to read per partition), for a transaction.
    ///
    /// # Errors
    /// Only for an invalid partition (not produced by a consumed record).
    pub fn to_commit(&self) -> KafkaResult<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &self.next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
        }
        Ok(tpl)
    }
}
