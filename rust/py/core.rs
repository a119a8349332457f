//! `DispatchCore`: one dispatcher's selection, books and metrics, the one object its Python
//! layer asks and tells. One file past 700 lines: it is the one Python-facing object of the
//! dispatch path, and its methods share its locks' order; the logic is in the pure modules.
//!
//! It holds the pool messages are selected from (the in-memory store's core, shared with the
//! `InMemoryStorage` and any other dispatcher on it; or a prefetch buffer of its own), the
//! delivery ledger ([`crate::ledger`]) and the policy's settings. A dispatch with an
//! `LLMThrottle` is one call ([`dispatch`](PyDispatchCore::dispatch)); with another limiter
//! Python awaits the reservation between [`choose`](PyDispatchCore::choose) and
//! [`hand_out`](PyDispatchCore::hand_out). A mark is one call too (see `job.rs`); a `Plan` comes
//! back to Python only when a store or limiter call must be awaited.
//!
//! Locks: the throttle's, then the store's, then the core's own, each taken alone or nested in
//! that order only; no Python code runs under any of them (clocks are read before locking,
//! Python objects are released after unlocking).
//!
//! About 1,720 lines for one class whose methods share the ledger and the pool (its pymethods
//! cannot be split across files without a second `#[pymethods]` block per concern, which the
//! crate does not enable); the selection steps live in `steps.rs`, the job in `job.rs`, every
//! rule in the pure modules. The next split is the metrics report and the unfittable queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::PyList;
use pyo3::{intern, PyTraverseError, PyVisit};

use super::clock::ClockSource;
use super::errors::to_py_err;
use super::job::{PyJob, PyPlan, PyReady, Why};
use super::messages::{build_list, build_view_message, MessageView};
use super::report::{PyCapacity, PyCoreReport, PyInFlight, PyPurged, PyTenantReport};
use super::reported;
use super::requests::{datetime_seconds, visibility_timeout_arg};
use super::steps::{Against, BufferSteps, Message, Origin, Selecting, StoreSteps, Taken};
use super::store::PyStoreCore;
use super::throttle::PyThrottle;
use crate::buffer::{Buffer, Buffered, Leased};
use crate::dispatch::{self, Facts, Outcome, Settings};
use crate::errors::CoreError;
use crate::fair::FairConfig;
use crate::ledger::{self, DeliveryId, Ledger, LimiterOp, Mark, Plan, StoreOp, StoreReply, TenantCount};
use crate::policy::{Budget, Snapshot};
use crate::scoring::{validate_weight, MessageTraits, Weights, FACTOR_NAMES};
use crate::store::py_repr;
use crate::throttle::ReservationKey;

/// A delivery's reservation.
pub(crate) enum Reservation {
    /// Nothing reserved.
    None,
    /// On an `LLMThrottle`, by its key.
    Native(Py<PyThrottle>, ReservationKey),
    /// On another limiter, under `"request id#delivery number"`.
    Keyed(Py<PyAny>, String),
}

impl Reservation {
    fn clone_ref(&self, py: Python<'_>) -> Self {
        match self {
            Self::None => Self::None,
            Self::Native(throttle, key) => Self::Native(throttle.clone_ref(py), *key),
            Self::Keyed(limiter, key) => Self::Keyed(limiter.clone_ref(py), key.clone()),
        }
    }
}

/// What the ledger keeps of a delivery for the binding.
pub(crate) struct Held {
    message: Py<PyAny>,
    request_id: Box<str>,
    handle: Box<str>,
    reservation: Reservation,
    origin: Origin,
    score: f64,
    /// Seconds selecting it took (recorded at the hand-out).
    latency: f64,
}

/// What the core's lock guards.
pub(crate) struct CoreState {
    pub ledger: Ledger<Held>,
    pub buffer: Buffer<Py<PyAny>>,
    pub unfittable: dispatch::Unfittable,
    /// `(version, instant)`: the change version a dequeue that found nothing saw, and the
    /// instant of the dispatcher's clock at which it worked out a dequeue could next succeed.
    pub ready: Option<(u64, f64)>,
}

impl CoreState {
    /// Takes the reservation of every live delivery keyed `key` on `limiter` out of the books
    /// (left to the limiter as it stands): a new delivery is about to reserve under that key.
    /// One can hold it, as the key is `"request id#receive count"` and an id is unique only
    /// among messages not yet deleted: a stale delivery of an earlier message with the same id
    /// (its lease ran out and another consumer acknowledged it, its own mark not made yet) holds
    /// `"chat-7#1"` when the new message is first received. Its marks then make no limiter
    /// call, so they can never settle or refund the new delivery's reservation; its own stays
    /// as counted, erring high, as an abandoned delivery's does. Returns what was taken out, to
    /// be dropped unlocked.
    fn orphan_key(&mut self, py: Python<'_>, limiter: &Bound<'_, PyAny>, key: &str) -> Vec<Reservation> {
        let holders: Vec<DeliveryId> = self
            .ledger
            .deliveries()
            .filter(|(_, d)| {
                matches!(&d.data.reservation, Reservation::Keyed(held, k) if k == key && held.bind(py).is(limiter))
            })
            .map(|(id, _)| id)
            .collect();
        let mut orphaned = Vec::with_capacity(holders.len());
        for id in holders {
            if let Some(held) = self.ledger.data_mut(id) {
                orphaned.push(std::mem::replace(&mut held.reservation, Reservation::None));
            }
        }
        orphaned
    }
}

/// The dispatcher's settings, validated once.
struct Config {
    weights: Weights,
    custom_weights: Vec<f64>,
    /// The breakdown's names: the six factors, then the custom scorers.
    names: Vec<String>,
    max_candidates: usize,
    fair: bool,
    fairness_window: f64,
    settings: Settings,
}

impl Config {
    fn custom_names(&self) -> &[String] {
        &self.names[FACTOR_NAMES.len()..]
    }
}

/// One dispatcher's selection, delivery books and metrics.
#[pyclass(module = "llm_queue_dispatcher._core", name = "DispatchCore", frozen)]
pub struct PyDispatchCore {
    store: Option<Py<PyStoreCore>>,
    config: Config,
    state: Mutex<CoreState>,
    clock: ClockSource,
    runner: Py<PyAny>,
    logger: Py<PyAny>,
    version: AtomicU64,
    waiting: AtomicUsize,
}

fn bad_config(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, CoreError::InvalidConfig(message))
}

/// A dispatch's outcome for Python: the job, the seconds a held winner waits, or None.
fn outcome_object(py: Python<'_>, outcome: Outcome<Py<PyJob>>) -> PyResult<Py<PyAny>> {
    Ok(match outcome {
        Outcome::Taken(job) => job.into_any(),
        Outcome::Wait(seconds) => seconds.into_pyobject(py)?.into_any().unbind(),
        Outcome::Nothing => py.None(),
    })
}

impl PyDispatchCore {
    /// Request ids of selectable messages that can never fit `capacity`.
    fn ids_above_capacity(&self, py: Python<'_>, capacity: dispatch::Capacity) -> PyResult<Vec<String>> {
        match &self.store {
            Some(store) => store.get().with_store(py, |store, _| {
                Ok(dispatch::slots_above(store, capacity)
                    .into_iter()
                    .map(|s| store.message(s).request_id.to_string())
                    .collect())
            }),
            None => Ok(self.lock(py).buffer.ids_above(capacity).into_iter().map(str::to_owned).collect()),
        }
    }

