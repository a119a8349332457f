//! The selection steps of `DispatchCore` over its two pools, as the pure `dispatch` module asks
//! for them: each step takes its lock alone (the store's, the core's for the buffer, the
//! throttle's), and custom scorers — Python callables — run with no lock held. Also what a take
//! gives back: the message's view or buffered item, with what the ledger and the job need.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyFloat, PyList, PyString};

use super::args::repr_of;
use super::core::CoreState;
use super::messages::{build_view_message, MessageView};
use super::store::PyStoreCore;
use super::throttle::PyThrottle;
use crate::buffer::Buffered;
use crate::dispatch::{Facts, Steps, TokenParts};
use crate::ledger;
use crate::policy::{ranking_budget, score_reserve, Admission, Budget, Snapshot, UrgentReserve};
use crate::scoring::MessageTraits;
use crate::scoring::Weights;
use crate::select::{best_candidate, collect, Candidate, Collected, IndexSearch, SearchContext};
use crate::store::ReceiptHandle;
use crate::throttle::ReservationKey;

/// The limiter a selection works against: an `LLMThrottle`, or another limiter's reported
/// budget (its reservation is made by the caller afterwards).
#[derive(Clone, Copy)]
pub(crate) enum Against<'a> {
    /// An `LLMThrottle`.
    Throttle(&'a PyThrottle),
    /// Another limiter's `get_metrics()`: tokens and requests available, and their capacities.
    Reported { snapshot: Snapshot, request_capacity: f64 },
}

impl Against<'_> {
    fn budget(self, py: Python<'_>, hold: bool) -> PyResult<Option<Budget>> {
        match self {
            Self::Throttle(throttle) => throttle.with_state(py, |state, _| ranking_budget(state, hold)),
            Self::Reported { snapshot, request_capacity } => {
                // Holding the budget ranks every message that fits the capacity, against it.
                let (tokens, requests) = if hold {
                    (snapshot.capacity, request_capacity)
                } else {
                    (snapshot.available_tokens, snapshot.available_requests)
                };
                Ok((requests >= 1.0).then_some(Budget { available: tokens, max_tokens: tokens }))
            }
        }
    }

    /// See `Steps::wait`.
    fn wait(self, py: Python<'_>, tokens: u64, parts: Option<(u64, u64)>, margin: f64) -> PyResult<f64> {
        match self {
            Self::Throttle(throttle) => throttle.with_state(py, |state, _| {
                let check = state.check_parts(tokens, parts, margin);
                if check.allowed {
                    0.0
                } else {
                    check.available_in
                }
            }),
            // How long is the limiter's to say: the caller asks it for the tokens needed.
            Self::Reported { snapshot, .. } => Ok(if snapshot.admits(tokens, margin) {
                0.0
            } else {
                (tokens as f64 + margin.max(0.0).ceil()).max(1.0)
            }),
        }
    }

    /// See `Steps::urgent`: the reserve under `weights` with the pool's `history` at `now`.
    fn urgent(
        self,
        py: Python<'_>,
        weights: &Weights,
        history: &UrgentReserve,
        now: f64,
    ) -> PyResult<(f64, f64)> {
        match self {
            Self::Throttle(throttle) => throttle.with_state(py, |state, _| {
                (score_reserve(weights, Some(history), state, now), state.tokens().capacity())
            }),
            Self::Reported { snapshot, .. } => {
                Ok((score_reserve(weights, Some(history), &snapshot, now), snapshot.capacity))
            }
        }
    }
}

/// Calls the custom scoring function on a message and checks what it returns: one number per
/// scorer (an int or a float, NaN counting as 0); anything else is an `InvalidConfigError`
/// naming the scorer and the value, and nothing is dequeued.
pub(crate) fn evaluate_custom(
    custom_fn: &Bound<'_, PyAny>,
    message: &Bound<'_, PyAny>,
    names: &[String],
) -> PyResult<Vec<f64>> {
    let py = message.py();
    let scores = custom_fn.call1((message,))?;
    let scores = scores.cast::<PyList>().map_err(|_| {
        super::args::invalid_config(py, format!("custom scoring returned {}, not a list", repr_of(&scores)))
    })?;
    if scores.len() != names.len() {
        return Err(super::args::invalid_config(
            py,
            format!("custom scoring returned {} scores for {} scorers", scores.len(), names.len()),
        ));
    }
    scores
        .iter()
        .zip(names)
        .map(|(score, name)| {
            // A float, or what converts to one (an int a float can hold, a numpy number); not a
            // str (whose `float()` would parse it), None, or an int too large for a float.
            let number = if let Ok(float) = score.cast::<PyFloat>() {
                Some(float.value())
            } else if score.is_instance_of::<PyString>() {
                None
            } else {
                score.extract::<f64>().ok()
            };
            number.ok_or_else(|| {
                super::args::invalid_config(
                    py,
                    format!(
                        "custom scorer {} returned {}; a score must be a number a float can hold (clamped to [0, 1])",
                        crate::store::py_repr(name),
                        repr_of(&score)
                    ),
                )
            })
        })
        .collect()
}

