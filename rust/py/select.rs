//! Selection glue: scoring parameters, the prefetch buffer, and one dispatch step over either
//! the in-memory store or the buffer, with the budget reserved on an `LLMThrottle` natively.
//!
//! Custom scorers are Python callables, so they never run under a lock: candidates are collected
//! under the lock (best first, with the bound of everything not collected), the locks are
//! released while the scorers run, and the winner is taken under the lock again — if it is still
//! there and still admissible; otherwise the step starts over.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use super::args::token_count;
use super::clock::ClockSource;
use super::errors::to_py_err;
use super::store::{build_view_message, MessageView, PyStoreCore};
use super::throttle::PyThrottle;
use crate::errors::CoreError;
use crate::scoring::{validate_weight, Weights, FACTOR_NAMES};
use crate::select::{
    best_candidate, choose, collect, Candidate, Choice, Collected, IndexSearch, SearchContext,
    SortedCandidates,
};
use crate::store::Store;
use crate::throttle::Throttle;

// How often one dispatch step starts over when the winner vanished or stopped fitting while
// custom scorers ran (only possible with several threads): after that it reports nothing found.
const MAX_ATTEMPTS: usize = 8;

/// Validated scoring parameters of a dispatcher, built once.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ScoringParams", frozen)]
pub struct PyScoringParams {
    pub(crate) weights: Weights,
    pub(crate) custom_weights: Vec<f64>,
    pub(crate) max_candidates: usize,
}

#[pymethods]
impl PyScoringParams {
    #[new]
    #[pyo3(signature = (weights, custom_weights, max_candidates))]
    fn new(weights: [f64; 6], custom_weights: Vec<f64>, max_candidates: usize) -> PyResult<Self> {
        for (name, value) in FACTOR_NAMES.iter().zip(weights) {
            validate_weight(name, value)?;
        }
        for (i, &value) in custom_weights.iter().enumerate() {
            validate_weight(&format!("of custom scorer {i}"), value)?;
        }
        if max_candidates == 0 {
            return Err(
                CoreError::InvalidConfig("max_candidates_to_evaluate must be >= 1, got 0".into()).into()
            );
        }
        Ok(Self { weights: Weights::from_array(weights), custom_weights, max_candidates })
    }

    /// The six weights in factor order.
    #[getter]
    fn weights(&self) -> [f64; 6] {
        self.weights.as_array()
    }

    fn __repr__(&self) -> String {
        format!(
            "ScoringParams(weights={:?}, custom_weights={:?}, max_candidates={})",
            self.weights.as_array(),
            self.custom_weights,
            self.max_candidates
        )
    }
}

/// The budget one selection works against.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Tokens available (`A`).
    pub available: f64,
    /// Largest admissible estimate.
    pub max_tokens: f64,
}

