//! One dispatch step: choose the message to hand out under a policy, reserve its budget, and take
//! it out of its pool (the in-memory store, or the prefetch buffer of another store), keeping
//! the books on every path: a reservation made is released whole when the take fails, a message
//! taken is put back when the reservation fails.
//!
//! One file past 700 lines: the three shapes below share the reservation and take-back steps
//! whose order keeps those books, and split apart they would each repeat them.
//!
//! Pure Rust over `Store`, `Buffer` and `Throttle`; the binding locks, calls and builds objects.
//! Three shapes:
//! - **fused** ([`fused_score`], [`fused_fair`]): the in-memory store and an `LLMThrottle`
//!   without custom scorers, atomic under both locks (the caller holds them for the call);
//! - **buffered** ([`buffered_score`], [`buffered_fair`]): the prefetch buffer and an
//!   `LLMThrottle` without custom scorers, the same under the buffer's lock;
//! - **stepwise** ([`attempt`]): everything else — custom scorers (Python callables, run with no
//!   lock held), or a limiter whose reservation the caller awaits. Each step locks on its own, so
//!   another thread may take the winner in between; the loop then starts over, at most
//!   [`MAX_ATTEMPTS`] times.
//!
//! About 780 lines for one concept, a dispatch attempt and its steps; the books are in
//! `crate::ledger`, the reasons in `reason.rs`, the tests in `tests.rs`.

use crate::buffer::{Buffer, Buffered};
use crate::errors::{CoreError, CoreResult};
use crate::fair::{FairCandidate, FairRuntime};
use crate::policy::{
    admit, decide_fair, decide_fair_store, decide_score, parts_ranking_budget, ranking_budget, score_margin,
    score_reserve, Admission, Budget, Decision, FairDecision, Rankings,
};
use crate::scoring::Weights;
use crate::select::{best_candidate, choose, Candidate, Choice, Collected, SearchContext};
use crate::store::{ReceiptHandle, Store};
use crate::throttle::{ReservationKey, Throttle};

pub mod reason;
#[cfg(test)]
#[allow(clippy::float_cmp)] // the values compared are exact in binary
mod tests;

/// How often a stepwise dispatch starts over when its winner vanished or stopped fitting while
/// custom scorers ran (only possible with several threads): after that it reports nothing found.
pub const MAX_ATTEMPTS: usize = 8;

/// How a dispatch hands a message out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Seconds the message is leased for (the in-memory store's receive).
    pub visibility_timeout: f64,
    /// Scores below this are not handed out (score policy).
    pub min_score: f64,
    /// Whether the budget is reserved on the limiter.
    pub reserve: bool,
    /// Whether the budget is held for the winner (`hold_budget`).
    pub hold: bool,
}

/// A payload that may know its request's input and output token parts (`TokenInfo.input` and
/// `max_output`), read once when it was stored: a reservation takes the input part from an input
/// limit and the output part from an output limit, and admission checks each against its own.
pub trait TokenParts {
    /// The input and output parts of a message whose estimate is `tokens`, adding up to it;
    /// None when not given.
    fn token_parts(&self, tokens: u64) -> Option<(u64, u64)>;
}

impl TokenParts for () {
    fn token_parts(&self, _tokens: u64) -> Option<(u64, u64)> {
        None
    }
}

/// A message's input part in 8 bytes, as a stored message keeps it: the output part is the rest
/// of the estimate, which the message keeps anyway (`input + max_output == estimated` always
/// holds). `u64::MAX` stands for "no parts". An input part of `u64::MAX` itself is a count that
/// saturated (beyond 2**64 - 1), so the estimate is too: it is kept as the estimate alone, which
/// changes nothing a limiter decides (every limit counting the whole estimate, `tpm` always
/// among them, is finite, so neither can ever be granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputPart(u64);

impl InputPart {
    /// No parts: the estimate alone.
    pub const NONE: Self = Self(u64::MAX);

