use super::*;
use proptest::prelude::*;

fn config(rpm: f64, tpm: f64, strategy: AdjustmentFailureStrategy) -> ThrottleConfig {
    ThrottleConfig {
        rpm,
        tpm,
        burst_rpm: None,
        burst_tpm: None,
        adjustment_failure_strategy: strategy,
        max_history_records: 10_000,
        history_retention: 60.0,
        efficiency_window_size: 50,
    }
}

fn throttle(rpm: f64, tpm: f64) -> Throttle<()> {
    Throttle::new(config(rpm, tpm, AdjustmentFailureStrategy::Warn), 0.0).unwrap()
}

#[test]
fn starts_full_and_refuses_past_the_budget() {
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 600, ()));
    assert!(!t.consume(0.0, "b", 600, ()));
    let check = t.check(600);
    assert_eq!(check.reason, Some("tpm_limit"));
    // 200 tokens short at 1000/60 tokens per second.
    assert!((check.available_in - 12.0).abs() < 1e-9);
    t.advance(check.available_in);
    assert!(t.check(600).allowed);
    assert!(t.consume(12.0, "b", 600, ()));
}

#[test]
fn available_in_is_infinite_past_the_capacity_and_takes_the_longer_wait() {
    let mut t = throttle(1.0, 1000.0);
    assert!(t.check(1001).available_in.is_infinite());
    assert!(t.consume(0.0, "a", 900, ()));
    let check = t.check(500);
    assert_eq!(check.reason, Some("rpm_limit"));
    // One request per minute: 60 s for the request bucket, 24 s for the tokens.
    assert!((check.available_in - 60.0).abs() < 1e-9);
}

#[test]
fn adjust_refunds_and_takes_extra_and_rejects_unknown_ids() {
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 500, ()));
    t.adjust("a", 200).unwrap();
    assert!((t.tokens().available() - 800.0).abs() < 1e-9);
    t.adjust("a", 700).unwrap();
    assert!((t.tokens().available() - 300.0).abs() < 1e-9);
    assert!(matches!(t.adjust("zzz", 1), Err(CoreError::UnknownRequest(_))));
}

