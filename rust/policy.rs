//! Admission: which message a dispatch takes, given a store, a policy and the limiter's state.
//! Pure Rust, so `cargo test` reaches every rule; the bindings only lock, call and build.
//!
//! Two rules, both exact over the whole store:
//! - **score**: the highest total score. With `hold`, every visible message whose estimate fits
//!   the limiter's token capacity is ranked (`A` = the capacity), and when the best one cannot
//!   be admitted now nothing ranked below it is taken: the decision is to wait for it. Without,
//!   the best among those the limiter admits now (`A` = the tokens available).
//! - **`fair_priority`**: the fair order of `fair` (URGENT first, then the tenant with the least
//!   recent use, then priority, deadline, age), the same choice between holding for the first
//!   message and taking the first that fits, and the reserve a backlogged tenant may not take.

use crate::deadlines::DeadlineIndex;
use crate::errors::CoreResult;
use crate::fair::{FairCandidate, FairLanes, FairRuntime, Fit};
use crate::index::Ranking;
use crate::scoring::Weights;
use crate::select::{best_candidate, Candidate, SearchContext};
use crate::store::Store;
use crate::throttle::Throttle;

/// The rankings a store keeps beside its candidate index: deadlines (for `drop_expired`) and,
/// while a `fair_priority` dispatcher uses the store, the fair lanes.
pub type Rankings = (DeadlineIndex, Option<FairLanes>);

/// What a dispatch step decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision<T> {
    /// Nothing can be taken, and waiting for the budget would not change that.
    Nothing,
    /// The winner cannot be admitted for this many seconds (held: nothing below it goes).
    Wait(f64),
    /// Take this one.
    Take(T),
}

/// The budget a selection works against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Tokens available (`A`).
    pub available: f64,
    /// Largest admissible estimate.
    pub max_tokens: f64,
}

/// The budget of a limiter now: None when no request can be admitted at all (a penalty, an
/// empty request limit, no slot free); the largest estimate is the smallest over its token
/// limits (see `Throttle::admissible_tokens`).
pub fn throttle_budget<M>(state: &Throttle<M>) -> Option<Budget> {
    let max_tokens = state.admissible_tokens()?;
    Some(Budget { available: state.tokens().available(), max_tokens })
}

/// The budget messages are ranked against: with `hold`, the whole capacity (a score no longer
/// depends on how drained the bucket is, and everything that can ever fit competes); without,
/// what the limiter admits now.
pub fn ranking_budget<M>(limiter: &Throttle<M>, hold: bool) -> Option<Budget> {
    if hold {
        let capacity = limiter.token_capacity();
        Some(Budget { available: capacity, max_tokens: capacity })
    } else {
        throttle_budget(limiter)
    }
}

/// The score policy's decision over a store at `now` (no custom scorers: those are applied by
/// the caller over collected candidates).
pub fn decide_score<P, R: Ranking, M>(
    store: &Store<P, R>,
    weights: &Weights,
    limiter: &Throttle<M>,
    now: f64,
    hold: bool,
    min_score: f64,
) -> Decision<Candidate> {
    let Some(budget) = ranking_budget(limiter, hold) else { return Decision::Nothing };
    let context =
        SearchContext { weights: *weights, now, available: budget.available, max_tokens: budget.max_tokens };
    let Some(candidate) = best_candidate(store, &context) else { return Decision::Nothing };
    if candidate.base < min_score {
        return Decision::Nothing;
    }
    admit(limiter, candidate, candidate.tokens, 0.0, hold)
}

/// Whether `candidate` (of `tokens`, keeping `margin` more in the bucket) goes now, or how long
/// it is held for.
pub fn admit<M, T>(limiter: &Throttle<M>, candidate: T, tokens: u64, margin: f64, hold: bool) -> Decision<T> {
    let check = limiter.check_with_margin(tokens, margin);
    if check.allowed {
        Decision::Take(candidate)
    } else if hold && check.available_in.is_finite() {
        Decision::Wait(check.available_in)
    } else {
        Decision::Nothing
    }
}

