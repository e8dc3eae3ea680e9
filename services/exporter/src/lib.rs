//! The exporter: Prometheus metrics of how quickly each force responds.
//!
//! Reads `referral-events` (referrals in) and `sla-events` (clock transitions) and turns them into
//! counters and histograms served on `/metrics`. It writes dead letters and its own state.
//!
//! # Delivery contract
//! Each input record is counted exactly once, across restarts and rebalances: the totals are
//! kept per input partition, and each partition's totals and the offset they reflect are
//! snapshotted to the compacted `exporter-state` topic every few seconds, before the partition
//! is handed over, and on shutdown; offsets are committed only after the snapshot is
//! acknowledged. Whichever instance is assigned a partition next restores its snapshot and skips
//! records the snapshot already counted, so counters continue from where they were. SLA events
//! the clock publishes again (its at-least-once output) are recognised by id within a window of
//! the partition's last [`totals::DURABLE_ID_WINDOW`] ids, which is part of the snapshot.
//!
//! # No record stops a partition
//! An invalid record is dead-lettered with its reason (bounded: a value over
//! `dead_letters.max_payload_bytes` keeps its length, SHA-256 and a prefix) and counted as
//! handled. A broker that is away is waited out (the dead letters and snapshots are written again
//! after a pause, for as long as it takes; nothing is stored meanwhile and the service reports
//! not ready). A snapshot the broker refuses for good (a partition's totals are bounded by the
//! label sets and the id window, well under the producer's limit, so this takes a topic limit set
//! far too low) is dead-lettered instead, and that partition's offsets are not stored: its
//! counts stay exact, recounted from its last snapshot after a restart.
//!
//! # Several instances
//! Instances share the input through the consumer group. Each serves the series of the
//! partitions it owns, labelled `partition`; a partition's series move with it, at their value,
//! so `sum without (instance, partition)` is the whole at every moment and no series goes down.

pub mod metrics;
pub mod totals;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use safeclock_common::config::Settings;
use safeclock_common::event::{decode_sla_event, transition_label};
use safeclock_common::kafka::{
    self, BrokerWait, DeadLetters, OffsetBook, Output, ServiceConsumer, Topic,
};
use safeclock_common::metrics::{ConsumerMetrics, SlaLabelBounds};
use safeclock_common::ops::ReadinessHandle;
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::{
    referral_event::Kind, Category, ReferralEvent, RiskGrade, SlaEvent, SlaTransition,
};
use safeclock_common::schema::{duration_to_jiff, enum_label};
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;

use crate::totals::{Input, Shard, Totals, TotalsMetrics};

const SERVICE: &str = "exporter";
const MAX_BATCH: usize = 1000;

/// The transitions whose series are created at 0 when a clock of a new label set starts.
const CLOCK_OUTCOMES: [SlaTransition; 5] = [
    SlaTransition::Warning,
    SlaTransition::Breached,
    SlaTransition::Met,
    SlaTransition::MetLate,
    SlaTransition::Cancelled,
];

/// Turns records into metric updates in one partition's [`Totals`]; separate from Kafka so tests
/// can feed it directly.
pub struct Recorder {
    metrics: TotalsMetrics,
    bounds: SlaLabelBounds,
}

impl Recorder {
    /// `forces` and `rules` are the label values allowed; anything else is reported as `other`.
    pub fn new(metrics: TotalsMetrics, forces: &[String], rules: &[String]) -> Self {
        Self {
            metrics,
            bounds: SlaLabelBounds::new(forces, rules.iter().map(String::as_str)),
        }
    }

    /// Counts `event` in `totals` unless its id was counted recently.
    pub fn referral_event(&self, totals: &mut Totals, event: &ReferralEvent) {
        if totals.recent_ids.contains(&event.event_id) {
            return;
        }
        totals.recent_ids.insert(&event.event_id);
        if let Some(Kind::ReferralReceived(r)) = &event.kind {
            let category = Category::try_from(r.category).unwrap_or(Category::Unspecified);
            let risk = RiskGrade::try_from(r.risk).unwrap_or(RiskGrade::Unspecified);
            totals.referral_received(
                self.bounds.force(&event.force_id),
                &enum_label(category.as_str_name(), "CATEGORY_"),
                &enum_label(risk.as_str_name(), "RISK_GRADE_"),
            );
        }
    }

