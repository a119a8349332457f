//! `CandidateBuffer`: the prefetch buffer of external stores — messages leased from the store
//! with `storage.dequeue`, selected from exactly with the same scoring and stopping rule as the
//! in-memory store (a full scan: the buffer holds at most `buffer_size` messages, 50–200).

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::{PyTraverseError, PyVisit};

use super::args::{text_arg, token_count};
use super::clock::ClockSource;
use super::dispatch::{
    dispatch_with_throttle, select_with_budget, take_selection, time_until_score, Budget, Dispatched,
    LazyMessage, Outcome, Pool, PySelection, Settings,
};
use super::fair::{info as fair_info, FairDispatched, FairInfo, FairSettings, PyFairSelection};
use super::params::PyScoringParams;
use super::store::{datetime_seconds, visibility_timeout_arg};
use super::throttle::PyThrottle;
use std::collections::HashMap;

use pyo3::types::PyDict;

use crate::cells::CellKey;
use crate::fair::{FairCandidate, FairConfig, FairLanes, FairRuntime};
use crate::index::{IndexEntry, Ranking};
use crate::policy::{decide_fair_lanes, Admission, FairDecision, Snapshot, UrgentReserve};
use crate::scoring::{MessageTraits, Weights};
use crate::select::{collect, Candidate, Collected, SearchContext, SortedCandidates};

struct Buffered {
    message: Py<PyAny>,
    request_id: String,
    handle: String,
    traits: MessageTraits,
    seq: u64,
    tenant: u32,
    /// Deadline instant; NaN for none.
    deadline: f64,
}

impl Buffered {
    fn entry(&self) -> IndexEntry {
        IndexEntry {
            cell: CellKey::for_message(self.traits.priority, self.traits.receive_count, self.traits.tokens),
            tokens: self.traits.tokens,
            time: 0,
            enqueued_at: self.traits.enqueued_at,
            seq: self.seq,
            tenant: self.tenant,
            deadline: self.deadline,
        }
    }
}

#[derive(Default)]
struct BufferState {
    items: Vec<Buffered>,
    next_seq: u64,
    /// Tenant names interned (0 is "").
    tenant_names: Vec<String>,
    tenant_ids: HashMap<String, u32>,
    /// A `fair_priority` dispatcher's settings and runtime.
    fair: Option<(FairConfig, FairRuntime)>,
    /// The estimates of the messages buffered so far (the URGENT reserve's history).
    urgent: UrgentReserve,
}

impl BufferState {
    fn intern(&mut self, name: &str) -> u32 {
        if self.tenant_names.is_empty() {
            self.tenant_names.push(String::new());
            self.tenant_ids.insert(String::new(), 0);
        }
        if let Some(&id) = self.tenant_ids.get(name) {
            return id;
        }
        let id = self.tenant_names.len() as u32;
        self.tenant_names.push(name.to_owned());
        self.tenant_ids.insert(name.to_owned(), id);
        id
    }

    fn tenant_name(&self, id: u32) -> &str {
        self.tenant_names.get(id as usize).map_or("", String::as_str)
    }

    /// The fair lanes of the buffered messages (the buffer is small: built per step).
    /// Lanes order by sequence number as age order, but the buffer's own sequence is the order
    /// messages arrived in it (the store hands them over by priority, a failed one again last):
    /// each entry gets its rank by enqueue instant instead (ties by arrival).
    fn lanes(&self, config: &FairConfig) -> FairLanes {
        let mut lanes = FairLanes::new(config.clone());
        let items = &self.items;
        let mut by_age: Vec<usize> = (0..items.len()).collect();
        by_age.sort_by(|&a, &b| {
            items[a]
                .traits
                .enqueued_at
                .total_cmp(&items[b].traits.enqueued_at)
                .then(items[a].seq.cmp(&items[b].seq))
        });
        for (age_rank, &i) in by_age.iter().enumerate() {
            let mut entry = items[i].entry();
            entry.seq = age_rank as u64;
            lanes.insert(i as u32, &entry);
        }
        lanes
    }

    /// The fair decision over the buffer; None without fair settings or messages.
    fn decide_fair(&mut self, limiter: &impl Admission, now: f64, hold: bool) -> Option<FairDecision> {
        let (config, _) = self.fair.as_ref()?;
        let mut lanes = self.lanes(config);
        let items = &self.items;
        let (_, runtime) = self.fair.as_mut()?;
        lanes.prepare_all(now, &mut runtime.ledger);
        self.urgent.set_waiting_tokens(items.iter().map(|item| item.traits.tokens).sum());
        let tokens_of = |slot: u32| items[slot as usize].traits.tokens;
        decide_fair_lanes(&lanes, tokens_of, runtime, &self.urgent, limiter, now, hold)
    }

