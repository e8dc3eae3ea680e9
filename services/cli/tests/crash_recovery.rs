//! Killing the clock with SIGKILL mid-stream against the real broker process loses no clock and
//! leaves no breach unreported: the restarted instance restores every clock from the changelog
//! and fires each deadline exactly once (by id).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use jiff::SignedDuration;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::event::decode_sla_event;
use safeclock_common::schema::v1::SlaTransition;
use safeclock_tests::processes::{wait_ready, ServiceProcess};
use safeclock_tests::{committed_total, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const REFERRALS: usize = 300;

/// A `safeclock run clock` process on the real broker, with an ops listener of its own.
fn start_clock(brokers: &str, prefix: &str, group: &str) -> ServiceProcess {
    let ops = format!("127.0.0.1:{}", free_port());
    ServiceProcess::spawn(
        Command::new(BIN)
            .args(["run", "clock"])
            .env("SAFECLOCK__KAFKA__BROKERS", brokers)
            .env("SAFECLOCK__KAFKA__TOPIC_PREFIX", prefix)
            .env("SAFECLOCK__KAFKA__PARTITIONS", "3")
            .env(
                "SAFECLOCK__KAFKA__CONSUMER_PROPERTIES__SESSION_TIMEOUT_MS",
                "6000",
            )
            .env("SAFECLOCK__CLOCK__GROUP_ID", group)
            .env("SAFECLOCK__CLOCK__TICK_INTERVAL_MS", "100")
            .env("SAFECLOCK__CLOCK__MAX_BATCH", "20"),
        &ops,
        None,
    )
}

/// The body of `GET /metrics` from the ops endpoint.
fn metrics_text(ops: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(ops) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// What the SLA events topic has shown so far, for the victim-contact rule.
#[derive(Default)]
struct Observed {
    started: BTreeSet<String>,
    /// Referral -> distinct breach record ids.
    breaches: BTreeMap<String, BTreeSet<String>>,
}

impl Observed {
    fn record(&mut self, payload: &[u8]) {
        let e = decode_sla_event(payload).unwrap();
        if e.rule_id != "victim-contact" {
            return;
        }
        match e.transition() {
            SlaTransition::Started => {
                self.started.insert(e.referral_id);
            }
            SlaTransition::Breached => {
                self.breaches
                    .entry(e.referral_id)
                    .or_default()
                    .insert(e.sla_event_id);
            }
            _ => {}
        }
    }
}

async fn read_until(
    reader: &StreamConsumer,
    seen: &mut Observed,
    want: impl Fn(&Observed) -> bool,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !want(seen) {
        let m = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out: {} started, {} breached",
                    seen.started.len(),
                    seen.breaches.len()
                )
            })
            .unwrap();
        seen.record(m.payload().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_clock_and_no_breach() {
    let brokers = std::env::var("SAFECLOCK_TEST_BROKERS").expect(
        "SAFECLOCK_TEST_BROKERS is not set: run the suite with scripts/test.sh (starts a real broker)",
    );
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let prefix = format!("crash-{tag}.");
    let group = format!("crash-{tag}-clock");
    let input = format!("{prefix}referral-events.v1");
    let output = format!("{prefix}sla-events.v1");

    let mut first = start_clock(&brokers, &prefix, &group);
    wait_ready(&first.ops, Duration::from_secs(60)).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    // Every deadline falls ~60 s from now, after the crash and the restart.
    let occurred =
        safeclock_tests::now() - SignedDuration::from_hours(24) + SignedDuration::from_secs(60);
    let produce = |i: usize| {
        let producer = producer.clone();
        let input = input.clone();
        async move {
            let referral = format!("R-CRASH-{i:04}");
            let json = format!(
                r#"{{"eventId":"{referral}-e1","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{occurred}","referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}}}}"#
            );
            producer
                .send(
                    FutureRecord::to(&input).key(&referral).payload(&json),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("reader-{tag}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    reader.subscribe(&[&output]).unwrap();
    let mut seen = Observed::default();

    // First half of the stream; kill the clock once it is well into it.
    for i in 0..REFERRALS / 2 {
        produce(i).await;
    }
    read_until(
        &reader,
        &mut seen,
        |o| o.started.len() >= REFERRALS / 2,
        Duration::from_secs(60),
    )
    .await;
    // Make sure the input offsets of those clocks are committed: from here on only the
    // changelog can bring them back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_total(&brokers, &group, &input, 3) < REFERRALS / 2 {
        assert!(Instant::now() < deadline, "offsets never committed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.sigkill();
    // SIGKILL: no drain, no final commit. The new instance starts at once; the group waits
    // out the dead member's session (6 s) before it hands over the partitions.

    // The rest of the stream arrives while no clock runs; then a new instance starts.
    for i in REFERRALS / 2..REFERRALS {
        produce(i).await;
    }
    let mut second = start_clock(&brokers, &prefix, &group);
    wait_ready(&second.ops, Duration::from_secs(60)).await;

    read_until(
        &reader,
        &mut seen,
        |o| o.started.len() == REFERRALS && o.breaches.len() == REFERRALS,
        Duration::from_secs(120),
    )
    .await;
    // Give any duplicate breach a moment to show up, then check each clock breached exactly once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), reader.recv()).await {
        seen.record(m.payload().unwrap());
    }
    assert_eq!(seen.breaches.len(), REFERRALS, "every clock breached");
    for (referral, ids) in &seen.breaches {
        assert_eq!(
            ids.len(),
            1,
            "{referral} breached under more than one id: {ids:?}"
        );
    }

    // The open-clock gauge of the restarted instance counts every clock, including the half it
    // restored from the changelog rather than re-processed: gauges are rebuilt from state.
    let series = r#"safeclock_sla_open_clocks{category="grooming",force="nottinghamshire",risk="high",rule="victim-contact",state="breached"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(&second.ops);
        let value = text
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok());
        if value == Some(REFERRALS) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "open breached victim-contact clocks after the restart: {value:?}, want {REFERRALS}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    assert!(
        second.sigterm(Duration::from_secs(30)),
        "the second clock exits cleanly on SIGTERM"
    );
}