    /// Counts `event` in `totals` unless its id was counted recently.
    pub fn sla_event(&self, totals: &mut Totals, event: &SlaEvent) {
        let id = event.sla_event_id.as_str();
        if totals.recent_ids.contains(id) {
            return;
        }
        totals.recent_ids.insert(id);
        let labels = event.labels.clone().unwrap_or_default();
        let force = self.bounds.force(&labels.force_id);
        let category = self.bounds.category(&labels.category);
        let risk = self.bounds.risk(&labels.risk);
        let rule = self.bounds.rule(&event.rule_id);
        let buckets = self.metrics.bounds(rule);
        let transition = event.transition();
        let severity = enum_label(event.severity().as_str_name(), "SEVERITY_");
        if transition == SlaTransition::Started {
            // Every series a clock can move exists (at 0) from its start, so rate() and
            // increase() see its first met, breach or cancellation (Prometheus counts nothing
            // for a series it first sees at 1), and dashboards show 0 rather than "no data".
            for t in CLOCK_OUTCOMES {
                totals.transition([force, rule, category, risk, transition_label(t)], 0);
            }
            totals.breaches(force, rule, &severity, 0);
            totals.time_to_stop(buckets, [rule, force, category, risk], None);
        }
        totals.transition(
            [force, rule, category, risk, transition_label(transition)],
            1,
        );
        match transition {
            SlaTransition::Breached => totals.breaches(force, rule, &severity, 1),
            SlaTransition::Met | SlaTransition::MetLate => {
                if let Some(elapsed) = &event.elapsed {
                    let secs = duration_to_jiff(elapsed).as_secs_f64().max(0.0);
                    totals.time_to_stop(buckets, [rule, force, category, risk], Some(secs));
                }
            }
            _ => {}
        }
    }
}

/// Where the exporter's totals are snapshotted: one record per input partition, keyed
/// `{group}/{input topic}/{partition}`, in the same partition of the compacted `exporter-state`
/// topic (so taking over a partition reads one state partition).
struct StateTopic {
    dead_letters: DeadLetters,
    /// Waits out a broker that is away (not ready meanwhile).
    wait: BrokerWait,
    topic: String,
    group: String,
    referral_topic: String,
    sla_topic: String,
}

impl StateTopic {
    fn input_topic(&self, input: Input) -> &str {
        match input {
            Input::ReferralEvents => &self.referral_topic,
            Input::SlaEvents => &self.sla_topic,
        }
    }

    fn input_of(&self, topic: &str) -> Option<Input> {
        if topic == self.sla_topic {
            Some(Input::SlaEvents)
        } else if topic == self.referral_topic {
            Some(Input::ReferralEvents)
        } else {
            None
        }
    }

    fn key(&self, (input, partition): Shard) -> String {
        format!("{}/{}/{partition}", self.group, self.input_topic(input))
    }

    /// The shards in `tpl`.
    fn shards(&self, tpl: &TopicPartitionList) -> BTreeSet<Shard> {
        tpl.elements()
            .iter()
            .filter_map(|e| Some((self.input_of(e.topic())?, e.partition())))
            .collect()
    }

