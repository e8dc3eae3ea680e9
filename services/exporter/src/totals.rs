//! What the exporter has counted, as durable state, and the Prometheus collector that serves it.
//!
//! Counters that start again at zero whenever the exporter restarts make "breaches this month"
//! wrong for anyone who reads raw values, and a restart in the middle of a batch could count
//! records twice. So the exporter keeps its totals itself ([`Totals`]), together with the input
//! position they reflect, and snapshots both to the compacted `exporter-state` topic. On start it
//! restores the snapshot and skips records at offsets the snapshot already counted: counters
//! continue from where they were, and each record is counted once (see `crate::run`).
//!
//! The totals are kept per input partition ([`Shard`]) and served with a `partition` label, so
//! several exporters can share the input: a partition's series move with the partition, at the
//! value they had, to the instance that takes it over. Summing over `partition` and `instance`
//! gives the whole, and no series ever goes down (which Prometheus would read as a reset).
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
pub const PARTITIONS: &str = "safeclock_exporter_partitions";

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

/// The input topics whose records the exporter counts; each metric family comes from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Input {
    /// `referral-events`: `safeclock_referrals_received_total`.
    ReferralEvents,
    /// `sla-events`: transitions, breaches and time to stop.
    SlaEvents,
}

/// One input partition: the unit of the totals that moves between instances.
pub type Shard = (Input, i32);

/// Everything counted from one input partition, keyed by label values, and the next offset to
/// read (`offsets` holds that partition only; older snapshots held every partition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub referrals_received: BTreeMap<Vec<String>, u64>,
    pub transitions: BTreeMap<Vec<String>, u64>,
    pub breaches: BTreeMap<Vec<String>, u64>,
    pub time_to_stop: BTreeMap<Vec<String>, HistogramState>,
    /// `topic` -> partition -> next offset: records below it are counted already.
    pub offsets: BTreeMap<String, BTreeMap<i32, i64>>,
    /// The ids counted most recently from this partition (SLA event ids or referral event ids),
    /// as hashes, kept with the totals so that a record published again (the clock re-publishes
    /// after a crash) is recognised by whichever instance owns the partition next.
    pub recent_ids: RecentHashes,
}

/// How many recently counted ids the snapshot of one partition keeps (8 bytes each). A clock
/// re-publishes at most what it published to the partition since its last commit.
pub const DURABLE_ID_WINDOW: usize = 20_000;

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

    /// How many ids it holds (at most [`DURABLE_ID_WINDOW`]).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Remembers `id`, forgetting the oldest beyond [`DURABLE_ID_WINDOW`].
    pub fn insert(&mut self, id: &str) {
        let h = Self::hash(id);
        if !self.set.insert(h) {
            return;
        }
        self.order.push_back(h);
        while self.order.len() > DURABLE_ID_WINDOW {
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
    /// Base64 of little-endian u64 hashes; absent in snapshots written before it existed, and
    /// named `recent_sla_events` in those of one snapshot for all partitions.
    #[serde(default, alias = "recent_sla_events")]
    recent_ids: RecentHashes,
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
            recent_ids: self.recent_ids.clone(),
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
            recent_ids: s.recent_ids,
        })
    }

    /// The next offset of `topic`/`partition` to count, if anything was counted from it.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.offsets.get(topic)?.get(&partition).copied()
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

    /// One partition's part of a snapshot written for all partitions at once (before totals
    /// were kept per partition): its offset, the recent ids, and, for partition 0 only, the
    /// counts of `input`'s metrics. Counts cannot be split by partition; what is read is their
    /// sum over partitions, which this keeps.
    pub fn legacy_share(&self, input: Input, topic: &str, partition: i32) -> Totals {
        let mut share = Totals {
            recent_ids: self.recent_ids.clone(),
            ..Totals::default()
        };
        if let Some(next) = self.offsets.get(topic).and_then(|p| p.get(&partition)) {
            share
                .offsets
                .entry(topic.to_string())
                .or_default()
                .insert(partition, *next);
        }
        if partition == 0 {
            match input {
                Input::ReferralEvents => {
                    share.referrals_received = self.referrals_received.clone();
                }
                Input::SlaEvents => {
                    share.transitions = self.transitions.clone();
                    share.breaches = self.breaches.clone();
                    share.time_to_stop = self.time_to_stop.clone();
                }
            }
        }
        share
    }
}

fn key(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|l| (*l).to_string()).collect()
}

impl Totals {
    pub fn referral_received(&mut self, force: &str, category: &str, risk: &str) {
        *self
            .referrals_received
            .entry(key(&[force, category, risk]))
            .or_default() += 1;
    }

