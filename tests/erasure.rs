//! Erasing a referral, on the real broker: two referrals breach and page; `safeclock erase`
//! erases one. The running clock and escalator drop it (their gauges and the erasure counter
//! say so), a replay of its events is refused and dead-lettered without its content (no new
//! SLA event, no page), and once the cleaner has compacted the topics, nothing of it can be read
//! from any compacted topic, the erasure topic or the dead-letter topic, while the other
//! referral is untouched. The append-only logs (`referral-events`, `sla-events`,
//! `escalation-log`) still hold it until their retention deletes it: Kafka cannot delete single
//! records there, and the test checks that those topics carry the retention that will.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::SignedDuration;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock::app::Service;
use safeclock_common::config::{
    LevelSettings, Payload, PolicySettings, ReceiverKind, ReceiverSettings, Settings,
};
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_tests::pager::TestPager;
use safeclock_tests::{
    counter, header, isolated_settings, produce, real_broker, wait_for, InProcess,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const ERASED: &str = "R-ERASE-7f3a";
const KEPT: &str = "R-KEEP-19c2";

fn event(id: &str, referral: &str, at: jiff::Timestamp) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"test","referralReceived":{{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","area":"city","team":"mash"}}}}"#
    )
    .into_bytes()
}

fn scan(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    safeclock_tests::read_to_end(brokers, topic, 3, "read_uncommitted", TIMEOUT)
}

/// Whether `m` holds `needle` in its key, value or headers.
fn mentions(m: &OwnedMessage, needle: &str) -> bool {
    let has = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle.as_bytes());
    m.key().is_some_and(has)
        || m.payload().is_some_and(has)
        || m.headers().is_some_and(|h| {
            use rdkafka::message::Headers;
            h.iter().any(|h| h.value.is_some_and(has))
        })
}

/// Dead letters with reason `erased`.
fn erased_letters(brokers: &str, dlq: &str) -> usize {
    scan(brokers, dlq)
        .iter()
        .filter(|m| header(m, dlq_headers::REASON).as_deref() == Some("erased"))
        .count()
}

fn count_mentioning(brokers: &str, topic: &str, needle: &str) -> usize {
    scan(brokers, topic)
        .iter()
        .filter(|m| mentions(m, needle))
        .count()
}

