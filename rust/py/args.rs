//! Argument readers shared by the bindings, so every entry point rejects bad input alike.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};

use super::errors::to_py_err;
use crate::errors::CoreError;

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

/// Reads a request id: a non-empty str that is not only whitespace.
pub(crate) fn extract_request_id(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = value.py();
    match value.cast::<PyString>() {
        Ok(text) => {
            let text = text.to_str()?;
            if text.trim().is_empty() {
                Err(invalid_request(py, format!("request_id must be a non-empty str, got {text:?}")))
            } else {
                Ok(text.to_owned())
            }
        }
        Err(_) => {
            Err(invalid_request(py, format!("request_id must be a non-empty str, got {}", value.repr()?)))
        }
    }
}
