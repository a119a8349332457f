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
    #[pyo3(signature = (weights, custom_weights, max_candidates, *, urgent_first=false, urgent_reserve=None))]
    fn new(
        weights: [f64; 6],
        custom_weights: Vec<f64>,
        max_candidates: usize,
        urgent_first: bool,
        urgent_reserve: Option<f64>,
    ) -> PyResult<Self> {
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
        if urgent_reserve.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
            return Err(CoreError::InvalidConfig(format!(
                "urgent_reserve must be None or a count >= 0, got {urgent_reserve:?}"
            ))
            .into());
        }
        let weights = Weights::from_array(weights).with_urgent(urgent_first, urgent_reserve);
        Ok(Self { weights, custom_weights, max_candidates })
    }

    /// The six weights in factor order.
    #[getter]
    fn weights(&self) -> [f64; 6] {
        self.weights.as_array()
    }

    fn __repr__(&self) -> String {
        format!(
            "ScoringParams(weights={:?}, custom_weights={:?}, max_candidates={}, urgent_first={}, urgent_reserve={:?})",
            self.weights.as_array(),
            self.custom_weights,
            self.max_candidates,
            if self.weights.urgent_first { "True" } else { "False" },
            self.weights.urgent_reserve,
        )
    }
}
