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
//! members with one token estimate form a group, ordered by processing-time key and then age,
//! whose head ([`GroupHead`]: first member, best time, whether it is a single run) is kept
//! beside the group's key, so bounding a group touches none of its members: the search scores
//! run heads only (see `select`). A cell's best processing time is the best of its group heads.
//! A cell also keeps its age frontier ([`AgePoint`]): the members that no older member matches
//! or beats on processing time, so the search can pair each processing time with the longest
//! wait of a member that has it, instead of the cell's best time with its oldest member's wait.
//! Two sets of cell heads give the receive order (priority, then oldest) and the oldest visible
//! message. A batch ([`VisibleIndex::insert_batch`]) is added cell by cell, sorted, so each tree
//! is walked once or built whole (full nodes: a batch-filled index is also smaller).
//!
//! A cell also orders its groups by best processing time, so the search reads a wide cell only
//! as far as its groups can still win, and a frontier repair only the groups in its window.
//! The cells' summaries are also copied, by priority, into one list each
//! ([`VisibleIndex::summaries`]) that the search's first pass reads contiguously.
//!
//! A removal does not look for the members a frontier point alone covered. When the youngest
//! point goes (the oldest member with the best time: what a run that keeps taking a wide cell's
//! best messages removes), the oldest member with the new best time takes its place, read from
//! the first groups by time, and one point marked gone ([`AgePoint::gone`]: no member's)
//! stands for the members between them. Any other point removed is marked gone. A gone point
//! still bounds every member it covers (none is older or faster), so the search's bounds stay
//! sound, only looser; once more than [`LOOSE_POINTS`] of a cell's points are gone they are
//! replaced together, in one read of the groups in their windows of keys (5-30 µs in a wide
//! cell whose groups are out of cache).
//!
//! About 1,220 lines (170 of them tests) for one structure: the cells, their groups, summaries
//! and age frontiers are kept by the same inserts and removals, so they stay in one file; the
//! search over them is `crate::select`.

use std::cmp::Reverse;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ops::Bound;

use crate::cells::{CellKey, MAX_TOKEN_CLASS, RETRY_CLASSES};

/// Number of priorities (0 = URGENT ..= 3 = LOW).
pub const PRIORITIES: usize = 4;

/// How many gone points a cell's age frontier keeps before it is repaired: a repair reads the
/// groups in the gone points' windows of keys (out of cache in a wide cell, 5-30 µs), and one
/// repair of several gone points reads them once.
pub const LOOSE_POINTS: u32 = 2;

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
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CellSummary {
    /// Enqueue instant of the oldest member.
    pub oldest_enqueued_at: f64,
    /// Sequence number of the oldest member.
    pub oldest_seq: u64,
    /// The smallest processing time among the members, in ms (clamped as `cells::time_key`).
    pub best_time_ms: f64,
    /// Enqueue instant of the oldest member with the best processing time (the youngest point
    /// of the age frontier).
    pub best_time_enqueued_at: f64,
    /// The best processing time among the members older than that one, in ms (the next point
    /// of the age frontier); `best_time_ms` when there is none.
    pub next_time_ms: f64,
}

/// What the search reads of a group before deciding to look inside, kept beside the group's
/// key so that bounding a group touches none of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHead {
    /// The best (smallest) processing-time key of the group: its first run's.
    pub time: u64,
    /// The first member's sequence number (the oldest of the first run).
    pub seq: u64,
    /// The first member's slot.
    pub slot: u32,
    /// Whether every member shares the first run's processing-time key.
    pub single_run: bool,
}

/// A member of a cell's age frontier: no older member of the cell has a processing-time key as
/// good as its own. Every member of the cell is at most as old as, and has no better
/// processing-time key than, some point of the frontier, so the best processing-time and wait
/// factors of the points bound every member's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgePoint {
    /// Its sequence number (age order).
    pub seq: u64,
    /// Its processing-time key (`cells::time_key`).
    pub time: u64,
    /// Its enqueue instant.
    pub enqueued_at: f64,
    /// Whether the member has left the cell: the point still bounds the members it covered
    /// until the frontier is repaired.
    pub gone: bool,
}

/// Keeps the points of `points` that no other point matches or beats on both age and
/// processing-time key, oldest first (so their keys strictly decrease).
fn staircase(points: &mut Vec<AgePoint>) {
    // A member's own point before a gone one of the same sequence number.
    points.sort_unstable_by_key(|p| (p.seq, p.gone));
    let mut best: Option<u64> = None;
    points.retain(|p| {
        let keep = best.is_none_or(|b| p.time < b);
        if keep {
            best = Some(p.time);
        }
        keep
    });
}

/// The members of a cell with one token estimate, `(time key, seq) -> slot`: best processing
/// time first, then oldest; its head cached beside them.
#[derive(Debug, PartialEq)]
pub struct Group {
    head: GroupHead,
    members: BTreeMap<(u64, u64), u32>,
}

impl Group {
    /// The first member, its processing-time key and whether the group is a single run.
    pub fn head(&self) -> &GroupHead {
        &self.head
    }

    /// A group of `members` (not empty).
    fn of(members: BTreeMap<(u64, u64), u32>) -> Self {
        let mut group = Self { head: GroupHead { time: 0, seq: 0, slot: 0, single_run: true }, members };
        group.refresh();
        group
    }

