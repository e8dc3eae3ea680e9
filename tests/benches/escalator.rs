//! Escalator benchmark through the real broker process: SLA breach events produced to
//! `sla-events`, consumed by the escalator, state written to the changelog and acknowledged,
//! offsets stored, then delivered to a local webhook. Measures what a page costs end to end:
//! - breaches/s paged to the webhook for a backlog of `SAFECLOCK_BENCH_PAGES` (default 10,000);
//! - latency from producing a breach to the webhook receiving its page, at a paced 1,000/s
//!   for 10 s (p50, p99, max).
//!
//! The delivery layer alone is measured by `cargo bench -p safeclock-escalator --bench delivery`.
//!
//! On tansu 0.6 the latency is dominated by the consumer's `fetch.wait.max.ms` (50 ms in the
//! test settings): tansu holds a fetch for the whole wait even when records arrive, where Apache
//! Kafka answers as soon as `fetch.min.bytes` is there. `SAFECLOCK_BENCH_FETCH_WAIT_MS` overrides
//! it to show the difference.
//! Run with `bash scripts/bench.sh`, or `SAFECLOCK_TEST_BROKERS=host:port cargo bench -p
//! safeclock-tests --bench escalator`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Registry;
use rdkafka::producer::FutureRecord;
use safeclock_common::config::{
    LevelSettings, Payload, PolicySettings, ReceiverKind, ReceiverSettings,
};
use safeclock_common::kafka::{self, Topic};
use safeclock_common::metrics::ConsumerMetrics;
use safeclock_common::ops::Readiness;
use safeclock_common::service::ServiceDeps;
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::{breach_record, isolated_settings};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn webhook() -> (String, Arrivals) {
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let a = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let now = Instant::now();
            let a = a.clone();
            async move {
                let referral = body["slaEvent"]["referralId"].as_str().unwrap().to_string();
                a.lock().unwrap().entry(referral).or_insert(now);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), arrivals)
}

async fn wait_for(arrivals: &Arrivals, prefix: &str, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let got = arrivals
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count();
        if got >= n {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("only {got} of {n} {prefix} pages arrived");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(brokers) = std::env::var("SAFECLOCK_TEST_BROKERS") else {
        eprintln!("SAFECLOCK_TEST_BROKERS is not set: run scripts/bench.sh");
        std::process::exit(2);
    };
    let n: usize = std::env::var("SAFECLOCK_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (url, arrivals) = webhook().await;
    let mut settings = isolated_settings(&brokers);
    settings.escalator.log_receiver = false;
    settings.escalator.max_batch = 1000;
    settings.escalator.tick_interval_ms = 1000;
    if let Ok(wait) = std::env::var("SAFECLOCK_BENCH_FETCH_WAIT_MS") {
        settings
            .kafka
            .consumer_properties
            .insert("fetch.wait.max.ms".into(), wait);
    }
    let mut hook = ReceiverSettings::new("bench", ReceiverKind::Webhook);
    // Pages are matched to their breaches by referral id.
    hook.payload = Some(Payload::Referral);
    hook.url = Some(url);
    hook.rate_per_sec = 1_000_000;
    hook.burst = 100_000;
    hook.concurrency = 64;
    settings.escalator.receivers = vec![hook];
    settings.escalator.policies = vec![PolicySettings {
        name: "default".into(),
        levels: vec![LevelSettings {
            delay_secs: 0,
            receivers: vec!["bench".into()],
        }],
        repeat_interval_secs: 0,
        repeat_limit: 0,
        ack_expiry_secs: 0,
    }];
    settings.validate().unwrap();
    let settings = Arc::new(settings);
    kafka::ensure_topics(&settings, &Topic::ALL).await.unwrap();
    let input = settings.topic(Topic::SlaEvents);
    let registry = Registry::new();
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let deps = ServiceDeps {
        settings: settings.clone(),
        registry: registry.clone(),
        readiness: readiness.clone(),
        time: safeclock_tests::test_time(),
    };
    let task = tokio::spawn(safeclock_escalator::run(
        deps,
        ConsumerMetrics::register(&registry).unwrap(),
        shutdown.clone(),
    ));
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let producer = kafka::producer(&settings).unwrap();

    // Backlog: produce n breaches, then page them as fast as the pipeline goes.
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        let referral = format!("R-BURST-{i:07}");
        let payload = breach_record(&referral);
        let record = FutureRecord::<str, [u8]>::to(&input)
            .key(&referral)
            .payload(&payload);
        deliveries.push(kafka::enqueue(&producer, record).await.unwrap());
    }
    kafka::await_deliveries(deliveries).await.unwrap();
    let produced = t.elapsed();
    let ok = wait_for(&arrivals, "R-BURST-", n, Duration::from_secs(300)).await;
    let elapsed = t.elapsed();
    println!(
        "escalator through the broker: {n} breaches produced in {:.2} s, all paged to the webhook after {:.2} s = {:.0} pages/s{}",
        produced.as_secs_f64(),
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        if ok { "" } else { " (INCOMPLETE)" }
    );

    // Paced: 1,000 breaches/s for 10 s; latency from produce to the webhook.
    let paced = 10_000usize;
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(paced);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut deliveries = Vec::with_capacity(paced);
    for i in 0..paced {
        tick.tick().await;
        let referral = format!("R-PACED-{i:07}");
        let payload = breach_record(&referral);
        sent.insert(referral.clone(), Instant::now());
        let record = FutureRecord::<str, [u8]>::to(&input)
            .key(&referral)
            .payload(&payload);
        deliveries.push(kafka::enqueue(&producer, record).await.unwrap());
    }
    kafka::await_deliveries(deliveries).await.unwrap();
    let ok = wait_for(&arrivals, "R-PACED-", paced, Duration::from_secs(120)).await;
    let mut latencies: Vec<Duration> = {
        let arrived = arrivals.lock().unwrap();
        sent.iter()
            .filter_map(|(r, at)| arrived.get(r).map(|a| a.saturating_duration_since(*at)))
            .collect()
    };
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "escalator through the broker at 1,000 breaches/s: produce-to-page latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} pages{}",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        latencies.len(),
        if ok { "" } else { " (INCOMPLETE)" }
    );
    shutdown.cancel();
    let _ = task.await;
}
