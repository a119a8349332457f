//! Glue of the `fair_priority` policy for the in-memory store: configuring its lanes, one
//! dispatch step (decide with `policy::decide_fair`, reserve, receive, charge the tenant), the
//! same split in two for rate limiters other than `LLMThrottle`, and the facts a `reason` is
//! built from.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::dispatch::{undo_take, Outcome};
use super::messages::{build_view_message, MessageView};
use super::store::{PyStore, PyStoreCore};
use super::throttle::PyThrottle;
use crate::errors::{CoreError, CoreResult};
use crate::fair::{FairCandidate, FairConfig, FairLanes, FairRank, FairRuntime};
use crate::policy::{decide_fair, decide_fair_lanes, Decision, Snapshot};
use crate::py::errors::to_py_err;

/// What Python learns of a fair dispatch, to explain it and to correct the tenant's charge at
/// the mark: `(urgent, tenant, tenant's use, rank, tenants waiting, effective priority,
/// tenant id, charge id)`.
pub type FairInfo = (bool, String, f64, usize, usize, u8, u32, u64);

/// The policy's settings as Python passes them (validated there by `FairPriorityConfig`).
pub(crate) struct FairSettings {
    pub weights: Vec<(String, f64)>,
    pub fairness_window: f64,
    pub urgent_first: bool,
    pub max_wait: [f64; 4],
    pub reserve_tokens: Option<f64>,
}

impl FairSettings {
    pub(crate) fn read(
        tenant_weights: &Bound<'_, PyDict>,
        fairness_window: f64,
        urgent_first: bool,
        max_wait: [f64; 4],
        reserve_tokens: Option<f64>,
    ) -> PyResult<Self> {
        let py = tenant_weights.py();
        let weights = tenant_weights.extract::<HashMap<String, f64>>()?.into_iter().collect::<Vec<_>>();
        let bad = |what: String| to_py_err(py, CoreError::InvalidConfig(what));
        if weights.iter().any(|(_, w)| !(w.is_finite() && *w > 0.0)) {
            return Err(bad("tenant weights must be finite numbers > 0".into()));
        }
        if !(fairness_window.is_finite() && fairness_window > 0.0) {
            return Err(bad(format!(
                "fairness_window must be a finite number of seconds > 0, got {fairness_window}"
            )));
        }
        if max_wait.iter().any(|w| w.is_nan() || *w < 0.0) {
            return Err(bad(format!("max_wait must be seconds >= 0, got {max_wait:?}")));
        }
        if reserve_tokens.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
            return Err(bad(format!("reserve_tokens must be None or a count >= 0, got {reserve_tokens:?}")));
        }
        Ok(Self { weights, fairness_window, urgent_first, max_wait, reserve_tokens })
    }

    /// The core configuration, with tenant names interned by `intern`.
    pub(crate) fn config(&self, mut intern: impl FnMut(&str) -> u32) -> FairConfig {
        FairConfig {
            weights: self.weights.iter().map(|(name, w)| (intern(name), *w)).collect(),
            fairness_window: self.fairness_window,
            urgent_first: self.urgent_first,
            max_wait: self.max_wait,
        }
    }
}

/// The facts of a fair choice for Python.
pub(crate) fn info(candidate: &FairCandidate, tenant_name: &str, charge: u64) -> FairInfo {
    match candidate.rank {
        FairRank::Urgent => (true, tenant_name.to_owned(), 0.0, 0, 0, 0, candidate.tenant, charge),
        FairRank::Tenant { rank, of, usage, effective_priority } => {
            (false, tenant_name.to_owned(), usage, rank, of, effective_priority, candidate.tenant, charge)
        }
    }
}

/// The dispatched message and the facts of its choice.
pub type FairDispatched = (Py<PyAny>, FairInfo);

