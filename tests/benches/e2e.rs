//! End-to-end benchmark through the real broker process: referral events/s through the clock
//! service (consume, engine, SLA events + outcomes + changelog produced and acknowledged, offsets
//! committed), beside the broker's raw consume rate for the same records, measured in one run.
//!
//! Two inputs, each measured against the raw consume rate of its own records:
//! - `received`: one `referral_received` per referral, the worst case for output volume: under
//!   the default pack it starts about ten clocks, so each input record becomes ten SLA events,
//!   ten outcomes and a state record;
//! - `lifecycle`: whole referrals of eight events each (received, decision, allocated, victim
//!   contacted, risk assessed, device seized, device examined, closed), the shape of real input:
//!   most events stop, re-grade or cancel clocks.
//!
//! It also prints the output records and bytes per input record, and the broker's raw produce
//! rate, so a shortfall can be read as what it is.
//!
//! Run with `bash scripts/bench.sh` (starts an Apache Kafka node on a free loopback port), or
//! against any broker: `SAFECLOCK_TEST_BROKERS=host:port cargo bench -p safeclock-tests --bench
//! e2e`. `SAFECLOCK_BENCH_EVENTS` sets the number of records (default 20,000);
//! `SAFECLOCK_BENCH_INPUT=received|lifecycle` runs one input only.
//!
//! Each input runs in two modes: `default` (at-least-once: outputs acknowledged, then offsets
//! stored) and `transactional` (`clock.transactional_id` set: each batch's outputs, states and
//! input offsets in one Kafka transaction), and the ratio of the two rates is printed.
//! `SAFECLOCK_BENCH_MODE=default|transactional` runs one mode only.
//!
//! To see where the time goes: `SAFECLOCK_BENCH_MAX_BATCH` (the clock's batch, default 1000) and
//! `SAFECLOCK_BENCH_PRODUCER` (producer properties, `key=value,...`, e.g. `linger.ms=20` or
//! `compression.type=none`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use safeclock::app::{self, Service};
use safeclock_common::kafka::{self, Topic};
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::isolated_settings;
use safeclock_tests::scenario::committed_offsets;

/// The input records of one run: (key, JSON value).
fn input(kind: &str, n: usize) -> Vec<(String, String)> {
    let event = |referral: &str, i: usize, minutes: usize, body: &str| {
        (
            referral.to_string(),
            format!(
                r#"{{"eventId":"{referral}-e{i}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"2026-11-29T10:{minutes:02}:00Z",{body}}}"#
            ),
        )
    };
    let received = r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","area":"city","team":"mash"}"#;
    match kind {
        "received" => (0..n)
            .map(|i| event(&format!("R-BENCH-{i:07}"), 1, 0, received))
            .collect(),
        _ => {
            let steps = [
                received,
                r#""referralDecisionMade":{"decision":"section-47","referrerAcknowledged":true}"#,
                r#""allocated":{"team":"pvp","specialistTrained":true}"#,
                r#""victimContacted":{}"#,
                r#""riskAssessed":{"risk":"RISK_GRADE_VERY_HIGH"}"#,
                r#""deviceSeized":{"deviceRef":"DEV-1"}"#,
                r#""deviceExamined":{"deviceRef":"DEV-1"}"#,
                r#""referralClosed":{"outcome":"charged"}"#,
            ];
            (0..n.div_ceil(steps.len()))
                .flat_map(|r| {
                    let referral = format!("R-LIFE-{r:07}");
                    steps
                        .iter()
                        .enumerate()
                        .map(move |(i, body)| event(&referral, i + 1, i, body))
                        .collect::<Vec<_>>()
                })
                .take(n)
                .collect()
        }
    }
}

