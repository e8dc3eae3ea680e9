//! The clock service: the SLA engine on Kafka.
//!
//! Reads `referral-events`, runs a clock for every rule that applies, and publishes each
//! transition (started, warning, breached, met, met late, paused, resumed, cancelled, corrected)
//! to `sla-events`, keyed by referral id.
//!
//! # State
//! One [`Engine`] per assigned input partition. Every referral whose state changes is written to
//! the compacted `clock-state` changelog, to the same partition number as its input partition.
//! When a partition is assigned (at start, after a crash, or on a rebalance) its state is
//! restored from the changelog before any of its records are processed, and its timers are set
//! again: deadlines that passed while no instance held the partition fire on the next tick. When
//! a partition is revoked it is handed over ([`kafka::Handover`]): the offsets reflecting its
//! durable effects are committed and its engine is dropped before the group may give it to
//! another instance, so its timers stop firing here and the next owner resumes exactly where
//! this one stopped.
//!
//! # Delivery contract
//! At-least-once, in this order for every batch of input records and every tick:
//! 1. the SLA events (and dead letters) are produced and acknowledged by the broker;
//! 2. then the changed referral states are produced to the changelog and acknowledged;
//! 3. then the input offsets are stored for commit.
//!
//! A crash between 1 and 2 restores the older state and re-emits the same transitions with the
//! same ids (consumers de-duplicate); a crash between 2 and 3 re-reads inputs the restored state
//! has already seen, which are ignored as duplicates. No transition is lost either way.

mod attribute;
pub mod engine;
pub mod explain;
pub mod metrics;
pub mod outcome;
pub mod restore;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use safeclock_common::event::transition_label;
use safeclock_common::kafka::{self, DeadLetters, OffsetBook, ServiceConsumer, Topic};
use safeclock_common::metrics::{ConsumerMetrics, SlaLabelBounds};
use safeclock_common::ops::ReadinessHandle;
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::SlaEvent;
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{Engine, EngineStats};
use crate::metrics::ClockMetrics;

const SERVICE: &str = "clock";

/// The clock's Kafka side: where it writes, and how.
struct Outputs {
    producer: FutureProducer,
    sla_topic: String,
    outcomes_topic: String,
    changelog: String,
    policy: Policy,
    metrics: ClockMetrics,
    /// Each batch is one transaction (outputs, state and input offsets) when set.
    transactional: bool,
}

impl Outputs {
    async fn publish(&self, event: &SlaEvent) -> anyhow::Result<DeliveryFuture> {
        let payload = serde_json::to_vec(event)?;
        self.metrics
            .emitted
            .with_label_values(&[transition_label(event.transition())])
            .inc();
        let record = FutureRecord::<str, [u8]>::to(&self.sla_topic)
            .key(&event.referral_id)
            .payload(&payload);
        kafka::enqueue(&self.producer, record).await
    }

    async fn publish_outcome(&self, event: &SlaEvent) -> anyhow::Result<DeliveryFuture> {
        let outcome = outcome::from_event(event, &self.policy);
        let payload = serde_json::to_vec(&outcome)?;
        let record = FutureRecord::<str, [u8]>::to(&self.outcomes_topic)
            .key(&outcome.outcome_id)
            .payload(&payload);
        kafka::enqueue(&self.producer, record).await
    }

    /// Starts the transaction a batch's effects belong to (transactional mode only).
    fn begin(&self) -> anyhow::Result<()> {
        if self.transactional {
            self.producer
                .begin_transaction()
                .map_err(|e| anyhow::anyhow!("cannot begin a transaction: {e}"))?;
        }
        Ok(())
    }

