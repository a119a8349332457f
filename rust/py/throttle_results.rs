//! The result classes of `LLMThrottle`: checks, metrics, consumption records and snapshots.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::args::{count_arg, float_arg, invalid_request, repr_of};
use crate::throttle::{BucketState, CheckResult};

/// The keys of `RateLimitCheckResult.available_tokens` beyond "rpm" and "tpm", in the order of
/// `CheckResult::available_extra`.
const EXTRA_KEYS: [&str; 5] = ["itpm", "otpm", "rpd", "tpd", "concurrency"];

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
    /// The binding limit (`"rpm_limit"`, `"tpm_limit"`, `"itpm_limit"`, …) or None.
    #[pyo3(get)]
    pub reason: Option<&'static str>,
    /// Exact seconds until admitted (0 when allowed, inf when it can never fit).
    #[pyo3(get)]
    pub available_in: f64,
    pub(crate) requests: f64,
    pub(crate) tokens: f64,
    /// The other limits' levels, when any is configured (boxed: a result of a throttle of
    /// requests and tokens alone stays as small as it was).
    pub(crate) extra: Option<Box<[Option<f64>; 5]>>,
}

impl From<CheckResult> for PyCheckResult {
    fn from(check: CheckResult) -> Self {
        Self {
            allowed: check.allowed,
            reason: check.reason,
            available_in: check.available_in,
            requests: check.available_requests,
            tokens: check.available_tokens,
            extra: check.available_extra.map(Box::new),
        }
    }
}

#[pymethods]
impl PyCheckResult {
    /// `{"rpm": requests left, "tpm": tokens left}`, and for each other limit configured what
    /// its bucket holds (`"itpm"`, `"otpm"`, `"rpd"`, `"tpd"`) or the slots free
    /// (`"concurrency"`).
    #[getter]
    fn available_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.levels() {
            dict.set_item(key, value)?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        let levels: Vec<String> = self.levels().map(|(key, value)| format!("'{key}': {value}")).collect();
        format!(
            "RateLimitCheckResult(allowed={}, reason={}, available_in={}, available_tokens={{{}}})",
            if self.allowed { "True" } else { "False" },
            self.reason.map_or_else(|| "None".to_owned(), |r| format!("'{r}'")),
            self.available_in,
            levels.join(", ")
        )
    }
}

impl PyCheckResult {
    fn levels(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        [("rpm", self.requests), ("tpm", self.tokens)].into_iter().chain(
            EXTRA_KEYS
                .iter()
                .zip(self.extra.as_deref().copied().unwrap_or_default())
                .filter_map(|(&key, level)| level.map(|l| (key, l))),
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

/// The compensation debt of the token bucket (`total_debt` and `pending_compensation` are the
/// same figure), and `debts`: that of each token limit (`"tpm"`, and `"itpm"`, `"otpm"`,
/// `"tpd"` where configured).
#[pyclass(module = "llm_queue_dispatcher._core", name = "CompensationMetrics", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyCompensationMetrics {
    pub(crate) total_debt: f64,
    pub(crate) pending_compensation: f64,
    pub(crate) debts: BTreeMap<String, f64>,
}

#[pymethods]
impl PyCompensationMetrics {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("total_debt", self.total_debt)?;
        dict.set_item("pending_compensation", self.pending_compensation)?;
        dict.set_item("debts", self.debts.clone())?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        let debts: Vec<String> = self.debts.iter().map(|(name, debt)| format!("'{name}': {debt}")).collect();
        format!(
            "CompensationMetrics(total_debt={}, pending_compensation={}, debts={{{}}})",
            self.total_debt,
            self.pending_compensation,
            debts.join(", ")
        )
    }
}

/// Everything `LLMThrottle.get_metrics` reports: a `BucketMetrics` per limit (None for the
/// optional ones not configured; for `concurrency`, `used` is the requests in flight).
#[pyclass(module = "llm_queue_dispatcher._core", name = "RateLimitMetrics", frozen, get_all)]
pub struct PyRateLimitMetrics {
    pub(crate) rpm: Py<PyBucketMetrics>,
    pub(crate) tpm: Py<PyBucketMetrics>,
    pub(crate) itpm: Option<Py<PyBucketMetrics>>,
    pub(crate) otpm: Option<Py<PyBucketMetrics>>,
    pub(crate) rpd: Option<Py<PyBucketMetrics>>,
    pub(crate) tpd: Option<Py<PyBucketMetrics>>,
    pub(crate) concurrency: Option<Py<PyBucketMetrics>>,
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
        for (key, bucket) in self.optional() {
            dict.set_item(key, bucket.get().to_dict(py)?)?;
        }
        dict.set_item("efficiency", self.efficiency)?;
        dict.set_item("consumption_history", self.consumption_history.get().to_dict(py)?)?;
        dict.set_item("memory", self.memory.get().to_dict(py)?)?;
        dict.set_item("compensation", self.compensation.get().to_dict(py)?)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        let mut optional = String::new();
        for (key, bucket) in self.optional() {
            let _ = write!(optional, ", {key}={}", bucket.get().__repr__());
        }
        format!(
            "RateLimitMetrics(rpm={}, tpm={}{optional}, efficiency={}, consumption_history={}, memory={}, \
             compensation={})",
            self.rpm.get().__repr__(),
            self.tpm.get().__repr__(),
            self.efficiency,
            self.consumption_history.get().__repr__(),
            self.memory.get().__repr__(),
            self.compensation.get().__repr__()
        )
    }
}

