//! The one place core errors become Python exceptions. The classes themselves are defined once,
//! in `llm_queue_dispatcher/errors.py`, and fetched here, so Rust raises the very same classes.

use pyo3::call::PyCallArgs;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::errors::CoreError;

macro_rules! python_error_class {
    ($fn_name:ident, $class:literal) => {
        /// The Python class of the same name in `llm_queue_dispatcher.errors`.
        fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
            static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CLASS.import(py, "llm_queue_dispatcher.errors", $class)
        }
    };
}

python_error_class!(invalid_config_error, "InvalidConfigError");
python_error_class!(invalid_request_error, "InvalidRequestError");
python_error_class!(duplicate_request_error, "DuplicateRequestError");
python_error_class!(receipt_handle_error, "ReceiptHandleError");
python_error_class!(message_state_error, "MessageStateError");
python_error_class!(unknown_request_error, "UnknownRequestError");
python_error_class!(rate_limit_error, "RateLimitError");
python_error_class!(storage_error, "StorageError");

fn instantiate<'py, A: PyCallArgs<'py>>(class: PyResult<&Bound<'py, PyType>>, args: A) -> PyErr {
    match class.and_then(|class| class.call1(args)) {
        Ok(instance) => PyErr::from_value(instance),
        Err(err) => err,
    }
}

/// Builds the Python exception for a core error; the caller must be attached to the interpreter.
pub fn to_py_err(py: Python<'_>, error: CoreError) -> PyErr {
    match error {
        CoreError::InvalidConfig(msg) => instantiate(invalid_config_error(py), (msg,)),
        CoreError::InvalidRequest(msg) => instantiate(invalid_request_error(py), (msg,)),
        CoreError::DuplicateRequest(msg) => instantiate(duplicate_request_error(py), (msg,)),
        CoreError::ReceiptHandle(msg) => instantiate(receipt_handle_error(py), (msg,)),
        CoreError::MessageState(msg) => instantiate(message_state_error(py), (msg,)),
        CoreError::UnknownRequest(msg) => instantiate(unknown_request_error(py), (msg,)),
        CoreError::RateLimit { reason, available_in } => {
            instantiate(rate_limit_error(py), (reason, available_in))
        }
        CoreError::Storage(msg) => instantiate(storage_error(py), (msg,)),
    }
}

impl From<CoreError> for PyErr {
    fn from(error: CoreError) -> Self {
        // Attaching is free when the thread is already attached, which is always the case on
        // the paths that return a CoreError to Python.
        Python::attach(|py| to_py_err(py, error))
    }
}
