//! The token-bucket rate limiter behind `LLMThrottle`, without Python.
//!
//! Semantics follow `@aid-on/llm-throttle` 1.0.1 (its `LLMThrottle` and `TokenBucket`), with the
//! changes the contract asks for: durations in seconds, an exact `available_in` that accounts for
//! every bucket and is infinite when a request can never fit, all-or-nothing bad-input checks,
//! and the limits providers publish besides requests and tokens per minute (input and output
//! tokens per minute, requests and tokens per day, requests in flight: `meters.rs`). Every
//! instant is an `f64` passed in by the caller, so the logic is deterministic under test.
//!
//! About 970 lines for one concept: a bucket lives in `bucket.rs`, the optional limits in
//! `meters.rs`, the history in `history.rs`, snapshots in `snapshot.rs`, a provider's figures in
//! `provider.rs` and the tests in `tests.rs` and `limits_tests.rs`; what stays here is the
//! limiter's state machine (check, consume, adjust, release across every limit), whose steps
//! share its invariants.

use std::collections::{HashMap, VecDeque};

use crate::errors::{CoreError, CoreResult};

mod bucket;
mod history;
mod meters;
mod provider;
mod snapshot;

pub use bucket::{BucketState, TokenBucket};
#[cfg(test)]
use history::estimation_accuracy;
use history::HistoryTotals;
pub use history::{ConsumptionRecord, HistoryStatistics, RecordExtra};
pub use meters::{Charge, Dimension, ExtraLimits, Meter, Slots, DAY};
pub use provider::MAX_PROVIDER_WAIT;
pub use snapshot::{ExtraState, Snapshot};

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
        // A bucket that holds less than one request (or one token) can never admit anything: a
        // limiter that waits for ever is refused here, where the mistake is made.
        for (rate_name, burst_name, rate, burst, unit) in [
            ("rpm", "burst_rpm", self.rpm, self.burst_rpm, "request"),
            ("tpm", "burst_tpm", self.tpm, self.burst_tpm, "token"),
        ] {
            match burst {
                Some(burst) if burst < 1.0 => {
                    return Err(CoreError::InvalidConfig(format!(
                        "{burst_name} must be >= 1: it is the {unit} bucket's capacity, and a bucket \
                         holding less than one {unit} never admits a request; got {burst}"
                    )));
                }
                None if rate < 1.0 => {
                    return Err(CoreError::InvalidConfig(format!(
                        "{rate_name} must be >= 1: without {burst_name} it is the {unit} bucket's \
                         capacity, and a bucket holding less than one {unit} never admits a request; \
                         got {rate} (for less than one {unit} a minute, also set {burst_name} >= 1)"
                    )));
                }
                _ => {}
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
    /// The binding limit when refused (`"rpm_limit"`, `"tpm_limit"`, `"itpm_limit"`, …): the
    /// one with the longest wait, the first of rpm, tpm, itpm, otpm, rpd, tpd, concurrency on a
    /// tie.
    pub reason: Option<&'static str>,
    /// Exact seconds until admitted: 0 when allowed, infinite when it can never fit.
    pub available_in: f64,
    /// Requests in the request bucket.
    pub available_requests: f64,
    /// Tokens in the token bucket.
    pub available_tokens: f64,
    /// The other limits, when any is configured: in the order itpm, otpm, rpd, tpd (what their
    /// buckets hold) and concurrency (slots free), None where not configured.
    pub available_extra: Option<[Option<f64>; 5]>,
}

/// Where a limit other than rpm and tpm sits in `CheckResult::available_extra` and
/// `Snapshot::extra`.
pub fn extra_index(dimension: Dimension) -> Option<usize> {
    (dimension as usize).checked_sub(Dimension::Itpm as usize)
}

/// The limit with the longest wait, the first in `Dimension` order on a tie.
#[derive(Debug, Clone, Copy)]
struct Binding {
    wait: f64,
    dimension: Option<Dimension>,
}

impl Binding {
    const NONE: Self = Self { wait: 0.0, dimension: None };

    // Equal waits are a tie, broken by the order of the dimensions (offered in any order).
    #[allow(clippy::float_cmp)]
    fn offer(&mut self, dimension: Dimension, wait: f64) {
        let earlier = self.dimension.is_none_or(|d| dimension < d);
        if wait > self.wait || (wait > 0.0 && wait == self.wait && earlier) {
            *self = Self { wait, dimension: Some(dimension) };
        }
    }

    fn reason(self) -> Option<&'static str> {
        self.dimension.map(Dimension::reason)
    }
}