    /// Recomputes the head from the members (after a removal or a bulk insert).
    fn refresh(&mut self) {
        if let (Some((&(time, seq), &slot)), Some((&(last, _), _))) =
            (self.members.first_key_value(), self.members.last_key_value())
        {
            self.head = GroupHead { time, seq, slot, single_run: time == last };
        }
    }

    fn insert(&mut self, slot: u32, time: u64, seq: u64) {
        self.members.insert((time, seq), slot);
        let head = &mut self.head;
        if time != head.time {
            head.single_run = false;
        }
        if (time, seq) < (head.time, head.seq) {
            *head = GroupHead { time, seq, slot, single_run: head.single_run };
        }
    }
}

/// Adds sorted `(key, value)` pairs to `map`: into an empty map, or one not much larger than
/// what is added, by a bulk build (full nodes, no per-key descent); else key by key.
fn bulk_extend<K: Ord, V>(map: &mut BTreeMap<K, V>, items: impl ExactSizeIterator<Item = (K, V)>) {
    if map.is_empty() || items.len().saturating_mul(4) >= map.len() {
        let mut added: BTreeMap<K, V> = items.collect();
        map.append(&mut added);
    } else {
        map.extend(items);
    }
}

/// Orders `batch` by cell in place, by a counting sort over the cells' dense numbers (each
/// member swapped straight into its cell's range: no copy of the batch, whose pages would be
/// fresh memory), when the batch is large enough for that to pay. False, `batch` untouched, for
/// a small batch (or a key out of the cells' ranges), which the caller sorts instead.
fn sort_by_cell(batch: &mut [(u32, IndexEntry)]) -> bool {
    const RETRIES: usize = RETRY_CLASSES as usize + 1;
    const TOKEN_CLASSES: usize = MAX_TOKEN_CLASS as usize + 1;
    const CELLS: usize = PRIORITIES * RETRIES * TOKEN_CLASSES;
    // Numbered in `CellKey` order: priority, then retry class, then token class.
    let dense = |key: &CellKey| {
        let (p, r, t) =
            (usize::from(key.priority), usize::from(key.retry_class), usize::from(key.token_class));
        (p < PRIORITIES && r < RETRIES && t < TOKEN_CLASSES).then_some((p * RETRIES + r) * TOKEN_CLASSES + t)
    };
    if batch.len() < CELLS / 4 {
        return false;
    }
    let mut counts = vec![0usize; CELLS];
    for (_, entry) in &*batch {
        let Some(cell) = dense(&entry.cell) else { return false };
        counts[cell] += 1;
    }
    // `next[c]..end[c]`: the part of cell c's range not yet holding its members.
    let (mut next, mut end) = (Vec::with_capacity(CELLS), Vec::with_capacity(CELLS));
    let mut start = 0;
    for count in counts {
        next.push(start);
        start += count;
        end.push(start);
    }
    for cell in 0..CELLS {
        while next[cell] < end[cell] {
            let i = next[cell];
            let home = dense(&batch[i].1.cell).expect("every cell was numbered above");
            if home != cell {
                batch.swap(i, next[home]);
            }
            next[home] += 1;
        }
    }
    true
}

/// The visible messages of one cell: oldest first (the cell dereferences to its `seq -> slot`
/// map), and by group (one per token estimate), whose heads give the cell's best processing
/// time.
#[derive(Debug)]
pub struct Cell {
    members: BTreeMap<u64, u32>,
    groups: BTreeMap<u64, Group>,
    /// `(head time key, estimate)` of every group: the groups best processing time first, so
    /// the search and a frontier repair read only the groups whose time can matter.
    by_time: BTreeSet<(u64, u64)>,
    summary: CellSummary,
    /// The age frontier, oldest first (processing-time keys strictly decreasing); it may hold
    /// points of members that are gone (`AgePoint::gone`), which bound no less than the points
    /// they stand for.
    frontier: Vec<AgePoint>,
    /// How many points of the frontier are gone.
    loose: u32,
    /// Its place in the index's list of summaries (`u32::MAX` until it has one).
    at: u32,
}

impl Default for Cell {
    fn default() -> Self {
        Self {
            members: BTreeMap::new(),
            groups: BTreeMap::new(),
            by_time: BTreeSet::new(),
            summary: CellSummary {
                oldest_enqueued_at: 0.0,
                oldest_seq: 0,
                best_time_ms: 1000.0,
                best_time_enqueued_at: 0.0,
                next_time_ms: 1000.0,
            },
            frontier: Vec::new(),
            loose: 0,
            at: u32::MAX,
        }
    }
}

impl Cell {
    /// The oldest member's enqueue instant and sequence number, and the best processing time.
    pub fn summary(&self) -> &CellSummary {
        &self.summary
    }

    /// The groups of the cell, by token estimate.
    pub fn groups(&self) -> &BTreeMap<u64, Group> {
        &self.groups
    }

    /// `(head time key, estimate)` of every group, best processing time first.
    pub fn groups_by_time(&self) -> &BTreeSet<(u64, u64)> {
        &self.by_time
    }

    /// The age frontier: oldest first, processing-time keys strictly decreasing.
    pub fn frontier(&self) -> &[AgePoint] {
        &self.frontier
    }

    /// Copies the frontier's two youngest points into the summary.
    fn sync_frontier_summary(&mut self) {
        let mut youngest = self.frontier.iter().rev();
        if let Some(best) = youngest.next() {
            self.summary.best_time_enqueued_at = best.enqueued_at;
            self.summary.next_time_ms = f64::from_bits(youngest.next().unwrap_or(best).time);
        }
    }