// ----- what a take gives ----------------------------------------------------------------------

/// Where a taken message came from, to put it back there when it is not handed out.
pub(crate) enum Origin {
    /// Received from the in-memory store (its `handle` undoes the receive).
    Store,
    /// Taken out of the prefetch buffer, as it was there.
    Buffer {
        seq: u64,
        traits: MessageTraits,
        tenant: u32,
        deadline: f64,
        lease_end: f64,
        parts: Option<(u64, u64)>,
    },
}

/// The message object of a take: built already (the buffer holds them), or what builds it
/// after every lock is released (the store's view).
pub(crate) enum Message {
    Built(Py<PyAny>),
    View(MessageView),
}

/// What a take gives: the message, where it came from, and what the ledger and the job need.
pub(crate) struct Taken {
    pub message: Message,
    pub request_id: Box<str>,
    pub handle: Box<str>,
    pub origin: Origin,
    /// Its receive count: the delivery's number in its reservation key.
    pub delivery: u32,
    pub facts: ledger::Facts,
    pub tenant: Box<str>,
    pub why: Facts,
}

impl Taken {
    /// Copies what a take needs of the store's message in `slot`, received with `handle`.
    pub(crate) fn from_store(
        py: Python<'_>,
        store: &super::store::PyStore,
        slot: u32,
        handle: ReceiptHandle,
        why: Facts,
        charge: Option<(u32, u64)>,
        reserved: bool,
    ) -> Self {
        let message = store.message(slot);
        Self {
            message: Message::View(MessageView::of(py, message, Some(handle))),
            request_id: (&message.request_id).into(),
            handle: handle.to_string().into(),
            origin: Origin::Store,
            delivery: message.receive_count,
            facts: ledger::Facts {
                tenant: message.tenant,
                tokens: message.tokens,
                priority: message.priority,
                enqueued_at: message.enqueued_at,
                reserved,
                charge,
            },
            tenant: store.tenant_name(message.tenant).into(),
            why,
        }
    }

    /// A buffered item taken out.
    pub(crate) fn from_buffer(
        state: &CoreState,
        item: Buffered<Py<PyAny>>,
        why: Facts,
        charge: Option<(u32, u64)>,
        reserved: bool,
    ) -> Self {
        let facts = ledger::Facts {
            tenant: item.tenant,
            tokens: item.traits.tokens,
            priority: item.traits.priority,
            enqueued_at: item.traits.enqueued_at,
            reserved,
            charge,
        };
        Self {
            message: Message::Built(item.message),
            request_id: item.request_id,
            handle: item.handle,
            origin: Origin::Buffer {
                seq: item.seq,
                traits: item.traits,
                tenant: item.tenant,
                deadline: item.deadline,
                lease_end: item.lease_end,
                parts: item.parts,
            },
            // The buffer scores the store's count before its own receive: the delivery is the next.
            delivery: item.traits.receive_count + 1,
            facts,
            tenant: state.buffer.tenant_name(item.tenant).into(),
            why,
        }
    }
}

// ----- the in-memory store ---------------------------------------------------------------------

fn still_visible(store: &super::store::PyStore, candidate: &Candidate) -> bool {
    store.get(candidate.slot).is_some_and(|m| m.message_id == candidate.seq)
        && store.is_visible(candidate.slot) == Some(true)
}

/// What every selection step needs besides its pool.
#[derive(Clone, Copy)]
pub(crate) struct Selecting<'a, 'py> {
    pub against: Against<'a>,
    pub weights: Weights,
    /// The custom scorers' function (None: none are configured).
    pub custom_fn: Option<&'a Bound<'py, PyAny>>,
    /// The custom scorers' names, for errors.
    pub names: &'a [String],
    /// Whether the take is reserved (for the ledger's facts).
    pub reserve: bool,
}

