//! `StoreCore`: the Python face of [`Store`], holding `LLMRequest` objects by reference.
//!
//! Locking discipline: the store sits behind a `parking_lot::Mutex`, taken with
//! `lock_py_attached` (a thread waiting for it never blocks the interpreter). No Python code
//! runs while it is held: requests are read and validated and the clock is read before
//! locking; messages are copied out as `MessageView`s (a few numbers and one new reference) and
//! turned into Python objects after unlocking; what an operation leaves behind — dead letters
//! for the dead-letter store, payloads to release — is an [`Aftermath`] finished after every
//! lock is released. So a property, a clock or a finalizer that calls back into the same store
//! (or the limiter) can never deadlock it.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::{MutexExt, PyOnceLock};
use pyo3::types::{PyDict, PyList};
use pyo3::{PyTraverseError, PyVisit};

use super::core::CoreErrorOr;
use super::messages::{build_enqueued, build_list, build_view, utc_datetime, DateCache, MessageView};
pub(crate) use super::requests::visibility_timeout_arg;
use super::requests::{count_arg, extract_request, handle_arg, invalid_config, repr_of, seconds_arg};
use super::steps::Taken;
use super::throttle::PyThrottle;
use crate::dispatch::{self, Outcome, Settings};
use crate::errors::CoreResult;
use crate::fair::{FairConfig, FairLanes, FairRuntime};
use crate::ledger::StoreOp;
use crate::policy::{Rankings, Snapshot};
use crate::py::args::invalid_request;
use crate::py::clock::ClockSource;
use crate::py::errors::to_py_err;
use crate::py::requests::Payload;
use crate::scoring::Weights;
use crate::store::{ReceiptHandle, Store, StoreConfig, StoredMessage, PRIORITIES};
use crate::throttle::ReservationKey;

/// The store as the binding holds it: `LLMRequest` payloads.
pub(crate) type PyStore = Store<Payload, Rankings>;

// ----- the class -----------------------------------------------------------------------------

/// What the lock guards.
pub(crate) struct StoreState {
    /// The store; payloads are the `LLMRequest` objects.
    pub store: PyStore,
    /// Where instants come from (the wall clock by default: datetimes derive from it).
    pub clock: ClockSource,
    /// Where dead-lettered messages go; None drops them (they are counted either way).
    pub dead_letter: Option<Py<PyStoreCore>>,
    /// Tenant use and reserve of a `fair_priority` dispatcher using this store.
    pub fair: Option<FairRuntime>,
    /// Told, once the locks are released, the ids of the requests the store itself ended:
    /// dead-lettered and dropped past retention (`set_ended_listener`).
    pub ended: Option<Py<PyAny>>,
}

/// A dead-lettered message on its way to the dead-letter store, with its tenant's name.
type DeadLetter = (StoredMessage<Payload>, Option<Box<str>>);

/// Dead letters a store could not take, with the reason.
type Refused = (PyErr, Vec<StoredMessage<Payload>>);

/// What a store operation leaves to do once every lock is released: hand dead letters to the
/// dead-letter store, release dropped payloads (their finalizers may run).
#[must_use = "an aftermath must be finished once the locks are released"]
pub(crate) struct Aftermath {
    dead: Vec<DeadLetter>,
    target: Option<Py<PyStoreCore>>,
    dropped: Vec<Payload>,
    /// The store's `ended` listener, when there is something to tell it.
    listener: Option<Py<PyAny>>,
}

impl Aftermath {
    /// Hands the dead letters over and releases the payloads. A dead-letter store that cannot
    /// take them now (its clock failed, say) leaves them in `source`'s outbox for the next
    /// operation: a failing hand-off loses nothing. Never raises: the operation itself
    /// succeeded; the failure is logged.
    pub(crate) fn finish(self, py: Python<'_>, source: &PyStoreCore) {
        let Self { dead, target, dropped, listener } = self;
        if let Some(listener) = listener {
            tell_ended(py, &listener, &dead, &dropped);
        }
        drop(dropped);
        if dead.is_empty() {
            return;
        }
        let Some(target) = target else {
            // No dead-letter store: dropped, and counted, as SQS does.
            drop(dead);
            return;
        };
        if let Err((error, back)) = target.get().accept_dead_letters(py, dead) {
            let count = back.len();
            source.state.lock_py_attached(py).store.return_dead_letters(back);
            let _ = log_warning(
                py,
                &format!("could not hand {count} dead-lettered message(s) to the dead-letter store, kept for the next operation: {error}"),
            );
        }
    }
}

