//! Metrics every consumer shares: records consumed, invalid records by reason, dead letters,
//! processing latency. Registered once into the registry that is passed in, then handed to the
//! code that uses them; no global statics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::rules::LabelSet;
use crate::schema::{category_labels, risk_labels};

/// The label values SLA metrics may carry: configured forces, known rules, the contract's
/// categories and risk grades. Anything else is reported as `other`, so a bad or hostile record
/// cannot create series.
#[derive(Debug, Clone)]
pub struct SlaLabelBounds {
    forces: LabelSet,
    rules: LabelSet,
    categories: LabelSet,
    risks: LabelSet,
}

impl SlaLabelBounds {
    pub fn new<'a>(forces: &[String], rules: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            forces: LabelSet::new(forces.iter().cloned()),
            rules: LabelSet::new(rules),
            categories: LabelSet::new(category_labels()),
            risks: LabelSet::new(risk_labels()),
        }
    }

    pub fn force<'a>(&'a self, v: &'a str) -> &'a str {
        self.forces.bound(v)
    }

    pub fn rule<'a>(&'a self, v: &'a str) -> &'a str {
        self.rules.bound(v)
    }

    pub fn category<'a>(&'a self, v: &'a str) -> &'a str {
        self.categories.bound(v)
    }

    pub fn risk<'a>(&'a self, v: &'a str) -> &'a str {
        self.risks.bound(v)
    }
}

/// Registers `safeclock_build_info{version}` = 1: a series present from the first scrape, so
/// dashboards can tell "up, nothing happened yet" from "not scraped", and can show the version;
/// and the standard `process_*` metrics (start time, so restarts show, and memory).
///
/// # Errors
/// When a metric of the same name is already registered.
pub fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = prometheus::IntGaugeVec::new(
        Opts::new(
            "safeclock_build_info",
            "Always 1; the version label tells which safeclock build is running.",
        ),
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(info))?;
    // process_start_time_seconds (restarts), resident memory, CPU, open file descriptors.
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}

/// Consumer health metrics, labelled by service.
#[derive(Clone)]
pub struct ConsumerMetrics {
    /// `safeclock_records_consumed_total{service,topic}`
    pub consumed: IntCounterVec,
    /// `safeclock_records_invalid_total{service,reason}`
    pub invalid: IntCounterVec,
    /// `safeclock_dead_letters_total{service}`
    pub dead_letters: IntCounterVec,
    /// `safeclock_batch_processing_seconds{service}`: from first record polled to offsets stored.
    pub batch_seconds: HistogramVec,
    /// `safeclock_record_latency_seconds{service}`: from a record's Kafka timestamp (when it was
    /// produced) to its processing.
    pub record_latency: HistogramVec,
    /// `safeclock_consumer_lag{service,topic,partition}`: records behind the partition's end,
    /// from librdkafka statistics.
    pub lag: IntGaugeVec,
    /// `safeclock_outputs_refused_total{service,reason}`: records this service meant to write
    /// that the broker refuses for good (`output_too_large`, `output_refused`); each was
    /// dead-lettered instead (the input that caused it, or the record itself).
    pub outputs_refused: IntCounterVec,
    /// `safeclock_broker_waits_total{service}`: pauses while the broker could not take this
    /// service's records (it writes them all again after each; nothing is skipped).
    pub broker_waits: IntCounterVec,
    /// `safeclock_erasures_applied_total{service}`: erasure requests this service has applied
    /// (its state of the referral dropped and tombstoned) since it started.
    pub erasures_applied: IntCounterVec,
}

impl ConsumerMetrics {
    /// Observes the latency of a record with Kafka timestamp `millis` (ignored when absent).
    pub fn observe_latency(&self, service: &str, millis: Option<i64>) {
        let Some(millis) = millis else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let secs = (now - millis).max(0) as f64 / 1000.0;
        self.record_latency
            .with_label_values(&[service])
            .observe(secs);
    }

