//! The limits beyond requests and tokens per minute: input and output tokens per minute, per day,
//! and requests in flight.

use super::*;
use crate::policy::{ranking_budget, throttle_budget};
use proptest::prelude::*;

fn config(strategy: AdjustmentFailureStrategy) -> ThrottleConfig {
    ThrottleConfig {
        rpm: 600.0,
        tpm: 60_000.0,
        burst_rpm: None,
        burst_tpm: None,
        adjustment_failure_strategy: strategy,
        max_history_records: 10_000,
        history_retention: 60.0,
        efficiency_window_size: 50,
    }
}

/// 1,000 tokens a second, of which 600 input (itpm) and 300 output (otpm).
fn anthropic(strategy: AdjustmentFailureStrategy) -> Throttle<()> {
    let limits = ExtraLimits { itpm: Some(36_000.0), otpm: Some(18_000.0), ..ExtraLimits::default() };
    Throttle::with_limits(config(strategy), limits, 0.0).unwrap()
}

fn level(t: &Throttle<()>, dimension: Dimension) -> f64 {
    t.meter(dimension).unwrap().bucket().available()
}

#[test]
fn each_part_is_taken_from_its_own_limit_and_the_total_from_tpm() {
    let mut t = anthropic(AdjustmentFailureStrategy::Warn);
    assert!(t.try_consume_parts(0.0, "a", 20_000, Some((15_000, 5_000)), ()).is_ok());
    assert_eq!(level(&t, Dimension::Tpm), 40_000.0);
    assert_eq!(level(&t, Dimension::Itpm), 21_000.0);
    assert_eq!(level(&t, Dimension::Otpm), 13_000.0);
    assert_eq!(t.history().next().unwrap().parts(), Some((15_000, 5_000)));
    // 14,000 output tokens: 1,000 short at 300 a second.
    let check = t.check_parts(15_000, Some((1_000, 14_000)), 0.0);
    assert_eq!(check.reason, Some("otpm_limit"));
    assert!((check.available_in - 1_000.0 / 300.0).abs() < 1e-9);
    assert_eq!(check.available_extra.unwrap()[..2], [Some(21_000.0), Some(13_000.0)]);
    assert!(t.try_consume_parts(0.0, "b", 15_000, Some((1_000, 14_000)), ()).is_err());
    t.advance(check.available_in);
    assert!(t.try_consume_parts(check.available_in, "b", 15_000, Some((1_000, 14_000)), ()).is_ok());
}

#[test]
fn without_its_parts_an_estimate_counts_whole_against_each_part_limit() {
    let mut t = anthropic(AdjustmentFailureStrategy::Warn);
    assert!(t.consume(0.0, "a", 10_000, ()));
    assert_eq!(level(&t, Dimension::Itpm), 26_000.0);
    assert_eq!(level(&t, Dimension::Otpm), 8_000.0);
    // Whole against otpm: 9,000 does not fit the 8,000 left, though input and total would.
    assert_eq!(t.check(9_000).reason, Some("otpm_limit"));
    assert!(t.check_parts(9_000, Some((9_000, 0)), 0.0).allowed);
    // The largest estimate without parts that ever fits is the smallest capacity.
    assert_eq!(t.token_capacity(), 18_000.0);
    assert!(t.check(18_001).available_in.is_infinite());
    assert!(t.check_parts(18_001, Some((18_001, 0)), 0.0).available_in.is_finite());
    assert_eq!(t.token_rate(), 300.0);
}

#[test]
fn an_adjustment_moves_each_limit_to_its_actual_part_and_settles_the_slot() {
    let limits = ExtraLimits {
        itpm: Some(36_000.0),
        otpm: Some(18_000.0),
        max_concurrent: Some(1),
        ..ExtraLimits::default()
    };
    let mut t: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 0.0).unwrap();
    assert!(t.try_consume_parts(0.0, "a", 6_000, Some((2_000, 4_000)), ()).is_ok());
    assert_eq!(t.slots().unwrap().in_flight(), 1);
    assert_eq!(t.check(1).reason, Some("concurrency_limit"));
    t.adjust_parts("a", 3_000, Some((2_500, 500))).unwrap();
    assert_eq!(t.slots().unwrap().in_flight(), 0);
    assert_eq!(level(&t, Dimension::Tpm), 57_000.0);
    assert_eq!(level(&t, Dimension::Itpm), 33_500.0);
    assert_eq!(level(&t, Dimension::Otpm), 17_500.0);
    // A second adjustment corrects again, and frees nothing more.
    t.adjust_parts("a", 3_000, Some((3_000, 0))).unwrap();
    assert_eq!(level(&t, Dimension::Itpm), 33_000.0);
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0);
    assert!(t.validate_state(0.0));
}

