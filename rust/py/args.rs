//! Argument readers shared by the bindings, so every entry point rejects bad input alike.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString};
use pyo3::Borrowed;

use super::errors::to_py_err;
use crate::errors::CoreError;
use crate::store::validate_request_id;

/// An `InvalidRequestError` with `message`.
pub(crate) fn invalid_request(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, CoreError::InvalidRequest(message))
}

/// An `InvalidConfigError` with `message`.
pub(crate) fn invalid_config(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, CoreError::InvalidConfig(message))
}

/// `repr(value)` for an error message. Never fails: building the error for a bad value must not
/// raise another (an int past Python's digit limit has no repr, and a user's `__repr__` may raise).
pub(crate) fn repr_of(value: &Bound<'_, PyAny>) -> String {
    if let Ok(shown) = value.repr() {
        return shown.to_string();
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(bits) = value.call_method0("bit_length").and_then(|b| b.extract::<u64>()) {
            return format!("<int of {bits} bits>");
        }
    }
    format!("<{} object>", value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string()))
}

/// An argument as given, None included, or `Absent` when it was left out: for an optional
/// argument whose default is not None and to which None must not be passed (a plain
/// `Option<T>` argument reads None as left out).
pub(crate) enum Given<'py> {
    /// The argument was not passed.
    Absent,
    /// The object passed.
    Value(Bound<'py, PyAny>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Given<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Given::Value(obj.to_owned()))
    }
}

/// Whether `value` is an int or a float (a bool is neither here).
pub(crate) fn is_number(value: &Bound<'_, PyAny>) -> bool {
    !value.is_instance_of::<PyBool>()
        && (value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>())
}

/// An int or float (not a bool), or an integer-like object (`__index__`: a numpy integer), as an
/// `f64`; None for anything else, an int too large for a float included (reading it would raise
/// `OverflowError`). Non-finite floats pass through: the caller says whether they are valid.
/// Runs Python code (`__index__`): never call it under a lock.
pub(crate) fn float_arg(value: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    if let Ok(float) = value.cast::<PyFloat>() {
        return Ok(Some(float.value()));
    }
    Ok(int_arg(value)?.and_then(|int| int.extract::<f64>().ok()))
}

/// The int `value` stands for: itself when it is an int (not a bool), `operator.index(value)`
/// for an integer-like object; None for anything else (a float included). Runs Python code
/// (`__index__`): never call it under a lock.
pub(crate) fn int_arg<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    if value.is_instance_of::<PyBool>() || value.is_instance_of::<PyFloat>() {
        return Ok(None);
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(Some(value.clone()));
    }
    index_of(value)
}

/// A count: an int >= 0 (or an integer-like, not a bool); one too large for a `usize` saturates
/// (a limit that large means "no limit"). Anything else is an `InvalidRequestError` naming the
/// field. Runs Python code (`__index__`): never call it under a lock.
pub(crate) fn count_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<usize> {
    let py = value.py();
    if let Some(int) = int_arg(value)? {
        if let Ok(v) = int.extract::<usize>() {
            return Ok(v);
        }
        if int.gt(0)? {
            return Ok(usize::MAX);
        }
    }
    Err(invalid_request(py, format!("{field} must be an int >= 0, got {}", repr_of(value))))
}

/// `operator.index(value)`: the int an integer-like object (a numpy integer, any class with
/// `__index__`) stands for; None when it has none (`TypeError`). Other exceptions of a user's
/// `__index__` propagate. Runs Python code: never call it under a lock.
fn index_of<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    static INDEX: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = value.py();
    match INDEX.import(py, "operator", "index")?.call1((value,)) {
        Ok(int) => Ok(Some(int)),
        Err(error) if error.is_instance_of::<PyTypeError>(py) => Ok(None),
        Err(error) => Err(error),
    }
}

/// `types.validate_token_count` in Rust, with the same messages: an int (or an integer-like
/// object such as `numpy.int64`, through `__index__`) or an integral float, >= 0; never a bool.
pub(crate) fn token_count(value: &Bound<'_, PyAny>, field: &str) -> PyResult<u64> {
    let py = value.py();
    if !is_number(value) {
        let int = if value.is_instance_of::<PyBool>() { None } else { index_of(value)? };
        return match int {
            Some(int) => token_count(&int, field),
            None => Err(invalid_request(py, format!("{field} must be an int >= 0, got {}", repr_of(value)))),
        };
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        let v = float.value();
        if !v.is_finite() || v.fract() != 0.0 {
            return Err(invalid_request(
                py,
                format!("{field} must be a finite integral count, got {}", repr_of(value)),
            ));
        }
        if v < 0.0 {
            return Err(invalid_request(py, format!("{field} must be >= 0, got {}", repr_of(value))));
        }
        return Ok(v as u64);
    }
    match value.extract::<u64>() {
        Ok(v) => Ok(v),
        Err(_) if value.lt(0)? => {
            Err(invalid_request(py, format!("{field} must be >= 0, got {}", repr_of(value))))
        }
        // Beyond u64: no budget will ever fit it; saturating keeps it last in every order.
        Err(_) => Ok(u64::MAX),
    }
}

/// Reads a `str` argument as UTF-8; a non-str, or a str Rust cannot hold (lone surrogates), is
/// an `InvalidRequestError` naming the field.
pub(crate) fn text_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<String> {
    text_with(value, field, str::to_owned)
}

/// What `read` makes of a str argument's text (borrowed, no copy), with the errors of
/// [`text_arg`].
pub(crate) fn text_with<T>(
    value: &Bound<'_, PyAny>,
    field: &str,
    read: impl FnOnce(&str) -> T,
) -> PyResult<T> {
    let py = value.py();
    match value.cast::<PyString>() {
        Ok(text) => text.to_str().map(read).map_err(|_| {
            invalid_request(
                py,
                format!(
                    "{field} must be a str of valid Unicode (no lone surrogates), got {}",
                    repr_of(value)
                ),
            )
        }),
        Err(_) => Err(invalid_request(py, format!("{field} must be a str, got {}", repr_of(value)))),
    }
}

/// Reads a consume's `metadata`: None (or left out), or a mapping (a dict, as the contract types
/// it, or any `collections.abc.Mapping`), kept by reference; anything else is an
/// `InvalidRequestError` naming the field.
pub(crate) fn metadata_arg(value: Option<Bound<'_, PyAny>>) -> PyResult<Option<Py<PyAny>>> {
    match value {
        None => Ok(None),
        Some(value) if value.is_none() => Ok(None),
        Some(value) if value.is_instance_of::<PyDict>() || value.cast::<PyMapping>().is_ok() => {
            Ok(Some(value.unbind()))
        }
        Some(value) => Err(invalid_request(
            value.py(),
            format!("metadata must be None or a mapping, got {}", repr_of(&value)),
        )),
    }
}

/// Reads a request id with the one id rule of the package (`store::validate_request_id`): a
/// non-empty str that is not only whitespace.
pub(crate) fn extract_request_id(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let id = text_arg(value, "request_id")?;
    validate_request_id(&id, "request_id").map_err(|e| to_py_err(value.py(), e))?;
    Ok(id)
}
