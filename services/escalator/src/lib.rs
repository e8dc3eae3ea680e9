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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use safeclock_common::auth::force_permitted;
use safeclock_common::erasure::ErasureFeed;
use safeclock_common::event::{transition_label, Plausibility};
use safeclock_common::kafka::{
    self, BrokerWait, DeadLetters, OffsetBook, Output, ServiceConsumer, Topic,
};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::ReadinessHandle;
use safeclock_common::schema::enum_label;
use safeclock_common::schema::v1::{
    EscalationAction, EscalationRecord, EscalationState, EscalationStatus,
};
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
        mut outputs: Vec<Output>,
    ) -> anyhow::Result<Vec<Job>> {
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
                let payload = engine
                    .export(&id)
                    .map(|s| prost::Message::encode_to_vec(&s));
                outputs.push(
                    Output::new(&self.state_topic, id.as_bytes(), payload).to_partition(*partition),
                );
            }
        }
        let refused = self
            .dead_letters
            .write_or_dead_letter(&outputs, &self.wait)
            .await?;
        for i in refused {
            if outputs[i].topic == self.state_topic {
                tracing::error!(
                    escalation_id = %String::from_utf8_lossy(outputs[i].key.as_deref().unwrap_or_default()),
                    "an escalation's state is refused by the broker for good: dead-lettered, not durable; after a restart it resumes from its previous state"
                );
            }
        }
        Ok(jobs)
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

/// Restores engines for newly assigned partitions (and re-drives their pending notifications)
/// and drops those of revoked ones.
#[allow(clippy::too_many_arguments)]
async fn sync_assignment(
    consumer: &ServiceConsumer,
    input: &str,
    deps: &ServiceDeps,
    routing: &Arc<Routing>,
    engines: &mut BTreeMap<i32, Engine>,
    dispatcher: &Dispatcher,
    restored: &ReadinessHandle,
    erasures: &ErasureFeed,
) -> anyhow::Result<()> {
    let Some(assigned) = kafka::current_assignment(consumer) else {
        return Ok(());
    };
    let missing = kafka::reconcile(
        engines,
        kafka::Handover::partitions(&assigned, input),
        |p| {
            dispatcher.gate().close(&[p]);
            tracing::warn!(
                partition = p,
                "partition lost: its escalations are with another instance now"
            );
        },
    );
    if !missing.is_empty() {
        restored.set(false);
    }
    for p in missing {
        let started = Instant::now();
        let states = restore::restore_partition(deps.settings.clone(), p).await?;
        let mut engine = Engine::new(
            p,
            routing.clone(),
            deps.settings.escalator.closed_retention_secs,
        );
        let n = states.len();
        for s in states {
            engine.import(s);
        }
        // A referral erased while this partition was elsewhere (or before a crash wrote its
        // tombstones): dropped before anything of it is re-driven.
        let erased = erasures.erased();
        if !erased.is_empty() {
            engine.forget_matching(|id| erased.contains(id));
        }
        let pending = engine.pending_jobs();
        tracing::info!(
            partition = p,
            escalations = n,
            pending = pending.len(),
            seconds = started.elapsed().as_secs_f64(),
            "partition escalations restored; re-driving pending notifications"
        );
        dispatcher.gate().open(p);
        for job in pending {
            dispatcher.submit(job);
        }
        engines.insert(p, engine);
    }
    restored.set(true);
    Ok(())
}