/// Calls `listener(dead_letter_ids, expired_ids)`; a failure is logged (the operation itself
/// succeeded).
fn tell_ended(py: Python<'_>, listener: &Py<PyAny>, dead: &[DeadLetter], dropped: &[Payload]) {
    let dead_ids: Vec<&str> = dead.iter().map(|(m, _)| &*m.request_id).collect();
    let expired_ids: Vec<String> = dropped
        .iter()
        .filter_map(|p| p.object.bind(py).getattr("id").and_then(|id| id.extract::<String>()).ok())
        .collect();
    if let Err(error) = listener.bind(py).call1((dead_ids, expired_ids)) {
        let _ = log_warning(py, &format!("the store's ended listener failed: {error}"));
    }
}

fn log_warning(py: Python<'_>, message: &str) -> PyResult<()> {
    static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let logger = LOGGER.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("logging")?.call_method1("getLogger", ("llm_queue_dispatcher",))?.unbind())
    })?;
    logger.bind(py).call_method1("warning", (message,))?;
    Ok(())
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
            let state = self.state.lock_py_attached(py);
            match &state.clock {
                ClockSource::Callable(callable) => ClockSource::Callable(callable.clone_ref(py)),
                other => return other.now(py),
            }
        };
        clock.now(py)
    }

    /// Runs `f` on the store at `now`, under the lock, after the maintenance step; returns its
    /// result and what is left to do once every lock is released. `f` must run no Python code.
    pub(crate) fn locked<R>(
        &self,
        py: Python<'_>,
        now: f64,
        f: impl FnOnce(&mut PyStore, f64) -> CoreResult<R>,
    ) -> (CoreResult<R>, Aftermath) {
        self.locked_state(py, now, |state, now| f(&mut state.store, now))
    }

    /// `locked` with the whole guarded state.
    pub(crate) fn locked_state<R>(
        &self,
        py: Python<'_>,
        now: f64,
        f: impl FnOnce(&mut StoreState, f64) -> CoreResult<R>,
    ) -> (CoreResult<R>, Aftermath) {
        let mut state = self.state.lock_py_attached(py);
        // Maintenance first, so read-only closures see expired messages released too.
        let mut dead = state.store.release_expired(now);
        let result = f(&mut state, now);
        dead.append(&mut state.store.take_dead_lettered());
        let dead: Vec<_> = dead
            .into_iter()
            .map(|m| {
                let tenant = (m.tenant != 0).then(|| state.store.tenant_name(m.tenant).into());
                (m, tenant)
            })
            .collect();
        let target = if dead.is_empty() { None } else { state.dead_letter.as_ref().map(|t| t.clone_ref(py)) };
        let dropped = state.store.take_dropped();
        let listener = if dead.is_empty() && dropped.is_empty() {
            None
        } else {
            state.ended.as_ref().map(|l| l.clone_ref(py))
        };
        (result, Aftermath { dead, target, dropped, listener })
    }

    /// `locked` at the clock's reading, with the aftermath finished and errors raised.
    pub(crate) fn with_store<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut PyStore, f64) -> CoreResult<R>,
    ) -> PyResult<R> {
        let now = self.now(py)?;
        let (result, aftermath) = self.locked(py, now, f);
        aftermath.finish(py, self);
        result.map_err(|e| to_py_err(py, e))
    }

    /// Enqueues messages dead-lettered by another store, as new messages here; a request id
    /// already here is kept too (a dead-letter store keeps every copy). On failure (this
    /// store's clock) they are handed back.
    fn accept_dead_letters(&self, py: Python<'_>, messages: Vec<DeadLetter>) -> Result<(), Refused> {
        let now = match self.now(py) {
            Ok(now) => now,
            Err(error) => return Err((error, messages.into_iter().map(|(m, _)| m).collect())),
        };
        let new = messages.into_iter().map(|(m, tenant)| m.into_new(tenant)).collect();
        let (slots, aftermath) = self.locked(py, now, |store, now| Ok(store.enqueue_dead_letters(new, now)));
        aftermath.finish(py, self);
        drop(slots);
        Ok(())
    }

    fn views(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut PyStore, f64) -> CoreResult<Vec<(u32, Option<ReceiptHandle>)>>,
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

