use super::*;
use crate::buffer::Leased;
use crate::fair::{FairConfig, FairLanes};
use crate::policy::Snapshot;
use crate::scoring::MessageTraits;
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

fn store(fair: bool) -> Store<(), Rankings> {
    let config = StoreConfig { max_receive_count: None, message_retention: f64::INFINITY };
    let mut store = Store::with_ranking(config, 0.0, Rankings::default()).unwrap();
    if fair {
        store.ranking_mut().1 = Some(FairLanes::new(FairConfig::default()));
        store.rebuild_ranking();
    }
    store
}

const SETTINGS: Settings = Settings { visibility_timeout: 30.0, min_score: 0.0, reserve: true, hold: true };

#[test]
fn a_fused_step_reserves_under_the_delivery_and_receives() {
    let mut s = store(false);
    s.enqueue(message("a", 2, 100, "t"), 0.0).unwrap();
    let mut l = limiter(1_000.0);
    let Outcome::Taken(taken) = fused_score(&mut s, &mut l, &Weights::default(), SETTINGS, 1.0, 1.0).unwrap()
    else {
        panic!("nothing taken")
    };
    assert_eq!(s.message(taken.slot).receive_count, 1);
    assert!((l.tokens().available() - 900.0).abs() < 1e-9);
    // The reservation is the delivery's: released by its key, not by the request id.
    l.release_reservation(taken.key.unwrap()).unwrap();
    assert!((l.tokens().available() - 1_000.0).abs() < 1e-9);
    assert!(matches!(taken.facts, Facts::Score { .. }));
    assert_eq!(
        fused_score(&mut s, &mut l, &Weights::default(), SETTINGS, 1.0, 1.0).unwrap(),
        Outcome::Nothing
    );
}

#[test]
fn a_fused_step_that_cannot_receive_leaves_nothing_reserved() {
    let mut s = store(false);
    s.enqueue(message("a", 2, 100, "t"), 0.0).unwrap();
    let mut l = limiter(1_000.0);
    let bad = Settings { visibility_timeout: 1e9, ..SETTINGS };
    assert!(fused_score(&mut s, &mut l, &Weights::default(), bad, 1.0, 1.0).is_err());
    assert!((l.tokens().available() - 1_000.0).abs() < 1e-9);
    assert_eq!(l.history_len(), 0);
    assert_eq!(s.visible_count(), 1);
}

#[test]
fn a_held_winner_waits_and_nothing_below_it_goes() {
    let mut s = store(false);
    s.enqueue(message("big", 0, 900, "t"), 0.0).unwrap();
    s.enqueue(message("small", 3, 50, "t"), 0.0).unwrap();
    let mut l = limiter(1_000.0);
    l.reserve(0.0, "x", 500, ()).unwrap();
    match fused_score(&mut s, &mut l, &Weights::default(), SETTINGS, 0.0, 0.0).unwrap() {
        Outcome::Wait(wait) => assert!((wait - 24.0).abs() < 1e-9),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.visible_count(), 2);
}

#[test]
fn a_fused_fair_step_charges_the_tenant() {
    let mut s = store(true);
    s.enqueue(message("a", 2, 100, "t"), 0.0).unwrap();
    let mut runtime = FairRuntime::new(&FairConfig::default(), Some(0.0));
    let mut l = limiter(1_000.0);
    let Outcome::Taken(taken) = fused_fair(&mut s, &mut runtime, &mut l, SETTINGS, 1.0, 1.0).unwrap() else {
        panic!("nothing taken")
    };
    let (tenant, _) = taken.charge.unwrap();
    assert!((runtime.ledger.usage(tenant, 1.0) - 100.0).abs() < 1e-9);
    assert!(matches!(taken.facts, Facts::Fair(_)));
}

