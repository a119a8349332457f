//! The `PyO3` layer: thin `#[pyclass]` wrappers over the pure-Rust core, and the module itself.

pub mod args;
pub mod clock;
pub mod core;
pub mod errors;
pub mod job;
pub mod messages;
pub mod report;
pub mod reported;
pub mod requests;
pub mod steps;
pub mod store;
pub mod throttle;
pub mod throttle_results;

use pyo3::prelude::*;

/// `llm_queue_dispatcher._core`: the compiled part of the package.
// `gil_used = true` until free-threaded builds are tested (a 3.13t job and a threaded stress
// test): the locks are taken so they cannot deadlock with the interpreter, but nothing proves
// the rest safe without the GIL yet.
#[pymodule(gil_used = true)]
pub mod _core {
    #[pymodule_export]
    use super::clock::PyManualClock;
    #[pymodule_export]
    use super::core::PyDispatchCore;
    #[pymodule_export]
    use super::job::{PyJob, PyPlan, PyReady};
    #[pymodule_export]
    use super::messages::PyAttributesSlot;
    #[pymodule_export]
    use super::report::{PyCapacity, PyCoreReport, PyInFlight, PyPurged, PyTenantReport};
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
        // The constants the Python layer shares with the core, defined once, here.
        m.add("MAX_VISIBILITY_TIMEOUT", crate::store::MAX_VISIBILITY_TIMEOUT)?;
        m.add("DEFAULT_MESSAGE_RETENTION", crate::store::DEFAULT_MESSAGE_RETENTION)?;
        m.add("FACTOR_NAMES", crate::scoring::FACTOR_NAMES)?;
        m.add("DEFAULT_WEIGHTS", crate::scoring::Weights::default().as_array())?;
        m.add("MAX_PROVIDER_WAIT", crate::throttle::MAX_PROVIDER_WAIT)?;
        Ok(())
    }
}

#[allow(unused_imports)]
use PyResult as _;
