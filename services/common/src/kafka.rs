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
//! Invalid input never stops a partition: it goes to the dead-letter topic with the original key,
//! value and headers plus headers saying why, and processing continues with the next record.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{KafkaSettings, Settings};
use crate::event::Rejection;
use crate::metrics::ConsumerMetrics;
use crate::ops::ReadinessHandle;

/// The topics safeclock reads and writes. Names carry a version suffix so a breaking schema
/// change gets a new topic instead of surprising existing consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Referral lifecycle events from force systems and intake. Key: referral id.
    ReferralEvents,
    /// Clock transitions (started, warning, breached, met, ...). Key: referral id.
    SlaEvents,
    /// Audit of every escalation attempt, acknowledgement and resolution. Key: escalation id.
    EscalationLog,
    /// Records any consumer refused, with the reason in headers. Key: the original key.
    DeadLetter,
    /// One record per clock with its latest outcome (compacted). Key: referral/rule/clock.
    SlaOutcomes,
    /// The clock's durable state (compacted; binary protobuf). Key: referral id. Partitioned
    /// like `ReferralEvents`.
    ClockState,
    /// The escalator's durable state: open escalations and their pending notifications
    /// (compacted; binary protobuf). Key: escalation id. Partitioned like `SlaEvents`.
    EscalationState,
    /// The exporter's totals and the input offsets they reflect (compacted; JSON). Key: the
    /// exporter's consumer group.
    ExporterState,
}

impl Topic {
    /// Every topic, for creating them at start.
    pub const ALL: [Topic; 8] = [
        Topic::ReferralEvents,
        Topic::SlaEvents,
        Topic::SlaOutcomes,
        Topic::EscalationLog,
        Topic::DeadLetter,
        Topic::ClockState,
        Topic::EscalationState,
        Topic::ExporterState,
    ];

    /// Whether only the latest record per key matters (the topic is compacted).
    pub fn compacted(self) -> bool {
        matches!(
            self,
            Topic::ClockState | Topic::SlaOutcomes | Topic::EscalationState | Topic::ExporterState
        )
    }

    /// The name without the deployment's prefix.
    pub fn base_name(self) -> &'static str {
        match self {
            Topic::ReferralEvents => "referral-events.v1",
            Topic::SlaEvents => "sla-events.v1",
            Topic::EscalationLog => "escalation-log.v1",
            Topic::DeadLetter => "dead-letter.v1",
            Topic::ClockState => "clock-state.v1",
            Topic::SlaOutcomes => "sla-outcomes.v1",
            Topic::EscalationState => "escalation-state.v1",
            Topic::ExporterState => "exporter-state.v1",
        }
    }
}

/// Header names written on dead-letter records.
pub mod dlq_headers {
    pub const REASON: &str = "safeclock.dlq.reason";
    pub const ERROR: &str = "safeclock.dlq.error";
    pub const SERVICE: &str = "safeclock.dlq.service";
    pub const SOURCE_TOPIC: &str = "safeclock.dlq.source.topic";
    pub const SOURCE_PARTITION: &str = "safeclock.dlq.source.partition";
    pub const SOURCE_OFFSET: &str = "safeclock.dlq.source.offset";
}

/// A librdkafka client config with the brokers and every pass-through property.
pub fn client_config(kafka: &KafkaSettings, extra: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in kafka.properties.iter().chain(extra.iter()) {
        cfg.set(k, v);
    }
    cfg
}

/// A producer for outputs: `acks=all` and idempotent unless the operator overrides it.
///
/// # Errors
/// When librdkafka refuses the configuration (the message names the property).
pub fn producer(settings: &Settings) -> anyhow::Result<FutureProducer> {
    producer_with(settings, None)
}

/// A producer, transactional when `transactional_id` is given (transactions are initialised,
/// which fences any older instance with the same id).
///
/// # Errors
/// When librdkafka refuses the configuration or the broker refuses the transactional id.
pub fn producer_with(
    settings: &Settings,
    transactional_id: Option<&str>,
) -> anyhow::Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    // Operator properties last, so they win.
    let base = client_config(&settings.kafka, &settings.kafka.producer_properties);
    for (k, v) in base.config_map() {
        cfg.set(k, v);
    }
    if let Some(id) = transactional_id {
        cfg.set("transactional.id", id);
    }
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    let producer: FutureProducer = cfg
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka producer: {e}"))?;
    if transactional_id.is_some() {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot initialise Kafka transactions (does the broker support them?): {e}"
                )
            })?;
    }
    Ok(producer)
}

