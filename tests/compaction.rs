//! Compaction of the clock's changelog on Apache Kafka, for real: with an aggressive cleaner
//! (segments rolled every 200 ms, `min.cleanable.dirty.ratio=0.01`, tombstones kept 500 ms, all
//! set through `kafka.compacted_topic_configs`), superseded states and tombstoned keys disappear
//! from `clock-state`, and a restore from the compacted topic yields exactly the state restored
//! before the cleaner ran (same referrals, same clocks and deadlines, so the same next outputs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::SignedDuration;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock_common::config::Settings;
use safeclock_common::kafka::Topic;
use safeclock_common::policy::Policy;
use safeclock_common::schema::v1::ReferralState;
use safeclock_tests::{committed_total, isolated_settings, real_broker, InProcess};

const KEEP: usize = 60;
const GONE: usize = 30;

/// Every record of `topic` (all `partitions`) from the beginning, read to the end of each.
fn scan(brokers: &str, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    safeclock_tests::read_to_end(
        brokers,
        topic,
        partitions,
        "read_uncommitted",
        Duration::from_secs(60),
    )
}

fn key(m: &OwnedMessage) -> String {
    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned()
}

/// The state of `referrals` as the clock restores it from the changelog, every partition, and
/// the number of open clocks restored in all.
async fn restored(
    settings: &Arc<Settings>,
    referrals: &[String],
) -> (BTreeMap<String, Option<ReferralState>>, usize) {
    let mut states = BTreeMap::new();
    let mut open = 0;
    for p in 0..settings.kafka.partitions {
        let policy = Policy::load(settings).unwrap();
        let (engine, _records) =
            safeclock_clock::restore::restore_partition(settings.clone(), policy, p)
                .await
                .unwrap();
        open += engine.stats().open_clocks;
        for r in referrals {
            if let Some(state) = engine.export(r) {
                assert!(states.insert(r.clone(), Some(state)).is_none());
            }
        }
    }
    for r in referrals {
        states.entry(r.clone()).or_insert(None);
    }
    (states, open)
}

fn event(referral: &str, n: usize, at: jiff::Timestamp, kind: &str) -> String {
    format!(
        r#"{{"eventId":"{referral}-e{n}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}",{kind}}}"#
    )
}

