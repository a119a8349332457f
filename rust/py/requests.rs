//! Reading `LLMRequest` objects and the store's arguments: every field checked at the door with
//! the messages of `LLMRequest.validate`, before any lock is taken.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDateTime, PyDict, PyInt, PyString, PyTzInfo};
use pyo3::{ffi, intern};

use super::messages::{llm_request_class, token_info_class};
use crate::dispatch::{InputPart, TokenParts};
use crate::errors::CoreError;
pub(crate) use crate::py::args::{count_arg, invalid_config, repr_of};
use crate::py::args::{float_arg, invalid_request, text_arg, text_with, token_count};
use crate::py::errors::to_py_err;
use crate::store::{validate_request_id, NewMessage, RequestId};
use crate::throttle::split_parts;

/// The instant of an aware (or naive, taken as UTC) datetime in seconds since the epoch.
pub(crate) fn datetime_seconds(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    let py = value.py();
    let Ok(date) = value.cast::<PyDateTime>() else {
        return Err(invalid_request(
            py,
            format!("{field} must be None or a datetime, got {}", repr_of(value)),
        ));
    };
    let aware = if date.getattr(intern!(py, "tzinfo"))?.is_none() {
        static REPLACE_UTC: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
        let kwargs = REPLACE_UTC.get_or_try_init(py, || -> PyResult<Py<PyDict>> {
            let kwargs = PyDict::new(py);
            kwargs.set_item("tzinfo", PyTzInfo::utc(py)?)?;
            Ok(kwargs.unbind())
        })?;
        date.call_method(intern!(py, "replace"), (), Some(kwargs.bind(py)))?
    } else {
        date.clone().into_any()
    };
    match aware.call_method0(intern!(py, "timestamp")).and_then(|t| t.extract::<f64>()) {
        Ok(seconds) if seconds.is_finite() => Ok(seconds),
        _ => Err(invalid_request(
            py,
            format!("{field} must be a datetime with a valid instant, got {}", repr_of(value)),
        )),
    }
}

/// What the in-memory store keeps of a request: the `LLMRequest` itself, and its estimate's
/// input part (`TokenInfo.input`; `max_output` is the rest of the estimate), read once at
/// enqueue as its estimate is, so a dispatch reserves and admits by them without touching
/// Python. 16 bytes: the parts cost a stored message 8.
#[derive(Debug)]
pub(crate) struct Payload {
    /// The `LLMRequest`.
    pub object: Py<PyAny>,
    /// The input part of its estimate, when its `TokenInfo` gave the parts.
    pub input: InputPart,
}

impl TokenParts for Payload {
    fn token_parts(&self, tokens: u64) -> Option<(u64, u64)> {
        self.input.parts(tokens)
    }
}

/// The input and output parts of a `TokenInfo` whose estimate is `tokens`: None when it gives
/// neither; both, adding up to `tokens` (`TokenInfo`'s own rule, checked again: its fields may
/// have been changed since).
pub(crate) fn token_parts_of(token_info: &Bound<'_, PyAny>, tokens: u64) -> PyResult<Option<(u64, u64)>> {
    let py = token_info.py();
    let part = |name: &Bound<'_, PyString>, field: &str| -> PyResult<Option<u64>> {
        match attr(token_info, name) {
            Ok(value) if !value.is_none() => token_count(&value, field).map(Some),
            // A `TokenInfo` of an older pickle has no parts: the estimate alone.
            Ok(_) | Err(_) => Ok(None),
        }
    };
    let input = part(intern!(py, "input"), "token_info.input")?;
    let output = part(intern!(py, "max_output"), "token_info.max_output")?;
    if input.is_some() != output.is_some() {
        return Err(invalid_request(
            py,
            "token_info.input and token_info.max_output must both be None or both be set".to_owned(),
        ));
    }
    split_parts(tokens, input, output, ["token_info.estimated", "token_info.input", "token_info.max_output"])
        .map_err(|e| to_py_err(py, e))
}

/// `getattr(obj, name)`. A dataclass instance's type looks attributes up with
/// `PyObject_GenericGetAttr` itself: called directly, it skips `PyObject_GetAttr`'s dispatch
/// through the type's slot (about 27 of the 190 instructions of a read; a request is read nine
/// times).
fn attr<'py>(obj: &Bound<'py, PyAny>, name: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyAny>> {
    let generic: ffi::getattrofunc = ffi::PyObject_GenericGetAttr;
    // SAFETY: `obj` is live, so is its type; reading a slot of a full (non-limited) type object.
    let getattro = unsafe { (*ffi::Py_TYPE(obj.as_ptr())).tp_getattro };
    // A function of libpython has one address; were it seen as two, this is the plain getattr.
    if !getattro.is_some_and(|f| std::ptr::fn_addr_eq(f, generic)) {
        return obj.getattr(name);
    }
    // SAFETY: both live; the same call the type's slot would make, a new reference or NULL.
    unsafe {
        Bound::from_owned_ptr_or_err(obj.py(), ffi::PyObject_GenericGetAttr(obj.as_ptr(), name.as_ptr()))
    }
}