/// Drops the escalations of the referrals erased since the last tick (deliveries already under
/// way finish); their tombstones go out with the tick's writes.
fn apply_erasures(
    erasures: &mut ErasureFeed,
    engines: &mut BTreeMap<i32, Engine>,
    metrics: &ConsumerMetrics,
) {
    let new = erasures.poll_new();
    if new.is_empty() {
        return;
    }
    let erased = erasures.erased();
    let forgotten: usize = engines
        .values_mut()
        .map(|e| e.forget_matching(erased.any_of(&new)))
        .sum();
    metrics
        .erasures_applied
        .with_label_values(&[SERVICE])
        .inc_by(u64::try_from(new.len()).unwrap_or(u64::MAX));
    tracing::info!(
        erasures = new.len(),
        escalations_held = forgotten,
        "erasures applied: the referrals' escalations dropped and tombstoned, their SLA events refused from now on"
    );
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

/// Hands `partitions` over to the instance the group gives them to next: no new attempt
/// starts, the attempts under way finish (up to `wait`), their outcomes and every changed state
/// are written, offsets are committed, and the partitions' engines are dropped. The caller then
/// releases them to the group, and the next owner restores exactly this state and re-drives
/// what is still pending, so no page is sent by both.
#[allow(clippy::too_many_arguments)]
async fn hand_over(
    partitions: &[i32],
    consumer: &ServiceConsumer,
    engines: &mut BTreeMap<i32, Engine>,
    dispatcher: &Dispatcher,
    report_rx: &mut mpsc::UnboundedReceiver<Report>,
    effects: &Effects,
    now: impl Fn() -> jiff::Timestamp,
    wait: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let gate = dispatcher.gate();
    gate.close(partitions);
    while gate.in_flight(partitions) > 0 && started.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unsettled = gate.in_flight(partitions);
    if unsettled > 0 {
        tracing::warn!(
            attempts = unsettled,
            "delivery attempts still under way at the hand-over deadline; the next owner may send them again (same dedupKey)"
        );
    }
    let mut reports = Vec::new();
    while let Ok(r) = report_rx.try_recv() {
        reports.push(r);
    }
    let actions = apply_reports(reports, engines, now());
    for job in effects.write(actions, engines, Vec::new()).await? {
        dispatcher.submit(job);
    }
    kafka::commit_stored(consumer, SERVICE);
    engines.retain(|p, _| !partitions.contains(p));
    tracing::info!(
        ?partitions,
        seconds = started.elapsed().as_secs_f64(),
        "partitions handed over: deliveries settled, state written, offsets committed"
    );
    Ok(())
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
    let handover = kafka::Handover::take_over(&consumer);
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
    kafka::check_copartitioned(&settings, Topic::SlaEvents, Topic::EscalationState).await?;
    let mut erasures = ErasureFeed::start(&settings, SERVICE).await?;
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
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
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
    let (command_tx, mut command_rx) = mpsc::channel::<Command>(64);
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
    let mut engines: BTreeMap<i32, Engine> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(esc.tick_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reports = Vec::new();
    tracing::info!(
        input,
        log_topic = effects.log_topic,
        changelog = effects.state_topic,
        receivers = esc.all_receivers().len(),
        "escalator started"
    );

    // A stop requested while the broker is away ends the loop (the batch under way is not
    // stored); any other error stops the service.
    macro_rules! or_stop {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if kafka::is_shutdown(&e) => break,
                Err(e) => return Err(e),
            }
        };
    }
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Not biased: under a steady stream of delivery reports, input batches, ticks and API
        // commands still get their turn.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                sync_assignment(&consumer, &input, &deps, &routing, &mut engines, &dispatcher, &restored, &erasures).await?;
                apply_erasures(&mut erasures, &mut engines, &consumer_metrics);
                let now = deps.time.now();
                let actions: Vec<Action> = engines.values_mut().flat_map(|e| e.on_tick(now)).collect();
                if !actions.is_empty() || engines.values().any(Engine::has_dirty) {
                    for job in or_stop!(effects.write(actions, &mut engines, Vec::new()).await) {
                        dispatcher.submit(job);
                    }
                }
                update_gauges(&mut engines, &metrics);
            }
            revoked = handover.revoked() => {
                let partitions = kafka::Handover::partitions(&revoked, &input);
                or_stop!(hand_over(&partitions, &consumer, &mut engines, &dispatcher, &mut report_rx, &effects, || deps.time.now(), settle).await);
                handover.release(&revoked);
                update_gauges(&mut engines, &metrics);
            }
            n = report_rx.recv_many(&mut reports, 1000) => {
                if n == 0 {
                    continue;
                }
                let actions = apply_reports(std::mem::take(&mut reports), &mut engines, deps.time.now());
                for job in or_stop!(effects.write(actions, &mut engines, Vec::new()).await) {
                    dispatcher.submit(job);
                }
            }
            Some(command) = command_rx.recv() => {
                or_stop!(handle_command(command, &mut engines, &effects, &dispatcher, deps.time.now()).await);
            }
            batch = kafka::next_batch(&consumer, esc.max_batch) => {
                let started = Instant::now();
                sync_assignment(&consumer, &input, &deps, &routing, &mut engines, &dispatcher, &restored, &erasures).await?;
                let mut dead = Vec::new();
                let mut actions = Vec::new();
                let mut offsets = OffsetBook::default();
                for message in &batch {
                    consumer_metrics.consumed.with_label_values(&[SERVICE, message.topic()]).inc();
                    let span = tracing::debug_span!("record", topic = message.topic(), partition = message.partition(), offset = message.offset());
                    let Some(engine) = engines.get_mut(&message.partition()) else {
                        // Revoked between the fetch and now: its new owner processes it.
                        continue;
                    };
                    match plausibility.decode_sla(message.payload().unwrap_or_default(), deps.time.now()) {
                        Err(rejection) => {
                            let _enter = span.enter();
                            dead.push(effects.dead_letters.letter(message, &rejection));
                        }
                        Ok(event) if erasures.erased().contains(&event.referral_id) => {
                            dead.push(effects.dead_letters.letter_for_erased(message));
                        }
                        Ok(event) => {
                            let _enter = span.enter();
                            tracing::debug!(referral_id = %event.referral_id, sla_event_id = %event.sla_event_id, "sla event");
                            actions.extend(engine.on_sla_event(&event, deps.time.now()));
                        }
                    }
                    offsets.handled(message);
                }
                let jobs = or_stop!(effects.write(actions, &mut engines, dead).await);
                offsets.store(&consumer);
                for job in jobs {
                    dispatcher.submit(job);
                }
                consumer_metrics.batch_seconds.with_label_values(&[SERVICE]).observe(started.elapsed().as_secs_f64());
            }
        }
    }
    // A stop is a hand-over of every partition: attempts under way finish and their outcomes
    // are recorded, so neither a restart nor the instance taking over sends them again. What
    // has not started stays pending for the next owner.
    let held: Vec<i32> = engines.keys().copied().collect();
    if let Err(e) = hand_over(
        &held,
        &consumer,
        &mut engines,
        &dispatcher,
        &mut report_rx,
        &effects,
        || deps.time.now(),
        settle,
    )
    .await
    {
        tracing::warn!(error.message = %e, "could not record the last delivery outcomes; they will be delivered again after the restart");
        kafka::commit_stored(&consumer, SERVICE);
    }
    delivery_stop.cancel();
    if let Some(task) = api_task {
        let _ = task.await;
    }
    tracing::info!("escalator stopped");
    Ok(())
}

