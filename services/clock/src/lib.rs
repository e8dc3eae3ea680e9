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
//! 1. the SLA events, their outcomes and the dead letters are produced and acknowledged by the
//!    broker;
//! 2. then the changed referral states are produced to the changelog and acknowledged;
//! 3. then the input offsets are stored for commit.
//!
//! A crash between 1 and 2 restores the older state and re-emits the same transitions with the
//! same ids (consumers de-duplicate); a crash between 2 and 3 re-reads inputs the restored state
//! has already seen, which are ignored as duplicates. No transition is lost either way.
//!
//! A tick has no input offsets to store, so its step 2 is left in flight while the next tick's
//! step 1 goes out (outside a transaction): a breach due meanwhile waits for one acknowledgement,
//! not two. The order above still holds for every state (it is sent only once its tick's SLA
//! events are acknowledged), and the in-flight states are settled before any batch, hand-over or
//! stop. A state the broker did not take is written again from the referral's **current** state
//! (never from its older copy, which would become the latest on the compacted changelog); until
//! then a crash is the crash between 1 and 2 above.
//!
//! # No record stops a partition
//! - An invalid record is dead-lettered with its reason (bounded: a value over
//!   `dead_letters.max_payload_bytes` keeps its length, SHA-256 and a prefix).
//! - A valid record whose effects the broker would refuse for good is **refused after all**
//!   (`batch.rs`): dead-lettered with reason `output_too_large` (or `output_refused`), its
//!   referral put back to its state before the batch and the batch's other records of that
//!   referral applied again without it. Sizes are checked before anything is produced: an SLA
//!   event or outcome over the producer's `message.max.bytes`, or a referral state over that less
//!   64 KiB of headroom (room for the warnings and breaches its clocks may still fire), refuses
//!   the record that caused it; a refusal from the broker itself (a topic whose limit is lower)
//!   does the same, lowers the limit this instance checks against, and the batch's outputs are
//!   written again. So no transition is published for a refused record, and none is lost for
//!   the others.
//! - A state that is over the limit with no record of the batch to refuse (a tick's breach flags
//!   on a referral already near the limit) is not written: it is dead-lettered instead (bounded)
//!   and logged as an error. The changelog keeps the referral's previous state, so after a
//!   restart its due warnings and breaches fire again, under the same ids.
//! - A broker that is away (transport failure, timeouts, no leader, not enough replicas) is
//!   waited out: the whole batch's outputs are written again after a pause, in order, for as long
//!   as it takes; nothing is stored meanwhile and the service reports not ready. Only a producer
//!   that can no longer write at all (librdkafka's fatal error) stops the service, whose restart
//!   then processes the batch again with a new one.

mod attribute;
mod batch;
pub mod engine;
pub mod explain;
pub mod metrics;
pub mod outcome;
pub mod restore;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::TopicPartitionList;
use safeclock_common::erasure::ErasureFeed;
use safeclock_common::event::{transition_label, Plausibility};
use safeclock_common::kafka::{
    self, BrokerWait, DeadLetters, Interrupted, OffsetBook, Output, ProduceError, Refusal,
    ServiceConsumer, Topic, WritePipeline,
};
use safeclock_common::metrics::{ConsumerMetrics, SlaLabelBounds};
use safeclock_common::ops::ReadinessHandle;
use safeclock_common::policy::Policy;
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;

use crate::batch::{Cause, Fate, OutputTopics, Plan, ReferralKey};
use crate::engine::{Engine, EngineStats};
use crate::metrics::ClockMetrics;

const SERVICE: &str = "clock";

/// Room left in a referral's state record, under the producer's limit, when records are applied:
/// the warnings and breaches its clocks fire later grow it a little without any record to refuse.
pub const STATE_HEADROOM: usize = 64 * 1024;

/// Room left under `message.max.bytes` for a record's framing (librdkafka counts key, value and
/// headers against it).
const FRAMING: usize = 512;

/// Runs the clock service until `shutdown` is cancelled.
///
/// # Errors
/// When the rules or calendars are invalid, Kafka clients cannot be created, state cannot be
/// restored, or the producer can no longer write at all.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ClockService::start(deps, consumer_metrics, shutdown.clone())
        .await?
        .run(shutdown)
        .await
}

/// The clock service: its consumer, and everything the loop's arms work on.
pub struct ClockService {
    consumer: ServiceConsumer,
    core: Core,
}

/// Whether the loop goes on after a batch.
enum Flow {
    Continue,
    /// Told to stop while the broker was away: the batch is not durable, nothing is stored.
    Stop,
}

/// The clock's state and its Kafka side, apart from the consumer (which the hand-over borrows).
struct Core {
    deps: ServiceDeps,
    input: String,
    policy: Policy,
    metrics: ClockMetrics,
    consumer_metrics: ConsumerMetrics,
    plausibility: Plausibility,
    /// One engine per assigned input partition.
    engines: BTreeMap<i32, Engine>,
    bounds: SlaLabelBounds,
    /// Not ready while partitions are being restored.
    restored: ReadinessHandle,
    last_census: Instant,
    /// When the gauges were last counted (they visit every clock).
    last_gauges: Instant,
    /// The latest the next tick comes, due or not: `clock.tick_interval_ms` after the last.
    idle_tick_at: tokio::time::Instant,
    writer: Writer,
    /// The erased referrals, followed on every tick: their state is dropped and their records
    /// refused.
    erasures: ErasureFeed,
}

