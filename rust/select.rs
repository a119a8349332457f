//! Exact best-message search over the candidate index. One file past 700 lines: the search's
//! bounds, its heap and its two walks (best first, and collected in order) are one algorithm.
//!
//! Candidates come out in exactly descending base score (the six weighted factors), ties broken
//! by older `enqueued_at`, then lower sequence number. With `Weights::urgent_first`, a tier
//! comes before the score: every URGENT message ranks above every other (cells are keyed by
//! priority, so a cell's tier is known without touching its members). A max-heap holds two kinds of entries:
//! a cell, keyed by an upper bound of every member it has not yet produced (its static bound +
//! the wait-time factor of its oldest remaining member, which is the largest in the cell), and a
//! message, keyed by its exact score. Popping a cell expands its oldest remaining member; popping
//! a message yields it: every other entry is an upper bound, so nothing left can beat it. Only the
//! cells whose bound reaches the top are ever walked, so the cost does not grow with the number
//! of messages in a cell.
//!
//! Custom scorers add at most their weight to any message (scores are clamped to [0, 1]), so
//! `choose` evaluates them on candidates in that order and stops as soon as the best total found
//! reaches the bound of everything not yet produced, or after `max_candidates` evaluations.
//!
//! About 880 lines for one search, `best_candidate` and its streaming form for custom scorers,
//! with the bounds they share; the tests are in `select/tests.rs`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::cells::CellKey;
pub use crate::index::CellSummary;
use crate::scoring::{
    budget_bound, budget_bound_over, budget_floor, priority_and_retry, processing_time_factor,
    static_cell_bound, total, wait_time_factor, weighted_factors, GroupBounds, MessageTraits, Weights,
    BOUND_SLACK,
};

/// What the search needs from an index of visible messages grouped in cells.
///
/// Inside a cell, the members with one token estimate form a group; a group is ordered by
/// processing-time key (best processing-time factor first) and then by age, so it falls into
/// runs of members that score alike but for their wait. A run's head (its oldest member) scores
/// at least as much as the rest of its run and wins their ties; later runs score less but for
/// their wait, which is at most the cell's oldest member's. So the search only ever scores run
/// heads, and stops walking a group as soon as a head, credited with the cell's longest wait,
/// cannot win: ties in age (a batch enqueued at once) and saturated wait factors (a long
/// backlog) never force a walk through a whole cell.
pub trait CandidateIndex {
    /// Calls `visit` with every non-empty cell, the slot of its oldest member, and the smallest
    /// processing time among its members in ms (as clamped by `cells::time_key`).
    fn for_each_cell(&self, visit: impl FnMut(&CellKey, &CellSummary));
    /// Calls `visit` with each priority (URGENT first) and the keys and summaries of its
    /// non-empty cells, in any order: the search bounds a priority's cells together before it
    /// reads any of them. The default sorts what `for_each_cell` gives.
    fn for_each_priority(&self, mut visit: impl FnMut(u8, &[(CellKey, CellSummary)])) {
        let mut by_priority: [Vec<(CellKey, CellSummary)>; 4] = Default::default();
        self.for_each_cell(|key, summary| {
            by_priority[usize::from(key.priority.min(3))].push((*key, *summary));
        });
        for (priority, cells) in (0u8..).zip(&by_priority) {
            visit(priority, cells);
        }
    }
    /// Calls `visit` with the first member (the head of the first run) of every group of `key`,
    /// the group's token estimate, its best processing time in ms (as `for_each_cell`), and
    /// whether the group is a single run: enough to bound the group without touching its
    /// members, and to skip looking for a next run that does not exist.
    fn for_each_group_head(&self, key: &CellKey, visit: impl FnMut(u32, u64, f64, bool));
    /// Calls `visit` with the token estimate and best processing time in ms of every group of
    /// `key`, best processing time first, and a way to read the group's head (the slot and
    /// single-run flag `for_each_group_head` gives), while it returns true: the search reads
    /// the heads of the groups whose time can still win only. The default sorts what
    /// `for_each_group_head` gives.
    fn for_each_group_by_time(
        &self,
        key: &CellKey,
        mut visit: impl FnMut(u64, f64, &dyn Fn() -> (u32, bool)) -> bool,
    ) {
        let mut groups = Vec::new();
        self.for_each_group_head(key, |slot, tokens, time_ms, single_run| {
            groups.push((time_ms, tokens, slot, single_run));
        });
        groups.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (time_ms, tokens, slot, single_run) in groups {
            if !visit(tokens, time_ms, &|| (slot, single_run)) {
                break;
            }
        }
    }
    /// Calls `visit` with the enqueue instant and processing time in ms (as `for_each_cell`) of
    /// the points of the age frontier of `key`, youngest first, while it returns true: points
    /// such that every member of the cell is no older than one of them and has no better
    /// processing time than it. The default is the two points the summary gives: the best
    /// processing time with its oldest member's age, and the next best with the cell's oldest
    /// member's age.
    fn for_each_age_point(
        &self,
        key: &CellKey,
        summary: &CellSummary,
        mut visit: impl FnMut(f64, f64) -> bool,
    ) {
        let _ = key;
        if visit(summary.best_time_enqueued_at, summary.best_time_ms) {
            visit(summary.oldest_enqueued_at, summary.next_time_ms);
        }
    }
    /// The member after `slot` in its run (the next oldest with the same time key), if any.
    fn next_in_run(&self, slot: u32) -> Option<u32>;
    /// The head of the run after `slot`'s in its group, if any.
    fn next_run_head(&self, slot: u32) -> Option<u32>;
    /// The score inputs of the message in `slot`.
    fn traits(&self, slot: u32) -> MessageTraits;
    /// The enqueue sequence number of the message in `slot` (the last tie-breaker).
    fn seq(&self, slot: u32) -> u64;
}

