//! `LLMThrottle` and its result classes: the binding of `crate::throttle`.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::{MutexExt, PyOnceLock};
use pyo3::types::{PyInt, PyString, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::args::{
    extract_request_id, float_arg, invalid_config, invalid_request, repr_of, token_count, Given,
};
use super::clock::ClockSource;
use super::errors::to_py_err;
pub use super::throttle_results::{
    PyBucketMetrics, PyBucketState, PyCheckResult, PyCompensationMetrics, PyConsumptionRecord,
    PyHistoryStatistics, PyMemoryMetrics, PyRateLimitMetrics, PyStateSnapshot,
};
use crate::errors::CoreError;
use crate::throttle::{
    Adjustment, AdjustmentFailureStrategy, CheckResult, ConsumptionRecord, Snapshot, Throttle, ThrottleConfig,
};

// The seed library's estimate of one consumption record's footprint, kept for metric parity.
const RECORD_SIZE_ESTIMATE: usize = 200;

/// An optional number of the configuration (None: not given); anything but an int or float,
/// an int too large for a float included, is an `InvalidConfigError`. The range is the core's.
fn config_number(value: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Option<f64>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    float_arg(value).map(Some).ok_or_else(|| {
        invalid_config(value.py(), format!("{field} must be a finite number, got {}", repr_of(value)))
    })
}

fn config_count(value: &Bound<'_, PyAny>, field: &str) -> PyResult<usize> {
    let count = (!value.is_instance_of::<pyo3::types::PyBool>() && value.is_instance_of::<PyInt>())
        .then(|| value.extract::<usize>().ok())
        .flatten();
    count.ok_or_else(|| {
        invalid_config(value.py(), format!("{field} must be an int >= 1, got {}", repr_of(value)))
    })
}

/// The strategy's name; absent: "warn". A non-str, or a str that is not a strategy's name, is an
/// `InvalidConfigError`.
fn strategy_arg(value: Given<'_>) -> PyResult<AdjustmentFailureStrategy> {
    let Given::Value(value) = value else { return Ok(AdjustmentFailureStrategy::Warn) };
    let py = value.py();
    let name = value.cast::<PyString>().ok().and_then(|name| name.to_str().ok().map(str::to_owned));
    match name {
        Some(name) => AdjustmentFailureStrategy::parse(&name).map_err(|e| to_py_err(py, e)),
        None => Err(invalid_config(
            py,
            format!(
                "adjustment_failure_strategy must be 'strict', 'warn' or 'compensate', got {}",
                repr_of(&value)
            ),
        )),
    }
}

/// The `logger=` argument: None (the package's logger) or a `logging.Logger`, the rule of every
/// `logger` option of the package (`LLMQueueDispatcherConfig`, `Worker`).
fn logger_arg(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Py<PyAny>>> {
    static LOGGER_CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    let py = value.py();
    if value.is_instance(LOGGER_CLASS.import(py, "logging", "Logger")?)? {
        Ok(Some(value.clone().unbind()))
    } else {
        Err(invalid_config(py, format!("logger must be a logging.Logger or None, got {}", repr_of(value))))
    }
}

/// A figure of a `ProviderLimits`: None, or a finite number >= 0; else `InvalidRequestError`.
fn provider_figure(limits: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<f64>> {
    let value = limits.getattr(name)?;
    if value.is_none() {
        return Ok(None);
    }
    match float_arg(&value) {
        Some(figure) if figure.is_finite() && figure >= 0.0 => Ok(Some(figure)),
        _ => Err(invalid_request(
            value.py(),
            format!("limits.{name} must be None or a finite number >= 0, got {}", repr_of(&value)),
        )),
    }
}

fn seconds_value(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    float_arg(value).filter(|s| s.is_finite() && *s >= 0.0).ok_or_else(|| {
        invalid_request(value.py(), format!("{field} must be a finite number >= 0, got {}", repr_of(value)))
    })
}

fn default_logger(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    LOGGER
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("logging")?.call_method1("getLogger", ("llm_queue_dispatcher",))?.unbind(),
            )
        })
        .map(|logger| logger.bind(py).clone())
}

