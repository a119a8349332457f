//! One token bucket: continuous refill up to a capacity, with an optional ceiling that a
//! provider's own figures impose until their reset.

/// The state of one bucket, as snapshots carry it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens in the bucket at `last_refill`.
    pub available: f64,
    /// Most tokens the bucket holds.
    pub capacity: f64,
    /// Instant of the last refill, in the throttle clock's seconds. Only its distance to the
    /// snapshot's `timestamp` is used on restore (the restoring clock may count from elsewhere).
    pub last_refill: f64,
}

/// What a provider said remains, until its reset: the bucket may hold no more than `tokens`,
/// which falls with every grant, until `until`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ceiling {
    tokens: f64,
    until: f64,
}

/// A token bucket refilled continuously at `rate` tokens per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    available: f64,
    last_refill: f64,
    ceiling: Option<Ceiling>,
}

/// The smallest float above a positive `x`.
pub(super) fn next_up(x: f64) -> f64 {
    f64::from_bits(x.to_bits() + 1)
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: f64, rate: f64, now: f64) -> Self {
        Self { capacity, rate, available: capacity, last_refill: now, ceiling: None }
    }

    /// Adds the tokens refilled since the last call. A clock reading older than the last one
    /// (two threads racing for the lock) adds nothing rather than draining the bucket. A
    /// ceiling caps the refill until its instant, and the time after it refills freely.
    pub fn refill(&mut self, now: f64) {
        if let Some(ceiling) = self.ceiling {
            if now < ceiling.until {
                self.refill_to(now, ceiling.tokens);
                return;
            }
            self.refill_to(ceiling.until, ceiling.tokens);
            self.ceiling = None;
        }
        self.refill_to(now, self.capacity);
    }

    fn refill_to(&mut self, now: f64, limit: f64) {
        let elapsed = now - self.last_refill;
        if elapsed > 0.0 {
            let refilled = (self.available + elapsed * self.rate).min(self.capacity);
            // A ceiling stops the refill; it never takes away what is already there.
            self.available = refilled.min(limit.max(self.available));
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
        self.available >= count
    }

    /// Seconds until the bucket holds `count` tokens: 0 if it does, infinite if it never can.
    /// Exact in the clock's own arithmetic: a refill at `last_refill + wait` (the reading a
    /// clock advanced by `wait` gives) finds `count` tokens, and one a float step earlier not.
    /// Under a ceiling below `count`, the wait runs past the ceiling's end.
    pub fn time_until(&self, count: f64) -> f64 {
        if self.has(count) {
            return 0.0;
        }
        if count > self.capacity {
            return f64::INFINITY;
        }
        match self.ceiling {
            Some(ceiling) if ceiling.tokens.max(self.available) < count => {
                let mut after = self.clone();
                after.refill(ceiling.until);
                (ceiling.until - self.last_refill) + after.time_until(count)
            }
            _ => self.free_time_until(count),
        }
    }

    fn free_time_until(&self, count: f64) -> f64 {
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
            self.lower_ceiling(count);
            true
        } else {
            false
        }
    }

    /// Takes as many of `count` tokens as there are; returns how many it could not take.
    pub fn take_up_to(&mut self, count: f64) -> f64 {
        let taken = count.min(self.available).max(0.0);
        self.available -= taken;
        self.lower_ceiling(count);
        count - taken
    }

    fn lower_ceiling(&mut self, count: f64) {
        if let Some(ceiling) = &mut self.ceiling {
            ceiling.tokens = (ceiling.tokens - count).max(0.0);
        }
    }

    /// Gives back `count` tokens, up to the capacity (and a provider's ceiling, which does not
    /// rise again: the provider has not said it refunds).
    pub fn refund(&mut self, count: f64) {
        let limit = self.ceiling.map_or(self.capacity, |c| c.tokens.max(self.available).min(self.capacity));
        self.available = (self.available + count).min(limit);
    }

    /// Lowers the bucket to at most `remaining` now, and, with `until`, keeps it at most
    /// `remaining` minus what is taken from now on until that instant. A later call replaces
    /// the ceiling: it is the provider's newest word.
    pub fn cap(&mut self, remaining: f64, until: Option<f64>) {
        self.available = self.available.min(remaining.max(0.0));
        self.ceiling =
            until.filter(|&until| until > self.last_refill).map(|until| Ceiling { tokens: remaining, until });
    }

    /// Fills the bucket and forgets any ceiling.
    pub fn reset(&mut self, now: f64) {
        self.available = self.capacity;
        self.last_refill = now;
        self.ceiling = None;
    }

    /// The bucket's state for a snapshot.
    pub fn state(&self) -> BucketState {
        BucketState { available: self.available, capacity: self.capacity, last_refill: self.last_refill }
    }

    /// Puts back the level of `state` as of `now`: the time `state` had refilled for before its
    /// snapshot counts again from `now`, whatever instant the snapshot's clock used.
    pub fn restore(&mut self, state: &BucketState, since_refill: f64, now: f64) {
        self.available = state.available;
        self.last_refill = now - since_refill;
        self.ceiling = None;
    }

    pub(super) fn consistent(&self) -> bool {
        (0.0..=self.capacity).contains(&self.available) && self.capacity > 0.0 && self.rate > 0.0
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // values in these tests are exact in binary
mod tests {
    use super::*;

    #[test]
    fn a_ceiling_caps_refill_until_its_instant_and_falls_with_grants() {
        let mut bucket = TokenBucket::new(1000.0, 10.0, 0.0);
        bucket.cap(300.0, Some(50.0));
        assert_eq!(bucket.available(), 300.0);
        assert!(bucket.take(100.0));
        // The provider said 300 remain until t=50: 100 were granted, so at most 200 now.
        bucket.refill(40.0);
        assert_eq!(bucket.available(), 200.0);
        assert!(!bucket.has(250.0));
        // 250 tokens: the ceiling holds the bucket at 200 until t=50, then 5 s of refill.
        assert_eq!(bucket.time_until(250.0), 15.0);
        bucket.refill(55.0);
        assert_eq!(bucket.available(), 250.0);
        // A refund does not lift a live ceiling.
        let mut capped = TokenBucket::new(1000.0, 10.0, 0.0);
        capped.cap(300.0, Some(50.0));
        assert!(capped.take(300.0));
        capped.refund(300.0);
        assert_eq!(capped.available(), 0.0);
    }

    #[test]
    fn a_cap_without_reset_lowers_once() {
        let mut bucket = TokenBucket::new(1000.0, 10.0, 0.0);
        bucket.cap(100.0, None);
        assert_eq!(bucket.available(), 100.0);
        bucket.refill(10.0);
        assert_eq!(bucket.available(), 200.0);
        // Never raises the level.
        bucket.cap(5000.0, Some(100.0));
        assert_eq!(bucket.available(), 200.0);
    }

    #[test]
    fn restore_counts_from_the_new_clock() {
        let mut bucket = TokenBucket::new(1000.0, 10.0, 5_000.0);
        let state = BucketState { available: 100.0, capacity: 1000.0, last_refill: 1e9 };
        bucket.restore(&state, 0.0, 5_000.0);
        bucket.refill(5_010.0);
        assert_eq!(bucket.available(), 200.0);
    }
}
