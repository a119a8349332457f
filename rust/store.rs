//! The in-memory queue store: SQS semantics (visibility timeouts, receipt handles, receive counts,
//! dead-lettering, retention) over a layout the exact selection search can walk.
//!
//! Layout. Messages live in a slab (`Vec` of slots plus a free list; a slot index is a `u32`).
//! Request ids map to slots through a `hashbrown::HashTable<u32>` that hashes the id stored in
//! the slot, so an id is stored once (a `HashMap<Box<str>, u32>` would store it twice and double
//! the table's footprint; see the memory note below). Visible messages are grouped in cells
//! ([`CellKey`]); a cell is a `BTreeMap<seq, slot>`, oldest first. In-flight messages sit in a
//! `BTreeSet<(deadline, slot)>`, so expiry costs O(log n) per expired message. Two small sets of
//! cell heads (one ordered by priority then age, one by age) give the receive order and the
//! oldest visible message in O(log cells).
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
//! ([`Store::take_dead_lettered`], or the return value of `release_expired`) to move them to the
//! dead-letter store; payloads of dropped messages wait in [`Store::take_dropped`] so a Python
//! layer can release them after unlocking.
//!
//! Memory at 1M queued messages (`P` = one pointer): slot 104 B, request id heap block ~32 B,
//! hash table ~10 B (2^21 buckets of 4 B + 1 control byte), cell B-tree ~25 B: ~170 B.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::OnceLock;

use hashbrown::HashTable;

use crate::cells::CellKey;
use crate::errors::{CoreError, CoreResult};
use crate::select::CellSummary;

/// Longest visibility timeout in seconds (12 hours, as in SQS).
pub const MAX_VISIBILITY_TIMEOUT: f64 = 43_200.0;
/// Default retention period in seconds (4 days, as in SQS).
pub const DEFAULT_MESSAGE_RETENTION: f64 = 345_600.0;
/// Number of priorities (0 = URGENT ..= 3 = LOW).
pub const PRIORITIES: usize = 4;

/// An `f64` with a total order, for B-tree keys. The store never builds one from NaN.
#[derive(Debug, Clone, Copy)]
pub struct OrdTime(pub f64);

