//! The in-memory queue store: SQS semantics (visibility timeouts, receipt handles, receive counts,
//! dead-lettering, retention) over the candidate index the exact selection search walks.
//! (About 820 lines: handles, invariants, messages, tenants and the search are in their own files;
//! what stays is the slab and the state transitions every operation shares.)
//!
//! Layout. Messages live in a slab (`Vec` of slots plus a free list; a slot index is a `u32`).
//! Request ids map to slots through a `hashbrown::HashTable<u32>` that hashes the id stored in
//! the slot, so an id is stored once (a `HashMap<Box<str>, u32>` would store it twice and double
//! the table's footprint). Visible messages are in the [`VisibleIndex`] (and in a second
//! [`Ranking`], when one is plugged in); in-flight messages sit in a `BTreeSet<(deadline, slot)>`,
//! so expiry costs O(log n) per expired message. Receipt handles are in `handles`.
//!
//! Sequence order is age order: `enqueued_at` never decreases within a store (a clock reading
//! earlier than the previous enqueue is clamped to it), and sequence numbers only grow, so
//! "oldest `enqueued_at`, then enqueue sequence" is simply "smallest sequence number".
//!
//! Time. The store never reads a clock: every operation takes `now` (seconds). Every operation
//! first runs the maintenance step ([`Store::release_expired`] without the hand-off): in-flight
//! messages whose deadline is `<= now` become visible again, or are dead-lettered when they have
//! been received `max_receive_count` times; visible messages older than the retention period
//! are dropped. Dead-lettered messages wait in an outbox the caller drains
//! ([`Store::take_dead_lettered`]) to move them to the dead-letter store, and put back
//! ([`Store::return_dead_letters`]) what the target could not take, so a failing hand-off loses
//! nothing; payloads of dropped messages wait in [`Store::take_dropped`] so a Python layer can
//! release them after unlocking.
//!
//! Memory at 1M queued messages (`P` = one pointer): slot 104 B (the generation of an occupied
//! slot lives in its message's padding, a vacant slot's in the free list; a request id of up to
//! 23 bytes is inline, a longer one has a heap block of its own), hash table ~10 B (2^21 buckets of 4 B + 1 control byte), index B-trees ~50-65 B
//! (fewer when a batch built them whole).

mod handles;
mod invariants;
mod message;
mod request_id;
mod search;
mod tenants;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

pub use self::handles::{
    format_message_id, format_message_id_into, format_message_id_tail, ReceiptHandle, MESSAGE_ID_LEN,
};
use self::handles::{random_u64, take_message_ids};
pub use self::message::{
    validate_request_id, NewMessage, OrdTime, StoreConfig, StoredMessage, DEFAULT_MESSAGE_RETENTION,
};
pub use self::request_id::RequestId;
pub use self::tenants::TenantCounts;
use self::tenants::Tenants;
use crate::cells::CellKey;
use crate::errors::{CoreError, CoreResult};
pub use crate::index::PRIORITIES;
use crate::index::{Cell, IndexEntry, Ranking, VisibleIndex};

/// Longest visibility timeout in seconds (12 hours, as in SQS).
pub const MAX_VISIBILITY_TIMEOUT: f64 = 43_200.0;

/// A slot of the slab: 104 B with a one-pointer payload (112 B with the Python layer's). The slot's generation lives in its
/// message (in what would be padding) while occupied, and in the free list while vacant.
pub(crate) struct Slot<P> {
    message: Option<StoredMessage<P>>,
    /// Visibility deadline while in flight; NaN while visible (an `Option<f64>` would cost 8 B).
    deadline: f64,
}

/// Counters and timestamps behind `QueueAttributes`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreStats {
    /// Visible messages.
    pub visible: usize,
    /// Received messages whose visibility has not expired.
    pub in_flight: usize,
    /// Messages not yet visible that were never received (no delays yet: always 0).
    pub delayed: usize,
    /// Messages moved to the dead-letter store or dropped by the `max_receive_count` rule.
    pub dead_lettered: u64,
    /// Messages dropped because they outlived the retention period.
    pub expired: u64,
    /// When the store was created.
    pub created_at: f64,
    /// The last time the store's contents changed.
    pub last_modified_at: f64,
}

