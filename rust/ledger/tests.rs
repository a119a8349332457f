use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn facts(tokens: u64, reserved: bool, charge: Option<(u32, u64)>) -> Facts {
    Facts { tenant: 1, tokens, priority: 2, enqueued_at: 0.0, reserved, charge }
}

#[test]
fn a_processed_mark_with_input_and_output_counts_adjusts_each_part_and_counts_their_sum() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open_handed_out("m", facts(100, true, Some((1, 7))), 1.0, 0.0);
    let plan = ledger.settle(id, Mark::Processed { actual: Some(90), parts: Some((60, 30)) }).unwrap();
    assert_eq!(plan.limiter, Some(LimiterOp::AdjustParts(60, 30)));
    assert_eq!(plan.charge, Some(ChargeFix { tenant: 1, charge: 7, tokens: 90.0 }));
    ledger.store_replied(id, StoreReply::Landed).unwrap();
    ledger.finish(id, 2.0).unwrap();
    assert_eq!(ledger.stats.completed, 1);
}

#[test]
fn a_processed_mark_deletes_then_adjusts_then_counts() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open_handed_out("m", facts(100, true, Some((1, 7))), 1.0, 0.0);
    assert_eq!(ledger.in_flight().count(), 1);
    let plan = ledger.settle(id, Mark::Processed { actual: Some(80), parts: None }).unwrap();
    assert_eq!(plan.store, Some(StoreOp::Delete));
    assert_eq!(plan.limiter, Some(LimiterOp::Adjust(80)));
    assert_eq!(plan.charge, Some(ChargeFix { tenant: 1, charge: 7, tokens: 80.0 }));
    // A second mark while the first is in progress is refused.
    assert!(matches!(ledger.settle(id, Mark::DeadLettered), Err(CoreError::MessageState(_))));
    // The limiter part waits for the store.
    assert!(ledger.finish(id, 2.0).is_err());
    let after = ledger.store_replied(id, StoreReply::Landed).unwrap();
    assert_eq!((after.proceed, after.stale_error, after.charge), (true, false, plan.charge));
    let ended = ledger.finish(id, 2.0).unwrap();
    assert_eq!(ended.data, "m");
    assert_eq!((ledger.stats.completed, ledger.stats.failed), (1, 0));
    assert!(ledger.is_empty());
    // Ended: the id names nothing now, and marking again is refused.
    assert!(ledger.get(id).is_none());
    assert!(matches!(ledger.settle(id, Mark::DeadLettered), Err(CoreError::MessageState(_))));
}

#[test]
fn a_failed_store_call_leaves_the_delivery_markable_and_nothing_else_done() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open_handed_out((), facts(100, true, None), 1.0, 0.0);
    ledger.settle(id, Mark::Failed { delay: 5.0 }).unwrap();
    let after = ledger.store_replied(id, StoreReply::Failed).unwrap();
    assert!(!after.proceed);
    assert_eq!(ledger.get(id).unwrap().state, State::HandedOut);
    let plan = ledger.settle(id, Mark::Processed { actual: None, parts: None }).unwrap();
    assert_eq!((plan.store, plan.limiter), (Some(StoreOp::Delete), Some(LimiterOp::Settle)));
}

#[test]
fn a_stale_handle_fails_processed_and_dead_lettered_marks_only() {
    for (mark, error) in [
        (Mark::Processed { actual: None, parts: None }, true),
        (Mark::DeadLettered, true),
        (Mark::Failed { delay: 0.0 }, false),
        (Mark::Released, false),
    ] {
        let mut ledger = Ledger::new(300.0, 60.0);
        let id = ledger.open_handed_out((), facts(100, true, None), 1.0, 0.0);
        ledger.settle(id, mark).unwrap();
        let after = ledger.store_replied(id, StoreReply::Stale).unwrap();
        assert_eq!((after.proceed, after.stale_error), (true, error), "{mark:?}");
    }
}

#[test]
fn a_purged_delivery_settles_its_budget_and_nothing_else() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open_handed_out((), facts(100, true, None), 1.0, 0.0);
    let (purge, flagged) = ledger.begin_purge();
    assert_eq!(flagged, [id]);
    assert_eq!(ledger.in_flight().count(), 0);
    ledger.purge_deleted(id);
    ledger.end_purge(purge, false); // deleted already: stays purged
    let plan = ledger.settle(id, Mark::Processed { actual: Some(5), parts: None }).unwrap();
    assert_eq!((plan.store, plan.limiter), (None, Some(LimiterOp::Adjust(5))));
    ledger.finish(id, 2.0).unwrap();
}

