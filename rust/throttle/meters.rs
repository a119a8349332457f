//! The limits as providers publish them, beside requests and tokens per minute: input and output
//! tokens per minute (Anthropic's ITPM and OTPM), requests and tokens per day, and requests in
//! flight. A token limit is a [`Meter`] (a bucket and its own compensation debt); a grant records
//! a [`Charge`] on each; the requests in flight are [`Slots`].

use std::collections::BTreeMap;

use super::bucket::{next_up, TokenBucket};
use super::{Adjustment, AdjustmentFailureStrategy};
use crate::errors::{CoreError, CoreResult};

/// Debt below this many tokens is float dust from refunds and is forgotten.
pub(super) const DEBT_DUST: f64 = 1e-9;

/// Seconds in a day: the period of `rpd` and `tpd`.
pub const DAY: f64 = 86_400.0;

/// One limit of a throttle, as `RateLimitCheckResult.reason` names it. The order is the order
/// in which equal waits are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// Requests per minute.
    Rpm,
    /// Tokens (input plus output) per minute.
    Tpm,
    /// Input tokens per minute.
    Itpm,
    /// Output tokens per minute.
    Otpm,
    /// Requests per day.
    Rpd,
    /// Tokens (input plus output) per day.
    Tpd,
    /// Requests in flight.
    Concurrency,
}

impl Dimension {
    /// The limit's option name (`"itpm"`, `"concurrency"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
            Self::Itpm => "itpm",
            Self::Otpm => "otpm",
            Self::Rpd => "rpd",
            Self::Tpd => "tpd",
            Self::Concurrency => "concurrency",
        }
    }

    /// The `reason` of a refusal it binds.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Rpm => "rpm_limit",
            Self::Tpm => "tpm_limit",
            Self::Itpm => "itpm_limit",
            Self::Otpm => "otpm_limit",
            Self::Rpd => "rpd_limit",
            Self::Tpd => "tpd_limit",
            Self::Concurrency => "concurrency_limit",
        }
    }

    /// The tokens of a request of `total` (split into `parts`, input and output, when known)
    /// this limit counts. Without the parts, an input or output limit counts the whole total:
    /// any of it may turn out to be input, or output (conservative: never over the provider's
    /// limit, at the price of throughput).
    pub fn share(self, total: u64, parts: Option<(u64, u64)>) -> u64 {
        match (self, parts) {
            (Self::Itpm, Some((input, _))) => input,
            (Self::Otpm, Some((_, output))) => output,
            _ => total,
        }
    }
}

/// The optional limits of a throttle (each None: not limited). Per minute and per day the
/// bucket refills continuously (a day's limit at `rpd / 86400` per second).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraLimits {
    /// Input tokens per minute.
    pub itpm: Option<f64>,
    /// Capacity of the input token bucket; `itpm` when None.
    pub burst_itpm: Option<f64>,
    /// Output tokens per minute.
    pub otpm: Option<f64>,
    /// Capacity of the output token bucket; `otpm` when None.
    pub burst_otpm: Option<f64>,
    /// Requests per day (also the bucket's capacity: a burst above a day's limit means nothing).
    pub rpd: Option<f64>,
    /// Tokens per day (also the bucket's capacity).
    pub tpd: Option<f64>,
    /// Requests in flight: a grant holds a slot until it is adjusted, released or forgotten.
    pub max_concurrent: Option<u64>,
}

