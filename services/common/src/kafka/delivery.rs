//! Enqueuing records and awaiting the broker's acknowledgement, and what a failure means.
//!
//! # Two kinds of failure, and a third
//! A record the broker does not take is either **refused** or the broker is **unavailable**:
//!
//! - *refused* ([`Failure::Refused`]): the failure would repeat forever for this record, whoever
//!   retries it and when: it is too large (`MessageSizeTooLarge`, librdkafka's own check of
//!   `message.max.bytes` or the broker's `max.message.bytes`), the batch holding it is too large
//!   for the broker, or the broker rejects the record itself (`InvalidRecord`). The caller must
//!   not retry it; it dead-letters the input that caused it (or the record itself) and moves on;
//! - *unavailable* ([`Failure::Unavailable`]): the broker is away or not ready to take anything
//!   (a transport failure, a request or message timeout, no leader, not enough in-sync replicas,
//!   a full local queue, a topic or partition not known yet, no authorisation yet). Retrying
//!   later succeeds without any change to the record. [`deliver`] waits these out with backoff,
//!   for as long as it takes, and never gives the record up.
//!
//! A failure this module does not recognise is taken as *unavailable*: waiting is always safe
//! (nothing is skipped, the service reports not ready and logs the error), while dead-lettering a
//! record that could have been written is not.
//!
//! The third kind is the producer itself being unusable ([`Failure::Fatal`]: librdkafka's fatal
//! error of an idempotent or transactional producer, a fenced instance, a producer shut down).
//! No record is at fault and waiting does not help; a new producer does, so the service stops
//! with an error and its restart (or the next owner of its partitions) processes the records
//! again.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders, ToBytes};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::ops::ReadinessHandle;

/// What a failed write means for the record and for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker will never take this record: retrying repeats the failure.
    Refused,
    /// The broker is away or not ready: retrying later succeeds.
    Unavailable,
    /// The producer cannot write anything any more: only a new one can.
    Fatal,
}

impl Failure {
    /// A short fixed label (logs, metrics).
    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Unavailable => "unavailable",
            Failure::Fatal => "fatal",
        }
    }
}

/// Classifies a produce or delivery error (see the module doc).
pub fn classify(error: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::MessageProduction(code) => match code {
            C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::UnsupportedForMessageFormat => Failure::Refused,
            C::Fatal | C::Fenced | C::InvalidProducerEpoch | C::ProducerFenced => Failure::Fatal,
            // Everything else (transport failures, timeouts, leaders, replicas, a record that
            // failed only because another one in its batch was invalid, codes not known here).
            _ => Failure::Unavailable,
        },
        KafkaError::Canceled => Failure::Fatal,
        _ => Failure::Unavailable,
    }
}

/// A record the broker did not take, and what that means.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} a record for {topic}: {source}", describe(*.failure))]
pub struct ProduceError {
    /// Where the record was going.
    pub topic: String,
    pub failure: Failure,
    #[source]
    pub source: KafkaError,
}

fn describe(failure: Failure) -> &'static str {
    match failure {
        Failure::Refused => "the broker refuses, for good,",
        Failure::Unavailable => "the broker cannot take, for now,",
        Failure::Fatal => "the producer can no longer write",
    }
}

impl ProduceError {
    /// The error librdkafka gives a record over `message.max.bytes`, for a service that checks
    /// sizes before producing (so that nothing of a set is written when one record cannot be).
    pub fn too_large(topic: impl Into<String>) -> Self {
        Self::new(
            topic,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        )
    }

    /// Whether the broker refuses the record because of its size.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self.source,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::MessageBatchTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
            )
        )
    }

    fn new(topic: impl Into<String>, source: KafkaError) -> Self {
        Self {
            topic: topic.into(),
            failure: classify(&source),
            source,
        }
    }
}

/// Enqueues `record`, waiting while the producer's local queue is full, and returns the future of
/// its delivery report. Enqueuing in order keeps per-partition order.
///
/// # Errors
/// When librdkafka refuses the record for a reason other than a full queue (a [`ProduceError`]
/// inside, saying which kind of failure it is).
pub async fn enqueue(
    producer: &FutureProducer,
    record: FutureRecord<'_, str, [u8]>,
) -> anyhow::Result<DeliveryFuture> {
    Ok(try_enqueue(producer, record).await?)
}

