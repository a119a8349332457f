//! `ManualClock` for Python, and `ClockSource`: how every class turns its `clock=` argument into
//! readings without calling back into Python when the clock is a `ManualClock`.

use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use crate::clock::{monotonic_now, wall_now, ManualClock};
use crate::errors::CoreError;
use crate::py::args::{float_arg, invalid_request, repr_of, Given};
use crate::py::errors::to_py_err;

/// Reads a number of seconds for `field`: an int or float, not a bool; the clock itself checks
/// the range.
fn clock_seconds(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    float_arg(value)?.ok_or_else(|| {
        invalid_request(value.py(), format!("{field} must be a finite number, got {}", repr_of(value)))
    })
}

/// A clock that only moves when told to. Rust code reads it natively.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ManualClock", frozen)]
pub struct PyManualClock {
    inner: ManualClock,
}

impl PyManualClock {
    /// The current reading, read without Python.
    pub fn read(&self) -> f64 {
        self.inner.now()
    }
}

#[pymethods]
impl PyManualClock {
    #[new]
    #[pyo3(signature = (start = Given::Absent), text_signature = "(start=0.0)")]
    fn new(py: Python<'_>, start: Given<'_>) -> PyResult<Self> {
        let start = match start {
            Given::Absent => 0.0,
            Given::Value(value) => clock_seconds(&value, "start")?,
        };
        ManualClock::new(start).map(|inner| Self { inner }).map_err(|e| to_py_err(py, e))
    }

    /// The current reading in seconds.
    fn now(&self) -> f64 {
        self.inner.now()
    }

    /// Moves the clock forward by `seconds` and returns the new reading.
    fn advance(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<f64> {
        self.inner.advance(clock_seconds(seconds, "seconds")?).map_err(|e| to_py_err(py, e))
    }

    /// Sets the clock to `seconds`, which must not be earlier than the current reading.
    fn set(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set(clock_seconds(seconds, "seconds")?).map_err(|e| to_py_err(py, e))
    }

    /// A `ManualClock` is also a plain callable clock.
    fn __call__(&self) -> f64 {
        self.inner.now()
    }

    fn __repr__(&self) -> String {
        format!("ManualClock(start={:?})", self.inner.now())
    }
}

/// What a class reads the time from.
pub enum ClockSource {
    /// The system monotonic clock (rate-limit arithmetic by default).
    Monotonic,
    /// The wall clock, seconds since the epoch (message timestamps by default).
    Wall,
    /// A `ManualClock`, read natively.
    Manual(Py<PyManualClock>),
    /// Any Python callable returning seconds as a float (the slower path).
    Callable(Py<PyAny>),
}

impl ClockSource {
    /// Interprets a `clock=` argument: None gives `default`, a `ManualClock` is read natively,
    /// any other callable is called; anything else is an `InvalidConfigError`.
    pub fn from_arg(clock: Option<&Bound<'_, PyAny>>, default: ClockSource) -> PyResult<Self> {
        let Some(clock) = clock.filter(|c| !c.is_none()) else {
            return Ok(default);
        };
        if let Ok(manual) = clock.cast::<PyManualClock>() {
            return Ok(ClockSource::Manual(manual.clone().unbind()));
        }
        if clock.is_callable() {
            return Ok(ClockSource::Callable(clock.clone().unbind()));
        }
        let py = clock.py();
        Err(to_py_err(
            py,
            CoreError::InvalidConfig(format!(
                "clock must be a ManualClock or a callable returning seconds, got {}",
                repr_of(clock)
            )),
        ))
    }

    /// The current reading in seconds.
    pub fn now(&self, py: Python<'_>) -> PyResult<f64> {
        match self {
            ClockSource::Monotonic => Ok(monotonic_now()),
            ClockSource::Wall => Ok(wall_now()),
            ClockSource::Manual(clock) => Ok(clock.get().read()),
            ClockSource::Callable(callable) => {
                let reading = callable.call0(py)?;
                match reading.extract::<f64>(py) {
                    Ok(seconds) if seconds.is_finite() => Ok(seconds),
                    _ => Err(to_py_err(
                        py,
                        CoreError::InvalidConfig(format!(
                            "clock must return a finite number of seconds, got {}",
                            repr_of(reading.bind(py))
                        )),
                    )),
                }
            }
        }
    }

    /// The Python object behind this source, for `clock` getters (None for the system clocks).
    pub fn as_object(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        match self {
            ClockSource::Monotonic | ClockSource::Wall => None,
            ClockSource::Manual(clock) => Some(clock.clone_ref(py).into_any()),
            ClockSource::Callable(callable) => Some(callable.clone_ref(py)),
        }
    }

    /// A second handle on the same clock.
    #[must_use]
    pub fn clone_ref(&self, py: Python<'_>) -> Self {
        match self {
            ClockSource::Monotonic => ClockSource::Monotonic,
            ClockSource::Wall => ClockSource::Wall,
            ClockSource::Manual(clock) => ClockSource::Manual(clock.clone_ref(py)),
            ClockSource::Callable(callable) => ClockSource::Callable(callable.clone_ref(py)),
        }
    }

    /// Visits the Python object held, for the owning class's `__traverse__`.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            ClockSource::Monotonic | ClockSource::Wall => Ok(()),
            ClockSource::Manual(clock) => visit.call(clock),
            ClockSource::Callable(callable) => visit.call(callable),
        }
    }
}