/// An in-memory queue with SQS semantics, generic over the payload type, with an optional
/// second ranking `R` of its visible messages kept beside the candidate index.
pub struct Store<P, R: Ranking = ()> {
    config: StoreConfig,
    slots: Vec<Slot<P>>,
    /// Vacant slots, each with the generation its next message starts from.
    free: Vec<(u32, u32)>,
    ids: HashTable<u32>,
    hasher: RandomState,
    index: VisibleIndex,
    ranking: R,
    in_flight: BTreeSet<(OrdTime, u32)>,
    tenants: Tenants,
    /// The instant of the latest operation (what tenant idleness is timed by).
    now: f64,
    epoch: u64,
    created_at: f64,
    last_modified_at: f64,
    last_enqueued_at: f64,
    dead_lettered: u64,
    expired: u64,
    outbox: Vec<StoredMessage<P>>,
    dropped: Vec<P>,
}

fn check_visibility_timeout(seconds: f64) -> CoreResult<()> {
    if (0.0..=MAX_VISIBILITY_TIMEOUT).contains(&seconds) {
        Ok(())
    } else {
        Err(CoreError::InvalidRequest(format!(
            "visibility_timeout must be within [0, 43200] seconds, got {seconds:?}"
        )))
    }
}

fn stale_handle(handle: &str) -> CoreError {
    CoreError::ReceiptHandle(format!(
        "receipt handle {} is unknown or no longer current (the message was received \
         again, deleted, dead-lettered or purged)",
        py_repr(handle)
    ))
}

impl<P> Store<P> {
    /// An empty store created at `now`, without a second ranking.
    pub fn new(config: StoreConfig, now: f64) -> CoreResult<Self> {
        Self::with_ranking(config, now, ())
    }
}