    /// The latest snapshots in state partition `partition`, by key.
    async fn read(
        &self,
        settings: &Settings,
        partition: i32,
    ) -> anyhow::Result<kafka::LatestByKey> {
        let (settings, topic) = (settings.clone(), self.topic.clone());
        let reader = format!("{}-state-reader", self.group);
        let (latest, _) = tokio::task::spawn_blocking(move || {
            kafka::read_compacted_partition(&settings, &topic, partition, &reader)
        })
        .await??;
        Ok(latest)
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> anyhow::Result<Totals> {
        Totals::from_json(bytes).map_err(|e| {
            anyhow::anyhow!(
                "the exporter state {key} in {} is not readable: {e}",
                self.topic
            )
        })
    }

    /// Writes the snapshots and waits for the broker's acknowledgement of every one (waiting out
    /// a broker that is away); returns the shards whose snapshot the broker refuses for good
    /// (dead-lettered instead).
    ///
    /// # Errors
    /// When the producer can no longer write, or the service is told to stop meanwhile.
    async fn save(&self, snapshots: Vec<(Shard, Vec<u8>)>) -> anyhow::Result<Vec<Shard>> {
        let outputs: Vec<Output> = snapshots
            .iter()
            .map(|(shard, bytes)| {
                Output::new(&self.topic, self.key(*shard), Some(bytes.clone()))
                    .to_partition(shard.1)
            })
            .collect();
        let refused = self
            .dead_letters
            .write_or_dead_letter(&outputs, &self.wait)
            .await?;
        Ok(refused.into_iter().map(|i| snapshots[i].0).collect())
    }
}

/// How long a seek to a restored snapshot's offset may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the totals are snapshotted (and input offsets committed).
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);

/// The exporter's hold on its partitions: which totals it owns and which changed since they were
/// last written.
struct Shards<'a> {
    settings: &'a Settings,
    state: StateTopic,
    metrics: TotalsMetrics,
    /// The snapshot of all partitions from before per-partition totals (key: the group, in
    /// state partition 0), shared out on first assignment of each partition that has no snapshot
    /// of its own. Looked up only then, and once: `None` until it has been.
    legacy: Option<Option<Totals>>,
    restored: ReadinessHandle,
    /// Owned shards changed since their last snapshot.
    dirty: BTreeSet<Shard>,
    /// Offsets handled since the last snapshot: stored for commit once a snapshot covers them.
    pending: OffsetBook,
}