    /// Makes a batch's effects durable and, with `offsets`, commits its input.
    ///
    /// Without transactions: publishes `events`, waits for the broker, then writes the changed
    /// state of every engine and waits again; the caller then stores the offsets (see the
    /// delivery contract in the module doc). With transactions: everything, offsets included,
    /// is committed atomically.
    async fn commit_effects(
        &self,
        events: &[SlaEvent],
        deliveries: Vec<DeliveryFuture>,
        engines: &mut BTreeMap<i32, Engine>,
        offsets: Option<(&OffsetBook, &ServiceConsumer)>,
    ) -> anyhow::Result<()> {
        let result = self
            .write_effects(events, deliveries, engines, offsets)
            .await;
        if self.transactional {
            match &result {
                Ok(()) => {
                    tokio::task::block_in_place(|| {
                        self.producer.commit_transaction(Duration::from_secs(60))
                    })
                    .map_err(|e| anyhow::anyhow!("cannot commit the transaction: {e}"))?;
                }
                Err(_) => {
                    let _ = tokio::task::block_in_place(|| {
                        self.producer.abort_transaction(Duration::from_secs(30))
                    });
                }
            }
        }
        result
    }

    async fn write_effects(
        &self,
        events: &[SlaEvent],
        mut deliveries: Vec<DeliveryFuture>,
        engines: &mut BTreeMap<i32, Engine>,
        offsets: Option<(&OffsetBook, &ServiceConsumer)>,
    ) -> anyhow::Result<()> {
        for ev in events {
            deliveries.push(self.publish(ev).await?);
            deliveries.push(self.publish_outcome(ev).await?);
        }
        if !self.transactional {
            // Outputs first: state must never claim effects the broker does not hold.
            kafka::await_deliveries(std::mem::take(&mut deliveries)).await?;
        }
        let mut state_writes = Vec::new();
        for (partition, engine) in engines.iter_mut() {
            for referral_id in engine.take_dirty() {
                let payload = engine
                    .export(&referral_id)
                    .map(|s| prost::Message::encode_to_vec(&s));
                let mut record = FutureRecord::<str, [u8]>::to(&self.changelog)
                    .partition(*partition)
                    .key(&referral_id);
                if let Some(bytes) = payload.as_deref() {
                    record = record.payload(bytes);
                }
                state_writes.push(kafka::enqueue(&self.producer, record).await?);
            }
        }
        self.metrics
            .state_writes
            .inc_by(u64::try_from(state_writes.len()).unwrap_or(u64::MAX));
        if self.transactional {
            if let Some((book, consumer)) = offsets.filter(|(b, _)| !b.is_empty()) {
                let tpl = book.to_commit()?;
                let group = consumer
                    .group_metadata()
                    .ok_or_else(|| anyhow::anyhow!("the consumer has no group metadata"))?;
                tokio::task::block_in_place(|| {
                    self.producer
                        .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))
                })
                .map_err(|e| anyhow::anyhow!("cannot add offsets to the transaction: {e}"))?;
            }
            // Deliveries resolve when the transaction commits; nothing to wait for here.
            drop(deliveries);
            drop(state_writes);
            return Ok(());
        }
        kafka::await_deliveries(deliveries).await?;
        kafka::await_deliveries(state_writes).await
    }
}

/// Restores engines for newly assigned partitions and drops those of revoked ones.
async fn sync_assignment(
    consumer: &ServiceConsumer,
    input: &str,
    deps: &ServiceDeps,
    policy: &Policy,
    engines: &mut BTreeMap<i32, Engine>,
    metrics: &ClockMetrics,
    restored: &ReadinessHandle,
) -> anyhow::Result<()> {
    let Some(assigned) = kafka::current_assignment(consumer) else {
        return Ok(());
    };
    let missing = kafka::reconcile(
        engines,
        kafka::Handover::partitions(&assigned, input),
        |p| {
            tracing::warn!(
                partition = p,
                "partition lost: its clocks are with another instance now"
            );
        },
    );
    // Not ready while restoring: this instance's clocks are incomplete until it finishes.
    if !missing.is_empty() {
        restored.set(false);
    }
    for p in missing {
        let started = Instant::now();
        let (engine, records) =
            restore::restore_partition(deps.settings.clone(), policy.clone(), p).await?;
        let stats = engine.stats();
        metrics
            .restore_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            partition = p,
            records,
            referrals = stats.referrals,
            open_clocks = stats.open_clocks,
            seconds = started.elapsed().as_secs_f64(),
            "partition state restored"
        );
        engines.insert(p, engine);
    }
    restored.set(true);
    Ok(())
}

