//! The `fair_priority` policy: URGENT first, then the tenant with the least recent token use
//! per weight, then priority, deadline and age inside a tenant, with aging that never lets old
//! NORMAL and LOW requests overtake fresh HIGH ones.
//!
//! The ranking, as a total order of the visible messages at an instant `now`:
//! 1. With `urgent_first`, every URGENT message comes first, oldest first.
//! 2. Then tenants, by their token use over the last `fairness_window` seconds divided by their
//!    weight ([`UsageLedger`]); ties (tenants that used alike, typically nothing) go to the
//!    tenant whose head (its first message by rule 3) is in the higher lane, then is older. So
//!    a tenant below its fair share is never queued behind another tenant's higher classes, and
//!    among tenants that used alike, such as conversations that each send a few requests, a
//!    HIGH request goes before a NORMAL one.
//! 3. Inside a tenant, by lane: URGENT (only without `urgent_first`), HIGH, aged, NORMAL, LOW;
//!    in a lane, the earliest deadline (none last), then the oldest. A NORMAL or LOW message
//!    that has waited longer than `max_wait[priority]` moves to the aged lane: it ranks as HIGH,
//!    behind every native HIGH message of its tenant, and ahead of NORMAL and LOW ones. Aging
//!    never ranks a message as URGENT.
//!
//! The winner is the first message of that order. Holding the budget for it, and the reserves
//! it must leave in the bucket, are decided by the caller with [`FairLanes::admission_tokens`]:
//! every non-URGENT message leaves the URGENT reserve (`policy::UrgentReserve`), and one of a
//! backlogged tenant also the tenant reserve ([`FairRuntime::reserve`]). A tenant is
//! backlogged when another tenant is active (waiting, or with use in the window: the tenant
//! reserve is for them), it has more than one visible message, and it has used at least its
//! fair share of the window's capacity (the tokens the limiter refills over `fairness_window`,
//! split by weight among the tenants that are waiting or have used tokens in the window): a
//! light tenant with two or three requests queued goes at once like a lone one.
//!
//! [`FairLanes`] keeps the visible messages in that order beside the store's candidate index:
//! an URGENT lane, per tenant five lanes keyed by (deadline, sequence), and the tenants with
//! lane messages in an ordered set by their key of rule 2, so the first tenant is found in
//! O(log tenants). The lanes keep a copy of each tenant's token use, brought up to date from
//! the ledger before each selection ([`FairLanes::prepare`]): the ledger reports which tenants'
//! use changed (a charge, a correction, a charge leaving the window), each moved in the set in
//! O(log tenants). The tenants' total weight (for the fair share) is kept as they start and
//! stop being active. Aging is a timer, not a scan: each NORMAL or LOW message has an instant at
//! which it moves to the aged lane, kept in one ordered set. A selection with `hold` costs
//! O(log n + log tenants) plus the changes since the last one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::index::{IndexEntry, Ranking, PRIORITIES};
use crate::policy::RecentMax;
use crate::store::OrdTime;

const URGENT: u8 = 0;
const HIGH: u8 = 1;

/// Lanes of a tenant: URGENT (without `urgent_first`), HIGH, aged, NORMAL, LOW.
pub const LANES: usize = 5;
const AGED_LANE: usize = 2;

/// The lane of a message of `priority` that has not aged.
fn native_lane(priority: u8) -> usize {
    match priority {
        0 => 0,
        1 => 1,
        2 => 3,
        _ => 4,
    }
}

/// The priority a lane ranks as: the aged lane as HIGH (behind native HIGH).
pub fn lane_priority(lane: usize) -> u8 {
    [0, 1, 1, 2, 3][lane.min(LANES - 1)]
}

/// Settings of the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Share weight per interned tenant; tenants not listed weigh 1.
    pub weights: HashMap<u32, f64>,
    /// Seconds of token use that rank tenants.
    pub fairness_window: f64,
    /// Whether URGENT messages of every tenant go ahead of fairness.
    pub urgent_first: bool,
    /// Seconds after which a message of each priority moves to the aged lane (URGENT and HIGH:
    /// never).
    pub max_wait: [f64; PRIORITIES],
    /// Tokens every non-URGENT dispatch leaves for URGENT ones while `urgent_first`; None:
    /// automatic (`policy::UrgentReserve`).
    pub urgent_reserve: Option<f64>,
}