/// Runs input `kind` (`n` records) through the clock, transactional or not; returns the clock's
/// end-to-end rate (events/s).
async fn run(brokers: &str, kind: &str, n: usize, transactional: bool) -> f64 {
    let mut settings = isolated_settings(brokers);
    if transactional {
        settings.clock.transactional_id = Some(format!("{}-1", settings.clock.group_id));
    }
    settings.kafka.create_topics = true;
    settings.clock.tick_interval_ms = 1000;
    settings.clock.max_batch = std::env::var("SAFECLOCK_BENCH_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // For profiling where the time goes: producer properties for the clock (and the loader),
    safeclock_tests::apply_bench_producer_properties(&mut settings);
    let settings = Arc::new(settings);
    kafka::ensure_topics(&settings, &Topic::ALL).await.unwrap();
    let input_topic = settings.topic(Topic::ReferralEvents);
    let records = input(kind, n);
    let input_bytes: usize = records.iter().map(|(k, v)| k.len() + v.len()).sum();

    // Load the input topic: the broker's raw produce rate for these records.
    let producer = kafka::producer(&settings).unwrap();
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for (key, value) in &records {
        let record = FutureRecord::<str, [u8]>::to(&input_topic)
            .key(key)
            .payload(value.as_bytes());
        deliveries.push(kafka::enqueue(&producer, record).await.unwrap());
    }
    kafka::await_deliveries(deliveries).await.unwrap();
    let produce_rate = n as f64 / t.elapsed().as_secs_f64();

    // The broker's raw consume rate for those records: one consumer assigned every partition
    // (no group to join), timed from the assignment to the last record. (Timing from the first
    // record instead counts what librdkafka had prefetched meanwhile as free.)
    let raw: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-raw", settings.clock.group_id))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..settings.kafka.partitions {
        assignment
            .add_partition_offset(&input_topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    let t = Instant::now();
    raw.assign(&assignment).unwrap();
    let mut got = 0usize;
    while got < n {
        let _ = tokio::time::timeout(Duration::from_secs(60), raw.recv())
            .await
            .expect("raw consumer stalled")
            .unwrap();
        got += 1;
    }
    let raw_rate = n as f64 / t.elapsed().as_secs_f64();
    drop(raw);

    // The clock service on the same records.
    let shutdown = CancellationToken::new();
    let running = app::start(
        settings.clone(),
        Service::Clock,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let readiness = running.readiness.clone();
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let group = settings.clock.group_id.clone();
    let partitions = settings.kafka.partitions;
    loop {
        let (b, g, i) = (brokers.to_string(), group.clone(), input_topic.clone());
        let done: i64 = tokio::task::spawn_blocking(move || {
            committed_offsets(&b, &g, &i, partitions)
                .into_iter()
                .filter(|o| *o > 0)
                .sum()
        })
        .await
        .unwrap();
        if done >= n as i64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "clock did not finish within 10 minutes ({done}/{n})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e2e_rate = n as f64 / t.elapsed().as_secs_f64();
    shutdown.cancel();
    running.wait().await.unwrap();

    // What the clock wrote for them.
    let (outputs, output_bytes) = [Topic::SlaEvents, Topic::SlaOutcomes, Topic::ClockState]
        .iter()
        .map(|t| safeclock_tests::topic_volume(brokers, &settings.topic(*t), partitions))
        .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2));

    let mode = if transactional {
        "transactional"
    } else {
        "default"
    };
    println!(
        "-- input `{kind}`, mode {mode}: {n} referral events, {partitions} partitions, broker {brokers}, max_batch {}, producer overrides {:?}",
        settings.clock.max_batch, settings.kafka.producer_properties
    );
    println!(
        "  raw produce (idempotent, acks=all): {produce_rate:.0} records/s; raw consume (one consumer): {raw_rate:.0} records/s"
    );
    println!(
        "  clock end to end (consume -> engine -> SLA events + outcomes + changelog acknowledged -> offsets committed): {e2e_rate:.0} events/s = {:.2} x raw consume",
        e2e_rate / raw_rate
    );
    println!(
        "  outputs: {:.1} records and {:.0} bytes per input record ({:.0} bytes in), {:.0} output records/s",
        outputs as f64 / n as f64,
        output_bytes as f64 / n as f64,
        input_bytes as f64 / n as f64,
        outputs as f64 * e2e_rate / n as f64
    );
    e2e_rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(brokers) = std::env::var("SAFECLOCK_TEST_BROKERS") else {
        eprintln!("SAFECLOCK_TEST_BROKERS is not set: run scripts/bench.sh");
        std::process::exit(2);
    };
    let n: usize = std::env::var("SAFECLOCK_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let only = std::env::var("SAFECLOCK_BENCH_INPUT").ok();
    let mode = std::env::var("SAFECLOCK_BENCH_MODE").ok();
    for kind in ["received", "lifecycle"] {
        if only.as_deref().is_some_and(|o| o != kind) {
            continue;
        }
        let mut rates = Vec::new();
        for (name, transactional) in [("default", false), ("transactional", true)] {
            if mode.as_deref().is_none_or(|m| m == name) {
                rates.push(run(&brokers, kind, n, transactional).await);
            }
        }
        if let [default, transactional] = rates[..] {
            println!(
                "  input `{kind}`: transactional {transactional:.0} events/s against default {default:.0} events/s = {:.2} x",
                transactional / default
            );
        }
    }
}