    /// Adds `n` (0 creates the series at zero) to a transition counter.
    pub fn transition(&mut self, labels: [&str; 5], n: u64) {
        *self.transitions.entry(key(&labels)).or_default() += n;
    }

    /// Adds `n` (0 creates the series at zero) to a breach counter.
    pub fn breaches(&mut self, force: &str, rule: &str, severity: &str, n: u64) {
        *self
            .breaches
            .entry(key(&[force, rule, severity]))
            .or_default() += n;
    }

    /// Observes a time to stop in a histogram with `bounds`; `None` only creates the series.
    pub fn time_to_stop(&mut self, bounds: &[f64], labels: [&str; 4], secs: Option<f64>) {
        let series = self
            .time_to_stop
            .entry(key(&labels))
            .or_insert_with(|| HistogramState::new(bounds));
        if series.bounds != bounds {
            // The rule's target changed since the snapshot: its old buckets cannot take new
            // observations, so the series starts again (Prometheus sees a counter reset).
            *series = HistogramState::new(bounds);
        }
        if let Some(secs) = secs {
            series.observe(secs);
        }
    }
}

/// The exporter's metrics: the [`Totals`] of every input partition this instance owns, behind a
/// lock, and the bucket bounds of each rule.
#[derive(Clone)]
pub struct TotalsMetrics {
    shards: Arc<Mutex<BTreeMap<Shard, Totals>>>,
    buckets: Arc<HashMap<String, Vec<f64>>>,
    other_buckets: Arc<Vec<f64>>,
}

impl TotalsMetrics {
    /// `buckets`: the time-to-stop bucket bounds per rule id; `other_buckets` for rules not in it.
    pub fn new(buckets: HashMap<String, Vec<f64>>, other_buckets: Vec<f64>) -> Self {
        Self {
            shards: Arc::new(Mutex::new(BTreeMap::new())),
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

    /// The totals of the partitions this instance owns (and serves).
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<Shard, Totals>> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The time-to-stop bucket bounds of `rule`.
    pub fn bounds(&self, rule: &str) -> &[f64] {
        self.buckets.get(rule).unwrap_or(&self.other_buckets)
    }
}

struct TotalsCollector {
    metrics: TotalsMetrics,
    descs: Vec<Desc>,
}

/// The label every exporter series has on top of its own: the input partition it counts.
const PARTITION_LABEL: &str = "partition";

impl TotalsCollector {
    fn new(metrics: TotalsMetrics) -> prometheus::Result<Self> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels
                    .iter()
                    .chain([&PARTITION_LABEL])
                    .map(|l| (*l).to_string())
                    .collect(),
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
                Desc::new(
                    PARTITIONS.to_string(),
                    PARTITIONS_HELP.to_string(),
                    vec!["topic".to_string()],
                    HashMap::new(),
                )?,
            ],
        })
    }
}

const REFERRALS_HELP: &str =
    "Child-protection referrals received, by force, category and risk grade (and input partition: sum over it).";
const TRANSITIONS_HELP: &str = "SLA clock transitions (started, warning, breached, met, met_late, cancelled, corrected, paused, resumed), by force, rule, category and risk (and input partition: sum over it).";
const BREACHES_HELP: &str = "SLA clocks that passed their deadline, by force, rule and severity (and input partition: sum over it).";
const TIME_TO_STOP_HELP: &str = "Time from clock start to the stop event (met or met late), in event time, minus pauses. Buckets sit at the rule's targets and their multiples. By input partition too: sum over it.";

const PARTITIONS_HELP: &str = "Input partitions this exporter instance holds (and whose series it serves), by input: referral-events or sla-events. Summed over instances it is the partition count.";

fn labels(names: &[&str], values: &[String], partition: &str) -> Vec<LabelPair> {
    let pair = |name: &str, value: &str| {
        let mut p = LabelPair::default();
        p.set_name(name.to_string());
        p.set_value(value.to_string());
        p
    };
    let mut pairs: Vec<LabelPair> = names
        .iter()
        .zip(values)
        .map(|(n, v)| pair(n, v))
        .chain([pair(PARTITION_LABEL, partition)])
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    pairs
}