impl Shards<'_> {
    /// Restores the totals of newly assigned partitions (this instance serves them from now on)
    /// and drops those of partitions lost without a hand-over (their new owner restores them
    /// from the last snapshot and counts the rest again).
    async fn sync_assignment(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        let Some(assigned) = kafka::current_assignment(consumer) else {
            return Ok(());
        };
        let state = &self.state;
        let missing = kafka::reconcile(&mut self.metrics.lock(), state.shards(&assigned), |s| {
            tracing::warn!(
                partition = s.1,
                topic = state.input_topic(s.0),
                "partition lost: its totals are with another instance now"
            );
        });
        if missing.is_empty() {
            self.restored.set(true);
            return Ok(());
        }
        // Not ready while restoring: the totals served are incomplete until it finishes.
        self.restored.set(false);
        let mut by_state_partition: BTreeMap<i32, Vec<Input>> = BTreeMap::new();
        for (input, partition) in missing {
            by_state_partition.entry(partition).or_default().push(input);
        }
        for (partition, inputs) in by_state_partition {
            let started = Instant::now();
            let latest = self.state.read(self.settings, partition).await?;
            for input in inputs {
                let shard = (input, partition);
                let key = self.state.key(shard);
                let totals = match latest.get(&key) {
                    Some(Some(bytes)) => self.state.decode(&key, bytes)?,
                    _ => match self.legacy_share(shard, &latest).await? {
                        Some(share) => {
                            // Written at the next snapshot: from then on the partition's own
                            // record is the truth.
                            self.dirty.insert(shard);
                            share
                        }
                        None => Totals::default(),
                    },
                };
                let topic = self.state.input_topic(input);
                tracing::info!(
                    partition,
                    topic,
                    seconds = started.elapsed().as_secs_f64(),
                    "partition totals restored"
                );
                // Read on from exactly where the snapshot stops. The committed offset is never
                // past it in normal operation (offsets are committed after snapshots), but the
                // snapshot is the truth: if an older snapshot were restored, records the
                // committed offset skips would otherwise never be counted.
                if let Some(next) = totals.next_offset(topic, partition) {
                    if let Err(e) =
                        consumer.seek(topic, partition, Offset::Offset(next), SEEK_TIMEOUT)
                    {
                        tracing::warn!(partition, topic, error.message = %e, "cannot seek to the snapshot's offset; reading on from the committed offset");
                    }
                }
                self.metrics.lock().insert(shard, totals);
            }
        }
        self.restored.set(true);
        Ok(())
    }

    /// `shard`'s part of the snapshot of all partitions from an earlier version, if there is one.
    /// `latest` is the state partition just read for `shard`: partition 0 holds that snapshot.
    async fn legacy_share(
        &mut self,
        (input, partition): Shard,
        latest: &kafka::LatestByKey,
    ) -> anyhow::Result<Option<Totals>> {
        if self.legacy.is_none() {
            let group = &self.state.group;
            let bytes = if partition == 0 {
                latest.get(group).cloned().flatten()
            } else {
                self.state
                    .read(self.settings, 0)
                    .await?
                    .remove(group)
                    .flatten()
            };
            let legacy = bytes.map(|b| self.state.decode(group, &b)).transpose()?;
            if legacy.is_some() {
                tracing::info!("a snapshot of all partitions from an earlier version is shared out per partition as they are assigned");
            }
            self.legacy = Some(legacy);
        }
        let topic = self.state.input_topic(input);
        Ok(self
            .legacy
            .as_ref()
            .and_then(Option::as_ref)
            .map(|all| all.legacy_share(input, topic, partition)))
    }

    /// Snapshots every changed partition's totals (with the offset they reflect) and, once the
    /// broker has them, stores the offsets handled so far for commit.
    async fn snapshot(&mut self, consumer: &ServiceConsumer) -> anyhow::Result<()> {
        let snapshots: Vec<(Shard, Vec<u8>)> = {
            let owned = self.metrics.lock();
            self.dirty
                .iter()
                .filter_map(|s| owned.get(s).map(|t| (*s, t.to_json())))
                .collect()
        };
        let refused = self.state.save(snapshots).await?;
        self.dirty.clear();
        let mut pending = std::mem::take(&mut self.pending);
        for shard in refused {
            tracing::error!(
                partition = shard.1,
                topic = self.state.input_topic(shard.0),
                "the broker refuses this partition's snapshot for good: dead-lettered; its offsets are not stored, so its counts are recounted from its last snapshot after a restart"
            );
            pending.forget(self.state.input_topic(shard.0), shard.1);
            self.dirty.insert(shard);
        }
        pending.store(consumer);
        Ok(())
    }

    /// Hands `revoked` over: their totals are written and their offsets committed, then this
    /// instance stops serving them and gives them back to the group.
    async fn hand_over(
        &mut self,
        consumer: &ServiceConsumer,
        handover: &kafka::Handover<'_>,
        revoked: &TopicPartitionList,
    ) -> anyhow::Result<()> {
        self.snapshot(consumer).await?;
        kafka::commit_stored(consumer, SERVICE);
        let gone = self.state.shards(revoked);
        self.metrics.lock().retain(|s, _| !gone.contains(s));
        tracing::info!(
            partitions = gone.len(),
            "partitions handed over: totals written, offsets committed"
        );
        handover.release(revoked);
        Ok(())
    }
}

