//! `ProcessableMessage`: a delivery handed out by a dispatcher, to be marked exactly once; the
//! awaitable its marks return; and the `Plan` Python awaits when a mark needs I/O.
//!
//! A mark is one call into the dispatcher's core ([`PyDispatchCore::mark`]), which settles the
//! delivery in its ledger. With the in-memory store and an `LLMThrottle` everything is done
//! before the call returns, and the mark returns an awaitable that is already complete (no
//! coroutine is built); otherwise it returns what Python's runner gives for the plan's I/O.
//! Errors are raised when the awaitable is awaited, as a coroutine's would be.

use parking_lot::Mutex;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};
use pyo3::{intern, PyTraverseError, PyVisit};

use super::args::{float_arg, invalid_request, repr_of, token_count};
use super::core::PyDispatchCore;
use super::errors::to_py_err;
use crate::dispatch::{reason, Facts};
use crate::ledger::{DeliveryId, Mark};
use crate::store::{py_repr, MAX_VISIBILITY_TIMEOUT};
use crate::throttle::split_parts;

/// An awaitable whose outcome is known already: awaiting it returns `value` (None when unset)
/// or raises `error`, without suspending.
#[pyclass(module = "llm_queue_dispatcher._core", name = "Ready", frozen)]
pub struct PyReady {
    outcome: Mutex<Option<PyResult<Py<PyAny>>>>,
}

impl PyReady {
    /// The shared awaitable that returns None.
    pub(crate) fn done(py: Python<'_>) -> PyResult<Py<PyAny>> {
        static DONE: PyOnceLock<Py<PyReady>> = PyOnceLock::new();
        let done = DONE.get_or_try_init(py, || Py::new(py, Self { outcome: Mutex::new(None) }))?;
        Ok(done.clone_ref(py).into_any())
    }

    /// An awaitable that raises `error`.
    pub(crate) fn failed(py: Python<'_>, error: PyErr) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, Self { outcome: Mutex::new(Some(Err(error))) })?.into_any())
    }

    /// An awaitable that returns `value`.
    pub(crate) fn value(py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, Self { outcome: Mutex::new(Some(Ok(value))) })?.into_any())
    }

    /// `result` as an awaitable: its value (an awaitable already), or raising its error.
    pub(crate) fn of(py: Python<'_>, result: PyResult<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        result.or_else(|error| Self::failed(py, error))
    }
}

#[pymethods]
impl PyReady {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self) -> PyResult<Option<Py<PyAny>>> {
        match self.outcome.lock().take() {
            None => Ok(None),
            Some(Ok(value)) => Err(PyStopIteration::new_err((value,))),
            Some(Err(error)) => Err(error),
        }
    }

    /// The coroutine protocol: `send(None)` completes it (raising `StopIteration` with its
    /// value) or raises its error.
    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let _ = value; // nothing waits for a value: it is complete
        match self.__next__()? {
            None => Err(PyStopIteration::new_err(py.None())),
            Some(value) => Err(PyStopIteration::new_err((value,))),
        }
    }

    /// `throw(error)` raises `error`: there is nothing to interrupt.
    // A method of the coroutine protocol: it must take `self`, though a complete awaitable has
    // nothing to do with it.
    #[allow(clippy::unused_self)]
    #[pyo3(signature = (error, *rest))]
    fn throw(&self, error: &Bound<'_, PyAny>, rest: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        let _ = rest; // the old (type, value, traceback) form: the first is enough here
        Err(PyErr::from_value(error.clone()))
    }

    fn close(&self) {
        self.outcome.lock().take();
    }
}

