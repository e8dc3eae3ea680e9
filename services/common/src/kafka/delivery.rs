//! Enqueuing records and awaiting the broker's acknowledgement.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

/// Enqueues `record`, waiting while the producer's local queue is full, and returns the future of
/// its delivery report. Enqueuing in order keeps per-partition order.
///
/// # Errors
/// When librdkafka refuses the record for a reason other than a full queue.
pub async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> anyhow::Result<DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, r)) => anyhow::bail!("cannot enqueue a record for {}: {e}", r.topic),
        }
    }
}

/// Waits until every delivery in `deliveries` is acknowledged by the broker.
///
/// # Errors
/// The first delivery failure (after librdkafka's own retries), in words.
pub async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for result in futures::future::join_all(deliveries).await {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, msg))) => {
                anyhow::bail!(
                    "broker did not acknowledge a record for {}: {e}",
                    msg.topic()
                )
            }
            Err(_) => anyhow::bail!("producer dropped a delivery report (shutting down?)"),
        }
    }
    Ok(())
}