/// A message the search produced, with its exact weighted factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Where the message lives in its index.
    pub slot: u32,
    /// The six weighted factors.
    pub factors: [f64; 6],
    /// Their sum.
    pub base: f64,
    /// Estimated tokens.
    pub tokens: u64,
    /// Tie-breakers.
    pub enqueued_at: f64,
    /// Tie-breaker after `enqueued_at`.
    pub seq: u64,
    /// Its priority (0 = URGENT).
    pub priority: u8,
    /// Its tier (`Weights::tier`): ranks before the score.
    pub tier: u8,
}

/// The scoring inputs that hold for one search.
#[derive(Debug, Clone, Copy)]
pub struct SearchContext {
    /// Factor weights.
    pub weights: Weights,
    /// Current instant, in the clock of `enqueued_at`.
    pub now: f64,
    /// The limiter's available tokens (`A` of the formulas).
    pub available: f64,
    /// The largest estimate the limiter would admit now; larger messages are not candidates.
    pub max_tokens: f64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A cell not yet expanded; `cell_wait` is the weighted wait factor of its oldest member,
    /// the most any member can have.
    Cell { key: CellKey, cell_wait: f64 },
    /// The runs of a group after the one `head` leads.
    LaterRuns { head: Candidate, priority: u8, cell_wait: f64 },
    /// A scored member.
    Message(Candidate),
}

/// The selection order of `(tier, score, enqueued_at, seq)`: `Greater` when `a` comes first
/// (a higher tier, then a higher score, then older, then a lower sequence number).
fn rank(a: (u8, f64, f64, u64), b: (u8, f64, f64, u64)) -> Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.total_cmp(&b.1))
        .then_with(|| b.2.total_cmp(&a.2))
        .then_with(|| b.3.cmp(&a.3))
}

impl Candidate {
    fn rank_key(&self) -> (u8, f64, f64, u64) {
        (self.tier, self.base, self.enqueued_at, self.seq)
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    tier: u8,
    key: f64,
    enqueued_at: f64,
    seq: u64,
    kind: Kind,
}

impl Entry {
    // Greater = comes out first: higher tier, then higher score, then older, then lower
    // sequence number.
    fn rank(&self, other: &Self) -> Ordering {
        rank(
            (self.tier, self.key, self.enqueued_at, self.seq),
            (other.tier, other.key, other.enqueued_at, other.seq),
        )
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
    }
}

/// Produces candidates in exactly descending base score.
pub trait CandidateStream {
    /// The next best candidate, if any.
    fn next_candidate(&mut self) -> Option<Candidate>;
    /// An upper bound of the base score of every candidate not yet produced (None if none).
    fn remaining_bound(&self) -> Option<f64>;
    /// The highest tier of the candidates not yet produced (None if none).
    fn remaining_tier(&self) -> Option<u8>;
}

/// Best-first search over a `CandidateIndex`.
pub struct IndexSearch<'a, I: CandidateIndex> {
    index: &'a I,
    context: SearchContext,
    heap: BinaryHeap<Entry>,
}

