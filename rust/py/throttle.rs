//! `LLMThrottle` and its result classes: the binding of `crate::throttle`.
//!
//! About 810 lines of glue for one class and its result classes: argument reading, the
//! provider-header conversions and the metrics objects; the limiter itself is `crate::throttle`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::{MutexExt, PyOnceLock};
use pyo3::types::{PyString, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::args::{
    extract_request_id, float_arg, int_arg, invalid_config, invalid_request, metadata_arg, repr_of,
    token_count, Given,
};
use super::clock::ClockSource;
use super::errors::to_py_err;
pub use super::throttle_results::{
    PyBucketMetrics, PyBucketState, PyCheckResult, PyCompensationMetrics, PyConsumptionRecord,
    PyHistoryStatistics, PyMemoryMetrics, PyRateLimitMetrics, PyStateSnapshot,
};
use crate::errors::CoreError;
use crate::throttle::{
    extra_index, split_parts, Adjustment, AdjustmentFailureStrategy, CheckResult, ConsumptionRecord,
    Dimension, ExtraLimits, ExtraState, Snapshot, Throttle, ThrottleConfig, TokenBucket, MAX_PROVIDER_WAIT,
};

// The seed library's estimate of one consumption record's footprint, kept for metric parity.
const RECORD_SIZE_ESTIMATE: usize = 200;

/// An optional number of the configuration (None: not given); anything but an int or float,
/// an int too large for a float included, is an `InvalidConfigError`. The range is the core's.
fn config_number(value: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Option<f64>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    float_arg(value)?.map(Some).ok_or_else(|| {
        invalid_config(value.py(), format!("{field} must be a finite number, got {}", repr_of(value)))
    })
}

/// A count of the configuration: an int (or an integer-like, not a bool) from 1 to the largest
/// `usize`; anything else, an int too large included, is an `InvalidConfigError` naming the field
/// and the range.
fn config_count(value: &Bound<'_, PyAny>, field: &str) -> PyResult<usize> {
    let count = int_arg(value)?.and_then(|int| int.extract::<usize>().ok());
    count.ok_or_else(|| {
        invalid_config(
            value.py(),
            format!("{field} must be an int from 1 to {}, got {}", usize::MAX, repr_of(value)),
        )
    })
}

/// `max_concurrent`: None, or an int or integer-like (not a bool) the core checks (>= 1);
/// anything else, an int too large included, is an `InvalidConfigError` naming it.
fn concurrency_arg(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    let count = int_arg(value)?.and_then(|int| int.extract::<u64>().ok());
    count.map(Some).ok_or_else(|| {
        invalid_config(
            value.py(),
            format!("max_concurrent must be None or an int >= 1, got {}", repr_of(value)),
        )
    })
}

/// The input and output parts a call gave (`input_tokens`, `output_tokens`, each None or a
/// token count), checked against the total named `total_name` (see `split_parts`).
#[inline]
fn parts_arg(
    py: Python<'_>,
    total: u64,
    total_name: &str,
    input: Option<&Bound<'_, PyAny>>,
    output: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<(u64, u64)>> {
    if input.is_none_or(PyAnyMethods::is_none) && output.is_none_or(PyAnyMethods::is_none) {
        return Ok(None); // the common call: no parts
    }
    given_parts(py, total, total_name, input, output)
}

#[inline(never)]
fn given_parts(
    py: Python<'_>,
    total: u64,
    total_name: &str,
    input: Option<&Bound<'_, PyAny>>,
    output: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<(u64, u64)>> {
    let count = |value: Option<&Bound<'_, PyAny>>, field: &str| -> PyResult<Option<u64>> {
        value.filter(|v| !v.is_none()).map(|v| token_count(v, field)).transpose()
    };
    let input = count(input, "input_tokens")?;
    let output = count(output, "output_tokens")?;
    split_parts(total, input, output, [total_name, "input_tokens", "output_tokens"])
        .map_err(|e| to_py_err(py, e))
}

/// Use of one bucket, as `get_metrics` reports it.
fn bucket_metrics(bucket: &TokenBucket) -> PyBucketMetrics {
    let used = bucket.capacity() - bucket.available();
    PyBucketMetrics {
        used,
        available: bucket.available(),
        limit: bucket.capacity(),
        percentage: used / bucket.capacity() * 100.0,
    }
}

/// The strategy's name; absent: "compensate", which keeps long-run use within the limit when
/// estimates run low. A non-str, or a str that is not a strategy's name, is an
/// `InvalidConfigError`.
fn strategy_arg(value: Given<'_>) -> PyResult<AdjustmentFailureStrategy> {
    let Given::Value(value) = value else { return Ok(AdjustmentFailureStrategy::Compensate) };
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
    match float_arg(&value)? {
        Some(figure) if figure.is_finite() && figure >= 0.0 => Ok(Some(figure)),
        _ => Err(invalid_request(
            value.py(),
            format!("limits.{name} must be None or a finite number >= 0, got {}", repr_of(&value)),
        )),
    }
}

/// A wait in seconds: an int, a float or an integer-like (not a bool) >= 0. An int too large for
/// a float reads as infinite: the core clamps every wait to `MAX_PROVIDER_WAIT`. NaN, a negative
/// number or anything else is an `InvalidRequestError` naming the field.
fn wait_seconds(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    let seconds = match float_arg(value)? {
        Some(seconds) => Some(seconds),
        None => match int_arg(value)? {
            Some(int) => int.gt(0)?.then_some(f64::INFINITY),
            None => None,
        },
    };
    seconds.filter(|s| *s >= 0.0).ok_or_else(|| {
        invalid_request(value.py(), format!("{field} must be a number >= 0, got {}", repr_of(value)))
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

/// The optional limits' part of `get_metrics`, read under the lock.
struct ExtraMetrics {
    /// itpm, otpm, rpd, tpd, concurrency (slots: used = in flight).
    buckets: [Option<PyBucketMetrics>; 5],
    /// The debt of each token limit, tpm included.
    debts: BTreeMap<String, f64>,
}

impl ExtraMetrics {
    fn of<M>(state: &Throttle<M>) -> Self {
        let mut buckets: [Option<PyBucketMetrics>; 5] = Default::default();
        let mut debts = BTreeMap::from([("tpm".to_owned(), state.debt())]);
        if let Some(daily) = state.daily_requests() {
            buckets[2] = Some(bucket_metrics(daily));
        }
        for meter in state.meters() {
            if let Some(index) = extra_index(meter.dimension()) {
                buckets[index] = Some(bucket_metrics(meter.bucket()));
            }
            debts.insert(meter.dimension().name().to_owned(), meter.debt());
        }
        if let Some(slots) = state.slots() {
            let (used, limit) = (slots.in_flight() as f64, slots.limit() as f64);
            buckets[4] = Some(PyBucketMetrics {
                used,
                available: limit - used,
                limit,
                percentage: used / limit * 100.0,
            });
        }
        Self { buckets, debts }
    }
}

/// What a consumption record carries from Python: the caller's metadata, if any.
pub type Metadata = Option<Py<PyAny>>;

/// `LLMThrottle`: the dual token-bucket limiter, thread-safe.
#[pyclass(module = "llm_queue_dispatcher._core", name = "LLMThrottle", frozen)]
pub struct PyThrottle {
    state: Mutex<Throttle<Metadata>>,
    clock: ClockSource,
    logger: Option<Py<PyAny>>,
    /// Whether a wait clamped to `MAX_PROVIDER_WAIT` was logged: once per limiter, so a provider
    /// sending a malformed header on every reply does not flood the log.
    clamp_logged: AtomicBool,
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

    /// Logs, once per limiter, that `asked` seconds of `what` were clamped to one day.
    fn log_clamped(&self, py: Python<'_>, what: &str, asked: Option<f64>) -> PyResult<()> {
        let Some(asked) = asked else { return Ok(()) };
        if self.clamp_logged.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.logger(py)?.call_method1(
            "warning",
            (format!(
                "{what} of {asked:?} s is longer than the maximum wait of {MAX_PROVIDER_WAIT} s (one day) and \
                 was clamped to it; later clamps of this limiter are not logged"
            ),),
        )?;
        Ok(())
    }

    fn try_consume(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
        (input_tokens, output_tokens): (Option<&Bound<'_, PyAny>>, Option<&Bound<'_, PyAny>>),
        explain: bool,
    ) -> PyResult<Result<(), Option<Box<CheckResult>>>> {
        let request_id = extract_request_id(request_id)?;
        let tokens = token_count(estimated_tokens, "estimated_tokens")?;
        let parts = parts_arg(py, tokens, "estimated_tokens", input_tokens, output_tokens)?;
        let metadata = metadata_arg(metadata)?;
        // A refusal, explained when asked (`consume_or_raise`), and its metadata handed back to
        // be released here, unlocked.
        let (outcome, _refused) = self.with_state(py, |state, now| {
            match state.try_consume_parts(now, &request_id, tokens, parts, metadata) {
                Ok(()) => (Ok(()), None),
                Err(refused) => {
                    (Err(explain.then(|| Box::new(state.check_parts(tokens, parts, 0.0)))), refused)
                }
            }
        })?;
        Ok(outcome)
    }

    /// Adjusts the reservation `key` (a dispatcher's delivery of `request_id`) to `actual`
    /// (split into its input and output `parts` when known), logging what a short bucket did as
    /// `adjust_consumption` does; the refusal of a strict limiter or an unknown key is
    /// returned, for the dispatcher to log (the mark stands).
    pub(crate) fn adjust_reservation(
        &self,
        py: Python<'_>,
        key: crate::throttle::ReservationKey,
        actual: u64,
        parts: Option<(u64, u64)>,
        request_id: &str,
    ) -> PyResult<Result<(), CoreError>> {
        match self.with_state(py, |state, _| state.adjust_reservation(key, actual, parts))? {
            Ok(outcomes) => self.log_adjustments(py, outcomes, request_id).map(Ok),
            Err(error) => Ok(Err(error)),
        }
    }

    fn log_adjustments(
        &self,
        py: Python<'_>,
        outcomes: Vec<(Dimension, Adjustment)>,
        request_id: &str,
    ) -> PyResult<()> {
        for (dimension, outcome) in outcomes {
            // The token bucket's messages predate the other limits: kept word for word.
            let bucket =
                if dimension == Dimension::Tpm { "token".to_owned() } else { dimension.name().to_owned() };
            let debt =
                if dimension == Dimension::Tpm { String::new() } else { format!("{} ", dimension.name()) };
            match outcome {
                Adjustment::Applied => {}
                Adjustment::Warned { shortfall } => {
                    self.logger(py)?.call_method1(
                        "warning",
                        (format!(
                            "could not take {shortfall} more tokens for request {request_id:?}: the {bucket} bucket \
                             is empty"
                        ),),
                    )?;
                }
                Adjustment::Compensated { shortfall, total_debt } => {
                    self.logger(py)?.call_method1(
                        "info",
                        (format!(
                            "adding {shortfall} tokens of request {request_id:?} to the {debt}compensation debt \
                             (now {total_debt})"
                        ),),
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[pymethods]
impl PyThrottle {
    #[new]
    #[pyo3(signature = (rpm, tpm, *, burst_rpm=None, burst_tpm=None, itpm=None, otpm=None,
        burst_itpm=None, burst_otpm=None, rpd=None, tpd=None, max_concurrent=None, clock=None,
        adjustment_failure_strategy=Given::Absent, max_history_records=None,
        history_retention=None, efficiency_window_size=None, logger=None))]
    // The real defaults, for introspection; None also means "the default" for the three counts.
    #[pyo3(text_signature = "(rpm, tpm, *, burst_rpm=None, burst_tpm=None, itpm=None, otpm=None, \
        burst_itpm=None, burst_otpm=None, rpd=None, tpd=None, max_concurrent=None, clock=None, \
        adjustment_failure_strategy='compensate', max_history_records=10000, history_retention=60.0, \
        efficiency_window_size=50, logger=None)")]
    // The contract's keyword names: `burst_rpm` and `burst_tpm` are meant to look alike.
    #[allow(clippy::too_many_arguments, clippy::similar_names)]
    fn new(
        py: Python<'_>,
        rpm: &Bound<'_, PyAny>,
        tpm: &Bound<'_, PyAny>,
        burst_rpm: Option<&Bound<'_, PyAny>>,
        burst_tpm: Option<&Bound<'_, PyAny>>,
        itpm: Option<&Bound<'_, PyAny>>,
        otpm: Option<&Bound<'_, PyAny>>,
        burst_itpm: Option<&Bound<'_, PyAny>>,
        burst_otpm: Option<&Bound<'_, PyAny>>,
        rpd: Option<&Bound<'_, PyAny>>,
        tpd: Option<&Bound<'_, PyAny>>,
        max_concurrent: Option<&Bound<'_, PyAny>>,
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
        let limits = ExtraLimits {
            itpm: config_number(itpm, "itpm")?,
            burst_itpm: config_number(burst_itpm, "burst_itpm")?,
            otpm: config_number(otpm, "otpm")?,
            burst_otpm: config_number(burst_otpm, "burst_otpm")?,
            rpd: config_number(rpd, "rpd")?,
            tpd: config_number(tpd, "tpd")?,
            max_concurrent: concurrency_arg(max_concurrent)?,
        };
        let clock = ClockSource::from_arg(clock, ClockSource::Monotonic)?;
        let logger = logger_arg(logger)?;
        let now = clock.now(py)?;
        let state = Throttle::with_limits(config, limits, now).map_err(|e| to_py_err(py, e))?;
        Ok(Self { state: Mutex::new(state), clock, logger, clamp_logged: AtomicBool::new(false) })
    }

    /// Whether a request of `estimated_tokens` (split into `input_tokens` and `output_tokens`
    /// when known) would be admitted now, and if not, when.
    #[pyo3(signature = (estimated_tokens, *, input_tokens=None, output_tokens=None))]
    fn can_process(
        &self,
        py: Python<'_>,
        estimated_tokens: &Bound<'_, PyAny>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyCheckResult> {
        let tokens = token_count(estimated_tokens, "estimated_tokens")?;
        let parts = parts_arg(py, tokens, "estimated_tokens", input_tokens, output_tokens)?;
        self.with_state(py, |state, _| state.check_parts(tokens, parts, 0.0).into())
    }

    /// Takes 1 request and `estimated_tokens` (+ debt) from every limit, all or nothing.
    #[pyo3(signature = (request_id, estimated_tokens, metadata=None, *, input_tokens=None, output_tokens=None))]
    fn consume(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let parts = (input_tokens, output_tokens);
        Ok(self.try_consume(py, request_id, estimated_tokens, metadata, parts, false)?.is_ok())
    }

    /// Like `consume`, but raises `RateLimitError(reason, available_in)` when refused.
    #[pyo3(signature = (request_id, estimated_tokens, metadata=None, *, input_tokens=None, output_tokens=None))]
    fn consume_or_raise(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        estimated_tokens: &Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let parts = (input_tokens, output_tokens);
        match self.try_consume(py, request_id, estimated_tokens, metadata, parts, true)? {
            Ok(()) => Ok(()),
            Err(check) => {
                let (reason, available_in) = check.map_or(("tpm_limit", f64::INFINITY), |c| {
                    (c.reason.unwrap_or("tpm_limit"), c.available_in)
                });
                Err(to_py_err(py, CoreError::RateLimit { reason, available_in }))
            }
        }
    }

    /// Sets the latest consume of `request_id` to `actual_tokens` (split into `input_tokens`
    /// and `output_tokens` when known) on every limit: takes the extra or refunds; frees its
    /// slot of `max_concurrent`.
    #[pyo3(signature = (request_id, actual_tokens, *, input_tokens=None, output_tokens=None))]
    fn adjust_consumption(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        actual_tokens: &Bound<'_, PyAny>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let request_id = extract_request_id(request_id)?;
        let actual = token_count(actual_tokens, "actual_tokens")?;
        let parts = parts_arg(py, actual, "actual_tokens", input_tokens, output_tokens)?;
        let outcomes = self.with_state(py, |state, _| state.adjust_parts(&request_id, actual, parts))?;
        self.log_adjustments(py, outcomes.map_err(|e| to_py_err(py, e))?, &request_id)
    }

    /// Bucket use, efficiency, history statistics, memory and compensation.
    fn get_metrics(&self, py: Python<'_>) -> PyResult<PyRateLimitMetrics> {
        let (requests, tokens, efficiency, stats, records, max_records, debt, extra) =
            self.with_state(py, |state, _| {
                (
                    bucket_metrics(state.requests()),
                    bucket_metrics(state.tokens()),
                    state.efficiency(),
                    state.history_statistics(),
                    state.history_len(),
                    state.config().max_history_records,
                    state.debt(),
                    ExtraMetrics::of(state),
                )
            })?;
        let new = |metrics: Option<PyBucketMetrics>| metrics.map(|m| Py::new(py, m)).transpose();
        let [itpm, otpm, rpd, tpd, concurrency] = extra.buckets;
        Ok(PyRateLimitMetrics {
            rpm: Py::new(py, requests)?,
            tpm: Py::new(py, tokens)?,
            itpm: new(itpm)?,
            otpm: new(otpm)?,
            rpd: new(rpd)?,
            tpd: new(tpd)?,
            concurrency: new(concurrency)?,
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
                PyCompensationMetrics { total_debt: debt, pending_compensation: debt, debts: extra.debts },
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
                    input_tokens: record.parts().map(|(input, _)| input),
                    output_tokens: record.parts().map(|(_, output)| output),
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
        let state = |dimension: Dimension| {
            extra_index(dimension).and_then(|i| snapshot.extra[i]).map(|extra| extra.bucket.into())
        };
        let debts = [Dimension::Itpm, Dimension::Otpm, Dimension::Tpd]
            .into_iter()
            .filter_map(|d| {
                extra_index(d).and_then(|i| snapshot.extra[i]).map(|extra| (d.name().to_owned(), extra.debt))
            })
            .collect();
        Ok(PyStateSnapshot {
            timestamp: snapshot.timestamp,
            rpm_bucket_state: snapshot.rpm.into(),
            tpm_bucket_state: snapshot.tpm.into(),
            history_count: snapshot.history_count,
            compensation_debt: snapshot.compensation_debt,
            itpm_bucket_state: state(Dimension::Itpm),
            otpm_bucket_state: state(Dimension::Otpm),
            rpd_bucket_state: state(Dimension::Rpd),
            tpd_bucket_state: state(Dimension::Tpd),
            compensation_debts: debts,
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
        let mut extra = [None; 4];
        for (dimension, state) in [
            (Dimension::Itpm, &snapshot.itpm_bucket_state),
            (Dimension::Otpm, &snapshot.otpm_bucket_state),
            (Dimension::Rpd, &snapshot.rpd_bucket_state),
            (Dimension::Tpd, &snapshot.tpd_bucket_state),
        ] {
            if let (Some(index), Some(state)) = (extra_index(dimension), state) {
                let debt = snapshot.compensation_debts.get(dimension.name()).copied().unwrap_or(0.0);
                extra[index] = Some(ExtraState { bucket: state.into(), debt });
            }
        }
        let core = Snapshot {
            timestamp: snapshot.timestamp,
            rpm: (&snapshot.rpm_bucket_state).into(),
            tpm: (&snapshot.tpm_bucket_state).into(),
            history_count: snapshot.history_count,
            compensation_debt: snapshot.compensation_debt,
            extra,
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

    /// Ends the time in flight of the latest reservation of `request_id`: frees its slot of
    /// `max_concurrent`, its tokens stay as counted (a call that ended without a count to adjust
    /// to). `UnknownRequestError` when there is none.
    fn settle(&self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let request_id = extract_request_id(request_id)?;
        self.with_state(py, |state, _| state.settle(&request_id))?.map_err(|e| to_py_err(py, e))
    }

    /// Grants nothing for `seconds` from now (a provider's 429 with `Retry-After`), at most
    /// `MAX_PROVIDER_WAIT` (one day): a longer wait is clamped and logged once.
    fn penalize(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let seconds = wait_seconds(seconds, "seconds")?;
        let clamped =
            self.with_state(py, |state, _| state.penalize(seconds))?.map_err(|e| to_py_err(py, e))?;
        self.log_clamped(py, "penalize(seconds)", clamped)
    }

    /// Lowers what the limiter believes it holds to what the provider says remains (from there
    /// each bucket refills at its own rate, never above its capacity: the provider's reset holds
    /// nothing down), and applies its `Retry-After` as a penalty. See
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
        let figures: Vec<(Dimension, (f64, Option<f64>))> = [
            (Dimension::Rpm, figure("requests_remaining", "requests_reset")?),
            (Dimension::Tpm, figure("tokens_remaining", "tokens_reset")?),
            (Dimension::Itpm, figure("input_tokens_remaining", "input_tokens_reset")?),
            (Dimension::Otpm, figure("output_tokens_remaining", "output_tokens_reset")?),
        ]
        .into_iter()
        .filter_map(|(dimension, figure)| figure.map(|f| (dimension, f)))
        .collect();
        let retry_after = provider_figure(limits, "retry_after")?;
        let (reset, retry) = self
            .with_state(py, |state, _| {
                // `retry_after` is finite and >= 0 (read above): once the figures pass `cap`'s
                // checks, the penalty cannot fail, so a bad figure changes nothing.
                let reset = state.cap_limits(&figures)?;
                let retry = retry_after.map_or(Ok(None), |seconds| state.penalize(seconds))?;
                Ok::<_, CoreError>((reset, retry))
            })?
            .map_err(|e| to_py_err(py, e))?;
        self.log_clamped(py, "a provider's reset", reset)?;
        self.log_clamped(py, "a provider's Retry-After", retry)
    }

    /// The largest estimate that can ever fit without its input and output parts: the
    /// capacity of the token bucket (`burst_tpm or tpm`), or of a smaller token limit (itpm,
    /// otpm, tpd), since each counts the whole estimate then.
    #[getter]
    fn token_capacity(&self, py: Python<'_>) -> f64 {
        self.state.lock_py_attached(py).token_capacity()
    }

    /// The clock given at construction (None for the system monotonic clock).
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.clock.as_object(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = self.state.lock_py_attached(py);
        let config = state.config();
        let limits = state.limits();
        // The optional limits appear only when set: an rpm/tpm throttle reads as it always did.
        let mut extra = String::new();
        for (name, value) in [
            ("itpm", limits.itpm),
            ("otpm", limits.otpm),
            ("burst_itpm", state.meter(Dimension::Itpm).map(|m| m.bucket().capacity())),
            ("burst_otpm", state.meter(Dimension::Otpm).map(|m| m.bucket().capacity())),
            ("rpd", limits.rpd),
            ("tpd", limits.tpd),
        ] {
            if let Some(value) = value {
                let _ = write!(extra, ", {name}={value}");
            }
        }
        if let Some(slots) = state.slots() {
            let _ = write!(extra, ", max_concurrent={}, in_flight={}", slots.limit(), slots.in_flight());
        }
        format!(
            "LLMThrottle(rpm={}, tpm={}, burst_rpm={}, burst_tpm={}{extra}, adjustment_failure_strategy='{}', \
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
