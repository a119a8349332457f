//! Admission: which message a dispatch takes, given a store, a policy and the limiter's state.
//! Pure Rust, so `cargo test` reaches every rule; the bindings only lock, call and build.
//! One file past 700 lines: both rules share the budget, the URGENT reserve and the hold, and
//! a newcomer finds every admission rule in this one place.
//!
//! Two rules, both exact over the whole store:
//! - **score**: the highest total score; with `urgent_first` (the dispatcher's default), every
//!   URGENT message ranks above every other whatever the scores (a tier above the weighted
//!   sum), and among URGENT ones the score decides. With `hold`, every visible message whose
//!   estimate fits the limiter's token capacity is ranked (`A` = the capacity), and when the
//!   best one cannot be admitted now nothing ranked below it is taken: the decision is to wait
//!   for it. Without, the best among those the limiter admits now (`A` = the tokens
//!   available).
//! - **`fair_priority`**: the fair order of `fair` (URGENT first, then the tenant with the least
//!   recent use, then lane, deadline, age), the same choice between holding for the first
//!   message and taking the first that fits, and the tenant reserve a backlogged tenant may not
//!   take.
//!
//! Under both, every non-URGENT dispatch leaves the URGENT reserve in the bucket
//! ([`UrgentReserve`]): an URGENT request arriving while a backlog drains the bucket finds its
//! budget at once, and so does a second one close behind it.
//!
//! About 890 lines for the two policies' rankings over one store (the score policy's search,
//! `fair_priority`'s lanes and reserves) and the rankings kept beside the index; the tests take
//! about a third.

use std::collections::VecDeque;

use crate::deadlines::DeadlineIndex;
use crate::dispatch::TokenParts;
use crate::errors::CoreResult;
use crate::fair::{FairCandidate, FairLanes, FairRuntime, Fit};
use crate::index::{IndexEntry, Ranking};
use crate::scoring::Weights;
use crate::select::{best_candidate, Candidate, CandidateIndex, CandidateStream, IndexSearch, SearchContext};
use crate::store::Store;
use crate::throttle::Throttle;

/// The largest of the last `n` values pushed: a monotonic queue of decreasing values, each the
/// largest from its position on, so a push costs O(1) amortized.
#[derive(Debug, Clone)]
pub struct RecentMax {
    n: u64,
    pushed: u64,
    maxima: VecDeque<(u64, u64)>,
}

impl RecentMax {
    /// Over the last `n` values.
    pub fn new(n: usize) -> Self {
        Self { n: n as u64, pushed: 0, maxima: VecDeque::new() }
    }

    /// Adds a value.
    pub fn push(&mut self, value: u64) {
        let seq = self.pushed;
        self.pushed += 1;
        while self.maxima.back().is_some_and(|&(largest, _)| largest <= value) {
            self.maxima.pop_back();
        }
        self.maxima.push_back((value, seq));
        while self.maxima.front().is_some_and(|&(_, first)| first + self.n <= seq) {
            self.maxima.pop_front();
        }
    }

    /// The largest of the last `n` values; None before the first.
    pub fn max(&self) -> Option<u64> {
        self.maxima.front().map(|&(largest, _)| largest)
    }
}

/// URGENT estimates the automatic reserve is sized from.
pub const RECENT_URGENT: usize = 64;
/// The automatic URGENT reserve is at most this share of the token capacity.
pub const URGENT_RESERVE_SHARE: f64 = 0.25;

/// What the automatic URGENT reserve is sized from: the estimates of the messages that became
/// visible (enqueued, or visible again after a failure or an expired lease), kept beside the
/// store's index as a [`Ranking`] so every policy reads the same history.
///
/// The automatic reserve is twice the largest of the last 64 URGENT estimates — room for two
/// URGENT requests arriving close together, the second before the bucket refilled what the
/// first took — at most a quarter of the token capacity; none until an URGENT request has been
/// seen (an application that sends none keeps nothing back). (On real traces
/// at twice the TPM limit, the p99 of the last 64 URGENT estimates left URGENT requests
/// waiting 1.2-1.85 s behind a long-context backlog, and a cap of a tenth of the capacity was
/// smaller than its large requests.)
///
/// It also keeps the sum of the visible messages' estimates and the latest arrival: a backlog
/// that is clearing (the bucket holds everything waiting, and nothing has arrived for as long
/// as the reserves take to refill) keeps no reserve (see [`reserves_apply`]).
#[derive(Debug, Clone)]
pub struct UrgentReserve {
    urgent: RecentMax,
    waiting: u64,
    last_arrival: f64,
}

