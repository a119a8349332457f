//! `StoreCore`: the Python face of [`Store`], holding `LLMRequest` objects by reference.
//!
//! Locking discipline: the store sits behind a `parking_lot::Mutex`. No Python code runs while
//! it is held: requests are read and validated before locking, messages are copied out as
//! [`MessageView`]s (a few numbers and one new reference) and turned into Python objects after
//! unlocking, and removed payloads are released after unlocking too. So a property, a clock or
//! a finalizer that calls back into the same store can never deadlock it.
//!
//! Fast construction: `QueueMessage` and `MessageAttributes` stay the frozen dataclasses of
//! `types.py`, but are built with `object.__new__` and `PyObject_GenericSetAttr` (what a frozen
//! dataclass's own `__init__` does through `object.__setattr__`), and datetimes from their
//! calendar fields, so building a message costs well under a microsecond.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDateTime, PyDict, PyInt, PyList, PyString, PyType, PyTzInfo};
use pyo3::{ffi, intern, PyTraverseError, PyVisit};

use crate::errors::CoreError;
use crate::py::args::{invalid_request, is_number, token_count};
use crate::py::clock::ClockSource;
use crate::py::errors::to_py_err;
use crate::store::{
    format_message_id_into, NewMessage, ReceiptHandle, Store, StoreConfig, StoredMessage, MESSAGE_ID_LEN,
    PRIORITIES,
};

// ----- classes of types.py -----------------------------------------------------------------

macro_rules! types_class {
    ($fn_name:ident, $class:literal) => {
        fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
            static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CLASS.import(py, "llm_queue_dispatcher.types", $class)
        }
    };
}

types_class!(llm_request_class, "LLMRequest");
types_class!(token_info_class, "TokenInfo");
types_class!(queue_message_class, "QueueMessage");
types_class!(message_attributes_class, "MessageAttributes");

fn object_new(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static OBJECT_NEW: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    OBJECT_NEW
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("builtins")?.getattr("object")?.getattr("__new__")?.unbind())
        })
        .map(|f| f.bind(py))
}

/// `object.__new__(cls)`: an instance whose `__init__` has not run.
fn new_instance<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    object_new(cls.py())?.call1((cls,))
}

