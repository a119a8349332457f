//! The `fair_priority` policy: URGENT first, then the tenant with the least recent token use
//! per weight, then priority, deadline and age inside a tenant, with aging.
//!
//! The ranking, as a total order of the visible messages at an instant `now`:
//! 1. With `urgent_first`, every URGENT message comes first, oldest first.
//! 2. Then tenants, by their token use over the last `fairness_window` seconds divided by their
//!    weight ([`UsageLedger`]), ties to the tenant whose head (its first message by rule 3) is
//!    older.
//! 3. Inside a tenant: effective priority (a NORMAL or LOW message that has waited longer than
//!    `max_wait[priority]` ranks as HIGH, never as URGENT), then the earliest deadline (none
//!    last), then the oldest.
//!
//! The winner is the first message of that order. Holding the budget for it, and the reserve a
//! backlogged tenant may not take (rule 3b of the contract), are decided by the caller with
//! [`FairLanes::admission_tokens`]. A tenant is backlogged when it has more than one visible
//! message and has used at least its fair share of the window's capacity (the tokens the
//! limiter refills over `fairness_window`, split by weight among the tenants that are waiting
//! or have used tokens in the window): a light tenant with two or three requests queued goes
//! at once like a lone one, which is what the reserve is kept for.
//!
//! [`FairLanes`] keeps the visible messages in that order as a [`Ranking`] beside the store's
//! candidate index: an URGENT lane, and per tenant one lane per priority keyed by (deadline,
//! sequence). Aging is a timer, not a scan: each NORMAL or LOW message has an instant at which
//! it moves to its tenant's HIGH lane, kept in one ordered set; a selection first moves the due
//! ones (each message moves at most once per visibility). A selection costs O(log n) plus one
//! step per tenant with waiting messages.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::index::{IndexEntry, Ranking, PRIORITIES};
use crate::store::OrdTime;

const URGENT: u8 = 0;
const HIGH: u8 = 1;

/// Settings of the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Share weight per interned tenant; tenants not listed weigh 1.
    pub weights: HashMap<u32, f64>,
    /// Seconds of token use that rank tenants.
    pub fairness_window: f64,
    /// Whether URGENT messages of every tenant go ahead of fairness.
    pub urgent_first: bool,
    /// Seconds after which a message of each priority ranks as HIGH (URGENT and HIGH: never).
    pub max_wait: [f64; PRIORITIES],
}

impl Default for FairConfig {
    fn default() -> Self {
        Self {
            weights: HashMap::new(),
            fairness_window: 60.0,
            urgent_first: true,
            max_wait: [f64::INFINITY, f64::INFINITY, 300.0, 900.0],
        }
    }
}

impl FairConfig {
    /// The weight of `tenant`.
    pub fn weight(&self, tenant: u32) -> f64 {
        self.weights.get(&tenant).copied().unwrap_or(1.0)
    }
}

/// Token use per tenant over a sliding window: each dispatch charges its estimate, and a mark
/// corrects that charge to the actual count (or takes it back) while it is in the window.
#[derive(Debug, Default, Clone)]
pub struct UsageLedger {
    window: f64,
    next_charge: u64,
    tenants: HashMap<u32, TenantUsage>,
}

#[derive(Debug, Default, Clone)]
struct TenantUsage {
    /// `(instant, tokens, charge id)`, oldest first; ids increase.
    charges: VecDeque<(f64, f64, u64)>,
    sum: f64,
}

impl TenantUsage {
    fn expire(&mut self, horizon: f64) {
        while self.charges.front().is_some_and(|&(at, _, _)| at <= horizon) {
            if let Some((_, tokens, _)) = self.charges.pop_front() {
                self.sum -= tokens;
            }
        }
        if self.charges.is_empty() {
            // Float dust from the subtractions must not outlive the charges.
            self.sum = 0.0;
        }
    }
}

impl UsageLedger {
    /// A ledger over the last `window` seconds.
    pub fn new(window: f64) -> Self {
        Self { window, next_charge: 1, tenants: HashMap::new() }
    }

    /// Charges `tokens` to `tenant` at `now`; returns the charge's id for corrections.
    pub fn charge(&mut self, tenant: u32, now: f64, tokens: f64) -> u64 {
        let id = self.next_charge;
        self.next_charge += 1;
        let usage = self.tenants.entry(tenant).or_default();
        // Clamped so the deque stays in time order even if the clock steps back.
        let at = usage.charges.back().map_or(now, |&(last, _, _)| now.max(last));
        usage.charges.push_back((at, tokens, id));
        usage.sum += tokens;
        id
    }

