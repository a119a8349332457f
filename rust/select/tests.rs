use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A plain index: cells in a map, members oldest first, groups by (tokens, processing time).
struct VecIndex {
    messages: Vec<MessageTraits>,
    cells: BTreeMap<CellKey, Vec<u32>>,
    lookups: std::cell::Cell<usize>,
}

fn time_key(m: &MessageTraits) -> u64 {
    crate::cells::time_key(m.tokens, m.expected_processing_seconds)
}

impl VecIndex {
    fn new(messages: Vec<MessageTraits>) -> Self {
        let mut cells: BTreeMap<CellKey, Vec<u32>> = BTreeMap::new();
        for (slot, m) in messages.iter().enumerate() {
            let key = CellKey::for_message(m.priority, m.receive_count, m.tokens);
            cells.entry(key).or_default().push(slot as u32);
        }
        for members in cells.values_mut() {
            members.sort_by(|&a, &b| {
                messages[a as usize].enqueued_at.total_cmp(&messages[b as usize].enqueued_at).then(a.cmp(&b))
            });
        }
        Self { messages, cells, lookups: std::cell::Cell::new(0) }
    }

    fn key_of(&self, slot: u32) -> CellKey {
        let m = &self.messages[slot as usize];
        CellKey::for_message(m.priority, m.receive_count, m.tokens)
    }

    /// Group order: time key, then age (slots are enqueued in order of their position
    /// among equal enqueue instants).
    fn order(&self, slot: u32) -> (u64, u64, u32) {
        let m = &self.messages[slot as usize];
        (time_key(m), m.enqueued_at.to_bits(), slot)
    }

    fn group_members(&self, slot: u32) -> impl Iterator<Item = u32> + '_ {
        let tokens = self.messages[slot as usize].tokens;
        self.cells[&self.key_of(slot)]
            .iter()
            .copied()
            .filter(move |&s| self.messages[s as usize].tokens == tokens)
    }
}

impl CandidateIndex for VecIndex {
    fn for_each_cell(&self, mut visit: impl FnMut(&CellKey, &CellSummary)) {
        for (key, members) in &self.cells {
            let mut points: Vec<(f64, f64)> = Vec::new();
            self.for_each_age_point(key, &CellSummary::default(), |enqueued_at, time_ms| {
                points.push((enqueued_at, time_ms));
                true
            });
            let oldest = members[0];
            let summary = CellSummary {
                oldest_enqueued_at: self.messages[oldest as usize].enqueued_at,
                oldest_seq: u64::from(oldest),
                best_time_ms: points[0].1,
                best_time_enqueued_at: points[0].0,
                next_time_ms: points.get(1).unwrap_or(&points[0]).1,
            };
            visit(key, &summary);
        }
    }
    fn for_each_group_head(&self, key: &CellKey, mut visit: impl FnMut(u32, u64, f64, bool)) {
        let mut groups: BTreeMap<u64, u32> = BTreeMap::new();
        for &slot in &self.cells[key] {
            let order = self.order(slot);
            let head = groups.entry(self.messages[slot as usize].tokens).or_insert(slot);
            if order < self.order(*head) {
                *head = slot;
            }
        }
        for (tokens, slot) in groups {
            let single = self.next_run_head(slot).is_none();
            visit(slot, tokens, f64::from_bits(time_key(&self.messages[slot as usize])), single);
        }
    }
    fn for_each_age_point(&self, key: &CellKey, _: &CellSummary, mut visit: impl FnMut(f64, f64) -> bool) {
        // The members no older member matches or beats on processing time, by brute force.
        let mut points = Vec::new();
        for &slot in &self.cells[key] {
            let m = &self.messages[slot as usize];
            if points.last().is_none_or(|&(_, best)| time_key(m) < best) {
                points.push((m.enqueued_at, time_key(m)));
            }
        }
        for &(enqueued_at, time) in points.iter().rev() {
            if !visit(enqueued_at, f64::from_bits(time)) {
                break;
            }
        }
    }
    fn next_in_run(&self, slot: u32) -> Option<u32> {
        let m = &self.messages[slot as usize];
        self.group_members(slot)
            .filter(|&s| {
                time_key(&self.messages[s as usize]) == time_key(m) && self.order(s) > self.order(slot)
            })
            .min_by_key(|&s| self.order(s))
    }
    fn next_run_head(&self, slot: u32) -> Option<u32> {
        let m = &self.messages[slot as usize];
        self.group_members(slot)
            .filter(|&s| time_key(&self.messages[s as usize]) > time_key(m))
            .min_by_key(|&s| self.order(s))
    }
    fn traits(&self, slot: u32) -> MessageTraits {
        self.lookups.set(self.lookups.get() + 1);
        self.messages[slot as usize]
    }
    fn seq(&self, slot: u32) -> u64 {
        u64::from(slot)
    }
}

