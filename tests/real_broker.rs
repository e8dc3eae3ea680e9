//! Integration tests against a real Apache Kafka broker process (started on a free loopback port
//! by `scripts/test.sh`, address in `SAFECLOCK_TEST_BROKERS`). Each test has its own topics and
//! consumer groups.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use safeclock_tests::scenario::end_to_end;
use safeclock_tests::{isolated_settings, real_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_a_real_broker() {
    let mut settings = isolated_settings(&real_broker());
    settings.kafka.create_topics = true;
    end_to_end(settings, false).await;
}