/// Runs the exporter until `shutdown` is cancelled.
///
/// Counting is exactly once per record, across restarts and rebalances: each partition's totals
/// and its next offset are snapshotted together (acknowledged by the broker) before those offsets
/// are stored for commit; the next owner of a partition restores its snapshot and skips records
/// below its offset, so a crash between a snapshot and the commit cannot count a record twice.
///
/// # Errors
/// When Kafka clients cannot be created, the state cannot be read or written, or dead letters
/// cannot be acknowledged.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let rules = Policy::load(&settings)?.rules.rules;
    let metrics = metrics::register(&deps.registry, &rules)?;
    let producer = kafka::producer(&settings)?;
    let referral_topic = settings.topic(Topic::ReferralEvents);
    let sla_topic = settings.topic(Topic::SlaEvents);
    kafka::check_copartitioned(&settings, Topic::ReferralEvents, Topic::ExporterState).await?;
    kafka::check_copartitioned(&settings, Topic::SlaEvents, Topic::ExporterState).await?;
    let dead_letters = DeadLetters::new(producer, &settings, SERVICE, consumer_metrics.clone());
    let wait = BrokerWait::new(
        SERVICE,
        deps.readiness.component("exporter-outputs"),
        shutdown.clone(),
        consumer_metrics.broker_waits.with_label_values(&[SERVICE]),
    );
    let state = StateTopic {
        dead_letters: dead_letters.clone(),
        wait: wait.clone(),
        topic: settings.topic(Topic::ExporterState),
        group: settings.exporter.group_id.clone(),
        referral_topic: referral_topic.clone(),
        sla_topic: sla_topic.clone(),
    };
    let rule_ids: Vec<String> = rules.into_iter().map(|r| r.id).collect();
    let recorder = Recorder::new(metrics.clone(), &settings.forces, &rule_ids);
    let mut shards = Shards {
        settings: &settings,
        state,
        metrics: metrics.clone(),
        legacy: None,
        restored: deps.readiness.component("exporter-state"),
        dirty: BTreeSet::new(),
        pending: OffsetBook::default(),
    };
    let consumer = kafka::consumer(
        &settings,
        SERVICE,
        &settings.exporter.group_id,
        &[&referral_topic, &sla_topic],
        deps.readiness.component(SERVICE),
    )?;
    consumer.context().report_lag(consumer_metrics.lag.clone());
    consumer.context().restores_state(shards.restored.clone());
    let handover = kafka::Handover::take_over(&consumer);
    let plausibility = safeclock_common::event::Plausibility::new(&settings);
    tracing::info!(referral_topic, sla_topic, "exporter started");

    let mut snapshot_due = tokio::time::interval(SNAPSHOT_INTERVAL);
    snapshot_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A stop requested while the broker is away ends the loop without a last snapshot (the batch
    // under way is not durable); any other error stops the service.
    let mut interrupted = false;
    macro_rules! or_stop {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if kafka::is_shutdown(&e) => {
                    interrupted = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        };
    }
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            revoked = handover.revoked() => {
                or_stop!(shards.hand_over(&consumer, &handover, &revoked).await);
                continue;
            }
            _ = snapshot_due.tick() => {
                shards.sync_assignment(&consumer).await?;
                or_stop!(shards.snapshot(&consumer).await);
                continue;
            }
            batch = kafka::next_batch(&consumer, MAX_BATCH) => batch,
        };
        shards.sync_assignment(&consumer).await?;
        let started = Instant::now();
        let mut letters = Vec::new();
        for message in &batch {
            consumer_metrics
                .consumed
                .with_label_values(&[SERVICE, message.topic()])
                .inc();
            consumer_metrics.observe_latency(SERVICE, message.timestamp().to_millis());
            let Some(input) = shards.state.input_of(message.topic()) else {
                continue;
            };
            let shard = (input, message.partition());
            let (topic, partition, offset) =
                (message.topic(), message.partition(), message.offset());
            match metrics.lock().get(&shard) {
                // Handed over between the fetch and now: its new owner counts it.
                None => continue,
                // Counted before the snapshot this instance restored.
                Some(t) if t.counted(topic, partition, offset) => {
                    shards.pending.handled(message);
                    continue;
                }
                Some(_) => {}
            }
            let payload = message.payload().unwrap_or_default();
            let decoded = match input {
                Input::SlaEvents => decode_sla_event(payload).map(|e| Record::Sla(Box::new(e))),
                Input::ReferralEvents => plausibility
                    .decode(payload, deps.time.now())
                    .map(|e| Record::Referral(Box::new(e))),
            };
            if let Err(rejection) = &decoded {
                letters.push(dead_letters.letter(message, rejection));
            }
            let mut owned = metrics.lock();
            if let Some(totals) = owned.get_mut(&shard) {
                match &decoded {
                    Ok(Record::Sla(e)) => recorder.sla_event(totals, e),
                    Ok(Record::Referral(e)) => recorder.referral_event(totals, e),
                    Err(_) => {}
                }
                totals.advance(topic, partition, offset);
                shards.dirty.insert(shard);
                shards.pending.handled(message);
            }
        }
        // The dead letters must be durable before a snapshot covers their records.
        or_stop!(dead_letters
            .write_or_dead_letter(&letters, &wait)
            .await
            .map_err(anyhow::Error::from));
        consumer_metrics
            .batch_seconds
            .with_label_values(&[SERVICE])
            .observe(started.elapsed().as_secs_f64());
    }
    if !interrupted {
        match shards.snapshot(&consumer).await {
            Err(e) if kafka::is_shutdown(&e) => {
                tracing::warn!("stopped while the broker was away: no last snapshot; the next owner counts on from the previous one");
            }
            r => r?,
        }
    }
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("exporter stopped");
    Ok(())
}

