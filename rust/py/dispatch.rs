//! One dispatch step: select the best message, reserve its budget on an `LLMThrottle`, and hand
//! it out — over the in-memory store (searched in place) or the prefetch buffer — keeping the
//! books on every path: a reservation made is used or released whole (`Throttle::release`), a
//! message received is handed out or put back as it was (`Store::cancel_receive`).
//!
//! Without custom scorers the step over the store is atomic: under the throttle's lock, then
//! the store's (the one order both are ever taken in), it selects, reserves and receives. Both
//! clocks are read before locking, and the message object is built after both locks are
//! released. With custom scorers (Python callables) candidates are collected under the store's
//! lock, the scorers run with no lock held, and the winner is taken under the lock again — if it
//! is still there; otherwise the step starts over.

use pyo3::prelude::*;
use pyo3::BoundObject;

use super::messages::{build_view_message, MessageView};
use super::params::PyScoringParams;
use super::store::{PyStore, PyStoreCore};
use super::throttle::PyThrottle;
use crate::errors::CoreError;
use crate::policy::{decide_score, ranking_budget, Decision};
use crate::scoring::Weights;
use crate::select::{
    best_candidate, choose, collect, Candidate, Choice, Collected, IndexSearch, SearchContext,
};

// How often one dispatch step starts over when the winner vanished or stopped fitting while
// custom scorers ran (only possible with several threads): after that it reports nothing found.
const MAX_ATTEMPTS: usize = 8;

pub use crate::policy::Budget;

/// How one dispatch step hands a message out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Seconds the message is leased for.
    pub visibility_timeout: f64,
    /// Scores below this are not handed out.
    pub min_score: f64,
    /// Whether the budget is reserved on the limiter.
    pub reserve: bool,
    /// Whether the budget is held for the winner (`hold_budget`).
    pub hold: bool,
}

/// What a dispatch step gives Python: the message with its score, the seconds until a held
/// winner fits, or nothing.
pub(crate) enum Outcome<T> {
    /// Handed out.
    Taken(T),
    /// Held for the winner, which fits in this many seconds.
    Wait(f64),
    /// Nothing to hand out.
    Nothing,
}

impl<'py, T: IntoPyObject<'py>> IntoPyObject<'py> for Outcome<T> {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Self::Taken(value) => value
                .into_pyobject(py)
                .map(BoundObject::into_any)
                .map(BoundObject::into_bound)
                .map_err(Into::into),
            Self::Wait(seconds) => Ok(seconds.into_pyobject(py)?.into_any()),
            Self::Nothing => Ok(py.None().into_bound(py)),
        }
    }
}

/// A candidate's message object, or what builds it: the store copies a view under its lock and
/// builds the object only if a custom scorer is asked about it (the stopping rule often ends the
/// evaluation after a few candidates).
pub(crate) enum LazyMessage {
    /// Already a Python object (the prefetch buffer holds them).
    Built(Py<PyAny>),
    /// A view of a stored message.
    View(MessageView),
}

impl LazyMessage {
    fn get(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Self::Built(message) => Ok(message.clone_ref(py)),
            Self::View(view) => build_view_message(py, view),
        }
    }
}

/// What a dispatch step needs from the place messages are selected from.
pub(crate) trait Pool {
    /// Runs the search at the pool's `now` and collects up to `limit` candidates, best first;
    /// with `want_messages`, also what gives the Python message object of each (for custom
    /// scorers; built only for the candidates actually evaluated).
    fn collect(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        limit: usize,
        want_messages: bool,
    ) -> PyResult<(Vec<Collected>, Vec<LazyMessage>)>;

    /// Hands out `candidate` if it is still there (same slot and sequence number): the message
    /// object with its new receipt handle (store) or as buffered (buffer). On an error nothing
    /// was taken.
    fn take(
        &self,
        py: Python<'_>,
        candidate: &Candidate,
        visibility_timeout: f64,
    ) -> PyResult<Option<Py<PyAny>>>;

