//! Hostile input on the real broker process: each kind of bad referral event, fed to the clock
//! and the exporter, lands in the dead-letter topic with the right reason and the original bytes,
//! the invalid-records counter goes up by reason, and the good records around it are processed;
//! likewise each kind of bad SLA event fed to the escalator.
//! Then `safeclock dlq` lists those dead letters and replays selected ones to the source topic.
//!
//! No poison pill: a record over a megabyte is dead-lettered with its length, hash and a prefix
//! and its partition moves on; a record whose effects are too large to write is dead-lettered
//! and the clock keeps running (across a restart too); forged dead-letter headers are stripped
//! and `dlq replay` writes only to `referral-events`; a broker stopped for a while stops no
//! service.
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
use safeclock_tests::{
    counter, header, headers_named, isolated_settings, produce, produce_raw, read_until, reader,
    real_broker,
};

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
    let mut settings = isolated_settings(&brokers);
    // Escalations go to the log receiver (off by default), whose pages the test reads.
    settings.escalator.log_receiver = true;
    let settings = Arc::new(settings);
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

/// The referrals `messages` (SLA events) are about.
fn sla_referrals(
    messages: &[rdkafka::message::OwnedMessage],
) -> std::collections::BTreeSet<String> {
    messages
        .iter()
        .filter_map(|r| decode_sla_event(r.payload().unwrap_or_default()).ok())
        .map(|e| e.referral_id)
        .collect()
}

/// Starts `services` in this process on `settings`, one `Running` each.
async fn start(
    settings: &Arc<safeclock_common::config::Settings>,
    services: &[Service],
    shutdown: &CancellationToken,
) -> Vec<app::Running> {
    let mut running = Vec::new();
    for service in services {
        running.push(
            app::start(
                settings.clone(),
                *service,
                safeclock_tests::test_time(),
                "127.0.0.1:0".parse().unwrap(),
                shutdown.clone(),
            )
            .await
            .unwrap(),
        );
    }
    running
}

#[tokio::test]
async fn a_record_over_a_megabyte_is_dead_lettered_with_its_length_hash_and_prefix_and_its_partition_moves_on(
) {
    let brokers = real_broker();
    let settings = Arc::new(isolated_settings(&brokers));
    let input = settings.topic(Topic::ReferralEvents);
    let shutdown = CancellationToken::new();
    let running = start(&settings, &[Service::Clock, Service::Exporter], &shutdown).await;

    // One partition, in this order: good, 1,040,000 bytes (between librdkafka's 1,000,000-byte
    // default and the broker's limit), good.
    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let mut big = received("big-1", "R-BIG", "nottinghamshire", now);
    big.truncate(big.len() - 1);
    big.extend(format!(r#","pad":"{}"}}"#, "x".repeat(1_040_000 - big.len() - 10)).into_bytes());
    assert_eq!(big.len(), 1_040_000);
    let partition = Some(0);
    let good = |id: &str, referral: &str| received(id, referral, "nottinghamshire", now);
    produce_raw(
        &brokers,
        &input,
        b"R-BIG",
        &good("g-1", "R-BIG1"),
        &[],
        partition,
    )
    .await;
    let (_, big_offset) = produce_raw(&brokers, &input, b"R-BIG", &big, &[], partition).await;
    produce_raw(
        &brokers,
        &input,
        b"R-BIG",
        &good("g-2", "R-BIG2"),
        &[],
        partition,
    )
    .await;

    // Each consumer dead-letters it: the length, the SHA-256 and a 4 KiB prefix of the value.
    let dlq = reader(&brokers, &[&settings.topic(Topic::DeadLetter)]);
    let letters = read_until(&dlq, TIMEOUT, |m| m.len() >= 2).await;
    let mut services = Vec::new();
    for m in &letters {
        services.push(header(m, dlq_headers::SERVICE).unwrap());
        assert_eq!(header(m, dlq_headers::REASON).as_deref(), Some("oversized"));
        assert_eq!(
            header(m, dlq_headers::SOURCE_OFFSET),
            Some(big_offset.to_string())
        );
        assert_eq!(
            header(m, dlq_headers::PAYLOAD_TRUNCATED).as_deref(),
            Some("true")
        );
        assert_eq!(
            header(m, dlq_headers::PAYLOAD_LENGTH).as_deref(),
            Some("1040000")
        );
        assert_eq!(
            header(m, dlq_headers::PAYLOAD_SHA256),
            Some(safeclock_common::kafka::sha256_hex(&big))
        );
        assert_eq!(m.payload().unwrap(), &big[..4096]);
        assert_eq!(m.key(), Some(&b"R-BIG"[..]));
    }
    services.sort();
    assert_eq!(services, ["clock", "exporter"]);

    // The record after it was processed by both.
    let sla = reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    read_until(&sla, TIMEOUT, |m| {
        let r = sla_referrals(m);
        r.contains("R-BIG1") && r.contains("R-BIG2")
    })
    .await;
    let exporter = &running[1].registry;
    safeclock_tests::wait_for("the exporter to count both referrals", TIMEOUT, || {
        counter(exporter, "safeclock_referrals_received_total", &[]) >= 2.0
    })
    .await;

    // `dlq list` shows the cut; `dlq replay` refuses a letter that is not the whole record.
    let s = (*settings).clone();
    let listed = tokio::task::spawn_blocking(move || dlq::read(&s, &Filter::default()))
        .await
        .unwrap()
        .unwrap();
    let text = dlq::render(&listed, false, false);
    assert!(
        text.contains("value cut to a prefix: 1040000 bytes"),
        "{text}"
    );
    let err = dlq::replay(&settings, &listed)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("keeps only part of its record"), "{err}");

    shutdown.cancel();
    for r in running {
        r.wait().await.unwrap();
    }
}

/// A referral event of `kind` (its JSON fields) for `referral`.
fn event_of(id: &str, referral: &str, at: Timestamp, kind: &str) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}",{kind}}}"#
    )
    .into_bytes()
}