/// What `adjust_consumption` did to one token limit; the binding logs the failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adjustment {
    /// The extra was taken or the difference refunded.
    Applied,
    /// `warn`: the bucket was emptied, `shortfall` tokens could not be taken.
    Warned { shortfall: f64 },
    /// `compensate`: the bucket was emptied and `shortfall` added to the debt, now `total_debt`.
    Compensated { shortfall: f64, total_debt: f64 },
}

/// The input and output parts of `total` from what a caller gave: both (they must add up to
/// it), one (the other is the rest, so it may not exceed `total`), or none (None: unknown).
/// `names` are the caller's names of the total and the two parts, for the error.
pub fn split_parts(
    total: u64,
    input: Option<u64>,
    output: Option<u64>,
    names: [&str; 3],
) -> CoreResult<Option<(u64, u64)>> {
    let [total_name, input_name, output_name] = names;
    match (input, output) {
        (None, None) => Ok(None),
        (Some(input), Some(output)) => match input.checked_add(output) {
            Some(sum) if sum == total => Ok(Some((input, output))),
            _ => Err(CoreError::InvalidRequest(format!(
                "{input_name} + {output_name} must equal {total_name}: got {input} + {output}, {total_name} = {total}"
            ))),
        },
        (Some(part), None) | (None, Some(part)) => {
            let Some(rest) = total.checked_sub(part) else {
                let name = if input.is_some() { input_name } else { output_name };
                return Err(CoreError::InvalidRequest(format!(
                    "{name} must be at most {total_name} ({total}), got {part}"
                )));
            };
            Ok(Some(if input.is_some() { (part, rest) } else { (rest, part) }))
        }
    }
}

/// Whether `meter` counts a request's whole estimate (not only its input or its output part).
fn counts_whole(meter: &Meter) -> bool {
    !matches!(meter.dimension(), Dimension::Itpm | Dimension::Otpm)
}

/// The limiter: a request bucket and a token bucket (each token limit with its compensation
/// debt), the optional limits as providers publish them, and a consumption history.
#[derive(Debug, Clone)]
pub struct Throttle<M> {
    config: ThrottleConfig,
    limits: ExtraLimits,
    /// Whether any of `limits` is set (a throttle of requests and tokens alone skips them).
    extra_limits: bool,
    requests: TokenBucket,
    tokens: Meter,
    /// Requests per day.
    daily_requests: Option<TokenBucket>,
    /// The other token limits (itpm, otpm, tpd: those configured, in that order).
    meters: Vec<Meter>,
    /// Requests in flight.
    slots: Option<Slots>,
    history: VecDeque<ConsumptionRecord<M>>,
    // Sequence number of `history[0]`; with `latest_by_id` it finds a record in O(1).
    first_seq: u64,
    latest_by_id: HashMap<String, u64>,
    evicted: Vec<M>,
    totals: HistoryTotals,
    /// The reading of the last `advance`: "now" for `check` and `consume`.
    now: f64,
    /// Seconds added to every clock reading: the steps back the clock took (see `advance`).
    clock_offset: f64,
    /// Nothing is granted before this instant (a provider's 429 and its `Retry-After`).
    penalized_until: f64,
}

/// Seconds a clock reading may lag the last one and still be a reading taken before another
/// thread's later one (time stands still for it); further behind, the clock stepped back.
pub const CLOCK_STEP_BACK: f64 = 1.0;