impl<'a, I: CandidateIndex> IndexSearch<'a, I> {
    /// Seeds the heap with every cell that holds an admissible member.
    pub fn new(index: &'a I, context: SearchContext) -> Self {
        let mut heap = BinaryHeap::new();
        index.for_each_cell(|key, cell| {
            let best_time_ms = cell.best_time_ms;
            let weights = &context.weights;
            if let Some(static_bound) =
                static_cell_bound(weights, key, best_time_ms, context.available, context.max_tokens)
            {
                let cell_wait =
                    weights.wait_time * wait_time_factor(context.now - cell.oldest_enqueued_at, key.priority);
                heap.push(Entry {
                    tier: weights.tier(key.priority),
                    key: static_bound + cell_wait,
                    enqueued_at: cell.oldest_enqueued_at,
                    seq: cell.oldest_seq,
                    kind: Kind::Cell { key: *key, cell_wait },
                });
            }
        });
        Self { index, context, heap }
    }

    /// Pushes the member in `slot` with its exact score, if the limiter admits it.
    fn push_member(&mut self, slot: u32) -> Option<Candidate> {
        let candidate = score_member(self.index, &self.context, slot)?;
        self.heap.push(Entry {
            tier: candidate.tier,
            key: candidate.base,
            enqueued_at: candidate.enqueued_at,
            seq: candidate.seq,
            kind: Kind::Message(candidate),
        });
        Some(candidate)
    }

    /// Pushes the run head in `slot`, and a bound of the runs after it: they share its
    /// estimate, have no better processing-time factor, and wait no longer than the cell's
    /// oldest member (whose age and sequence number the bound carries for tie-breaking).
    fn push_run_head(&mut self, slot: u32, priority: u8, cell_wait: f64, oldest: (f64, u64)) {
        let Some(head) = self.push_member(slot) else { return };
        let own_wait =
            self.context.weights.wait_time * wait_time_factor(self.context.now - head.enqueued_at, priority);
        self.heap.push(Entry {
            tier: head.tier,
            key: head.base - own_wait + cell_wait + BOUND_SLACK,
            enqueued_at: oldest.0,
            seq: oldest.1,
            kind: Kind::LaterRuns { head, priority, cell_wait },
        });
    }
}

/// The exact candidate of the member in `slot`, or None when its estimate is not admissible.
fn score_member(index: &impl CandidateIndex, context: &SearchContext, slot: u32) -> Option<Candidate> {
    let traits = index.traits(slot);
    (traits.tokens as f64 <= context.max_tokens)
        .then(|| Candidate::scored(context, slot, &traits, index.seq(slot)))
}

impl Candidate {
    /// The message in `slot` with its exact weighted factors under `context`.
    fn scored(context: &SearchContext, slot: u32, traits: &MessageTraits, seq: u64) -> Self {
        let factors = weighted_factors(&context.weights, traits, context.now, context.available);
        Self {
            slot,
            factors,
            base: total(&factors),
            tokens: traits.tokens,
            enqueued_at: traits.enqueued_at,
            seq,
            priority: traits.priority,
            tier: context.weights.tier(traits.priority),
        }
    }
}

impl<I: CandidateIndex> CandidateStream for IndexSearch<'_, I> {
    fn next_candidate(&mut self) -> Option<Candidate> {
        while let Some(entry) = self.heap.pop() {
            let oldest = (entry.enqueued_at, entry.seq);
            match entry.kind {
                Kind::Message(candidate) => {
                    // The rest of its run scores no more than it did: it enters the race now.
                    if let Some(next) = self.index.next_in_run(candidate.slot) {
                        self.push_member(next);
                    }
                    return Some(candidate);
                }
                Kind::LaterRuns { head, priority, cell_wait } => {
                    if let Some(next) = self.index.next_run_head(head.slot) {
                        self.push_run_head(next, priority, cell_wait, oldest);
                    }
                }
                Kind::Cell { key, cell_wait } => {
                    let mut heads = Vec::new();
                    self.index.for_each_group_head(&key, |slot, _, _, _| heads.push(slot));
                    for slot in heads {
                        self.push_run_head(slot, key.priority, cell_wait, oldest);
                    }
                }
            }
        }
        None
    }

    fn remaining_bound(&self) -> Option<f64> {
        self.heap.peek().map(|entry| entry.key)
    }

    fn remaining_tier(&self) -> Option<u8> {
        self.heap.peek().map(|entry| entry.tier)
    }
}

