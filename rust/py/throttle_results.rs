//! The result classes of `LLMThrottle`: checks, metrics, consumption records and snapshots.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{count_arg, float_arg, invalid_request, repr_of};
use crate::throttle::{BucketState, CheckResult};

/// A number field of a snapshot: an int or float, not a bool (`restore_from_snapshot` checks the
/// range, so a snapshot can carry what a throttle reported).
fn snapshot_number(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    float_arg(value)?.ok_or_else(|| {
        invalid_request(value.py(), format!("{field} must be a number, got {}", repr_of(value)))
    })
}

fn snapshot_bucket(value: &Bound<'_, PyAny>, field: &str) -> PyResult<PyBucketState> {
    value.cast::<PyBucketState>().map(|state| state.get().clone()).map_err(|_| {
        invalid_request(value.py(), format!("{field} must be a BucketState, got {}", repr_of(value)))
    })
}

/// The answer of `LLMThrottle.can_process`.
#[pyclass(module = "llm_queue_dispatcher._core", name = "RateLimitCheckResult", frozen)]
#[derive(Debug, Clone)]
pub struct PyCheckResult {
    /// Whether the request would be admitted now.
    #[pyo3(get)]
    pub allowed: bool,
    /// `"rpm_limit"`, `"tpm_limit"` or None.
    #[pyo3(get)]
    pub reason: Option<&'static str>,
    /// Exact seconds until admitted (0 when allowed, inf when it can never fit).
    #[pyo3(get)]
    pub available_in: f64,
    pub(crate) requests: f64,
    pub(crate) tokens: f64,
}

impl From<CheckResult> for PyCheckResult {
    fn from(check: CheckResult) -> Self {
        Self {
            allowed: check.allowed,
            reason: check.reason,
            available_in: check.available_in,
            requests: check.available_requests,
            tokens: check.available_tokens,
        }
    }
}

#[pymethods]
impl PyCheckResult {
    /// `{"rpm": requests left, "tpm": tokens left}`.
    #[getter]
    fn available_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("rpm", self.requests)?;
        dict.set_item("tpm", self.tokens)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "RateLimitCheckResult(allowed={}, reason={}, available_in={}, available_tokens={{'rpm': {}, 'tpm': {}}})",
            if self.allowed { "True" } else { "False" },
            self.reason.map_or_else(|| "None".to_owned(), |r| format!("'{r}'")),
            self.available_in,
            self.requests,
            self.tokens
        )
    }
}

/// Use of one bucket: `used`, `available`, `limit` (its capacity) and `percentage` used.
#[pyclass(module = "llm_queue_dispatcher._core", name = "BucketMetrics", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyBucketMetrics {
    pub(crate) used: f64,
    pub(crate) available: f64,
    pub(crate) limit: f64,
    pub(crate) percentage: f64,
}

#[pymethods]
impl PyBucketMetrics {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("used", self.used)?;
        dict.set_item("available", self.available)?;
        dict.set_item("limit", self.limit)?;
        dict.set_item("percentage", self.percentage)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "BucketMetrics(used={}, available={}, limit={}, percentage={})",
            self.used, self.available, self.limit, self.percentage
        )
    }
}

/// Figures of the consumption history.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ConsumptionStatistics", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyHistoryStatistics {
    pub(crate) count: usize,
    pub(crate) average_tokens_per_request: f64,
    pub(crate) total_tokens: u64,
    pub(crate) estimation_accuracy: f64,
}

#[pymethods]
impl PyHistoryStatistics {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("count", self.count)?;
        dict.set_item("average_tokens_per_request", self.average_tokens_per_request)?;
        dict.set_item("total_tokens", self.total_tokens)?;
        dict.set_item("estimation_accuracy", self.estimation_accuracy)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "ConsumptionStatistics(count={}, average_tokens_per_request={}, total_tokens={}, estimation_accuracy={})",
            self.count, self.average_tokens_per_request, self.total_tokens, self.estimation_accuracy
        )
    }
}

/// Size of the consumption history.
#[pyclass(module = "llm_queue_dispatcher._core", name = "MemoryMetrics", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyMemoryMetrics {
    pub(crate) history_records: usize,
    pub(crate) estimated_memory_usage: usize,
    pub(crate) max_history_records: usize,
}

#[pymethods]
impl PyMemoryMetrics {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("history_records", self.history_records)?;
        dict.set_item("estimated_memory_usage", self.estimated_memory_usage)?;
        dict.set_item("max_history_records", self.max_history_records)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "MemoryMetrics(history_records={}, estimated_memory_usage={}, max_history_records={})",
            self.history_records, self.estimated_memory_usage, self.max_history_records
        )
    }
}

/// The compensation debt (`total_debt` and `pending_compensation` are the same figure).
#[pyclass(module = "llm_queue_dispatcher._core", name = "CompensationMetrics", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyCompensationMetrics {
    pub(crate) total_debt: f64,
    pub(crate) pending_compensation: f64,
}

#[pymethods]
impl PyCompensationMetrics {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("total_debt", self.total_debt)?;
        dict.set_item("pending_compensation", self.pending_compensation)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "CompensationMetrics(total_debt={}, pending_compensation={})",
            self.total_debt, self.pending_compensation
        )
    }
}