impl<M> Throttle<M> {
    /// A throttle with full buckets at `now`, limited by requests and tokens per minute only.
    pub fn new(config: ThrottleConfig, now: f64) -> CoreResult<Self> {
        Self::with_limits(config, ExtraLimits::default(), now)
    }

    /// A throttle with full buckets at `now` and the optional `limits` besides.
    pub fn with_limits(config: ThrottleConfig, limits: ExtraLimits, now: f64) -> CoreResult<Self> {
        config.validate()?;
        limits.validate()?;
        let requests = TokenBucket::new(config.burst_rpm.unwrap_or(config.rpm), config.rpm / 60.0, now);
        let tokens =
            Meter::new(Dimension::Tpm, config.burst_tpm.unwrap_or(config.tpm), config.tpm / 60.0, now);
        Ok(Self {
            daily_requests: limits.rpd.map(|rpd| TokenBucket::new(rpd, rpd / DAY, now)),
            meters: limits.meters(now),
            slots: limits.max_concurrent.map(Slots::new),
            config,
            extra_limits: limits.any(),
            limits,
            requests,
            tokens,
            history: VecDeque::new(),
            first_seq: 0,
            latest_by_id: HashMap::new(),
            evicted: Vec::new(),
            totals: HistoryTotals::default(),
            now,
            clock_offset: 0.0,
            penalized_until: f64::NEG_INFINITY,
        })
    }

    /// The validated settings.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// The optional limits.
    pub fn limits(&self) -> &ExtraLimits {
        &self.limits
    }

