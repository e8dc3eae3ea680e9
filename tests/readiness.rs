//! Readiness tells the truth: a service is not ready while it cannot reach any broker, and is
//! ready again once a broker is back, without a restart. (Not ready while restoring state is
//! covered by the clock's crash-recovery test, which waits on /readyz.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use safeclock::app::{self, Service};
use safeclock_common::shutdown::CancellationToken;
use safeclock_tests::isolated_settings;
use safeclock_tests::kafka_cluster::KafkaCluster;

async fn readyz(ops: std::net::SocketAddr) -> u16 {
    match reqwest::get(format!("http://{ops}/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn wait_for_status(ops: std::net::SocketAddr, want: u16, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = readyz(ops).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: /readyz answered {got}, want {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_cut_off_from_the_broker_and_ready_again_when_it_returns() {
    let dir = std::env::temp_dir().join(format!("safeclock-readiness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A one-node Apache Kafka of this test's own, to kill and start again.
    let broker = KafkaCluster::start(&dir, 1, 3, &[]);
    let mut settings = isolated_settings(broker.bootstrap());
    settings.kafka.create_topics = true;
    settings
        .kafka
        .consumer_properties
        .insert("statistics.interval.ms".into(), "1000".into());
    let shutdown = CancellationToken::new();
    let running = app::start(
        Arc::new(settings),
        Service::Exporter,
        safeclock_tests::test_time(),
        "127.0.0.1:0".parse().unwrap(),
        shutdown.clone(),
    )
    .await
    .expect("exporter starts");
    let ops = running.ops_addr;
    wait_for_status(ops, 200, Duration::from_secs(60), "after joining the group").await;

    tokio::task::block_in_place(|| broker.kill(1));
    wait_for_status(ops, 503, Duration::from_secs(30), "with the broker down").await;
    // Still alive: liveness is not readiness.
    let health = reqwest::get(format!("http://{ops}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    tokio::task::block_in_place(|| broker.start_node(1));
    wait_for_status(
        ops,
        200,
        Duration::from_secs(60),
        "after the broker returned",
    )
    .await;

    shutdown.cancel();
    running.wait().await.unwrap();
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