    /// The input part of `parts` (as [`crate::throttle::split_parts`] gives them).
    pub fn of(parts: Option<(u64, u64)>) -> Self {
        parts.map_or(Self::NONE, |(input, _)| Self(input))
    }

    /// The input and output parts of an estimate of `tokens` (the output part is the rest).
    pub fn parts(self, tokens: u64) -> Option<(u64, u64)> {
        (self != Self::NONE).then(|| (self.0, tokens.saturating_sub(self.0)))
    }
}

/// The most tokens a limiter can ever grant one request, by what each of its token limits
/// counts: `whole` the smallest capacity of the limits counting the whole estimate (tpm, tpd),
/// `input` and `output` those of the input and output limits (itpm, otpm; infinite when not
/// set). A request whose input part alone exceeds `input`, whose output part exceeds `output`,
/// or whose estimate exceeds `whole`, can never be admitted; without parts, an input or output
/// limit counts the whole estimate, so it must fit all three.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// The smallest capacity of the limits that count the whole estimate.
    pub whole: f64,
    /// The input limit's capacity (infinite without one).
    pub input: f64,
    /// The output limit's capacity (infinite without one).
    pub output: f64,
}

impl Capacity {
    /// Only limits that count the whole estimate.
    pub fn whole(capacity: f64) -> Self {
        Self { whole: capacity, input: f64::INFINITY, output: f64::INFINITY }
    }

    /// Whether a request of `tokens`, split into `parts` when known, can ever be admitted.
    pub fn fits(&self, tokens: u64, parts: Option<(u64, u64)>) -> bool {
        let total = tokens as f64;
        total <= self.whole
            && match parts {
                Some((input, output)) => input as f64 <= self.input && output as f64 <= self.output,
                None => total <= self.input && total <= self.output,
            }
    }

    /// The largest estimate that fits whatever its parts.
    pub fn smallest(&self) -> f64 {
        self.whole.min(self.input).min(self.output)
    }
}

/// What a dispatch step comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// This was taken.
    Taken(T),
    /// Held for the winner, which fits in this many seconds.
    Wait(f64),
    /// Nothing to hand out now.
    Nothing,
}

impl<T> Outcome<T> {
    /// `Wait` for a finite wait, else `Nothing` (a winner that can never fit holds nothing).
    pub fn wait(seconds: f64) -> Self {
        if seconds.is_finite() {
            Self::Wait(seconds)
        } else {
            Self::Nothing
        }
    }

    /// The taken value mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Self::Taken(t) => Outcome::Taken(f(t)),
            Self::Wait(s) => Outcome::Wait(s),
            Self::Nothing => Outcome::Nothing,
        }
    }
}

/// Why a message was chosen: what its `score` and `reason` are built from.
#[derive(Debug, Clone, PartialEq)]
pub enum Facts {
    /// The score policy: the six weighted factors, the weighted custom scores, their total.
    Score {
        /// The six weighted factors.
        factors: [f64; 6],
        /// Weighted custom scores, in scorer order.
        custom: Vec<f64>,
        /// Their sum.
        total: f64,
    },
    /// The `fair_priority` policy: the candidate with its rank.
    Fair(FairCandidate),
}

impl Facts {
    fn of_choice(choice: &Choice) -> Self {
        Self::Score { factors: choice.candidate.factors, custom: choice.custom.clone(), total: choice.total }
    }

    fn of_candidate(candidate: &Candidate) -> Self {
        Self::Score { factors: candidate.factors, custom: Vec::new(), total: candidate.base }
    }
}

/// A fair charge: the tenant charged and the charge's id, to correct at the mark.
pub type Charge = (u32, u64);

/// What a fused step took from the in-memory store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreTake {
    /// Where the message lives.
    pub slot: u32,
    /// The receive's handle.
    pub handle: ReceiptHandle,
    /// The reservation, when the budget was reserved.
    pub key: Option<ReservationKey>,
    /// Why it was chosen.
    pub facts: Facts,
    /// Its fair charge (`fair_priority`).
    pub charge: Option<Charge>,
}