impl Default for FairConfig {
    fn default() -> Self {
        Self {
            weights: HashMap::new(),
            fairness_window: 60.0,
            urgent_first: true,
            max_wait: [f64::INFINITY, f64::INFINITY, 300.0, 900.0],
            urgent_reserve: None,
        }
    }
}

impl FairConfig {
    /// The weight of `tenant`.
    pub fn weight(&self, tenant: u32) -> f64 {
        self.weights.get(&tenant).copied().unwrap_or(1.0)
    }
}

/// One dispatch's charge: when, to whom, how many tokens, and its id.
#[derive(Debug, Clone, Copy)]
struct Charge {
    at: f64,
    tenant: u32,
    tokens: f64,
    id: u64,
}

/// Token use per tenant over a sliding window: each dispatch charges its estimate, and a mark
/// corrects that charge to the actual count (or takes it back) while it is in the window.
///
/// Charges sit in one queue in time order, so expiring them costs O(1) each; each tenant keeps
/// the sum of its charges (token counts are whole numbers, so the sums are exact) and is
/// forgotten with its last charge. The tenants whose use changed are reported by
/// [`UsageLedger::take_changed`], for the fair lanes to follow.
#[derive(Debug, Default, Clone)]
pub struct UsageLedger {
    window: f64,
    next_charge: u64,
    charges: VecDeque<Charge>,
    /// `(sum, count)` of each tenant's charges in the queue.
    tenants: HashMap<u32, (f64, usize)>,
    changed: Vec<u32>,
}

impl UsageLedger {
    /// A ledger over the last `window` seconds.
    pub fn new(window: f64) -> Self {
        Self { window, next_charge: 1, ..Self::default() }
    }

    /// Charges `tokens` to `tenant` at `now`; returns the charge's id for corrections.
    pub fn charge(&mut self, tenant: u32, now: f64, tokens: f64) -> u64 {
        let id = self.next_charge;
        self.next_charge += 1;
        // Clamped so the queue stays in time order even if the clock steps back.
        let at = self.charges.back().map_or(now, |last| now.max(last.at));
        self.charges.push_back(Charge { at, tenant, tokens, id });
        let sum = self.tenants.entry(tenant).or_default();
        sum.0 += tokens;
        sum.1 += 1;
        self.changed.push(tenant);
        id
    }

    /// Sets charge `id` to `tokens` (the actual count, or 0 to take it back), if it is still
    /// in the window. (`_tenant` is the tenant it was charged to; the charge knows it.)
    pub fn correct(&mut self, _tenant: u32, id: u64, tokens: f64) {
        if let Ok(i) = self.charges.binary_search_by_key(&id, |c| c.id) {
            let charge = &mut self.charges[i];
            let delta = tokens - charge.tokens;
            charge.tokens = tokens;
            let tenant = charge.tenant;
            if let Some(sum) = self.tenants.get_mut(&tenant) {
                sum.0 += delta;
            }
            self.changed.push(tenant);
        }
    }

    /// Drops the charges that have left the window ending at `now` (a charge at `t` counts
    /// while `now - window < t`).
    pub fn expire(&mut self, now: f64) {
        let horizon = now - self.window;
        while self.charges.front().is_some_and(|c| c.at <= horizon) {
            let Some(charge) = self.charges.pop_front() else { break };
            if let Some(sum) = self.tenants.get_mut(&charge.tenant) {
                sum.0 -= charge.tokens;
                sum.1 -= 1;
                if sum.1 == 0 {
                    self.tenants.remove(&charge.tenant);
                }
            }
            self.changed.push(charge.tenant);
        }
        if self.charges.len() * 4 < self.charges.capacity() && self.charges.capacity() > 64 {
            self.charges.shrink_to_fit();
            self.tenants.shrink_to_fit();
        }
    }