/// What admission asks of a limiter: whether a request of `tokens`, leaving `margin` more in
/// the bucket, goes now, and (when it does not) in how many seconds it would. An `LLMThrottle`
/// answers exactly; a [`Snapshot`] of another limiter's reported budget cannot tell the wait.
pub trait Admission {
    /// The token bucket's capacity: no larger request ever fits.
    fn capacity(&self) -> f64;
    /// Tokens the bucket refills per second.
    fn refill_rate(&self) -> f64;
    /// Whether it goes now.
    fn admits(&self, tokens: u64, margin: f64) -> bool;
    /// Seconds until it would go (NaN when unknown).
    fn wait(&self, tokens: u64, margin: f64) -> f64;
}

impl<M> Admission for Throttle<M> {
    fn capacity(&self) -> f64 {
        self.token_capacity()
    }
    fn refill_rate(&self) -> f64 {
        self.token_rate()
    }
    fn admits(&self, tokens: u64, margin: f64) -> bool {
        self.check_with_margin(tokens, margin).allowed
    }
    fn wait(&self, tokens: u64, margin: f64) -> f64 {
        self.check_with_margin(tokens, margin).available_in
    }
}

/// Another limiter's budget as it reported it (its `get_metrics()`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Tokens available.
    pub available_tokens: f64,
    /// Requests available.
    pub available_requests: f64,
    /// Token capacity.
    pub capacity: f64,
}

impl Admission for Snapshot {
    fn capacity(&self) -> f64 {
        self.capacity
    }
    /// A reported budget says only its capacity: taken as a minute's worth (no burst).
    fn refill_rate(&self) -> f64 {
        self.capacity / 60.0
    }
    fn admits(&self, tokens: u64, margin: f64) -> bool {
        self.available_requests >= 1.0 && tokens as f64 + margin <= self.available_tokens
    }
    fn wait(&self, _tokens: u64, _margin: f64) -> f64 {
        f64::NAN
    }
}

/// How a fair candidate stands against the limiter, and the margin (reserve) it must leave.
pub fn fair_fit(
    limiter: &impl Admission,
    candidate: &FairCandidate,
    tokens: u64,
    reserve: f64,
) -> (Fit, f64) {
    let capacity = limiter.capacity();
    if tokens as f64 > capacity {
        return (Fit::Never, 0.0);
    }
    let margin = FairLanes::admission_tokens(candidate, tokens, reserve, capacity) - tokens as f64;
    (Fit::from_allowed(limiter.admits(tokens, margin)), margin)
}

/// A fair decision: the candidate, and whether it goes now; when held, the seconds until it
/// would (NaN when the limiter cannot tell) and the margin it must leave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairDecision {
    /// The first message of the fair order (held), or the first that fits.
    pub candidate: FairCandidate,
    /// Whether it goes now.
    pub fits: bool,
    /// Seconds until it would go, when it does not now.
    pub wait: f64,
    /// Tokens it must leave in the bucket (the reserve part).
    pub margin: f64,
}

/// The fair policy's decision over `lanes` (aged to `now` already): `tokens_of` gives each
/// slot's estimate.
pub fn decide_fair_lanes(
    lanes: &FairLanes,
    tokens_of: impl Fn(u32) -> u64,
    runtime: &mut FairRuntime,
    limiter: &impl Admission,
    now: f64,
    hold: bool,
) -> Option<FairDecision> {
    let reserve = runtime.reserve(limiter.capacity());
    let share_per_weight = fair_share_per_weight(lanes, runtime, limiter, now);
    let ledger = &mut runtime.ledger;
    let (candidate, fits) =
        lanes.select(&mut |tenant| ledger.usage(tenant, now), share_per_weight, hold, &mut |candidate| {
            fair_fit(limiter, candidate, tokens_of(candidate.slot), reserve).0
        })?;
    let tokens = tokens_of(candidate.slot);
    let (_, margin) = fair_fit(limiter, &candidate, tokens, reserve);
    let wait = if fits { 0.0 } else { limiter.wait(tokens, margin) };
    Some(FairDecision { candidate, fits, wait, margin })
}

