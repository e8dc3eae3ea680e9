//! The consumer every service uses: its context (logging, readiness, lag, hand-over), its
//! configuration, batches, and the assignment.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::TopicPartitionList;

use super::client::client_config;
use super::handover::HandoverState;
use crate::config::Settings;
use crate::ops::ReadinessHandle;

/// Consumer context that logs through `tracing`, marks the consumer ready once the group has
/// assigned it partitions, and holds revocations back for a [`Handover`](super::Handover).
pub struct ServiceConsumerContext {
    service: &'static str,
    ready: ReadinessHandle,
    /// Not ready from the moment partitions are assigned until the service loop has restored
    /// their state (see [`ServiceConsumerContext::restores_state`]).
    state: std::sync::OnceLock<ReadinessHandle>,
    lag: std::sync::OnceLock<LagReport>,
    link: BrokerLink,
    pub(super) handover: std::sync::Arc<HandoverState>,
}

/// What readiness needs to know about the consumer: it has joined its group (an assignment,
/// possibly empty, was made) and it can reach a broker. librdkafka reports "all brokers down"
/// as an error and never says when one is back, so connectivity returns with the next
/// statistics report (every `statistics.interval.ms`) that shows a broker up.
#[derive(Debug, Default)]
struct BrokerLink {
    joined: std::sync::atomic::AtomicBool,
    cut_off: std::sync::atomic::AtomicBool,
}

impl BrokerLink {
    fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.joined.load(Relaxed) && !self.cut_off.load(Relaxed)
    }
}

/// Where a consumer reports its lag, and the partitions it last reported (to remove the series
/// of partitions it no longer holds).
struct LagReport {
    gauge: prometheus::IntGaugeVec,
    reported: std::sync::Mutex<Vec<(String, String)>>,
}

impl ServiceConsumerContext {
    fn new(service: &'static str, ready: ReadinessHandle) -> Self {
        Self {
            service,
            ready,
            state: std::sync::OnceLock::new(),
            lag: std::sync::OnceLock::new(),
            link: BrokerLink::default(),
            handover: std::sync::Arc::default(),
        }
    }

    /// Sets the `cut_off` flag and republishes readiness if it changed.
    fn set_cut_off(&self, cut_off: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.link.cut_off.swap(cut_off, Relaxed) != cut_off {
            if cut_off {
                tracing::warn!(
                    service = self.service,
                    "cut off from every broker: not ready"
                );
            } else {
                tracing::info!(service = self.service, "a broker is reachable again");
            }
            self.ready.set(self.link.ready());
        }
    }

    /// The service restores state for the partitions it is assigned, and sets `restored` once
    /// it has: from the moment of an assignment until then, the service is not ready. (Without
    /// this, readiness could report "ready" between the group's assignment and the loop noticing
    /// it.)
    pub fn restores_state(&self, restored: ReadinessHandle) {
        let _ = self.state.set(restored);
    }

    /// Reports consumer lag per partition from librdkafka statistics (every
    /// `statistics.interval.ms`, 5 s by default) into `gauge` (`service`, `topic`, `partition`).
    pub fn report_lag(&self, gauge: prometheus::IntGaugeVec) {
        let _ = self.lag.set(LagReport {
            gauge,
            reported: std::sync::Mutex::new(Vec::new()),
        });
    }
}

impl ClientContext for ServiceConsumerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(
                    service = self.service,
                    facility = fac,
                    "librdkafka: {log_message}"
                )
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(
                    service = self.service,
                    facility = fac,
                    "librdkafka: {log_message}"
                )
            }
            _ => tracing::debug!(
                service = self.service,
                facility = fac,
                "librdkafka: {log_message}"
            ),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(service = self.service, error.message = %error, "Kafka client error: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set_cut_off(true);
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // Real brokers have a node id >= 0 (bootstrap entries and the internal one do not).
        let brokers: Vec<_> = statistics
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .collect();
        if !brokers.is_empty() {
            self.set_cut_off(!brokers.iter().any(|b| b.state == "UP"));
        }
        let Some(report) = self.lag.get() else {
            return;
        };
        let mut now = Vec::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; a negative lag is unknown.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                let partition = partition.to_string();
                report
                    .gauge
                    .with_label_values(&[self.service, topic, &partition])
                    .set(p.consumer_lag);
                now.push((topic.clone(), partition));
            }
        }
        let Ok(mut reported) = report.reported.lock() else {
            return;
        };
        for (topic, partition) in reported.iter() {
            if !now.contains(&(topic.clone(), partition.clone())) {
                let _ = report
                    .gauge
                    .remove_label_values(&[self.service, topic, partition]);
            }
        }
        *reported = now;
    }
}

