//! The escalator's service loop: one struct, one call per kind of event.
//!
//! [`Escalator::run`] waits for whichever comes first: a write coming back from the broker, a
//! tick, a hand-over, delivery reports, an API command or a batch of SLA events, and hands it to
//! one method of [`Core`]. Writes are kept in flight ([`WritePipeline`]) while the loop goes on;
//! what each one guards (input offsets, notifications) is released in order once it and every
//! write before it are durable (`on_written`), so the delivery contract in the crate docs holds
//! as if each write were awaited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use safeclock_common::auth::force_permitted;
use safeclock_common::erasure::ErasureFeed;
use safeclock_common::event::Plausibility;
use safeclock_common::kafka::{self, Failure, OffsetBook, ServiceConsumer, WritePipeline, Written};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::ReadinessHandle;
use safeclock_common::schema::v1::{EscalationAction, EscalationRecord};
use safeclock_common::service::ServiceDeps;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{Command, EscalationView};
use crate::delivery::{Dispatcher, Report};
use crate::engine::{self, Action, Engine, Job};
use crate::metrics::EscalatorMetrics;
use crate::routing::Routing;
use crate::{apply_reports, update_gauges, view, Effects, SERVICE};

/// Most writes in flight at once. Each holds at most one batch (`escalator.max_batch` SLA
/// events) or one set of delivery reports, so this bounds the memory they hold; while it is
/// reached, no new input is read until the oldest write comes back.
pub(crate) const PIPELINE_DEPTH: usize = 8;

/// Most delivery reports applied in one write.
const MAX_REPORTS: usize = 1000;

/// What a write guards: released once it and every write before it are durable.
#[derive(Default)]
pub(crate) struct Release {
    /// The input offsets of the batch it came from.
    offsets: Option<OffsetBook>,
    /// The notifications it decided on.
    jobs: Vec<Job>,
    /// When its batch was received, for `safeclock_batch_seconds`.
    batch_started: Option<Instant>,
}

/// The escalator's consumer and everything its loop owns.
pub(crate) struct Escalator {
    pub(crate) consumer: ServiceConsumer,
    pub(crate) core: Core,
}

/// Everything the loop owns besides the consumer (which its batches borrow).
pub(crate) struct Core {
    pub(crate) deps: ServiceDeps,
    pub(crate) consumer_metrics: ConsumerMetrics,
    pub(crate) metrics: EscalatorMetrics,
    pub(crate) plausibility: Plausibility,
    pub(crate) routing: Arc<Routing>,
    pub(crate) input: String,
    /// Ready once every assigned partition's escalations are restored.
    pub(crate) restored: ReadinessHandle,
    pub(crate) effects: Effects,
    pub(crate) pipeline: WritePipeline<Release>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) reports: mpsc::UnboundedReceiver<Report>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) erasures: ErasureFeed,
    pub(crate) engines: BTreeMap<i32, Engine>,
    pub(crate) tick: tokio::time::Interval,
    /// The longest a delivery attempt can take: how long a hand-over waits for attempts under
    /// way.
    pub(crate) settle: Duration,
}

impl Escalator {
    /// Runs until `shutdown` is cancelled, then hands every partition over (attempts under way
    /// finish and their outcomes are recorded; what has not started stays pending for the next
    /// owner).
    ///
    /// # Errors
    /// When state cannot be restored or the producer can no longer write at all.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { consumer, mut core } = self;
        let handover = kafka::Handover::take_over(&consumer);
        let max_batch = core.deps.settings.escalator.max_batch;
        let mut reports = Vec::new();
        loop {
            let accepting = !core.pipeline.is_full();
            // Not biased: under a steady stream of delivery reports, input batches, ticks and
            // API commands still get their turn.
            let flow = tokio::select! {
                () = shutdown.cancelled() => break,
                written = core.pipeline.next() => core.on_written(&consumer, written).await,
                _ = core.tick.tick() => core.on_tick(&consumer).await,
                revoked = handover.revoked() => core.on_revoked(&consumer, &handover, &revoked).await,
                n = core.reports.recv_many(&mut reports, MAX_REPORTS), if accepting => {
                    core.on_reports(std::mem::take(&mut reports), n).await
                }
                Some(command) = core.commands.recv() => core.on_command(&consumer, command).await,
                batch = kafka::next_batch(&consumer, max_batch), if accepting => {
                    core.on_batch(&consumer, &batch).await
                }
            };
            match flow {
                Ok(()) => {}
                // Told to stop while the broker was away: nothing unsettled is released.
                Err(e) if kafka::is_shutdown(&e) => break,
                Err(e) => return Err(e),
            }
        }
        core.stop(&consumer).await;
        Ok(())
    }
}