/// The clock's defensive path for a state record the producer would refuse. The issue's case
/// (devices with 60 KB references, until the state passed the producer's 1,000,000 bytes and the
/// clock exited, again on every restart) cannot happen any more: a reference is at most
/// `validation.max_ref_chars` and the limits bound the record (the hostile-input suite sends it).
/// What remains is a producer limit set below what the configured limits allow: here 100,000
/// bytes with room for 200 devices of 250-character references. The events that would make the
/// state too large are dead-lettered (`output_too_large`), the referral keeps its other clocks,
/// the partition moves on, and a restarted clock neither exits nor refuses them again.
#[tokio::test]
async fn an_output_too_large_to_write_is_dead_lettered_and_the_clock_keeps_running() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    // With the default limits no referral's state can come near the producer's limit (decision
    // record (o)). A producer limit set below what the configured limits allow is the way left
    // to meet one: the clock's defensive path, which this test is about.
    settings
        .kafka
        .producer_properties
        .insert("message.max.bytes".into(), "100000".into());
    settings.validation.max_ref_chars = 256;
    settings.clock.limits.max_instances_per_rule = 200;
    settings.clock.limits.max_references = 200;
    settings.clock.limits.max_open_clocks = 250;
    // A dead letter must always fit under that limit too.
    settings.dead_letters.max_payload_bytes = 32 * 1024;
    settings.validate().unwrap();
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::ReferralEvents);
    let changelog = settings.topic(Topic::ClockState);
    let shutdown = CancellationToken::new();
    let running = start(&settings, &[Service::Clock], &shutdown).await;

    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let at = now - SignedDuration::from_hours(1);
    let p = Some(0);
    let received_kind =
        r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH"}"#;
    produce_raw(
        &brokers,
        &input,
        b"R-DEV",
        &event_of("d-0", "R-DEV", at, received_kind),
        &[],
        p,
    )
    .await;
    const DEVICES: usize = 140;
    let mut offsets = Vec::new();
    for i in 0..DEVICES {
        let device = format!("DEV-{i:03}-{}", "x".repeat(240));
        let kind = format!(r#""deviceSeized":{{"deviceRef":"{device}"}}"#);
        let event = event_of(&format!("d-{}", i + 1), "R-DEV", at, &kind);
        assert!(event.len() < 64 * 1024);
        offsets.push(
            produce_raw(&brokers, &input, b"R-DEV", &event, &[], p)
                .await
                .1,
        );
    }
    // After them, on the same partition: the first device is examined (its clock ends, which
    // makes room in the state again), the child is contacted (a small event of the same
    // referral), and another referral arrives.
    let first = format!("DEV-000-{}", "x".repeat(240));
    produce_raw(
        &brokers,
        &input,
        b"R-DEV",
        &event_of(
            "x-1",
            "R-DEV",
            at,
            &format!(r#""deviceExamined":{{"deviceRef":"{first}"}}"#),
        ),
        &[],
        p,
    )
    .await;
    produce_raw(
        &brokers,
        &input,
        b"R-DEV",
        &event_of("x-2", "R-DEV", at, r#""victimContacted":{}"#),
        &[],
        p,
    )
    .await;
    produce_raw(
        &brokers,
        &input,
        b"R-NEXT",
        &received("n-1", "R-NEXT", "nottinghamshire", at),
        &[],
        p,
    )
    .await;

    // The later records are processed: victim-contact of R-DEV is met, R-NEXT's clocks start.
    let sla = reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    let events = read_until(&sla, TIMEOUT, |m| {
        let decoded: Vec<_> = m
            .iter()
            .filter_map(|r| decode_sla_event(r.payload().unwrap_or_default()).ok())
            .collect();
        decoded.iter().any(|e| e.referral_id == "R-NEXT")
            && decoded.iter().any(|e| {
                e.referral_id == "R-DEV"
                    && e.rule_id == "victim-contact"
                    && e.transition() == safeclock_common::schema::v1::SlaTransition::Met
            })
    })
    .await;
    let started_devices: std::collections::BTreeSet<String> = events
        .iter()
        .filter_map(|r| decode_sla_event(r.payload().unwrap_or_default()).ok())
        .filter(|e| e.rule_id == "device-examination")
        .map(|e| e.instance[..7].to_string())
        .collect();

    // The devices that would have made the state too large are dead-lettered, by the clock,
    // with reason output_too_large, naming the changelog; each is one of the later ones.
    let dlq = reader(&brokers, &[&settings.topic(Topic::DeadLetter)]);
    let letters = read_until(&dlq, Duration::from_secs(10), |m| !m.is_empty()).await;
    let mut refused = Vec::new();
    for m in &letters {
        assert_eq!(header(m, dlq_headers::SERVICE).as_deref(), Some("clock"));
        assert_eq!(
            header(m, dlq_headers::REASON).as_deref(),
            Some("output_too_large")
        );
        assert_eq!(
            header(m, dlq_headers::OUTPUT_TOPIC),
            Some(changelog.clone())
        );
        let error = header(m, dlq_headers::ERROR).unwrap();
        assert!(error.contains("state would be"), "{error}");
        refused.push(
            header(m, dlq_headers::SOURCE_OFFSET)
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    // Read on a little: all the letters of the batch are there by now.
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), dlq.recv()).await {
        let m = m.detach();
        assert_eq!(
            header(&m, dlq_headers::REASON).as_deref(),
            Some("output_too_large")
        );
        refused.push(
            header(&m, dlq_headers::SOURCE_OFFSET)
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    refused.sort_unstable();
    refused.dedup();
    assert!(
        !refused.is_empty() && refused.len() < DEVICES / 2,
        "some, not most, devices refused: {refused:?}"
    );
    eprintln!(
        "devices with a clock: {}, dead-lettered: {refused:?}",
        started_devices.len()
    );
    assert!(refused.iter().all(|o| offsets.contains(o)));
    assert_eq!(
        started_devices.len() + refused.len(),
        DEVICES,
        "every device either has its clock or is dead-lettered: {started_devices:?} {refused:?}"
    );
    assert!(running[0].readiness.is_ready());
    assert_eq!(
        counter(
            &running[0].registry,
            "safeclock_outputs_refused_total",
            &[("service", "clock"), ("reason", "output_too_large")]
        ),
        refused.len() as f64
    );

    // The referral's state on the changelog fits (the latest record of R-DEV).
    let state = reader(&brokers, &[&changelog]);
    let records = read_until(&state, TIMEOUT, |m| {
        m.iter().any(|r| r.key() == Some(&b"R-DEV"[..]))
    })
    .await;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), state.recv()).await {}
    let latest = records
        .iter()
        .rev()
        .find(|r| r.key() == Some(&b"R-DEV"[..]))
        .unwrap();
    assert!(latest.payload().unwrap().len() < 1_000_000);

    // A restart neither exits nor dead-letters them again: their offsets were committed.
    shutdown.cancel();
    for r in running {
        r.wait().await.expect("the clock never failed");
    }
    let shutdown = CancellationToken::new();
    let running = start(&settings, &[Service::Clock], &shutdown).await;
    let readiness = running[0].readiness.clone();
    safeclock_tests::wait_for("the restarted clock to be ready", TIMEOUT, || {
        readiness.is_ready()
    })
    .await;
    produce_raw(
        &brokers,
        &input,
        b"R-AFTER",
        &received("a-1", "R-AFTER", "nottinghamshire", at),
        &[],
        p,
    )
    .await;
    read_until(&sla, TIMEOUT, |m| sla_referrals(m).contains("R-AFTER")).await;
    assert_eq!(
        counter(
            &running[0].registry,
            "safeclock_outputs_refused_total",
            &[("service", "clock")]
        ),
        0.0,
        "nothing refused again after the restart"
    );
    shutdown.cancel();
    for r in running {
        r.wait().await.expect("the restarted clock never failed");
    }
}

/// Whoever writes to `referral-events` cannot choose a dead letter's reason, error text, service
/// or source (the topic `dlq replay` writes to): incoming `safeclock.dlq.*` headers are stripped
/// and ours are the only ones. `dlq list` prints the record's escape sequences escaped, `dlq
/// replay` puts the record back on `referral-events` only, and a letter forged straight onto the
/// dead-letter topic to name a state or output topic is refused: nothing reaches a state topic.
#[tokio::test]
async fn forged_dead_letter_headers_are_stripped_and_replay_writes_only_to_referral_events() {
    let brokers = real_broker();
    let settings = Arc::new(isolated_settings(&brokers));
    let input = settings.topic(Topic::ReferralEvents);
    let dlq_topic = settings.topic(Topic::DeadLetter);
    let clock_state = settings.topic(Topic::ClockState);
    let shutdown = CancellationToken::new();
    let running = start(&settings, &[Service::Clock, Service::Exporter], &shutdown).await;

    // An event of an unknown force, carrying forged dead-letter headers and a key with terminal
    // escape sequences.
    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let record = received("f-1", "R-F", "atlantis", now);
    let key = b"R-F\x1b[2J\x1b]0;owned\x07";
    let forged: [(&str, &[u8]); 7] = [
        ("traceparent", b"00-abc-01"),
        (dlq_headers::REASON, b"implausible_time"),
        (dlq_headers::ERROR, b"\x1b[31mforged"),
        (dlq_headers::SERVICE, b"intake"),
        (dlq_headers::SOURCE_TOPIC, clock_state.as_bytes()),
        (dlq_headers::SOURCE_PARTITION, b"0"),
        (dlq_headers::SOURCE_OFFSET, b"0"),
    ];
    let (_, offset) = produce_raw(&brokers, &input, key, &record, &forged, None).await;

    let dlq = reader(&brokers, &[&dlq_topic]);
    let letters = read_until(&dlq, TIMEOUT, |m| m.len() >= 2).await;
    for m in &letters {
        assert_eq!(headers_named(m, dlq_headers::REASON), ["unknown_force"]);
        assert_eq!(
            headers_named(m, dlq_headers::SOURCE_TOPIC),
            [input.as_str()]
        );
        assert_eq!(
            headers_named(m, dlq_headers::SOURCE_OFFSET),
            [offset.to_string()]
        );
        assert_eq!(headers_named(m, dlq_headers::ERROR).len(), 1);
        assert!(!header(m, dlq_headers::ERROR).unwrap().contains("forged"));
        let service = header(m, dlq_headers::SERVICE).unwrap();
        assert!(service == "clock" || service == "exporter", "{service}");
        assert_eq!(headers_named(m, dlq_headers::HEADERS_STRIPPED), ["6"]);
        assert_eq!(headers_named(m, "traceparent"), ["00-abc-01"]);
        assert_eq!(m.key(), Some(&key[..]));
        assert_eq!(m.payload(), Some(&record[..]));
    }

    // What `dlq` reads is ours; what it prints is escaped.
    let s = (*settings).clone();
    let listed = tokio::task::spawn_blocking(move || dlq::read(&s, &Filter::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed.len(), 2);
    for d in &listed {
        assert_eq!(
            (d.reason.as_str(), d.source_topic.as_str()),
            ("unknown_force", input.as_str())
        );
    }
    for json in [false, true] {
        let text = dlq::render(&listed, true, json);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "no control character reaches the terminal: {text:?}"
        );
        // (In JSON, the escape's backslash is itself escaped.)
        let shown = if json {
            r"R-F\\u{1b}[2J\\u{1b}]0;owned\\u{7}"
        } else {
            r"R-F\u{1b}[2J\u{1b}]0;owned\u{7}"
        };
        assert!(text.contains(shown), "{text}");
    }

    // Replay puts the record back on referral-events, once, without any safeclock.dlq.* header
    // but the replayed-from one.
    assert_eq!(dlq::replay(&settings, &listed).await.unwrap(), 1);
    let back = reader(&brokers, &[&input]);
    let got = read_until(&back, TIMEOUT, |m| {
        m.iter().any(|r| header(r, dlq::REPLAYED_FROM).is_some())
    })
    .await;
    let replayed = got
        .iter()
        .find(|r| header(r, dlq::REPLAYED_FROM).is_some())
        .unwrap();
    assert_eq!(replayed.payload(), Some(&record[..]));
    assert_eq!(replayed.key(), Some(&key[..]));
    assert!(headers_named(replayed, dlq_headers::REASON).is_empty());
    assert!(headers_named(replayed, dlq_headers::SOURCE_TOPIC).is_empty());
    assert_eq!(headers_named(replayed, "traceparent"), ["00-abc-01"]);

    // Letters forged straight onto the dead-letter topic, naming a state topic and the clock's
    // output as their source: replay refuses them before producing anything.
    for (i, target) in [clock_state.clone(), settings.topic(Topic::SlaEvents)]
        .iter()
        .enumerate()
    {
        let forged_letter: [(&str, &[u8]); 4] = [
            (dlq_headers::REASON, b"unknown_force"),
            (dlq_headers::SOURCE_TOPIC, target.as_bytes()),
            (dlq_headers::SOURCE_PARTITION, b"0"),
            (dlq_headers::SOURCE_OFFSET, b"7"),
        ];
        let payload = format!("forged-{i}");
        produce_raw(
            &brokers,
            &dlq_topic,
            b"R-F",
            payload.as_bytes(),
            &forged_letter,
            None,
        )
        .await;
        let s = (*settings).clone();
        let filter = Filter {
            reason: None,
            service: None,
            source_topic: Some(target.clone()),
        };
        let selected = tokio::task::spawn_blocking(move || dlq::read(&s, &filter))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(selected.len(), 1);
        let err = dlq::replay(&settings, &selected)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("only letters from"), "{err}");
        assert!(err.contains(&input), "{err}");
    }

    // Nothing of it reached a state topic.
    let states = reader(
        &brokers,
        &[
            &clock_state,
            &settings.topic(Topic::EscalationState),
            &settings.topic(Topic::ExporterState),
            &settings.topic(Topic::SlaEvents),
        ],
    );
    let mut seen = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(3), states.recv()).await {
        seen.push(m.detach());
    }
    for m in &seen {
        assert_ne!(m.key(), Some(&key[..]), "{}", m.topic());
        assert!(header(m, dlq::REPLAYED_FROM).is_none(), "{}", m.topic());
        let payload = m.payload().unwrap_or_default();
        assert!(!payload.starts_with(b"forged-"), "{}", m.topic());
    }

    shutdown.cancel();
    for r in running {
        r.wait().await.unwrap();
    }
}