    /// Takes the item in `slot` out and charges its tenant: the message and the facts.
    fn take_fair(&mut self, slot: u32, decision: &FairCandidate, now: f64) -> Option<(Py<PyAny>, FairInfo)> {
        let item = self.items.swap_remove(slot as usize);
        let (_, runtime) = self.fair.as_mut()?;
        let charge = runtime.charge(item.tenant, now, item.traits.tokens);
        let facts = fair_info(decision, self.tenant_name(item.tenant), charge);
        Some((item.message, facts))
    }
}

impl BufferState {
    fn position(&self, seq: u64) -> Option<usize> {
        self.items.iter().position(|item| item.seq == seq)
    }
}

/// What the buffer reads of a leased message: id, handle, score inputs, tenant, deadline.
type Read = (String, String, MessageTraits, Option<String>, f64);

fn read_message(message: &Bound<'_, PyAny>) -> PyResult<Read> {
    let py = message.py();
    let request = message.getattr("payload")?;
    let attributes = message.getattr("attributes")?;
    let request_id = text_arg(&request.getattr("id")?, "payload.id")?;
    let priority =
        request.getattr("priority")?.extract::<u8>().ok().filter(|&p| p <= 3).ok_or_else(|| {
            super::args::invalid_request(py, "buffered message: priority must be within 0..3".to_owned())
        })?;
    let tokens = token_count(&request.getattr("token_info")?.getattr("estimated")?, "token_info.estimated")?;
    let expected: Option<f64> = request.getattr("expected_processing_time")?.extract()?;
    let enqueued_at: f64 = attributes.getattr("enqueued_at")?.call_method0("timestamp")?.extract()?;
    // The buffer's own receive is not a retry: score the count as the store had it before, as
    // the in-memory path does.
    let receive_count = attributes.getattr("receive_count")?.extract::<u32>()?.saturating_sub(1);
    let handle = text_arg(&attributes.getattr("receipt_handle")?, "attributes.receipt_handle")?;
    let tenant = request.getattr("tenant")?;
    let tenant = if tenant.is_none() { None } else { Some(text_arg(&tenant, "payload.tenant")?) };
    let deadline = request.getattr("deadline")?;
    let deadline =
        if deadline.is_none() { f64::NAN } else { datetime_seconds(&deadline, "payload.deadline")? };
    Ok((
        request_id,
        handle,
        MessageTraits { priority, receive_count, tokens, expected_processing_seconds: expected, enqueued_at },
        tenant,
        deadline,
    ))
}

/// The prefetch buffer: messages leased from an external store, selected from exactly.
#[pyclass(module = "llm_queue_dispatcher._core", name = "CandidateBuffer", frozen)]
pub struct PyCandidateBuffer {
    state: Mutex<BufferState>,
    clock: ClockSource,
}

impl PyCandidateBuffer {
    fn collect_at(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        limit: usize,
        want_messages: bool,
        offset: f64,
    ) -> PyResult<(Vec<Collected>, Vec<LazyMessage>)> {
        let now = self.clock.now(py)? + offset;
        let state = self.state.lock_py_attached(py);
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
        self.collect_at(py, weights, budget, limit, want_messages, 0.0)
    }

    fn take(
        &self,
        py: Python<'_>,
        candidate: &Candidate,
        _visibility_timeout: f64,
    ) -> PyResult<Option<Py<PyAny>>> {
        let mut state = self.state.lock_py_attached(py);
        Ok(state.position(candidate.seq).map(|i| state.items.swap_remove(i).message))
    }

    fn best_score_at(
        &self,
        py: Python<'_>,
        weights: &Weights,
        budget: Budget,
        offset: f64,
    ) -> PyResult<Option<f64>> {
        let (collected, _) = self.collect_at(py, weights, budget, 1, false, offset)?;
        Ok(collected.first().map(|c| c.candidate.base))
    }

    fn request_id(&self, py: Python<'_>, candidate: &Candidate) -> PyResult<Option<String>> {
        let state = self.state.lock_py_attached(py);
        Ok(state.position(candidate.seq).map(|i| state.items[i].request_id.clone()))
    }