/// The score policy's fused step: decide (`policy::decide_score`), reserve and receive, under
/// the caller's locks of `store` (at `now`) and `limiter` (at `limiter_now`, advanced).
pub fn fused_score<P: TokenParts, M: Default>(
    store: &mut Store<P, Rankings>,
    limiter: &mut Throttle<M>,
    weights: &Weights,
    settings: Settings,
    now: f64,
    limiter_now: f64,
) -> CoreResult<Outcome<StoreTake>> {
    let candidate = match decide_score(store, weights, limiter, now, settings.hold, settings.min_score) {
        Decision::Take(candidate) => candidate,
        Decision::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
        Decision::Nothing => return Ok(Outcome::Nothing),
    };
    let facts = Facts::of_candidate(&candidate);
    receive_reserved(store, limiter, candidate.slot, settings, now, limiter_now).map(|taken| {
        taken.map(|(handle, key)| StoreTake { slot: candidate.slot, handle, key, facts, charge: None })
    })
}

/// The `fair_priority` policy's fused step: decide (`policy::decide_fair`), reserve, receive and
/// charge the tenant, under the caller's locks.
pub fn fused_fair<P: TokenParts, M: Default>(
    store: &mut Store<P, Rankings>,
    runtime: &mut FairRuntime,
    limiter: &mut Throttle<M>,
    settings: Settings,
    now: f64,
    limiter_now: f64,
) -> CoreResult<Outcome<StoreTake>> {
    let candidate = match decide_fair(store, runtime, limiter, now, settings.hold) {
        Decision::Take(candidate) => candidate,
        Decision::Wait(seconds) => return Ok(Outcome::Wait(seconds)),
        Decision::Nothing => return Ok(Outcome::Nothing),
    };
    let tokens = store.message(candidate.slot).tokens;
    let taken = receive_reserved(store, limiter, candidate.slot, settings, now, limiter_now)?;
    Ok(taken.map(|(handle, key)| {
        let charge = runtime.charge(candidate.tenant, now, tokens);
        StoreTake {
            slot: candidate.slot,
            handle,
            key,
            facts: Facts::Fair(candidate),
            charge: Some((candidate.tenant, charge)),
        }
    }))
}

/// Reserves the budget of the message in `slot` (when `settings.reserve`) and receives it; a
/// failed receive releases the reservation. `Nothing` when the limiter refuses.
fn receive_reserved<P: TokenParts, M: Default>(
    store: &mut Store<P, Rankings>,
    limiter: &mut Throttle<M>,
    slot: u32,
    settings: Settings,
    now: f64,
    limiter_now: f64,
) -> CoreResult<Outcome<(ReceiptHandle, Option<ReservationKey>)>> {
    let key = if settings.reserve {
        let message = store.message(slot);
        let parts = message.payload.token_parts(message.tokens);
        match limiter.reserve_parts(limiter_now, &message.request_id, message.tokens, parts, M::default()) {
            Ok(key) => Some(key),
            Err(_) => return Ok(Outcome::Nothing),
        }
    } else {
        None
    };
    match store.receive_slot(slot, settings.visibility_timeout, now) {
        Ok(handle) => Ok(Outcome::Taken((handle, key))),
        Err(error) => {
            if let Some(key) = key {
                let _ = limiter.release_reservation(key);
            }
            Err(error)
        }
    }
}

/// What a step took out of the prefetch buffer.
#[derive(Debug)]
pub struct BufferTake<M> {
    /// The buffered message, out of the buffer.
    pub item: Buffered<M>,
    /// The reservation, when the budget was reserved.
    pub key: Option<ReservationKey>,
    /// Why it was chosen.
    pub facts: Facts,
    /// Its fair charge (`fair_priority`).
    pub charge: Option<Charge>,
}

