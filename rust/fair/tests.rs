// Weights, usages and sums compared here are whole numbers or copies: exact.
#![allow(clippy::float_cmp)]

use super::*;
use crate::cells::CellKey;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Msg {
    tenant: u32,
    priority: u8,
    enqueued_at: f64,
    deadline: f64,
    tokens: u64,
}

fn entry(slot: u32, m: &Msg) -> IndexEntry {
    IndexEntry {
        cell: CellKey::for_message(m.priority, 0, m.tokens),
        tokens: m.tokens,
        time: 0,
        enqueued_at: m.enqueued_at,
        seq: u64::from(slot),
        tenant: m.tenant,
        deadline: m.deadline,
    }
}

const CAPACITY: f64 = 6_000.0;
const REFILL: f64 = 100.0;

/// What the brute force is asked: the budget in the bucket, the two reserves, hold or not.
#[derive(Debug, Clone, Copy)]
struct Ask {
    budget: u64,
    tenant_reserve: f64,
    urgent_reserve: f64,
    hold: bool,
}

/// The fair decision by brute force, straight from the rules of the module docs, over the
/// visible messages (`slot` is the enqueue order), each tenant's use and `now`.
fn brute_force(
    msgs: &[(u32, Msg)],
    config: &FairConfig,
    now: f64,
    usage: &HashMap<u32, f64>,
    ask: Ask,
) -> Option<(u32, bool)> {
    let lane = |m: &Msg| -> usize {
        let p = m.priority;
        if p > HIGH && now - m.enqueued_at > config.max_wait[usize::from(p)] {
            2
        } else {
            [0, 1, 3, 4][usize::from(p)]
        }
    };
    let deadline = |m: &Msg| if m.deadline.is_nan() { f64::INFINITY } else { m.deadline };
    let visible = |tenant: u32| msgs.iter().filter(|(_, m)| m.tenant == tenant).count();
    let used = |tenant: u32| usage.get(&tenant).copied().unwrap_or(0.0);
    let per_weight = |tenant: u32| used(tenant) / config.weight(tenant);
    // The fair share: the window's refill split by weight among the active tenants.
    let mut active: Vec<u32> = msgs.iter().map(|(_, m)| m.tenant).collect();
    active.extend(usage.iter().filter(|(_, &u)| u > 0.0).map(|(&t, _)| t));
    active.sort_unstable();
    active.dedup();
    let total: f64 = active.iter().map(|&t| config.weight(t)).sum();
    let others = active.len() > 1;
    let share =
        if total > 0.0 { REFILL * config.fairness_window / total * (1.0 - 1e-9) } else { f64::INFINITY };
    let in_urgent_lane = |m: &Msg| config.urgent_first && m.priority == URGENT;
    let mut order: Vec<(u32, bool)> = Vec::new(); // (slot, ahead of fairness)
    let mut urgent: Vec<&(u32, Msg)> = msgs.iter().filter(|(_, m)| in_urgent_lane(m)).collect();
    urgent.sort_by_key(|(slot, _)| *slot);
    order.extend(urgent.iter().map(|(slot, _)| (*slot, true)));
    let rest: Vec<&(u32, Msg)> = msgs.iter().filter(|(_, m)| !in_urgent_lane(m)).collect();
    let in_tenant = |a: &&(u32, Msg), b: &&(u32, Msg)| {
        lane(&a.1).cmp(&lane(&b.1)).then(deadline(&a.1).total_cmp(&deadline(&b.1))).then(a.0.cmp(&b.0))
    };
    let mine = |tenant: u32| {
        let mut mine: Vec<&(u32, Msg)> = rest.iter().copied().filter(|(_, m)| m.tenant == tenant).collect();
        mine.sort_by(in_tenant);
        mine
    };
    let mut tenants: Vec<u32> = rest.iter().map(|(_, m)| m.tenant).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let head = |tenant: u32| mine(tenant).first().map(|(s, m)| (lane(m), *s));
    tenants.sort_by(|&a, &b| per_weight(a).total_cmp(&per_weight(b)).then(head(a).cmp(&head(b))));
    for tenant in tenants {
        order.extend(mine(tenant).iter().map(|(slot, _)| (*slot, false)));
    }
    for (slot, _) in order {
        let msg = &msgs.iter().find(|(s, _)| *s == slot).unwrap().1;
        if msg.tokens as f64 > CAPACITY {
            continue; // never fits: holds nothing
        }
        let urgent = msg.priority == URGENT;
        let backlogged = others && visible(msg.tenant) > 1 && per_weight(msg.tenant) >= share;
        let margin =
            if urgent { 0.0 } else { ask.urgent_reserve + if backlogged { ask.tenant_reserve } else { 0.0 } };
        let need = (msg.tokens as f64 + margin).min(CAPACITY);
        let fit = need <= ask.budget as f64;
        if fit || ask.hold {
            return Some((slot, fit));
        }
    }
    None
}

