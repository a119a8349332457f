//! The candidate index: the visible messages of a store, laid out so the exact selection search
//! can find the best one without scanning, and so the store can answer receive order, the
//! oldest message and counts by priority in O(log cells).
//!
//! It knows nothing of receipts, visibility deadlines or retention: the store tells it when a
//! message becomes visible ([`VisibleIndex::insert`]) and when it stops being visible
//! ([`VisibleIndex::remove`]), with the message's [`IndexEntry`]. Another ranking of the same
//! messages (the `fair_priority` lanes) plugs in beside it through [`Ranking`], which the store
//! calls at the same two moments.
//!
//! Layout. Visible messages are grouped in cells ([`CellKey`]: priority, retry class, token
//! class); a cell maps sequence number to slot, oldest first (sequence order is age order in a
//! store), and keeps a [`CellSummary`] so pruning a cell touches no message. Inside a cell, the
//! members with one token estimate form a group, ordered by processing-time key and then age:
//! the search scores run heads only (see `select`). Two sets of cell heads give the receive
//! order (priority, then oldest) and the oldest visible message.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::cells::CellKey;

/// Number of priorities (0 = URGENT ..= 3 = LOW).
pub const PRIORITIES: usize = 4;

/// What the index (and any other [`Ranking`]) knows of a visible message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexEntry {
    /// Its cell.
    pub cell: CellKey,
    /// Estimated tokens (the group within the cell).
    pub tokens: u64,
    /// Processing-time key (`cells::time_key`).
    pub time: u64,
    /// Enqueue instant.
    pub enqueued_at: f64,
    /// Enqueue sequence number (unique; its order is age order).
    pub seq: u64,
    /// Interned tenant (0 is the tenant of requests without one).
    pub tenant: u32,
    /// Deadline instant; NaN for none.
    pub deadline: f64,
}

/// Another ordering of the visible messages, kept beside the index by the store: told of every
/// message that becomes visible and of every one that stops being visible.
pub trait Ranking {
    /// `slot` became visible.
    fn insert(&mut self, slot: u32, entry: &IndexEntry);
    /// `slot` stopped being visible (received, deleted, dropped).
    fn remove(&mut self, slot: u32, entry: &IndexEntry);
    /// Every message is gone (purge).
    fn clear(&mut self);
}

/// No second ranking.
impl Ranking for () {
    fn insert(&mut self, _: u32, _: &IndexEntry) {}
    fn remove(&mut self, _: u32, _: &IndexEntry) {}
    fn clear(&mut self) {}
}

/// Two rankings side by side.
impl<A: Ranking, B: Ranking> Ranking for (A, B) {
    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        self.0.insert(slot, entry);
        self.1.insert(slot, entry);
    }
    fn remove(&mut self, slot: u32, entry: &IndexEntry) {
        self.0.remove(slot, entry);
        self.1.remove(slot, entry);
    }
    fn clear(&mut self) {
        self.0.clear();
        self.1.clear();
    }
}

/// A ranking kept only while it is wanted.
impl<R: Ranking> Ranking for Option<R> {
    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        if let Some(ranking) = self {
            ranking.insert(slot, entry);
        }
    }
    fn remove(&mut self, slot: u32, entry: &IndexEntry) {
        if let Some(ranking) = self {
            ranking.remove(slot, entry);
        }
    }
    fn clear(&mut self) {
        if let Some(ranking) = self {
            ranking.clear();
        }
    }
}

/// What the search reads of a cell before deciding to look inside: nothing that needs a visit
/// to its members' memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellSummary {
    /// Enqueue instant of the oldest member.
    pub oldest_enqueued_at: f64,
    /// Sequence number of the oldest member.
    pub oldest_seq: u64,
    /// The smallest processing time among the members, in ms (clamped as `cells::time_key`).
    pub best_time_ms: f64,
}

/// The visible messages of one cell, oldest first (dereferences to the `seq -> slot` map), and
/// the multiset of their processing-time keys, whose smallest bounds the cell's
/// processing-time factor exactly.
#[derive(Debug)]
pub struct Cell {
    members: BTreeMap<u64, u32>,
    times: BTreeMap<u64, u32>,
    summary: CellSummary,
}

impl Default for Cell {
    fn default() -> Self {
        Self {
            members: BTreeMap::new(),
            times: BTreeMap::new(),
            summary: CellSummary { oldest_enqueued_at: 0.0, oldest_seq: 0, best_time_ms: 1000.0 },
        }
    }
}

fn best_time(times: &BTreeMap<u64, u32>) -> f64 {
    times.first_key_value().map_or(1000.0, |(&bits, _)| f64::from_bits(bits))
}

