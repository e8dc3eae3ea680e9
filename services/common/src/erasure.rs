//! Erasing a referral: the request every service applies, and the set of referrals erased.
//!
//! `safeclock erase` writes an [`Erasure`] to the `erasures` topic, then tombstones every key of
//! the referral on the compacted topics. The request names the referral only by a keyed hash
//! (HMAC-SHA256 under `erasure.key`), so the record, which is also the audit record of the
//! erasure, holds no personal data: a reader of the topic cannot tell which referral it was
//! without the key and the referral id.
//!
//! Every clock and escalator instance reads the whole topic before its first input record and
//! follows it while it runs ([`ErasureFeed`]). On a new erasure it drops what it holds of the
//! referral and writes that state's tombstones; after that, and after any restore, it refuses
//! every record of the referral (a replay of its old events, an SLA event already in flight)
//! and dead-letters it **without its key or value** (reason `erased`), so the dead-letter topic
//! does not take the referral back in. The set of erased referrals is as long as the topic,
//! which keeps its records for `kafka.retention.erasures_days` (the audit retention): erasures
//! are rare, and each costs 32 bytes.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use hmac::{Hmac, Mac};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub use crate::event_strings::is_code;

use crate::config::Settings;
use crate::kafka::{client_config, retry_blocking, Topic};
use crate::metrics::ConsumerMetrics;
use crate::secret::Secret;

/// The dead-letter reason of a record of an erased referral.
pub const ERASED: &str = "erased";

/// What an unset `erasure.key` hashes with. Without a key anyone who can read the `erasures`
/// topic can test a guessed referral id against it; the configuration says so.
const UNKEYED: &[u8] = b"safeclock erasure v1";

/// A referral id as the erasure topic names it.
pub type ReferralHash = [u8; 32];

/// Hashes referral ids under the deployment's erasure key.
#[derive(Clone)]
pub struct ErasureKey(Hmac<Sha256>);

impl ErasureKey {
    pub fn new(key: Option<&Secret>) -> Self {
        let bytes = key.map_or(UNKEYED, |k| k.expose().as_bytes());
        // HMAC takes a key of any length.
        Self(Hmac::new_from_slice(bytes).unwrap_or_else(|_| unreachable!("HMAC takes any key")))
    }