impl Default for UrgentReserve {
    fn default() -> Self {
        Self { urgent: RecentMax::new(RECENT_URGENT), waiting: 0, last_arrival: f64::NEG_INFINITY }
    }
}

impl UrgentReserve {
    /// Notes a message of `priority` and `tokens`, enqueued at `enqueued_at`, becoming visible.
    pub fn observe(&mut self, priority: u8, tokens: u64, enqueued_at: f64) {
        if priority == 0 {
            self.urgent.push(tokens);
        }
        self.last_arrival = self.last_arrival.max(enqueued_at);
    }

    /// The latest enqueue instant among the messages observed.
    pub fn last_arrival(&self) -> f64 {
        self.last_arrival
    }

    /// The estimates of the visible messages, summed (as told by `insert` and `remove`).
    pub fn waiting_tokens(&self) -> u64 {
        self.waiting
    }

    /// Sets the sum of the visible messages' estimates (for a pool that counts them itself).
    pub fn set_waiting_tokens(&mut self, tokens: u64) {
        self.waiting = tokens;
    }

    /// The automatic reserve for a bucket of `capacity` tokens (see the type's docs).
    pub fn automatic(&self, capacity: f64) -> f64 {
        self.urgent.max().map_or(0.0, |largest| (2.0 * largest as f64).min(URGENT_RESERVE_SHARE * capacity))
    }

    /// The reserve while URGENT goes first (`urgent_first`): `fixed` when set, else the
    /// automatic one; none when URGENT does not go first.
    pub fn reserve(&self, fixed: Option<f64>, urgent_first: bool, capacity: f64) -> f64 {
        match fixed {
            _ if !urgent_first => 0.0,
            Some(reserve) => reserve,
            None => self.automatic(capacity),
        }
    }
}

impl Ranking for UrgentReserve {
    fn insert(&mut self, _slot: u32, entry: &IndexEntry) {
        self.observe(entry.cell.priority, entry.tokens, entry.enqueued_at);
        self.waiting = self.waiting.saturating_add(entry.tokens);
    }
    fn remove(&mut self, _slot: u32, entry: &IndexEntry) {
        self.waiting = self.waiting.saturating_sub(entry.tokens);
    }
    /// A purge leaves the history: it is about the traffic, not the queue.
    fn clear(&mut self) {
        self.waiting = 0;
    }
}

/// Whether reserves totalling `reserve` tokens are kept at `now`: unless the backlog is
/// clearing — the limiter admits, now, one request as large as every visible message together,
/// and nothing has arrived for as long as the bucket takes to refill the reserves. Then
/// holding them back would only delay the last requests of a backlog while nothing new comes
/// (a backlog that is building, with arrivals, keeps them, so the bucket never drains below
/// them at the moment an overload starts).
pub fn reserves_apply(limiter: &impl Admission, history: &UrgentReserve, reserve: f64, now: f64) -> bool {
    if reserve <= 0.0 {
        return true;
    }
    let quiet = now - history.last_arrival() >= reserve / limiter.refill_rate();
    !(quiet && limiter.admits(history.waiting_tokens(), 0.0))
}

/// The rankings a store keeps beside its candidate index: deadlines (for `drop_expired`), the
/// estimates the URGENT reserve is sized from, and, while a `fair_priority` dispatcher uses the
/// store, the fair lanes.
pub type Rankings = ((DeadlineIndex, UrgentReserve), Option<FairLanes>);

/// Rankings that can tell the URGENT reserve's history.
pub trait UrgentHistory {
    /// The history, if kept.
    fn urgent_history(&self) -> Option<&UrgentReserve>;
}

