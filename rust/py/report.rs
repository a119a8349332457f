//! The typed values `DispatchCore` hands Python for reports and purges: small frozen classes,
//! never positional tuples.

use pyo3::prelude::*;

/// The figures of a dispatcher's metrics report, at its clock's `now`.
#[pyclass(module = "llm_queue_dispatcher._core", name = "CoreReport", frozen, get_all)]
pub struct PyCoreReport {
    /// The dispatcher clock's reading.
    pub now: f64,
    /// Selectable messages per priority, URGENT first.
    pub counts_by_priority: [usize; 4],
    /// When the oldest selectable message was enqueued.
    pub oldest_enqueued_at: Option<f64>,
    /// When the oldest selectable message of each priority was enqueued, URGENT first.
    pub oldest_by_priority: [Option<f64>; 4],
    /// Messages in flight: the in-memory store's count, or this dispatcher's deliveries.
    pub in_flight: usize,
    /// This dispatcher's deliveries handed out and not settled.
    pub active: usize,
    /// Messages in the prefetch buffer.
    pub buffered: usize,
    /// Average wait from enqueue to dispatch over the retention window.
    pub average_wait: f64,
    /// Its percentiles.
    pub wait_p50: f64,
    /// 95th percentile.
    pub wait_p95: f64,
    /// 99th percentile.
    pub wait_p99: f64,
    /// Completions per minute.
    pub messages_per_minute: f64,
    /// Their tokens per minute (actual where known).
    pub tokens_per_minute: f64,
    /// Seconds selecting took, median.
    pub latency_p50: f64,
    /// 99th percentile.
    pub latency_p99: f64,
    /// Messages marked failed or dead-lettered.
    pub failed: u64,
    /// Requests removed unsent past their deadline.
    pub expired_deadlines: u64,
    /// Selectable messages above the token capacity asked about.
    pub unfittable: usize,
    /// The wait target per priority, URGENT first, in seconds.
    pub slo_targets: [f64; 4],
    /// Dispatches per priority over the retention window, URGENT first.
    pub slo_dispatched: [u64; 4],
    /// Of those, the ones that waited at most their priority's target.
    pub slo_met: [u64; 4],
    /// The limit that made the window's dispatches wait (`"RPM"`, `"TPM"`, `"ITPM"`, `"OTPM"`,
    /// `"RPD"`, `"TPD"`, `"concurrency"`), or None.
    pub binding_limit: Option<&'static str>,
    /// Dispatches of the window that waited for each limit, as `(name, count)` in that order.
    pub waited_by_limit: Vec<(&'static str, u64)>,
}

/// One delivery in flight: the fields of `InFlightDetail` but its age.
#[pyclass(module = "llm_queue_dispatcher._core", name = "InFlight", frozen, get_all)]
pub struct PyInFlight {
    /// Its request's id.
    pub request_id: String,
    /// Its message's id.
    pub message_id: String,
    /// Its request's priority.
    pub priority: u8,
    /// Its request's estimated tokens.
    pub estimated_tokens: u64,
    /// Its total score (0 under `fair_priority`).
    pub score: f64,
    /// When it was handed out.
    pub started_at: f64,
}

/// One tenant's line of the metrics report.
#[pyclass(module = "llm_queue_dispatcher._core", name = "TenantReport", frozen, get_all)]
pub struct PyTenantReport {
    /// The tenant ("" for requests without one).
    pub name: String,
    /// Messages waiting.
    pub visible: usize,
    /// Messages in flight.
    pub in_flight: usize,
    /// Tokens in the fairness window.
    pub tokens_in_window: f64,
    /// Tokens of its requests marked processed.
    pub tokens_served: u64,
    /// Wait percentiles.
    pub wait_p50: f64,
    /// 95th percentile.
    pub wait_p95: f64,
    /// 99th percentile.
    pub wait_p99: f64,
}

/// A delivery handed out when a purge began, to delete by its receipt handle.
#[pyclass(module = "llm_queue_dispatcher._core", name = "Purged", frozen, get_all)]
pub struct PyPurged {
    /// The delivery's id.
    pub delivery: u64,
    /// Its receipt handle.
    pub handle: String,
}

/// The most tokens a limiter can ever grant one request (`dispatch::Capacity`), as its
/// `get_metrics()` reports them.
#[pyclass(module = "llm_queue_dispatcher._core", name = "Capacity", frozen, get_all)]
#[derive(Clone, Copy)]
pub struct PyCapacity {
    /// The smallest capacity of the limits counting the whole estimate (`tpm`, `tpd`).
    pub whole: f64,
    /// The input limit's capacity (`itpm`; infinite without one).
    pub input: f64,
    /// The output limit's capacity (`otpm`; infinite without one).
    pub output: f64,
}

impl From<PyCapacity> for crate::dispatch::Capacity {
    fn from(c: PyCapacity) -> Self {
        Self { whole: c.whole, input: c.input, output: c.output }
    }
}