/// A decoded input record.
enum Record {
    Sla(Box<SlaEvent>),
    Referral(Box<ReferralEvent>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;
    use safeclock_common::schema::v1::SlaLabels;
    use safeclock_common::schema::ProtoDuration;

    fn sla(id: &str, force: &str, rule: &str, t: SlaTransition, elapsed_secs: i64) -> SlaEvent {
        SlaEvent {
            sla_event_id: id.into(),
            referral_id: "R-1".into(),
            rule_id: rule.into(),
            transition: t as i32,
            severity: safeclock_common::schema::v1::Severity::High as i32,
            labels: Some(SlaLabels {
                force_id: force.into(),
                ..SlaLabels::default()
            }),
            elapsed: Some(ProtoDuration {
                seconds: elapsed_secs,
                nanos: 0,
            }),
            ..SlaEvent::default()
        }
    }

    #[test]
    fn counts_breaches_once_observes_time_to_stop_and_bounds_labels() {
        let registry = Registry::new();
        let metrics = metrics::register(&registry, &[]).unwrap();
        let r = Recorder::new(
            metrics.clone(),
            &["nottinghamshire".to_string()],
            &["victim-contact".to_string()],
        );
        let mut totals = Totals::default();
        let breach = sla(
            "b1",
            "nottinghamshire",
            "victim-contact",
            SlaTransition::Breached,
            86_400,
        );
        r.sla_event(&mut totals, &breach);
        r.sla_event(&mut totals, &breach); // re-delivered: not counted again
        r.sla_event(
            &mut totals,
            &sla(
                "m1",
                "atlantis",
                "made-up-rule",
                SlaTransition::MetLate,
                5 * 86_400,
            ),
        );
        let key = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            totals.breaches[&key(&["nottinghamshire", "victim-contact", "high"])],
            1
        );
        let h = &totals.time_to_stop[&key(&["other", "other", "other", "other"])];
        assert_eq!(h.count(), 1);
        assert_eq!(h.sum, 5.0 * 86_400.0);

        // A clock's start creates the series it can move, at 0, so that increase() sees its
        // first breach.
        r.sla_event(
            &mut totals,
            &sla(
                "s1",
                "nottinghamshire",
                "made-up-rule",
                SlaTransition::Started,
                0,
            ),
        );
        assert_eq!(
            totals.breaches[&key(&["nottinghamshire", "other", "high"])],
            0
        );
        assert_eq!(
            totals.transitions[&key(&["nottinghamshire", "other", "other", "other", "breached"])],
            0
        );

        // A re-delivery is still recognised by the next owner of the partition, from the
        // snapshot.
        let mut next_owner = Totals::from_json(&totals.to_json()).unwrap();
        r.sla_event(&mut next_owner, &breach);
        assert_eq!(next_owner, totals);
    }
}
