//! End-to-end benchmark through the real broker process: referral events/s through the clock
//! service (consume, engine, SLA events + outcomes + changelog produced and acknowledged, offsets
//! committed), beside the broker's raw consume rate for the same records, measured in one run.
//!
//! Run with `bash scripts/bench.sh` (starts tansu on a free loopback port), or against any broker:
//! `SAFECLOCK_TEST_BROKERS=host:port cargo bench -p safeclock-tests --bench e2e`.
//! `SAFECLOCK_BENCH_EVENTS` sets the number of records (default 20,000).
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
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    settings.clock.tick_interval_ms = 1000;
    settings.clock.max_batch = 1000;
    let settings = Arc::new(settings);
    kafka::ensure_topics(&settings, &Topic::ALL).await.unwrap();
    let input = settings.topic(Topic::ReferralEvents);

    // Load the input topic.
    let producer = kafka::producer(&settings).unwrap();
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        let referral = format!("R-BENCH-{i:07}");
        let json = format!(
            r#"{{"eventId":"{referral}-e1","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"2026-11-29T10:00:00Z","referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}}}}"#
        );
        let record = FutureRecord::<str, [u8]>::to(&input)
            .key(&referral)
            .payload(json.as_bytes());
        deliveries.push(kafka::enqueue(&producer, record).await.unwrap());
    }
    kafka::await_deliveries(deliveries).await.unwrap();
    let produce_rate = n as f64 / t.elapsed().as_secs_f64();

    // The broker's raw consume rate for those records.
    let raw: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{}-raw", settings.clock.group_id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    raw.subscribe(&[&input]).unwrap();
    let mut first = None;
    let mut got = 0usize;
    while got < n {
        let _ = tokio::time::timeout(Duration::from_secs(60), raw.recv())
            .await
            .expect("raw consumer stalled")
            .unwrap();
        first.get_or_insert_with(Instant::now);
        got += 1;
    }
    let raw_rate = n as f64 / first.unwrap().elapsed().as_secs_f64();
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
    let brokers2 = brokers.clone();
    let group = settings.clock.group_id.clone();
    let partitions = settings.kafka.partitions;
    loop {
        let (b, g, i) = (brokers2.clone(), group.clone(), input.clone());
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e2e_rate = n as f64 / t.elapsed().as_secs_f64();
    shutdown.cancel();
    running.wait().await.unwrap();

    println!("broker: {brokers}; {n} referral events, {partitions} partitions");
    println!("produce (idempotent, acks=all): {produce_rate:.0} records/s");
    println!("raw consume (same records, one consumer): {raw_rate:.0} records/s");
    println!(
        "clock end to end (consume -> engine -> SLA events + outcomes + changelog acknowledged -> offsets committed): {e2e_rate:.0} events/s ({:.0} % of raw consume)",
        100.0 * e2e_rate / raw_rate
    );
}