/// The score policy's step over the buffer with an `LLMThrottle` and no custom scorers: the
/// best buffered message under the limiter's budget, reserved and taken out.
pub fn buffered_score<M, L: Default>(
    buffer: &mut Buffer<M>,
    limiter: &mut Throttle<L>,
    weights: &Weights,
    settings: Settings,
    now: f64,
    limiter_now: f64,
) -> Outcome<BufferTake<M>> {
    let Some(budget) = ranking_budget(limiter, settings.hold) else { return Outcome::Nothing };
    // With input or output limits, first under the budget of requests split into parts (as
    // `policy::decide_score`).
    let loose = parts_ranking_budget(limiter, settings.hold);
    let decided = loose
        .map(|loose| buffered_decision(buffer, limiter, weights, settings, now, loose))
        .filter(|decision| !matches!(decision, Decision::Nothing))
        .unwrap_or_else(|| buffered_decision(buffer, limiter, weights, settings, now, budget));
    let candidate = match decided {
        Decision::Take(candidate) => candidate,
        Decision::Wait(seconds) => return Outcome::Wait(seconds),
        Decision::Nothing => return Outcome::Nothing,
    };
    let Ok(key) = reserve_buffered(buffer, limiter, candidate.seq, candidate.tokens, settings, limiter_now)
    else {
        return Outcome::Nothing;
    };
    match buffer.take(candidate.seq) {
        Some(item) => {
            Outcome::Taken(BufferTake { item, key, facts: Facts::of_candidate(&candidate), charge: None })
        }
        None => Outcome::Nothing,
    }
}

/// The score policy's decision over the buffer under `budget`.
fn buffered_decision<M, L>(
    buffer: &Buffer<M>,
    limiter: &Throttle<L>,
    weights: &Weights,
    settings: Settings,
    now: f64,
    budget: Budget,
) -> Decision<Candidate> {
    let reserve = score_reserve(weights, Some(&buffer.urgent_history()), limiter, now);
    let capacity = limiter.tokens().capacity();
    let mut context =
        SearchContext { weights: *weights, now, available: budget.available, max_tokens: budget.max_tokens };
    let parts_of = |seq: u64| buffer.get(seq).and_then(|item| item.parts);
    let ever = |candidate: &Candidate| limiter.fits_capacity(candidate.tokens, parts_of(candidate.seq));
    // The best the limiter can ever grant (as `policy::best_ever_granted`).
    let best = |context: &SearchContext| {
        let first = buffer.collect(context, 1).into_iter().next().map(|c| c.candidate)?;
        if ever(&first) {
            return Some(first);
        }
        let more = buffer.collect(context, crate::policy::UNFITTABLE_SKIPS + 1);
        more.into_iter().map(|c| c.candidate).find(|candidate| ever(candidate))
    };
    let Some(mut candidate) = best(&context) else { return Decision::Nothing };
    let margin = score_margin(&candidate, reserve, capacity);
    if !settings.hold
        && margin > 0.0
        && !limiter.admits_parts(candidate.tokens, parts_of(candidate.seq), margin)
    {
        // The best among what leaves the URGENT reserve (as `policy::decide_score`).
        context.max_tokens = budget.max_tokens - reserve;
        let Some(fitting) = best(&context) else { return Decision::Nothing };
        candidate = fitting;
    }
    if candidate.base < settings.min_score && candidate.tier > 0 {
        // Every URGENT below the threshold holds back nothing (as `policy::decide_score`).
        context.weights.urgent_first = false;
        let Some(best) = best(&context) else { return Decision::Nothing };
        candidate = best;
    }
    if candidate.base < settings.min_score {
        return Decision::Nothing;
    }
    let margin = score_margin(&candidate, reserve, capacity);
    // The best by score alone, when every URGENT scored below the threshold, is waited for
    // held or not (as `policy::decide_score`).
    let by_score = weights.urgent_first && !context.weights.urgent_first;
    admit(limiter, candidate, candidate.tokens, parts_of(candidate.seq), margin, settings.hold || by_score)
}

