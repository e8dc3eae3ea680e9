//! `safeclock erase --referral ID --reason CODE`: erase one referral from safeclock.
//!
//! 1. Writes an erasure request to the `erasures` topic and waits for the broker's
//!    acknowledgement. The request is also the erasure's audit record: an erasure id, the
//!    referral's keyed hash (never its id), the reason code, who asked and when.
//! 2. Every running clock and escalator follows that topic: at its next tick it drops what it
//!    holds of the referral, writes that state's tombstones, and from then on refuses every
//!    record of the referral, dead-lettering it without its content (`erasure.rs` in common).
//!    The command waits `--settle` for that, so that no service writes the referral again
//!    after step 3.
//! 3. Scans every compacted topic for the referral's keys and writes a tombstone for each in
//!    the partition it was found in: `clock-state` (key: the referral id), `sla-outcomes`
//!    (keys `referral/rule/clock`, including clocks long closed, which no service holds any
//!    more) and `escalation-state` (escalations whose SLA event names the referral).
//!    `exporter-state` holds totals and hashed event ids: nothing of a referral. Once the
//!    cleaner has compacted them, nothing of the referral can be read from these topics.
//! 4. Prints what it did, and for each append-only topic (`referral-events`, `sla-events`,
//!    `escalation-log`, `dead-letter`), the retention after which Kafka has deleted the
//!    referral's records there. Kafka cannot delete single records from a topic that is not
//!    compacted (docs/privacy.md, "Erasure").

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use safeclock_common::config::Settings;
use safeclock_common::erasure::{self, Erasure, ErasureKey};
use safeclock_common::kafka::{self, read_compacted_partition, Topic};
use safeclock_common::schema::v1::EscalationState;

/// What `safeclock erase` did.
#[derive(Debug, Default)]
pub struct Erased {
    pub erasure: Option<Erasure>,
    /// Tombstones written, per topic.
    pub tombstones: BTreeMap<String, usize>,
}

/// The partitions of `topic`.
pub(crate) fn partitions(settings: &Settings, topic: &str) -> anyhow::Result<i32> {
    let client: BaseConsumer =
        kafka::client_config(&settings.kafka, &settings.kafka.consumer_properties).create()?;
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("cannot describe topic {topic}"))?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len());
    anyhow::ensure!(n > 0, "topic {topic} does not exist");
    Ok(i32::try_from(n)?)
}

