//! The exporter's counters survive restarts on the real broker: after a graceful stop they come
//! back at the same values before any new input, and after a crash (tasks aborted, no final
//! snapshot) every record is still counted exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use safeclock::app::{self, Running, Service};
use safeclock_common::config::Settings;
use safeclock_common::kafka::Topic;
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::{isolated_settings, produce, produce_to, real_broker};

const TIMEOUT: Duration = Duration::from_secs(60);

fn breach(n: u32) -> Vec<u8> {
    format!(
        r#"{{"slaEventId":"breach-{n}","referralId":"R-{n}","ruleId":"victim-contact","clockId":"c-{n}","transition":"SLA_TRANSITION_BREACHED","severity":"SEVERITY_HIGH","labels":{{"forceId":"nottinghamshire","category":"grooming","risk":"high"}},"startedAt":"2026-11-01T09:00:00Z","deadline":"2026-11-02T09:00:00Z","occurredAt":"2026-11-02T09:00:00Z","emittedAt":"2026-11-02T09:00:00Z","elapsed":"86400s","target":"86400s","ruleTitle":"t"}}"#
    )
    .into_bytes()
}

async fn start(settings: &Arc<Settings>, shutdown: &CancellationToken) -> Running {
    let running = app::start(
        settings.clone(),
        Service::Exporter,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .expect("exporter starts");
    let ready = running.readiness.clone();
    safeclock_tests::wait_for("the exporter to be assigned partitions", TIMEOUT, || {
        ready.is_ready()
    })
    .await;
    running
}

/// `safeclock_sla_breaches_total` for victim-contact in nottinghamshire, from `/metrics`, summed
/// over partitions.
async fn breaches(running: &Running) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", running.ops_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("safeclock_sla_breaches_total{")
                && l.contains(r#"force="nottinghamshire""#)
                && l.contains(r#"rule="victim-contact""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for_breaches(running: &Running, want: f64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let got = breaches(running).await;
        if got == want {
            return;
        }
        assert!(
            got < want,
            "counted {got} breaches, more than the {want} sent"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out at {got} breaches, waiting for {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts an exporter, checks it restored `restored` breaches before any new input, sends the
/// breaches numbered `new` and waits until it has counted them too.
async fn start_and_count(
    settings: &Arc<Settings>,
    restored: f64,
    new: std::ops::Range<u32>,
    why: &str,
) -> (Running, CancellationToken) {
    let brokers = &settings.kafka.brokers;
    let topic = settings.topic(Topic::SlaEvents);
    let shutdown = CancellationToken::new();
    let running = start(settings, &shutdown).await;
    assert_eq!(breaches(&running).await, restored, "{why}");
    let total = restored + new.len() as f64;
    for n in new {
        produce(brokers, &topic, &format!("R-{n}"), &breach(n)).await;
    }
    wait_for_breaches(&running, total).await;
    (running, shutdown)
}

async fn stop((running, shutdown): (Running, CancellationToken)) {
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_continue_across_a_graceful_restart_and_a_crash() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    let settings = Arc::new(settings);
    let topic = settings.topic(Topic::SlaEvents);

    // 1. Ten breaches, then a graceful stop (final snapshot, offsets committed).
    stop(start_and_count(&settings, 0.0, 0..10, "a new group starts at 0").await).await;

    // 2. Restarted: the counter is back at 10 before any new input, then counts on.
    let (running, _shutdown) =
        start_and_count(&settings, 10.0, 10..15, "restored before new input").await;

    // 3. A crash: the tasks are dropped with no final snapshot; more records arrive meanwhile.
    drop(running);
    for n in 15..20 {
        produce(&brokers, &topic, &format!("R-{n}"), &breach(n)).await;
    }
    let shutdown = CancellationToken::new();
    let running = start(&settings, &shutdown).await;
    // Every record exactly once: whatever the last snapshot covered is skipped, the rest counted.
    wait_for_breaches(&running, 20.0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(breaches(&running).await, 20.0, "no record counted twice");
    shutdown.cancel();
    running.wait().await.unwrap();
}

/// An exporter from before per-partition totals left one snapshot for all partitions (key: the
/// group, in partition 0 of `exporter-state`). Upgrading keeps its counts and skips what it
/// counted; after that each partition's own snapshot is the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_all_partitions_from_an_earlier_version_is_carried_over() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    let settings = Arc::new(settings);
    safeclock_common::kafka::ensure_topics(&settings, &Topic::ALL)
        .await
        .unwrap();
    let topic = settings.topic(Topic::SlaEvents);

    // Five breaches the earlier exporter counted (its totals say 7: it had counted two more
    // that have since left the log), and its snapshot with the offsets past them.
    let mut offsets = serde_json::Map::new();
    for n in 0..5 {
        let (p, o) = produce_to(&brokers, &topic, &format!("R-{n}"), &breach(n), None).await;
        let next = offsets.entry(p.to_string()).or_insert(0.into());
        *next = (next.as_i64().unwrap().max(o + 1)).into();
    }
    let legacy = serde_json::json!({
        "version": 1,
        "referrals_received": [],
        "transitions": [],
        "breaches": [[["nottinghamshire", "victim-contact", "high"], 7]],
        "time_to_stop": [],
        "offsets": { topic.clone(): offsets },
        "recent_sla_events": ""
    });
    produce_to(
        &brokers,
        &settings.topic(Topic::ExporterState),
        &settings.exporter.group_id,
        &serde_json::to_vec(&legacy).unwrap(),
        Some(0),
    )
    .await;

    let counted = start_and_count(&settings, 7.0, 5..8, "the earlier totals, restored").await;
    stop(counted).await;

    // Restarted: the per-partition snapshots written meanwhile are what is restored.
    let counted = start_and_count(
        &settings,
        10.0,
        8..9,
        "restored from per-partition snapshots",
    )
    .await;
    stop(counted).await;
}

/// The snapshot, not the committed offset, says where counting goes on: an older snapshot (as an
/// instance cut off from the group could write after its partitions moved on) is restored and
/// the records after it are counted again from the log, so the totals come out exact rather
/// than missing what lies between it and the committed offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_snapshot_than_the_committed_offsets_is_counted_on_from_its_own_offset() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    let settings = Arc::new(settings);
    stop(start_and_count(&settings, 0.0, 0..12, "a new group starts at 0").await).await;

    // Every partition's snapshot replaced by one from before anything was counted.
    let topic = settings.topic(Topic::SlaEvents);
    for p in 0..settings.kafka.partitions {
        let stale = serde_json::json!({
            "version": 1,
            "referrals_received": [],
            "transitions": [],
            "breaches": [],
            "time_to_stop": [],
            "offsets": { topic.clone(): { p.to_string(): 0 } },
        });
        produce_to(
            &brokers,
            &settings.topic(Topic::ExporterState),
            &format!("{}/{topic}/{p}", settings.exporter.group_id),
            &serde_json::to_vec(&stale).unwrap(),
            Some(p),
        )
        .await;
    }
    // Restored at 0, it reads the twelve again, and the new one: 13, each once. (Reading on from
    // the committed offset would leave it at 1.)
    let shutdown = CancellationToken::new();
    let running = start(&settings, &shutdown).await;
    produce(&brokers, &topic, "R-12", &breach(12)).await;
    wait_for_breaches(&running, 13.0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(breaches(&running).await, 13.0, "no record counted twice");
    stop((running, shutdown)).await;
}
