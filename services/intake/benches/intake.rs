//! Intake benchmark on the real broker process: accepted events/s through intake (HTTP, JSON
//! validation, produce, wait for the broker's acknowledgement) beside the broker's raw produce
//! rate for the same records with the same producer settings, measured in one run.
//!
//! Run with `bash scripts/bench.sh` (starts a Kafka node on a free loopback port), or against any broker:
//! `SAFECLOCK_TEST_BROKERS=host:port cargo bench -p safeclock-intake --bench intake`.
//! `SAFECLOCK_BENCH_EVENTS` sets the number of events (default 100,000), `SAFECLOCK_BENCH_CLIENTS`
//! the concurrent HTTP clients (default 16), `SAFECLOCK_BENCH_PRODUCER` producer properties for
//! both measurements (`key=value,...`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus::Registry;
use rdkafka::producer::FutureRecord;
use safeclock_common::config::Secret;
use safeclock_common::kafka::{self, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::Readiness;
use safeclock_common::service::ServiceDeps;
use safeclock_common::shutdown::CancellationToken;
use safeclock_common::time::SystemTime;

/// The allocator of the `safeclock` binary that runs intake in production, for both measurements.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "bench-token-0123456789abcdef";

fn event(prefix: &str, i: usize) -> serde_json::Value {
    let referral = format!("R-{prefix}-{i:07}");
    serde_json::json!({
        "eventId": format!("{referral}-e1"),
        "referralId": referral,
        "forceId": "nottinghamshire",
        "occurredAt": "2026-11-29T10:00:00Z",
        "sourceSystem": "bench",
        "referralReceived": {"category": "CATEGORY_GROOMING", "risk": "RISK_GRADE_HIGH"}
    })
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Posts `n` events as batches of `batch` from `clients` concurrent clients; returns events/s.
async fn through_intake(url: &str, prefix: &str, n: usize, batch: usize, clients: usize) -> f64 {
    // Request bodies are encoded before the clock starts: what the client spends building them
    // is not the intake's.
    let requests: Vec<Vec<u8>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|c| {
            let body = if batch == 1 {
                event(prefix, c[0])
            } else {
                serde_json::Value::from(c.iter().map(|i| event(prefix, *i)).collect::<Vec<_>>())
            };
            serde_json::to_vec(&body).unwrap()
        })
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(requests));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (queue, url) = (queue.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Some(body) = queue.lock().unwrap().pop() else {
                    return;
                };
                let r = http
                    .post(format!("{url}/v1/events"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(brokers) = std::env::var("SAFECLOCK_TEST_BROKERS") else {
        eprintln!("SAFECLOCK_TEST_BROKERS is not set: run scripts/bench.sh");
        std::process::exit(2);
    };
    let n = env_usize("SAFECLOCK_BENCH_EVENTS", 100_000);
    let clients = env_usize("SAFECLOCK_BENCH_CLIENTS", 16);
    let mut settings = safeclock_tests::isolated_settings(&brokers);
    settings.intake.add_client(
        "bench",
        Secret::new(TOKEN),
        safeclock_common::config::IntakeClientGrant::all_forces(),
    );
    settings.intake.delivery_timeout_ms = 30_000;
    // Same producer for both measurements: intake's own (linger 1 ms, lz4, acks=all).
    settings.kafka.producer_properties.clear();
    safeclock_tests::apply_bench_producer_properties(&mut settings);
    let settings = Arc::new(settings);
    kafka::ensure_topics(&settings, &[Topic::ReferralEvents, Topic::DeadLetter])
        .await
        .unwrap();
    let topic = settings.topic(Topic::ReferralEvents);

    // Raw produce: the same canonical records, the same producer settings.
    let producer = safeclock_intake::producer(&settings).unwrap();
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let e = event("RAW", i);
            (
                e["referralId"].as_str().unwrap().to_string(),
                serde_json::to_vec(&e).unwrap(),
            )
        })
        .collect();
    // Warm up (metadata, connection, idempotent producer id) outside the measurement, as the
    // intake's producer is warm by the time its requests are measured.
    let warm = FutureRecord::<str, [u8]>::to(&topic)
        .key("R-WARM")
        .payload(&payloads[0].1);
    kafka::await_deliveries(vec![kafka::enqueue(&producer, warm).await.unwrap()])
        .await
        .unwrap();
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for (key, payload) in &payloads {
        let record = FutureRecord::<str, [u8]>::to(&topic)
            .key(key)
            .payload(payload);
        deliveries.push(kafka::enqueue(&producer, record).await.unwrap());
    }
    kafka::await_deliveries(deliveries).await.unwrap();
    let raw = n as f64 / t.elapsed().as_secs_f64();

    // Intake on a free loopback port, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let registry = Registry::new();
    let deps = ServiceDeps {
        settings: settings.clone(),
        registry: registry.clone(),
        readiness: Readiness::default(),
        time: Arc::new(SystemTime),
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(safeclock_intake::serve(
        listener,
        deps,
        ConsumerMetrics::register(&registry).unwrap(),
        shutdown.clone(),
    ));
    let url = format!("http://{addr}");
    through_intake(&url, "WARM", 100, 100, 1).await;
    eprintln!("phase: batches of 100");
    let batch100 = through_intake(&url, "B100", n, 100, clients).await;
    eprintln!("phase: one event per request");
    let singles = (n / 4).max(1);
    let batch1 = through_intake(&url, "B1", singles, 1, clients).await;
    shutdown.cancel();
    server.await.unwrap().unwrap();

    println!("intake benchmark ({n} events, {clients} concurrent clients, broker {brokers})");
    println!("  broker raw produce (acks=all, idempotent):  {raw:>9.0} events/s");
    println!("  through intake, batches of 100:            {batch100:>9.0} events/s accepted (202 after ack)");
    println!("  through intake, one event per request:     {batch1:>9.0} events/s accepted ({singles} events)");
}