/// The `fair_priority` step over the buffer with an `LLMThrottle`: decide, reserve, take, charge.
pub fn buffered_fair<M, L: Default>(
    buffer: &mut Buffer<M>,
    limiter: &mut Throttle<L>,
    settings: Settings,
    now: f64,
    limiter_now: f64,
) -> Outcome<BufferTake<M>> {
    let Some(decision) = buffer.decide_fair(limiter, now, settings.hold) else { return Outcome::Nothing };
    if !decision.fits {
        return Outcome::wait(decision.wait);
    }
    let seq = buffer.items()[decision.candidate.slot as usize].seq;
    let tokens = buffer.items()[decision.candidate.slot as usize].traits.tokens;
    let Ok(key) = reserve_buffered(buffer, limiter, seq, tokens, settings, limiter_now) else {
        return Outcome::Nothing;
    };
    let charge = buffer.charge(&decision.candidate, now, tokens);
    match buffer.take(seq) {
        Some(item) => Outcome::Taken(BufferTake {
            item,
            key,
            facts: Facts::Fair(decision.candidate),
            charge: Some((decision.candidate.tenant, charge)),
        }),
        None => Outcome::Nothing,
    }
}

/// The limiter refused a reservation.
struct Refused;

/// Reserves a buffered message's budget: the key, None when nothing is to be reserved.
fn reserve_buffered<M, L: Default>(
    buffer: &Buffer<M>,
    limiter: &mut Throttle<L>,
    seq: u64,
    tokens: u64,
    settings: Settings,
    limiter_now: f64,
) -> Result<Option<ReservationKey>, Refused> {
    if !settings.reserve {
        return Ok(None);
    }
    let item = buffer.get(seq).ok_or(Refused)?;
    limiter
        .reserve_parts(limiter_now, &item.request_id, tokens, item.parts, L::default())
        .map(Some)
        .map_err(|_| Refused)
}

// ----- stepwise -------------------------------------------------------------------------------

/// What a stepwise dispatch asks of its pool and its limiter, one locked step at a time.
pub trait Steps {
    /// What a take gives.
    type Taken;
    /// The caller's error (a Python exception in the binding).
    type Error: From<CoreError>;

    /// The budget to rank against (None: the limiter admits nothing now).
    fn budget(&mut self, hold: bool) -> Result<Option<Budget>, Self::Error>;
    /// The URGENT reserve a non-URGENT winner leaves (`policy::score_reserve` of the pool's
    /// history), and the token capacity its margin is capped by.
    fn urgent(&mut self) -> Result<(f64, f64), Self::Error>;
    /// Up to `limit` candidates, best first, under `budget`; with `by_score`, ranked by score
    /// alone (URGENT's tier off: see `attempt`).
    fn collect(
        &mut self,
        budget: Budget,
        limit: usize,
        by_score: bool,
    ) -> Result<Vec<Collected>, Self::Error>;
    /// The raw custom scores of the `i`-th collected candidate (run with no lock held).
    fn evaluate(&mut self, i: usize, candidate: &Candidate) -> Result<Vec<f64>, Self::Error>;
    /// 0 when `candidate` (its estimate, split into its input and output parts where the pool
    /// knows them), leaving `margin` more in the bucket, fits now; else how long it is held:
    /// seconds for an `LLMThrottle` (infinite: never), the tokens it needs for another
    /// limiter's reported budget (whose caller asks its limiter when).
    fn wait(&mut self, candidate: &Candidate, margin: f64) -> Result<f64, Self::Error>;
    /// Reserves `candidate`'s budget: the key, or None when refused.
    fn reserve(&mut self, candidate: &Candidate) -> Result<Option<ReservationKey>, Self::Error>;
    /// Takes `candidate` out if it is still there (None: it left).
    fn take(&mut self, candidate: &Candidate, facts: Facts) -> Result<Option<Self::Taken>, Self::Error>;
    /// Gives a reservation back whole.
    fn release(&mut self, key: ReservationKey);
}

