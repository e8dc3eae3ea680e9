//! The exporter: Prometheus metrics of how quickly each force responds.
//!
//! Reads `referral-events` (referrals in) and `sla-events` (clock transitions) and turns them into
//! counters and histograms served on `/metrics`. It writes dead letters and its own state.
//!
//! # Delivery contract
//! Each input record is counted exactly once, across restarts: the totals and the input offsets
//! they reflect are snapshotted to the compacted `exporter-state` topic every few seconds and on
//! shutdown, offsets are committed only after the snapshot is acknowledged, and after a restart
//! the totals are restored and records the snapshot already counted are skipped. Counters
//! therefore stay monotonic across restarts. Re-published SLA events (the clock's at-least-once
//! output) are recognised by id within a bounded window and not counted twice; the last 30,000
//! counted ids (as hashes) are part of the snapshot, so this holds across the exporter's own
//! restarts too. Run one exporter
//! per consumer group: the snapshot is one record per group.

pub mod metrics;
pub mod totals;

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::config::Settings;
use safeclock_common::dedup::RecentIds;
use safeclock_common::event::{decode_sla_event, transition_label, Rejection};
use safeclock_common::kafka::{self, DeadLetters, OffsetBook, Topic};
use safeclock_common::metrics::{ConsumerMetrics, SlaLabelBounds};
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::{
    referral_event::Kind, Category, ReferralEvent, RiskGrade, SlaEvent, SlaTransition,
};
use safeclock_common::schema::{duration_to_jiff, enum_label};
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;

use crate::totals::{Totals, TotalsMetrics};

const SERVICE: &str = "exporter";
const MAX_BATCH: usize = 1000;
const DEDUP_WINDOW: usize = 200_000;

/// The transitions whose series are created at 0 when a clock of a new label set starts.
const CLOCK_OUTCOMES: [SlaTransition; 5] = [
    SlaTransition::Warning,
    SlaTransition::Breached,
    SlaTransition::Met,
    SlaTransition::MetLate,
    SlaTransition::Cancelled,
];

/// Turns records into metric updates; separate from Kafka so tests can feed it directly.
pub struct Recorder {
    metrics: TotalsMetrics,
    bounds: SlaLabelBounds,
    seen_sla_events: RecentIds,
    seen_referral_events: RecentIds,
}

impl Recorder {
    /// `forces` and `rules` are the label values allowed; anything else is reported as `other`.
    pub fn new(metrics: TotalsMetrics, forces: &[String], rules: &[String]) -> Self {
        Self {
            metrics,
            bounds: SlaLabelBounds::new(forces, rules.iter().map(String::as_str)),
            seen_sla_events: RecentIds::new(DEDUP_WINDOW),
            seen_referral_events: RecentIds::new(DEDUP_WINDOW),
        }
    }

    pub fn referral_event(&mut self, event: &ReferralEvent) {
        if !self.seen_referral_events.first_time(&event.event_id) {
            return;
        }
        if let Some(Kind::ReferralReceived(r)) = &event.kind {
            let category = Category::try_from(r.category).unwrap_or(Category::Unspecified);
            let risk = RiskGrade::try_from(r.risk).unwrap_or(RiskGrade::Unspecified);
            self.metrics.referral_received(
                self.bounds.force(&event.force_id),
                &enum_label(category.as_str_name(), "CATEGORY_"),
                &enum_label(risk.as_str_name(), "RISK_GRADE_"),
            );
        }
    }

    pub fn sla_event(&mut self, event: &SlaEvent) {
        // The in-memory window is large; the durable one (in the snapshot) survives a restart.
        let id = event.sla_event_id.as_str();
        if self.metrics.lock().recent_sla_events.contains(id)
            || !self.seen_sla_events.first_time(id)
        {
            return;
        }
        self.metrics.lock().recent_sla_events.insert(id);
        let labels = event.labels.clone().unwrap_or_default();
        let force = self.bounds.force(&labels.force_id);
        let category = self.bounds.category(&labels.category);
        let risk = self.bounds.risk(&labels.risk);
        let rule = self.bounds.rule(&event.rule_id);
        let transition = event.transition();
        if transition == SlaTransition::Started {
            // Every series a clock can move exists (at 0) from its start, so rate() and
            // increase() see its first met, breach or cancellation, and dashboards show 0
            // rather than "no data".
            for t in CLOCK_OUTCOMES {
                self.metrics
                    .transition([force, rule, category, risk, transition_label(t)], 0);
            }
            self.metrics.time_to_stop(rule, force, category, risk, None);
        }
        self.metrics.transition(
            [force, rule, category, risk, transition_label(transition)],
            1,
        );
        match transition {
            SlaTransition::Breached => {
                self.metrics.breach(
                    force,
                    rule,
                    &enum_label(event.severity().as_str_name(), "SEVERITY_"),
                );
            }
            SlaTransition::Met | SlaTransition::MetLate => {
                if let Some(elapsed) = &event.elapsed {
                    let secs = duration_to_jiff(elapsed).as_secs_f64().max(0.0);
                    self.metrics
                        .time_to_stop(rule, force, category, risk, Some(secs));
                }
            }
            _ => {}
        }
    }
}

/// Where the exporter's totals are snapshotted: one record, keyed by the consumer group, always
/// in partition 0 of the compacted `exporter-state` topic.
struct StateTopic {
    producer: FutureProducer,
    topic: String,
    key: String,
}