    fn urgent_history(&self, py: Python<'_>) -> PyResult<(UrgentReserve, f64)> {
        let now = self.clock.now(py)?;
        let state = self.state.lock_py_attached(py);
        let mut history = state.urgent.clone();
        history.set_waiting_tokens(state.items.iter().map(|item| item.traits.tokens).sum());
        Ok((history, now))
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

    /// Adds leased messages (all checked before any is added). Of two copies of one request
    /// (its lease ran out and a fill received it again) the buffer keeps the later delivery,
    /// the one with the higher receive count (the incoming one on a tie): the other's handle is
    /// stale. Returns the handles of the copies not kept.
    fn insert(&self, py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let mut read = Vec::new();
        for message in messages.try_iter()? {
            let message = message?;
            let (request_id, handle, traits, tenant, deadline) = read_message(&message)?;
            read.push((message.unbind(), request_id, handle, traits, tenant, deadline));
        }
        let mut not_kept: Vec<(Py<PyAny>, String)> = Vec::new();
        {
            let mut state = self.state.lock_py_attached(py);
            for (message, request_id, handle, traits, tenant, deadline) in read {
                if let Some(i) = state.items.iter().position(|item| item.request_id == request_id) {
                    if state.items[i].traits.receive_count > traits.receive_count {
                        not_kept.push((message, handle)); // an older delivery coming back
                        continue;
                    }
                    let old = state.items.swap_remove(i);
                    not_kept.push((old.message, old.handle));
                }
                let seq = state.next_seq;
                state.next_seq += 1;
                let tenant = state.intern(tenant.as_deref().unwrap_or(""));
                state.urgent.observe(traits.priority, traits.tokens, traits.enqueued_at);
                state.items.push(Buffered { message, request_id, handle, traits, seq, tenant, deadline });
            }
        }
        // The stale copies' message objects are released here, after the lock.
        Ok(not_kept.into_iter().map(|(_, handle)| handle).collect())
    }

    /// Removes and returns every buffered message.
    fn drain(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        let items = std::mem::take(&mut self.state.lock_py_attached(py).items);
        items.into_iter().map(|item| item.message).collect()
    }

    /// Receipt handles of the buffered messages (to keep their leases alive).
    fn handles(&self, py: Python<'_>) -> Vec<String> {
        self.state.lock_py_attached(py).items.iter().map(|item| item.handle.clone()).collect()
    }

    /// Removes and returns the message with this receipt handle (its lease was lost, or the
    /// caller releases it), if it is there.
    fn discard(&self, py: Python<'_>, handle: &str) -> Option<Py<PyAny>> {
        let removed = {
            let mut state = self.state.lock_py_attached(py);
            let position = state.items.iter().position(|item| item.handle == handle);
            position.map(|i| state.items.swap_remove(i))
        };
        removed.map(|item| item.message)
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.state.lock_py_attached(py).items.len()
    }

    /// One dispatch step with the budget of `throttle` (score policy): `(message, total,
    /// breakdown)`, the seconds until a held winner fits, or None.
    #[pyo3(signature = (throttle, params, custom_fn, visibility_timeout, min_score, reserve, hold=false))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch_native(
        &self,
        py: Python<'_>,
        throttle: &Bound<'_, PyThrottle>,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        visibility_timeout: &Bound<'_, PyAny>,
        min_score: f64,
        reserve: bool,
        hold: bool,
    ) -> PyResult<Outcome<Dispatched>> {
        let timeout = visibility_timeout_arg(visibility_timeout)?;
        dispatch_with_throttle(
            py,
            self,
            throttle.get(),
            params.get(),
            custom_fn,
            Settings { visibility_timeout: timeout, min_score, reserve, hold },
        )
    }

