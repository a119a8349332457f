//! The store as the selection search sees it: its index's cells, read through its slab.

use super::Store;
use crate::cells::CellKey;
use crate::index::{CellSummary, Ranking};
use crate::scoring::MessageTraits;
use crate::select::CandidateIndex;

/// The in-memory store is searched in place: its index's cells, read through its slab.
impl<P, R: Ranking> CandidateIndex for Store<P, R> {
    fn for_each_cell(&self, mut visit: impl FnMut(&CellKey, &CellSummary)) {
        for (key, summary) in self.index.summaries().iter().flatten() {
            visit(key, summary);
        }
    }

    fn for_each_priority(&self, mut visit: impl FnMut(u8, &[(CellKey, CellSummary)])) {
        for (priority, cells) in (0u8..).zip(self.index.summaries()) {
            visit(priority, cells);
        }
    }

    fn for_each_group_head(&self, key: &CellKey, visit: impl FnMut(u32, u64, f64, bool)) {
        self.index.for_each_group_head(key, visit);
    }

    fn for_each_group_by_time(
        &self,
        key: &CellKey,
        visit: impl FnMut(u64, f64, &dyn Fn() -> (u32, bool)) -> bool,
    ) {
        self.index.for_each_group_by_time(key, visit);
    }

    fn for_each_age_point(&self, key: &CellKey, _: &CellSummary, visit: impl FnMut(f64, f64) -> bool) {
        self.index.for_each_age_point(key, visit);
    }

    fn next_in_run(&self, slot: u32) -> Option<u32> {
        self.index.next_in_run(&self.get(slot)?.index_entry())
    }

    fn next_run_head(&self, slot: u32) -> Option<u32> {
        self.index.next_run_head(&self.get(slot)?.index_entry())
    }

    fn traits(&self, slot: u32) -> MessageTraits {
        let message = self.message(slot);
        MessageTraits {
            priority: message.priority,
            receive_count: message.receive_count,
            tokens: message.tokens,
            expected_processing_seconds: message.expected_processing_seconds(),
            enqueued_at: message.enqueued_at,
        }
    }

    fn seq(&self, slot: u32) -> u64 {
        self.message(slot).message_id
    }
}
