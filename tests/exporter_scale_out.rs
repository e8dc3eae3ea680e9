//! Several exporters share the input on the real broker: scaled from one instance to two and back
//! to one mid-stream, together they count every record exactly once, each input partition is
//! served by one instance at a time, and a partition's series move to the instance that takes it
//! over at the value they had (so no series ever goes down, which Prometheus would read as a
//! counter reset), records published again after a hand-over included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use safeclock::app::Service;
use safeclock_common::config::Settings;
use safeclock_common::kafka::Topic;
use safeclock_tests::scenario::received;
use safeclock_tests::{isolated_settings, produce, real_broker, wait_for, InProcess};

const TIMEOUT: Duration = Duration::from_secs(90);
const PER_PHASE: u32 = 60;

fn breach(n: u32) -> Vec<u8> {
    format!(
        r#"{{"slaEventId":"breach-{n}","referralId":"R-{n}","ruleId":"victim-contact","clockId":"c-{n}","transition":"SLA_TRANSITION_BREACHED","severity":"SEVERITY_HIGH","labels":{{"forceId":"nottinghamshire","category":"grooming","risk":"high"}},"startedAt":"2026-11-01T09:00:00Z","deadline":"2026-11-02T09:00:00Z","occurredAt":"2026-11-02T09:00:00Z","emittedAt":"2026-11-02T09:00:00Z","elapsed":"86400s","target":"86400s","ruleTitle":"t"}}"#
    )
    .into_bytes()
}

/// One referral received and its victim-contact breach, both keyed by the referral (so the
/// referral event and the SLA event are in the same-numbered partition of their topics).
async fn publish(brokers: &str, settings: &Settings, range: std::ops::Range<u32>) {
    let at = safeclock_tests::now() - jiff::SignedDuration::from_hours(30);
    for n in range {
        let referral = format!("R-{n}");
        produce(
            brokers,
            &settings.topic(Topic::ReferralEvents),
            &referral,
            &received(&format!("e-{n}"), &referral, "nottinghamshire", at),
        )
        .await;
        produce(
            brokers,
            &settings.topic(Topic::SlaEvents),
            &referral,
            &breach(n),
        )
        .await;
    }
}

const COUNTERS: [&str; 2] = [
    "safeclock_referrals_received_total",
    "safeclock_sla_breaches_total",
];

/// The exporter's counters of one instance, by (metric, `partition` label).
fn counters(instance: &InProcess) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for family in instance.running.registry.gather() {
        if !COUNTERS.contains(&family.name()) {
            continue;
        }
        for m in family.get_metric() {
            let partition = m
                .get_label()
                .iter()
                .find(|l| l.name() == "partition")
                .map(|l| l.value().to_string())
                .expect("every exporter series has a partition label");
            *out.entry((family.name().to_string(), partition))
                .or_default() += m.get_counter().get_value();
        }
    }
    out
}

/// What all `instances` serve together; panics if two serve one partition's series.
fn served(instances: &[&InProcess]) -> BTreeMap<(String, String), f64> {
    let mut all = BTreeMap::new();
    for instance in instances {
        for (series, value) in counters(instance) {
            assert!(
                all.insert(series.clone(), value).is_none(),
                "{series:?} is served by two instances at once"
            );
        }
    }
    all
}

/// The sum of `metric` in `served`.
fn total(served: &BTreeMap<(String, String), f64>, metric: &str) -> f64 {
    served
        .iter()
        .filter(|((m, _), _)| m == metric)
        .map(|(_, v)| v)
        .sum()
}

/// Waits until `instances` together count `want` referrals and `want` breaches, then checks that
/// it stays so, and that every series that existed `before` still does, at no lower a value.
async fn settle(
    instances: &[&InProcess],
    want: f64,
    before: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    wait_for(
        &format!("{want} referrals and breaches counted"),
        TIMEOUT,
        || {
            // `served` fails the test if a hand-over ever leaves a partition served twice.
            let now = served(instances);
            COUNTERS.iter().all(|m| total(&now, m) >= want)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = served(instances);
    for metric in COUNTERS {
        assert_eq!(total(&now, metric), want, "{metric}, counted once: {now:?}");
    }
    for (series, value) in before {
        let after = now.get(series).copied().unwrap_or_default();
        assert!(
            after >= *value,
            "{series:?} went down from {value} to {after}"
        );
    }
    now
}

/// Input partitions (of both topics) `instance` holds.
fn partitions(instance: &InProcess) -> i64 {
    instance.gauge("safeclock_exporter_partitions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_exporters_count_every_record_once_and_series_move_with_partitions() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    let settings: Arc<Settings> = Arc::new(settings);
    let all_partitions = 2 * i64::from(settings.kafka.partitions);

    // One instance: every partition of both inputs is its.
    let first = InProcess::start(&settings, Service::Exporter, TIMEOUT).await;
    publish(&brokers, &settings, 0..PER_PHASE).await;
    let one = settle(&[&first], f64::from(PER_PHASE), &BTreeMap::new()).await;
    assert_eq!(partitions(&first), all_partitions);
    eprintln!("one instance: {one:?}");

    // A second instance joins: the partitions are shared, each served by one of them.
    let second = InProcess::start(&settings, Service::Exporter, TIMEOUT).await;
    wait_for("both instances to hold partitions", TIMEOUT, || {
        partitions(&first) > 0
            && partitions(&second) > 0
            && partitions(&first) + partitions(&second) == all_partitions
    })
    .await;
    publish(&brokers, &settings, PER_PHASE..2 * PER_PHASE).await;
    // Published again (as a clock does after a crash): not counted twice by the new owner.
    publish(&brokers, &settings, 0..PER_PHASE / 2).await;
    let two = settle(&[&first, &second], f64::from(2 * PER_PHASE), &one).await;
    eprintln!(
        "two instances: the first holds {} partitions and serves {:?}, the second {} and {:?}",
        partitions(&first),
        counters(&first).keys().collect::<Vec<_>>(),
        partitions(&second),
        counters(&second).keys().collect::<Vec<_>>()
    );

    // The first leaves (a graceful stop hands its partitions over): the second serves them all,
    // continuing from the values the first had.
    first.stop().await;
    publish(&brokers, &settings, 2 * PER_PHASE..3 * PER_PHASE).await;
    publish(&brokers, &settings, PER_PHASE..PER_PHASE + PER_PHASE / 2).await;
    let last = settle(&[&second], f64::from(3 * PER_PHASE), &two).await;
    assert_eq!(partitions(&second), all_partitions);
    eprintln!("one instance again: {last:?}");
    second.stop().await;
}
