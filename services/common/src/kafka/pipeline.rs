//! Writes kept in flight while the service goes on, released in the order they were made.
//!
//! # Why
//! A service that awaits each write's acknowledgement before it reads its next input spends
//! most of a busy second waiting: measured at a million open clocks, the escalator's loop was
//! waiting on the broker three quarters of the time, and every breach queued behind the writes
//! before it (docs/benchmarks.md). Here a write is enqueued with librdkafka at once, in order
//! (so per-partition order is the order of the calls), and the service moves on to its next
//! input while the broker acknowledges.
//!
//! # The contract is unchanged
//! What a write guards (input offsets to store, notifications to hand on) travels with it as
//! its `release` and comes back from [`WritePipeline::next`] only once the write is settled **and
//! every write made before it** has come back: the service acts on a write's release exactly as
//! it did after awaiting it, in the same order.
//!
//! # When the broker is away
//! A write is made once here ([`deliver_once`]'s semantics, without its retry). A write that
//! comes back with the broker unavailable cannot simply be made again: later writes in flight
//! may already hold newer versions of the same compacted keys, and writing the older one again
//! after them would make it the latest. The service drains the pipeline
//! ([`WritePipeline::drain`]) and writes what failed again from its **current** state, then
//! releases everything in order (the escalator does this in `Escalator::recover`).

use std::future::Future;
use std::pin::Pin;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::producer::FutureProducer;

use super::delivery::{enqueue_all, settle_all, Output, ProduceError, Refusal};

/// A write that has come back: its outputs, what became of them, and what it guarded.
#[derive(Debug)]
pub struct Written<T> {
    pub outputs: Vec<Output>,
    /// The outputs refused for good, or the failure that means nothing is known to be written
    /// (the broker unavailable, or the producer unusable).
    pub outcome: Result<Vec<Refusal>, ProduceError>,
    pub release: T,
}

type InFlight<T> = Pin<Box<dyn Future<Output = Written<T>> + Send + Sync>>;

/// Writes in flight, at most `limit` at a time, coming back in the order they were made.
pub struct WritePipeline<T> {
    producer: FutureProducer,
    in_flight: FuturesOrdered<InFlight<T>>,
    limit: usize,
}

impl<T: Send + Sync + 'static> WritePipeline<T> {
    /// A pipeline of at most `limit` (at least 1) writes in flight on `producer`.
    pub fn new(producer: FutureProducer, limit: usize) -> Self {
        Self {
            producer,
            in_flight: FuturesOrdered::new(),
            limit: limit.max(1),
        }
    }

    /// Enqueues every output now, in order (waiting only while librdkafka's local queue is
    /// full), and keeps the write in flight until its acknowledgements come back.
    pub async fn submit(&mut self, outputs: Vec<Output>, release: T) {
        let pending = enqueue_all(&self.producer, &outputs).await;
        self.in_flight.push_back(Box::pin(async move {
            Written {
                outcome: settle_all(pending).await,
                outputs,
                release,
            }
        }));
    }

    /// The oldest write, once it has come back; pending for ever while nothing is in flight
    /// (so a `select!` arm on it simply never fires then).
    pub async fn next(&mut self) -> Written<T> {
        match self.in_flight.next().await {
            Some(written) => written,
            None => std::future::pending().await,
        }
    }

    /// Every write in flight, in order, once each has come back.
    pub async fn drain(&mut self) -> Vec<Written<T>> {
        let mut all = Vec::with_capacity(self.in_flight.len());
        while let Some(written) = self.in_flight.next().await {
            all.push(written);
        }
        all
    }

    /// Whether no more writes may be made until one comes back.
    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.limit
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }
}