fn message() -> impl Strategy<Value = MessageTraits> {
    (
        0u8..4,
        0u32..10,
        prop_oneof![0u64..10, 1u64..5_000, 1u64..200_000],
        proptest::option::of(0.0f64..50.0),
        0.0f64..400.0,
    )
        .prop_map(|(priority, receive_count, tokens, ept, enqueued_at)| MessageTraits {
            priority,
            receive_count,
            tokens,
            expected_processing_seconds: ept,
            enqueued_at,
        })
}

/// The best `(tier, total)` by brute force: with `urgent_first`, URGENT messages (tier 1) ahead
/// of every score.
fn brute_force(index: &VecIndex, context: &SearchContext, custom: &[(f64, Vec<f64>)]) -> Option<(u8, f64)> {
    index
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.tokens as f64 <= context.max_tokens)
        .map(|(slot, m)| {
            let base = total(&weighted_factors(&context.weights, m, context.now, context.available));
            let tier = u8::from(context.weights.urgent_first && m.priority == 0);
            (tier, base + custom.iter().map(|(w, scores)| w * clamp_custom(scores[slot])).sum::<f64>())
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn stream_is_exactly_descending_and_complete(
        messages in proptest::collection::vec(message(), 0..120),
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in 0.0f64..60_000.0,
        urgent_first in any::<bool>(),
    ) {
        let index = VecIndex::new(messages);
        let weights = Weights::from_array(weights).with_urgent(urgent_first, None);
        let context = SearchContext { weights, now: 400.0, available, max_tokens: available };
        let mut search = IndexSearch::new(&index, context);
        let mut produced = Vec::new();
        while let Some(c) = search.next_candidate() {
            prop_assert_eq!(c.tier, u8::from(urgent_first && c.priority == 0));
            // Everything left is of a lower tier, or bounded by what just came out.
            if let (Some(bound), Some(tier)) = (search.remaining_bound(), search.remaining_tier()) {
                prop_assert!(tier <= c.tier);
                if tier == c.tier {
                    prop_assert!(bound <= c.base, "{bound} > {}", c.base);
                }
            }
            produced.push(c);
        }
        for pair in produced.windows(2) {
            prop_assert!(pair[0].tier >= pair[1].tier);
            if pair[0].tier == pair[1].tier {
                prop_assert!(pair[0].base >= pair[1].base - 1e-9, "{} then {}", pair[0].base, pair[1].base);
            }
        }
        let eligible = index.messages.iter().filter(|m| m.tokens as f64 <= available).count();
        prop_assert_eq!(produced.len(), eligible);
        // The heap-free fast path finds the very same first candidate.
        prop_assert_eq!(best_candidate(&index, &context), produced.first().copied());
    }

    // The bound the search puts on a whole priority before reading its cells is at least the
    // score of every admissible member of that priority (so leaving a priority out when that
    // bound is below the floor drops no winner).
    #[test]
    fn a_priority_bound_covers_every_member_of_the_priority(
        messages in proptest::collection::vec(message(), 1..120),
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in prop_oneof![0.0f64..60_000.0, 1e6f64..1e10],
        max_tokens in prop_oneof![0.0f64..60_000.0, Just(f64::INFINITY)],
        now in 0.0f64..800.0,
    ) {
        let index = VecIndex::new(messages);
        let context = SearchContext { weights: Weights::from_array(weights), now, available, max_tokens };
        index.for_each_priority(|priority, listed| {
            if listed.is_empty() {
                return;
            }
            let bound = priority_bound(&context, priority, listed);
            for m in index.messages.iter().filter(|m| m.priority == priority && m.tokens as f64 <= max_tokens) {
                let score = total(&weighted_factors(&context.weights, m, now, available));
                let bound = bound.expect("an admissible member, so a bound");
                assert!(bound >= score, "priority {priority}: bound {bound} < score {score} of {m:?}");
            }
        });
    }

    #[test]
    fn choice_matches_brute_force(
        messages in proptest::collection::vec(message(), 0..120),
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in 0.0f64..60_000.0,
        custom_weights in proptest::collection::vec(0.0f64..0.6, 0..3),
        seed in any::<u64>(),
        urgent_first in any::<bool>(),
    ) {
        let n = messages.len();
        let index = VecIndex::new(messages);
        let weights = Weights::from_array(weights).with_urgent(urgent_first, None);
        let context = SearchContext { weights, now: 400.0, available, max_tokens: available };
        // Deterministic pseudo-random custom scores per message, some outside [0, 1] or NaN.
        let custom: Vec<(f64, Vec<f64>)> = custom_weights.iter().enumerate().map(|(j, &w)| {
            let scores = (0..n).map(|i| {
                let x = ((seed ^ (i as u64 * 7919 + j as u64 * 104_729)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
                    / (1u64 << 53) as f64;
                if i % 17 == 3 { f64::NAN } else { x * 1.4 - 0.2 }
            }).collect();
            (w, scores)
        }).collect();
        let weights_only: Vec<f64> = custom.iter().map(|(w, _)| *w).collect();
        let mut search = IndexSearch::new(&index, context);
        let collected = collect(&mut search, usize::MAX);
        let mut calls = 0;
        let choice = choose::<()>(&collected, &weights_only, |_, c| {
            calls += 1;
            Ok(custom.iter().map(|(_, scores)| scores[c.slot as usize]).collect())
        }).unwrap();
        let expected = brute_force(&index, &context, &custom);
        match (choice, expected) {
            (None, None) => {}
            (Some(choice), Some((tier, expected))) => {
                prop_assert_eq!(choice.candidate.tier, tier);
                prop_assert!((choice.total - expected).abs() < 1e-9, "{} vs {}", choice.total, expected);
                prop_assert!(choice.candidate.tokens as f64 <= available);
            }
            (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
        }
        if weights_only.is_empty() {
            prop_assert_eq!(calls, 0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    // The real store as the index: after random enqueues (batches at equal instants
    // included), receives and redeliveries, both searches find the brute-force best.
    #[test]
    fn searches_over_the_store_match_brute_force(
        batches in proptest::collection::vec(proptest::collection::vec(message(), 1..20), 1..8),
        receives in 0usize..10,
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in 0.0f64..60_000.0,
        now in 0.0f64..1_000.0,
        urgent_first in any::<bool>(),
    ) {
        use crate::store::{NewMessage, Store, StoreConfig};
        let config = StoreConfig { max_receive_count: None, message_retention: f64::INFINITY };
        let mut store: Store<u32> = Store::new(config, 0.0).unwrap();
        let mut at = 0.0;
        let mut n = 0u32;
        for batch in batches {
            at += 7.5;
            let mut batch: Vec<_> = batch.into_iter().map(|m| {
                n += 1;
                NewMessage {
                    request_id: format!("r{n}").into(),
                    payload: n,
                    priority: m.priority,
                    tokens: m.tokens,
                    expected_processing_seconds: m.expected_processing_seconds,
                    tenant: None,
                    deadline: None,
                }
            }).collect();
            store.enqueue_batch(&mut batch, at).unwrap();
        }
        // Receive some with a short lease so they come back with a higher receive count.
        store.receive(receives, 1.0, at).unwrap();
        let now = at + 2.0 + now;
        store.release_expired(now);
        let weights = Weights::from_array(weights).with_urgent(urgent_first, None);
        let context = SearchContext { weights, now, available, max_tokens: available };
        let expected = (0..n)
            .filter(|&slot| store.is_visible(slot) == Some(true))
            .map(|slot| CandidateIndex::traits(&store, slot))
            .filter(|t| t.tokens as f64 <= available)
            .map(|t| (weights.tier(t.priority), total(&weighted_factors(&context.weights, &t, now, available))))
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let fast = best_candidate(&store, &context).map(|c| (c.tier, c.base));
        let streamed = IndexSearch::new(&store, context).next_candidate().map(|c| (c.tier, c.base));
        prop_assert_eq!(fast, expected);
        prop_assert_eq!(streamed, expected);
    }
}

#[test]
fn a_batch_of_equal_ages_is_not_walked_member_by_member() {
    // 20,000 messages enqueued at the same instant with 40 distinct estimates.
    let messages = (0..20_000u64)
        .map(|i| MessageTraits {
            priority: 2,
            receive_count: 0,
            tokens: 1_000 + (i % 40) * 3,
            expected_processing_seconds: None,
            enqueued_at: 0.0,
        })
        .collect();
    let index = VecIndex::new(messages);
    let context =
        SearchContext { weights: Weights::default(), now: 5.0, available: 2_000.0, max_tokens: 2_000.0 };
    let best = best_candidate(&index, &context).unwrap();
    // 40 group heads plus the cells' oldest members: far fewer lookups than messages.
    assert!(index.lookups.get() < 200, "{} lookups", index.lookups.get());
    // The best estimate is the one nearest 70 % of the budget, and its oldest message wins.
    assert_eq!(best.tokens, 1_117);
    assert_eq!(best.seq, 39);
}

#[test]
fn ties_go_to_the_older_message() {
    let m = |enqueued_at| MessageTraits {
        priority: 2,
        receive_count: 0,
        tokens: 100,
        expected_processing_seconds: None,
        enqueued_at,
    };
    // Both waited past NORMAL's 60 s, so their scores are equal; the older one wins.
    let index = VecIndex::new(vec![m(5.0), m(1.0), m(3.0)]);
    let context =
        SearchContext { weights: Weights::default(), now: 100.0, available: 1000.0, max_tokens: 1000.0 };
    let mut search = IndexSearch::new(&index, context);
    assert_eq!(search.next_candidate().unwrap().slot, 1);
    assert_eq!(search.next_candidate().unwrap().slot, 2);
    assert_eq!(search.next_candidate().unwrap().slot, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    // A long run on the real store: a batch enqueued at one instant, then rounds that age the
    // queue past every priority's saturated wait, each taking the best message (acked, given
    // back, or left to expire so that it comes back with a higher receive count and its old
    // age) and enqueuing refills (one by one or in small batches). Every round both searches
    // pick exactly the brute-force winner (score, then older, then enqueued first), and the
    // index (its cells' age frontiers included) matches one rebuilt from the visible messages.
    #[test]
    fn long_runs_with_refills_and_aging_match_brute_force(
        initial in proptest::collection::vec(message(), 1..40),
        rounds in proptest::collection::vec(
            (0.0f64..12.0, 0u8..4, proptest::collection::vec(message(), 0..4), any::<bool>()),
            1..60,
        ),
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in prop_oneof![1_000.0f64..60_000.0, Just(1e12)],
        urgent_first in any::<bool>(),
    ) {
        use crate::store::{NewMessage, Store, StoreConfig};
        let config = StoreConfig { max_receive_count: None, message_retention: f64::INFINITY };
        let mut store: Store<u32> = Store::new(config, 0.0).unwrap();
        let mut n = 0u32;
        let mut new_message = |m: MessageTraits| {
            n += 1;
            NewMessage {
                request_id: format!("r{n}").into(),
                payload: n,
                priority: m.priority,
                tokens: m.tokens,
                expected_processing_seconds: m.expected_processing_seconds,
                tenant: None,
                deadline: None,
            }
        };
        let mut batch: Vec<_> = initial.into_iter().map(&mut new_message).collect();
        store.enqueue_batch(&mut batch, 0.0).unwrap();
        let weights = Weights::from_array(weights).with_urgent(urgent_first, None);
        let mut now = 0.0;
        for (step, outcome, refills, as_batch) in rounds {
            now += step;
            store.release_expired(now);
            prop_assert_eq!(store.check_invariants(), Ok(()));
            let context = SearchContext { weights, now, available, max_tokens: available };
            let expected = store
                .index()
                .cells()
                .values()
                .flat_map(|cell| cell.values().copied())
                .filter_map(|slot| {
                    let t = CandidateIndex::traits(&store, slot);
                    (t.tokens as f64 <= available).then(|| {
                        let base = total(&weighted_factors(&context.weights, &t, now, available));
                        (weights.tier(t.priority), base, t.enqueued_at, CandidateIndex::seq(&store, slot), slot)
                    })
                })
                .max_by(|a, b| rank((a.0, a.1, a.2, a.3), (b.0, b.1, b.2, b.3)))
                .map(|(tier, base, _, _, slot)| (tier, base, slot));
            let fast = best_candidate(&store, &context).map(|c| (c.tier, c.base, c.slot));
            let streamed = IndexSearch::new(&store, context).next_candidate().map(|c| (c.tier, c.base, c.slot));
            prop_assert_eq!(fast, expected);
            prop_assert_eq!(streamed, expected);
            if let Some((_, _, slot)) = expected {
                let handle = store.receive_slot(slot, 0.5, now).unwrap().to_string();
                match outcome {
                    0 | 1 => {
                        store.delete(&handle, now).unwrap();
                    }
                    2 => store.release(&handle, now).unwrap(),
                    _ => {} // expires before the next round that is 0.5 s later or more
                }
            }
            let mut refills: Vec<_> = refills.into_iter().map(&mut new_message).collect();
            if as_batch {
                store.enqueue_batch(&mut refills, now).unwrap();
            } else {
                for refill in refills {
                    store.enqueue(refill, now).unwrap();
                }
            }
        }
    }
}

/// The candidate index itself as the search sees it, over messages kept in vectors: lets a
/// test choose how the index keeps its cells' age frontiers.
struct Indexed {
    index: crate::index::VisibleIndex,
    entries: Vec<crate::index::IndexEntry>,
    messages: Vec<MessageTraits>,
}

impl Indexed {
    fn entry(slot: usize, m: &MessageTraits) -> crate::index::IndexEntry {
        crate::index::IndexEntry {
            cell: CellKey::for_message(m.priority, m.receive_count, m.tokens),
            tokens: m.tokens,
            time: time_key(m),
            enqueued_at: m.enqueued_at,
            seq: slot as u64,
            tenant: 0,
            deadline: f64::NAN,
        }
    }

    fn remove(&mut self, slot: u32) {
        let messages = &self.messages;
        self.index.remove(&self.entries[slot as usize], |s| messages[s as usize].enqueued_at);
    }
}

impl CandidateIndex for Indexed {
    fn for_each_cell(&self, mut visit: impl FnMut(&CellKey, &CellSummary)) {
        for (key, cell) in self.index.cells() {
            visit(key, cell.summary());
        }
    }
    fn for_each_group_head(&self, key: &CellKey, visit: impl FnMut(u32, u64, f64, bool)) {
        self.index.for_each_group_head(key, visit);
    }
    fn for_each_group_by_time(
        &self,
        key: &CellKey,
        visit: impl FnMut(u64, f64, &dyn Fn() -> (u32, bool)) -> bool,
    ) {
        self.index.for_each_group_by_time(key, visit);
    }
    fn for_each_age_point(&self, key: &CellKey, _: &CellSummary, visit: impl FnMut(f64, f64) -> bool) {
        self.index.for_each_age_point(key, visit);
    }
    fn next_in_run(&self, slot: u32) -> Option<u32> {
        self.index.next_in_run(&self.entries[slot as usize])
    }
    fn next_run_head(&self, slot: u32) -> Option<u32> {
        self.index.next_run_head(&self.entries[slot as usize])
    }
    fn traits(&self, slot: u32) -> MessageTraits {
        self.messages[slot as usize]
    }
    fn seq(&self, slot: u32) -> u64 {
        u64::from(slot)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    // Age frontiers repaired on every removal of a point, after a few gone points, or never:
    // wide cells (many estimates of one token class, spread ages and processing times) lose
    // their best messages, random members, get refills and messages given back; every round the search over each
    // index picks exactly the brute-force winner (ties included), and each index's frontiers,
    // gone points and all, still bound every member (`VisibleIndex::check`).
    #[test]
    fn loose_age_frontiers_give_the_same_winners_as_exact_ones(
        initial in proptest::collection::vec((message(), 0.0f64..3.0), 1..80),
        rounds in proptest::collection::vec(
            (0u8..5, any::<proptest::sample::Index>(), message(), 0.0f64..3.0),
            1..80,
        ),
        weights in proptest::array::uniform6(0.0f64..1.0),
        available in prop_oneof![1_000.0f64..60_000.0, Just(1e12)],
        urgent_first in any::<bool>(),
    ) {
        use crate::index::VisibleIndex;
        let weights = Weights::from_array(weights).with_urgent(urgent_first, None);
        let mut indexes: Vec<Indexed> = [0, 2, u32::MAX]
            .into_iter()
            .map(|loose| Indexed {
                index: VisibleIndex::with_loose_points(loose),
                entries: Vec::new(),
                messages: Vec::new(),
            })
            .collect();
        let mut live: Vec<u32> = Vec::new();
        let mut now = 0.0;
        // Wide cells: estimates of one token class, a few priorities and receive counts.
        let narrow = |m: MessageTraits| MessageTraits {
            priority: m.priority % 2,
            receive_count: m.receive_count % 2,
            tokens: 1024 + m.tokens % 900,
            ..m
        };
        let add = |indexes: &mut Vec<Indexed>, live: &mut Vec<u32>, m: MessageTraits, at: f64| {
            let m = MessageTraits { enqueued_at: at, ..narrow(m) };
            for ix in indexes.iter_mut() {
                let slot = ix.messages.len();
                let entry = Indexed::entry(slot, &m);
                ix.messages.push(m);
                ix.entries.push(entry);
                ix.index.insert(slot as u32, &entry);
            }
            live.push((indexes[0].messages.len() - 1) as u32);
        };
        for (m, step) in initial {
            now += step;
            add(&mut indexes, &mut live, m, now);
        }
        for (kind, pick, refill, step) in rounds {
            now += step;
            let context = SearchContext { weights, now, available, max_tokens: available };
            let ix = &indexes[0];
            let expected = live
                .iter()
                .map(|&slot| (slot, ix.messages[slot as usize]))
                .filter(|(_, t)| t.tokens as f64 <= available)
                .map(|(slot, t)| {
                    let base = total(&weighted_factors(&weights, &t, now, available));
                    (weights.tier(t.priority), base, t.enqueued_at, u64::from(slot), slot)
                })
                .max_by(|a, b| rank((a.0, a.1, a.2, a.3), (b.0, b.1, b.2, b.3)))
                .map(|(tier, base, _, _, slot)| (tier, base, slot));
            for ix in &indexes {
                let found = best_candidate(ix, &context).map(|c| (c.tier, c.base, c.slot));
                prop_assert_eq!(found, expected);
                let visible: Vec<_> = live.iter().map(|&s| (s, ix.entries[s as usize])).collect();
                prop_assert_eq!(ix.index.check(&visible), Ok(()));
            }
            let taken = match (kind, expected) {
                (0 | 1 | 4, Some((_, _, slot))) => live.iter().position(|&s| s == slot),
                (2, _) if !live.is_empty() => Some(pick.index(live.len())),
                _ => None,
            };
            if let Some(at) = taken {
                let slot = live.swap_remove(at);
                for ix in &mut indexes {
                    ix.remove(slot);
                    if kind == 4 {
                        // Given back: the same message returns to the cell it left.
                        ix.index.insert(slot, &ix.entries[slot as usize]);
                    }
                }
                if kind == 4 {
                    live.push(slot);
                }
            }
            if kind == 2 || kind == 3 {
                add(&mut indexes, &mut live, refill, now);
            }
        }
    }
}
