//! Snapshots of a throttle's buckets and debts, for backup and restore.

use super::{extra_index, BucketState, Dimension, Throttle, TokenBucket};
use crate::errors::{CoreError, CoreResult};

/// One of the other buckets in a snapshot, with its debt (0 for the daily request bucket).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtraState {
    /// The bucket.
    pub bucket: BucketState,
    /// Its compensation debt.
    pub debt: f64,
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
    /// Compensation debt of the token bucket at the time.
    pub compensation_debt: f64,
    /// The other buckets configured (itpm, otpm, rpd, tpd: see `extra_index`).
    pub extra: [Option<ExtraState>; 4],
}

impl<M> Throttle<M> {
    /// The buckets and the debts now. Call `advance` first.
    pub fn snapshot(&self, now: f64) -> Snapshot {
        let mut extra = [None; 4];
        if let Some(daily) = &self.daily_requests {
            extra[2] = Some(ExtraState { bucket: daily.state(), debt: 0.0 });
        }
        for meter in &self.meters {
            if let Some(index) = extra_index(meter.dimension()) {
                extra[index] = Some(ExtraState { bucket: meter.bucket().state(), debt: meter.debt() });
            }
        }
        Snapshot {
            timestamp: now,
            rpm: self.requests.state(),
            tpm: self.tokens.bucket().state(),
            history_count: self.totals.live,
            compensation_debt: self.tokens.debt(),
            extra,
        }
    }

    /// Restores the buckets and the debts of `snapshot` and clears the history (the slots its
    /// records held are free). Checked whole first: on a bad snapshot, or one of a throttle with
    /// other limits, nothing changes. Only durations are taken from the snapshot's instants (how
    /// long each bucket had refilled for when it was taken): the restoring throttle's clock may
    /// count from anywhere (another process, a restart), and the buckets refill from its `now`
    /// as they would have from the snapshot's. Call `advance` first.
    pub fn restore(&mut self, snapshot: &Snapshot) -> CoreResult<()> {
        let extra_dimensions = [Dimension::Itpm, Dimension::Otpm, Dimension::Rpd, Dimension::Tpd];
        let mut states = vec![
            ("rpm", &snapshot.rpm, self.requests.capacity(), 0.0),
            ("tpm", &snapshot.tpm, self.tokens.bucket().capacity(), snapshot.compensation_debt),
        ];
        for (dimension, state) in extra_dimensions.iter().zip(&snapshot.extra) {
            let name = dimension.name();
            let capacity = match *dimension {
                Dimension::Rpd => self.daily_requests.as_ref().map(TokenBucket::capacity),
                other => self.meter(other).map(|m| m.bucket().capacity()),
            };
            match (state, capacity) {
                (Some(state), Some(capacity)) => states.push((name, &state.bucket, capacity, state.debt)),
                (None, None) => {}
                (Some(_), None) => {
                    return Err(CoreError::InvalidRequest(format!(
                        "snapshot has a {name} bucket, and this throttle has no {name} limit"
                    )));
                }
                (None, Some(_)) => {
                    return Err(CoreError::InvalidRequest(format!(
                        "snapshot has no {name} bucket, and this throttle has a {name} limit"
                    )));
                }
            }
        }
        for &(name, state, capacity, debt) in &states {
            check_snapshot_bucket(name, state, capacity)?;
            if !(debt.is_finite() && debt >= 0.0) {
                let field =
                    if name == "tpm" { "compensation_debt".to_owned() } else { format!("{name} debt") };
                return Err(CoreError::InvalidRequest(format!(
                    "snapshot {field} must be a finite number >= 0, got {debt}"
                )));
            }
        }
        if !snapshot.timestamp.is_finite() {
            return Err(CoreError::InvalidRequest(format!(
                "snapshot timestamp must be finite, got {}",
                snapshot.timestamp
            )));
        }
        let since = |state: &BucketState| (snapshot.timestamp - state.last_refill).max(0.0);
        let now = self.now;
        self.requests.restore(&snapshot.rpm, since(&snapshot.rpm), now);
        self.tokens.bucket_mut().restore(&snapshot.tpm, since(&snapshot.tpm), now);
        self.tokens.set_debt(snapshot.compensation_debt);
        for (dimension, state) in extra_dimensions.iter().zip(&snapshot.extra) {
            let Some(state) = state else { continue };
            if *dimension == Dimension::Rpd {
                if let Some(daily) = &mut self.daily_requests {
                    daily.restore(&state.bucket, since(&state.bucket), now);
                }
            } else if let Some(meter) = self.meters.iter_mut().find(|m| m.dimension() == *dimension) {
                meter.bucket_mut().restore(&state.bucket, since(&state.bucket), now);
                meter.set_debt(state.debt);
            }
        }
        self.evict_all();
        Ok(())
    }
}

/// A snapshot's bucket must be of a bucket of this capacity (a snapshot of another
/// configuration is refused, so capacities compare exactly), hold within it, and have a finite
/// refill instant.
#[allow(clippy::float_cmp)]
fn check_snapshot_bucket(name: &str, state: &BucketState, capacity: f64) -> CoreResult<()> {
    if state.capacity != capacity {
        return Err(CoreError::InvalidRequest(format!(
            "snapshot {name} capacity {} does not match this throttle's {capacity}",
            state.capacity
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
    Ok(())
}