/// Consumer context that logs through `tracing`, marks the consumer ready once the group has
/// assigned it partitions, and holds revocations back for a [`Handover`].
pub struct ServiceConsumerContext {
    service: &'static str,
    ready: ReadinessHandle,
    /// Not ready from the moment partitions are assigned until the service loop has restored
    /// their state (see [`ServiceConsumerContext::restores_state`]).
    state: std::sync::OnceLock<ReadinessHandle>,
    lag: std::sync::OnceLock<LagReport>,
    link: BrokerLink,
    handover: std::sync::Arc<HandoverState>,
}

/// Partitions revoked by the group but not yet let go: the service finishes its work on them
/// first (in-flight notifications settled, state written, offsets committed), then calls
/// [`Handover::release`]. Only then does librdkafka tell the group they are free, so the next
/// owner restores a state that has everything the previous one did, and two instances never act
/// on one partition at once (the escalator relies on this so a page is never sent by both).
///
/// Holding is how Kafka Streams hands over tasks: the group's rebalance waits for the member to
/// give up its partitions (bounded by `max.poll.interval.ms`). Partitions the group took away
/// because this member was presumed dead ("assignment lost") are released at once: another
/// member may already own them, and writing state for them would race it.
///
/// Revocations are held only while a `Handover` exists; dropping it (the service loop ended,
/// normally or by an error) releases anything held, so closing the consumer never waits.
pub struct Handover<'a> {
    consumer: &'a ServiceConsumer,
    state: std::sync::Arc<HandoverState>,
}

#[derive(Debug, Default)]
struct HandoverState {
    active: std::sync::atomic::AtomicBool,
    held: std::sync::Mutex<Option<TopicPartitionList>>,
    wake: tokio::sync::Notify,
}

impl<'a> Handover<'a> {
    /// From now on, revocations on `consumer` wait for [`Handover::release`].
    pub fn take_over(consumer: &'a ServiceConsumer) -> Self {
        let state = consumer.context().handover.clone();
        state
            .active
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Self { consumer, state }
    }

    /// Waits until the group revokes partitions; returns them. Cancel-safe.
    pub async fn revoked(&self) -> TopicPartitionList {
        loop {
            let notified = self.state.wake.notified();
            if let Some(tpl) = self.state.lock().take() {
                return tpl;
            }
            notified.await;
        }
    }

    /// The partitions of `topic` in `tpl`.
    pub fn partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
        tpl.elements_for_topic(topic)
            .iter()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
            .collect()
    }

    /// Gives `tpl` back to the group: the service is done with them.
    pub fn release(&self, tpl: &TopicPartitionList) {
        let result = match self.consumer.rebalance_protocol() {
            rdkafka::consumer::RebalanceProtocol::Cooperative => {
                self.consumer.incremental_unassign(tpl)
            }
            _ => self.consumer.unassign(),
        };
        match result {
            Ok(()) => tracing::info!(partitions = tpl.count(), "partitions handed over"),
            Err(e) => {
                tracing::warn!(error.message = %e, "could not hand partitions back to the group");
            }
        }
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.state
            .active
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let held = self.state.lock().take();
        if let Some(tpl) = held {
            self.release(&tpl);
        }
    }
}

impl HandoverState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TopicPartitionList>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called from the rebalance callback: holds `tpl` if a [`Handover`] takes revocations over.
    fn hold(&self, tpl: &TopicPartitionList) -> bool {
        if !self.active.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let mut held = self.lock();
        match held.as_mut() {
            Some(existing) => {
                for e in tpl.elements() {
                    existing.add_partition(e.topic(), e.partition());
                }
            }
            None => *held = Some(tpl.clone()),
        }
        drop(held);
        self.wake.notify_one();
        true
    }
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
    /// [`Handover`]) is not given back here: the service releases it when it is done.
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
        .set("statistics.interval.ms", "5000");
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
    cfg.set_log_level(RDKafkaLogLevel::Warning);
    let consumer: ServiceConsumer = cfg
        .create_with_context(ServiceConsumerContext::new(service, ready))
        .map_err(|e| anyhow::anyhow!("cannot create Kafka consumer for {service}: {e}"))?;
    consumer
        .subscribe(topics)
        .map_err(|e| anyhow::anyhow!("cannot subscribe {service} to {topics:?}: {e}"))?;
    Ok(consumer)
}