/// The steps over the in-memory store.
pub(crate) struct StoreSteps<'a, 'py> {
    py: Python<'py>,
    store: &'a PyStoreCore,
    sel: Selecting<'a, 'py>,
    visibility_timeout: f64,
    views: Vec<(MessageView, Option<Py<PyAny>>)>,
}

impl<'a, 'py> StoreSteps<'a, 'py> {
    /// The input and output parts of `candidate`'s estimate, when its request gave them.
    fn parts(&self, candidate: &Candidate) -> PyResult<Option<(u64, u64)>> {
        self.store.with_store(self.py, |store, _| {
            Ok(store
                .get(candidate.slot)
                .filter(|m| m.message_id == candidate.seq)
                .and_then(|m| m.payload.token_parts(m.tokens)))
        })
    }

    pub(crate) fn new(
        py: Python<'py>,
        store: &'a PyStoreCore,
        sel: Selecting<'a, 'py>,
        visibility_timeout: f64,
    ) -> Self {
        Self { py, store, sel, visibility_timeout, views: Vec::new() }
    }
}

impl Steps for StoreSteps<'_, '_> {
    type Taken = Taken;
    type Error = PyErr;

    fn budget(&mut self, hold: bool) -> PyResult<Option<Budget>> {
        self.sel.against.budget(self.py, hold)
    }

    fn collect(&mut self, budget: Budget, limit: usize, by_score: bool) -> PyResult<Vec<Collected>> {
        let py = self.py;
        let weights =
            Weights { urgent_first: self.sel.weights.urgent_first && !by_score, ..self.sel.weights };
        let want = self.sel.custom_fn.is_some();
        let (collected, views) = self.store.with_store(py, |store, now| {
            let context =
                SearchContext { weights, now, available: budget.available, max_tokens: budget.max_tokens };
            let collected: Vec<Collected> = if limit == 1 && !want {
                // Without custom scorers only the best matters: the heap-free walk.
                best_candidate(&*store, &context)
                    .map(|candidate| Collected { candidate, bound_after: None })
                    .into_iter()
                    .collect()
            } else {
                collect(&mut IndexSearch::new(&*store, context), limit)
            };
            // Views only: objects are built unlocked, and only for the candidates evaluated.
            let views = if want {
                collected
                    .iter()
                    .map(|c| (MessageView::of(py, store.message(c.candidate.slot), None), None))
                    .collect()
            } else {
                Vec::new()
            };
            Ok((collected, views))
        })?;
        self.views = views;
        Ok(collected)
    }

    fn evaluate(&mut self, i: usize, _candidate: &Candidate) -> PyResult<Vec<f64>> {
        let Some(custom_fn) = self.sel.custom_fn else { return Ok(Vec::new()) };
        let (view, built) = &mut self.views[i];
        if built.is_none() {
            *built = Some(build_view_message(self.py, view)?);
        }
        let message = built.as_ref().map(|m| m.bind(self.py).clone()).expect("built above");
        evaluate_custom(custom_fn, &message, self.sel.names)
    }

    fn wait(&mut self, candidate: &Candidate, margin: f64) -> PyResult<f64> {
        let parts = self.parts(candidate)?;
        self.sel.against.wait(self.py, candidate.tokens, parts, margin)
    }

    fn urgent(&mut self) -> PyResult<(f64, f64)> {
        if !self.sel.weights.urgent_first {
            return Ok((0.0, f64::INFINITY));
        }
        let (history, now) =
            self.store.with_store(self.py, |store, now| Ok((store.ranking().0 .1.clone(), now)))?;
        self.sel.against.urgent(self.py, &self.sel.weights, &history, now)
    }

    fn reserve(&mut self, candidate: &Candidate) -> PyResult<Option<ReservationKey>> {
        let Against::Throttle(throttle) = self.sel.against else { return Ok(None) };
        let found = self.store.with_store(self.py, |store, _| {
            Ok(still_visible(store, candidate).then(|| {
                let message = store.message(candidate.slot);
                (message.request_id.clone(), message.payload.token_parts(message.tokens))
            }))
        })?;
        let Some((request_id, parts)) = found else { return Ok(None) };
        throttle.with_state(self.py, |state, now| {
            state.reserve_parts(now, &request_id, candidate.tokens, parts, None).ok()
        })
    }