/// What a mark asks Python to do: the store call (for a store other than the in-memory one)
/// and the limiter call (for a limiter other than `LLMThrottle`), in that order, reporting the
/// store's reply (`DispatchCore.store_replied`) before the limiter call and ending with
/// `DispatchCore.finish`.
#[pyclass(module = "llm_queue_dispatcher._core", name = "Plan", frozen, get_all)]
pub struct PyPlan {
    /// The delivery's id.
    pub delivery: u64,
    /// `"delete"`, `"visibility"`, `"dead_letter"`, `"release"`, or None (done already, or nothing).
    pub store: Option<&'static str>,
    /// Seconds of a "visibility" call.
    pub seconds: f64,
    /// The delivery's message.
    pub message: Py<PyAny>,
    /// The limiter to call, or None.
    pub limiter: Option<Py<PyAny>>,
    /// "adjust" (to `tokens`) or "release", when `limiter` is set.
    pub limiter_call: Option<&'static str>,
    /// Tokens of an "adjust".
    pub tokens: u64,
    /// The input and output tokens of an "adjust" (adding up to `tokens`), when the mark gave
    /// them.
    pub parts: Option<(u64, u64)>,
    /// The reservation's key (the request id and the delivery number, `"id#n"`).
    pub key: String,
    /// Whether the mark must raise `ReceiptHandleError` once done (its store call, made
    /// already, found the handle stale).
    pub stale: bool,
    /// The request's id.
    pub request_id: String,
    /// The mark's log line, `(level, format, error)`: `getattr(logger, level)(format,
    /// request_id, error)` once the store call landed.
    pub log: Option<(&'static str, &'static str, Py<PyAny>)>,
}

#[pymethods]
impl PyPlan {
    fn __repr__(&self) -> String {
        format!(
            "Plan(delivery={}, store={:?}, limiter_call={:?}, tokens={}, key={:?}, stale={})",
            self.delivery, self.store, self.limiter_call, self.tokens, self.key, self.stale
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.message)?;
        if let Some(limiter) = &self.limiter {
            visit.call(limiter)?;
        }
        if let Some((_, _, error)) = &self.log {
            visit.call(error)?;
        }
        Ok(())
    }
}

/// What a job shows of its choice: the facts, and what its fair `reason` names.
pub(crate) struct Why {
    pub facts: Facts,
    /// The tenant's name (`fair_priority`).
    pub tenant: String,
    /// The request's priority.
    pub priority: u8,
    /// Seconds it waited before its dispatch.
    pub waited: f64,
}

/// A message handed out by `LLMQueueDispatcher.dequeue`, to be marked exactly once.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ProcessableMessage", frozen)]
pub struct PyJob {
    pub(crate) core: Py<PyDispatchCore>,
    pub(crate) id: DeliveryId,
    pub(crate) message: Py<PyAny>,
    pub(crate) why: Why,
    pub(crate) dispatched_at: f64,
    /// Whether its marks need no await (the in-memory store, and an `LLMThrottle` or no
    /// reservation): they are done when called.
    pub(crate) sync: bool,
    /// The reservation's key with a limiter other than `LLMThrottle` (`"id#n"`).
    pub(crate) key: Option<String>,
    /// Its estimated tokens (what is reserved).
    pub(crate) tokens: u64,
    /// Tokens to wait for when its reservation is refused (estimate plus any reserve margin).
    pub(crate) needed: u64,
    /// When its lease from the prefetch buffer ends at the latest (NaN: not from a buffer).
    pub(crate) lease_end: f64,
    /// The `MessageScore`, built on first access.
    pub(crate) score: Mutex<Option<Py<PyAny>>>,
}

fn message_score_class(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    CLASS.import(py, "llm_queue_dispatcher.scoring", "MessageScore")
}

impl PyJob {
    fn request_id(&self, py: Python<'_>) -> PyResult<String> {
        self.message.bind(py).getattr(intern!(py, "payload"))?.getattr(intern!(py, "id"))?.extract()
    }

    fn score_object(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if let Some(score) = self.score.lock().as_ref() {
            return Ok(score.clone_ref(py));
        }
        let core = self.core.get();
        let breakdown = PyDict::new(py);
        let total = match &self.why.facts {
            Facts::Score { factors, custom, total } => {
                for (name, value) in core.breakdown_names().iter().zip(factors.iter().chain(custom)) {
                    breakdown.set_item(name, value)?;
                }
                *total
            }
            Facts::Fair(candidate) => {
                let (urgent, rank, used, effective) = reason::fair_breakdown(candidate.rank);
                breakdown.set_item("urgent_first", f64::from(u8::from(urgent)))?;
                breakdown.set_item("tenant_rank", rank as f64)?;
                breakdown.set_item("tenant_tokens", used)?;
                breakdown.set_item("effective_priority", f64::from(effective))?;
                0.0
            }
        };
        let score = message_score_class(py)?.call_method1(intern!(py, "of"), (total, breakdown))?.unbind();
        *self.score.lock() = Some(score.clone_ref(py));
        Ok(score)
    }