impl Core {
    /// A write came back: on success its refused outputs are dead-lettered and what it guards is
    /// released; with the broker away, everything in flight is written again from the current
    /// state ([`Core::recover`]).
    async fn on_written(
        &mut self,
        consumer: &ServiceConsumer,
        written: Written<Release>,
    ) -> anyhow::Result<()> {
        match &written.outcome {
            Ok(_) => {
                self.dead_letter_refused(&written).await?;
                self.release(consumer, written.release);
                Ok(())
            }
            Err(e) if e.failure == Failure::Fatal => Err(fatal(e)),
            Err(_) => self.recover(consumer, written).await,
        }
    }

    /// Writes the dead letters of the outputs of `written` that the broker refused for good.
    async fn dead_letter_refused(&self, written: &Written<Release>) -> anyhow::Result<()> {
        if let Ok(refusals) = &written.outcome {
            if !refusals.is_empty() {
                let refused = self
                    .effects
                    .dead_letters
                    .dead_letter_refused(&written.outputs, refusals, &self.effects.wait)
                    .await?;
                self.effects.log_refused_states(&written.outputs, &refused);
            }
        }
        Ok(())
    }

    /// The broker could not take a write (`failed`): waits for every later write to come back,
    /// then writes again what any of them could not, taking each escalation's state as it is
    /// **now** (an older state written again after a newer one would become the latest on the
    /// compacted changelog), and releases them all in order. The broker is waited out as by
    /// every write ([`Effects::write`]).
    async fn recover(
        &mut self,
        consumer: &ServiceConsumer,
        failed: Written<Release>,
    ) -> anyhow::Result<()> {
        let mut all = vec![failed];
        all.extend(self.pipeline.drain().await);
        let mut again = Vec::new();
        for written in &all {
            match &written.outcome {
                Err(e) if e.failure == Failure::Fatal => return Err(fatal(e)),
                Err(_) => {
                    for output in &written.outputs {
                        if output.topic == self.effects.state_topic {
                            let engine = output.partition.and_then(|p| self.engines.get_mut(&p));
                            if let (Some(engine), Some(key)) = (engine, &output.key) {
                                engine.mark_dirty(&String::from_utf8_lossy(key));
                            }
                        } else {
                            again.push(output.clone());
                        }
                    }
                }
                Ok(_) => {}
            }
        }
        tracing::warn!(
            writes = all.len(),
            records = again.len(),
            "the broker could not take a write: writing again what it did not take, with the escalations' current state"
        );
        let jobs = self
            .effects
            .write(Vec::new(), &mut self.engines, again)
            .await?;
        for written in all {
            self.dead_letter_refused(&written).await?;
            self.release(consumer, written.release);
        }
        for job in jobs {
            self.dispatcher.submit(job);
        }
        Ok(())
    }