    /// The request id of a collected candidate (for the limiter's records), if still there.
    fn request_id(&self, py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>>;

    /// The best base score the pool would offer `offset` seconds from now, its messages
    /// unchanged.
    fn best_score_at(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        offset: f64,
    ) -> PyResult<Option<f64>>;
}

// Every wait-time factor is saturated after 300 s (LOW's `max_wait`): past that, time alone
// changes no score.
const SCORE_HORIZON: f64 = 301.0;

/// Seconds until the best score of `pool` reaches `threshold` with time alone (scores only rise
/// as messages wait): 0 when it does now, None when it never will without another change.
/// Custom scorers count at their full weight, so with them this is the earliest moment the
/// threshold can be reached.
pub(crate) fn time_until_score(
    py: Python<'_>,
    pool: &impl Pool,
    params: &PyScoringParams,
    budget: Budget,
    threshold: f64,
) -> PyResult<Option<f64>> {
    let custom_total: f64 = params.custom_weights.iter().sum();
    let reaches = |offset: f64| -> PyResult<Option<bool>> {
        Ok(pool
            .best_score_at(py, &params.weights, budget, offset)?
            .map(|best| best + custom_total >= threshold))
    };
    match reaches(0.0)? {
        None => return Ok(None),
        Some(true) => return Ok(Some(0.0)),
        Some(false) => {}
    }
    if reaches(SCORE_HORIZON)? != Some(true) {
        return Ok(None);
    }
    let (mut below, mut above) = (0.0, SCORE_HORIZON);
    // Bisection to a millisecond: the best score never decreases as time passes.
    while above - below > 1e-3 {
        let middle = f64::midpoint(below, above);
        if reaches(middle)? == Some(true) {
            above = middle;
        } else {
            below = middle;
        }
    }
    Ok(Some(above))
}

fn evaluate_custom(
    py: Python<'_>,
    custom_fn: &Bound<'_, PyAny>,
    message: &Py<PyAny>,
    expected: usize,
) -> PyResult<Vec<f64>> {
    let scores = custom_fn.call1((message.bind(py),))?;
    let scores: Vec<f64> = scores.extract()?;
    if scores.len() != expected {
        return Err(CoreError::InvalidRequest(format!(
            "custom scoring returned {} scores for {} scorers",
            scores.len(),
            expected
        ))
        .into());
    }
    Ok(scores)
}

fn pick(
    py: Python<'_>,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    collected: &[Collected],
    messages: &[LazyMessage],
) -> PyResult<Option<Choice>> {
    match custom_fn {
        Some(custom_fn) if !params.custom_weights.is_empty() => {
            choose(collected, &params.custom_weights, |i, _| {
                evaluate_custom(py, custom_fn, &messages[i].get(py)?, params.custom_weights.len())
            })
        }
        _ => choose::<PyErr>(collected, &[], |_, _| Ok(Vec::new())),
    }
}

/// The result of a dispatch step: `(message, total, breakdown list)`.
pub type Dispatched = (Py<PyAny>, f64, Vec<f64>);

fn breakdown(choice: &Choice) -> Vec<f64> {
    choice.candidate.factors.iter().copied().chain(choice.custom.iter().copied()).collect()
}

/// Gives a reservation that was not used back whole. It was just made, so its record is there
/// unless other threads' consumes pushed it out of a full history (`max_history_records`)
/// meanwhile: then it cannot be found, and its tokens stay spent until they refill.
fn release(py: Python<'_>, throttle: &PyThrottle, request_id: &str) -> PyResult<()> {
    let _unknown = throttle.with_state(py, |state, _| state.release(request_id))?;
    Ok(())
}

/// `custom_fn` as given by the Python layer: None, or a callable (None objects are None).
fn custom<'a, 'py>(
    custom_fn: Option<&'a Bound<'py, PyAny>>,
    params: &PyScoringParams,
) -> Option<&'a Bound<'py, PyAny>> {
    custom_fn.filter(|f| !f.is_none() && !params.custom_weights.is_empty())
}

/// One dispatch step over the in-memory store: fused without custom scorers, else the general
/// step.
pub(crate) fn dispatch_store(
    py: Python<'_>,
    store: &PyStoreCore,
    throttle: &PyThrottle,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    settings: Settings,
) -> PyResult<Outcome<Dispatched>> {
    match custom(custom_fn, params) {
        None => dispatch_fused(py, store, throttle, params, settings),
        Some(custom_fn) => dispatch_with_throttle(py, store, throttle, params, Some(custom_fn), settings),
    }
}

/// One dispatch step against an `LLMThrottle` over any pool: select, reserve (when `reserve`),
/// take; with `hold`, ranked against the whole capacity and held for a winner that does not fit
/// yet. Custom scorers run with no lock held.
pub(crate) fn dispatch_with_throttle(
    py: Python<'_>,
    pool: &impl Pool,
    throttle: &PyThrottle,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    settings: Settings,
) -> PyResult<Outcome<Dispatched>> {
    let Settings { visibility_timeout, min_score, reserve, hold } = settings;
    let custom_fn = custom(custom_fn, params);
    let limit = if custom_fn.is_some() { params.max_candidates } else { 1 };
    for _ in 0..MAX_ATTEMPTS {
        let Some(budget) = throttle.with_state(py, |state, _| ranking_budget(state, hold))? else {
            return Ok(Outcome::Nothing);
        };
        let (collected, messages) = pool.collect(py, &params.weights, budget, limit, custom_fn.is_some())?;
        let Some(choice) = pick(py, params, custom_fn, &collected, &messages)? else {
            return Ok(Outcome::Nothing);
        };
        drop(messages);
        if choice.total < min_score {
            return Ok(Outcome::Nothing);
        }
        let Some(request_id) = pool.request_id(py, &choice.candidate)? else { continue };
        let tokens = choice.candidate.tokens;
        if hold {
            let check = throttle.with_state(py, |state, _| state.check(tokens))?;
            if !check.allowed {
                return Ok(if check.available_in.is_finite() {
                    Outcome::Wait(check.available_in)
                } else {
                    Outcome::Nothing
                });
            }
        }
        if reserve {
            let consumed =
                throttle.with_state(py, |state, now| state.consume(now, &request_id, tokens, None))?;
            if !consumed {
                // The budget moved while custom scorers ran (another thread): start over.
                continue;
            }
        }
        match pool.take(py, &choice.candidate, visibility_timeout) {
            Ok(Some(message)) => return Ok(Outcome::Taken((message, choice.total, breakdown(&choice)))),
            Ok(None) => {
                // The winner left while custom scorers ran: give its reservation back whole.
                if reserve {
                    release(py, throttle, &request_id)?;
                }
            }
            Err(error) => {
                if reserve {
                    release(py, throttle, &request_id)?;
                }
                return Err(error);
            }
        }
    }
    Ok(Outcome::Nothing)
}

/// What the fused step took under the locks.
struct Taken {
    view: MessageView,
    candidate: Candidate,
    request_id: Box<str>,
}

/// The dispatch step without custom scorers, atomic: under the throttle's lock, then the
/// store's, decide (`policy::decide_score`), reserve the budget and receive the message. The
/// message object is built after both are released; if that fails, both steps are undone.
fn dispatch_fused(
    py: Python<'_>,
    store: &PyStoreCore,
    throttle: &PyThrottle,
    params: &PyScoringParams,
    settings: Settings,
) -> PyResult<Outcome<Dispatched>> {
    let Settings { visibility_timeout, min_score, reserve, hold } = settings;
    // Both clocks before any lock: either may be a Python callable.
    let limiter_now = throttle.now(py)?;
    let store_now = store.now(py)?;
    let (decided, aftermath) = throttle.with_state_at(py, limiter_now, |limiter, limiter_now| {
        store.locked(py, store_now, |s, now| {
            let candidate = match decide_score(s, &params.weights, limiter, now, hold, min_score) {
                Decision::Take(candidate) => candidate,
                Decision::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
                Decision::Nothing => return Ok(Outcome::Nothing),
            };
            let message = s.message(candidate.slot);
            let request_id = message.request_id.clone();
            if reserve && !limiter.consume(limiter_now, &request_id, candidate.tokens, None) {
                return Ok(Outcome::Nothing);
            }
            let handle = match s.receive_slot(candidate.slot, visibility_timeout, now) {
                Ok(handle) => handle,
                Err(error) => {
                    if reserve {
                        let _ = limiter.release(&request_id);
                    }
                    return Err(error);
                }
            };
            let view = MessageView::of(py, s.message(candidate.slot), Some(handle));
            Ok(Outcome::Taken(Taken { view, candidate, request_id }))
        })
    });
    aftermath.finish(py, store);
    let taken = match decided.map_err(|e| super::errors::to_py_err(py, e))? {
        Outcome::Taken(taken) => taken,
        Outcome::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
        Outcome::Nothing => return Ok(Outcome::Nothing),
    };
    match build_view_message(py, &taken.view) {
        Ok(message) => Ok(Outcome::Taken((message, taken.candidate.base, taken.candidate.factors.to_vec()))),
        Err(error) => {
            let reserved = reserve.then_some(&*taken.request_id);
            undo_take(py, (store, store_now), (throttle, limiter_now), &taken.view, reserved);
            Err(error)
        }
    }
}

/// Puts back a message received for a dispatch that cannot hand it out (building its object
/// failed), and gives its reservation back: nobody will own it. Uses the instants the step read
/// (`store_now`, `limiter_now`): reading a clock again could fail and leave the take in place.
pub(crate) fn undo_take(
    py: Python<'_>,
    (store, store_now): (&PyStoreCore, f64),
    (throttle, limiter_now): (&PyThrottle, f64),
    view: &MessageView,
    reserved: Option<&str>,
) {
    let handle = view.handle.map(|h| h.to_string()).unwrap_or_default();
    let (undone, aftermath) = store.locked(py, store_now, |s, now| s.release(&handle, now));
    aftermath.finish(py, store);
    drop(undone);
    if let Some(request_id) = reserved {
        let _ = throttle.with_state_at(py, limiter_now, |limiter, _| limiter.release(request_id));
    }
}

/// The selection half of a dispatch step against any other rate limiter: the best candidate
/// under `budget`, not yet taken.
pub(crate) fn select_candidate(
    py: Python<'_>,
    pool: &impl Pool,
    budget: Budget,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    min_score: f64,
) -> PyResult<Option<PySelection>> {
    let custom_fn = custom(custom_fn, params);
    let limit = if custom_fn.is_some() { params.max_candidates } else { 1 };
    let (collected, messages) = pool.collect(py, &params.weights, budget, limit, custom_fn.is_some())?;
    let Some(choice) = pick(py, params, custom_fn, &collected, &messages)? else {
        return Ok(None);
    };
    if choice.total < min_score {
        return Ok(None);
    }
    let Some(request_id) = pool.request_id(py, &choice.candidate)? else { return Ok(None) };
    Ok(Some(PySelection { choice, request_id }))
}

/// `select` of both pools: the budget a limiter reports, then `select_candidate`.
pub(crate) fn select_with_budget(
    py: Python<'_>,
    pool: &impl Pool,
    available_tokens: f64,
    available_requests: f64,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    min_score: f64,
) -> PyResult<Option<PySelection>> {
    if available_requests < 1.0 {
        return Ok(None);
    }
    let budget = Budget { available: available_tokens, max_tokens: available_tokens };
    select_candidate(py, pool, budget, params, custom_fn, min_score)
}

/// `take` of both pools: the selected message with its score, or None if it left.
pub(crate) fn take_selection(
    py: Python<'_>,
    pool: &impl Pool,
    selection: &PySelection,
    visibility_timeout: f64,
) -> PyResult<Option<Dispatched>> {
    Ok(pool
        .take(py, &selection.choice.candidate, visibility_timeout)?
        .map(|message| (message, selection.choice.total, breakdown(&selection.choice))))
}

/// A selected, not yet taken candidate (the non-native limiter path).
#[pyclass(module = "llm_queue_dispatcher._core", name = "Selection", frozen)]
pub struct PySelection {
    pub(crate) choice: Choice,
    /// The winner's request id.
    #[pyo3(get)]
    pub request_id: String,
}

#[pymethods]
impl PySelection {
    /// The winner's estimated tokens.
    #[getter]
    fn tokens(&self) -> u64 {
        self.choice.candidate.tokens
    }