    /// The best candidate under `available_tokens` (any rate limiter), not yet taken.
    #[pyo3(signature = (available_tokens, available_requests, params, custom_fn, min_score, *, reported=None, hold=false))]
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        py: Python<'_>,
        available_tokens: f64,
        available_requests: f64,
        params: &Bound<'_, PyScoringParams>,
        custom_fn: Option<&Bound<'_, PyAny>>,
        min_score: f64,
        reported: Option<(f64, f64, f64)>,
        hold: bool,
    ) -> PyResult<Option<PySelection>> {
        let reported = super::dispatch::reported_budget(reported, hold);
        select_with_budget(
            py,
            self,
            available_tokens,
            available_requests,
            params.get(),
            custom_fn,
            min_score,
            reported,
        )
    }

    /// Takes a selected candidate out: `(message, total, breakdown)`, or None if it left.
    fn take(
        &self,
        py: Python<'_>,
        selection: &Bound<'_, PySelection>,
        visibility_timeout: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Dispatched>> {
        let timeout = visibility_timeout_arg(visibility_timeout)?;
        take_selection(py, self, selection.get(), timeout)
    }

    /// Seconds until the best buffered score reaches `threshold` with time alone (None: never
    /// without another change).
    fn time_until_score(
        &self,
        py: Python<'_>,
        available_tokens: f64,
        params: &Bound<'_, PyScoringParams>,
        threshold: f64,
    ) -> PyResult<Option<f64>> {
        let budget = Budget { available: available_tokens, max_tokens: available_tokens };
        time_until_score(py, self, params.get(), budget, threshold)
    }

    /// Ranks the buffer by the `fair_priority` policy from now on (see `FairPriorityConfig`).
    #[pyo3(signature = (tenant_weights, fairness_window, urgent_first, max_wait, reserve_tokens, urgent_reserve=None))]
    #[allow(clippy::too_many_arguments)]
    fn configure_fair(
        &self,
        py: Python<'_>,
        tenant_weights: &Bound<'_, PyDict>,
        fairness_window: f64,
        urgent_first: bool,
        max_wait: [f64; 4],
        reserve_tokens: Option<f64>,
        urgent_reserve: Option<f64>,
    ) -> PyResult<()> {
        let settings = FairSettings::read(
            tenant_weights,
            fairness_window,
            urgent_first,
            max_wait,
            (reserve_tokens, urgent_reserve),
        )?;
        let mut state = self.state.lock_py_attached(py);
        let config = settings.config(|name| state.intern(name));
        let runtime = FairRuntime::new(&config, settings.reserve_tokens);
        state.fair = Some((config, runtime));
        Ok(())
    }

    /// One `fair_priority` dispatch step over the buffer with the budget of `throttle`.
    #[pyo3(signature = (throttle, visibility_timeout, reserve, hold))]
    fn dispatch_fair(
        &self,
        py: Python<'_>,
        throttle: &Bound<'_, PyThrottle>,
        visibility_timeout: &Bound<'_, PyAny>,
        reserve: bool,
        hold: bool,
    ) -> PyResult<Outcome<FairDispatched>> {
        visibility_timeout_arg(visibility_timeout)?;
        let throttle = throttle.get();
        let limiter_now = throttle.now(py)?;
        let now = self.clock.now(py)?;
        let outcome = throttle.with_state_at(py, limiter_now, |limiter, limiter_now| {
            let mut state = self.state.lock_py_attached(py);
            let Some(decision) = state.decide_fair(limiter, now, hold) else { return Outcome::Nothing };
            if !decision.fits {
                return if decision.wait.is_finite() {
                    Outcome::Wait(decision.wait)
                } else {
                    Outcome::Nothing
                };
            }
            let slot = decision.candidate.slot;
            let item = &state.items[slot as usize];
            if reserve && !limiter.consume(limiter_now, &item.request_id, item.traits.tokens, None) {
                return Outcome::Nothing;
            }
            state.take_fair(slot, &decision.candidate, now).map_or(Outcome::Nothing, Outcome::Taken)
        });
        Ok(outcome)
    }

    /// The `fair_priority` choice under a reported budget (any rate limiter), not yet taken.
    fn select_fair(
        &self,
        py: Python<'_>,
        available_tokens: f64,
        available_requests: f64,
        capacity: f64,
        hold: bool,
    ) -> PyResult<Option<PyFairSelection>> {
        let now = self.clock.now(py)?;
        let snapshot = Snapshot { available_tokens, available_requests, capacity };
        let mut state = self.state.lock_py_attached(py);
        let Some(decision) = state.decide_fair(&snapshot, now, hold) else { return Ok(None) };
        let item = &state.items[decision.candidate.slot as usize];
        Ok(Some(PyFairSelection {
            slot: decision.candidate.slot,
            seq: item.seq,
            candidate: decision.candidate,
            request_id: item.request_id.clone(),
            tokens: item.traits.tokens,
            margin: decision.margin,
            fits: decision.fits,
        }))
    }

    /// Takes a fair selection out of the buffer (charging its tenant), or None if it left.
    fn take_fair(
        &self,
        py: Python<'_>,
        selection: &Bound<'_, PyFairSelection>,
        visibility_timeout: &Bound<'_, PyAny>,
    ) -> PyResult<Option<FairDispatched>> {
        visibility_timeout_arg(visibility_timeout)?;
        let now = self.clock.now(py)?;
        let selection = selection.get();
        let mut state = self.state.lock_py_attached(py);
        let Some(position) = state.position(selection.seq) else { return Ok(None) };
        Ok(state.take_fair(position as u32, &selection.candidate, now))
    }

    /// Corrects the charge of a fair dispatch to `tokens` (0 takes it back).
    fn correct_charge(&self, py: Python<'_>, tenant: u32, charge: u64, tokens: f64) {
        if let Some((_, runtime)) = self.state.lock_py_attached(py).fair.as_mut() {
            runtime.ledger.correct(tenant, charge, tokens);
        }
    }

    /// `{tenant: (buffered, 0)}` of every tenant with a buffered message ("" for none): they
    /// wait here, leased; what is in flight is the dispatcher's to count.
    fn tenant_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let counts: Vec<(String, usize)> = {
            let state = self.state.lock_py_attached(py);
            let mut by_tenant: HashMap<u32, usize> = HashMap::new();
            for item in &state.items {
                *by_tenant.entry(item.tenant).or_default() += 1;
            }
            by_tenant.into_iter().map(|(tenant, n)| (state.tenant_name(tenant).to_owned(), n)).collect()
        };
        let d = PyDict::new(py);
        for (name, buffered) in counts {
            d.set_item(name, (buffered, 0))?;
        }
        Ok(d)
    }

    /// `[(tenant, tokens used over the fairness window)]` (empty without fair settings).
    fn fair_usage(&self, py: Python<'_>) -> PyResult<Vec<(String, f64)>> {
        let now = self.clock.now(py)?;
        let mut state = self.state.lock_py_attached(py);
        let usages = match state.fair.as_mut() {
            Some((_, runtime)) => runtime.ledger.usages(now),
            None => return Ok(Vec::new()),
        };
        Ok(usages.into_iter().map(|(t, u)| (state.tenant_name(t).to_owned(), u)).collect())
    }

    /// Removes and returns buffered messages whose deadline has passed (still leased: the
    /// caller dead-letters them).
    fn take_expired(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let now = self.clock.now(py)?;
        let expired: Vec<Buffered> = {
            let mut state = self.state.lock_py_attached(py);
            let (expired, keep): (Vec<Buffered>, Vec<Buffered>) =
                state.items.drain(..).partition(|item| item.deadline < now);
            state.items = keep;
            expired
        };
        Ok(expired.into_iter().map(|item| item.message).collect())
    }

    /// Smallest estimate among buffered messages.
    fn min_visible_tokens(&self, py: Python<'_>) -> Option<u64> {
        self.state.lock_py_attached(py).items.iter().map(|item| item.traits.tokens).min()
    }

    /// Ids of buffered messages whose estimate exceeds `capacity`.
    fn ids_above(&self, py: Python<'_>, capacity: f64) -> Vec<String> {
        let state = self.state.lock_py_attached(py);
        state
            .items
            .iter()
            .filter(|i| i.traits.tokens as f64 > capacity)
            .map(|i| i.request_id.clone())
            .collect()
    }

    /// Removes and returns buffered messages whose estimate exceeds `capacity` (still leased).
    #[pyo3(signature = (capacity, visibility_timeout=None))]
    fn take_above(
        &self,
        py: Python<'_>,
        capacity: f64,
        visibility_timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        if let Some(timeout) = visibility_timeout {
            visibility_timeout_arg(timeout)?;
        }
        let above: Vec<Buffered> = {
            let mut state = self.state.lock_py_attached(py);
            let (above, keep): (Vec<Buffered>, Vec<Buffered>) =
                state.items.drain(..).partition(|item| item.traits.tokens as f64 > capacity);
            state.items = keep;
            above
        };
        Ok(above.into_iter().map(|item| item.message).collect())
    }

    /// Buffered messages per priority 0..=3.
    fn counts_by_priority(&self, py: Python<'_>) -> [usize; 4] {
        let mut counts = [0; 4];
        for item in &self.state.lock_py_attached(py).items {
            counts[usize::from(item.traits.priority)] += 1;
        }
        counts
    }

    /// Oldest `enqueued_at` in the buffer.
    fn oldest_enqueued_at(&self, py: Python<'_>) -> Option<f64> {
        self.state.lock_py_attached(py).items.iter().map(|item| item.traits.enqueued_at).reduce(f64::min)
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
