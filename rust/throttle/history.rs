//! The consumption history of a throttle: one record per grant, kept for `adjust_consumption`,
//! `release` and the metrics, with running totals so the metrics cost O(1).

use super::{Charge, Throttle};

/// How close an estimate was: `min / max` of the two counts, 1 when both are 0 and 0 when only
/// one is (nothing estimated for a call that used tokens is a miss, not a perfect guess). One
/// formula for the efficiency and the estimation accuracy metrics. (An adjustment to 0 tokens is
/// a refund, not a measurement: it records no actual count, so it never reaches this formula.)
pub(super) fn estimation_accuracy(estimated: u64, actual: u64) -> f64 {
    match (estimated, actual) {
        (0, 0) => 1.0,
        (0, _) | (_, 0) => 0.0,
        (e, a) => e.min(a) as f64 / e.max(a) as f64,
    }
}

/// Sums over the kept history, updated as records come and go, so metrics cost O(1) however
/// long the history is.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HistoryTotals {
    /// Records that count (not released).
    pub(super) live: usize,
    pub(super) tokens: u128,
    pub(super) adjusted: usize,
    pub(super) accuracy_sum: f64,
}

impl HistoryTotals {
    pub(super) fn add<M>(&mut self, record: &ConsumptionRecord<M>) {
        self.live += 1;
        self.tokens += u128::from(record.tokens);
        if let Some(actual) = record.actual_tokens {
            self.adjusted += 1;
            self.accuracy_sum += estimation_accuracy(record.estimated_tokens, actual);
        }
    }

    pub(super) fn remove<M>(&mut self, record: &ConsumptionRecord<M>) {
        self.live -= 1;
        self.tokens -= u128::from(record.tokens);
        if let Some(actual) = record.actual_tokens {
            self.adjusted -= 1;
            self.accuracy_sum -= estimation_accuracy(record.estimated_tokens, actual);
        }
        if self.adjusted == 0 {
            // Float dust from the subtractions must not outlive the records it came from.
            self.accuracy_sum = 0.0;
        }
    }
}

/// One successful `consume`, kept for `adjust_consumption` and the metrics.
#[derive(Debug, Clone)]
pub struct ConsumptionRecord<M> {
    /// When it was consumed.
    pub timestamp: f64,
    /// Tokens it counts for: the estimate, then the actual count once adjusted.
    pub tokens: u64,
    /// The caller's request id.
    pub request_id: String,
    /// The caller's metadata.
    pub metadata: M,
    /// The estimate it was consumed with.
    pub estimated_tokens: u64,
    /// The actual count, once adjusted.
    pub actual_tokens: Option<u64>,
    /// Debt taken on top of the estimate by this consume (of the token bucket).
    pub compensation_debt: f64,
    /// Tokens of an upward adjustment the token bucket could not pay (`warn` or `compensate`):
    /// counted in `tokens` but never taken, so `release` does not give them back.
    pub unpaid: f64,
    /// The part of `unpaid` that became debt (see `Charge::owed`).
    pub owed: f64,
    /// Given back whole by `release`: it no longer counts, and is kept only until it ages out.
    pub released: bool,
    /// Whether it holds a slot of `max_concurrent` (until adjusted, released or forgotten).
    pub holds_slot: bool,
    /// Its parts and its charges on the other token limits, when it has any: boxed, so the
    /// records of a throttle of requests and tokens alone stay as small as they were (thousands
    /// of them cycle through the history).
    pub extra: Option<Box<RecordExtra>>,
}

/// What a record of a request with parts, or of a throttle with other token limits, adds.
#[derive(Debug, Clone, Default)]
pub struct RecordExtra {
    /// The input and output tokens it counts for, when they were given: the estimate's parts,
    /// then the actual ones once adjusted with them (None after an adjustment without them).
    pub parts: Option<(u64, u64)>,
    /// The output tokens it reserved (the request's most output), when given: the provider
    /// stops there, so an adjustment without parts counts no more output than this.
    pub output_cap: Option<u64>,
    /// Its charge on each of the other token limits (itpm, otpm, tpd: those configured, in
    /// that order).
    pub charges: Vec<Charge>,
}

impl<M> ConsumptionRecord<M> {
    /// The input and output tokens it counts for, when given (see `RecordExtra::parts`).
    pub fn parts(&self) -> Option<(u64, u64)> {
        self.extra.as_ref().and_then(|extra| extra.parts)
    }
}

/// Figures of the consumption history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryStatistics {
    /// Records kept.
    pub count: usize,
    /// `total_tokens / count` (0 without records).
    pub average_tokens_per_request: f64,
    /// Sum of the records' token counts (actual where adjusted).
    pub total_tokens: u64,
    /// Mean of `min(est, act) / max(est, act)` over adjusted records (1 without any).
    pub estimation_accuracy: f64,
}

impl<M> Throttle<M> {
    /// The consumption records that count (not released), oldest first.
    pub fn history(&self) -> impl Iterator<Item = &ConsumptionRecord<M>> {
        self.history.iter().filter(|record| !record.released)
    }

    /// How many records count (not released).
    pub fn history_len(&self) -> usize {
        self.totals.live
    }

    /// Mean estimate accuracy over the last `efficiency_window_size` records: 1 without
    /// records, 0.85 when none has an actual count yet (the seed library's conventions).
    pub fn efficiency(&self) -> f64 {
        if self.totals.live == 0 {
            return 1.0;
        }
        let recent =
            self.history.iter().rev().filter(|r| !r.released).take(self.config.efficiency_window_size);
        let (sum, count) = recent
            .filter_map(|record| record.actual_tokens.map(|actual| (record.estimated_tokens, actual)))
            .fold((0.0, 0usize), |(sum, count), (estimated, actual)| {
                (sum + estimation_accuracy(estimated, actual), count + 1)
            });
        if count == 0 {
            0.85
        } else {
            sum / count as f64
        }
    }

    /// Count, totals and estimation accuracy of the history.
    pub fn history_statistics(&self) -> HistoryStatistics {
        let count = self.totals.live;
        let totals = self.totals;
        // Token totals stay far below 2^64 in any real history; saturate rather than wrap.
        let total_tokens = u64::try_from(totals.tokens).unwrap_or(u64::MAX);
        HistoryStatistics {
            count,
            average_tokens_per_request: if count == 0 { 0.0 } else { totals.tokens as f64 / count as f64 },
            total_tokens,
            estimation_accuracy: if totals.adjusted == 0 {
                1.0
            } else {
                (totals.accuracy_sum / totals.adjusted as f64).clamp(0.0, 1.0)
            },
        }
    }
}