    /// The hash of `referral_id`.
    pub fn of(&self, referral_id: &str) -> ReferralHash {
        let mut mac = self.0.clone();
        mac.update(referral_id.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// One erasure request, as written to the `erasures` topic (JSON, keyed by `erasureId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored, as on every topic: a later version may add some.
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    /// A new UUID per request.
    pub erasure_id: String,
    /// HMAC-SHA256 of the referral id under `erasure.key`, lower-case hex.
    pub referral_hash: String,
    /// Why, as a code (`subject_request`, `recorded_in_error`, ...): never free text.
    pub reason: String,
    /// Who asked, as the operator's code (the OS user running the command unless `--by`).
    pub requested_by: String,
    /// When (RFC 3339, UTC).
    pub requested_at: String,
}

impl Erasure {
    /// The referral hash, if the record's is well formed.
    pub fn hash(&self) -> Option<ReferralHash> {
        let s = self.referral_hash.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(out)
    }
}

/// Lower-case hex of a hash.
pub fn hex(hash: &ReferralHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// The referrals erased so far.
#[derive(Clone)]
pub struct ErasedSet {
    key: ErasureKey,
    hashes: HashSet<ReferralHash>,
}

impl ErasedSet {
    pub fn new(key: ErasureKey) -> Self {
        Self {
            key,
            hashes: HashSet::new(),
        }
    }

    /// Whether `referral_id` was erased. Costs nothing until something is.
    pub fn contains(&self, referral_id: &str) -> bool {
        !self.hashes.is_empty() && self.hashes.contains(&self.key.of(referral_id))
    }

    /// A test of referral ids against `hashes` (new erasures) that hashes each id once.
    pub fn any_of<'a>(&'a self, hashes: &'a [ReferralHash]) -> impl Fn(&str) -> bool + 'a {
        move |referral_id| hashes.contains(&self.key.of(referral_id))
    }

    /// Whether `referral_id` is the one `hash` names.
    pub fn names(&self, hash: &ReferralHash, referral_id: &str) -> bool {
        &self.key.of(referral_id) == hash
    }

    /// Adds `hash`; false if it was there already.
    pub fn insert(&mut self, hash: ReferralHash) -> bool {
        self.hashes.insert(hash)
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }
}

/// How long loading the topic may go without progress before it is declared stuck.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// The `erasures` topic, read to its end at start and followed after that.
pub struct ErasureFeed {
    consumer: BaseConsumer,
    erased: ErasedSet,
}

impl ErasureFeed {
    /// Reads every erasure so far (blocking: call it from `spawn_blocking`), and keeps the
    /// consumer to follow new ones. `service` names the reading client; it commits nothing.
    ///
    /// # Errors
    /// When the topic cannot be found or read to its end.
    pub fn load(settings: &Settings, service: &str) -> anyhow::Result<Self> {
        let topic = settings.topic(Topic::Erasures);
        let mut cfg = client_config(&settings.kafka, &settings.kafka.consumer_properties);
        cfg.set("group.id", format!("{service}-erasures"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100");
        let consumer: BaseConsumer = cfg
            .create()
            .with_context(|| format!("cannot create a consumer to read {topic}"))?;
        let partitions = retry_blocking(
            LOAD_TIMEOUT,
            Duration::from_millis(500),
            &format!("cannot read the partitions of {topic} yet"),
            || {
                let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                Ok(md
                    .topics()
                    .first()
                    .map(|t| t.partitions().len())
                    .unwrap_or(0))
            },
        )
        .with_context(|| format!("cannot read the partitions of {topic}"))?;
        anyhow::ensure!(
            partitions > 0,
            "topic {topic} does not exist: create it (kafka.create_topics = true does) before starting"
        );
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, i32::try_from(p)?, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut feed = Self {
            consumer,
            erased: ErasedSet::new(ErasureKey::new(settings.erasure.key.as_ref())),
        };
        let mut at_end = HashSet::new();
        let mut last_progress = std::time::Instant::now();
        while at_end.len() < partitions {
            match feed.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    last_progress = std::time::Instant::now();
                    if let Some(hash) = decode(m.payload().unwrap_or_default()) {
                        feed.erased.insert(hash);
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => {
                    anyhow::ensure!(
                        last_progress.elapsed() < LOAD_TIMEOUT,
                        "cannot read {topic}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                None => anyhow::ensure!(
                    last_progress.elapsed() < LOAD_TIMEOUT,
                    "reading {topic} stalled for {LOAD_TIMEOUT:?}"
                ),
            }
        }
        tracing::info!(
            erasures = feed.erased.len(),
            "erasures loaded: records of these referrals are refused"
        );
        Ok(feed)
    }

    /// [`ErasureFeed::load`] off the async runtime's threads, for a service's start.
    ///
    /// # Errors
    /// As [`ErasureFeed::load`].
    pub async fn start(settings: &Settings, service: &'static str) -> anyhow::Result<Self> {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || Self::load(&settings, service)).await?
    }

    /// Erasures that arrived since the last call, each once (never blocks).
    fn poll_new(&mut self) -> Vec<ReferralHash> {
        let mut new = Vec::new();
        while let Some(m) = self.consumer.poll(Duration::ZERO) {
            let Ok(m) = m else { continue };
            if let Some(hash) = decode(m.payload().unwrap_or_default()) {
                if self.erased.insert(hash) {
                    new.push(hash);
                }
            }
        }
        new
    }

    /// Applies the erasures that arrived since the last call, if any: `forget` is given a
    /// matcher of their referral ids and drops what the service holds of them (returning how
    /// many items it dropped), and they are counted in `safeclock_erasures_applied_total`.
    /// Returns how many erasures arrived and how many items were dropped.
    pub fn apply_new(
        &mut self,
        metrics: &ConsumerMetrics,
        service: &str,
        forget: impl FnOnce(&dyn Fn(&str) -> bool) -> usize,
    ) -> Option<(usize, usize)> {
        let new = self.poll_new();
        if new.is_empty() {
            return None;
        }
        let forgotten = forget(&self.erased.any_of(&new));
        metrics
            .erasures_applied
            .with_label_values(&[service])
            .inc_by(u64::try_from(new.len()).unwrap_or(u64::MAX));
        Some((new.len(), forgotten))
    }

    /// Every referral erased so far.
    pub fn erased(&self) -> &ErasedSet {
        &self.erased
    }
}

/// The hash of an erasure record; `None` (and a warning) for anything else, which only a
/// foreign writer could have put there.
fn decode(payload: &[u8]) -> Option<ReferralHash> {
    let hash = serde_json::from_slice::<Erasure>(payload)
        .ok()
        .and_then(|e| e.hash());
    if hash.is_none() {
        tracing::warn!(
            bytes = payload.len(),
            "a record on the erasures topic is not an erasure request: ignored"
        );
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_referral_is_named_by_a_keyed_hash_that_round_trips_through_the_record() {
        let key = ErasureKey::new(Some(&Secret::new("k1")));
        let other = ErasureKey::new(Some(&Secret::new("k2")));
        let h = key.of("R-1");
        assert_ne!(h, other.of("R-1"), "the key matters");
        assert_ne!(h, key.of("R-2"));
        let record = Erasure {
            erasure_id: "e".into(),
            referral_hash: hex(&h),
            reason: "subject_request".into(),
            requested_by: "dpo".into(),
            requested_at: "2026-12-03T10:00:00Z".into(),
        };
        let json = serde_json::to_string(&record).unwrap_or_default();
        assert!(!json.contains("R-1"));
        assert_eq!(decode(json.as_bytes()), Some(h));
        assert_eq!(decode(b"{\"referralHash\":\"zz\"}"), None);

        let mut set = ErasedSet::new(key);
        assert!(!set.contains("R-1"));
        assert!(set.insert(h));
        assert!(!set.insert(h));
        assert!(set.contains("R-1") && !set.contains("R-2"));
        assert!(set.names(&h, "R-1"));
    }
}