impl StateTopic {
    /// The latest snapshot, if any.
    async fn restore(&self, settings: &Settings) -> anyhow::Result<Option<Totals>> {
        let (settings, topic, key) = (settings.clone(), self.topic.clone(), self.key.clone());
        let group = format!("{key}-state-reader");
        let (latest, _) = tokio::task::spawn_blocking(move || {
            kafka::read_compacted_partition(&settings, &topic, 0, &group)
        })
        .await??;
        match latest.get(&self.key) {
            Some(Some(bytes)) => Ok(Some(Totals::from_json(bytes).map_err(|e| {
                anyhow::anyhow!("the exporter state in {} is not readable: {e}", self.topic)
            })?)),
            _ => Ok(None),
        }
    }

    /// Writes `snapshot` and waits for the broker's acknowledgement.
    async fn save(&self, snapshot: &[u8]) -> anyhow::Result<()> {
        let record = FutureRecord::to(&self.topic)
            .key(self.key.as_str())
            .payload(snapshot)
            .partition(0);
        let delivery = kafka::enqueue(&self.producer, record).await?;
        kafka::await_deliveries(vec![delivery]).await
    }
}

/// How often the totals are snapshotted (and input offsets committed).
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the exporter until `shutdown` is cancelled.
///
/// Counting is exactly once per record, across restarts: the totals and the next offset of each
/// input partition are snapshotted together (acknowledged by the broker) before those offsets
/// are stored for commit; on start the snapshot is restored and records below its offsets are
/// skipped, so a crash between a snapshot and the commit cannot count a record twice.
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
    let state = StateTopic {
        producer: producer.clone(),
        topic: settings.topic(Topic::ExporterState),
        key: settings.exporter.group_id.clone(),
    };
    // Not ready (no partitions assigned) until the totals are back.
    if let Some(totals) = state.restore(&settings).await? {
        tracing::info!(
            series = totals.transitions.len(),
            "exporter totals restored"
        );
        metrics.restore(totals);
    }
    let rule_ids: Vec<String> = rules.into_iter().map(|r| r.id).collect();
    let mut recorder = Recorder::new(metrics.clone(), &settings.forces, &rule_ids);
    let referral_topic = settings.topic(Topic::ReferralEvents);
    let sla_topic = settings.topic(Topic::SlaEvents);
    let consumer = kafka::consumer(
        &settings,
        SERVICE,
        &settings.exporter.group_id,
        &[&referral_topic, &sla_topic],
        deps.readiness.component(SERVICE),
    )?;
    consumer.context().report_lag(consumer_metrics.lag.clone());
    let dead_letters = DeadLetters::new(producer, &settings, SERVICE, consumer_metrics.clone());
    let plausibility = safeclock_common::event::Plausibility::new(&settings);
    tracing::info!(referral_topic, sla_topic, "exporter started");

    // Offsets handled since the last snapshot: stored for commit once a snapshot covers them.
    let mut pending = OffsetBook::default();
    let mut snapshot_due = tokio::time::interval(SNAPSHOT_INTERVAL);
    snapshot_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = snapshot_due.tick() => {
                snapshot(&state, &metrics, &consumer, &mut pending).await?;
                continue;
            }
            batch = kafka::next_batch(&consumer, MAX_BATCH) => batch,
        };
        let started = Instant::now();
        let mut deliveries = Vec::new();
        for message in &batch {
            consumer_metrics
                .consumed
                .with_label_values(&[SERVICE, message.topic()])
                .inc();
            consumer_metrics.observe_latency(SERVICE, message.timestamp().to_millis());
            pending.handled(message);
            if metrics
                .lock()
                .counted(message.topic(), message.partition(), message.offset())
            {
                continue; // counted before the last restart
            }
            let payload = message.payload().unwrap_or_default();
            let outcome: Result<(), Rejection> = if message.topic() == sla_topic {
                decode_sla_event(payload).map(|e| recorder.sla_event(&e))
            } else {
                plausibility
                    .decode(payload, deps.time.now())
                    .map(|e| recorder.referral_event(&e))
            };
            if let Err(rejection) = outcome {
                deliveries.push(dead_letters.send(message, &rejection).await?);
            }
            metrics
                .lock()
                .advance(message.topic(), message.partition(), message.offset());
        }
        kafka::await_deliveries(deliveries).await?;
        consumer_metrics
            .batch_seconds
            .with_label_values(&[SERVICE])
            .observe(started.elapsed().as_secs_f64());
    }
    snapshot(&state, &metrics, &consumer, &mut pending).await?;
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("exporter stopped");
    Ok(())
}

/// Snapshots the totals (with the offsets they reflect) and, once the broker has them, stores
/// the offsets handled so far for commit.
async fn snapshot(
    state: &StateTopic,
    metrics: &TotalsMetrics,
    consumer: &kafka::ServiceConsumer,
    pending: &mut OffsetBook,
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let bytes = metrics.lock().to_json();
    state.save(&bytes).await?;
    std::mem::take(pending).store(consumer);
    Ok(())
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
        let mut r = Recorder::new(
            metrics.clone(),
            &["nottinghamshire".to_string()],
            &["victim-contact".to_string()],
        );
        let breach = sla(
            "b1",
            "nottinghamshire",
            "victim-contact",
            SlaTransition::Breached,
            86_400,
        );
        r.sla_event(&breach);
        r.sla_event(&breach); // re-delivered: not counted again
        r.sla_event(&sla(
            "m1",
            "atlantis",
            "made-up-rule",
            SlaTransition::MetLate,
            5 * 86_400,
        ));
        let totals = metrics.lock();
        let key = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            totals.breaches[&key(&["nottinghamshire", "victim-contact", "high"])],
            1
        );
        let h = &totals.time_to_stop[&key(&["other", "other", "other", "other"])];
        assert_eq!(h.count(), 1);
        assert_eq!(h.sum, 5.0 * 86_400.0);
    }
}