/// What a stepwise dispatch took, with its reservation (when it made one).
pub type Attempted<T> = Outcome<(T, Option<ReservationKey>)>;

/// The score policy, step by step: choose with custom scorers (`select::choose`, evaluated in
/// bound order, at most `max_candidates`), leaving the URGENT reserve as `policy::decide_score`
/// does, hold or reserve, take; start over when the winner left or the budget moved meanwhile.
/// With `reserve` off nothing is reserved (the caller reserves afterwards, when its limiter
/// must be awaited).
pub fn attempt<S: Steps>(
    steps: &mut S,
    custom_weights: &[f64],
    max_candidates: usize,
    settings: Settings,
) -> Result<Attempted<S::Taken>, S::Error> {
    let limit = if custom_weights.is_empty() { 1 } else { max_candidates };
    for _ in 0..MAX_ATTEMPTS {
        let Some(budget) = steps.budget(settings.hold)? else { return Ok(Outcome::Nothing) };
        let (reserve, capacity) = steps.urgent()?;
        let Some(mut choice) = pick(steps, budget, limit, custom_weights, false)? else {
            return Ok(Outcome::Nothing);
        };
        let margin = score_margin(&choice.candidate, reserve, capacity);
        let mut ranked = budget;
        if !settings.hold && margin > 0.0 && steps.wait(&choice.candidate, margin)? != 0.0 {
            // The best among what leaves the reserve: no URGENT one fits now (it would have won).
            ranked = Budget { max_tokens: budget.max_tokens - reserve, ..budget };
            let Some(fitting) = pick(steps, ranked, limit, custom_weights, false)? else {
                return Ok(Outcome::Nothing);
            };
            choice = fitting;
        }
        // Whether the winner is the best by score alone after every URGENT scored below the
        // threshold: one that does not fit is then waited for, held or not (as `decide_score`).
        let mut by_score = false;
        if choice.total < settings.min_score && choice.candidate.tier > 0 {
            // Every URGENT below the threshold holds back nothing (as `policy::decide_score`).
            let Some(best) = pick(steps, ranked, limit, custom_weights, true)? else {
                return Ok(Outcome::Nothing);
            };
            choice = best;
            by_score = true;
        }
        if choice.total < settings.min_score {
            return Ok(Outcome::Nothing);
        }
        let margin = score_margin(&choice.candidate, reserve, capacity);
        if settings.hold || margin > 0.0 {
            let wait = steps.wait(&choice.candidate, margin)?;
            if wait != 0.0 {
                if settings.hold || by_score {
                    return Ok(Outcome::wait(wait));
                }
                continue; // the budget moved while custom scorers ran (another thread)
            }
        }
        let key = if settings.reserve {
            match steps.reserve(&choice.candidate)? {
                Some(key) => Some(key),
                None => continue, // the budget moved while custom scorers ran: start over
            }
        } else {
            None
        };
        match steps.take(&choice.candidate, Facts::of_choice(&choice)) {
            Ok(Some(taken)) => return Ok(Outcome::Taken((taken, key))),
            Ok(None) => {
                // The winner left while custom scorers ran: its reservation goes back whole.
                if let Some(key) = key {
                    steps.release(key);
                }
            }
            Err(error) => {
                if let Some(key) = key {
                    steps.release(key);
                }
                return Err(error);
            }
        }
    }
    Ok(Outcome::Nothing)
}

/// The best of `budget` under the custom scorers (none: the best base score).
fn pick<S: Steps>(
    steps: &mut S,
    budget: Budget,
    limit: usize,
    custom_weights: &[f64],
    by_score: bool,
) -> Result<Option<Choice>, S::Error> {
    let collected = steps.collect(budget, limit, by_score)?;
    choose(&collected, custom_weights, |i, candidate| steps.evaluate(i, candidate))
}

/// Tokens a held fair winner waits for: its estimate and the reserve margin it must leave.
fn needed(tokens: u64, decision: &FairDecision) -> u64 {
    tokens + decision.margin.max(0.0).ceil() as u64
}