    /// Tokens charged to `tenant` over the window as of the last expiry.
    pub fn current(&self, tenant: u32) -> f64 {
        self.tenants.get(&tenant).map_or(0.0, |&(sum, _)| sum.max(0.0))
    }

    /// Tokens charged to `tenant` over the window ending at `now`.
    pub fn usage(&mut self, tenant: u32, now: f64) -> f64 {
        self.expire(now);
        self.current(tenant)
    }

    /// Every tenant with charges in the window ending at `now`, with its use.
    pub fn usages(&mut self, now: f64) -> Vec<(u32, f64)> {
        self.expire(now);
        self.tenants.iter().map(|(&tenant, &(sum, _))| (tenant, sum.max(0.0))).collect()
    }

    /// The tenants whose use changed since the last call (in no order, maybe repeated).
    pub fn take_changed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.changed)
    }
}

/// What a fair dispatcher keeps between dispatches: the tenants' token use, and what sizes the
/// automatic tenant reserve.
#[derive(Debug, Clone)]
pub struct FairRuntime {
    /// Token use per tenant over the fairness window.
    pub ledger: UsageLedger,
    /// The reserve a backlogged tenant may not take; None: automatic (see `reserve`).
    pub reserve_tokens: Option<f64>,
    /// The largest of the last estimates dispatched.
    recent: RecentMax,
}

/// Estimates the automatic tenant reserve is sized from.
const RECENT_ESTIMATES: usize = 256;

impl FairRuntime {
    /// A runtime for `config`, with a fixed tenant reserve or (None) the automatic one.
    pub fn new(config: &FairConfig, reserve_tokens: Option<f64>) -> Self {
        Self {
            ledger: UsageLedger::new(config.fairness_window),
            reserve_tokens,
            recent: RecentMax::new(RECENT_ESTIMATES),
        }
    }

    /// The tenant reserve for a bucket of `capacity` tokens. Automatic: one and a half times
    /// the largest estimate among the last 256 dispatched requests — room for any typical
    /// request of a light tenant arriving alone, and for the next one after it — at most a
    /// tenth of the capacity; 1 % of the capacity before the first dispatch. (Measured with
    /// `llmqd simulate --preset overload`: once the largest estimate, light tenants' p99 wait
    /// stayed above 0.5 s after an URGENT request drained the reserve; twice it cost
    /// utilisation.)
    pub fn reserve(&self, capacity: f64) -> f64 {
        if let Some(reserve) = self.reserve_tokens {
            return reserve;
        }
        match self.recent.max() {
            None => 0.01 * capacity,
            Some(largest) => (1.5 * largest as f64).min(0.1 * capacity),
        }
    }

    /// Charges a dispatch of `tokens` to `tenant`; returns the charge's id.
    pub fn charge(&mut self, tenant: u32, now: f64, tokens: u64) -> u64 {
        self.recent.push(tokens);
        self.ledger.charge(tenant, now, tokens as f64)
    }
}

/// A lane's key: deadline (infinity for none), then sequence number; and the slot.
type LaneKey = (OrdTime, u64, u32);

fn lane_key(slot: u32, entry: &IndexEntry) -> LaneKey {
    let deadline = if entry.deadline.is_nan() { f64::INFINITY } else { entry.deadline };
    (OrdTime(deadline), entry.seq, slot)
}

/// A tenant's place in the order of rule 2: use per weight, its head's lane and sequence
/// number, the tenant.
type TenantKey = (OrdTime, u8, u64, u32);

#[derive(Debug, Default, Clone)]
struct TenantLanes {
    lanes: [BTreeSet<LaneKey>; LANES],
    /// Its key in `FairLanes::order`.
    key: Option<TenantKey>,
}

