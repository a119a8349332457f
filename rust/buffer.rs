//! The prefetch buffer of an external store: messages leased ahead with `storage.dequeue`,
//! selected from exactly with the rules the in-memory store's index follows (the score policy's
//! order, or the `fair_priority` lanes), by a full scan: the buffer holds at most `buffer_size`
//! messages (50-200).
//!
//! Pure Rust, generic over the message object `M` (the Python `QueueMessage` in the binding), so
//! `cargo test` reaches every rule; what the binding adds is reading the message objects.

use crate::cells::CellKey;
use crate::dispatch::Capacity;
use crate::fair::{FairCandidate, FairConfig, FairLanes, FairRuntime};
use crate::index::{IndexEntry, Ranking};
use std::collections::HashMap;

use crate::policy::{decide_fair_lanes, Admission, FairDecision, UrgentReserve};
use crate::scoring::MessageTraits;
use crate::select::{collect, Collected, SearchContext, SortedCandidates};

/// Tenant names interned to small numbers for the fair lanes (0 is the tenant "" of requests
/// without one). The buffer is short-lived and small: nothing is forgotten.
#[derive(Debug)]
struct Names {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u32>,
}

impl Default for Names {
    fn default() -> Self {
        Self { names: vec!["".into()], ids: HashMap::from([(Box::from(""), 0)]) }
    }
}

impl Names {
    fn intern(&mut self, name: Option<&str>) -> u32 {
        let name = name.unwrap_or("");
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("more than 2^32 tenants");
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |name| name)
    }
}

/// A leased message as the buffer reads it.
#[derive(Debug)]
pub struct Leased<M> {
    /// The message object.
    pub message: M,
    /// Its request's id.
    pub request_id: Box<str>,
    /// The receipt handle of the receive that leased it.
    pub handle: Box<str>,
    /// Score inputs. `receive_count` is the store's count before the buffer's own receive: the
    /// buffer's receive is not a retry, as on the in-memory path.
    pub traits: MessageTraits,
    /// Its request's tenant (None: the tenant "").
    pub tenant: Option<Box<str>>,
    /// Deadline instant; NaN for none.
    pub deadline: f64,
    /// When its lease ends at the latest (the dispatcher's clock; counted from before the
    /// receive, so the estimate errs short).
    pub lease_end: f64,
    /// Its estimate's input and output parts, when its request gave them.
    pub parts: Option<(u64, u64)>,
}

/// A message in the buffer.
#[derive(Debug)]
pub struct Buffered<M> {
    /// The message object.
    pub message: M,
    /// Its request's id.
    pub request_id: Box<str>,
    /// The receipt handle of the receive that leased it.
    pub handle: Box<str>,
    /// Score inputs.
    pub traits: MessageTraits,
    /// Order of arrival in the buffer (increasing).
    pub seq: u64,
    /// Interned tenant.
    pub tenant: u32,
    /// Deadline instant; NaN for none.
    pub deadline: f64,
    /// When its lease ends at the latest.
    pub lease_end: f64,
    /// Its estimate's input and output parts, when its request gave them.
    pub parts: Option<(u64, u64)>,
}

impl<M> Buffered<M> {
    fn entry(&self, seq: u64) -> IndexEntry {
        IndexEntry {
            cell: CellKey::for_message(self.traits.priority, self.traits.receive_count, self.traits.tokens),
            tokens: self.traits.tokens,
            time: 0,
            enqueued_at: self.traits.enqueued_at,
            seq,
            tenant: self.tenant,
            deadline: self.deadline,
        }
    }
}

/// The buffer, and the `fair_priority` state of a dispatcher selecting from it.
#[derive(Debug)]
pub struct Buffer<M> {
    items: Vec<Buffered<M>>,
    next_seq: u64,
    tenants: Names,
    fair: Option<(FairConfig, FairRuntime)>,
    /// The estimates of the messages buffered so far (the URGENT reserve's history).
    urgent: UrgentReserve,
}

impl<M> Default for Buffer<M> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            next_seq: 0,
            tenants: Names::default(),
            fair: None,
            urgent: UrgentReserve::default(),
        }
    }
}

