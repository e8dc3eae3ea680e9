//! What the exporter has counted, as durable state, and the Prometheus collector that serves it.
//!
//! Counters that start again at zero whenever the exporter restarts make "breaches this month"
//! wrong for anyone who reads raw values, and a restart in the middle of a batch could count
//! records twice. So the exporter keeps its totals itself ([`Totals`]), together with the input
//! position they reflect, and snapshots both to the compacted `exporter-state` topic. On start it
//! restores the snapshot and skips records at offsets the snapshot already counted: counters
//! continue from where they were, and each record is counted once (see `crate::run`).
//!
//! The prometheus crate cannot restore a histogram's buckets and sum, hence a small collector
//! that renders [`Totals`] as metric families at scrape time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use serde::{Deserialize, Serialize};

pub const REFERRALS_RECEIVED: &str = "safeclock_referrals_received_total";
pub const TRANSITIONS: &str = "safeclock_sla_transitions_total";
pub const BREACHES: &str = "safeclock_sla_breaches_total";
pub const TIME_TO_STOP: &str = "safeclock_sla_time_to_stop_seconds";

const REFERRALS_LABELS: [&str; 3] = ["force", "category", "risk"];
const TRANSITIONS_LABELS: [&str; 5] = ["force", "rule", "category", "risk", "transition"];
const BREACHES_LABELS: [&str; 3] = ["force", "rule", "severity"];
/// `rule` first: the histogram's buckets depend on it.
const TIME_TO_STOP_LABELS: [&str; 4] = ["rule", "force", "category", "risk"];

/// One histogram series: counts per bucket (not cumulative; the last is +Inf), and the sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramState {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl HistogramState {
    fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Everything counted, keyed by label values, and the next offset to read per input partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub referrals_received: BTreeMap<Vec<String>, u64>,
    pub transitions: BTreeMap<Vec<String>, u64>,
    pub breaches: BTreeMap<Vec<String>, u64>,
    pub time_to_stop: BTreeMap<Vec<String>, HistogramState>,
    /// `topic` -> partition -> next offset: records below it are counted already.
    pub offsets: BTreeMap<String, BTreeMap<i32, i64>>,
    /// The SLA events counted most recently, as id hashes, kept with the totals so that an SLA
    /// event the clock publishes again after the exporter restarted is still recognised.
    pub recent_sla_events: RecentHashes,
}

/// How many recently counted SLA event ids the snapshot keeps (8 bytes each).
pub const DURABLE_SLA_WINDOW: usize = 30_000;

/// A bounded window of 64-bit id hashes, oldest forgotten first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecentHashes {
    set: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

impl RecentHashes {
    fn hash(id: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(id.as_bytes())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(&Self::hash(id))
    }

    /// Remembers `id`, forgetting the oldest beyond [`DURABLE_SLA_WINDOW`].
    pub fn insert(&mut self, id: &str) {
        let h = Self::hash(id);
        if !self.set.insert(h) {
            return;
        }
        self.order.push_back(h);
        while self.order.len() > DURABLE_SLA_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn encode(&self) -> String {
        use base64::Engine as _;
        let bytes: Vec<u8> = self.order.iter().flat_map(|h| h.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn decode(text: &str) -> Self {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap_or_default();
        let order: std::collections::VecDeque<u64> = bytes
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect();
        Self {
            set: order.iter().copied().collect(),
            order,
        }
    }
}

impl Serialize for RecentHashes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for RecentHashes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::decode(&String::deserialize(d)?))
    }
}

/// The JSON form of [`Totals`] in the `exporter-state` topic: maps keyed by label lists become
/// lists of entries, since JSON keys are strings.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    referrals_received: Vec<(Vec<String>, u64)>,
    transitions: Vec<(Vec<String>, u64)>,
    breaches: Vec<(Vec<String>, u64)>,
    time_to_stop: Vec<(Vec<String>, HistogramState)>,
    offsets: BTreeMap<String, BTreeMap<i32, i64>>,
    /// Base64 of little-endian u64 hashes; absent in snapshots written before it existed.
    #[serde(default)]
    recent_sla_events: RecentHashes,
}

impl Totals {
    pub fn to_json(&self) -> Vec<u8> {
        let snapshot = Snapshot {
            version: 1,
            referrals_received: self.referrals_received.clone().into_iter().collect(),
            transitions: self.transitions.clone().into_iter().collect(),
            breaches: self.breaches.clone().into_iter().collect(),
            time_to_stop: self.time_to_stop.clone().into_iter().collect(),
            offsets: self.offsets.clone(),
            recent_sla_events: self.recent_sla_events.clone(),
        };
        serde_json::to_vec(&snapshot).unwrap_or_default()
    }

