//! The books of a dispatcher's deliveries, as one state machine.
//!
//! A *delivery* is one hand-out of a message: the receive that took it, the budget reserved for
//! it (keyed by the delivery, never by the request id: a stale delivery's marks settle its own
//! reservation and no other), and the fair charge of its tenant. Its states:
//!
//! ```text
//!   open ──► Reserved ──hand_out──► HandedOut ──settle──► Settling ──finish──► (settled)
//!               │                      │   ▲                 │
//!             revoke                abandon └──store failed──┘
//!               ▼                      ▼
//!          (taken back)           (abandoned)
//! ```
//!
//! Purged is a flag on any live delivery: the store was purged since it was handed out, so its
//! message no longer exists; its mark settles its budget and nothing else, and it no longer
//! counts in flight.
//!
//! The ledger performs no I/O. A transition returns what must happen next — a [`Plan`]: the
//! store call, then the limiter call and the charge correction — and the caller reports the
//! store's reply ([`Ledger::store_replied`]) before doing the rest, then [`Ledger::finish`]es.
//! With the in-memory store and an `LLMThrottle` the binding runs a plan at once, in Rust;
//! otherwise Python awaits its calls and reports back. Invariants (checked by the model test in
//! `tests.rs`):
//!
//! * I1 every delivery is in exactly one state, and an id names one delivery only, once;
//! * I2 a transition from the wrong state is refused and changes nothing;
//! * I3 a plan's limiter call and charge are only due once its store call landed or went stale;
//!   a store call that failed puts the delivery back, markable, and nothing else is done;
//! * I4 a purged delivery's plan has no store call, and a mark of it never reports a stale
//!   handle;
//! * I5 every delivery handed out is counted once when it ends: completed, failed, given back,
//!   or abandoned; one taken back before its hand-out is not counted at all.

mod stats;
#[cfg(test)]
mod tests;

pub use stats::{
    limit_of_reason, percentile, LimitSummary, Percentiles, SloCount, Stats, TenantCount, TenantLine,
    TenantSummary, DEFAULT_SLO_TARGETS, LIMITS, SAMPLES,
};

use crate::errors::{CoreError, CoreResult};

/// A delivery's id: slot and generation in one number (also what Python holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryId(pub u64);

impl DeliveryId {
    fn new(slot: u32, generation: u32) -> Self {
        Self((u64::from(generation) << 32) | u64::from(slot))
    }

    fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// How a delivery is marked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mark {
    /// Processed: the message is deleted; the reservation is corrected to `actual` when given
    /// (each limit to its share of it when its input and output `parts` are known).
    Processed {
        /// Tokens the call used, when known.
        actual: Option<u64>,
        /// Its input and output tokens, adding up to `actual`, when known.
        parts: Option<(u64, u64)>,
    },
    /// Failed: the message is visible again after `delay` s; the unused tokens are refunded.
    Failed {
        /// Seconds until it is visible again.
        delay: f64,
    },
    /// Dead-lettered at once; the unused tokens are refunded.
    DeadLettered,
    /// Given back unprocessed (a stop): its receive undone, its reservation released whole.
    Released,
}

impl Mark {
    /// Whether a stale receipt handle fails the mark (the message will be processed again).
    fn stale_is_an_error(self) -> bool {
        matches!(self, Self::Processed { .. } | Self::DeadLettered)
    }
}

/// The store call of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StoreOp {
    /// Delete the message.
    Delete,
    /// Make it visible after this many seconds.
    ChangeVisibility(f64),
    /// Dead-letter it at once.
    DeadLetter,
    /// Undo its receive (`release_message`).
    Release,
}

/// The limiter call of a plan, on the delivery's reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterOp {
    /// Set its tokens to this count (0 refunds the tokens; the request stays used).
    Adjust(u64),
    /// Set its tokens to these input and output counts: each limit to its share (input tokens
    /// to an input limit, output tokens to an output limit, their sum to the others).
    AdjustParts(u64, u64),
    /// Give it back whole: its tokens and its request.
    Release,
    /// End its time in flight (a limiter's slot of requests in flight), its tokens kept as
    /// counted: processed without an actual count.
    Settle,
}

