//! Writing refused records to the dead-letter topic.

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::delivery::enqueue;
use super::topics::Topic;
use crate::config::Settings;
use crate::event::Rejection;
use crate::metrics::ConsumerMetrics;

/// Header names written on dead-letter records.
pub mod dlq_headers {
    pub const REASON: &str = "safeclock.dlq.reason";
    pub const ERROR: &str = "safeclock.dlq.error";
    pub const SERVICE: &str = "safeclock.dlq.service";
    pub const SOURCE_TOPIC: &str = "safeclock.dlq.source.topic";
    pub const SOURCE_PARTITION: &str = "safeclock.dlq.source.partition";
    pub const SOURCE_OFFSET: &str = "safeclock.dlq.source.offset";
}

/// Writes refused records to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: &'static str,
    metrics: ConsumerMetrics,
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer,
        settings: &Settings,
        service: &'static str,
        metrics: ConsumerMetrics,
    ) -> Self {
        Self {
            producer,
            topic: settings.topic(Topic::DeadLetter),
            service,
            metrics,
        }
    }

    /// Enqueues `message` on the dead-letter topic with the original key, value and headers plus
    /// headers for the reason, source topic, partition and offset. Returns the delivery future;
    /// the source offset may be stored once it resolves.
    ///
    /// # Errors
    /// When the record cannot be enqueued.
    pub async fn send(
        &self,
        message: &BorrowedMessage<'_>,
        rejection: &Rejection,
    ) -> anyhow::Result<DeliveryFuture> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let error = rejection.to_string();
        for (key, value) in [
            (dlq_headers::REASON, rejection.reason()),
            (dlq_headers::ERROR, error.as_str()),
            (dlq_headers::SERVICE, self.service),
            (dlq_headers::SOURCE_TOPIC, message.topic()),
            (dlq_headers::SOURCE_PARTITION, partition.as_str()),
            (dlq_headers::SOURCE_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let payload = message.payload().unwrap_or_default();
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(payload)
            .headers(headers);
        let key = message.key().map(String::from_utf8_lossy);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        tracing::warn!(
            service = self.service,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason = rejection.reason(),
            error.message = %rejection,
            "invalid record sent to the dead-letter topic"
        );
        self.metrics
            .invalid
            .with_label_values(&[self.service, rejection.reason()])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        enqueue(&self.producer, record).await
    }
}

impl DeadLetters {
    /// Enqueues a record this service produced itself but could not deliver (e.g. a notification
    /// whose retry budget is spent): `payload` under `key`, with the reason headers. There is no
    /// source record, so the source headers are omitted.
    ///
    /// # Errors
    /// When the record cannot be enqueued.
    pub async fn send_undeliverable(
        &self,
        key: &str,
        payload: &[u8],
        reason: &str,
        error: &str,
    ) -> anyhow::Result<DeliveryFuture> {
        let mut headers = OwnedHeaders::new();
        for (name, value) in [
            (dlq_headers::REASON, reason),
            (dlq_headers::ERROR, error),
            (dlq_headers::SERVICE, self.service),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        tracing::warn!(
            service = self.service,
            reason,
            error.message = error,
            "undeliverable record sent to the dead-letter topic"
        );
        self.metrics
            .dead_letters
            .with_label_values(&[self.service])
            .inc();
        let record = FutureRecord::<str, [u8]>::to(&self.topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        enqueue(&self.producer, record).await
    }
}
