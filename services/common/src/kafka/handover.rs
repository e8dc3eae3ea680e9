//! Holding revoked partitions until the service has handed them over.

use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;

use super::consumer::ServiceConsumer;

/// Partitions revoked by the group but not yet let go: the service finishes its work on them
/// first (in-flight notifications settled, state written, offsets committed), then calls
/// [`Handover::release`]. Only then does librdkafka tell the group they are free, so the next
/// owner restores a state that has everything the previous one did, and two instances never act
/// on one partition at once (the escalator relies on this so a page is never sent by both).
///
/// Holding is how Kafka Streams hands over tasks: the group's rebalance waits for the member to
/// give up its partitions (bounded by `max.poll.interval.ms`). Partitions the group took away
/// because this member was presumed dead ("assignment lost") are released at once: another
/// member may already own them, and writing state for them would race it.
///
/// Revocations are held only while a `Handover` exists; dropping it (the service loop ended,
/// normally or by an error) releases anything held, so closing the consumer never waits.
pub struct Handover<'a> {
    consumer: &'a ServiceConsumer,
    state: std::sync::Arc<HandoverState>,
}

#[derive(Debug, Default)]
pub(super) struct HandoverState {
    active: std::sync::atomic::AtomicBool,
    held: std::sync::Mutex<Option<TopicPartitionList>>,
    wake: tokio::sync::Notify,
}

impl<'a> Handover<'a> {
    /// From now on, revocations on `consumer` wait for [`Handover::release`].
    pub fn take_over(consumer: &'a ServiceConsumer) -> Self {
        let state = consumer.context().handover.clone();
        state
            .active
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Self { consumer, state }
    }

    /// Waits until the group revokes partitions; returns them. Cancel-safe.
    pub async fn revoked(&self) -> TopicPartitionList {
        loop {
            let notified = self.state.wake.notified();
            if let Some(tpl) = self.state.lock().take() {
                return tpl;
            }
            notified.await;
        }
    }

    /// The partitions of `topic` in `tpl`.
    pub fn partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
        tpl.elements_for_topic(topic)
            .iter()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
            .collect()
    }

    /// Gives `tpl` back to the group: the service is done with them.
    pub fn release(&self, tpl: &TopicPartitionList) {
        let result = match self.consumer.rebalance_protocol() {
            rdkafka::consumer::RebalanceProtocol::Cooperative => {
                self.consumer.incremental_unassign(tpl)
            }
            _ => self.consumer.unassign(),
        };
        match result {
            Ok(()) => tracing::info!(partitions = tpl.count(), "partitions handed over"),
            Err(e) => {
                tracing::warn!(error.message = %e, "could not hand partitions back to the group");
            }
        }
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.state
            .active
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let held = self.state.lock().take();
        if let Some(tpl) = held {
            self.release(&tpl);
        }
    }
}

impl HandoverState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TopicPartitionList>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called from the rebalance callback: holds `tpl` if a [`Handover`] takes revocations over.
    pub(super) fn hold(&self, tpl: &TopicPartitionList) -> bool {
        if !self.active.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let mut held = self.lock();
        match held.as_mut() {
            Some(existing) => {
                for e in tpl.elements() {
                    existing.add_partition(e.topic(), e.partition());
                }
            }
            None => *held = Some(tpl.clone()),
        }
        drop(held);
        self.wake.notify_one();
        true
    }
}