    /// # Errors
    /// When the bytes are not a snapshot this version understands.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let s: Snapshot = serde_json::from_slice(bytes)?;
        Ok(Self {
            referrals_received: s.referrals_received.into_iter().collect(),
            transitions: s.transitions.into_iter().collect(),
            breaches: s.breaches.into_iter().collect(),
            time_to_stop: s.time_to_stop.into_iter().collect(),
            offsets: s.offsets,
            recent_sla_events: s.recent_sla_events,
        })
    }

    /// Whether the record at `offset` of `topic`/`partition` is counted already.
    pub fn counted(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.offsets
            .get(topic)
            .and_then(|p| p.get(&partition))
            .is_some_and(|next| offset < *next)
    }

    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = self
            .offsets
            .entry(topic.to_string())
            .or_default()
            .entry(partition)
            .or_insert(0);
        *next = (*next).max(offset + 1);
    }
}

fn key(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|l| (*l).to_string()).collect()
}

/// The exporter's metrics: [`Totals`] behind a lock, and the bucket bounds of each rule.
#[derive(Clone)]
pub struct TotalsMetrics {
    totals: Arc<Mutex<Totals>>,
    buckets: Arc<HashMap<String, Vec<f64>>>,
    other_buckets: Arc<Vec<f64>>,
}

impl TotalsMetrics {
    /// `buckets`: the time-to-stop bucket bounds per rule id; `other_buckets` for rules not in it.
    pub fn new(buckets: HashMap<String, Vec<f64>>, other_buckets: Vec<f64>) -> Self {
        Self {
            totals: Arc::new(Mutex::new(Totals::default())),
            buckets: Arc::new(buckets),
            other_buckets: Arc::new(other_buckets),
        }
    }

    /// Registers the collector that serves the totals.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(TotalsCollector::new(self.clone())?))
    }

    pub fn lock(&self) -> MutexGuard<'_, Totals> {
        self.totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the totals with restored ones.
    pub fn restore(&self, totals: Totals) {
        *self.lock() = totals;
    }

    pub fn referral_received(&self, force: &str, category: &str, risk: &str) {
        *self
            .lock()
            .referrals_received
            .entry(key(&[force, category, risk]))
            .or_default() += 1;
    }

    /// Adds `n` (0 creates the series at zero) to a transition counter.
    pub fn transition(&self, labels: [&str; 5], n: u64) {
        *self.lock().transitions.entry(key(&labels)).or_default() += n;
    }

    pub fn breach(&self, force: &str, rule: &str, severity: &str) {
        *self
            .lock()
            .breaches
            .entry(key(&[force, rule, severity]))
            .or_default() += 1;
    }

    /// Observes a time to stop; `None` only creates the series.
    pub fn time_to_stop(
        &self,
        rule: &str,
        force: &str,
        category: &str,
        risk: &str,
        secs: Option<f64>,
    ) {
        let bounds = self.buckets.get(rule).unwrap_or(&self.other_buckets);
        let mut totals = self.lock();
        let series = totals
            .time_to_stop
            .entry(key(&[rule, force, category, risk]))
            .or_insert_with(|| HistogramState::new(bounds));
        if series.bounds != *bounds {
            // The rule's target changed since the snapshot: its old buckets cannot take new
            // observations, so the series starts again (Prometheus sees a counter reset).
            *series = HistogramState::new(bounds);
        }
        if let Some(secs) = secs {
            series.observe(secs);
        }
    }
}

struct TotalsCollector {
    metrics: TotalsMetrics,
    descs: Vec<Desc>,
}

impl TotalsCollector {
    fn new(metrics: TotalsMetrics) -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| (*l).to_string()).collect(),
                HashMap::new(),
            )
        };
        Ok(Self {
            metrics,
            descs: vec![
                desc(REFERRALS_RECEIVED, REFERRALS_HELP, &REFERRALS_LABELS)?,
                desc(TRANSITIONS, TRANSITIONS_HELP, &TRANSITIONS_LABELS)?,
                desc(BREACHES, BREACHES_HELP, &BREACHES_LABELS)?,
                desc(TIME_TO_STOP, TIME_TO_STOP_HELP, &TIME_TO_STOP_LABELS)?,
            ],
        })
    }
}

const REFERRALS_HELP: &str =
    "Child-protection referrals received, by force, category and risk grade.";
const TRANSITIONS_HELP: &str = "SLA clock transitions (started, warning, breached, met, met_late, cancelled, corrected, paused, resumed), by force, rule, category and risk.";
const BREACHES_HELP: &str = "SLA clocks that passed their deadline, by force, rule and severity.";
const TIME_TO_STOP_HELP: &str = "Time from clock start to the stop event (met or met late), in event time, minus pauses. Buckets sit at the rule's targets and their multiples.";

fn labels(names: &[&str], values: &[String]) -> Vec<LabelPair> {
    let mut pairs: Vec<LabelPair> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut p = LabelPair::default();
            p.set_name((*n).to_string());
            p.set_value(v.clone());
            p
        })
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    pairs
}

fn counter_family(
    name: &str,
    help: &str,
    names: &[&str],
    series: &BTreeMap<Vec<String>, u64>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(MetricType::COUNTER);
    family.set_metric(
        series
            .iter()
            .map(|(values, n)| {
                let mut m = Metric::default();
                m.set_label(labels(names, values));
                let mut c = Counter::default();
                c.set_value(*n as f64);
                m.set_counter(c);
                m
            })
            .collect(),
    );
    family
}

