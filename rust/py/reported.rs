//! What a rate limiter answers the dispatcher, read in one place: the numbers of its
//! `get_metrics()` and of a `can_process` check. A value that is not a number, or NaN, is the
//! limiter's fault and an `InvalidRequestError` naming the limiter, raised before anything is
//! taken: a NaN budget fits nothing and says to wait no time, so a waiting `dequeue` would
//! ask again every millisecond.

use pyo3::exceptions::PyAttributeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::args::{invalid_request, repr_of};
use super::report::PyCapacity;
use super::throttle::PyThrottle;
use crate::policy::Snapshot;

/// How soon a waiting `dequeue` asks again a limiter other than `LLMThrottle` that refused
/// without saying when (a wait of 0 or less): its answer may never change by itself, and a
/// wait worked out as 0 would poll it every millisecond.
const UNSAID_WAIT: f64 = 0.05;

fn bad_answer(limiter: &Bound<'_, PyAny>, what: &str, problem: &str) -> PyErr {
    invalid_request(limiter.py(), format!("rate limiter {} reported {what}{problem}", repr_of(limiter)))
}

/// `holder.<field>`, a number `limiter` reported (`what` names it in the error): anything
/// `float()` takes except NaN (infinities are meaningful: no limit, never).
fn number(limiter: &Bound<'_, PyAny>, holder: &Bound<'_, PyAny>, field: &str, what: &str) -> PyResult<f64> {
    let value = match holder.getattr(field) {
        Ok(value) => value,
        Err(error) if error.is_instance_of::<PyAttributeError>(limiter.py()) => {
            return Err(bad_answer(limiter, what, ": missing"));
        }
        Err(error) => return Err(error),
    };
    match value.extract::<f64>() {
        Ok(number) if !number.is_nan() => Ok(number),
        _ => Err(bad_answer(limiter, what, &format!(" = {}, not a number", repr_of(&value)))),
    }
}

/// `metrics.<bucket>.<field>` of `limiter.get_metrics()`, a number.
fn metric(
    limiter: &Bound<'_, PyAny>,
    metrics: &Bound<'_, PyAny>,
    bucket: &str,
    field: &str,
) -> PyResult<f64> {
    let what = format!("get_metrics().{bucket}");
    let holder = match metrics.getattr(bucket) {
        Ok(holder) => holder,
        Err(error) if error.is_instance_of::<PyAttributeError>(metrics.py()) => {
            return Err(bad_answer(limiter, &what, ": missing"));
        }
        Err(error) => return Err(error),
    };
    number(limiter, &holder, field, &format!("{what}.{field}"))
}

/// The budget `limiter` reported in `metrics`: tokens and requests available, the token
/// capacity; and the request capacity.
pub(crate) fn snapshot(limiter: &Bound<'_, PyAny>, metrics: &Bound<'_, PyAny>) -> PyResult<(Snapshot, f64)> {
    let snapshot = Snapshot {
        available_tokens: metric(limiter, metrics, "tpm", "available")?,
        available_requests: metric(limiter, metrics, "rpm", "available")?,
        capacity: metric(limiter, metrics, "tpm", "limit")?,
    };
    Ok((snapshot, metric(limiter, metrics, "rpm", "limit")?))
}

/// The tokens `limiter` reported available in `metrics`.
pub(crate) fn available_tokens(limiter: &Bound<'_, PyAny>, metrics: &Bound<'_, PyAny>) -> PyResult<f64> {
    metric(limiter, metrics, "tpm", "available")
}

/// The most tokens `limiter` can ever grant one request, from its `metrics`: the smallest
/// capacity (`limit`) of the limits counting the whole estimate (`tpm`, and `tpd` where there
/// is one), and the capacities of `itpm` and `otpm` (infinite where none).
pub(crate) fn capacity(limiter: &Bound<'_, PyAny>, metrics: &Bound<'_, PyAny>) -> PyResult<PyCapacity> {
    let optional = |bucket: &str| -> PyResult<f64> {
        match metrics.getattr_opt(bucket)? {
            Some(holder) if !holder.is_none() => metric(limiter, metrics, bucket, "limit"),
            _ => Ok(f64::INFINITY),
        }
    };
    let whole = metric(limiter, metrics, "tpm", "limit")?.min(optional("tpd")?);
    Ok(PyCapacity { whole, input: optional("itpm")?, output: optional("otpm")? })
}

/// What a `can_process` answer `check` of `limiter` means for a waiting dequeue: the seconds to
/// wait (infinite: never), and, for a limiter other than `LLMThrottle` refusing with a reason
/// naming a limit (`"tpm_limit"`) and a finite wait, that reason for the metrics (an
/// `LLMThrottle`'s refusals the core sees itself; a request that can never be admitted waits
/// for no limit). Such a limiter refusing with a wait of 0 or less is asked again after
/// `UNSAID_WAIT`; an admission says 0 (it came too late for this dispatch).
pub(crate) fn wait(limiter: &Bound<'_, PyAny>, check: &Bound<'_, PyAny>) -> PyResult<(f64, Option<String>)> {
    let py = limiter.py();
    let wait = number(limiter, check, "available_in", "can_process(...).available_in")?;
    if limiter.is_exact_instance_of::<PyThrottle>() {
        return Ok((wait, None));
    }
    let allowed = check.getattr(intern!(py, "allowed"))?.is_truthy()?;
    if allowed {
        return Ok((wait, None));
    }
    let reason = match check.getattr_opt(intern!(py, "reason"))? {
        Some(reason) if wait.is_finite() => reason.cast::<PyString>().ok().map(ToString::to_string),
        _ => None,
    };
    Ok((if wait <= 0.0 { UNSAID_WAIT } else { wait }, reason))
}