/// What `DispatchCore` does with the store, each under its lock.
impl PyStoreCore {
    /// The fused dispatch step with `throttle` (score or `fair_priority` policy): decide,
    /// reserve, receive (and charge), atomic under the throttle's then the store's lock.
    pub(crate) fn fused(
        &self,
        py: Python<'_>,
        throttle: &PyThrottle,
        weights: &Weights,
        settings: Settings,
        fair: bool,
    ) -> PyResult<Outcome<(Taken, Option<ReservationKey>)>> {
        // Both clocks before any lock: either may be a Python callable.
        let limiter_now = throttle.now(py)?;
        let store_now = self.now(py)?;
        let (decided, aftermath) = throttle.with_state_at(py, limiter_now, |limiter, limiter_now| {
            self.locked_state(py, store_now, |state, now| {
                let store = &mut state.store;
                let outcome = if fair {
                    let Some(runtime) = state.fair.as_mut() else { return Ok(Outcome::Nothing) };
                    dispatch::fused_fair(store, runtime, limiter, settings, now, limiter_now)?
                } else {
                    dispatch::fused_score(store, limiter, weights, settings, now, limiter_now)?
                };
                Ok(outcome.map(|t| {
                    let reserved = t.key.is_some();
                    (Taken::from_store(py, store, t.slot, t.handle, t.facts, t.charge, reserved), t.key)
                }))
            })
        });
        aftermath.finish(py, self);
        decided.map_err(|e| to_py_err(py, e))
    }

    /// The `fair_priority` step under another limiter's reported budget
    /// (`dispatch::take_fair_in_store`): the take with the tokens to wait for if its
    /// reservation is refused, `Wait` with those tokens (held), or `Nothing`.
    pub(crate) fn take_fair(
        &self,
        py: Python<'_>,
        snapshot: &Snapshot,
        settings: Settings,
    ) -> PyResult<Outcome<(Taken, u64)>> {
        let store_now = self.now(py)?;
        let (taken, aftermath) = self.locked_state(py, store_now, |state, now| {
            let store = &mut state.store;
            let Some(runtime) = state.fair.as_mut() else { return Ok(Outcome::Nothing) };
            Ok(dispatch::take_fair_in_store(store, runtime, snapshot, settings, now)?.map(|(t, needed)| {
                (Taken::from_store(py, store, t.slot, t.handle, t.facts, t.charge, settings.reserve), needed)
            }))
        });
        aftermath.finish(py, self);
        taken.map_err(|e| to_py_err(py, e))
    }

    /// A mark's store call, by handle.
    pub(crate) fn apply(&self, py: Python<'_>, op: StoreOp, handle: &str) -> Result<(), CoreErrorOr> {
        let now = self.now(py).map_err(CoreErrorOr::Py)?;
        let (result, aftermath) = self.locked(py, now, |store, now| match op {
            StoreOp::Delete => store.delete(handle, now).map(drop),
            StoreOp::ChangeVisibility(seconds) => store.change_visibility(handle, seconds, now),
            StoreOp::DeadLetter => store.dead_letter_now(handle, now),
            StoreOp::Release => store.release(handle, now),
        });
        aftermath.finish(py, self);
        result.map_err(CoreErrorOr::Core)
    }

    /// Keeps `fair_priority` lanes beside the index from now on (replacing any earlier ones).
    pub(crate) fn configure_fair_lanes(
        &self,
        py: Python<'_>,
        weights: &[(String, f64)],
        mut config: FairConfig,
        reserve: Option<f64>,
    ) {
        let mut state = self.state.lock_py_attached(py);
        config.weights = weights.iter().map(|(name, w)| (state.store.intern_tenant(name), *w)).collect();
        state.fair = Some(FairRuntime::new(&config, reserve));
        state.store.set_tenant_retention(config.fairness_window);
        state.store.ranking_mut().1 = Some(FairLanes::new(config));
        state.store.rebuild_ranking();
    }

    /// Corrects a fair charge (to the actual count, or 0 to take it back).
    pub(crate) fn correct_fair_charge(&self, py: Python<'_>, tenant: u32, charge: u64, tokens: f64) {
        let mut state = self.state.lock_py_attached(py);
        if let Some(runtime) = state.fair.as_mut() {
            runtime.ledger.correct(tenant, charge, tokens);
        }
    }

    /// Each tenant's token use over the fairness window, by tenant number.
    pub(crate) fn fair_usage_ids(&self, py: Python<'_>, now: f64) -> Vec<(u32, f64)> {
        let mut state = self.state.lock_py_attached(py);
        state.fair.as_mut().map_or_else(Vec::new, |runtime| runtime.ledger.usages(now))
    }