impl ExtraLimits {
    /// Checks every field; the error names the field and the bad value.
    pub fn validate(&self) -> CoreResult<()> {
        let limits = [
            ("itpm", self.itpm, Some(("burst_itpm", self.burst_itpm)), "input token"),
            ("otpm", self.otpm, Some(("burst_otpm", self.burst_otpm)), "output token"),
            ("rpd", self.rpd, None, "request"),
            ("tpd", self.tpd, None, "token"),
        ];
        for (name, rate, burst, unit) in limits {
            check_limit(name, rate, burst, unit)?;
        }
        if self.max_concurrent == Some(0) {
            return Err(CoreError::InvalidConfig(
                "max_concurrent must be >= 1: with no request in flight allowed, none is ever admitted; got 0"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether any limit beyond rpm and tpm is set.
    pub fn any(&self) -> bool {
        self.itpm.is_some()
            || self.otpm.is_some()
            || self.rpd.is_some()
            || self.tpd.is_some()
            || self.max_concurrent.is_some()
    }

    /// The token meters these limits make, in the order of their dimensions (itpm, otpm, tpd).
    pub(super) fn meters(&self, now: f64) -> Vec<Meter> {
        let per_minute = |dimension, rate: Option<f64>, burst: Option<f64>| {
            rate.map(|rate| Meter::new(dimension, burst.unwrap_or(rate), rate / 60.0, now))
        };
        [
            per_minute(Dimension::Itpm, self.itpm, self.burst_itpm),
            per_minute(Dimension::Otpm, self.otpm, self.burst_otpm),
            self.tpd.map(|tpd| Meter::new(Dimension::Tpd, tpd, tpd / DAY, now)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A rate (and its burst, where it has one) that can admit a request: a finite rate > 0, a
/// burst >= the rate, and a capacity of at least one `unit`.
fn check_limit(
    name: &str,
    rate: Option<f64>,
    burst: Option<(&str, Option<f64>)>,
    unit: &str,
) -> CoreResult<()> {
    let burst_value = burst.and_then(|(_, value)| value);
    let Some(rate) = rate else {
        if let (Some((burst_name, _)), Some(value)) = (burst, burst_value) {
            return Err(CoreError::InvalidConfig(format!(
                "{burst_name} is the capacity of the {name} bucket and needs {name}; got {burst_name}={value} \
                 without {name}"
            )));
        }
        return Ok(());
    };
    if !(rate.is_finite() && rate > 0.0) {
        return Err(CoreError::InvalidConfig(format!("{name} must be a finite number > 0, got {rate}")));
    }
    match (burst, burst_value) {
        (Some((burst_name, _)), Some(value)) => {
            if !(value.is_finite() && value >= rate) {
                return Err(CoreError::InvalidConfig(format!(
                    "{burst_name} must be a finite number >= the rate ({rate}), got {value}"
                )));
            }
            if value < 1.0 {
                return Err(CoreError::InvalidConfig(format!(
                    "{burst_name} must be >= 1: it is the {unit} bucket's capacity, and a bucket holding \
                     less than one {unit} never admits a request; got {value}"
                )));
            }
        }
        (Some((burst_name, _)), None) if rate < 1.0 => {
            return Err(CoreError::InvalidConfig(format!(
                "{name} must be >= 1: without {burst_name} it is the {unit} bucket's capacity, and a bucket \
                 holding less than one {unit} never admits a request; got {rate} (for less than one {unit} a \
                 minute, also set {burst_name} >= 1)"
            )));
        }
        (None, _) if rate < 1.0 => {
            return Err(CoreError::InvalidConfig(format!(
                "{name} must be >= 1: it is the {unit} bucket's capacity, and a bucket holding less than one \
                 {unit} never admits a request; got {rate}"
            )));
        }
        _ => {}
    }
    Ok(())
}

/// What one grant took from one token meter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Charge {
    /// Tokens it counts for: its share of the estimate, then of the actual count once adjusted.
    pub tokens: u64,
    /// Debt the grant paid on top of its tokens.
    pub debt: f64,
    /// Tokens of an upward adjustment the bucket could not pay (`warn` or `compensate`): counted
    /// in `tokens` but never taken, so a release does not give them back.
    pub unpaid: f64,
    /// The part of `unpaid` that became debt (`compensate`; the rest was never owed: `warn`, or
    /// past the most debt a bucket carries).
    pub owed: f64,
}

/// A token limit: its bucket and its compensation debt (what the next grant takes on top).
#[derive(Debug, Clone)]
pub struct Meter {
    dimension: Dimension,
    bucket: TokenBucket,
    debt: f64,
}

impl Meter {
    /// A full meter without debt.
    pub fn new(dimension: Dimension, capacity: f64, rate: f64, now: f64) -> Self {
        Self { dimension, bucket: TokenBucket::new(capacity, rate, now), debt: 0.0 }
    }

    /// The limit it keeps.
    pub fn dimension(&self) -> Dimension {
        self.dimension
    }

    /// Its bucket.
    pub fn bucket(&self) -> &TokenBucket {
        &self.bucket
    }

    /// Its bucket, to refill, cap or reset.
    pub(super) fn bucket_mut(&mut self) -> &mut TokenBucket {
        &mut self.bucket
    }

    /// Tokens the next grant takes on top of its own.
    pub fn debt(&self) -> f64 {
        self.debt
    }

    pub(super) fn set_debt(&mut self, debt: f64) {
        self.debt = debt;
    }

    /// Tokens a grant of `tokens` must find in the bucket. With a debt that would push it past
    /// the capacity, a full bucket is enough (the rest of the debt carries over): otherwise a
    /// debt near the capacity would block every request forever.
    pub fn needed(&self, tokens: u64) -> f64 {
        let tokens = tokens as f64;
        let capacity = self.bucket.capacity();
        if tokens > capacity {
            tokens
        } else {
            (tokens + self.debt).min(capacity)
        }
    }

    /// Whether a grant of `tokens` (plus the debt) fits now.
    pub fn admits(&self, tokens: u64) -> bool {
        self.bucket.has(self.needed(tokens))
    }

    /// Exact seconds until a grant of `tokens` (plus the debt, plus `margin` kept back, the
    /// whole at most the capacity) fits: 0 now, infinite never.
    pub fn wait(&self, tokens: u64, margin: f64) -> f64 {
        let mut needed = self.needed(tokens);
        if margin > 0.0 {
            needed = (needed + margin).min(self.bucket.capacity().max(needed));
        }
        self.bucket.time_until(needed)
    }

    /// The largest grant that fits now: the capacity when the bucket is full, else what it
    /// holds less the debt (see `needed`); below 0 when none does.
    pub fn admissible(&self) -> f64 {
        let capacity = self.bucket.capacity();
        if self.bucket.has(capacity) {
            capacity
        } else {
            self.bucket.available() - self.debt
        }
    }

    /// Takes `tokens` plus the debt (the caller checked `admits`); returns the grant's charge.
    pub fn take(&mut self, tokens: u64) -> Charge {
        self.take_needed(tokens, self.needed(tokens))
    }

    /// `take`, with `needed` (`self.needed(tokens)`) computed by the caller.
    #[inline]
    pub fn take_needed(&mut self, tokens: u64, needed: f64) -> Charge {
        self.bucket.take(needed);
        let applied = (needed - tokens as f64).max(0.0);
        self.debt -= applied;
        if self.debt < DEBT_DUST {
            self.debt = 0.0;
        }
        Charge { tokens, debt: applied, unpaid: 0.0, owed: 0.0 }
    }

    /// When moving `charge` to `actual` takes more than the bucket holds: the seconds until it
    /// would (what "strict" reports).
    pub fn shortfall_wait(&self, charge: &Charge, actual: u64) -> Option<f64> {
        let extra = actual.checked_sub(charge.tokens).filter(|&extra| extra > 0)? as f64;
        (!self.bucket.has(extra)).then(|| self.bucket.time_until(extra))
    }

    /// Moves `charge` to `actual`: takes the extra (what the bucket cannot give: the warn or
    /// compensate strategy; "strict" was refused by the caller before anything changed) or gives
    /// back the difference, forgiving first what an earlier extra left unpaid and never owed,
    /// then what it owed.
    ///
    /// Under "compensate" the debt is at most the bucket's capacity: a provider's own bucket is
    /// full again one window after any use, however large, so a larger debt (an actual count in
    /// the billions) would hold the limiter back long after the provider. The part beyond is
    /// unpaid and never owed, as under "warn".
    pub fn adjust(
        &mut self,
        strategy: AdjustmentFailureStrategy,
        charge: &mut Charge,
        actual: u64,
    ) -> Adjustment {
        let mut outcome = Adjustment::Applied;
        if actual > charge.tokens {
            let extra = (actual - charge.tokens) as f64;
            if !self.bucket.take(extra) {
                let shortfall = self.bucket.take_up_to(extra);
                charge.unpaid += shortfall;
                outcome = if strategy == AdjustmentFailureStrategy::Compensate {
                    let owed = shortfall.min((self.bucket.capacity() - self.debt).max(0.0));
                    self.debt += owed;
                    charge.owed += owed;
                    Adjustment::Compensated { shortfall, total_debt: self.debt }
                } else {
                    Adjustment::Warned { shortfall }
                };
            }
        } else if actual < charge.tokens {
            let lower = (charge.tokens - actual) as f64;
            let never_owed = lower.min(charge.unpaid - charge.owed);
            let owed = (lower - never_owed).min(charge.owed);
            charge.unpaid -= never_owed + owed;
            charge.owed -= owed;
            self.give_back_owed(owed);
            self.bucket.refund(lower - never_owed - owed);
        }
        charge.tokens = actual;
        outcome
    }

    /// Gives a grant's charge back whole: its tokens (less what was never paid) and the debt it
    /// paid go back to the bucket, and that debt is owed again; the debt its unpaid adjustment
    /// added is not owed any more.
    pub fn release(&mut self, charge: &Charge) {
        self.bucket.refund(charge.tokens as f64 - charge.unpaid + charge.debt);
        self.give_back_owed(charge.owed);
        self.debt += charge.debt;
    }

    /// Gives back `tokens` of debt an upward adjustment added: what is still owed is cancelled,
    /// and what later grants already paid of it goes back to the bucket. (Such a payer's own
    /// release then re-owes what it paid: exact attribution is not kept.)
    fn give_back_owed(&mut self, tokens: f64) {
        let cancelled = tokens.min(self.debt);
        self.debt -= cancelled;
        self.bucket.refund(tokens - cancelled);
    }

    /// Full bucket, no debt, no ceiling.
    pub(super) fn reset(&mut self, now: f64) {
        self.bucket.reset(now);
        self.debt = 0.0;
    }

    pub(super) fn consistent(&self) -> bool {
        self.bucket.consistent() && self.debt >= 0.0
    }
}

/// The requests in flight: each grant holds a slot from its consume until it is adjusted
/// (settled), released, or forgotten with its record (after `history_retention`, or pushed out
/// by `max_history_records`): a reservation never settled cannot hold a slot for ever.
#[derive(Debug, Clone)]
pub struct Slots {
    limit: u64,
    /// Sequence number of each grant holding a slot -> when it was granted.
    held: BTreeMap<u64, f64>,
}

impl Slots {
    /// No slot held.
    pub fn new(limit: u64) -> Self {
        Self { limit, held: BTreeMap::new() }
    }

    /// Most requests in flight.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u64 {
        self.held.len() as u64
    }

    /// Slots free now.
    pub fn free(&self) -> u64 {
        self.limit.saturating_sub(self.in_flight())
    }

    pub(super) fn hold(&mut self, seq: u64, at: f64) {
        self.held.insert(seq, at);
    }

    /// Frees the slot of grant `seq`; whether it held one.
    pub(super) fn free_slot(&mut self, seq: u64) -> bool {
        self.held.remove(&seq).is_some()
    }

    pub(super) fn clear(&mut self) {
        self.held.clear();
    }

    /// Seconds from `now` until a slot is free if no grant is settled or released meanwhile: 0
    /// when one is; else when the oldest grant holding one is forgotten, `retention` after it
    /// was made (exact in the clock's arithmetic: `advance(now + wait)` forgets it, one float
    /// step earlier not). Grants are recorded in time order, so the oldest is the first.
    pub fn wait(&self, now: f64, retention: f64) -> f64 {
        if self.free() > 0 {
            return 0.0;
        }
        let Some((_, &at)) = self.held.first_key_value() else { return 0.0 };
        let forgotten = |wait: f64| at <= (now + wait) - retention;
        let mut wait = ((at + retention) - now).max(f64::MIN_POSITIVE);
        for _ in 0..64 {
            if forgotten(wait) {
                break;
            }
            let reading = (now + wait).abs();
            wait = (wait + (at - ((now + wait) - retention)))
                .max(wait + (next_up(reading) - reading))
                .max(next_up(wait));
        }
        wait
    }
}