/// A cell or a group the walk may visit, with the bound of every member it holds and the age
/// and sequence number of its oldest (a bound's tie-breakers); ordered as candidates rank, so a
/// max-heap yields the most promising first.
#[derive(Debug, Clone, Copy)]
struct Bounded<T> {
    tier: u8,
    bound: f64,
    oldest_at: f64,
    seq: u64,
    item: T,
}

impl<T> Bounded<T> {
    fn rank_key(&self) -> (u8, f64, f64, u64) {
        (self.tier, self.bound, self.oldest_at, self.seq)
    }
}

impl<T> PartialEq for Bounded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Bounded<T> {}
impl<T> PartialOrd for Bounded<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Bounded<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        rank(self.rank_key(), other.rank_key())
    }
}

/// The budget part of cell bounds, computed once per token class in a search (it does not
/// depend on the priority or retry class). Kept in the search's scratch from one search to the
/// next: an entry counts only when its stamp is the current search's, so nothing is cleared or
/// allocated per search.
#[derive(Default)]
struct BudgetParts {
    /// The current search's stamp (never 0 once a search has begun).
    stamp: u32,
    /// By token class: the stamp it was computed in, the budget part of the bound and its
    /// floor (`scoring::budget_floor`); minus infinity for a class none of whose estimates is
    /// admissible (a floor: not every estimate is).
    parts: Vec<(u32, f64, f64)>,
    /// By priority and retry class: the stamp and `scoring::priority_and_retry`.
    priority_and_retry: [(u32, f64); 4 * 8],
}

impl BudgetParts {
    /// Forgets the previous search's parts.
    fn start(&mut self) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // After 2^32 searches: every entry's stamp could match again.
            self.parts.clear();
            self.priority_and_retry = [(0, 0.0); 4 * 8];
            self.stamp = 1;
        }
    }

    /// The part of the bound of every member of the cell `key` that its key fixes: priority,
    /// retry, budget (None when no estimate of its class is admissible), and the slack; and
    /// the part of the score every member reaches (minus infinity when unknown).
    fn static_part(&mut self, context: &SearchContext, key: CellKey) -> Option<(f64, f64)> {
        let (budget, floor) = self.get(context, key)?;
        let i = usize::from(key.priority.min(3)) * 8 + usize::from(key.retry_class.min(7));
        let cached = &mut self.priority_and_retry[i];
        if cached.0 != self.stamp {
            *cached = (self.stamp, priority_and_retry(&context.weights, &key));
        }
        let fixed = cached.1;
        Some((fixed + BOUND_SLACK + budget, fixed + floor))
    }

    fn get(&mut self, context: &SearchContext, key: CellKey) -> Option<(f64, f64)> {
        let class = usize::from(key.token_class);
        if class >= self.parts.len() {
            self.parts.resize(class + 1, (0, f64::NAN, f64::NAN));
        }
        let entry = &mut self.parts[class];
        if entry.0 != self.stamp {
            let (weights, available, max_tokens) = (&context.weights, context.available, context.max_tokens);
            *entry = (
                self.stamp,
                budget_bound(weights, &key, available, max_tokens).unwrap_or(f64::NEG_INFINITY),
                budget_floor(weights, &key, available, max_tokens).unwrap_or(f64::NEG_INFINITY),
            );
        }
        Some((entry.1, entry.2)).filter(|(part, _)| *part != f64::NEG_INFINITY)
    }
}

/// What the members of one cell can score for their processing time and wait together, from its
/// age frontier (`CandidateIndex::for_each_age_point`): each point's weighted processing-time
/// factor paired with its own wait, not the cell's best with its oldest member's.
#[derive(Default)]
struct AgeBounds {
    /// By point, oldest first: the weighted processing-time factor (never decreasing).
    times: Vec<f64>,
    /// By point: the weighted wait factor (never increasing).
    waits: Vec<f64>,
    /// By point: the best `times + waits` of the points up to it.
    best_up_to: Vec<f64>,
}