impl ConsumerContext for ServiceConsumerContext {
    /// librdkafka's rebalance, except that a revocation the service takes over (see
    /// [`Handover`](super::Handover)) is not given back here: the service releases it when it is done.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol::Cooperative;
        use rdkafka::types::RDKafkaRespErr::{
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS,
        };
        let cooperative = matches!(base_consumer.rebalance_protocol(), Cooperative);
        let result = match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if tpl.count() > 0 {
                    if let Some(state) = self.state.get() {
                        state.set(false);
                    }
                }
                let r = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                self.post_rebalance(base_consumer, &Rebalance::Assign(tpl));
                r
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !base_consumer.assignment_lost() && self.handover.hold(tpl) {
                    tracing::info!(
                        service = self.service,
                        partitions = tpl.count(),
                        "partitions revoked: handing them over"
                    );
                    return;
                }
                let r = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                self.post_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                r
            }
            other => {
                let e = KafkaError::Rebalance(other.into());
                self.post_rebalance(base_consumer, &Rebalance::Error(e));
                // As rdkafka does: give up what the error concerns, and the group assigns again.
                if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!(service = self.service, error.message = %e, "rebalance: assignment change failed");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(
                    service = self.service,
                    partitions = tpl.count(),
                    "partitions assigned"
                );
                self.link
                    .joined
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.ready.set(self.link.ready());
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    service = self.service,
                    partitions = tpl.count(),
                    "partitions revoked"
                );
            }
            Rebalance::Error(e) => {
                tracing::warn!(service = self.service, error.message = %e, "rebalance error");
            }
        }
    }
}

/// The consumer type every service uses.
pub type ServiceConsumer = StreamConsumer<ServiceConsumerContext>;

/// A group consumer subscribed to `topics`, storing offsets only when told to.
///
/// # Errors
/// When librdkafka refuses the configuration or the subscription.
pub fn consumer(
    settings: &Settings,
    service: &'static str,
    group_id: &str,
    topics: &[&str],
    ready: ReadinessHandle,
) -> anyhow::Result<ServiceConsumer> {
    consumer_with(
        settings,
        service,
        group_id,
        topics,
        ready,
        OffsetCommits::Auto,
    )
}

/// How a consumer's offsets reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetCommits {
    /// Stored offsets are committed by librdkafka every second and on shutdown.
    Auto,
    /// Offsets are committed inside the producer's transaction (`send_offsets_to_transaction`).
    Transactional,
}

/// Like [`consumer`], choosing how offsets are committed.
///
/// # Errors
/// When librdkafka refuses the configuration or the subscription.
pub fn consumer_with(
    settings: &Settings,
    service: &'static str,
    group_id: &str,
    topics: &[&str],
    ready: ReadinessHandle,
    commits: OffsetCommits,
) -> anyhow::Result<ServiceConsumer> {
    let mut cfg = consumer_config(settings, service, group_id, commits);
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    let consumer: ServiceConsumer = cfg
        .create_with_context(ServiceConsumerContext::new(service, ready))
        .map_err(|e| anyhow::anyhow!("cannot create Kafka consumer for {service}: {e}"))?;
    consumer
        .subscribe(topics)
        .map_err(|e| anyhow::anyhow!("cannot subscribe {service} to {topics:?}: {e}"))?;
    Ok(consumer)
}

/// The largest fetch response a service consumer asks for, and so (with librdkafka's
/// `receive.message.max.bytes`, adjusted to it plus protocol overhead) the largest record batch
/// it can receive: librdkafka's own default, set here so that an input record of any size the
/// broker accepts (Apache Kafka: 1 MiB by default, more where a topic's `max.message.bytes` is
/// raised) is consumed, and then refused as oversized and dead-lettered (bounded) rather than
/// stopping its partition. A broker or topic that accepts records over this needs it raised
/// (`kafka.consumer_properties."fetch.max.bytes"`).
pub const FETCH_MAX_BYTES: usize = 52_428_800;

/// The first fetch size per partition; librdkafka grows it by itself when a record batch is
/// larger, up to [`FETCH_MAX_BYTES`].
pub const PARTITION_FETCH_BYTES: usize = 1_048_576;

