//! The escalator: tells people when a clock warns or breaches.
//!
//! Reads `sla-events`; every breach (and every warning, if configured) becomes a notification to
//! each configured receiver (a log line, HTTP webhooks), and every delivery outcome is written to
//! `escalation-log`, keyed by escalation id, as the audit trail.
//!
//! # Delivery contract
//! At-least-once. A batch's offsets are stored only after every notification it caused reached a
//! final outcome (delivered, or failed after the receiver's retry budget) and the escalation-log
//! records (and any dead letters) are acknowledged by the broker. A redelivered SLA event is
//! recognised by id within a bounded window and not paged again; receivers also get a stable
//! `dedupKey` per escalation, threshold, level and receiver, so a page repeated after a crash
//! de-duplicates at the receiver.

pub mod metrics;
pub mod receivers;

use std::time::Instant;

use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use safeclock_common::dedup::RecentIds;
use safeclock_common::event::decode_sla_event;
use safeclock_common::ids::derive_id;
use safeclock_common::kafka::{self, DeadLetters, OffsetBook, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::schema::from_jiff;
use safeclock_common::schema::v1::{EscalationAction, EscalationRecord, SlaEvent, SlaTransition};
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;

use crate::metrics::EscalatorMetrics;
use crate::receivers::{Notification, Outcome, Receiver, Webhook};

const SERVICE: &str = "escalator";
const MAX_BATCH: usize = 500;
const DEDUP_WINDOW: usize = 200_000;

/// The escalation id of a clock: stable across retries, restarts and levels.
pub fn escalation_id(event: &SlaEvent) -> String {
    derive_id(&[
        &event.referral_id,
        &event.rule_id,
        &event.clock_id,
        "escalation",
    ])
}

/// Which SLA events page someone.
pub fn should_escalate(event: &SlaEvent, escalate_warnings: bool) -> bool {
    match event.transition() {
        SlaTransition::Breached => true,
        SlaTransition::Warning => escalate_warnings,
        _ => false,
    }
}

/// The receivers configured in `settings`.
///
/// # Errors
/// When a webhook's HTTP client cannot be built.
pub fn receivers(settings: &safeclock_common::config::Settings) -> anyhow::Result<Vec<Receiver>> {
    let mut out = Vec::new();
    if settings.escalator.log_receiver {
        out.push(Receiver::Log);
    }
    for w in &settings.escalator.webhooks {
        out.push(Receiver::Webhook(Webhook::new(w.clone())?));
    }
    Ok(out)
}

/// The audit record of one delivery outcome.
pub fn escalation_record(
    n: &Notification,
    receiver: &str,
    outcome: &Outcome,
    at: jiff::Timestamp,
) -> EscalationRecord {
    let (action, attempts, error) = match outcome {
        Outcome::Delivered { attempts } => (EscalationAction::Notified, *attempts, String::new()),
        Outcome::Failed { attempts, error } => {
            (EscalationAction::DeliveryFailed, *attempts, error.clone())
        }
    };
    EscalationRecord {
        escalation_id: n.escalation_id.clone(),
        dedup_key: n.dedup_key(receiver),
        action: action as i32,
        receiver: receiver.to_string(),
        level: n.level,
        attempt: attempts,
        sla_event_id: n.event.sla_event_id.clone(),
        transition: n.event.transition,
        referral_id: n.event.referral_id.clone(),
        rule_id: n.event.rule_id.clone(),
        severity: n.event.severity,
        labels: n.event.labels.clone(),
        deadline: n.event.deadline,
        at: Some(from_jiff(at)),
        error,
        actor: String::new(),
        note: String::new(),
    }
}

async fn publish(
    producer: &FutureProducer,
    topic: &str,
    record: &EscalationRecord,
) -> anyhow::Result<DeliveryFuture> {
    let payload = serde_json::to_vec(record)?;
    let r = FutureRecord::<str, [u8]>::to(topic)
        .key(&record.escalation_id)
        .payload(&payload);
    kafka::enqueue(producer, r).await
}

/// Runs the escalator until `shutdown` is cancelled.
///
/// # Errors
/// When Kafka clients cannot be created or the broker refuses to acknowledge the audit records.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let metrics = EscalatorMetrics::register(&deps.registry)?;
    let receivers = receivers(&settings)?;
    if receivers.is_empty() {
        tracing::warn!(
            "no escalation receivers configured: breaches will reach nobody (set escalator.log_receiver or add escalator.webhooks)"
        );
    }
    let input = settings.topic(Topic::SlaEvents);
    let log_topic = settings.topic(Topic::EscalationLog);
    let consumer = kafka::consumer(
        &settings,
        SERVICE,
        &settings.escalator.group_id,
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
    let mut seen = RecentIds::new(DEDUP_WINDOW);
    tracing::info!(
        input,
        log_topic,
        receivers = receivers.len(),
        "escalator started"
    );

    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            batch = kafka::next_batch(&consumer, MAX_BATCH) => batch,
        };
        let started = Instant::now();
        let mut deliveries = Vec::new();
        let mut offsets = OffsetBook::default();
        let mut notifications = Vec::new();
        for message in &batch {
            consumer_metrics
                .consumed
                .with_label_values(&[SERVICE, message.topic()])
                .inc();
            match decode_sla_event(message.payload().unwrap_or_default()) {
                Err(rejection) => deliveries.push(dead_letters.send(message, &rejection).await?),
                Ok(event) => {
                    if should_escalate(&event, settings.escalator.escalate_warnings)
                        && seen.first_time(&event.sla_event_id)
                    {
                        notifications.push(Notification {
                            escalation_id: escalation_id(&event),
                            level: 1,
                            event,
                        });
                    }
                }
            }
            offsets.handled(message);
        }
        // Every notification of the batch goes out concurrently; each receiver retries on its own.
        let outcomes = futures::future::join_all(notifications.iter().map(|n| {
            let receivers = &receivers;
            let metrics = &metrics;
            async move {
                let mut per_receiver = Vec::with_capacity(receivers.len());
                for r in receivers {
                    per_receiver.push((r.name().to_string(), r.deliver(n, metrics).await));
                }
                per_receiver
            }
        }))
        .await;
        for (n, per_receiver) in notifications.iter().zip(outcomes) {
            for (receiver, outcome) in per_receiver {
                let record = escalation_record(n, &receiver, &outcome, deps.time.now());
                deliveries.push(publish(&producer, &log_topic, &record).await?);
            }
        }
        kafka::await_deliveries(deliveries).await?;
        offsets.store(&consumer);
        consumer_metrics
            .batch_seconds
            .with_label_values(&[SERVICE])
            .observe(started.elapsed().as_secs_f64());
    }
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("escalator stopped");
    Ok(())
}