    /// Removes every message (the binding's `purge`).
    pub(crate) fn purge_all(&self, py: Python<'_>) -> PyResult<()> {
        let payloads = self.with_store(py, |store, now| Ok(store.purge(now)))?;
        drop(payloads);
        Ok(())
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
                        format!("max_receive_count must be None or an int >= 1, got {}", repr_of(v)),
                    ))
                }
            },
        };
        let message_retention = match message_retention {
            None => crate::store::DEFAULT_MESSAGE_RETENTION,
            Some(v) => seconds_arg(v, "message_retention").map_err(|_| {
                invalid_config(
                    py,
                    format!("message_retention must be a number of seconds > 0, got {}", repr_of(v)),
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
                            format!("dead_letter must be a StoreCore or None, got {}", repr_of(v)),
                        )
                    })?
                    .clone()
                    .unbind(),
            ),
        };
        let config = StoreConfig { max_receive_count, message_retention };
        let now = clock.now(py)?;
        let store = Store::with_ranking(config, now, Rankings::default()).map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            state: Mutex::new(StoreState { store, clock, dead_letter, fair: None, ended: None }),
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
        // A list's length is its size; any other iterable's `__len__` is not trusted for it.
        let size = requests.cast::<PyList>().map_or(0, PyListMethods::len);
        let (mut objects, mut messages) = (Vec::with_capacity(size), Vec::with_capacity(size));
        for request in requests.try_iter()? {
            let request = request?;
            messages.push(extract_request(&request)?);
            objects.push(request);
        }
        let placed = self.with_store(py, |store, now| {
            let slots = store.enqueue_batch(&mut messages, now)?;
            Ok(slots.first().map(|&slot| {
                let first = store.message(slot);
                (first.message_id, first.enqueued_at)
            }))
        });
        drop(messages); // refused payloads are dropped here, with no lock held
        match placed? {
            Some((first_id, enqueued_at)) => build_enqueued(py, &objects, first_id, enqueued_at),
            None => Ok(PyList::empty(py)),
        }
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
        let handle = handle_arg(handle)?;
        let removed = self.with_store(py, |store, now| store.delete(&handle, now))?;
        drop(removed);
        Ok(())
    }

    /// Removes the visible message of `request_id` unprocessed (its submitter withdrew it);
    /// False, changing nothing, when no message of that id is visible.
    fn withdraw(&self, py: Python<'_>, request_id: &str) -> PyResult<bool> {
        let removed = self.with_store(py, |store, now| Ok(store.withdraw_visible(request_id, now)))?;
        let withdrawn = removed.is_some();
        drop(removed); // its payload, after the lock
        Ok(withdrawn)
    }

    /// Dead-letters the message a current receipt handle names, at once.
    fn dead_letter_now(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        let handle = handle_arg(handle)?;
        self.with_store(py, |store, now| store.dead_letter_now(&handle, now))
    }

    /// Gives a received message back unprocessed, as if that receive had not happened: visible
    /// at once, its receive count and first receive as before; the handle becomes stale.
    fn release(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        let handle = handle_arg(handle)?;
        self.with_store(py, |store, now| store.release(&handle, now))
    }

    /// Releases the messages of every current handle; returns the handles that were stale or
    /// unknown (nothing changed for those).
    fn release_batch(&self, py: Python<'_>, handles: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let handles = handles.try_iter()?.map(|h| handle_arg(&h?)).collect::<PyResult<Vec<_>>>()?;
        self.with_store(py, |store, now| {
            Ok(handles.into_iter().filter(|handle| store.release(handle, now).is_err()).collect())
        })
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
        let handle = handle_arg(handle)?;
        self.with_store(py, |store, now| store.change_visibility(&handle, timeout, now))
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
                    format!("priority must be within 0..3, got {}", repr_of(priority)),
                ))
            }
        };
        let limit = count_arg(limit, "limit")?;
        let views = self
            .views(py, |store, _| Ok(store.peek(p, limit).into_iter().map(|slot| (slot, None)).collect()))?;
        build_list(py, &views)
    }

    /// Removes every message and invalidates every receipt handle.
    /// Sets (or with None removes) what is told, once the locks are released, the ids of the
    /// requests the store itself ended: ``listener(dead_lettered_ids, expired_ids)``.
    #[pyo3(signature = (listener))]
    fn set_ended_listener(&self, py: Python<'_>, listener: Option<Py<PyAny>>) {
        let previous = std::mem::replace(&mut self.state.lock_py_attached(py).ended, listener);
        drop(previous); // outside the lock: its drop may run Python code
    }

    fn purge(&self, py: Python<'_>) -> PyResult<()> {
        self.purge_all(py)
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
        self.state.lock_py_attached(py).clock.as_object(py)
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
        self.state.lock_py_attached(py).dead_letter.as_ref().map(|d| d.clone_ref(py))
    }

    /// Checks the store's structural invariants by a full scan; raises `AssertionError`.
    fn _check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.state
            .lock_py_attached(py)
            .store
            .check_invariants()
            .map_err(pyo3::exceptions::PyAssertionError::new_err)
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
            visit.call(&payload.object)?;
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