impl ClockService {
    /// Loads the policy, creates the Kafka clients and checks the changelog's partitions.
    ///
    /// # Errors
    /// When the rules or calendars are invalid, a client cannot be created, or the changelog has
    /// fewer partitions than the input.
    pub async fn start(
        deps: ServiceDeps,
        consumer_metrics: ConsumerMetrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
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
        let producer = kafka::producer_with(&settings, settings.clock.transactional_id.as_deref())?;
        kafka::check_copartitioned(&settings, Topic::ReferralEvents, Topic::ClockState).await?;
        let erasures = ErasureFeed::start(&settings, SERVICE).await?;
        let writer = Writer {
            producer: producer.clone(),
            topics: OutputTopics {
                sla: settings.topic(Topic::SlaEvents),
                outcomes: settings.topic(Topic::SlaOutcomes),
                changelog: settings.topic(Topic::ClockState),
                policy: policy.clone(),
            },
            dead_letters: DeadLetters::new(
                producer.clone(),
                &settings,
                SERVICE,
                consumer_metrics.clone(),
            ),
            wait: BrokerWait::new(
                SERVICE,
                deps.readiness.component("clock-outputs"),
                shutdown,
                consumer_metrics.broker_waits.with_label_values(&[SERVICE]),
            ),
            transactional,
            metrics: metrics.clone(),
            limit: settings
                .kafka
                .producer_message_max_bytes()
                .saturating_sub(FRAMING),
            learned: HashMap::new(),
            tick_states: WritePipeline::new(producer, 1),
            rewrite: std::collections::BTreeSet::new(),
        };
        // The configuration refuses limits whose largest state record passes 256 KiB; a
        // producer limit set lower than that is allowed, but states past it are dead-lettered
        // (`output_too_large`) instead of written: say so once, at start.
        let worst =
            prost::Message::encoded_len(&policy.limits.worst_case_state(&settings.validation));
        if worst > writer.limit(&writer.topics.changelog) {
            tracing::warn!(
                worst_case_state_bytes = worst,
                producer_limit_bytes = writer.limit(&writer.topics.changelog),
                "[clock.limits] allow a referral state larger than the producer's message.max.bytes \
                 takes: a referral that reaches it has its further events dead-lettered \
                 (output_too_large); raise message.max.bytes or lower the limits"
            );
        }
        let bounds = SlaLabelBounds::new(
            &settings.forces,
            policy.rules.rules.iter().map(|r| r.id.as_str()),
        );
        tracing::info!(
            input,
            output = writer.topics.sla,
            changelog = writer.topics.changelog,
            rules = policy.rules.rules.len(),
            "clock started"
        );
        Ok(Self {
            consumer,
            core: Core {
                plausibility: Plausibility::new(&settings),
                deps,
                input,
                policy,
                metrics,
                consumer_metrics,
                engines: BTreeMap::new(),
                bounds,
                restored,
                // The first tick after the state is restored publishes the census.
                last_census: Instant::now()
                    .checked_sub(CENSUS_INTERVAL)
                    .unwrap_or_else(Instant::now),
                idle_tick_at: tokio::time::Instant::now(),
                last_gauges: Instant::now()
                    .checked_sub(GAUGE_INTERVAL)
                    .unwrap_or_else(Instant::now),
                writer,
                erasures,
            },
        })
    }

    /// Runs until `shutdown` is cancelled: ticks, hand-overs and batches, one call each.
    ///
    /// # Errors
    /// When state cannot be restored or the producer can no longer write at all.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { consumer, mut core } = self;
        let handover = kafka::Handover::take_over(&consumer);
        let settings = core.deps.settings.clone();
        loop {
            let wake = core.next_wake();
            let flow = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(wake) => core.on_tick(&consumer).await?,
                revoked = handover.revoked() => core.hand_over(&consumer, &handover, &revoked).await?,
                batch = kafka::next_batch(&consumer, settings.clock.max_batch) => {
                    core.on_batch(&consumer, &batch).await?
                }
            };
            if matches!(flow, Flow::Stop) {
                break;
            }
        }
        core.settle_before_stop().await;
        kafka::commit_stored(&consumer, SERVICE);
        tracing::info!("clock stopped");
        Ok(())
    }
}

