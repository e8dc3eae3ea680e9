//! The clock service: the SLA engine on Kafka.
//!
//! Reads `referral-events`, runs a clock for every rule that applies, and publishes each
//! transition (started, warning, breached, met, met late, cancelled, corrected) to `sla-events`,
//! keyed by referral id.
//!
//! # Delivery contract
//! At-least-once. For each batch of input records, the SLA events they cause (and dead letters
//! for invalid ones) are produced and acknowledged by the broker before the batch's offsets are
//! stored for commit. Timer transitions (warnings, breaches) are produced on a wall-clock tick,
//! whether or not input arrives. SLA event ids are derived from their cause, so re-processing
//! after a crash reproduces identical ids and consumers de-duplicate.
//!
//! Open clocks live in memory in this version: a restart rebuilds only what it re-reads after
//! the committed offsets. The compacted clock-state changelog (restored on partition assignment)
//! is the next step of the engine's roadmap.

pub mod engine;
pub mod explain;
pub mod metrics;

use std::time::{Duration, Instant};

use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use safeclock_common::event::{decode_referral_event, transition_label};
use safeclock_common::kafka::{self, DeadLetters, OffsetBook, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::schema::v1::SlaEvent;
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::Engine;
use crate::metrics::ClockMetrics;
use safeclock_common::policy::Policy;

const SERVICE: &str = "clock";

/// Runs the clock service until `shutdown` is cancelled.
///
/// # Errors
/// When Kafka clients cannot be created or the broker refuses to acknowledge outputs.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let metrics = ClockMetrics::register(&deps.registry)?;
    let input = settings.topic(Topic::ReferralEvents);
    let output = settings.topic(Topic::SlaEvents);
    let consumer = kafka::consumer(
        &settings,
        SERVICE,
        &settings.clock.group_id,
        &[&input],
        deps.readiness.component(SERVICE),
    )?;
    let producer = kafka::producer(&settings)?;
    let dead_letters = DeadLetters::new(
        producer.clone(),
        &settings,
        SERVICE,
        consumer_metrics.clone(),
    );
    let policy = Policy::load(&settings)?;
    let mut engine = Engine::new(policy.rules, policy.calendars);
    let mut tick = tokio::time::interval(Duration::from_millis(settings.clock.tick_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(input, output, rules = engine.rules().len(), "clock started");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let due = engine.on_tick(deps.time.now());
                if !due.is_empty() {
                    let mut deliveries = Vec::with_capacity(due.len());
                    for ev in &due {
                        deliveries.push(publish(&producer, &output, ev, &metrics).await?);
                    }
                    kafka::await_deliveries(deliveries).await?;
                }
                let stats = engine.stats();
                metrics.open_clocks.set(i64::try_from(stats.open_clocks).unwrap_or(i64::MAX));
                metrics.pending_timers.set(i64::try_from(stats.pending_timers).unwrap_or(i64::MAX));
            }
            batch = kafka::next_batch(&consumer, settings.clock.max_batch) => {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error.message = %e, "consumer error; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let started = Instant::now();
                let mut deliveries = Vec::new();
                let mut offsets = OffsetBook::default();
                for message in &batch {
                    consumer_metrics.consumed.with_label_values(&[SERVICE, message.topic()]).inc();
                    let span = tracing::debug_span!("record", topic = message.topic(), partition = message.partition(), offset = message.offset());
                    async {
                        match decode_referral_event(message.payload().unwrap_or_default()) {
                            Err(rejection) => deliveries.push(dead_letters.send(message, &rejection).await?),
                            Ok(event) => {
                                tracing::debug!(referral_id = %event.referral_id, event_id = %event.event_id, "event");
                                for ev in engine.on_event(&event, deps.time.now()) {
                                    deliveries.push(publish(&producer, &output, &ev, &metrics).await?);
                                }
                            }
                        }
                        anyhow::Ok(())
                    }.instrument(span).await?;
                    offsets.handled(message);
                }
                kafka::await_deliveries(deliveries).await?;
                offsets.store(&consumer);
                consumer_metrics.batch_seconds.with_label_values(&[SERVICE]).observe(started.elapsed().as_secs_f64());
            }
        }
    }
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("clock stopped");
    Ok(())
}

async fn publish(
    producer: &FutureProducer,
    topic: &str,
    event: &SlaEvent,
    metrics: &ClockMetrics,
) -> anyhow::Result<DeliveryFuture> {
    let payload = serde_json::to_vec(event)?;
    metrics
        .emitted
        .with_label_values(&[transition_label(event.transition())])
        .inc();
    let record = FutureRecord::<str, [u8]>::to(topic)
        .key(&event.referral_id)
        .payload(&payload);
    kafka::enqueue(producer, record).await
}