impl Cell {
    /// The oldest member's enqueue instant and sequence number, and the best processing time.
    pub fn summary(&self) -> &CellSummary {
        &self.summary
    }

    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        if self.members.first_key_value().is_none_or(|(&head, _)| entry.seq < head) {
            self.summary.oldest_seq = entry.seq;
            self.summary.oldest_enqueued_at = entry.enqueued_at;
        }
        self.members.insert(entry.seq, slot);
        *self.times.entry(entry.time).or_default() += 1;
        self.summary.best_time_ms = best_time(&self.times);
    }

    /// Removes a member; `enqueued_at_of` gives a slot's enqueue instant for the new head.
    fn remove(&mut self, entry: &IndexEntry, enqueued_at_of: impl Fn(u32) -> f64) {
        self.members.remove(&entry.seq);
        if let Some(count) = self.times.get_mut(&entry.time) {
            *count -= 1;
            if *count == 0 {
                self.times.remove(&entry.time);
                self.summary.best_time_ms = best_time(&self.times);
            }
        }
        if entry.seq == self.summary.oldest_seq {
            if let Some((&head, &head_slot)) = self.members.first_key_value() {
                self.summary.oldest_seq = head;
                self.summary.oldest_enqueued_at = enqueued_at_of(head_slot);
            }
        }
    }
}

impl std::ops::Deref for Cell {
    type Target = BTreeMap<u64, u32>;

    fn deref(&self) -> &Self::Target {
        &self.members
    }
}

/// A group of a cell: the members with one token estimate.
type GroupId = (CellKey, u64);

/// The candidate index of one store's visible messages.
#[derive(Debug, Default)]
pub struct VisibleIndex {
    cells: BTreeMap<CellKey, Cell>,
    /// The same messages by group: `(time key, seq) -> slot`, best processing time then oldest.
    groups: BTreeMap<GroupId, BTreeMap<(u64, u64), u32>>,
    /// `(priority, head seq, cell)` of every non-empty cell: the first is the next to receive.
    receive_heads: BTreeSet<(u8, u64, CellKey)>,
    /// `(head seq, cell)` of every non-empty cell: the first is the oldest visible message.
    age_heads: BTreeSet<(u64, CellKey)>,
    by_priority: [usize; PRIORITIES],
}

