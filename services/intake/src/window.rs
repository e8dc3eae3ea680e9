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

use std::collections::{HashSet, VecDeque};

/// A client's name and an event id it posted.
type Key = (String, String);

#[derive(Debug)]
pub struct RecentIds {
    seen: HashSet<Key>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub fn contains(&self, client: &str, id: &str) -> bool {
        self.seen.contains(&(client.to_string(), id.to_string()))
    }

    pub fn insert(&mut self, client: &str, id: &str) {
        let key = (client.to_string(), id.to_string());
        if self.capacity == 0 || self.seen.contains(&key) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
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