impl TenantLanes {
    /// The tenant's first message: its key and lane.
    fn head(&self) -> Option<(LaneKey, usize)> {
        self.lanes.iter().enumerate().find_map(|(lane, keys)| keys.first().map(|&key| (key, lane)))
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
        /// The priority its lane ranks as (the aged lane: HIGH).
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
    /// Whether it is URGENT: it leaves no reserve, whatever its rank.
    pub urgent: bool,
    /// Whether its tenant is backlogged: another tenant active, other visible messages, and at
    /// least its fair share of the window's capacity used (such a tenant leaves the tenant
    /// reserve too).
    pub backlogged: bool,
    /// Why it ranks where it does.
    pub rank: FairRank,
}

/// Where a visible message sits.
#[derive(Debug, Clone, Copy)]
struct Placed {
    tenant: u32,
    /// Its lane (`LANES` for the URGENT lane ahead of fairness).
    lane: usize,
    key: LaneKey,
}

/// The total weight of the active tenants (waiting, or with use in the window): unweighted ones
/// counted, weighted ones summed in tenant order (so the sum does not depend on history).
#[derive(Debug, Default, Clone)]
struct ActiveWeight {
    unweighted: usize,
    weighted: BTreeMap<u32, f64>,
    weighted_sum: f64,
}

impl ActiveWeight {
    fn set(&mut self, config: &FairConfig, tenant: u32, active: bool) {
        match config.weights.get(&tenant) {
            None if active => self.unweighted += 1,
            None => self.unweighted = self.unweighted.saturating_sub(1),
            Some(&weight) => {
                if active {
                    self.weighted.insert(tenant, weight);
                } else {
                    self.weighted.remove(&tenant);
                }
                self.weighted_sum = self.weighted.values().sum();
            }
        }
    }

    fn total(&self) -> f64 {
        self.unweighted as f64 + self.weighted_sum
    }