fn update_gauges(engines: &BTreeMap<i32, Engine>, metrics: &ClockMetrics) {
    let mut total = EngineStats::default();
    for e in engines.values() {
        let s = e.stats();
        total.open_clocks += s.open_clocks;
        total.pending_timers += s.pending_timers;
        total.paused_clocks += s.paused_clocks;
        total.breached_open_clocks += s.breached_open_clocks;
    }
    let set = |g: &prometheus::IntGauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
    set(&metrics.open_clocks, total.open_clocks);
    set(&metrics.pending_timers, total.pending_timers);
    set(&metrics.paused_clocks, total.paused_clocks);
    set(&metrics.breached_open_clocks, total.breached_open_clocks);
    set(&metrics.partitions, engines.len());
}

/// Rebuilds the open-clock gauges by force, rule, category, risk and state, and the age of the
/// oldest breach, from the engines' state: a full scan, so it runs every few seconds, not every
/// tick. After a restart the gauges are right as soon as the state is restored.
fn update_census(
    engines: &BTreeMap<i32, Engine>,
    metrics: &ClockMetrics,
    bounds: &SlaLabelBounds,
    now: jiff::Timestamp,
) {
    use std::collections::HashMap;
    let mut open: HashMap<[&str; 5], i64> = HashMap::new();
    let mut oldest: HashMap<[&str; 2], jiff::Timestamp> = HashMap::new();
    let censuses: Vec<_> = engines.values().map(Engine::census).collect();
    for census in &censuses {
        for ((force, rule, category, risk, state), n) in &census.open {
            let key = [
                bounds.force(force),
                bounds.rule(rule),
                bounds.category(category),
                bounds.risk(risk),
                state.label(),
            ];
            *open.entry(key).or_default() += i64::try_from(*n).unwrap_or(i64::MAX);
        }
        for ((force, rule), deadline) in &census.oldest_breach {
            let key = [bounds.force(force), bounds.rule(rule)];
            let d = oldest.entry(key).or_insert(*deadline);
            *d = (*d).min(*deadline);
        }
    }
    metrics.sla_open_clocks.reset();
    for (labels, n) in open {
        metrics.sla_open_clocks.with_label_values(&labels).set(n);
    }
    metrics.oldest_breach_age.reset();
    for (labels, deadline) in oldest {
        let age = now.duration_since(deadline).as_secs_f64().max(0.0);
        metrics
            .oldest_breach_age
            .with_label_values(&labels)
            .set(age);
    }
}