    /// Refills every bucket and drops history past its retention and its record limit.
    ///
    /// A `reading` more than `CLOCK_STEP_BACK` behind the last one is the clock stepping back (a
    /// wall clock set back), and time resumes from the last reading: the step is added to every
    /// later reading. Without that, nothing refilled and no penalty ran out until the clock
    /// caught up (an hour for a clock set back an hour), while every wait said otherwise.
    pub fn advance(&mut self, reading: f64) {
        let shifted = reading + self.clock_offset;
        if shifted < self.now - CLOCK_STEP_BACK {
            self.clock_offset += self.now - shifted;
        }
        // A clock read before another thread's later reading must not move time back.
        self.now = self.now.max(reading + self.clock_offset);
        let now = self.now;
        self.requests.refill(now);
        self.tokens.bucket_mut().refill(now);
        if self.extra_limits {
            if let Some(daily) = &mut self.daily_requests {
                daily.refill(now);
            }
            for meter in &mut self.meters {
                meter.bucket_mut().refill(now);
            }
        }
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
            if record.holds_slot {
                // Forgotten unsettled: its slot is free (it can no longer be settled).
                if let Some(slots) = &mut self.slots {
                    slots.free_slot(self.first_seq);
                }
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
        if let Some(slots) = &mut self.slots {
            slots.clear();
        }
    }

    /// The request bucket.
    pub fn requests(&self) -> &TokenBucket {
        &self.requests
    }

    /// The token bucket.
    pub fn tokens(&self) -> &TokenBucket {
        self.tokens.bucket()
    }

    /// Tokens the next `consume` takes on top of its estimate (from the token bucket).
    pub fn debt(&self) -> f64 {
        self.tokens.debt()
    }

    /// The daily request bucket, when `rpd` is set.
    pub fn daily_requests(&self) -> Option<&TokenBucket> {
        self.daily_requests.as_ref()
    }

    /// The other token limits configured (itpm, otpm, tpd, in that order).
    pub fn meters(&self) -> &[Meter] {
        &self.meters
    }

    /// The token limit of `dimension` (tpm, itpm, otpm or tpd), when configured.
    pub fn meter(&self, dimension: Dimension) -> Option<&Meter> {
        if dimension == Dimension::Tpm {
            return Some(&self.tokens);
        }
        self.meters.iter().find(|meter| meter.dimension() == dimension)
    }

    /// The requests in flight, when `max_concurrent` is set.
    pub fn slots(&self) -> Option<&Slots> {
        self.slots.as_ref()
    }

    /// The largest estimate that can ever be admitted without its input and output parts (each
    /// token limit then counts the whole estimate): the smallest token capacity.
    pub fn token_capacity(&self) -> f64 {
        self.meters.iter().map(|m| m.bucket().capacity()).fold(self.tokens.bucket().capacity(), f64::min)
    }

    /// Whether a request of `estimated` tokens, split into its input and output `parts` when
    /// known, can ever be admitted: every token limit's capacity holds its share (the whole
    /// estimate without the parts, so then this is `estimated <= token_capacity()`).
    pub fn fits_capacity(&self, estimated: u64, parts: Option<(u64, u64)>) -> bool {
        estimated as f64 <= self.tokens.bucket().capacity()
            && self
                .meters
                .iter()
                .all(|meter| meter.dimension().share(estimated, parts) as f64 <= meter.bucket().capacity())
    }

    /// Tokens a second that the token limits let through in the long run, estimates without
    /// parts counting against each: the slowest refill.
    pub fn token_rate(&self) -> f64 {
        self.meters.iter().map(|m| m.bucket().rate()).fold(self.tokens.bucket().rate(), f64::min)
    }

    /// Whether a request can be admitted at all now (no penalty, a request in every request
    /// bucket, a slot free), and if so the largest estimate without parts admitted now (below 0
    /// when none is; see `Meter::admissible`). Call `advance` first.
    pub fn admissible_tokens(&self) -> Option<f64> {
        self.admissible_over(|_| true)
    }

    /// `admissible_tokens` over the limits that count a request's whole estimate (tpm, tpd):
    /// the largest estimate split into input and output parts that may be admitted now (each
    /// part must still fit its own limit). Call `advance` first.
    pub fn admissible_whole_tokens(&self) -> Option<f64> {
        self.admissible_over(counts_whole)
    }

    fn admissible_over(&self, counted: impl Fn(&Meter) -> bool) -> Option<f64> {
        let request_free = self.penalty_left() <= 0.0
            && self.requests.has(1.0)
            && self.daily_requests.as_ref().is_none_or(|daily| daily.has(1.0))
            && self.slots.as_ref().is_none_or(|slots| slots.free() > 0);
        if !request_free {
            return None;
        }
        let most = self
            .meters
            .iter()
            .filter(|m| counted(m))
            .map(Meter::admissible)
            .fold(self.tokens.admissible(), f64::min);
        Some(most.max(-1.0))
    }

    /// The largest estimate split into input and output parts that can ever be admitted: the
    /// smallest capacity of the limits that count the whole estimate (tpm, tpd). Equal to
    /// `token_capacity` without input or output limits.
    pub fn whole_token_capacity(&self) -> f64 {
        self.meters
            .iter()
            .filter(|m| counts_whole(m))
            .map(|m| m.bucket().capacity())
            .fold(self.tokens.bucket().capacity(), f64::min)
    }

    /// Whether a request of `estimated` tokens (plus any debt) would be admitted now, and if
    /// not, exactly when. Call `advance` first.
    pub fn check(&self, estimated: u64) -> CheckResult {
        self.check_parts(estimated, None, 0.0)
    }

    /// `check` for a request that must also leave `margin` tokens in the token bucket (a
    /// reserve kept back), the total at most the capacity. Call `advance` first.
    pub fn check_with_margin(&self, estimated: u64, margin: f64) -> CheckResult {
        self.check_parts(estimated, None, margin)
    }

    /// `check_with_margin` for a request whose input and output parts may be known: the exact
    /// wait over every limit, the binding one named. Call `advance` first.
    #[inline]
    pub fn check_parts(&self, estimated: u64, parts: Option<(u64, u64)>, margin: f64) -> CheckResult {
        // A penalty holds the request bucket shut: it reports as the request limit.
        let request_wait = self.requests.time_until(1.0).max(self.penalty_left());
        let token_wait = self.tokens.wait(estimated, margin);
        let mut binding = if token_wait > request_wait {
            Binding { wait: token_wait, dimension: Some(Dimension::Tpm) }
        } else if request_wait > 0.0 {
            Binding { wait: request_wait, dimension: Some(Dimension::Rpm) }
        } else {
            Binding::NONE
        };
        let available_extra = self.extra_limits.then(|| self.check_extra(&mut binding, estimated, parts));
        CheckResult {
            allowed: binding.dimension.is_none(),
            reason: binding.reason(),
            available_in: binding.wait,
            available_requests: self.requests.available(),
            available_tokens: self.tokens.bucket().available(),
            available_extra,
        }
    }

    /// `check_parts` over the optional limits: kept out of line, so a throttle of requests and
    /// tokens alone checks as fast as it did before they existed.
    #[inline(never)]
    fn check_extra(
        &self,
        binding: &mut Binding,
        estimated: u64,
        parts: Option<(u64, u64)>,
    ) -> [Option<f64>; 5] {
        let mut available_extra = [None; 5];
        if let Some(daily) = &self.daily_requests {
            binding.offer(Dimension::Rpd, daily.time_until(1.0));
            available_extra[2] = Some(daily.available());
        }
        for meter in &self.meters {
            let dimension = meter.dimension();
            binding.offer(dimension, meter.wait(dimension.share(estimated, parts), 0.0));
            if let Some(index) = extra_index(dimension) {
                available_extra[index] = Some(meter.bucket().available());
            }
        }
        if let Some(slots) = &self.slots {
            binding.offer(Dimension::Concurrency, slots.wait(self.now, self.config.history_retention));
            available_extra[4] = Some(slots.free() as f64);
        }
        available_extra
    }

    /// Whether the limits beyond rpm and tpm admit a request of `estimated` (split into `parts`
    /// when known) now.
    #[inline(never)]
    fn admits_extra(&self, estimated: u64, parts: Option<(u64, u64)>) -> bool {
        self.daily_requests.as_ref().is_none_or(|daily| daily.has(1.0))
            && self.meters.iter().all(|meter| meter.admits(meter.dimension().share(estimated, parts)))
            && self.slots.as_ref().is_none_or(|slots| slots.free() > 0)
    }

    /// Takes one request and the estimate plus the debt, all or nothing. Call `advance` first.
    pub fn consume(&mut self, now: f64, request_id: &str, estimated: u64, metadata: M) -> bool {
        self.try_consume(now, request_id, estimated, metadata).is_ok()
    }

    /// `consume`, handing `metadata` back when refused (a binding releases it unlocked).
    pub fn try_consume(&mut self, now: f64, request_id: &str, estimated: u64, metadata: M) -> Result<(), M> {
        self.try_consume_parts(now, request_id, estimated, None, metadata)
    }

    /// `try_consume` of a request whose input and output `parts` (adding up to `estimated`)
    /// may be known: one request from each request limit, the estimate (plus its debt) from
    /// each token limit (the input part from itpm, the output part from otpm: each the whole
    /// estimate when the parts are unknown), and a slot, all or nothing.
    pub fn try_consume_parts(
        &mut self,
        now: f64,
        request_id: &str,
        estimated: u64,
        parts: Option<(u64, u64)>,
        metadata: M,
    ) -> Result<(), M> {
        let key = self.reserve_parts(now, request_id, estimated, parts, metadata)?;
        self.latest_by_id.insert(request_id.to_owned(), key.0);
        Ok(())
    }

    /// Takes what `consume` takes, all or nothing, and returns the reservation's key; the
    /// record is found by that key only (`adjust_reservation`, `settle_reservation`,
    /// `release_reservation`), not by `request_id`, which it keeps for the history. Call
    /// `advance` first.
    pub fn reserve(
        &mut self,
        now: f64,
        request_id: &str,
        estimated: u64,
        metadata: M,
    ) -> Result<ReservationKey, M> {
        self.reserve_parts(now, request_id, estimated, None, metadata)
    }

    /// `reserve` of a request whose input and output `parts` may be known (see
    /// `try_consume_parts`).
    pub fn reserve_parts(
        &mut self,
        now: f64,
        request_id: &str,
        estimated: u64,
        parts: Option<(u64, u64)>,
        metadata: M,
    ) -> Result<ReservationKey, M> {
        // The token need computed once, for the check and the take (the hot path of a dispatch).
        let needed = self.tokens.needed(estimated);
        let admitted = self.penalty_left() <= 0.0
            && self.requests.has(1.0)
            && self.tokens.bucket().has(needed)
            && (!self.extra_limits || self.admits_extra(estimated, parts));
        if !admitted {
            return Err(metadata);
        }
        self.requests.take(1.0);
        let charge = self.tokens.take_needed(estimated, needed);
        let seq = self.first_seq + self.history.len() as u64;
        let (extra, holds_slot) = if self.extra_limits || parts.is_some() {
            self.take_extra(seq, now, estimated, parts)
        } else {
            (None, false)
        };
        self.history.push_back(ConsumptionRecord {
            timestamp: now,
            tokens: estimated,
            request_id: request_id.to_owned(),
            metadata,
            estimated_tokens: estimated,
            actual_tokens: None,
            compensation_debt: charge.debt,
            unpaid: 0.0,
            owed: 0.0,
            released: false,
            holds_slot,
            extra,
        });
        if let Some(record) = self.history.back() {
            self.totals.add(record);
        }
        while self.history.len() > self.config.max_history_records {
            self.pop_oldest();
        }
        Ok(ReservationKey(seq))
    }

    /// The part of a grant beyond requests and tokens per minute: a request of the day, its
    /// share of each other token limit, a slot; and the record's extra part. Kept out of line,
    /// so a throttle of requests and tokens alone grants as fast as it did before they existed.
    #[inline(never)]
    fn take_extra(
        &mut self,
        seq: u64,
        now: f64,
        estimated: u64,
        parts: Option<(u64, u64)>,
    ) -> (Option<Box<RecordExtra>>, bool) {
        if let Some(daily) = &mut self.daily_requests {
            daily.take(1.0);
        }
        let charges = self
            .meters
            .iter_mut()
            .map(|meter| {
                let share = meter.dimension().share(estimated, parts);
                meter.take(share)
            })
            .collect();
        let extra = RecordExtra { parts, output_cap: parts.map(|(_, output)| output), charges };
        let holds_slot = match &mut self.slots {
            Some(slots) => {
                slots.hold(seq, now);
                true
            }
            None => false,
        };
        (Some(Box::new(extra)), holds_slot)
    }

    /// Sets the token count of the latest consume of `request_id` to `actual`: takes the extra
    /// or refunds the difference. `actual` = 0 refunds the tokens and records no actual count
    /// (the estimation metrics ignore it). Returns what it did to the token bucket (see
    /// `adjust_parts` for every limit). Call `advance` first.
    pub fn adjust(&mut self, request_id: &str, actual: u64) -> CoreResult<Adjustment> {
        let outcomes = self.adjust_parts(request_id, actual, None)?;
        Ok(outcomes.into_iter().find(|(d, _)| *d == Dimension::Tpm).map_or(Adjustment::Applied, |(_, a)| a))
    }

    /// `adjust` with the actual input and output `parts` when known (adding up to `actual`):
    /// each token limit is moved to its share of the actual count (the input to itpm, the
    /// output to otpm). Without the parts, itpm counts the whole actual count (any of it may be
    /// input) and otpm the whole of it up to the output the grant reserved (a provider stops
    /// there), or the whole when it reserved none. The grant's slot of `max_concurrent` is
    /// freed: an adjustment settles it. "strict" refuses, changing nothing, when any limit holds
    /// less than its extra (the reason names the one with the longest wait); "warn" and
    /// "compensate" apply to each limit. Returns the limits that could not take their whole
    /// extra. Call `advance` first.
    pub fn adjust_parts(
        &mut self,
        request_id: &str,
        actual: u64,
        parts: Option<(u64, u64)>,
    ) -> CoreResult<Vec<(Dimension, Adjustment)>> {
        let index = self.record_index(request_id)?;
        self.adjust_at(index, actual, parts)
    }

    /// `adjust_parts` of the reservation `key` names (`parts`, when known, add up to
    /// `actual`). Call `advance` first. Returns the limits that could not take their whole
    /// extra, as `adjust_parts` does.
    pub fn adjust_reservation(
        &mut self,
        key: ReservationKey,
        actual: u64,
        parts: Option<(u64, u64)>,
    ) -> CoreResult<Vec<(Dimension, Adjustment)>> {
        let index = self.key_index(key)?;
        self.adjust_at(index, actual, parts)
    }

    fn adjust_at(
        &mut self,
        index: usize,
        actual: u64,
        parts: Option<(u64, u64)>,
    ) -> CoreResult<Vec<(Dimension, Adjustment)>> {
        let strategy = self.config.adjustment_failure_strategy;
        let record = &self.history[index];
        let output_cap = record.extra.as_ref().and_then(|extra| extra.output_cap).unwrap_or(u64::MAX);
        let target = |dimension: Dimension| match (dimension, parts) {
            (_, Some(_)) => dimension.share(actual, parts),
            (Dimension::Otpm, None) => actual.min(output_cap),
            _ => actual,
        };
        let mut charge = Charge {
            tokens: record.tokens,
            debt: record.compensation_debt,
            unpaid: record.unpaid,
            owed: record.owed,
        };
        let mut charges = record.extra.as_ref().map(|extra| extra.charges.clone()).unwrap_or_default();
        if strategy == AdjustmentFailureStrategy::Strict {
            let mut refusal = Binding::NONE;
            if let Some(wait) = self.tokens.shortfall_wait(&charge, actual) {
                refusal.offer(Dimension::Tpm, wait);
            }
            for (meter, charge) in self.meters.iter().zip(&charges) {
                if let Some(wait) = meter.shortfall_wait(charge, target(meter.dimension())) {
                    refusal.offer(meter.dimension(), wait);
                }
            }
            if let Some(reason) = refusal.reason() {
                return Err(CoreError::RateLimit { reason, available_in: refusal.wait });
            }
        }
        let mut outcomes = Vec::new();
        let outcome = self.tokens.adjust(strategy, &mut charge, actual);
        if outcome != Adjustment::Applied {
            outcomes.push((Dimension::Tpm, outcome));
        }
        for (meter, meter_charge) in self.meters.iter_mut().zip(charges.iter_mut()) {
            let dimension = meter.dimension();
            let outcome = meter.adjust(strategy, meter_charge, target(dimension));
            if outcome != Adjustment::Applied {
                outcomes.push((dimension, outcome));
            }
        }
        let seq = self.first_seq + index as u64;
        let record = &mut self.history[index];
        self.totals.remove(record);
        record.unpaid = charge.unpaid;
        record.owed = charge.owed;
        record.tokens = actual;
        // 0 tokens is a refund (the call failed, or never reached the provider), not a measured
        // count: recording it would score a failed call as an estimation miss.
        record.actual_tokens = (actual > 0).then_some(actual);
        if record.extra.is_some() || parts.is_some() {
            let extra = record.extra.get_or_insert_with(Box::default);
            extra.parts = parts;
            extra.charges = charges;
        }
        let settled = std::mem::take(&mut record.holds_slot);
        self.totals.add(record);
        if settled {
            if let Some(slots) = &mut self.slots {
                slots.free_slot(seq);
            }
        }
        Ok(outcomes)
    }

    /// Ends the time in flight of the latest consume of `request_id`: frees its slot of
    /// `max_concurrent` (if it still holds one) and keeps its tokens as counted. For a call that
    /// ended without a count to adjust to. Call `advance` first.
    pub fn settle(&mut self, request_id: &str) -> CoreResult<()> {
        let index = self.record_index(request_id)?;
        self.settle_at(index);
        Ok(())
    }

    /// `settle` of the reservation `key` names. Call `advance` first.
    pub fn settle_reservation(&mut self, key: ReservationKey) -> CoreResult<()> {
        let index = self.key_index(key)?;
        self.settle_at(index);
        Ok(())
    }

    fn settle_at(&mut self, index: usize) {
        if std::mem::take(&mut self.history[index].holds_slot) {
            let seq = self.first_seq + index as u64;
            if let Some(slots) = &mut self.slots {
                slots.free_slot(seq);
            }
        }
    }

    /// Gives back the latest consume of `request_id` whole, as if it never happened: its
    /// tokens (the estimate, or the actual count once adjusted) and its request go back to the
    /// buckets, the debt it paid is owed again, its slot is free, and its record stops
    /// counting. For a reservation that was never used (the dispatch failed after it was
    /// made). Call `advance` first.
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
        let seq = self.first_seq + index as u64;
        let record = &mut self.history[index];
        let charge = Charge {
            tokens: record.tokens,
            debt: record.compensation_debt,
            unpaid: record.unpaid,
            owed: record.owed,
        };
        let charges =
            record.extra.as_mut().map(|extra| std::mem::take(&mut extra.charges)).unwrap_or_default();
        let held_slot = std::mem::take(&mut record.holds_slot);
        record.released = true;
        let record = &self.history[index];
        self.totals.remove(record);
        self.requests.refund(1.0);
        self.tokens.release(&charge);
        if let Some(daily) = &mut self.daily_requests {
            daily.refund(1.0);
        }
        for (meter, charge) in self.meters.iter_mut().zip(&charges) {
            meter.release(charge);
        }
        if held_slot {
            if let Some(slots) = &mut self.slots {
                slots.free_slot(seq);
            }
        }
    }