    fn describe(&self) -> String {
        let core = self.core.get();
        let why = &self.why;
        reason::describe(
            &why.facts,
            core.breakdown_names(),
            &why.tenant,
            why.priority,
            why.waited,
            core.fairness_window(),
        )
    }
}

/// `retry_after` / `seconds` of a mark: None or a number within [0, 43200]; else
/// `InvalidRequestError` naming it (an int too large for a float, inf and NaN included).
fn delay_arg(value: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<f64> {
    let Some(value) = value else { return Ok(0.0) };
    match float_arg(value)? {
        Some(seconds) if (0.0..=MAX_VISIBILITY_TIMEOUT).contains(&seconds) => Ok(seconds),
        _ => Err(invalid_request(
            value.py(),
            format!("{name} must be None or within [0, 43200] seconds, got {}", repr_of(value)),
        )),
    }
}

/// A processed mark's total, and its input and output parts, each when given.
type Counts = (Option<u64>, Option<(u64, u64)>);

/// The counts of a processed mark: the total, and the input and output parts when given (see
/// `mark_as_processed`).
fn processed_counts(
    py: Python<'_>,
    actual: Option<&Bound<'_, PyAny>>,
    input: Option<&Bound<'_, PyAny>>,
    output: Option<&Bound<'_, PyAny>>,
) -> PyResult<Counts> {
    let count = |value: Option<&Bound<'_, PyAny>>, name: &str| -> PyResult<Option<u64>> {
        value.filter(|v| !v.is_none()).map(|v| token_count(v, name)).transpose()
    };
    let (actual, input, output) =
        (count(actual, "actual_tokens")?, count(input, "input_tokens")?, count(output, "output_tokens")?);
    let total = match (actual, input, output) {
        (Some(total), _, _) => total,
        (None, None, None) => return Ok((None, None)),
        (None, Some(input), Some(output)) => input.checked_add(output).ok_or_else(|| {
            invalid_request(py, format!("input_tokens + output_tokens is too large: {input} + {output}"))
        })?,
        (None, _, _) => {
            return Err(invalid_request(
                py,
                format!(
                    "mark_as_processed needs actual_tokens, or both input_tokens and output_tokens; got \
                     input_tokens={}, output_tokens={}",
                    input.map_or("None".to_owned(), |n| n.to_string()),
                    output.map_or("None".to_owned(), |n| n.to_string()),
                ),
            ))
        }
    };
    let parts = split_parts(total, input, output, ["actual_tokens", "input_tokens", "output_tokens"])
        .map_err(|e| to_py_err(py, e))?;
    Ok((Some(total), parts))
}

#[pymethods]
impl PyJob {
    /// The message handed out.
    #[getter]
    fn message(&self, py: Python<'_>) -> Py<PyAny> {
        self.message.clone_ref(py)
    }

    /// Its score: the total and the weighted parts (built on first access).
    #[getter]
    fn score(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.score_object(py)
    }

    /// Why this message won: its policy's explanation, or its total and top factors.
    #[getter]
    fn reason(&self) -> String {
        self.describe()
    }

    /// When it was handed out (the dispatcher's clock).
    #[getter]
    fn dispatched_at(&self) -> f64 {
        self.dispatched_at
    }

    /// Whether it was marked (processed, failed, dead-lettered or released).
    #[getter]
    fn settled(&self, py: Python<'_>) -> bool {
        !self.core.get().is_live(py, self.id)
    }

    /// The reservation's key with a limiter other than `LLMThrottle` (None with one).
    #[getter]
    fn _key(&self) -> Option<String> {
        self.key.clone()
    }

    /// Tokens the dispatcher waits for when this delivery's reservation is refused.
    #[getter]
    fn _needed(&self) -> u64 {
        self.needed
    }

    /// Its estimated tokens, as reserved.
    #[getter]
    fn _tokens(&self) -> u64 {
        self.tokens
    }

    /// When its lease from the prefetch buffer ends at the latest (NaN: not from a buffer).
    #[getter]
    fn _lease_end(&self) -> f64 {
        self.lease_end
    }

    /// Its delivery's id in the dispatcher's books.
    #[getter]
    fn _delivery(&self) -> u64 {
        self.id.0
    }

