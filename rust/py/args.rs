//! Argument readers shared by the bindings, so every entry point rejects bad input alike.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};

use super::errors::to_py_err;
use crate::errors::CoreError;
use crate::store::validate_request_id;

/// An `InvalidRequestError` with `message`.
pub(crate) fn invalid_request(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, CoreError::InvalidRequest(message))
}

/// Whether `value` is an int or a float (a bool is neither here).
pub(crate) fn is_number(value: &Bound<'_, PyAny>) -> bool {
    !value.is_instance_of::<PyBool>()
        && (value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>())
}

/// `types.validate_token_count` in Rust, with the same messages.
pub(crate) fn token_count(value: &Bound<'_, PyAny>, field: &str) -> PyResult<u64> {
    let py = value.py();
    if !is_number(value) {
        return Err(invalid_request(py, format!("{field} must be an int >= 0, got {}", value.repr()?)));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        let v = float.value();
        if !v.is_finite() || v.fract() != 0.0 {
            return Err(invalid_request(
                py,
                format!("{field} must be a finite integral count, got {}", value.repr()?),
            ));
        }
        if v < 0.0 {
            return Err(invalid_request(py, format!("{field} must be >= 0, got {}", value.repr()?)));
        }
        return Ok(v as u64);
    }
    match value.extract::<u64>() {
        Ok(v) => Ok(v),
        Err(_) if value.lt(0)? => {
            Err(invalid_request(py, format!("{field} must be >= 0, got {}", value.repr()?)))
        }
        // Beyond u64: no budget will ever fit it; saturating keeps it last in every order.
        Err(_) => Ok(u64::MAX),
    }
}

/// Reads a `str` argument as UTF-8; a non-str, or a str Rust cannot hold (lone surrogates), is
/// an `InvalidRequestError` naming the field.
pub(crate) fn text_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<String> {
    let py = value.py();
    let shown = || value.repr().map_or_else(|_| "<unrepresentable>".to_owned(), |r| r.to_string());
    match value.cast::<PyString>() {
        Ok(text) => text.to_str().map(str::to_owned).map_err(|_| {
            invalid_request(
                py,
                format!("{field} must be a str of valid Unicode (no lone surrogates), got {}", shown()),
            )
        }),
        Err(_) => Err(invalid_request(py, format!("{field} must be a str, got {}", shown()))),
    }
}

/// Reads a request id with the one id rule of the package (`store::validate_request_id`): a
/// non-empty str that is not only whitespace.
pub(crate) fn extract_request_id(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let id = text_arg(value, "request_id")?;
    validate_request_id(&id, "request_id").map_err(|e| to_py_err(value.py(), e))?;
    Ok(id)
}
