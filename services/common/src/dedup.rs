//! Remembering recently seen record ids, so at-least-once delivery does not count or page twice.
//!
//! Bounded: the oldest ids are forgotten first. Duplicates come from re-processing after a crash
//! or rebalance, which replays at most the records since the last commit, so a window much larger
//! than a commit interval's worth of records catches them.

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
            seen: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity: capacity.max(1),
        }
    }

    /// True the first time `id` is offered (within the window), false for a repeat.
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_caught_and_the_window_is_bounded() {
        let mut r = RecentIds::new(2);
        assert!(r.first_time("a"));
        assert!(!r.first_time("a"));
        assert!(r.first_time("b"));
        assert!(r.first_time("c")); // forgets "a"
        assert!(r.first_time("a"));
        assert!(!r.first_time("c"));
    }
}