/// The keys of `referral_id` on one compacted topic: (partition, key) of every live record
/// `belongs` says is the referral's.
fn keys_of(
    settings: &Settings,
    topic: Topic,
    belongs: impl Fn(&str, &[u8]) -> bool,
) -> anyhow::Result<Vec<(i32, String)>> {
    let name = settings.topic(topic);
    let mut found = Vec::new();
    for p in 0..partitions(settings, &name)? {
        let (latest, _) = read_compacted_partition(settings, &name, p, "safeclock-erase")?;
        for (key, value) in latest {
            if value.as_deref().is_some_and(|v| belongs(&key, v)) {
                found.push((p, key));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Erases `referral_id` (see the module docs). `requested_by` and `reason` are codes.
///
/// # Errors
/// When the reason or requester is not a code, or a topic cannot be read or written.
pub async fn erase(
    settings: &Settings,
    referral_id: &str,
    reason: &str,
    requested_by: &str,
    settle: Duration,
) -> anyhow::Result<Erased> {
    anyhow::ensure!(!referral_id.is_empty(), "--referral must not be empty");
    for (what, v) in [("--reason", reason), ("--by", requested_by)] {
        anyhow::ensure!(
            erasure::is_code(v) && v.len() <= 64,
            "{what} must be a code (lower-case letters, digits, - _ and ., at most 64), not free text"
        );
    }
    let key = ErasureKey::new(settings.erasure.key.as_ref());
    let request = Erasure {
        erasure_id: uuid::Uuid::new_v4().to_string(),
        referral_hash: erasure::hex(&key.of(referral_id)),
        reason: reason.to_string(),
        requested_by: requested_by.to_string(),
        requested_at: jiff::Timestamp::now().to_string(),
    };
    let producer = kafka::producer(settings)?;
    let topic = settings.topic(Topic::Erasures);
    let payload = serde_json::to_vec(&request)?;
    let delivery = kafka::try_enqueue(
        &producer,
        FutureRecord::to(&topic)
            .key(request.erasure_id.as_str())
            .payload(payload.as_slice()),
    )
    .await?;
    kafka::await_deliveries(vec![delivery])
        .await
        .with_context(|| format!("cannot write the erasure request to {topic}"))?;
    tokio::time::sleep(settle).await;

    let s = settings.clone();
    let id = referral_id.to_string();
    let found =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, i32, String)>> {
            let prefix = format!("{id}/");
            let mut all = Vec::new();
            for (topic, keys) in [
                (
                    Topic::ClockState,
                    keys_of(&s, Topic::ClockState, |k, _| k == id)?,
                ),
                (
                    Topic::SlaOutcomes,
                    keys_of(&s, Topic::SlaOutcomes, |k, _| k.starts_with(&prefix))?,
                ),
                (
                    Topic::EscalationState,
                    keys_of(&s, Topic::EscalationState, |_, v| {
                        <EscalationState as prost::Message>::decode(v)
                            .ok()
                            .and_then(|st| st.event)
                            .is_some_and(|e| e.referral_id == id)
                    })?,
                ),
            ] {
                let name = s.topic(topic);
                all.extend(keys.into_iter().map(|(p, k)| (name.clone(), p, k)));
            }
            Ok(all)
        })
        .await??;

    let mut erased = Erased {
        erasure: Some(request),
        ..Erased::default()
    };
    for (topic, _, _) in &found {
        *erased.tombstones.entry(topic.clone()).or_default() += 1;
    }
    write_tombstones(
        &producer,
        found.iter().map(|(t, p, k)| (t.as_str(), *p, k.as_str())),
    )
    .await?;
    Ok(erased)
}

/// Writes a tombstone for each (topic, partition, key) and waits for the broker to take them.
///
/// # Errors
/// When a tombstone cannot be enqueued or is not acknowledged.
pub(crate) async fn write_tombstones<'a>(
    producer: &rdkafka::producer::FutureProducer,
    keys: impl Iterator<Item = (&'a str, i32, &'a str)>,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::new();
    for (topic, partition, key) in keys {
        deliveries.push(
            kafka::try_enqueue(
                producer,
                FutureRecord::<str, [u8]>::to(topic)
                    .key(key)
                    .partition(partition),
            )
            .await?,
        );
    }
    kafka::await_deliveries(deliveries)
        .await
        .context("cannot write the tombstones")
}

/// Prints what [`erase`] did, and when the append-only topics will have lost the referral.
pub fn print(settings: &Settings, erased: &Erased) {
    if let Some(e) = &erased.erasure {
        println!(
            "erasure {} written to {} (reason {}, by {}, at {}); it names the referral only by its keyed hash",
            e.erasure_id,
            settings.topic(Topic::Erasures),
            e.reason,
            e.requested_by,
            e.requested_at
        );
    }
    for topic in [
        Topic::ClockState,
        Topic::SlaOutcomes,
        Topic::EscalationState,
    ] {
        let name = settings.topic(topic);
        println!(
            "{name}: {} tombstone(s); gone once the cleaner compacts it",
            erased.tombstones.get(&name).copied().unwrap_or(0)
        );
    }
    for topic in [
        Topic::ReferralEvents,
        Topic::SlaEvents,
        Topic::EscalationLog,
        Topic::DeadLetter,
    ] {
        if let Some(days) = settings.kafka.retention.days(topic) {
            println!(
                "{}: append-only; the referral's records there are deleted by retention, within {days} days of being written (if the topic was created with kafka.retention)",
                settings.topic(topic)
            );
        }
    }
}
