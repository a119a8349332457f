//! One token bucket: continuous refill up to a capacity. A provider's figure may lower its level
//! at once; from there it refills at its own rate.

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

/// A token bucket refilled continuously at `rate` tokens per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    available: f64,
    last_refill: f64,
}

/// The smallest float above a positive `x`.
pub(super) fn next_up(x: f64) -> f64 {
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
        self.available >= count
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

    /// Lowers the bucket to at most `remaining` now (a provider's word of what is left); it
    /// never raises the level, and from there the bucket refills at its own rate up to its own
    /// capacity: nothing holds it down until the provider's reset.
    pub fn cap(&mut self, remaining: f64) {
        self.available = self.available.min(remaining.max(0.0));
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

    /// Puts back the level of `state` as of `now`: the time `state` had refilled for before its
    /// snapshot counts again from `now`, whatever instant the snapshot's clock used.
    pub fn restore(&mut self, state: &BucketState, since_refill: f64, now: f64) {
        self.available = state.available;
        self.last_refill = now - since_refill;
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
    fn a_header_lowers_the_bucket_and_refill_raises_it_at_its_own_rate() {
        let mut bucket = TokenBucket::new(1000.0, 10.0, 0.0);
        bucket.cap(300.0);
        assert_eq!(bucket.available(), 300.0);
        assert!(bucket.take(100.0));
        // 10 tokens a second from 200, whatever the provider's reset: no hold until it.
        bucket.refill(5.0);
        assert_eq!(bucket.available(), 250.0);
        assert_eq!(bucket.time_until(400.0), 15.0);
        // Never above the capacity.
        bucket.refill(500.0);
        assert_eq!(bucket.available(), 1000.0);
        // A refund after a cut goes up to the capacity.
        let mut cut = TokenBucket::new(1000.0, 10.0, 0.0);
        cut.cap(300.0);
        assert!(cut.take(300.0));
        cut.refund(300.0);
        assert_eq!(cut.available(), 300.0);
    }

    #[test]
    fn a_cap_never_raises_the_level() {
        let mut bucket = TokenBucket::new(1000.0, 10.0, 0.0);
        bucket.cap(100.0);
        assert_eq!(bucket.available(), 100.0);
        bucket.refill(10.0);
        assert_eq!(bucket.available(), 200.0);
        bucket.cap(5000.0);
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
