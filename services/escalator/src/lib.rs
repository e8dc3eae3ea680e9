//! The escalator: makes sure the right person hears about a warning or a breach, and keeps
//! hearing until someone takes ownership.
//!
//! Reads `sla-events`. The route tree (`routing.rs`) picks escalation policies for each warning
//! and breach; the state machine (`engine.rs`, one per assigned partition, pure and driven by an
//! injected clock) decides which receivers to notify at which level and when, stops on
//! acknowledgement or resolution, and resumes when an acknowledgement lapses. The delivery layer
//! (`delivery.rs`) delivers each notification with retries, backoff, a rate limit, a circuit
//! breaker and a fallback receiver. The API (`api.rs`) lists, acknowledges and resolves
//! escalations. Every attempt, outcome, acknowledgement and resolution is written to
//! `escalation-log`.
//!
//! # State
//! Escalations, and the notifications decided on but not yet delivered, are written to the
//! compacted `escalation-state` changelog, to the same partition number as their `sla-events`
//! partition, and restored from it when a partition is assigned. Pending notifications are then
//! delivered again; delivered ones are recorded as done and never sent again.
//!
//! # Delivery contract
//! At-least-once, in this order for every batch of SLA events, every tick, every API command and
//! every set of delivery outcomes:
//! 1. the state machine decides; its audit records, dead letters and the changed escalation
//!    states are produced, and the broker's acknowledgement awaited;
//! 2. then (for a batch) the input offsets are stored for commit;
//! 3. only then are the new notifications handed to the delivery layer.
//!
//! The loop does not stand still while the broker acknowledges step 1: up to eight writes are
//! kept in flight (`service.rs`, [`safeclock_common::kafka::WritePipeline`]), and steps 2 and 3
//! happen for each once it **and every write before it** are acknowledged, in the order the
//! writes were made. A write the broker could not take is made again from the escalations'
//! current state, never from the older copy in flight, before anything after it is released.
//!
//! So no notification is sent that the changelog does not know about, and none is forgotten: a
//! crash before 1 re-reads the SLA events and decides the same notifications (same ids); a crash
//! after 1 restores them as pending and delivers them. A crash between a delivery and the write
//! of its outcome sends that one notification again, with the same `dedupKey` and `deliveryId`,
//! so receivers can de-duplicate; that window is the only way a page repeats.
//!
//! # No record stops a partition
//! An invalid SLA event is dead-lettered with its reason (bounded: a value over
//! `dead_letters.max_payload_bytes` keeps its length, SHA-256 and a prefix) and the partition
//! moves on. A record of the escalator's own that the broker refuses for good (too large,
//! invalid) is dead-lettered instead of written (reason `output_too_large` or `output_refused`),
//! and the rest of the batch goes on: an escalation state so refused is not durable, so after a
//! restart that escalation resumes from its previous state and may page again under the same
//! `dedupKey`. A broker that is away (transport failure, timeouts, no leader, not enough
//! replicas) is waited out: everything is written again after a pause, for as long as it takes,
//! no offset is stored and no notification handed on meanwhile, and the service reports not
//! ready. Only a producer that can no longer write at all stops the service.

pub mod api;
pub mod delivery;
pub mod engine;
pub mod metrics;
pub mod receivers;
pub mod restore;
pub mod routing;
mod service;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use safeclock_common::erasure::ErasureFeed;
use safeclock_common::event::{transition_label, Plausibility};
use safeclock_common::kafka::{self, BrokerWait, DeadLetters, Output, Topic, WritePipeline};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::schema::enum_label;
use safeclock_common::schema::v1::{EscalationAction, EscalationState, EscalationStatus};
use safeclock_common::service::ServiceDeps;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{Command, EscalationView};
use crate::delivery::{Dispatcher, Report};
use crate::engine::{Action, Engine, Job};
use crate::metrics::EscalatorMetrics;
use crate::receivers::Receiver;
use crate::routing::Routing;

pub use crate::engine::escalation_id;

const SERVICE: &str = "escalator";

/// Where the escalator writes, and how.
struct Effects {
    log_topic: String,
    state_topic: String,
    dead_letters: DeadLetters,
    /// Waits out a broker that is away (not ready meanwhile).
    wait: BrokerWait,
    metrics: EscalatorMetrics,
}

impl Effects {
    /// Makes the actions' records, the dead letters in `outputs` and every changed state durable;
    /// returns the notifications to hand to the delivery layer once that is done.
    ///
    /// A record the broker refuses for good (too large, invalid) is dead-lettered instead
    /// (bounded), and the rest go on: an audit record so refused is kept only in the dead-letter
    /// topic; an escalation state so refused is not durable (its notifications are still
    /// delivered, and after a restart the escalation resumes from its previous state, so a page
    /// may be sent again under the same `dedupKey`). A broker that is away is waited out.
    ///
    /// # Errors
    /// When the producer can no longer write, or the service is told to stop while the broker is
    /// away ([`kafka::is_shutdown`]).
    async fn write(
        &self,
        actions: Vec<Action>,
        engines: &mut BTreeMap<i32, Engine>,
        outputs: Vec<Output>,
    ) -> anyhow::Result<Vec<Job>> {
        let (outputs, jobs) = self.prepare(actions, engines, outputs)?;
        let refused = self
            .dead_letters
            .write_or_dead_letter(&outputs, &self.wait)
            .await?;
        self.log_refused_states(&outputs, &refused);
        Ok(jobs)
    }