impl UrgentHistory for () {
    fn urgent_history(&self) -> Option<&UrgentReserve> {
        None
    }
}

impl<F> UrgentHistory for ((DeadlineIndex, UrgentReserve), F) {
    fn urgent_history(&self) -> Option<&UrgentReserve> {
        Some(&self.0 .1)
    }
}

/// The URGENT reserve of the score policy under `weights` for a bucket of `capacity`: none
/// unless URGENT goes first (the TypeScript library's rule keeps none).
pub fn score_urgent_reserve(weights: &Weights, history: Option<&UrgentReserve>, capacity: f64) -> f64 {
    match weights.urgent_reserve {
        _ if !weights.urgent_first => 0.0,
        Some(reserve) => reserve,
        None => history.map_or(0.0, |h| h.automatic(capacity)),
    }
}

/// The URGENT reserve a non-URGENT score-policy winner leaves at `now`: `score_urgent_reserve`,
/// unless the backlog is clearing ([`reserves_apply`]).
pub fn score_reserve(
    weights: &Weights,
    history: Option<&UrgentReserve>,
    limiter: &impl Admission,
    now: f64,
) -> f64 {
    let reserve = score_urgent_reserve(weights, history, limiter.capacity());
    match history {
        Some(h) if !reserves_apply(limiter, h, reserve, now) => 0.0,
        _ => reserve,
    }
}

/// The tokens a score-policy winner must leave in the bucket: the URGENT reserve, unless it is
/// URGENT itself; its need at most a full bucket of `capacity` (or its own estimate).
pub fn score_margin(candidate: &Candidate, reserve: f64, capacity: f64) -> f64 {
    if candidate.priority == 0 {
        0.0
    } else {
        reserve.min((capacity - candidate.tokens as f64).max(0.0))
    }
}

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

/// The budget requests split into input and output parts are ranked against, when it is larger
/// than `ranking_budget`'s (the limiter has input or output limits): the limits that count the
/// whole estimate bound it, each part being checked against its own limit at admission.
pub fn parts_ranking_budget<M>(limiter: &Throttle<M>, hold: bool) -> Option<Budget> {
    let strict = ranking_budget(limiter, hold)?;
    let loose = if hold { limiter.whole_token_capacity() } else { limiter.admissible_whole_tokens()? };
    (loose > strict.max_tokens).then_some(Budget { max_tokens: loose, ..strict })
}

/// The score policy's decision over a store at `now` (no custom scorers: those are applied by
/// the caller over collected candidates). A non-URGENT winner leaves the URGENT reserve in the
/// bucket (`score_urgent_reserve`, from the store's history).
///
/// With input or output limits, the messages are first ranked under `parts_ranking_budget`, so
/// a request larger than such a limit that fits by its parts competes; when that winner can
/// never go (or, without holding, does not go now), the ranking is over what fits every limit
/// with its whole estimate.
pub fn decide_score<P: TokenParts, R: Ranking + UrgentHistory, M>(
    store: &Store<P, R>,
    weights: &Weights,
    limiter: &Throttle<M>,
    now: f64,
    hold: bool,
    min_score: f64,
) -> Decision<Candidate> {
    let Some(budget) = ranking_budget(limiter, hold) else { return Decision::Nothing };
    if let Some(loose) = parts_ranking_budget(limiter, hold) {
        let decision = decide_score_under(store, weights, limiter, now, hold, min_score, loose);
        if !matches!(decision, Decision::Nothing) {
            return decision;
        }
    }
    decide_score_under(store, weights, limiter, now, hold, min_score, budget)
}