/// [`enqueue`] with the failure classified.
///
/// # Errors
/// A [`ProduceError`] when librdkafka refuses the record for a reason other than a full queue.
pub async fn try_enqueue<K: ToBytes + ?Sized>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, [u8]>,
) -> Result<DeliveryFuture, ProduceError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, r)) => return Err(ProduceError::new(r.topic, e)),
        }
    }
}

/// Waits until every delivery in `deliveries` is acknowledged by the broker.
///
/// # Errors
/// The first delivery failure (after librdkafka's own retries), in words, with a
/// [`ProduceError`] inside.
pub async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for result in settle(deliveries).await {
        result?;
    }
    Ok(())
}

/// The outcome of every delivery in `deliveries`, in order.
pub async fn settle(deliveries: Vec<DeliveryFuture>) -> Vec<Result<(), ProduceError>> {
    futures::future::join_all(deliveries)
        .await
        .into_iter()
        .map(|result| match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, msg))) => Err(ProduceError::new(msg.topic(), e)),
            Err(_) => Err(ProduceError::new("(unknown)", KafkaError::Canceled)),
        })
        .collect()
}

/// A record to write, owned so that it can be written again after the broker was away.
#[derive(Debug, Clone)]
pub struct Output {
    pub topic: String,
    /// The partition, or `None` to partition by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

impl Output {
    /// A record for `topic` under `key`.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<Vec<u8>>,
        payload: Option<Vec<u8>>,
    ) -> Self {
        Self {
            topic: topic.into(),
            partition: None,
            key: Some(key.into()),
            payload,
            headers: None,
        }
    }

    /// The same record, to `partition`.
    #[must_use]
    pub fn to_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Key and value bytes (what counts against `message.max.bytes`, headers and framing aside).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut r = FutureRecord::<[u8], [u8]>::to(&self.topic);
        if let Some(p) = self.partition {
            r = r.partition(p);
        }
        if let Some(k) = &self.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &self.payload {
            r = r.payload(v.as_slice());
        }
        if let Some(h) = &self.headers {
            r = r.headers(h.clone());
        }
        r
    }
}

/// An output the broker refuses for good ([`Failure::Refused`]): its position in the slice given
/// to [`deliver`], and why.
#[derive(Debug)]
pub struct Refusal {
    pub index: usize,
    pub error: ProduceError,
}

/// Why [`deliver`] gave up before every output was either acknowledged or refused.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// The service is stopping: nothing is settled, and no offset may be stored.
    #[error("stopping while records were still being written")]
    Shutdown,
    /// The producer can no longer write (see [`Failure::Fatal`]).
    #[error(transparent)]
    Fatal(ProduceError),
}

/// Whether `error` is [`Interrupted::Shutdown`]: the service was told to stop while the broker
/// was away, which is a stop, not a failure.
pub fn is_shutdown(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<Interrupted>(),
        Some(Interrupted::Shutdown)
    )
}

/// How a service waits out a broker that is away: not ready meanwhile, backing off, counting the
/// waits, and giving up only when the service is told to stop.
#[derive(Debug, Clone)]
pub struct BrokerWait {
    service: &'static str,
    ready: ReadinessHandle,
    shutdown: CancellationToken,
    waits: prometheus::IntCounter,
}

/// The first pause after a broker was found away, doubled at each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long writes already under way may still be acknowledged once the service is told to stop.
const STOP_GRACE: Duration = Duration::from_secs(2);

impl BrokerWait {
    /// `ready` is this service's "can write" readiness component (set ready here); `waits` counts
    /// each pause.
    pub fn new(
        service: &'static str,
        ready: ReadinessHandle,
        shutdown: CancellationToken,
        waits: prometheus::IntCounter,
    ) -> Self {
        ready.set(true);
        Self {
            service,
            ready,
            shutdown,
            waits,
        }
    }

    /// The pause before attempt `attempt` (1-based) after a failure.
    pub fn backoff(attempt: u32) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(MAX_BACKOFF)
    }

    /// Whether the service has been told to stop.
    pub fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