    /// Registers the consumer metrics.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let consumed = IntCounterVec::new(
            Opts::new(
                "safeclock_records_consumed_total",
                "Records read from input topics.",
            ),
            &["service", "topic"],
        )?;
        let invalid = IntCounterVec::new(
            Opts::new(
                "safeclock_records_invalid_total",
                "Input records refused as invalid, by reason; each went to the dead-letter topic.",
            ),
            &["service", "reason"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "safeclock_dead_letters_total",
                "Records written to the dead-letter topic.",
            ),
            &["service"],
        )?;
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "safeclock_batch_processing_seconds",
                "Time from a batch's first record to its offsets being stored (outputs acknowledged).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["service"],
        )?;
        registry.register(Box::new(consumed.clone()))?;
        registry.register(Box::new(invalid.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        let record_latency = HistogramVec::new(
            HistogramOpts::new(
                "safeclock_record_latency_seconds",
                "Time from a record's Kafka timestamp (when it was produced) to its processing.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["service"],
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "safeclock_consumer_lag",
                "Records between the consumer's position and the end of the partition (librdkafka statistics).",
            ),
            &["service", "topic", "partition"],
        )?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(record_latency.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        let outputs_refused = IntCounterVec::new(
            Opts::new(
                "safeclock_outputs_refused_total",
                "Records the broker refuses for good (too large, invalid); each was dead-lettered instead.",
            ),
            &["service", "reason"],
        )?;
        let broker_waits = IntCounterVec::new(
            Opts::new(
                "safeclock_broker_waits_total",
                "Pauses while the broker could not take records; they are all written again after each.",
            ),
            &["service"],
        )?;
        let erasures_applied = IntCounterVec::new(
            Opts::new(
                "safeclock_erasures_applied_total",
                "Erasure requests applied since start: the referral's state dropped and tombstoned, its records refused.",
            ),
            &["service"],
        )?;
        registry.register(Box::new(outputs_refused.clone()))?;
        registry.register(Box::new(broker_waits.clone()))?;
        registry.register(Box::new(erasures_applied.clone()))?;
        Ok(Self {
            consumed,
            invalid,
            dead_letters,
            batch_seconds,
            record_latency,
            lag,
            outputs_refused,
            broker_waits,
            erasures_applied,
        })
    }
}

/// The metrics of one HTTP listener ([`crate::server`]). Every listener of a process registers
/// its own set with the constant label `listener` (`ops`, `intake`, `escalator-api`), so the
/// families are shared and the series apart.
#[derive(Clone)]
pub struct HttpMetrics {
    /// `safeclock_http_connections_open{listener}`: connections open now.
    pub connections_open: prometheus::IntGauge,
    /// `safeclock_http_connections_refused_total{listener,reason}`: connections closed at once,
    /// `limit` (past `max_connections`) or `tls_handshake` (no TLS session within the
    /// header-read timeout, or a failed handshake).
    pub connections_refused: IntCounterVec,
    /// `safeclock_http_requests_shed_total{listener}`: requests answered 503 because
    /// `max_concurrent_requests` were already in progress.
    pub requests_shed: prometheus::IntCounter,
}

impl HttpMetrics {
    /// # Errors
    /// When this listener's metrics are already registered.
    pub fn register(registry: &Registry, listener: &str) -> prometheus::Result<Self> {
        let connections_open = prometheus::IntGauge::with_opts(
            Opts::new(
                "safeclock_http_connections_open",
                "HTTP connections open now, by listener.",
            )
            .const_label("listener", listener),
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "safeclock_http_connections_refused_total",
                "HTTP connections closed at once: past max_connections (limit) or without a TLS session (tls_handshake).",
            )
            .const_label("listener", listener),
            &["reason"],
        )?;
        let requests_shed = prometheus::IntCounter::with_opts(
            Opts::new(
                "safeclock_http_requests_shed_total",
                "HTTP requests answered 503 because max_concurrent_requests were in progress.",
            )
            .const_label("listener", listener),
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(requests_shed.clone()))?;
        for reason in ["limit", "tls_handshake"] {
            connections_refused.with_label_values(&[reason]);
        }
        Ok(Self {
            connections_open,
            connections_refused,
            requests_shed,
        })
    }
}