    /// Takes every selectable message that can never fit `capacity` out.
    fn take_unfittable_core<'py>(
        &self,
        py: Python<'py>,
        capacity: dispatch::Capacity,
    ) -> PyResult<Bound<'py, PyList>> {
        let Some(store) = &self.store else {
            let mut state = self.lock(py);
            let items = state.buffer.take_above(capacity);
            state.unfittable.taken(items.iter().map(|item| &*item.request_id));
            drop(state);
            return PyList::new(py, items.into_iter().map(|item| item.message));
        };
        let timeout = self.config.settings.visibility_timeout;
        let views = store.get().with_store(py, |store, now| {
            let slots = dispatch::slots_above(store, capacity);
            let mut views = Vec::with_capacity(slots.len());
            let mut ids = Vec::with_capacity(slots.len());
            for slot in slots {
                let handle = store.receive_slot(slot, timeout, now)?;
                views.push(MessageView::of(py, store.message(slot), Some(handle)));
                ids.push(store.message(slot).request_id.clone());
            }
            Ok((views, ids))
        })?;
        let (views, ids) = views;
        self.lock(py).unfittable.taken(ids.iter().map(|id| &**id));
        build_list(py, &views)
    }

    pub(crate) fn breakdown_names(&self) -> &[String] {
        &self.config.names
    }

    pub(crate) fn fairness_window(&self) -> f64 {
        self.config.fairness_window
    }

    fn lock(&self, py: Python<'_>) -> parking_lot::MutexGuard<'_, CoreState> {
        self.state.lock_py_attached(py)
    }

    /// Something changed that a waiting dequeue should look at: the version moves, and the
    /// Python waiters, if any, are woken (with no lock held).
    fn changed(&self, py: Python<'_>) -> PyResult<()> {
        self.version.fetch_add(1, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.runner.getattr(py, intern!(py, "wakeup"))?.call_method0(py, intern!(py, "wake"))?;
        }
        Ok(())
    }

    fn custom<'a, 'py>(&self, custom_fn: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
        custom_fn.filter(|f| !f.is_none() && !self.config.custom_weights.is_empty())
    }

    pub(crate) fn is_live(&self, py: Python<'_>, id: DeliveryId) -> bool {
        self.lock(py).ledger.check_live(id).is_ok()
    }

    pub(crate) fn check_live(&self, py: Python<'_>, id: DeliveryId, message: &Py<PyAny>) -> PyResult<()> {
        if self.is_live(py, id) {
            Ok(())
        } else {
            Err(already_marked(py, message, None))
        }
    }

    // ----- handing out -------------------------------------------------------------------------

    /// Builds the job of a take and opens its delivery: handed out (`hand_out`), or reserved
    /// until its reservation is made or its lease confirmed. If its message object cannot be
    /// built, the take is undone.
    fn open(
        slf: &Bound<'_, Self>,
        taken: Taken,
        reservation: Reservation,
        started: (Instant, f64),
        hand_out: bool,
        needed: u64,
    ) -> PyResult<Py<PyJob>> {
        let py = slf.py();
        let core = slf.get();
        let (started, now) = started;
        let message = match taken.message {
            Message::Built(message) => message,
            Message::View(view) => match build_view_message(py, &view) {
                Ok(message) => message,
                Err(error) => {
                    core.undo(py, Some(&taken.handle), &reservation, taken.facts.charge);
                    return Err(error);
                }
            },
        };
        let key = match &reservation {
            Reservation::Keyed(_, key) => Some(key.clone()),
            _ => None,
        };
        let why = Why {
            facts: taken.why,
            tenant: taken.tenant.into(),
            priority: taken.facts.priority,
            waited: now - taken.facts.enqueued_at,
        };
        let lease_end = match taken.origin {
            Origin::Buffer { lease_end, .. } => lease_end,
            Origin::Store => f64::NAN,
        };
        let held = Held {
            message: message.clone_ref(py),
            request_id: taken.request_id,
            handle: taken.handle,
            reservation,
            origin: taken.origin,
            score: match &why.facts {
                Facts::Score { total, .. } => *total,
                Facts::Fair(_) => 0.0,
            },
            latency: started.elapsed().as_secs_f64(),
        };
        let id = {
            let mut state = core.lock(py);
            state.ledger.stats.name_tenant(taken.facts.tenant, &why.tenant);
            if hand_out {
                let latency = held.latency;
                state.ledger.open_handed_out(held, taken.facts, now, latency)
            } else {
                state.ledger.open(held, taken.facts)
            }
        };
        let sync = core.store.is_some() && key.is_none();
        let tokens = taken.facts.tokens;
        let job = PyJob {
            core: slf.clone().unbind(),
            id,
            message,
            why,
            dispatched_at: now,
            sync,
            key,
            tokens,
            needed,
            lease_end,
            score: Mutex::new(None),
        };
        Py::new(py, job)
    }

    /// After a dispatch of `throttle` that handed nothing out (`held`: it waits for a winner
    /// that does not fit yet) at `now`: records the limit that refused, as the limiter's own
    /// reason names it. The smallest waiting message refused names its limit; when it would be
    /// admitted and the dispatch still waits (a larger winner held, a reserve kept), the limit
    /// refusing the smallest request the limiter would not admit does (the token limit nearest
    /// exhaustion). Nothing waiting, nothing refused, or only requests that can never be
    /// admitted: nothing recorded.
    fn note_refusal(&self, py: Python<'_>, throttle: &PyThrottle, held: bool, now: f64) -> PyResult<()> {
        let Some(smallest) = self.min_visible_tokens(py)? else { return Ok(()) };
        let reason = throttle.with_state(py, |limiter, _| {
            let check = limiter.check(smallest);
            if !check.allowed {
                // Never admitted (larger than a capacity): unfittable, not waiting for a limit.
                return check.reason.filter(|_| check.available_in.is_finite());
            }
            if !held {
                return None;
            }
            let most = limiter.admissible_tokens()?;
            // Saturating: a float beyond u64 converts to u64::MAX.
            limiter.check((most.max(0.0).floor() as u64).saturating_add(1)).reason
        })?;
        if let Some(limit) = reason.and_then(ledger::limit_of_reason) {
            self.lock(py).ledger.stats.record_refusal(now, limit);
        }
        Ok(())
    }

    /// Undoes a take: the store's receive of `release` (a handle) undone, its `LLMThrottle`
    /// reservation and its charge given back.
    fn undo(
        &self,
        py: Python<'_>,
        release: Option<&str>,
        reservation: &Reservation,
        charge: Option<(u32, u64)>,
    ) {
        if let (Some(store), Some(handle)) = (&self.store, release) {
            let _ = store.get().apply(py, StoreOp::Release, handle);
        }
        self.correct_charge(
            py,
            charge.map(|(tenant, charge)| ledger::ChargeFix { tenant, charge, tokens: 0.0 }),
        );
        if let Reservation::Native(throttle, key) = reservation {
            let _ = throttle.get().with_state(py, |state, _| state.release_reservation(*key));
        }
    }

    fn correct_charge(&self, py: Python<'_>, fix: Option<ledger::ChargeFix>) {
        let Some(fix) = fix else { return };
        match &self.store {
            Some(store) => store.get().correct_fair_charge(py, fix.tenant, fix.charge, fix.tokens),
            None => self.lock(py).buffer.correct_charge(fix.tenant, fix.charge, fix.tokens),
        }
    }

    // ----- marks -------------------------------------------------------------------------------

    /// A mark of `job`: done here at once when nothing needs an await (the in-memory store, and
    /// an `LLMThrottle` or no reservation), the awaitable returned complete already; otherwise
    /// the runner's coroutine, which settles when awaited (`settle`) and awaits the plan's I/O.
    pub(crate) fn mark(
        &self,
        py: Python<'_>,
        job: &Bound<'_, PyJob>,
        mark: Mark,
        error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let job_ref = job.get();
        if job_ref.sync {
            return match self.settle_now(py, job_ref, mark, error) {
                Ok(_) => PyReady::done(py),
                Err(error) => PyReady::failed(py, error),
            };
        }
        let (kind, tokens, delay) = match mark {
            Mark::Processed { actual, .. } => ("processed", actual, 0.0),
            Mark::Failed { delay } => ("failed", None, delay),
            Mark::DeadLettered => ("dead_lettered", None, 0.0),
            Mark::Released => ("released", None, 0.0),
        };
        let parts = match mark {
            Mark::Processed { parts, .. } => parts,
            _ => None,
        };
        self.runner.call_method1(py, intern!(py, "mark"), (job, kind, tokens, delay, error, parts))
    }

    /// Settles the job's delivery with `mark`: its store call and its limiter call made here
    /// where they need no await (the in-memory store, an `LLMThrottle`); the rest is returned as
    /// a [`PyPlan`] for Python to await (None: all done). `error`: what a failure or a dead
    /// letter is logged with.
    fn settle_now(
        &self,
        py: Python<'_>,
        job: &PyJob,
        mark: Mark,
        error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<PyPlan>> {
        let id = job.id;
        let now = self.clock.now(py)?;
        let log = match (mark, error) {
            (Mark::Failed { .. }, Some(error)) => {
                Some(("info", "request %r failed: %r", error.clone().unbind()))
            }
            (Mark::DeadLettered, Some(error)) => {
                Some(("warning", "request %r dead-lettered: %r", error.clone().unbind()))
            }
            _ => None,
        };
        let (plan, handle, request_id, reservation) = {
            let mut state = self.lock(py);
            let Ok(plan) = state.ledger.settle(id, mark) else {
                drop(state);
                return Err(already_marked(py, &job.message, Some(mark)));
            };
            let held = &state.ledger.get(id).expect("settling").data;
            (plan, held.handle.clone(), held.request_id.clone(), held.reservation.clone_ref(py))
        };
        let mut stale = false;
        let charge = match (plan.store, &self.store) {
            (Some(op), None) => {
                // Another store: its call, and another limiter's, are awaited in Python; an
                // `LLMThrottle`'s is made by `finish`.
                let plan =
                    Self::py_plan(py, &plan, Some(op), &job.message, reservation, false, &request_id, log);
                return Ok(Some(plan));
            }
            (Some(op), Some(store)) => {
                let result = store.get().apply(py, op, &handle);
                let reply = match &result {
                    Ok(()) => StoreReply::Landed,
                    Err(CoreErrorOr::Core(CoreError::ReceiptHandle(_))) => StoreReply::Stale,
                    Err(_) => StoreReply::Failed,
                };
                let after = self.lock(py).ledger.store_replied(id, reply).map_err(|e| to_py_err(py, e))?;
                if let (false, Err(error)) = (after.proceed, result) {
                    return Err(error.into_py(py)); // failed: markable again, nothing else done
                }
                stale = after.stale_error;
                after.charge
            }
            (None, _) => plan.charge,
        };
        self.correct_charge(py, charge);
        match (plan.limiter, &reservation) {
            (Some(_), Reservation::Keyed(..)) => {
                return Ok(Some(Self::py_plan(
                    py,
                    &plan,
                    None,
                    &job.message,
                    reservation,
                    stale,
                    &request_id,
                    log,
                )));
            }
            (Some(op), Reservation::Native(throttle, key)) => {
                self.adjust_native(py, throttle.get(), *key, op, &request_id)?;
            }
            _ => {}
        }
        self.finish_delivery(py, id, now)?;
        if let Some((level, format, error)) = log {
            self.logger.call_method1(py, level, (format, &*request_id, error))?;
        }
        if stale {
            return Err(stale_error(py, &request_id, mark));
        }
        Ok(None)
    }

    /// The limiter call of a plan on an `LLMThrottle`. Its failures are logged: the mark stands
    /// (the call happened); only the limiter's count could not be corrected.
    fn adjust_native(
        &self,
        py: Python<'_>,
        throttle: &PyThrottle,
        key: ReservationKey,
        op: LimiterOp,
        request_id: &str,
    ) -> PyResult<()> {
        let outcome = match op {
            LimiterOp::Adjust(tokens) => throttle.adjust_reservation(py, key, tokens, None, request_id)?,
            LimiterOp::AdjustParts(input, output) => throttle.adjust_reservation(
                py,
                key,
                input.saturating_add(output),
                Some((input, output)),
                request_id,
            )?,
            LimiterOp::Release => throttle.with_state(py, |state, _| state.release_reservation(key))?,
            LimiterOp::Settle => throttle.with_state(py, |state, _| state.settle_reservation(key))?,
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(CoreError::UnknownRequest(_)) => self.log(
                py,
                "warning",
                ("rate limiter no longer knows request %r; its token count was not adjusted", request_id),
            ),
            Err(error) => self.log(
                py,
                "warning",
                (
                    "rate limiter refused the extra tokens of request %r (%s); the message is settled",
                    request_id,
                    error.to_string(),
                ),
            ),
        }
    }

    fn log<'py>(&self, py: Python<'py>, level: &str, args: impl pyo3::call::PyCallArgs<'py>) -> PyResult<()> {
        self.logger.call_method1(py, level, args).map(drop)
    }

    fn finish_delivery(&self, py: Python<'_>, id: DeliveryId, now: f64) -> PyResult<()> {
        let ended = self.lock(py).ledger.finish(id, now);
        // The delivery's objects are released here, unlocked.
        drop(ended.map_err(|e| to_py_err(py, e))?);
        self.changed(py)
    }

    #[allow(clippy::too_many_arguments)]
    fn py_plan(
        py: Python<'_>,
        plan: &Plan,
        store: Option<StoreOp>,
        message: &Py<PyAny>,
        reservation: Reservation,
        stale: bool,
        request_id: &str,
        log: Option<(&'static str, &'static str, Py<PyAny>)>,
    ) -> PyPlan {
        let (store, seconds) = match store {
            Some(StoreOp::Delete) => (Some("delete"), 0.0),
            Some(StoreOp::ChangeVisibility(seconds)) => (Some("visibility"), seconds),
            Some(StoreOp::DeadLetter) => (Some("dead_letter"), 0.0),
            Some(StoreOp::Release) => (Some("release"), 0.0),
            None => (None, 0.0),
        };
        let (limiter_call, tokens, parts) = match plan.limiter {
            Some(LimiterOp::Adjust(tokens)) => (Some("adjust"), tokens, None),
            Some(LimiterOp::AdjustParts(input, output)) => {
                (Some("adjust"), input.saturating_add(output), Some((input, output)))
            }
            Some(LimiterOp::Release) => (Some("release"), 0, None),
            Some(LimiterOp::Settle) => (Some("settle"), 0, None),
            None => (None, 0, None),
        };
        // Only another limiter's call is Python's: an `LLMThrottle`'s is made by `finish`.
        let (limiter, key, limiter_call) = match reservation {
            Reservation::Keyed(limiter, key) if limiter_call.is_some() => (Some(limiter), key, limiter_call),
            _ => (None, String::new(), None),
        };
        PyPlan {
            delivery: plan.delivery.0,
            store,
            seconds,
            message: message.clone_ref(py),
            limiter,
            limiter_call,
            tokens,
            parts,
            key,
            stale,
            request_id: request_id.to_owned(),
            log,
        }
    }

    pub(crate) fn update_visibility(
        &self,
        py: Python<'_>,
        job: &Bound<'_, PyJob>,
        seconds: f64,
    ) -> PyResult<Py<PyAny>> {
        let handle =
            self.lock(py).ledger.get(job.get().id).map(|d| d.data.handle.clone()).unwrap_or_default();
        match &self.store {
            Some(store) => {
                store
                    .get()
                    .apply(py, StoreOp::ChangeVisibility(seconds), &handle)
                    .map_err(|e| e.into_py(py))?;
                PyReady::done(py)
            }
            // A buffered delivery: the prefetcher renews in order with its other lease calls.
            None => self.runner.getattr(py, intern!(py, "prefetch"))?.call_method1(
                py,
                intern!(py, "change_visibility"),
                (&*handle, seconds),
            ),
        }
    }

    pub(crate) fn abandon(&self, py: Python<'_>, id: DeliveryId) {
        let abandoned = self.lock(py).ledger.abandon(id);
        drop(abandoned);
    }

    /// Selectable messages per tenant (the store's counts, or the buffer's and this
    /// dispatcher's deliveries in flight: what other processes hold or the store keeps is
    /// unseen), with the tenants' names.
    fn tenant_counts(&self, py: Python<'_>) -> PyResult<Vec<(TenantCount, String)>> {
        if let Some(store) = &self.store {
            return store.get().with_store(py, |store, _| {
                Ok(store
                    .tenant_counts_by_id()
                    .filter(|(_, _, c)| c.visible + c.in_flight > 0)
                    .map(|(tenant, name, c)| {
                        (TenantCount { tenant, visible: c.visible, in_flight: c.in_flight }, name.to_owned())
                    })
                    .collect())
            });
        }
        let state = self.lock(py);
        let mut counts: Vec<TenantCount> = state
            .buffer
            .tenant_counts()
            .into_iter()
            .map(|(tenant, visible)| TenantCount { tenant, visible, in_flight: 0 })
            .collect();
        for (tenant, in_flight) in state.ledger.in_flight_by_tenant() {
            match counts.iter_mut().find(|c| c.tenant == tenant) {
                Some(count) => count.in_flight = in_flight,
                None => counts.push(TenantCount { tenant, visible: 0, in_flight }),
            }
        }
        Ok(counts.into_iter().map(|c| (c, state.buffer.tenant_name(c.tenant).to_owned())).collect())
    }

    fn tenant_name(&self, py: Python<'_>, tenant: u32) -> PyResult<String> {
        match &self.store {
            Some(store) => store.get().with_store(py, |store, _| Ok(store.tenant_name(tenant).to_owned())),
            None => Ok(self.lock(py).buffer.tenant_name(tenant).to_owned()),
        }
    }

    /// `choose` against a reported budget, `snapshot` and `request_capacity`.
    fn choose_against(
        slf: &Bound<'_, Self>,
        limiter: &Bound<'_, PyAny>,
        snapshot: Snapshot,
        request_capacity: f64,
        custom_fn: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let core = slf.get();
        let started = (Instant::now(), core.clock.now(py)?);
        let (config, settings) = (&core.config, core.config.settings);
        let against = Against::Reported { snapshot, request_capacity };
        // The reservation is the caller's, after the take: its key names this delivery.
        let stepwise = Settings { reserve: false, ..settings };
        let selecting = Selecting {
            against,
            weights: config.weights,
            custom_fn: core.custom(custom_fn),
            names: config.custom_names(),
            reserve: settings.reserve,
        };
        let outcome = match (&core.store, config.fair) {
            (Some(store), true) => store.get().take_fair(py, &snapshot, settings)?,
            (None, true) => {
                let mut state = core.lock(py);
                let outcome = dispatch::take_fair_buffered(&mut state.buffer, &snapshot, settings, started.1);
                outcome.map(|(t, needed)| {
                    (Taken::from_buffer(&state, t.item, t.facts, t.charge, settings.reserve), needed)
                })
            }
            (Some(store), false) => {
                let mut steps = StoreSteps::new(py, store.get(), selecting, settings.visibility_timeout);
                dispatch::attempt(&mut steps, &config.custom_weights, config.max_candidates, stepwise)?.map(
                    |(t, _)| {
                        let tokens = t.facts.tokens;
                        (t, tokens)
                    },
                )
            }
            (None, false) => {
                let mut steps = BufferSteps::new(py, &core.state, selecting, started.1);
                dispatch::attempt(&mut steps, &config.custom_weights, config.max_candidates, stepwise)?.map(
                    |(t, _)| {
                        let tokens = t.facts.tokens;
                        (t, tokens)
                    },
                )
            }
        };
        match outcome {
            Outcome::Taken((taken, needed)) => {
                let reservation = if settings.reserve {
                    let key = format!("{}#{}", taken.request_id, taken.delivery);
                    let orphaned = core.lock(py).orphan_key(py, limiter, &key);
                    drop(orphaned);
                    Reservation::Keyed(limiter.clone().unbind(), key)
                } else {
                    Reservation::None
                };
                Ok(Self::open(slf, taken, reservation, started, false, needed)?.into_any())
            }
            // Only a fair winner that does not fit reports its tokens; a score winner's wait is
            // asked of the limiter once its reservation is refused.
            Outcome::Wait(needed) => Ok((needed as u64).into_pyobject(py)?.into_any().unbind()),
            Outcome::Nothing => Ok(py.None()),
        }
    }
}

