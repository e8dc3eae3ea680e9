//! Component tests of intake on librdkafka's in-process mock cluster: no broker process needed.
//! The mock can take its broker down and bring it back, so the 503-then-recover path runs here
//! too, deterministically.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, event, post, settings, start};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use safeclock_common::kafka::Topic;
use safeclock_tests::{read_until, reader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_gives_503_and_after_it_returns_202_events_are_stored_once() {
    let mock = MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    let mut s = settings(&brokers);
    s.kafka.create_topics = false;
    s.intake.delivery_timeout_ms = 1000;
    for t in [Topic::ReferralEvents, Topic::DeadLetter] {
        mock.create_topic(&s.topic(t), s.kafka.partitions, 1)
            .unwrap();
    }
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, false).await;
    let http = client();

    // Warm up: the first produce also connects and sets up the idempotent producer, which can
    // take longer than the 1 s delivery timeout on a loaded machine. A sender retries a 503.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while post(&http, &intake.url, &event("m-0", "R-0")).await.0 != 202 {
        assert!(tokio::time::Instant::now() < deadline, "never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body, _) = post(&http, &intake.url, &event("m-1", "R-1")).await;
    assert_eq!(status, 202, "{body}");

    mock.broker_down(1).unwrap();
    let (status, body, headers) = post(&http, &intake.url, &event("m-2", "R-2")).await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"));

    mock.broker_up(1).unwrap();
    // The sender retries the refused request until it is accepted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = post(&http, &intake.url, &event("m-2", "R-2")).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body, _) = post(&http, &intake.url, &event("m-1", "R-1")).await;
    assert_eq!((status, body["duplicates"].as_u64()), (202, Some(1)));

    let consumer = reader(&brokers, &[&topic]);
    let got = read_until(&consumer, Duration::from_secs(30), |m| {
        let ids: std::collections::BTreeSet<String> = m
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(r.payload().unwrap()).unwrap()
                    ["eventId"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        ids.contains("m-1") && ids.contains("m-2")
    })
    .await;
    let stored = got
        .iter()
        .filter(|r| !String::from_utf8_lossy(r.payload().unwrap()).contains(r#""m-0""#))
        .count();
    assert!(stored <= 3, "at most the one 503 attempt stored twice");
    intake.stop().await;
}

#[tokio::test]
async fn refuses_to_start_without_a_client_token() {
    let mock = MockCluster::new(1).unwrap();
    let mut s = settings(&mock.bootstrap_servers());
    s.intake.tokens.clear();
    let intake = start(s, false).await;
    let err = intake.task.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("intake.tokens"), "{err}");
}