    fn count(&self) -> usize {
        self.unweighted + self.weighted.len()
    }
}

/// The visible messages in the fair order (see the module docs).
#[derive(Debug, Clone)]
pub struct FairLanes {
    config: FairConfig,
    urgent: BTreeSet<(u64, u32)>,
    tenants: HashMap<u32, TenantLanes>,
    /// Tenants with lane messages, in the order of rule 2.
    order: BTreeSet<TenantKey>,
    /// `(instant it moves to the aged lane, seq, slot)` of NORMAL and LOW messages not yet moved.
    aging: BTreeSet<(OrdTime, u64, u32)>,
    placed: HashMap<u32, Placed>,
    /// Visible messages per tenant (URGENT ones included).
    visible: HashMap<u32, usize>,
    /// Each tenant's token use over the window, as of the last `prepare` (absent: none).
    usage: HashMap<u32, f64>,
    active: ActiveWeight,
}

impl FairLanes {
    /// Empty lanes under `config`.
    pub fn new(config: FairConfig) -> Self {
        Self {
            config,
            urgent: BTreeSet::new(),
            tenants: HashMap::new(),
            order: BTreeSet::new(),
            aging: BTreeSet::new(),
            placed: HashMap::new(),
            visible: HashMap::new(),
            usage: HashMap::new(),
            active: ActiveWeight::default(),
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

    fn is_active(&self, tenant: u32) -> bool {
        self.visible.contains_key(&tenant) || self.usage.contains_key(&tenant)
    }

    /// Runs `change`, keeping the active weight in step with whether `tenant` is active.
    fn tracking_active<R>(&mut self, tenant: u32, change: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.is_active(tenant);
        let result = change(self);
        let after = self.is_active(tenant);
        if before != after {
            self.active.set(&self.config, tenant, after);
        }
        result
    }

    /// Puts `tenant` at its place in the order (out of it when it has no lane message).
    fn refresh(&mut self, tenant: u32) {
        let used = self.usage.get(&tenant).copied().unwrap_or(0.0);
        let per_weight = used / self.config.weight(tenant);
        let Some(lanes) = self.tenants.get_mut(&tenant) else { return };
        let key = lanes.head().map(|(head, lane)| (OrdTime(per_weight), lane as u8, head.1, tenant));
        if key == lanes.key {
            return;
        }
        if let Some(old) = lanes.key.take() {
            self.order.remove(&old);
        }
        if let Some(new) = key {
            self.order.insert(new);
            lanes.key = Some(new);
        } else {
            self.tenants.remove(&tenant);
        }
    }

    /// Sets `tenant`'s token use over the window.
    pub fn set_usage(&mut self, tenant: u32, used: f64) {
        self.tracking_active(tenant, |lanes| {
            if used > 0.0 {
                lanes.usage.insert(tenant, used);
            } else {
                lanes.usage.remove(&tenant);
            }
        });
        self.refresh(tenant);
    }

    /// Brings the lanes to `now`: expires the ledger's charges, takes the tenants' use from it,
    /// and moves every message due to the aged lane. Call before `select`.
    pub fn prepare(&mut self, now: f64, ledger: &mut UsageLedger) {
        ledger.expire(now);
        let mut changed = ledger.take_changed();
        changed.sort_unstable();
        changed.dedup();
        for tenant in changed {
            self.set_usage(tenant, ledger.current(tenant));
        }
        self.age(now);
        if self.usage.len() * 4 < self.usage.capacity() && self.usage.capacity() > 64 {
            self.usage.shrink_to_fit();
        }
    }

    /// `prepare` for lanes built afresh (the prefetch buffer's, per step): every tenant's use
    /// is taken from the ledger, not only those that changed.
    pub fn prepare_all(&mut self, now: f64, ledger: &mut UsageLedger) {
        for (tenant, used) in ledger.usages(now) {
            self.set_usage(tenant, used);
        }
        ledger.take_changed();
        self.age(now);
    }

    /// Moves every message that has waited past its `max_wait` by `now` to its tenant's aged
    /// lane. Waited *longer than* `max_wait`: at exactly `max_wait` it has not.
    pub fn age(&mut self, now: f64) {
        while let Some(&(OrdTime(due), seq, slot)) = self.aging.first() {
            if due >= now {
                break;
            }
            self.aging.pop_first();
            let Some(placed) = self.placed.get_mut(&slot) else { continue };
            debug_assert_eq!(placed.key.1, seq);
            let (tenant, lane, key) = (placed.tenant, placed.lane, placed.key);
            placed.lane = AGED_LANE;
            if let Some(lanes) = self.tenants.get_mut(&tenant) {
                if lanes.lanes[lane].remove(&key) {
                    lanes.lanes[AGED_LANE].insert(key);
                }
            }
            self.refresh(tenant);
        }
    }

    /// Tokens per unit of weight a tenant may use over the fairness window before it counts as
    /// backlogged: what a limiter refilling `refill_rate` tokens a second refills over the
    /// window, split by weight among the tenants that are waiting or have used tokens in it.
    pub fn share_per_weight(&self, refill_rate: f64) -> f64 {
        let total = self.active.total();
        if total > 0.0 {
            // Rounded down a hair: a tenant that used exactly its share counts as having used it.
            refill_rate * self.config.fairness_window / total * (1.0 - 1e-9)
        } else {
            f64::INFINITY
        }
    }

    /// The winner (call `prepare(now, ..)` first): the first message of the fair order, with
    /// `fits` telling whether a candidate may be admitted now. With `hold`, the first message
    /// that can ever fit and whether it fits now (the caller waits for it when it does not:
    /// nothing ranked below it may go); without, the first that fits now. O(log n + log
    /// tenants) with `hold`; without, it walks the order up to the first fit.
    pub fn select(
        &self,
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
        if self.config.urgent_first {
            for &(_, slot) in &self.urgent {
                let tenant = self.placed.get(&slot).map_or(0, |p| p.tenant);
                let candidate =
                    FairCandidate { slot, tenant, urgent: true, backlogged: false, rank: FairRank::Urgent };
                if let Some(decision) = consider(candidate) {
                    return decision;
                }
            }
        }
        let of = self.order.len();
        // The tenant reserve is for other tenants: with none active, nobody needs it.
        let others = self.active.count() > 1;
        for (position, &(OrdTime(per_weight), _, _, tenant)) in self.order.iter().enumerate() {
            let lanes = &self.tenants[&tenant];
            // A light tenant's few queued requests are no backlog to hold the reserve back from.
            let backlogged = others && self.visible_of(tenant) > 1 && per_weight >= share_per_weight;
            let usage = self.usage.get(&tenant).copied().unwrap_or(0.0);
            for (lane, keys) in lanes.lanes.iter().enumerate() {
                let effective_priority = lane_priority(lane);
                let rank = FairRank::Tenant { rank: position + 1, of, usage, effective_priority };
                // Without `urgent_first` an URGENT message sits in its tenant's first lane, which
                // holds nothing else, and still leaves no reserve.
                let urgent = lane == 0;
                for &(_, _, slot) in keys {
                    let candidate = FairCandidate { slot, tenant, urgent, backlogged, rank };
                    if let Some(decision) = consider(candidate) {
                        return decision;
                    }
                }
            }
        }
        None
    }

    /// Tenants with visible messages.
    pub fn waiting_tenants(&self) -> impl Iterator<Item = u32> + '_ {
        self.visible.keys().copied()
    }

    /// Visible messages of `tenant` (its lanes and, with `urgent_first`, its URGENT ones).
    pub fn visible_of(&self, tenant: u32) -> usize {
        self.visible.get(&tenant).copied().unwrap_or(0)
    }

    /// Tenants the lanes keep anything for (waiting, or with use in the window).
    pub fn known_tenants(&self) -> usize {
        let mut count = self.visible.len();
        count += self.usage.keys().filter(|t| !self.visible.contains_key(t)).count();
        count
    }

    /// Tokens a candidate of `tokens` must find in the bucket (on top of the limiter's own
    /// rule): its estimate, plus `urgent_reserve` when it is not URGENT, plus `tenant_reserve`
    /// when its tenant is backlogged too; at most `capacity` (a request that fits the bucket
    /// alone must not need more than a full one).
    pub fn admission_tokens(
        candidate: &FairCandidate,
        tokens: u64,
        tenant_reserve: f64,
        urgent_reserve: f64,
        capacity: f64,
    ) -> f64 {
        let tokens = tokens as f64;
        if candidate.urgent {
            return tokens;
        }
        let margin = urgent_reserve + if candidate.backlogged { tenant_reserve } else { 0.0 };
        (tokens + margin).min(capacity.max(tokens))
    }
}

impl Ranking for FairLanes {
    fn insert(&mut self, slot: u32, entry: &IndexEntry) {
        let tenant = entry.tenant;
        let priority = entry.cell.priority;
        let key = lane_key(slot, entry);
        self.tracking_active(tenant, |lanes| *lanes.visible.entry(tenant).or_default() += 1);
        if priority == URGENT && self.config.urgent_first {
            self.placed.insert(slot, Placed { tenant, lane: LANES, key });
            self.urgent.insert((entry.seq, slot));
            return;
        }
        let lane = native_lane(priority);
        self.placed.insert(slot, Placed { tenant, lane, key });
        self.tenants.entry(tenant).or_default().lanes[lane].insert(key);
        if let Some(due) = self.ages_at(entry) {
            self.aging.insert((OrdTime(due), entry.seq, slot));
        }
        self.refresh(tenant);
    }