impl<M> Buffer<M> {
    /// Messages buffered.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The buffered messages, in no particular order.
    pub fn items(&self) -> &[Buffered<M>] {
        &self.items
    }

    /// The name of an interned tenant.
    pub fn tenant_name(&self, tenant: u32) -> &str {
        self.tenants.name(tenant)
    }

    /// The number of a tenant name (interned on first sight).
    pub fn intern_tenant(&mut self, name: &str) -> u32 {
        self.tenants.intern(Some(name))
    }

    /// Adds leased messages. Of two copies of one request (its lease ran out and a fill
    /// received it again) the buffer keeps the later delivery, the one with the higher receive
    /// count (the incoming one on a tie): the other's handle is stale. Returns the copies not
    /// kept, for the caller to forget (and release after any lock).
    pub fn insert(&mut self, leased: impl IntoIterator<Item = Leased<M>>) -> Vec<Leased<M>> {
        let mut not_kept = Vec::new();
        for item in leased {
            if let Some(i) = self.items.iter().position(|b| b.request_id == item.request_id) {
                if self.items[i].traits.receive_count > item.traits.receive_count {
                    not_kept.push(item); // an older delivery coming back
                    continue;
                }
                let old = self.items.swap_remove(i);
                let tenant = Some(Box::from(self.tenants.name(old.tenant)));
                not_kept.push(Leased {
                    message: old.message,
                    request_id: old.request_id,
                    handle: old.handle,
                    traits: old.traits,
                    tenant,
                    deadline: old.deadline,
                    lease_end: old.lease_end,
                    parts: old.parts,
                });
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let tenant = self.tenants.intern(item.tenant.as_deref());
            self.urgent.observe(item.traits.priority, item.traits.tokens, item.traits.enqueued_at);
            self.items.push(Buffered {
                message: item.message,
                request_id: item.request_id,
                handle: item.handle,
                traits: item.traits,
                seq,
                tenant,
                deadline: item.deadline,
                lease_end: item.lease_end,
                parts: item.parts,
            });
        }
        not_kept
    }

    // ----- leases ------------------------------------------------------------------------------

    /// Handles of the messages whose lease has `half` or less left at `now` (with `every`, of
    /// all), leaving out those `renewing` says are being renewed already.
    pub fn due(&self, now: f64, half: f64, every: bool, renewing: impl Fn(&str) -> bool) -> Vec<&str> {
        let due = |item: &&Buffered<M>| (every || item.lease_end - now <= half) && !renewing(&item.handle);
        self.items.iter().filter(due).map(|item| &*item.handle).collect()
    }

    /// A lease renewed: it ends at `end` (if its message is still here).
    pub fn renewed(&mut self, handle: &str, end: f64) {
        if let Some(item) = self.items.iter_mut().find(|item| &*item.handle == handle) {
            item.lease_end = end;
        }
    }

    /// When the next lease renewal is due (the earliest lease end less `half`).
    pub fn next_due(&self, half: f64) -> Option<f64> {
        self.items.iter().map(|item| item.lease_end - half).reduce(f64::min)
    }

    /// Puts a message taken out back (its dispatch was given up): selectable again, as it was.
    pub fn restore(&mut self, item: Buffered<M>) {
        self.items.push(item);
    }

    /// Removes and returns every buffered message.
    pub fn drain(&mut self) -> Vec<Buffered<M>> {
        std::mem::take(&mut self.items)
    }

    /// Receipt handles of the buffered messages.
    pub fn handles(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|item| &*item.handle)
    }

    /// Removes the message with this receipt handle, if it is here.
    pub fn discard(&mut self, handle: &str) -> Option<Buffered<M>> {
        let i = self.items.iter().position(|item| &*item.handle == handle)?;
        Some(self.items.swap_remove(i))
    }

    /// Removes and returns the message with sequence number `seq`, if it is still here.
    pub fn take(&mut self, seq: u64) -> Option<Buffered<M>> {
        let i = self.items.iter().position(|item| item.seq == seq)?;
        Some(self.items.swap_remove(i))
    }

    /// The item with sequence number `seq`, if it is still here.
    pub fn get(&self, seq: u64) -> Option<&Buffered<M>> {
        self.items.iter().find(|item| item.seq == seq)
    }

