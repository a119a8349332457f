//! The six score factors of the contract, their weights, and upper bounds over a cell.
//!
//! Each factor is in [0, 1] before weighting. `available` is the limiter's available TPM (`A`),
//! `u = tokens / A`. Only the wait-time factor changes with time for a given message, and it
//! never decreases as the message ages: that is what makes the exact search of `select` cheap.

use crate::cells::{processing_ms, CellKey};
use crate::errors::{CoreError, CoreResult};

/// Names of the six factors, in the order of `Weights::as_array` and of a breakdown.
pub const FACTOR_NAMES: [&str; 6] =
    ["priority", "efficiency", "wait_time", "retry", "token_fit", "processing_time"];

// Scores and bounds are sums of six products; a bound computed from class endpoints may round
// differently from the exact score of a member by a few ulps. Bounds are raised by this much so
// they stay upper bounds.
pub const BOUND_SLACK: f64 = 1e-9;

/// Priority factor by priority value (URGENT, HIGH, NORMAL, LOW).
pub const PRIORITY_FACTOR: [f64; 4] = [1.0, 0.7, 0.4, 0.1];
/// Seconds of waiting after which the wait-time factor is 1, by priority.
pub const MAX_WAIT_SECONDS: [f64; 4] = [10.0, 30.0, 60.0, 300.0];

/// How the score policy ranks: the weights of the six factors, and the two rules that sit
/// above the weighted sum — whether URGENT ranks first, and the URGENT reserve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of the priority factor.
    pub priority: f64,
    /// Weight of the budget-efficiency factor.
    pub efficiency: f64,
    /// Weight of the wait-time factor.
    pub wait_time: f64,
    /// Weight of the retry factor.
    pub retry: f64,
    /// Weight of the token-fit factor.
    pub token_fit: f64,
    /// Weight of the processing-time factor.
    pub processing_time: f64,
    /// Whether every URGENT message ranks above every other, whatever the scores (a tier above
    /// the weighted sum; among URGENT messages the score decides). False: URGENT is the
    /// priority factor's 1.0 among six weighted factors, the TypeScript library's rule.
    pub urgent_first: bool,
    /// Tokens a non-URGENT winner leaves in the bucket for URGENT requests while
    /// `urgent_first`; None: automatic (`policy::UrgentReserve`). Without `urgent_first`, none.
    pub urgent_reserve: Option<f64>,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            priority: 0.25,
            efficiency: 0.20,
            wait_time: 0.20,
            retry: 0.10,
            token_fit: 0.15,
            processing_time: 0.10,
            urgent_first: false,
            urgent_reserve: None,
        }
    }
}

impl Weights {
    /// From an array in `FACTOR_NAMES` order (URGENT as one weighted factor, no reserve).
    pub fn from_array(values: [f64; 6]) -> Self {
        let [priority, efficiency, wait_time, retry, token_fit, processing_time] = values;
        Self {
            priority,
            efficiency,
            wait_time,
            retry,
            token_fit,
            processing_time,
            urgent_first: false,
            urgent_reserve: None,
        }
    }

    /// These weights with URGENT first (or not) and the URGENT reserve (None: automatic).
    #[must_use]
    pub fn with_urgent(self, urgent_first: bool, urgent_reserve: Option<f64>) -> Self {
        Self { urgent_first, urgent_reserve, ..self }
    }

    /// The tier of a message of `priority`: 1 for URGENT with `urgent_first`, else 0. A higher
    /// tier ranks first whatever the scores.
    pub fn tier(&self, priority: u8) -> u8 {
        u8::from(self.urgent_first && priority == 0)
    }

    /// The weights in `FACTOR_NAMES` order.
    pub fn as_array(&self) -> [f64; 6] {
        [self.priority, self.efficiency, self.wait_time, self.retry, self.token_fit, self.processing_time]
    }
}

/// Checks that a weight is a finite number >= 0 (a negative weight would break the bounds).
pub fn validate_weight(name: &str, value: f64) -> CoreResult<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(CoreError::InvalidConfig(format!("weight {name} must be a finite number >= 0, got {value}")))
    }
}

