//! The dual token-bucket rate limiter behind `LLMThrottle`, without Python.
//!
//! Semantics follow `@aid-on/llm-throttle` 1.0.1 (its `LLMThrottle` and `TokenBucket`), with the
//! changes the contract asks for: durations in seconds, an exact `available_in` that accounts for
//! both buckets and is infinite when a request can never fit, and all-or-nothing bad-input checks.
//! Every instant is an `f64` passed in by the caller, so the logic is deterministic under test.

use std::collections::{HashMap, VecDeque};

use crate::errors::{CoreError, CoreResult};

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

/// The state of one bucket, as snapshots carry it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens in the bucket at `last_refill`.
    pub available: f64,
    /// Most tokens the bucket holds.
    pub capacity: f64,
    /// Instant of the last refill, in the throttle clock's seconds.
    pub last_refill: f64,
}

/// A token bucket refilled continuously at `rate` tokens per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    available: f64,
    last_refill: f64,
}

fn holds(available: f64, count: f64) -> bool {
    available >= count
}

/// How close an estimate was, as the seed library's estimation accuracy counts it.
fn estimation_accuracy(estimated: u64, actual: u64) -> f64 {
    if estimated == 0 {
        1.0
    } else {
        estimated.min(actual) as f64 / estimated.max(actual) as f64
    }
}

/// Sums over the kept history, updated as records come and go, so metrics cost O(1) however
/// long the history is.
#[derive(Debug, Clone, Copy, Default)]
struct HistoryTotals {
    tokens: u128,
    adjusted: usize,
    accuracy_sum: f64,
}

impl HistoryTotals {
    fn add<M>(&mut self, record: &ConsumptionRecord<M>) {
        self.tokens += u128::from(record.tokens);
        if let Some(actual) = record.actual_tokens {
            self.adjusted += 1;
            self.accuracy_sum += estimation_accuracy(record.estimated_tokens, actual);
        }
    }