/// A correction of a fair charge: tenant, charge id, tokens it counts for now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChargeFix {
    /// The tenant charged.
    pub tenant: u32,
    /// The charge's id.
    pub charge: u64,
    /// What it counts for now.
    pub tokens: f64,
}

/// What must happen for a transition: the store call first, then (once it landed or went
/// stale) the limiter call and the charge correction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// The delivery.
    pub delivery: DeliveryId,
    /// The store call, if any.
    pub store: Option<StoreOp>,
    /// The limiter call, if any.
    pub limiter: Option<LimiterOp>,
    /// The charge correction, if any.
    pub charge: Option<ChargeFix>,
}

/// The store's reply to a plan's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreReply {
    /// Done.
    Landed,
    /// The receipt handle is no longer current (received again, or gone).
    Stale,
    /// It failed (or was cancelled): nothing changed in the store.
    Failed,
}

/// What a delivery is, for the books and the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    /// Interned tenant (the pool's numbering).
    pub tenant: u32,
    /// Estimated tokens (what was reserved and charged).
    pub tokens: u64,
    /// Priority 0..=3.
    pub priority: u8,
    /// When its message was enqueued (seconds of the dispatcher's clock).
    pub enqueued_at: f64,
    /// Whether its budget was reserved on the limiter.
    pub reserved: bool,
    /// Its fair charge.
    pub charge: Option<(u32, u64)>,
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// Taken and (maybe) reserved, not yet handed out.
    Reserved,
    /// Handed out: the caller owns it.
    HandedOut,
    /// A mark claimed it; `store_pending` until the store replied.
    Settling {
        /// The mark.
        mark: Mark,
        /// Whether the store call is still to reply.
        store_pending: bool,
    },
}

/// One delivery.
#[derive(Debug)]
pub struct Delivery<D> {
    /// The binding's data (the message object, the limiter, the handle).
    pub data: D,
    /// What it is.
    pub facts: Facts,
    /// Where it is.
    pub state: State,
    /// When it was handed out (NaN before).
    pub dispatched_at: f64,
    /// The purge that flagged it, if any.
    purge: Option<u32>,
    /// Its message was deleted (or found gone) by that purge: a failed purge leaves it purged.
    purge_final: bool,
}

impl<D> Delivery<D> {
    /// Whether the store was purged since it was handed out.
    pub fn purged(&self) -> bool {
        self.purge.is_some()
    }

    /// Whether it counts in flight: handed out (a mark may be in progress), not purged.
    pub fn in_flight(&self) -> bool {
        !self.purged() && !matches!(self.state, State::Reserved)
    }
}

/// What ended a delivery, for the caller (the binding logs failures and dead letters).
#[derive(Debug)]
pub struct Ended<D> {
    /// The binding's data, handed back.
    pub data: D,
    /// The mark that ended it (None: taken back before its hand-out, or abandoned).
    pub mark: Option<Mark>,
}

/// What a reply of the store asks next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AfterStore {
    /// Whether to carry on with the limiter call and the charge (false: the store failed, the
    /// delivery is markable again and nothing else is done).
    pub proceed: bool,
    /// Whether the mark must report a stale receipt handle once finished.
    pub stale_error: bool,
    /// The plan's charge correction, due now (None when nothing is due).
    pub charge: Option<ChargeFix>,
}

struct Slot<D> {
    generation: u32,
    delivery: Option<Delivery<D>>,
}

/// The books: every live delivery of one dispatcher, and the metrics summaries.
pub struct Ledger<D> {
    slots: Vec<Slot<D>>,
    free: Vec<u32>,
    purges: u32,
    live: usize,
    /// The metrics summaries.
    pub stats: Stats,
}