impl VisibleIndex {
    /// Adds a message that became visible.
    pub fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        let key = entry.cell;
        self.groups.entry((key, entry.tokens)).or_default().insert((entry.time, entry.seq), slot);
        let cell = self.cells.entry(key).or_default();
        let old_head = cell.first_key_value().map(|(&s, _)| s);
        cell.insert(slot, entry);
        if old_head.is_none_or(|head| entry.seq < head) {
            if let Some(head) = old_head {
                self.receive_heads.remove(&(key.priority, head, key));
                self.age_heads.remove(&(head, key));
            }
            self.receive_heads.insert((key.priority, entry.seq, key));
            self.age_heads.insert((entry.seq, key));
        }
        self.by_priority[usize::from(key.priority)] += 1;
    }

    /// Removes a visible message; `enqueued_at_of` gives a slot's enqueue instant (for the
    /// cell's new oldest member).
    pub fn remove(&mut self, entry: &IndexEntry, enqueued_at_of: impl Fn(u32) -> f64) {
        let key = entry.cell;
        let group = (key, entry.tokens);
        if let Some(members) = self.groups.get_mut(&group) {
            members.remove(&(entry.time, entry.seq));
            if members.is_empty() {
                self.groups.remove(&group);
            }
        }
        let Some(cell) = self.cells.get_mut(&key) else { return };
        let was_head = cell.first_key_value().is_some_and(|(&s, _)| s == entry.seq);
        cell.remove(entry, enqueued_at_of);
        if was_head {
            self.receive_heads.remove(&(key.priority, entry.seq, key));
            self.age_heads.remove(&(entry.seq, key));
            if let Some((&head, _)) = cell.first_key_value() {
                self.receive_heads.insert((key.priority, head, key));
                self.age_heads.insert((head, key));
            } else {
                self.cells.remove(&key);
            }
        }
        self.by_priority[usize::from(key.priority)] -= 1;
    }

    /// Forgets every message.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The visible messages by cell: each cell maps sequence number to slot, oldest first.
    /// Empty cells are never present.
    pub fn cells(&self) -> &BTreeMap<CellKey, Cell> {
        &self.cells
    }

    /// `(seq, slot)` of the next message to receive: highest priority, then oldest.
    pub fn next_to_receive(&self) -> Option<(u64, u32)> {
        let &(_, seq, key) = self.receive_heads.first()?;
        Some((seq, self.cells[&key][&seq]))
    }

    /// `(seq, slot)` of the oldest visible message.
    pub fn oldest(&self) -> Option<(u64, u32)> {
        let &(seq, key) = self.age_heads.first()?;
        Some((seq, self.cells[&key][&seq]))
    }

    /// Visible messages per priority.
    pub fn counts_by_priority(&self) -> [usize; PRIORITIES] {
        self.by_priority
    }

    /// Visible messages.
    pub fn len(&self) -> usize {
        self.by_priority.iter().sum()
    }

    /// Whether no message is visible.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The smallest estimate among visible messages: the first group of each cell, in
    /// O(cells · log groups).
    pub fn min_tokens(&self) -> Option<u64> {
        self.cells
            .keys()
            .filter_map(|key| {
                self.groups.range((*key, 0)..=(*key, u64::MAX)).next().map(|(&(_, tokens), _)| tokens)
            })
            .min()
    }

    /// Calls `visit` with the first member of every group of the cell `key`, the group's
    /// estimate, its best processing time in ms, and whether the group is a single run.
    pub fn for_each_group_head(&self, key: &CellKey, mut visit: impl FnMut(u32, u64, f64, bool)) {
        for (&(_, tokens), members) in self.groups.range((*key, 0)..=(*key, u64::MAX)) {
            if let (Some((&(time, _), &slot)), Some((&(last, _), _))) =
                (members.first_key_value(), members.last_key_value())
            {
                visit(slot, tokens, f64::from_bits(time), time == last);
            }
        }
    }

    /// The member after the one `entry` describes in its run (same processing-time key, next
    /// oldest).
    pub fn next_in_run(&self, entry: &IndexEntry) -> Option<u32> {
        let members = self.groups.get(&(entry.cell, entry.tokens))?;
        members.range((entry.time, entry.seq + 1)..=(entry.time, u64::MAX)).next().map(|(_, &s)| s)
    }

    /// The first member of the run after `entry`'s in its group (the next worse
    /// processing-time key), if any.
    pub fn next_run_head(&self, entry: &IndexEntry) -> Option<u32> {
        let members = self.groups.get(&(entry.cell, entry.tokens))?;
        if entry.time == u64::MAX {
            return None;
        }
        members.range((entry.time + 1, 0)..).next().map(|(_, &s)| s)
    }

    /// Up to `limit` visible slots of `priority` in receive order (oldest first). Costs
    /// O(cells of that priority + limit · log cells).
    pub fn peek(&self, priority: u8, limit: usize) -> Vec<u32> {
        let (lo, hi) = CellKey::priority_range(priority);
        let mut iters: Vec<_> = self.cells.range(lo..=hi).map(|(_, cell)| cell.iter()).collect();
        let mut heap = BinaryHeap::with_capacity(iters.len());
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some((&seq, &slot)) = it.next() {
                heap.push(Reverse((seq, slot, i)));
            }
        }
        let mut out =
            Vec::with_capacity(limit.min(self.by_priority.get(usize::from(priority)).copied().unwrap_or(0)));
        while out.len() < limit {
            let Some(Reverse((_, slot, i))) = heap.pop() else { break };
            out.push(slot);
            if let Some((&seq, &slot)) = iters[i].next() {
                heap.push(Reverse((seq, slot, i)));
            }
        }
        out
    }

    /// Checks the index against `entries` (every visible message, by a full scan of its
    /// owner): membership, summaries, groups, heads and counts. For tests and debugging.
    pub fn check(&self, entries: &[(u32, IndexEntry)]) -> Result<(), String> {
        let mut expected = Self::default();
        let mut sorted = entries.to_vec();
        sorted.sort_by_key(|(_, e)| e.seq);
        for (slot, entry) in &sorted {
            expected.insert(*slot, entry);
        }
        if expected.cells.len() != self.cells.len() {
            return Err(format!("{} cells, expected {}", self.cells.len(), expected.cells.len()));
        }
        for (key, cell) in &expected.cells {
            let Some(actual) = self.cells.get(key) else { return Err(format!("cell {key:?} missing")) };
            if actual.members != cell.members || actual.times != cell.times {
                return Err(format!("members of cell {key:?} out of date"));
            }
            if actual.summary.oldest_seq != cell.summary.oldest_seq
                || actual.summary.oldest_enqueued_at.to_bits() != cell.summary.oldest_enqueued_at.to_bits()
                || actual.summary.best_time_ms.to_bits() != cell.summary.best_time_ms.to_bits()
            {
                return Err(format!("summary of cell {key:?} out of date"));
            }
        }
        if expected.groups != self.groups {
            return Err("groups out of date".into());
        }
        if expected.receive_heads != self.receive_heads || expected.age_heads != self.age_heads {
            return Err("cell heads out of date".into());
        }
        if expected.by_priority != self.by_priority {
            return Err(format!("counts {:?} != {:?}", self.by_priority, expected.by_priority));
        }
        Ok(())
    }
}