/// The `fair_priority` step over the in-memory store under another limiter's reported budget:
/// the winner received and charged (its reservation is the caller's to make), with the tokens
/// to wait for if that is refused; or, when it does not fit now, `Wait` for that many tokens
/// (held; the caller asks its limiter when) or `Nothing`.
pub fn take_fair_in_store<P: TokenParts>(
    store: &mut Store<P, Rankings>,
    runtime: &mut FairRuntime,
    limiter: &impl Admission,
    settings: Settings,
    now: f64,
) -> CoreResult<Outcome<(StoreTake, u64)>> {
    let Some(decision) = decide_fair_store(store, runtime, limiter, now, settings.hold) else {
        return Ok(Outcome::Nothing);
    };
    let slot = decision.candidate.slot;
    let tokens = store.message(slot).tokens;
    if !decision.fits {
        return Ok(if settings.hold {
            Outcome::Wait(needed(tokens, &decision) as f64)
        } else {
            Outcome::Nothing
        });
    }
    let handle = store.receive_slot(slot, settings.visibility_timeout, now)?;
    let charge = (decision.candidate.tenant, runtime.charge(decision.candidate.tenant, now, tokens));
    let take =
        StoreTake { slot, handle, key: None, facts: Facts::Fair(decision.candidate), charge: Some(charge) };
    Ok(Outcome::Taken((take, needed(tokens, &decision))))
}

/// The `fair_priority` step over the buffer under another limiter's reported budget, as
/// [`take_fair_in_store`].
pub fn take_fair_buffered<M>(
    buffer: &mut Buffer<M>,
    limiter: &impl Admission,
    settings: Settings,
    now: f64,
) -> Outcome<(BufferTake<M>, u64)> {
    let Some(decision) = buffer.decide_fair(limiter, now, settings.hold) else { return Outcome::Nothing };
    let item = &buffer.items()[decision.candidate.slot as usize];
    let (seq, tokens) = (item.seq, item.traits.tokens);
    if !decision.fits {
        return if settings.hold {
            Outcome::Wait(needed(tokens, &decision) as f64)
        } else {
            Outcome::Nothing
        };
    }
    let charge = buffer.charge(&decision.candidate, now, tokens);
    match buffer.take(seq) {
        Some(item) => {
            let charge = Some((decision.candidate.tenant, charge));
            let take = BufferTake { item, key: None, facts: Facts::Fair(decision.candidate), charge };
            Outcome::Taken((take, needed(tokens, &decision)))
        }
        None => Outcome::Nothing,
    }
}

// ----- waiting --------------------------------------------------------------------------------

/// With custom scorers, how often a dequeue waiting for a score to reach the minimum looks
/// again once the time-only bound says it could have (custom scores change with anything).
pub const CUSTOM_RECHECK: f64 = 1.0;

/// Seconds until a dequeue that found nothing could hand something out: the soonest of a held
/// winner fitting (`held`), an in-flight message becoming visible (`visibility`), the buffer
/// being filled again (`refill`), and — when nothing is held — the smallest waiting message
/// fitting the budget (`smallest`: the limiter's wait for it) or, when it fits already but
/// scored too low, the best score reaching the minimum (`crossing`, computed only then).
/// Infinite when only an enqueue or a mark can help.
pub fn until_ready(
    held: Option<f64>,
    visibility: Option<f64>,
    refill: Option<f64>,
    smallest: Option<f64>,
    crossing: impl FnOnce() -> Option<f64>,
) -> f64 {
    let mut until = f64::INFINITY;
    for wait in [visibility.map(|v| v.max(0.0)), refill, held].into_iter().flatten() {
        until = until.min(wait);
    }
    match (held, smallest) {
        (None, Some(wait)) if wait > 0.0 => until.min(wait), // infinite: it never fits
        (None, Some(_)) => match crossing() {
            Some(crossing) => until.min(if crossing > 0.0 { crossing } else { CUSTOM_RECHECK }),
            None => until,
        },
        _ => until,
    }
}