impl Core {
    /// When to tick next: at the earliest warning or deadline of any engine, and at the latest
    /// `clock.tick_interval_ms` from now (which also paces restores of newly assigned
    /// partitions, the gauges and the census). A fixed tick would fire a breach up to a whole
    /// interval after its deadline; waking at the deadline fires it then.
    fn next_wake(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        // From the last tick, not from now: counted from now, a steady input (a batch more often
        // than the interval) pushed the tick away for ever, and with it the census, the gauges
        // and the retention sweep.
        let idle = self.idle_tick_at;
        let Some(due) = self.engines.values().filter_map(Engine::next_due).min() else {
            return idle;
        };
        // The engines run on the service's time source (simulated in the demo): its seconds
        // pass `speed` times faster than real ones.
        let ahead = due.duration_since(self.deps.time.now());
        if ahead.is_negative() || ahead.is_zero() {
            return now;
        }
        let interval = Duration::from_millis(self.deps.settings.clock.tick_interval_ms);
        let real = Duration::try_from(ahead)
            .unwrap_or(interval)
            .div_f64(self.deps.time.speed().max(1.0));
        (now + real).min(idle)
    }

    /// Forgets referrals with no clock past `clock.closed_retention_days`; their tombstones go
    /// out with this tick's writes.
    fn forget_closed(&mut self, now: jiff::Timestamp) {
        let Some(days) = self.deps.settings.clock.closed_retention_days else {
            return;
        };
        let before = now - jiff::SignedDuration::from_hours(24 * i64::from(days));
        let forgotten: usize = self
            .engines
            .values_mut()
            .map(|e| e.forget_closed(before, RETENTION_SWEEP_SLOTS))
            .sum();
        if forgotten > 0 {
            self.metrics.referrals_forgotten.inc_by(forgotten as u64);
            tracing::info!(
                forgotten,
                days,
                "closed referrals forgotten after their retention"
            );
        }
    }

    /// Drops the state of the referrals erased since the last tick; their tombstones go out
    /// with this tick's writes.
    fn apply_erasures(&mut self) {
        let started = Instant::now();
        let engines = &mut self.engines;
        let Some((erasures, forgotten)) =
            self.erasures
                .apply_new(&self.consumer_metrics, SERVICE, |matches| {
                    engines
                        .values_mut()
                        .map(|e| e.forget_matching(matches))
                        .sum()
                })
        else {
            return;
        };
        tracing::info!(
            erasures,
            referrals_held = forgotten,
            seconds = started.elapsed().as_secs_f64(),
            "erasures applied: the referrals' state dropped and tombstoned, their records refused from now on"
        );
    }

