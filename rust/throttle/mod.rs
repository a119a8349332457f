//! The dual token-bucket rate limiter behind `LLMThrottle`, without Python.
//!
//! Semantics follow `@aid-on/llm-throttle` 1.0.1 (its `LLMThrottle` and `TokenBucket`), with the
//! changes the contract asks for: durations in seconds, an exact `available_in` that accounts for
//! both buckets and is infinite when a request can never fit, and all-or-nothing bad-input checks.
//! Every instant is an `f64` passed in by the caller, so the logic is deterministic under test.
//!
//! About 700 lines for one concept: the two buckets live in `bucket.rs` and the tests in
//! `tests.rs`; what stays here is the limiter's state machine (consume, adjust, release, debt,
//! penalty, provider ceilings, history, snapshots), whose steps share its invariants.

use std::collections::{HashMap, VecDeque};

use crate::errors::{CoreError, CoreResult};

mod bucket;

pub use bucket::{BucketState, TokenBucket};

// Debt below this many tokens is float dust from refunds and is forgotten.
const DEBT_DUST: f64 = 1e-9;

/// What `adjust_consumption` does when the bucket holds less than the extra tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjustmentFailureStrategy {
    /// Raise `RateLimitError`, take nothing.
    Strict,
    /// Empty the bucket and log a warning.
    Warn,
    /// Empty the bucket and carry the shortfall as debt into the next `consume`.
    Compensate,
}

impl AdjustmentFailureStrategy {
    /// Parses the contract's strategy names.
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "strict" => Ok(Self::Strict),
            "warn" => Ok(Self::Warn),
            "compensate" => Ok(Self::Compensate),
            other => Err(CoreError::InvalidConfig(format!(
                "adjustment_failure_strategy must be 'strict', 'warn' or 'compensate', got {other:?}"
            ))),
        }
    }

    /// The contract's name of this strategy.
    pub fn name(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Warn => "warn",
            Self::Compensate => "compensate",
        }
    }
}

/// How close an estimate was: `min / max` of the two counts, 1 when both are 0 and 0 when only
/// one is (nothing estimated for a call that used tokens is a miss, not a perfect guess). One
/// formula for the efficiency and the estimation accuracy metrics.
fn estimation_accuracy(estimated: u64, actual: u64) -> f64 {
    match (estimated, actual) {
        (0, 0) => 1.0,
        (0, _) | (_, 0) => 0.0,
        (e, a) => e.min(a) as f64 / e.max(a) as f64,
    }
}

/// Sums over the kept history, updated as records come and go, so metrics cost O(1) however
/// long the history is.
#[derive(Debug, Clone, Copy, Default)]
struct HistoryTotals {
    /// Records that count (not released).
    live: usize,
    tokens: u128,
    adjusted: usize,
    accuracy_sum: f64,
}

impl HistoryTotals {
    fn add<M>(&mut self, record: &ConsumptionRecord<M>) {
        self.live += 1;
        self.tokens += u128::from(record.tokens);
        if let Some(actual) = record.actual_tokens {
            self.adjusted += 1;
            self.accuracy_sum += estimation_accuracy(record.estimated_tokens, actual);
        }
    }