fn msg() -> impl Strategy<Value = Msg> {
    (0u32..5, 0u8..4, 0.0f64..100.0, prop_oneof![Just(f64::NAN), 0.0f64..3_000.0], 1u64..7_000).prop_map(
        |(tenant, priority, late, deadline, tokens)| Msg {
            tenant,
            priority,
            enqueued_at: late,
            deadline,
            tokens,
        },
    )
}

#[derive(Debug, Clone)]
enum Op {
    /// A message arrives (its `enqueued_at` is an offset before now).
    Insert(Msg),
    /// The n-th visible message (mod the count) leaves.
    Remove(usize),
    /// A dispatch of `tokens` is charged to a tenant now.
    Charge(u32, u64),
    /// The n-th charge (mod the count) is corrected to `tokens`.
    Correct(usize, u64),
    /// Time passes.
    Advance(f64),
    /// A decision.
    Decide(Ask),
}

fn op() -> impl Strategy<Value = Op> {
    let ask = (0u64..7_000, 0.0f64..2_000.0, 0.0f64..2_000.0, any::<bool>()).prop_map(
        |(budget, tenant_reserve, urgent_reserve, hold)| Ask { budget, tenant_reserve, urgent_reserve, hold },
    );
    prop_oneof![
        4 => msg().prop_map(Op::Insert),
        2 => any::<usize>().prop_map(Op::Remove),
        2 => (0u32..5, 0u64..3_000).prop_map(|(t, n)| Op::Charge(t, n)),
        1 => (any::<usize>(), 0u64..3_000).prop_map(|(i, n)| Op::Correct(i, n)),
        2 => prop_oneof![0.0f64..5.0, 0.0f64..400.0].prop_map(Op::Advance),
        3 => ask.prop_map(Op::Decide),
    ]
}