/// Priority factor; `priority` is 0..=3.
pub fn priority_factor(priority: u8) -> f64 {
    PRIORITY_FACTOR[usize::from(priority.min(3))]
}

/// How well `tokens` uses the available budget: best when it takes 70–90 % of it.
pub fn efficiency_factor(tokens: f64, available: f64) -> f64 {
    if available <= 0.0 {
        return 0.0;
    }
    efficiency_of_share(tokens / available)
}

fn efficiency_of_share(u: f64) -> f64 {
    if u > 1.0 {
        0.0
    } else if (0.7..=0.9).contains(&u) {
        1.0
    } else if u > 0.9 {
        0.9
    } else {
        u / 0.7
    }
}

/// Wait-time factor: `min(age / max_wait, 1)`, square-rooted for URGENT.
pub fn wait_time_factor(age: f64, priority: u8) -> f64 {
    let p = usize::from(priority.min(3));
    let share = (age.max(0.0) / MAX_WAIT_SECONDS[p]).min(1.0);
    if p == 0 {
        share.sqrt()
    } else {
        share
    }
}

/// Retry factor: 1 for a first delivery, then `max(0.1, 0.7^receive_count)`.
pub fn retry_factor(receive_count: u32) -> f64 {
    if receive_count == 0 {
        1.0
    } else {
        // 0.7^7 is already below the 0.1 floor; min(64) keeps the exponent small.
        0.7f64.powi(i32::try_from(receive_count.min(64)).unwrap_or(64)).max(0.1)
    }
}

/// Token-fit factor: rises to 1 at 10 % of the budget, flat to 50 %, then falls to 0.8 at 100 %.
pub fn token_fit_factor(tokens: f64, available: f64) -> f64 {
    if available <= 0.0 {
        return 0.0;
    }
    token_fit_of_share(tokens / available)
}

fn token_fit_of_share(u: f64) -> f64 {
    if u > 1.0 {
        0.0
    } else if u < 0.1 {
        10.0 * u
    } else if u <= 0.5 {
        1.0
    } else {
        1.0 - (u - 0.5) * 0.4
    }
}

/// Processing-time factor of a duration in milliseconds: 1 up to 1 s, down to 0.1 past 30 s.
pub fn processing_time_factor(ms: f64) -> f64 {
    if ms <= 1000.0 {
        1.0
    } else if ms <= 5000.0 {
        1.0 - (ms - 1000.0) / 4000.0 * 0.3
    } else if ms <= 30_000.0 {
        0.7 - (ms - 5000.0) / 25_000.0 * 0.6
    } else {
        0.1
    }
}

/// What the score of a message depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageTraits {
    /// 0 (URGENT) ..= 3 (LOW).
    pub priority: u8,
    /// Deliveries so far.
    pub receive_count: u32,
    /// Estimated tokens.
    pub tokens: u64,
    /// Expected processing time in seconds, if given.
    pub expected_processing_seconds: Option<f64>,
    /// When it was enqueued, in the store clock's seconds.
    pub enqueued_at: f64,
}

/// The six weighted factors of a message at `now` under budget `available`.
pub fn weighted_factors(weights: &Weights, traits: &MessageTraits, now: f64, available: f64) -> [f64; 6] {
    let tokens = traits.tokens as f64;
    [
        weights.priority * priority_factor(traits.priority),
        weights.efficiency * efficiency_factor(tokens, available),
        weights.wait_time * wait_time_factor(now - traits.enqueued_at, traits.priority),
        weights.retry * retry_factor(traits.receive_count),
        weights.token_fit * token_fit_factor(tokens, available),
        weights.processing_time
            * processing_time_factor(processing_ms(traits.tokens, traits.expected_processing_seconds)),
    ]
}

/// Sum of the weighted factors, in a fixed order so bounds and scores round alike.
pub fn total(factors: &[f64; 6]) -> f64 {
    factors.iter().sum()
}

