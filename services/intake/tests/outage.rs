//! The broker dies while intake is under load, and comes back.
//!
//! This test starts a one-node Apache Kafka of its own (`safeclock_tests::kafka_cluster`: what it
//! acknowledged survives the restart, on the same port), posts events from several concurrent clients, SIGKILLs the broker, keeps posting,
//! restarts it, keeps posting, then reads the topic. It shows: during the outage intake answers
//! 503 (never 202); every event that got 202 is on the topic; and after de-duplication by event
//! id each is there exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, event, post, settings, start};
use rdkafka::message::Message;
use safeclock_common::kafka::Topic;
use safeclock_tests::kafka_cluster::KafkaCluster;
use safeclock_tests::{read_until, reader};

#[derive(Debug, Default)]
struct Tally {
    /// Event id -> the status it was answered with (last answer wins; ids are never re-sent).
    answers: BTreeMap<String, u16>,
    /// Statuses answered while the broker was down.
    during_outage: Vec<u16>,
    accepted_after_restart: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_under_load_never_202_for_unstored_events_and_loses_nothing() {
    let dir = tempfile_dir();
    let broker = tokio::task::block_in_place(|| KafkaCluster::start(&dir, 1, 3, &[]));
    let brokers = broker.bootstrap().to_string();
    let mut s = settings(&brokers);
    s.intake.delivery_timeout_ms = 2000;
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, true).await;

    let phase = Arc::new(Mutex::new("up")); // "up", "down", "restarted"
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut posters = Vec::new();
    for worker in 0..8 {
        let (phase, stop, tally, url) = (
            phase.clone(),
            stop.clone(),
            tally.clone(),
            intake.url.clone(),
        );
        posters.push(tokio::spawn(async move {
            let http = client();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let id = format!("w{worker}-{seq}");
                let body = serde_json::json!([
                    event(&format!("{id}-a"), &format!("R-{worker}-{seq}")),
                    event(&format!("{id}-b"), &format!("R-{worker}-{seq}")),
                ]);
                let sent_in = *phase.lock().unwrap();
                let (status, body, headers) = post(&http, &url, &body).await;
                assert!(matches!(status, 202 | 503), "{status}: {body}");
                if status == 503 {
                    assert!(headers.contains_key("retry-after"));
                }
                let now = *phase.lock().unwrap();
                {
                    let mut t = tally.lock().unwrap();
                    for suffix in ["a", "b"] {
                        t.answers.insert(format!("{id}-{suffix}"), status);
                    }
                    if sent_in == "down" && now == "down" {
                        t.during_outage.push(status);
                    }
                    if sent_in == "restarted" && status == 202 {
                        t.accepted_after_restart += 1;
                    }
                }
                if status == 503 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    // "down" once the broker is gone (requests answered before that may well be 202).
    tokio::task::block_in_place(|| broker.kill(1));
    *phase.lock().unwrap() = "down";
    tokio::time::sleep(Duration::from_secs(6)).await;
    tokio::task::block_in_place(|| broker.start_node(1));
    *phase.lock().unwrap() = "restarted";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tally.lock().unwrap().accepted_after_restart < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "intake did not recover after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for p in posters {
        p.await.unwrap();
    }

    let t = std::mem::take(&mut *tally.lock().unwrap());
    let accepted: HashSet<&String> = t
        .answers
        .iter()
        .filter(|(_, s)| **s == 202)
        .map(|(id, _)| id)
        .collect();
    let refused = t.answers.len() - accepted.len();
    assert!(
        !t.during_outage.is_empty() && t.during_outage.iter().all(|s| *s == 503),
        "while the broker was down every answer must be 503: {:?}",
        t.during_outage
    );
    assert!(refused > 0);

    // Every 202 is on the topic; by event id, exactly once after de-duplication.
    let consumer = reader(&brokers, &[&topic]);
    let mut on_topic: BTreeMap<String, usize> = BTreeMap::new();
    let got = read_until(&consumer, Duration::from_secs(90), |m| {
        for r in m.iter().skip(on_topic.values().sum()) {
            let v: serde_json::Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
            *on_topic
                .entry(v["eventId"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        accepted.iter().all(|id| on_topic.contains_key(*id))
    })
    .await;
    let unknown: Vec<&String> = on_topic
        .keys()
        .filter(|id| !t.answers.contains_key(*id))
        .collect();
    assert!(unknown.is_empty(), "records nobody posted: {unknown:?}");
    let duplicated = on_topic.values().filter(|n| **n > 1).count();
    let stored_after_503 = on_topic
        .keys()
        .filter(|id| t.answers.get(*id) == Some(&503))
        .count();
    eprintln!(
        "outage: {} events answered 202, {refused} answered 503 ({} requests during the outage, all 503); \
         {} records on the topic, {} distinct ids; {duplicated} ids stored more than once; \
         {stored_after_503} events answered 503 were stored anyway (the sender retries; de-duplicated by id)",
        accepted.len(),
        t.during_outage.len(),
        got.len(),
        on_topic.len()
    );
    intake.stop().await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("safeclock-outage-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
