//! Cell keys of the candidate index.
//!
//! Visible messages are grouped into cells whose members share every score factor except the
//! wait time, up to a narrow band: the same priority, the same retry class (receive counts 0..=6
//! each, then 7+ together: `max(0.1, 0.7^n)` is exactly 0.1 from n = 7 on), a token class on a
//! log scale with eight classes per octave, and a processing-time class on the same scale. Within
//! a cell messages are kept oldest first, so a cell's best wait-time factor is its oldest
//! message's, and a cell's upper bound is cheap to compute from the class ranges.

/// Classes per doubling of the token estimate or of the processing time.
pub const CLASSES_PER_OCTAVE: f64 = 8.0;
/// Receive counts from this one on share a retry class (their retry factor is the 0.1 floor).
pub const RETRY_CLASSES: u8 = 7;
/// Processing-time class of every message expected to take at most one second (factor 1.0).
pub const TIME_CLASS_FAST: u8 = 0;
/// Processing-time class of every message expected to take over 30 s (factor 0.1).
pub const TIME_CLASS_SLOW: u8 = u8::MAX;

// Class ranges are widened by this relative margin so float rounding in log2 can never put a
// value outside the range its class reports; a wider range only loosens an upper bound.
const RANGE_MARGIN: f64 = 1e-9;

/// The cell a visible message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellKey {
    /// 0 (URGENT) ..= 3 (LOW).
    pub priority: u8,
    /// `min(receive_count, 7)`.
    pub retry_class: u8,
    /// 0 for a zero estimate, else `1 + floor(8 · log2(tokens))`.
    pub token_class: u16,
    /// `TIME_CLASS_FAST`, `TIME_CLASS_SLOW`, or `1 + floor(8 · log2(ms / 1000))` in between.
    pub time_class: u8,
}

/// Milliseconds the processing-time factor is computed from: the expected processing time when
/// given (0 is a value), else `tokens · 0.01` seconds, as the contract says.
pub fn processing_ms(tokens: u64, expected_processing_seconds: Option<f64>) -> f64 {
    expected_processing_seconds.map_or(tokens as f64 * 10.0, |seconds| seconds * 1000.0)
}

/// The token class of an estimate.
pub fn token_class(tokens: u64) -> u16 {
    if tokens == 0 {
        0
    } else {
        1 + ((tokens as f64).log2() * CLASSES_PER_OCTAVE).floor() as u16
    }
}

/// The processing-time class of a duration in milliseconds.
pub fn time_class(ms: f64) -> u8 {
    if ms <= 1000.0 {
        TIME_CLASS_FAST
    } else if ms > 30_000.0 {
        TIME_CLASS_SLOW
    } else {
        // log2(30) · 8 < 40, so the class stays well inside u8 and below TIME_CLASS_SLOW.
        1 + ((ms / 1000.0).log2() * CLASSES_PER_OCTAVE).floor() as u8
    }
}

impl CellKey {
    /// The cell of a message with these attributes.
    pub fn for_message(
        priority: u8,
        receive_count: u32,
        tokens: u64,
        expected_processing_seconds: Option<f64>,
    ) -> Self {
        Self {
            priority,
            retry_class: receive_count.min(u32::from(RETRY_CLASSES)) as u8,
            token_class: token_class(tokens),
            time_class: time_class(processing_ms(tokens, expected_processing_seconds)),
        }
    }

    /// An interval `[lo, hi]` that contains every token estimate of this cell.
    pub fn token_range(&self) -> (f64, f64) {
        if self.token_class == 0 {
            return (0.0, 0.0);
        }
        let c = f64::from(self.token_class);
        let lo = ((c - 1.0) / CLASSES_PER_OCTAVE).exp2() * (1.0 - RANGE_MARGIN);
        let hi = (c / CLASSES_PER_OCTAVE).exp2() * (1.0 + RANGE_MARGIN);
        (lo.max(1.0), hi)
    }

    /// An interval `[lo, hi]` of milliseconds that contains every processing time of this cell.
    pub fn time_range_ms(&self) -> (f64, f64) {
        match self.time_class {
            TIME_CLASS_FAST => (0.0, 1000.0),
            TIME_CLASS_SLOW => (30_000.0, f64::INFINITY),
            class => {
                let c = f64::from(class);
                let lo = 1000.0 * ((c - 1.0) / CLASSES_PER_OCTAVE).exp2() * (1.0 - RANGE_MARGIN);
                let hi = 1000.0 * (c / CLASSES_PER_OCTAVE).exp2() * (1.0 + RANGE_MARGIN);
                (lo.max(1000.0), hi.min(30_000.0))
            }
        }
    }
}

#[cfg(test)]
// Exact float equality is intended: these values are computed, not measured.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_classes_stop_at_seven() {
        assert_eq!(CellKey::for_message(0, 6, 1, None).retry_class, 6);
        assert_eq!(CellKey::for_message(0, 7, 1, None).retry_class, 7);
        assert_eq!(CellKey::for_message(0, 700, 1, None).retry_class, 7);
    }

    #[test]
    fn time_classes_at_the_factor_breakpoints() {
        assert_eq!(time_class(0.0), TIME_CLASS_FAST);
        assert_eq!(time_class(1000.0), TIME_CLASS_FAST);
        assert_eq!(time_class(1000.5), 1);
        assert_eq!(time_class(30_000.0), 1 + (30f64.log2() * 8.0).floor() as u8);
        assert_eq!(time_class(30_000.1), TIME_CLASS_SLOW);
        assert_eq!(processing_ms(50, None), 500.0);
        assert_eq!(processing_ms(50, Some(0.0)), 0.0);
    }

    proptest! {
        #[test]
        fn token_range_contains_its_members(tokens in 0u64..u64::MAX) {
            let key = CellKey::for_message(2, 0, tokens, None);
            let (lo, hi) = key.token_range();
            let t = tokens as f64;
            prop_assert!(lo <= t && t <= hi, "{tokens} outside [{lo}, {hi}]");
        }

        #[test]
        fn time_range_contains_its_members(ms in 0.0f64..100_000.0) {
            let key = CellKey::for_message(2, 0, 0, Some(ms / 1000.0));
            let (lo, hi) = key.time_range_ms();
            let x = processing_ms(0, Some(ms / 1000.0));
            prop_assert!(lo <= x && x <= hi, "{x} outside [{lo}, {hi}]");
        }
    }
}
