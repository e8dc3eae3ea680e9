//! Shared test harness: isolated settings per test (unique topic prefix and group ids), local
//! webhooks that record what they are sent ([`RecordingWebhook`], [`pager::TestPager`]), Kafka
//! helpers to produce and read raw records, services in this process ([`InProcess`]) or as child
//! processes to kill ([`processes::ServiceProcess`]), and the end-to-end scenario both the
//! mock-cluster component test and the real-broker integration test run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod kafka_cluster;
pub mod pager;
pub mod processes;
pub mod scenario;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::config::Settings;

/// The broker of the real-broker integration tests, from `SAFECLOCK_TEST_BROKERS`
/// (`scripts/test.sh` starts a one-node Apache Kafka and sets it).
pub fn real_broker() -> String {
    std::env::var("SAFECLOCK_TEST_BROKERS").unwrap_or_else(|_| {
        panic!(
            "SAFECLOCK_TEST_BROKERS is not set: run the suite with scripts/test.sh, which installs \
             and starts Apache Kafka (one KRaft node) on free loopback ports"
        )
    })
}

/// The Alertmanager of the escalator's integration test, from `SAFECLOCK_TEST_ALERTMANAGER`
/// (`scripts/test.sh` starts Debian's `prometheus-alertmanager` and sets it). Missing: a failure
/// under CI (`CI=true`), otherwise `None` with a message, so the test is skipped.
pub fn real_alertmanager() -> Option<String> {
    match std::env::var("SAFECLOCK_TEST_ALERTMANAGER") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "SAFECLOCK_TEST_ALERTMANAGER is not set: run the suite with scripts/test.sh, which \
             starts prometheus-alertmanager on a free loopback port"
        ),
        _ => {
            eprintln!(
                "SKIPPED: SAFECLOCK_TEST_ALERTMANAGER is not set (scripts/test.sh starts a real \
                 Alertmanager and sets it)"
            );
            None
        }
    }
}

/// "Now" for the tests: the real clock, or the instant `SAFECLOCK_TEST_NOW` names, shifted
/// alike for every test in this process and every service it starts (see
/// `OffsetTime::for_tests`). Tests never read the system clock directly.
pub fn now() -> jiff::Timestamp {
    use safeclock_common::time::TimeSource;
    safeclock_common::time::OffsetTime::for_tests().now()
}

/// The time source the services a test starts run on (see [`now`]).
pub fn test_time() -> safeclock_common::time::SharedTime {
    Arc::new(safeclock_common::time::OffsetTime::for_tests())
}