/// The limiter call `mark` makes on a delivery's reservation (none without one): to the actual
/// count (processed with one), settled at its estimate (processed without one), refunding the
/// tokens (failed, dead-lettered), giving it back whole (released).
pub fn limiter_op(facts: Facts, mark: Mark) -> Option<LimiterOp> {
    if !facts.reserved {
        return None;
    }
    match mark {
        Mark::Processed { parts: Some((input, output)), .. } => Some(LimiterOp::AdjustParts(input, output)),
        Mark::Processed { actual, parts: None } => Some(actual.map_or(LimiterOp::Settle, LimiterOp::Adjust)),
        Mark::Failed { .. } | Mark::DeadLettered => Some(LimiterOp::Adjust(0)),
        Mark::Released => Some(LimiterOp::Release),
    }
}

/// The correction of a delivery's fair charge that `mark` makes: to the actual count (processed
/// with one), to nothing (failed, dead-lettered, released), or none (processed without a count).
fn charge_fix(facts: Facts, mark: Mark) -> Option<ChargeFix> {
    let tokens = match mark {
        Mark::Processed { actual, .. } => actual.map(|a| a as f64),
        _ => Some(0.0),
    };
    facts.charge.zip(tokens).map(|((tenant, charge), tokens)| ChargeFix { tenant, charge, tokens })
}

fn state_error(id: DeliveryId, what: &str) -> CoreError {
    CoreError::MessageState(format!("delivery {} {what}", id.0))
}