fn decide_score_under<P: TokenParts, R: Ranking + UrgentHistory, M>(
    store: &Store<P, R>,
    weights: &Weights,
    limiter: &Throttle<M>,
    now: f64,
    hold: bool,
    min_score: f64,
    budget: Budget,
) -> Decision<Candidate> {
    let reserve = score_reserve(weights, store.ranking().urgent_history(), limiter, now);
    let mut context =
        SearchContext { weights: *weights, now, available: budget.available, max_tokens: budget.max_tokens };
    let parts_of = |slot: u32| {
        let message = store.message(slot);
        message.payload.token_parts(message.tokens)
    };
    let ever = |candidate: &Candidate| limiter.fits_capacity(candidate.tokens, parts_of(candidate.slot));
    let Some(mut candidate) = best_ever_granted(store, &context, ever) else { return Decision::Nothing };
    let capacity = limiter.tokens().capacity();
    let margin = score_margin(&candidate, reserve, capacity);
    if !hold && margin > 0.0 && !limiter.admits_parts(candidate.tokens, parts_of(candidate.slot), margin) {
        // Without holding: the best among what leaves the reserve. No URGENT message fits now
        // (one would have won), so the search is over the others, each needing the reserve.
        context.max_tokens = budget.max_tokens - reserve;
        let Some(fitting) = best_ever_granted(store, &context, ever) else { return Decision::Nothing };
        candidate = fitting;
    }
    if candidate.base < min_score && candidate.tier > 0 {
        // URGENT ranks first by its tier, yet scores below the threshold: it is not sent, and
        // (the best URGENT by score below it, so every URGENT) must not hold back the others.
        // The best by score alone is then the best of the rest, or below the threshold too.
        context.weights.urgent_first = false;
        let Some(best) = best_ever_granted(store, &context, ever) else { return Decision::Nothing };
        candidate = best;
    }
    if candidate.base < min_score {
        return Decision::Nothing;
    }
    let margin = score_margin(&candidate, reserve, capacity);
    // The best by score alone, when every URGENT scored below the threshold, is waited for
    // held or not: no URGENT is sent before it reaches the threshold, and what this one waits
    // for is when a dispatch can hand it out (`time_until_ready`).
    let by_score = weights.urgent_first && !context.weights.urgent_first;
    admit(limiter, candidate, candidate.tokens, parts_of(candidate.slot), margin, hold || by_score)
}

/// How many candidates the limiter can never grant a search passes over before it gives up.
/// Only requests split into parts can be among them (one whose input part exceeds the input
/// limit, say); the dispatcher reports them, and `take_unfittable` takes them out.
pub const UNFITTABLE_SKIPS: usize = 64;

/// The best candidate under `context` that the limiter can ever grant (`ever`): the index's
/// best, or when that one never can, the next in rank order (passing over at most
/// [`UNFITTABLE_SKIPS`]). So a request larger than an input or output limit, ranked under the
/// budget of requests split into parts, does not keep the next one from going.
pub fn best_ever_granted<I: CandidateIndex>(
    index: &I,
    context: &SearchContext,
    ever: impl Fn(&Candidate) -> bool,
) -> Option<Candidate> {
    let best = best_candidate(index, context)?;
    if ever(&best) {
        return Some(best);
    }
    let mut search = IndexSearch::new(index, *context);
    (0..=UNFITTABLE_SKIPS).map_while(|_| search.next_candidate()).find(|candidate| ever(candidate))
}

