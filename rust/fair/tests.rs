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

/// The fair order by brute force, straight from the contract's rules.
fn brute_force(
    msgs: &[(u32, Msg)],
    config: &FairConfig,
    now: f64,
    usage: &HashMap<u32, f64>,
    share_per_weight: f64,
    hold: bool,
    fits: &dyn Fn(u32, bool, bool) -> bool,
) -> Option<(u32, bool)> {
    let effective = |m: &Msg| {
        let p = m.priority;
        if p > HIGH && now - m.enqueued_at > config.max_wait[usize::from(p)] {
            HIGH
        } else {
            p
        }
    };
    let deadline = |m: &Msg| if m.deadline.is_nan() { f64::INFINITY } else { m.deadline };
    let visible = |tenant: u32| msgs.iter().filter(|(_, m)| m.tenant == tenant).count();
    let share = |tenant: u32| usage.get(&tenant).copied().unwrap_or(0.0) / config.weight(tenant);
    let mut order: Vec<(u32, bool)> = Vec::new(); // (slot, urgent lane)
    let mut urgent: Vec<&(u32, Msg)> =
        msgs.iter().filter(|(_, m)| config.urgent_first && m.priority == URGENT).collect();
    urgent.sort_by_key(|(slot, _)| *slot);
    order.extend(urgent.iter().map(|(slot, _)| (*slot, true)));
    let rest: Vec<&(u32, Msg)> =
        msgs.iter().filter(|(_, m)| !(config.urgent_first && m.priority == URGENT)).collect();
    let in_tenant = |a: &&(u32, Msg), b: &&(u32, Msg)| {
        effective(&a.1)
            .cmp(&effective(&b.1))
            .then(deadline(&a.1).total_cmp(&deadline(&b.1)))
            .then(a.0.cmp(&b.0))
    };
    let mut tenants: Vec<u32> = rest.iter().map(|(_, m)| m.tenant).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let head_seq = |tenant: u32| {
        let mut mine: Vec<&(u32, Msg)> = rest.iter().copied().filter(|(_, m)| m.tenant == tenant).collect();
        mine.sort_by(in_tenant);
        mine.first().map(|(s, _)| *s)
    };
    tenants.sort_by(|&a, &b| {
        let ua = usage.get(&a).copied().unwrap_or(0.0) / config.weight(a);
        let ub = usage.get(&b).copied().unwrap_or(0.0) / config.weight(b);
        ua.total_cmp(&ub).then(head_seq(a).cmp(&head_seq(b)))
    });
    for tenant in tenants {
        let mut mine: Vec<&(u32, Msg)> = rest.iter().copied().filter(|(_, m)| m.tenant == tenant).collect();
        mine.sort_by(in_tenant);
        order.extend(mine.iter().map(|(slot, _)| (*slot, false)));
    }
    for (slot, urgent) in order {
        let msg = &msgs.iter().find(|(s, _)| *s == slot).unwrap().1;
        let tenant = msg.tenant;
        let backlogged = visible(tenant) > 1 && (urgent || share(tenant) >= share_per_weight);
        // URGENT never waits for the reserve, in the urgent lane or (without `urgent_first`)
        // in its tenant's lanes.
        let fit = fits(slot, backlogged, urgent || msg.priority == URGENT);
        if fit || hold {
            return Some((slot, fit));
        }
    }
    None
}

fn msg() -> impl Strategy<Value = Msg> {
    (0u32..4, 0u8..4, 0.0f64..2_000.0, prop_oneof![Just(f64::NAN), 0.0f64..3_000.0], 1u64..5_000).prop_map(
        |(tenant, priority, enqueued_at, deadline, tokens)| Msg {
            tenant,
            priority,
            enqueued_at,
            deadline,
            tokens,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn select_matches_brute_force(
        msgs in proptest::collection::vec(msg(), 0..60),
        removed in proptest::collection::vec(any::<bool>(), 60),
        ages in proptest::collection::vec(0.0f64..2_500.0, 1..4),
        usages in proptest::collection::vec(0.0f64..10_000.0, 4),
        weights in proptest::collection::vec(0.5f64..3.0, 4),
        urgent_first in any::<bool>(),
        hold in any::<bool>(),
        budget in 0u64..6_000,
        reserve in 0u64..2_000,
        share_per_weight in 0.0f64..8_000.0,
    ) {
        let config = FairConfig {
            weights: (0u32..4).zip(weights.iter().copied()).collect(),
            urgent_first,
            ..FairConfig::default()
        };
        let mut lanes = FairLanes::new(config.clone());
        let mut live = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let slot = i as u32;
            lanes.insert(slot, &entry(slot, m));
            live.push((slot, *m));
        }
        // Some leave again (received, deleted), some of them before any aging.
        for (i, m) in msgs.iter().enumerate() {
            if removed[i] {
                lanes.remove(i as u32, &entry(i as u32, m));
                live.retain(|(s, _)| *s != i as u32);
            }
        }
        let usage: HashMap<u32, f64> = (0u32..4).zip(usages.iter().copied()).collect();
        let tokens_of = |slot: u32| msgs[slot as usize].tokens;
        // Time only moves forward: age at each instant, in order.
        let mut sorted_ages = ages.clone();
        sorted_ages.sort_by(f64::total_cmp);
        for now in sorted_ages {
            lanes.age(now);
            let fits_brute = |slot: u32, backlogged: bool, urgent: bool| {
                let t = tokens_of(slot);
                let need = if backlogged && !urgent { (t + reserve).min(6_000.max(t)) } else { t };
                need <= budget
            };
            let expected = brute_force(&live, &config, now, &usage, share_per_weight, hold, &fits_brute);
            let got = lanes.select(
                &mut |tenant| usage.get(&tenant).copied().unwrap_or(0.0),
                share_per_weight,
                hold,
                &mut |c: &FairCandidate| {
                    Fit::from_allowed(FairLanes::admission_tokens(c, tokens_of(c.slot), reserve as f64, 6_000.0) <= budget as f64)
                },
            );
            prop_assert_eq!(got.map(|(c, fit)| (c.slot, fit)), expected, "now {}", now);
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
fn aging_moves_a_message_once_at_its_instant() {
    let mut lanes = FairLanes::new(FairConfig::default());
    let old_low = Msg { tenant: 0, priority: 3, enqueued_at: 0.0, deadline: f64::NAN, tokens: 10 };
    let new_high = Msg { tenant: 0, priority: 1, enqueued_at: 500.0, deadline: f64::NAN, tokens: 10 };
    lanes.insert(0, &entry(0, &old_low));
    lanes.insert(1, &entry(1, &new_high));
    let pick = |lanes: &mut FairLanes, now: f64| {
        lanes.age(now);
        lanes.select(&mut |_| 0.0, f64::INFINITY, true, &mut |_| Fit::Now).map(|(c, _)| c.slot)
    };
    assert_eq!(pick(&mut lanes, 900.0), Some(1)); // waited exactly 900 s: not yet HIGH
    assert_eq!(pick(&mut lanes, 900.5), Some(0)); // HIGH now, and older
    lanes.remove(0, &entry(0, &old_low));
    assert_eq!(pick(&mut lanes, 901.0), Some(1));
}

#[test]
fn automatic_reserve_is_the_largest_recent_estimate_capped() {
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
