//! The `PyO3` layer: thin `#[pyclass]` wrappers over the pure-Rust core, and the module itself.

pub mod args;
pub mod clock;
pub mod errors;
pub mod select;
pub mod store;
pub mod throttle;

use pyo3::prelude::*;

/// `llm_queue_dispatcher._core`: the compiled part of the package.
#[pymodule(gil_used = false)]
pub mod _core {
    #[pymodule_export]
    use super::clock::PyManualClock;
    #[pymodule_export]
    use super::select::{PyCandidateBuffer, PyScoringParams, PySelection};
    #[pymodule_export]
    use super::store::PyStoreCore;
    #[pymodule_export]
    use super::throttle::{
        PyBucketMetrics, PyBucketState, PyCheckResult, PyCompensationMetrics, PyConsumptionRecord,
        PyHistoryStatistics, PyMemoryMetrics, PyRateLimitMetrics, PyStateSnapshot, PyThrottle,
    };

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}

#[allow(unused_imports)]
use PyResult as _;