/// The broker stops answering for a while (SIGSTOP, as the fault suite does; longer than the
/// producers' `message.timeout.ms`, so writes fail) while a breach falls due: no service exits.
/// The clock waits the broker out, and once it answers again every breach is published and
/// escalated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_for_a_while_stops_no_service() {
    if std::env::var("SAFECLOCK_TEST_TRACE").is_ok() {
        safeclock_common::telemetry::init(
            safeclock_common::config::LogFormat::Text,
            "info,librdkafka=warn",
        );
    }
    let dir = std::env::temp_dir().join(format!("safeclock-stall-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = tokio::task::block_in_place(|| {
        safeclock_tests::kafka_cluster::KafkaCluster::start_stoppable(&dir)
    });
    let brokers = broker.bootstrap().to_string();
    let mut s = isolated_settings(&brokers);
    // Escalations go to the log receiver (off by default), whose pages the test reads.
    s.escalator.log_receiver = true;
    s.kafka
        .producer_properties
        .insert("message.timeout.ms".into(), "2000".into());
    // Longer than the stall, so the services keep their partitions through it and the clock's
    // failed writes are what is tested here (a stall past the session timeout, where the group
    // rebalances, is a fault of the fault suite).
    s.kafka
        .consumer_properties
        .insert("session.timeout.ms".into(), "30000".into());
    let settings = Arc::new(s);
    let input = settings.topic(Topic::ReferralEvents);
    let shutdown = CancellationToken::new();
    let services = [Service::Clock, Service::Escalator, Service::Exporter];
    let running = start(&settings, &services, &shutdown).await;
    for r in &running {
        let readiness = r.readiness.clone();
        safeclock_tests::wait_for("every service to be ready", TIMEOUT, || {
            readiness.is_ready()
        })
        .await;
    }

    // Ten referrals whose victim-contact deadline (24 h) falls 8 s from now: after their clocks
    // have started, and while the broker is stopped.
    let now = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let deadline = now + SignedDuration::from_secs(8);
    let at = deadline - SignedDuration::from_hours(24);
    let referrals: Vec<String> = (0..10).map(|i| format!("R-STALL-{i}")).collect();
    for r in &referrals {
        produce(
            &brokers,
            &input,
            r,
            &received(&format!("{r}-e"), r, "nottinghamshire", at),
        )
        .await;
    }
    let sla = reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    read_until(&sla, TIMEOUT, |m| {
        let seen = sla_referrals(m);
        referrals.iter().all(|r| seen.contains(r))
    })
    .await;
    let log = reader(&brokers, &[&settings.topic(Topic::EscalationLog)]);

    // Stop the broker until 6 s after the deadline: the breaches fall due meanwhile, and their
    // writes time out (message.timeout.ms is 2 s).
    let until_deadline = deadline.duration_since(safeclock_tests::now());
    assert!(
        until_deadline > SignedDuration::from_secs(1),
        "the clocks started too late for the breaches to fall in the stall: {until_deadline}"
    );
    broker.pause(1);
    tokio::time::sleep(until_deadline.unsigned_abs() + Duration::from_secs(6)).await;
    broker.resume(1);

    // Every breach is published, and escalated.
    let breached = |m: &[rdkafka::message::OwnedMessage]| -> std::collections::BTreeSet<String> {
        m.iter()
            .filter_map(|r| decode_sla_event(r.payload().unwrap_or_default()).ok())
            .filter(|e| e.transition() == safeclock_common::schema::v1::SlaTransition::Breached)
            .map(|e| e.referral_id)
            .collect()
    };
    read_until(&sla, Duration::from_secs(90), |m| {
        let b = breached(m);
        referrals.iter().all(|r| b.contains(r))
    })
    .await;
    read_until(&log, Duration::from_secs(90), |m| {
        let escalated: std::collections::BTreeSet<String> = m
            .iter()
            .filter_map(|r| {
                serde_json::from_slice::<safeclock_common::schema::v1::EscalationRecord>(
                    r.payload().unwrap_or_default(),
                )
                .ok()
            })
            .map(|r| r.referral_id)
            .collect();
        referrals.iter().all(|r| escalated.contains(r))
    })
    .await;
    // The clock did wait the broker out (its breaches' first writes failed).
    let waits = counter(
        &running[0].registry,
        "safeclock_broker_waits_total",
        &[("service", "clock")],
    );
    assert!(
        waits >= 1.0,
        "the clock's writes failed and were written again: {waits}"
    );
    for r in &running {
        let readiness = r.readiness.clone();
        safeclock_tests::wait_for("every service to be ready again", TIMEOUT, || {
            readiness.is_ready()
        })
        .await;
    }

    shutdown.cancel();
    for r in running {
        r.wait()
            .await
            .expect("no service failed while the broker was stopped");
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