    /// Adds a new member to the frontier, if no older point is as good, dropping the younger
    /// points it matches or beats. A message enqueued now (the youngest) costs O(1).
    fn frontier_add(&mut self, point: AgePoint) {
        let frontier = &mut self.frontier;
        let i = frontier.partition_point(|p| p.seq < point.seq);
        if i > 0 && frontier[i - 1].time <= point.time {
            return;
        }
        let beaten = frontier[i..].iter().take_while(|p| p.time >= point.time).count();
        let gone = frontier[i..i + beaten].iter().filter(|p| p.gone).count() as u32;
        frontier.splice(i..i + beaten, [point]);
        self.loose -= gone;
        self.sync_frontier_summary();
    }

    /// Takes a removed member out of the frontier, if it was a point. The youngest point (the
    /// oldest member with the best time: what a run that keeps taking a cell's best removes) is
    /// replaced at once, from the first groups by time ([`Cell::replace_youngest`]); any other
    /// point is marked gone. A gone point bounds every member it covers (none is older or
    /// faster), so the search's bounds stay sound and only looser; once more than
    /// `loose_points` are gone they are replaced by the members they stand for, together
    /// ([`Cell::repair_frontier`]: one read of the groups in their windows of keys, 5-30 µs in
    /// a wide cell whose groups are out of cache). The youngest point is never gone: it is the
    /// cell's best time and its age, which the search's floor relies on.
    fn frontier_remove(
        &mut self,
        entry: &IndexEntry,
        enqueued_at_of: &impl Fn(u32) -> f64,
        loose_points: u32,
    ) {
        let Ok(i) = self.frontier.binary_search_by_key(&entry.seq, |p| p.seq) else { return };
        if self.frontier[i].gone {
            return;
        }
        if i + 1 == self.frontier.len() {
            self.replace_youngest(enqueued_at_of);
        } else {
            self.frontier[i].gone = true;
            self.loose += 1;
        }
        if self.loose > loose_points {
            self.repair_frontier(enqueued_at_of);
        }
    }

    /// Replaces the youngest point (its member removed) by the oldest member with the cell's
    /// best time, read from the first groups by time. Every other member is younger than that
    /// one (its own point covers it) or slower than the best time: the points older than it
    /// keep covering theirs, and those it needs no more are dropped; the members covered only
    /// by dropped points older than it are covered by one gone point (the oldest dropped
    /// point's age, the key after the best time) instead of being looked for.
    fn replace_youngest(&mut self, enqueued_at_of: &impl Fn(u32) -> f64) {
        let Some(&(best, _)) = self.by_time.first() else {
            // The cell is empty.
            self.frontier.clear();
            self.loose = 0;
            return;
        };
        let head = self
            .by_time
            .range((best, 0)..=(best, u64::MAX))
            .map(|(_, tokens)| self.groups[tokens].head)
            .min_by_key(|head| head.seq)
            .expect("the first group by time");
        // Points from `faster` on have a key no worse than the best (gone points, and the
        // removed one); from `younger` on they are younger than the new point.
        let faster = self.frontier.partition_point(|p| p.time > best);
        let younger = self.frontier.partition_point(|p| p.seq < head.seq);
        let cut = faster.min(younger);
        let oldest_dropped = (faster < younger).then(|| self.frontier[faster]);
        let older_time = cut.checked_sub(1).map(|j| self.frontier[j].time);
        self.loose -= self.frontier[cut..].iter().filter(|p| p.gone).count() as u32;
        self.frontier.truncate(cut);
        // The members those older dropped points covered are older than the oldest member
        // with the best time, so their keys are past it; none if that reaches the point
        // before (those members are its own).
        let next = best.checked_add(1).filter(|&next| older_time.is_none_or(|t| next < t));
        if let (Some(from), Some(next)) = (oldest_dropped, next) {
            self.frontier.push(AgePoint {
                seq: from.seq,
                time: next,
                enqueued_at: from.enqueued_at,
                gone: true,
            });
            self.loose += 1;
        }
        self.frontier.push(AgePoint {
            seq: head.seq,
            time: best,
            enqueued_at: enqueued_at_of(head.slot),
            gone: false,
        });
        self.sync_frontier_summary();
    }

    /// Replaces every run of gone points by the members they alone covered.
    fn repair_frontier(&mut self, enqueued_at_of: &impl Fn(u32) -> f64) {
        let mut end = self.frontier.len();
        while self.loose > 0 {
            let Some(last_gone) = self.frontier[..end].iter().rposition(|p| p.gone) else { break };
            let first_gone = self.frontier[..last_gone].iter().rposition(|p| !p.gone).map_or(0, |j| j + 1);
            self.repair_run(first_gone, last_gone + 1, enqueued_at_of);
            end = first_gone;
        }
        self.sync_frontier_summary();
    }