/// Creates any of `topics` that do not exist yet.
///
/// # Errors
/// When the admin request fails for a reason other than "already exists".
pub async fn ensure_topics(settings: &Settings, topics: &[Topic]) -> anyhow::Result<()> {
    let admin_client = || -> anyhow::Result<AdminClient<DefaultClientContext>> {
        client_config(&settings.kafka, &BTreeMap::new())
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create Kafka admin client: {e}"))
    };
    let mut admin = admin_client()?;
    let names: Vec<String> = topics.iter().map(|t| settings.topic(*t)).collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .zip(topics)
        .map(|(n, t)| {
            let topic = NewTopic::new(
                n,
                settings.kafka.partitions,
                TopicReplication::Fixed(settings.kafka.replication_factor),
            );
            if t.compacted() {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // A service may start while the broker is restarting: wait for it (not ready meanwhile).
    let started = std::time::Instant::now();
    let results = loop {
        match admin.create_topics(&new_topics, &opts).await {
            Ok(r) => break r,
            Err(e) if started.elapsed() < BROKER_WAIT => {
                tracing::warn!(error.message = %e, "cannot reach the broker to create topics yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                // A new client, as in `check_copartitioned`: one cut off while connecting may
                // stay cut off.
                admin = admin_client()?;
            }
            Err(e) => anyhow::bail!("cannot create topics {names:?}: {e}"),
        }
    };
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Enqueues `record`, waiting while the producer's local queue is full, and returns the future of
/// its delivery report. Enqueuing in order keeps per-partition order.
///
/// # Errors
/// When librdkafka refuses the record for a reason other than a full queue.
pub async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> anyhow::Result<DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, r)) => anyhow::bail!("cannot enqueue a record for {}: {e}", r.topic),
        }
    }
}

/// Waits until every delivery in `deliveries` is acknowledged by the broker.
///
/// # Errors
/// The first delivery failure (after librdkafka's own retries), in words.
pub async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for result in futures::future::join_all(deliveries).await {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, msg))) => {
                anyhow::bail!(
                    "broker did not acknowledge a record for {}: {e}",
                    msg.topic()
                )
            }
            Err(_) => anyhow::bail!("producer dropped a delivery report (shutting down?)"),
        }
    }
    Ok(())
}

/// Writes refused records to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: &'static str,
    metrics: ConsumerMetrics,
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer,
        settings: &Settings,
        service: &'static str,
        metrics: ConsumerMetrics,
    ) -> Self {
        Self {
            producer,
            topic: settings.topic(Topic::DeadLetter),
            service,
            metrics,
        }
    }

    /// Enqueues `message` on the dead-letter topic with the original key, value and headers plus
    /// headers for the reason, source topic, partition and offset. Returns the delivery future;
    /// the source offset may be stored once it resolves.
    ///
    /// # Errors
    /// When the record cannot be enqueued.
    pub async fn send(
        &self,
        message: &BorrowedMessage<'_>,
        rejection: &Rejection,
    ) -> anyhow::Result<DeliveryFuture> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let error = rejection.to_string();
        for (key, value) in [
            (dlq_headers::REASON, rejection.reason()),
            (dlq_headers::ERROR, error.as_str()),
            (dlq_headers::SERVICE, self.service),
            (dlq_headers::SOURCE_TOPIC, message.topic()),
            (dlq_headers::SOURCE_PARTITION, partition.as_str()),
            (dlq_headers::SOURCE_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let payload = message.payload().unwrap_or_default();
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(payload)
            .headers(headers);
        let key = message.key().map(String::from_utf8_lossy);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        tracing::warn!(
            service = self.service,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason = rejection.reason(),
            error.message = %rejection,
            "invalid record sent to the dead-letter topic"
        );
        self.metrics
            .invalid
            .with_label_values(&[self.service, rejection.reason()])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        enqueue(&self.producer, record).await
    }
}