/// The budget of an `LLMThrottle` now: None when no request can be admitted at all.
pub fn throttle_budget(state: &Throttle<Option<Py<PyAny>>>) -> Option<Budget> {
    if state.penalty_left() > 0.0 || !state.requests().has(1.0) {
        return None;
    }
    let tokens = state.tokens();
    let capacity = tokens.capacity();
    // A request is admitted when the bucket holds its estimate plus the debt, or is full and the
    // estimate alone fits the capacity (see `Throttle::tokens_needed`).
    let max_tokens = if tokens.has(capacity) { capacity } else { tokens.available() - state.debt() };
    Some(Budget { available: tokens.available(), max_tokens: max_tokens.max(-1.0) })
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
    /// object with its new receipt handle (store) or as buffered (buffer).
    fn take(
        &self,
        py: Python<'_>,
        candidate: &Candidate,
        visibility_timeout: f64,
    ) -> PyResult<Option<Py<PyAny>>>;

    /// The request id of a collected candidate (for the limiter's records), if still there.
    fn request_id(&self, py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>>;
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

/// One dispatch step against an `LLMThrottle`: select, reserve (when `reserve`), receive.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_with_throttle(
    py: Python<'_>,
    pool: &impl Pool,
    throttle: &PyThrottle,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    visibility_timeout: f64,
    min_score: f64,
    reserve: bool,
) -> PyResult<Option<Dispatched>> {
    let has_custom = custom_fn.is_some() && !params.custom_weights.is_empty();
    let limit = if has_custom { params.max_candidates } else { 1 };
    for _ in 0..MAX_ATTEMPTS {
        let Some(budget) = throttle.with_state(py, |state, _| throttle_budget(state))? else {
            return Ok(None);
        };
        let (collected, messages) = pool.collect(py, &params.weights, budget, limit, has_custom)?;
        let Some(choice) = pick(py, params, custom_fn, &collected, &messages)? else {
            return Ok(None);
        };
        if choice.total < min_score {
            return Ok(None);
        }
        let Some(request_id) = pool.request_id(py, &choice.candidate)? else { continue };
        let tokens = choice.candidate.tokens;
        if reserve {
            let consumed =
                throttle.with_state(py, |state, now| state.consume(now, &request_id, tokens, None))?;
            if !consumed {
                // The budget moved while custom scorers ran (another thread): start over.
                continue;
            }
        }
        if let Some(message) = pool.take(py, &choice.candidate, visibility_timeout)? {
            let parts = breakdown(&choice);
            return Ok(Some((message, choice.total, parts)));
        }
        if reserve {
            // The winner left while custom scorers ran: give its reservation back.
            throttle
                .with_state(py, |state, _| state.adjust(&request_id, 0))?
                .map_err(|e| to_py_err(py, e))?;
        }
    }
    Ok(None)
}

/// The selection half of a dispatch step against any other rate limiter: the best candidate
/// under `available` tokens, not yet taken.
pub(crate) fn select_candidate(
    py: Python<'_>,
    pool: &impl Pool,
    budget: Budget,
    params: &PyScoringParams,
    custom_fn: Option<&Bound<'_, PyAny>>,
    min_score: f64,
) -> PyResult<Option<PySelection>> {
    let has_custom = custom_fn.is_some() && !params.custom_weights.is_empty();
    let limit = if has_custom { params.max_candidates } else { 1 };
    let (collected, messages) = pool.collect(py, &params.weights, budget, limit, has_custom)?;
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
fn select_with_budget(
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
    select_candidate(py, pool, budget, params, custom_fn.filter(|f| !f.is_none()), min_score)
}

/// `take` of both pools: the selected message with its score, or None if it left.
fn take_selection(
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
// The prefetch buffer of external stores.

struct Buffered {
    message: Py<PyAny>,
    request_id: String,
    handle: String,
    traits: crate::scoring::MessageTraits,
    seq: u64,
}

#[derive(Default)]
struct BufferState {
    items: Vec<Buffered>,
    next_seq: u64,
}

impl BufferState {
    fn position(&self, seq: u64) -> Option<usize> {
        self.items.iter().position(|item| item.seq == seq)
    }
}

fn read_message(message: &Bound<'_, PyAny>) -> PyResult<(String, String, crate::scoring::MessageTraits)> {
    let request = message.getattr("payload")?;
    let attributes = message.getattr("attributes")?;
    let request_id: String = request.getattr("id")?.extract()?;
    let priority: u8 = request.getattr("priority")?.extract()?;
    if priority > 3 {
        return Err(CoreError::InvalidRequest(format!("priority must be within 0..3, got {priority}")).into());
    }
    let tokens = token_count(&request.getattr("token_info")?.getattr("estimated")?, "token_info.estimated")?;
    let expected: Option<f64> = request.getattr("expected_processing_time")?.extract()?;
    let enqueued_at: f64 = attributes.getattr("enqueued_at")?.call_method0("timestamp")?.extract()?;
    // The buffer's own receive is not a retry: score the count as the store had it before, as
    // the in-memory path does.
    let receive_count = attributes.getattr("receive_count")?.extract::<u32>()?.saturating_sub(1);
    let handle: String = attributes.getattr("receipt_handle")?.extract()?;
    Ok((
        request_id,
        handle,
        crate::scoring::MessageTraits {
            priority,
            receive_count,
            tokens,
            expected_processing_seconds: expected,
            enqueued_at,
        },
    ))
}

/// The prefetch buffer: messages leased from an external store, selected from exactly.
#[pyclass(module = "llm_queue_dispatcher._core", name = "CandidateBuffer", frozen)]
pub struct PyCandidateBuffer {
    state: Mutex<BufferState>,
    clock: ClockSource,
}

impl Pool for PyCandidateBuffer {
    fn collect(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        limit: usize,
        want_messages: bool,
    ) -> PyResult<(Vec<Collected>, Vec<LazyMessage>)> {
        let now = self.clock.now(py)?;
        let state = self.state.lock();
        let context = SearchContext {
            weights: *weights,
            now,
            available: budget.available,
            max_tokens: budget.max_tokens,
        };
        let mut stream = SortedCandidates::new(
            &context,
            state.items.iter().enumerate().map(|(i, item)| (i as u32, item.traits, item.seq)),
        );
        let collected = collect(&mut stream, limit);
        let messages = if want_messages {
            collected
                .iter()
                .map(|c| LazyMessage::Built(state.items[c.candidate.slot as usize].message.clone_ref(py)))
                .collect()
        } else {
            Vec::new()
        };
        Ok((collected, messages))
    }

    fn take(
        &self,
        py: Python<'_>,
        candidate: &Candidate,
        _visibility_timeout: f64,
    ) -> PyResult<Option<Py<PyAny>>> {
        let mut state = self.state.lock();
        Ok(state.position(candidate.seq).map(|i| state.items.swap_remove(i).message.clone_ref(py)))
    }

    fn request_id(&self, _py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>> {
        let state = self.state.lock();
        Ok(state.position(candidate.seq).map(|i| state.items[i].request_id.clone()))
    }
}

#[pymethods]
impl PyCandidateBuffer {
    #[new]
    #[pyo3(signature = (clock=None))]
    fn new(clock: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(Self {
            state: Mutex::new(BufferState::default()),
            clock: ClockSource::from_arg(clock, ClockSource::Wall)?,
        })
    }

    /// Adds leased messages (all checked before any is added).
    fn insert(&self, messages: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut read = Vec::new();
        for message in messages.try_iter()? {
            let message = message?;
            let (request_id, handle, traits) = read_message(&message)?;
            read.push((message.unbind(), request_id, handle, traits));
        }
        let mut state = self.state.lock();
        for (message, request_id, handle, traits) in read {
            let seq = state.next_seq;
            state.next_seq += 1;
            state.items.push(Buffered { message, request_id, handle, traits, seq });
        }
        Ok(())
    }

    /// Removes and returns every buffered message.
    fn drain(&self) -> Vec<Py<PyAny>> {
        self.state.lock().items.drain(..).map(|item| item.message).collect()
    }

    /// Receipt handles of the buffered messages (to keep their leases alive).
    fn handles(&self) -> Vec<String> {
        self.state.lock().items.iter().map(|item| item.handle.clone()).collect()
    }

    /// Drops the message with this receipt handle (its lease was lost); True if it was there.
    fn discard(&self, handle: &str) -> bool {
        let removed: Vec<Buffered> = {
            let mut state = self.state.lock();
            let (gone, kept) =
                std::mem::take(&mut state.items).into_iter().partition(|item| item.handle == handle);
            state.items = kept;
            gone
        };
        // Dropped unlocked: releasing the last reference may run finalizers.
        !removed.is_empty()
    }

    fn __len__(&self) -> usize {
        self.state.lock().items.len()
    }

    /// One dispatch step with the budget of `throttle`.
    #[pyo3(signature = (throttle, params, custom_fn, visibility_timeout, min_score, reserve))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch_native(
        &self,
        py: Python<'_>,
        throttle: &Bound<'_, PyThrottle>,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        visibility_timeout: f64,
        min_score: f64,
        reserve: bool,
    ) -> PyResult<Option<Dispatched>> {
        let custom_fn = custom_fn.filter(|f| !f.is_none());
        dispatch_with_throttle(
            py,
            self,
            throttle.get(),
            params.get(),
            custom_fn,
            visibility_timeout,
            min_score,
            reserve,
        )
    }

    /// The best candidate under `available` tokens (any rate limiter), not yet taken.
    #[pyo3(signature = (available_tokens, available_requests, params, custom_fn, min_score))]
    fn select(
        &self,
        py: Python<'_>,
        available_tokens: f64,
        available_requests: f64,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        min_score: f64,
    ) -> PyResult<Option<PySelection>> {
        select_with_budget(py, self, available_tokens, available_requests, params.get(), custom_fn, min_score)
    }

    /// Takes a selected candidate out: `(message, total, breakdown)`, or None if it left.
    fn take(
        &self,
        py: Python<'_>,
        selection: &Bound<'_, PySelection>,
        visibility_timeout: f64,
    ) -> PyResult<Option<Dispatched>> {
        take_selection(py, self, selection.get(), visibility_timeout)
    }

    /// Smallest estimate among buffered messages.
    fn min_visible_tokens(&self) -> Option<u64> {
        self.state.lock().items.iter().map(|item| item.traits.tokens).min()
    }

    /// Ids of buffered messages whose estimate exceeds `capacity`.
    fn ids_above(&self, capacity: f64) -> Vec<String> {
        self.state
            .lock()
            .items
            .iter()
            .filter(|i| i.traits.tokens as f64 > capacity)
            .map(|i| i.request_id.clone())
            .collect()
    }

    /// Removes and returns buffered messages whose estimate exceeds `capacity` (still leased).
    #[pyo3(signature = (capacity, visibility_timeout=None))]
    fn take_above(&self, capacity: f64, visibility_timeout: Option<f64>) -> Vec<Py<PyAny>> {
        let _ = visibility_timeout;
        let mut state = self.state.lock();
        let (above, keep): (Vec<Buffered>, Vec<Buffered>) =
            state.items.drain(..).partition(|item| item.traits.tokens as f64 > capacity);
        state.items = keep;
        above.into_iter().map(|item| item.message).collect()
    }

    /// Buffered messages per priority 0..=3.
    fn counts_by_priority(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for item in &self.state.lock().items {
            counts[usize::from(item.traits.priority)] += 1;
        }
        counts
    }

    /// Oldest `enqueued_at` in the buffer.
    fn oldest_enqueued_at(&self) -> Option<f64> {
        self.state.lock().items.iter().map(|item| item.traits.enqueued_at).reduce(f64::min)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.clock.traverse(&visit)?;
        if let Some(state) = self.state.try_lock() {
            for item in &state.items {
                visit.call(&item.message)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let items = self.state.try_lock().map(|mut state| std::mem::take(&mut state.items));
        // Dropped unlocked: releasing the last reference may run finalizers.
        drop(items);
    }
}

// ---------------------------------------------------------------------------------------------
// The in-memory store: selection runs over its cells in place.

fn still_visible(store: &Store<Py<PyAny>>, candidate: &Candidate) -> bool {
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
        let view = self.with_store(py, |store, now| {
            if !still_visible(store, candidate) {
                return Ok(None);
            }
            let handle = store.receive_slot(candidate.slot, visibility_timeout, now)?;
            Ok(Some(MessageView::of(py, store.message(candidate.slot), Some(handle))))
        })?;
        view.map(|view| build_view_message(py, &view)).transpose()
    }

    fn request_id(&self, py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>> {
        self.with_store(py, |store, _| {
            Ok(still_visible(store, candidate).then(|| store.message(candidate.slot).request_id.to_string()))
        })
    }
}

#[pymethods]
impl PyStoreCore {
    /// One dispatch step with the budget of `throttle`: `(message, total, breakdown)` or None.
    #[pyo3(name = "dispatch_native", signature = (throttle, params, custom_fn, visibility_timeout, min_score, reserve))]
    #[allow(clippy::too_many_arguments)]
    fn py_dispatch_native(
        &self,
        py: Python<'_>,
        throttle: &Bound<'_, PyThrottle>,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        visibility_timeout: f64,
        min_score: f64,
        reserve: bool,
    ) -> PyResult<Option<Dispatched>> {
        let custom_fn = custom_fn.filter(|f| !f.is_none());
        let params = params.get();
        if custom_fn.is_none() || params.custom_weights.is_empty() {
            return self.dispatch_fused(py, throttle.get(), params, visibility_timeout, min_score, reserve);
        }
        dispatch_with_throttle(
            py,
            self,
            throttle.get(),
            params,
            custom_fn,
            visibility_timeout,
            min_score,
            reserve,
        )
    }

    /// The best candidate under `available_tokens` (any rate limiter), not yet taken.
    #[pyo3(name = "select", signature = (available_tokens, available_requests, params, custom_fn, min_score))]
    fn py_select(
        &self,
        py: Python<'_>,
        available_tokens: f64,
        available_requests: f64,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        min_score: f64,
    ) -> PyResult<Option<PySelection>> {
        select_with_budget(py, self, available_tokens, available_requests, params.get(), custom_fn, min_score)
    }

    /// Receives a selected candidate: `(message, total, breakdown)`, or None if it left.
    #[pyo3(name = "take")]
    fn py_take(
        &self,
        py: Python<'_>,
        selection: &Bound<'_, PySelection>,
        visibility_timeout: f64,
    ) -> PyResult<Option<Dispatched>> {
        take_selection(py, self, selection.get(), visibility_timeout)
    }

    /// A lower bound of the smallest estimate among visible messages (from the cells' ranges).
    fn min_visible_tokens(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        self.with_store(py, |store, _| {
            Ok(store.visible_cells().keys().map(|key| key.token_range().0.floor() as u64).min())
        })
    }

    /// Request ids of visible messages whose estimate exceeds `capacity`.
    fn ids_above(&self, py: Python<'_>, capacity: f64) -> PyResult<Vec<String>> {
        self.with_store(py, |store, _| {
            Ok(slots_above(store, capacity)
                .into_iter()
                .map(|slot| store.message(slot).request_id.to_string())
                .collect())
        })
    }

    /// Receives every visible message whose estimate exceeds `capacity` (they can never be
    /// dispatched): the caller deletes them or fails them into the dead-letter queue.
    fn take_above(&self, py: Python<'_>, capacity: f64, visibility_timeout: f64) -> PyResult<Vec<Py<PyAny>>> {
        let views = self.with_store(py, |store, now| {
            let mut out = Vec::new();
            for slot in slots_above(store, capacity) {
                let handle = store.receive_slot(slot, visibility_timeout, now)?;
                out.push(MessageView::of(py, store.message(slot), Some(handle)));
            }
            Ok(out)
        })?;
        views.iter().map(|view| build_view_message(py, view)).collect()
    }
}

impl PyStoreCore {
    /// The dispatch step without custom scorers, atomic: under the throttle's lock, then the
    /// store's (the one order both are ever taken in), select the best admissible message,
    /// reserve its budget and receive it. The message object is built after both are released.
    fn dispatch_fused(
        &self,
        py: Python<'_>,
        throttle: &PyThrottle,
        params: &PyScoringParams,
        visibility_timeout: f64,
        min_score: f64,
        reserve: bool,
    ) -> PyResult<Option<Dispatched>> {
        let picked = throttle.with_state(py, |limiter, limiter_now| {
            let Some(budget) = throttle_budget(limiter) else { return Ok(None) };
            self.with_store(py, |store, now| {
                let context = SearchContext {
                    weights: params.weights,
                    now,
                    available: budget.available,
                    max_tokens: budget.max_tokens,
                };
                let Some(candidate) = best_candidate(&*store, &context) else { return Ok(None) };
                if candidate.base < min_score {
                    return Ok(None);
                }
                if reserve {
                    let request_id = &store.message(candidate.slot).request_id;
                    if !limiter.consume(limiter_now, request_id, candidate.tokens, None) {
                        return Ok(None);
                    }
                }
                let handle = store.receive_slot(candidate.slot, visibility_timeout, now)?;
                Ok(Some((MessageView::of(py, store.message(candidate.slot), Some(handle)), candidate)))
            })
        })??;
        let Some((view, candidate)) = picked else { return Ok(None) };
        let message = build_view_message(py, &view)?;
        Ok(Some((message, candidate.base, candidate.factors.to_vec())))
    }
}

/// Slots of visible messages with more tokens than `capacity`: only cells whose token range
/// reaches past it are walked.
fn slots_above(store: &Store<Py<PyAny>>, capacity: f64) -> Vec<u32> {
    let mut out = Vec::new();
    for (key, members) in store.visible_cells() {
        if key.token_range().1 <= capacity {
            continue;
        }
        out.extend(members.values().copied().filter(|&slot| store.message(slot).tokens as f64 > capacity));
    }
    out
}
