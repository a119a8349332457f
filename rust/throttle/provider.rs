//! What a provider says of its limits: a penalty (its 429 and `Retry-After`) and the figures
//! of its rate-limit headers, which lower the buckets at once; they refill at their own rate.

use super::{Dimension, Meter, Throttle, TokenBucket};
use crate::errors::{CoreError, CoreResult};

/// The longest wait a provider can impose on a limiter, in seconds (one day): a `penalize`, a
/// `Retry-After` or a reset read from headers beyond it is clamped to it. A provider's own
/// windows are a minute or a day at most, so a longer figure is a malformed header; believing it
/// would freeze the limiter for years.
pub const MAX_PROVIDER_WAIT: f64 = 86_400.0;

/// `seconds` within [0, `MAX_PROVIDER_WAIT`], and whether it had to be clamped; a NaN or
/// negative wait is an `InvalidRequest` naming `field`.
fn provider_wait(seconds: f64, field: &str) -> CoreResult<(f64, bool)> {
    if seconds.is_nan() || seconds < 0.0 {
        return Err(CoreError::InvalidRequest(format!("{field} must be a number >= 0, got {seconds:?}")));
    }
    Ok((seconds.min(MAX_PROVIDER_WAIT), seconds > MAX_PROVIDER_WAIT))
}

/// The name a provider's figure for `dimension` goes by in messages.
fn figure_name(dimension: Dimension) -> &'static str {
    match dimension {
        Dimension::Rpm => "requests",
        Dimension::Tpm => "tokens",
        Dimension::Itpm => "input tokens",
        Dimension::Otpm => "output tokens",
        Dimension::Rpd => "daily requests",
        Dimension::Tpd => "daily tokens",
        Dimension::Concurrency => "requests in flight",
    }
}

impl<M> Throttle<M> {
    /// Grants nothing for `seconds` from now (a provider's 429 with `Retry-After`); a shorter
    /// penalty never cuts a longer one short. More than `MAX_PROVIDER_WAIT` (infinity included)
    /// is clamped to it, and the wait asked for is returned for the caller to log; NaN or a
    /// negative wait is an `InvalidRequest` and changes nothing. Call `advance` first.
    pub fn penalize(&mut self, seconds: f64) -> CoreResult<Option<f64>> {
        let (wait, clamped) = provider_wait(seconds, "seconds")?;
        self.penalized_until = self.penalized_until.max(self.now + wait);
        Ok(clamped.then_some(seconds))
    }

    /// `cap_limits` for the request and token buckets.
    pub fn cap(
        &mut self,
        requests: Option<(f64, Option<f64>)>,
        tokens: Option<(f64, Option<f64>)>,
    ) -> CoreResult<Option<f64>> {
        let figures = [requests.map(|f| (Dimension::Rpm, f)), tokens.map(|f| (Dimension::Tpm, f))];
        self.cap_limits(&figures.into_iter().flatten().collect::<Vec<_>>())
    }

    /// Lowers what the buckets hold to what a provider says remains: each figure
    /// `(limit, (remaining, reset))` cuts its bucket now to at most `remaining`, and from there
    /// the bucket refills at its own rate up to its own capacity. The reset (seconds from now)
    /// does not hold the bucket down: a provider's reset is the instant its own bucket is full
    /// again, and it refills continuously until then (see `provider_limits.py`). A figure for a
    /// limit this throttle does not keep is ignored. A reset is still checked: NaN or negative is
    /// an `InvalidRequest`, and one beyond `MAX_PROVIDER_WAIT` (infinity included), a malformed
    /// header, is returned (the longest) for the caller to log. Checked whole first: on a bad
    /// figure nothing changes. Call `advance` first.
    pub fn cap_limits(&mut self, figures: &[(Dimension, (f64, Option<f64>))]) -> CoreResult<Option<f64>> {
        let mut clamped: Option<f64> = None;
        for &(dimension, (remaining, reset)) in figures {
            let name = figure_name(dimension);
            if !(remaining.is_finite() && remaining >= 0.0) {
                return Err(CoreError::InvalidRequest(format!(
                    "{name} remaining must be a finite number >= 0, got {remaining}"
                )));
            }
            if let Some(reset) = reset {
                let (_, was_clamped) = provider_wait(reset, &format!("{name} reset"))?;
                if was_clamped {
                    clamped = Some(clamped.map_or(reset, |c| c.max(reset)));
                }
            }
        }
        for &(dimension, (remaining, _)) in figures {
            if let Some(bucket) = self.bucket_mut(dimension) {
                bucket.cap(remaining);
            }
        }
        Ok(clamped)
    }

    fn bucket_mut(&mut self, dimension: Dimension) -> Option<&mut TokenBucket> {
        match dimension {
            Dimension::Rpm => Some(&mut self.requests),
            Dimension::Tpm => Some(self.tokens.bucket_mut()),
            Dimension::Rpd => self.daily_requests.as_mut(),
            Dimension::Concurrency => None,
            other => self.meters.iter_mut().find(|m| m.dimension() == other).map(Meter::bucket_mut),
        }
    }
}