async fn handle_command(
    command: Command,
    engines: &mut BTreeMap<i32, Engine>,
    effects: &Effects,
    dispatcher: &Dispatcher,
    now: jiff::Timestamp,
) -> anyhow::Result<()> {
    match command {
        Command::List {
            actor,
            forces,
            reply,
        } => {
            let mut views: Vec<EscalationView> = engines
                .values()
                .flat_map(|e| e.open().map(view))
                .filter(|v| force_permitted(&forces, &v.force))
                .collect();
            views.sort_by(|a, b| a.opened_at.cmp(&b.opened_at));
            let mut listed = api_record(EscalationAction::Listed, &actor, None, now);
            listed.count = u32::try_from(views.len()).unwrap_or(u32::MAX);
            effects
                .write(vec![Action::Audit(Box::new(listed))], engines, Vec::new())
                .await?;
            let _ = reply.send(views);
        }
        Command::Acknowledge {
            id,
            actor,
            forces,
            note,
            reply,
        } => {
            let result = apply_command(engines, &id, &forces, |e| {
                e.acknowledge(&id, &actor, &note, now)
            });
            finish(
                result, &id, &actor, engines, effects, dispatcher, reply, now,
            )
            .await?;
        }
        Command::Resolve {
            id,
            actor,
            forces,
            note,
            reply,
        } => {
            let result = apply_command(engines, &id, &forces, |e| {
                e.resolve(&id, &actor, &note, now)
            });
            finish(
                result, &id, &actor, engines, effects, dispatcher, reply, now,
            )
            .await?;
        }
        Command::Denied { actor, id, reason } => {
            let mut denied = api_record(EscalationAction::Denied, &actor, id.as_deref(), now);
            denied.error = reason.to_string();
            effects
                .write(vec![Action::Audit(Box::new(denied))], engines, Vec::new())
                .await?;
        }
    }
    Ok(())
}

