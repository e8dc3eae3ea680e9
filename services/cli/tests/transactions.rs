//! The clock's transactional mode (`clock.transactional_id`) on Apache Kafka, for real:
//!
//! - a batch the broker refuses part of is aborted, and a `read_committed` reader of sla-events
//!   never sees its outputs (a `read_uncommitted` reader does: the abort happened);
//! - a clock SIGKILLed while a transaction is open (a large burst) restarts within seconds (the
//!   restore reads its changelog to the last stable offset, past transaction markers), and every
//!   SLA event appears exactly once to a `read_committed` reader, with the state restored right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::SignedDuration;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::{ensure_topics, Topic};
use safeclock_tests::processes::{wait_ready, ServiceProcess};
use safeclock_tests::{committed_total, free_port, isolated_settings, real_broker, InProcess};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PARTITIONS: i32 = 3;

/// Every record of `topic` from the beginning at `isolation`, to the end of every partition.
fn read_topic(brokers: &str, topic: &str, isolation: &str, within: Duration) -> Vec<OwnedMessage> {
    safeclock_tests::read_to_end(brokers, topic, PARTITIONS, isolation, within)
}

/// The SLA event ids of `records` with how often each appears.
fn id_counts(records: &[OwnedMessage]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        let e = decode_sla_event(r.payload().unwrap_or_default()).unwrap();
        *counts.entry(e.sla_event_id).or_default() += 1;
    }
    counts
}

/// Clients that read the high watermark and (`read_committed`) the last stable offset.
struct Watermarks {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
}

impl Watermarks {
    fn new(brokers: &str) -> Self {
        let client = |isolation: &str| -> BaseConsumer {
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", "watermarks")
                .set("isolation.level", isolation)
                .create()
                .unwrap()
        };
        Self {
            committed: client("read_committed"),
            uncommitted: client("read_uncommitted"),
        }
    }
}