/// Reads and checks the fields of an `LLMRequest` the store uses, with the messages of
/// `LLMRequest.validate`; the request itself becomes the payload.
pub(crate) fn extract_request(request: &Bound<'_, PyAny>) -> PyResult<NewMessage<Payload>> {
    let py = request.py();
    if !request.is_instance(llm_request_class(py)?)? {
        return Err(invalid_request(py, format!("request must be an LLMRequest, got {}", repr_of(request))));
    }
    let id = attr(request, intern!(py, "id"))?;
    let request_id: RequestId = text_with(&id, "id", |text| RequestId::from(text))?;
    validate_request_id(&request_id, "id").map_err(|e| to_py_err(py, e))?;
    let priority = attr(request, intern!(py, "priority"))?;
    if priority.is_instance_of::<PyBool>() || !priority.is_instance_of::<PyInt>() {
        return Err(invalid_request(
            py,
            format!("priority must be a Priority or an int 0..3, got {}", repr_of(&priority)),
        ));
    }
    let priority_value = match priority.extract::<i64>() {
        Ok(p @ 0..=3) => p as u8,
        _ => {
            return Err(invalid_request(
                py,
                format!("priority must be within 0..3, got {}", repr_of(&priority)),
            ))
        }
    };
    let token_info = attr(request, intern!(py, "token_info"))?;
    if !token_info.is_instance(token_info_class(py)?)? {
        return Err(invalid_request(
            py,
            format!("token_info must be a TokenInfo, got {}", repr_of(&token_info)),
        ));
    }
    let tokens = token_count(&attr(&token_info, intern!(py, "estimated"))?, "token_info.estimated")?;
    let parts = token_parts_of(&token_info, tokens)?;
    let ept = attr(request, intern!(py, "expected_processing_time"))?;
    let expected_processing_seconds = if ept.is_none() {
        None
    } else {
        match float_arg(&ept)? {
            Some(s) if s.is_finite() && s >= 0.0 => Some(s),
            _ => {
                return Err(invalid_request(
                    py,
                    format!(
                        "expected_processing_time must be None or a finite number of seconds >= 0, got {}",
                        repr_of(&ept)
                    ),
                ))
            }
        }
    };
    let tenant = attr(request, intern!(py, "tenant"))?;
    let tenant = if tenant.is_none() {
        None
    } else if tenant.is_instance_of::<PyString>() {
        Some(text_arg(&tenant, "tenant")?.into())
    } else {
        return Err(invalid_request(py, format!("tenant must be None or a str, got {}", repr_of(&tenant))));
    };
    let deadline = attr(request, intern!(py, "deadline"))?;
    let deadline = if deadline.is_none() { None } else { Some(datetime_seconds(&deadline, "deadline")?) };
    // Not stored, but a field changed after construction is refused as `validate` would.
    let metadata = attr(request, intern!(py, "metadata"))?;
    if !metadata.is_instance_of::<PyDict>() {
        return Err(invalid_request(py, format!("metadata must be a dict, got {}", repr_of(&metadata))));
    }
    let created_at = attr(request, intern!(py, "created_at"))?;
    if !created_at.is_instance_of::<PyDateTime>() {
        return Err(invalid_request(
            py,
            format!("created_at must be a datetime, got {}", repr_of(&created_at)),
        ));
    }
    Ok(NewMessage {
        request_id,
        payload: Payload { object: request.clone().unbind(), input: InputPart::of(parts) },
        priority: priority_value,
        tokens,
        expected_processing_seconds,
        tenant,
        deadline,
    })
}

/// A number of seconds (an int or float, not a bool); an int too large for a float is refused.
pub(crate) fn seconds_arg(value: &Bound<'_, PyAny>, field: &str) -> PyResult<f64> {
    float_arg(value)?.ok_or_else(|| {
        invalid_request(value.py(), format!("{field} must be a number of seconds, got {}", repr_of(value)))
    })
}

pub(crate) fn handle_arg(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = value.py();
    match value.cast::<PyString>().ok().and_then(|s| s.to_str().ok().map(str::to_owned)) {
        Some(handle) => Ok(handle),
        None => Err(to_py_err(
            py,
            CoreError::ReceiptHandle(format!("receipt handle must be a str, got {}", repr_of(value))),
        )),
    }
}

/// A visibility timeout within [0, 43200] seconds, else `InvalidRequestError`.
pub(crate) fn visibility_timeout_arg(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let py = value.py();
    let seconds = seconds_arg(value, "visibility_timeout")
        .ok()
        .filter(|s| (0.0..=crate::store::MAX_VISIBILITY_TIMEOUT).contains(s));
    seconds.ok_or_else(|| {
        invalid_request(
            py,
            format!("visibility_timeout must be within [0, 43200] seconds, got {}", repr_of(value)),
        )
    })
}