/// The part of every bound below that is fixed by the cell: priority, retry (the class is the
/// receive count up to 6, and 7 stands for every count whose factor is the 0.1 floor), and the
/// processing-time factor of `best_time_ms`, the smallest processing time among the members
/// (the factor never rises with the duration), plus the slack that keeps bounds above scores.
fn fixed_part(weights: &Weights, key: CellKey, best_time_ms: f64) -> f64 {
    weights.priority * priority_factor(key.priority)
        + weights.retry * retry_factor(u32::from(key.retry_class))
        + weights.processing_time * processing_time_factor(best_time_ms)
        + BOUND_SLACK
}

/// The score of every member of a group (one estimate `tokens` in cell `key`, best processing
/// time `best_time_ms`) but for the wait factor: exact for its best run, an upper bound for the
/// others.
pub fn group_bound(weights: &Weights, key: &CellKey, tokens: u64, best_time_ms: f64, available: f64) -> f64 {
    let tokens = tokens as f64;
    fixed_part(weights, *key, best_time_ms)
        + weights.efficiency * efficiency_factor(tokens, available)
        + weights.token_fit * token_fit_factor(tokens, available)
}

/// `group_bound` for the groups of one cell, its priority and retry parts computed once (the
/// same sums in the same order: the same values to the bit).
#[derive(Debug, Clone, Copy)]
pub struct GroupBounds {
    weights: Weights,
    priority_and_retry: f64,
    available: f64,
}

impl GroupBounds {
    /// For the groups of the cell `key` under budget `available`.
    pub fn new(weights: &Weights, key: &CellKey, available: f64) -> Self {
        Self { weights: *weights, priority_and_retry: priority_and_retry(weights, key), available }
    }

    /// `group_bound` of the group of estimate `tokens` whose best processing time is
    /// `best_time_ms`.
    pub fn bound(&self, tokens: u64, best_time_ms: f64) -> f64 {
        let (weights, tokens) = (&self.weights, tokens as f64);
        self.priority_and_retry
            + weights.processing_time * processing_time_factor(best_time_ms)
            + BOUND_SLACK
            + weights.efficiency * efficiency_factor(tokens, self.available)
            + weights.token_fit * token_fit_factor(tokens, self.available)
    }

    /// The bound of a group of estimate `tokens` whose members' weighted processing-time and
    /// wait factors add up to at most `time_and_wait`.
    pub fn bound_with(&self, tokens: u64, time_and_wait: f64) -> f64 {
        let (weights, tokens) = (&self.weights, tokens as f64);
        self.priority_and_retry
            + time_and_wait
            + BOUND_SLACK
            + weights.efficiency * efficiency_factor(tokens, self.available)
            + weights.token_fit * token_fit_factor(tokens, self.available)
    }
}

/// The weighted priority and retry factors of every member of the cell `key` (its retry class
/// 7 stands for every receive count whose factor is the 0.1 floor).
pub fn priority_and_retry(weights: &Weights, key: &CellKey) -> f64 {
    weights.priority * priority_factor(key.priority)
        + weights.retry * retry_factor(u32::from(key.retry_class))
}

/// The part of a cell's upper bound that does not depend on time: `fixed_part` and the best
/// efficiency + token fit over the cell's token range (capped at `max_tokens`, the largest
/// estimate the limiter admits now). None when no member of the cell can be admitted.
pub fn static_cell_bound(
    weights: &Weights,
    key: &CellKey,
    best_time_ms: f64,
    available: f64,
    max_tokens: f64,
) -> Option<f64> {
    let budget_part = budget_bound(weights, key, available, max_tokens)?;
    Some(fixed_part(weights, *key, best_time_ms) + budget_part)
}

/// The best efficiency + token fit over the token range of cells of `key`'s token class
/// (capped at `max_tokens`), the budget part of `static_cell_bound`: the same for every cell
/// of one token class. None when no estimate of the class can be admitted.
pub fn budget_bound(weights: &Weights, key: &CellKey, available: f64, max_tokens: f64) -> Option<f64> {
    let (lo, hi) = key.token_range();
    budget_bound_over(weights, lo, hi, available, max_tokens)
}