/// A fair choice not yet taken (the path for rate limiters other than `LLMThrottle`).
#[pyclass(module = "llm_queue_dispatcher._core", name = "FairSelection", frozen)]
pub struct PyFairSelection {
    pub(crate) slot: u32,
    pub(crate) seq: u64,
    pub(crate) candidate: FairCandidate,
    /// The winner's request id.
    #[pyo3(get)]
    pub request_id: String,
    /// Its estimated tokens.
    #[pyo3(get)]
    pub tokens: u64,
    /// Tokens it must leave in the bucket (the reserve of a backlogged tenant).
    #[pyo3(get)]
    pub margin: f64,
    /// Whether the reported budget admits it now (with `hold`, False means: wait for it).
    #[pyo3(get)]
    pub fits: bool,
}

#[pymethods]
impl PyFairSelection {
    fn __repr__(&self) -> String {
        format!(
            "FairSelection(request_id={:?}, tokens={}, margin={}, fits={})",
            self.request_id,
            self.tokens,
            self.margin,
            if self.fits { "True" } else { "False" }
        )
    }
}

impl PyStoreCore {
    /// Keeps fair lanes beside the store's index from now on (replacing any earlier ones).
    pub(crate) fn configure_fair_lanes(&self, py: Python<'_>, settings: &FairSettings) {
        let mut state = pyo3::sync::MutexExt::lock_py_attached(&self.state, py);
        let config = settings.config(|name| state.store.intern_tenant(name));
        state.fair = Some(FairRuntime::new(&config, settings.reserve_tokens));
        state.store.ranking_mut().1 = Some(FairLanes::new(config));
        state.store.rebuild_ranking();
    }

    /// One fair dispatch step against `throttle`, atomic as the score policy's fused step.
    pub(crate) fn dispatch_fair_step(
        &self,
        py: Python<'_>,
        throttle: &PyThrottle,
        visibility_timeout: f64,
        reserve: bool,
        hold: bool,
    ) -> PyResult<Outcome<FairDispatched>> {
        let limiter_now = throttle.now(py)?;
        let store_now = self.now(py)?;
        let (decided, aftermath) = throttle.with_state_at(py, limiter_now, |limiter, limiter_now| {
            self.locked_with_fair(py, store_now, |store, runtime, now| {
                let candidate = match decide_fair(store, runtime, limiter, now, hold) {
                    Decision::Take(candidate) => candidate,
                    Decision::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
                    Decision::Nothing => return Ok(Outcome::Nothing),
                };
                let message = store.message(candidate.slot);
                let (request_id, tokens) = (message.request_id.clone(), message.tokens);
                if reserve && !limiter.consume(limiter_now, &request_id, tokens, None) {
                    return Ok(Outcome::Nothing);
                }
                let handle = match store.receive_slot(candidate.slot, visibility_timeout, now) {
                    Ok(handle) => handle,
                    Err(error) => {
                        if reserve {
                            let _ = limiter.release(&request_id);
                        }
                        return Err(error);
                    }
                };
                let charge = runtime.charge(candidate.tenant, now, tokens);
                let view = MessageView::of(py, store.message(candidate.slot), Some(handle));
                let facts = info(&candidate, store.tenant_name(candidate.tenant), charge);
                Ok(Outcome::Taken((view, facts, request_id)))
            })
        });
        aftermath.finish(py, self);
        let (view, facts, request_id) = match decided.map_err(|e| to_py_err(py, e))? {
            Outcome::Taken(taken) => taken,
            Outcome::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
            Outcome::Nothing => return Ok(Outcome::Nothing),
        };
        match build_view_message(py, &view) {
            Ok(message) => Ok(Outcome::Taken((message, facts))),
            Err(error) => {
                self.correct_fair_charge(py, facts.6, facts.7, 0.0);
                let reserved = reserve.then_some(&*request_id);
                undo_take(py, (self, store_now), (throttle, limiter_now), &view, reserved);
                Err(error)
            }
        }
    }

    /// `locked` with the fair runtime too; an error when no fair lanes are configured.
    pub(crate) fn locked_with_fair<R>(
        &self,
        py: Python<'_>,
        now: f64,
        f: impl FnOnce(&mut PyStore, &mut FairRuntime, f64) -> CoreResult<R>,
    ) -> (CoreResult<R>, super::store::Aftermath) {
        self.locked_state(py, now, |state, now| {
            let Some(runtime) = state.fair.as_mut() else {
                return Err(CoreError::InvalidConfig(
                    "this store has no fair_priority lanes configured".into(),
                ));
            };
            f(&mut state.store, runtime, now)
        })
    }