/// Token use over the window by brute force: every charge still in it, as corrected.
fn brute_usage(charges: &[(f64, u32, f64, u64)], window: f64, now: f64) -> HashMap<u32, f64> {
    let mut usage = HashMap::new();
    for &(at, tenant, tokens, _) in charges {
        if at > now - window {
            *usage.entry(tenant).or_insert(0.0) += tokens;
        }
    }
    usage
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    // The lanes, told of arrivals, departures, charges and corrections as they happen, pick
    // what the brute force picks from scratch at every decision.
    #[test]
    fn select_matches_brute_force(
        ops in proptest::collection::vec(op(), 1..120),
        weights in proptest::collection::vec(prop_oneof![Just(1.0f64), 0.5f64..3.0], 5),
        urgent_first in any::<bool>(),
        window in prop_oneof![Just(60.0f64), 1.0f64..300.0],
    ) {
        let config = FairConfig {
            weights: (0u32..5).zip(weights.iter().copied()).filter(|(_, w)| *w != 1.0).collect(),
            urgent_first,
            fairness_window: window,
            ..FairConfig::default()
        };
        let mut lanes = FairLanes::new(config.clone());
        let mut ledger = UsageLedger::new(window);
        let mut charges: Vec<(f64, u32, f64, u64)> = Vec::new();
        let mut live: Vec<(u32, Msg)> = Vec::new();
        let mut next_slot = 0u32;
        let mut now = 1_000.0;
        for op in ops {
            match op {
                Op::Insert(mut m) => {
                    // Enqueue instants never decrease within a store.
                    m.enqueued_at = live.last().map_or(now, |(_, l)| now.max(l.enqueued_at));
                    lanes.insert(next_slot, &entry(next_slot, &m));
                    live.push((next_slot, m));
                    next_slot += 1;
                }
                Op::Remove(i) => {
                    if !live.is_empty() {
                        let (slot, m) = live.remove(i % live.len());
                        lanes.remove(slot, &entry(slot, &m));
                    }
                }
                Op::Charge(tenant, tokens) => {
                    let id = ledger.charge(tenant, now, tokens as f64);
                    charges.push((now, tenant, tokens as f64, id));
                }
                Op::Correct(i, tokens) => {
                    if !charges.is_empty() {
                        let i = i % charges.len();
                        let (at, tenant, _, id) = charges[i];
                        ledger.correct(tenant, id, tokens as f64);
                        // Only a charge still in the window is corrected.
                        if at > now - window {
                            charges[i].2 = tokens as f64;
                        }
                    }
                }
                Op::Advance(dt) => now += dt,
                Op::Decide(ask) => {
                    lanes.prepare(now, &mut ledger);
                    let usage = brute_usage(&charges, window, now);
                    let expected = brute_force(&live, &config, now, &usage, ask);
                    let share = lanes.share_per_weight(REFILL);
                    let got = lanes.select(share, ask.hold, &mut |c: &FairCandidate| {
                        let tokens = live.iter().find(|(s, _)| *s == c.slot).unwrap().1.tokens;
                        if tokens as f64 > CAPACITY {
                            return Fit::Never;
                        }
                        let need = FairLanes::admission_tokens(c, tokens, ask.tenant_reserve, ask.urgent_reserve, CAPACITY);
                        Fit::from_allowed(need <= ask.budget as f64)
                    });
                    prop_assert_eq!(got.map(|(c, fit)| (c.slot, fit)), expected, "now {}", now);
                    for (tenant, used) in usage {
                        prop_assert_eq!(ledger.current(tenant).to_bits(), used.max(0.0).to_bits());
                    }
                }
            }
        }
    }
}

#[test]
fn ledger_charges_corrects_and_expires() {
    let mut ledger = UsageLedger::new(60.0);
    let a = ledger.charge(1, 0.0, 1_000.0);
    let b = ledger.charge(1, 30.0, 500.0);
    ledger.charge(2, 10.0, 200.0);
    assert!((ledger.usage(1, 30.0) - 1_500.0).abs() < 1e-9);
    ledger.correct(1, a, 800.0);
    ledger.correct(1, b, 0.0);
    assert!((ledger.usage(1, 30.0) - 800.0).abs() < 1e-9);
    // The first charge leaves the window at t=60.
    assert!(ledger.usage(1, 60.0).abs() < 1e-9);
    ledger.correct(1, a, 5_000.0); // gone: nothing to correct
    assert!(ledger.usage(1, 61.0).abs() < 1e-9);
    assert_eq!(ledger.usages(95.0), vec![]);
}

#[test]
fn a_ledger_forgets_tenants_whose_charges_left_the_window() {
    let mut ledger = UsageLedger::new(60.0);
    for tenant in 0..100_000 {
        ledger.charge(tenant, 0.0, 10.0);
    }
    assert_eq!(ledger.usages(59.0).len(), 100_000);
    ledger.expire(60.0);
    assert!(ledger.usages(60.0).is_empty());
    assert!(ledger.tenants.capacity() < 1_000, "{}", ledger.tenants.capacity());
    assert!(ledger.charges.capacity() < 1_000, "{}", ledger.charges.capacity());
}

fn pick(lanes: &mut FairLanes, now: f64) -> Option<u32> {
    lanes.age(now);
    lanes.select(f64::INFINITY, true, &mut |_| Fit::Now).map(|(c, _)| c.slot)
}

#[test]
fn aging_moves_a_message_once_at_its_instant() {
    let mut lanes = FairLanes::new(FairConfig::default());
    let old_low = Msg { tenant: 0, priority: 3, enqueued_at: 0.0, deadline: f64::NAN, tokens: 10 };
    let new_normal = Msg { tenant: 0, priority: 2, enqueued_at: 500.0, deadline: f64::NAN, tokens: 10 };
    lanes.insert(0, &entry(0, &old_low));
    lanes.insert(1, &entry(1, &new_normal));
    assert_eq!(pick(&mut lanes, 900.0), Some(1)); // waited exactly 900 s: not yet aged
    assert_eq!(pick(&mut lanes, 900.5), Some(0)); // aged: ahead of NORMAL
    lanes.remove(0, &entry(0, &old_low));
    assert_eq!(pick(&mut lanes, 901.0), Some(1));
}