    /// Replaces the gone points `a..b` by the members they alone covered (younger than the
    /// oldest of them, faster than the point before them, older than the point after them),
    /// found from the groups, one range read per run in that window of keys.
    fn repair_run(&mut self, a: usize, b: usize, enqueued_at_of: &impl Fn(u32) -> f64) {
        let lowest_time = self.frontier[b - 1].time;
        let older_time = a.checked_sub(1).map(|j| self.frontier[j].time);
        let younger_seq = self.frontier.get(b).map_or(u64::MAX, |p| p.seq);
        let in_window = |time: u64| older_time.is_none_or(|limit| time < limit);
        // Every member with a key in [lowest, older) is younger than the oldest gone point (an
        // older one would be covered by a point before them) and has a key above the next
        // point's: the oldest of each run is the only one that can become a point.
        let mut found: Vec<(u64, u64, u32)> = Vec::new();
        let mut read = |group: &Group| {
            let mut youngest = younger_seq;
            let mut from = lowest_time.max(group.head.time);
            while let Some((&(time, seq), &slot)) = group.members.range((from, 0)..).next() {
                if !in_window(time) {
                    break;
                }
                if seq < youngest {
                    youngest = seq;
                    found.push((seq, time, slot));
                }
                let Some(next) = time.checked_add(1) else { break };
                from = next;
            }
        };
        // The groups whose best key is in the window: looked up from the time order when they
        // are few, else read in one pass over the groups (cheaper than a lookup each).
        let end = older_time.map_or(Bound::Unbounded, |limit| Bound::Excluded((limit, 0)));
        let window = self.by_time.range((Bound::Unbounded, end));
        if window.clone().nth(self.groups.len() / 4).is_none() {
            window.for_each(|(_, tokens)| read(&self.groups[tokens]));
        } else {
            self.groups.values().filter(|group| in_window(group.head.time)).for_each(read);
        }
        found.sort_unstable_by_key(|&(seq, _, _)| seq);
        let mut best: Option<u64> = None;
        let points: Vec<AgePoint> = found
            .into_iter()
            .filter(|&(_, time, _)| {
                let keep = best.is_none_or(|b| time < b);
                if keep {
                    best = Some(time);
                }
                keep
            })
            .map(|(seq, time, slot)| AgePoint { seq, time, enqueued_at: enqueued_at_of(slot), gone: false })
            .collect();
        self.frontier.splice(a..b, points);
        self.loose -= (b - a) as u32;
    }

    /// The smallest processing time of the groups' heads.
    fn best_time(&self) -> f64 {
        self.by_time.first().map_or(1000.0, |&(time, _)| f64::from_bits(time))
    }

    /// Records that the group `tokens` now has the head time `new` (None: the group is gone)
    /// instead of `old` (None: it is new).
    fn moved_group(&mut self, tokens: u64, old: Option<u64>, new: Option<u64>) {
        if old != new {
            if let Some(old) = old {
                self.by_time.remove(&(old, tokens));
            }
            if let Some(new) = new {
                self.by_time.insert((new, tokens));
            }
        }
    }

