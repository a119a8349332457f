//! The visible messages that carry a deadline, by deadline: what `drop_expired` removes.

use std::collections::BTreeSet;

use crate::index::{IndexEntry, Ranking};
use crate::store::OrdTime;

/// Visible messages with a deadline, earliest first.
#[derive(Debug, Default, Clone)]
pub struct DeadlineIndex {
    by_deadline: BTreeSet<(OrdTime, u64, u32)>,
}

impl DeadlineIndex {
    /// Slots of the visible messages whose deadline is before `now`, earliest first.
    pub fn expired(&self, now: f64) -> Vec<u32> {
        self.by_deadline.range(..(OrdTime(now), 0, 0)).map(|&(_, _, slot)| slot).collect()
    }

    /// Visible messages with a deadline.
    pub fn len(&self) -> usize {
        self.by_deadline.len()
    }

    /// Whether no visible message has a deadline.
    pub fn is_empty(&self) -> bool {
        self.by_deadline.is_empty()
    }
}

impl Ranking for DeadlineIndex {
    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        if !entry.deadline.is_nan() {
            self.by_deadline.insert((OrdTime(entry.deadline), entry.seq, slot));
        }
    }

    fn remove(&mut self, slot: u32, entry: &IndexEntry) {
        if !entry.deadline.is_nan() {
            self.by_deadline.remove(&(OrdTime(entry.deadline), entry.seq, slot));
        }
    }

    fn clear(&mut self) {
        self.by_deadline.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cells::CellKey;

    #[test]
    fn expired_are_those_strictly_before_now() {
        let mut index = DeadlineIndex::default();
        let entry = |seq: u64, deadline: f64| IndexEntry {
            cell: CellKey::for_message(2, 0, 10),
            tokens: 10,
            time: 0,
            enqueued_at: 0.0,
            seq,
            tenant: 0,
            deadline,
        };
        index.insert(0, &entry(0, 5.0));
        index.insert(1, &entry(1, f64::NAN));
        index.insert(2, &entry(2, 3.0));
        assert_eq!(index.len(), 2);
        assert_eq!(index.expired(5.0), vec![2]);
        assert_eq!(index.expired(5.5), vec![2, 0]);
        index.remove(2, &entry(2, 3.0));
        assert_eq!(index.expired(10.0), vec![0]);
    }
}
