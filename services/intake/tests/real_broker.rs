//! Intake against the real broker process (`SAFECLOCK_TEST_BROKERS`, started by scripts/test.sh):
//! what gets 202 is on the topic, what is refused is not, and the HTTP contract holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, event, post, settings, start, TOKEN};
use rdkafka::message::Message;
use safeclock_common::config::{IntakeClientGrant, Secret};
use safeclock_common::kafka::Topic;
use safeclock_tests::{header, read_until, reader, real_broker};

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn accepted_events_are_on_the_topic_once_keyed_by_referral() {
    let brokers = real_broker();
    let s = settings(&brokers);
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, true).await;
    let http = client();

    let (status, body, _) = post(&http, &intake.url, &event("e-1", "R-1")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let batch = serde_json::json!([
        event("e-2", "R-2"),
        event("e-3", "R-2"),
        event("e-2", "R-2")
    ]);
    let (status, body, _) = post(&http, &intake.url, &batch).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(body["events"][2]["status"], "duplicate");

    // Sending the same request again stores nothing new.
    let (status, body, _) = post(&http, &intake.url, &batch).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(3))
    );
    let (status, _, _) = post(&http, &intake.url, &event("e-4", "R-4")).await;
    assert_eq!(status, 202);

    let consumer = reader(&brokers, &[&topic]);
    let got = read_until(&consumer, TIMEOUT, |m| m.len() >= 4).await;
    // Nothing more arrives (the repeats were not produced).
    let more = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await;
    assert!(more.is_err(), "an extra record was stored");
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(
                header(m, "safeclock.intake.client").as_deref(),
                Some("test-rms")
            );
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            assert_eq!(v["referralId"].as_str().unwrap(), key);
            // Canonical proto3 JSON that every consumer decodes.
            safeclock_common::event::decode_referral_event(m.payload().unwrap()).unwrap();
            (v["eventId"].as_str().unwrap().to_string(), key)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("e-1", "R-1"),
            ("e-2", "R-2"),
            ("e-3", "R-2"),
            ("e-4", "R-4")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(
        intake.metric("safeclock_intake_events_total", ("result", "accepted")),
        4.0
    );
    intake.stop().await;
}

#[tokio::test]
async fn invalid_events_get_400_per_event_with_field_and_reason_and_nothing_is_stored() {
    let brokers = real_broker();
    let s = settings(&brokers);
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, true).await;
    let http = client();

    let mut missing = event("bad-1", "R-9");
    missing.as_object_mut().unwrap().remove("referralId");
    let mut wrong_enum = event("bad-2", "R-9");
    wrong_enum["referralReceived"]["category"] = "Jane Smith".into();
    let mut future = event("bad-3", "R-9");
    future["occurredAt"] = "2099-01-01T00:00:00Z".into();
    let mut force = event("bad-4", "R-9");
    force["forceId"] = "atlantis".into();
    let mut no_kind = event("bad-5", "R-9");
    no_kind.as_object_mut().unwrap().remove("referralReceived");
    let mut typed = event("bad-6", "R-9");
    typed["occurredAt"] = 17.into();
    let batch = serde_json::json!([
        event("good-0", "R-9"),
        missing,
        wrong_enum,
        future,
        force,
        no_kind,
        typed
    ]);
    let (status, body, _) = post(&http, &intake.url, &batch).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_events");
    let errors: Vec<(u64, String, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["field"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        (1, "referralId", "missing_field"),
        (2, "referralReceived.category", "invalid_json"),
        (3, "occurredAt", "implausible_time"),
        (4, "forceId", "unknown_force"),
        (5, "", "unknown_event_kind"),
        (6, "occurredAt", "invalid_json"),
    ]
    .map(|(i, f, r)| (i, f.to_string(), r.to_string()));
    assert_eq!(errors, expected, "{body}");
    assert!(
        !body.to_string().contains("Jane"),
        "values are never echoed"
    );
    assert_eq!(
        intake.metric(
            "safeclock_records_invalid_total",
            ("reason", "unknown_force")
        ),
        1.0
    );

    // Nothing of the refused request was stored: the first record is the next good one.
    let (status, _, _) = post(&http, &intake.url, &event("good-1", "R-9")).await;
    assert_eq!(status, 202);
    let consumer = reader(&brokers, &[&topic]);
    let got = read_until(&consumer, TIMEOUT, |m| !m.is_empty()).await;
    let v: serde_json::Value = serde_json::from_slice(got[0].payload().unwrap()).unwrap();
    assert_eq!(v["eventId"], "good-1");
    intake.stop().await;
}