/// An audit record of an API request that is about no escalation's state change.
fn api_record(
    action: EscalationAction,
    actor: &str,
    escalation_id: Option<&str>,
    now: jiff::Timestamp,
) -> EscalationRecord {
    let mut r = EscalationRecord {
        escalation_id: escalation_id.unwrap_or_default().to_string(),
        actor: actor.to_string(),
        at: Some(safeclock_common::schema::from_jiff(now)),
        ..EscalationRecord::default()
    };
    r.set_action(action);
    r
}

/// Applies `f` to the engine holding escalation `id`, if its force is among `forces`.
fn apply_command(
    engines: &mut BTreeMap<i32, Engine>,
    id: &str,
    forces: &[String],
    f: impl FnOnce(&mut Engine) -> Result<Vec<Action>, engine::CommandError>,
) -> Result<Vec<Action>, engine::CommandError> {
    let engine = engines
        .values_mut()
        .find(|e| e.get(id).is_some())
        .ok_or_else(|| engine::CommandError::NotFound(id.to_string()))?;
    let force = engine
        .get(id)
        .and_then(|st| st.event.as_ref()?.labels.as_ref())
        .map_or("", |l| l.force_id.as_str());
    if !force_permitted(forces, force) {
        return Err(engine::CommandError::ForceNotGranted(id.to_string()));
    }
    f(engine)
}

#[allow(clippy::too_many_arguments)] // goes when the loop becomes a struct (issue 17)
async fn finish(
    result: Result<Vec<Action>, engine::CommandError>,
    id: &str,
    actor: &str,
    engines: &mut BTreeMap<i32, Engine>,
    effects: &Effects,
    dispatcher: &Dispatcher,
    reply: tokio::sync::oneshot::Sender<Result<EscalationView, engine::CommandError>>,
    now: jiff::Timestamp,
) -> anyhow::Result<()> {
    match result {
        Err(e @ engine::CommandError::ForceNotGranted(_)) => {
            let mut denied = api_record(EscalationAction::Denied, actor, Some(id), now);
            denied.error = api::FORCE_NOT_GRANTED.to_string();
            effects
                .write(vec![Action::Audit(Box::new(denied))], engines, Vec::new())
                .await?;
            let _ = reply.send(Err(e));
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
        Ok(actions) => {
            let jobs = effects.write(actions, engines, Vec::new()).await?;
            let v = engines.values().find_map(|e| e.get(id)).map(view);
            if let Some(v) = v {
                let _ = reply.send(Ok(v));
            }
            for job in jobs {
                dispatcher.submit(job);
            }
        }
    }
    Ok(())
}

/// Whether an escalation is still open (for tests and tools).
pub fn is_open(st: &EscalationState) -> bool {
    st.status() != EscalationStatus::Resolved
}