/// Tokens per unit of weight a tenant may use over the fairness window before it counts as
/// backlogged: what the limiter refills over the window, split by weight among the tenants
/// that are waiting or have used tokens in it.
pub fn fair_share_per_weight(
    lanes: &FairLanes,
    runtime: &mut FairRuntime,
    limiter: &impl Admission,
    now: f64,
) -> f64 {
    let config = lanes.config();
    let mut active: Vec<u32> =
        runtime.ledger.usages(now).into_iter().filter(|&(_, u)| u > 0.0).map(|(t, _)| t).collect();
    active.extend(lanes.waiting_tenants());
    active.sort_unstable();
    active.dedup();
    let total_weight: f64 = active.iter().map(|&t| config.weight(t)).sum();
    if total_weight > 0.0 {
        // Rounded down a hair: a tenant that used exactly its share counts as having used it.
        limiter.refill_rate() * config.fairness_window / total_weight * (1.0 - 1e-9)
    } else {
        f64::INFINITY
    }
}

/// The fair policy's decision over a store at `now` with an `LLMThrottle`. Ages the lanes
/// first. Nothing when the store keeps no fair lanes.
pub fn decide_fair<P, M>(
    store: &mut Store<P, Rankings>,
    runtime: &mut FairRuntime,
    limiter: &Throttle<M>,
    now: f64,
    hold: bool,
) -> Decision<FairCandidate> {
    let Some(lanes) = store.ranking_mut().1.as_mut() else { return Decision::Nothing };
    lanes.age(now);
    let Some(lanes) = store.ranking().1.as_ref() else { return Decision::Nothing };
    match decide_fair_lanes(lanes, |slot| store.message(slot).tokens, runtime, limiter, now, hold) {
        Some(d) if d.fits => Decision::Take(d.candidate),
        Some(d) if d.wait.is_finite() => Decision::Wait(d.wait),
        _ => Decision::Nothing,
    }
}

