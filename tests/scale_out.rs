//! Scaling the clock out and back in on the real broker yields the same SLA events, by id, as
//! one instance on the same input: partitions and their state move between instances on each
//! rebalance without losing or inventing a transition.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rdkafka::message::Message;
use safeclock::app::Service;
use safeclock_common::config::Settings;
use safeclock_common::event::decode_sla_event;
use safeclock_common::kafka::Topic;
use safeclock_common::schema::v1::SlaEvent;
use safeclock_tests::scenario::{contacted, received};
use safeclock_tests::{isolated_settings, produce, reader, real_broker, wait_for, InProcess};

const TIMEOUT: Duration = Duration::from_secs(90);
const REFERRALS_PER_PHASE: usize = 40;

async fn start(settings: &Arc<Settings>) -> InProcess {
    InProcess::start(settings, Service::Clock, TIMEOUT).await
}

/// Input partitions `instance` holds.
fn partitions(instance: &InProcess) -> i64 {
    instance.gauge("safeclock_clock_partitions")
}

/// Phase `phase` of the input: referrals received 30 h before `t0` (victim contact already
/// breached), half of them contacted 2 h before `t0` (met late), and one referral received an
/// hour before `t0` whose clocks stay open.
async fn phase(brokers: &str, topic: &str, t0: Timestamp, phase: usize) {
    let h = SignedDuration::from_hours;
    for i in 0..REFERRALS_PER_PHASE {
        let referral = format!("R-P{phase}-{i:03}");
        produce(
            brokers,
            topic,
            &referral,
            &received(
                &format!("{referral}-r"),
                &referral,
                "nottinghamshire",
                t0 - h(30),
            ),
        )
        .await;
        if i % 2 == 0 {
            produce(
                brokers,
                topic,
                &referral,
                &contacted(
                    &format!("{referral}-c"),
                    &referral,
                    "nottinghamshire",
                    t0 - h(2),
                ),
            )
            .await;
        }
    }
    let referral = format!("R-P{phase}-open");
    produce(
        brokers,
        topic,
        &referral,
        &received(
            &format!("{referral}-r"),
            &referral,
            "nottinghamshire",
            t0 - h(1),
        ),
    )
    .await;
}

/// Every SLA event on the output topic, as many times as it was written: read from the start
/// until `done` holds and then nothing new arrives for `quiet` (or the timeout).
async fn read_sla_events(
    settings: &Settings,
    quiet: Duration,
    done: impl Fn(&[SlaEvent]) -> bool,
) -> Vec<SlaEvent> {
    let consumer = reader(
        &settings.kafka.brokers,
        &[&settings.topic(Topic::SlaEvents)],
    );
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(quiet, rdkafka::consumer::StreamConsumer::recv(&consumer)).await
        {
            Ok(Ok(m)) => events.push(decode_sla_event(m.payload().unwrap()).unwrap()),
            Ok(Err(e)) => eprintln!("reader: {e}"),
            Err(_) if !events.is_empty() && done(&events) => break,
            Err(_) => {}
        }
    }
    events
}

/// (SLA event id, what it is) for every SLA event on the output topic: read until `done` holds
/// and then nothing new arrives for `quiet`.
async fn sla_events(
    settings: &Settings,
    quiet: Duration,
    done: impl Fn(&BTreeSet<(String, String)>) -> bool,
) -> BTreeSet<(String, String)> {
    let by_id = |events: &[SlaEvent]| -> BTreeSet<(String, String)> {
        events
            .iter()
            .map(|e| {
                let what = format!("{} {} {:?}", e.referral_id, e.rule_id, e.transition());
                (e.sla_event_id.clone(), what)
            })
            .collect()
    };
    by_id(&read_sla_events(settings, quiet, |events| done(&by_id(events))).await)
}

/// Every SLA event id on the output topic, as many times as it was written, sorted.
async fn sla_event_writes(settings: &Settings, quiet: Duration) -> Vec<String> {
    let mut ids: Vec<String> = read_sla_events(settings, quiet, |_| true)
        .await
        .into_iter()
        .map(|e| e.sla_event_id)
        .collect();
    ids.sort();
    ids
}