/// `object.__setattr__(obj, name, value)`: bypasses a frozen dataclass's `__setattr__`.
fn set_field<T>(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>, value: &Bound<'_, T>) -> PyResult<()> {
    // SAFETY: all three pointers are live, owned by the Bound references for the call.
    let status = unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    if status < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

// ----- datetimes -----------------------------------------------------------------------------

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// A timezone-aware UTC datetime for a clock reading in seconds since the epoch, rounded to the
/// microsecond.
pub(crate) fn utc_datetime(py: Python<'_>, seconds: f64) -> PyResult<Bound<'_, PyDateTime>> {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    let micros = (seconds * 1e6).round();
    // Years 1..=9999 are about ±2.5e17 µs around the epoch; datetime refuses the rest anyway.
    if !micros.is_finite() || micros.abs() > 4e17 {
        return Err(to_py_err(
            py,
            CoreError::InvalidRequest(format!("clock reading {seconds:?} is not a datetime")),
        ));
    }
    let micros = micros as i64;
    let (year, month, day) = civil_from_days(micros.div_euclid(MICROS_PER_DAY));
    let rest = micros.rem_euclid(MICROS_PER_DAY);
    let second_of_day = rest / 1_000_000;
    let utc = PyTzInfo::utc(py)?;
    PyDateTime::new(
        py,
        year as i32,
        month,
        day,
        (second_of_day / 3600) as u8,
        (second_of_day / 60 % 60) as u8,
        (second_of_day % 60) as u8,
        (rest % 1_000_000) as u32,
        Some(&utc),
    )
}

/// Messages built in one call often share instants (a batch's `enqueued_at`): reuse the object.
#[derive(Default)]
struct DateCache<'py> {
    last: Option<(u64, Bound<'py, PyDateTime>)>,
}

impl<'py> DateCache<'py> {
    fn get(&mut self, py: Python<'py>, seconds: f64) -> PyResult<Bound<'py, PyDateTime>> {
        match &self.last {
            Some((bits, date)) if *bits == seconds.to_bits() => Ok(date.clone()),
            _ => {
                let date = utc_datetime(py, seconds)?;
                self.last = Some((seconds.to_bits(), date.clone()));
                Ok(date)
            }
        }
    }
}

// ----- messages ------------------------------------------------------------------------------

/// What building a `QueueMessage` needs, copied out of the store under its lock.
pub(crate) struct MessageView {
    /// The `LLMRequest`.
    pub payload: Py<PyAny>,
    pub message_id: u64,
    pub enqueued_at: f64,
    pub receive_count: u32,
    pub first_received_at: Option<f64>,
    /// None for messages not received by this call (enqueue, peek): `receipt_handle` is "".
    pub handle: Option<ReceiptHandle>,
}

impl MessageView {
    /// Copies a stored message (one new reference to its payload).
    pub fn of(py: Python<'_>, message: &StoredMessage<Py<PyAny>>, handle: Option<ReceiptHandle>) -> Self {
        Self {
            payload: message.payload.clone_ref(py),
            message_id: message.message_id,
            enqueued_at: message.enqueued_at,
            receive_count: message.receive_count,
            first_received_at: message.first_received_at,
            handle,
        }
    }
}

fn build_from_parts<'py>(
    py: Python<'py>,
    view: &MessageView,
    handle: Bound<'py, PyString>,
    dates: &mut DateCache<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut id_buf = [0u8; MESSAGE_ID_LEN];
    let id = PyString::new(py, format_message_id_into(view.message_id, &mut id_buf));
    let attributes = new_instance(message_attributes_class(py)?)?;
    set_field(&attributes, intern!(py, "message_id"), &id)?;
    set_field(&attributes, intern!(py, "receipt_handle"), &handle)?;
    set_field(&attributes, intern!(py, "enqueued_at"), &dates.get(py, view.enqueued_at)?)?;
    set_field(&attributes, intern!(py, "receive_count"), &view.receive_count.into_pyobject(py)?)?;
    match view.first_received_at {
        Some(at) => set_field(&attributes, intern!(py, "first_received_at"), &dates.get(py, at)?)?,
        None => set_field(&attributes, intern!(py, "first_received_at"), &py.None().into_bound(py))?,
    }
    let message = new_instance(queue_message_class(py)?)?;
    set_field(&message, intern!(py, "id"), &id)?;
    set_field(&message, intern!(py, "payload"), view.payload.bind(py))?;
    set_field(&message, intern!(py, "attributes"), &attributes)?;
    Ok(message)
}

fn build_view<'py>(
    py: Python<'py>,
    view: &MessageView,
    dates: &mut DateCache<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let handle = match &view.handle {
        Some(h) => PyString::new(py, h.encode_into(&mut [0u8; ReceiptHandle::LEN])),
        None => intern!(py, "").clone(),
    };
    build_from_parts(py, view, handle, dates)
}

fn build_list<'py>(py: Python<'py>, views: &[MessageView]) -> PyResult<Bound<'py, PyList>> {
    let _paused = GcPause::new();
    let mut dates = DateCache::default();
    let items = views.iter().map(|v| build_view(py, v, &mut dates)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// Pauses `CPython`'s cyclic garbage collector while a batch of messages is built. Every object
/// built is reachable from the list returned, so a collection in between can free nothing, but
/// the allocations would trigger collections that scan every object of the process, which made
/// large batches several times slower. Restores the collector's previous state when dropped.
struct GcPause {
    was_enabled: bool,
}

impl GcPause {
    fn new() -> Self {
        // SAFETY: the caller holds the GIL (it has a `Python` token); these only flip a flag.
        let was_enabled = unsafe { pyo3::ffi::PyGC_Disable() } != 0;
        Self { was_enabled }
    }
}

impl Drop for GcPause {
    fn drop(&mut self) {
        if self.was_enabled {
            // SAFETY: as in `new`; the GIL is still held, the guard lives inside the call.
            unsafe { pyo3::ffi::PyGC_Enable() };
        }
    }
}

/// Builds the `QueueMessage` of a view copied under the lock (selection builds its messages
/// with this after unlocking: constructing objects may run the garbage collector, and with it
/// arbitrary finalizers that might call back into the store).
pub(crate) fn build_view_message(py: Python<'_>, view: &MessageView) -> PyResult<Py<PyAny>> {
    Ok(build_view(py, view, &mut DateCache::default())?.unbind())
}

// ----- validating requests -------------------------------------------------------------------

fn invalid_config(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, CoreError::InvalidConfig(message))
}

