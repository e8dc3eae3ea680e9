//! The event ids intake acknowledged recently, oldest forgotten first.
//!
//! An id is remembered only once the broker has acknowledged its event, so a request answered
//! 503 and sent again is produced again (its events may or may not be stored) rather than
//! wrongly answered `duplicate`. Bounded: past the window a repeat is produced again, and the
//! consumers' own de-duplication by event id catches it.

use std::collections::{HashSet, VecDeque};

#[derive(Debug)]
pub struct RecentIds {
    seen: HashSet<String>,
    order: VecDeque<String>,
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

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    pub fn insert(&mut self, id: &str) {
        if self.capacity == 0 || self.seen.contains(id) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_oldest_first() {
        let mut r = RecentIds::new(2);
        r.insert("a");
        r.insert("b");
        assert!(r.contains("a") && r.contains("b"));
        r.insert("c");
        assert!(!r.contains("a"));
        assert!(r.contains("c"));
        let mut off = RecentIds::new(0);
        off.insert("a");
        assert!(!off.contains("a"));
    }
}