fn leased(id: &str, priority: u8, tokens: u64) -> Leased<&'static str> {
    Leased {
        message: "m",
        request_id: id.into(),
        handle: format!("h-{id}").into(),
        lease_end: 30.0,
        traits: MessageTraits {
            priority,
            receive_count: 0,
            tokens,
            expected_processing_seconds: None,
            enqueued_at: 0.0,
        },
        tenant: None,
        deadline: f64::NAN,
        parts: None,
    }
}

#[test]
fn a_buffered_step_takes_the_best_and_reserves_it() {
    let mut buffer = Buffer::default();
    buffer.insert([leased("low", 3, 100), leased("urgent", 0, 100)]);
    let mut l = limiter(1_000.0);
    let Outcome::Taken(taken) = buffered_score(&mut buffer, &mut l, &Weights::default(), SETTINGS, 1.0, 1.0)
    else {
        panic!("nothing taken")
    };
    assert_eq!(&*taken.item.request_id, "urgent");
    assert!(taken.key.is_some());
    assert_eq!(buffer.len(), 1);
    // Not reserving: nothing taken from the limiter, but still only what fits now.
    let no_reserve = Settings { reserve: false, hold: false, ..SETTINGS };
    l.reserve(1.0, "y", 850, ()).unwrap();
    assert_eq!(
        buffered_score(&mut buffer, &mut l, &Weights::default(), no_reserve, 1.0, 1.0).map(|_| ()),
        Outcome::Nothing
    );
}

#[test]
fn a_buffered_fair_step_holds_for_its_winner() {
    let mut buffer = Buffer::default();
    buffer.insert([leased("a", 2, 900)]);
    buffer.configure_fair(&[], FairConfig::default(), Some(0.0));
    let mut l = limiter(1_000.0);
    l.reserve(0.0, "x", 500, ()).unwrap();
    match buffered_fair(&mut buffer, &mut l, SETTINGS, 0.0, 0.0) {
        Outcome::Wait(wait) => assert!((wait - 24.0).abs() < 1e-9),
        other => panic!("{:?}", other.map(|_| ())),
    }
    l.advance(24.0);
    assert!(matches!(buffered_fair(&mut buffer, &mut l, SETTINGS, 24.0, 24.0), Outcome::Taken(_)));
}

/// Steps over a list of `(score, tokens)` candidates, with scripted failures.
struct Scripted {
    candidates: Vec<(f64, u64)>,
    taken: Vec<u64>,
    /// Takes that find their winner gone (another thread took it).
    vanish: usize,
    refuse: usize,
    /// The wait of a winner that does not fit (0: everything fits).
    wait: f64,
    /// Tokens available, a winner fitting when its estimate and margin do not exceed them.
    available: f64,
    /// The URGENT reserve and the capacity (`Steps::urgent`).
    urgent: (f64, f64),
    /// Priorities by candidate (2 when not given).
    priorities: Vec<u8>,
    reserved: Vec<u64>,
    released: Vec<u64>,
    evaluated: usize,
}

impl Scripted {
    fn new(candidates: Vec<(f64, u64)>) -> Self {
        Self {
            candidates,
            taken: Vec::new(),
            vanish: 0,
            refuse: 0,
            wait: 0.0,
            available: f64::INFINITY,
            urgent: (0.0, f64::INFINITY),
            priorities: Vec::new(),
            reserved: Vec::new(),
            released: Vec::new(),
            evaluated: 0,
        }
    }
}

impl Steps for Scripted {
    type Taken = u64;
    type Error = CoreError;

    fn budget(&mut self, hold: bool) -> CoreResult<Option<Budget>> {
        // Holding ranks against the capacity: everything competes.
        let available = if hold { 1e9 } else { self.available.min(1e9) };
        Ok(Some(Budget { available, max_tokens: available }))
    }

    fn urgent(&mut self) -> CoreResult<(f64, f64)> {
        Ok(self.urgent)
    }