    /// Removes and returns the messages matching `take` (kept in order otherwise).
    fn take_where(&mut self, mut take: impl FnMut(&Buffered<M>) -> bool) -> Vec<Buffered<M>> {
        let (taken, kept) = std::mem::take(&mut self.items).into_iter().partition(|item| take(item));
        self.items = kept;
        taken
    }

    /// Removes and returns the messages whose deadline has passed (still leased: the caller
    /// dead-letters them).
    pub fn take_expired(&mut self, now: f64) -> Vec<Buffered<M>> {
        self.take_where(|item| item.deadline < now)
    }

    /// Removes and returns the messages that can never fit `capacity` (still leased).
    pub fn take_above(&mut self, capacity: Capacity) -> Vec<Buffered<M>> {
        self.take_where(|item| !capacity.fits(item.traits.tokens, item.parts))
    }

    /// Request ids of the messages that can never fit `capacity` (by their parts when known).
    pub fn ids_above(&self, capacity: Capacity) -> Vec<&str> {
        self.items
            .iter()
            .filter(|i| !capacity.fits(i.traits.tokens, i.parts))
            .map(|i| &*i.request_id)
            .collect()
    }

    /// The smallest estimate buffered.
    pub fn min_tokens(&self) -> Option<u64> {
        self.items.iter().map(|item| item.traits.tokens).min()
    }

    /// Messages per priority 0..=3.
    pub fn counts_by_priority(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for item in &self.items {
            counts[usize::from(item.traits.priority.min(3))] += 1;
        }
        counts
    }

    /// The oldest `enqueued_at` buffered.
    pub fn oldest_enqueued_at(&self) -> Option<f64> {
        self.items.iter().map(|item| item.traits.enqueued_at).reduce(f64::min)
    }

    /// The oldest `enqueued_at` buffered of each priority, URGENT first.
    pub fn oldest_enqueued_by_priority(&self) -> [Option<f64>; 4] {
        let mut oldest: [Option<f64>; 4] = [None; 4];
        for item in &self.items {
            let at = &mut oldest[usize::from(item.traits.priority.min(3))];
            *at = Some(at.map_or(item.traits.enqueued_at, |a| a.min(item.traits.enqueued_at)));
        }
        oldest
    }

    /// `(tenant, messages buffered)` of every tenant with a message here.
    pub fn tenant_counts(&self) -> Vec<(u32, usize)> {
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for item in &self.items {
            match counts.iter_mut().find(|(t, _)| *t == item.tenant) {
                Some((_, n)) => *n += 1,
                None => counts.push((item.tenant, 1)),
            }
        }
        counts
    }

    // ----- the score policy ------------------------------------------------------------------

    /// What sizes the URGENT reserve: the estimates buffered so far, the tokens waiting now,
    /// the latest arrival.
    pub fn urgent_history(&self) -> UrgentReserve {
        let mut history = self.urgent.clone();
        history.set_waiting_tokens(self.items.iter().map(|item| item.traits.tokens).sum());
        history
    }

    /// Up to `limit` candidates in exactly descending base score under `context` (the slot of
    /// each is its position in `items`; its `seq` names it for `take`).
    pub fn collect(&self, context: &SearchContext, limit: usize) -> Vec<Collected> {
        let mut stream = SortedCandidates::new(
            context,
            self.items.iter().enumerate().map(|(i, item)| (i as u32, item.traits, item.seq)),
        );
        collect(&mut stream, limit)
    }

    // ----- the fair_priority policy ----------------------------------------------------------

    /// Ranks by `fair_priority` from now on, with `config` (tenants named in it interned here)
    /// and a fixed or (None) automatic reserve.
    pub fn configure_fair(&mut self, weights: &[(String, f64)], config: FairConfig, reserve: Option<f64>) {
        let mut config = config;
        config.weights = weights.iter().map(|(name, w)| (self.tenants.intern(Some(name)), *w)).collect();
        let runtime = FairRuntime::new(&config, reserve);
        self.fair = Some((config, runtime));
    }

    /// The fair runtime (tenant use, reserve), when configured.
    pub fn fair_runtime(&mut self) -> Option<&mut FairRuntime> {
        self.fair.as_mut().map(|(_, runtime)| runtime)
    }