impl Collector for TotalsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let totals = self.metrics.lock();
        let mut histograms = MetricFamily::default();
        histograms.set_name(TIME_TO_STOP.to_string());
        histograms.set_help(TIME_TO_STOP_HELP.to_string());
        histograms.set_field_type(MetricType::HISTOGRAM);
        histograms.set_metric(
            totals
                .time_to_stop
                .iter()
                .map(|(values, h)| {
                    let mut cumulative = 0;
                    let buckets = h
                        .bounds
                        .iter()
                        .zip(&h.counts)
                        .map(|(bound, n)| {
                            cumulative += n;
                            let mut b = Bucket::default();
                            b.set_upper_bound(*bound);
                            b.set_cumulative_count(cumulative);
                            b
                        })
                        .collect();
                    let mut hist = Histogram::default();
                    hist.set_bucket(buckets);
                    hist.set_sample_count(h.count());
                    hist.set_sample_sum(h.sum);
                    let mut m = Metric::default();
                    m.set_label(labels(&TIME_TO_STOP_LABELS, values));
                    m.set_histogram(hist);
                    m
                })
                .collect(),
        );
        vec![
            counter_family(
                REFERRALS_RECEIVED,
                REFERRALS_HELP,
                &REFERRALS_LABELS,
                &totals.referrals_received,
            ),
            counter_family(
                TRANSITIONS,
                TRANSITIONS_HELP,
                &TRANSITIONS_LABELS,
                &totals.transitions,
            ),
            counter_family(BREACHES, BREACHES_HELP, &BREACHES_LABELS, &totals.breaches),
            histograms,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> TotalsMetrics {
        TotalsMetrics::new(
            HashMap::from([("victim-contact".to_string(), vec![21_600.0, 86_400.0])]),
            vec![3_600.0],
        )
    }

    #[test]
    fn a_snapshot_restores_every_counter_histogram_and_offset() {
        let m = metrics();
        m.referral_received("f", "grooming", "high");
        m.transition(["f", "victim-contact", "grooming", "high", "met"], 1);
        m.breach("f", "victim-contact", "high");
        m.time_to_stop("victim-contact", "f", "grooming", "high", Some(30_000.0));
        m.time_to_stop("victim-contact", "f", "grooming", "high", Some(100_000.0));
        m.lock().advance("t", 2, 41);
        let json = m.lock().to_json();
        let restored = metrics();
        restored.restore(Totals::from_json(&json).unwrap());
        assert_eq!(*restored.lock(), *m.lock());
        assert!(restored.lock().counted("t", 2, 41));
        assert!(!restored.lock().counted("t", 2, 42));
        assert!(!restored.lock().counted("t", 3, 0));
    }

    #[test]
    fn served_as_counters_and_a_histogram_with_the_rule_buckets() {
        let registry = prometheus::Registry::new();
        let m = metrics();
        m.register(&registry).unwrap();
        m.time_to_stop("victim-contact", "f", "grooming", "high", Some(30_000.0));
        m.time_to_stop("victim-contact", "f", "grooming", "high", Some(100_000.0));
        m.time_to_stop("made-up", "f", "grooming", "high", Some(10.0));
        m.transition(["f", "victim-contact", "grooming", "high", "breached"], 0);
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",risk="high",rule="victim-contact",le="21600"} 0"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",risk="high",rule="victim-contact",le="86400"} 1"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",risk="high",rule="victim-contact",le="+Inf"} 2"#,
            r#"safeclock_sla_time_to_stop_seconds_sum{category="grooming",force="f",risk="high",rule="victim-contact"} 130000"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",risk="high",rule="made-up",le="3600"} 1"#,
            r#"safeclock_sla_transitions_total{category="grooming",force="f",risk="high",rule="victim-contact",transition="breached"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}

#[cfg(test)]
mod durable_window_tests {
    use super::*;

    #[test]
    fn recent_sla_event_ids_survive_the_snapshot_and_stay_bounded() {
        let mut t = Totals::default();
        for i in 0..DURABLE_SLA_WINDOW + 10 {
            t.recent_sla_events.insert(&format!("sla-{i}"));
        }
        assert!(
            !t.recent_sla_events.contains("sla-0"),
            "the oldest are forgotten"
        );
        assert!(t
            .recent_sla_events
            .contains(&format!("sla-{}", DURABLE_SLA_WINDOW + 9)));
        let back = Totals::from_json(&t.to_json()).unwrap();
        assert_eq!(back, t);
        assert!(back
            .recent_sla_events
            .contains(&format!("sla-{}", DURABLE_SLA_WINDOW + 9)));

        // A snapshot from before the window existed still loads, with an empty window.
        let mut old: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("recent_sla_events");
        let back = Totals::from_json(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(!back.recent_sla_events.contains("sla-10"));
    }
}
