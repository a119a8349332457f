//! The store's message types: what is stored, what a caller enqueues, the configuration, and the
//! one request id rule.

use std::cmp::Ordering;

use super::py_repr;
use super::RequestId;
use crate::cells::CellKey;
use crate::errors::{CoreError, CoreResult};
use crate::index::{IndexEntry, PRIORITIES};

/// Default retention period in seconds (4 days, as in SQS).
pub const DEFAULT_MESSAGE_RETENTION: f64 = 345_600.0;

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
    /// The request's id (unique among messages in the store, but for dead letters); inline
    /// when short.
    pub request_id: RequestId,
    /// The caller's object (the `LLMRequest` in the Python layer), kept by reference.
    pub payload: P,
    /// Estimated tokens.
    pub tokens: u64,
    /// Expected processing time in seconds; NaN when not given (see the accessor).
    pub(super) expected_processing: f64,
    /// When the message was enqueued (clock seconds; never decreases within a store).
    pub enqueued_at: f64,
    /// When the message was first received; NaN until it has been (see the accessor).
    pub(super) first_received: f64,
    /// Storage-assigned id, unique in the process and increasing in enqueue order; it is also the
    /// message's sequence number. [`format_message_id`] gives its string form.
    pub message_id: u64,
    /// How many times the message has been received.
    pub receive_count: u32,
    /// Interned tenant ([`Store::tenant_name`]; 0 is the tenant of requests without one).
    pub tenant: u32,
    /// Deadline instant in clock seconds; NaN for none.
    pub deadline: f64,
    /// Its slot's generation: bumped by every receive and every release; a receipt handle must
    /// match it. (Kept here, in what would be padding, rather than beside the message.)
    pub(super) generation: u32,
    /// 0 (URGENT) ..= 3 (LOW).
    pub priority: u8,
}

// Optional instants and durations are NaN-encoded: an `Option<f64>` costs 16 B, and two of
// them would push a slot past the 104 B the memory budget assumes.
fn nan_to_none(value: f64) -> Option<f64> {
    (!value.is_nan()).then_some(value)
}

impl<P> StoredMessage<P> {
    /// Expected processing time in seconds, when given.
    pub fn expected_processing_seconds(&self) -> Option<f64> {
        nan_to_none(self.expected_processing)
    }

    /// When the message was first received, once it has been.
    pub fn first_received_at(&self) -> Option<f64> {
        nan_to_none(self.first_received)
    }

    /// The cell this message belongs to while visible.
    pub fn cell_key(&self) -> CellKey {
        CellKey::for_message(self.priority, self.receive_count, self.tokens)
    }

    /// What the index and any other ranking know of this message.
    pub fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            cell: self.cell_key(),
            tokens: self.tokens,
            time: crate::cells::time_key(self.tokens, self.expected_processing_seconds()),
            enqueued_at: self.enqueued_at,
            seq: self.message_id,
            tenant: self.tenant,
            deadline: self.deadline,
        }
    }

    /// The message as a new one, for another store (dead-lettering).
    pub fn into_new(self, tenant: Option<Box<str>>) -> NewMessage<P> {
        NewMessage {
            request_id: self.request_id,
            payload: self.payload,
            priority: self.priority,
            tokens: self.tokens,
            expected_processing_seconds: nan_to_none(self.expected_processing),
            tenant,
            deadline: nan_to_none(self.deadline),
        }
    }
}

/// What a caller hands to [`Store::enqueue`].
#[derive(Debug)]
pub struct NewMessage<P> {
    /// Non-empty, unique among messages in the store.
    pub request_id: RequestId,
    /// The caller's object.
    pub payload: P,
    /// 0 ..= 3.
    pub priority: u8,
    /// Estimated tokens.
    pub tokens: u64,
    /// None, or a finite number of seconds >= 0.
    pub expected_processing_seconds: Option<f64>,
    /// The request's tenant; None (and "") is the tenant of requests without one.
    pub tenant: Option<Box<str>>,
    /// Deadline instant in clock seconds, when given (finite).
    pub deadline: Option<f64>,
}

/// The one rule for request ids, at every door (store, limiter, buffer): a non-empty string
/// that is not only whitespace.
pub fn validate_request_id(id: &str, field: &str) -> CoreResult<()> {
    // Most ids start with a visible ASCII character: no need to look further.
    if id.as_bytes().first().is_some_and(u8::is_ascii_graphic) {
        return Ok(());
    }
    if id.trim().is_empty() {
        Err(CoreError::InvalidRequest(format!(
            "{field} must be a non-empty str that is not only whitespace, got {}",
            py_repr(id)
        )))
    } else {
        Ok(())
    }
}

impl<P> NewMessage<P> {
    /// Checks the fields with the same rules (and messages) as `LLMRequest.validate`.
    pub fn validate(&self) -> CoreResult<()> {
        validate_request_id(&self.request_id, "id")?;
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
        if let Some(deadline) = self.deadline {
            if !deadline.is_finite() {
                return Err(CoreError::InvalidRequest(format!(
                    "deadline must be None or a datetime, got the instant {deadline:?}"
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