    /// The fair choice under a reported budget (any rate limiter), not yet taken.
    pub(crate) fn select_fair_step(
        &self,
        py: Python<'_>,
        snapshot: Snapshot,
        hold: bool,
    ) -> PyResult<Option<PyFairSelection>> {
        let now = self.now(py)?;
        let (chosen, aftermath) = self.locked_with_fair(py, now, |store, runtime, now| {
            let Some(lanes) = store.ranking_mut().1.as_mut() else { return Ok(None) };
            lanes.age(now);
            let Some(lanes) = store.ranking().1.as_ref() else { return Ok(None) };
            let decision =
                decide_fair_lanes(lanes, |slot| store.message(slot).tokens, runtime, &snapshot, now, hold);
            Ok(decision.map(|d| {
                let message = store.message(d.candidate.slot);
                PyFairSelection {
                    slot: d.candidate.slot,
                    seq: message.message_id,
                    candidate: d.candidate,
                    request_id: message.request_id.to_string(),
                    tokens: message.tokens,
                    margin: d.margin,
                    fits: d.fits,
                }
            }))
        });
        aftermath.finish(py, self);
        chosen.map_err(|e| to_py_err(py, e))
    }

    /// Receives a fair selection if it is still visible, and charges its tenant.
    pub(crate) fn take_fair_step(
        &self,
        py: Python<'_>,
        selection: &PyFairSelection,
        visibility_timeout: f64,
    ) -> PyResult<Option<FairDispatched>> {
        let now = self.now(py)?;
        let (taken, aftermath) = self.locked_with_fair(py, now, |store, runtime, now| {
            let there = store.get(selection.slot).is_some_and(|m| m.message_id == selection.seq)
                && store.is_visible(selection.slot) == Some(true);
            if !there {
                return Ok(None);
            }
            let handle = store.receive_slot(selection.slot, visibility_timeout, now)?;
            let charge = runtime.charge(selection.candidate.tenant, now, selection.tokens);
            let facts = info(&selection.candidate, store.tenant_name(selection.candidate.tenant), charge);
            Ok(Some((MessageView::of(py, store.message(selection.slot), Some(handle)), facts)))
        });
        aftermath.finish(py, self);
        let Some((view, facts)) = taken.map_err(|e| to_py_err(py, e))? else { return Ok(None) };
        match build_view_message(py, &view) {
            Ok(message) => Ok(Some((message, facts))),
            Err(error) => {
                self.correct_fair_charge(py, facts.6, facts.7, 0.0);
                let handle = view.handle.map(|h| h.to_string()).unwrap_or_default();
                let (undone, aftermath) = self.locked(py, now, |s, now| s.release(&handle, now));
                aftermath.finish(py, self);
                drop(undone);
                Err(error)
            }
        }
    }

    /// Corrects a fair charge (to the actual count, or 0 to take it back).
    pub(crate) fn correct_fair_charge(&self, py: Python<'_>, tenant: u32, charge: u64, tokens: f64) {
        let mut state = pyo3::sync::MutexExt::lock_py_attached(&self.state, py);
        if let Some(runtime) = state.fair.as_mut() {
            runtime.ledger.correct(tenant, charge, tokens);
        }
    }

    /// Each tenant's token use over the fairness window, by name.
    pub(crate) fn fair_usages(&self, py: Python<'_>) -> PyResult<Vec<(String, f64)>> {
        let now = self.now(py)?;
        let mut state = pyo3::sync::MutexExt::lock_py_attached(&self.state, py);
        let state = &mut *state;
        let Some(runtime) = state.fair.as_mut() else { return Ok(Vec::new()) };
        Ok(runtime
            .ledger
            .usages(now)
            .into_iter()
            .map(|(t, u)| (state.store.tenant_name(t).to_owned(), u))
            .collect())
    }
}