/// How often [`update_census`] runs.
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the clock service until `shutdown` is cancelled.
///
/// # Errors
/// When the rules or calendars are invalid, Kafka clients cannot be created, state cannot be
/// restored, or the broker refuses to acknowledge outputs.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let metrics = ClockMetrics::register(&deps.registry)?;
    let policy = Policy::load(&settings)?;
    let input = settings.topic(Topic::ReferralEvents);
    let transactional = settings.clock.transactional_id.is_some();
    let restored = deps.readiness.component("clock-state");
    let consumer = kafka::consumer_with(
        &settings,
        SERVICE,
        &settings.clock.group_id,
        &[&input],
        deps.readiness.component(SERVICE),
        if transactional {
            kafka::OffsetCommits::Transactional
        } else {
            kafka::OffsetCommits::Auto
        },
    )?;
    consumer.context().report_lag(consumer_metrics.lag.clone());
    consumer.context().restores_state(restored.clone());
    let handover = kafka::Handover::take_over(&consumer);
    let producer = kafka::producer_with(&settings, settings.clock.transactional_id.as_deref())?;
    let outputs = Outputs {
        producer: producer.clone(),
        sla_topic: settings.topic(Topic::SlaEvents),
        outcomes_topic: settings.topic(Topic::SlaOutcomes),
        changelog: settings.topic(Topic::ClockState),
        policy: policy.clone(),
        metrics: metrics.clone(),
        transactional,
    };
    kafka::check_copartitioned(&settings, Topic::ReferralEvents, Topic::ClockState).await?;
    let dead_letters = DeadLetters::new(producer, &settings, SERVICE, consumer_metrics.clone());
    let plausibility = safeclock_common::event::Plausibility::new(&settings);
    let mut engines: BTreeMap<i32, Engine> = BTreeMap::new();
    let bounds = SlaLabelBounds::new(
        &settings.forces,
        policy.rules.rules.iter().map(|r| r.id.as_str()),
    );
    // The first tick after the state is restored publishes the census.
    let mut last_census = Instant::now()
        .checked_sub(CENSUS_INTERVAL)
        .unwrap_or_else(Instant::now);
    let mut tick = tokio::time::interval(Duration::from_millis(settings.clock.tick_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        input,
        output = outputs.sla_topic,
        changelog = outputs.changelog,
        rules = policy.rules.rules.len(),
        "clock started"
    );

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                sync_assignment(&consumer, &input, &deps, &policy, &mut engines, &metrics, &restored).await?;
                let now = deps.time.now();
                let due: Vec<SlaEvent> = engines.values_mut().flat_map(|e| e.on_tick(now)).collect();
                let changed = engines.values().any(Engine::has_dirty);
                if !due.is_empty() || changed {
                    outputs.begin()?;
                    outputs.commit_effects(&due, Vec::new(), &mut engines, None).await?;
                }
                update_gauges(&engines, &metrics);
                if last_census.elapsed() >= CENSUS_INTERVAL {
                    update_census(&engines, &metrics, &bounds, now);
                    last_census = Instant::now();
                }
            }
            revoked = handover.revoked() => {
                // Every batch's and tick's effects are already durable: commit the offsets that
                // reflect them, so the next owner restores and resumes exactly here.
                let partitions = kafka::Handover::partitions(&revoked, &input);
                if !transactional {
                    kafka::commit_stored(&consumer, SERVICE);
                }
                engines.retain(|p, _| !partitions.contains(p));
                tracing::info!(?partitions, "partitions handed over: state written, offsets committed");
                handover.release(&revoked);
                update_gauges(&engines, &metrics);
            }
            batch = kafka::next_batch(&consumer, settings.clock.max_batch) => {
                let started = Instant::now();
                sync_assignment(&consumer, &input, &deps, &policy, &mut engines, &metrics, &restored).await?;
                outputs.begin()?;
                let mut events = Vec::new();
                let mut dead = Vec::new();
                let mut offsets = OffsetBook::default();
                for message in &batch {
                    consumer_metrics.consumed.with_label_values(&[SERVICE, message.topic()]).inc();
                    consumer_metrics.observe_latency(SERVICE, message.timestamp().to_millis());
                    let span = tracing::debug_span!("record", topic = message.topic(), partition = message.partition(), offset = message.offset());
                    let _enter = span.enter();
                    let Some(engine) = engines.get_mut(&message.partition()) else {
                        // Revoked between the fetch and now: its new owner processes it.
                        continue;
                    };
                    match plausibility.decode(message.payload().unwrap_or_default(), deps.time.now()) {
                        Err(rejection) => {
                            drop(_enter);
                            dead.push(dead_letters.send(message, &rejection).instrument(span.clone()).await?);
                        }
                        Ok(event) => {
                            tracing::debug!(referral_id = %event.referral_id, event_id = %event.event_id, "event");
                            match engine.on_event(&event, deps.time.now()) {
                                Ok(out) => events.extend(out),
                                // Refused whole: the referral's other clocks run on.
                                Err(limit) => {
                                    drop(_enter);
                                    dead.push(dead_letters.send(message, &limit.into()).instrument(span.clone()).await?);
                                }
                            }
                        }
                    }
                    offsets.handled(message);
                }
                outputs
                    .commit_effects(&events, dead, &mut engines, Some((&offsets, &consumer)))
                    .await?;
                if !transactional {
                    offsets.store(&consumer);
                }
                consumer_metrics.batch_seconds.with_label_values(&[SERVICE]).observe(started.elapsed().as_secs_f64());
            }
        }
    }
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("clock stopped");
    Ok(())
}
