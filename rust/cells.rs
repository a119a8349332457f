//! Cell keys of the candidate index, and the processing-time key of a message.
//!
//! Visible messages are grouped into cells whose members share every score factor but the wait
//! time, the budget factors and the processing-time factor, up to a narrow band: the same
//! priority, the same retry class (receive counts 0..=6 each, then 7+ together: `max(0.1,
//! 0.7^n)` is exactly 0.1 from n = 7 on) and a token class on a log scale with eight classes per
//! octave. The processing time is not part of the key: an explicit expected time is independent
//! of the estimate, and a key per time band multiplied the cells by forty. Instead each cell
//! tracks its best (smallest) processing-time key, which bounds the factor exactly.

use std::sync::OnceLock;

/// Classes per doubling of the token estimate.
pub const CLASSES_PER_OCTAVE: f64 = 8.0;
/// Receive counts from this one on share a retry class (their retry factor is the 0.1 floor).
pub const RETRY_CLASSES: u8 = 7;

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
}

/// Milliseconds the processing-time factor is computed from: the expected processing time when
/// given (0 is a value), else `tokens · 0.01` seconds, as the contract says.
pub fn processing_ms(tokens: u64, expected_processing_seconds: Option<f64>) -> f64 {
    expected_processing_seconds.map_or(tokens as f64 * 10.0, |seconds| seconds * 1000.0)
}

/// The processing time in ms clamped to the sloped part of its factor, [1 s, 30 s + 1 ms]:
/// equal keys have equal factors, and a smaller key never has a smaller factor. As bits, since
/// positive floats order like their bit patterns.
pub fn time_key(tokens: u64, expected_processing_seconds: Option<f64>) -> u64 {
    processing_ms(tokens, expected_processing_seconds).clamp(1000.0, 30_001.0).to_bits()
}

/// The token class of an estimate.
pub fn token_class(tokens: u64) -> u16 {
    if tokens == 0 {
        0
    } else {
        1 + ((tokens as f64).log2() * CLASSES_PER_OCTAVE).floor() as u16
    }
}

// `token_class(u64::MAX)` = 1 + floor(8 · 64) = 513.
pub(crate) const MAX_TOKEN_CLASS: u16 = 513;

fn compute_token_range(token_class: u16) -> (f64, f64) {
    if token_class == 0 {
        return (0.0, 0.0);
    }
    let c = f64::from(token_class);
    let lo = ((c - 1.0) / CLASSES_PER_OCTAVE).exp2() * (1.0 - RANGE_MARGIN);
    let hi = (c / CLASSES_PER_OCTAVE).exp2() * (1.0 + RANGE_MARGIN);
    (lo.max(1.0), hi)
}

impl CellKey {
    /// The cell of a message with these attributes.
    pub fn for_message(priority: u8, receive_count: u32, tokens: u64) -> Self {
        Self {
            priority,
            retry_class: receive_count.min(u32::from(RETRY_CLASSES)) as u8,
            token_class: token_class(tokens),
        }
    }

    /// The first and last key of `priority`, for range queries.
    pub fn priority_range(priority: u8) -> (Self, Self) {
        (
            Self { priority, retry_class: 0, token_class: 0 },
            Self { priority, retry_class: u8::MAX, token_class: u16::MAX },
        )
    }

    /// An interval `[lo, hi]` that contains every token estimate of this cell.
    pub fn token_range(&self) -> (f64, f64) {
        // Selection asks for every cell's range on every dequeue: look it up, not exp2 it.
        static RANGES: OnceLock<Vec<(f64, f64)>> = OnceLock::new();
        let ranges = RANGES.get_or_init(|| (0..=MAX_TOKEN_CLASS).map(compute_token_range).collect());
        ranges
            .get(usize::from(self.token_class))
            .copied()
            .unwrap_or_else(|| compute_token_range(self.token_class))
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
        assert_eq!(CellKey::for_message(0, 6, 1).retry_class, 6);
        assert_eq!(CellKey::for_message(0, 7, 1).retry_class, 7);
        assert_eq!(CellKey::for_message(0, 700, 1).retry_class, 7);
    }

    #[test]
    fn time_keys_clamp_to_the_sloped_part() {
        assert_eq!(processing_ms(50, None), 500.0);
        assert_eq!(processing_ms(50, Some(0.0)), 0.0);
        assert_eq!(time_key(50, Some(0.0)), time_key(0, Some(1.0)));
        assert_eq!(time_key(0, Some(31.0)), time_key(0, Some(3600.0)));
        assert!(time_key(0, Some(2.0)) < time_key(0, Some(2.5)));
        assert!(time_key(0, Some(30.0)) < time_key(0, Some(30.5)));
    }

    proptest! {
        #[test]
        fn token_range_contains_its_members(tokens in 0u64..u64::MAX) {
            let key = CellKey::for_message(2, 0, tokens);
            let (lo, hi) = key.token_range();
            let t = tokens as f64;
            prop_assert!(lo <= t && t <= hi, "{tokens} outside [{lo}, {hi}]");
        }

        #[test]
        fn time_keys_order_like_their_times(a in 0.0f64..100.0, b in 0.0f64..100.0) {
            if a <= b {
                prop_assert!(time_key(0, Some(a)) <= time_key(0, Some(b)));
            }
        }
    }
}