    /// Fires what is due, writes it and the changed states.
    async fn on_tick(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<Flow> {
        self.idle_tick_at = tokio::time::Instant::now()
            + Duration::from_millis(self.deps.settings.clock.tick_interval_ms);
        self.sync_assignment(consumer).await?;
        self.apply_erasures();
        let now = self.deps.time.now();
        if self.last_census.elapsed() >= CENSUS_INTERVAL {
            self.forget_closed(now);
        }
        let mut plan = Plan::of_tick(
            self.engines
                .values_mut()
                .flat_map(|e| e.on_tick(now))
                .collect(),
        );
        let flow = if !plan.tick.is_empty()
            || self.engines.values().any(Engine::has_dirty)
            || self.writer.has_rewrites()
        {
            self.writer
                .make_durable(
                    &mut plan,
                    &mut self.engines,
                    &[] as &[BorrowedMessage<'_>],
                    None,
                    States::InFlight,
                )
                .await?
        } else {
            Flow::Continue
        };
        if self.last_gauges.elapsed() >= GAUGE_INTERVAL {
            update_gauges(&self.engines, &self.metrics);
            self.last_gauges = Instant::now();
        }
        if self.last_census.elapsed() >= CENSUS_INTERVAL {
            update_census(&self.engines, &self.metrics, &self.bounds, now);
            self.last_census = Instant::now();
        }
        Ok(flow)
    }

    /// Settles the last tick's states (and writes again any the broker did not take), commits
    /// the offsets that reflect every batch's durable effects and drops the revoked partitions'
    /// engines, so the next owner restores and resumes exactly here.
    async fn hand_over(
        &mut self,
        consumer: &ServiceConsumer,
        handover: &kafka::Handover<'_>,
        revoked: &TopicPartitionList,
    ) -> anyhow::Result<Flow> {
        // Even when told to stop meanwhile, the partitions are handed over: the offsets cover
        // only batches, whose states are durable, and a state not settled fires its tick's
        // transitions again at the next owner, under the same ids.
        let flow = self.settle_states().await?;
        let partitions = kafka::Handover::partitions(revoked, &self.input);
        if !self.writer.transactional {
            kafka::commit_stored(consumer, SERVICE);
        }
        self.engines.retain(|p, _| !partitions.contains(p));
        tracing::info!(
            ?partitions,
            "partitions handed over: state written, offsets committed"
        );
        handover.release(revoked);
        update_gauges(&self.engines, &self.metrics);
        Ok(flow)
    }

    /// Settles the last tick's states and writes again, awaited, those the broker did not take.
    async fn settle_states(&mut self) -> anyhow::Result<Flow> {
        self.writer.settle_tick_states().await?;
        if !self.writer.has_rewrites() {
            return Ok(Flow::Continue);
        }
        self.writer
            .make_durable(
                &mut Plan::default(),
                &mut self.engines,
                &[] as &[BorrowedMessage<'_>],
                None,
                States::Awaited,
            )
            .await
    }

    /// On stop, the last tick's states, for at most [`STOP_SETTLE`]: a state not settled fires
    /// its tick's transitions again after the restart, under the same ids.
    async fn settle_before_stop(&mut self) {
        match tokio::time::timeout(STOP_SETTLE, self.settle_states()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error.message = %e, "the last tick's states could not be settled before the stop: its transitions fire again after the restart");
            }
            Err(_) => {
                tracing::warn!("the last tick's states were not settled in time before the stop: its transitions fire again after the restart");
            }
        }
    }

    /// Applies a batch, makes its effects durable, then stores its offsets.
    async fn on_batch(
        &mut self,
        consumer: &ServiceConsumer,
        batch: &[BorrowedMessage<'_>],
    ) -> anyhow::Result<Flow> {
        let started = Instant::now();
        self.sync_assignment(consumer).await?;
        let mut plan = Plan::default();
        let mut offsets = OffsetBook::default();
        for message in batch {
            let fate = self.apply(message, &mut plan);
            if !matches!(fate, Fate::Skipped) {
                offsets.handled(message);
            }
            plan.records.push(fate);
        }
        let flow = self
            .writer
            .make_durable(
                &mut plan,
                &mut self.engines,
                batch,
                Some((&offsets, consumer)),
                States::Awaited,
            )
            .await?;
        if matches!(flow, Flow::Continue) && !self.writer.transactional {
            offsets.store(consumer);
        }
        self.consumer_metrics
            .batch_seconds
            .with_label_values(&[SERVICE])
            .observe(started.elapsed().as_secs_f64());
        Ok(flow)
    }

    /// Decodes one record and applies it to its partition's engine.
    fn apply(&mut self, message: &BorrowedMessage<'_>, plan: &mut Plan) -> Fate {
        self.consumer_metrics
            .consumed
            .with_label_values(&[SERVICE, message.topic()])
            .inc();
        self.consumer_metrics
            .observe_latency(SERVICE, message.timestamp().to_millis());
        let span = tracing::debug_span!(
            "record",
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset()
        );
        let _enter = span.enter();
        let Some(engine) = self.engines.get_mut(&message.partition()) else {
            // Revoked between the fetch and now: its new owner processes it.
            return Fate::Skipped;
        };
        let now = self.deps.time.now();
        match self
            .plausibility
            .decode(message.payload().unwrap_or_default(), now)
        {
            Err(rejection) => Fate::Refused(self.writer.dead_letters.letter(message, &rejection)),
            Ok(event) if self.erasures.erased().contains(&event.referral_id) => {
                Fate::Refused(self.writer.dead_letters.letter_for_erased(message))
            }
            Ok(event) => {
                tracing::debug!(referral_id = %event.referral_id, event_id = %event.event_id, "event");
                plan.remember(engine, message.partition(), &event.referral_id);
                match batch::apply_one(engine, &event, now) {
                    Ok(events) => batch::applied(message, event, now, events),
                    Err(rejection) => {
                        Fate::Refused(self.writer.dead_letters.letter(message, &rejection))
                    }
                }
            }
        }
    }

    /// Restores engines for newly assigned partitions and drops those of revoked ones.
    async fn sync_assignment(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        let Some(assigned) = kafka::current_assignment(consumer) else {
            return Ok(());
        };
        let missing = kafka::reconcile(
            &mut self.engines,
            kafka::Handover::partitions(&assigned, &self.input),
            |p| {
                tracing::warn!(
                    partition = p,
                    "partition lost: its clocks are with another instance now"
                );
            },
        );
        // Not ready while restoring: this instance's clocks are incomplete until it finishes.
        if !missing.is_empty() {
            self.restored.set(false);
        }
        for p in missing {
            let started = Instant::now();
            let (mut engine, records) =
                restore::restore_partition(self.deps.settings.clone(), self.policy.clone(), p)
                    .await?;
            // A referral erased while this partition was elsewhere (or before a crash wrote
            // its tombstone): dropped now, its tombstone written with the next writes.
            let erased = self.erasures.erased();
            if !erased.is_empty() {
                engine.forget_matching(|id| erased.contains(id));
            }
            let stats = engine.stats();
            self.metrics
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
            self.engines.insert(p, engine);
        }
        self.restored.set(true);
        Ok(())
    }
}

/// Where and how the clock writes: outputs, dead letters and states, with the sizes the broker
/// takes.
struct Writer {
    producer: FutureProducer,
    topics: OutputTopics,
    dead_letters: DeadLetters,
    wait: BrokerWait,
    /// Each batch is one transaction (outputs, state and input offsets) when set.
    transactional: bool,
    metrics: ClockMetrics,
    /// The largest key and value a record may have: the producer's `message.max.bytes` less
    /// framing.
    limit: usize,
    /// Per topic, a lower limit learned from the broker refusing a record of that size.
    learned: HashMap<String, usize>,
    /// The state records of the last tick, sent once its outputs were acknowledged and not yet
    /// settled, with the referral each is of (see the delivery contract).
    tick_states: WritePipeline<Vec<ReferralKey>>,
    /// Referrals whose state the broker did not take: written again, from their current state,
    /// with the next changes.
    rewrite: std::collections::BTreeSet<ReferralKey>,
}

impl Writer {
    fn limit(&self, topic: &str) -> usize {
        self.learned
            .get(topic)
            .copied()
            .unwrap_or(self.limit)
            .min(self.limit)
    }

    /// Makes the plan's effects durable: outputs and dead letters, then states (then, in a
    /// transaction, the offsets), refusing the records whose effects the broker will never take
    /// and waiting out a broker that is away. `batch` is the input of a batch (empty for a tick).
    /// With `mode` [`States::InFlight`] (a tick, outside a transaction) the states are sent
    /// but not waited for: the next call settles them.
    ///
    /// # Errors
    /// When the producer can no longer write at all, or an output cannot be serialised.
    async fn make_durable(
        &mut self,
        plan: &mut Plan,
        engines: &mut BTreeMap<i32, Engine>,
        batch: &[impl Message],
        offsets: Option<(&OffsetBook, &ServiceConsumer)>,
        mode: States,
    ) -> anyhow::Result<Flow> {
        let in_flight = mode == States::InFlight && !self.transactional;
        if !in_flight {
            self.settle_tick_states().await?;
        }
        // Pauses for a broker that was away (in a transaction; outside one, `deliver` waits
        // by itself): the next pause is longer.
        let mut pauses = 0u32;
        loop {
            for (p, engine) in engines.iter_mut() {
                for referral in engine.take_dirty() {
                    plan.changed.insert((*p, referral));
                }
            }
            plan.changed.extend(std::mem::take(&mut self.rewrite));
            let states = self.fit_states(plan, engines, batch);
            let outputs = plan.outputs(&self.topics)?;
            if let Some(i) = outputs
                .iter()
                .position(|(o, _)| o.size() > self.limit(&o.topic))
            {
                // Too large for the producer: refused before anything of the set is written.
                let (output, cause) = &outputs[i];
                let error = ProduceError::too_large(&output.topic);
                self.refused(plan, engines, batch, output, cause.clone(), error);
                continue;
            }
            self.begin()?;
            let records: Vec<Output> = outputs.iter().map(|(o, _)| o.clone()).collect();
            let refusals = match self.write(&records, pauses + 1).await {
                Written::Done(refusals) => refusals,
                Written::Retry => {
                    pauses += 1;
                    continue;
                }
                Written::Stop => return Ok(Flow::Stop),
                Written::Fatal(e) => return Err(e),
            };
            if !refusals.is_empty() {
                self.abort();
                for Refusal { index, error } in refusals {
                    let (output, cause) = &outputs[index];
                    self.refused(plan, engines, batch, output, cause.clone(), error);
                }
                continue;
            }
            // Outputs first: state must never claim effects the broker does not hold.
            if in_flight {
                // The previous tick's states went out before these outputs: settled by now.
                self.settle_tick_states().await?;
                self.metrics
                    .state_writes
                    .inc_by(u64::try_from(states.len()).unwrap_or(u64::MAX));
                if !states.is_empty() {
                    let (records, keys) = states.into_iter().unzip();
                    self.tick_states.submit(records, keys).await;
                }
                self.count_emitted(plan);
                return Ok(Flow::Continue);
            }
            let state_records: Vec<Output> = states.iter().map(|(o, _)| o.clone()).collect();
            let refusals = match self.write(&state_records, pauses + 1).await {
                Written::Done(refusals) => refusals,
                Written::Retry => {
                    pauses += 1;
                    continue;
                }
                Written::Stop => return Ok(Flow::Stop),
                Written::Fatal(e) => return Err(e),
            };
            if !refusals.is_empty() {
                self.abort();
                for Refusal { index, error } in refusals {
                    let (output, key) = &states[index];
                    self.state_refused(plan, engines, batch, output, key, &error);
                }
                continue;
            }
            match self.commit(offsets, pauses + 1).await {
                Written::Done(_) => {}
                Written::Retry => {
                    pauses += 1;
                    continue;
                }
                Written::Stop => return Ok(Flow::Stop),
                Written::Fatal(e) => return Err(e),
            }
            if self.transactional {
                self.wait.recovered(pauses + 1);
            }
            self.count_emitted(plan);
            self.metrics
                .state_writes
                .inc_by(u64::try_from(states.len()).unwrap_or(u64::MAX));
            return Ok(Flow::Continue);
        }
    }

    fn count_emitted(&self, plan: &Plan) {
        for e in plan.events() {
            self.metrics
                .emitted
                .with_label_values(&[transition_label(e.transition())])
                .inc();
        }
    }

    /// Whether states the broker did not take wait to be written again.
    fn has_rewrites(&self) -> bool {
        !self.rewrite.is_empty()
    }

    /// Waits for the last tick's states. One the broker did not take is written again, from its
    /// referral's current state, with the next changes (a tick comes within
    /// `clock.tick_interval_ms`); one it refuses as too large is fitted under the lowered limit
    /// the same way (a tick's state has no record to refuse, so it is dead-lettered); one it
    /// refuses otherwise is dead-lettered now. Either way the changelog keeps the previous state
    /// meanwhile, as after a crash between steps 1 and 2 of the delivery contract.
    ///
    /// # Errors
    /// When the producer can no longer write at all.
    async fn settle_tick_states(&mut self) -> anyhow::Result<()> {
        while !self.tick_states.is_empty() {
            let written = self.tick_states.next().await;
            match written.outcome {
                Ok(refusals) => {
                    let (too_large, refused): (Vec<Refusal>, Vec<Refusal>) =
                        refusals.into_iter().partition(|r| r.error.is_too_large());
                    for Refusal { index, .. } in too_large {
                        let output = &written.outputs[index];
                        self.learn(&output.topic, output.size());
                        self.rewrite.insert(written.release[index].clone());
                    }
                    match self
                        .dead_letters
                        .dead_letter_refused(&written.outputs, &refused, &self.wait)
                        .await
                    {
                        Ok(_) | Err(Interrupted::Shutdown) => {}
                        Err(Interrupted::Fatal(e)) => return Err(e.into()),
                    }
                }
                Err(e) if e.failure == kafka::Failure::Fatal => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(
                        states = written.release.len(),
                        error.message = %e,
                        "the broker did not take a tick's states: writing them again from the referrals' current state"
                    );
                    self.rewrite.extend(written.release);
                }
            }
        }
        Ok(())
    }

    /// The changelog record of every changed referral. A referral whose state would be over the
    /// bound has the records that make it so refused (see [`batch`]); one over the limit with no
    /// record of this batch to refuse is dead-lettered instead of written.
    fn fit_states(
        &self,
        plan: &mut Plan,
        engines: &mut BTreeMap<i32, Engine>,
        batch: &[impl Message],
    ) -> Vec<(Output, ReferralKey)> {
        let changelog = self.topics.changelog.clone();
        let limit = self.limit(&changelog);
        let bound = limit.saturating_sub(STATE_HEADROOM);
        let mut states = Vec::with_capacity(plan.changed.len());
        for key in plan.changed.clone() {
            if plan.unwritable.contains(&key) {
                continue;
            }
            let Some(engine) = engines.get(&key.0) else {
                continue;
            };
            let mut output = self.topics.of_state(engine, &key);
            if output.size() > bound && plan.has_records(&key) {
                plan.fit_state(
                    engines,
                    &key,
                    bound.saturating_sub(key.1.len()),
                    &changelog,
                    &self.dead_letters,
                    batch,
                );
                let Some(engine) = engines.get(&key.0) else {
                    continue;
                };
                output = self.topics.of_state(engine, &key);
            }
            if output.size() > limit {
                plan.letters.push(Some(
                    self.dead_letters
                        .letter_for_output(&output, &ProduceError::too_large(&changelog)),
                ));
                tracing::error!(
                    partition = key.0,
                    referral_id = %key.1,
                    bytes = output.size(),
                    limit,
                    "a referral's state is too large to write and no record of this batch made it so: not written (dead-lettered); the changelog keeps its previous state"
                );
                plan.unwritable.insert(key);
                continue;
            }
            states.push((output, key));
        }
        states
    }

    /// `output` (caused by `cause`) is refused for good: its cause is refused instead.
    fn refused(
        &mut self,
        plan: &mut Plan,
        engines: &mut BTreeMap<i32, Engine>,
        batch: &[impl Message],
        output: &Output,
        cause: Cause,
        error: ProduceError,
    ) {
        if error.is_too_large() {
            self.learn(&output.topic, output.size());
        }
        let dl = &self.dead_letters;
        match cause {
            Cause::Record(i) => {
                if let Some(message) = batch.get(i) {
                    let letter = dl.letter_for_refused_output(
                        message,
                        &error,
                        "an SLA event or outcome it causes is refused",
                    );
                    plan.refuse(engines, i, letter, dl, batch);
                }
            }
            Cause::Tick(j) => {
                plan.tick[j] = None;
                plan.letters
                    .push(Some(dl.letter_for_output(output, &error)));
            }
            Cause::RecordLetter(i) => {
                plan.records[i] = match dl.stripped_down(output, &error) {
                    Some(bare) => Fate::Refused(bare),
                    None => {
                        give_up_letter(&error);
                        Fate::Unrecorded
                    }
                };
            }
            Cause::Letter(k) => {
                plan.letters[k] = dl.stripped_down(output, &error);
                if plan.letters[k].is_none() {
                    give_up_letter(&error);
                }
            }
        }
    }

    /// The state record `output` of `key` is refused for good by the broker.
    fn state_refused(
        &mut self,
        plan: &mut Plan,
        engines: &mut BTreeMap<i32, Engine>,
        batch: &[impl Message],
        output: &Output,
        key: &ReferralKey,
        error: &ProduceError,
    ) {
        if error.is_too_large() {
            // The next round fits the state under the lowered limit (refusing records of this
            // batch, or dead-lettering the state when there are none).
            self.learn(&output.topic, output.size());
        } else if plan.has_records(key) {
            plan.refuse_all(engines, key, error, &self.dead_letters, batch);
        } else {
            plan.letters
                .push(Some(self.dead_letters.letter_for_output(output, error)));
            plan.unwritable.insert(key.clone());
        }
    }

    /// The broker refused a record of `size` bytes for `topic` as too large: check below that
    /// from now on.
    fn learn(&mut self, topic: &str, size: usize) {
        let limit = size.saturating_sub(1).min(self.limit(topic));
        tracing::warn!(
            topic,
            limit,
            "the broker refuses records of this size: sizes are checked against the lower limit from now on"
        );
        self.learned.insert(topic.to_string(), limit);
    }

    /// Writes `records`, waiting out an unavailable broker (outside a transaction here; inside
    /// one, the transaction is aborted and the caller begins again).
    async fn write(&self, records: &[Output], attempt: u32) -> Written {
        if !self.transactional {
            return match kafka::deliver(&self.producer, records, &self.wait).await {
                Ok(refusals) => Written::Done(refusals),
                Err(Interrupted::Shutdown) => Written::Stop,
                Err(Interrupted::Fatal(e)) => Written::Fatal(e.into()),
            };
        }
        match kafka::deliver_in_transaction(&self.producer, records).await {
            Ok(refusals) => Written::Done(refusals),
            Err(e) if e.failure == kafka::Failure::Fatal => Written::Fatal(e.into()),
            Err(e) => {
                self.abort();
                match self.wait.pause(attempt, records.len(), &e).await {
                    Ok(()) => Written::Retry,
                    Err(_) => Written::Stop,
                }
            }
        }
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

    /// Aborts the transaction under way (transactional mode only).
    ///
    /// After the broker refused a record, librdkafka re-queues the records of the same partition
    /// that were in flight behind it (their sequence numbers skipped one) and does not send them
    /// until the transaction is aborted; the abort in turn waits for them, so it times out until
    /// they expire (`message.timeout.ms`, at most `transaction.timeout.ms`, 60 s by default). A
    /// timed-out abort may be called again: it is, until it completes.
    fn abort(&self) {
        if !self.transactional {
            return;
        }
        for attempt in 1..=ABORT_ATTEMPTS {
            match tokio::task::block_in_place(|| {
                self.producer.abort_transaction(Duration::from_secs(30))
            }) {
                Ok(()) => return,
                Err(rdkafka::error::KafkaError::Transaction(e))
                    if e.is_retriable() && attempt < ABORT_ATTEMPTS =>
                {
                    tracing::warn!(error.message = %e, attempt, "the transaction is not aborted yet; trying again");
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "cannot abort the transaction");
                    return;
                }
            }
        }
    }

    /// In a transaction: adds the input offsets and commits. A retriable failure aborts and
    /// waits; a fatal one stops the service.
    async fn commit(
        &self,
        offsets: Option<(&OffsetBook, &ServiceConsumer)>,
        attempt: u32,
    ) -> Written {
        if !self.transactional {
            return Written::Done(Vec::new());
        }
        let result = (|| -> Result<(), rdkafka::error::KafkaError> {
            if let Some((book, consumer)) = offsets.filter(|(b, _)| !b.is_empty()) {
                let tpl = book.to_commit()?;
                let group = consumer
                    .group_metadata()
                    .ok_or(rdkafka::error::KafkaError::Canceled)?;
                tokio::task::block_in_place(|| {
                    self.producer
                        .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))
                })?;
            }
            tokio::task::block_in_place(|| {
                self.producer.commit_transaction(Duration::from_secs(60))
            })
        })();
        match result {
            Ok(()) => Written::Done(Vec::new()),
            Err(e) => {
                let fatal = match &e {
                    rdkafka::error::KafkaError::Transaction(t) => t.is_fatal(),
                    rdkafka::error::KafkaError::Canceled => true,
                    _ => false,
                };
                if fatal {
                    return Written::Fatal(anyhow::anyhow!("cannot commit the transaction: {e}"));
                }
                self.abort();
                match self.wait.pause(attempt, 0, &e).await {
                    Ok(()) => Written::Retry,
                    Err(_) => Written::Stop,
                }
            }
        }
    }
}