    /// Sets charge `id` of `tenant` to `tokens` (the actual count, or 0 to take it back), if it
    /// is still in the window.
    pub fn correct(&mut self, tenant: u32, id: u64, tokens: f64) {
        let Some(usage) = self.tenants.get_mut(&tenant) else { return };
        if let Ok(i) = usage.charges.binary_search_by_key(&id, |&(_, _, charge)| charge) {
            let charge = &mut usage.charges[i];
            usage.sum += tokens - charge.1;
            charge.1 = tokens;
        }
    }

    /// Tokens charged to `tenant` over the window ending at `now`.
    pub fn usage(&mut self, tenant: u32, now: f64) -> f64 {
        let horizon = now - self.window;
        self.tenants.get_mut(&tenant).map_or(0.0, |usage| {
            usage.expire(horizon);
            usage.sum.max(0.0)
        })
    }

    /// Every tenant with charges in the window ending at `now`, with its use.
    pub fn usages(&mut self, now: f64) -> Vec<(u32, f64)> {
        let horizon = now - self.window;
        self.tenants.retain(|_, usage| {
            usage.expire(horizon);
            !usage.charges.is_empty()
        });
        self.tenants.iter().map(|(&tenant, usage)| (tenant, usage.sum.max(0.0))).collect()
    }
}

/// What a fair dispatcher keeps between dispatches: the tenants' token use, and what sizes the
/// automatic reserve.
#[derive(Debug, Clone)]
pub struct FairRuntime {
    /// Token use per tenant over the fairness window.
    pub ledger: UsageLedger,
    /// The reserve a backlogged tenant may not take; None: automatic (see `reserve`).
    pub reserve_tokens: Option<f64>,
    /// The last estimates dispatched, oldest first, with their sequence numbers.
    recent: VecDeque<(u64, u64)>,
    /// The sliding maximum of `recent`: decreasing estimates, each the largest from its
    /// position on (a monotonic queue: O(1) amortized per dispatch).
    maxima: VecDeque<(u64, u64)>,
    dispatched: u64,
}

/// Estimates the automatic reserve is sized from.
const RECENT_ESTIMATES: usize = 256;

impl FairRuntime {
    /// A runtime for `config`, with a fixed reserve or (None) the automatic one.
    pub fn new(config: &FairConfig, reserve_tokens: Option<f64>) -> Self {
        Self {
            ledger: UsageLedger::new(config.fairness_window),
            reserve_tokens,
            recent: VecDeque::new(),
            maxima: VecDeque::new(),
            dispatched: 0,
        }
    }

    /// The reserve for a bucket of `capacity` tokens. Automatic: one and a half times the
    /// largest estimate among the last 256 dispatched requests — room for any typical request
    /// arriving alone or URGENT, and for the next one after it — at most a tenth of the
    /// capacity; 1 % of the capacity before the first dispatch. (Measured with `llmqd simulate
    /// --preset overload`: once the largest estimate, light tenants' p99 wait stayed above
    /// 0.5 s after an URGENT request drained the reserve; twice it cost utilisation.)
    pub fn reserve(&self, capacity: f64) -> f64 {
        if let Some(reserve) = self.reserve_tokens {
            return reserve;
        }
        match self.maxima.front() {
            None => 0.01 * capacity,
            Some(&(largest, _)) => (1.5 * largest as f64).min(0.1 * capacity),
        }
    }

    /// Charges a dispatch of `tokens` to `tenant`; returns the charge's id.
    pub fn charge(&mut self, tenant: u32, now: f64, tokens: u64) -> u64 {
        let seq = self.dispatched;
        self.dispatched += 1;
        self.recent.push_back((tokens, seq));
        while self.maxima.back().is_some_and(|&(largest, _)| largest <= tokens) {
            self.maxima.pop_back();
        }
        self.maxima.push_back((tokens, seq));
        if self.recent.len() > RECENT_ESTIMATES {
            if let Some((_, old)) = self.recent.pop_front() {
                if self.maxima.front().is_some_and(|&(_, front)| front == old) {
                    self.maxima.pop_front();
                }
            }
        }
        self.ledger.charge(tenant, now, tokens as f64)
    }
}

/// A lane's key: deadline (infinity for none), then sequence number; and the slot.
type LaneKey = (OrdTime, u64, u32);

fn lane_key(slot: u32, entry: &IndexEntry) -> LaneKey {
    let deadline = if entry.deadline.is_nan() { f64::INFINITY } else { entry.deadline };
    (OrdTime(deadline), entry.seq, slot)
}

#[derive(Debug, Default, Clone)]
struct TenantLanes {
    lanes: [BTreeSet<LaneKey>; PRIORITIES],
}

impl TenantLanes {
    /// The tenant's first message: its key and lane.
    fn head(&self) -> Option<(LaneKey, usize)> {
        self.lanes.iter().enumerate().find_map(|(p, lane)| lane.first().map(|&key| (key, p)))
    }

