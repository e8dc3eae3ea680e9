//! Retention of closed referrals, on the real broker: with `clock.closed_retention_days` set, a
//! referral that holds no clock is forgotten once its newest event is older than the retention
//! (a tombstone on `clock-state`, counted), one with a running clock is kept however old, and
//! a replay of the forgotten referral's old events is refused as implausible (older than
//! `validation.max_past_days`) instead of starting its clocks again. Time is a [`ManualTime`]
//! moved a month on; nothing waits a month.
//!
//! And the retention of `sla-outcomes` (compacted, so per record, per force): `safeclock outcomes
//! expire` tombstones closed clocks' outcomes past their force's period and never an open one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use jiff::SignedDuration;
use rdkafka::message::{Message, OwnedMessage};
use safeclock_common::kafka::{dlq_headers, Topic};
use safeclock_common::time::ManualTime;
use safeclock_tests::{counter, header, isolated_settings, produce, read_to_end, real_broker};

const TIMEOUT: Duration = Duration::from_secs(60);

fn event(id: &str, referral: &str, at: jiff::Timestamp, kind: &str) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{id}","referralId":"{referral}","forceId":"nottinghamshire","occurredAt":"{at}","recordedAt":"{at}","sourceSystem":"test",{kind}}}"#
    )
    .into_bytes()
}

const RECEIVED: &str = r#""referralReceived":{"category":"CATEGORY_GROOMING","risk":"RISK_GRADE_HIGH","area":"city","team":"mash"}"#;
const CLOSED: &str = r#""referralClosed":{}"#;