/// `MessageStateError` for a job marked already (`mark`: the mark refused).
fn already_marked(py: Python<'_>, message: &Py<PyAny>, mark: Option<Mark>) -> PyErr {
    let id: String = message
        .bind(py)
        .getattr(intern!(py, "payload"))
        .and_then(|p| p.getattr(intern!(py, "id")))
        .and_then(|id| id.extract())
        .unwrap_or_default();
    let action = match mark {
        None => "",
        Some(Mark::Processed { .. }) => "; cannot mark it processed",
        Some(Mark::Failed { .. }) => "; cannot mark it failed",
        Some(Mark::DeadLettered) => "; cannot dead-letter it",
        Some(Mark::Released) => "; cannot release it",
    };
    to_py_err(py, CoreError::MessageState(format!("message {} was already marked{action}", py_repr(&id))))
}

fn stale_error(py: Python<'_>, request_id: &str, mark: Mark) -> PyErr {
    let what = if matches!(mark, Mark::DeadLettered) { "dead-lettered" } else { "deleted" };
    to_py_err(
        py,
        CoreError::ReceiptHandle(format!(
            "message {} could not be {what}: its receipt handle is no longer current (it was received \
             again after its visibility ran out, or it has left the queue: acknowledged, dead-lettered, \
             expired or purged)",
            py_repr(request_id)
        )),
    )
}

