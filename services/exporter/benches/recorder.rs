//! Exporter benchmarks, without Kafka, on one core: `cargo bench -p safeclock-exporter --bench
//! recorder`.
//!
//! 1. counting: SLA events/s through the recorder into per-partition totals (id check, label
//!    bounding, counters and histograms), spread over 6 partitions like the default topics;
//! 2. snapshots: the time to write (serialize) and restore (parse) one partition's snapshot with
//!    a full de-duplication window, which bounds how long a hand-over and a take-over take.
//!
//! `SAFECLOCK_BENCH_SLA_EVENTS` sets the number of events (default 1,000,000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use prometheus::Registry;
use safeclock_common::rules::RuleSet;
use safeclock_common::schema::v1::{Severity, SlaEvent, SlaLabels, SlaTransition};
use safeclock_common::schema::ProtoDuration;
use safeclock_exporter::totals::{Input, Totals, DURABLE_ID_WINDOW};
use safeclock_exporter::{metrics, Recorder};

const PARTITIONS: i32 = 6;
const FORCES: [&str; 4] = [
    "nottinghamshire",
    "derbyshire",
    "leicestershire",
    "lincolnshire",
];
const CATEGORIES: [&str; 3] = ["grooming", "neglect", "online_abuse"];
const RISKS: [&str; 3] = ["low", "medium", "high"];
const TRANSITIONS: [SlaTransition; 5] = [
    SlaTransition::Started,
    SlaTransition::Warning,
    SlaTransition::Breached,
    SlaTransition::Met,
    SlaTransition::MetLate,
];

fn event(i: usize, rules: &[String]) -> SlaEvent {
    SlaEvent {
        sla_event_id: format!("{i:016x}-sla"),
        referral_id: format!("R-{}", i / 5),
        rule_id: rules[i % rules.len()].clone(),
        transition: TRANSITIONS[i % TRANSITIONS.len()] as i32,
        severity: Severity::High as i32,
        labels: Some(SlaLabels {
            force_id: FORCES[i % FORCES.len()].into(),
            category: CATEGORIES[i % CATEGORIES.len()].into(),
            risk: RISKS[i % RISKS.len()].into(),
            ..SlaLabels::default()
        }),
        elapsed: Some(ProtoDuration {
            seconds: (i % 200_000) as i64,
            nanos: 0,
        }),
        ..SlaEvent::default()
    }
}

fn main() {
    let n: usize = std::env::var("SAFECLOCK_BENCH_SLA_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pack = RuleSet::default_pack().unwrap();
    let rules: Vec<String> = pack.rules.iter().map(|r| r.id.clone()).collect();
    let forces: Vec<String> = FORCES.iter().map(|f| (*f).to_string()).collect();
    let registry = Registry::new();
    let metrics = metrics::register(&registry, &pack.rules).unwrap();
    let recorder = Recorder::new(metrics.clone(), &forces, &rules);
    let events: Vec<SlaEvent> = (0..n).map(|i| event(i, &rules)).collect();

    // 1. Counting, as the service loop does it: lock, find the partition's totals, record.
    for p in 0..PARTITIONS {
        metrics
            .lock()
            .insert((Input::SlaEvents, p), Totals::default());
    }
    let started = Instant::now();
    for (i, e) in events.iter().enumerate() {
        let shard = (Input::SlaEvents, (i as i32) % PARTITIONS);
        let mut owned = metrics.lock();
        let totals = owned.get_mut(&shard).unwrap();
        recorder.sla_event(totals, e);
        totals.advance("sla", shard.1, i as i64);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "exporter counting: {n} SLA events in {secs:.2} s = {:.0} events/s (6 partitions, {} rules)",
        n as f64 / secs,
        rules.len()
    );
    let series: usize = metrics.lock().values().map(|t| t.transitions.len()).sum();
    let started = Instant::now();
    let scraped = registry.gather();
    println!(
        "exporter scrape: {} families, {series} transition series, gathered in {:.1} ms",
        scraped.len(),
        started.elapsed().as_secs_f64() * 1e3
    );

    // 2. One partition's snapshot with a full window.
    let shard = metrics.lock().remove(&(Input::SlaEvents, 0)).unwrap();
    assert!(n / 6 < DURABLE_ID_WINDOW || shard.recent_ids.len() == DURABLE_ID_WINDOW);
    let rounds = 20;
    let started = Instant::now();
    let mut bytes = Vec::new();
    for _ in 0..rounds {
        bytes = shard.to_json();
    }
    let write_ms = started.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
    let started = Instant::now();
    for _ in 0..rounds {
        let back = Totals::from_json(&bytes).unwrap();
        assert_eq!(back.recent_ids.len(), shard.recent_ids.len());
    }
    let read_ms = started.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
    println!(
        "exporter snapshot of one partition ({} ids in its window, {} transition series): {} bytes, written in {write_ms:.2} ms, restored in {read_ms:.2} ms",
        shard.recent_ids.len(),
        shard.transitions.len(),
        bytes.len()
    );
}