    /// The fair lanes of the buffered messages (the buffer is small: built per step).
    /// Lanes order by sequence number as age order, but the buffer's own sequence is the order
    /// messages arrived in it (the store hands them over by priority, a failed one again last):
    /// each entry gets its rank by enqueue instant instead (ties by arrival).
    fn lanes(&self, config: &FairConfig) -> FairLanes {
        let mut lanes = FairLanes::new(config.clone());
        let items = &self.items;
        let mut by_age: Vec<usize> = (0..items.len()).collect();
        by_age.sort_by(|&a, &b| {
            items[a]
                .traits
                .enqueued_at
                .total_cmp(&items[b].traits.enqueued_at)
                .then(items[a].seq.cmp(&items[b].seq))
        });
        for (age_rank, &i) in by_age.iter().enumerate() {
            lanes.insert(i as u32, &items[i].entry(age_rank as u64));
        }
        lanes
    }

    /// The fair decision over the buffer under `limiter` (its slot is a position in `items`);
    /// None without fair settings or messages.
    pub fn decide_fair(&mut self, limiter: &impl Admission, now: f64, hold: bool) -> Option<FairDecision> {
        let (config, _) = self.fair.as_ref()?;
        let mut lanes = self.lanes(config);
        let history = self.urgent_history();
        let items = &self.items;
        let (_, runtime) = self.fair.as_mut()?;
        lanes.prepare_all(now, &mut runtime.ledger);
        let tokens_of = |slot: u32| {
            let item = &items[slot as usize];
            (item.traits.tokens, item.parts)
        };
        decide_fair_lanes(&lanes, tokens_of, runtime, &history, limiter, now, hold)
    }

    /// Charges a fair dispatch of `tokens` to `tenant`; the charge's id (0 without fair
    /// settings).
    pub fn charge(&mut self, candidate: &FairCandidate, now: f64, tokens: u64) -> u64 {
        self.fair.as_mut().map_or(0, |(_, runtime)| runtime.charge(candidate.tenant, now, tokens))
    }

    /// Corrects a fair charge to `tokens` (0 takes it back).
    pub fn correct_charge(&mut self, tenant: u32, charge: u64, tokens: f64) {
        if let Some((_, runtime)) = self.fair.as_mut() {
            runtime.ledger.correct(tenant, charge, tokens);
        }
    }