/// Whether `candidate` (of `tokens`, split into its input and output `parts` when known,
/// keeping `margin` more in the bucket) goes now, or how long it is held for: every limit is
/// checked with its own share (the input part against an input limit, the output part against
/// an output limit).
pub fn admit<M, T>(
    limiter: &Throttle<M>,
    candidate: T,
    tokens: u64,
    parts: Option<(u64, u64)>,
    margin: f64,
    hold: bool,
) -> Decision<T> {
    let check = limiter.check_parts(tokens, parts, margin);
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
    /// `admits` for a request whose input and output `parts` may be known (each limit of input
    /// or output tokens then checks its own part). A reported budget knows no such limits.
    fn admits_parts(&self, tokens: u64, parts: Option<(u64, u64)>, margin: f64) -> bool {
        let _ = parts;
        self.admits(tokens, margin)
    }
    /// `wait` for a request whose input and output `parts` may be known.
    fn wait_parts(&self, tokens: u64, parts: Option<(u64, u64)>, margin: f64) -> f64 {
        let _ = parts;
        self.wait(tokens, margin)
    }
    /// Whether such a request can ever go: every limit's capacity holds its share.
    fn fits_ever(&self, tokens: u64, parts: Option<(u64, u64)>) -> bool {
        let _ = parts;
        tokens as f64 <= self.capacity()
    }
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
    fn admits_parts(&self, tokens: u64, parts: Option<(u64, u64)>, margin: f64) -> bool {
        self.check_parts(tokens, parts, margin).allowed
    }
    fn wait_parts(&self, tokens: u64, parts: Option<(u64, u64)>, margin: f64) -> f64 {
        self.check_parts(tokens, parts, margin).available_in
    }
    fn fits_ever(&self, tokens: u64, parts: Option<(u64, u64)>) -> bool {
        self.fits_capacity(tokens, parts)
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

/// How a fair candidate stands against the limiter, and the margin (reserves) it must leave.
pub fn fair_fit(
    limiter: &impl Admission,
    candidate: &FairCandidate,
    (tokens, parts): (u64, Option<(u64, u64)>),
    tenant_reserve: f64,
    urgent_reserve: f64,
) -> (Fit, f64) {
    let capacity = limiter.capacity();
    if !limiter.fits_ever(tokens, parts) {
        return (Fit::Never, 0.0);
    }
    // The reserves are kept in the token bucket: a request larger than the smallest limit's
    // capacity (one that fits only by its parts) leaves what that bucket can.
    let needed = FairLanes::admission_tokens(candidate, tokens, tenant_reserve, urgent_reserve, capacity);
    let margin = (needed - tokens as f64).max(0.0);
    (Fit::from_allowed(limiter.admits_parts(tokens, parts, margin)), margin)
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
    /// Tokens it must leave in the bucket (the reserves).
    pub margin: f64,
}

/// The fair policy's decision over `lanes`, brought to `now` already (`FairLanes::prepare`):
/// `tokens_of` gives each slot's estimate and its input and output parts when known, `history`
/// sizes the automatic URGENT reserve.
pub fn decide_fair_lanes(
    lanes: &FairLanes,
    tokens_of: impl Fn(u32) -> (u64, Option<(u64, u64)>),
    runtime: &FairRuntime,
    history: &UrgentReserve,
    limiter: &impl Admission,
    now: f64,
    hold: bool,
) -> Option<FairDecision> {
    let capacity = limiter.capacity();
    let config = lanes.config();
    let (tenant_reserve, urgent_reserve) =
        (runtime.reserve(capacity), history.reserve(config.urgent_reserve, config.urgent_first, capacity));
    let (tenant_reserve, urgent_reserve) =
        if reserves_apply(limiter, history, tenant_reserve + urgent_reserve, now) {
            (tenant_reserve, urgent_reserve)
        } else {
            (0.0, 0.0)
        };
    let share_per_weight = lanes.share_per_weight(limiter.refill_rate());
    let (candidate, fits) = lanes.select(share_per_weight, hold, &mut |candidate| {
        fair_fit(limiter, candidate, tokens_of(candidate.slot), tenant_reserve, urgent_reserve).0
    })?;
    let tokens = tokens_of(candidate.slot);
    let (_, margin) = fair_fit(limiter, &candidate, tokens, tenant_reserve, urgent_reserve);
    let wait = if fits { 0.0 } else { limiter.wait_parts(tokens.0, tokens.1, margin) };
    Some(FairDecision { candidate, fits, wait, margin })
}

/// The fair policy's decision over a store at `now` under any limiter: brings its lanes to
/// `now` first. None when the store keeps no fair lanes or nothing goes.
pub fn decide_fair_store<P: TokenParts>(
    store: &mut Store<P, Rankings>,
    runtime: &mut FairRuntime,
    limiter: &impl Admission,
    now: f64,
    hold: bool,
) -> Option<FairDecision> {
    store.ranking_mut().1.as_mut()?.prepare(now, &mut runtime.ledger);
    let ((_, history), lanes) = store.ranking();
    decide_fair_lanes(
        lanes.as_ref()?,
        |slot| {
            let message = store.message(slot);
            (message.tokens, message.payload.token_parts(message.tokens))
        },
        runtime,
        history,
        limiter,
        now,
        hold,
    )
}

/// The fair policy's decision over a store at `now` with an `LLMThrottle`. Nothing when the
/// store keeps no fair lanes.
pub fn decide_fair<P: TokenParts, M>(
    store: &mut Store<P, Rankings>,
    runtime: &mut FairRuntime,
    limiter: &Throttle<M>,
    now: f64,
    hold: bool,
) -> Decision<FairCandidate> {
    match decide_fair_store(store, runtime, limiter, now, hold) {
        Some(d) if d.fits => Decision::Take(d.candidate),
        Some(d) if d.wait.is_finite() => Decision::Wait(d.wait),
        _ => Decision::Nothing,
    }
}

/// Removes every visible message whose deadline is before `now` (dead-lettered: to the
/// dead-letter store where there is one). Returns their request ids.
pub fn drop_expired<P, U: Ranking, F: Ranking>(
    store: &mut Store<P, ((DeadlineIndex, U), F)>,
    now: f64,
) -> CoreResult<Vec<Box<str>>> {
    let expired = store.ranking().0 .0.expired(now);
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
        let mut store = Store::with_ranking(config, 0.0, Rankings::default()).unwrap();
        // Without the URGENT reserve unless a test asks for it.
        let fair = FairConfig { urgent_reserve: Some(0.0), ..FairConfig::default() };
        store.ranking_mut().1 = Some(FairLanes::new(fair));
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
        // Having used its fair share of the window (1,000 tokens a minute, one tenant), it would
        // be backlogged, but no other tenant is active: the reserve would be for nobody.
        runtime.charge(heavy, 0.0, 1_000);
        assert!(matches!(decide_fair(&mut s, &mut runtime, &l, 0.0, true), Decision::Take(_)));
        // Another tenant active (it used tokens in the window): now it is backlogged, with 500
        // tokens a minute as its share, and 400 + the 300 reserve do not fit in 600.
        let other = s.intern_tenant("other");
        runtime.charge(other, 0.0, 1);
        assert!(
            matches!(decide_fair(&mut s, &mut runtime, &l, 0.0, true), Decision::Wait(w) if (w - 6.0).abs() < 1e-9)
        );
        // A light tenant ranks first (less use), and its lone request needs only its tokens.
        s.enqueue(message("l1", 2, 500, "light"), 0.0).unwrap();
        match decide_fair(&mut s, &mut runtime, &l, 0.0, true) {
            Decision::Take(c) => assert_eq!(s.message(c.slot).request_id.as_ref(), "l1"),
            other => panic!("{other:?}"),
        }
        // So do its two, three queued requests: it has used less than its share (333 a minute
        // with three tenants active).
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

    fn limiter_with(tpm: f64, spent: u64) -> Throttle<()> {
        let mut l = limiter(tpm);
        assert!(l.consume(0.0, "spent", spent, ()));
        l
    }

    #[test]
    fn recent_max_is_the_largest_of_the_last_n() {
        let mut recent = RecentMax::new(3);
        assert_eq!(recent.max(), None);
        for (value, expected) in [(5, 5), (2, 5), (3, 5), (1, 3), (1, 3), (0, 1), (7, 7)] {
            recent.push(value);
            assert_eq!(recent.max(), Some(expected));
        }
    }

    #[test]
    fn the_automatic_urgent_reserve_is_twice_the_largest_recent_urgent_estimate_capped() {
        let mut history = UrgentReserve::default();
        assert_eq!(history.automatic(100_000.0), 0.0);
        history.observe(2, 3_000, 0.0);
        // No URGENT seen yet: nothing kept back.
        assert_eq!(history.automatic(100_000.0), 0.0);
        history.observe(0, 1_000, 0.0);
        assert_eq!(history.automatic(100_000.0), 2_000.0);
        history.observe(0, 20_000, 0.0);
        assert_eq!(history.automatic(100_000.0), 25_000.0, "at most a quarter of the capacity");
        for _ in 0..RECENT_URGENT {
            history.observe(0, 500, 0.0);
        }
        assert_eq!(history.automatic(100_000.0), 1_000.0, "the 20,000 is out of the last 64");
        assert_eq!(history.reserve(Some(7.0), true, 100_000.0), 7.0);
        assert_eq!(history.reserve(None, false, 100_000.0), 0.0);
        assert_eq!(history.reserve(Some(7.0), false, 100_000.0), 0.0, "none unless URGENT goes first");
    }

    #[test]
    fn score_policy_ranks_urgent_first_and_keeps_its_reserve() {
        let mut s = store();
        s.enqueue(message("old-high", 1, 800, "a"), 0.0).unwrap();
        s.enqueue(message("urgent", 0, 300, "a"), 100.0).unwrap();
        let weights = Weights::default().with_urgent(true, None);
        let l = limiter(10_000.0);
        // URGENT goes first, though the old HIGH request scores higher.
        let old = s.message(s.slot_of("old-high").unwrap());
        let traits = crate::scoring::MessageTraits {
            priority: 1,
            receive_count: 0,
            tokens: old.tokens,
            expected_processing_seconds: None,
            enqueued_at: 0.0,
        };
        let high =
            crate::scoring::total(&crate::scoring::weighted_factors(&weights, &traits, 100.0, 10_000.0));
        let urgent = match decide_score(&s, &weights, &l, 100.0, true, 0.0) {
            Decision::Take(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(urgent.priority, 0);
        assert!(urgent.base < high, "{} < {high}", urgent.base);
        // The TypeScript library's rule: the old HIGH request's higher score wins.
        assert!(
            matches!(decide_score(&s, &Weights::default(), &l, 100.0, true, 0.0), Decision::Take(c) if c.priority == 1)
        );
        // A non-URGENT winner leaves twice the largest URGENT estimate (600): with 1,000 tokens
        // left, 800 + 600 do not fit; it is held until they do.
        s.receive_slot(s.slot_of("urgent").unwrap(), 30.0, 100.0).unwrap();
        let l = limiter_with(10_000.0, 9_000);
        // Alone and with nothing arriving: a backlog clearing, it goes without the reserve
        // once nothing has arrived for as long as the reserve takes to refill (3.6 s).
        assert!(matches!(decide_score(&s, &weights, &l, 100.0, true, 0.0), Decision::Wait(_)));
        assert!(
            matches!(decide_score(&s, &weights, &l, 104.0, true, 0.0), Decision::Take(c) if c.tokens == 800)
        );
        s.enqueue(message("big-low", 3, 5_000, "a"), 100.0).unwrap();
        match decide_score(&s, &weights, &l, 100.0, true, 0.0) {
            Decision::Wait(wait) => assert!((wait - 400.0 / (10_000.0 / 60.0)).abs() < 1e-9, "{wait}"),
            other => panic!("{other:?}"),
        }
        // Without holding, a smaller request that leaves the reserve goes instead.
        s.enqueue(message("small-low", 3, 300, "a"), 100.0).unwrap();
        match decide_score(&s, &weights, &l, 100.0, false, 0.0) {
            Decision::Take(c) => assert_eq!(c.tokens, 300),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fair_policy_keeps_the_urgent_reserve_for_every_tenant() {
        let mut s = store();
        if let Some(lanes) = s.ranking_mut().1.as_mut() {
            *lanes = FairLanes::new(FairConfig::default());
        }
        s.enqueue(message("u", 0, 400, "a"), 0.0).unwrap();
        s.receive_slot(s.slot_of("u").unwrap(), 30.0, 0.0).unwrap();
        // A lone request of a quiet tenant: not backlogged, yet it leaves the URGENT reserve
        // while another tenant's request waits too.
        s.enqueue(message("lone", 2, 500, "b"), 1.0).unwrap();
        let mut runtime = FairRuntime::new(&FairConfig::default(), Some(0.0));
        let l = limiter_with(10_000.0, 9_000);
        assert!(matches!(decide_fair(&mut s, &mut runtime, &l, 1.0, true), Decision::Wait(_)));
        s.enqueue(message("other", 3, 9_000, "c"), 1.0).unwrap();
        match decide_fair(&mut s, &mut runtime, &l, 1.0, true) {
            Decision::Wait(wait) => assert!((wait - 300.0 / (10_000.0 / 60.0)).abs() < 1e-6, "{wait}"),
            other => panic!("{other:?}"),
        }
        // An URGENT request finds it.
        s.enqueue(message("u2", 0, 800, "c"), 1.0).unwrap();
        assert!(matches!(decide_fair(&mut s, &mut runtime, &l, 1.0, true), Decision::Take(c) if c.urgent));
    }

    /// A message in the brute force: slot, `(tier, score, -enqueued_at, -seq)`, priority, tokens.
    type Ranked = (u32, (u8, f64, f64, i128), u8, u64);

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        // The score policy's decision with URGENT first and a fixed URGENT reserve, against brute
        // force: the best by (tier, score, age) of what may be ranked; with `hold` it goes when it
        // fits with its margin, else is waited for; without, the best of those that fit now with
        // theirs.
        #[test]
        fn score_decision_matches_brute_force(
            messages in proptest::collection::vec((0u8..4, 0u64..6_000, 0.0f64..100.0), 1..40),
            spent in 0u64..10_000,
            reserve in 0.0f64..4_000.0,
            hold in proptest::prelude::any::<bool>(),
            urgent_first in proptest::prelude::any::<bool>(),
        ) {
            let mut s = store();
            let mut at = 0.0;
            for (i, &(priority, tokens, advance)) in messages.iter().enumerate() {
                at += advance;
                s.enqueue(message(&format!("m{i}"), priority, tokens, "a"), at).unwrap();
            }
            let mut l = limiter(10_000.0);
            l.advance(at);
            proptest::prop_assume!(l.consume(at, "x", spent, ()));
            let weights = Weights::default().with_urgent(urgent_first, Some(reserve));
            let capacity = l.tokens().capacity();
            let budget = ranking_budget(&l, hold).unwrap();
            let reserve = if urgent_first { reserve } else { 0.0 };
            let margin = |priority: u8, tokens: u64| {
                if priority == 0 { 0.0 } else { reserve.min((capacity - tokens as f64).max(0.0)) }
            };
            // Every visible message with its key: (tier, score, -enqueued_at, -seq).
            let ranked: Vec<Ranked> = (0..messages.len() as u32)
                .map(|slot| {
                    let m = s.message(slot);
                    let traits = crate::scoring::MessageTraits {
                        priority: m.priority,
                        receive_count: 0,
                        tokens: m.tokens,
                        expected_processing_seconds: None,
                        enqueued_at: m.enqueued_at,
                    };
                    let score = crate::scoring::total(&crate::scoring::weighted_factors(&weights, &traits, at, budget.available));
                    (slot, (weights.tier(m.priority), score, -m.enqueued_at, -i128::from(m.message_id)), m.priority, m.tokens)
                })
                .collect();
            let best_of = |accept: &dyn Fn(u8, u64) -> bool| {
                ranked
                    .iter()
                    .filter(|(_, _, p, t)| accept(*p, *t))
                    .max_by(|a, b| a.1.0.cmp(&b.1.0).then(a.1.1.total_cmp(&b.1.1)).then(a.1.2.total_cmp(&b.1.2)).then(a.1.3.cmp(&b.1.3)))
                    .copied()
            };
            let fits = |p: u8, t: u64| l.admits(t, margin(p, t));
            let expected = if hold {
                best_of(&|_, t| t as f64 <= capacity).map(|(slot, _, p, t)| if fits(p, t) { Ok(slot) } else { Err(()) })
            } else {
                best_of(&|p, t| t as f64 <= budget.max_tokens && fits(p, t)).map(|(slot, ..)| Ok(slot))
            };
            let got = match decide_score(&s, &weights, &l, at, hold, f64::NEG_INFINITY) {
                Decision::Take(c) => Some(Ok(c.slot)),
                Decision::Wait(_) => Some(Err(())),
                Decision::Nothing => None,
            };
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