impl PartialEq for OrdTime {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for OrdTime {}
impl PartialOrd for OrdTime {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdTime {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One message held by the store. Fields are public so selection and the Python layer can read
/// them without copies; only the store mutates them.
#[derive(Debug)]
pub struct StoredMessage<P> {
    /// The request's id (unique among messages in the store).
    pub request_id: Box<str>,
    /// The caller's object (the `LLMRequest` in the Python layer), kept by reference.
    pub payload: P,
    /// Estimated tokens.
    pub tokens: u64,
    /// Expected processing time in seconds, when given.
    pub expected_processing_seconds: Option<f64>,
    /// When the message was enqueued (clock seconds; never decreases within a store).
    pub enqueued_at: f64,
    /// When the message was first received, once it has been.
    pub first_received_at: Option<f64>,
    /// Storage-assigned id, unique in the process and increasing in enqueue order; it is also the
    /// message's sequence number. [`format_message_id`] gives its string form.
    pub message_id: u64,
    /// How many times the message has been received.
    pub receive_count: u32,
    /// 0 (URGENT) ..= 3 (LOW).
    pub priority: u8,
}

impl<P> StoredMessage<P> {
    /// The cell this message belongs to while visible.
    pub fn cell_key(&self) -> CellKey {
        CellKey::for_message(self.priority, self.receive_count, self.tokens)
    }
}

/// What a caller hands to [`Store::enqueue`].
#[derive(Debug)]
pub struct NewMessage<P> {
    /// Non-empty, unique among messages in the store.
    pub request_id: Box<str>,
    /// The caller's object.
    pub payload: P,
    /// 0 ..= 3.
    pub priority: u8,
    /// Estimated tokens.
    pub tokens: u64,
    /// None, or a finite number of seconds >= 0.
    pub expected_processing_seconds: Option<f64>,
}

impl<P> NewMessage<P> {
    /// Checks the fields with the same rules (and messages) as `LLMRequest.validate`.
    pub fn validate(&self) -> CoreResult<()> {
        if self.request_id.is_empty() {
            return Err(CoreError::InvalidRequest("id must be a non-empty str, got ''".into()));
        }
        if usize::from(self.priority) >= PRIORITIES {
            return Err(CoreError::InvalidRequest(format!(
                "priority must be within 0..3, got {}",
                self.priority
            )));
        }
        if let Some(seconds) = self.expected_processing_seconds {
            if !seconds.is_finite() || seconds < 0.0 {
                return Err(CoreError::InvalidRequest(format!(
                    "expected_processing_time must be None or a finite number of seconds >= 0, \
                     got {seconds:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Configuration of a store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreConfig {
    /// Receives after which an expiring message is dead-lettered; None = never.
    pub max_receive_count: Option<u32>,
    /// Seconds after enqueue after which a message is dropped (may be infinite).
    pub message_retention: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { max_receive_count: None, message_retention: DEFAULT_MESSAGE_RETENTION }
    }
}

impl StoreConfig {
    /// Checks the configuration: `max_receive_count >= 1`, retention > 0 (infinite allowed).
    pub fn validate(&self) -> CoreResult<()> {
        if self.max_receive_count == Some(0) {
            return Err(CoreError::InvalidConfig(
                "max_receive_count must be None or an int >= 1, got 0".into(),
            ));
        }
        if self.message_retention.is_nan() || self.message_retention <= 0.0 {
            return Err(CoreError::InvalidConfig(format!(
                "message_retention must be a number of seconds > 0, got {:?}",
                self.message_retention
            )));
        }
        Ok(())
    }
}

/// A receipt handle: which slot, which receive of it, and which epoch of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptHandle {
    /// The store's handle epoch (random, renewed by `purge`).
    pub epoch: u64,
    /// Slab slot of the message.
    pub slot: u32,
    /// The slot's generation at the receive that issued this handle.
    pub generation: u32,
}

impl ReceiptHandle {
    /// Length of the string form: 32 lowercase hex digits.
    pub const LEN: usize = 32;

    /// Parses the string form; None for anything that is not exactly 32 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != Self::LEN {
            return None;
        }
        Some(Self {
            epoch: parse_hex(&bytes[..16])?,
            slot: parse_hex(&bytes[16..24])? as u32,
            generation: parse_hex(&bytes[24..])? as u32,
        })
    }
}

impl ReceiptHandle {
    /// Writes the string form into `out` without allocating and returns it.
    pub fn encode_into<'a>(&self, out: &'a mut [u8; Self::LEN]) -> &'a str {
        write_hex(&mut out[..16], self.epoch);
        write_hex(&mut out[16..24], u64::from(self.slot));
        write_hex(&mut out[24..], u64::from(self.generation));
        // Hex digits are ASCII.
        std::str::from_utf8(out).unwrap_or_default()
    }
}

impl fmt::Display for ReceiptHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode_into(&mut [0u8; Self::LEN]))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    // Only lowercase hex: `u64::from_str_radix` would also take a sign and uppercase, which
    // would let several strings name one handle.
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u64::from(v))
    })
}

fn random_u64() -> u64 {
    // std's RandomState is seeded from the OS and advanced per instance: enough for ids that
    // must not collide across stores or processes, without another dependency.
    RandomState::new().hash_one(0x5eed_u64)
}

fn process_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(random_u64)
}

/// Message ids come from one process-wide counter, so they are unique across stores (a message
/// moved to a dead-letter store gets a new one there) and increase within each store.
static NEXT_MESSAGE_ID: AtomicU64 = AtomicU64::new(1);

fn take_message_ids(count: u64) -> u64 {
    NEXT_MESSAGE_ID.fetch_add(count, AtomicOrdering::Relaxed)
}

/// Length of [`format_message_id`]'s output.
pub const MESSAGE_ID_LEN: usize = 36;