#[test]
fn a_failed_purge_gives_back_the_deliveries_it_had_not_deleted() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let a = ledger.open_handed_out((), facts(1, false, None), 1.0, 0.0);
    let b = ledger.open_handed_out((), facts(1, false, None), 1.0, 0.0);
    let (purge, _) = ledger.begin_purge();
    ledger.purge_deleted(a);
    ledger.end_purge(purge, false);
    assert!(ledger.get(a).unwrap().purged());
    assert!(!ledger.get(b).unwrap().purged());
    assert_eq!(ledger.in_flight().map(|(id, _)| id).collect::<Vec<_>>(), [b]);
}

#[test]
fn a_reserved_delivery_whose_message_was_purged_is_taken_back_not_handed_out() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open((), facts(100, true, Some((1, 3))));
    ledger.begin_purge();
    assert!(ledger.hand_out(id, 1.0, 0.0).is_err());
    let (plan, ()) = ledger.revoke(id).unwrap();
    assert_eq!(plan.limiter, Some(LimiterOp::Release));
    assert_eq!(plan.charge, Some(ChargeFix { tenant: 1, charge: 3, tokens: 0.0 }));
    assert!(ledger.is_empty());
    assert_eq!(ledger.stats.held(), 0); // never handed out: not counted
}

#[test]
fn abandoning_keeps_the_reservation_and_counts_nothing() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let id = ledger.open_handed_out(9, facts(100, true, None), 1.0, 0.0);
    ledger.settle(id, Mark::Processed { actual: None, parts: None }).unwrap();
    assert_eq!(ledger.abandon(id), None); // a mark in progress is not abandoned
    ledger.store_replied(id, StoreReply::Failed).unwrap();
    assert_eq!(ledger.abandon(id), Some(9));
    assert_eq!((ledger.stats.completed, ledger.stats.failed), (0, 0));
}

#[test]
fn ids_are_not_reused_for_a_later_delivery() {
    let mut ledger = Ledger::new(300.0, 60.0);
    let first = ledger.open_handed_out((), facts(1, false, None), 1.0, 0.0);
    ledger.abandon(first);
    let second = ledger.open_handed_out((), facts(1, false, None), 1.0, 0.0);
    assert_ne!(first, second);
    assert!(ledger.settle(first, Mark::Released).is_err());
    assert!(ledger.settle(second, Mark::Released).is_ok());
}

// ----- the model --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open { tokens: u64, reserved: bool, handed_out: bool },
    HandOut(usize),
    Revoke(usize),
    Settle(usize, Mark),
    Reply(usize, StoreReply),
    Finish(usize),
    Abandon(usize),
    BeginPurge,
    PurgeDeleted(usize),
    EndPurge(bool),
}

fn mark() -> impl Strategy<Value = Mark> {
    prop_oneof![
        (proptest::option::of(0u64..500), proptest::bool::ANY).prop_map(|(actual, split)| {
            // With its input and output counts (a third of it input) or the total alone.
            let parts = actual.filter(|_| split).map(|a| (a / 3, a - a / 3));
            Mark::Processed { actual, parts }
        }),
        (0.0f64..60.0).prop_map(|delay| Mark::Failed { delay }),
        Just(Mark::DeadLettered),
        Just(Mark::Released),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0usize..12;
    prop_oneof![
        3 => (0u64..500, any::<bool>(), any::<bool>())
            .prop_map(|(tokens, reserved, handed_out)| Op::Open { tokens, reserved, handed_out }),
        2 => i.clone().prop_map(Op::HandOut),
        1 => i.clone().prop_map(Op::Revoke),
        3 => (i.clone(), mark()).prop_map(|(i, m)| Op::Settle(i, m)),
        3 => (i.clone(), prop_oneof![Just(StoreReply::Landed), Just(StoreReply::Stale), Just(StoreReply::Failed)])
            .prop_map(|(i, r)| Op::Reply(i, r)),
        3 => i.clone().prop_map(Op::Finish),
        1 => i.clone().prop_map(Op::Abandon),
        1 => Just(Op::BeginPurge),
        1 => i.prop_map(Op::PurgeDeleted),
        1 => any::<bool>().prop_map(Op::EndPurge),
    ]
}

/// What the model expects of one delivery.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Reserved,
    HandedOut,
    /// Settling; `store_pending`, and the limiter part still due.
    Settling(Mark, bool),
    Ended,
}

#[derive(Debug)]
struct Model {
    ids: Vec<DeliveryId>,
    expect: Vec<Expect>,
    purge: Vec<Option<u32>>,
    purge_final: Vec<bool>,
    estimates: Vec<u64>,
    reserved: Vec<bool>,
    /// The limiter's books: what each delivery's reservation counts now (None: released).
    limiter: HashMap<usize, Option<u64>>,
    plans: HashMap<usize, Plan>,
    purges: Vec<u32>,
    completed: u64,
    failed: u64,
}