/// The partitions of `topic` with a transaction open: their last stable offset is below their
/// high watermark.
fn open_transactions(w: &Watermarks, topic: &str) -> Vec<i32> {
    let t = Duration::from_secs(10);
    (0..PARTITIONS)
        .filter(|p| {
            let lso = w.committed.fetch_watermarks(topic, *p, t).unwrap().1;
            let hw = w.uncommitted.fetch_watermarks(topic, *p, t).unwrap().1;
            lso < hw
        })
        .collect()
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

fn received(referral: &str, occurred: jiff::Timestamp) -> String {
    format!(
        r#"{{"eventId":"{referral}-e1","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{occurred}","referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}}}}"#
    )
}

/// A batch that the broker refuses part of (an SLA event over sla-events' `max.message.bytes`)
/// is aborted for real: the clock writes the batch again without the refused record, and a
/// `read_committed` reader sees each of the other SLA events once and nothing of the refused
/// record, while a `read_uncommitted` reader also sees the aborted copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_committed_reader_never_sees_the_outputs_of_an_aborted_batch() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.clock.transactional_id = Some(format!("{}-1", settings.clock.group_id));
    // References long enough that one SLA event passes the topic's limit below.
    // (Limits low enough for the configuration to allow such references.)
    settings.validation.max_ref_chars = 256;
    settings.clock.max_batch = 500;
    // One record per produce request, uncompressed, so the broker refuses exactly the record over
    // its limit (a batch of several small ones never passes it).
    settings
        .kafka
        .producer_properties
        .insert("batch.num.messages".into(), "1".into());
    settings
        .kafka
        .producer_properties
        .insert("compression.type".into(), "none".into());
    // The abort after a refusal waits for the records re-queued behind the refused one to expire
    // (`message.timeout.ms`, bounded by this; librdkafka's default is 60 s).
    settings
        .kafka
        .producer_properties
        .insert("transaction.timeout.ms".into(), "10000".into());
    settings.validate().unwrap();
    let settings = Arc::new(settings);
    let sla = settings.topic(Topic::SlaEvents);
    let input = settings.topic(Topic::ReferralEvents);
    // sla-events takes record batches up to 850 bytes (the clock's producer allows 1 MB): the
    // clock's SLA events are 600-660 bytes, a device's with a 254-character reference ~880. The
    // broker itself refuses it, inside the transaction.
    let topic =
        NewTopic::new(&sla, PARTITIONS, TopicReplication::Fixed(1)).set("max.message.bytes", "850");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin(&brokers)
        .create_topics(&[topic], &opts)
        .await
        .unwrap()
    {
        r.unwrap();
    }
    ensure_topics(&settings, &Topic::ALL).await.unwrap();

    // One batch: twenty referrals, then a device of R-BIG with a 254-character reference, then
    // twenty more, all on partition 0 (written before the clock starts, so they come in one
    // batch).
    let now = jiff::Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let at = now - SignedDuration::from_hours(1);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let mut records: Vec<(String, String)> = Vec::new();
    for i in 0..20 {
        let r = format!("R-A{i:02}");
        records.push((r.clone(), received(&r, at)));
    }
    records.push(("R-BIG".into(), received("R-BIG", at)));
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let noise: String = (0..250)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(
                b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    [(seed % 62) as usize],
            )
        })
        .collect();
    records.push((
        "R-BIG".into(),
        format!(
            r#"{{"eventId":"R-BIG-e2","referralId":"R-BIG","forceId":"nottinghamshire","occurredAt":"{at}","deviceSeized":{{"deviceRef":"DEV-{noise}"}}}}"#
        ),
    ));
    for i in 0..20 {
        let r = format!("R-B{i:02}");
        records.push((r.clone(), received(&r, at)));
    }
    for (key, json) in &records {
        producer
            .send(
                FutureRecord::to(&input).partition(0).key(key).payload(json),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let clock = InProcess::start(
        &settings,
        safeclock::app::Service::Clock,
        Duration::from_secs(60),
    )
    .await;
    // Every input is handled: its offset committed (in the transaction).
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_total(&brokers, &settings.clock.group_id, &input, PARTITIONS) < records.len() {
        assert!(Instant::now() < deadline, "the batch was never committed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let committed = read_topic(&brokers, &sla, "read_committed", Duration::from_secs(30));
    let uncommitted = read_topic(&brokers, &sla, "read_uncommitted", Duration::from_secs(30));
    let seen = id_counts(&committed);
    let all = id_counts(&uncommitted);
    eprintln!(
        "sla-events: {} records read_committed ({} ids), {} read_uncommitted ({} ids)",
        committed.len(),
        seen.len(),
        uncommitted.len(),
        all.len()
    );
    // Each SLA event of the committed batch exactly once; the device's never.
    assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
    let events: Vec<_> = committed
        .iter()
        .map(|r| decode_sla_event(r.payload().unwrap()).unwrap())
        .collect();
    assert!(
        !events.iter().any(|e| e.rule_id == "device-examination"),
        "the refused device's clock is not published"
    );
    let referrals: BTreeSet<&str> = events.iter().map(|e| e.referral_id.as_str()).collect();
    assert_eq!(referrals.len(), 41, "every referral's clocks started");
    // The aborted transaction was real: its copies are on the log, invisible to read_committed.
    assert!(
        uncommitted.len() > committed.len(),
        "a read_uncommitted reader sees the aborted copies too"
    );
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        seen.keys().collect::<Vec<_>>(),
        "the aborted batch held no SLA event the committed one lacks (the device's was refused \
         by the broker, so it is not on the log at all)"
    );
    // The device is dead-lettered, the clock ready.
    assert_eq!(
        safeclock_tests::counter(
            &clock.running.registry,
            "safeclock_outputs_refused_total",
            &[("service", "clock"), ("reason", "output_too_large")]
        ),
        1.0
    );
    assert!(clock.running.readiness.is_ready());
    clock.stop().await;
}

/// A `safeclock run clock` process, transactional, on the real broker.
fn start_clock(brokers: &str, prefix: &str, group: &str, txn: &str) -> ServiceProcess {
    let ops = format!("127.0.0.1:{}", free_port());
    ServiceProcess::spawn(
        Command::new(BIN)
            .args(["run", "clock"])
            .env("SAFECLOCK__KAFKA__BROKERS", brokers)
            .env("SAFECLOCK__KAFKA__TOPIC_PREFIX", prefix)
            .env("SAFECLOCK__KAFKA__PARTITIONS", PARTITIONS.to_string())
            .env(
                "SAFECLOCK__KAFKA__CONSUMER_PROPERTIES__SESSION_TIMEOUT_MS",
                "6000",
            )
            .env("SAFECLOCK__CLOCK__GROUP_ID", group)
            .env("SAFECLOCK__CLOCK__TRANSACTIONAL_ID", txn)
            .env("SAFECLOCK__CLOCK__TICK_INTERVAL_MS", "100")
            .env("SAFECLOCK__CLOCK__MAX_BATCH", "2000"),
        &ops,
        None,
    )
}

/// The value of the metric line that starts with `series` at `ops`' /metrics.
async fn metric(ops: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// SIGKILL while a transaction is open (a burst of 30,000 referrals, up to 2,000 per transaction):
/// the
/// restarted clock (same transactional id) is ready within 30 s, each SLA event appears exactly
/// once to a `read_committed` reader, and the state it restored and went on from is right
/// (every referral's clocks open, on the changelog and in the gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_transaction_each_output_once_and_the_restart_is_not_stalled() {
    const REFERRALS: usize = 30_000;
    let brokers = real_broker();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let prefix = format!("txn-{tag}.");
    let group = format!("txn-{tag}-clock");
    let txn = format!("txn-{tag}-clock-1");
    let input = format!("{prefix}referral-events.v1");
    let sla = format!("{prefix}sla-events.v1");
    let changelog = format!("{prefix}clock-state.v1");

    let mut first = start_clock(&brokers, &prefix, &group, &txn);
    wait_ready(&first.ops, Duration::from_secs(60)).await;

    // Deadlines a day away: nothing fires during the test but the starts.
    let at = safeclock_tests::now() - SignedDuration::from_hours(1);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let mut deliveries = Vec::with_capacity(REFERRALS);
    for i in 0..REFERRALS {
        let referral = format!("R-TXN-{i:05}");
        let json = received(&referral, at);
        loop {
            match producer.send_result(FutureRecord::to(&input).key(&referral).payload(&json)) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((_, _)) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    // Kill while a transaction is open on sla-events and part of the burst is still to come. A
    // transaction may commit between the look and the kill: then the kill missed, and a new
    // instance (restoring what the last one committed) is killed again.
    let watermarks = Watermarks::new(&brokers);
    let mut attempts = 0;
    let before_restart = loop {
        attempts += 1;
        assert!(attempts <= 8, "never killed the clock mid-transaction");
        let deadline = Instant::now() + Duration::from_secs(120);
        while committed_total(&brokers, &group, &input, PARTITIONS) < REFERRALS / 20 {
            assert!(Instant::now() < deadline, "the clock never got going");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = loop {
            assert!(
                Instant::now() < deadline,
                "never saw a transaction open on {sla}"
            );
            let open = open_transactions(&watermarks, &sla);
            if !open.is_empty() {
                first.sigkill();
                break open;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let done = committed_total(&brokers, &group, &input, PARTITIONS);
        let still_open = open_transactions(&watermarks, &sla);
        eprintln!(
            "killed with a transaction open on sla-events partitions {open:?} (still open after \
             the kill: {still_open:?}); {done} of {REFERRALS} inputs committed"
        );
        if !still_open.is_empty() {
            break done;
        }
        first = start_clock(&brokers, &prefix, &group, &txn);
        wait_ready(&first.ops, Duration::from_secs(60)).await;
    };
    assert!(before_restart < REFERRALS);

    let started = Instant::now();
    let second = start_clock(&brokers, &prefix, &group, &txn);
    wait_ready(&second.ops, Duration::from_secs(90)).await;
    let ready_after = started.elapsed();
    eprintln!("restart to ready: {ready_after:?}");
    assert!(
        ready_after < Duration::from_secs(30),
        "the restart took {ready_after:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(180);
    while committed_total(&brokers, &group, &input, PARTITIONS) < REFERRALS {
        assert!(Instant::now() < deadline, "the burst never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let committed = read_topic(&brokers, &sla, "read_committed", Duration::from_secs(120));
    let uncommitted = read_topic(&brokers, &sla, "read_uncommitted", Duration::from_secs(120));
    let counts = id_counts(&committed);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    let aborted = uncommitted.len() - committed.len();
    eprintln!(
        "sla-events: {} read_committed records ({} distinct ids), {} read_uncommitted ({aborted} \
         in aborted transactions)",
        committed.len(),
        counts.len(),
        uncommitted.len()
    );
    assert!(
        twice.is_empty(),
        "SLA events seen more than once: {twice:?}"
    );
    assert!(
        aborted > 0,
        "the killed transaction's records are on the log"
    );
    let referrals: BTreeSet<String> = committed
        .iter()
        .map(|r| decode_sla_event(r.payload().unwrap()).unwrap().referral_id)
        .collect();
    assert_eq!(
        referrals.len(),
        REFERRALS,
        "every referral's clocks started"
    );

    // The state: the changelog (committed) holds every referral, and the restarted clock counts
    // every clock open, the restored ones and those it started itself.
    let mut latest: HashMap<Vec<u8>, bool> = HashMap::new();
    for r in read_topic(
        &brokers,
        &changelog,
        "read_committed",
        Duration::from_secs(120),
    ) {
        latest.insert(r.key().unwrap().to_vec(), r.payload().is_some());
    }
    assert_eq!(latest.values().filter(|v| **v).count(), REFERRALS);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = metric(&second.ops, "safeclock_clock_open_clocks ").await;
        if open == Some(counts.len() as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "open clocks after the restart: {open:?}, want {} (one per started event)",
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut second = second;
    assert!(second.sigterm(Duration::from_secs(30)));
}
