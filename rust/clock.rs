//! Time sources. The pure-Rust core never reads a clock itself: callers pass `now` (seconds) into
//! every operation, so the same logic runs on a virtual clock in tests and simulations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::errors::{CoreError, CoreResult};

/// A clock that only moves when told to; shared by reference between the objects that read it.
#[derive(Debug)]
pub struct ManualClock {
    // f64 bits, so reads are lock-free from any thread.
    seconds: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start` seconds; `start` must be finite.
    pub fn new(start: f64) -> CoreResult<Self> {
        if !start.is_finite() {
            return Err(CoreError::InvalidRequest(format!("start must be finite, got {start}")));
        }
        Ok(Self { seconds: AtomicU64::new(start.to_bits()) })
    }

    /// The current reading in seconds.
    pub fn now(&self) -> f64 {
        f64::from_bits(self.seconds.load(Ordering::Acquire))
    }

    /// Moves the clock forward by `seconds` (finite, >= 0) and returns the new reading. A move
    /// whose reading would not be finite is refused and leaves the clock unchanged: every
    /// deadline and wait computed from an infinite reading would be meaningless.
    pub fn advance(&self, seconds: f64) -> CoreResult<f64> {
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(CoreError::InvalidRequest(format!(
                "seconds must be a finite number >= 0, got {seconds}"
            )));
        }
        // fetch_update keeps concurrent advances additive.
        match self.seconds.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
            let next = f64::from_bits(bits) + seconds;
            next.is_finite().then(|| next.to_bits())
        }) {
            Ok(previous) => Ok(f64::from_bits(previous) + seconds),
            Err(current) => Err(CoreError::InvalidRequest(format!(
                "seconds = {seconds:?} would move the clock past the largest finite reading (it reads {:?}); \
                 the clock is unchanged",
                f64::from_bits(current)
            ))),
        }
    }

    /// Sets the clock to `seconds`; a clock never goes back, so `seconds` must be >= now.
    pub fn set(&self, seconds: f64) -> CoreResult<()> {
        let now = self.now();
        if !seconds.is_finite() || seconds < now {
            return Err(CoreError::InvalidRequest(format!(
                "seconds must be finite and >= the current reading {now}, got {seconds}"
            )));
        }
        self.seconds.store(seconds.to_bits(), Ordering::Release);
        Ok(())
    }
}

/// Seconds on a monotonic clock, counted from the first call in this process.
pub fn monotonic_now() -> f64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Seconds since the Unix epoch on the wall clock.
pub fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Year, month and day of a count of days since 1970-01-01 (proleptic Gregorian calendar).
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-719_162), (1, 1, 1));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
    }

    #[test]
    fn manual_clock_advances_and_refuses_to_go_back() {
        let clock = ManualClock::new(10.0).unwrap();
        assert!((clock.advance(2.5).unwrap() - 12.5).abs() < 1e-12);
        assert!(clock.advance(-1.0).is_err());
        assert!(clock.advance(f64::NAN).is_err());
        assert!(clock.set(11.0).is_err());
        clock.set(20.0).unwrap();
        assert!((clock.now() - 20.0).abs() < 1e-12);
        assert!(ManualClock::new(f64::INFINITY).is_err());
    }

    #[test]
    #[allow(clippy::float_cmp)] // the readings are exact in binary
    fn manual_clock_refuses_to_advance_to_a_non_finite_reading() {
        let clock = ManualClock::new(0.0).unwrap();
        assert_eq!(clock.advance(1e308).unwrap(), 1e308);
        let error = clock.advance(1e308).unwrap_err();
        assert!(
            matches!(&error, CoreError::InvalidRequest(m) if m.contains("seconds") && m.contains("unchanged"))
        );
        assert_eq!(clock.now(), 1e308);
    }

    #[test]
    fn monotonic_never_decreases() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(b >= a);
    }
}
