//! Killing the escalator with SIGKILL loses no notification and re-sends none that was already
//! delivered: `safeclock run escalator` against the real broker process, a local webhook that
//! first answers, then fails (so notifications are left pending and retrying), a SIGKILL, and a
//! new instance that restores the escalation state and delivers what was pending.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::schema::v1::{Severity, SlaEvent, SlaLabels, SlaTransition};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PER_PHASE: usize = 50;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `safeclock run escalator` process, killed when the test ends however it ends.
struct Escalator(Child);

impl Drop for Escalator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &std::path::Path, ops: &str) -> Escalator {
    let child = Command::new(BIN)
        .args(["run", "escalator", "--config"])
        .arg(config)
        .env("SAFECLOCK__OPS__LISTEN", ops)
        .stdout(Stdio::null())
        .stderr(match std::env::var("SAFECLOCK_TEST_LOG_DIR") {
            Ok(dir) => Stdio::from(
                std::fs::File::create(format!("{dir}/escalator-{}.log", uuid::Uuid::new_v4()))
                    .unwrap(),
            ),
            Err(_) => Stdio::null(),
        })
        .spawn()
        .unwrap();
    Escalator(child)
}

fn wait_ready(ops: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(ops) {
            use std::io::Read;
            let _ = write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "escalator not ready within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn committed(brokers: &str, group: &str, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    let Ok(c) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return 0;
    };
    c.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => usize::try_from(o).ok(),
            _ => None,
        })
        .sum()
}

/// What the webhook saw: per referral, the statuses it answered, in order.
#[derive(Default)]
struct Seen {
    by_referral: BTreeMap<String, Vec<u16>>,
    delivery_ids: BTreeMap<String, BTreeSet<String>>,
}