    /// The records of `actions` and of every changed escalation state, after `outputs`, and
    /// the notifications to hand on once they are durable. Takes the engines' changes: the
    /// caller writes what this returns.
    ///
    /// # Errors
    /// When a record cannot be encoded.
    fn prepare(
        &self,
        actions: Vec<Action>,
        engines: &mut BTreeMap<i32, Engine>,
        mut outputs: Vec<Output>,
    ) -> anyhow::Result<(Vec<Output>, Vec<Job>)> {
        let mut jobs = Vec::new();
        for action in actions {
            match action {
                Action::Deliver(job) => jobs.push(job),
                Action::Audit(record) => outputs.push(Output::new(
                    &self.log_topic,
                    record.escalation_id.as_bytes(),
                    Some(serde_json::to_vec(&record)?),
                )),
                Action::DeadLetter { job, error } => {
                    self.metrics
                        .dead_letters
                        .with_label_values(&[&job.pending.receiver])
                        .inc();
                    let payload = serde_json::to_vec(&receivers::webhook_body(&job))?;
                    outputs.push(self.dead_letters.undeliverable(
                        &job.escalation_id,
                        &payload,
                        "notification_undeliverable",
                        &format!("receiver {}: {error}", job.pending.receiver),
                    ));
                }
                Action::Acknowledged { after_secs } => {
                    self.metrics.time_to_ack.observe(after_secs);
                }
            }
        }
        for (partition, engine) in engines.iter_mut() {
            for id in engine.take_dirty() {
                let payload = engine.encode(&id);
                outputs.push(
                    Output::new(&self.state_topic, id.as_bytes(), payload).to_partition(*partition),
                );
            }
        }
        Ok((outputs, jobs))
    }

    /// Logs each escalation state among `outputs[refused]`: dead-lettered, not durable.
    fn log_refused_states(&self, outputs: &[Output], refused: &[usize]) {
        for &i in refused {
            if outputs[i].topic == self.state_topic {
                tracing::error!(
                    escalation_id = %String::from_utf8_lossy(outputs[i].key.as_deref().unwrap_or_default()),
                    "an escalation's state is refused by the broker for good: dead-lettered, not durable; after a restart it resumes from its previous state"
                );
            }
        }
    }
}

/// How the API shows an escalation.
pub fn view(st: &EscalationState) -> EscalationView {
    let e = st.event.clone().unwrap_or_default();
    let time = |ms: i64| {
        (ms > 0)
            .then(|| jiff::Timestamp::from_millisecond(ms).ok())
            .flatten()
            .map(|t| t.to_string())
    };
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    EscalationView {
        escalation_id: st.escalation_id.clone(),
        referral_id: e.referral_id.clone(),
        rule_id: e.rule_id.clone(),
        clock_id: e.clock_id.clone(),
        threshold: transition_label(e.transition()).to_string(),
        severity: enum_label(e.severity().as_str_name(), "SEVERITY_"),
        force: e.labels.clone().unwrap_or_default().force_id,
        status: enum_label(st.status().as_str_name(), "ESCALATION_STATUS_"),
        level: st.tracks.iter().map(|t| t.level).max().unwrap_or(0),
        policies: st.tracks.iter().map(|t| t.policy.clone()).collect(),
        opened_at: time(st.opened_at_ms).unwrap_or_default(),
        deadline: e
            .deadline
            .as_ref()
            .and_then(safeclock_common::schema::to_jiff)
            .map(|t| t.to_string()),
        acknowledged_by: nonempty(&st.acked_by),
        acknowledged_at: time(st.acked_at_ms),
        acknowledgement_expires_at: time(st.ack_expires_at_ms),
        resolved_by: nonempty(&st.resolved_by),
        resolution: nonempty(&st.resolution),
        pages: st.pages.len(),
        pending: st.pending.len(),
    }
}