/// Writes the string form of a message id (UUID-shaped: the process nonce, then the id) into
/// `out`, returning it as `&str`.
pub fn format_message_id_into(id: u64, out: &mut [u8; MESSAGE_ID_LEN]) -> &str {
    let nonce = process_nonce();
    write_hex(&mut out[0..8], nonce >> 32);
    out[8] = b'-';
    write_hex(&mut out[9..13], (nonce >> 16) & 0xffff);
    out[13] = b'-';
    write_hex(&mut out[14..18], nonce & 0xffff);
    out[18] = b'-';
    write_hex(&mut out[19..23], id >> 48);
    out[23] = b'-';
    write_hex(&mut out[24..36], id & 0xffff_ffff_ffff);
    // Every byte written above is ASCII.
    std::str::from_utf8(out).unwrap_or_default()
}

/// The string form of a message id.
pub fn format_message_id(id: u64) -> String {
    let mut buf = [0u8; MESSAGE_ID_LEN];
    format_message_id_into(id, &mut buf).to_owned()
}

struct Slot<P> {
    message: Option<StoredMessage<P>>,
    /// Visibility deadline while in flight; NaN while visible (an `Option<f64>` would cost 8 B).
    deadline: f64,
    /// Bumped by every receive and every release of the slot; handles must match it.
    generation: u32,
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

/// An in-memory queue with SQS semantics, generic over the payload type.
pub struct Store<P> {
    config: StoreConfig,
    slots: Vec<Slot<P>>,
    free: Vec<u32>,
    ids: HashTable<u32>,
    hasher: RandomState,
    cells: BTreeMap<CellKey, Cell>,
    /// The same visible messages again, by group: the members of a cell with the same token
    /// estimate, ordered by processing-time key (best processing-time factor first), then age.
    /// Selection scores run heads only (see `select`).
    groups: BTreeMap<GroupId, BTreeMap<(u64, u64), u32>>,
    /// `(priority, head seq, cell)` of every non-empty cell: its first element is the next
    /// message to receive.
    receive_heads: BTreeSet<(u8, u64, CellKey)>,
    /// `(head seq, cell)` of every non-empty cell: its first element is the oldest visible message.
    age_heads: BTreeSet<(u64, CellKey)>,
    in_flight: BTreeSet<(OrdTime, u32)>,
    visible_by_priority: [usize; PRIORITIES],
    epoch: u64,
    created_at: f64,
    last_modified_at: f64,
    last_enqueued_at: f64,
    dead_lettered: u64,
    expired: u64,
    outbox: Vec<StoredMessage<P>>,
    dropped: Vec<P>,
}

/// A group of a cell: the members with one token estimate.
type GroupId = (CellKey, u64);

fn group_id<P>(key: CellKey, message: &StoredMessage<P>) -> GroupId {
    (key, message.tokens)
}

/// The processing-time key of a message (`cells::time_key`).
fn time_key<P>(message: &StoredMessage<P>) -> u64 {
    crate::cells::time_key(message.tokens, message.expected_processing_seconds)
}

/// The visible messages of one cell, oldest first (dereferences to the `seq -> slot` map), and
/// the multiset of their processing-time keys, whose smallest bounds the cell's
/// processing-time factor exactly.
#[derive(Debug)]
pub struct Cell {
    members: BTreeMap<u64, u32>,
    times: BTreeMap<u64, u32>,
    /// What selection reads first, kept here so that pruning a cell touches no message.
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

impl Cell {
    /// The oldest member's enqueue instant and sequence number, and the best processing time.
    pub fn summary(&self) -> &CellSummary {
        &self.summary
    }

    fn insert(&mut self, seq: u64, slot: u32, time: u64, enqueued_at: f64) {
        if self.members.first_key_value().is_none_or(|(&head, _)| seq < head) {
            self.summary.oldest_seq = seq;
            self.summary.oldest_enqueued_at = enqueued_at;
        }
        self.members.insert(seq, slot);
        *self.times.entry(time).or_default() += 1;
        self.summary.best_time_ms =
            self.times.first_key_value().map_or(1000.0, |(&bits, _)| f64::from_bits(bits));
    }