    /// Each tenant's token use over the fairness window (empty without fair settings).
    pub fn fair_usage(&mut self, now: f64) -> Vec<(u32, f64)> {
        self.fair.as_mut().map_or_else(Vec::new, |(_, runtime)| runtime.ledger.usages(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Snapshot;
    use crate::scoring::Weights;

    fn leased(id: &str, priority: u8, tokens: u64, enqueued_at: f64, receive_count: u32) -> Leased<u32> {
        Leased {
            message: 0,
            request_id: id.into(),
            handle: format!("h-{id}-{receive_count}").into(),
            lease_end: 30.0,
            traits: MessageTraits {
                priority,
                receive_count,
                tokens,
                expected_processing_seconds: None,
                enqueued_at,
            },
            tenant: None,
            deadline: f64::NAN,
            parts: None,
        }
    }

    #[test]
    fn the_later_delivery_of_a_request_is_kept() {
        let mut buffer = Buffer::default();
        assert!(buffer.insert([leased("a", 2, 10, 0.0, 1)]).is_empty());
        // An older delivery coming back is not kept; a newer one replaces the buffered copy.
        let not_kept = buffer.insert([leased("a", 2, 10, 0.0, 0)]);
        assert_eq!(&*not_kept[0].handle, "h-a-0");
        let not_kept = buffer.insert([leased("a", 2, 10, 0.0, 2)]);
        assert_eq!(&*not_kept[0].handle, "h-a-1");
        assert_eq!(buffer.handles().collect::<Vec<_>>(), ["h-a-2"]);
    }

    #[test]
    fn selection_is_best_first_and_takes_by_sequence() {
        let mut buffer = Buffer::default();
        buffer.insert([leased("low", 3, 100, 0.0, 0), leased("urgent", 0, 100, 0.0, 0)]);
        let context = SearchContext {
            weights: Weights::default(),
            now: 1.0,
            available: 10_000.0,
            max_tokens: 10_000.0,
        };
        let collected = buffer.collect(&context, 2);
        let best = &buffer.items()[collected[0].candidate.slot as usize];
        assert_eq!(&*best.request_id, "urgent");
        let taken = buffer.take(collected[0].candidate.seq).unwrap();
        assert_eq!(&*taken.request_id, "urgent");
        assert!(buffer.take(collected[0].candidate.seq).is_none());
        buffer.restore(taken);
        assert_eq!(buffer.len(), 2);
    }

    #[test]
    fn leases_half_used_are_due_for_renewal() {
        let mut buffer = Buffer::default();
        let mut later = leased("later", 2, 10, 0.0, 0);
        later.lease_end = 60.0;
        buffer.insert([leased("soon", 2, 10, 0.0, 0), later]);
        assert_eq!(buffer.next_due(15.0), Some(15.0));
        assert_eq!(buffer.due(16.0, 15.0, false, |_| false), ["h-soon-0"]);
        assert!(buffer.due(16.0, 15.0, false, |h| h == "h-soon-0").is_empty());
        assert_eq!(buffer.due(16.0, 15.0, true, |_| false).len(), 2);
        buffer.renewed("h-soon-0", 46.0);
        assert_eq!(buffer.next_due(15.0), Some(31.0));
    }

    #[test]
    fn the_oldest_of_each_priority_is_its_earliest_enqueued() {
        let mut buffer = Buffer::default();
        assert_eq!(buffer.oldest_enqueued_by_priority(), [None; 4]);
        buffer.insert([
            leased("h-new", 1, 10, 9.0, 0),
            leased("h-old", 1, 10, 3.0, 0),
            leased("low", 3, 10, 5.0, 0),
        ]);
        assert_eq!(buffer.oldest_enqueued_by_priority(), [None, Some(3.0), None, Some(5.0)]);
        assert_eq!(buffer.oldest_enqueued_at(), Some(3.0));
    }

    #[test]
    fn expired_and_oversized_messages_are_taken_out() {
        let mut buffer = Buffer::default();
        let mut late = leased("late", 2, 10, 0.0, 0);
        late.deadline = 5.0;
        buffer.insert([late, leased("huge", 2, 5_000, 0.0, 0), leased("ok", 2, 10, 0.0, 0)]);
        assert_eq!(buffer.ids_above(Capacity::whole(1_000.0)), ["huge"]);
        assert_eq!(buffer.take_expired(5.5).len(), 1);
        assert_eq!(buffer.take_above(Capacity::whole(1_000.0)).len(), 1);
        assert_eq!(buffer.counts_by_priority(), [0, 0, 1, 0]);
        assert_eq!(buffer.min_tokens(), Some(10));
    }

    #[test]
    fn fair_selection_ranks_the_tenant_with_less_use_first() {
        let mut buffer = Buffer::default();
        let mut heavy = leased("h", 2, 100, 0.0, 0);
        heavy.tenant = Some("heavy".into());
        let mut light = leased("l", 2, 100, 1.0, 0);
        light.tenant = Some("light".into());
        buffer.insert([heavy, light]);
        buffer.configure_fair(&[], FairConfig::default(), Some(0.0));
        let heavy_id = buffer.intern_tenant("heavy");
        let snapshot = Snapshot { available_tokens: 1e6, available_requests: 1e6, capacity: 1e6 };
        let first = buffer.decide_fair(&snapshot, 2.0, true).unwrap();
        assert_eq!(&*buffer.items()[first.candidate.slot as usize].request_id, "h");
        let charge = buffer.charge(&first.candidate, 2.0, 100);
        assert_eq!(first.candidate.tenant, heavy_id);
        let second = buffer.decide_fair(&snapshot, 2.0, true).unwrap();
        assert_eq!(&*buffer.items()[second.candidate.slot as usize].request_id, "l");
        // Taking the charge back puts the heavy tenant first again (the oldest head).
        buffer.correct_charge(heavy_id, charge, 0.0);
        let again = buffer.decide_fair(&snapshot, 2.0, true).unwrap();
        assert_eq!(&*buffer.items()[again.candidate.slot as usize].request_id, "h");
    }
}