fn settings(brokers: &str, pager_url: String) -> Arc<Settings> {
    let mut settings = isolated_settings(brokers);
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
    settings.erasure.key = Some("test-erasure-key".into());
    let mut duty = ReceiverSettings::new("duty", ReceiverKind::Webhook);
    duty.url = Some(pager_url);
    // The pager harness tells pages apart by referral.
    duty.payload = Some(Payload::Referral);
    settings.escalator.log_receiver = false;
    settings.escalator.receivers = vec![duty];
    settings.escalator.policies = vec![PolicySettings {
        name: "default".into(),
        levels: vec![LevelSettings {
            delay_secs: 0,
            receivers: vec!["duty".into()],
        }],
        repeat_interval_secs: 0,
        repeat_limit: 0,
        ack_expiry_secs: 0,
    }];
    settings.validate().unwrap();
    Arc::new(settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erased_referral_leaves_every_service_and_compacted_topic_and_a_replay_cannot_bring_it_back(
) {
    let brokers = real_broker();
    let pager = TestPager::new();
    let settings = settings(&brokers, pager.start().await);
    let input = settings.topic(Topic::ReferralEvents);
    let clock = InProcess::start(&settings, Service::Clock, TIMEOUT).await;
    let escalator = InProcess::start(&settings, Service::Escalator, TIMEOUT).await;

    // Received ten days ago and never answered: every clock of them is breached at once.
    let at = safeclock_tests::now() - SignedDuration::from_hours(240);
    let erased_event = event("erase-e1", ERASED, at);
    produce(&brokers, &input, ERASED, &erased_event).await;
    produce(&brokers, &input, KEPT, &event("keep-e1", KEPT, at)).await;
    let paged = |r: &str| pager.pages().iter().filter(|p| p.referral_id == r).count();
    wait_for("both referrals paged", TIMEOUT, || {
        paged(ERASED) > 0 && paged(KEPT) > 0
    })
    .await;
    let compacted = [
        settings.topic(Topic::ClockState),
        settings.topic(Topic::SlaOutcomes),
        settings.topic(Topic::EscalationState),
    ];
    wait_for("both referrals on every compacted topic", TIMEOUT, || {
        compacted.iter().all(|t| {
            count_mentioning(&brokers, t, ERASED) > 0 && count_mentioning(&brokers, t, KEPT) > 0
        })
    })
    .await;
    let open_before = clock.gauge("safeclock_clock_open_clocks");
    let escalations_before = escalator.gauge("safeclock_escalations_open");
    let sla = settings.topic(Topic::SlaEvents);

    let erased = safeclock::erase::erase(
        &settings,
        ERASED,
        "subject_request",
        "dpo",
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    eprintln!("tombstones written by erase: {:?}", erased.tombstones);
    // The clock and escalator tombstone what they held; the outcomes are the command's.
    assert!(erased.tombstones[&settings.topic(Topic::SlaOutcomes)] > 0);

    // Every running service applied it, and holds nothing of the referral any more.
    for (name, s) in [("clock", &clock), ("escalator", &escalator)] {
        wait_for(&format!("the {name} to apply the erasure"), TIMEOUT, || {
            counter(
                &s.running.registry,
                "safeclock_erasures_applied_total",
                &[("service", name)],
            ) == 1.0
        })
        .await;
    }
    wait_for(
        "the clock's gauges without the erased referral",
        TIMEOUT,
        || clock.gauge("safeclock_clock_open_clocks") == open_before / 2,
    )
    .await;
    wait_for("the escalator's gauges without it", TIMEOUT, || {
        escalator.gauge("safeclock_escalations_open") == escalations_before / 2
    })
    .await;
    // Counted once the erasure is applied: a working-day deadline of the default pack that
    // happened to fall in the seconds before it could otherwise add a breach (on some days).
    let sla_before = count_mentioning(&brokers, &sla, ERASED);
    let pages_before = paged(ERASED);

    // A replay of its events: refused, dead-lettered without content; nothing comes back.
    produce(&brokers, &input, ERASED, &erased_event).await;
    produce(&brokers, &input, ERASED, &event("erase-e2", ERASED, at)).await;
    let dlq = settings.topic(Topic::DeadLetter);
    wait_for(
        "the replayed events dead-lettered as erased",
        TIMEOUT,
        || erased_letters(&brokers, &dlq) == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count_mentioning(&brokers, &sla, ERASED),
        sla_before,
        "no new SLA event"
    );
    assert_eq!(paged(ERASED), pages_before, "no new page");
    assert_eq!(
        clock.gauge("safeclock_clock_open_clocks"),
        open_before / 2,
        "no clock started again"
    );

    // The cleaner compacts: tombstones that roll a segment on every partition of the compacted
    // topics (a tombstone of a key nobody uses), until the erased referral is gone from them.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut n = 0usize;
    loop {
        let left: Vec<(String, usize)> = compacted
            .iter()
            .map(|t| (t.clone(), count_mentioning(&brokers, t, ERASED)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "the cleaner did not remove the erased referral within 150 s: {left:?}"
        );
        for _ in 0..8 {
            for topic in &compacted {
                for p in 0..3 {
                    let key = format!("roll-{n}");
                    producer
                        .send(
                            FutureRecord::<str, [u8]>::to(topic).key(&key).partition(p),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(e, _)| e)
                        .unwrap();
                    n += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!("compacted in {:.1} s", started.elapsed().as_secs_f64());

    // Nothing of it on any compacted topic, the erasure topic or the dead-letter topic; the
    // other referral is all there.
    let mut readable = compacted.to_vec();
    readable.push(settings.topic(Topic::Erasures));
    readable.push(dlq.clone());
    readable.push(settings.topic(Topic::ExporterState));
    for topic in &readable {
        assert_eq!(count_mentioning(&brokers, topic, ERASED), 0, "{topic}");
    }
    for topic in &compacted {
        assert!(
            count_mentioning(&brokers, topic, KEPT) > 0,
            "{topic} kept {KEPT}"
        );
    }
    let erasures = scan(&brokers, &settings.topic(Topic::Erasures));
    assert_eq!(erasures.len(), 1);
    let record: serde_json::Value = serde_json::from_slice(erasures[0].payload().unwrap()).unwrap();
    assert_eq!(record["reason"], "subject_request");
    assert_eq!(record["requestedBy"], "dpo");
    assert_eq!(record["referralHash"].as_str().unwrap().len(), 64);

    // The append-only logs hold it until their retention deletes it, which they carry.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let logs = [
        (settings.topic(Topic::ReferralEvents), 400u64),
        (sla.clone(), 400),
        (settings.topic(Topic::EscalationLog), 2190),
    ];
    let described = admin
        .describe_configs(
            &logs
                .iter()
                .map(|(t, _)| ResourceSpecifier::Topic(t))
                .collect::<Vec<_>>(),
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for ((topic, days), d) in logs.iter().zip(&described) {
        let retention = d
            .as_ref()
            .unwrap()
            .get("retention.ms")
            .and_then(|e| e.value.clone());
        assert_eq!(
            retention,
            Some((days * 86_400_000).to_string()),
            "{topic} deletes the erased referral's records after {days} days"
        );
        assert!(count_mentioning(&brokers, topic, ERASED) > 0);
    }

    // A restart restores nothing of it either, and still refuses it.
    clock.stop().await;
    escalator.stop().await;
    let clock = InProcess::start(&settings, Service::Clock, TIMEOUT).await;
    wait_for("the restarted clock's gauges", TIMEOUT, || {
        clock.gauge("safeclock_clock_open_clocks") == open_before / 2
    })
    .await;
    produce(&brokers, &input, ERASED, &event("erase-e3", ERASED, at)).await;
    wait_for(
        "the replay after the restart dead-lettered too",
        TIMEOUT,
        || erased_letters(&brokers, &dlq) == 3,
    )
    .await;
    assert_eq!(count_mentioning(&brokers, &sla, ERASED), sla_before);
    clock.stop().await;
}