/// Removes every visible message whose deadline is before `now` (dead-lettered: to the
/// dead-letter store where there is one). Returns their request ids.
pub fn drop_expired<P, F: Ranking>(
    store: &mut Store<P, (DeadlineIndex, F)>,
    now: f64,
) -> CoreResult<Vec<Box<str>>> {
    let expired = store.ranking().0.expired(now);
    expired.into_iter().map(|slot| store.dead_letter_visible(slot, now)).collect()
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::fair::FairConfig;
    use crate::store::{NewMessage, StoreConfig};
    use crate::throttle::{AdjustmentFailureStrategy, ThrottleConfig};

    fn limiter(tpm: f64) -> Throttle<()> {
        let config = ThrottleConfig {
            rpm: 6_000.0,
            tpm,
            burst_rpm: None,
            burst_tpm: None,
            adjustment_failure_strategy: AdjustmentFailureStrategy::Warn,
            max_history_records: 100,
            history_retention: 60.0,
            efficiency_window_size: 50,
        };
        Throttle::new(config, 0.0).unwrap()
    }

    fn message(id: &str, priority: u8, tokens: u64, tenant: &str) -> NewMessage<()> {
        NewMessage {
            request_id: id.into(),
            payload: (),
            priority,
            tokens,
            expected_processing_seconds: None,
            tenant: Some(tenant.into()),
            deadline: None,
        }
    }

    fn store() -> Store<(), Rankings> {
        let config = StoreConfig { max_receive_count: None, message_retention: f64::INFINITY };
        let mut store = Store::with_ranking(config, 0.0, (DeadlineIndex::default(), None)).unwrap();
        store.ranking_mut().1 = Some(FairLanes::new(FairConfig::default()));
        store.rebuild_ranking();
        store
    }

    #[test]
    fn holding_the_budget_waits_for_a_large_winner() {
        let mut s = store();
        s.enqueue(message("big", 0, 900, "a"), 0.0).unwrap();
        s.enqueue(message("small", 3, 50, "a"), 0.0).unwrap();
        let mut l = limiter(1_000.0);
        assert!(l.consume(0.0, "x", 500, ()));
        // URGENT "big" wins; 500 tokens left: held for it, "small" does not go.
        match decide_score(&s, &Weights::default(), &l, 0.0, true, 0.0) {
            Decision::Wait(wait) => assert!((wait - 24.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        // Without holding, the small one goes.
        assert!(
            matches!(decide_score(&s, &Weights::default(), &l, 0.0, false, 0.0), Decision::Take(c) if c.tokens == 50)
        );
        l.advance(24.0);
        assert!(
            matches!(decide_score(&s, &Weights::default(), &l, 24.0, true, 0.0), Decision::Take(c) if c.tokens == 900)
        );
    }

    #[test]
    fn fair_decision_keeps_the_reserve_from_a_backlogged_tenant() {
        let mut s = store();
        s.enqueue(message("h1", 2, 400, "heavy"), 0.0).unwrap();
        s.enqueue(message("h2", 2, 400, "heavy"), 0.0).unwrap();
        let heavy = s.message(s.slot_of("h1").unwrap()).tenant;
        let mut runtime = FairRuntime::new(&FairConfig::default(), Some(300.0));
        let mut l = limiter(1_000.0);
        assert!(l.consume(0.0, "x", 400, ()));
        // Two messages but no use yet: no backlog to hold back, 400 of the 600 left go.
        assert!(matches!(decide_fair(&mut s, &mut runtime, &l, 0.0, true), Decision::Take(_)));
        // Having used its fair share of the window (1,000 tokens a minute, one tenant), it is
        // backlogged: 400 + the 300 reserve do not fit in 600.
        runtime.charge(heavy, 0.0, 1_000);
        assert!(
            matches!(decide_fair(&mut s, &mut runtime, &l, 0.0, true), Decision::Wait(w) if (w - 6.0).abs() < 1e-9)
        );
        // A light tenant ranks first (less use), and its lone request needs only its tokens.
        s.enqueue(message("l1", 2, 500, "light"), 0.0).unwrap();
        match decide_fair(&mut s, &mut runtime, &l, 0.0, true) {
            Decision::Take(c) => assert_eq!(s.message(c.slot).request_id.as_ref(), "l1"),
            other => panic!("{other:?}"),
        }
        // So do its two, three queued requests: it has used less than its share (500 a minute
        // with two tenants active).
        s.enqueue(message("l2", 2, 500, "light"), 0.0).unwrap();
        match decide_fair(&mut s, &mut runtime, &l, 0.0, true) {
            Decision::Take(c) => assert_eq!(s.message(c.slot).request_id.as_ref(), "l1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_oversized_request_never_holds_the_others() {
        let mut s = store();
        s.enqueue(message("huge", 0, 5_000, "a"), 0.0).unwrap();
        s.enqueue(message("ok", 2, 10, "a"), 1.0).unwrap();
        let mut runtime = FairRuntime::new(&FairConfig::default(), Some(0.0));
        let l = limiter(1_000.0);
        assert!(
            matches!(decide_fair(&mut s, &mut runtime, &l, 1.0, true), Decision::Take(c) if s.message(c.slot).tokens == 10)
        );
        assert!(
            matches!(decide_score(&s, &Weights::default(), &l, 1.0, true, 0.0), Decision::Take(c) if c.tokens == 10)
        );
    }

    #[test]
    fn expired_deadlines_are_dead_lettered() {
        let mut s = store();
        let mut late = message("late", 2, 10, "a");
        late.deadline = Some(5.0);
        s.enqueue(late, 0.0).unwrap();
        s.enqueue(message("fine", 2, 10, "a"), 0.0).unwrap();
        assert!(drop_expired(&mut s, 5.0).unwrap().is_empty());
        assert_eq!(drop_expired(&mut s, 5.5).unwrap(), vec![Box::from("late")]);
        assert_eq!(s.visible_count(), 1);
        assert_eq!(s.stats().dead_lettered, 1);
        assert_eq!(s.take_dead_lettered().len(), 1);
        s.check_invariants().unwrap();
    }
}