impl<D> Ledger<D> {
    /// Empty books, with metrics over `retention` seconds (token use over `fairness_window`).
    pub fn new(retention: f64, fairness_window: f64) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            purges: 0,
            live: 0,
            stats: Stats::new(retention, fairness_window),
        }
    }

    /// Deliveries not yet ended (in any state, purged included).
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no delivery is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The delivery `id` names, if it has not ended.
    pub fn get(&self, id: DeliveryId) -> Option<&Delivery<D>> {
        let slot = self.slots.get(id.slot())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.delivery.as_ref()
    }

    fn get_mut(&mut self, id: DeliveryId) -> CoreResult<&mut Delivery<D>> {
        match self.slots.get_mut(id.slot()) {
            Some(slot) if slot.generation == id.generation() => {
                slot.delivery.as_mut().ok_or_else(|| state_error(id, "has ended"))
            }
            _ => Err(state_error(id, "has ended")),
        }
    }

    /// The binding's data of the delivery `id` names, if it has not ended.
    pub fn data_mut(&mut self, id: DeliveryId) -> Option<&mut D> {
        self.get_mut(id).ok().map(|delivery| &mut delivery.data)
    }

    fn remove(&mut self, id: DeliveryId) -> Delivery<D> {
        let slot = &mut self.slots[id.slot()];
        let delivery = slot.delivery.take().expect("a live delivery");
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.slot() as u32);
        self.live -= 1;
        delivery
    }

    /// The deliveries that count in flight.
    pub fn in_flight(&self) -> impl Iterator<Item = (DeliveryId, &Delivery<D>)> {
        self.deliveries().filter(|(_, d)| d.in_flight())
    }

    /// Deliveries in flight per tenant.
    pub fn in_flight_by_tenant(&self) -> Vec<(u32, usize)> {
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for (_, delivery) in self.in_flight() {
            match counts.iter_mut().find(|(t, _)| *t == delivery.facts.tenant) {
                Some((_, n)) => *n += 1,
                None => counts.push((delivery.facts.tenant, 1)),
            }
        }
        counts
    }

    /// Every live delivery.
    pub fn deliveries(&self) -> impl Iterator<Item = (DeliveryId, &Delivery<D>)> {
        self.slots.iter().enumerate().filter_map(|(i, slot)| {
            slot.delivery.as_ref().map(|d| (DeliveryId::new(i as u32, slot.generation), d))
        })
    }

    /// A message taken and (maybe) reserved, not yet handed out: `Reserved`.
    pub fn open(&mut self, data: D, facts: Facts) -> DeliveryId {
        let delivery = Delivery {
            data,
            facts,
            state: State::Reserved,
            dispatched_at: f64::NAN,
            purge: None,
            purge_final: false,
        };
        self.live += 1;
        if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.delivery = Some(delivery);
            DeliveryId::new(slot, s.generation)
        } else {
            let slot = u32::try_from(self.slots.len()).expect("more than 2^32 deliveries");
            self.slots.push(Slot { generation: 0, delivery: Some(delivery) });
            DeliveryId::new(slot, 0)
        }
    }

    /// `Reserved` → `HandedOut` at `now`, recording the dispatch (its wait since enqueue, and
    /// `latency`, the seconds selecting it took). Refused for a delivery whose message a purge
    /// removed meanwhile (the caller takes it back).
    pub fn hand_out(&mut self, id: DeliveryId, now: f64, latency: f64) -> CoreResult<()> {
        let delivery = self.get_mut(id)?;
        if delivery.state != State::Reserved {
            return Err(state_error(id, "was handed out already"));
        }
        if delivery.purged() {
            return Err(state_error(id, "lost its message to a purge"));
        }
        delivery.state = State::HandedOut;
        delivery.dispatched_at = now;
        let facts = delivery.facts;
        self.stats.record_dispatch(
            now,
            now - facts.enqueued_at,
            latency,
            facts.tenant,
            facts.tokens,
            facts.priority,
        );
        Ok(())
    }

    /// `open` and `hand_out` in one step (a dispatch with nothing to await in between).
    pub fn open_handed_out(&mut self, data: D, facts: Facts, now: f64, latency: f64) -> DeliveryId {
        let id = self.open(data, facts);
        let delivery = self.get_mut(id).expect("just opened");
        delivery.state = State::HandedOut;
        delivery.dispatched_at = now;
        self.stats.record_dispatch(
            now,
            now - facts.enqueued_at,
            latency,
            facts.tenant,
            facts.tokens,
            facts.priority,
        );
        id
    }

    /// Takes back a `Reserved` delivery that will not be handed out (its lease was lost, its
    /// reservation refused, a purge removed its message, the dispatch failed): it ends uncounted.
    /// The plan releases its reservation and takes its charge back (no store call: the caller
    /// returns the message where it came from).
    pub fn revoke(&mut self, id: DeliveryId) -> CoreResult<(Plan, D)> {
        let delivery = self.get_mut(id)?;
        if delivery.state != State::Reserved {
            return Err(state_error(id, "was handed out already"));
        }
        let facts = delivery.facts;
        let plan = Plan {
            delivery: id,
            store: None,
            limiter: facts.reserved.then_some(LimiterOp::Release),
            charge: facts.charge.map(|(tenant, charge)| ChargeFix { tenant, charge, tokens: 0.0 }),
        };
        Ok((plan, self.remove(id).data))
    }

    /// Whether a mark or a visibility change may act on the delivery now (`HandedOut`).
    pub fn check_live(&self, id: DeliveryId) -> CoreResult<&Delivery<D>> {
        match self.get(id) {
            Some(delivery) if delivery.state == State::HandedOut => Ok(delivery),
            _ => Err(state_error(id, "was already marked")),
        }
    }

    /// `HandedOut` → `Settling`: the plan of `mark`. Refused (`MessageState`) when the delivery
    /// is not handed out (marked already, or being marked).
    pub fn settle(&mut self, id: DeliveryId, mark: Mark) -> CoreResult<Plan> {
        let delivery = self.get_mut(id)?;
        if delivery.state != State::HandedOut {
            return Err(state_error(id, "was already marked"));
        }
        let facts = delivery.facts;
        let store = (!delivery.purged()).then_some(match mark {
            Mark::Processed { .. } => StoreOp::Delete,
            Mark::Failed { delay } => StoreOp::ChangeVisibility(delay),
            Mark::DeadLettered => StoreOp::DeadLetter,
            Mark::Released => StoreOp::Release,
        });
        delivery.state = State::Settling { mark, store_pending: store.is_some() };
        Ok(Plan { delivery: id, store, limiter: limiter_op(facts, mark), charge: charge_fix(facts, mark) })
    }

    /// The store's reply to a settling delivery's call. `Failed` puts it back to `HandedOut`
    /// (markable again; its limiter call and charge are not done); `Landed` and `Stale` let the
    /// caller carry on.
    pub fn store_replied(&mut self, id: DeliveryId, reply: StoreReply) -> CoreResult<AfterStore> {
        let delivery = self.get_mut(id)?;
        let State::Settling { mark, store_pending: true } = delivery.state else {
            return Err(state_error(id, "has no store call pending"));
        };
        if reply == StoreReply::Failed {
            delivery.state = State::HandedOut;
            return Ok(AfterStore { proceed: false, stale_error: false, charge: None });
        }
        delivery.state = State::Settling { mark, store_pending: false };
        let stale_error = reply == StoreReply::Stale && mark.stale_is_an_error() && !delivery.purged();
        Ok(AfterStore { proceed: true, stale_error, charge: charge_fix(delivery.facts, mark) })
    }

    /// Ends a settling delivery whose store call replied (or that had none) at `now`, its
    /// limiter call done (or failed: the mark stands either way), and counts it.
    pub fn finish(&mut self, id: DeliveryId, now: f64) -> CoreResult<Ended<D>> {
        let delivery = self.get_mut(id)?;
        let State::Settling { mark, store_pending: false } = delivery.state else {
            return Err(state_error(id, "is not ready to finish"));
        };
        let facts = delivery.facts;
        let charged = i64::try_from(facts.tokens).unwrap_or(i64::MAX);
        match mark {
            Mark::Processed { actual, .. } => {
                let tokens = actual.unwrap_or(facts.tokens);
                let correction = i64::try_from(tokens).unwrap_or(i64::MAX).saturating_sub(charged);
                self.stats.record_completion(now, tokens, facts.tenant, correction);
            }
            Mark::Failed { .. } | Mark::DeadLettered => {
                self.stats.record_failure(now, facts.tenant, -charged);
            }
            Mark::Released => self.stats.record_correction(now, facts.tenant, -charged),
        }
        Ok(Ended { data: self.remove(id).data, mark: Some(mark) })
    }

    /// Gives up a handed-out delivery nobody will mark (its mark failed in the store and its
    /// owner stops trying): it ends uncounted; the store redelivers its message when the lease
    /// ends, and the limiter keeps its reservation (erring high: its call may have happened).
    /// None when it is not `HandedOut`.
    pub fn abandon(&mut self, id: DeliveryId) -> Option<D> {
        let delivery = self.get_mut(id).ok()?;
        if delivery.state != State::HandedOut {
            return None;
        }
        Some(self.remove(id).data)
    }

    /// A purge starts: every live delivery not purged yet is flagged (its message is about to
    /// be removed) and listed, so the caller can delete the messages of those handed out by
    /// handle (a store's purge may leave in-flight messages). Returns the purge's number for
    /// [`end_purge`](Self::end_purge).
    pub fn begin_purge(&mut self) -> (u32, Vec<DeliveryId>) {
        self.purges = self.purges.wrapping_add(1);
        let purge = self.purges;
        let mut flagged = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(delivery) = slot.delivery.as_mut() {
                if delivery.purge.is_none() {
                    delivery.purge = Some(purge);
                    flagged.push(DeliveryId::new(i as u32, slot.generation));
                }
            }
        }
        (purge, flagged)
    }

    /// The purge deleted the delivery's message (or found it gone already): it stays purged
    /// whatever becomes of the purge.
    pub fn purge_deleted(&mut self, id: DeliveryId) {
        if let Ok(delivery) = self.get_mut(id) {
            delivery.purge_final = true;
        }
    }

    /// The purge `purge` ended; if it failed, the deliveries it flagged whose messages it had
    /// not deleted are live again.
    pub fn end_purge(&mut self, purge: u32, ok: bool) {
        if ok {
            return;
        }
        for slot in &mut self.slots {
            if let Some(delivery) = slot.delivery.as_mut() {
                if delivery.purge == Some(purge) && !delivery.purge_final {
                    delivery.purge = None;
                }
            }
        }
    }
}
