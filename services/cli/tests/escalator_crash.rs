//! Killing the escalator with SIGKILL loses no notification and re-sends none that was already
//! delivered: `safeclock run escalator` against the real broker process, a local webhook that
//! first answers, then fails (so notifications are left pending and retrying), a SIGKILL, and a
//! new instance that restores the escalation state and delivers what was pending.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_tests::pager::TestPager;
use safeclock_tests::processes::{wait_ready, ServiceProcess};
use safeclock_tests::{breach_record, committed_total, free_port, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_safeclock");
const PER_PHASE: usize = 50;

fn start(config: &std::path::Path) -> ServiceProcess {
    let ops = format!("127.0.0.1:{}", free_port());
    ServiceProcess::spawn(
        Command::new(BIN)
            .args(["run", "escalator", "--config"])
            .arg(config),
        &ops,
        None,
    )
}

/// What the pager saw, per referral: the statuses it answered, in order, and the delivery ids.
#[derive(Default)]
struct Seen {
    by_referral: BTreeMap<String, Vec<u16>>,
    delivery_ids: BTreeMap<String, BTreeSet<String>>,
}

fn seen(pager: &TestPager) -> Seen {
    let mut seen = Seen::default();
    for page in pager.pages() {
        seen.by_referral
            .entry(page.referral_id.clone())
            .or_default()
            .push(page.status);
        seen.delivery_ids
            .entry(page.referral_id)
            .or_default()
            .insert(page.delivery_id);
    }
    seen
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
    let pager = TestPager::new();
    let url = pager.start().await;
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
# The pager harness reads the referral id from each page.
payload = "referral"
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

    let mut first = start(config.path());
    wait_ready(&first.ops, Duration::from_secs(60)).await;
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
                        .payload(&breach_record(&referral)),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let delivered = |pager: &TestPager, prefix: &str| {
        seen(pager)
            .by_referral
            .iter()
            .filter(|(r, s)| r.starts_with(prefix) && s.contains(&200))
            .count()
    };

    // Phase A: delivered before the crash, and their offsets committed.
    for i in 0..PER_PHASE {
        produce(format!("R-A-{i:03}")).await;
    }
    wait_for("phase A delivered", Duration::from_secs(60), || {
        delivered(&pager, "R-A-") == PER_PHASE
    })
    .await;
    wait_for("phase A offsets committed", Duration::from_secs(30), || {
        committed_total(&brokers, &group, &input, 3) >= PER_PHASE
    })
    .await;
    // The outcomes are written to the changelog right after the deliveries; give that a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase B: the receiver fails, so these stay pending (retrying) in the state.
    pager.fail(true);
    for i in 0..PER_PHASE {
        produce(format!("R-B-{i:03}")).await;
    }
    wait_for(
        "every phase B page attempted",
        Duration::from_secs(60),
        || {
            seen(&pager)
                .by_referral
                .keys()
                .filter(|r| r.starts_with("R-B-"))
                .count()
                == PER_PHASE
        },
    )
    .await;
    wait_for("phase B offsets committed", Duration::from_secs(30), || {
        committed_total(&brokers, &group, &input, 3) >= 2 * PER_PHASE
    })
    .await;
    assert_eq!(delivered(&pager, "R-B-"), 0);

    first.sigkill();
    // SIGKILL: no drain, no final commit. The new instance starts at once; the group waits
    // out the dead member's session (6 s) before it hands over the partitions.
    pager.fail(false);
    let requests_before_restart = pager.pages().len();

    let mut second = start(config.path());
    wait_ready(&second.ops, Duration::from_secs(60)).await;
    wait_for(
        "phase B delivered after the restart",
        Duration::from_secs(90),
        || delivered(&pager, "R-B-") == PER_PHASE,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let s = seen(&pager);
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
    assert!(
        second.sigterm(Duration::from_secs(30)),
        "the second escalator exits cleanly on SIGTERM"
    );
}