/// The requests that can never fit the limiter's token capacities, each reported once, and the
/// capacities last seen (for the metrics' count).
#[derive(Debug, Default)]
pub struct Unfittable {
    capacity: Option<Capacity>,
    reported: std::collections::HashSet<Box<str>>,
}

impl Unfittable {
    /// Of `ids` (those above `capacity` now), the ones not reported before; remembers both.
    pub fn observe<'a>(
        &mut self,
        capacity: Capacity,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<Box<str>> {
        self.capacity = Some(capacity);
        ids.into_iter().filter(|id| self.reported.insert((*id).into())).map(Box::from).collect()
    }

    /// Taken out of the queue: reported afresh if they come back.
    pub fn taken<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            self.reported.remove(id);
        }
    }

    /// The token capacities last seen.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }
}

// Every wait-time factor is saturated after 300 s (LOW's `max_wait`): past that, time alone
// changes no score.
const SCORE_HORIZON: f64 = 301.0;

/// Seconds until the best score reaches `threshold` with time alone (scores only rise as
/// messages wait): 0 when it does now, None when it never will without another change.
/// `best_at(offset)` is the best base score `offset` seconds from now (None: no candidate);
/// `custom_total`, the custom scorers' weights, is counted in full, so with custom scorers this
/// is the earliest moment the threshold can be reached.
pub fn time_until_score<E>(
    mut best_at: impl FnMut(f64) -> Result<Option<f64>, E>,
    custom_total: f64,
    threshold: f64,
) -> Result<Option<f64>, E> {
    let mut reaches = |offset: f64| -> Result<Option<bool>, E> {
        Ok(best_at(offset)?.map(|best| best + custom_total >= threshold))
    };
    match reaches(0.0)? {
        None => return Ok(None),
        Some(true) => return Ok(Some(0.0)),
        Some(false) => {}
    }
    if reaches(SCORE_HORIZON)? != Some(true) {
        return Ok(None);
    }
    let (mut below, mut above) = (0.0, SCORE_HORIZON);
    // Bisection to a millisecond: the best score never decreases as time passes.
    while above - below > 1e-3 {
        let middle = f64::midpoint(below, above);
        if reaches(middle)? == Some(true) {
            above = middle;
        } else {
            below = middle;
        }
    }
    Ok(Some(above))
}

/// The best base score of the buffered messages at `now` under `budget`.
pub fn best_score_buffered<M>(
    buffer: &Buffer<M>,
    weights: &Weights,
    budget: Budget,
    now: f64,
) -> Option<f64> {
    let context =
        SearchContext { weights: *weights, now, available: budget.available, max_tokens: budget.max_tokens };
    buffer.collect(&context, 1).first().map(|c| c.candidate.base)
}

/// The best base score of the store's visible messages at `now` under `budget`.
pub fn best_score_in_store<P, R: crate::index::Ranking>(
    store: &Store<P, R>,
    weights: &Weights,
    budget: Budget,
    now: f64,
) -> Option<f64> {
    let context =
        SearchContext { weights: *weights, now, available: budget.available, max_tokens: budget.max_tokens };
    best_candidate(store, &context).map(|c| c.base)
}

/// Slots of the store's visible messages with more tokens than `capacity`: only cells whose
/// token range reaches past it are walked.
pub fn slots_above<P: TokenParts, R: crate::index::Ranking>(
    store: &Store<P, R>,
    capacity: Capacity,
) -> Vec<u32> {
    let mut out = Vec::new();
    // A cell whose largest estimate fits the smallest capacity holds only requests that fit.
    let smallest = capacity.smallest();
    for (key, members) in store.visible_cells() {
        if key.token_range().1 <= smallest {
            continue;
        }
        out.extend(members.values().copied().filter(|&slot| {
            let message = store.message(slot);
            !capacity.fits(message.tokens, message.payload.token_parts(message.tokens))
        }));
    }
    out
}