const RECEIVED: &str =
    r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstoned_keys_disappear_and_a_restore_from_the_compacted_changelog_is_the_same() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    for (k, v) in [
        ("segment.ms", "200"),
        ("min.cleanable.dirty.ratio", "0.01"),
        ("delete.retention.ms", "500"),
        ("min.compaction.lag.ms", "0"),
        ("file.delete.delay.ms", "1000"),
    ] {
        settings
            .kafka
            .compacted_topic_configs
            .insert(k.into(), v.into());
    }
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::ReferralEvents);
    let changelog = settings.topic(Topic::ClockState);
    let partitions = settings.kafka.partitions;
    let clock = InProcess::start(
        &settings,
        safeclock::app::Service::Clock,
        Duration::from_secs(60),
    )
    .await;

    // The topics were created with the configs: compacted ones compacted, with the cleaner
    // settings; the others not.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let sla = settings.topic(Topic::SlaEvents);
    let outcomes = settings.topic(Topic::SlaOutcomes);
    let described = admin
        .describe_configs(
            &[
                ResourceSpecifier::Topic(&changelog),
                ResourceSpecifier::Topic(&outcomes),
                ResourceSpecifier::Topic(&sla),
            ],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    let value = |i: usize, name: &str| -> Option<String> {
        described[i]
            .as_ref()
            .unwrap()
            .get(name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value(0, "cleanup.policy").as_deref(), Some("compact"));
    assert_eq!(value(0, "segment.ms").as_deref(), Some("200"));
    assert_eq!(
        value(0, "min.cleanable.dirty.ratio").as_deref(),
        Some("0.01")
    );
    assert_eq!(value(1, "cleanup.policy").as_deref(), Some("compact"));
    assert_eq!(value(2, "cleanup.policy").as_deref(), Some("delete"));

    // KEEP referrals with three states each (received, victim contacted, a device seized) and
    // GONE referrals with one, all with deadlines a day or more away.
    let at = safeclock_tests::now() - SignedDuration::from_hours(1);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let send = |topic: String, key: String, value: Option<String>, partition: Option<i32>| {
        let producer = producer.clone();
        async move {
            let mut record = FutureRecord::<str, str>::to(&topic).key(&key);
            if let Some(v) = &value {
                record = record.payload(v);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let keep: Vec<String> = (0..KEEP).map(|i| format!("R-KEEP-{i:03}")).collect();
    let gone: Vec<String> = (0..GONE).map(|i| format!("R-GONE-{i:03}")).collect();
    let mut inputs = 0;
    for (n, kind) in [
        RECEIVED,
        r#""victimContacted":{}"#,
        r#""deviceSeized":{"deviceRef":"DEV-1"}"#,
    ]
    .iter()
    .enumerate()
    {
        for r in &keep {
            send(input.clone(), r.clone(), Some(event(r, n, at, kind)), None).await;
            inputs += 1;
        }
    }
    for r in &gone {
        send(
            input.clone(),
            r.clone(),
            Some(event(r, 0, at, RECEIVED)),
            None,
        )
        .await;
        inputs += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_total(&brokers, &settings.clock.group_id, &input, partitions) < inputs {
        assert!(Instant::now() < deadline, "the inputs were never committed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = scan(&brokers, &changelog, partitions);
    let partition_of: BTreeMap<String, i32> =
        before.iter().map(|m| (key(m), m.partition())).collect();
    assert!(gone.iter().all(|r| partition_of.contains_key(r)));
    // The clock wrote superseded states (the cleaner may already have removed some).
    let writes = safeclock_tests::counter(
        &clock.running.registry,
        "safeclock_clock_state_writes_total",
        &[],
    );
    assert!(
        writes > (KEEP + GONE) as f64,
        "superseded states were written: {writes}"
    );

    // The GONE referrals are deleted: a tombstone each, on the partition the clock writes them
    // to (what the changelog holds when a referral's state is dropped).
    for r in &gone {
        send(changelog.clone(), r.clone(), None, Some(partition_of[r])).await;
    }
    let all: Vec<String> = keep.iter().chain(&gone).cloned().collect();
    let (expected, _) = restored(&settings, &all).await;
    assert!(gone.iter().all(|r| expected[r].is_none()));
    assert!(keep.iter().all(|r| expected[r].is_some()));

    // The clock goes on writing (new referrals, one every 250 ms: each rolls a segment) until
    // the cleaner has removed every superseded state and every tombstone.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    let mut late = 0usize;
    let mut last_scan = Instant::now();
    let after = loop {
        assert!(
            Instant::now() < deadline,
            "the cleaner did not compact {changelog} within 150 s"
        );
        let r = format!("R-LATE-{late:04}");
        send(
            input.clone(),
            r.clone(),
            Some(event(&r, 0, at, RECEIVED)),
            None,
        )
        .await;
        late += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        if last_scan.elapsed() < Duration::from_secs(2) {
            continue;
        }
        last_scan = Instant::now();
        let now = scan(&brokers, &changelog, partitions);
        let gone_left = now.iter().filter(|m| key(m).starts_with("R-GONE")).count();
        let keep_records = now.iter().filter(|m| key(m).starts_with("R-KEEP")).count();
        if gone_left == 0 && keep_records == KEEP {
            break now;
        }
    };
    eprintln!(
        "{changelog}: {writes} states and {GONE} tombstones written for {} keys ({} records on \
         the topic at the first scan), {} records after {:.1} s (KEEP and GONE: {} records; \
         {late} later referrals written meanwhile)",
        partition_of.len(),
        before.len(),
        after.len(),
        started.elapsed().as_secs_f64(),
        after
            .iter()
            .filter(|m| !key(m).starts_with("R-LATE"))
            .count(),
    );
    clock.stop().await;

    // Restored from the compacted changelog: the same state, referral by referral (clocks,
    // deadlines, seen events), so the same next outputs; the tombstoned ones stay gone.
    let (again, open) = restored(&settings, &all).await;
    assert_eq!(again, expected);

    // A clock restarted on it holds every clock: KEEP's, and the later referrals'.
    let restarted = InProcess::start(
        &settings,
        safeclock::app::Service::Clock,
        Duration::from_secs(60),
    )
    .await;
    safeclock_tests::wait_for(
        "the restarted clock's open clocks",
        Duration::from_secs(20),
        || restarted.gauge("safeclock_clock_open_clocks") == open as i64,
    )
    .await;
    restarted.stop().await;
}
