//! Rust core of `llm_queue_dispatcher`.
//!
//! The pure-Rust modules (`clock`, `errors`, and the ones that follow) know nothing of Python and
//! are tested with `cargo test`; [`py`] holds the thin `PyO3` layer that exposes them as
//! `llm_queue_dispatcher._core`.

pub mod buffer;
pub mod cells;
pub mod clock;
pub mod deadlines;
pub mod dispatch;
pub mod errors;
pub mod fair;
pub mod index;
pub mod ledger;
pub mod policy;
pub mod py;
pub mod scoring;
pub mod select;
pub mod store;
pub mod throttle;

pub use py::_core;
