//! Two escalator instances never both page for the same escalation around a rebalance: a second
//! instance joins while pages to a slow receiver are under way and later leaves again, and every
//! notification is answered by the receiver exactly once.
//!
//! What makes it so is the hand-over (`kafka::Handover`, `hand_over` in the escalator): a
//! revoked partition is let go only after its attempts under way have finished and their
//! outcomes are in the changelog the next owner restores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use safeclock::app::Service;
use safeclock_common::config::{
    LevelSettings, Payload, PolicySettings, ReceiverKind, ReceiverSettings,
};
use safeclock_common::kafka::Topic;
use safeclock_tests::pager::TestPager;
use safeclock_tests::{breach_record, isolated_settings, real_broker, wait_for, InProcess};

const TIMEOUT: Duration = Duration::from_secs(120);
const BREACHES: usize = 120;
/// How long the receiver takes to answer: long enough that a rebalance always finds pages
/// under way.
const RECEIVER_DELAY: Duration = Duration::from_millis(400);

/// Per delivery id, the referral and how many times the pager received it.
fn by_delivery(pager: &TestPager) -> BTreeMap<String, (String, usize)> {
    let mut answered = BTreeMap::new();
    for page in pager.pages() {
        answered
            .entry(page.delivery_id)
            .or_insert((page.referral_id, 0))
            .1 += 1;
    }
    answered
}

async fn start(settings: &Arc<safeclock_common::config::Settings>) -> InProcess {
    InProcess::start(settings, Service::Escalator, TIMEOUT).await
}

/// Partitions `instance` holds (`safeclock_escalator_partitions`).
fn partitions(instance: &InProcess) -> i64 {
    instance.gauge("safeclock_escalator_partitions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_escalators_never_both_page_for_one_escalation_around_a_rebalance() {
    if std::env::var("SAFECLOCK_TEST_TRACE").is_ok() {
        safeclock_common::telemetry::init(
            safeclock_common::config::LogFormat::Text,
            "info,librdkafka=warn",
        );
    }
    let brokers = real_broker();
    let pager = TestPager::answering_after(RECEIVER_DELAY);
    let url = pager.start().await;
    let mut settings = isolated_settings(&brokers);
    settings.kafka.create_topics = true;
    settings.kafka.partitions = 6;
    let mut duty = ReceiverSettings::new("duty", ReceiverKind::Webhook);
    duty.url = Some(url);
    duty.concurrency = 2;
    duty.rate_per_sec = 1000;
    duty.burst = 100;
    // The pager harness counts pages per referral.
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
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::SlaEvents);

    let first = start(&settings).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();
    let sends = (0..BREACHES).map(|i| {
        let referral = format!("R-HANDOVER-{i:03}");
        let payload = breach_record(&referral);
        let producer = producer.clone();
        let input = input.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&input).key(&referral).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    futures::future::join_all(sends).await;
    let delivered = || by_delivery(&pager).len();
    wait_for("the first pages", TIMEOUT, || delivered() >= 15).await;
    // A second instance joins: the first hands over some partitions while pages are under way.
    let second = start(&settings).await;
    wait_for("the two instances to share the partitions", TIMEOUT, || {
        partitions(&second) > 0 && partitions(&first) + partitions(&second) == 6
    })
    .await;
    let shared_at = delivered();
    eprintln!("partitions shared after {shared_at} pages");
    assert!(
        shared_at < BREACHES - 20,
        "pages must still be under way when the partitions move ({shared_at} delivered)"
    );
    wait_for("pages from both instances", TIMEOUT, || {
        delivered() >= shared_at + 20
    })
    .await;
    // And leaves again: its partitions come back while its pages are under way.
    eprintln!("second instance leaves after {} pages", delivered());
    second.stop().await;
    wait_for(
        "the first instance to hold every partition",
        TIMEOUT,
        || partitions(&first) == 6,
    )
    .await;
    wait_for("every breach to be paged", TIMEOUT, || {
        let referrals: BTreeSet<String> =
            pager.pages().into_iter().map(|p| p.referral_id).collect();
        referrals.len() == BREACHES
    })
    .await;
    eprintln!("every breach paged");
    // Anything sent twice would arrive within a few receiver delays.
    tokio::time::sleep(RECEIVER_DELAY * 10).await;
    first.stop().await;

    let answered = by_delivery(&pager);
    let twice: Vec<_> = answered
        .iter()
        .filter(|(_, (_, n))| *n > 1)
        .map(|(id, (referral, n))| format!("{referral} ({id}) x{n}"))
        .collect();
    assert!(
        twice.is_empty(),
        "{} of {} notifications were sent more than once: {twice:?}",
        twice.len(),
        answered.len()
    );
    assert_eq!(answered.len(), BREACHES, "one notification per breach");
}