    fn remove<M>(&mut self, record: &ConsumptionRecord<M>) {
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

/// The smallest float above a positive `x`.
fn next_up(x: f64) -> f64 {
    f64::from_bits(x.to_bits() + 1)
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: f64, rate: f64, now: f64) -> Self {
        Self { capacity, rate, available: capacity, last_refill: now }
    }

    /// Adds the tokens refilled since the last call. A clock reading older than the last one
    /// (two threads racing for the lock) adds nothing rather than draining the bucket.
    pub fn refill(&mut self, now: f64) {
        let elapsed = now - self.last_refill;
        if elapsed > 0.0 {
            self.available = (self.available + elapsed * self.rate).min(self.capacity);
            self.last_refill = now;
        }
    }

    /// Tokens in the bucket (call `refill` first for the current figure).
    pub fn available(&self) -> f64 {
        self.available
    }

    /// Most tokens the bucket holds.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Tokens added per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether `count` tokens can be taken now.
    pub fn has(&self, count: f64) -> bool {
        holds(self.available, count)
    }

    /// Seconds until the bucket holds `count` tokens: 0 if it does, infinite if it never can.
    /// Exact in the clock's own arithmetic: a refill at `last_refill + wait` (the reading a
    /// clock advanced by `wait` gives) finds `count` tokens, and one a float step earlier not.
    pub fn time_until(&self, count: f64) -> f64 {
        if self.has(count) {
            return 0.0;
        }
        if count > self.capacity {
            return f64::INFINITY;
        }
        let mut wait = (count - self.available) / self.rate;
        let refilled =
            |wait: f64| self.available + ((self.last_refill + wait) - self.last_refill) * self.rate;
        // Division and the clock's addition each round: step up by the shortfall, or by at least
        // one float step of the clock reading, until a refill at that reading covers `count`.
        for _ in 0..64 {
            let shortfall = count - refilled(wait);
            if shortfall <= 0.0 {
                break;
            }
            let reading = (self.last_refill + wait).abs();
            wait = (wait + shortfall / self.rate).max(wait + (next_up(reading) - reading)).max(next_up(wait));
        }
        wait
    }

    /// Takes `count` tokens if the bucket holds them.
    pub fn take(&mut self, count: f64) -> bool {
        if self.has(count) {
            self.available = (self.available - count).max(0.0);
            true
        } else {
            false
        }
    }

    /// Takes as many of `count` tokens as there are; returns how many it could not take.
    pub fn take_up_to(&mut self, count: f64) -> f64 {
        let taken = count.min(self.available).max(0.0);
        self.available -= taken;
        count - taken
    }

    /// Gives back `count` tokens, up to the capacity.
    pub fn refund(&mut self, count: f64) {
        self.available = (self.available + count).min(self.capacity);
    }

    /// Fills the bucket.
    pub fn reset(&mut self, now: f64) {
        self.available = self.capacity;
        self.last_refill = now;
    }

    /// The bucket's state for a snapshot.
    pub fn state(&self) -> BucketState {
        BucketState { available: self.available, capacity: self.capacity, last_refill: self.last_refill }
    }

    fn consistent(&self) -> bool {
        (0.0..=self.capacity).contains(&self.available) && self.capacity > 0.0 && self.rate > 0.0
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
}

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
        })
    }

    /// The validated settings.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Refills both buckets and drops history past its retention and its record limit.
    pub fn advance(&mut self, now: f64) {
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
            self.totals.remove(&record);
            if self.latest_by_id.get(&record.request_id) == Some(&self.first_seq) {
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
        self.evicted.extend(history.into_iter().map(|record| record.metadata));
        self.latest_by_id.clear();
        self.first_seq = 0;
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
        let needed = self.tokens_needed(estimated);
        let request_wait = self.requests.time_until(1.0);
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
        let needed = self.tokens_needed(estimated);
        if !(self.requests.has(1.0) && self.tokens.has(needed)) {
            return false;
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
        });
        self.totals.tokens += u128::from(estimated);
        self.latest_by_id.insert(request_id.to_owned(), seq);
        while self.history.len() > self.config.max_history_records {
            self.pop_oldest();
        }
        true
    }

    /// Sets the token count of the latest consume of `request_id` to `actual`: takes the extra
    /// or refunds the difference. Call `advance` first.
    pub fn adjust(&mut self, request_id: &str, actual: u64) -> CoreResult<Adjustment> {
        let Some(&seq) = self.latest_by_id.get(request_id) else {
            return Err(CoreError::UnknownRequest(format!(
                "request {request_id:?} has no consumption record (never consumed, or older than \
                 history_retention = {} s)",
                self.config.history_retention
            )));
        };
        let index = (seq - self.first_seq) as usize;
        let recorded = self.history[index].tokens;
        let mut outcome = Adjustment::Applied;
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
                        outcome = Adjustment::Warned { shortfall };
                    }
                    AdjustmentFailureStrategy::Compensate => {
                        let shortfall = self.tokens.take_up_to(extra);
                        self.debt += shortfall;
                        outcome = Adjustment::Compensated { shortfall, total_debt: self.debt };
                    }
                }
            }
        } else if actual < recorded {
            self.tokens.refund((recorded - actual) as f64);
        }
        let record = &mut self.history[index];
        self.totals.remove(record);
        record.tokens = actual;
        record.actual_tokens = Some(actual);
        self.totals.add(record);
        Ok(outcome)
    }

    /// The consumption records kept, oldest first.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &ConsumptionRecord<M>> {
        self.history.iter()
    }

    /// Mean estimate accuracy over the last `efficiency_window_size` records: 1 without
    /// records, 0.85 when none has an actual count yet (the seed library's conventions).
    pub fn efficiency(&self) -> f64 {
        let window = self.history.len().min(self.config.efficiency_window_size);
        let recent = self.history.range(self.history.len() - window..);
        if window == 0 {
            return 1.0;
        }
        let (sum, count) = recent
            .filter_map(|record| record.actual_tokens.map(|actual| (record.estimated_tokens, actual)))
            .fold((0.0, 0usize), |(sum, count), (estimated, actual)| {
                let accuracy = match (estimated, actual) {
                    (0, 0) => 1.0,
                    (0, _) | (_, 0) => 0.0,
                    (e, a) => e.min(a) as f64 / e.max(a) as f64,
                };
                (sum + accuracy, count + 1)
            });
        if count == 0 {
            0.85
        } else {
            sum / count as f64
        }
    }

    /// Count, totals and estimation accuracy of the history.
    pub fn history_statistics(&self) -> HistoryStatistics {
        let count = self.history.len();
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
            history_count: self.history.len(),
            compensation_debt: self.debt,
        }
    }

    /// Restores the buckets and the debt of `snapshot` and clears the history. Checked whole
    /// first: on a bad snapshot nothing changes.
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
        if !(snapshot.compensation_debt.is_finite() && snapshot.compensation_debt >= 0.0) {
            return Err(CoreError::InvalidRequest(format!(
                "snapshot compensation_debt must be a finite number >= 0, got {}",
                snapshot.compensation_debt
            )));
        }
        self.requests.available = snapshot.rpm.available;
        self.requests.last_refill = snapshot.rpm.last_refill;
        self.tokens.available = snapshot.tpm.available;
        self.tokens.last_refill = snapshot.tpm.last_refill;
        self.debt = snapshot.compensation_debt;
        self.evict_all();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // values in these tests are exact in binary
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(rpm: f64, tpm: f64, strategy: AdjustmentFailureStrategy) -> ThrottleConfig {
        ThrottleConfig {
            rpm,
            tpm,
            burst_rpm: None,
            burst_tpm: None,
            adjustment_failure_strategy: strategy,
            max_history_records: 10_000,
            history_retention: 60.0,
            efficiency_window_size: 50,
        }
    }

    fn throttle(rpm: f64, tpm: f64) -> Throttle<()> {
        Throttle::new(config(rpm, tpm, AdjustmentFailureStrategy::Warn), 0.0).unwrap()
    }

    #[test]
    fn starts_full_and_refuses_past_the_budget() {
        let mut t = throttle(60.0, 1000.0);
        assert!(t.consume(0.0, "a", 600, ()));
        assert!(!t.consume(0.0, "b", 600, ()));
        let check = t.check(600);
        assert_eq!(check.reason, Some("tpm_limit"));
        // 200 tokens short at 1000/60 tokens per second.
        assert!((check.available_in - 12.0).abs() < 1e-9);
        t.advance(check.available_in);
        assert!(t.check(600).allowed);
        assert!(t.consume(12.0, "b", 600, ()));
    }

    #[test]
    fn available_in_is_infinite_past_the_capacity_and_takes_the_longer_wait() {
        let mut t = throttle(1.0, 1000.0);
        assert!(t.check(1001).available_in.is_infinite());
        assert!(t.consume(0.0, "a", 900, ()));
        let check = t.check(500);
        assert_eq!(check.reason, Some("rpm_limit"));
        // One request per minute: 60 s for the request bucket, 24 s for the tokens.
        assert!((check.available_in - 60.0).abs() < 1e-9);
    }

    #[test]
    fn adjust_refunds_and_takes_extra_and_rejects_unknown_ids() {
        let mut t = throttle(60.0, 1000.0);
        assert!(t.consume(0.0, "a", 500, ()));
        t.adjust("a", 200).unwrap();
        assert!((t.tokens().available() - 800.0).abs() < 1e-9);
        t.adjust("a", 700).unwrap();
        assert!((t.tokens().available() - 300.0).abs() < 1e-9);
        assert!(matches!(t.adjust("zzz", 1), Err(CoreError::UnknownRequest(_))));
    }

    #[test]
    fn strategies_on_a_short_bucket() {
        for strategy in [
            AdjustmentFailureStrategy::Strict,
            AdjustmentFailureStrategy::Warn,
            AdjustmentFailureStrategy::Compensate,
        ] {
            let mut t: Throttle<()> = Throttle::new(config(60.0, 1000.0, strategy), 0.0).unwrap();
            assert!(t.consume(0.0, "a", 900, ()));
            let result = t.adjust("a", 1300);
            match strategy {
                AdjustmentFailureStrategy::Strict => {
                    assert!(matches!(result, Err(CoreError::RateLimit { reason: "tpm_limit", .. })));
                    assert!((t.tokens().available() - 100.0).abs() < 1e-9);
                    assert_eq!(t.history().next().unwrap().tokens, 900);
                }
                AdjustmentFailureStrategy::Warn => {
                    assert_eq!(result.unwrap(), Adjustment::Warned { shortfall: 300.0 });
                    assert_eq!(t.tokens().available(), 0.0);
                    assert_eq!(t.debt(), 0.0);
                }
                AdjustmentFailureStrategy::Compensate => {
                    assert_eq!(
                        result.unwrap(),
                        Adjustment::Compensated { shortfall: 300.0, total_debt: 300.0 }
                    );
                    t.advance(60.0);
                    assert!(t.consume(60.0, "b", 100, ()));
                    assert_eq!(t.debt(), 0.0);
                    assert!((t.tokens().available() - 600.0).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn history_expires_and_is_capped() {
        let mut c = config(1e6, 1e9, AdjustmentFailureStrategy::Warn);
        c.max_history_records = 3;
        let mut t: Throttle<()> = Throttle::new(c, 0.0).unwrap();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(t.consume(i as f64, id, 1, ()));
        }
        assert_eq!(t.history().len(), 3);
        assert!(matches!(t.adjust("a", 2), Err(CoreError::UnknownRequest(_))));
        t.advance(62.5);
        assert_eq!(t.history().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), vec!["d"]);
        assert!(t.adjust("d", 2).is_ok());
    }

    #[test]
    fn a_debt_beyond_the_capacity_does_not_block_forever() {
        let mut t: Throttle<()> =
            Throttle::new(config(60.0, 1000.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
        assert!(t.consume(0.0, "a", 1000, ()));
        t.adjust("a", 3000).unwrap();
        assert_eq!(t.debt(), 2000.0);
        let check = t.check(10);
        assert!(check.available_in.is_finite());
        t.advance(check.available_in);
        assert!(t.consume(check.available_in, "b", 10, ()));
        assert!((t.debt() - 1010.0).abs() < 1e-6);
    }

    #[test]
    fn restore_checks_the_whole_snapshot_first() {
        let mut t = throttle(60.0, 1000.0);
        assert!(t.consume(0.0, "a", 400, ()));
        let snapshot = t.snapshot(0.0);
        let mut bad = snapshot;
        bad.tpm.available = 5000.0;
        t.reset(0.0);
        assert!(t.restore(&bad).is_err());
        assert_eq!(t.tokens().available(), 1000.0);
        t.restore(&snapshot).unwrap();
        assert_eq!(t.tokens().available(), 600.0);
        assert_eq!(t.history().len(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Consume(u64),
        Adjust(usize, u64),
        Advance(f64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..1500).prop_map(Op::Consume),
            (0usize..20, 0u64..2000).prop_map(|(i, a)| Op::Adjust(i, a)),
            (0.0f64..20.0).prop_map(Op::Advance),
        ]
    }

    proptest! {
        // Net tokens taken (consumes + adjustment extras − refunds) in any window [a, b] never
        // exceed burst + rate · (b − a); requests likewise; buckets stay within [0, capacity].
        #[test]
        fn grants_within_any_window_respect_the_bucket(ops in proptest::collection::vec(op(), 1..120)) {
            let mut t: Throttle<()> =
                Throttle::new(config(30.0, 1200.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
            let mut now = 0.0;
            let mut ids = Vec::new();
            // (instant, net tokens, requests)
            let mut events: Vec<(f64, f64, f64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Consume(tokens) => {
                        t.advance(now);
                        let before = t.tokens().available();
                        let id = format!("r{}", ids.len());
                        if t.consume(now, &id, tokens, ()) {
                            events.push((now, before - t.tokens().available(), 1.0));
                            ids.push(id);
                        }
                    }
                    Op::Adjust(i, actual) => {
                        if let Some(id) = ids.get(i) {
                            t.advance(now);
                            let before = t.tokens().available();
                            let _ = t.adjust(id, actual);
                            events.push((now, before - t.tokens().available(), 0.0));
                        }
                    }
                    Op::Advance(dt) => now += dt,
                }
                t.advance(now);
                prop_assert!(t.validate_state(now));
            }
            // The running totals agree with a recount of the history.
            let stats = t.history_statistics();
            let recount: u64 = t.history().map(|r| r.tokens).sum();
            let adjusted: Vec<f64> = t.history()
                .filter_map(|r| r.actual_tokens.map(|a| estimation_accuracy(r.estimated_tokens, a)))
                .collect();
            prop_assert_eq!(stats.total_tokens, recount);
            prop_assert_eq!(stats.count, t.history().len());
            let expected = if adjusted.is_empty() { 1.0 } else { adjusted.iter().sum::<f64>() / adjusted.len() as f64 };
            prop_assert!((stats.estimation_accuracy - expected).abs() < 1e-9);
            for (i, &(start, _, _)) in events.iter().enumerate() {
                let (mut tokens, mut requests) = (0.0, 0.0);
                for &(at, net, reqs) in &events[i..] {
                    tokens += net;
                    requests += reqs;
                    let window = at - start;
                    prop_assert!(tokens <= 1200.0 + 20.0 * window + 1e-6);
                    prop_assert!(requests <= 30.0 + 0.5 * window + 1e-6);
                }
            }
        }
    }
}