#[test]
fn an_aged_request_ranks_behind_fresh_high_ones() {
    let mut lanes = FairLanes::new(FairConfig::default());
    let old_normal = Msg { tenant: 0, priority: 2, enqueued_at: 0.0, deadline: f64::NAN, tokens: 10 };
    let fresh_high = Msg { tenant: 0, priority: 1, enqueued_at: 1_000.0, deadline: f64::NAN, tokens: 10 };
    lanes.insert(0, &entry(0, &old_normal));
    lanes.insert(1, &entry(1, &fresh_high));
    assert_eq!(pick(&mut lanes, 1_000.0), Some(1));
    let (candidate, _) = lanes.select(f64::INFINITY, true, &mut |_| Fit::Now).unwrap();
    assert_eq!(candidate.rank, FairRank::Tenant { rank: 1, of: 1, usage: 0.0, effective_priority: HIGH });
    lanes.remove(1, &entry(1, &fresh_high));
    let (candidate, _) = lanes.select(f64::INFINITY, true, &mut |_| Fit::Now).unwrap();
    // The aged one ranks as HIGH.
    assert_eq!(
        (candidate.slot, candidate.rank),
        (0, FairRank::Tenant { rank: 1, of: 1, usage: 0.0, effective_priority: HIGH })
    );
}

#[test]
fn tenants_that_used_alike_go_by_class_then_age() {
    let mut lanes = FairLanes::new(FairConfig::default());
    let low = Msg { tenant: 1, priority: 3, enqueued_at: 0.0, deadline: f64::NAN, tokens: 10 };
    let high = Msg { tenant: 2, priority: 1, enqueued_at: 5.0, deadline: f64::NAN, tokens: 10 };
    lanes.insert(0, &entry(0, &low));
    lanes.insert(1, &entry(1, &high));
    assert_eq!(pick(&mut lanes, 6.0), Some(1));
    // A tenant below the other's use goes first whatever its class.
    lanes.set_usage(2, 100.0);
    assert_eq!(pick(&mut lanes, 6.0), Some(0));
}

#[test]
fn automatic_tenant_reserve_is_the_largest_recent_estimate_capped() {
    let config = FairConfig::default();
    let mut runtime = FairRuntime::new(&config, None);
    assert!((runtime.reserve(100_000.0) - 1_000.0).abs() < 1e-9);
    runtime.charge(0, 0.0, 3_000);
    runtime.charge(0, 0.0, 500);
    assert!((runtime.reserve(100_000.0) - 4_500.0).abs() < 1e-9);
    assert!((runtime.reserve(20_000.0) - 2_000.0).abs() < 1e-9); // at most a tenth
                                                                 // The 3,000 leaves the window after 256 more dispatches.
    for _ in 0..256 {
        runtime.charge(0, 0.0, 700);
    }
    assert!((runtime.reserve(100_000.0) - 1_050.0).abs() < 1e-9);
    let fixed = FairRuntime::new(&config, Some(42.0));
    assert!((fixed.reserve(100_000.0) - 42.0).abs() < 1e-9);
}

#[test]
fn lanes_keep_nothing_for_tenants_gone_and_unused() {
    let config = FairConfig::default();
    let mut lanes = FairLanes::new(config);
    let mut ledger = UsageLedger::new(60.0);
    for i in 0..10_000u32 {
        let m = Msg { tenant: i, priority: 2, enqueued_at: 0.0, deadline: f64::NAN, tokens: 10 };
        lanes.insert(i, &entry(i, &m));
        ledger.charge(i, 0.0, 10.0);
        lanes.remove(i, &entry(i, &m));
    }
    lanes.prepare(1.0, &mut ledger);
    assert_eq!(lanes.known_tenants(), 10_000);
    lanes.prepare(60.0, &mut ledger);
    assert_eq!(lanes.known_tenants(), 0);
    assert_eq!(lanes.active.total(), 0.0);
}