    fn collect(&mut self, budget: Budget, limit: usize, _by_score: bool) -> CoreResult<Vec<Collected>> {
        let mut sorted: Vec<_> = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(i, &(_, tokens))| {
                !self.taken.contains(&(*i as u64)) && tokens as f64 <= budget.max_tokens
            })
            .collect();
        sorted.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let candidates: Vec<Candidate> = sorted
            .iter()
            .map(|(i, &(score, tokens))| Candidate {
                slot: *i as u32,
                factors: [0.0; 6],
                base: score,
                tokens,
                enqueued_at: 0.0,
                seq: *i as u64,
                priority: self.priorities.get(*i).copied().unwrap_or(2),
                tier: 0,
            })
            .collect();
        Ok(candidates
            .iter()
            .enumerate()
            .take(limit)
            .map(|(i, c)| Collected { candidate: *c, bound_after: candidates.get(i + 1).map(|n| n.base) })
            .collect())
    }

    fn evaluate(&mut self, _i: usize, _candidate: &Candidate) -> CoreResult<Vec<f64>> {
        self.evaluated += 1;
        Ok(vec![1.0])
    }

    fn wait(&mut self, candidate: &Candidate, margin: f64) -> CoreResult<f64> {
        let tokens = candidate.tokens;
        Ok(if tokens as f64 + margin <= self.available { 0.0 } else { self.wait })
    }

    fn reserve(&mut self, candidate: &Candidate) -> CoreResult<Option<ReservationKey>> {
        if self.refuse > 0 {
            self.refuse -= 1;
            return Ok(None);
        }
        self.reserved.push(candidate.seq);
        Ok(Some(ReservationKey(candidate.seq)))
    }

    fn take(&mut self, candidate: &Candidate, _facts: Facts) -> CoreResult<Option<u64>> {
        if self.vanish > 0 {
            self.vanish -= 1;
            self.taken.push(candidate.seq); // someone else has it now
            return Ok(None);
        }
        self.taken.push(candidate.seq);
        Ok(Some(candidate.seq))
    }

    fn release(&mut self, key: ReservationKey) {
        self.released.push(key.0);
    }
}

#[test]
fn a_winner_that_left_gives_its_reservation_back_and_the_next_best_goes() {
    let mut steps = Scripted::new(vec![(0.9, 10), (0.5, 10), (0.1, 10)]);
    steps.vanish = 1;
    let outcome = attempt(&mut steps, &[0.1], 20, SETTINGS).unwrap();
    assert_eq!(outcome, Outcome::Taken((1, Some(ReservationKey(1)))));
    assert_eq!(steps.released, [0]);
}

#[test]
fn a_refused_reservation_starts_over_and_gives_up_after_the_attempts() {
    let mut steps = Scripted::new(vec![(0.9, 10)]);
    steps.refuse = MAX_ATTEMPTS;
    assert_eq!(attempt(&mut steps, &[], 20, SETTINGS).unwrap(), Outcome::Nothing);
    let mut steps = Scripted::new(vec![(0.9, 10)]);
    steps.refuse = 2;
    assert!(matches!(attempt(&mut steps, &[], 20, SETTINGS).unwrap(), Outcome::Taken(_)));
}

#[test]
fn custom_scorers_stop_as_soon_as_nothing_left_can_win() {
    // A custom weight of 0.1 cannot lift 0.5 past 0.9 + 0.1: one evaluation.
    let mut steps = Scripted::new(vec![(0.9, 10), (0.5, 10), (0.4, 10)]);
    attempt(&mut steps, &[0.1], 20, SETTINGS).unwrap();
    assert_eq!(steps.evaluated, 1);
}

#[test]
fn a_held_winner_reserves_nothing() {
    let mut steps = Scripted::new(vec![(0.9, 10)]);
    steps.available = 5.0;
    steps.wait = 3.0;
    assert_eq!(attempt(&mut steps, &[], 20, SETTINGS).unwrap(), Outcome::Wait(3.0));
    steps.wait = f64::INFINITY;
    assert_eq!(attempt(&mut steps, &[], 20, SETTINGS).unwrap(), Outcome::Nothing);
    assert!(steps.reserved.is_empty());
}