    fn note_oldest(&mut self, seq: u64, enqueued_at: f64) {
        if self.members.first_key_value().is_none_or(|(&head, _)| seq < head) {
            self.summary.oldest_seq = seq;
            self.summary.oldest_enqueued_at = enqueued_at;
        }
    }

    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        self.note_oldest(entry.seq, entry.enqueued_at);
        self.frontier_add(AgePoint {
            seq: entry.seq,
            time: entry.time,
            enqueued_at: entry.enqueued_at,
            gone: false,
        });
        self.members.insert(entry.seq, slot);
        let time = f64::from_bits(entry.time);
        if self.groups.is_empty() || time < self.summary.best_time_ms {
            self.summary.best_time_ms = time;
        }
        let (old, new) = match self.groups.entry(entry.tokens) {
            Entry::Vacant(vacant) => {
                vacant.insert(Group::of(BTreeMap::from([((entry.time, entry.seq), slot)])));
                (None, entry.time)
            }
            Entry::Occupied(mut group) => {
                let group = group.get_mut();
                let old = group.head.time;
                group.insert(slot, entry.time, entry.seq);
                (Some(old), group.head.time)
            }
        };
        self.moved_group(entry.tokens, old, Some(new));
    }

    /// Adds `batch`, members of this cell sorted by `(tokens, time, seq)`.
    fn extend(&mut self, batch: &[(u32, IndexEntry)]) {
        let Some(oldest) = batch.iter().map(|(_, e)| e).min_by_key(|e| e.seq) else { return };
        self.note_oldest(oldest.seq, oldest.enqueued_at);
        let mut by_seq: Vec<(u64, u32)> = batch.iter().map(|(slot, e)| (e.seq, *slot)).collect();
        by_seq.sort_unstable();
        bulk_extend(&mut self.members, by_seq.into_iter());
        let mut best = if self.groups.is_empty() { u64::MAX } else { self.summary.best_time_ms.to_bits() };
        for run in batch.chunk_by(|(_, a), (_, b)| a.tokens == b.tokens) {
            best = best.min(run[0].1.time);
            let items = run.iter().map(|(slot, e)| ((e.time, e.seq), *slot));
            let tokens = run[0].1.tokens;
            let (old, new) = match self.groups.entry(tokens) {
                Entry::Vacant(vacant) => (None, vacant.insert(Group::of(items.collect())).head.time),
                Entry::Occupied(mut group) => {
                    let group = group.get_mut();
                    let old = group.head.time;
                    bulk_extend(&mut group.members, items);
                    group.refresh();
                    (Some(old), group.head.time)
                }
            };
            self.moved_group(tokens, old, Some(new));
        }
        self.summary.best_time_ms = f64::from_bits(best);
        self.extend_frontier(batch);
    }

    /// Adds the points of `batch` (sorted by `(tokens, time, seq)`) to the frontier: the
    /// frontier of the old points and of each estimate's oldest members by key.
    fn extend_frontier(&mut self, batch: &[(u32, IndexEntry)]) {
        let mut points = std::mem::take(&mut self.frontier);
        for run in batch.chunk_by(|(_, a), (_, b)| a.tokens == b.tokens) {
            let mut oldest = u64::MAX;
            for (_, e) in run {
                if e.seq < oldest {
                    oldest = e.seq;
                    points.push(AgePoint {
                        seq: e.seq,
                        time: e.time,
                        enqueued_at: e.enqueued_at,
                        gone: false,
                    });
                }
            }
        }
        staircase(&mut points);
        self.frontier = points;
        self.loose = self.frontier.iter().filter(|p| p.gone).count() as u32;
        self.sync_frontier_summary();
    }

    /// Removes a member; `enqueued_at_of` gives a slot's enqueue instant for the new head.
    fn remove(&mut self, entry: &IndexEntry, enqueued_at_of: impl Fn(u32) -> f64, loose_points: u32) {
        self.members.remove(&entry.seq);
        if let Entry::Occupied(mut group) = self.groups.entry(entry.tokens) {
            let g = group.get_mut();
            if g.members.remove(&(entry.time, entry.seq)).is_some() {
                let old_time = g.head.time;
                let new_time = if g.members.is_empty() {
                    group.remove();
                    None
                } else {
                    g.refresh();
                    Some(g.head.time)
                };
                if new_time != Some(old_time) {
                    self.moved_group(entry.tokens, Some(old_time), new_time);
                    // The cell's best time moves only when a group that held it no longer does.
                    if old_time == self.summary.best_time_ms.to_bits() {
                        self.summary.best_time_ms = self.best_time();
                    }
                }
            }
        }
        if entry.seq == self.summary.oldest_seq {
            if let Some((&head, &head_slot)) = self.members.first_key_value() {
                self.summary.oldest_seq = head;
                self.summary.oldest_enqueued_at = enqueued_at_of(head_slot);
            }
        }
        self.frontier_remove(entry, &enqueued_at_of, loose_points);
    }

    /// Checks the frontier and the summary fields read from it against `exact`, the same
    /// members' cell built afresh: equal while no point is gone; else still a cover of every
    /// member by points oldest first with keys strictly decreasing, whose points not gone are
    /// members. `by_seq` holds every visible message.
    fn check_frontier(&self, exact: &Cell, by_seq: &BTreeMap<u64, &IndexEntry>) -> Result<(), String> {
        let bits = |p: &AgePoint| (p.seq, p.time, p.enqueued_at.to_bits());
        let gone = self.frontier.iter().filter(|p| p.gone).count() as u32;
        if gone != self.loose {
            return Err(format!("{gone} gone points, {} counted", self.loose));
        }
        let members = || exact.members.keys().map(|seq| by_seq[seq]);
        if gone == 0 {
            if self.frontier.iter().map(bits).ne(exact.frontier.iter().map(bits)) {
                return Err(format!("{:?}, expected {:?}", self.frontier, exact.frontier));
            }
        } else {
            if self.frontier.windows(2).any(|w| w[0].seq >= w[1].seq || w[0].time <= w[1].time) {
                return Err(format!("{:?} is not a staircase", self.frontier));
            }
            for point in self.frontier.iter().filter(|p| !p.gone) {
                if by_seq
                    .get(&point.seq)
                    .is_none_or(|e| (e.seq, e.time, e.enqueued_at.to_bits()) != bits(point))
                {
                    return Err(format!("point {point:?} is no member"));
                }
            }
            let covered = |e: &IndexEntry| self.frontier.iter().any(|p| p.seq <= e.seq && p.time <= e.time);
            if let Some(e) = members().find(|e| !covered(e)) {
                return Err(format!("member {} not covered by {:?}", e.seq, self.frontier));
            }
        }
        let (mut best_at, mut next_ms) = (self.summary.best_time_enqueued_at, self.summary.next_time_ms);
        let mut youngest = self.frontier.iter().rev();
        if let Some(best) = youngest.next() {
            best_at = best.enqueued_at;
            next_ms = f64::from_bits(youngest.next().unwrap_or(best).time);
        }
        // The youngest point is the oldest member with the best time, gone points or not.
        let young_ok = self.frontier.last().map(bits) == exact.frontier.last().map(bits);
        if best_at.to_bits() != self.summary.best_time_enqueued_at.to_bits()
            || next_ms.to_bits() != self.summary.next_time_ms.to_bits()
            || !young_ok
        {
            return Err(format!("summary {:?} does not follow {:?}", self.summary, self.frontier));
        }
        Ok(())
    }
}

impl std::ops::Deref for Cell {
    type Target = BTreeMap<u64, u32>;

    fn deref(&self) -> &Self::Target {
        &self.members
    }
}

/// Copies `cell`'s summary into `summaries` after a change, giving it a place when it has none.
fn publish(summaries: &mut Vec<(CellKey, CellSummary)>, key: CellKey, cell: &mut Cell) {
    if let Some(listed) = summaries.get_mut(cell.at as usize) {
        listed.1 = cell.summary;
    } else {
        cell.at = summaries.len() as u32;
        summaries.push((key, cell.summary));
    }
}

/// The candidate index of one store's visible messages.
#[derive(Debug)]
pub struct VisibleIndex {
    cells: BTreeMap<CellKey, Cell>,
    /// Every non-empty cell's key and a copy of its summary, by priority, side by side in no
    /// particular order: the search bounds the cells on every dispatch, and reads them here in
    /// contiguous passes instead of across the map's nodes (a cell is about 150 bytes), a
    /// priority at a time (it may leave out a whole priority).
    summaries: [Vec<(CellKey, CellSummary)>; PRIORITIES],
    /// `(priority, head seq, cell)` of every non-empty cell: the first is the next to receive.
    receive_heads: BTreeSet<(u8, u64, CellKey)>,
    /// `(head seq, cell)` of every non-empty cell: the first is the oldest visible message.
    age_heads: BTreeSet<(u64, CellKey)>,
    by_priority: [usize; PRIORITIES],
    /// How many gone points a cell's frontier keeps before it is repaired.
    loose_points: u32,
}