    /// Removes a member; `enqueued_at_of` gives a slot's enqueue instant for the new head.
    fn remove(&mut self, seq: u64, time: u64, enqueued_at_of: impl Fn(u32) -> f64) -> Option<u32> {
        let slot = self.members.remove(&seq)?;
        if let Some(count) = self.times.get_mut(&time) {
            *count -= 1;
            if *count == 0 {
                self.times.remove(&time);
                self.summary.best_time_ms =
                    self.times.first_key_value().map_or(1000.0, |(&bits, _)| f64::from_bits(bits));
            }
        }
        if seq == self.summary.oldest_seq {
            if let Some((&head, &head_slot)) = self.members.first_key_value() {
                self.summary.oldest_seq = head;
                self.summary.oldest_enqueued_at = enqueued_at_of(head_slot);
            }
        }
        Some(slot)
    }
}

impl std::ops::Deref for Cell {
    type Target = BTreeMap<u64, u32>;

    fn deref(&self) -> &Self::Target {
        &self.members
    }
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
    /// An empty store created at `now`.
    pub fn new(config: StoreConfig, now: f64) -> CoreResult<Self> {
        config.validate()?;
        Ok(Self {
            config,
            slots: Vec::new(),
            free: Vec::new(),
            ids: HashTable::new(),
            hasher: RandomState::new(),
            cells: BTreeMap::new(),
            groups: BTreeMap::new(),
            receive_heads: BTreeSet::new(),
            age_heads: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            visible_by_priority: [0; PRIORITIES],
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

    // ----- reading -------------------------------------------------------------------------

    /// The visible messages by cell: each cell maps sequence number to slot, oldest first
    /// (sequence order is `enqueued_at` order). Empty cells are never present.
    pub fn visible_cells(&self) -> &BTreeMap<CellKey, Cell> {
        &self.cells
    }

    /// Calls `visit` with the first member of every group of the visible cell `key`: a group
    /// holds the members with one token estimate, in runs of equal processing-time key (best
    /// processing-time factor first), each run oldest first.
    /// Also passes the group's estimate, its best processing time in ms, and whether all its
    /// members share one processing-time key (a single run).
    pub fn for_each_group_head_in(&self, key: &CellKey, mut visit: impl FnMut(u32, u64, f64, bool)) {
        for (&(_, tokens), members) in self.groups.range((*key, 0)..=(*key, u64::MAX)) {
            if let (Some((&(time, _), &slot)), Some((&(last, _), _))) =
                (members.first_key_value(), members.last_key_value())
            {
                visit(slot, tokens, f64::from_bits(time), time == last);
            }
        }
    }

    /// The visible member after `slot` in its run (same processing-time key, next oldest).
    pub fn next_in_run_of(&self, slot: u32) -> Option<u32> {
        let message = self.get(slot)?;
        let members = self.groups.get(&group_id(message.cell_key(), message))?;
        let time = time_key(message);
        members.range((time, message.message_id + 1)..=(time, u64::MAX)).next().map(|(_, &s)| s)
    }

    /// The first member of the run after `slot`'s in its group (the next worse
    /// processing-time key), if any.
    pub fn next_run_head_of(&self, slot: u32) -> Option<u32> {
        let message = self.get(slot)?;
        let members = self.groups.get(&group_id(message.cell_key(), message))?;
        let time = time_key(message);
        if time == u64::MAX {
            return None;
        }
        members.range((time + 1, 0)..).next().map(|(_, &s)| s)
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

    /// The slot of the message with this request id.
    pub fn slot_of(&self, request_id: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(request_id);
        let slots = &self.slots;
        self.ids.find(hash, |&s| slot_id(slots, s) == Some(request_id)).copied()
    }

    /// Visible messages.
    pub fn visible_count(&self) -> usize {
        self.visible_by_priority.iter().sum()
    }

    /// In-flight messages.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Visible messages per priority.
    pub fn counts_by_priority(&self) -> [usize; PRIORITIES] {
        self.visible_by_priority
    }

    /// The earliest in-flight visibility deadline: when the next message may become visible.
    pub fn next_visibility_change(&self) -> Option<f64> {
        self.in_flight.first().map(|(deadline, _)| deadline.0)
    }

    /// `enqueued_at` of the oldest visible message.
    pub fn oldest_enqueued_at(&self) -> Option<f64> {
        let (_, slot) = self.oldest_visible()?;
        Some(self.message(slot).enqueued_at)
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
    /// Costs O(cells of that priority + limit · log cells).
    pub fn peek(&self, priority: u8, limit: usize) -> Vec<u32> {
        let (lo, hi) = CellKey::priority_range(priority);
        let mut iters: Vec<_> = self.cells.range(lo..=hi).map(|(_, cell)| cell.iter()).collect();
        let mut heap = BinaryHeap::with_capacity(iters.len());
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some((&seq, &slot)) = it.next() {
                heap.push(Reverse((seq, slot, i)));
            }
        }
        let mut out = Vec::with_capacity(
            limit.min(self.visible_by_priority.get(usize::from(priority)).copied().unwrap_or(0)),
        );
        while out.len() < limit {
            let Some(Reverse((_, slot, i))) = heap.pop() else { break };
            out.push(slot);
            if let Some((&seq, &slot)) = iters[i].next() {
                heap.push(Reverse((seq, slot, i)));
            }
        }
        out
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

    /// Enqueues a batch, validated whole first (fields, ids already queued, ids repeated within
    /// the batch): on any error nothing is enqueued. Returns the slots in batch order.
    pub fn enqueue_batch(&mut self, messages: Vec<NewMessage<P>>, now: f64) -> CoreResult<Vec<u32>> {
        self.maintain(now);
        let mut seen = HashTable::<usize>::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            message.validate()?;
            let id: &str = &message.request_id;
            if self.slot_of(id).is_some() {
                return Err(duplicate(id));
            }
            let hash = self.hasher.hash_one(id);
            if seen.find(hash, |&j| &*messages[j].request_id == id).is_some() {
                return Err(CoreError::DuplicateRequest(format!(
                    "id {} appears more than once in the batch",
                    py_repr(id)
                )));
            }
            seen.insert_unique(hash, i, |&j| self.hasher.hash_one(&*messages[j].request_id));
        }
        drop(seen);
        let first_id = take_message_ids(messages.len() as u64);
        self.slots.reserve(messages.len().saturating_sub(self.free.len()));
        self.ids.reserve(messages.len(), |&s| self.hasher.hash_one(slot_id(&self.slots, s).unwrap_or("")));
        Ok(messages.into_iter().zip(first_id..).map(|(message, id)| self.insert(message, id, now)).collect())
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
            let Some(&(_, seq, key)) = self.receive_heads.first() else { break };
            let slot = self.cells[&key][&seq];
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

    /// Deletes the message `handle` names and returns it. A stale or unknown handle errors with
    /// `ReceiptHandle` and changes nothing.
    pub fn delete(&mut self, handle: &str, now: f64) -> CoreResult<StoredMessage<P>> {
        self.maintain(now);
        let slot = self.resolve(handle)?;
        self.detach(slot);
        self.last_modified_at = now;
        Ok(self.release_slot(slot))
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
        self.cells.clear();
        self.groups.clear();
        self.receive_heads.clear();
        self.age_heads.clear();
        self.in_flight.clear();
        self.visible_by_priority = [0; PRIORITIES];
        // The slab restarts at generation 0; a new epoch keeps every old handle refused.
        self.epoch = random_u64();
        self.last_modified_at = now;
        payloads
    }

    /// Empties the store without maintenance, pending outboxes included, and returns every
    /// payload (for a garbage collector's `__clear__`).
    pub fn clear(&mut self, now: f64) -> Vec<P> {
        let mut payloads = self.purge_inner(now);
        payloads.extend(self.outbox.drain(..).map(|m| m.payload));
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
    /// dead-lettered so far (by this call or by operations since the last drain) for the
    /// caller to move to the dead-letter store.
    pub fn release_expired(&mut self, now: f64) -> Vec<StoredMessage<P>> {
        self.maintain(now);
        self.take_dead_lettered()
    }

    /// Drains the dead-letter outbox.
    pub fn take_dead_lettered(&mut self) -> Vec<StoredMessage<P>> {
        std::mem::take(&mut self.outbox)
    }

    /// Drains the payloads of messages dropped by retention.
    pub fn take_dropped(&mut self) -> Vec<P> {
        std::mem::take(&mut self.dropped)
    }

    // ----- internals -----------------------------------------------------------------------

    fn maintain(&mut self, now: f64) {
        while let Some(&(OrdTime(deadline), slot)) = self.in_flight.first() {
            if deadline > now {
                break;
            }
            self.in_flight.pop_first();
            self.slots[slot as usize].deadline = f64::NAN;
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
                self.outbox.push(message);
            } else {
                let (key, seq) = (message.cell_key(), message.message_id);
                self.cell_insert(key, seq, slot);
            }
        }
        while let Some((seq, key, slot)) = self.oldest_visible_entry() {
            if now - self.message(slot).enqueued_at <= self.config.message_retention {
                break;
            }
            self.cell_remove(key, seq);
            self.expired += 1;
            self.last_modified_at = now;
            let message = self.release_slot(slot);
            self.dropped.push(message.payload);
        }
    }

    fn oldest_visible_entry(&self) -> Option<(u64, CellKey, u32)> {
        let &(seq, key) = self.age_heads.first()?;
        Some((seq, key, self.cells[&key][&seq]))
    }

    fn oldest_visible(&self) -> Option<(u64, u32)> {
        self.oldest_visible_entry().map(|(seq, _, slot)| (seq, slot))
    }

    fn insert(&mut self, message: NewMessage<P>, id: u64, now: f64) -> u32 {
        // Clamp so that sequence order stays age order even if the clock steps back.
        let enqueued_at = now.max(self.last_enqueued_at);
        self.last_enqueued_at = enqueued_at;
        self.last_modified_at = now;
        let stored = StoredMessage {
            request_id: message.request_id,
            payload: message.payload,
            tokens: message.tokens,
            expected_processing_seconds: message.expected_processing_seconds,
            enqueued_at,
            first_received_at: None,
            message_id: id,
            receive_count: 0,
            priority: message.priority,
        };
        let key = stored.cell_key();
        let hash = self.hasher.hash_one(&*stored.request_id);
        let slot = if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.message = Some(stored);
            s.deadline = f64::NAN;
            slot
        } else {
            let slot = u32::try_from(self.slots.len()).expect("more than 2^32 messages");
            self.slots.push(Slot { message: Some(stored), deadline: f64::NAN, generation: 0 });
            slot
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.ids.insert_unique(hash, slot, |&s| hasher.hash_one(slot_id(slots, s).unwrap_or("")));
        self.cell_insert(key, id, slot);
        slot
    }

    fn receive_visible(&mut self, slot: u32, visibility_timeout: f64, now: f64) -> ReceiptHandle {
        let message = self.message(slot);
        let (key, seq) = (message.cell_key(), message.message_id);
        self.cell_remove(key, seq);
        let deadline = now + visibility_timeout;
        let s = &mut self.slots[slot as usize];
        let message = s.message.as_mut().expect("visible slot holds a message");
        message.receive_count = message.receive_count.saturating_add(1);
        message.first_received_at.get_or_insert(now);
        // Wrapping: a handle could only be confused with one 2^32 receives of this slot older.
        s.generation = s.generation.wrapping_add(1);
        s.deadline = deadline;
        self.in_flight.insert((OrdTime(deadline), slot));
        self.last_modified_at = now;
        ReceiptHandle { epoch: self.epoch, slot, generation: s.generation }
    }

    /// The slot a current handle names, in O(1).
    fn resolve(&self, handle: &str) -> CoreResult<u32> {
        let parsed = ReceiptHandle::parse(handle).ok_or_else(|| stale_handle(handle))?;
        match self.slots.get(parsed.slot as usize) {
            Some(s)
                if parsed.epoch == self.epoch
                    && s.generation == parsed.generation
                    && s.message.as_ref().is_some_and(|m| m.receive_count > 0) =>
            {
                Ok(parsed.slot)
            }
            _ => Err(stale_handle(handle)),
        }
    }

    /// Takes the message in `slot` out of the visible cells or the in-flight set.
    fn detach(&mut self, slot: u32) {
        let deadline = self.slots[slot as usize].deadline;
        if deadline.is_nan() {
            let message = self.message(slot);
            let (key, seq) = (message.cell_key(), message.message_id);
            self.cell_remove(key, seq);
        } else {
            self.in_flight.remove(&(OrdTime(deadline), slot));
            self.slots[slot as usize].deadline = f64::NAN;
        }
    }

    /// Frees a detached slot: removes the id, bumps the generation, returns the message.
    fn release_slot(&mut self, slot: u32) -> StoredMessage<P> {
        let s = &mut self.slots[slot as usize];
        let message = s.message.take().expect("slot holds a message");
        s.generation = s.generation.wrapping_add(1);
        s.deadline = f64::NAN;
        let hash = self.hasher.hash_one(&*message.request_id);
        if let Ok(entry) = self.ids.find_entry(hash, |&x| x == slot) {
            entry.remove();
        }
        self.free.push(slot);
        message
    }

    fn cell_insert(&mut self, key: CellKey, seq: u64, slot: u32) {
        let message = self.message(slot);
        let (time, enqueued_at) = (time_key(message), message.enqueued_at);
        self.groups.entry(group_id(key, message)).or_default().insert((time, seq), slot);
        let cell = self.cells.entry(key).or_default();
        let old_head = cell.first_key_value().map(|(&s, _)| s);
        cell.insert(seq, slot, time, enqueued_at);
        if old_head.is_none_or(|head| seq < head) {
            if let Some(head) = old_head {
                self.receive_heads.remove(&(key.priority, head, key));
                self.age_heads.remove(&(head, key));
            }
            self.receive_heads.insert((key.priority, seq, key));
            self.age_heads.insert((seq, key));
        }
        self.visible_by_priority[usize::from(key.priority)] += 1;
    }

    fn cell_remove(&mut self, key: CellKey, seq: u64) {
        let cell = self.cells.get(&key).expect("visible message has a cell");
        let was_head = cell.first_key_value().is_some_and(|(&s, _)| s == seq);
        let slot = *cell.get(&seq).expect("visible message is in its cell");
        let message = self.message(slot);
        let (group, member) = (group_id(key, message), (time_key(message), seq));
        let slots = &self.slots;
        let enqueued_at_of = |s: u32| slots[s as usize].message.as_ref().map_or(f64::NAN, |m| m.enqueued_at);
        self.cells.get_mut(&key).expect("visible message has a cell").remove(seq, member.0, enqueued_at_of);
        if let Some(members) = self.groups.get_mut(&group) {
            members.remove(&member);
            if members.is_empty() {
                self.groups.remove(&group);
            }
        }
        let cell = self.cells.get_mut(&key).expect("visible message has a cell");
        if was_head {
            self.receive_heads.remove(&(key.priority, seq, key));
            self.age_heads.remove(&(seq, key));
            if let Some((&head, _)) = cell.first_key_value() {
                self.receive_heads.insert((key.priority, head, key));
                self.age_heads.insert((head, key));
            } else {
                self.cells.remove(&key);
            }
        }
        self.visible_by_priority[usize::from(key.priority)] -= 1;
    }

    /// Checks every structural invariant by a full scan (tests and debugging only): each
    /// message is in exactly one of the visible cells and the in-flight set, cell membership
    /// matches the key, heads and counts are consistent, the id table maps every id.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut visible = 0usize;
        let mut by_priority = [0usize; PRIORITIES];
        let mut heads = BTreeSet::new();
        for (key, cell) in &self.cells {
            let Some((&head, _)) = cell.first_key_value() else {
                return Err(format!("empty cell {key:?}"));
            };
            heads.insert((key.priority, head, *key));
            let mut previous_at = f64::NEG_INFINITY;
            let mut times: BTreeMap<u64, u32> = BTreeMap::new();
            for (&seq, &slot) in cell.iter() {
                if let Some(m) = self.get(slot) {
                    *times.entry(time_key(m)).or_default() += 1;
                }
                let s = self.slots.get(slot as usize).ok_or("cell slot out of range")?;
                let m = s.message.as_ref().ok_or("cell names a vacant slot")?;
                if !s.deadline.is_nan() {
                    return Err(format!("slot {slot} is in a cell and in flight"));
                }
                if m.cell_key() != *key || m.message_id != seq {
                    return Err(format!("slot {slot} is in the wrong cell or under the wrong seq"));
                }
                if m.enqueued_at < previous_at {
                    return Err(format!("cell {key:?} is not oldest-first"));
                }
                previous_at = m.enqueued_at;
                visible += 1;
                by_priority[usize::from(m.priority)] += 1;
            }
            let head_at = self.get(*cell.members.values().next().unwrap_or(&0)).map(|m| m.enqueued_at);
            if cell.summary.oldest_seq != head || head_at != Some(cell.summary.oldest_enqueued_at) {
                return Err(format!("summary of cell {key:?} out of date"));
            }
            let best = times.first_key_value().map_or(1000.0, |(&bits, _)| f64::from_bits(bits));
            if best.to_bits() != cell.summary.best_time_ms.to_bits() {
                return Err(format!("best processing time of cell {key:?} out of date"));
            }
            if times != cell.times {
                return Err(format!("processing-time keys of cell {key:?} out of date"));
            }
        }
        let mut grouped = 0usize;
        for (group, members) in &self.groups {
            if members.is_empty() {
                return Err(format!("empty group {group:?}"));
            }
            for (&(time, seq), &slot) in members {
                let in_cell = self.cells.get(&group.0).and_then(|cell| cell.get(&seq)) == Some(&slot);
                let m = self.message(slot);
                if !in_cell || group_id(group.0, m) != *group || time_key(m) != time {
                    return Err(format!("slot {slot} is in the wrong group"));
                }
                grouped += 1;
            }
        }
        if grouped != visible {
            return Err(format!("{grouped} grouped messages but {visible} visible"));
        }
        if heads != self.receive_heads {
            return Err("receive heads out of date".into());
        }
        let age: BTreeSet<_> = heads.iter().map(|&(_, seq, key)| (seq, key)).collect();
        if age != self.age_heads {
            return Err("age heads out of date".into());
        }
        if by_priority != self.visible_by_priority {
            return Err(format!("counts {:?} != {by_priority:?}", self.visible_by_priority));
        }
        for &(OrdTime(deadline), slot) in &self.in_flight {
            let s = &self.slots[slot as usize];
            if s.message.is_none() || s.deadline.to_bits() != deadline.to_bits() {
                return Err(format!("in-flight entry of slot {slot} does not match the slot"));
            }
        }
        let occupied = self.slots.iter().filter(|s| s.message.is_some()).count();
        if occupied != visible + self.in_flight.len() {
            return Err(format!(
                "{occupied} messages but {visible} visible + {} in flight",
                self.in_flight.len()
            ));
        }
        if self.ids.len() != occupied {
            return Err(format!("{} ids for {occupied} messages", self.ids.len()));
        }
        for (slot, s) in self.slots.iter().enumerate() {
            if let Some(m) = &s.message {
                if self.slot_of(&m.request_id) != Some(slot as u32) {
                    return Err(format!("id {:?} does not map to its slot", m.request_id));
                }
            }
        }
        if self.free.len() + occupied != self.slots.len() {
            return Err("free list out of date".into());
        }
        Ok(())
    }
}

fn slot_id<P>(slots: &[Slot<P>], slot: u32) -> Option<&str> {
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
