//! Delivery benchmark: notifications per second delivered to a local HTTP webhook, and the
//! latency the delivery layer adds at a paced 1,000 notifications per second.
//!
//! Everything runs in this process on loopback: the delivery layer (`Dispatcher` with one
//! webhook receiver: default JSON body, HMAC signature, rate limit and breaker in the path) and
//! an axum webhook that notes when each notification arrives. "Added latency" is from handing
//! the notification to the delivery layer to its arrival at the receiver. It does not include
//! consuming the SLA event from Kafka or writing the escalation state, which the service does
//! before the hand-off (see docs/escalation.md). Prints figures; checks no targets.
//!
//! `cargo bench -p safeclock-escalator --bench delivery`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use safeclock_common::config::{ReceiverKind, ReceiverSettings};
use safeclock_common::schema::v1::{
    NotificationKind, PendingNotification, Severity, SlaEvent, SlaLabels, SlaTransition,
};
use safeclock_common::time::SystemTime;
use safeclock_escalator::delivery::{Dispatcher, Report};
use safeclock_escalator::engine::Job;
use safeclock_escalator::metrics::EscalatorMetrics;
use safeclock_escalator::receivers::Receiver;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

async fn webhook() -> (String, Arrivals) {
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::with_capacity(100_000)));
    let a = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, _body: axum::body::Bytes| {
            let now = Instant::now();
            let a = a.clone();
            async move {
                let id: u64 = headers["x-safeclock-delivery-id"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                a.lock().unwrap().insert(id, now);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), arrivals)
}

fn job(n: u64) -> Job {
    let mut pending = PendingNotification {
        delivery_id: n.to_string(),
        dedup_key: format!("dedup-{n}"),
        receiver: "bench".into(),
        level: 1,
        policy: "default".into(),
        ..PendingNotification::default()
    };
    pending.set_kind(NotificationKind::Trigger);
    Job {
        escalation_id: format!("esc-{n}"),
        partition: 0,
        pending,
        event: SlaEvent {
            sla_event_id: format!("sla-{n}"),
            referral_id: format!("R-BENCH-{n:07}"),
            rule_id: "victim-contact".into(),
            rule_title: "Victim contacted".into(),
            clock_id: format!("c-{n}"),
            transition: SlaTransition::Breached as i32,
            severity: Severity::High as i32,
            labels: Some(SlaLabels {
                force_id: "nottinghamshire".into(),
                category: "grooming".into(),
                risk: "high".into(),
                child_age_band: "aged_13_to_15".into(),
                area: "city".into(),
                team: "mash".into(),
            }),
            ..SlaEvent::default()
        },
        actor: String::new(),
        resolution: String::new(),
        opened_at_ms: 0,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn wait_done(reports: &mut mpsc::UnboundedReceiver<Report>, n: usize) {
    let mut done = 0;
    while done < n {
        match reports.recv().await.unwrap() {
            Report::Done { outcome, .. } => {
                assert!(
                    matches!(
                        outcome,
                        safeclock_escalator::engine::Outcome::Delivered { .. }
                    ),
                    "{outcome:?}"
                );
                done += 1;
            }
            Report::AttemptFailed { .. } => {}
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (url, arrivals) = webhook().await;
        let mut settings = ReceiverSettings::new("bench", ReceiverKind::Webhook);
        settings.url = Some(url);
        settings.secret = Some("bench-secret".into());
        settings.rate_per_sec = 1_000_000;
        settings.burst = 100_000;
        settings.concurrency = 64;
        let metrics = EscalatorMetrics::register(&prometheus::Registry::new()).unwrap();
        let (tx, mut reports) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let dispatcher = Dispatcher::start(
            vec![Receiver::new(settings).unwrap()],
            metrics,
            Arc::new(SystemTime),
            tx,
            stop.clone(),
        );

        // Warm up connections.
        for n in 0..1_000 {
            dispatcher.submit(job(n));
        }
        wait_done(&mut reports, 1_000).await;

        // Throughput: as fast as the receiver takes them.
        let total = 30_000u64;
        let started = Instant::now();
        for n in 10_000..10_000 + total {
            dispatcher.submit(job(n));
        }
        wait_done(&mut reports, total as usize).await;
        let elapsed = started.elapsed();
        println!(
            "delivery throughput: {total} notifications to a local webhook in {:.2} s = {:.0} notifications/s (concurrency 64, HMAC-signed JSON bodies)",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );

        // Added latency at a paced 1,000/s for 10 s.
        let paced = 10_000u64;
        let base = 100_000u64;
        let mut submitted = HashMap::with_capacity(paced as usize);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for n in base..base + paced {
            tick.tick().await;
            submitted.insert(n, Instant::now());
            dispatcher.submit(job(n));
        }
        wait_done(&mut reports, paced as usize).await;
        let arrived = arrivals.lock().unwrap();
        let mut latencies: Vec<Duration> = (base..base + paced)
            .map(|n| arrived[&n].saturating_duration_since(submitted[&n]))
            .collect();
        latencies.sort();
        println!(
            "added latency at 1,000/s over {paced} notifications: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
        );
        stop.cancel();
    });
}