    fn take(&mut self, candidate: &Candidate, why: Facts) -> PyResult<Option<Taken>> {
        let py = self.py;
        let (timeout, reserve) = (self.visibility_timeout, self.sel.reserve);
        self.views.clear();
        self.store.with_store(py, |store, now| {
            if !still_visible(store, candidate) {
                return Ok(None);
            }
            let handle = store.receive_slot(candidate.slot, timeout, now)?;
            Ok(Some(Taken::from_store(py, store, candidate.slot, handle, why, None, reserve)))
        })
    }

    fn release(&mut self, key: ReservationKey) {
        if let Against::Throttle(throttle) = self.sel.against {
            let _ = throttle.with_state(self.py, |state, _| state.release_reservation(key));
        }
    }
}

// ----- the prefetch buffer ---------------------------------------------------------------------

/// The steps over the prefetch buffer (in the core's state), at the dispatcher clock's `now`.
pub(crate) struct BufferSteps<'a, 'py> {
    py: Python<'py>,
    state: &'a Mutex<CoreState>,
    sel: Selecting<'a, 'py>,
    now: f64,
    messages: Vec<Py<PyAny>>,
}

impl<'a, 'py> BufferSteps<'a, 'py> {
    pub(crate) fn new(
        py: Python<'py>,
        state: &'a Mutex<CoreState>,
        sel: Selecting<'a, 'py>,
        now: f64,
    ) -> Self {
        Self { py, state, sel, now, messages: Vec::new() }
    }
}

impl Steps for BufferSteps<'_, '_> {
    type Taken = Taken;
    type Error = PyErr;

    fn budget(&mut self, hold: bool) -> PyResult<Option<Budget>> {
        self.sel.against.budget(self.py, hold)
    }

    fn collect(&mut self, budget: Budget, limit: usize, by_score: bool) -> PyResult<Vec<Collected>> {
        let context = SearchContext {
            weights: Weights { urgent_first: self.sel.weights.urgent_first && !by_score, ..self.sel.weights },
            now: self.now,
            available: budget.available,
            max_tokens: budget.max_tokens,
        };
        let state = self.state.lock_py_attached(self.py);
        let collected = state.buffer.collect(&context, limit);
        if self.sel.custom_fn.is_some() {
            let items = state.buffer.items();
            self.messages = collected
                .iter()
                .map(|c| items[c.candidate.slot as usize].message.clone_ref(self.py))
                .collect();
        }
        Ok(collected)
    }

    fn evaluate(&mut self, i: usize, _candidate: &Candidate) -> PyResult<Vec<f64>> {
        let Some(custom_fn) = self.sel.custom_fn else { return Ok(Vec::new()) };
        evaluate_custom(custom_fn, self.messages[i].bind(self.py), self.sel.names)
    }

    fn wait(&mut self, candidate: &Candidate, margin: f64) -> PyResult<f64> {
        let parts =
            self.state.lock_py_attached(self.py).buffer.get(candidate.seq).and_then(|item| item.parts);
        self.sel.against.wait(self.py, candidate.tokens, parts, margin)
    }

    fn urgent(&mut self) -> PyResult<(f64, f64)> {
        if !self.sel.weights.urgent_first {
            return Ok((0.0, f64::INFINITY));
        }
        let history = self.state.lock_py_attached(self.py).buffer.urgent_history();
        self.sel.against.urgent(self.py, &self.sel.weights, &history, self.now)
    }

    fn reserve(&mut self, candidate: &Candidate) -> PyResult<Option<ReservationKey>> {
        let Against::Throttle(throttle) = self.sel.against else { return Ok(None) };
        let found = {
            let state = self.state.lock_py_attached(self.py);
            state.buffer.get(candidate.seq).map(|item| (item.request_id.clone(), item.parts))
        };
        let Some((request_id, parts)) = found else { return Ok(None) };
        throttle.with_state(self.py, |state, now| {
            state.reserve_parts(now, &request_id, candidate.tokens, parts, None).ok()
        })
    }

    fn take(&mut self, candidate: &Candidate, why: Facts) -> PyResult<Option<Taken>> {
        let messages = std::mem::take(&mut self.messages);
        let taken = {
            let mut state = self.state.lock_py_attached(self.py);
            state
                .buffer
                .take(candidate.seq)
                .map(|item| Taken::from_buffer(&state, item, why, None, self.sel.reserve))
        };
        drop(messages);
        Ok(taken)
    }

    fn release(&mut self, key: ReservationKey) {
        if let Against::Throttle(throttle) = self.sel.against {
            let _ = throttle.with_state(self.py, |state, _| state.release_reservation(key));
        }
    }
}
