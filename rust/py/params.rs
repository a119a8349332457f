//! `ScoringParams`: a dispatcher's validated scoring parameters, built once.

use pyo3::prelude::*;

use crate::errors::CoreError;
use crate::scoring::{validate_weight, Weights, FACTOR_NAMES};

/// Validated scoring parameters of a dispatcher, built once.
#[pyclass(module = "llm_queue_dispatcher._core", name = "ScoringParams", frozen)]
pub struct PyScoringParams {
    pub(crate) weights: Weights,
    pub(crate) custom_weights: Vec<f64>,
    pub(crate) max_candidates: usize,
}

#[pymethods]
impl PyScoringParams {
    #[new]
    #[pyo3(signature = (weights, custom_weights, max_candidates))]
    fn new(weights: [f64; 6], custom_weights: Vec<f64>, max_candidates: usize) -> PyResult<Self> {
        for (name, value) in FACTOR_NAMES.iter().zip(weights) {
            validate_weight(name, value)?;
        }
        for (i, &value) in custom_weights.iter().enumerate() {
            validate_weight(&format!("of custom scorer {i}"), value)?;
        }
        if max_candidates == 0 {
            return Err(
                CoreError::InvalidConfig("max_candidates_to_evaluate must be >= 1, got 0".into()).into()
            );
        }
        Ok(Self { weights: Weights::from_array(weights), custom_weights, max_candidates })
    }

    /// The six weights in factor order.
    #[getter]
    fn weights(&self) -> [f64; 6] {
        self.weights.as_array()
    }

    fn __repr__(&self) -> String {
        format!(
            "ScoringParams(weights={:?}, custom_weights={:?}, max_candidates={})",
            self.weights.as_array(),
            self.custom_weights,
            self.max_candidates
        )
    }
}