impl Default for VisibleIndex {
    fn default() -> Self {
        Self::with_loose_points(LOOSE_POINTS)
    }
}

impl VisibleIndex {
    /// An empty index whose cells repair their age frontiers once more than `loose_points` of
    /// their points are gone (0: on every removal of a point).
    pub fn with_loose_points(loose_points: u32) -> Self {
        Self {
            cells: BTreeMap::new(),
            summaries: Default::default(),
            receive_heads: BTreeSet::new(),
            age_heads: BTreeSet::new(),
            by_priority: [0; PRIORITIES],
            loose_points,
        }
    }

    /// Adds a message that became visible.
    pub fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        let key = entry.cell;
        let cell = self.cells.entry(key).or_default();
        let old_head = cell.first_key_value().map(|(&s, _)| s);
        cell.insert(slot, entry);
        publish(&mut self.summaries[usize::from(key.priority)], key, cell);
        self.moved_head(key, old_head, entry.seq);
        self.by_priority[usize::from(key.priority)] += 1;
    }

    /// Adds messages that became visible at once (a batch enqueue), the same as inserting them
    /// one by one. `batch` may be reordered: by cell, each cell's members are added together,
    /// sorted, so each of its trees is walked once (or built whole) rather than once per
    /// message.
    pub fn insert_batch(&mut self, batch: &mut [(u32, IndexEntry)]) {
        // By cell first (a counting sort for a large batch: cells are few), then each cell's
        // run, which fits in cache, by the rest of the key.
        if !sort_by_cell(batch) {
            batch.sort_unstable_by_key(|(_, e)| e.cell);
        }
        for run in batch.chunk_by_mut(|(_, a), (_, b)| a.cell == b.cell) {
            run.sort_unstable_by_key(|(_, e)| (e.tokens, e.time, e.seq));
            let run = &*run;
            let key = run[0].1.cell;
            let cell = self.cells.entry(key).or_default();
            let old_head = cell.first_key_value().map(|(&s, _)| s);
            cell.extend(run);
            publish(&mut self.summaries[usize::from(key.priority)], key, cell);
            let new_head = cell.summary.oldest_seq;
            self.moved_head(key, old_head, new_head);
            self.by_priority[usize::from(key.priority)] += run.len();
        }
    }

    /// Updates the cell heads after `key`'s oldest member went from `old_head` to, at most,
    /// `candidate` (a new member's sequence number).
    fn moved_head(&mut self, key: CellKey, old_head: Option<u64>, candidate: u64) {
        if old_head.is_none_or(|head| candidate < head) {
            if let Some(head) = old_head {
                self.receive_heads.remove(&(key.priority, head, key));
                self.age_heads.remove(&(head, key));
            }
            self.receive_heads.insert((key.priority, candidate, key));
            self.age_heads.insert((candidate, key));
        }
    }

    /// Removes a visible message; `enqueued_at_of` gives a slot's enqueue instant (for the
    /// cell's new oldest member).
    pub fn remove(&mut self, entry: &IndexEntry, enqueued_at_of: impl Fn(u32) -> f64) {
        let key = entry.cell;
        let Some(cell) = self.cells.get_mut(&key) else { return };
        let was_head = cell.first_key_value().is_some_and(|(&s, _)| s == entry.seq);
        cell.remove(entry, enqueued_at_of, self.loose_points);
        if was_head {
            self.receive_heads.remove(&(key.priority, entry.seq, key));
            self.age_heads.remove(&(entry.seq, key));
            if let Some((&head, _)) = cell.first_key_value() {
                self.receive_heads.insert((key.priority, head, key));
                self.age_heads.insert((head, key));
            } else {
                let (at, listed) = (cell.at as usize, &mut self.summaries[usize::from(key.priority)]);
                self.cells.remove(&key);
                listed.swap_remove(at);
                if let Some(&(moved, _)) = listed.get(at) {
                    self.cells.get_mut(&moved).expect("a listed cell").at = at as u32;
                }
                self.by_priority[usize::from(key.priority)] -= 1;
                return;
            }
        }
        publish(&mut self.summaries[usize::from(key.priority)], key, cell);
        self.by_priority[usize::from(key.priority)] -= 1;
    }

    /// Forgets every message.
    pub fn clear(&mut self) {
        *self = Self::with_loose_points(self.loose_points);
    }

    /// The key and summary of every non-empty cell, by priority (URGENT first), each
    /// priority's in no particular order: what the search's first pass reads.
    pub fn summaries(&self) -> &[Vec<(CellKey, CellSummary)>; PRIORITIES] {
        &self.summaries
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

    /// The slot of the oldest visible message of each priority, URGENT first: one pass over
    /// the cells' age heads, oldest first, so its cost grows with the non-empty cells.
    pub fn oldest_by_priority(&self) -> [Option<u32>; PRIORITIES] {
        let mut oldest = [None; PRIORITIES];
        let mut missing = self.by_priority.iter().filter(|&&n| n > 0).count();
        for &(seq, key) in &self.age_heads {
            if missing == 0 {
                break;
            }
            let slot = &mut oldest[usize::from(key.priority)];
            if slot.is_none() {
                *slot = Some(self.cells[&key][&seq]);
                missing -= 1;
            }
        }
        oldest
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
    /// O(cells).
    pub fn min_tokens(&self) -> Option<u64> {
        self.cells.values().filter_map(|cell| cell.groups.keys().next().copied()).min()
    }

    /// Calls `visit` with the first member of every group of the cell `key`, the group's
    /// estimate, its best processing time in ms, and whether the group is a single run.
    pub fn for_each_group_head(&self, key: &CellKey, mut visit: impl FnMut(u32, u64, f64, bool)) {
        let Some(cell) = self.cells.get(key) else { return };
        for (&tokens, group) in &cell.groups {
            let head = &group.head;
            visit(head.slot, tokens, f64::from_bits(head.time), head.single_run);
        }
    }

    /// Calls `visit` with the estimate and best processing time in ms of every group of the cell
    /// `key`, best time first (then smallest estimate), and a way to read the group's head (its
    /// first member's slot, and whether the group is a single run), while it returns true.
    pub fn for_each_group_by_time(
        &self,
        key: &CellKey,
        mut visit: impl FnMut(u64, f64, &dyn Fn() -> (u32, bool)) -> bool,
    ) {
        let Some(cell) = self.cells.get(key) else { return };
        for &(time, tokens) in &cell.by_time {
            let head = || {
                let head = &cell.groups[&tokens].head;
                (head.slot, head.single_run)
            };
            if !visit(tokens, f64::from_bits(time), &head) {
                break;
            }
        }
    }

    /// Calls `visit` with the enqueue instant and processing time in ms of the points of the age
    /// frontier of the cell `key`, youngest first, while it returns true.
    pub fn for_each_age_point(&self, key: &CellKey, mut visit: impl FnMut(f64, f64) -> bool) {
        let Some(cell) = self.cells.get(key) else { return };
        for point in cell.frontier.iter().rev() {
            if !visit(point.enqueued_at, f64::from_bits(point.time)) {
                break;
            }
        }
    }

    fn group(&self, entry: &IndexEntry) -> Option<&Group> {
        self.cells.get(&entry.cell)?.groups.get(&entry.tokens)
    }

    /// The member after the one `entry` describes in its run (same processing-time key, next
    /// oldest).
    pub fn next_in_run(&self, entry: &IndexEntry) -> Option<u32> {
        let group = self.group(entry)?;
        group.members.range((entry.time, entry.seq + 1)..=(entry.time, u64::MAX)).next().map(|(_, &s)| s)
    }

    /// The first member of the run after `entry`'s in its group (the next worse
    /// processing-time key), if any.
    pub fn next_run_head(&self, entry: &IndexEntry) -> Option<u32> {
        let group = self.group(entry)?;
        if entry.time == u64::MAX || group.head.single_run {
            return None;
        }
        group.members.range((entry.time + 1, 0)..).next().map(|(_, &s)| s)
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
        let by_seq: BTreeMap<u64, &IndexEntry> = entries.iter().map(|(_, e)| (e.seq, e)).collect();
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
            if actual.members != cell.members {
                return Err(format!("members of cell {key:?} out of date"));
            }
            if actual.groups != cell.groups {
                return Err(format!("groups of cell {key:?} out of date"));
            }
            let by_time: BTreeSet<(u64, u64)> =
                actual.groups.iter().map(|(&tokens, group)| (group.head.time, tokens)).collect();
            if actual.by_time != by_time || cell.by_time != by_time {
                return Err(format!(
                    "groups of cell {key:?} by time: {:?}, expected {by_time:?}",
                    actual.by_time
                ));
            }
            if actual.summary.oldest_seq != cell.summary.oldest_seq
                || actual.summary.oldest_enqueued_at.to_bits() != cell.summary.oldest_enqueued_at.to_bits()
                || actual.summary.best_time_ms.to_bits() != cell.summary.best_time_ms.to_bits()
            {
                return Err(format!("summary of cell {key:?} out of date"));
            }
            actual.check_frontier(cell, &by_seq).map_err(|e| format!("age frontier of cell {key:?}: {e}"))?;
        }
        let listed_cells: usize = self.summaries.iter().map(Vec::len).sum();
        if listed_cells != self.cells.len() {
            return Err(format!("{listed_cells} summaries listed for {} cells", self.cells.len()));
        }
        for (key, cell) in &self.cells {
            let listed = self.summaries[usize::from(key.priority)].get(cell.at as usize);
            if listed.is_none_or(|(k, s)| k != key || s != &cell.summary) {
                return Err(format!("summary of cell {key:?} listed as {listed:?}, not {:?}", cell.summary));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, priority: u8, retries: u32, tokens: u64, time_ms: Option<u32>) -> IndexEntry {
        IndexEntry {
            cell: CellKey::for_message(priority, retries, tokens),
            tokens,
            time: crate::cells::time_key(tokens, time_ms.map(|ms| f64::from(ms) / 1000.0)),
            enqueued_at: seq as f64 / 4.0,
            seq,
            tenant: 0,
            deadline: f64::NAN,
        }
    }

    // A batch large enough to be ordered by the counting sort over cells (every priority and
    // retry class, estimates of many token classes, a few processing times), into an empty
    // index and into one that holds messages already: the same as one by one.
    #[test]
    fn large_batches_match_one_by_one_inserts() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut index = VisibleIndex::default();
        let mut live = Vec::new();
        let mut seq = 0u64;
        for size in [20_000usize, 9_000, 30] {
            let mut added: Vec<(u32, IndexEntry)> = (0..size)
                .map(|_| {
                    seq += 1;
                    let octaves = next(20);
                    let tokens = if next(10) == 0 { next(3) } else { 1 + next(1 << octaves) };
                    let time_ms = (next(4) == 0).then(|| next(40_000) as u32);
                    (seq as u32, entry(seq, next(4) as u8, next(9) as u32, tokens, time_ms))
                })
                .collect();
            live.extend(added.iter().copied());
            index.insert_batch(&mut added);
            assert_eq!(index.check(&live), Ok(()));
        }
        assert_eq!(index.len(), live.len());
    }

    /// Adds `messages` (priority, retries, tokens, processing time in ms) under the next
    /// sequence numbers (their slots too), as one batch or one by one, and to `live`.
    fn add_numbered(
        index: &mut VisibleIndex,
        live: &mut Vec<(u32, IndexEntry)>,
        seq: &mut u64,
        as_batch: bool,
        messages: impl IntoIterator<Item = (u8, u32, u64, Option<u32>)>,
    ) {
        let mut added: Vec<(u32, IndexEntry)> = messages
            .into_iter()
            .map(|(priority, retries, tokens, time_ms)| {
                *seq += 1;
                (*seq as u32, entry(*seq, priority, retries, tokens, time_ms))
            })
            .collect();
        live.extend(added.iter().copied());
        if as_batch {
            index.insert_batch(&mut added);
        } else {
            for (slot, e) in &added {
                index.insert(*slot, e);
            }
        }
    }

    proptest! {
        // The groups' order by best processing time follows every change of a group's head: a
        // new member with a better time, a batch, the head taken (the next run's time, or the
        // group gone). `for_each_group_by_time` visits every group best time first with the
        // head `for_each_group_head` gives, and a cell's best time is its first group's.
        #[test]
        fn groups_by_time_follow_every_head_change(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec((0u8..2, 1u64..12, proptest::option::of(0u32..8)), 1..40),
                    any::<bool>(),
                    0usize..20,
                ),
                1..8,
            ),
        ) {
            let mut index = VisibleIndex::default();
            let mut live: Vec<(u32, IndexEntry)> = Vec::new();
            let mut seq = 0u64;
            for (messages, as_batch, heads_taken) in steps {
                let messages = messages
                    .into_iter()
                    .map(|(priority, tokens, seconds)| (priority, 0, tokens * 100, seconds.map(|s| 1000 + s * 4000)));
                add_numbered(&mut index, &mut live, &mut seq, as_batch, messages);
                // Take the head of the fastest group of some cell: its group's time may move.
                for _ in 0..heads_taken {
                    let Some(key) = index.cells().keys().nth(seq as usize % index.cells().len().max(1)).copied()
                    else { break };
                    let mut first = None;
                    index.for_each_group_by_time(&key, |_, _, head| {
                        first = Some(head().0);
                        false
                    });
                    let slot = first.expect("a non-empty cell has a group");
                    let at = live.iter().position(|(s, _)| *s == slot).expect("a live head");
                    let (_, removed) = live.swap_remove(at);
                    index.remove(&removed, |slot| f64::from(slot) / 4.0);
                }
                prop_assert_eq!(index.check(&live), Ok(()));
                for (key, cell) in index.cells() {
                    let mut heads = Vec::new();
                    index.for_each_group_head(key, |slot, tokens, time_ms, single| {
                        heads.push((time_ms.to_bits(), tokens, slot, single));
                    });
                    heads.sort_unstable();
                    let mut visited = Vec::new();
                    index.for_each_group_by_time(key, |tokens, time_ms, head| {
                        let (slot, single) = head();
                        visited.push((time_ms.to_bits(), tokens, slot, single));
                        true
                    });
                    prop_assert_eq!(&visited, &heads);
                    prop_assert_eq!(cell.summary().best_time_ms.to_bits(), heads[0].0);
                }
            }
        }

        // Batches (into an empty index, a small one and a large one: built whole, appended, or
        // inserted key by key), single inserts and removals leave the index exactly as the same
        // messages inserted one by one would: members, groups and their cached heads, summaries,
        // cell heads and counts.
        #[test]
        fn batches_and_removals_match_one_by_one_inserts(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (0u8..4, 0u32..3, prop_oneof![1u64..40, 900u64..1100], proptest::option::of(0u32..40_000)),
                        1..60,
                    ),
                    any::<bool>(),
                    proptest::collection::vec(any::<proptest::sample::Index>(), 0..30),
                ),
                1..6,
            ),
        ) {
            let mut index = VisibleIndex::default();
            let mut live: Vec<(u32, IndexEntry)> = Vec::new();
            let mut seq = 0u64;
            for (messages, as_batch, removals) in steps {
                add_numbered(&mut index, &mut live, &mut seq, as_batch, messages);
                prop_assert_eq!(index.check(&live), Ok(()));
                for pick in removals {
                    if live.is_empty() {
                        break;
                    }
                    let (_, removed) = live.swap_remove(pick.index(live.len()));
                    let enqueued_at_of = |slot: u32| f64::from(slot) / 4.0;
                    index.remove(&removed, enqueued_at_of);
                }
                prop_assert_eq!(index.check(&live), Ok(()));
                prop_assert_eq!(index.len(), live.len());
            }
        }
    }
}