#[test]
fn strategies_on_a_short_bucket() {
    for strategy in [
        AdjustmentFailureStrategy::Strict,
        AdjustmentFailureStrategy::Warn,
        AdjustmentFailureStrategy::Compensate,
    ] {
        let mut t: Throttle<()> = Throttle::new(config(60.0, 1000.0, strategy), 0.0).unwrap();
        assert!(t.consume(0.0, "a", 900, ()));
        let result = t.adjust("a", 1300);
        match strategy {
            AdjustmentFailureStrategy::Strict => {
                assert!(matches!(result, Err(CoreError::RateLimit { reason: "tpm_limit", .. })));
                assert!((t.tokens().available() - 100.0).abs() < 1e-9);
                assert_eq!(t.history().next().unwrap().tokens, 900);
            }
            AdjustmentFailureStrategy::Warn => {
                assert_eq!(result.unwrap(), Adjustment::Warned { shortfall: 300.0 });
                assert_eq!(t.tokens().available(), 0.0);
                assert_eq!(t.debt(), 0.0);
            }
            AdjustmentFailureStrategy::Compensate => {
                assert_eq!(result.unwrap(), Adjustment::Compensated { shortfall: 300.0, total_debt: 300.0 });
                t.advance(60.0);
                assert!(t.consume(60.0, "b", 100, ()));
                assert_eq!(t.debt(), 0.0);
                assert!((t.tokens().available() - 600.0).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn history_expires_and_is_capped() {
    let mut c = config(1e6, 1e9, AdjustmentFailureStrategy::Warn);
    c.max_history_records = 3;
    let mut t: Throttle<()> = Throttle::new(c, 0.0).unwrap();
    for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
        assert!(t.consume(i as f64, id, 1, ()));
    }
    assert_eq!(t.history_len(), 3);
    assert!(matches!(t.adjust("a", 2), Err(CoreError::UnknownRequest(_))));
    t.advance(62.5);
    assert_eq!(t.history().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), vec!["d"]);
    assert!(t.adjust("d", 2).is_ok());
}

#[test]
fn a_debt_of_a_full_bucket_does_not_block_forever() {
    let mut t: Throttle<()> =
        Throttle::new(config(60.0, 1000.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
    assert!(t.consume(0.0, "a", 1000, ()));
    t.adjust("a", 3000).unwrap();
    assert_eq!(t.debt(), 1000.0); // 2000 short: one full bucket owed
    let check = t.check(10);
    assert!((check.available_in - 60.0).abs() < 1e-9);
    t.advance(check.available_in);
    // A full bucket is enough; the rest of the debt carries over.
    assert!(t.consume(check.available_in, "b", 10, ()));
    assert!((t.debt() - 10.0).abs() < 1e-6);
}

#[test]
fn restore_checks_the_whole_snapshot_first() {
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 400, ()));
    let snapshot = t.snapshot(0.0);
    let mut bad = snapshot;
    bad.tpm.available = 5000.0;
    t.reset(0.0);
    assert!(t.restore(&bad).is_err());
    assert_eq!(t.tokens().available(), 1000.0);
    t.restore(&snapshot).unwrap();
    assert_eq!(t.tokens().available(), 600.0);
    assert_eq!(t.history_len(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Consume(u64),
    Adjust(usize, u64),
    Release(usize),
    Penalize(f64),
    Cap(f64, Option<f64>),
    Advance(f64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..1500).prop_map(Op::Consume),
        2 => (0usize..20, 0u64..2000).prop_map(|(i, a)| Op::Adjust(i, a)),
        1 => (0usize..20).prop_map(Op::Release),
        1 => (0.0f64..30.0).prop_map(Op::Penalize),
        1 => (0.0f64..1500.0, proptest::option::of(0.0f64..40.0)).prop_map(|(r, s)| Op::Cap(r, s)),
        3 => (0.0f64..20.0).prop_map(Op::Advance),
    ]
}

proptest! {
    // Net tokens taken (consumes + adjustment extras − refunds − releases) in any window
    // [a, b] never exceed burst + rate · (b − a); requests likewise; buckets stay within
    // [0, capacity]; nothing is granted during a penalty; a provider's figure lowers the token
    // bucket at once, and from there it refills at its own rate whatever the reset.
    #[test]
    fn grants_within_any_window_respect_the_bucket(ops in proptest::collection::vec(op(), 1..120)) {
        let mut t: Throttle<()> =
            Throttle::new(config(30.0, 1200.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
        let mut now = 0.0;
        let mut ids = Vec::new();
        // (instant, net tokens, net requests)
        let mut events: Vec<(f64, f64, f64)> = Vec::new();
        for op in ops {
            t.advance(now);
            let (tokens_before, requests_before) = (t.tokens().available(), t.requests().available());
            match op.clone() {
                Op::Consume(tokens) => {
                    let penalized = t.penalty_left() > 0.0;
                    let id = format!("r{}", ids.len());
                    if t.consume(now, &id, tokens, ()) {
                        prop_assert!(!penalized, "granted during a penalty");
                        ids.push(id);
                    }
                }
                Op::Adjust(i, actual) => {
                    if let Some(id) = ids.get(i) {
                        let _ = t.adjust(id, actual);
                    }
                }
                Op::Release(i) => {
                    if let Some(id) = ids.get(i) {
                        let _ = t.release(id);
                    }
                }
                Op::Penalize(seconds) => {
                    t.penalize(seconds).unwrap();
                }
                Op::Cap(remaining, reset) => {
                    t.cap(None, Some((remaining, reset))).unwrap();
                    prop_assert!(t.tokens().available() <= remaining);
                    // Refill raises it again at its own rate (20 tokens a second), before any reset.
                    let mut later = t.tokens().clone();
                    later.refill(now + 1.0);
                    let expected = (t.tokens().available() + 20.0).min(1200.0);
                    prop_assert!((later.available() - expected).abs() < 1e-6);
                }
                Op::Advance(dt) => now += dt,
            }
            // A provider's cut is not a grant.
            let taken = if matches!(op, Op::Cap(..)) { 0.0 } else { tokens_before - t.tokens().available() };
            if taken != 0.0 || requests_before != t.requests().available() {
                events.push((now, taken, requests_before - t.requests().available()));
            }
            t.advance(now);
            prop_assert!(t.validate_state(now));
        }
        // The running totals agree with a recount of the history.
        let stats = t.history_statistics();
        let recount: u64 = t.history().map(|r| r.tokens).sum();
        let adjusted: Vec<f64> = t.history()
            .filter_map(|r| r.actual_tokens.map(|a| estimation_accuracy(r.estimated_tokens, a)))
            .collect();
        prop_assert_eq!(stats.total_tokens, recount);
        prop_assert_eq!(stats.count, t.history_len());
        let expected = if adjusted.is_empty() { 1.0 } else { adjusted.iter().sum::<f64>() / adjusted.len() as f64 };
        prop_assert!((stats.estimation_accuracy - expected).abs() < 1e-9);
        for (i, &(start, _, _)) in events.iter().enumerate() {
            let (mut tokens, mut requests) = (0.0, 0.0);
            for &(at, net, reqs) in &events[i..] {
                tokens += net;
                requests += reqs;
                let window = at - start;
                prop_assert!(tokens <= 1200.0 + 20.0 * window + 1e-6);
                prop_assert!(requests <= 30.0 + 0.5 * window + 1e-6);
            }
        }
    }
}

#[test]
fn release_after_an_unpaid_adjustment_gives_back_only_what_was_taken() {
    for strategy in [AdjustmentFailureStrategy::Warn, AdjustmentFailureStrategy::Compensate] {
        let mut t: Throttle<()> = Throttle::new(config(60.0, 1000.0, strategy), 0.0).unwrap();
        assert!(t.consume(0.0, "x", 300, ()));
        assert!(t.consume(0.0, "a", 500, ()));
        t.adjust("a", 1500).unwrap(); // 200 more taken, 800 unpaid
        assert!(t.tokens().available().abs() < 1e-9);
        t.release("a").unwrap();
        // As if it never happened: "x" still holds its 300, no debt.
        assert!((t.tokens().available() - 700.0).abs() < 1e-9, "{strategy:?}");
        assert_eq!(t.debt(), 0.0, "{strategy:?}");
    }
}

#[test]
fn an_unpaid_adjustment_whose_debt_another_consume_paid_is_refunded_as_tokens() {
    let strategy = AdjustmentFailureStrategy::Compensate;
    for release in [true, false] {
        let mut t: Throttle<()> = Throttle::new(config(60.0, 1000.0, strategy), 0.0).unwrap();
        assert!(t.consume(0.0, "x", 300, ()));
        assert!(t.consume(0.0, "a", 200, ()));
        t.adjust("a", 1200).unwrap(); // 500 taken, 500 owed
        assert_eq!(t.debt(), 500.0);
        t.advance(30.0); // 500 refilled
        assert!(t.consume(30.0, "b", 0, ())); // pays the 500 owed
        assert_eq!(t.debt(), 0.0);
        assert!(t.tokens().available().abs() < 1e-9);
        if release {
            t.release("a").unwrap(); // charged 1200 in all: all of it back
            assert!((t.tokens().available() - 1000.0).abs() < 1e-9);
        } else {
            t.adjust("a", 200).unwrap(); // 1000 lower: all of it back
            assert!((t.tokens().available() - 1000.0).abs() < 1e-9);
        }
        assert_eq!(t.debt(), 0.0);
    }
}

#[test]
fn a_lower_second_adjustment_forgives_the_unpaid_part_first() {
    for strategy in [AdjustmentFailureStrategy::Warn, AdjustmentFailureStrategy::Compensate] {
        let mut t: Throttle<()> = Throttle::new(config(60.0, 1000.0, strategy), 0.0).unwrap();
        assert!(t.consume(0.0, "x", 300, ()));
        assert!(t.consume(0.0, "a", 500, ()));
        t.adjust("a", 1500).unwrap(); // 200 more taken, 800 unpaid
        t.adjust("a", 600).unwrap(); // 900 lower: 800 unpaid forgiven, 100 refunded
        assert!((t.tokens().available() - 100.0).abs() < 1e-9, "{strategy:?}");
        assert_eq!(t.debt(), 0.0, "{strategy:?}");
        t.release("a").unwrap();
        assert!((t.tokens().available() - 700.0).abs() < 1e-9, "{strategy:?}");
    }
}

fn consume_at(t: &mut Throttle<()>, now: f64, request_id: &str, tokens: u64) -> bool {
    t.advance(now);
    t.consume(now, request_id, tokens, ())
}

#[test]
fn a_huge_actual_count_owes_at_most_one_full_bucket() {
    // A provider's bucket is full again one window after any use, however large: a debt beyond
    // the capacity would hold the limiter back long after the provider itself.
    let mut t: Throttle<()> =
        Throttle::new(config(60.0, 1000.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
    assert!(t.consume(0.0, "a", 100, ()));
    let outcome = t.adjust("a", u64::MAX).unwrap();
    assert!(matches!(outcome, Adjustment::Compensated { total_debt, .. } if total_debt == 1000.0));
    assert_eq!(t.debt(), 1000.0);
    // Another one owes no more.
    assert!(consume_at(&mut t, 60.0, "b", 100));
    t.adjust("b", u64::MAX).unwrap();
    assert_eq!(t.debt(), 1000.0);
    // One window later a full bucket pays the whole debt, and the next window is free of it.
    let wait = t.check(100).available_in;
    assert!((wait - 60.0).abs() < 1e-9, "{wait}");
    assert!(consume_at(&mut t, 120.0, "c", 100));
    assert_eq!(t.debt(), 100.0);
    assert!(consume_at(&mut t, 180.0, "d", 100));
    assert_eq!(t.debt(), 0.0);
    assert!(t.validate_state(180.0));
}

#[test]
fn a_correction_after_a_huge_actual_count_restores_the_bucket_and_the_debt() {
    for release in [true, false] {
        let mut t: Throttle<()> =
            Throttle::new(config(60.0, 1000.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
        assert!(t.consume(0.0, "x", 300, ()));
        assert!(t.consume(0.0, "a", 200, ()));
        t.adjust("a", 10_000_000).unwrap(); // 500 taken; the debt is one full bucket
        assert_eq!(t.debt(), 1000.0);
        assert!(t.tokens().available().abs() < 1e-9);
        // A smaller but still huge count forgives first what was never owed: the debt stays.
        t.adjust("a", 9_000_000).unwrap();
        assert_eq!(t.debt(), 1000.0);
        if release {
            t.release("a").unwrap();
            assert!((t.tokens().available() - 700.0).abs() < 1e-9);
        } else {
            t.adjust("a", 100).unwrap();
            assert!((t.tokens().available() - 600.0).abs() < 1e-9);
        }
        assert_eq!(t.debt(), 0.0, "release {release}");
    }
}

#[test]
fn release_gives_a_reservation_back_whole() {
    let mut t: Throttle<()> =
        Throttle::new(config(60.0, 1000.0, AdjustmentFailureStrategy::Compensate), 0.0).unwrap();
    assert!(t.consume(0.0, "a", 1000, ()));
    t.adjust("a", 1300).unwrap();
    assert_eq!(t.debt(), 300.0);
    t.advance(30.0);
    // 500 refilled; "b" pays the 300 of debt on top of its 100.
    assert!(t.consume(30.0, "b", 100, ()));
    assert!((t.tokens().available() - 100.0).abs() < 1e-9);
    assert_eq!(t.debt(), 0.0);
    let requests = t.requests().available();
    t.release("b").unwrap();
    assert!((t.tokens().available() - 500.0).abs() < 1e-9);
    assert_eq!(t.requests().available(), requests + 1.0);
    assert_eq!(t.debt(), 300.0);
    // It no longer counts, and cannot be released or adjusted twice.
    assert_eq!(t.history_len(), 1);
    assert_eq!(t.history_statistics().total_tokens, 1300);
    assert!(matches!(t.release("b"), Err(CoreError::UnknownRequest(_))));
    assert!(matches!(t.adjust("b", 5), Err(CoreError::UnknownRequest(_))));
}

#[test]
fn a_penalty_grants_nothing_until_it_ends() {
    let mut t = throttle(60.0, 1000.0);
    t.penalize(10.0).unwrap();
    t.penalize(2.0).unwrap(); // a shorter one does not cut it short
    let check = t.check(10);
    assert_eq!(check.reason, Some("rpm_limit"));
    assert_eq!(check.available_in, 10.0);
    assert!(!t.consume(0.0, "a", 10, ()));
    t.advance(10.0);
    assert!(t.consume(10.0, "a", 10, ()));
    assert!(t.penalize(f64::NAN).is_err());
    assert!(t.penalize(-1.0).is_err());
}

#[test]
fn restore_on_another_clock_refills_from_its_now() {
    let mut a = throttle(60.0, 6000.0);
    a.advance(1_000_000.0);
    assert!(a.consume(1_000_000.0, "x", 6000, ()));
    let snapshot = a.snapshot(1_000_000.0);
    // Another process: its clock started at 0.
    let mut b = throttle(60.0, 6000.0);
    b.advance(5.0);
    b.restore(&snapshot).unwrap();
    assert_eq!(b.tokens().available(), 0.0);
    b.advance(6.0);
    assert!((b.tokens().available() - 100.0).abs() < 1e-9);
}

#[test]
fn one_accuracy_formula() {
    assert_eq!(estimation_accuracy(0, 0), 1.0);
    assert_eq!(estimation_accuracy(0, 10), 0.0);
    assert_eq!(estimation_accuracy(10, 0), 0.0);
    assert_eq!(estimation_accuracy(10, 5), 0.5);
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 0, ()));
    t.adjust("a", 10).unwrap();
    assert_eq!(t.efficiency(), 0.0);
    assert_eq!(t.history_statistics().estimation_accuracy, 0.0);
}

#[test]
fn releasing_a_second_consume_of_an_id_leaves_the_first_adjustable() {
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 100, ()));
    assert!(t.consume(0.0, "a", 200, ())); // a redelivery, reserved again
    t.release("a").unwrap();
    assert!((t.tokens().available() - 900.0).abs() < 1e-9);
    t.adjust("a", 30).unwrap(); // the first delivery's record
    assert!((t.tokens().available() - 970.0).abs() < 1e-9);
    assert_eq!(t.history().map(|r| r.tokens).collect::<Vec<_>>(), vec![30]);
}

#[test]
fn a_reservation_key_settles_its_own_record_and_no_other_of_the_request() {
    let mut t = throttle(60.0, 1000.0);
    let first = t.reserve(0.0, "a", 300, ()).unwrap();
    let second = t.reserve(0.0, "a", 200, ()).unwrap();
    assert_ne!(first, second);
    // Keyed records are not found by id: the public id API never touches them.
    assert!(matches!(t.adjust("a", 1), Err(CoreError::UnknownRequest(_))));
    t.adjust_reservation(first, 100, None).unwrap();
    assert!((t.tokens().available() - 700.0).abs() < 1e-9);
    t.release_reservation(second).unwrap();
    assert!((t.tokens().available() - 900.0).abs() < 1e-9);
    assert!((t.requests().available() - 59.0).abs() < 1e-9);
    // Released once: a second release or adjustment of that key is unknown.
    assert!(matches!(t.release_reservation(second), Err(CoreError::UnknownRequest(_))));
    assert!(matches!(t.adjust_reservation(second, 5, None), Err(CoreError::UnknownRequest(_))));
    // The history still shows the request id.
    assert_eq!(t.history().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["a"]);
}

#[test]
fn a_key_from_before_a_reset_never_names_a_later_record() {
    let mut t = throttle(60.0, 1000.0);
    let old = t.reserve(0.0, "a", 10, ()).unwrap();
    t.reset(0.0);
    let new = t.reserve(0.0, "b", 10, ()).unwrap();
    assert_ne!(old, new);
    assert!(matches!(t.release_reservation(old), Err(CoreError::UnknownRequest(_))));
    t.release_reservation(new).unwrap();
}

#[test]
fn a_key_older_than_the_history_is_unknown() {
    let mut t = Throttle::<()>::new(
        ThrottleConfig { max_history_records: 2, ..config(60.0, 1000.0, AdjustmentFailureStrategy::Warn) },
        0.0,
    )
    .unwrap();
    let first = t.reserve(0.0, "a", 10, ()).unwrap();
    t.reserve(0.0, "b", 10, ()).unwrap();
    t.reserve(0.0, "c", 10, ()).unwrap();
    assert!(matches!(t.adjust_reservation(first, 1, None), Err(CoreError::UnknownRequest(_))));
}

#[test]
fn a_bucket_that_cannot_hold_one_request_or_token_is_refused() {
    let refused = |rpm: f64, tpm: f64, burst_rpm: Option<f64>, burst_tpm: Option<f64>| {
        let config = ThrottleConfig {
            burst_rpm,
            burst_tpm,
            ..config(rpm, tpm, AdjustmentFailureStrategy::Compensate)
        };
        match config.validate() {
            Err(CoreError::InvalidConfig(message)) => Some(message),
            _ => None,
        }
    };
    assert!(refused(0.5, 1000.0, None, None).is_some_and(|m| m.starts_with("rpm must be >= 1")));
    assert!(refused(60.0, 0.5, None, None).is_some_and(|m| m.starts_with("tpm must be >= 1")));
    assert!(refused(0.25, 1000.0, Some(0.5), None).is_some_and(|m| m.starts_with("burst_rpm must be >= 1")));
    assert!(refused(60.0, 0.25, None, Some(0.75)).is_some_and(|m| m.starts_with("burst_tpm must be >= 1")));
    // Less than one request a minute is fine when the bucket holds one.
    assert_eq!(refused(0.5, 1000.0, Some(1.0), None), None);
    assert_eq!(refused(1.0, 1.0, None, None), None);
}

#[test]
fn penalties_and_resets_are_clamped_to_one_day() {
    for asked in [1e308, f64::INFINITY, MAX_PROVIDER_WAIT + 1.0] {
        let mut t = throttle(60.0, 1000.0);
        assert_eq!(t.penalize(asked).unwrap(), Some(asked));
        assert_eq!(t.check(10).available_in, MAX_PROVIDER_WAIT);
        t.advance(MAX_PROVIDER_WAIT);
        assert!(t.consume(MAX_PROVIDER_WAIT, "a", 10, ()), "{asked}");

        let mut t = throttle(60.0, 1000.0);
        assert_eq!(t.cap(Some((0.0, Some(asked))), Some((0.0, Some(5.0)))).unwrap(), Some(asked));
        // The reset holds nothing: the request bucket refills one a second from 0.
        assert_eq!(t.check(10).available_in, 1.0);
        t.advance(1.0);
        assert!(t.consume(1.0, "a", 10, ()), "{asked}");
    }
    let mut t = throttle(60.0, 1000.0);
    assert_eq!(t.penalize(MAX_PROVIDER_WAIT).unwrap(), None);
    assert_eq!(t.cap(None, Some((0.0, Some(MAX_PROVIDER_WAIT)))).unwrap(), None);
    // NaN and negative waits are refused whole: the valid figure beside them is not applied.
    assert!(matches!(t.penalize(f64::NAN), Err(CoreError::InvalidRequest(_))));
    let before = t.requests().available();
    assert!(t.cap(Some((0.0, None)), Some((0.0, Some(-1.0)))).is_err());
    assert!(t.cap(Some((0.0, None)), Some((0.0, Some(f64::NAN)))).is_err());
    assert_eq!(t.requests().available(), before);
}

#[test]
fn a_refund_to_zero_tokens_is_not_an_estimation_miss() {
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "failed", 100, ()));
    t.adjust("failed", 0).unwrap();
    assert_eq!(t.history().next().map(|r| (r.tokens, r.actual_tokens)), Some((0, None)));
    assert_eq!(t.history_statistics().estimation_accuracy, 1.0);
    assert!((t.tokens().available() - 1000.0).abs() < 1e-9);
    assert!(t.consume(0.0, "ok", 100, ()));
    t.adjust("ok", 50).unwrap();
    assert_eq!(t.history_statistics().estimation_accuracy, 0.5);
    assert_eq!(t.efficiency(), 0.5);
}

#[test]
fn a_clock_stepped_back_resumes_refilling_and_penalties_from_the_last_reading() {
    let mut t = throttle(60.0, 1000.0);
    t.advance(100_000.0);
    assert!(t.consume(t.now(), "a", 1000, ()));
    t.penalize(10.0).unwrap();
    // A wall clock set back by half a day: time resumes from the last reading.
    t.advance(50_000.0);
    assert!((t.now() - 100_000.0).abs() < 1e-9);
    let check = t.check(500);
    // 500 tokens at 1000/60 a second: 30 s, as said, not 30 s after the clock catches up.
    assert!((check.available_in - 30.0).abs() < 1e-9);
    t.advance(50_010.0);
    assert_eq!(t.penalty_left(), 0.0);
    t.advance(50_000.0 + check.available_in);
    assert!(t.check(500).allowed);
    assert!(t.consume(t.now(), "b", 500, ()));
}

#[test]
fn a_reading_a_moment_behind_the_last_refills_nothing_twice() {
    // Another thread's earlier reading, taken before this one's later: time stands still.
    let mut t = throttle(60.0, 1000.0);
    assert!(t.consume(0.0, "a", 1000, ()));
    t.advance(10.0);
    t.advance(10.0 - CLOCK_STEP_BACK / 2.0);
    t.advance(10.0);
    assert!((t.tokens().available() - 1000.0 / 60.0 * 10.0).abs() < 1e-9);
    assert!((t.now() - 10.0).abs() < 1e-12);
}