/// A family of metrics with one series per label set per partition.
fn family<'a, T: 'a>(
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl Iterator<Item = (i32, &'a BTreeMap<Vec<String>, T>)>,
    names: &[&str],
    render: impl Fn(&T, &mut Metric),
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(
        series
            .flat_map(|(partition, map)| {
                let partition = partition.to_string();
                map.iter()
                    .map(|(values, value)| {
                        let mut m = Metric::default();
                        m.set_label(labels(names, values, &partition));
                        render(value, &mut m);
                        m
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
    );
    family
}

fn counter(n: &u64, m: &mut Metric) {
    let mut c = Counter::default();
    c.set_value(*n as f64);
    m.set_counter(c);
}

fn histogram(h: &HistogramState, m: &mut Metric) {
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
    m.set_histogram(hist);
}

/// `safeclock_exporter_partitions{topic}`, counted from the shards held (both inputs always
/// have a series, 0 when none is held).
fn partitions_family(shards: &BTreeMap<Shard, Totals>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(PARTITIONS.to_string());
    family.set_help(PARTITIONS_HELP.to_string());
    family.set_field_type(MetricType::GAUGE);
    family.set_metric(
        [
            (Input::ReferralEvents, "referral-events"),
            (Input::SlaEvents, "sla-events"),
        ]
        .into_iter()
        .map(|(input, topic)| {
            let held = shards.keys().filter(|(i, _)| *i == input).count();
            let mut label = LabelPair::default();
            label.set_name("topic".to_string());
            label.set_value(topic.to_string());
            let mut gauge = prometheus::proto::Gauge::default();
            gauge.set_value(held as f64);
            let mut m = Metric::default();
            m.set_label(vec![label]);
            m.set_gauge(gauge);
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
        let shards = self.metrics.lock();
        let of = |input: Input| {
            shards
                .iter()
                .filter(move |((i, _), _)| *i == input)
                .map(|((_, p), t)| (*p, t))
        };
        vec![
            family(
                REFERRALS_RECEIVED,
                REFERRALS_HELP,
                MetricType::COUNTER,
                of(Input::ReferralEvents).map(|(p, t)| (p, &t.referrals_received)),
                &REFERRALS_LABELS,
                counter,
            ),
            family(
                TRANSITIONS,
                TRANSITIONS_HELP,
                MetricType::COUNTER,
                of(Input::SlaEvents).map(|(p, t)| (p, &t.transitions)),
                &TRANSITIONS_LABELS,
                counter,
            ),
            family(
                BREACHES,
                BREACHES_HELP,
                MetricType::COUNTER,
                of(Input::SlaEvents).map(|(p, t)| (p, &t.breaches)),
                &BREACHES_LABELS,
                counter,
            ),
            family(
                TIME_TO_STOP,
                TIME_TO_STOP_HELP,
                MetricType::HISTOGRAM,
                of(Input::SlaEvents).map(|(p, t)| (p, &t.time_to_stop)),
                &TIME_TO_STOP_LABELS,
                histogram,
            ),
            partitions_family(&shards),
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

    const VICTIM: [&str; 4] = ["victim-contact", "f", "grooming", "high"];

    #[test]
    fn a_snapshot_restores_every_counter_histogram_and_offset() {
        let m = metrics();
        let mut t = Totals::default();
        t.referral_received("f", "grooming", "high");
        t.transition(["f", "victim-contact", "grooming", "high", "met"], 1);
        t.breaches("f", "victim-contact", "high", 1);
        t.time_to_stop(m.bounds("victim-contact"), VICTIM, Some(30_000.0));
        t.time_to_stop(m.bounds("victim-contact"), VICTIM, Some(100_000.0));
        t.advance("t", 2, 41);
        let restored = Totals::from_json(&t.to_json()).unwrap();
        assert_eq!(restored, t);
        assert!(restored.counted("t", 2, 41));
        assert!(!restored.counted("t", 2, 42));
        assert!(!restored.counted("t", 3, 0));
    }

    fn scrape(registry: &prometheus::Registry) -> String {
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn served_as_counters_and_a_histogram_with_the_rule_buckets() {
        let registry = prometheus::Registry::new();
        let m = metrics();
        m.register(&registry).unwrap();
        let mut t = Totals::default();
        t.time_to_stop(m.bounds("victim-contact"), VICTIM, Some(30_000.0));
        t.time_to_stop(m.bounds("victim-contact"), VICTIM, Some(100_000.0));
        t.time_to_stop(
            m.bounds("made-up"),
            ["made-up", "f", "grooming", "high"],
            Some(10.0),
        );
        t.transition(["f", "victim-contact", "grooming", "high", "breached"], 0);
        m.lock().insert((Input::SlaEvents, 4), t);
        let text = scrape(&registry);
        for line in [
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",partition="4",risk="high",rule="victim-contact",le="21600"} 0"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",partition="4",risk="high",rule="victim-contact",le="86400"} 1"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",partition="4",risk="high",rule="victim-contact",le="+Inf"} 2"#,
            r#"safeclock_sla_time_to_stop_seconds_sum{category="grooming",force="f",partition="4",risk="high",rule="victim-contact"} 130000"#,
            r#"safeclock_sla_time_to_stop_seconds_bucket{category="grooming",force="f",partition="4",risk="high",rule="made-up",le="3600"} 1"#,
            r#"safeclock_sla_transitions_total{category="grooming",force="f",partition="4",risk="high",rule="victim-contact",transition="breached"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn a_snapshot_of_all_partitions_is_shared_out_without_changing_the_sums() {
        let m = metrics();
        let mut all = Totals::default();
        all.referral_received("f", "grooming", "high");
        all.breaches("f", "victim-contact", "high", 1);
        all.time_to_stop(m.bounds("victim-contact"), VICTIM, Some(60.0));
        all.recent_ids.insert("sla-1");
        all.advance("referrals", 0, 9);
        all.advance("referrals", 3, 4);
        all.advance("sla", 3, 7);
        let sla0 = all.legacy_share(Input::SlaEvents, "sla", 0);
        let sla3 = all.legacy_share(Input::SlaEvents, "sla", 3);
        let ref3 = all.legacy_share(Input::ReferralEvents, "referrals", 3);
        let ref0 = all.legacy_share(Input::ReferralEvents, "referrals", 0);
        assert_eq!(sla0.breaches, all.breaches);
        assert_eq!(sla0.time_to_stop, all.time_to_stop);
        assert!(sla0.referrals_received.is_empty() && !sla0.counted("sla", 0, 0));
        assert!(
            sla3.breaches.is_empty() && sla3.counted("sla", 3, 7) && !sla3.counted("sla", 3, 8)
        );
        assert!(sla3.recent_ids.contains("sla-1"));
        assert_eq!(ref0.referrals_received, all.referrals_received);
        assert!(ref0.counted("referrals", 0, 8) && ref0.breaches.is_empty());
        assert!(ref3.referrals_received.is_empty() && ref3.counted("referrals", 3, 3));
    }

    #[test]
    fn each_partition_is_served_as_its_own_series_and_only_while_owned() {
        let registry = prometheus::Registry::new();
        let m = metrics();
        m.register(&registry).unwrap();
        for (p, n) in [(0, 3), (5, 4)] {
            let mut referrals = Totals::default();
            let mut sla = Totals::default();
            for _ in 0..n {
                referrals.referral_received("f", "grooming", "high");
                sla.breaches("f", "victim-contact", "high", 1);
            }
            m.lock().insert((Input::ReferralEvents, p), referrals);
            m.lock().insert((Input::SlaEvents, p), sla);
        }
        let text = scrape(&registry);
        for line in [
            r#"safeclock_referrals_received_total{category="grooming",force="f",partition="0",risk="high"} 3"#,
            r#"safeclock_referrals_received_total{category="grooming",force="f",partition="5",risk="high"} 4"#,
            r#"safeclock_sla_breaches_total{force="f",partition="0",rule="victim-contact",severity="high"} 3"#,
            r#"safeclock_sla_breaches_total{force="f",partition="5",rule="victim-contact",severity="high"} 4"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains(r#"safeclock_exporter_partitions{topic="sla-events"} 2"#));
        // Handed over: the partition's series leave this instance (its new owner serves them).
        m.lock().remove(&(Input::SlaEvents, 5));
        let text = scrape(&registry);
        assert!(text.contains(r#"safeclock_exporter_partitions{topic="sla-events"} 1"#));
        assert!(text.contains(r#"safeclock_exporter_partitions{topic="referral-events"} 2"#));
        assert!(!text.contains(r#"partition="5",rule="#), "{text}");
        assert!(
            text.contains(r#"force="f",partition="5",risk="high"} 4"#),
            "{text}"
        );
    }
}

#[cfg(test)]
mod durable_window_tests {
    use super::*;

    #[test]
    fn recent_sla_event_ids_survive_the_snapshot_and_stay_bounded() {
        let mut t = Totals::default();
        for i in 0..DURABLE_ID_WINDOW + 10 {
            t.recent_ids.insert(&format!("sla-{i}"));
        }
        assert!(!t.recent_ids.contains("sla-0"), "the oldest are forgotten");
        assert!(t
            .recent_ids
            .contains(&format!("sla-{}", DURABLE_ID_WINDOW + 9)));
        let back = Totals::from_json(&t.to_json()).unwrap();
        assert_eq!(back, t);
        assert!(back
            .recent_ids
            .contains(&format!("sla-{}", DURABLE_ID_WINDOW + 9)));

        // A snapshot from before the window existed still loads, with an empty window.
        let mut old: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
        let window = old.as_object_mut().unwrap().remove("recent_ids").unwrap();
        let back = Totals::from_json(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(!back.recent_ids.contains("sla-10"));
        // One written under the old name still loads it.
        old.as_object_mut()
            .unwrap()
            .insert("recent_sla_events".into(), window);
        let back = Totals::from_json(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(back.recent_ids.contains("sla-10"));
    }
}
