//! Hostile input on the real broker process: each kind of bad referral event, fed to the clock
//! and the exporter, lands in the dead-letter topic with the right reason and the original bytes,
//! the invalid-records counter goes up by reason, and the good records around it are processed;
//! likewise each kind of bad SLA event fed to the escalator.
//! Then `safeclock dlq` lists those dead letters and replays selected ones to the source topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rdkafka::message::Message;
use safeclock::app::{self, Service};
use safeclock::dlq::{self, Filter};
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::scenario::received;
use safeclock_tests::{header, isolated_settings, produce, read_until, reader, real_broker};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Every kind of bad record, with the reason it must be dead-lettered for.
fn bad_records(now: Timestamp) -> Vec<(&'static str, Vec<u8>)> {
    let event = |fields: &str| {
        format!(
            r#"{{"eventId":"bad","referralId":"R-G","forceId":"nottinghamshire","occurredAt":"{now}",{fields}}}"#
        )
        .into_bytes()
    };
    let kind = r#""victimContacted":{}"#;
    let mut oversized = event(kind);
    oversized.truncate(oversized.len() - 1);
    oversized.extend(format!(r#","pad":"{}"}}"#, "x".repeat(70_000)).into_bytes());
    vec![
        ("empty", Vec::new()),
        ("invalid_json", b"{\"eventId\": \"half a record".to_vec()),
        ("invalid_json", b"\xff\xfe binary".to_vec()),
        ("unknown_event_kind", event(r#""alienLanded":{}"#)),
        (
            "missing_field",
            format!(r#"{{"eventId":"bad","forceId":"nottinghamshire","occurredAt":"{now}",{kind}}}"#)
                .into_bytes(),
        ),
        (
            "invalid_json",
            br#"{"eventId":"bad","referralId":"R-G","forceId":"nottinghamshire","occurredAt":17,"victimContacted":{}}"#.to_vec(),
        ),
        (
            "invalid_field",
            format!(r#"{{"eventId":"bad","referralId":"Jane Smith","forceId":"nottinghamshire","occurredAt":"{now}",{kind}}}"#)
                .into_bytes(),
        ),
        (
            "implausible_time",
            format!(r#"{{"eventId":"bad","referralId":"R-G","forceId":"nottinghamshire","occurredAt":"{}",{kind}}}"#, now + SignedDuration::from_hours(24 * 30))
                .into_bytes(),
        ),
        (
            "implausible_time",
            br#"{"eventId":"bad","referralId":"R-G","forceId":"nottinghamshire","occurredAt":"1970-01-01T00:00:00Z","victimContacted":{}}"#.to_vec(),
        ),
        ("oversized", oversized),
        (
            "unknown_force",
            format!(r#"{{"eventId":"bad","referralId":"R-G","forceId":"atlantis","occurredAt":"{now}",{kind}}}"#)
                .into_bytes(),
        ),
    ]
}

#[tokio::test]
async fn each_kind_of_bad_record_is_dead_lettered_by_clock_and_exporter_and_good_ones_are_processed(
) {
    let brokers = real_broker();
    let settings = Arc::new(isolated_settings(&brokers));
    let input = settings.topic(Topic::ReferralEvents);
    let dlq_topic = settings.topic(Topic::DeadLetter);
    let shutdown = CancellationToken::new();
    let mut running = Vec::new();
    for service in [Service::Clock, Service::Exporter] {
        running.push(
            app::start(
                settings.clone(),
                service,
                safeclock_tests::test_time(),
                "127.0.0.1:0".parse().unwrap(),
                shutdown.clone(),
            )
            .await
            .unwrap(),
        );
    }

    // All under one key, so in one partition and in this order: good, every bad kind, good.
    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let bad = bad_records(now);
    produce(
        &brokers,
        &input,
        "R-G",
        &received("g-1", "R-G1", "nottinghamshire", now),
    )
    .await;
    for (_, payload) in &bad {
        produce(&brokers, &input, "R-G", payload).await;
    }
    produce(
        &brokers,
        &input,
        "R-G",
        &received("g-2", "R-G2", "nottinghamshire", now),
    )
    .await;

    // Dead letters: each bad record once per consumer, with its reason and original bytes.
    let consumer = reader(&brokers, &[&dlq_topic]);
    let letters = read_until(&consumer, TIMEOUT, |m| m.len() >= 2 * bad.len()).await;
    for service in ["clock", "exporter"] {
        let mut got: Vec<(i64, String, Vec<u8>)> = letters
            .iter()
            .filter(|m| header(m, dlq_headers::SERVICE).as_deref() == Some(service))
            .map(|m| {
                assert_eq!(
                    header(m, dlq_headers::SOURCE_TOPIC).as_deref(),
                    Some(input.as_str())
                );
                assert_eq!(m.key(), Some(&b"R-G"[..]));
                let error = header(m, dlq_headers::ERROR).unwrap();
                assert!(
                    !error.contains("Jane"),
                    "values are never in headers: {error}"
                );
                (
                    header(m, dlq_headers::SOURCE_OFFSET)
                        .unwrap()
                        .parse()
                        .unwrap(),
                    header(m, dlq_headers::REASON).unwrap(),
                    m.payload().unwrap_or_default().to_vec(),
                )
            })
            .collect();
        got.sort_by_key(|(offset, _, _)| *offset);
        let reasons: Vec<&str> = got.iter().map(|(_, r, _)| r.as_str()).collect();
        let expected: Vec<&str> = bad.iter().map(|(r, _)| *r).collect();
        assert_eq!(reasons, expected, "{service}");
        for ((_, _, payload), (_, original)) in got.iter().zip(&bad) {
            assert_eq!(payload, original, "{service}: original bytes kept");
        }
    }

    // The good records around them were processed: the clock started both referrals' clocks,
    // the exporter counted both referrals.
    let sla = reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    read_until(&sla, TIMEOUT, |m| {
        let referrals: std::collections::BTreeSet<String> = m
            .iter()
            .filter_map(|r| decode_sla_event(r.payload().unwrap_or_default()).ok())
            .map(|e| e.referral_id)
            .collect();
        referrals.contains("R-G1") && referrals.contains("R-G2")
    })
    .await;
    let counters = |registry: &prometheus::Registry, name: &str| -> BTreeMap<String, f64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                let labels: Vec<String> = m
                    .get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect();
                (labels.join(","), m.get_counter().get_value())
            })
            .collect()
    };
    let exporter = &running[1].registry;
    safeclock_tests::wait_for("the exporter to count both referrals", TIMEOUT, || {
        counters(exporter, "safeclock_referrals_received_total")
            .values()
            .sum::<f64>()
            >= 2.0
    })
    .await;
    for (i, service) in ["clock", "exporter"].iter().enumerate() {
        let invalid = counters(&running[i].registry, "safeclock_records_invalid_total");
        for reason in [
            "empty",
            "invalid_json",
            "unknown_event_kind",
            "missing_field",
            "invalid_field",
            "implausible_time",
            "oversized",
            "unknown_force",
        ] {
            let want = bad.iter().filter(|(r, _)| *r == reason).count() as f64;
            assert_eq!(
                invalid
                    .get(&format!("reason={reason},service={service}"))
                    .copied(),
                Some(want),
                "{service} {reason}: {invalid:?}"
            );
        }
    }

    // `safeclock dlq list` sees them; `replay --reason unknown_force` puts the record back on
    // its source topic, tagged with where it came from.
    let s = (*settings).clone();
    let all = tokio::task::spawn_blocking(move || dlq::read(&s, &Filter::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all.len(), 2 * bad.len());
    // Both services refused the record of the unknown force; it is replayed once.
    let s = (*settings).clone();
    let filter = Filter {
        reason: Some("unknown_force".into()),
        service: None,
        source_topic: None,
    };
    let selected = tokio::task::spawn_blocking(move || dlq::read(&s, &filter))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        selected.len(),
        2,
        "refused by the clock and by the exporter"
    );
    assert_eq!(selected[0].source_topic, input);
    assert_eq!(selected[0].source_offset, selected[1].source_offset);
    let source_offset = selected[0].source_offset.unwrap();
    assert_eq!(dlq::replay(&settings, &selected).await.unwrap(), 1);
    let replayed = reader(&brokers, &[&input]);
    let mut got = read_until(&replayed, TIMEOUT, |m| {
        m.iter().any(|r| header(r, dlq::REPLAYED_FROM).is_some())
    })
    .await;
    // A second copy would be on the topic already (the replay awaited every acknowledgement),
    // right after the first in the same partition.
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), replayed.recv()).await {
        got.push(m.detach());
    }
    let replays: Vec<_> = got
        .iter()
        .filter(|r| header(r, dlq::REPLAYED_FROM).is_some())
        .collect();
    assert_eq!(replays.len(), 1, "the record is replayed once");
    let r = replays[0];
    assert_eq!(r.payload().unwrap(), &bad[10].1[..]);
    assert!(r.offset() > source_offset);
    assert!(
        header(r, dlq_headers::REASON).is_none(),
        "dlq headers are not replayed"
    );

    shutdown.cancel();
    for r in running {
        r.wait().await.unwrap();
    }
}

/// An SLA breach record as the clock publishes it, with `fields` replacing the defaults.
fn breach(id: &str, referral: &str, force: &str, occurred: Timestamp) -> Vec<u8> {
    format!(
        r#"{{"slaEventId":"{id}","referralId":"{referral}","ruleId":"victim-contact","clockId":"c-{id}","transition":"SLA_TRANSITION_BREACHED","severity":"SEVERITY_HIGH","labels":{{"forceId":"{force}","category":"grooming","risk":"high"}},"startedAt":"{started}","deadline":"{occurred}","occurredAt":"{occurred}","emittedAt":"{occurred}","elapsed":"86400s","target":"86400s","ruleTitle":"t"}}"#,
        started = occurred - SignedDuration::from_hours(24),
    )
    .into_bytes()
}

/// Every kind of bad SLA record, with the reason the escalator must dead-letter it for.
fn bad_sla_records(now: Timestamp) -> Vec<(&'static str, Vec<u8>)> {
    let mut oversized = breach("bad-big", "R-E", "nottinghamshire", now);
    oversized.truncate(oversized.len() - 1);
    oversized.extend(format!(r#","pad":"{}"}}"#, "x".repeat(70_000)).into_bytes());
    let without_id = String::from_utf8(breach("bad-noid", "R-E", "nottinghamshire", now))
        .unwrap()
        .replace(r#""slaEventId":"bad-noid","#, "");
    vec![
        ("empty", Vec::new()),
        ("invalid_json", b"{\"slaEventId\": \"half a record".to_vec()),
        ("missing_field", without_id.into_bytes()),
        (
            "invalid_field",
            breach("bad-name", "Jane Smith", "nottinghamshire", now),
        ),
        (
            "implausible_time",
            breach(
                "bad-future",
                "R-E",
                "nottinghamshire",
                now + SignedDuration::from_hours(24 * 30),
            ),
        ),
        ("oversized", oversized),
        ("unknown_force", breach("bad-force", "R-E", "atlantis", now)),
    ]
}

#[tokio::test]
async fn each_kind_of_bad_sla_record_is_dead_lettered_by_the_escalator_and_good_ones_are_escalated()
{
    let brokers = real_broker();
    let settings = Arc::new(isolated_settings(&brokers));
    let input = settings.topic(Topic::SlaEvents);
    let shutdown = CancellationToken::new();
    let running = app::start(
        settings.clone(),
        Service::Escalator,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();

    // One key, so one partition and this order: good, every bad kind, good.
    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let bad = bad_sla_records(now);
    produce(
        &brokers,
        &input,
        "R-E",
        &breach("good-1", "R-E1", "nottinghamshire", now),
    )
    .await;
    for (_, payload) in &bad {
        produce(&brokers, &input, "R-E", payload).await;
    }
    produce(
        &brokers,
        &input,
        "R-E",
        &breach("good-2", "R-E2", "nottinghamshire", now),
    )
    .await;

    let consumer = reader(&brokers, &[&settings.topic(Topic::DeadLetter)]);
    let letters = read_until(&consumer, TIMEOUT, |m| {
        m.iter()
            .filter(|m| header(m, dlq_headers::SERVICE).as_deref() == Some("escalator"))
            .filter(|m| header(m, dlq_headers::SOURCE_TOPIC).as_deref() == Some(input.as_str()))
            .count()
            >= bad.len()
    })
    .await;
    let mut got: Vec<(i64, String, Vec<u8>)> = letters
        .iter()
        .filter(|m| header(m, dlq_headers::SOURCE_TOPIC).as_deref() == Some(input.as_str()))
        .map(|m| {
            let error = header(m, dlq_headers::ERROR).unwrap();
            assert!(
                !error.contains("Jane"),
                "values are never in headers: {error}"
            );
            (
                header(m, dlq_headers::SOURCE_OFFSET)
                    .unwrap()
                    .parse()
                    .unwrap(),
                header(m, dlq_headers::REASON).unwrap(),
                m.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect();
    got.sort_by_key(|(offset, _, _)| *offset);
    let reasons: Vec<&str> = got.iter().map(|(_, r, _)| r.as_str()).collect();
    let expected: Vec<&str> = bad.iter().map(|(r, _)| *r).collect();
    assert_eq!(reasons, expected);
    for ((_, _, payload), (_, original)) in got.iter().zip(&bad) {
        assert_eq!(payload, original, "original bytes kept");
    }

    // Both good breaches were escalated (the escalation log names them).
    let log = reader(&brokers, &[&settings.topic(Topic::EscalationLog)]);
    read_until(&log, TIMEOUT, |m| {
        let referrals: std::collections::BTreeSet<String> = m
            .iter()
            .filter_map(|r| {
                serde_json::from_slice::<safeclock_common::schema::v1::EscalationRecord>(
                    r.payload().unwrap_or_default(),
                )
                .ok()
            })
            .map(|r| r.referral_id)
            .collect();
        referrals.contains("R-E1") && referrals.contains("R-E2")
    })
    .await;

    shutdown.cancel();
    running.wait().await.unwrap();
}