impl PyRateLimitMetrics {
    /// The optional limits configured, with their keys.
    fn optional(&self) -> impl Iterator<Item = (&'static str, &Py<PyBucketMetrics>)> {
        [
            ("itpm", &self.itpm),
            ("otpm", &self.otpm),
            ("rpd", &self.rpd),
            ("tpd", &self.tpd),
            ("concurrency", &self.concurrency),
        ]
        .into_iter()
        .filter_map(|(key, bucket)| bucket.as_ref().map(|b| (key, b)))
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
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

#[pymethods]
impl PyConsumptionRecord {
    fn __repr__(&self) -> String {
        let optional = |count: Option<u64>| count.map_or_else(|| "None".to_owned(), |a| a.to_string());
        format!(
            "ConsumptionRecord(request_id={:?}, timestamp={}, tokens={}, estimated_tokens={}, actual_tokens={}, \
             compensation_debt={}, input_tokens={}, output_tokens={})",
            self.request_id,
            self.timestamp,
            self.tokens,
            self.estimated_tokens,
            optional(self.actual_tokens),
            self.compensation_debt,
            optional(self.input_tokens),
            optional(self.output_tokens)
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

    /// Pickling and copying: the constructor's arguments.
    fn __getnewargs__(&self) -> (f64, f64, f64) {
        (self.available, self.capacity, self.last_refill)
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

/// The buckets and the compensation debts at one instant, for backup and restore: those of
/// requests and tokens, and of the other limits where configured (`compensation_debts` holds
/// the debts of itpm, otpm and tpd).
#[pyclass(module = "llm_queue_dispatcher._core", name = "StateSnapshot", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyStateSnapshot {
    pub(crate) timestamp: f64,
    pub(crate) rpm_bucket_state: PyBucketState,
    pub(crate) tpm_bucket_state: PyBucketState,
    pub(crate) history_count: usize,
    pub(crate) compensation_debt: f64,
    pub(crate) itpm_bucket_state: Option<PyBucketState>,
    pub(crate) otpm_bucket_state: Option<PyBucketState>,
    pub(crate) rpd_bucket_state: Option<PyBucketState>,
    pub(crate) tpd_bucket_state: Option<PyBucketState>,
    pub(crate) compensation_debts: BTreeMap<String, f64>,
}

impl PyStateSnapshot {
    /// The optional buckets by their field names (the repr's and the constructor's).
    fn optional_states(&self) -> [(&'static str, &Option<PyBucketState>); 4] {
        [
            ("itpm_bucket_state", &self.itpm_bucket_state),
            ("otpm_bucket_state", &self.otpm_bucket_state),
            ("rpd_bucket_state", &self.rpd_bucket_state),
            ("tpd_bucket_state", &self.tpd_bucket_state),
        ]
    }
}

/// An optional bucket of a snapshot: None, or a `BucketState`.
fn optional_bucket(value: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Option<PyBucketState>> {
    value.filter(|v| !v.is_none()).map(|v| snapshot_bucket(v, field)).transpose()
}

/// `compensation_debts`: None, or a dict of "itpm", "otpm" and "tpd" to numbers.
fn snapshot_debts(value: Option<&Bound<'_, PyAny>>) -> PyResult<BTreeMap<String, f64>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(BTreeMap::new()) };
    let py = value.py();
    let Ok(dict) = value.cast::<PyDict>() else {
        return Err(invalid_request(
            py,
            format!("compensation_debts must be a dict, got {}", repr_of(value)),
        ));
    };
    let mut debts = BTreeMap::new();
    for (key, debt) in dict.iter() {
        let name = key.cast::<PyString>().ok().and_then(|k| k.to_str().ok().map(str::to_owned));
        let Some(name) = name.filter(|n| ["itpm", "otpm", "tpd"].contains(&n.as_str())) else {
            return Err(invalid_request(
                py,
                format!("compensation_debts keys must be 'itpm', 'otpm' or 'tpd', got {}", repr_of(&key)),
            ));
        };
        let debt = snapshot_number(&debt, &format!("compensation_debts[{name:?}]"))?;
        debts.insert(name, debt);
    }
    Ok(debts)
}

#[pymethods]
impl PyStateSnapshot {
    #[new]
    #[pyo3(signature = (timestamp, rpm_bucket_state, tpm_bucket_state, history_count, compensation_debt, *,
        itpm_bucket_state=None, otpm_bucket_state=None, rpd_bucket_state=None, tpd_bucket_state=None,
        compensation_debts=None))]
    // One argument per field of the snapshot, named as the class's attributes (rpm_…, rpd_…).
    #[allow(clippy::too_many_arguments, clippy::similar_names)]
    fn new(
        timestamp: &Bound<'_, PyAny>,
        rpm_bucket_state: &Bound<'_, PyAny>,
        tpm_bucket_state: &Bound<'_, PyAny>,
        history_count: &Bound<'_, PyAny>,
        compensation_debt: &Bound<'_, PyAny>,
        itpm_bucket_state: Option<&Bound<'_, PyAny>>,
        otpm_bucket_state: Option<&Bound<'_, PyAny>>,
        rpd_bucket_state: Option<&Bound<'_, PyAny>>,
        tpd_bucket_state: Option<&Bound<'_, PyAny>>,
        compensation_debts: Option<&Bound<'_, PyAny>>,
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
            itpm_bucket_state: optional_bucket(itpm_bucket_state, "itpm_bucket_state")?,
            otpm_bucket_state: optional_bucket(otpm_bucket_state, "otpm_bucket_state")?,
            rpd_bucket_state: optional_bucket(rpd_bucket_state, "rpd_bucket_state")?,
            tpd_bucket_state: optional_bucket(tpd_bucket_state, "tpd_bucket_state")?,
            compensation_debts: snapshot_debts(compensation_debts)?,
        })
    }

    fn __repr__(&self) -> String {
        let mut optional = String::new();
        for (name, state) in self.optional_states() {
            if let Some(state) = state {
                let _ = write!(optional, ", {name}={}", state.__repr__());
            }
        }
        if !self.compensation_debts.is_empty() {
            let debts: Vec<String> =
                self.compensation_debts.iter().map(|(name, debt)| format!("'{name}': {debt}")).collect();
            let _ = write!(optional, ", compensation_debts={{{}}}", debts.join(", "));
        }
        format!(
            "StateSnapshot(timestamp={}, rpm_bucket_state={}, tpm_bucket_state={}, history_count={}, \
             compensation_debt={}{optional})",
            self.timestamp,
            self.rpm_bucket_state.__repr__(),
            self.tpm_bucket_state.__repr__(),
            self.history_count,
            self.compensation_debt
        )
    }

    /// Pickling and copying (a backup travels to another process): the constructor's
    /// arguments, positional and keyword.
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let args = (
            self.timestamp,
            self.rpm_bucket_state.clone(),
            self.tpm_bucket_state.clone(),
            self.history_count,
            self.compensation_debt,
        )
            .into_pyobject(py)?
            .into_any();
        let kwargs = PyDict::new(py);
        for (name, state) in self.optional_states() {
            if let Some(state) = state {
                kwargs.set_item(name, state.clone())?;
            }
        }
        if !self.compensation_debts.is_empty() {
            kwargs.set_item("compensation_debts", self.compensation_debts.clone())?;
        }
        Ok((args, kwargs))
    }
}