impl AgeBounds {
    /// Loads the frontier of the cell `key`. It is read youngest first and only up to the first
    /// point whose wait factor is saturated: the older ones wait no longer and have no better
    /// processing time.
    fn load(
        &mut self,
        index: &impl CandidateIndex,
        context: &SearchContext,
        key: CellKey,
        summary: &CellSummary,
    ) {
        let weights = &context.weights;
        self.times.clear();
        self.waits.clear();
        self.best_up_to.clear();
        index.for_each_age_point(&key, summary, |enqueued_at, time_ms| {
            let factor = wait_time_factor(context.now - enqueued_at, key.priority);
            self.times.push(weights.processing_time * processing_time_factor(time_ms));
            self.waits.push(weights.wait_time * factor);
            factor < 1.0
        });
        self.times.reverse();
        self.waits.reverse();
        let mut best = f64::NEG_INFINITY;
        for (time, wait) in self.times.iter().zip(&self.waits) {
            best = best.max(time + wait);
            self.best_up_to.push(best);
        }
    }

    /// The most the weighted processing-time and wait factors of any member add up to.
    fn best(&self) -> f64 {
        self.best_up_to.last().copied().unwrap_or(f64::NEG_INFINITY)
    }

    /// The most they add up to for a member whose weighted processing-time factor is at most
    /// `time`: a point with a better one counts `time` with its wait (the oldest such point
    /// waits longest), the others count their own.
    fn at_most(&self, time: f64) -> f64 {
        let k = self.times.partition_point(|&t| t <= time);
        let own = k.checked_sub(1).map_or(f64::NEG_INFINITY, |i| self.best_up_to[i]);
        let capped = self.waits.get(k).map_or(f64::NEG_INFINITY, |wait| time + wait);
        own.max(capped)
    }
}

/// A cell to visit: its key, the part of its bound its key fixes, its summary (a position in
/// the search's list), and whether its bound is already the age frontier's.
#[derive(Debug, Clone, Copy)]
struct CellItem {
    key: CellKey,
    refined: bool,
    summary: u32,
    static_part: f64,
}

impl Bounded<CellItem> {
    /// Loads the cell's age frontier into `ages` and, the first time, lowers its bound to what
    /// the frontier gives.
    fn refine(
        &mut self,
        index: &impl CandidateIndex,
        context: &SearchContext,
        summaries: &[CellSummary],
        ages: &mut AgeBounds,
    ) {
        ages.load(index, context, self.item.key, &summaries[self.item.summary as usize]);
        if !self.item.refined {
            self.bound = self.bound.min(self.item.static_part + ages.best());
            self.item.refined = true;
        }
    }
}

/// The best admissible message of `index`, without custom scorers: a branch-and-bound walk
/// that needs no candidate heap. Every cell that may hold an admissible member is bounded from
/// its summary; cells are then visited best bound first, and inside a cell its groups, bounded
/// from their heads, best bound first too; the walk stops as soon as the next bound cannot beat
/// the best found. Visiting in bound order is what keeps a dispatch short when many cells and
/// groups bound alike (a batch enqueued at one instant): the first ones visited hold the best,
/// and it prunes the rest. A cell's first bound pairs its best processing time with the wait
/// of the oldest member that has it, and its next best with its oldest member's wait; before
/// it is visited, that bound is replaced by the one its whole age frontier gives (each
/// processing time with the wait of the members that have it), which keeps a long run from
/// visiting the cells whose best time is a young message's and longest wait an old one's.
/// A cell whose bound is below a score some member is sure to reach (a cell's best-time member
/// with its class's least budget part) is left out of that order. The priorities are read
/// URGENT first, and a priority whose bound as a whole (`priority_bound`) is already below that
/// floor is left out without bounding its cells one by one. Ties are broken as in
/// `IndexSearch` (older, then lower sequence number).
pub fn best_candidate(index: &impl CandidateIndex, context: &SearchContext) -> Option<Candidate> {
    // The buffers of the thread's last search: none is allocated or grown again (a nested
    // search, if an index ever ran one, starts with empty ones).
    let mut scratch = SCRATCH.take();
    let best = search(index, context, &mut scratch);
    SCRATCH.set(scratch);
    best
}