#[test]
fn a_stepwise_winner_leaves_the_urgent_reserve() {
    // 120 tokens left, a reserve of 50: the best (100 tokens) would leave too little.
    let candidates = vec![(0.9, 100), (0.5, 40), (0.3, 90)];
    let mut steps = Scripted::new(candidates.clone());
    (steps.available, steps.urgent, steps.wait) = (120.0, (50.0, 1_000.0), 2.0);
    let settings = Settings { hold: false, ..SETTINGS };
    // Without holding: the best of what leaves it.
    assert_eq!(
        attempt(&mut steps, &[0.1], 20, settings).unwrap(),
        Outcome::Taken((1, Some(ReservationKey(1))))
    );
    // Holding: the best is held for (nothing below it goes).
    let mut steps = Scripted::new(candidates.clone());
    (steps.available, steps.urgent, steps.wait) = (120.0, (50.0, 1_000.0), 2.0);
    assert_eq!(attempt(&mut steps, &[], 20, SETTINGS).unwrap(), Outcome::Wait(2.0));
    // An URGENT winner leaves nothing.
    let mut steps = Scripted::new(candidates);
    (steps.available, steps.urgent, steps.priorities) = (120.0, (50.0, 1_000.0), vec![0, 2, 2]);
    assert_eq!(attempt(&mut steps, &[], 20, settings).unwrap(), Outcome::Taken((0, Some(ReservationKey(0)))));
}

#[test]
fn below_the_minimum_score_nothing_goes() {
    let mut steps = Scripted::new(vec![(0.05, 10)]);
    let settings = Settings { min_score: 0.1, ..SETTINGS };
    assert_eq!(attempt(&mut steps, &[], 20, settings).unwrap(), Outcome::Nothing);
}

#[test]
fn the_score_crossing_is_found_by_bisection() {
    // A score rising by 0.01 a second from 0.2 reaches 0.5 at 30 s.
    let crossing =
        time_until_score(|offset| Ok::<_, ()>(Some(0.2 + 0.01 * offset.min(100.0))), 0.0, 0.5).unwrap();
    assert!((crossing.unwrap() - 30.0).abs() < 2e-3);
    assert_eq!(time_until_score(|_| Ok::<_, ()>(Some(0.6)), 0.0, 0.5).unwrap(), Some(0.0));
    assert_eq!(time_until_score(|_| Ok::<_, ()>(Some(0.1)), 0.0, 0.5).unwrap(), None);
    assert_eq!(time_until_score(|_| Ok::<_, ()>(None), 0.0, 0.5).unwrap(), None);
    // Custom weights count in full.
    assert_eq!(time_until_score(|_| Ok::<_, ()>(Some(0.45)), 0.1, 0.5).unwrap(), Some(0.0));
}

#[test]
fn the_fair_choice_over_a_snapshot_is_not_yet_taken() {
    let mut s = store(true);
    s.enqueue(message("a", 2, 100, "t"), 0.0).unwrap();
    let mut runtime = FairRuntime::new(&FairConfig::default(), Some(0.0));
    let snapshot = Snapshot { available_tokens: 50.0, available_requests: 10.0, capacity: 1_000.0 };
    let decision = decide_fair_store(&mut s, &mut runtime, &snapshot, 0.0, true).unwrap();
    assert!(!decision.fits);
    assert_eq!(s.visible_count(), 1);
}

#[test]
fn slots_above_the_capacity_are_found() {
    let mut s = store(false);
    s.enqueue(message("huge", 2, 5_000, "t"), 0.0).unwrap();
    s.enqueue(message("ok", 2, 10, "t"), 0.0).unwrap();
    let slots = slots_above(&s, Capacity::whole(1_000.0));
    assert_eq!(slots.len(), 1);
    assert_eq!(&*s.message(slots[0]).request_id, "huge");
}