impl BrokerWait {
    /// After failed attempt `attempt` (1-based), for `error`: not ready, counted, logged, then a
    /// pause of [`BrokerWait::backoff`].
    ///
    /// # Errors
    /// [`Interrupted::Shutdown`] when the service is told to stop meanwhile.
    pub async fn pause(
        &self,
        attempt: u32,
        records: usize,
        error: &(dyn std::fmt::Display + Send + Sync),
    ) -> Result<(), Interrupted> {
        self.ready.set(false);
        self.waits.inc();
        let pause = Self::backoff(attempt);
        tracing::warn!(
            service = self.service,
            attempt,
            records,
            pause_secs = pause.as_secs_f64(),
            error.message = %error,
            "the broker is unavailable: nothing is skipped or committed; writing every record again after a pause"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => Ok(()),
            () = self.shutdown.cancelled() => Err(Interrupted::Shutdown),
        }
    }

    /// The writes succeeded (after `attempts` attempts): ready again.
    pub fn recovered(&self, attempts: u32) {
        if attempts > 1 {
            tracing::info!(
                service = self.service,
                attempts,
                "the broker takes records again"
            );
        }
        self.ready.set(true);
    }
}

/// Writes every output once, in order, and waits for the broker's answer to each. Returns the
/// outputs the broker refuses for good; every other output is acknowledged.
///
/// # Errors
/// The first failure that is not a refusal (the broker unavailable, or the producer unusable):
/// then nothing is known to be written.
pub async fn deliver_once(
    producer: &FutureProducer,
    outputs: &[Output],
) -> Result<Vec<Refusal>, ProduceError> {
    settle_all(enqueue_all(producer, outputs).await).await
}

/// Enqueues every output in order (waiting while librdkafka's local queue is full) and returns
/// each one's delivery future, or why librdkafka refused to enqueue it.
pub(super) async fn enqueue_all(
    producer: &FutureProducer,
    outputs: &[Output],
) -> Vec<Result<DeliveryFuture, ProduceError>> {
    let mut pending = Vec::with_capacity(outputs.len());
    for output in outputs {
        pending.push(try_enqueue(producer, output.record()).await);
    }
    pending
}

/// Awaits every delivery of [`enqueue_all`]: the outputs refused for good, or the failure that
/// means nothing is known to be written (a fatal one outranks an unavailable broker).
pub(super) async fn settle_all(
    pending: Vec<Result<DeliveryFuture, ProduceError>>,
) -> Result<Vec<Refusal>, ProduceError> {
    let mut refused = Vec::new();
    let mut failed: Option<ProduceError> = None;
    for (index, p) in pending.into_iter().enumerate() {
        let result = match p {
            Ok(delivery) => settle(vec![delivery])
                .await
                .pop()
                .unwrap_or_else(|| Err(ProduceError::new("(unknown)", KafkaError::Canceled))),
            Err(e) => Err(e),
        };
        if let Err(error) = result {
            note_failure(index, error, &mut refused, &mut failed);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(refused),
    }
}

/// Writes every output once, in order, inside a transaction, and waits for the broker's answers
/// until the first failure. Returns the outputs the broker refuses for good among the answers
/// received by then; when it returns none, every output is acknowledged.
///
/// A failed record makes librdkafka's transaction abortable: the records after it are neither
/// sent nor failed until the transaction is aborted or `message.timeout.ms` passes (60 s under a
/// transaction). So this stops waiting at the first failure, and the caller aborts the
/// transaction and writes the batch again (without what was refused). A refusal outranks the
/// broker being unavailable: other failures of the same transaction (an out-of-order sequence
/// after the refused batch) follow from it, and the next attempt finds out whether the broker is
/// really away.
///
/// # Errors
/// The producer unusable ([`Failure::Fatal`]), or the broker unavailable with nothing refused.
pub async fn deliver_in_transaction(
    producer: &FutureProducer,
    outputs: &[Output],
) -> Result<Vec<Refusal>, ProduceError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut pending = FuturesUnordered::new();
    let mut refused = Vec::new();
    let mut failed: Option<ProduceError> = None;
    for (index, output) in outputs.iter().enumerate() {
        match try_enqueue(producer, output.record()).await {
            Ok(delivery) => pending.push(async move { (index, settle(vec![delivery]).await) }),
            Err(error) => {
                note_failure(index, error, &mut refused, &mut failed);
                break;
            }
        }
    }
    while refused.is_empty() && failed.is_none() {
        let Some((index, mut results)) = pending.next().await else {
            break;
        };
        let result = results
            .pop()
            .unwrap_or_else(|| Err(ProduceError::new("(unknown)", KafkaError::Canceled)));
        if let Err(error) = result {
            note_failure(index, error, &mut refused, &mut failed);
        }
    }
    match failed {
        Some(e) if e.failure == Failure::Fatal || refused.is_empty() => Err(e),
        _ => Ok(refused),
    }
}