/// The buffers of a search, kept from one to the next.
#[derive(Default)]
struct Scratch {
    cells: Vec<Bounded<CellItem>>,
    summaries: Vec<CellSummary>,
    groups: Vec<Bounded<(u32, bool)>>,
    ages: AgeBounds,
    parts: BudgetParts,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// `best_candidate` in `scratch`'s buffers.
fn search(index: &impl CandidateIndex, context: &SearchContext, scratch: &mut Scratch) -> Option<Candidate> {
    let weights = &context.weights;
    let mut best: Option<Candidate> = None;
    let Scratch { cells, summaries, groups, ages, parts } = scratch;
    parts.start();
    cells.clear();
    summaries.clear();
    // The best score some member is sure to reach: the member with a cell's best processing
    // time scores at least its key's floor + that time + its own wait.
    let mut floor: (u8, f64) = (0, f64::NEG_INFINITY);
    index.for_each_priority(|priority, listed| {
        let tier = weights.tier(priority);
        // A priority whose cells all bound below the floor found so far holds no winner: one
        // bound over all of them (its best retry class, budget part over its estimates' range,
        // best processing time and oldest wait) leaves them out unread, one by one.
        if floor.1 > f64::NEG_INFINITY && tier <= floor.0 {
            let Some(bound) = priority_bound(context, priority, listed) else { return };
            if tier < floor.0 || bound < floor.1 - BOUND_SLACK {
                return;
            }
        }
        for (key, cell) in listed {
            let Some((static_part, static_floor)) = parts.static_part(context, *key) else { continue };
            let wait_of = |enqueued_at: f64| {
                weights.wait_time * wait_time_factor(context.now - enqueued_at, key.priority)
            };
            let time_of = |ms: f64| weights.processing_time * processing_time_factor(ms);
            let at_best = time_of(cell.best_time_ms) + wait_of(cell.best_time_enqueued_at);
            let older = time_of(cell.next_time_ms) + wait_of(cell.oldest_enqueued_at);
            let tier = weights.tier(key.priority);
            if static_floor > f64::NEG_INFINITY && (tier, static_floor + at_best) > floor {
                floor = (tier, static_floor + at_best);
            }
            let bound = static_part + at_best.max(older);
            // The floor only rises: a cell below the floor found so far is below the last one.
            if tier < floor.0 || (tier == floor.0 && bound < floor.1 - BOUND_SLACK) {
                continue;
            }
            cells.push(Bounded {
                tier,
                bound,
                oldest_at: cell.oldest_enqueued_at,
                seq: cell.oldest_seq,
                item: CellItem { key: *key, refined: false, summary: summaries.len() as u32, static_part },
            });
            summaries.push(*cell);
        }
    });
    // Best bound first, each cell bounded again from its age frontier before it is visited (and
    // put back if that bound puts it behind another).
    // A cell that cannot reach the floor holds no winner: it never enters the heap (the slack
    // keeps a cell whose bound and the floor differ by rounding only).
    let (floor_tier, floor_score) = floor;
    cells.retain(|cell| {
        cell.tier > floor_tier || (cell.tier == floor_tier && cell.bound >= floor_score - BOUND_SLACK)
    });
    let mut cells = BinaryHeap::from(std::mem::take(cells));
    while let Some(mut cell) = cells.pop() {
        if !beats(best.as_ref(), cell.tier, cell.bound, cell.oldest_at, cell.seq) {
            break; // every cell left bounds no higher
        }
        let refined = cell.item.refined;
        cell.refine(index, context, summaries, ages);
        if !refined && cells.peek().is_some_and(|next| *next > cell) {
            cells.push(cell);
            continue;
        }
        if beats(best.as_ref(), cell.tier, cell.bound, cell.oldest_at, cell.seq) {
            expand_cell(index, context, &cell, ages, groups, &mut best);
        }
    }
    scratch.cells = cells.into_vec();
    best
}

/// An upper bound of every member of the cells `listed` (all of `priority`), from what they
/// share at most: the best retry factor, the best budget part over their estimates' whole range,
/// the best processing time and the oldest member's wait; None when none is admissible. It
/// bounds each cell's first bound in the search (plus slack for rounding), so a priority it
/// puts below the floor holds no cell the search would keep.
fn priority_bound(context: &SearchContext, priority: u8, listed: &[(CellKey, CellSummary)]) -> Option<f64> {
    let weights = &context.weights;
    let (mut lo, mut hi, mut retry_class) = (f64::INFINITY, f64::NEG_INFINITY, u8::MAX);
    let (mut best_time_ms, mut oldest_at) = (f64::INFINITY, f64::INFINITY);
    for (key, cell) in listed {
        let (class_lo, class_hi) = key.token_range();
        lo = lo.min(class_lo);
        hi = hi.max(class_hi);
        retry_class = retry_class.min(key.retry_class);
        best_time_ms = best_time_ms.min(cell.best_time_ms);
        oldest_at = oldest_at.min(cell.oldest_enqueued_at);
    }
    let budget = budget_bound_over(weights, lo, hi, context.available, context.max_tokens)?;
    let key = CellKey { priority, retry_class, token_class: 0 };
    Some(
        priority_and_retry(weights, &key)
            + BOUND_SLACK
            + budget
            + weights.processing_time * processing_time_factor(best_time_ms)
            + weights.wait_time * wait_time_factor(context.now - oldest_at, priority)
            + BOUND_SLACK,
    )
}

/// Whether `(tier, score, enqueued_at, seq)` beats `best` in the order candidates are ranked.
fn beats(best: Option<&Candidate>, tier: u8, score: f64, enqueued_at: f64, seq: u64) -> bool {
    best.is_none_or(|b| rank((tier, score, enqueued_at, seq), b.rank_key()) == Ordering::Greater)
}

/// Scores the groups of `cell` that may beat `best`, in bound order; `ages` is the cell's age
/// frontier, `groups` scratch space. The groups are read best processing time first: a group's
/// time and the cell's key bound every group after it (`static_part` holds the best budget part
/// of the cell's estimates), so the groups bounded so far are walked as soon as they bound above
/// every group not yet read, and the reading stops at the first time that cannot beat the best
/// found. A wide cell (hundreds of estimates) is then read only as far as its fast groups.
fn expand_cell(
    index: &impl CandidateIndex,
    context: &SearchContext,
    cell: &Bounded<CellItem>,
    ages: &AgeBounds,
    groups: &mut Vec<Bounded<(u32, bool)>>,
    best: &mut Option<Candidate>,
) {
    let key = cell.item.key;
    let (tier, oldest_at, seq) = (cell.tier, cell.oldest_at, cell.seq);
    let bounds = GroupBounds::new(&context.weights, &key, context.available);
    let processing_weight = context.weights.processing_time;
    groups.clear();
    let mut by_bound = BinaryHeap::from(std::mem::take(groups));
    index.for_each_group_by_time(&key, |tokens, best_time_ms, head| {
        let time_and_wait = ages.at_most(processing_weight * processing_time_factor(best_time_ms));
        // No group from here on (no better time, no better budget part) bounds higher.
        let rest = cell.item.static_part + time_and_wait;
        while let Some(top) = by_bound.peek() {
            if rank(top.rank_key(), (tier, rest, oldest_at, seq)) != Ordering::Greater {
                break;
            }
            let top = by_bound.pop().expect("peeked");
            if beats(best.as_ref(), tier, top.bound, oldest_at, seq) {
                walk_group(index, context, &top, ages, best);
            }
        }
        if !beats(best.as_ref(), tier, rest, oldest_at, seq) {
            return false;
        }
        // A bound from the group's key and cached head alone spares the members' cache lines.
        if tokens as f64 <= context.max_tokens {
            let bound = bounds.bound_with(tokens, time_and_wait);
            if beats(best.as_ref(), tier, bound, oldest_at, seq) {
                by_bound.push(Bounded { tier, bound, oldest_at, seq, item: head() });
            }
        }
        true
    });
    while let Some(group) = by_bound.pop() {
        if !beats(best.as_ref(), tier, group.bound, oldest_at, seq) {
            break; // every group left bounds no higher
        }
        walk_group(index, context, &group, ages, best);
    }
    *groups = by_bound.into_vec();
}

/// Scores the run heads of a group, best processing time first, while they may beat `best`.
fn walk_group(
    index: &impl CandidateIndex,
    context: &SearchContext,
    group: &Bounded<(u32, bool)>,
    ages: &AgeBounds,
    best: &mut Option<Candidate>,
) {
    let (first, single_run) = group.item;
    let (tier, oldest_at, seq) = (group.tier, group.oldest_at, group.seq);
    let mut head = Some(first);
    while let Some(slot) = head {
        // A group shares its estimate: one inadmissible member means all are.
        let Some(candidate) = score_member(index, context, slot) else { break };
        // This run and every later one score at most this head with, in place of its own
        // processing-time and wait factors, the most a member with no better processing time
        // can have (its own wait or an older member's).
        let [_, _, own_wait, _, _, own_time] = candidate.factors;
        let rest = candidate.base - own_wait - own_time + ages.at_most(own_time) + BOUND_SLACK;
        if !beats(best.as_ref(), tier, rest, oldest_at, seq) {
            break;
        }
        if beats(best.as_ref(), candidate.tier, candidate.base, candidate.enqueued_at, candidate.seq) {
            *best = Some(candidate);
        }
        head = if single_run { None } else { index.next_run_head(slot) };
    }
}

/// A stream over a small set of messages scored all at once (the prefetch buffer).
pub struct SortedCandidates {
    sorted: Vec<Candidate>,
    next: usize,
}

impl SortedCandidates {
    /// Scores `messages` (slot, traits, seq) and sorts them best first.
    pub fn new(
        context: &SearchContext,
        messages: impl IntoIterator<Item = (u32, MessageTraits, u64)>,
    ) -> Self {
        let mut sorted: Vec<Candidate> = messages
            .into_iter()
            .filter(|(_, traits, _)| traits.tokens as f64 <= context.max_tokens)
            .map(|(slot, traits, seq)| Candidate::scored(context, slot, &traits, seq))
            .collect();
        sorted.sort_by(|a, b| rank(b.rank_key(), a.rank_key()));
        Self { sorted, next: 0 }
    }
}

impl CandidateStream for SortedCandidates {
    fn next_candidate(&mut self) -> Option<Candidate> {
        let candidate = self.sorted.get(self.next).copied();
        self.next += 1;
        candidate
    }