    fn len(&self) -> usize {
        self.lanes.iter().map(BTreeSet::len).sum()
    }
}

/// Whether a candidate can be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Now.
    Now,
    /// Not now, but once the budget refills.
    Later,
    /// Never: it needs more than the limiter can ever hold.
    Never,
}

impl Fit {
    /// `Now` or `Later`.
    pub fn from_allowed(allowed: bool) -> Self {
        if allowed {
            Self::Now
        } else {
            Self::Later
        }
    }
}

/// Where the winner of a selection came from, for the dispatcher's `reason`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FairRank {
    /// Ahead of fairness: an URGENT message (oldest first).
    Urgent,
    /// The head of the tenant ranked `rank` (1 = least recent use) of `of` tenants waiting.
    Tenant {
        /// 1-based rank of the tenant.
        rank: usize,
        /// Tenants with waiting messages.
        of: usize,
        /// Its token use over the window.
        usage: f64,
        /// The message's lane: its effective priority.
        effective_priority: u8,
    },
}

/// A candidate of the fair order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairCandidate {
    /// Slot in the store.
    pub slot: u32,
    /// Its tenant.
    pub tenant: u32,
    /// Whether its tenant is backlogged: other visible messages, and at least its fair share of
    /// the window's capacity used (such a tenant may not take the reserve).
    pub backlogged: bool,
    /// Why it ranks where it does.
    pub rank: FairRank,
}

/// The visible messages in the fair order (see the module docs).
#[derive(Debug, Clone)]
pub struct FairLanes {
    config: FairConfig,
    urgent: BTreeSet<(u64, u32)>,
    tenants: HashMap<u32, TenantLanes>,
    /// `(instant it ranks as HIGH, seq, slot)` of NORMAL and LOW messages not yet moved.
    aging: BTreeSet<(OrdTime, u64, u32)>,
    /// `(tenant, priority, lane key)` of every visible message, for aging and removal.
    placed: HashMap<u32, (u32, u8, LaneKey)>,
    /// Visible messages per tenant (URGENT ones included).
    visible: HashMap<u32, usize>,
}