/// The `[time] offset_secs` that makes a service process agree with [`now`].
pub fn time_offset_secs() -> i64 {
    safeclock_common::time::OffsetTime::for_tests()
        .offset()
        .as_secs()
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings isolated for one test: topic prefix and consumer groups of their own.
pub fn isolated_settings(brokers: &str) -> Settings {
    let mut s = Settings::defaults().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let tag = &tag[..12];
    s.kafka.brokers = brokers.to_string();
    s.kafka.topic_prefix = format!("test-{tag}.");
    s.kafka.partitions = 3;
    s.clock.group_id = format!("test-{tag}-clock");
    s.escalator.group_id = format!("test-{tag}-escalator");
    s.exporter.group_id = format!("test-{tag}-exporter");
    s.clock.tick_interval_ms = 50;
    s.escalator.tick_interval_ms = 50;
    s.time.offset_secs = time_offset_secs();
    s.shutdown.grace_period_secs = 10;
    s.kafka
        .consumer_properties
        .insert("fetch.wait.max.ms".into(), "50".into());
    // A member that died is replaced within seconds rather than the default 45 s.
    s.kafka
        .consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    s.kafka
        .producer_properties
        .insert("linger.ms".into(), "1".into());
    s
}

/// Producer properties a benchmark run asks for in `SAFECLOCK_BENCH_PRODUCER` (`key=value,...`,
/// e.g. `linger.ms=20,compression.type=zstd`), applied over `settings`' own.
///
/// # Panics
/// On an entry without `=`: a benchmark run with a typo must not measure the defaults silently.
pub fn apply_bench_producer_properties(settings: &mut Settings) {
    settings
        .kafka
        .producer_properties
        .extend(bench_producer_properties());
}

/// The (property, value) pairs of `SAFECLOCK_BENCH_PRODUCER`, for a benchmark that writes a
/// configuration file rather than building [`Settings`].
///
/// # Panics
/// As [`apply_bench_producer_properties`].
pub fn bench_producer_properties() -> Vec<(String, String)> {
    let Ok(props) = std::env::var("SAFECLOCK_BENCH_PRODUCER") else {
        return Vec::new();
    };
    props
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let Some((k, v)) = kv.split_once('=') else {
                panic!("SAFECLOCK_BENCH_PRODUCER: expected key=value,..., got {kv:?}");
            };
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// Produces one raw record and waits for the broker's acknowledgement.
pub async fn produce(brokers: &str, topic: &str, key: &str, payload: &[u8]) {
    produce_to(brokers, topic, key, payload, None).await;
}

/// Produces one raw record (to `partition`, if given, else by key), waits for the broker's
/// acknowledgement, and returns the partition and offset it was written at.
pub async fn produce_to(
    brokers: &str,
    topic: &str,
    key: &str,
    payload: &[u8],
    partition: Option<i32>,
) -> (i32, i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    let delivered = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    (delivered.partition, delivered.offset)
}

/// Produces one record with raw `key` bytes and `headers` (to `partition`, if given) from a
/// producer whose `message.max.bytes` is raised to 10 MB, so that records up to the broker's own
/// limit can be sent; waits for the acknowledgement and returns the partition and offset.
pub async fn produce_raw(
    brokers: &str,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: &[(&str, &[u8])],
    partition: Option<i32>,
) -> (i32, i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(rdkafka::message::Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .key(key)
        .payload(payload)
        .headers(owned);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    let delivered = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    (delivered.partition, delivered.offset)
}

/// Every value of header `name` (a forged record may carry several).
pub fn headers_named(m: &OwnedMessage, name: &str) -> Vec<String> {
    m.headers()
        .map(|h| {
            h.iter()
                .filter(|h| h.key == name)
                .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The sum of counter `name` over the series whose labels include every `labels` pair.
pub fn counter(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// The value of gauge `name`, summed over its series (0 if it has none).
pub fn gauge(registry: &prometheus::Registry, name: &str) -> i64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_gauge().get_value() as i64)
        .sum()
}

/// A consumer reading `topics` from the beginning in a group of its own.
pub fn reader(brokers: &str, topics: &[&str]) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // Only committed records: in transactional mode, what the clock committed.
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
    consumer
}

/// Reads records until `done` says the collection is complete, or panics after `timeout` with
/// what was read.
pub async fn read_until(
    consumer: &StreamConsumer,
    timeout: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => got.push(m.detach()),
            Ok(Err(e)) => eprintln!("reader error: {e}"),
            Err(_) => panic!(
                "timed out after {timeout:?}; read {} records: {:#?}",
                got.len(),
                got.iter()
                    .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string())
                    .collect::<Vec<_>>()
            ),
        }
    }
    got
}

/// Every record of `topic` from the beginning, read until none has come for `quiet` (at most
/// a minute in all).
pub async fn read_all(brokers: &str, topic: &str, quiet: Duration) -> Vec<OwnedMessage> {
    let consumer = reader(brokers, &[topic]);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(quiet, consumer.recv()).await {
            Ok(Ok(m)) => got.push(m.detach()),
            Ok(Err(e)) => eprintln!("reader error: {e}"),
            Err(_) => break,
        }
    }
    got
}

/// How many records `topic` holds in its first `partitions` partitions, and their key and value
/// bytes (read from the beginning until quiet for a second).
pub fn topic_volume(brokers: &str, topic: &str, partitions: i32) -> (usize, usize) {
    let consumer = assigned_from_beginning(brokers, topic, partitions, &[]);
    let (mut records, mut bytes) = (0, 0);
    while let Some(Ok(m)) = consumer.poll(Duration::from_secs(1)) {
        records += 1;
        bytes += m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len);
    }
    (records, bytes)
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
}