/// Files the failure of output `index` as a refusal or as the failure that stops the write (a
/// fatal one outranks an unavailable broker).
fn note_failure(
    index: usize,
    error: ProduceError,
    refused: &mut Vec<Refusal>,
    failed: &mut Option<ProduceError>,
) {
    match error.failure {
        Failure::Refused => refused.push(Refusal { index, error }),
        Failure::Fatal => *failed = Some(error),
        Failure::Unavailable => {
            if failed.is_none() {
                *failed = Some(error);
            }
        }
    }
}

/// Writes every output in order and waits for the broker's answer to each. Returns the outputs
/// the broker refuses for good (the caller dead-letters what caused them); every other output is
/// acknowledged when this returns.
///
/// When the broker is unavailable for any of them, waits (backing off up to 30 s, the
/// service not ready meanwhile) and then writes **all** of them again, in order: a record
/// acknowledged before the failure may be written twice, under the same deterministic id (the
/// readers de-duplicate), but a later record never overtakes an earlier one that failed.
///
/// # Errors
/// [`Interrupted::Shutdown`] when the service is told to stop while waiting (nothing may be taken
/// as written), [`Interrupted::Fatal`] when the producer can no longer write.
pub async fn deliver(
    producer: &FutureProducer,
    outputs: &[Output],
    wait: &BrokerWait,
) -> Result<Vec<Refusal>, Interrupted> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = tokio::select! {
            outcome = deliver_once(producer, outputs) => outcome,
            () = async {
                wait.shutdown.cancelled().await;
                tokio::time::sleep(STOP_GRACE).await;
            } => return Err(Interrupted::Shutdown),
        };
        match outcome {
            Ok(refused) => {
                wait.recovered(attempt);
                return Ok(refused);
            }
            Err(e) if e.failure == Failure::Fatal => return Err(Interrupted::Fatal(e)),
            Err(e) => wait.pause(attempt, outputs.len(), &e).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_too_large_or_invalid_is_refused_for_good() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidMessageSize,
            RDKafkaErrorCode::InvalidRecord,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Failure::Refused,
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_broker_away_or_not_ready_is_waited_out() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NetworkException,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::KafkaStorageError,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            // Another record of the batch was invalid: this one is fine.
            RDKafkaErrorCode::InvalidDifferentRecord,
            // Not known to be permanent: waiting is the safe side.
            RDKafkaErrorCode::Unknown,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Failure::Unavailable,
                "{code:?}"
            );
        }
        assert_eq!(
            classify(&KafkaError::MetadataFetch(
                RDKafkaErrorCode::BrokerTransportFailure
            )),
            Failure::Unavailable
        );
    }

    #[test]
    fn an_unusable_producer_is_fatal() {
        for code in [RDKafkaErrorCode::Fatal, RDKafkaErrorCode::Fenced] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Failure::Fatal
            );
        }
        assert_eq!(classify(&KafkaError::Canceled), Failure::Fatal);
    }

    #[test]
    fn errors_say_what_kind_of_failure_they_are() {
        let e = ProduceError::new(
            "safeclock.clock-state.v1",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        assert_eq!(e.failure, Failure::Refused);
        let text = e.to_string();
        assert!(text.contains("refuses, for good"), "{text}");
        assert!(text.contains("safeclock.clock-state.v1"), "{text}");
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(BrokerWait::backoff(1), Duration::from_millis(250));
        assert_eq!(BrokerWait::backoff(2), Duration::from_millis(500));
        assert_eq!(BrokerWait::backoff(4), Duration::from_secs(2));
        assert_eq!(BrokerWait::backoff(40), MAX_BACKOFF);
    }
}
