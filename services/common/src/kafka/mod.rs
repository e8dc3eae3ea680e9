//! Kafka plumbing shared by every service.
//!
//! # Delivery contract
//! Consumers run with `enable.auto.offset.store=false`: a record's offset is stored (and later
//! committed by librdkafka's auto-commit, or synchronously on shutdown) only after every effect it
//! caused is durable: output records acknowledged by the broker (producers use `acks=all` and
//! idempotence), notifications delivered, or the record itself written to the dead-letter topic.
//! A crash therefore re-delivers records whose effects may already exist; every output carries a
//! deterministic id so consumers de-duplicate. Nothing is ever acknowledged and then dropped.
//!
//! No record stops a partition. Invalid input goes to the dead-letter topic with the original
//! key, value and headers (bounded, so that a record of any size the broker takes has a dead
//! letter that fits; incoming `safeclock.dlq.*` headers stripped, `dead_letters.rs`) plus headers
//! saying why, and processing continues with the next record. A write the broker refuses for good
//! (too large, invalid) is dead-lettered in place of what caused it; a broker that is away is
//! waited out, nothing stored meanwhile (`delivery.rs`).
//!
//! The module is split along its seams: `topics.rs` (names, creation, co-partitioning),
//! `client.rs` (client configuration and producers), `consumer.rs` (the service consumer, its
//! context and readiness, batches, the assignment), `handover.rs` (revoked partitions held until
//! handed over), `delivery.rs` (enqueue, await, classify failures, wait out a broker),
//! `pipeline.rs` (writes kept in flight while the service goes on, released in order),
//! `dead_letters.rs`, `offsets.rs`, and `compacted.rs` (reading a compacted partition for restores).

mod client;
mod compacted;
mod consumer;
mod dead_letters;
mod delivery;
mod handover;
mod offsets;
mod pipeline;
mod topics;

pub(crate) use client::retry_blocking;
pub use client::{builtin_features, client_config, producer, producer_with, OPTIONAL_FEATURES};
pub use compacted::{read_compacted_partition, LatestByKey};
pub use consumer::{
    commit_stored, consumer, consumer_with, current_assignment, next_batch, or_shutdown, reconcile,
    OffsetCommits, ServiceConsumer, ServiceConsumerContext,
};
pub use dead_letters::{
    build_letter, dlq_headers, output_reason, output_reasons, sha256_hex, DeadLetters,
    LetterBounds, Original,
};
pub use delivery::{
    await_deliveries, classify, deliver, deliver_in_transaction, deliver_once, enqueue,
    is_shutdown, settle, try_enqueue, BrokerWait, Failure, Interrupted, Output, ProduceError,
    Refusal,
};
pub use handover::Handover;
pub use offsets::OffsetBook;
pub use pipeline::{WritePipeline, Written};
pub use topics::{
    check_copartitioned, ensure_topics, topic_configs, topic_configs_with_retention, Topic,
};