/// How many records `group` has committed on `topic`, summed over its first `partitions`
/// partitions (0 while the broker cannot say).
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> usize {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return 0;
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => usize::try_from(o).ok(),
            _ => None,
        })
        .sum()
}

/// A breached SLA event for `referral` (rule `victim-contact`, a high-risk grooming referral,
/// critical, deadline five minutes ago), encoded as the clock publishes it: what the escalator
/// tests and benchmark feed the escalator.
pub fn breach_record(referral: &str) -> Vec<u8> {
    use safeclock_common::schema::from_jiff;
    use safeclock_common::schema::v1::{Severity, SlaEvent, SlaLabels, SlaTransition};
    let now = now();
    serde_json::to_vec(&SlaEvent {
        sla_event_id: format!("{referral}-breach"),
        referral_id: referral.into(),
        rule_id: "victim-contact".into(),
        clock_id: format!("{referral}-c1"),
        transition: SlaTransition::Breached as i32,
        severity: Severity::Critical as i32,
        labels: Some(SlaLabels {
            force_id: "nottinghamshire".into(),
            category: "grooming".into(),
            risk: "high".into(),
            ..SlaLabels::default()
        }),
        deadline: Some(from_jiff(now - jiff::SignedDuration::from_mins(5))),
        emitted_at: Some(from_jiff(now)),
        ..SlaEvent::default()
    })
    .unwrap()
}

/// A local webhook receiver that records every JSON body it is sent.
#[derive(Clone, Default)]
pub struct RecordingWebhook {
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl RecordingWebhook {
    /// Starts it on a free loopback port; returns its URL.
    pub async fn start(&self) -> String {
        let bodies = self.bodies.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let bodies = bodies.clone();
                async move {
                    bodies.lock().unwrap().push(body);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `SIG<name>` to `pid` (with the system's `kill`).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success() || name == "CONT",
        "kill -{name} {pid} failed"
    );
}

/// One service running in this process (as `safeclock run <service>` would), for tests that
/// start and stop several instances of a group.
pub struct InProcess {
    pub running: safeclock::app::Running,
    shutdown: tokio_util::sync::CancellationToken,
}

impl InProcess {
    /// Starts `service` and waits (up to `timeout`) until it is ready.
    pub async fn start(
        settings: &Arc<Settings>,
        service: safeclock::app::Service,
        timeout: Duration,
    ) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = safeclock::app::start(
            settings.clone(),
            service,
            test_time(),
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .expect("the service starts");
        let ready = running.readiness.clone();
        wait_for("an instance to join its group", timeout, || {
            ready.is_ready()
        })
        .await;
        Self { running, shutdown }
    }

    /// The value of the gauge `name`, summed over its labels (0 if it has no sample), e.g. the
    /// partitions it holds.
    pub fn gauge(&self, name: &str) -> i64 {
        gauge(&self.running.registry, name)
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.wait().await.unwrap();
    }
}

/// A consumer of its own (no group to join, committing nothing) assigned every partition of
/// `topic` from the beginning, with the extra client properties in `props`.
pub fn assigned_from_beginning(
    brokers: &str,
    topic: &str,
    partitions: i32,
    props: &[(&str, &str)],
) -> rdkafka::consumer::BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("scan-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false");
    for (k, v) in props {
        config.set(*k, *v);
    }
    let consumer: rdkafka::consumer::BaseConsumer = config.create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

/// Every record of `topic` (all `partitions`) from the beginning at `isolation`
/// (`read_committed` or `read_uncommitted`), read until the end of every partition (bounded by
/// `within`).
pub fn read_to_end(
    brokers: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
    within: Duration,
) -> Vec<OwnedMessage> {
    let consumer = assigned_from_beginning(
        brokers,
        topic,
        partitions,
        &[
            ("enable.partition.eof", "true"),
            ("isolation.level", isolation),
            ("fetch.wait.max.ms", "50"),
        ],
    );
    let mut at_end = std::collections::BTreeSet::new();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + within;
    while at_end.len() < partitions as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} not read to its end within {within:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => got.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("scan error: {e}"),
            None => {}
        }
    }
    got
}