    /// Deletes the message; with a reservation, adjusts the limiter to `actual_tokens`, each
    /// limit to its share when `input_tokens` and `output_tokens` are given (an input limit to
    /// the input, an output limit to the output, the others to their sum); without any count
    /// the reservation is settled as it is.
    ///
    /// The counts: `actual_tokens` alone; both parts (the total is their sum); or the total
    /// and one or both parts (they must add up to it; one part alone is taken from it). Bad
    /// counts raise `InvalidRequestError` and mark nothing.
    ///
    /// A stale receipt handle (the visibility ran out and another consumer received the
    /// message) settles the delivery and raises `ReceiptHandleError`: the message will be
    /// processed again.
    #[pyo3(signature = (actual_tokens=None, *, input_tokens=None, output_tokens=None))]
    fn mark_as_processed(
        slf: &Bound<'_, Self>,
        actual_tokens: Option<&Bound<'_, PyAny>>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let mark = match processed_counts(py, actual_tokens, input_tokens, output_tokens) {
            Ok((actual, parts)) => Mark::Processed { actual, parts },
            Err(error) => return PyReady::failed(py, error),
        };
        PyReady::of(py, slf.get().core.get().mark(py, slf, mark, None))
    }

    /// Makes the message visible again after `retry_after` s (default at once) and refunds
    /// its reserved tokens. The store's dead-letter rule applies.
    #[pyo3(signature = (error, *, retry_after=None))]
    fn mark_as_failed(
        slf: &Bound<'_, Self>,
        error: &Bound<'_, PyAny>,
        retry_after: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let delay = match delay_arg(retry_after.filter(|v| !v.is_none()), "retry_after") {
            Ok(delay) => delay,
            Err(error) => return PyReady::failed(py, error),
        };
        PyReady::of(py, slf.get().core.get().mark(py, slf, Mark::Failed { delay }, Some(error)))
    }

    /// Moves the message to the store's dead-letter target at once, whatever its receive
    /// count (a handler's `PermanentError`), and refunds its reserved tokens.
    fn mark_as_dead_lettered(slf: &Bound<'_, Self>, error: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        PyReady::of(py, slf.get().core.get().mark(py, slf, Mark::DeadLettered, Some(error)))
    }

    /// Gives the message back unprocessed, as if it had not been received: visible again at
    /// once with its receive count as before (a stop never uses up a receive), and its whole
    /// reservation (tokens and request) released.
    fn release(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        PyReady::of(py, slf.get().core.get().mark(py, slf, Mark::Released, None))
    }

    /// Keeps the message leased for `seconds` more, counted from now.
    fn update_visibility(slf: &Bound<'_, Self>, seconds: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let job = slf.get();
        let outcome = job
            .core
            .get()
            .check_live(py, job.id, &job.message)
            .and_then(|()| delay_arg(Some(seconds), "seconds"))
            .and_then(|seconds| job.core.get().update_visibility(py, slf, seconds));
        PyReady::of(py, outcome)
    }

    /// Gives up the delivery (its mark failed in the store and nobody will retry it): it stops
    /// counting in flight; the store redelivers the message when its lease ends, and the
    /// limiter keeps its reservation.
    fn _abandon(&self, py: Python<'_>) {
        self.core.get().abandon(py, self.id);
    }

    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        PyReady::value(slf.py(), slf.clone().into_any().unbind())
    }

    /// Marks it processed on a normal exit and failed on an exception (which propagates).
    fn __aexit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if slf.get().settled(py) {
            return PyReady::done(py);
        }
        if exc.is_none() {
            Self::mark_as_processed(slf, None, None, None)
        } else {
            Self::mark_as_failed(slf, exc, None)
        }
    }

    #[classmethod]
    fn __class_getitem__(cls: &Bound<'_, PyType>, item: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = cls.py();
        let alias = py.import("types")?.getattr("GenericAlias")?;
        Ok(alias.call1((cls, item))?.unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let state = if self.settled(py) { "marked" } else { "in flight" };
        Ok(format!("<ProcessableMessage {} {state} {}>", py_repr(&self.request_id(py)?), self.describe()))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.core)?;
        visit.call(&self.message)?;
        if let Some(score) = self.score.try_lock().as_ref().and_then(|s| s.as_ref()) {
            visit.call(score)?;
        }
        Ok(())
    }
}