#[tokio::test]
async fn a_token_sends_only_for_its_forces_and_source_systems_else_403_and_nothing_is_stored() {
    const NOTTS: &str = "notts-only-token-0123456789";
    let brokers = real_broker();
    let mut s = settings(&brokers);
    s.intake.add_client(
        "notts-niche",
        Secret::new(NOTTS),
        IntakeClientGrant {
            forces: vec!["nottinghamshire".into()],
            source_systems: vec!["niche".into()],
        },
    );
    let topic = s.topic(Topic::ReferralEvents);
    let intake = start(s, true).await;
    let http = client();
    let send = |body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}/v1/events", intake.url);
        async move {
            let r = http
                .post(url)
                .bearer_auth(NOTTS)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let mut own = event("own-1", "R-NOTTS");
    own["sourceSystem"] = "niche".into();
    let mut other_force = event("other-1", "R-DERBY");
    other_force["forceId"] = "derbyshire".into();
    other_force["sourceSystem"] = "niche".into();
    let other_system = event("other-2", "R-NOTTS");

    // One event for a force the token is not granted refuses the whole batch with 403.
    let (status, body) = send(serde_json::json!([own.clone(), other_force, other_system])).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden_events");
    let refused: Vec<(u64, &str, &str)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["field"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (1, "forceId", "force_not_granted"),
            (2, "sourceSystem", "source_system_not_granted")
        ]
    );
    assert!(
        !body.to_string().contains("derbyshire"),
        "values are never echoed: {body}"
    );
    assert_eq!(
        intake.metric("safeclock_intake_events_total", ("result", "forbidden")),
        3.0
    );
    // Its own force and system: stored, and the first record on the topic.
    let (status, body) = send(own).await;
    assert_eq!(status, 202, "{body}");
    // The all-forces test token still sends for another force.
    let mut derby = event("derby-1", "R-DERBY");
    derby["forceId"] = "derbyshire".into();
    let (status, body, _) = post(&http, &intake.url, &derby).await;
    assert_eq!(status, 202, "{body}");
    let consumer = reader(&brokers, &[&topic]);
    let got = read_until(&consumer, TIMEOUT, |m| m.len() >= 2).await;
    let ids: Vec<String> = got
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            v["eventId"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        ids.contains(&"own-1".to_string()) && ids.contains(&"derby-1".to_string()),
        "{ids:?}"
    );
    let more = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await;
    assert!(more.is_err(), "a refused event was stored");
    intake.stop().await;
}

#[tokio::test]
async fn auth_size_and_media_type_are_enforced_and_the_document_is_served() {
    let brokers = real_broker();
    let mut s = settings(&brokers);
    s.intake.max_body_bytes = 4096;
    s.intake.max_batch_events = 3;
    let intake = start(s, true).await;
    let http = client();
    let url = format!("{}/v1/events", intake.url);
    let one = event("a-1", "R-1");

    let r = http.post(&url).json(&one).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http
        .post(&url)
        .bearer_auth("test-token-0123456789abcdeX")
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .body(one.to_string())
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let big = serde_json::json!({"eventId": "x".repeat(5000)});
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let four = serde_json::json!([one, one, one, one]);
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&four)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_events");
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    let served = http
        .get(format!("{}/openapi.json", intake.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(served, file);
    let r = http
        .get(format!("{}/healthz", intake.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Ready once the broker answered the first metadata probe.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let r = http
            .get(format!("{}/readyz", intake.url))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    intake.stop().await;
}

#[tokio::test]
async fn no_broker_means_503_with_retry_after_never_202() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut s = settings(&format!("127.0.0.1:{port}"));
    s.intake.delivery_timeout_ms = 500;
    let intake = start(s, false).await;
    let http = client();
    let (status, body, headers) = post(&http, &intake.url, &event("o-1", "R-1")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "broker_unavailable");
    assert_eq!(headers["retry-after"], "5");
    let r = http
        .get(format!("{}/readyz", intake.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    intake.stop().await;
}