    fn remove<M>(&mut self, record: &ConsumptionRecord<M>) {
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

/// Validated settings of a throttle.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Requests per minute (refill rate of the request bucket · 60).
    pub rpm: f64,
    /// Tokens per minute (refill rate of the token bucket · 60).
    pub tpm: f64,
    /// Capacity of the request bucket; `rpm` when None.
    pub burst_rpm: Option<f64>,
    /// Capacity of the token bucket; `tpm` when None.
    pub burst_tpm: Option<f64>,
    /// What an adjustment that cannot be taken does.
    pub adjustment_failure_strategy: AdjustmentFailureStrategy,
    /// Most consumption records kept.
    pub max_history_records: usize,
    /// Seconds a consumption record is kept (and its request can be adjusted).
    pub history_retention: f64,
    /// Number of most recent records the efficiency metric looks at.
    pub efficiency_window_size: usize,
}

impl ThrottleConfig {
    /// Checks every field; the error names the field and the bad value.
    pub fn validate(&self) -> CoreResult<()> {
        let positive = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(CoreError::InvalidConfig(format!("{name} must be a finite number > 0, got {value}")))
            }
        };
        positive("rpm", self.rpm)?;
        positive("tpm", self.tpm)?;
        positive("history_retention", self.history_retention)?;
        for (name, burst, rate) in
            [("burst_rpm", self.burst_rpm, self.rpm), ("burst_tpm", self.burst_tpm, self.tpm)]
        {
            if let Some(burst) = burst {
                if !(burst.is_finite() && burst >= rate) {
                    return Err(CoreError::InvalidConfig(format!(
                        "{name} must be a finite number >= the rate ({rate}), got {burst}"
                    )));
                }
            }
        }
        if self.max_history_records == 0 {
            return Err(CoreError::InvalidConfig("max_history_records must be >= 1, got 0".into()));
        }
        if self.efficiency_window_size == 0 {
            return Err(CoreError::InvalidConfig("efficiency_window_size must be >= 1, got 0".into()));
        }
        Ok(())
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
    /// Debt taken on top of the estimate by this consume.
    pub compensation_debt: f64,
    /// Tokens of an upward adjustment the bucket could not pay (`warn` or `compensate`): counted
    /// in `tokens` but never taken, so `release` does not give them back.
    pub unpaid: f64,
    /// Given back whole by `release`: it no longer counts, and is kept only until it ages out.
    pub released: bool,
}

/// The key of one reservation made with [`Throttle::reserve`]: the sequence number of its
/// consumption record. A dispatcher keys every delivery's reservation by it, so a stale
/// delivery's mark settles its own reservation and never a newer one of the same request (the
/// request id is kept in the record for the history only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationKey(pub u64);

/// The answer of `can_process`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckResult {
    /// Whether the request would be admitted now.
    pub allowed: bool,
    /// `"rpm_limit"` or `"tpm_limit"` when refused (the request bucket is reported first).
    pub reason: Option<&'static str>,
    /// Exact seconds until admitted: 0 when allowed, infinite when it can never fit.
    pub available_in: f64,
    /// Requests in the request bucket.
    pub available_requests: f64,
    /// Tokens in the token bucket.
    pub available_tokens: f64,
}

/// What `adjust_consumption` did; the binding logs the failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adjustment {
    /// The extra was taken or the difference refunded.
    Applied,
    /// `warn`: the bucket was emptied, `shortfall` tokens could not be taken.
    Warned { shortfall: f64 },
    /// `compensate`: the bucket was emptied and `shortfall` added to the debt, now `total_debt`.
    Compensated { shortfall: f64, total_debt: f64 },
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

/// A point-in-time copy of the buckets and the debt, for backup and restore.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// When it was taken.
    pub timestamp: f64,
    /// The request bucket.
    pub rpm: BucketState,
    /// The token bucket.
    pub tpm: BucketState,
    /// Consumption records at the time (history is not restored).
    pub history_count: usize,
    /// Compensation debt at the time.
    pub compensation_debt: f64,
}

/// The limiter: two buckets, a consumption history and a compensation debt.
#[derive(Debug, Clone)]
pub struct Throttle<M> {
    config: ThrottleConfig,
    requests: TokenBucket,
    tokens: TokenBucket,
    history: VecDeque<ConsumptionRecord<M>>,
    // Sequence number of `history[0]`; with `latest_by_id` it finds a record in O(1).
    first_seq: u64,
    latest_by_id: HashMap<String, u64>,
    debt: f64,
    evicted: Vec<M>,
    totals: HistoryTotals,
    /// The reading of the last `advance`: "now" for `check` and `consume`.
    now: f64,
    /// Nothing is granted before this instant (a provider's 429 and its `Retry-After`).
    penalized_until: f64,
}

impl<M> Throttle<M> {
    /// A throttle with full buckets at `now`.
    pub fn new(config: ThrottleConfig, now: f64) -> CoreResult<Self> {
        config.validate()?;
        let requests = TokenBucket::new(config.burst_rpm.unwrap_or(config.rpm), config.rpm / 60.0, now);
        let tokens = TokenBucket::new(config.burst_tpm.unwrap_or(config.tpm), config.tpm / 60.0, now);
        Ok(Self {
            config,
            requests,
            tokens,
            history: VecDeque::new(),
            first_seq: 0,
            latest_by_id: HashMap::new(),
            debt: 0.0,
            evicted: Vec::new(),
            totals: HistoryTotals::default(),
            now,
            penalized_until: f64::NEG_INFINITY,
        })
    }

