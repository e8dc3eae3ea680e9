//! The (client, event id) pairs intake acknowledged recently, oldest forgotten first.
//!
//! Keyed by client as well as id: an event id is unique within the system that made it, and
//! nothing stops one client from posting an id another client is about to use. Keyed by id
//! alone, the real event would then be answered `duplicate` and never stored.
//!
//! A pair is remembered only once the broker has acknowledged its event, so a request answered
//! 503 and sent again is produced again (its events may or may not be stored) rather than
//! wrongly answered `duplicate`. Bounded: past the window a repeat is produced again, and the
//! consumers' own de-duplication by event id catches it.
//!
//! A pair is kept as a 128-bit fingerprint (two independently keyed SipHash values), not as
//! strings: a lookup or insert allocates nothing, and the window costs 32 bytes per pair. Two
//! different pairs share a fingerprint with a probability of about n² / 2¹²⁹ for a window of n
//! pairs: for the default window, below 10⁻²⁸.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

/// A (client, event id) pair's fingerprint.
type Fingerprint = u128;

#[derive(Debug)]
pub struct RecentIds {
    seen: HashSet<Fingerprint, BuildHasherDefault<AlreadyHashed>>,
    order: VecDeque<Fingerprint>,
    capacity: usize,
    /// Two keys chosen at random for this process.
    keys: [RandomState; 2],
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::default(),
            order: VecDeque::new(),
            capacity,
            keys: [RandomState::new(), RandomState::new()],
        }
    }

    fn fingerprint(&self, client: &str, id: &str) -> Fingerprint {
        let [high, low] = self.keys.each_ref().map(|k| k.hash_one((client, id)));
        (Fingerprint::from(high) << 64) | Fingerprint::from(low)
    }

    pub fn contains(&self, client: &str, id: &str) -> bool {
        self.seen.contains(&self.fingerprint(client, id))
    }

    pub fn insert(&mut self, client: &str, id: &str) {
        let key = self.fingerprint(client, id);
        if self.capacity == 0 || self.seen.contains(&key) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key);
        self.order.push_back(key);
    }
}

/// The set's hasher: a fingerprint is already a keyed hash, so its low half is used as it is.
#[derive(Debug, Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 fingerprints are hashed here; this keeps the hasher total anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        // Truncation intended: the low 64 bits of a keyed hash.
        #[allow(clippy::cast_possible_truncation)]
        {
            self.0 = n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_oldest_first() {
        let mut r = RecentIds::new(2);
        r.insert("rms", "a");
        r.insert("rms", "b");
        assert!(r.contains("rms", "a") && r.contains("rms", "b"));
        r.insert("rms", "c");
        assert!(!r.contains("rms", "a"));
        assert!(r.contains("rms", "c"));
        let mut off = RecentIds::new(0);
        off.insert("rms", "a");
        assert!(!off.contains("rms", "a"));
    }

    #[test]
    fn one_clients_id_is_not_another_clients() {
        let mut r = RecentIds::new(10);
        r.insert("squatter", "evt-1");
        assert!(r.contains("squatter", "evt-1"));
        assert!(!r.contains("mash", "evt-1"));
        r.insert("mash", "evt-1");
        assert!(r.contains("mash", "evt-1"));
    }
}