    fn remaining_bound(&self) -> Option<f64> {
        self.sorted.get(self.next).map(|c| c.base)
    }

    fn remaining_tier(&self) -> Option<u8> {
        self.sorted.get(self.next).map(|c| c.tier)
    }
}

/// A candidate taken from a stream, with the bound of everything the stream still held.
#[derive(Debug, Clone, Copy)]
pub struct Collected {
    /// The candidate.
    pub candidate: Candidate,
    /// Upper bound of the base score of every later candidate of its tier (None if there is
    /// none; minus infinity when every later one is of a lower tier, so cannot beat it).
    pub bound_after: Option<f64>,
}

/// Takes up to `limit` candidates, best first.
pub fn collect(stream: &mut impl CandidateStream, limit: usize) -> Vec<Collected> {
    let mut out = Vec::with_capacity(limit.min(64));
    while out.len() < limit {
        let Some(candidate) = stream.next_candidate() else { break };
        let bound_after = match stream.remaining_tier() {
            Some(tier) if tier < candidate.tier => Some(f64::NEG_INFINITY),
            _ => stream.remaining_bound(),
        };
        out.push(Collected { candidate, bound_after });
    }
    out
}

/// The winner of a selection with its score parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The winning candidate.
    pub candidate: Candidate,
    /// Weighted custom scores, in scorer order.
    pub custom: Vec<f64>,
    /// Base + custom.
    pub total: f64,
}