#[test]
fn a_request_is_unfittable_by_the_part_its_limit_counts() {
    let capacity = Capacity { whole: 10_000.0, input: 3_000.0, output: 500.0 };
    // Each part within its own limit: fits, though the whole exceeds the input limit.
    assert!(capacity.fits(3_500, Some((3_000, 500))));
    // The input alone, or the output alone, above its limit: never.
    assert!(!capacity.fits(3_001, Some((3_001, 0))));
    assert!(!capacity.fits(1_000, Some((499, 501))));
    // Above the limits counting the whole estimate, whatever the parts.
    assert!(!capacity.fits(10_001, Some((2_000, 8_001))));
    // Without parts the input and output limits count the whole estimate.
    assert!(capacity.fits(500, None));
    assert!(!capacity.fits(501, None));
    assert_eq!(capacity.smallest(), 500.0);
    assert!(Capacity::whole(100.0).fits(100, None));
}

#[test]
fn readiness_is_the_soonest_change() {
    let never = || panic!("no crossing is asked for");
    // Held: until it fits, or something becomes visible sooner.
    assert_eq!(until_ready(Some(5.0), Some(3.0), None, None, never), 3.0);
    assert_eq!(until_ready(Some(5.0), None, Some(2.0), None, never), 2.0);
    // A visibility change past due counts as now.
    assert_eq!(until_ready(None, Some(-1.0), None, None, never), 0.0);
    // The smallest waiting message fits in 4 s; one that never fits waits for nothing.
    assert_eq!(until_ready(None, None, None, Some(4.0), never), 4.0);
    assert_eq!(until_ready(None, None, None, Some(f64::INFINITY), never), f64::INFINITY);
    // It fits now but scored too low: until the score crosses, or a re-check when it has.
    assert_eq!(until_ready(None, None, None, Some(0.0), || Some(7.5)), 7.5);
    assert_eq!(until_ready(None, None, None, Some(0.0), || Some(0.0)), CUSTOM_RECHECK);
    assert_eq!(until_ready(None, None, None, Some(0.0), || None), f64::INFINITY);
    assert_eq!(until_ready(None, None, None, None, never), f64::INFINITY);
}

#[test]
fn an_unfittable_request_is_reported_once_until_taken() {
    let mut unfittable = Unfittable::default();
    assert_eq!(unfittable.observe(Capacity::whole(100.0), ["a", "b"]), [Box::from("a"), Box::from("b")]);
    assert!(unfittable.observe(Capacity::whole(100.0), ["a", "b"]).is_empty());
    assert_eq!(unfittable.capacity(), Some(Capacity::whole(100.0)));
    unfittable.taken(["a"]);
    assert_eq!(unfittable.observe(Capacity::whole(90.0), ["a"]), [Box::from("a")]);
}

#[test]
fn an_input_part_keeps_both_parts_in_eight_bytes() {
    assert_eq!(std::mem::size_of::<InputPart>(), 8);
    // A pointer payload with its input part: the parts cost a stored message 8 bytes.
    assert_eq!(std::mem::size_of::<(usize, InputPart)>(), 16);
    let part = InputPart::of(Some((1_000, 200)));
    assert_eq!(part.parts(1_200), Some((1_000, 200)));
    assert_eq!(InputPart::of(Some((0, 0))).parts(0), Some((0, 0)));
    assert_eq!(InputPart::of(Some((5, 0))).parts(5), Some((5, 0)));
    assert_eq!(InputPart::of(None), InputPart::NONE);
    assert_eq!(InputPart::NONE.parts(1_200), None);
    let largest = InputPart::of(Some((u64::MAX - 1, 1)));
    assert_eq!(largest.parts(u64::MAX), Some((u64::MAX - 1, 1)));
    // A saturated input part (so a saturated estimate) is the estimate alone.
    assert_eq!(InputPart::of(Some((u64::MAX, 0))).parts(u64::MAX), None);
}
