//! The end-to-end scenario: referral events in, SLA events, escalations, dead letters and metrics
//! out, run by every service together in one process exactly as `safeclock run all` runs them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use safeclock::app::{self, Service};
use safeclock_common::config::{Payload, ReceiverSettings, Settings, WebhookSettings};
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_common::schema::v1::{
    EscalationAction, EscalationRecord, OutcomeStatus, SlaOutcome, SlaTransition,
};
use safeclock_common::shutdown::CancellationToken;
use safeclock_common::time::ManualTime;

use crate::{header, produce, read_until, reader, wait_for, RecordingWebhook};

const TIMEOUT: Duration = Duration::from_secs(60);

pub fn referral_event(id: &str, referral: &str, force: &str, at: Timestamp, kind: &str) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"{force}","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"test",{kind}}}"#
    )
    .into_bytes()
}

pub fn received(id: &str, referral: &str, force: &str, at: Timestamp) -> Vec<u8> {
    referral_event(
        id,
        referral,
        force,
        at,
        r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","childAgeBand":"AGE_BAND_AGED_13_TO_15","area":"city","team":"mash"}"#,
    )
}

pub fn contacted(id: &str, referral: &str, force: &str, at: Timestamp) -> Vec<u8> {
    referral_event(id, referral, force, at, r#""victimContacted":{}"#)
}

/// The sum of the samples of `metric` whose labels include every `labels` fragment (over the
/// exporter's `partition` label, for one), or `None` if there is none.
fn sample(metrics_text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics_text
        .lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Runs the scenario against `brokers`. Topics must exist already unless
/// `settings.kafka.create_topics` is set.
pub async fn end_to_end(mut settings: Settings, brokers_are_mock: bool) {
    let brokers = settings.kafka.brokers.clone();
    let webhook = RecordingWebhook::default();
    // Every page also as a log line: the scenario checks both receivers.
    settings.escalator.log_receiver = true;
    // The scenario checks pages by referral id: a receiver the force allows to see it.
    settings.escalator.receivers.push(ReceiverSettings {
        payload: Some(Payload::Referral),
        ..ReceiverSettings::webhook(&WebhookSettings {
            name: "duty-inspector".into(),
            url: webhook.start().await,
            timeout_ms: 2000,
            max_attempts: 3,
            initial_backoff_ms: 10,
        })
    });
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::ReferralEvents);

    let t0: Timestamp = Timestamp::from_second(crate::now().as_second()).unwrap();
    let time = ManualTime::new(t0);
    let shutdown = CancellationToken::new();
    // A failed assertion must stop the services too, or the test runtime waits for their
    // blocking Kafka tasks for ever instead of reporting the failure.
    let _stop_on_failure = shutdown.clone().drop_guard();
    let running = app::start(
        settings.clone(),
        Service::All,
        Arc::new(time.clone()),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .expect("services start");
    let ops = running.ops_addr;
    let readiness = running.readiness.clone();
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("http://{ops}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wait_for("every service to be assigned partitions", TIMEOUT, || {
        readiness.is_ready()
    })
    .await;
    assert_eq!(
        http.get(format!("http://{ops}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The origin case, one referral answered in time, and, in the same partition as two invalid
    // records, a referral that must still be processed after them.
    let hour = SignedDuration::from_hours(1);
    produce(
        &brokers,
        &input,
        "R-ORIGIN",
        &received("o-1", "R-ORIGIN", "nottinghamshire", t0 - hour),
    )
    .await;
    produce(
        &brokers,
        &input,
        "R-QUICK",
        &received("q-1", "R-QUICK", "nottinghamshire", t0 - hour),
    )
    .await;
    produce(
        &brokers,
        &input,
        "R-AFTER",
        b"{\"eventId\": \"half a record",
    )
    .await;
    produce(&brokers, &input, "R-AFTER", br#"{"eventId":"x-1","referralId":"R-AFTER","forceId":"derbyshire","occurredAt":"2026-01-01T00:00:00Z"}"#).await;
    produce(
        &brokers,
        &input,
        "R-AFTER",
        &received("a-1", "R-AFTER", "derbyshire", t0),
    )
    .await;
    produce(
        &brokers,
        &input,
        "R-QUICK",
        &contacted("q-2", "R-QUICK", "nottinghamshire", t0),
    )
    .await;

    let sla = reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    // Only the victim-contact clocks are checked: a referral received at 23:xx has a
    // "1 working day" referral-decision clock that ends at the next-but-one midnight, under 24
    // hours later, so other rules may breach too depending on the time of day the test runs.
    let has = |msgs: &[rdkafka::message::OwnedMessage], referral: &str, t: SlaTransition| {
        msgs.iter().any(|m| {
            decode_sla_event(m.payload().unwrap_or_default()).is_ok_and(|e| {
                e.referral_id == referral && e.rule_id == "victim-contact" && e.transition() == t
            })
        })
    };
    read_until(&sla, TIMEOUT, |m| {
        has(m, "R-ORIGIN", SlaTransition::Started)
            && has(m, "R-AFTER", SlaTransition::Started)
            && has(m, "R-QUICK", SlaTransition::Met)
    })
    .await;

    // No more input: the wall clock alone must breach the two unanswered referrals.
    time.set(t0 + SignedDuration::from_hours(24));
    let breaches = read_until(&sla, TIMEOUT, |m| {
        has(m, "R-ORIGIN", SlaTransition::Breached) && has(m, "R-AFTER", SlaTransition::Breached)
    })
    .await;
    assert!(!has(&breaches, "R-QUICK", SlaTransition::Breached));

    // The origin case's child is contacted four days later: met late. The wall clock has moved
    // on too (an event from the future is dead-lettered as `implausible_time`).
    time.set(t0 + SignedDuration::from_hours(95));
    produce(
        &brokers,
        &input,
        "R-ORIGIN",
        &contacted(
            "o-2",
            "R-ORIGIN",
            "nottinghamshire",
            t0 + SignedDuration::from_hours(95),
        ),
    )
    .await;
    read_until(&sla, TIMEOUT, |m| {
        has(m, "R-ORIGIN", SlaTransition::MetLate)
    })
    .await;

    // One outcome per clock for data platforms: the origin case met late after a breach, the
    // quick one met.
    let outcomes = reader(&brokers, &[&settings.topic(Topic::SlaOutcomes)]);
    let latest = |msgs: &[rdkafka::message::OwnedMessage], key: &str| {
        msgs.iter()
            .rev()
            .find(|m| m.key() == Some(key.as_bytes()))
            .map(|m| serde_json::from_slice::<SlaOutcome>(m.payload().unwrap()).unwrap())
    };
    let records = read_until(&outcomes, TIMEOUT, |m| {
        latest(m, "R-ORIGIN/victim-contact/o-1")
            .is_some_and(|o| o.status() == OutcomeStatus::MetLate)
            && latest(m, "R-QUICK/victim-contact/q-1")
                .is_some_and(|o| o.status() == OutcomeStatus::Met)
    })
    .await;
    let origin = latest(&records, "R-ORIGIN/victim-contact/o-1").unwrap();
    assert!(origin.breached && !origin.breach_sla_event_id.is_empty());
    assert_eq!(origin.elapsed.unwrap().seconds, 96 * 3600);
    assert!(
        !latest(&records, "R-QUICK/victim-contact/q-1")
            .unwrap()
            .breached
    );

    // Escalations: one page per breach reached the webhook, with a stable dedup key.
    wait_for("both breaches paged to the webhook", TIMEOUT, || {
        let referrals: BTreeSet<String> = webhook
            .bodies()
            .iter()
            .filter(|b| b["slaEvent"]["ruleId"] == "victim-contact")
            .filter_map(|b| b["slaEvent"]["referralId"].as_str().map(String::from))
            .collect();
        referrals.contains("R-ORIGIN") && referrals.contains("R-AFTER")
    })
    .await;
    for body in webhook.bodies() {
        assert!(
            body["dedupKey"].as_str().is_some_and(|k| !k.is_empty()),
            "{body}"
        );
        assert_eq!(
            body["slaEvent"]["transition"], "SLA_TRANSITION_BREACHED",
            "{body}"
        );
    }
    // The log also holds resolutions and resolve notifications, so read until every expected
    // page is there rather than a fixed number of records.
    let notified = |m: &[rdkafka::message::OwnedMessage]| -> BTreeSet<(String, String)> {
        m.iter()
            .map(|m| serde_json::from_slice::<EscalationRecord>(m.payload().unwrap()).unwrap())
            .filter(|r| r.action() == EscalationAction::Notified && r.notification == "trigger")
            .filter(|r| r.rule_id == "victim-contact")
            .map(|r| (r.referral_id, r.receiver))
            .collect()
    };
    let log = reader(&brokers, &[&settings.topic(Topic::EscalationLog)]);
    let records = read_until(&log, TIMEOUT, |m| {
        let n = notified(m);
        ["R-ORIGIN", "R-AFTER"].iter().all(|r| {
            ["log", "duty-inspector"]
                .iter()
                .all(|x| n.contains(&(r.to_string(), x.to_string())))
        })
    })
    .await;
    let notified = notified(&records);
    for referral in ["R-ORIGIN", "R-AFTER"] {
        for receiver in ["log", "duty-inspector"] {
            assert!(
                notified.contains(&(referral.to_string(), receiver.to_string())),
                "no escalation of {referral} to {receiver}: {notified:?}"
            );
        }
    }

    // Both invalid records are in the dead-letter topic with their reason, source and bytes.
    let dlq = reader(&brokers, &[&settings.topic(Topic::DeadLetter)]);
    let dead = read_until(&dlq, TIMEOUT, |m| {
        m.iter()
            .filter(|d| header(d, dlq_headers::SERVICE).as_deref() == Some("clock"))
            .count()
            >= 2
    })
    .await;
    let from_clock: Vec<_> = dead
        .iter()
        .filter(|d| header(d, dlq_headers::SERVICE).as_deref() == Some("clock"))
        .collect();
    let reasons: BTreeSet<String> = from_clock
        .iter()
        .map(|d| header(d, dlq_headers::REASON).unwrap())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["invalid_json".to_string(), "unknown_event_kind".to_string()])
    );
    for d in &from_clock {
        assert_eq!(
            header(d, dlq_headers::SOURCE_TOPIC).as_deref(),
            Some(input.as_str())
        );
        assert!(header(d, dlq_headers::SOURCE_OFFSET)
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(header(d, dlq_headers::ERROR).is_some_and(|e| !e.is_empty()));
        assert_eq!(d.key(), Some(&b"R-AFTER"[..]));
    }
    assert!(from_clock
        .iter()
        .any(|d| d.payload() == Some(&b"{\"eventId\": \"half a record"[..])));

    // Metrics over real HTTP from the ops endpoint.
    let mut text = String::new();
    wait_for("exporter metrics", TIMEOUT, || {
        text = futures::executor::block_on(async {
            http.get(format!("http://{ops}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        sample(
            &text,
            "safeclock_sla_time_to_stop_seconds_count",
            &["force=\"nottinghamshire\"", "rule=\"victim-contact\""],
        ) == Some(2.0)
    })
    .await;
    let breach = |force: &str| {
        sample(
            &text,
            "safeclock_sla_breaches_total",
            &[
                &format!("force=\"{force}\""),
                "rule=\"victim-contact\"",
                "severity=\"high\"",
            ],
        )
    };
    assert_eq!(breach("nottinghamshire"), Some(1.0), "{text}");
    assert_eq!(breach("derbyshire"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "safeclock_records_invalid_total",
            &["service=\"clock\"", "reason=\"invalid_json\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "safeclock_referrals_received_total",
            &["force=\"nottinghamshire\"", "category=\"grooming\""]
        ),
        Some(2.0)
    );
    assert!(
        !text.contains("R-ORIGIN"),
        "referral ids must never be metric labels"
    );

    shutdown.cancel();
    running.wait().await.expect("clean shutdown");

    // Everything the clock read was committed, and only after its outputs were acknowledged.
    // (In transactional mode the offsets are committed inside the transaction; librdkafka's mock
    // cluster accepts TxnOffsetCommit but does not store it, so that is checked only on a broker
    // that supports transactions.)
    if settings.clock.transactional_id.is_none() || !brokers_are_mock {
        let committed = committed_offsets(
            &brokers,
            &settings.clock.group_id,
            &input,
            settings.kafka.partitions,
        );
        let ends = end_offsets(&brokers, &input, settings.kafka.partitions);
        assert_eq!(
            committed, ends,
            "clock group committed offsets vs end offsets"
        );
    }
}

/// Committed offsets of `group` on `topic` (-1 where nothing is committed).
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .unwrap();
    (0..partitions)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
        )
        .collect()
}

/// End offsets (high watermarks) of `topic`; -1 for an empty partition, to compare with
/// [`committed_offsets`].
pub fn end_offsets(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .unwrap();
            if high == 0 {
                -1
            } else {
                high
            }
        })
        .collect()
}