/// The configuration of a service consumer (see [`consumer_with`]).
fn consumer_config(
    settings: &Settings,
    service: &'static str,
    group_id: &str,
    commits: OffsetCommits,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("client.id", format!("safeclock-{service}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Also the rebalance timeout: a member that dies in the middle of a rebalance holds the
        // whole group up this long (librdkafka's default, 5 minutes, is too long for pages).
        // The loops poll continually; a hand-over or a restore takes seconds.
        .set("max.poll.interval.ms", "60000")
        .set("statistics.interval.ms", "5000")
        // No record the broker takes may stop a partition (see FETCH_MAX_BYTES).
        .set("fetch.max.bytes", FETCH_MAX_BYTES.to_string())
        .set(
            "max.partition.fetch.bytes",
            PARTITION_FETCH_BYTES.to_string(),
        );
    let base = client_config(&settings.kafka, &settings.kafka.consumer_properties);
    for (k, v) in base.config_map() {
        cfg.set(k, v);
    }
    cfg.set("group.id", group_id)
        .set("enable.auto.offset.store", "false");
    if commits == OffsetCommits::Transactional {
        cfg.set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
    }
    cfg
}

/// Receives up to `max` records: waits for the first, then takes whatever is already buffered.
/// Consumer errors (a broker away, a transport failure) are logged and retried: librdkafka
/// reconnects by itself, and no record is skipped.
pub async fn next_batch<'a>(consumer: &'a ServiceConsumer, max: usize) -> Vec<BorrowedMessage<'a>> {
    let first = loop {
        match consumer.recv().await {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(error.message = %e, "consumer error; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match consumer.recv().now_or_never() {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                tracing::debug!(error.message = %e, "consumer error while filling a batch");
                break;
            }
            None => break,
        }
    }
    batch
}

/// The partitions assigned to `consumer` now (all topics), or `None` (logged) when librdkafka
/// cannot say; the services then keep what they hold until the next check.
pub fn current_assignment(consumer: &ServiceConsumer) -> Option<TopicPartitionList> {
    match consumer.assignment() {
        Ok(tpl) => Some(tpl),
        Err(e) => {
            tracing::warn!(error.message = %e, "cannot read the partition assignment");
            None
        }
    }
}

/// Brings the per-partition state a service `owned` in line with the partitions `assigned`:
/// drops the state of partitions no longer assigned, calling `lost` for each (partitions revoked
/// in an orderly way were handed over and dropped already, so any left here were lost because
/// this instance was presumed dead), and returns the assigned partitions that have no state yet,
/// for the service to restore.
pub fn reconcile<K: Ord + Copy, V>(
    owned: &mut BTreeMap<K, V>,
    assigned: impl IntoIterator<Item = K>,
    mut lost: impl FnMut(K),
) -> Vec<K> {
    let assigned: std::collections::BTreeSet<K> = assigned.into_iter().collect();
    owned.retain(|k, _| {
        let keep = assigned.contains(k);
        if !keep {
            lost(*k);
        }
        keep
    });
    assigned
        .into_iter()
        .filter(|k| !owned.contains_key(k))
        .collect()
}

/// Commits stored offsets synchronously (on shutdown and after a final drain).
pub fn commit_stored(consumer: &ServiceConsumer, service: &'static str) {
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) => tracing::info!(service, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(service, error.message = %e, "final offset commit failed; records since the last commit will be re-processed")
        }
    }
}

/// Runs `f` until it finishes or `shutdown` fires, for loops that must not block shutdown.
pub async fn or_shutdown<F: Future>(
    shutdown: &tokio_util::sync::CancellationToken,
    f: F,
) -> Option<F::Output> {
    tokio::select! {
        out = f => Some(out),
        _ = shutdown.cancelled() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_fetch_records_up_to_the_brokers_limit() {
        let settings = Settings::defaults().unwrap();
        let cfg = consumer_config(&settings, "clock", "g", OffsetCommits::Auto);
        let get = |k: &str| cfg.get(k).and_then(|v| v.parse::<usize>().ok());
        // Apache Kafka's default broker limit is 1 MiB + 12 bytes of batch overhead; a 1,040,000
        // byte record is well within what a consumer fetches (larger partitions' first fetch
        // grows by itself).
        assert!(get("fetch.max.bytes").unwrap() >= 1_048_588);
        assert!(get("max.partition.fetch.bytes").unwrap() >= 1_000_000);
        // receive.message.max.bytes is left for librdkafka to adjust to fetch.max.bytes + 512.
        assert_eq!(cfg.get("receive.message.max.bytes"), None);
        // The consumer can be created with it (librdkafka checks the three together).
        let created: Result<BaseConsumer, _> = cfg.create();
        assert!(created.is_ok(), "{:?}", created.err());
    }

    #[test]
    fn reconcile_drops_lost_partitions_and_names_the_ones_to_restore() {
        let mut owned: BTreeMap<i32, &str> = BTreeMap::from([(0, "a"), (1, "b"), (4, "e")]);
        let mut lost = Vec::new();
        let missing = reconcile(&mut owned, [1, 2, 4, 5], |p| lost.push(p));
        assert_eq!(lost, [0]);
        assert_eq!(missing, [2, 5]);
        assert_eq!(owned.keys().copied().collect::<Vec<_>>(), [1, 4]);
    }
}