/// Reads and checks the fields of an `LLMRequest` the store uses, with the messages of
/// `LLMRequest.validate`; the request itself becomes the payload.
fn extract_request(request: &Bound<'_, PyAny>) -> PyResult<NewMessage<Py<PyAny>>> {
    let py = request.py();
    if !request.is_instance(llm_request_class(py)?)? {
        return Err(invalid_request(py, format!("request must be an LLMRequest, got {}", request.repr()?)));
    }
    let id = request.getattr(intern!(py, "id"))?;
    let request_id: Box<str> = match id.cast::<PyString>() {
        Ok(s) if !s.to_str()?.is_empty() => s.to_str()?.into(),
        _ => return Err(invalid_request(py, format!("id must be a non-empty str, got {}", id.repr()?))),
    };
    let priority = request.getattr(intern!(py, "priority"))?;
    if priority.is_instance_of::<PyBool>() || !priority.is_instance_of::<PyInt>() {
        return Err(invalid_request(
            py,
            format!("priority must be a Priority or an int 0..3, got {}", priority.repr()?),
        ));
    }
    let priority_value = match priority.extract::<i64>() {
        Ok(p @ 0..=3) => p as u8,
        _ => {
            return Err(invalid_request(
                py,
                format!("priority must be within 0..3, got {}", priority.repr()?),
            ))
        }
    };
    let token_info = request.getattr(intern!(py, "token_info"))?;
    if !token_info.is_instance(token_info_class(py)?)? {
        return Err(invalid_request(
            py,
            format!("token_info must be a TokenInfo, got {}", token_info.repr()?),
        ));
    }
    let tokens = token_count(&token_info.getattr(intern!(py, "estimated"))?, "token_info.estimated")?;
    let ept = request.getattr(intern!(py, "expected_processing_time"))?;
    let expected_processing_seconds = if ept.is_none() {
        None
    } else {
        let seconds = if is_number(&ept) { ept.extract::<f64>().ok() } else { None };
        match seconds {
            Some(s) if s.is_finite() && s >= 0.0 => Some(s),
            _ => {
                return Err(invalid_request(
                    py,
                    format!(
                        "expected_processing_time must be None or a finite number of seconds >= 0, got {}",
                        ept.repr()?
                    ),
                ))
            }
        }
    };
    Ok(NewMessage {
        request_id,
        payload: request.clone().unbind(),
        priority: priority_value,
        tokens,
        expected_processing_seconds,
    })
}

fn seconds_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    let py = value.py();
    if is_number(value) {
        if let Ok(v) = value.extract::<f64>() {
            return Ok(v);
        }
    }
    Err(invalid_request(py, format!("{field} must be a number of seconds, got {}", value.repr()?)))
}

fn count_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<usize> {
    let py = value.py();
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
        if let Ok(v) = value.extract::<usize>() {
            return Ok(v);
        }
        if value.gt(0)? {
            return Ok(usize::MAX);
        }
    }
    Err(invalid_request(py, format!("{field} must be an int >= 0, got {}", value.repr()?)))
}

fn handle_arg<'a, 'py>(value: &'a Bound<'py, PyAny>) -> PyResult<&'a Bound<'py, PyString>> {
    value.cast::<PyString>().map_err(|_| {
        let py = value.py();
        let repr = value.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string());
        to_py_err(py, CoreError::ReceiptHandle(format!("receipt handle must be a str, got {repr}")))
    })
}

// ----- the class -----------------------------------------------------------------------------

/// What the lock guards.
pub(crate) struct StoreState {
    /// The store; payloads are the `LLMRequest` objects.
    pub store: Store<Py<PyAny>>,
    /// Where instants come from (the wall clock by default: datetimes derive from it).
    pub clock: ClockSource,
    /// Where dead-lettered messages go; None drops them (they are counted either way).
    pub dead_letter: Option<Py<PyStoreCore>>,
}

/// The in-memory store's Rust core: SQS semantics over `LLMRequest` objects kept by reference.
#[pyclass(module = "llm_queue_dispatcher._core", name = "StoreCore", frozen, weakref)]
pub struct PyStoreCore {
    pub(crate) state: Mutex<StoreState>,
    config: StoreConfig,
    /// f64 bits of the last dequeue's visibility timeout; NaN before the first.
    last_visibility_timeout: AtomicU64,
}