    fn remove(&mut self, slot: u32, entry: &IndexEntry) {
        let tenant = entry.tenant;
        let placed = self.placed.remove(&slot);
        self.tracking_active(tenant, |lanes| {
            if let Some(count) = lanes.visible.get_mut(&tenant) {
                *count -= 1;
                if *count == 0 {
                    lanes.visible.remove(&tenant);
                }
            }
        });
        let Some(placed) = placed else { return };
        if placed.lane == LANES {
            self.urgent.remove(&(entry.seq, slot));
            return;
        }
        if let Some(lanes) = self.tenants.get_mut(&tenant) {
            lanes.lanes[placed.lane].remove(&placed.key);
        }
        if let Some(due) = self.ages_at(entry) {
            self.aging.remove(&(OrdTime(due), entry.seq, slot));
        }
        self.refresh(tenant);
    }

    /// Forgets every message; the tenants' use stays (it is about the window, not the queue).
    fn clear(&mut self) {
        self.urgent.clear();
        self.tenants.clear();
        self.order.clear();
        self.aging.clear();
        self.placed.clear();
        self.visible.clear();
        self.active = ActiveWeight::default();
        let used: Vec<u32> = self.usage.keys().copied().collect();
        for tenant in used {
            self.active.set(&self.config, tenant, true);
        }
    }
}

#[cfg(test)]
mod tests;