/// Whether [`Writer::make_durable`] waits for the states it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum States {
    /// Acknowledged before it returns (a batch: its offsets follow them).
    Awaited,
    /// Sent behind the outputs and settled by the next call (a tick, outside a transaction).
    InFlight,
}

/// What became of a write.
enum Written {
    /// Acknowledged, but for these refusals.
    Done(Vec<Refusal>),
    /// The broker was away and the pause is over: begin again.
    Retry,
    /// Told to stop while waiting.
    Stop,
    /// The producer can no longer write.
    Fatal(anyhow::Error),
}

fn give_up_letter(error: &ProduceError) {
    tracing::error!(
        error.message = %error,
        "the broker refuses even a bare dead letter (no value, key or original headers): the record is refused without one; raise the dead-letter topic's max.message.bytes"
    );
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

/// How many times a timed-out abort is called again (30 s each) before the next `begin` is left
/// to fail, which stops the service.
const ABORT_ATTEMPTS: u32 = 10;

/// How long a stop waits for the last tick's states.
const STOP_SETTLE: Duration = Duration::from_secs(10);

/// How often [`update_census`] runs.
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// How often a tick counts the gauges (open, paused and breached clocks, timers): counting
/// visits every clock, about 10 ms at a million, and the clock ticks at every deadline, so
/// counting on every tick delayed every breach behind it by that much while deadlines were
/// dense. Prometheus reads them every 15 s or so.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Slab slots each engine looks at per census for referrals past their retention: a whole pass
/// over a million referrals takes about four minutes and no sweep costs more than this many.
const RETENTION_SWEEP_SLOTS: usize = 20_000;

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use safeclock_common::config::Settings;
    use safeclock_common::kafka::dlq_headers;

    fn writer(limit: usize) -> (Writer, Engine) {
        let settings = Settings::defaults().unwrap();
        let policy = Policy::load(&settings).unwrap();
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        let registry = prometheus::Registry::new();
        let consumer_metrics = ConsumerMetrics::register(&registry).unwrap();
        let readiness = safeclock_common::ops::Readiness::default();
        let writer = Writer {
            producer: producer.clone(),
            topics: OutputTopics {
                sla: "sla".into(),
                outcomes: "outcomes".into(),
                changelog: "clock-state".into(),
                policy: policy.clone(),
            },
            dead_letters: DeadLetters::new(
                producer.clone(),
                &settings,
                SERVICE,
                consumer_metrics.clone(),
            ),
            wait: BrokerWait::new(
                SERVICE,
                readiness.component("clock-outputs"),
                CancellationToken::new(),
                consumer_metrics.broker_waits.with_label_values(&[SERVICE]),
            ),
            transactional: false,
            metrics: ClockMetrics::register(&registry).unwrap(),
            limit,
            learned: HashMap::new(),
            tick_states: WritePipeline::new(producer, 1),
            rewrite: std::collections::BTreeSet::new(),
        };
        (writer, Engine::new(policy.rules, policy.calendars))
    }

    fn event(id: &str, kind: &str) -> safeclock_common::schema::v1::ReferralEvent {
        safeclock_common::event::decode_referral_event(
            format!(
                r#"{{"eventId":"{id}","referralId":"R-1","forceId":"nottinghamshire","occurredAt":"2025-03-03T09:00:00Z",{kind}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_state_over_the_limit_with_no_record_to_refuse_is_dead_lettered_not_written() {
        let (mut writer, mut engine) = writer(20_000);
        let now: jiff::Timestamp = "2025-03-03T09:00:00Z".parse().unwrap();
        for i in 0..3 {
            let device = format!("DEV-{i}-{}", "x".repeat(10_000));
            engine
                .on_event(
                    &event(
                        &format!("e-{i}"),
                        &format!(r#""deviceSeized":{{"deviceRef":"{device}"}}"#),
                    ),
                    now,
                )
                .unwrap();
        }
        let mut engines = BTreeMap::from([(0, engine)]);
        // A tick's plan: the referral changed, with no record of this plan behind it.
        let mut plan = Plan::of_tick(Vec::new());
        for r in engines.get_mut(&0).unwrap().take_dirty() {
            plan.changed.insert((0, r));
        }
        let states = writer.fit_states(&mut plan, &mut engines, &[] as &[OwnedMessage]);
        assert!(states.is_empty(), "not written");
        assert!(plan.unwritable.contains(&(0, "R-1".to_string())));
        let letter = plan.letters[0].as_ref().unwrap();
        let header = |name: &str| {
            letter.headers.as_ref().and_then(|h| {
                rdkafka::message::Headers::iter(h)
                    .find(|h| h.key == name)
                    .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
            })
        };
        assert_eq!(
            header(dlq_headers::REASON).as_deref(),
            Some("output_too_large")
        );
        assert_eq!(
            header(dlq_headers::OUTPUT_TOPIC).as_deref(),
            Some("clock-state")
        );
        assert_eq!(
            header(dlq_headers::SOURCE_TOPIC),
            None,
            "no source: not replayable"
        );
        // The state itself stays in memory: its clocks keep running here.
        assert_eq!(engines[&0].stats().open_clocks, 3);
        // A lower limit learned from the broker applies from then on.
        writer.learn("clock-state", 15_000);
        assert_eq!(writer.limit("clock-state"), 14_999);
        assert_eq!(writer.limit("sla"), 20_000);
    }
}
