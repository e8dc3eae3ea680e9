//! Metrics every consumer shares: records consumed, invalid records by reason, dead letters,
//! processing latency. Registered once into the registry that is passed in, then handed to the
//! code that uses them; no global statics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Registers `safeclock_build_info{version}` = 1: a series present from the first scrape, so
/// dashboards can tell "up, nothing happened yet" from "not scraped", and can show the version.
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
    registry.register(Box::new(info))
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
}

impl ConsumerMetrics {
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
        registry.register(Box::new(batch_seconds.clone()))?;
        Ok(Self {
            consumed,
            invalid,
            dead_letters,
            batch_seconds,
        })
    }
}