    /// The reading of the last `advance`.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Seconds left of a penalty (0 when none).
    pub fn penalty_left(&self) -> f64 {
        (self.penalized_until - self.now).max(0.0)
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

    /// Forgets every consumption record (no adjustment possible for them any more, and the
    /// slots they held are free).
    pub fn clear_history(&mut self) {
        self.evict_all();
    }

    /// Full buckets, no history, no debt, no request in flight.
    pub fn reset(&mut self, now: f64) {
        self.requests.reset(now);
        self.tokens.reset(now);
        if let Some(daily) = &mut self.daily_requests {
            daily.reset(now);
        }
        for meter in &mut self.meters {
            meter.reset(now);
        }
        self.evict_all();
        self.penalized_until = f64::NEG_INFINITY;
    }

    /// Whether the internal state is consistent (buckets in range, debts >= 0, slots within
    /// their limit, history within its limits and timestamps plausible). Call `advance` first.
    pub fn validate_state(&self, now: f64) -> bool {
        let oldest_allowed = now - 2.0 * self.config.history_retention;
        self.requests.consistent()
            && self.tokens.consistent()
            && self.daily_requests.as_ref().is_none_or(TokenBucket::consistent)
            && self.meters.iter().all(Meter::consistent)
            && self.slots.as_ref().is_none_or(|slots| {
                slots.in_flight() <= slots.limit()
                    && slots.in_flight() == self.history.iter().filter(|r| r.holds_slot).count() as u64
            })
            && self.history.len() <= self.config.max_history_records
            && self
                .history
                .iter()
                .all(|record| record.timestamp >= oldest_allowed && record.timestamp <= now + 1.0)
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // values in these tests are exact in binary
mod tests;

#[cfg(test)]
#[allow(clippy::float_cmp)] // values in these tests are exact in binary
mod limits_tests;