#[test]
fn an_adjustment_without_parts_counts_it_all_as_input_and_as_output_up_to_what_was_reserved() {
    let mut t = anthropic(AdjustmentFailureStrategy::Warn);
    assert!(t.try_consume_parts(0.0, "a", 6_000, Some((5_000, 1_000)), ()).is_ok());
    t.adjust("a", 5_500).unwrap();
    assert_eq!(level(&t, Dimension::Itpm), 36_000.0 - 5_500.0);
    // The provider stops at the reserved 1,000 output tokens.
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0 - 1_000.0);
    assert_eq!(t.history().next().unwrap().parts(), None);
    // Reserved without parts: output is bounded by nothing but the actual count.
    assert!(t.consume(0.0, "b", 1_000, ()));
    t.adjust("b", 2_000).unwrap();
    assert_eq!(level(&t, Dimension::Otpm), 17_000.0 - 2_000.0);
}

#[test]
fn strict_refuses_when_any_limit_is_short_names_the_longest_wait_and_changes_nothing() {
    let mut t = anthropic(AdjustmentFailureStrategy::Strict);
    assert!(t.try_consume_parts(0.0, "a", 17_000, Some((1_000, 16_000)), ()).is_ok());
    let before = (level(&t, Dimension::Tpm), level(&t, Dimension::Itpm), level(&t, Dimension::Otpm));
    // 3,000 more output tokens: otpm holds 2,000, 1,000 short at 300 a second.
    match t.adjust_parts("a", 20_000, Some((1_000, 19_000))) {
        Err(CoreError::RateLimit { reason, available_in }) => {
            assert_eq!(reason, "otpm_limit");
            assert!((available_in - 1_000.0 / 300.0).abs() < 1e-9);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(before, (level(&t, Dimension::Tpm), level(&t, Dimension::Itpm), level(&t, Dimension::Otpm)));
    assert_eq!(t.history().next().unwrap().tokens, 17_000);
}

#[test]
fn compensate_keeps_a_debt_for_each_limit() {
    let mut t = anthropic(AdjustmentFailureStrategy::Compensate);
    assert!(t.try_consume_parts(0.0, "a", 18_000, Some((0, 18_000)), ()).is_ok());
    let outcomes = t.adjust_parts("a", 20_000, Some((0, 20_000))).unwrap();
    assert_eq!(
        outcomes,
        vec![(Dimension::Otpm, Adjustment::Compensated { shortfall: 2_000.0, total_debt: 2_000.0 })]
    );
    assert_eq!(t.meter(Dimension::Otpm).unwrap().debt(), 2_000.0);
    assert_eq!(t.debt(), 0.0);
    // The next grant pays the output debt on top of its output part, and only there.
    t.advance(60.0);
    assert!(t.try_consume_parts(60.0, "b", 1_000, Some((500, 500)), ()).is_ok());
    assert_eq!(t.meter(Dimension::Otpm).unwrap().debt(), 0.0);
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0 - 2_500.0);
    assert_eq!(level(&t, Dimension::Itpm), 36_000.0 - 500.0);
    // Its release owes the debt it paid again.
    t.release("b").unwrap();
    assert_eq!(t.meter(Dimension::Otpm).unwrap().debt(), 2_000.0);
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0);
}