/// Everything `LLMThrottle.get_metrics` reports.
#[pyclass(module = "llm_queue_dispatcher._core", name = "RateLimitMetrics", frozen, get_all)]
pub struct PyRateLimitMetrics {
    pub(crate) rpm: Py<PyBucketMetrics>,
    pub(crate) tpm: Py<PyBucketMetrics>,
    pub(crate) efficiency: f64,
    pub(crate) consumption_history: Py<PyHistoryStatistics>,
    pub(crate) memory: Py<PyMemoryMetrics>,
    pub(crate) compensation: Py<PyCompensationMetrics>,
}

#[pymethods]
impl PyRateLimitMetrics {
    /// The metrics as nested plain dicts.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("rpm", self.rpm.get().to_dict(py)?)?;
        dict.set_item("tpm", self.tpm.get().to_dict(py)?)?;
        dict.set_item("efficiency", self.efficiency)?;
        dict.set_item("consumption_history", self.consumption_history.get().to_dict(py)?)?;
        dict.set_item("memory", self.memory.get().to_dict(py)?)?;
        dict.set_item("compensation", self.compensation.get().to_dict(py)?)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "RateLimitMetrics(rpm={}, tpm={}, efficiency={}, consumption_history={}, memory={}, compensation={})",
            self.rpm.get().__repr__(),
            self.tpm.get().__repr__(),
            self.efficiency,
            self.consumption_history.get().__repr__(),
            self.memory.get().__repr__(),
            self.compensation.get().__repr__()
        )
    }
}

/// One successful `consume`.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ConsumptionRecord", frozen, get_all)]
pub struct PyConsumptionRecord {
    pub(crate) timestamp: f64,
    pub(crate) tokens: u64,
    pub(crate) request_id: String,
    pub(crate) metadata: Option<Py<PyAny>>,
    pub(crate) estimated_tokens: u64,
    pub(crate) actual_tokens: Option<u64>,
    pub(crate) compensation_debt: f64,
}

#[pymethods]
impl PyConsumptionRecord {
    fn __repr__(&self) -> String {
        format!(
            "ConsumptionRecord(request_id={:?}, timestamp={}, tokens={}, estimated_tokens={}, actual_tokens={}, \
             compensation_debt={})",
            self.request_id,
            self.timestamp,
            self.tokens,
            self.estimated_tokens,
            self.actual_tokens.map_or_else(|| "None".to_owned(), |a| a.to_string()),
            self.compensation_debt
        )
    }
}

/// The state of one bucket in a snapshot.
#[pyclass(module = "llm_queue_dispatcher._core", name = "BucketState", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyBucketState {
    pub(crate) available: f64,
    pub(crate) capacity: f64,
    pub(crate) last_refill: f64,
}

#[pymethods]
impl PyBucketState {
    #[new]
    #[pyo3(signature = (available, capacity, last_refill))]
    fn new(
        available: &Bound<'_, PyAny>,
        capacity: &Bound<'_, PyAny>,
        last_refill: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        Ok(Self {
            available: snapshot_number(available, "available")?,
            capacity: snapshot_number(capacity, "capacity")?,
            last_refill: snapshot_number(last_refill, "last_refill")?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "BucketState(available={}, capacity={}, last_refill={})",
            self.available, self.capacity, self.last_refill
        )
    }
}

impl From<BucketState> for PyBucketState {
    fn from(state: BucketState) -> Self {
        Self { available: state.available, capacity: state.capacity, last_refill: state.last_refill }
    }
}

impl From<&PyBucketState> for BucketState {
    fn from(state: &PyBucketState) -> Self {
        Self { available: state.available, capacity: state.capacity, last_refill: state.last_refill }
    }
}

/// The buckets and the compensation debt at one instant, for backup and restore.
#[pyclass(module = "llm_queue_dispatcher._core", name = "StateSnapshot", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyStateSnapshot {
    pub(crate) timestamp: f64,
    pub(crate) rpm_bucket_state: PyBucketState,
    pub(crate) tpm_bucket_state: PyBucketState,
    pub(crate) history_count: usize,
    pub(crate) compensation_debt: f64,
}

#[pymethods]
impl PyStateSnapshot {
    #[new]
    #[pyo3(signature = (timestamp, rpm_bucket_state, tpm_bucket_state, history_count, compensation_debt))]
    fn new(
        timestamp: &Bound<'_, PyAny>,
        rpm_bucket_state: &Bound<'_, PyAny>,
        tpm_bucket_state: &Bound<'_, PyAny>,
        history_count: &Bound<'_, PyAny>,
        compensation_debt: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let timestamp = snapshot_number(timestamp, "timestamp")?;
        let rpm_bucket_state = snapshot_bucket(rpm_bucket_state, "rpm_bucket_state")?;
        let tpm_bucket_state = snapshot_bucket(tpm_bucket_state, "tpm_bucket_state")?;
        let history_count = count_arg(history_count, "history_count")?;
        Ok(Self {
            timestamp,
            rpm_bucket_state,
            tpm_bucket_state,
            history_count,
            compensation_debt: snapshot_number(compensation_debt, "compensation_debt")?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "StateSnapshot(timestamp={}, rpm_bucket_state={}, tpm_bucket_state={}, history_count={}, \
             compensation_debt={})",
            self.timestamp,
            self.rpm_bucket_state.__repr__(),
            self.tpm_bucket_state.__repr__(),
            self.history_count,
            self.compensation_debt
        )
    }
}