/// What a consumption record carries from Python: the caller's metadata, if any.
pub type Metadata = Option<Py<PyAny>>;

/// `LLMThrottle`: the dual token-bucket limiter, thread-safe.
#[pyclass(module = "llm_queue_dispatcher._core", name = "LLMThrottle", frozen)]
pub struct PyThrottle {
    state: Mutex<Throttle<Metadata>>,
    clock: ClockSource,
    logger: Option<Py<PyAny>>,
}

impl PyThrottle {
    /// The clock's current reading. Read before locking: a Python clock is Python code.
    pub fn now(&self, py: Python<'_>) -> PyResult<f64> {
        self.clock.now(py)
    }

    /// Runs `f` on the state advanced to the clock's current reading, under the lock.
    pub fn with_state<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Throttle<Metadata>, f64) -> R,
    ) -> PyResult<R> {
        let now = self.now(py)?;
        Ok(self.with_state_at(py, now, f))
    }

    /// Runs `f` on the state advanced to `now`, under the lock. No Python code may run in `f`:
    /// the lock is taken detached from the interpreter while it waits, and the metadata of
    /// records dropped meanwhile is released after unlocking (finalizers may run).
    pub fn with_state_at<R>(
        &self,
        py: Python<'_>,
        now: f64,
        f: impl FnOnce(&mut Throttle<Metadata>, f64) -> R,
    ) -> R {
        let (result, evicted) = {
            let mut state = self.state.lock_py_attached(py);
            state.advance(now);
            let now = state.now();
            let result = f(&mut state, now);
            (result, state.take_evicted())
        };
        drop(evicted);
        result
    }

    fn logger<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.logger {
            Some(logger) => Ok(logger.bind(py).clone()),
            None => default_logger(py),
        }
    }

    fn try_consume(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Result<(), CheckResult>> {
        let request_id = extract_request_id(request_id)?;
        let tokens = token_count(estimated_tokens, "estimated_tokens")?;
        let metadata = metadata.filter(|m| !m.is_none()).map(Bound::unbind);
        let outcome = self.with_state(py, |state, now| {
            state
                .try_consume(now, &request_id, tokens, metadata)
                .map_err(|refused| (state.check(tokens), refused))
        })?;
        // A refused request's metadata is released here, unlocked.
        Ok(outcome.map_err(|(check, _refused)| check))
    }

    /// Adjusts the reservation `key` (a dispatcher's delivery of `request_id`) to `actual`,
    /// logging what a short bucket did as `adjust_consumption` does; the refusal of a strict
    /// limiter or an unknown key is returned, for the dispatcher to log (the mark stands).
    pub(crate) fn adjust_reservation(
        &self,
        py: Python<'_>,
        key: crate::throttle::ReservationKey,
        actual: u64,
        request_id: &str,
    ) -> PyResult<Result<(), CoreError>> {
        match self.with_state(py, |state, _| state.adjust_reservation(key, actual))? {
            Ok(adjustment) => self.log_adjustment(py, adjustment, request_id).map(Ok),
            Err(error) => Ok(Err(error)),
        }
    }

    fn log_adjustment(&self, py: Python<'_>, adjustment: Adjustment, request_id: &str) -> PyResult<()> {
        match adjustment {
            Adjustment::Applied => {}
            Adjustment::Warned { shortfall } => {
                self.logger(py)?.call_method1(
                    "warning",
                    (format!(
                        "could not take {shortfall} more tokens for request {request_id:?}: the token bucket is empty"
                    ),),
                )?;
            }
            Adjustment::Compensated { shortfall, total_debt } => {
                self.logger(py)?.call_method1(
                    "info",
                    (format!(
                        "adding {shortfall} tokens of request {request_id:?} to the compensation debt \
                         (now {total_debt})"
                    ),),
                )?;
            }
        }
        Ok(())
    }
}