impl Model {
    fn apply_rest(&mut self, i: usize) {
        // The limiter part of a plan, done by a well-behaved caller once the store replied.
        let plan = self.plans[&i];
        match plan.limiter {
            Some(LimiterOp::Adjust(n)) => {
                assert!(self.reserved[i]);
                self.limiter.insert(i, Some(n));
            }
            Some(LimiterOp::AdjustParts(input, output)) => {
                assert!(self.reserved[i]);
                self.limiter.insert(i, Some(input + output));
            }
            Some(LimiterOp::Release) => {
                assert!(self.reserved[i]);
                self.limiter.insert(i, None);
            }
            Some(LimiterOp::Settle) => assert!(self.reserved[i]),
            None => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_books_hold_under_any_interleaving(ops in proptest::collection::vec(op(), 1..80)) {
        let mut ledger: Ledger<usize> = Ledger::new(300.0, 60.0);
        let mut m = Model {
            ids: Vec::new(), expect: Vec::new(), purge: Vec::new(), purge_final: Vec::new(),
            estimates: Vec::new(), reserved: Vec::new(), limiter: HashMap::new(), plans: HashMap::new(),
            purges: Vec::new(), completed: 0, failed: 0,
        };
        for op in ops {
            let n = m.ids.len();
            let pick = |i: usize| if n == 0 { None } else { Some(i % n) };
            match op {
                Op::Open { tokens, reserved, handed_out } => {
                    let f = facts(tokens, reserved, None);
                    let id = if handed_out { ledger.open_handed_out(n, f, 1.0, 0.0) } else { ledger.open(n, f) };
                    prop_assert!(!m.ids.contains(&id), "I1: an id names one delivery, once");
                    m.ids.push(id);
                    m.expect.push(if handed_out { Expect::HandedOut } else { Expect::Reserved });
                    m.purge.push(None);
                    m.purge_final.push(false);
                    m.estimates.push(tokens);
                    m.reserved.push(reserved);
                    if reserved {
                        m.limiter.insert(n, Some(tokens));
                    }
                }
                Op::HandOut(i) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.hand_out(m.ids[i], 1.0, 0.0);
                    let ok = m.expect[i] == Expect::Reserved && m.purge[i].is_none();
                    prop_assert_eq!(result.is_ok(), ok, "I2");
                    if ok { m.expect[i] = Expect::HandedOut; }
                }
                Op::Revoke(i) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.revoke(m.ids[i]);
                    prop_assert_eq!(result.is_ok(), m.expect[i] == Expect::Reserved, "I2");
                    if let Ok((plan, data)) = result {
                        prop_assert_eq!(data, i);
                        prop_assert_eq!(plan.store, None);
                        prop_assert_eq!(plan.limiter, m.reserved[i].then_some(LimiterOp::Release));
                        if m.reserved[i] { m.limiter.insert(i, None); }
                        m.expect[i] = Expect::Ended;
                    }
                }
                Op::Settle(i, mark) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.settle(m.ids[i], mark);
                    prop_assert_eq!(result.is_ok(), m.expect[i] == Expect::HandedOut, "I2");
                    if let Ok(plan) = result {
                        prop_assert_eq!(plan.store.is_none(), m.purge[i].is_some(), "I4");
                        if !m.reserved[i] { prop_assert_eq!(plan.limiter, None); }
                        m.plans.insert(i, plan);
                        m.expect[i] = Expect::Settling(mark, plan.store.is_some());
                        if plan.store.is_none() { m.apply_rest(i); }
                    }
                }
                Op::Reply(i, reply) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.store_replied(m.ids[i], reply);
                    let Expect::Settling(mark, true) = m.expect[i] else {
                        prop_assert!(result.is_err(), "I2");
                        continue;
                    };
                    let after = result.unwrap();
                    if reply == StoreReply::Failed {
                        prop_assert!(!after.proceed, "I3");
                        m.plans.remove(&i);
                        m.expect[i] = Expect::HandedOut;
                    } else {
                        prop_assert!(after.proceed);
                        prop_assert_eq!(
                            after.stale_error,
                            reply == StoreReply::Stale && m.purge[i].is_none()
                                && matches!(mark, Mark::Processed { .. } | Mark::DeadLettered),
                            "I4"
                        );
                        m.expect[i] = Expect::Settling(mark, false);
                        m.apply_rest(i);
                    }
                }
                Op::Finish(i) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.finish(m.ids[i], 2.0);
                    let Expect::Settling(mark, false) = m.expect[i] else {
                        prop_assert!(result.is_err(), "I3: nothing finishes before its store replied");
                        continue;
                    };
                    prop_assert_eq!(result.unwrap().data, i);
                    match mark {
                        Mark::Processed { .. } => m.completed += 1,
                        Mark::Failed { .. } | Mark::DeadLettered => m.failed += 1,
                        Mark::Released => {}
                    }
                    m.expect[i] = Expect::Ended;
                }
                Op::Abandon(i) => {
                    let Some(i) = pick(i) else { continue };
                    let result = ledger.abandon(m.ids[i]);
                    prop_assert_eq!(result.is_some(), m.expect[i] == Expect::HandedOut, "I2");
                    if result.is_some() { m.expect[i] = Expect::Ended; }
                }
                Op::BeginPurge => {
                    let (purge, flagged) = ledger.begin_purge();
                    m.purges.push(purge);
                    let mut expected = Vec::new();
                    for i in 0..n {
                        if m.expect[i] != Expect::Ended && m.purge[i].is_none() {
                            m.purge[i] = Some(purge);
                            expected.push(m.ids[i]);
                        }
                    }
                    let mut flagged = flagged;
                    flagged.sort_by_key(|id| id.0);
                    expected.sort_by_key(|id| id.0);
                    prop_assert_eq!(flagged, expected);
                }
                Op::PurgeDeleted(i) => {
                    let Some(i) = pick(i) else { continue };
                    ledger.purge_deleted(m.ids[i]);
                    if m.expect[i] != Expect::Ended { m.purge_final[i] = true; }
                }
                Op::EndPurge(ok) => {
                    let Some(&purge) = m.purges.last() else { continue };
                    ledger.end_purge(purge, ok);
                    if !ok {
                        for i in 0..n {
                            if m.purge[i] == Some(purge) && !m.purge_final[i] && m.expect[i] != Expect::Ended {
                                m.purge[i] = None;
                            }
                        }
                    }
                }
            }
            // I1: the ledger holds exactly the live deliveries, each in its expected state.
            let live = m.expect.iter().filter(|e| **e != Expect::Ended).count();
            prop_assert_eq!(ledger.len(), live);
            for (i, expect) in m.expect.iter().enumerate() {
                let got = ledger.get(m.ids[i]);
                match expect {
                    Expect::Ended => prop_assert!(got.is_none()),
                    Expect::Reserved => prop_assert_eq!(got.map(|d| d.state), Some(State::Reserved)),
                    Expect::HandedOut => prop_assert_eq!(got.map(|d| d.state), Some(State::HandedOut)),
                    Expect::Settling(mark, pending) => prop_assert_eq!(
                        got.map(|d| d.state),
                        Some(State::Settling { mark: *mark, store_pending: *pending })
                    ),
                }
                if let Some(d) = got { prop_assert_eq!(d.purged(), m.purge[i].is_some()); }
            }
            let in_flight = (0..m.ids.len())
                .filter(|&i| m.purge[i].is_none() && matches!(m.expect[i], Expect::HandedOut | Expect::Settling(..)))
                .count();
            prop_assert_eq!(ledger.in_flight().count(), in_flight);
            // I5: counted once, when ended.
            prop_assert_eq!((ledger.stats.completed, ledger.stats.failed), (m.completed, m.failed));
        }
        // The limiter's books are exact: an ended delivery's reservation is what its mark made
        // it; a live or abandoned one's is its estimate.
        for i in 0..m.ids.len() {
            if !m.reserved[i] { continue; }
            let books = m.limiter[&i];
            match (m.expect[i], m.plans.get(&i)) {
                (Expect::Ended, Some(plan)) if plan.limiter.is_some() => {
                    let want = match plan.limiter {
                        Some(LimiterOp::Adjust(n)) => Some(n),
                        Some(LimiterOp::AdjustParts(input, output)) => Some(input + output),
                        Some(LimiterOp::Settle) => Some(m.estimates[i]),
                        _ => None,
                    };
                    prop_assert_eq!(books, want);
                }
                (Expect::Ended, None) => {
                    // Revoked (released) or abandoned (kept).
                    prop_assert!(books.is_none() || books == Some(m.estimates[i]));
                }
                (Expect::Settling(_, false), Some(plan)) => {
                    let want = match plan.limiter {
                        Some(LimiterOp::Adjust(n)) => Some(n),
                        Some(LimiterOp::AdjustParts(input, output)) => Some(input + output),
                        Some(LimiterOp::Release) => None,
                        Some(LimiterOp::Settle) | None => Some(m.estimates[i]),
                    };
                    prop_assert_eq!(books, want);
                }
                _ => prop_assert_eq!(books, Some(m.estimates[i])),
            }
        }
    }
}