/// A custom score as the contract counts it: clamped to [0, 1], NaN as 0.
pub fn clamp_custom(score: f64) -> f64 {
    if score.is_nan() {
        0.0
    } else {
        score.clamp(0.0, 1.0)
    }
}

/// Picks the best of `collected` (best-first candidates) once custom scores are added.
/// `evaluate` returns the raw custom scores of a candidate; it is called in order and no more
/// than needed: it stops once no later candidate can beat the best total (exact), or when the
/// collected candidates run out (the `max_candidates_to_evaluate` cap).
pub fn choose<E>(
    collected: &[Collected],
    custom_weights: &[f64],
    mut evaluate: impl FnMut(usize, &Candidate) -> Result<Vec<f64>, E>,
) -> Result<Option<Choice>, E> {
    let custom_total: f64 = custom_weights.iter().sum();
    let mut best: Option<Choice> = None;
    for (i, item) in collected.iter().enumerate() {
        if let Some(best) = &best {
            // A lower tier never beats a higher one, whatever its custom scores.
            if item.candidate.tier < best.candidate.tier {
                break;
            }
            // Every candidate from here on scores at most its base + every custom weight.
            if item.candidate.base + custom_total <= best.total {
                break;
            }
        }
        let custom: Vec<f64> = if custom_weights.is_empty() {
            Vec::new()
        } else {
            let raw = evaluate(i, &item.candidate)?;
            custom_weights.iter().zip(raw).map(|(weight, score)| weight * clamp_custom(score)).collect()
        };
        let total = item.candidate.base + custom.iter().sum::<f64>();
        if best.as_ref().is_none_or(|b| total > b.total) {
            best = Some(Choice { candidate: item.candidate, custom, total });
        }
        if custom_weights.is_empty() {
            break;
        }
        let best_total = best.as_ref().map_or(f64::NEG_INFINITY, |b| b.total);
        if item.bound_after.is_none_or(|bound| bound + custom_total <= best_total) {
            break;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests;