impl PyStoreCore {
    /// The current clock reading. A Python callable clock is called without the lock held.
    pub(crate) fn now(&self, py: Python<'_>) -> PyResult<f64> {
        let clock = {
            let state = self.state.lock();
            match &state.clock {
                ClockSource::Callable(callable) => ClockSource::Callable(callable.clone_ref(py)),
                other => return other.now(py),
            }
        };
        clock.now(py)
    }

    /// Runs `f` on the store at the current clock reading, under the lock, then (unlocked)
    /// moves dead-lettered messages to the dead-letter store and releases dropped payloads.
    /// Every store operation runs the maintenance step first, so `f` sees expired messages
    /// released.
    pub(crate) fn with_store<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store<Py<PyAny>>, f64) -> Result<R, CoreError>,
    ) -> PyResult<R> {
        let now = self.now(py)?;
        let (result, dead, dropped, target) = {
            let mut state = self.state.lock();
            // Maintenance first, so read-only closures see expired messages released too.
            let mut dead = state.store.release_expired(now);
            let result = f(&mut state.store, now);
            dead.append(&mut state.store.take_dead_lettered());
            let dropped = state.store.take_dropped();
            let target =
                if dead.is_empty() { None } else { state.dead_letter.as_ref().map(|t| t.clone_ref(py)) };
            (result, dead, dropped, target)
        };
        drop(dropped);
        if let Some(target) = target {
            target.get().accept_dead_letters(py, dead)?;
        }
        result.map_err(|e| to_py_err(py, e))
    }

    /// Enqueues messages dead-lettered by another store, as new messages here. One whose id is
    /// already here (not yet deleted) is dropped: the source has counted it as dead-lettered.
    fn accept_dead_letters(&self, py: Python<'_>, messages: Vec<StoredMessage<Py<PyAny>>>) -> PyResult<()> {
        let rejected = self.with_store(py, |store, now| {
            let mut rejected = Vec::new();
            for m in messages {
                let message = NewMessage {
                    request_id: m.request_id,
                    payload: m.payload,
                    priority: m.priority,
                    tokens: m.tokens,
                    expected_processing_seconds: m.expected_processing_seconds,
                };
                if store.slot_of(&message.request_id).is_some() {
                    rejected.push(message);
                } else {
                    store.enqueue(message, now)?;
                }
            }
            Ok(rejected)
        })?;
        drop(rejected);
        Ok(())
    }

    fn views(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store<Py<PyAny>>, f64) -> Result<Vec<(u32, Option<ReceiptHandle>)>, CoreError>,
    ) -> PyResult<Vec<MessageView>> {
        self.with_store(py, |store, now| {
            let picked = f(store, now)?;
            Ok(picked
                .into_iter()
                .map(|(slot, handle)| MessageView::of(py, store.message(slot), handle))
                .collect())
        })
    }
}