    /// Acts on a durable write: stores its batch's offsets, then hands its notifications on.
    fn release(&self, consumer: &ServiceConsumer, release: Release) {
        if let Some(offsets) = release.offsets {
            offsets.store(consumer);
        }
        for job in release.jobs {
            self.dispatcher.submit(job);
        }
        if let Some(started) = release.batch_started {
            self.consumer_metrics
                .batch_seconds
                .with_label_values(&[SERVICE])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Settles every write in flight (releasing each in order).
    async fn settle_writes(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        while !self.pipeline.is_empty() {
            let written = self.pipeline.next().await;
            self.on_written(consumer, written).await?;
        }
        Ok(())
    }

    /// Decides on `actions`, adds the changed states to `outputs`, and puts them in flight with
    /// `release`.
    async fn submit(
        &mut self,
        actions: Vec<Action>,
        outputs: Vec<kafka::Output>,
        mut release: Release,
    ) -> anyhow::Result<()> {
        let (outputs, jobs) = self.effects.prepare(actions, &mut self.engines, outputs)?;
        release.jobs = jobs;
        // Even a write with nothing to write goes through the pipeline: it is released in order.
        self.pipeline.submit(outputs, release).await;
        Ok(())
    }

    /// Restores new partitions, applies erasures, fires what is due and refreshes the gauges.
    async fn on_tick(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        self.sync_assignment(consumer).await?;
        self.apply_erasures();
        let now = self.deps.time.now();
        let actions: Vec<Action> = self
            .engines
            .values_mut()
            .flat_map(|e| e.on_tick(now))
            .collect();
        if !actions.is_empty() || self.engines.values().any(Engine::has_dirty) {
            self.submit(actions, Vec::new(), Release::default()).await?;
        }
        update_gauges(&mut self.engines, &self.metrics);
        Ok(())
    }

    /// Applies delivery reports.
    async fn on_reports(&mut self, reports: Vec<Report>, n: usize) -> anyhow::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let actions = apply_reports(reports, &mut self.engines, self.deps.time.now());
        self.submit(actions, Vec::new(), Release::default()).await
    }

    /// Applies a batch of SLA events; its offsets are stored once its effects are durable.
    async fn on_batch(
        &mut self,
        consumer: &ServiceConsumer,
        batch: &[BorrowedMessage<'_>],
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.sync_assignment(consumer).await?;
        let mut dead = Vec::new();
        let mut actions = Vec::new();
        let mut offsets = OffsetBook::default();
        for message in batch {
            self.consumer_metrics
                .consumed
                .with_label_values(&[SERVICE, message.topic()])
                .inc();
            let Some(engine) = self.engines.get_mut(&message.partition()) else {
                // Revoked between the fetch and now: its new owner processes it.
                continue;
            };
            let span = tracing::debug_span!(
                "record",
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset()
            );
            let _enter = span.enter();
            let now = self.deps.time.now();
            match self
                .plausibility
                .decode_sla(message.payload().unwrap_or_default(), now)
            {
                Err(rejection) => dead.push(self.effects.dead_letters.letter(message, &rejection)),
                Ok(event) if self.erasures.erased().contains(&event.referral_id) => {
                    dead.push(self.effects.dead_letters.letter_for_erased(message));
                }
                Ok(event) => {
                    tracing::debug!(referral_id = %event.referral_id, sla_event_id = %event.sla_event_id, "sla event");
                    actions.extend(engine.on_sla_event(&event, now));
                }
            }
            offsets.handled(message);
        }
        let release = Release {
            offsets: Some(offsets),
            batch_started: Some(started),
            ..Release::default()
        };
        self.submit(actions, dead, release).await
    }

    /// Hands revoked partitions over once every write in flight is settled.
    async fn on_revoked(
        &mut self,
        consumer: &ServiceConsumer,
        handover: &kafka::Handover<'_>,
        revoked: &TopicPartitionList,
    ) -> anyhow::Result<()> {
        self.settle_writes(consumer).await?;
        let partitions = kafka::Handover::partitions(revoked, &self.input);
        self.hand_over(&partitions, consumer).await?;
        handover.release(revoked);
        update_gauges(&mut self.engines, &self.metrics);
        Ok(())
    }

    /// Lists, acknowledges or resolves, once every write in flight is settled (so the answer
    /// reflects every SLA event and delivery already taken in).
    async fn on_command(
        &mut self,
        consumer: &ServiceConsumer,
        command: Command,
    ) -> anyhow::Result<()> {
        self.settle_writes(consumer).await?;
        let now = self.deps.time.now();
        match command {
            Command::List {
                actor,
                forces,
                reply,
            } => {
                let mut views: Vec<EscalationView> = self
                    .engines
                    .values()
                    .flat_map(|e| e.open().map(view))
                    .filter(|v| force_permitted(&forces, &v.force))
                    .collect();
                views.sort_by(|a, b| a.opened_at.cmp(&b.opened_at));
                let mut listed = api_record(EscalationAction::Listed, &actor, None, now);
                listed.count = u32::try_from(views.len()).unwrap_or(u32::MAX);
                self.audit(listed).await?;
                let _ = reply.send(views);
            }
            Command::Acknowledge {
                id,
                actor,
                forces,
                note,
                reply,
            } => {
                let result = apply_command(&mut self.engines, &id, &forces, |e| {
                    e.acknowledge(&id, &actor, &note, now)
                });
                self.answer(result, &id, &actor, reply, now).await?;
            }
            Command::Resolve {
                id,
                actor,
                forces,
                note,
                reply,
            } => {
                let result = apply_command(&mut self.engines, &id, &forces, |e| {
                    e.resolve(&id, &actor, &note, now)
                });
                self.answer(result, &id, &actor, reply, now).await?;
            }
            Command::Denied { actor, id, reason } => {
                let mut denied = api_record(EscalationAction::Denied, &actor, id.as_deref(), now);
                denied.error = reason.to_string();
                self.audit(denied).await?;
            }
        }
        Ok(())
    }

    /// Writes one audit record and waits for it.
    async fn audit(&mut self, record: EscalationRecord) -> anyhow::Result<()> {
        self.effects
            .write(
                vec![Action::Audit(Box::new(record))],
                &mut self.engines,
                Vec::new(),
            )
            .await?;
        Ok(())
    }

    /// Makes an acknowledgement's or resolution's effects durable, then answers with the
    /// escalation as it is now (or the refusal).
    async fn answer(
        &mut self,
        result: Result<Vec<Action>, engine::CommandError>,
        id: &str,
        actor: &str,
        reply: tokio::sync::oneshot::Sender<Result<EscalationView, engine::CommandError>>,
        now: jiff::Timestamp,
    ) -> anyhow::Result<()> {
        match result {
            Err(e @ engine::CommandError::ForceNotGranted(_)) => {
                let mut denied = api_record(EscalationAction::Denied, actor, Some(id), now);
                denied.error = crate::api::FORCE_NOT_GRANTED.to_string();
                self.audit(denied).await?;
                let _ = reply.send(Err(e));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(actions) => {
                let jobs = self
                    .effects
                    .write(actions, &mut self.engines, Vec::new())
                    .await?;
                if let Some(v) = self.engines.values().find_map(|e| e.get(id)).map(view) {
                    let _ = reply.send(Ok(v));
                }
                for job in jobs {
                    self.dispatcher.submit(job);
                }
            }
        }
        Ok(())
    }

    /// Restores engines for newly assigned partitions (and re-drives their pending
    /// notifications) and drops those of lost ones.
    async fn sync_assignment(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        let Some(assigned) = kafka::current_assignment(consumer) else {
            return Ok(());
        };
        let gate = self.dispatcher.gate().clone();
        let missing = kafka::reconcile(
            &mut self.engines,
            kafka::Handover::partitions(&assigned, &self.input),
            |p| {
                gate.close(&[p]);
                tracing::warn!(
                    partition = p,
                    "partition lost: its escalations are with another instance now"
                );
            },
        );
        if !missing.is_empty() {
            self.restored.set(false);
        }
        for p in missing {
            let started = Instant::now();
            let states = crate::restore::restore_partition(self.deps.settings.clone(), p).await?;
            let mut engine = Engine::new(
                p,
                self.routing.clone(),
                self.deps.settings.escalator.closed_retention_secs,
            );
            let n = states.len();
            for s in states {
                engine.import(s);
            }
            // A referral erased while this partition was elsewhere (or before a crash wrote its
            // tombstones): dropped before anything of it is re-driven.
            let erased = self.erasures.erased();
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
            gate.open(p);
            for job in pending {
                self.dispatcher.submit(job);
            }
            self.engines.insert(p, engine);
        }
        self.restored.set(true);
        Ok(())
    }

    /// Drops the escalations of the referrals erased since the last tick (deliveries already
    /// under way finish); their tombstones go out with the tick's writes.
    fn apply_erasures(&mut self) {
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
            escalations_held = forgotten,
            "erasures applied: the referrals' escalations dropped and tombstoned, their SLA events refused from now on"
        );
    }

    /// Hands `partitions` over to the instance the group gives them to next: no new attempt
    /// starts, the attempts under way finish (up to `settle`), their outcomes and every changed
    /// state are written, offsets are committed, and the partitions' engines are dropped. The
    /// caller then releases them to the group, and the next owner restores exactly this state
    /// and re-drives what is still pending, so no page is sent by both. Every write in flight
    /// is settled before this is called.
    async fn hand_over(
        &mut self,
        partitions: &[i32],
        consumer: &ServiceConsumer,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let gate = self.dispatcher.gate().clone();
        gate.close(partitions);
        while gate.in_flight(partitions) > 0 && started.elapsed() < self.settle {
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
        while let Ok(r) = self.reports.try_recv() {
            reports.push(r);
        }
        let actions = apply_reports(reports, &mut self.engines, self.deps.time.now());
        for job in self
            .effects
            .write(actions, &mut self.engines, Vec::new())
            .await?
        {
            self.dispatcher.submit(job);
        }
        kafka::commit_stored(consumer, SERVICE);
        self.engines.retain(|p, _| !partitions.contains(p));
        tracing::info!(
            ?partitions,
            seconds = started.elapsed().as_secs_f64(),
            "partitions handed over: deliveries settled, state written, offsets committed"
        );
        Ok(())
    }

    /// A stop is a hand-over of every partition: writes in flight are settled, attempts under
    /// way finish and their outcomes are recorded, so neither a restart nor the instance taking
    /// over sends them again. What has not started stays pending for the next owner. With the
    /// broker away, nothing unsettled is released and offsets already stored are committed.
    async fn stop(mut self, consumer: &ServiceConsumer) {
        let settled = tokio::time::timeout(self.settle, self.settle_writes(consumer)).await;
        let handed_over = match settled {
            Ok(Ok(())) => {
                let held: Vec<i32> = self.engines.keys().copied().collect();
                self.hand_over(&held, consumer).await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!(
                "writes still unacknowledged {} s after the stop",
                self.settle.as_secs()
            )),
        };
        if let Err(e) = handed_over {
            tracing::warn!(error.message = %e, "could not record the last delivery outcomes; they will be delivered again after the restart");
            kafka::commit_stored(consumer, SERVICE);
        }
        tracing::info!("escalator stopped");
    }
}

/// The error that stops the service when the producer can no longer write.
fn fatal(error: &kafka::ProduceError) -> anyhow::Error {
    kafka::Interrupted::Fatal(error.clone()).into()
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