impl<P, R: Ranking> Store<P, R> {
    /// An empty store created at `now`, keeping `ranking` beside its index.
    pub fn with_ranking(config: StoreConfig, now: f64, ranking: R) -> CoreResult<Self> {
        config.validate()?;
        Ok(Self {
            config,
            slots: Vec::new(),
            free: Vec::new(),
            ids: HashTable::new(),
            hasher: RandomState::new(),
            index: VisibleIndex::default(),
            ranking,
            in_flight: BTreeSet::new(),
            tenants: Tenants::default(),
            now,
            epoch: random_u64(),
            created_at: now,
            last_modified_at: now,
            last_enqueued_at: f64::NEG_INFINITY,
            dead_lettered: 0,
            expired: 0,
            outbox: Vec::new(),
            dropped: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// The candidate index of the visible messages.
    pub fn index(&self) -> &VisibleIndex {
        &self.index
    }

    /// The second ranking.
    pub fn ranking(&self) -> &R {
        &self.ranking
    }

    /// The second ranking, to replace or configure it; after replacing it, call
    /// [`Store::rebuild_ranking`].
    pub fn ranking_mut(&mut self) -> &mut R {
        &mut self.ranking
    }

    /// Tells the second ranking about every visible message (after it was replaced).
    pub fn rebuild_ranking(&mut self) {
        self.ranking.clear();
        for (slot, s) in self.slots.iter().enumerate() {
            if let (Some(message), true) = (&s.message, s.deadline.is_nan()) {
                self.ranking.insert(slot as u32, &message.index_entry());
            }
        }
    }

    // ----- reading -------------------------------------------------------------------------

    /// The visible messages by cell: each cell maps sequence number to slot, oldest first
    /// (sequence order is `enqueued_at` order). Empty cells are never present.
    pub fn visible_cells(&self) -> &std::collections::BTreeMap<CellKey, Cell> {
        self.index.cells()
    }

    /// The message in `slot`; panics when the slot is vacant (slots from the store are not).
    pub fn message(&self, slot: u32) -> &StoredMessage<P> {
        self.get(slot).expect("slot holds no message")
    }

    /// The message in `slot`, if any.
    pub fn get(&self, slot: u32) -> Option<&StoredMessage<P>> {
        self.slots.get(slot as usize).and_then(|s| s.message.as_ref())
    }

    /// Whether the message in `slot` is visible (None for a vacant slot).
    pub fn is_visible(&self, slot: u32) -> Option<bool> {
        let s = self.slots.get(slot as usize)?;
        s.message.as_ref().map(|_| s.deadline.is_nan())
    }

    /// The slot of a message with this request id (one of them, in a dead-letter store that
    /// holds several).
    pub fn slot_of(&self, request_id: &str) -> Option<u32> {
        self.slot_of_hashed(request_id, self.hasher.hash_one(request_id))
    }

    fn slot_of_hashed(&self, request_id: &str, hash: u64) -> Option<u32> {
        let slots = &self.slots;
        self.ids.find(hash, |&s| slot_id(slots, s) == Some(request_id)).copied()
    }

    /// The name of an interned tenant ("" for requests without one, and for a number the store
    /// no longer knows).
    pub fn tenant_name(&self, tenant: u32) -> &str {
        self.tenants.name(tenant)
    }

    /// The interned number of a tenant name, if the store knows it.
    pub fn tenant_id(&self, name: &str) -> Option<u32> {
        self.tenants.id(name)
    }

    /// Every tenant the store knows (see `tenants`), with its visible and in-flight counts.
    pub fn tenant_counts(&self) -> impl Iterator<Item = (&str, TenantCounts)> {
        self.tenants.iter().map(|(_, name, counts)| (name, counts))
    }

    /// Every known tenant: its number, name and message counts.
    pub fn tenant_counts_by_id(&self) -> impl Iterator<Item = (u32, &str, TenantCounts)> {
        self.tenants.iter()
    }

    /// Tenants the store knows: those with messages, pinned ones, and idle ones not yet
    /// forgotten (see [`Store::set_tenant_retention`]).
    pub fn known_tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Keeps a tenant that holds no message for `seconds` before forgetting it (0 by default;
    /// a `fair_priority` dispatcher sets its fairness window, over which a tenant's token use
    /// still counts).
    pub fn set_tenant_retention(&mut self, seconds: f64) {
        self.tenants.retention = seconds.max(0.0);
    }

    /// Visible messages.
    pub fn visible_count(&self) -> usize {
        self.index.len()
    }

    /// In-flight messages.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Visible messages per priority.
    pub fn counts_by_priority(&self) -> [usize; PRIORITIES] {
        self.index.counts_by_priority()
    }

    /// The earliest in-flight visibility deadline: when the next message may become visible.
    pub fn next_visibility_change(&self) -> Option<f64> {
        self.in_flight.first().map(|(deadline, _)| deadline.0)
    }

    /// `enqueued_at` of the oldest visible message.
    pub fn oldest_enqueued_at(&self) -> Option<f64> {
        let (_, slot) = self.index.oldest()?;
        Some(self.message(slot).enqueued_at)
    }

    /// `enqueued_at` of the oldest visible message of each priority, URGENT first.
    pub fn oldest_enqueued_by_priority(&self) -> [Option<f64>; PRIORITIES] {
        self.index.oldest_by_priority().map(|slot| slot.map(|s| self.message(s).enqueued_at))
    }

    /// Counters and timestamps.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            visible: self.visible_count(),
            in_flight: self.in_flight_count(),
            delayed: 0,
            dead_lettered: self.dead_lettered,
            expired: self.expired,
            created_at: self.created_at,
            last_modified_at: self.last_modified_at,
        }
    }

    /// Up to `limit` visible messages of `priority` in receive order, without receiving them.
    pub fn peek(&self, priority: u8, limit: usize) -> Vec<u32> {
        self.index.peek(priority, limit)
    }

    // ----- writing -------------------------------------------------------------------------

    /// Enqueues one message; returns its slot.
    pub fn enqueue(&mut self, message: NewMessage<P>, now: f64) -> CoreResult<u32> {
        self.maintain(now);
        message.validate()?;
        if self.slot_of(&message.request_id).is_some() {
            return Err(duplicate(&message.request_id));
        }
        let id = take_message_ids(1);
        Ok(self.insert(message, id, now))
    }

    /// Enqueues messages dead-lettered by another store, as new messages. Unlike `enqueue`, a
    /// request id already here is no obstacle: a dead-letter store keeps every copy (dropping
    /// one would lose it). Returns their slots.
    pub fn enqueue_dead_letters(&mut self, messages: Vec<NewMessage<P>>, now: f64) -> Vec<u32> {
        self.maintain(now);
        let first_id = take_message_ids(messages.len() as u64);
        messages.into_iter().zip(first_id..).map(|(message, id)| self.insert(message, id, now)).collect()
    }

    /// Enqueues a batch, validated whole first (fields, ids already queued, ids repeated within
    /// the batch): on any error nothing is enqueued and `messages` is left as it was (the caller
    /// drops it, after its lock), else it is emptied. Returns the slots in batch order; the
    /// messages' ids are consecutive in that order and they share one `enqueued_at`.
    pub fn enqueue_batch(&mut self, messages: &mut Vec<NewMessage<P>>, now: f64) -> CoreResult<Vec<u32>> {
        self.maintain(now);
        // Each id is hashed once: the hash serves the duplicate checks and the id table.
        let mut hashes = Vec::with_capacity(messages.len());
        let mut seen = HashTable::<usize>::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            message.validate()?;
            let id: &str = &message.request_id;
            let hash = self.hasher.hash_one(id);
            if self.slot_of_hashed(id, hash).is_some() {
                return Err(duplicate(id));
            }
            if seen.find(hash, |&j| &*messages[j].request_id == id).is_some() {
                return Err(CoreError::DuplicateRequest(format!(
                    "id {} appears more than once in the batch",
                    py_repr(id)
                )));
            }
            hashes.push(hash);
            seen.insert_unique(hash, i, |&j| hashes[j]);
        }
        drop(seen);
        let first_id = take_message_ids(messages.len() as u64);
        self.slots.reserve(messages.len().saturating_sub(self.free.len()));
        self.ids.reserve(messages.len(), |&s| self.hasher.hash_one(slot_id(&self.slots, s).unwrap_or("")));
        // Tenant counts are added once per run of one tenant (a batch is mostly one).
        let mut run: Option<(u32, usize)> = None;
        // The entries are collected in place of the messages they come from (`Vec`'s in-place
        // collect: same alignment, smaller items), in memory already touched: a new vector of a
        // large batch's size would be fresh pages, each a page fault.
        let mut entries: Vec<(u32, IndexEntry)> = std::mem::take(messages)
            .into_iter()
            .enumerate()
            .map(|(i, message)| {
                let slot = self.place(message, first_id + i as u64, now, hashes[i]);
                let entry = self.message(slot).index_entry();
                self.ranking.insert(slot, &entry);
                run = match run {
                    Some((tenant, n)) if tenant == entry.tenant => Some((tenant, n + 1)),
                    other => {
                        if let Some((tenant, n)) = other {
                            self.tenants.change(tenant, self.now, |t| t.counts.visible += n);
                        }
                        Some((entry.tenant, 1))
                    }
                };
                (slot, entry)
            })
            .collect();
        let slots = entries.iter().map(|&(slot, _)| slot).collect();
        if let Some((tenant, n)) = run {
            self.tenants.change(tenant, self.now, |t| t.counts.visible += n);
        }
        // The candidate index takes the batch whole, sorted by cell (see `insert_batch`).
        self.index.insert_batch(&mut entries);
        Ok(slots)
    }

    /// Receives up to `limit` visible messages in receive order (priority, then oldest), each
    /// made invisible for `visibility_timeout` seconds. Returns `(slot, handle)` pairs.
    pub fn receive(
        &mut self,
        limit: usize,
        visibility_timeout: f64,
        now: f64,
    ) -> CoreResult<Vec<(u32, ReceiptHandle)>> {
        check_visibility_timeout(visibility_timeout)?;
        self.maintain(now);
        let mut out = Vec::with_capacity(limit.min(self.visible_count()));
        while out.len() < limit {
            let Some((_, slot)) = self.index.next_to_receive() else { break };
            out.push((slot, self.receive_visible(slot, visibility_timeout, now)));
        }
        Ok(out)
    }

    /// Receives one specific visible message (the one selection chose). Errors with
    /// `MessageState` when the slot holds no visible message; nothing changes then.
    pub fn receive_slot(
        &mut self,
        slot: u32,
        visibility_timeout: f64,
        now: f64,
    ) -> CoreResult<ReceiptHandle> {
        check_visibility_timeout(visibility_timeout)?;
        self.maintain(now);
        if self.is_visible(slot) != Some(true) {
            return Err(CoreError::MessageState(format!("slot {slot} holds no visible message")));
        }
        Ok(self.receive_visible(slot, visibility_timeout, now))
    }

    /// Gives a received message back unprocessed, as if the receive that issued `handle` had
    /// not happened (a dispatch that could not hand it out, a job given back because its worker
    /// stopped): the message is visible again at once, with its receive count and first receive
    /// as they were before (a first receive is forgotten), so a stop never uses up a receive
    /// toward `max_receive_count`. The handle becomes stale. A stale or unknown handle changes
    /// nothing.
    pub fn release(&mut self, handle: &str, now: f64) -> CoreResult<()> {
        self.maintain(now);
        let slot = self.resolve(handle)?;
        self.detach(slot);
        let message = self.slots[slot as usize].message.as_mut().expect("a current handle names a message");
        message.generation = message.generation.wrapping_add(1);
        message.receive_count = message.receive_count.saturating_sub(1);
        if message.receive_count == 0 {
            message.first_received = f64::NAN;
        }
        self.make_visible(slot);
        self.last_modified_at = now;
        Ok(())
    }

    /// Deletes the message `handle` names and returns it. A stale or unknown handle errors with
    /// `ReceiptHandle` and changes nothing.
    pub fn delete(&mut self, handle: &str, now: f64) -> CoreResult<StoredMessage<P>> {
        self.maintain(now);
        let slot = self.resolve(handle)?;
        self.detach(slot);
        self.last_modified_at = now;
        Ok(self.release_slot(slot))
    }

    /// Dead-letters the message `handle` names at once, whatever its receive count (a handler
    /// found it can never succeed): it goes to the outbox, or is dropped, and is counted, as
    /// the `max_receive_count` rule does. A stale or unknown handle changes nothing.
    pub fn dead_letter_now(&mut self, handle: &str, now: f64) -> CoreResult<()> {
        self.maintain(now);
        let slot = self.resolve(handle)?;
        self.detach(slot);
        self.last_modified_at = now;
        self.dead_lettered += 1;
        let message = self.release_slot(slot);
        self.send_to_outbox(message);
        Ok(())
    }

    /// Dead-letters a visible message at once (its deadline passed: `drop_expired`), counted
    /// as dead-lettered; returns its request id. Errors when the slot holds no visible message.
    pub fn dead_letter_visible(&mut self, slot: u32, now: f64) -> CoreResult<Box<str>> {
        if self.is_visible(slot) != Some(true) {
            return Err(CoreError::MessageState(format!("slot {slot} holds no visible message")));
        }
        self.now = now;
        self.hide(slot);
        self.last_modified_at = now;
        self.dead_lettered += 1;
        let message = self.release_slot(slot);
        let id = (&message.request_id).into();
        self.send_to_outbox(message);
        Ok(id)
    }

    /// Removes the visible message of `request_id` unprocessed (its submitter withdrew it before
    /// any dispatch) and returns it; `None`, changing nothing, when no message of that id is
    /// visible (none, or one received and in flight: its handler decides).
    pub fn withdraw_visible(&mut self, request_id: &str, now: f64) -> Option<StoredMessage<P>> {
        self.maintain(now);
        let slot = self.slot_of(request_id)?;
        if self.is_visible(slot) != Some(true) {
            return None;
        }
        self.hide(slot);
        self.last_modified_at = now;
        Some(self.release_slot(slot))
    }

    /// Interns a tenant name for a configuration that names tenants before their messages; the
    /// store never forgets it.
    pub fn intern_tenant(&mut self, name: &str) -> u32 {
        let id = self.tenants.intern(Some(name));
        self.tenants.pin(id);
        id
    }

    /// Makes the message `handle` names invisible for `visibility_timeout` seconds from `now`
    /// (0 makes it visible at once). Works on a message whose visibility already ran out as long
    /// as the handle is current. Bad timeout or handle: an error and nothing changes.
    pub fn change_visibility(&mut self, handle: &str, visibility_timeout: f64, now: f64) -> CoreResult<()> {
        check_visibility_timeout(visibility_timeout)?;
        self.maintain(now);
        let slot = self.resolve(handle)?;
        self.detach(slot);
        let deadline = now + visibility_timeout;
        self.slots[slot as usize].deadline = deadline;
        self.in_flight.insert((OrdTime(deadline), slot));
        self.count_tenant(slot, |c| c.in_flight += 1);
        self.last_modified_at = now;
        // A zero timeout makes the message visible now, not at the next operation.
        self.maintain(now);
        Ok(())
    }

    /// Removes every message (visible and in flight) and invalidates every receipt handle.
    /// Returns the payloads so the caller decides where they are released.
    pub fn purge(&mut self, now: f64) -> Vec<P> {
        self.maintain(now);
        self.purge_inner(now)
    }

    fn purge_inner(&mut self, now: f64) -> Vec<P> {
        let payloads: Vec<P> = self.slots.drain(..).filter_map(|s| s.message.map(|m| m.payload)).collect();
        self.free.clear();
        self.ids.clear();
        self.index.clear();
        self.ranking.clear();
        self.in_flight.clear();
        self.tenants.purged(now);
        // The slab restarts at generation 0; a new epoch keeps every old handle refused.
        self.epoch = random_u64();
        self.last_modified_at = now;
        payloads
    }

    /// Empties the store without maintenance, pending outboxes included, and returns every
    /// payload (for a garbage collector's `__clear__`).
    pub fn clear(&mut self, now: f64) -> Vec<P> {
        let mut payloads = self.purge_inner(now);
        let outbox = std::mem::take(&mut self.outbox);
        for m in &outbox {
            self.tenants.change(m.tenant, now, |t| t.outbox -= 1);
        }
        payloads.extend(outbox.into_iter().map(|m| m.payload));
        payloads.append(&mut self.dropped);
        payloads
    }

    /// Every payload the store holds, pending outboxes included (for `__traverse__`).
    pub fn payloads(&self) -> impl Iterator<Item = &P> {
        self.slots
            .iter()
            .filter_map(|s| s.message.as_ref().map(|m| &m.payload))
            .chain(self.outbox.iter().map(|m| &m.payload))
            .chain(self.dropped.iter())
    }

    /// The maintenance step: expired in-flight messages become visible again (or are
    /// dead-lettered), visible messages past retention are dropped. Returns the messages
    /// dead-lettered so far (by this call or by operations since the last drain) for the caller
    /// to move to the dead-letter store.
    pub fn release_expired(&mut self, now: f64) -> Vec<StoredMessage<P>> {
        self.maintain(now);
        self.take_dead_lettered()
    }

    /// Drains the dead-letter outbox: messages dead-lettered (and counted) here, for the caller
    /// to move to the dead-letter store.
    /// Their tenants stay known until the next operation, so the caller can read their names.
    pub fn take_dead_lettered(&mut self) -> Vec<StoredMessage<P>> {
        let outbox = std::mem::take(&mut self.outbox);
        for m in &outbox {
            self.tenants.change(m.tenant, self.now, |t| t.outbox -= 1);
        }
        outbox
    }

    /// Puts back dead letters the dead-letter store could not take: they wait in the outbox
    /// for the next hand-off (still counted once).
    pub fn return_dead_letters(&mut self, mut messages: Vec<StoredMessage<P>>) {
        for m in &messages {
            self.tenants.change(m.tenant, self.now, |t| t.outbox += 1);
        }
        messages.append(&mut self.outbox);
        self.outbox = messages;
    }

    /// Drains the payloads of messages dropped by retention.
    pub fn take_dropped(&mut self) -> Vec<P> {
        std::mem::take(&mut self.dropped)
    }

    // ----- internals -----------------------------------------------------------------------

    fn maintain(&mut self, now: f64) {
        self.now = now;
        self.tenants.reclaim(now);
        while let Some(&(OrdTime(deadline), slot)) = self.in_flight.first() {
            if deadline > now {
                break;
            }
            self.in_flight.pop_first();
            self.slots[slot as usize].deadline = f64::NAN;
            self.count_tenant(slot, |c| c.in_flight -= 1);
            self.last_modified_at = self.last_modified_at.max(deadline);
            let message = self.message(slot);
            if now - message.enqueued_at > self.config.message_retention {
                // Past retention: dropped instead of coming back (SQS deletes it too).
                self.expired += 1;
                let message = self.release_slot(slot);
                self.dropped.push(message.payload);
            } else if self.config.max_receive_count.is_some_and(|max| message.receive_count >= max) {
                self.dead_lettered += 1;
                let message = self.release_slot(slot);
                self.send_to_outbox(message);
            } else {
                self.make_visible(slot);
            }
        }
        while let Some((_, slot)) = self.index.oldest() {
            if now - self.message(slot).enqueued_at <= self.config.message_retention {
                break;
            }
            self.hide(slot);
            self.expired += 1;
            self.last_modified_at = now;
            let message = self.release_slot(slot);
            self.dropped.push(message.payload);
        }
    }

    fn count_tenant(&mut self, slot: u32, change: impl FnOnce(&mut TenantCounts)) {
        let tenant = self.message(slot).tenant;
        self.tenants.change(tenant, self.now, |t| change(&mut t.counts));
    }

    /// Puts a dead-lettered message in the outbox (its tenant stays known while it is there).
    fn send_to_outbox(&mut self, message: StoredMessage<P>) {
        self.tenants.change(message.tenant, self.now, |t| t.outbox += 1);
        self.outbox.push(message);
    }

    /// Puts a message that is in no set into the visible index (and the second ranking).
    fn make_visible(&mut self, slot: u32) {
        let entry = self.message(slot).index_entry();
        self.index.insert(slot, &entry);
        self.ranking.insert(slot, &entry);
        self.tenants.change(entry.tenant, self.now, |t| t.counts.visible += 1);
    }

    /// Takes a visible message out of the visible index (and the second ranking).
    fn hide(&mut self, slot: u32) {
        let entry = self.message(slot).index_entry();
        let slots = &self.slots;
        let enqueued_at_of = |s: u32| slots[s as usize].message.as_ref().map_or(f64::NAN, |m| m.enqueued_at);
        self.index.remove(&entry, enqueued_at_of);
        self.ranking.remove(slot, &entry);
        self.tenants.change(entry.tenant, self.now, |t| t.counts.visible -= 1);
    }

    fn insert(&mut self, message: NewMessage<P>, id: u64, now: f64) -> u32 {
        let hash = self.hasher.hash_one(&*message.request_id);
        let slot = self.place(message, id, now, hash);
        self.make_visible(slot);
        slot
    }

    /// Stores a message in a slot and its id (of `hash`) in the id table; the caller makes it
    /// visible.
    fn place(&mut self, message: NewMessage<P>, id: u64, now: f64, hash: u64) -> u32 {
        // Clamp so that sequence order stays age order even if the clock steps back.
        let enqueued_at = now.max(self.last_enqueued_at);
        self.last_enqueued_at = enqueued_at;
        self.last_modified_at = now;
        let tenant = self.tenants.intern(message.tenant.as_deref());
        let stored = StoredMessage {
            request_id: message.request_id,
            payload: message.payload,
            tokens: message.tokens,
            expected_processing: message.expected_processing_seconds.unwrap_or(f64::NAN),
            enqueued_at,
            first_received: f64::NAN,
            message_id: id,
            receive_count: 0,
            tenant,
            deadline: message.deadline.unwrap_or(f64::NAN),
            generation: 0,
            priority: message.priority,
        };
        let slot = if let Some((slot, generation)) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.message = Some(StoredMessage { generation, ..stored });
            s.deadline = f64::NAN;
            slot
        } else {
            let slot = u32::try_from(self.slots.len()).expect("more than 2^32 messages");
            self.slots.push(Slot { message: Some(stored), deadline: f64::NAN });
            slot
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.ids.insert_unique(hash, slot, |&s| hasher.hash_one(slot_id(slots, s).unwrap_or("")));
        slot
    }

    fn receive_visible(&mut self, slot: u32, visibility_timeout: f64, now: f64) -> ReceiptHandle {
        self.hide(slot);
        let deadline = now + visibility_timeout;
        let s = &mut self.slots[slot as usize];
        let message = s.message.as_mut().expect("visible slot holds a message");
        message.receive_count = message.receive_count.saturating_add(1);
        if message.first_received.is_nan() {
            message.first_received = now;
        }
        // Wrapping: a handle could only be confused with one 2^32 receives of this slot older.
        message.generation = message.generation.wrapping_add(1);
        let generation = message.generation;
        s.deadline = deadline;
        self.in_flight.insert((OrdTime(deadline), slot));
        self.count_tenant(slot, |c| c.in_flight += 1);
        self.last_modified_at = now;
        ReceiptHandle { epoch: self.epoch, slot, generation }
    }

    /// The slot a current handle names, in O(1).
    fn resolve(&self, handle: &str) -> CoreResult<u32> {
        let parsed = ReceiptHandle::parse(handle).ok_or_else(|| stale_handle(handle))?;
        match self.slots.get(parsed.slot as usize) {
            Some(s)
                if parsed.epoch == self.epoch
                    && s.message
                        .as_ref()
                        .is_some_and(|m| m.generation == parsed.generation && m.receive_count > 0) =>
            {
                Ok(parsed.slot)
            }
            _ => Err(stale_handle(handle)),
        }
    }

    /// Takes the message in `slot` out of the visible index or the in-flight set.
    fn detach(&mut self, slot: u32) {
        let deadline = self.slots[slot as usize].deadline;
        if deadline.is_nan() {
            self.hide(slot);
        } else {
            self.in_flight.remove(&(OrdTime(deadline), slot));
            self.slots[slot as usize].deadline = f64::NAN;
            self.count_tenant(slot, |c| c.in_flight -= 1);
        }
    }

    /// Frees a detached slot: removes the id, bumps the generation, returns the message.
    fn release_slot(&mut self, slot: u32) -> StoredMessage<P> {
        let s = &mut self.slots[slot as usize];
        let message = s.message.take().expect("slot holds a message");
        s.deadline = f64::NAN;
        let hash = self.hasher.hash_one(&*message.request_id);
        if let Ok(entry) = self.ids.find_entry(hash, |&x| x == slot) {
            entry.remove();
        }
        self.free.push((slot, message.generation.wrapping_add(1)));
        message
    }
}

pub(crate) fn slot_id<P>(slots: &[Slot<P>], slot: u32) -> Option<&str> {
    slots.get(slot as usize).and_then(|s| s.message.as_ref()).map(|m| &*m.request_id)
}

fn duplicate(id: &str) -> CoreError {
    CoreError::DuplicateRequest(format!("id {} is already in the queue and not yet deleted", py_repr(id)))
}

/// A string quoted the way Python's `repr` quotes it, so messages read the same from every layer.
pub fn py_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests;