#[test]
fn daily_limits_hold_a_day_and_refill_over_it() {
    let limits = ExtraLimits { rpd: Some(2.0), tpd: Some(86_400.0), ..ExtraLimits::default() };
    let mut t: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 0.0).unwrap();
    assert!(t.consume(0.0, "a", 50_000, ()));
    assert!(t.consume(0.0, "b", 10, ()));
    let check = t.check(10);
    assert_eq!(check.reason, Some("rpd_limit"));
    assert!((check.available_in - DAY / 2.0).abs() < 1e-6);
    t.advance(30.0);
    // 36,420 tokens of the day are left, one a second coming back, and no request of the day:
    // the daily request limit binds. Released, "b" gives back a request and 10 tokens.
    let check = t.check(36_440);
    assert_eq!(check.reason, Some("rpd_limit"));
    t.release("b").unwrap();
    let check = t.check(36_440);
    assert_eq!(check.reason, Some("tpd_limit"));
    assert!((check.available_in - 10.0).abs() < 1e-6);
}

#[test]
fn a_slot_is_held_until_settled_released_or_forgotten_and_its_wait_is_exact() {
    let limits = ExtraLimits { max_concurrent: Some(2), ..ExtraLimits::default() };
    let mut t: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 1.7e9).unwrap();
    let start = 1.7e9;
    assert!(t.consume(start, "a", 1, ()));
    t.advance(start + 0.3);
    assert!(t.consume(start + 0.3, "b", 1, ()));
    let check = t.check(1);
    assert_eq!((check.allowed, check.reason), (false, Some("concurrency_limit")));
    assert_eq!(check.available_extra.unwrap()[4], Some(0.0));
    // Until "a" is forgotten, history_retention after it was made, unless one is settled first.
    let wait = check.available_in;
    assert!((wait - 59.7).abs() < 1e-6);
    let mut early = t.clone();
    early.advance(start + 0.3 + (wait - 1e-6));
    assert!(!early.consume(early.now(), "c", 1, ()));
    t.advance(start + 0.3 + wait);
    assert!(t.check(1).allowed);
    assert!(t.consume(t.now(), "c", 1, ()));
    // A release frees its slot; so does an adjustment, and a settle (its tokens kept).
    t.release("c").unwrap();
    assert_eq!(t.slots().unwrap().in_flight(), 1);
    assert!(t.consume(t.now(), "d", 1, ()));
    t.adjust("d", 1).unwrap();
    assert_eq!(t.slots().unwrap().in_flight(), 1);
    assert!(t.consume(t.now(), "e", 7, ()));
    let level = t.tokens().available();
    t.settle("e").unwrap();
    t.settle("e").unwrap();
    assert_eq!(t.slots().unwrap().in_flight(), 1);
    assert_eq!(t.tokens().available(), level);
    assert!(matches!(t.settle("nobody"), Err(CoreError::UnknownRequest(_))));
    assert!(t.validate_state(t.now()));
    t.reset(t.now());
    assert_eq!(t.slots().unwrap().in_flight(), 0);
}

#[test]
fn the_reason_names_the_limit_with_the_longest_wait_and_ties_go_in_order() {
    let limits = ExtraLimits { itpm: Some(600.0), otpm: Some(600.0), ..ExtraLimits::default() };
    let mut config = config(AdjustmentFailureStrategy::Warn);
    config.rpm = 60.0;
    let mut t: Throttle<()> = Throttle::with_limits(config, limits, 0.0).unwrap();
    assert!(t.consume(0.0, "a", 600, ()));
    for _ in 0..59 {
        assert!(t.consume(0.0, "x", 0, ()));
    }
    // The request bucket frees one in 1 s; the input bucket 100 tokens in 10 s: itpm binds.
    let check = t.check_parts(100, Some((100, 0)), 0.0);
    assert_eq!(check.reason, Some("itpm_limit"));
    assert_eq!(check.available_in, 10.0);
    // Input and output equally short: the input limit is named.
    let check = t.check_parts(200, Some((100, 100)), 0.0);
    assert_eq!((check.reason, check.available_in), (Some("itpm_limit"), 10.0));
    // A short wait on the request bucket alone is the request limit.
    assert_eq!(t.check_parts(0, None, 0.0).reason, Some("rpm_limit"));
}