#[pymethods]
impl PyStoreCore {
    #[new]
    #[pyo3(
        signature = (*, clock = None, max_receive_count = None, dead_letter = None, message_retention = None),
        text_signature = "(*, clock=None, max_receive_count=None, dead_letter=None, message_retention=345600.0)"
    )]
    fn new(
        py: Python<'_>,
        clock: Option<&Bound<'_, PyAny>>,
        max_receive_count: Option<&Bound<'_, PyAny>>,
        dead_letter: Option<&Bound<'_, PyAny>>,
        message_retention: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let clock = ClockSource::from_arg(clock, ClockSource::Wall)?;
        let max_receive_count = match max_receive_count.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => match count_arg(v, "max_receive_count") {
                Ok(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                _ => {
                    return Err(invalid_config(
                        py,
                        format!("max_receive_count must be None or an int >= 1, got {}", v.repr()?),
                    ))
                }
            },
        };
        let message_retention = match message_retention {
            None => crate::store::DEFAULT_MESSAGE_RETENTION,
            Some(v) => seconds_arg(v, "message_retention").map_err(|_| {
                invalid_config(
                    py,
                    format!(
                        "message_retention must be a number of seconds > 0, got {}",
                        v.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string())
                    ),
                )
            })?,
        };
        let dead_letter = match dead_letter.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => Some(
                v.cast::<PyStoreCore>()
                    .map_err(|_| {
                        invalid_config(
                            py,
                            format!(
                                "dead_letter must be a StoreCore or None, got {}",
                                v.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string())
                            ),
                        )
                    })?
                    .clone()
                    .unbind(),
            ),
        };
        let config = StoreConfig { max_receive_count, message_retention };
        let now = clock.now(py)?;
        let store = Store::new(config, now).map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            state: Mutex::new(StoreState { store, clock, dead_letter }),
            config,
            last_visibility_timeout: AtomicU64::new(f64::NAN.to_bits()),
        })
    }

    /// Validates and enqueues one `LLMRequest`; returns its `QueueMessage`.
    fn enqueue<'py>(&self, py: Python<'py>, request: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let message = extract_request(request)?;
        let view = self.with_store(py, |store, now| {
            let slot = store.enqueue(message, now)?;
            Ok(MessageView::of(py, store.message(slot), None))
        })?;
        build_view(py, &view, &mut DateCache::default())
    }

    /// Validates the whole batch, then enqueues it; nothing is enqueued on any error.
    fn enqueue_batch<'py>(
        &self,
        py: Python<'py>,
        requests: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let messages = requests.try_iter()?.map(|r| extract_request(&r?)).collect::<PyResult<Vec<_>>>()?;
        let views = self.views(py, |store, now| {
            Ok(store.enqueue_batch(messages, now)?.into_iter().map(|slot| (slot, None)).collect())
        })?;
        build_list(py, &views)
    }

    /// Receives up to `limit` visible messages (priority, then oldest first), each invisible for
    /// `visibility_timeout` seconds, with a fresh receipt handle.
    fn dequeue<'py>(
        &self,
        py: Python<'py>,
        limit: &Bound<'py, PyAny>,
        visibility_timeout: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let limit = count_arg(limit, "limit")?;
        let timeout = visibility_timeout_arg(visibility_timeout)?;
        let views = self.views(py, |store, now| {
            Ok(store.receive(limit, timeout, now)?.into_iter().map(|(slot, h)| (slot, Some(h))).collect())
        })?;
        self.last_visibility_timeout.store(timeout.to_bits(), Ordering::Relaxed);
        build_list(py, &views)
    }

    /// Deletes the message a current receipt handle names.
    fn delete(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        let handle = handle_arg(handle)?.to_str()?;
        let removed = self.with_store(py, |store, now| store.delete(handle, now))?;
        drop(removed);
        Ok(())
    }

    /// Makes the message a current handle names invisible for `visibility_timeout` seconds from
    /// now (0: visible at once).
    fn change_visibility(
        &self,
        py: Python<'_>,
        handle: &Bound<'_, PyAny>,
        visibility_timeout: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let timeout = visibility_timeout_arg(visibility_timeout)?;
        let handle = handle_arg(handle)?.to_str()?;
        self.with_store(py, |store, now| store.change_visibility(handle, timeout, now))
    }

    /// Up to `limit` visible messages of `priority`, oldest first, without receiving them
    /// (their `receipt_handle` is "").
    fn peek<'py>(
        &self,
        py: Python<'py>,
        priority: &Bound<'py, PyAny>,
        limit: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let p = match count_arg(priority, "priority") {
            Ok(p) if p < PRIORITIES => p as u8,
            _ => {
                return Err(invalid_request(
                    py,
                    format!("priority must be within 0..3, got {}", priority.repr()?),
                ))
            }
        };
        let limit = count_arg(limit, "limit")?;
        let views = self
            .views(py, |store, _| Ok(store.peek(p, limit).into_iter().map(|slot| (slot, None)).collect()))?;
        build_list(py, &views)
    }

    /// Removes every message and invalidates every receipt handle.
    fn purge(&self, py: Python<'_>) -> PyResult<()> {
        let payloads = self.with_store(py, |store, now| Ok(store.purge(now)))?;
        drop(payloads);
        Ok(())
    }

    /// The fields of `QueueAttributes` (plus `expired`: messages dropped by retention).
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.with_store(py, |store, _| Ok(store.stats()))?;
        let d = PyDict::new(py);
        d.set_item("approximate_number_of_messages", stats.visible)?;
        d.set_item("approximate_number_of_messages_in_flight", stats.in_flight)?;
        d.set_item("approximate_number_of_messages_delayed", stats.delayed)?;
        d.set_item("created_timestamp", utc_datetime(py, stats.created_at)?)?;
        d.set_item("last_modified_timestamp", utc_datetime(py, stats.last_modified_at)?)?;
        let last = f64::from_bits(self.last_visibility_timeout.load(Ordering::Relaxed));
        d.set_item("visibility_timeout", (!last.is_nan()).then_some(last))?;
        d.set_item("message_retention_period", self.config.message_retention)?;
        d.set_item("dead_lettered", stats.dead_lettered)?;
        d.set_item("expired", stats.expired)?;
        Ok(d)
    }

    /// Visible messages.
    fn visible_count(&self, py: Python<'_>) -> PyResult<usize> {
        self.with_store(py, |store, _| Ok(store.visible_count()))
    }

    /// Received messages whose visibility has not run out.
    fn in_flight_count(&self, py: Python<'_>) -> PyResult<usize> {
        self.with_store(py, |store, _| Ok(store.in_flight_count()))
    }

    /// The clock reading at which the next in-flight message becomes visible (or is
    /// dead-lettered), None when nothing is in flight.
    fn next_visibility_change(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.with_store(py, |store, _| Ok(store.next_visibility_change()))
    }

    /// Visible messages per priority, URGENT first.
    fn counts_by_priority(&self, py: Python<'_>) -> PyResult<[usize; PRIORITIES]> {
        self.with_store(py, |store, _| Ok(store.counts_by_priority()))
    }

    /// The clock reading at which the oldest visible message was enqueued.
    fn oldest_enqueued_at(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.with_store(py, |store, _| Ok(store.oldest_enqueued_at()))
    }

    /// The current reading of this store's clock in seconds.
    #[pyo3(name = "now")]
    fn py_now(&self, py: Python<'_>) -> PyResult<f64> {
        self.now(py)
    }

    /// The clock given at construction (None for the wall clock).
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state.lock().clock.as_object(py)
    }

    #[getter]
    fn max_receive_count(&self) -> Option<u32> {
        self.config.max_receive_count
    }

    #[getter]
    fn message_retention(&self) -> f64 {
        self.config.message_retention
    }

    #[getter]
    fn dead_letter(&self, py: Python<'_>) -> Option<Py<PyStoreCore>> {
        self.state.lock().dead_letter.as_ref().map(|d| d.clone_ref(py))
    }

    /// Checks the store's structural invariants by a full scan; raises `AssertionError`.
    fn _check_invariants(&self) -> PyResult<()> {
        self.state.lock().store.check_invariants().map_err(pyo3::exceptions::PyAssertionError::new_err)
    }

    fn __repr__(&self) -> String {
        match self.state.try_lock() {
            Some(state) => format!(
                "StoreCore(visible={}, in_flight={}, max_receive_count={:?}, message_retention={:?})",
                state.store.visible_count(),
                state.store.in_flight_count(),
                self.config.max_receive_count,
                self.config.message_retention
            ),
            None => "StoreCore(<busy>)".to_owned(),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // A busy lock means the owner is running; skipping is safe (the GC then keeps
        // everything reachable) where blocking could deadlock.
        let Some(state) = self.state.try_lock() else { return Ok(()) };
        state.clock.traverse(&visit)?;
        if let Some(dead_letter) = &state.dead_letter {
            visit.call(dead_letter)?;
        }
        for payload in state.store.payloads() {
            visit.call(payload)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let taken = self.state.try_lock().map(|mut state| {
            let payloads = state.store.clear(0.0);
            let clock = std::mem::replace(&mut state.clock, ClockSource::Wall);
            (payloads, clock, state.dead_letter.take())
        });
        // Released here, after the lock.
        drop(taken);
    }
}

fn visibility_timeout_arg(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let py = value.py();
    let seconds = seconds_arg(value, "visibility_timeout")
        .ok()
        .filter(|s| (0.0..=crate::store::MAX_VISIBILITY_TIMEOUT).contains(s));
    seconds.ok_or_else(|| {
        let repr = value.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string());
        invalid_request(py, format!("visibility_timeout must be within [0, 43200] seconds, got {repr}"))
    })
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-719_162), (1, 1, 1));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
    }
}