/// The newest `clock-state` record of each key, as (key, has a value).
fn latest_states(brokers: &str, topic: &str) -> std::collections::BTreeMap<String, bool> {
    read_to_end(brokers, topic, 3, "read_uncommitted", TIMEOUT)
        .iter()
        .map(|m: &OwnedMessage| {
            (
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().is_some(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_referral_is_forgotten_after_its_retention_and_its_old_events_cannot_bring_it_back(
) {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    settings.clock.closed_retention_days = Some(30);
    settings.validation.max_past_days = Some(30);
    settings.validate().unwrap();
    let settings = Arc::new(settings);
    let input = settings.topic(Topic::ReferralEvents);
    let changelog = settings.topic(Topic::ClockState);
    let dlq = settings.topic(Topic::DeadLetter);
    let t0 = safeclock_tests::now();
    let time = Arc::new(ManualTime::new(t0));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = safeclock::app::start(
        settings.clone(),
        safeclock::app::Service::Clock,
        time.clone(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();

    let received = event("gone-1", "R-GONE", t0, RECEIVED);
    produce(&brokers, &input, "R-GONE", &received).await;
    let closed = event("gone-2", "R-GONE", t0, CLOSED);
    produce(&brokers, &input, "R-GONE", &closed).await;
    produce(
        &brokers,
        &input,
        "R-KEPT",
        &event("kept-1", "R-KEPT", t0, RECEIVED),
    )
    .await;
    safeclock_tests::wait_for("both referrals' states on the changelog", TIMEOUT, || {
        let states = latest_states(&brokers, &changelog);
        states.get("R-GONE") == Some(&true) && states.get("R-KEPT") == Some(&true)
    })
    .await;

    // A day short of the retention: kept.
    time.advance(SignedDuration::from_hours(29 * 24));
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        latest_states(&brokers, &changelog).get("R-GONE"),
        Some(&true)
    );

    // Past it: the closed referral's state becomes a tombstone; the open one stays.
    time.advance(SignedDuration::from_hours(2 * 24));
    safeclock_tests::wait_for("the closed referral's tombstone", TIMEOUT, || {
        latest_states(&brokers, &changelog).get("R-GONE") == Some(&false)
    })
    .await;
    assert_eq!(
        latest_states(&brokers, &changelog).get("R-KEPT"),
        Some(&true)
    );
    assert_eq!(
        counter(
            &running.registry,
            "safeclock_clock_referrals_forgotten_total",
            &[]
        ),
        1.0
    );

    // Its old events again (a replay, a resent batch): refused as implausible, dead-lettered,
    // and nothing of the referral comes back.
    produce(&brokers, &input, "R-GONE", &received).await;
    safeclock_tests::wait_for("the replayed event dead-lettered", TIMEOUT, || {
        read_to_end(&brokers, &dlq, 3, "read_uncommitted", TIMEOUT)
            .iter()
            .any(|m| header(m, dlq_headers::REASON).as_deref() == Some("implausible_time"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        latest_states(&brokers, &changelog).get("R-GONE"),
        Some(&false)
    );

    shutdown.cancel();
    running.wait().await.unwrap();
}

/// An outcome record as the clock writes it (proto3 JSON).
fn outcome(referral: &str, force: &str, status: &str, stopped: Option<jiff::Timestamp>) -> String {
    let stopped = stopped.map_or(String::new(), |t| format!(r#""stoppedAt":"{t}","#));
    format!(
        r#"{{"outcomeId":"{referral}/victim-contact/c1","referralId":"{referral}","ruleId":"victim-contact","clockId":"c1","labels":{{"forceId":"{force}","category":"grooming","risk":"high"}},"status":"{status}",{stopped}"startedAt":"2014-09-08T09:40:00Z","updatedAt":"2014-09-08T12:00:00Z"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_outcomes_expire_after_their_forces_retention_and_open_ones_never() {
    let brokers = real_broker();
    let mut settings = isolated_settings(&brokers);
    // Nottinghamshire keeps the default (six years); Derbyshire keeps ten.
    settings
        .kafka
        .retention
        .sla_outcomes_days_by_force
        .insert("derbyshire".into(), 3650);
    settings.validate().unwrap();
    let settings = Arc::new(settings);
    safeclock_common::kafka::ensure_topics(&settings, &[Topic::SlaOutcomes])
        .await
        .unwrap();
    let topic = settings.topic(Topic::SlaOutcomes);
    // A fixed "now": nothing here depends on the day the test runs.
    let now: jiff::Timestamp = "2030-06-01T00:00:00Z".parse().unwrap();
    let years_ago = |y: i64| now - SignedDuration::from_hours(24 * 365 * y);
    let records = [
        (
            "R-OLD-MET",
            "nottinghamshire",
            "OUTCOME_STATUS_MET",
            Some(years_ago(7)),
        ),
        (
            "R-OLD-LATE",
            "nottinghamshire",
            "OUTCOME_STATUS_MET_LATE",
            Some(years_ago(7)),
        ),
        (
            "R-RECENT",
            "nottinghamshire",
            "OUTCOME_STATUS_MET",
            Some(years_ago(3)),
        ),
        (
            "R-DERBY-OLD",
            "derbyshire",
            "OUTCOME_STATUS_CANCELLED",
            Some(years_ago(7)),
        ),
        (
            "R-DERBY-OLDER",
            "derbyshire",
            "OUTCOME_STATUS_MET",
            Some(years_ago(11)),
        ),
        (
            "R-STILL-OPEN",
            "nottinghamshire",
            "OUTCOME_STATUS_OPEN_BREACHED",
            None,
        ),
    ];
    for (referral, force, status, stopped) in &records {
        let key = format!("{referral}/victim-contact/c1");
        produce(
            &brokers,
            &topic,
            &key,
            outcome(referral, force, status, *stopped).as_bytes(),
        )
        .await;
    }
    let live = || -> std::collections::BTreeSet<String> {
        latest_states(&brokers, &topic)
            .into_iter()
            .filter(|(_, v)| *v)
            .map(|(k, _)| k.split('/').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(live().len(), records.len());

    let counted = safeclock::outcomes::expire(&settings, now, true)
        .await
        .unwrap();
    assert_eq!(counted["nottinghamshire"], (1, 2), "kept, expired");
    assert_eq!(counted["derbyshire"], (1, 1));
    assert_eq!(live().len(), records.len(), "a dry run writes nothing");

    safeclock::outcomes::expire(&settings, now, false)
        .await
        .unwrap();
    let expected: std::collections::BTreeSet<String> = ["R-RECENT", "R-DERBY-OLD", "R-STILL-OPEN"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(live(), expected);
    // Idempotent: a second run finds nothing more to expire.
    let again = safeclock::outcomes::expire(&settings, now, false)
        .await
        .unwrap();
    assert_eq!(again["nottinghamshire"], (1, 0));
    assert_eq!(again["derbyshire"], (1, 0));
}
