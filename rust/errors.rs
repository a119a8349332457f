//! The one error type of the pure-Rust core; `py::errors` maps it onto the Python hierarchy.

use thiserror::Error;

/// Every failure the core reports. Each variant maps to one class of `llm_queue_dispatcher.errors`.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CoreError {
    /// A configuration value is out of range or inconsistent.
    #[error("{0}")]
    InvalidConfig(String),
    /// An argument of a call is malformed (negative tokens, empty id, bad timeout…).
    #[error("{0}")]
    InvalidRequest(String),
    /// A request id is already queued and not yet deleted.
    #[error("{0}")]
    DuplicateRequest(String),
    /// A receipt handle is unknown or no longer current.
    #[error("{0}")]
    ReceiptHandle(String),
    /// A message was marked twice, or used after it was settled.
    #[error("{0}")]
    MessageState(String),
    /// A request id the rate limiter has no record of.
    #[error("{0}")]
    UnknownRequest(String),
    /// The rate limiter refused; `available_in` is the exact wait in seconds (may be infinite).
    #[error("rate limited ({reason}): available in {available_in} s")]
    RateLimit { reason: &'static str, available_in: f64 },
    /// A storage backend failed; the message is not lost.
    #[error("{0}")]
    Storage(String),
}

/// Result alias of the pure-Rust core.
pub type CoreResult<T> = Result<T, CoreError>;