    /// The validated settings.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Refills both buckets and drops history past its retention and its record limit.
    pub fn advance(&mut self, now: f64) {
        // A clock read before another thread's later reading must not move time back.
        self.now = self.now.max(now);
        self.requests.refill(now);
        self.tokens.refill(now);
        let cutoff = now - self.config.history_retention;
        while self.history.front().is_some_and(|record| record.timestamp <= cutoff) {
            self.pop_oldest();
        }
        while self.history.len() > self.config.max_history_records {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(record) = self.history.pop_front() {
            if !record.released {
                self.totals.remove(&record);
            }
            // Reservations made by key are not in the id map: skip the lookup when it is empty.
            if !self.latest_by_id.is_empty()
                && self.latest_by_id.get(&record.request_id) == Some(&self.first_seq)
            {
                self.latest_by_id.remove(&record.request_id);
            }
            self.first_seq += 1;
            self.evicted.push(record.metadata);
        }
    }

    /// Metadata of the records dropped since the last call, for the caller to release (a
    /// binding drops Python objects only after unlocking: finalizers may run).
    pub fn take_evicted(&mut self) -> Vec<M> {
        std::mem::take(&mut self.evicted)
    }

    fn evict_all(&mut self) {
        self.totals = HistoryTotals::default();
        let history = std::mem::take(&mut self.history);
        // Sequence numbers keep growing: a reservation key made before never names a new record.
        self.first_seq += history.len() as u64;
        self.evicted.extend(history.into_iter().map(|record| record.metadata));
        self.latest_by_id.clear();
    }

    /// The request bucket.
    pub fn requests(&self) -> &TokenBucket {
        &self.requests
    }

    /// The token bucket.
    pub fn tokens(&self) -> &TokenBucket {
        &self.tokens
    }

    /// Tokens the next `consume` takes on top of its estimate.
    pub fn debt(&self) -> f64 {
        self.debt
    }

    /// Tokens a request of `estimated` tokens must find in the bucket. With a debt that would
    /// push it past the capacity, a full bucket is enough (the rest of the debt carries over):
    /// otherwise a large debt would block every request forever.
    fn tokens_needed(&self, estimated: u64) -> f64 {
        let estimated = estimated as f64;
        if estimated > self.tokens.capacity() {
            estimated
        } else {
            (estimated + self.debt).min(self.tokens.capacity())
        }
    }

    /// Whether a request of `estimated` tokens (plus any debt) would be admitted now, and if
    /// not, exactly when. Call `advance` first.
    pub fn check(&self, estimated: u64) -> CheckResult {
        self.check_with_margin(estimated, 0.0)
    }

    /// `check` for a request that must also leave `margin` tokens in the bucket (a reserve
    /// kept back), the total at most the capacity. Call `advance` first.
    pub fn check_with_margin(&self, estimated: u64, margin: f64) -> CheckResult {
        let mut needed = self.tokens_needed(estimated);
        if margin > 0.0 {
            needed = (needed + margin).min(self.tokens.capacity().max(needed));
        }
        // A penalty holds the request bucket shut: it reports as the request limit.
        let request_wait = self.requests.time_until(1.0).max(self.penalty_left());
        let token_wait = self.tokens.time_until(needed);
        let reason = if request_wait > 0.0 {
            Some("rpm_limit")
        } else if token_wait > 0.0 {
            Some("tpm_limit")
        } else {
            None
        };
        CheckResult {
            allowed: reason.is_none(),
            reason,
            available_in: request_wait.max(token_wait),
            available_requests: self.requests.available(),
            available_tokens: self.tokens.available(),
        }
    }

    /// Takes one request and the estimate plus the debt, all or nothing. Call `advance` first.
    pub fn consume(&mut self, now: f64, request_id: &str, estimated: u64, metadata: M) -> bool {
        self.try_consume(now, request_id, estimated, metadata).is_ok()
    }

    /// `consume`, handing `metadata` back when refused (a binding releases it unlocked).
    pub fn try_consume(&mut self, now: f64, request_id: &str, estimated: u64, metadata: M) -> Result<(), M> {
        let key = self.reserve(now, request_id, estimated, metadata)?;
        self.latest_by_id.insert(request_id.to_owned(), key.0);
        Ok(())
    }

    /// Takes one request and the estimate plus the debt, all or nothing, like `consume`, and
    /// returns the reservation's key; the record is found by that key only (`adjust_reservation`,
    /// `release_reservation`), not by `request_id`, which it keeps for the history. Call
    /// `advance` first.
    pub fn reserve(
        &mut self,
        now: f64,
        request_id: &str,
        estimated: u64,
        metadata: M,
    ) -> Result<ReservationKey, M> {
        let needed = self.tokens_needed(estimated);
        if self.penalty_left() > 0.0 || !(self.requests.has(1.0) && self.tokens.has(needed)) {
            return Err(metadata);
        }
        self.requests.take(1.0);
        self.tokens.take(needed);
        let applied_debt = (needed - estimated as f64).max(0.0);
        self.debt -= applied_debt;
        if self.debt < DEBT_DUST {
            self.debt = 0.0;
        }
        let seq = self.first_seq + self.history.len() as u64;
        self.history.push_back(ConsumptionRecord {
            timestamp: now,
            tokens: estimated,
            request_id: request_id.to_owned(),
            metadata,
            estimated_tokens: estimated,
            actual_tokens: None,
            compensation_debt: applied_debt,
            unpaid: 0.0,
            released: false,
        });
        if let Some(record) = self.history.back() {
            self.totals.add(record);
        }
        while self.history.len() > self.config.max_history_records {
            self.pop_oldest();
        }
        Ok(ReservationKey(seq))
    }

    /// Sets the token count of the latest consume of `request_id` to `actual`: takes the extra
    /// or refunds the difference. Call `advance` first.
    pub fn adjust(&mut self, request_id: &str, actual: u64) -> CoreResult<Adjustment> {
        let index = self.record_index(request_id)?;
        self.adjust_at(index, actual)
    }

    /// `adjust` of the reservation `key` names. Call `advance` first.
    pub fn adjust_reservation(&mut self, key: ReservationKey, actual: u64) -> CoreResult<Adjustment> {
        let index = self.key_index(key)?;
        self.adjust_at(index, actual)
    }

    fn adjust_at(&mut self, index: usize, actual: u64) -> CoreResult<Adjustment> {
        let recorded = self.history[index].tokens;
        let mut outcome = Adjustment::Applied;
        let mut unpaid = self.history[index].unpaid;
        if actual > recorded {
            let extra = (actual - recorded) as f64;
            if !self.tokens.take(extra) {
                match self.config.adjustment_failure_strategy {
                    AdjustmentFailureStrategy::Strict => {
                        return Err(CoreError::RateLimit {
                            reason: "tpm_limit",
                            available_in: self.tokens.time_until(extra),
                        });
                    }
                    AdjustmentFailureStrategy::Warn => {
                        let shortfall = self.tokens.take_up_to(extra);
                        unpaid += shortfall;
                        outcome = Adjustment::Warned { shortfall };
                    }
                    AdjustmentFailureStrategy::Compensate => {
                        let shortfall = self.tokens.take_up_to(extra);
                        unpaid += shortfall;
                        self.debt += shortfall;
                        outcome = Adjustment::Compensated { shortfall, total_debt: self.debt };
                    }
                }
            }
        } else if actual < recorded {
            // A lower count forgives what was never paid first (a second adjustment).
            let lower = (recorded - actual) as f64;
            let forgiven = lower.min(unpaid);
            unpaid -= forgiven;
            self.give_back_unpaid(forgiven);
            self.tokens.refund(lower - forgiven);
        }
        let record = &mut self.history[index];
        self.totals.remove(record);
        record.unpaid = unpaid;
        record.tokens = actual;
        record.actual_tokens = Some(actual);
        self.totals.add(record);
        Ok(outcome)
    }

    /// Gives back the latest consume of `request_id` whole, as if it never happened: its
    /// tokens (the estimate, or the actual count once adjusted) and its request go back to the
    /// buckets, the debt it paid is owed again, and its record stops counting. For a
    /// reservation that was never used (the dispatch failed after it was made). Call `advance`
    /// first.
    pub fn release(&mut self, request_id: &str) -> CoreResult<()> {
        let index = self.record_index(request_id)?;
        self.release_at(index);
        // An earlier consume of the same id (a delivery still in progress) is the latest again.
        let previous = self.history.range(..index).rposition(|r| !r.released && r.request_id == request_id);
        match previous {
            Some(i) => self.latest_by_id.insert(request_id.to_owned(), self.first_seq + i as u64),
            None => self.latest_by_id.remove(request_id),
        };
        Ok(())
    }

    /// `release` of the reservation `key` names. Call `advance` first.
    pub fn release_reservation(&mut self, key: ReservationKey) -> CoreResult<()> {
        let index = self.key_index(key)?;
        self.release_at(index);
        Ok(())
    }

    fn release_at(&mut self, index: usize) {
        let record = &mut self.history[index];
        let (tokens, debt, unpaid) = (record.tokens as f64, record.compensation_debt, record.unpaid);
        record.released = true;
        let record = &self.history[index];
        self.totals.remove(record);
        self.requests.refund(1.0);
        self.tokens.refund(tokens - unpaid + debt);
        // The debt its unpaid adjustment added is not owed; the debt the consume paid is again.
        self.give_back_unpaid(unpaid);
        self.debt += debt;
    }

    /// Gives back `tokens` of an upward adjustment the bucket could not pay. Under `warn` they
    /// were never taken: nothing to do. Under `compensate` they became debt: what is still owed
    /// is cancelled, and what later consumes already paid of it goes back to the bucket. (Such
    /// a payer's own `release` then re-owes what it paid: exact attribution is not kept.)
    fn give_back_unpaid(&mut self, tokens: f64) {
        if self.config.adjustment_failure_strategy == AdjustmentFailureStrategy::Compensate {
            let cancelled = tokens.min(self.debt);
            self.debt -= cancelled;
            self.tokens.refund(tokens - cancelled);
        }
    }

    /// Grants nothing for `seconds` from now (a provider's 429 with `Retry-After`); a shorter
    /// penalty never cuts a longer one short. Call `advance` first.
    pub fn penalize(&mut self, seconds: f64) -> CoreResult<()> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(CoreError::InvalidRequest(format!(
                "seconds must be a finite number >= 0, got {seconds}"
            )));
        }
        self.penalized_until = self.penalized_until.max(self.now + seconds);
        Ok(())
    }

    /// The reading of the last `advance`.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Seconds left of a penalty (0 when none).
    pub fn penalty_left(&self) -> f64 {
        (self.penalized_until - self.now).max(0.0)
    }

    /// Lowers what the buckets hold to what a provider says remains: each figure given cuts its
    /// bucket now and, with a reset (seconds from now), caps it until then at that figure minus
    /// what is granted meanwhile (see `provider_limits.py`). Call `advance` first.
    pub fn cap(
        &mut self,
        requests: Option<(f64, Option<f64>)>,
        tokens: Option<(f64, Option<f64>)>,
    ) -> CoreResult<()> {
        for (name, figure) in [("requests", requests), ("tokens", tokens)] {
            if let Some((remaining, reset)) = figure {
                let bad_reset = reset.is_some_and(|r| !(r.is_finite() && r >= 0.0));
                if !(remaining.is_finite() && remaining >= 0.0) || bad_reset {
                    return Err(CoreError::InvalidRequest(format!(
                        "{name} remaining and reset must be finite numbers >= 0, got {remaining} and {reset:?}"
                    )));
                }
            }
        }
        let now = self.now;
        if let Some((remaining, reset)) = requests {
            self.requests.cap(remaining, reset.map(|r| now + r));
        }
        if let Some((remaining, reset)) = tokens {
            self.tokens.cap(remaining, reset.map(|r| now + r));
        }
        Ok(())
    }

    fn record_index(&self, request_id: &str) -> CoreResult<usize> {
        let Some(&seq) = self.latest_by_id.get(request_id) else {
            return Err(CoreError::UnknownRequest(format!(
                "request {request_id:?} has no consumption record (never consumed, released, or older \
                 than history_retention = {} s)",
                self.config.history_retention
            )));
        };
        Ok((seq - self.first_seq) as usize)
    }

    fn key_index(&self, key: ReservationKey) -> CoreResult<usize> {
        let index = key.0.checked_sub(self.first_seq).map(|i| i as usize);
        match index {
            Some(i) if self.history.get(i).is_some_and(|r| !r.released) => Ok(i),
            _ => Err(CoreError::UnknownRequest(format!(
                "reservation {} has no consumption record (released, or older than history_retention = {} s)",
                key.0, self.config.history_retention
            ))),
        }
    }

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

    /// Forgets every consumption record (no adjustment possible for them any more).
    pub fn clear_history(&mut self) {
        self.evict_all();
    }

    /// Full buckets, no history, no debt.
    pub fn reset(&mut self, now: f64) {
        self.requests.reset(now);
        self.tokens.reset(now);
        self.evict_all();
        self.debt = 0.0;
        self.penalized_until = f64::NEG_INFINITY;
    }

    /// Whether the internal state is consistent (buckets in range, debt >= 0, history within
    /// its limits and timestamps plausible). Call `advance` first.
    pub fn validate_state(&self, now: f64) -> bool {
        let oldest_allowed = now - 2.0 * self.config.history_retention;
        self.requests.consistent()
            && self.tokens.consistent()
            && self.debt >= 0.0
            && self.history.len() <= self.config.max_history_records
            && self
                .history
                .iter()
                .all(|record| record.timestamp >= oldest_allowed && record.timestamp <= now + 1.0)
    }

    /// The buckets and the debt now. Call `advance` first.
    pub fn snapshot(&self, now: f64) -> Snapshot {
        Snapshot {
            timestamp: now,
            rpm: self.requests.state(),
            tpm: self.tokens.state(),
            history_count: self.totals.live,
            compensation_debt: self.debt,
        }
    }

    /// Restores the buckets and the debt of `snapshot` and clears the history. Checked whole
    /// first: on a bad snapshot nothing changes. Only durations are taken from the snapshot's
    /// instants (how long each bucket had refilled for when it was taken): the restoring
    /// throttle's clock may count from anywhere (another process, a restart), and the buckets
    /// refill from its `now` as they would have from the snapshot's. Call `advance` first.
    // A snapshot of another configuration must be refused, so capacities compare exactly.
    #[allow(clippy::float_cmp)]
    pub fn restore(&mut self, snapshot: &Snapshot) -> CoreResult<()> {
        for (name, state, bucket) in
            [("rpm", &snapshot.rpm, &self.requests), ("tpm", &snapshot.tpm, &self.tokens)]
        {
            if state.capacity != bucket.capacity() {
                return Err(CoreError::InvalidRequest(format!(
                    "snapshot {name} capacity {} does not match this throttle's {}",
                    state.capacity,
                    bucket.capacity()
                )));
            }
            if !(state.available.is_finite() && (0.0..=state.capacity).contains(&state.available)) {
                return Err(CoreError::InvalidRequest(format!(
                    "snapshot {name} available must be within [0, {}], got {}",
                    state.capacity, state.available
                )));
            }
            if !state.last_refill.is_finite() {
                return Err(CoreError::InvalidRequest(format!(
                    "snapshot {name} last_refill must be finite, got {}",
                    state.last_refill
                )));
            }
        }
        if !snapshot.timestamp.is_finite() {
            return Err(CoreError::InvalidRequest(format!(
                "snapshot timestamp must be finite, got {}",
                snapshot.timestamp
            )));
        }
        if !(snapshot.compensation_debt.is_finite() && snapshot.compensation_debt >= 0.0) {
            return Err(CoreError::InvalidRequest(format!(
                "snapshot compensation_debt must be a finite number >= 0, got {}",
                snapshot.compensation_debt
            )));
        }
        let since = |state: &BucketState| (snapshot.timestamp - state.last_refill).max(0.0);
        self.requests.restore(&snapshot.rpm, since(&snapshot.rpm), self.now);
        self.tokens.restore(&snapshot.tpm, since(&snapshot.tpm), self.now);
        self.debt = snapshot.compensation_debt;
        self.evict_all();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // values in these tests are exact in binary
mod tests;