async fn webhook(failing: Arc<AtomicBool>) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let s = s.clone();
                let failing = failing.clone();
                async move {
                    let status = if failing.load(Ordering::SeqCst) {
                        500
                    } else {
                        200
                    };
                    let referral = body["slaEvent"]["referralId"].as_str().unwrap().to_string();
                    let mut s = s.lock().unwrap();
                    s.by_referral
                        .entry(referral.clone())
                        .or_default()
                        .push(status);
                    s.delivery_ids.entry(referral).or_default().insert(
                        headers["x-safeclock-delivery-id"]
                            .to_str()
                            .unwrap()
                            .to_string(),
                    );
                    StatusCode::from_u16(status).unwrap()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

fn breach(referral: &str) -> Vec<u8> {
    serde_json::to_vec(&SlaEvent {
        sla_event_id: format!("{referral}-breach"),
        referral_id: referral.into(),
        rule_id: "victim-contact".into(),
        clock_id: format!("{referral}-c1"),
        transition: SlaTransition::Breached as i32,
        severity: Severity::High as i32,
        labels: Some(SlaLabels {
            force_id: "nottinghamshire".into(),
            ..SlaLabels::default()
        }),
        ..SlaEvent::default()
    })
    .unwrap()
}

async fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_pending_notification_and_repeats_no_delivered_one() {
    let brokers = std::env::var("SAFECLOCK_TEST_BROKERS").expect(
        "SAFECLOCK_TEST_BROKERS is not set: run the suite with scripts/test.sh (starts a real broker)",
    );
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let prefix = format!("esc-crash-{tag}.");
    let group = format!("esc-crash-{tag}");
    let input = format!("{prefix}sla-events.v1");
    let failing = Arc::new(AtomicBool::new(false));
    let (url, seen) = webhook(failing.clone()).await;
    let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        config,
        r#"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = 3
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"fetch.wait.max.ms" = "50"
[kafka.producer_properties]
"linger.ms" = "1"
[escalator]
group_id = "{group}"
log_receiver = false
tick_interval_ms = 100
max_batch = 20
[[escalator.receivers]]
name = "duty"
kind = "webhook"
url = "{url}"
timeout_ms = 2000
max_attempts = 100000
initial_backoff_ms = 100
max_backoff_ms = 400
breaker_failures = 0
[[escalator.policies]]
name = "default"
levels = [{{ receivers = ["duty"] }}]
"#
    )
    .unwrap();

    let ops = format!("127.0.0.1:{}", free_port());
    let mut first = start(config.path(), &ops);
    wait_ready(&ops);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let produce = |referral: String| {
        let producer = producer.clone();
        let input = input.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&input)
                        .key(&referral)
                        .payload(&breach(&referral)),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let delivered = |seen: &Mutex<Seen>, prefix: &str| {
        seen.lock()
            .unwrap()
            .by_referral
            .iter()
            .filter(|(r, s)| r.starts_with(prefix) && s.contains(&200))
            .count()
    };

    // Phase A: delivered before the crash, and their offsets committed.
    for i in 0..PER_PHASE {
        produce(format!("R-A-{i:03}")).await;
    }
    wait("phase A delivered", Duration::from_secs(60), || {
        delivered(&seen, "R-A-") == PER_PHASE
    })
    .await;
    wait("phase A offsets committed", Duration::from_secs(30), || {
        committed(&brokers, &group, &input) >= PER_PHASE
    })
    .await;
    // The outcomes are written to the changelog right after the deliveries; give that a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase B: the receiver fails, so these stay pending (retrying) in the state.
    failing.store(true, Ordering::SeqCst);
    for i in 0..PER_PHASE {
        produce(format!("R-B-{i:03}")).await;
    }
    wait(
        "every phase B page attempted",
        Duration::from_secs(60),
        || {
            seen.lock()
                .unwrap()
                .by_referral
                .keys()
                .filter(|r| r.starts_with("R-B-"))
                .count()
                == PER_PHASE
        },
    )
    .await;
    wait("phase B offsets committed", Duration::from_secs(30), || {
        committed(&brokers, &group, &input) >= 2 * PER_PHASE
    })
    .await;
    assert_eq!(delivered(&seen, "R-B-"), 0);

    drop(first.0.kill()); // SIGKILL: no drain, no final commit
    let _ = first.0.wait();
    // Let the dead member's session (6 s) expire first: tansu 0.6 does not rebalance a group
    // again when a member times out after a new one joined (docs/architecture.md, decision j).
    tokio::time::sleep(Duration::from_secs(8)).await;
    failing.store(false, Ordering::SeqCst);
    let requests_before_restart: usize = seen
        .lock()
        .unwrap()
        .by_referral
        .values()
        .map(Vec::len)
        .sum();

    let ops = format!("127.0.0.1:{}", free_port());
    let second = start(config.path(), &ops);
    wait_ready(&ops);
    wait(
        "phase B delivered after the restart",
        Duration::from_secs(90),
        || delivered(&seen, "R-B-") == PER_PHASE,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let s = seen.lock().unwrap();
    for i in 0..PER_PHASE {
        let a = &s.by_referral[&format!("R-A-{i:03}")];
        assert_eq!(
            a,
            &[200],
            "R-A-{i:03} was delivered before the crash and must not be paged again"
        );
        let b = &s.by_referral[&format!("R-B-{i:03}")];
        assert_eq!(
            b.iter().filter(|x| **x == 200).count(),
            1,
            "R-B-{i:03}: {b:?}"
        );
        assert_eq!(
            s.delivery_ids[&format!("R-B-{i:03}")].len(),
            1,
            "one notification, retried under one id"
        );
    }
    let after: usize =
        s.by_referral.values().map(Vec::len).sum::<usize>() - requests_before_restart;
    assert!(
        after >= PER_PHASE,
        "the restarted instance delivered the pending pages"
    );
    drop(s);

    Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .unwrap();
    let mut second = second;
    let status = second.0.wait().unwrap();
    assert!(status.success(), "second escalator exit {status}");
}