#[test]
fn parts_add_up_to_the_total_or_one_leaves_the_rest_to_the_other() {
    let names = ["estimated_tokens", "input_tokens", "output_tokens"];
    assert_eq!(split_parts(10, None, None, names), Ok(None));
    assert_eq!(split_parts(10, Some(4), Some(6), names), Ok(Some((4, 6))));
    assert_eq!(split_parts(10, Some(4), None, names), Ok(Some((4, 6))));
    assert_eq!(split_parts(10, None, Some(4), names), Ok(Some((6, 4))));
    for (input, output) in [(Some(4), Some(5)), (Some(11), None), (None, Some(11)), (Some(u64::MAX), Some(1))]
    {
        let error = split_parts(10, input, output, names).unwrap_err();
        assert!(
            matches!(&error, CoreError::InvalidRequest(m) if m.contains("input_tokens") || m.contains("output_tokens"))
        );
    }
}

#[test]
fn a_header_lowers_a_part_limit_and_refill_raises_it_at_its_own_rate_before_the_reset() {
    let mut t = anthropic(AdjustmentFailureStrategy::Warn);
    t.cap_limits(&[(Dimension::Otpm, (1_000.0, Some(60.0))), (Dimension::Itpm, (30_000.0, None))]).unwrap();
    assert_eq!(level(&t, Dimension::Otpm), 1_000.0);
    assert_eq!(level(&t, Dimension::Itpm), 30_000.0);
    assert!(t.try_consume_parts(0.0, "a", 600, Some((0, 600)), ()).is_ok());
    // Long before the reset, the bucket refills at its own rate (300 a second) from 400.
    assert_eq!(t.check_parts(1_000, Some((0, 1_000)), 0.0).available_in, 2.0);
    t.advance(2.0);
    assert_eq!(level(&t, Dimension::Otpm), 400.0 + 2.0 * 300.0);
    t.advance(600.0);
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0);
    assert_eq!(level(&t, Dimension::Itpm), 36_000.0);
    // A figure for a limit this throttle does not keep is ignored; a bad one changes nothing.
    let mut plain: Throttle<()> = Throttle::new(config(AdjustmentFailureStrategy::Warn), 0.0).unwrap();
    assert_eq!(plain.cap_limits(&[(Dimension::Itpm, (5.0, None))]), Ok(None));
    assert!(t.cap_limits(&[(Dimension::Otpm, (5.0, None)), (Dimension::Itpm, (f64::NAN, None))]).is_err());
    assert_eq!(level(&t, Dimension::Otpm), 18_000.0);
}

#[test]
fn a_limit_that_can_never_admit_a_request_is_refused_naming_it() {
    let cases = [
        (ExtraLimits { itpm: Some(0.5), ..ExtraLimits::default() }, "itpm must be >= 1"),
        (
            ExtraLimits { itpm: Some(10.0), burst_itpm: Some(5.0), ..ExtraLimits::default() },
            "burst_itpm must be",
        ),
        (
            ExtraLimits { otpm: Some(0.5), burst_otpm: Some(0.75), ..ExtraLimits::default() },
            "burst_otpm must be >= 1",
        ),
        (ExtraLimits { burst_otpm: Some(5.0), ..ExtraLimits::default() }, "burst_otpm is the capacity"),
        (ExtraLimits { rpd: Some(0.5), ..ExtraLimits::default() }, "rpd must be >= 1"),
        (ExtraLimits { tpd: Some(f64::NAN), ..ExtraLimits::default() }, "tpd must be a finite number > 0"),
        (ExtraLimits { tpd: Some(-1.0), ..ExtraLimits::default() }, "tpd must be a finite number > 0"),
        (ExtraLimits { max_concurrent: Some(0), ..ExtraLimits::default() }, "max_concurrent must be >= 1"),
    ];
    for (limits, message) in cases {
        match Throttle::<()>::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 0.0) {
            Err(CoreError::InvalidConfig(m)) => assert!(m.starts_with(message), "{m}"),
            other => panic!("{message}: {:?}", other.map(|_| ())),
        }
    }
    // Less than one input token a minute is fine when the bucket holds one.
    let limits = ExtraLimits { itpm: Some(0.5), burst_itpm: Some(1.0), ..ExtraLimits::default() };
    assert!(Throttle::<()>::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 0.0).is_ok());
}