/// The best efficiency + token fit of any estimate in `[lo, hi]` (capped at `max_tokens`);
/// None when none can be admitted. `budget_bound` of a token class is this over its range; over
/// the union of several classes' ranges it bounds each of theirs.
pub fn budget_bound_over(
    weights: &Weights,
    lo: f64,
    hi: f64,
    available: f64,
    max_tokens: f64,
) -> Option<f64> {
    if lo > max_tokens {
        return None;
    }
    let hi = hi.min(max_tokens);
    if available <= 0.0 {
        return Some(0.0);
    }
    // Efficiency and token fit are piecewise linear in u with breakpoints 0.1, 0.5, 0.7, 0.9
    // and 1 (and only drop, never rise, across 0.9 and 1): the maximum over an interval is at
    // one of its ends or at a breakpoint inside it.
    let (u_lo, u_hi) = (lo / available, hi / available);
    if u_hi < 0.1 {
        // Both rise with u below the first breakpoint (the common case: a small share).
        return Some(budget_at(weights, u_hi));
    }
    Some(
        [u_lo, u_hi, 0.1, 0.5, 0.7, 0.9, 1.0]
            .into_iter()
            .filter(|u| (u_lo..=u_hi).contains(u))
            .map(|u| weights.efficiency * efficiency_of_share(u) + weights.token_fit * token_fit_of_share(u))
            .fold(0.0, f64::max),
    )
}

/// Weighted efficiency + token fit of a share `u` of the available tokens.
fn budget_at(weights: &Weights, u: f64) -> f64 {
    weights.efficiency * efficiency_of_share(u) + weights.token_fit * token_fit_of_share(u)
}

/// The least efficiency + token fit of any estimate of `key`'s token class, when every estimate
/// of the class is admissible (None otherwise): a part of the score every member of a cell of
/// that class reaches. Exact below the first breakpoint (both parts rise with the share, so the
/// least is at the class's smallest estimate), 0 above it.
pub fn budget_floor(weights: &Weights, key: &CellKey, available: f64, max_tokens: f64) -> Option<f64> {
    let (lo, hi) = key.token_range();
    if hi > max_tokens {
        return None;
    }
    if available <= 0.0 {
        return Some(0.0);
    }
    let (u_lo, u_hi) = (lo / available, hi / available);
    Some(if u_hi < 0.1 { budget_at(weights, u_lo) } else { 0.0 })
}