#[pymethods]
impl PyThrottle {
    #[new]
    #[pyo3(signature = (rpm, tpm, *, burst_rpm=None, burst_tpm=None, clock=None,
        adjustment_failure_strategy=Given::Absent, max_history_records=None,
        history_retention=None, efficiency_window_size=None, logger=None))]
    // The real defaults, for introspection; None also means "the default" for the three counts.
    #[pyo3(text_signature = "(rpm, tpm, *, burst_rpm=None, burst_tpm=None, clock=None, \
        adjustment_failure_strategy='warn', max_history_records=10000, history_retention=60.0, \
        efficiency_window_size=50, logger=None)")]
    // The contract's keyword names: `burst_rpm` and `burst_tpm` are meant to look alike.
    #[allow(clippy::too_many_arguments, clippy::similar_names)]
    fn new(
        py: Python<'_>,
        rpm: &Bound<'_, PyAny>,
        tpm: &Bound<'_, PyAny>,
        burst_rpm: Option<&Bound<'_, PyAny>>,
        burst_tpm: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        adjustment_failure_strategy: Given<'_>,
        max_history_records: Option<&Bound<'_, PyAny>>,
        history_retention: Option<&Bound<'_, PyAny>>,
        efficiency_window_size: Option<&Bound<'_, PyAny>>,
        logger: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let required = |value: &Bound<'_, PyAny>, field: &str| -> PyResult<f64> {
            config_number(Some(value), field)?
                .ok_or_else(|| invalid_config(py, format!("{field} must be a number > 0, got None")))
        };
        let count = |value: Option<&Bound<'_, PyAny>>, field: &str, default: usize| -> PyResult<usize> {
            match value.filter(|v| !v.is_none()) {
                Some(value) => config_count(value, field),
                None => Ok(default),
            }
        };
        let config = ThrottleConfig {
            rpm: required(rpm, "rpm")?,
            tpm: required(tpm, "tpm")?,
            burst_rpm: config_number(burst_rpm, "burst_rpm")?,
            burst_tpm: config_number(burst_tpm, "burst_tpm")?,
            adjustment_failure_strategy: strategy_arg(adjustment_failure_strategy)?,
            max_history_records: count(max_history_records, "max_history_records", 10_000)?,
            history_retention: config_number(history_retention, "history_retention")?.unwrap_or(60.0),
            efficiency_window_size: count(efficiency_window_size, "efficiency_window_size", 50)?,
        };
        let clock = ClockSource::from_arg(clock, ClockSource::Monotonic)?;
        let logger = logger_arg(logger)?;
        let now = clock.now(py)?;
        let state = Throttle::new(config, now).map_err(|e| to_py_err(py, e))?;
        Ok(Self { state: Mutex::new(state), clock, logger })
    }

    /// Whether a request of `estimated_tokens` would be admitted now, and if not, when.
    fn can_process(&self, py: Python<'_>, estimated_tokens: &Bound<'_, PyAny>) -> PyResult<PyCheckResult> {
        let tokens = token_count(estimated_tokens, "estimated_tokens")?;
        self.with_state(py, |state, _| state.check(tokens).into())
    }

    /// Takes 1 request and `estimated_tokens` (+ debt), all or nothing.
    #[pyo3(signature = (request_id, estimated_tokens, metadata=None))]
    fn consume(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Ok(self.try_consume(py, request_id, estimated_tokens, metadata)?.is_ok())
    }

    /// Like `consume`, but raises `RateLimitError(reason, available_in)` when refused.
    #[pyo3(signature = (request_id, estimated_tokens, metadata=None))]
    fn consume_or_raise(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        match self.try_consume(py, request_id, estimated_tokens, metadata)? {
            Ok(()) => Ok(()),
            Err(check) => Err(to_py_err(
                py,
                CoreError::RateLimit {
                    reason: check.reason.unwrap_or("tpm_limit"),
                    available_in: check.available_in,
                },
            )),
        }
    }

    /// Sets the latest consume of `request_id` to `actual_tokens`: takes the extra or refunds.
    fn adjust_consumption(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        actual_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let request_id = extract_request_id(request_id)?;
        let actual = token_count(actual_tokens, "actual_tokens")?;
        let outcome = self.with_state(py, |state, _| state.adjust(&request_id, actual))?;
        let adjustment = outcome.map_err(|e| to_py_err(py, e))?;
        self.log_adjustment(py, adjustment, &request_id)
    }

    /// Bucket use, efficiency, history statistics, memory and compensation.
    fn get_metrics(&self, py: Python<'_>) -> PyResult<PyRateLimitMetrics> {
        let (requests, tokens, efficiency, stats, records, max_records, debt) =
            self.with_state(py, |state, _| {
                (
                    state.requests().clone(),
                    state.tokens().clone(),
                    state.efficiency(),
                    state.history_statistics(),
                    state.history_len(),
                    state.config().max_history_records,
                    state.debt(),
                )
            })?;
        let bucket = |b: &crate::throttle::TokenBucket| {
            let used = b.capacity() - b.available();
            PyBucketMetrics {
                used,
                available: b.available(),
                limit: b.capacity(),
                percentage: used / b.capacity() * 100.0,
            }
        };
        Ok(PyRateLimitMetrics {
            rpm: Py::new(py, bucket(&requests))?,
            tpm: Py::new(py, bucket(&tokens))?,
            efficiency,
            consumption_history: Py::new(
                py,
                PyHistoryStatistics {
                    count: stats.count,
                    average_tokens_per_request: stats.average_tokens_per_request,
                    total_tokens: stats.total_tokens,
                    estimation_accuracy: stats.estimation_accuracy,
                },
            )?,
            memory: Py::new(
                py,
                PyMemoryMetrics {
                    history_records: records,
                    estimated_memory_usage: records * RECORD_SIZE_ESTIMATE,
                    max_history_records: max_records,
                },
            )?,
            compensation: Py::new(
                py,
                PyCompensationMetrics { total_debt: debt, pending_compensation: debt },
            )?,
        })
    }

    /// The consumption records kept, oldest first.
    fn get_consumption_history(&self, py: Python<'_>) -> PyResult<Vec<PyConsumptionRecord>> {
        self.with_state(py, |state, _| {
            state
                .history()
                .map(|record: &ConsumptionRecord<Metadata>| PyConsumptionRecord {
                    timestamp: record.timestamp,
                    tokens: record.tokens,
                    request_id: record.request_id.clone(),
                    metadata: record.metadata.as_ref().map(|m| m.clone_ref(py)),
                    estimated_tokens: record.estimated_tokens,
                    actual_tokens: record.actual_tokens,
                    compensation_debt: record.compensation_debt,
                })
                .collect()
        })
    }

    /// Full buckets, no history, no debt.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.with_state(py, Throttle::reset)
    }

    /// Whether the internal state is consistent.
    fn validate_state(&self, py: Python<'_>) -> PyResult<bool> {
        self.with_state(py, |state, now| state.validate_state(now))
    }

    /// The buckets and the debt now.
    fn create_snapshot(&self, py: Python<'_>) -> PyResult<PyStateSnapshot> {
        let snapshot = self.with_state(py, |state, now| state.snapshot(now))?;
        Ok(PyStateSnapshot {
            timestamp: snapshot.timestamp,
            rpm_bucket_state: snapshot.rpm.into(),
            tpm_bucket_state: snapshot.tpm.into(),
            history_count: snapshot.history_count,
            compensation_debt: snapshot.compensation_debt,
        })
    }

    /// Restores the buckets and the debt of `snapshot` (the history is cleared).
    fn restore_from_snapshot(&self, py: Python<'_>, snapshot: &Bound<'_, PyAny>) -> PyResult<()> {
        let Ok(snapshot) = snapshot.cast::<PyStateSnapshot>() else {
            return Err(invalid_request(
                py,
                format!("snapshot must be a StateSnapshot, got {}", repr_of(snapshot)),
            ));
        };
        let snapshot = snapshot.get();
        let core = Snapshot {
            timestamp: snapshot.timestamp,
            rpm: (&snapshot.rpm_bucket_state).into(),
            tpm: (&snapshot.tpm_bucket_state).into(),
            history_count: snapshot.history_count,
            compensation_debt: snapshot.compensation_debt,
        };
        self.with_state(py, |state, _| state.restore(&core))?.map_err(|e| to_py_err(py, e))
    }

    /// Gives the latest reservation of `request_id` back whole: its tokens and its request
    /// return to the buckets, the debt it paid is owed again, and it no longer counts in the
    /// history. For a reservation that was never used; `UnknownRequestError` when there is none.
    fn release(&self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let request_id = extract_request_id(request_id)?;
        self.with_state(py, |state, _| state.release(&request_id))?.map_err(|e| to_py_err(py, e))
    }

    /// Grants nothing for `seconds` from now (a provider's 429 with `Retry-After`).
    fn penalize(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let seconds = seconds_value(seconds, "seconds")?;
        self.with_state(py, |state, _| state.penalize(seconds))?.map_err(|e| to_py_err(py, e))
    }

    /// Lowers what the limiter believes it holds to what the provider says remains, until the
    /// provider's reset, and applies its `Retry-After` as a penalty. See
    /// `llm_queue_dispatcher.provider_limits` for the headers understood. Returns what was read.
    fn sync_from_headers<'py>(
        &self,
        py: Python<'py>,
        headers: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        static PARSE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let parse = PARSE.import(py, "llm_queue_dispatcher.provider_limits", "parse_rate_limit_headers")?;
        let limits = parse.call1((headers,))?;
        self.apply_provider_limits(py, &limits)?;
        Ok(limits)
    }

    /// `sync_from_headers` for figures already read (a `ProviderLimits`).
    fn apply_provider_limits(&self, py: Python<'_>, limits: &Bound<'_, PyAny>) -> PyResult<()> {
        static PROVIDER_LIMITS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        let class = PROVIDER_LIMITS.import(py, "llm_queue_dispatcher.provider_limits", "ProviderLimits")?;
        if !limits.is_instance(class)? {
            return Err(invalid_request(
                py,
                format!("limits must be a ProviderLimits, got {}", repr_of(limits)),
            ));
        }
        // Every figure is read and checked before the lock: a bad one changes nothing.
        let figure = |remaining: &str, reset: &str| -> PyResult<Option<(f64, Option<f64>)>> {
            let remaining = provider_figure(limits, remaining)?;
            let reset = provider_figure(limits, reset)?;
            Ok(remaining.map(|r| (r, reset)))
        };
        let requests = figure("requests_remaining", "requests_reset")?;
        let tokens = figure("tokens_remaining", "tokens_reset")?;
        let retry_after = provider_figure(limits, "retry_after")?;
        self.with_state(py, |state, _| {
            state.cap(requests, tokens)?;
            retry_after.map_or(Ok(()), |seconds| state.penalize(seconds))
        })?
        .map_err(|e| to_py_err(py, e))
    }

    /// Capacity of the token bucket (`burst_tpm or tpm`): no estimate above it ever fits.
    #[getter]
    fn token_capacity(&self, py: Python<'_>) -> f64 {
        self.state.lock_py_attached(py).tokens().capacity()
    }

    /// The clock given at construction (None for the system monotonic clock).
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.clock.as_object(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = self.state.lock_py_attached(py);
        let config = state.config();
        format!(
            "LLMThrottle(rpm={}, tpm={}, burst_rpm={}, burst_tpm={}, adjustment_failure_strategy='{}', \
             available_requests={:.3}, available_tokens={:.3})",
            config.rpm,
            config.tpm,
            state.requests().capacity(),
            state.tokens().capacity(),
            config.adjustment_failure_strategy.name(),
            state.requests().available(),
            state.tokens().available()
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.clock.traverse(&visit)?;
        if let Some(logger) = &self.logger {
            visit.call(logger)?;
        }
        // A collector pass never runs while another thread holds the lock with the GIL released
        // in the middle of a call, but `try_lock` keeps it safe if it ever did.
        if let Some(state) = self.state.try_lock() {
            for record in state.history() {
                if let Some(metadata) = &record.metadata {
                    visit.call(metadata)?;
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // Metadata is the only Python state that can form a cycle through this object and be
        // dropped without changing what the throttle means: forget the history.
        let evicted = self.state.try_lock().map(|mut state| {
            state.clear_history();
            state.take_evicted()
        });
        drop(evicted);
    }
}