/// A store call's failure: the core's, or a Python exception (a clock that raised).
pub(crate) enum CoreErrorOr {
    Core(CoreError),
    Py(PyErr),
}

impl CoreErrorOr {
    pub(crate) fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Self::Core(error) => to_py_err(py, error),
            Self::Py(error) => error,
        }
    }
}

#[pymethods]
impl PyDispatchCore {
    /// A dispatcher's core over `pool` (an in-memory store's core, or None for a prefetch
    /// buffer of its own). Arguments come validated from `LLMQueueDispatcherConfig`; the weights
    /// are checked again where the core relies on them.
    #[new]
    #[pyo3(signature = (pool, *, clock, weights, custom_weights, custom_names, max_candidates, policy,
        tenant_weights, fairness_window, urgent_first, max_wait, reserve_tokens, visibility_timeout,
        min_score, reserve, hold, metrics_retention, runner, logger, score_urgent_first=false,
        urgent_reserve=None, slo_targets=ledger::DEFAULT_SLO_TARGETS))]
    // Keyword arguments of the config's fields, as Python passes them.
    #[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
    fn new(
        py: Python<'_>,
        pool: Option<Py<PyStoreCore>>,
        clock: Option<&Bound<'_, PyAny>>,
        weights: [f64; 6],
        custom_weights: Vec<f64>,
        custom_names: Vec<String>,
        max_candidates: usize,
        policy: &str,
        tenant_weights: Vec<(String, f64)>,
        fairness_window: f64,
        urgent_first: bool,
        max_wait: [f64; 4],
        reserve_tokens: Option<f64>,
        visibility_timeout: &Bound<'_, PyAny>,
        min_score: f64,
        reserve: bool,
        hold: bool,
        metrics_retention: f64,
        runner: Py<PyAny>,
        logger: Py<PyAny>,
        score_urgent_first: bool,
        urgent_reserve: Option<f64>,
        slo_targets: [f64; 4],
    ) -> PyResult<Self> {
        if slo_targets.iter().any(|t| t.is_nan() || *t < 0.0) {
            return Err(bad_config(py, format!("slo_targets must be seconds >= 0, got {slo_targets:?}")));
        }
        if urgent_reserve.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
            return Err(bad_config(
                py,
                format!("urgent_reserve must be None or a count >= 0, got {urgent_reserve:?}"),
            ));
        }
        for (name, value) in FACTOR_NAMES.iter().zip(weights) {
            validate_weight(name, value).map_err(|e| to_py_err(py, e))?;
        }
        if custom_names.len() != custom_weights.len() {
            return Err(bad_config(py, "custom_names and custom_weights differ in length".into()));
        }
        for (name, &value) in custom_names.iter().zip(&custom_weights) {
            validate_weight(&format!("of custom scorer {}", py_repr(name)), value)
                .map_err(|e| to_py_err(py, e))?;
        }
        if max_candidates == 0 {
            return Err(bad_config(py, "max_candidates_to_evaluate must be >= 1, got 0".into()));
        }
        let fair = match policy {
            "score" => false,
            "fair_priority" => true,
            other => {
                return Err(bad_config(
                    py,
                    format!("policy must be 'score' or 'fair_priority', got {other:?}"),
                ))
            }
        };
        let visibility_timeout = visibility_timeout_arg(visibility_timeout)?;
        let mut buffer = Buffer::default();
        if fair {
            let config = FairConfig {
                weights: HashMap::default(),
                fairness_window,
                urgent_first,
                max_wait,
                urgent_reserve,
            };
            match &pool {
                Some(store) => store.get().configure_fair_lanes(py, &tenant_weights, config, reserve_tokens),
                None => buffer.configure_fair(&tenant_weights, config, reserve_tokens),
            }
        }
        let names = FACTOR_NAMES.iter().map(|n| (*n).to_owned()).chain(custom_names).collect();
        Ok(Self {
            store: pool,
            config: Config {
                weights: Weights::from_array(weights).with_urgent(score_urgent_first, urgent_reserve),
                custom_weights,
                names,
                max_candidates,
                fair,
                fairness_window,
                settings: Settings { visibility_timeout, min_score, reserve, hold },
            },
            state: Mutex::new(CoreState {
                ledger: {
                    let mut ledger = Ledger::new(metrics_retention, fairness_window);
                    ledger.stats.set_slo_targets(slo_targets);
                    ledger
                },
                buffer,
                unfittable: dispatch::Unfittable::default(),
                ready: None,
            }),
            clock: ClockSource::from_arg(clock, ClockSource::Wall)?,
            runner,
            logger,
            version: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    /// One dispatch with the budget of `throttle`: select, reserve, take. The job (handed out;
    /// with a prefetch buffer, reserved until `hand_out` confirms its lease), the seconds until
    /// a held winner fits, or None.
    #[pyo3(signature = (throttle, custom_fn=None))]
    fn dispatch(
        slf: &Bound<'_, Self>,
        throttle: &Bound<'_, PyThrottle>,
        custom_fn: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let core = slf.get();
        let started = (Instant::now(), core.clock.now(py)?);
        let (config, settings) = (&core.config, core.config.settings);
        let custom = core.custom(custom_fn);
        let against = Against::Throttle(throttle.get());
        let selecting = Selecting {
            against,
            weights: config.weights,
            custom_fn: custom,
            names: config.custom_names(),
            reserve: settings.reserve,
        };
        let outcome = match (&core.store, custom) {
            (Some(store), None) => {
                store.get().fused(py, throttle.get(), &config.weights, settings, config.fair)?
            }
            (Some(store), Some(_)) => {
                let mut steps = StoreSteps::new(py, store.get(), selecting, settings.visibility_timeout);
                dispatch::attempt(&mut steps, &config.custom_weights, config.max_candidates, settings)?
            }
            (None, Some(_)) => {
                let mut steps = BufferSteps::new(py, &core.state, selecting, started.1);
                dispatch::attempt(&mut steps, &config.custom_weights, config.max_candidates, settings)?
            }
            (None, None) => {
                let limiter_now = throttle.get().now(py)?;
                throttle.get().with_state_at(py, limiter_now, |limiter, limiter_now| {
                    let mut state = core.lock(py);
                    let now = started.1;
                    let taken = if config.fair {
                        dispatch::buffered_fair(&mut state.buffer, limiter, settings, now, limiter_now)
                    } else {
                        dispatch::buffered_score(
                            &mut state.buffer,
                            limiter,
                            &config.weights,
                            settings,
                            now,
                            limiter_now,
                        )
                    };
                    taken.map(|t| {
                        (Taken::from_buffer(&state, t.item, t.facts, t.charge, t.key.is_some()), t.key)
                    })
                })
            }
        };
        let hand_out = core.store.is_some(); // a buffered message's lease is confirmed first
        let outcome = match outcome {
            Outcome::Taken((taken, key)) => {
                let reservation =
                    key.map_or(Reservation::None, |key| Reservation::Native(throttle.clone().unbind(), key));
                Outcome::Taken(Self::open(slf, taken, reservation, started, hand_out, 0)?)
            }
            Outcome::Wait(seconds) => {
                core.note_refusal(py, throttle.get(), true, started.1)?;
                Outcome::Wait(seconds)
            }
            Outcome::Nothing => {
                core.note_refusal(py, throttle.get(), false, started.1)?;
                Outcome::Nothing
            }
        };
        outcome_object(py, outcome)
    }

    /// Records, for the metrics, that a limiter other than `LLMThrottle` refused a waiting
    /// message with `reason` (its `RateLimitCheckResult.reason`, e.g. `"tpm_limit"`); a reason
    /// naming no limit is ignored.
    fn limiter_refused(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        if let Some(limit) = ledger::limit_of_reason(reason) {
            let now = self.clock.now(py)?;
            self.lock(py).ledger.stats.record_refusal(now, limit);
        }
        Ok(())
    }

    /// The first half of a dispatch with a limiter other than `LLMThrottle`, from what its
    /// `get_metrics()` reported (`metrics`): selects and takes the winner, not yet handed out.
    /// The job (its reservation, under `job._key`, is the caller's to make, then `hand_out` or
    /// `revoke`), the tokens a held winner needs (`int`: ask the limiter when they fit), or None.
    #[pyo3(signature = (limiter, metrics, custom_fn=None))]
    fn choose(
        slf: &Bound<'_, Self>,
        limiter: &Bound<'_, PyAny>,
        metrics: &Bound<'_, PyAny>,
        custom_fn: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let (snapshot, request_capacity) = reported::snapshot(limiter, metrics)?;
        Self::choose_against(slf, limiter, snapshot, request_capacity, custom_fn)
    }

    /// Settles `job` (`kind`: `"processed"` with `tokens` or None, `"failed"` after `delay`,
    /// `"dead_lettered"`, `"released"`; `error` is logged with a failure or a dead letter): what
    /// needs no await is done here; the rest is returned as a `Plan` (None: all done).
    /// `parts`: the input and output tokens of a processed call, adding up to `tokens`, when
    /// known (`ProcessableMessage.mark_as_processed` checked them).
    #[pyo3(signature = (job, kind, tokens=None, delay=0.0, error=None, parts=None))]
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        py: Python<'_>,
        job: &Bound<'_, PyJob>,
        kind: &str,
        tokens: Option<u64>,
        delay: f64,
        error: Option<&Bound<'_, PyAny>>,
        parts: Option<(u64, u64)>,
    ) -> PyResult<Option<PyPlan>> {
        if parts.is_some_and(|(input, output)| tokens != input.checked_add(output)) {
            return Err(bad_config(py, "parts must add up to tokens".to_owned()));
        }
        let mark = match kind {
            "processed" => Mark::Processed { actual: tokens, parts },
            "failed" => Mark::Failed { delay },
            "dead_lettered" => Mark::DeadLettered,
            "released" => Mark::Released,
            other => return Err(bad_config(py, format!("unknown mark {other:?}"))),
        };
        self.settle_now(py, job.get(), mark, error)
    }

    /// Hands out a job `choose` or a buffered `dispatch` took (its reservation made, its lease
    /// confirmed). False when a purge removed its message meanwhile: `revoke` it.
    fn hand_out(&self, py: Python<'_>, job: &Bound<'_, PyJob>) -> bool {
        // Its dispatch instant is the selection's: reading a clock here could fail with the
        // reservation made and the message taken.
        let (id, now) = (job.get().id, job.get().dispatched_at);
        let mut state = self.lock(py);
        let latency = state.ledger.get(id).map_or(0.0, |d| d.data.latency);
        state.ledger.hand_out(id, now, latency).is_ok()
    }

    /// The global choice's winner (`redis/global_choice.py`), leased by the store for
    /// `lease_seconds` more and reserved under its delivery's key by the script that chose it:
    /// `buffer_insert`, `choose` (nothing else is in the buffer) and `hand_out` in one call.
    /// Returns `(found, handed_out)`: `found` is what `choose` took (None or another job when the
    /// books did not take this message: the caller revokes it and gives the winner back).
    fn open_winner(
        slf: &Bound<'_, Self>,
        message: &Bound<'_, PyAny>,
        lease_seconds: f64,
        limiter: &Bound<'_, PyAny>,
        token_capacity: f64,
        request_capacity: f64,
    ) -> PyResult<(Py<PyAny>, bool)> {
        let py = slf.py();
        let core = slf.get();
        let leased = read_leased(message, core.clock.now(py)? + lease_seconds)?;
        let not_kept = core.lock(py).buffer.insert(vec![leased]);
        drop(not_kept); // its message object is released here, unlocked
        core.changed(py)?;
        let found = Self::choose_against(
            slf,
            limiter,
            Snapshot {
                available_tokens: f64::INFINITY,
                available_requests: f64::INFINITY,
                capacity: token_capacity,
            },
            request_capacity,
            None,
        )?;
        let handed_out = match found.bind(py).cast::<PyJob>() {
            Ok(job) if job.get().message.bind(py).is(message) => core.hand_out(py, job),
            _ => false,
        };
        Ok((found, handed_out))
    }

    /// Takes back a job that will not be handed out: its charge and its reservation (when
    /// `reserved`: made on the limiter) given back — an `LLMThrottle`'s here; another limiter's
    /// as the `Plan` returned, the caller's to await — and its message returned where it came
    /// from when `restore` (the store's receive undone; back into the buffer), else forgotten
    /// (its lease was lost to another consumer, or a purge removed it).
    #[pyo3(signature = (job, restore=true, reserved=true))]
    fn revoke(
        &self,
        py: Python<'_>,
        job: &Bound<'_, PyJob>,
        restore: bool,
        reserved: bool,
    ) -> PyResult<Option<PyPlan>> {
        let (plan, held) = self.lock(py).ledger.revoke(job.get().id).map_err(|e| to_py_err(py, e))?;
        if let (true, &Origin::Buffer { seq, traits, tenant, deadline, lease_end, parts }) =
            (restore, &held.origin)
        {
            let item = Buffered {
                message: held.message.clone_ref(py),
                request_id: held.request_id.clone(),
                handle: held.handle.clone(),
                traits,
                seq,
                tenant,
                deadline,
                lease_end,
                parts,
            };
            self.lock(py).buffer.restore(item);
        }
        let release = (restore && matches!(held.origin, Origin::Store)).then_some(&*held.handle);
        let reservation = if reserved { held.reservation.clone_ref(py) } else { Reservation::None };
        self.undo(py, release, &reservation, None);
        self.correct_charge(py, plan.charge);
        // No change to wake anyone for: the message is back as it was before the take.
        Ok(match (reservation, plan.limiter) {
            (reservation @ Reservation::Keyed(..), Some(_)) => Some(Self::py_plan(
                py,
                &plan,
                None,
                &held.message,
                reservation,
                false,
                &held.request_id,
                None,
            )),
            _ => None,
        })
    }

    /// The store's reply to a plan's call (`"landed"`, `"stale"` or `"failed"`): a failed call
    /// makes the job markable again (nothing else is done: re-raise the failure); otherwise the
    /// charge is corrected and the limiter call is due. Returns whether the mark must raise
    /// `ReceiptHandleError` once done.
    fn store_replied(&self, py: Python<'_>, delivery: u64, reply: &str) -> PyResult<bool> {
        let reply = match reply {
            "landed" => StoreReply::Landed,
            "stale" => StoreReply::Stale,
            _ => StoreReply::Failed,
        };
        let after =
            self.lock(py).ledger.store_replied(DeliveryId(delivery), reply).map_err(|e| to_py_err(py, e))?;
        self.correct_charge(py, after.charge);
        Ok(after.stale_error)
    }

    /// Ends a settling delivery once `plan` is done (its limiter call made, or failed and
    /// logged; an `LLMThrottle`'s is made here): counted, waiting dequeues woken, the mark
    /// logged; `stale`: then raises `ReceiptHandleError` (the message will be processed again).
    fn finish(&self, py: Python<'_>, plan: &Bound<'_, PyPlan>, stale: bool) -> PyResult<()> {
        let done = plan.get();
        let id = DeliveryId(done.delivery);
        let (native, dispatched_at) = {
            let books = self.lock(py);
            let Some(d) = books.ledger.get(id) else {
                return Err(to_py_err(
                    py,
                    CoreError::MessageState(format!("delivery {} has ended", done.delivery)),
                ));
            };
            let native = match (&d.data.reservation, d.state) {
                (Reservation::Native(throttle, key), ledger::State::Settling { mark, .. }) => {
                    ledger::limiter_op(d.facts, mark)
                        .map(|op| (throttle.clone_ref(py), *key, op, d.data.request_id.clone()))
                }
                _ => None,
            };
            (native, d.dispatched_at)
        };
        if let Some((throttle, key, op, request_id)) = native {
            self.adjust_native(py, throttle.get(), key, op, &request_id)?;
        }
        // A clock failing now must not leave the delivery half settled: its dispatch instant
        // stands in for the metrics.
        let now = self.clock.now(py).unwrap_or(dispatched_at);
        self.finish_delivery(py, id, now)?;
        if let Some((level, format, error)) = &done.log {
            self.logger.call_method1(py, *level, (*format, &done.request_id, error))?;
        }
        if stale {
            let mark = if done.store == Some("dead_letter") {
                Mark::DeadLettered
            } else {
                Mark::Processed { actual: None, parts: None }
            };
            return Err(stale_error(py, &done.request_id, mark));
        }
        Ok(())
    }

    // ----- the prefetch buffer -----------------------------------------------------------------

    /// Adds messages leased until `lease_end` (the core's clock) to the buffer (all read before
    /// any is added). Returns the handles of copies not kept (of two deliveries of one request
    /// the later is kept).
    fn buffer_insert(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        lease_end: f64,
    ) -> PyResult<Vec<String>> {
        let leased =
            messages.try_iter()?.map(|m| read_leased(&m?, lease_end)).collect::<PyResult<Vec<_>>>()?;
        let not_kept = self.lock(py).buffer.insert(leased);
        let handles = not_kept.iter().map(|item| item.handle.to_string()).collect();
        drop(not_kept); // their message objects are released here, unlocked
        self.changed(py)?;
        Ok(handles)
    }

    /// Removes and returns every buffered message.
    fn buffer_drain(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        let items = self.lock(py).buffer.drain();
        items.into_iter().map(|item| item.message).collect()
    }

    /// Receipt handles of the buffered messages.
    fn buffer_handles(&self, py: Python<'_>) -> Vec<String> {
        self.lock(py).buffer.handles().map(str::to_owned).collect()
    }

    /// Removes and returns the buffered message with this receipt handle, if there.
    fn buffer_discard(&self, py: Python<'_>, handle: &str) -> Option<Py<PyAny>> {
        let item = self.lock(py).buffer.discard(handle);
        item.map(|item| item.message)
    }

    /// Removes and returns buffered messages whose deadline has passed (still leased).
    fn buffer_take_expired(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let now = self.clock.now(py)?;
        let items = self.lock(py).buffer.take_expired(now);
        Ok(items.into_iter().map(|item| item.message).collect())
    }

    /// Handles of the buffered messages whose lease has half of the visibility timeout or less
    /// left now (`every`: of all), but for those in `renewing` (renewals on their way).
    #[pyo3(signature = (every, renewing))]
    fn buffer_due(
        &self,
        py: Python<'_>,
        every: bool,
        renewing: std::collections::HashSet<String>,
    ) -> PyResult<Vec<String>> {
        let now = self.clock.now(py)?;
        let half = self.config.settings.visibility_timeout / 2.0;
        let state = self.lock(py);
        Ok(state
            .buffer
            .due(now, half, every, |h| renewing.contains(h))
            .into_iter()
            .map(str::to_owned)
            .collect())
    }

    /// A buffered lease renewed at `started` (the core's clock, before the call): it ends a
    /// visibility timeout later.
    fn buffer_renewed(&self, py: Python<'_>, handle: &str, started: f64) {
        let end = started + self.config.settings.visibility_timeout;
        self.lock(py).buffer.renewed(handle, end);
    }

    /// Seconds until the next buffered lease is due for renewal (None when the buffer is empty).
    fn buffer_next_due(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        let now = self.clock.now(py)?;
        let half = self.config.settings.visibility_timeout / 2.0;
        Ok(self.lock(py).buffer.next_due(half).map(|due| due - now))
    }

    /// The core clock's reading (what lease ends are counted in).
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        self.clock.now(py)
    }

    /// Messages buffered.
    #[getter]
    fn buffered(&self, py: Python<'_>) -> usize {
        self.lock(py).buffer.len()
    }

    // ----- what waiting and reports read -------------------------------------------------------

    /// Bumped by every change a waiting dequeue should look at.
    #[getter]
    fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Records a change made outside the core (an enqueue): bumps the version.
    fn bump(&self) {
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    /// How many Python waiters there are to wake on a change (the runner's `wake` is called
    /// only then).
    #[getter]
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_waiting(&self, waiting: usize) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    /// The store clock's instant at which the next in-flight message becomes visible (None with
    /// a prefetch buffer, or when nothing is in flight).
    fn next_visibility_change(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        match &self.store {
            Some(store) => store.get().with_store(py, |store, _| Ok(store.next_visibility_change())),
            None => Ok(None),
        }
    }

    /// The smallest estimate among the messages selection can choose from.
    fn min_visible_tokens(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        match &self.store {
            Some(store) => store.get().with_store(py, |store, _| Ok(store.index().min_tokens())),
            None => Ok(self.lock(py).buffer.min_tokens()),
        }
    }

    /// Seconds until the best score reaches the minimum with time alone (None: never without
    /// another change), with `available_tokens` as the budget.
    fn time_until_score(&self, py: Python<'_>, available_tokens: f64) -> PyResult<Option<f64>> {
        let budget = Budget { available: available_tokens, max_tokens: available_tokens };
        let weights = self.config.weights;
        let custom_total: f64 = self.config.custom_weights.iter().sum();
        let threshold = self.config.settings.min_score;
        let now = self.clock.now(py)?;
        let best_at = |offset: f64| -> PyResult<Option<f64>> {
            match &self.store {
                Some(store) => store.get().with_store(py, |store, now| {
                    Ok(dispatch::best_score_in_store(store, &weights, budget, now + offset))
                }),
                None => {
                    Ok(dispatch::best_score_buffered(&self.lock(py).buffer, &weights, budget, now + offset))
                }
            }
        };
        dispatch::time_until_score(best_at, custom_total, threshold)
    }

    /// The selectable requests the limiter can never grant that were not reported before, each
    /// logged (a warning, once per request): an estimate above `capacity.whole` (the smallest
    /// capacity of the limits counting the whole estimate), an input part above `capacity.input`
    /// or an output part above `capacity.output` (without parts, the estimate against all
    /// three). Remembers the capacity for the metrics' count of unfittable messages.
    fn unfittable(&self, py: Python<'_>, capacity: &Bound<'_, PyCapacity>) -> PyResult<Vec<String>> {
        let capacity = dispatch::Capacity::from(*capacity.get());
        let above = self.ids_above_capacity(py, capacity)?;
        let new = self.lock(py).unfittable.observe(capacity, above.iter().map(String::as_str));
        if !new.is_empty() {
            let warning = dispatch::reason::unfittable_warning(capacity);
            for request_id in &new {
                self.log(py, "warning", (warning.as_str(), &**request_id))?;
            }
        }
        Ok(new.into_iter().map(String::from).collect())
    }

    /// From `limiter`'s `get_metrics()` (`metrics`), the most tokens it can ever grant one
    /// request (`reported::capacity`).
    #[staticmethod]
    fn capacity(limiter: &Bound<'_, PyAny>, metrics: &Bound<'_, PyAny>) -> PyResult<PyCapacity> {
        reported::capacity(limiter, metrics)
    }

    /// The seconds `limiter`'s `can_process` answer `check` says a waiting dequeue should wait
    /// (`reported::wait`), noting for the metrics the limit a limiter other than `LLMThrottle`
    /// named refusing.
    fn refusal_wait(
        &self,
        py: Python<'_>,
        limiter: &Bound<'_, PyAny>,
        check: &Bound<'_, PyAny>,
    ) -> PyResult<f64> {
        let (wait, reason) = reported::wait(limiter, check)?;
        if let Some(reason) = reason {
            self.limiter_refused(py, &reason)?;
        }
        Ok(wait)
    }

    /// Seconds until a dequeue that found nothing could hand something out
    /// (`dispatch::until_ready`): `held`, the seconds a held winner waits; `smallest_wait`, the
    /// limiter's wait for the smallest selectable message; the tokens `limiter` reported
    /// available in `metrics` (for the score crossing); `refill`, how often a prefetch buffer is
    /// filled again. Kept, with `seen` (the change version the dequeue started from), for
    /// `time_until_ready`.
    #[allow(clippy::too_many_arguments)]
    fn until_ready(
        &self,
        py: Python<'_>,
        limiter: &Bound<'_, PyAny>,
        metrics: &Bound<'_, PyAny>,
        held: Option<f64>,
        smallest_wait: Option<f64>,
        refill: Option<f64>,
        seen: u64,
    ) -> PyResult<f64> {
        let available_tokens = reported::available_tokens(limiter, metrics)?;
        let change = self.next_visibility_change(py)?;
        let visibility = match change {
            Some(at) => Some(at - self.clock.now(py)?),
            None => None,
        };
        let mut error = None;
        let crossing = || {
            self.time_until_score(py, available_tokens).unwrap_or_else(|e| {
                error = Some(e);
                None
            })
        };
        let until = dispatch::until_ready(held, visibility, refill, smallest_wait, crossing);
        if let Some(error) = error {
            return Err(error);
        }
        let now = self.clock.now(py)?;
        self.lock(py).ready = Some((seen, now + until));
        Ok(until)
    }

    /// Seconds of the dispatcher's clock until a dequeue could hand something out, as the last
    /// `until_ready` worked it out: 0 when anything changed since (or none did), never below 0.
    fn time_until_ready(&self, py: Python<'_>) -> PyResult<f64> {
        let ready = self.lock(py).ready;
        match ready {
            Some((seen, at)) if seen == self.version.load(Ordering::Relaxed) => {
                Ok((at - self.clock.now(py)?).max(0.0))
            }
            _ => Ok(0.0),
        }
    }

    /// Request ids of selectable messages whose estimate exceeds `capacity`.
    fn ids_above(&self, py: Python<'_>, capacity: f64) -> PyResult<Vec<String>> {
        self.ids_above_capacity(py, dispatch::Capacity::whole(capacity))
    }

    /// Takes every selectable message the limiter can never grant out (as `unfittable` judges
    /// them; leased: received from the in-memory store for the visibility timeout; out of the
    /// buffer as it was leased).
    fn take_above<'py>(
        &self,
        py: Python<'py>,
        capacity: &Bound<'_, PyCapacity>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.take_unfittable_core(py, (*capacity.get()).into())
    }

    /// Dead-letters the in-memory store's visible messages whose deadline has passed; their
    /// ids, logged and counted (the buffer's are taken out with `buffer_take_expired` and
    /// dead-lettered by Python, which reports them with `count_expired`).
    fn drop_expired(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let Some(store) = &self.store else { return Ok(Vec::new()) };
        let ids = store.get().with_store(py, crate::policy::drop_expired)?;
        self.count_expired(py, ids.into_iter().map(String::from).collect())
    }

    /// Logs and counts requests removed unsent because their deadline had passed; their ids.
    fn count_expired(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<Vec<String>> {
        self.lock(py).ledger.stats.expired_deadlines += ids.len() as u64;
        for request_id in &ids {
            self.log(py, "warning", ("request %r removed unsent: its deadline has passed", request_id))?;
        }
        Ok(ids)
    }

    /// Removes every message of the in-memory store, every delivery handed out counting as
    /// purged from now (their marks settle their budget and nothing else).
    fn purge_store(&self, py: Python<'_>) -> PyResult<()> {
        let Some(store) = &self.store else { return Ok(()) };
        let (purge, _) = self.lock(py).ledger.begin_purge();
        let result = store.get().purge_all(py);
        self.lock(py).ledger.end_purge(purge, result.is_ok());
        self.changed(py)?;
        result
    }

    /// A purge of another store starts: every live delivery counts as purged from now. Returns
    /// the purge's number and the deliveries, to delete by handle.
    fn begin_purge(&self, py: Python<'_>) -> (u32, Vec<PyPurged>) {
        let mut state = self.lock(py);
        let (purge, flagged) = state.ledger.begin_purge();
        let handed_out = flagged
            .into_iter()
            .filter_map(|id| {
                state.ledger.get(id).map(|d| PyPurged { delivery: id.0, handle: d.data.handle.to_string() })
            })
            .collect();
        (purge, handed_out)
    }

    /// The purge deleted this delivery's message (or found it gone).
    fn purge_deleted(&self, py: Python<'_>, delivery: u64) {
        self.lock(py).ledger.purge_deleted(DeliveryId(delivery));
    }

    /// The purge ended; a failed one gives back the deliveries whose messages it kept.
    fn end_purge(&self, py: Python<'_>, purge: u32, ok: bool) -> PyResult<()> {
        self.lock(py).ledger.end_purge(purge, ok);
        self.changed(py)
    }

    /// Deliveries handed out and not yet settled (not counting purged ones).
    #[getter]
    fn active(&self, py: Python<'_>) -> usize {
        self.lock(py).ledger.in_flight().count()
    }

    /// The figures of the metrics report (unfittable: against the token capacity last seen).
    fn report(&self, py: Python<'_>) -> PyResult<PyCoreReport> {
        let now = self.clock.now(py)?;
        let capacity = self.lock(py).unfittable.capacity();
        let (counts_by_priority, oldest_by_priority, store_in_flight, unfittable) =
            if let Some(store) = &self.store {
                store.get().with_store(py, |store, _| {
                    let unfittable = capacity.map_or(0, |c| dispatch::slots_above(store, c).len());
                    Ok((
                        store.counts_by_priority(),
                        store.oldest_enqueued_by_priority(),
                        Some(store.in_flight_count()),
                        unfittable,
                    ))
                })?
            } else {
                let state = self.lock(py);
                let unfittable = capacity.map_or(0, |c| state.buffer.ids_above(c).len());
                let buffer = &state.buffer;
                (buffer.counts_by_priority(), buffer.oldest_enqueued_by_priority(), None, unfittable)
            };
        let oldest_enqueued_at = oldest_by_priority.iter().flatten().copied().reduce(f64::min);
        let mut state = self.lock(py);
        let active = state.ledger.in_flight().count();
        let summaries = &mut state.ledger.stats;
        let (average_wait, (wait_p50, wait_p95, wait_p99)) = summaries.wait_times(now);
        let (messages_per_minute, tokens_per_minute) = summaries.throughput(now);
        let (latency_p50, latency_p99) = summaries.dequeue_latency();
        let slo = summaries.slo(now);
        let limits = summaries.limits(now);
        Ok(PyCoreReport {
            now,
            counts_by_priority,
            oldest_enqueued_at,
            oldest_by_priority,
            in_flight: store_in_flight.unwrap_or(active),
            active,
            buffered: state.buffer.len(),
            average_wait,
            wait_p50,
            wait_p95,
            wait_p99,
            messages_per_minute,
            tokens_per_minute,
            latency_p50,
            latency_p99,
            failed: state.ledger.stats.failed,
            expired_deadlines: state.ledger.stats.expired_deadlines,
            unfittable,
            slo_targets: state.ledger.stats.slo_targets(),
            slo_dispatched: slo.map(|c| c.dispatched),
            slo_met: slo.map(|c| c.met),
            binding_limit: limits.binding.map(|i| ledger::LIMITS[usize::from(i)]),
            waited_by_limit: ledger::LIMITS.iter().copied().zip(limits.waited).collect(),
        })
    }

    /// The deliveries in flight.
    fn in_flight(&self, py: Python<'_>) -> PyResult<Vec<PyInFlight>> {
        let held: Vec<(String, Py<PyAny>, u8, u64, f64, f64)> = {
            let state = self.lock(py);
            let deliveries = state.ledger.in_flight();
            deliveries
                .map(|(_, d)| {
                    let message = d.data.message.clone_ref(py);
                    (
                        d.data.request_id.to_string(),
                        message,
                        d.facts.priority,
                        d.facts.tokens,
                        d.data.score,
                        d.dispatched_at,
                    )
                })
                .collect()
        };
        held.into_iter()
            .map(|(request_id, message, priority, estimated_tokens, score, started_at)| {
                let message_id = message.bind(py).getattr(intern!(py, "id"))?.extract()?;
                Ok(PyInFlight { request_id, message_id, priority, estimated_tokens, score, started_at })
            })
            .collect()
    }

    /// Per tenant with messages, deliveries, recent dispatches or (under `fair_priority`)
    /// token use in the window: its line of the report, by name.
    fn tenants(&self, py: Python<'_>) -> PyResult<Vec<PyTenantReport>> {
        let now = self.clock.now(py)?;
        let counts = self.tenant_counts(py)?;
        let usage = match (&self.store, self.config.fair) {
            (_, false) => None,
            (Some(store), true) => Some(store.get().fair_usage_ids(py, now)),
            (None, true) => Some(self.lock(py).buffer.fair_usage(now)),
        };
        let plain: Vec<TenantCount> = counts.iter().map(|(c, _)| *c).collect();
        let lines = self.lock(py).ledger.stats.tenant_lines(now, &plain, usage.as_deref());
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            let known = self.lock(py).ledger.stats.tenant_name(line.tenant).map(str::to_owned);
            let name = match (counts.iter().find(|(c, _)| c.tenant == line.tenant), known) {
                (Some((_, name)), _) => name.clone(),
                (None, Some(name)) => name,
                (None, None) => self.tenant_name(py, line.tenant)?,
            };
            let (wait_p50, wait_p95, wait_p99) = line.waits;
            out.push(PyTenantReport {
                name,
                visible: line.visible,
                in_flight: line.in_flight,
                tokens_in_window: line.used,
                tokens_served: line.served,
                wait_p50,
                wait_p95,
                wait_p99,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The metrics samples held (for tests of the memory bound).
    #[getter]
    fn _samples_held(&self, py: Python<'_>) -> usize {
        self.lock(py).ledger.stats.held()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = self.lock(py);
        let pool = if self.store.is_some() { "store" } else { "buffer" };
        let policy = if self.config.fair { "fair_priority" } else { "score" };
        format!(
            "DispatchCore(pool={pool}, policy={policy}, deliveries={}, buffered={})",
            state.ledger.len(),
            state.buffer.len()
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.runner)?;
        visit.call(&self.logger)?;
        self.clock.traverse(&visit)?;
        if let Some(store) = &self.store {
            visit.call(store)?;
        }
        // A busy lock means the owner is running; skipping is safe (the GC then keeps
        // everything reachable) where blocking could deadlock.
        if let Some(state) = self.state.try_lock() {
            for (_, delivery) in state.ledger.deliveries() {
                visit.call(&delivery.data.message)?;
                match &delivery.data.reservation {
                    Reservation::Native(throttle, _) => visit.call(throttle)?,
                    Reservation::Keyed(limiter, _) => visit.call(limiter)?,
                    Reservation::None => {}
                }
            }
            for item in state.buffer.items() {
                visit.call(&item.message)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let taken = self.state.try_lock().map(|mut state| {
            let ledger = std::mem::replace(&mut state.ledger, Ledger::new(1.0, 1.0));
            (state.buffer.drain(), ledger)
        });
        // Released here, after the lock.
        drop(taken);
    }
}

/// Reads a leased message (a `QueueMessage` from `storage.dequeue`) for the buffer.
fn read_leased(message: &Bound<'_, PyAny>, lease_end: f64) -> PyResult<Leased<Py<PyAny>>> {
    use super::args::{invalid_request, text_arg, token_count};
    let py = message.py();
    let request = message.getattr(intern!(py, "payload"))?;
    let attributes = message.getattr(intern!(py, "attributes"))?;
    let request_id = text_arg(&request.getattr(intern!(py, "id"))?, "payload.id")?;
    let priority = request.getattr(intern!(py, "priority"))?.extract::<u8>().ok().filter(|&p| p <= 3);
    let priority = priority
        .ok_or_else(|| invalid_request(py, "buffered message: priority must be within 0..3".to_owned()))?;
    let token_info = request.getattr(intern!(py, "token_info"))?;
    let tokens = token_count(&token_info.getattr(intern!(py, "estimated"))?, "token_info.estimated")?;
    let parts = super::requests::token_parts_of(&token_info, tokens)?;
    let expected: Option<f64> = request.getattr(intern!(py, "expected_processing_time"))?.extract()?;
    let enqueued_at: f64 =
        attributes.getattr(intern!(py, "enqueued_at"))?.call_method0(intern!(py, "timestamp"))?.extract()?;
    // The buffer's own receive is not a retry: score the count as the store had it before, as
    // the in-memory path does.
    let receive_count = attributes.getattr(intern!(py, "receive_count"))?.extract::<u32>()?.saturating_sub(1);
    let handle = text_arg(&attributes.getattr(intern!(py, "receipt_handle"))?, "attributes.receipt_handle")?;
    let tenant = request.getattr(intern!(py, "tenant"))?;
    let tenant = if tenant.is_none() { None } else { Some(text_arg(&tenant, "payload.tenant")?.into()) };
    let deadline = request.getattr(intern!(py, "deadline"))?;
    let deadline =
        if deadline.is_none() { f64::NAN } else { datetime_seconds(&deadline, "payload.deadline")? };
    Ok(Leased {
        message: message.clone().unbind(),
        request_id: request_id.into(),
        handle: handle.into(),
        traits: MessageTraits {
            priority,
            receive_count,
            tokens,
            expected_processing_seconds: expected,
            enqueued_at,
        },
        tenant,
        deadline,
        lease_end,
        parts,
    })
}