/// `static_cell_bound` from a budget part already computed by `budget_bound`.
pub fn static_cell_bound_with(weights: &Weights, key: &CellKey, best_time_ms: f64, budget_part: f64) -> f64 {
    fixed_part(weights, *key, best_time_ms) + budget_part
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the factor values at breakpoints are exact
mod tests {
    use super::*;
    use crate::cells::CellKey;
    use proptest::prelude::*;

    #[test]
    fn factor_values_from_the_contract() {
        assert_eq!(PRIORITY_FACTOR, [1.0, 0.7, 0.4, 0.1]);
        assert_eq!(efficiency_factor(800.0, 1000.0), 1.0);
        assert_eq!(efficiency_factor(950.0, 1000.0), 0.9);
        assert!((efficiency_factor(350.0, 1000.0) - 0.5).abs() < 1e-12);
        assert_eq!(efficiency_factor(1001.0, 1000.0), 0.0);
        assert_eq!(efficiency_factor(10.0, 0.0), 0.0);
        assert!((wait_time_factor(2.5, 0) - 0.5).abs() < 1e-12);
        assert_eq!(wait_time_factor(15.0, 1), 0.5);
        assert_eq!(wait_time_factor(1e9, 3), 1.0);
        assert_eq!(wait_time_factor(-5.0, 2), 0.0);
        assert_eq!(retry_factor(0), 1.0);
        assert!((retry_factor(2) - 0.49).abs() < 1e-12);
        assert_eq!(retry_factor(7), 0.1);
        assert!((token_fit_factor(50.0, 1000.0) - 0.5).abs() < 1e-12);
        assert_eq!(token_fit_factor(300.0, 1000.0), 1.0);
        assert!((token_fit_factor(1000.0, 1000.0) - 0.8).abs() < 1e-12);
        assert!((processing_time_factor(3000.0) - 0.85).abs() < 1e-12);
        assert!((processing_time_factor(17_500.0) - 0.4).abs() < 1e-12);
        assert_eq!(processing_time_factor(30_001.0), 0.1);
    }

    fn weights() -> impl Strategy<Value = Weights> {
        proptest::array::uniform6(0.0f64..1.0).prop_map(Weights::from_array)
    }

    proptest! {
        // The per-cell form of `group_bound` gives the same values, to the bit.
        #[test]
        fn group_bounds_equal_group_bound(
            w in weights(),
            priority in 0u8..4,
            receive_count in 0u32..12,
            tokens in 0u64..200_000,
            best_time_ms in 1000.0f64..30_001.0,
            available in 0.0f64..100_000.0,
        ) {
            let key = CellKey::for_message(priority, receive_count, tokens);
            let bounds = GroupBounds::new(&w, &key, available);
            prop_assert_eq!(
                bounds.bound(tokens, best_time_ms).to_bits(),
                group_bound(&w, &key, tokens, best_time_ms, available).to_bits()
            );
        }

        // Every member of a cell reaches its class's budget floor: efficiency + token fit of its
        // own estimate are at least the floor (when the floor is known: every estimate of the
        // class admissible), small shares and large ones.
        #[test]
        fn budget_floor_is_reached_by_every_member(
            w in weights(),
            tokens in 0u64..200_000,
            available in prop_oneof![0.0f64..100_000.0, 1e6f64..1e12],
        ) {
            let key = CellKey::for_message(0, 0, tokens);
            let traits = MessageTraits { priority: 0, receive_count: 0, tokens, expected_processing_seconds: None, enqueued_at: 0.0 };
            let f = weighted_factors(&w, &traits, 0.0, available);
            match budget_floor(&w, &key, available, available) {
                Some(floor) => prop_assert!(floor <= f[1] + f[4], "{floor} > {}", f[1] + f[4]),
                None => prop_assert!(key.token_range().1 > available),
            }
        }

        // The budget bound over several token classes' ranges is at least each class's own.
        #[test]
        fn budget_bound_over_classes_covers_each_class(
            w in weights(),
            tokens in proptest::collection::vec(0u64..200_000, 1..6),
            available in prop_oneof![0.0f64..100_000.0, 1e6f64..1e12],
            max_tokens in prop_oneof![0.0f64..200_000.0, Just(f64::INFINITY)],
        ) {
            let keys: Vec<CellKey> = tokens.iter().map(|&t| CellKey::for_message(1, 0, t)).collect();
            let lo = keys.iter().map(|k| k.token_range().0).fold(f64::INFINITY, f64::min);
            let hi = keys.iter().map(|k| k.token_range().1).fold(f64::NEG_INFINITY, f64::max);
            let over = budget_bound_over(&w, lo, hi, available, max_tokens);
            for key in &keys {
                if let Some(own) = budget_bound(&w, key, available, max_tokens) {
                    let over = over.expect("a class admissible, so the union is");
                    prop_assert!(over >= own, "{over} < {own} for {key:?}");
                }
            }
        }

        // The static part of a cell's bound is at least the static part of every member's score.
        #[test]
        fn static_bound_covers_every_member(
            w in weights(),
            priority in 0u8..4,
            receive_count in 0u32..12,
            tokens in 0u64..200_000,
            ept in proptest::option::of(0.0f64..60.0),
            available in 0.0f64..100_000.0,
        ) {
            let key = CellKey::for_message(priority, receive_count, tokens);
            let best_time_ms = crate::cells::processing_ms(tokens, ept);
            let traits = MessageTraits { priority, receive_count, tokens, expected_processing_seconds: ept, enqueued_at: 0.0 };
            let f = weighted_factors(&w, &traits, 0.0, available);
            let exact_static = f[0] + f[1] + f[3] + f[4] + f[5];
            match static_cell_bound(&w, &key, best_time_ms, available, available) {
                Some(bound) => prop_assert!(bound >= exact_static, "{bound} < {exact_static}"),
                None => prop_assert!(tokens as f64 > available),
            }
        }
    }
}