impl DeadLetters {
    /// Enqueues a record this service produced itself but could not deliver (e.g. a notification
    /// whose retry budget is spent): `payload` under `key`, with the reason headers. There is no
    /// source record, so the source headers are omitted.
    ///
    /// # Errors
    /// When the record cannot be enqueued.
    pub async fn send_undeliverable(
        &self,
        key: &str,
        payload: &[u8],
        reason: &str,
        error: &str,
    ) -> anyhow::Result<DeliveryFuture> {
        let mut headers = OwnedHeaders::new();
        for (name, value) in [
            (dlq_headers::REASON, reason),
            (dlq_headers::ERROR, error),
            (dlq_headers::SERVICE, self.service),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        tracing::warn!(
            service = self.service,
            reason,
            error.message = error,
            "undeliverable record sent to the dead-letter topic"
        );
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        let record = FutureRecord::<str, [u8]>::to(&self.topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        enqueue(&self.producer, record).await
    }
}

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

/// How long a starting service waits for an unreachable broker before it gives up (and its
/// supervisor restarts it).
const BROKER_WAIT: Duration = Duration::from_secs(120);

/// Calls `attempt` until it succeeds or `give_up_after` has passed, pausing `pause` after each
/// failure and logging it as `what`: for blocking calls to a broker that may be restarting.
fn retry_blocking<T>(
    give_up_after: Duration,
    pause: Duration,
    what: &str,
    mut attempt: impl FnMut() -> KafkaResult<T>,
) -> KafkaResult<T> {
    let started = std::time::Instant::now();
    loop {
        match attempt() {
            Err(e) if started.elapsed() < give_up_after => {
                tracing::warn!(error.message = %e, "{what}; retrying");
                std::thread::sleep(pause);
            }
            result => return result,
        }
    }
}

/// How long reading a compacted partition may go without a record before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Once the reported high watermark is reached, reading goes on until the partition has been
/// quiet this long. Apache Kafka's watermark is exact; tansu 0.6 reports the next *batch* number
/// rather than the next offset, so the watermark alone would stop a restore early and lose state.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

/// Key -> latest value (`None`: a tombstone) of a compacted topic's partition.
pub type LatestByKey = HashMap<String, Option<Vec<u8>>>;

/// The latest value per key (`None` for a tombstone) of one partition of a compacted topic,
/// read from its beginning to its end (blocking), and the number of records read. `group_id`
/// names the reading client; it commits nothing.
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
        .set("enable.partition.eof", "false")
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
    let mut reached_watermark = false;
    loop {
        let wait = if reached_watermark {
            DRAIN_QUIET
        } else {
            Duration::from_millis(200)
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                last_progress = std::time::Instant::now();
                records += 1;
                if let Some(key) = m.key() {
                    latest.insert(
                        String::from_utf8_lossy(key).into_owned(),
                        m.payload().map(<[u8]>::to_vec),
                    );
                }
                reached_watermark |= m.offset() >= high - 1;
            }
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
            None if reached_watermark => break,
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

/// Checks that `changelog` has at least as many partitions as `input`: a service that keeps
/// state per input partition writes it to the same partition number of its changelog.
///
/// # Errors
/// When the topics cannot be described or the changelog has too few partitions.
pub async fn check_copartitioned(
    settings: &Settings,
    input: Topic,
    changelog: Topic,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let count = |topic: &str| -> anyhow::Result<usize> {
            // The broker may be restarting: wait for it (the service is not ready meanwhile),
            // with a new client at each attempt. A client whose first connection the broker's
            // restart cut did not always connect again: the fault suite once saw a clock fail
            // this lookup for two minutes while every other client had reconnected.
            let md = retry_blocking(
                BROKER_WAIT,
                Duration::from_secs(1),
                &format!("cannot describe topic {topic} yet"),
                || {
                    let client: BaseConsumer =
                        client_config(&settings.kafka, &settings.kafka.consumer_properties)
                            .create()?;
                    client.fetch_metadata(Some(topic), Duration::from_secs(10))
                },
            )
            .with_context(|| format!("cannot describe topic {topic}"))?;
            Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
        };
        let input = settings.topic(input);
        let changelog = settings.topic(changelog);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_drops_lost_partitions_and_names_the_ones_to_restore() {
        let mut owned: BTreeMap<i32, &str> = BTreeMap::from([(0, "a"), (1, "b"), (4, "e")]);
        let mut lost = Vec::new();
        let missing = reconcile(&mut owned, [1, 2, 4, 5], |p| lost.push(p));
        assert_eq!(lost, [0]);
        assert_eq!(missing, [2, 5]);
        assert_eq!(owned.keys().copied().collect::<Vec<_>>(), [1, 4]);
    }

    #[test]
    fn every_configured_property_reaches_librdkafka_and_safeclock_keeps_its_own() {
        let mut settings = Settings::defaults().unwrap();
        settings.kafka.brokers = "kafka-1:9093".into();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "safeclock"),
            ("sasl.password", "hunter2"),
            ("ssl.ca.location", "/etc/ssl/force-ca.pem"),
        ] {
            settings.kafka.properties.insert(k.into(), v.into());
        }
        settings
            .kafka
            .producer_properties
            .insert("acks".into(), "1".into());
        let cfg = client_config(&settings.kafka, &settings.kafka.producer_properties);
        assert_eq!(cfg.get("bootstrap.servers"), Some("kafka-1:9093"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cfg.get("ssl.ca.location"), Some("/etc/ssl/force-ca.pem"));
        assert_eq!(cfg.get("acks"), Some("1"), "operator overrides win");
    }

    #[test]
    fn topic_names_carry_the_prefix_and_a_version() {
        let settings = Settings::defaults().unwrap();
        assert_eq!(
            settings.topic(Topic::ReferralEvents),
            "safeclock.referral-events.v1"
        );
        assert_eq!(
            settings.topic(Topic::DeadLetter),
            "safeclock.dead-letter.v1"
        );
    }
}
