//! The exporter: Prometheus metrics of how quickly each force responds.
//!
//! Reads `referral-events` (referrals in) and `sla-events` (clock transitions) and turns them into
//! counters and histograms served on `/metrics`. It writes nothing to Kafka except dead letters.
//!
//! # Delivery contract
//! At-least-once input; a record's offset is stored once the metrics it moves are updated (and,
//! for invalid records, once the dead letter is acknowledged). Re-delivered SLA events are
//! recognised by id within a bounded window and not counted twice.

pub mod metrics;

use std::time::Instant;

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use safeclock_common::dedup::RecentIds;
use safeclock_common::event::{
    decode_referral_event, decode_sla_event, transition_label, Rejection,
};
use safeclock_common::kafka::{self, DeadLetters, OffsetBook, Topic};
use safeclock_common::metrics::{ConsumerMetrics, SlaLabelBounds};
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::{
    referral_event::Kind, Category, ReferralEvent, RiskGrade, SlaEvent, SlaTransition,
};
use safeclock_common::schema::{duration_to_jiff, enum_label};
use safeclock_common::service::ServiceDeps;
use tokio_util::sync::CancellationToken;

use crate::metrics::ExporterMetrics;

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
    metrics: ExporterMetrics,
    bounds: SlaLabelBounds,
    seen_sla_events: RecentIds,
    seen_referral_events: RecentIds,
}

impl Recorder {
    /// `forces` and `rules` are the label values allowed; anything else is reported as `other`.
    pub fn new(metrics: ExporterMetrics, forces: &[String], rules: &[String]) -> Self {
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
            self.metrics
                .referrals_received
                .with_label_values(&[
                    self.bounds.force(&event.force_id),
                    &enum_label(category.as_str_name(), "CATEGORY_"),
                    &enum_label(risk.as_str_name(), "RISK_GRADE_"),
                ])
                .inc();
        }
    }

    pub fn sla_event(&mut self, event: &SlaEvent) {
        if !self.seen_sla_events.first_time(&event.sla_event_id) {
            return;
        }
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
                self.metrics.transitions.with_label_values(&[
                    force,
                    rule,
                    category,
                    risk,
                    transition_label(t),
                ]);
            }
            self.metrics
                .time_to_stop(rule)
                .with_label_values(&[force, category, risk]);
        }
        self.metrics
            .transitions
            .with_label_values(&[force, rule, category, risk, transition_label(transition)])
            .inc();
        match transition {
            SlaTransition::Breached => {
                self.metrics
                    .breaches
                    .with_label_values(&[
                        force,
                        rule,
                        &enum_label(event.severity().as_str_name(), "SEVERITY_"),
                    ])
                    .inc();
            }
            SlaTransition::Met | SlaTransition::MetLate => {
                if let Some(elapsed) = &event.elapsed {
                    let secs = duration_to_jiff(elapsed).as_secs_f64().max(0.0);
                    self.metrics
                        .time_to_stop(rule)
                        .with_label_values(&[force, category, risk])
                        .observe(secs);
                }
            }
            _ => {}
        }
    }
}

/// Runs the exporter until `shutdown` is cancelled.
///
/// # Errors
/// When Kafka clients cannot be created or dead letters cannot be acknowledged.
pub async fn run(
    deps: ServiceDeps,
    consumer_metrics: ConsumerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = deps.settings.clone();
    let rules = Policy::load(&settings)?.rules.rules;
    let metrics = ExporterMetrics::register(&deps.registry, &rules)?;
    let rule_ids: Vec<String> = rules.into_iter().map(|r| r.id).collect();
    let mut recorder = Recorder::new(metrics, &settings.forces, &rule_ids);
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
    let producer = kafka::producer(&settings)?;
    let dead_letters = DeadLetters::new(producer, &settings, SERVICE, consumer_metrics.clone());
    tracing::info!(referral_topic, sla_topic, "exporter started");

    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            batch = kafka::next_batch(&consumer, MAX_BATCH) => batch,
        };
        let started = Instant::now();
        let mut deliveries = Vec::new();
        let mut offsets = OffsetBook::default();
        for message in &batch {
            consumer_metrics
                .consumed
                .with_label_values(&[SERVICE, message.topic()])
                .inc();
            consumer_metrics.observe_latency(SERVICE, message.timestamp().to_millis());
            let payload = message.payload().unwrap_or_default();
            let outcome: Result<(), Rejection> = if message.topic() == sla_topic {
                decode_sla_event(payload).map(|e| recorder.sla_event(&e))
            } else {
                decode_referral_event(payload).map(|e| recorder.referral_event(&e))
            };
            if let Err(rejection) = outcome {
                deliveries.push(dead_letters.send(message, &rejection).await?);
            }
            offsets.handled(message);
        }
        kafka::await_deliveries(deliveries).await?;
        offsets.store(&consumer);
        consumer_metrics
            .batch_seconds
            .with_label_values(&[SERVICE])
            .observe(started.elapsed().as_secs_f64());
    }
    kafka::commit_stored(&consumer, SERVICE);
    tracing::info!("exporter stopped");
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
        let metrics = ExporterMetrics::register(&registry, &[]).unwrap();
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
        assert_eq!(
            metrics
                .breaches
                .with_label_values(&["nottinghamshire", "victim-contact", "high"])
                .get(),
            1
        );
        let h = metrics
            .time_to_stop("made-up-rule")
            .with_label_values(&["other", "other", "other"]);
        assert_eq!(h.get_sample_count(), 1);
        assert_eq!(h.get_sample_sum(), 5.0 * 86_400.0);
    }
}
