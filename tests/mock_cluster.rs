//! Component tests on librdkafka's in-process mock cluster: the whole pipeline without a broker
//! process, and the offset discipline under produce failures the mock can inject.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use safeclock_common::config::Settings;
use safeclock_common::kafka::Topic;
use safeclock_tests::scenario::{committed_offsets, end_offsets, end_to_end};
use safeclock_tests::{isolated_settings, produce};

fn mock_settings(
    mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    partitions: i32,
) -> Settings {
    let mut settings = isolated_settings(&mock.bootstrap_servers());
    settings.kafka.partitions = partitions;
    settings.kafka.create_topics = false;
    for t in Topic::ALL {
        mock.create_topic(&settings.topic(t), settings.kafka.partitions, 1)
            .unwrap();
    }
    settings
}

/// Starts the clock service alone on the wall clock.
async fn start_clock(
    settings: &Arc<Settings>,
) -> (
    safeclock::app::Running,
    safeclock_common::shutdown::CancellationToken,
) {
    let shutdown = safeclock_common::shutdown::CancellationToken::new();
    let running = safeclock::app::start(
        settings.clone(),
        safeclock::app::Service::Clock,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (running, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_the_mock_cluster() {
    let mock = MockCluster::new(1).unwrap();
    end_to_end(mock_settings(&mock, 3), true).await;
}

/// The same pipeline with the clock writing each batch's SLA events, outcomes, state and input
/// offsets in one Kafka transaction (the option for brokers that support transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_with_kafka_transactions_on_the_mock_cluster() {
    let mock = MockCluster::new(1).unwrap();
    let mut settings = mock_settings(&mock, 3);
    settings.clock.transactional_id = Some(format!("{}-1", settings.clock.group_id));
    end_to_end(settings, true).await;
}

/// While the broker refuses the clock's outputs (retriably: not enough in-sync replicas, for
/// longer than `message.timeout.ms`), the clock waits it out: it keeps running, reports not
/// ready, commits no offset and publishes nothing; once the broker takes records again, the same
/// instance publishes the output and commits the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_outputs_for_a_while_is_waited_out_without_committing_or_exiting() {
    let mock = MockCluster::new(1).unwrap();
    let mut settings = mock_settings(&mock, 1);
    settings
        .kafka
        .producer_properties
        .insert("message.timeout.ms".into(), "1500".into());
    let brokers = settings.kafka.brokers.clone();
    let input = settings.topic(Topic::ReferralEvents);
    let settings = Arc::new(settings);

    // The test's own record gets in first; then every produce request fails (retriably).
    let at = jiff::Timestamp::from_second(safeclock_tests::now().as_second()).unwrap();
    let event = safeclock_tests::scenario::received("e-1", "R-1", "nottinghamshire", at);
    produce(&brokers, &input, "R-1", &event).await;
    let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 100_000];
    mock.request_errors(RDKafkaApiKey::Produce, &errors);

    let (running, shutdown) = start_clock(&settings).await;
    let waits = || -> f64 {
        running
            .registry
            .gather()
            .iter()
            .filter(|f| f.name() == "safeclock_broker_waits_total")
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value())
            .sum()
    };
    // Three rounds of message timeouts (1.5 s each) and pauses: far past message.timeout.ms.
    safeclock_tests::wait_for(
        "the clock to wait out the broker three times",
        Duration::from_secs(60),
        || waits() >= 3.0,
    )
    .await;
    assert!(
        running
            .readiness
            .not_ready()
            .contains(&"clock-outputs".to_string()),
        "not ready while its outputs cannot be written: {:?}",
        running.readiness.not_ready()
    );
    assert_eq!(
        committed_offsets(&brokers, &settings.clock.group_id, &input, 1),
        vec![-1],
        "nothing may be committed for a record whose outputs were not stored"
    );
    assert_eq!(
        end_offsets(&brokers, &settings.topic(Topic::SlaEvents), 1),
        vec![-1],
        "no output was stored while the broker refused it"
    );

    // The broker recovers; the same instance (it never stopped) writes the output.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let sla = safeclock_tests::reader(&brokers, &[&settings.topic(Topic::SlaEvents)]);
    let got = safeclock_tests::read_until(&sla, Duration::from_secs(60), |m| !m.is_empty()).await;
    assert!(
        String::from_utf8_lossy(rdkafka::Message::payload(&got[0]).unwrap())
            .contains("SLA_TRANSITION_STARTED")
    );
    // Auto-commit picks up the stored offset once the output is acknowledged.
    safeclock_tests::wait_for(
        "the offset to be committed",
        Duration::from_secs(30),
        || committed_offsets(&brokers, &settings.clock.group_id, &input, 1) == vec![1],
    )
    .await;
    let readiness = running.readiness.clone();
    safeclock_tests::wait_for("ready again", Duration::from_secs(30), || {
        readiness.is_ready()
    })
    .await;
    shutdown.cancel();
    running
        .wait()
        .await
        .expect("the clock never failed while the broker refused its outputs");
}