    /// Its total score.
    #[getter]
    fn total(&self) -> f64 {
        self.choice.total
    }

    /// Its weighted factors, then its weighted custom scores.
    #[getter]
    fn breakdown(&self) -> Vec<f64> {
        breakdown(&self.choice)
    }

    fn __repr__(&self) -> String {
        format!(
            "Selection(request_id={:?}, tokens={}, total={})",
            self.request_id, self.choice.candidate.tokens, self.choice.total
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The in-memory store as a pool: selection runs over its index in place.

fn still_visible(store: &PyStore, candidate: &Candidate) -> bool {
    store.get(candidate.slot).is_some_and(|m| m.message_id == candidate.seq)
        && store.is_visible(candidate.slot) == Some(true)
}

impl Pool for PyStoreCore {
    fn collect(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        limit: usize,
        want_messages: bool,
    ) -> PyResult<(Vec<Collected>, Vec<LazyMessage>)> {
        self.with_store(py, |store, now| {
            let context = SearchContext {
                weights: *weights,
                now,
                available: budget.available,
                max_tokens: budget.max_tokens,
            };
            let collected = if limit == 1 && !want_messages {
                // Without custom scorers only the best matters: the heap-free walk.
                best_candidate(&*store, &context)
                    .map(|candidate| Collected { candidate, bound_after: None })
                    .into_iter()
                    .collect()
            } else {
                collect(&mut IndexSearch::new(&*store, context), limit)
            };
            // Views only: objects are built unlocked, and only when evaluated (`LazyMessage`).
            let views: Vec<LazyMessage> = if want_messages {
                collected
                    .iter()
                    .map(|item| {
                        LazyMessage::View(MessageView::of(py, store.message(item.candidate.slot), None))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Ok((collected, views))
        })
    }

    fn take(
        &self,
        py: Python<'_>,
        candidate: &Candidate,
        visibility_timeout: f64,
    ) -> PyResult<Option<Py<PyAny>>> {
        let now = self.now(py)?;
        let (taken, aftermath) = self.locked(py, now, |store, now| {
            if !still_visible(store, candidate) {
                return Ok(None);
            }
            let handle = store.receive_slot(candidate.slot, visibility_timeout, now)?;
            Ok(Some(MessageView::of(py, store.message(candidate.slot), Some(handle))))
        });
        aftermath.finish(py, self);
        let Some(view) = taken.map_err(|e| super::errors::to_py_err(py, e))? else {
            return Ok(None);
        };
        match build_view_message(py, &view) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                let handle = view.handle.map(|h| h.to_string()).unwrap_or_default();
                let (undone, aftermath) = self.locked(py, now, |s, now| s.release(&handle, now));
                aftermath.finish(py, self);
                let _ = undone;
                Err(error)
            }
        }
    }

    fn best_score_at(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        offset: f64,
    ) -> PyResult<Option<f64>> {
        self.with_store(py, |store, now| {
            let context = SearchContext {
                weights: *weights,
                now: now + offset,
                available: budget.available,
                max_tokens: budget.max_tokens,
            };
            Ok(best_candidate(&*store, &context).map(|c| c.base))
        })
    }

    fn request_id(&self, py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>> {
        self.with_store(py, |store, _| {
            Ok(still_visible(store, candidate).then(|| store.message(candidate.slot).request_id.to_string()))
        })
    }
}

/// Slots of visible messages with more tokens than `capacity`: only cells whose token range
/// reaches past it are walked.
pub(crate) fn slots_above(store: &PyStore, capacity: f64) -> Vec<u32> {
    let mut out = Vec::new();
    for (key, members) in store.visible_cells() {
        if key.token_range().1 <= capacity {
            continue;
        }
        out.extend(members.values().copied().filter(|&slot| store.message(slot).tokens as f64 > capacity));
    }
    out
}