fn settings(brokers: &str) -> Arc<Settings> {
    let mut s = isolated_settings(brokers);
    s.kafka.create_topics = true;
    s.kafka.partitions = 6;
    Arc::new(s)
}

// Scale-in stops two of the three instances at once, as `kubectl scale --replicas=1` does.
// (On tansu 0.6, the broker of earlier versions of this test, it had to go one instance at a
// time with a wait for each rebalance; Apache Kafka needs no such pacing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_the_clock_from_one_to_three_instances_and_back_yields_the_same_sla_events() {
    let brokers = real_broker();
    let t0 = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();

    // One instance, the whole input.
    let single = settings(&brokers);
    let input = single.topic(Topic::ReferralEvents);
    let one = start(&single).await;
    for p in 0..3 {
        phase(&brokers, &input, t0, p).await;
    }
    let expected = sla_events(&single, Duration::from_secs(5), |_| true).await;
    one.stop().await;

    // One instance, then three, then one again, with input arriving in each period.
    let scaled = settings(&brokers);
    let input = scaled.topic(Topic::ReferralEvents);
    let first = start(&scaled).await;
    phase(&brokers, &input, t0, 0).await;
    let second = start(&scaled).await;
    let third = start(&scaled).await;
    phase(&brokers, &input, t0, 1).await;
    // Scale in: the second and third leave together; the first takes every partition.
    let all_held =
        |instances: &[&InProcess]| instances.iter().copied().map(partitions).sum::<i64>() == 6;
    wait_for(
        "three instances to share the six partitions",
        TIMEOUT,
        || all_held(&[&first, &second, &third]),
    )
    .await;
    tokio::join!(third.stop(), second.stop());
    wait_for(
        "the first instance to hold every partition again",
        TIMEOUT,
        || all_held(&[&first]),
    )
    .await;
    phase(&brokers, &input, t0, 2).await;
    // Wait for every expected event (or the timeout).
    let got = sla_events(&scaled, Duration::from_secs(3), |got| {
        expected.is_subset(got)
    })
    .await;
    first.stop().await;

    let missing: Vec<_> = expected.difference(&got).map(|(_, what)| what).collect();
    let extra: Vec<_> = got.difference(&expected).map(|(_, what)| what).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} SLA events from one instance, {} scaled; missing {missing:?}, extra {extra:?}",
        expected.len(),
        got.len()
    );
}

// A tick's states go out behind its SLA events and are not waited for: the next tick, a
// hand-over or a stop settles them. They must still reach the changelog: an instance that takes
// partitions over, or starts after a graceful stop, restores the breaches as fired and fires
// none of them again. (The breaches here are overdue when their referrals arrive, so each fires
// on a tick.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn breaches_fired_on_ticks_are_not_fired_again_after_a_hand_over_or_a_stop() {
    let brokers = real_broker();
    let t0 = Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let settings = settings(&brokers);
    let input = settings.topic(Topic::ReferralEvents);
    let first = start(&settings).await;
    phase(&brokers, &input, t0, 0).await;
    let written = sla_event_writes(&settings, Duration::from_secs(5)).await;
    assert!(written.len() > REFERRALS_PER_PHASE, "{written:?}");
    let mut once = written.clone();
    once.dedup();
    assert_eq!(once, written, "an SLA event written twice by one instance");

    // A hand-over to a second instance, then a graceful stop of each and a fresh start.
    let second = start(&settings).await;
    wait_for("the second instance to take partitions", TIMEOUT, || {
        partitions(&second) > 0 && partitions(&first) + partitions(&second) == 6
    })
    .await;
    first.stop().await;
    wait_for(
        "the second instance to hold every partition",
        TIMEOUT,
        || partitions(&second) == 6,
    )
    .await;
    second.stop().await;
    let third = start(&settings).await;
    wait_for(
        "the third instance to hold every partition",
        TIMEOUT,
        || partitions(&third) == 6,
    )
    .await;
    // Several ticks of the restored state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sla_event_writes(&settings, Duration::from_secs(5)).await;
    third.stop().await;
    assert_eq!(
        after, written,
        "SLA events written again after the hand-overs and the restart"
    );
}