fn update_gauges(engines: &mut BTreeMap<i32, Engine>, metrics: &EscalatorMetrics) {
    metrics
        .partitions
        .set(i64::try_from(engines.len()).unwrap_or(i64::MAX));
    metrics.open.reset();
    let mut pending = 0usize;
    for engine in engines.values_mut() {
        let s = engine.stats();
        pending += s.pending;
        for ((level, acked), n) in s.open_by_level {
            let status = if acked { "acknowledged" } else { "open" };
            metrics
                .open
                .with_label_values(&[&level.to_string(), status])
                .add(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    metrics
        .pending
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
}

/// Applies delivery reports to the engines.
fn apply_reports(
    reports: Vec<Report>,
    engines: &mut BTreeMap<i32, Engine>,
    now: jiff::Timestamp,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for report in reports {
        match report {
            Report::AttemptFailed {
                job,
                attempt,
                error,
                ..
            } => actions.push(Action::Audit(Box::new(engine::job_record(
                &job,
                EscalationAction::AttemptFailed,
                attempt,
                &error,
                now,
            )))),
            Report::Done { job, outcome, .. } => {
                // A partition revoked meanwhile: its new owner re-drives the notification.
                if let Some(engine) = engines.get_mut(&job.partition) {
                    actions.extend(engine.on_outcome(
                        &job.escalation_id,
                        &job.pending.delivery_id,
                        &outcome,
                        now,
                    ));
                }
            }
        }
    }
    actions
}

/// Runs the escalator until `shutdown` is cancelled.
///
/// # Errors
/// When receivers or Kafka clients cannot be created, the API cannot bind, state cannot be
/// restored, or the broker refuses to acknowledge the state or audit records.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let plausibility = Plausibility::new(&settings);
    let esc = &settings.escalator;
    let metrics = EscalatorMetrics::register(&deps.registry)?;
    let routing = Arc::new(Routing::new(esc));
    let receivers = esc
        .all_receivers()
        .into_iter()
        .map(Receiver::new)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if receivers.is_empty() {
        tracing::warn!(
            "no escalation receivers configured: breaches will reach nobody (set escalator.log_receiver or add [[escalator.receivers]])"
        );
    }
    let input = settings.topic(Topic::SlaEvents);
    let restored = deps.readiness.component("escalation-state");
    let consumer = kafka::consumer(
        &settings,
        SERVICE,
        &esc.group_id,
        &[&input],
        deps.readiness.component(SERVICE),
    )?;
    consumer.context().restores_state(restored.clone());
    // The longest a delivery attempt can take: its timeout, the extra second `deliver` allows,
    // and a margin.
    let settle = Duration::from_millis(
        esc.all_receivers()
            .iter()
            .map(|r| r.timeout_ms)
            .max()
            .unwrap_or(0),
    ) + Duration::from_secs(2);
    let producer = kafka::producer(&settings)?;
    let pipeline = WritePipeline::new(producer.clone(), service::PIPELINE_DEPTH);
    kafka::check_copartitioned(&settings, Topic::SlaEvents, Topic::EscalationState).await?;
    let erasures = ErasureFeed::start(&settings, SERVICE).await?;
    let effects = Effects {
        log_topic: settings.topic(Topic::EscalationLog),
        state_topic: settings.topic(Topic::EscalationState),
        dead_letters: DeadLetters::new(producer, &settings, SERVICE, consumer_metrics.clone()),
        wait: BrokerWait::new(
            SERVICE,
            deps.readiness.component("escalator-outputs"),
            shutdown.clone(),
            consumer_metrics.broker_waits.with_label_values(&[SERVICE]),
        ),
        metrics: metrics.clone(),
    };
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    // Not a child of `shutdown`: on a stop, attempts under way finish first (see the end).
    let delivery_stop = CancellationToken::new();
    let _stop_deliveries_on_exit = delivery_stop.clone().drop_guard();
    let dispatcher = Dispatcher::start(
        receivers,
        metrics.clone(),
        deps.time.clone(),
        report_tx,
        delivery_stop.clone(),
    );
    let (command_tx, command_rx) = mpsc::channel::<Command>(64);
    let api_task = if esc.api.tokens.is_empty() {
        tracing::info!("escalation API off (no escalator.api.tokens configured)");
        None
    } else {
        esc.api
            .validate_operators(&deps.settings.forces)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let (_, task) = api::bind(
            &esc.api,
            &deps.registry,
            metrics.api_auth_failures.clone(),
            command_tx.clone(),
            shutdown.clone(),
        )
        .await?;
        Some(task)
    };
    let mut tick = tokio::time::interval(Duration::from_millis(esc.tick_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        input,
        log_topic = effects.log_topic,
        changelog = effects.state_topic,
        receivers = esc.all_receivers().len(),
        "escalator started"
    );
    let escalator = service::Escalator {
        consumer,
        core: service::Core {
            consumer_metrics,
            metrics,
            plausibility,
            routing,
            input,
            restored,
            effects,
            pipeline,
            dispatcher,
            reports: report_rx,
            commands: command_rx,
            erasures,
            engines: BTreeMap::new(),
            tick,
            settle,
            deps,
        },
    };
    let result = escalator.run(shutdown).await;
    // Attempts under way have finished (the stop hands every partition over): the workers go.
    delivery_stop.cancel();
    if let Some(task) = api_task {
        let _ = task.await;
    }
    result
}

/// Whether an escalation is still open (for tests and tools).
pub fn is_open(st: &EscalationState) -> bool {
    st.status() != EscalationStatus::Resolved
}