#[test]
fn a_snapshot_carries_every_bucket_and_debt_and_must_match_the_limits() {
    let limits = ExtraLimits { otpm: Some(18_000.0), rpd: Some(100.0), ..ExtraLimits::default() };
    let mut t: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Compensate), limits.clone(), 0.0).unwrap();
    assert!(t.try_consume_parts(0.0, "a", 18_000, Some((0, 18_000)), ()).is_ok());
    t.adjust_parts("a", 19_000, Some((0, 19_000))).unwrap();
    let snapshot = t.snapshot(0.0);
    let otpm = extra_index(Dimension::Otpm).unwrap();
    assert_eq!(snapshot.extra[otpm].unwrap().debt, 1_000.0);
    let mut other: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Compensate), limits, 500.0).unwrap();
    other.restore(&snapshot).unwrap();
    assert_eq!(other.meter(Dimension::Otpm).unwrap().debt(), 1_000.0);
    assert_eq!(other.meter(Dimension::Otpm).unwrap().bucket().available(), 0.0);
    assert_eq!(other.daily_requests().unwrap().available(), 99.0);
    // A throttle without those limits refuses it, and one with them refuses a snapshot without.
    let mut plain: Throttle<()> = Throttle::new(config(AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
    assert!(matches!(plain.restore(&snapshot), Err(CoreError::InvalidRequest(m)) if m.contains("otpm")));
    let bare = plain.snapshot(0.0);
    assert!(matches!(other.restore(&bare), Err(CoreError::InvalidRequest(m)) if m.contains("otpm")));
    assert_eq!(other.meter(Dimension::Otpm).unwrap().debt(), 1_000.0);
}

#[test]
fn the_dispatch_budget_sees_every_limit() {
    let limits = ExtraLimits { otpm: Some(18_000.0), max_concurrent: Some(1), ..ExtraLimits::default() };
    let mut t: Throttle<()> =
        Throttle::with_limits(config(AdjustmentFailureStrategy::Warn), limits, 0.0).unwrap();
    // Ranked against the smallest capacity; admitted up to the smallest room.
    assert_eq!(ranking_budget(&t, true).unwrap().max_tokens, 18_000.0);
    assert!(t.try_consume_parts(0.0, "a", 1_000, Some((0, 1_000)), ()).is_ok());
    // No slot free: no request at all.
    assert!(throttle_budget(&t).is_none());
    t.adjust("a", 1_000).unwrap();
    let budget = throttle_budget(&t).unwrap();
    assert_eq!((budget.available, budget.max_tokens), (59_000.0, 17_000.0));
}

#[derive(Debug, Clone)]
enum Op {
    Consume(u64, Option<u64>),
    Adjust(usize, u64, Option<u64>),
    Release(usize),
    Settle(usize),
    Cap(Dimension, f64, Option<f64>),
    Advance(f64),
}

fn op() -> impl Strategy<Value = Op> {
    let input = proptest::option::of(0u64..3_000);
    prop_oneof![
        4 => (0u64..3_000, input.clone()).prop_map(|(tokens, input)| Op::Consume(tokens, input)),
        2 => (0usize..20, 0u64..4_000, input).prop_map(|(i, actual, input)| Op::Adjust(i, actual, input)),
        1 => (0usize..20).prop_map(Op::Release),
        1 => (0usize..20).prop_map(Op::Settle),
        1 => (prop::sample::select(vec![Dimension::Itpm, Dimension::Otpm]), 0.0f64..2_000.0,
              proptest::option::of(0.0f64..40.0)).prop_map(|(d, r, s)| Op::Cap(d, r, s)),
        3 => (0.0f64..20.0).prop_map(Op::Advance),
    ]
}

/// `input` as a part of `total`, the rest output.
fn split(total: u64, input: Option<u64>) -> Option<(u64, u64)> {
    input.map(|input| (input.min(total), total - input.min(total)))
}

proptest! {
    // Over every limit: net tokens (or requests) taken from each bucket in any window [a, b]
    // never exceed its capacity + rate · (b − a); requests in flight never exceed
    // max_concurrent and are exactly the grants not yet settled, released or forgotten; every
    // bucket stays within [0, capacity].
    #[test]
    fn every_limit_holds_within_any_window(
        ops in proptest::collection::vec(op(), 1..120),
        strategy in prop::sample::select(vec![
            AdjustmentFailureStrategy::Strict,
            AdjustmentFailureStrategy::Warn,
            AdjustmentFailureStrategy::Compensate,
        ]),
    ) {
        let limits = ExtraLimits {
            itpm: Some(2_400.0),
            burst_itpm: Some(3_000.0),
            otpm: Some(1_200.0),
            rpd: Some(40.0),
            tpd: Some(200_000.0),
            max_concurrent: Some(3),
            ..ExtraLimits::default()
        };
        let mut config = config(strategy);
        config.rpm = 30.0;
        config.tpm = 3_000.0;
        let mut t: Throttle<()> = Throttle::with_limits(config, limits, 0.0).unwrap();
        let dimensions = [Dimension::Tpm, Dimension::Itpm, Dimension::Otpm, Dimension::Tpd];
        let bounds = [(3_000.0, 50.0), (3_000.0, 40.0), (1_200.0, 20.0), (200_000.0, 200_000.0 / DAY),
            (30.0, 0.5), (40.0, 40.0 / DAY)];
        let mut now = 0.0;
        let mut ids = Vec::new();
        // (instant, net taken from each bucket: tpm, itpm, otpm, tpd, rpm, rpd)
        let mut events: Vec<(f64, [f64; 6])> = Vec::new();
        for op in ops {
            t.advance(now);
            let levels = |t: &Throttle<()>| {
                let mut out = [0.0; 6];
                for (slot, dimension) in out.iter_mut().zip(dimensions) {
                    *slot = t.meter(dimension).unwrap().bucket().available();
                }
                out[4] = t.requests().available();
                out[5] = t.daily_requests().unwrap().available();
                out
            };
            let before = levels(&t);
            match op.clone() {
                Op::Consume(tokens, input) => {
                    let id = format!("r{}", ids.len());
                    let in_flight = t.slots().unwrap().in_flight();
                    if t.try_consume_parts(now, &id, tokens, split(tokens, input), ()).is_ok() {
                        prop_assert!(in_flight < 3, "granted with every slot held");
                        ids.push(id);
                    }
                }
                Op::Adjust(i, actual, input) => {
                    if let Some(id) = ids.get(i) {
                        let _ = t.adjust_parts(id, actual, split(actual, input));
                    }
                }
                Op::Release(i) => {
                    if let Some(id) = ids.get(i) {
                        let _ = t.release(id);
                    }
                }
                Op::Settle(i) => {
                    if let Some(id) = ids.get(i) {
                        let _ = t.settle(id);
                    }
                }
                Op::Cap(dimension, remaining, reset) => {
                    t.cap_limits(&[(dimension, (remaining, reset))]).unwrap();
                }
                Op::Advance(dt) => now += dt,
            }
            t.advance(now);
            if !matches!(op, Op::Cap(..)) {
                let after = levels(&t);
                let mut taken = [0.0; 6];
                for i in 0..6 {
                    taken[i] = before[i] - after[i];
                }
                if taken.iter().any(|&x| x != 0.0) {
                    events.push((now, taken));
                }
            }
            let slots = t.slots().unwrap();
            prop_assert!(slots.in_flight() <= 3);
            prop_assert_eq!(slots.in_flight() as usize, t.history().filter(|r| r.holds_slot).count());
            prop_assert!(t.validate_state(now));
        }
        for (i, &(start, _)) in events.iter().enumerate() {
            let mut totals = [0.0; 6];
            for &(at, taken) in &events[i..] {
                for (total, x) in totals.iter_mut().zip(taken) {
                    *total += x;
                }
                for (total, (capacity, rate)) in totals.iter().zip(bounds) {
                    prop_assert!(*total <= capacity + rate * (at - start) + 1e-6);
                }
            }
        }
    }
}