impl FairLanes {
    /// Empty lanes under `config`.
    pub fn new(config: FairConfig) -> Self {
        Self {
            config,
            urgent: BTreeSet::new(),
            tenants: HashMap::new(),
            aging: BTreeSet::new(),
            placed: HashMap::new(),
            visible: HashMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &FairConfig {
        &self.config
    }

    fn ages_at(&self, entry: &IndexEntry) -> Option<f64> {
        let priority = entry.cell.priority;
        (priority > HIGH)
            .then(|| entry.enqueued_at + self.config.max_wait[usize::from(priority)])
            .filter(|t| t.is_finite())
    }

    /// Moves every message that has waited past its `max_wait` by `now` to its tenant's HIGH
    /// lane. Waited *longer than* `max_wait`: at exactly `max_wait` it has not.
    pub fn age(&mut self, now: f64) {
        while let Some(&(OrdTime(due), seq, slot)) = self.aging.first() {
            if due >= now {
                break;
            }
            self.aging.pop_first();
            let Some(&(tenant, priority, key)) = self.placed.get(&slot) else { continue };
            debug_assert_eq!(key.1, seq);
            if let Some(lanes) = self.tenants.get_mut(&tenant) {
                if lanes.lanes[usize::from(priority)].remove(&key) {
                    lanes.lanes[usize::from(HIGH)].insert(key);
                }
            }
        }
    }

    /// The winner at `now` (call `age(now)` first): the first message of the fair order, with
    /// `usage` giving each tenant's use over the window and `fits` telling whether a candidate
    /// may be admitted now. With `hold`, the first message and whether it fits (the caller
    /// waits for it when it does not: nothing ranked below it may go); without, the first that
    /// fits. O(log n + tenants) with `hold`; without, it walks the order up to the first fit.
    pub fn select(
        &self,
        usage: &mut impl FnMut(u32) -> f64,
        share_per_weight: f64,
        hold: bool,
        fits: &mut impl FnMut(&FairCandidate) -> Fit,
    ) -> Option<(FairCandidate, bool)> {
        let mut consider = |candidate: FairCandidate| -> Option<Option<(FairCandidate, bool)>> {
            match fits(&candidate) {
                Fit::Now => Some(Some((candidate, true))),
                Fit::Later if hold => Some(Some((candidate, false))),
                // Never fits (larger than the bucket): it cannot hold the others back.
                Fit::Later | Fit::Never => None,
            }
        };
        let ranked = self.ranked_tenants(usage);
        let of = ranked.len();
        if self.config.urgent_first {
            for &(_, slot) in &self.urgent {
                let tenant = self.placed.get(&slot).map_or(0, |p| p.0);
                let backlogged = self.visible_of(tenant) > 1;
                if let Some(decision) =
                    consider(FairCandidate { slot, tenant, backlogged, rank: FairRank::Urgent })
                {
                    return decision;
                }
            }
        }
        for (position, &(share, _, tenant, usage)) in ranked.iter().enumerate() {
            let lanes = &self.tenants[&tenant];
            // A light tenant's few queued requests are no backlog to hold the reserve back from.
            let backlogged = self.visible_of(tenant) > 1 && share >= share_per_weight;
            for (priority, lane) in lanes.lanes.iter().enumerate() {
                // An URGENT message finds budget at once whatever its rank (rule 3b): without
                // `urgent_first` it sits in its tenant's first lane, which holds nothing else
                // (aging never ranks a message as URGENT).
                let backlogged = backlogged && priority != URGENT as usize;
                for &(_, _, slot) in lane {
                    let rank = FairRank::Tenant {
                        rank: position + 1,
                        of,
                        usage,
                        effective_priority: priority as u8,
                    };
                    if let Some(decision) = consider(FairCandidate { slot, tenant, backlogged, rank }) {
                        return decision;
                    }
                }
            }
        }
        None
    }

    /// Tenants with messages in their lanes, in fair order: `(use per weight, head seq,
    /// tenant, use)`.
    fn ranked_tenants(&self, usage: &mut impl FnMut(u32) -> f64) -> Vec<(f64, u64, u32, f64)> {
        let mut ranked: Vec<(f64, u64, u32, f64)> = self
            .tenants
            .iter()
            .filter_map(|(&tenant, lanes)| {
                let (key, _) = lanes.head()?;
                let used = usage(tenant);
                Some((used / self.config.weight(tenant), key.1, tenant, used))
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        ranked
    }

    /// Tenants with visible messages.
    pub fn waiting_tenants(&self) -> impl Iterator<Item = u32> + '_ {
        self.visible.keys().copied()
    }

    /// Visible messages of `tenant` (its lanes and, with `urgent_first`, its URGENT ones).
    pub fn visible_of(&self, tenant: u32) -> usize {
        self.visible.get(&tenant).copied().unwrap_or(0)
    }

    /// Tokens a candidate of `tokens` must find in the bucket (on top of the limiter's own
    /// rule): its estimate, plus `reserve` when its tenant has a backlog and it is not URGENT
    /// (rule 3b; `backlogged` is false for an URGENT candidate), at most `capacity`.
    pub fn admission_tokens(candidate: &FairCandidate, tokens: u64, reserve: f64, capacity: f64) -> f64 {
        let tokens = tokens as f64;
        if candidate.backlogged && candidate.rank != FairRank::Urgent {
            (tokens + reserve).min(capacity.max(tokens))
        } else {
            tokens
        }
    }
}

impl Ranking for FairLanes {
    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        let priority = entry.cell.priority;
        let key = lane_key(slot, entry);
        self.placed.insert(slot, (entry.tenant, priority, key));
        *self.visible.entry(entry.tenant).or_default() += 1;
        if priority == URGENT && self.config.urgent_first {
            self.urgent.insert((entry.seq, slot));
            return;
        }
        let lanes = self.tenants.entry(entry.tenant).or_default();
        lanes.lanes[usize::from(priority)].insert(key);
        if let Some(due) = self.ages_at(entry) {
            self.aging.insert((OrdTime(due), entry.seq, slot));
        }
    }

    fn remove(&mut self, slot: u32, entry: &IndexEntry) {
        self.placed.remove(&slot);
        if let Some(count) = self.visible.get_mut(&entry.tenant) {
            *count -= 1;
            if *count == 0 {
                self.visible.remove(&entry.tenant);
            }
        }
        let priority = entry.cell.priority;
        if priority == URGENT && self.config.urgent_first {
            self.urgent.remove(&(entry.seq, slot));
            return;
        }
        let key = lane_key(slot, entry);
        if let Some(lanes) = self.tenants.get_mut(&entry.tenant) {
            if !lanes.lanes[usize::from(priority)].remove(&key) {
                lanes.lanes[usize::from(HIGH)].remove(&key);
            }
            if lanes.len() == 0 {
                self.tenants.remove(&entry.tenant);
            }
        }
        if let Some(due) = self.ages_at(entry) {
            self.aging.remove(&(OrdTime(due), entry.seq, slot));
        }
    }

    fn clear(&mut self) {
        self.urgent.clear();
        self.tenants.clear();
        self.aging.clear();
        self.placed.clear();
        self.visible.clear();
    }
}

#[cfg(test)]
mod tests;
