//! The selection index alone, at the depth of `benches/compare.py`'s workload: fill a store at one
//! instant, then per round advance 1 ms, find the best message (`select::best_candidate`, the
//! score policy's default weights, a budget that never binds), receive it, delete it and enqueue
//! the next request. Prints p50/p99/max per part and the fill rate.
//!
//!     cargo run --release --example index_round -- [depth] [rounds] [batch size]
//!
//! The defaults (1M, 1,100, one batch of the whole depth) are `compare.py`'s at 1M.

use std::time::Instant;

use _core::cells::CellKey;
use _core::index::CellSummary;
use _core::policy::Rankings;
use _core::scoring::{static_cell_bound, wait_time_factor, MessageTraits, Weights};
use _core::select::{best_candidate, Candidate, CandidateIndex, SearchContext};
use _core::store::{NewMessage, Store, StoreConfig};

/// mulberry32, as in `benches/compare.py`.
struct Mulberry32(u32);

impl Mulberry32 {
    fn next_float(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x6D2B_79F5);
        let a = self.0;
        let mut t = (a ^ (a >> 15)).wrapping_mul(1 | a);
        t = (t.wrapping_add((t ^ (t >> 7)).wrapping_mul(0x3D | t))) ^ t;
        f64::from(t ^ (t >> 14)) / 4_294_967_296.0
    }
}

struct Workload {
    rng: Mulberry32,
    index: u64,
}

impl Workload {
    fn next(&mut self) -> NewMessage<u32> {
        let r: [f64; 4] = std::array::from_fn(|_| self.rng.next_float());
        let priority = [0.1, 0.3, 0.8, 1.0].iter().position(|&b| r[0] < b).unwrap() as u8;
        let tokens = 50 + (r[1] * 3951.0).floor() as u64;
        let expected = (r[2] < 0.25).then(|| 0.5 + r[3] * 39.5);
        let id = format!("w{}", self.index);
        self.index += 1;
        NewMessage {
            request_id: id.into(),
            payload: 0,
            priority,
            tokens,
            expected_processing_seconds: expected,
            tenant: None,
            deadline: None,
        }
    }
}

/// The store as the search sees it, counting what the search reads: cells, group heads
/// offered, members scored, run steps, age frontiers and their points.
struct Counting<'a> {
    store: &'a Store<u32, Rankings>,
    counts: std::cell::Cell<[u64; 6]>,
}

impl Counting<'_> {
    fn bump(&self, i: usize, by: u64) {
        let mut c = self.counts.get();
        c[i] += by;
        self.counts.set(c);
    }
}

impl CandidateIndex for Counting<'_> {
    fn for_each_cell(&self, mut visit: impl FnMut(&CellKey, &CellSummary)) {
        self.store.for_each_cell(|k, s| {
            self.bump(0, 1);
            visit(k, s);
        });
    }
    fn for_each_priority(&self, mut visit: impl FnMut(u8, &[(CellKey, CellSummary)])) {
        self.store.for_each_priority(|priority, cells| {
            self.bump(0, cells.len() as u64);
            visit(priority, cells);
        });
    }
    fn for_each_group_head(&self, key: &CellKey, mut visit: impl FnMut(u32, u64, f64, bool)) {
        self.store.for_each_group_head(key, |a, b, c, d| {
            self.bump(1, 1);
            visit(a, b, c, d);
        });
    }
    fn for_each_group_by_time(
        &self,
        key: &CellKey,
        mut visit: impl FnMut(u64, f64, &dyn Fn() -> (u32, bool)) -> bool,
    ) {
        self.store.for_each_group_by_time(key, |tokens, time_ms, head| {
            self.bump(1, 1);
            visit(tokens, time_ms, head)
        });
    }
    fn for_each_age_point(
        &self,
        key: &CellKey,
        summary: &CellSummary,
        mut visit: impl FnMut(f64, f64) -> bool,
    ) {
        self.bump(4, 1);
        self.store.for_each_age_point(key, summary, |a, b| {
            self.bump(5, 1);
            visit(a, b)
        });
    }
    fn next_in_run(&self, slot: u32) -> Option<u32> {
        self.store.next_in_run(slot)
    }
    fn next_run_head(&self, slot: u32) -> Option<u32> {
        self.bump(3, 1);
        self.store.next_run_head(slot)
    }
    fn traits(&self, slot: u32) -> MessageTraits {
        self.bump(2, 1);
        self.store.traits(slot)
    }
    fn seq(&self, slot: u32) -> u64 {
        self.store.seq(slot)
    }
}

fn pct(samples: &mut [u64], p: f64) -> f64 {
    samples.sort_unstable();
    let rank = ((p / 100.0 * samples.len() as f64).ceil() as usize).max(1);
    samples[rank - 1] as f64 / 1000.0
}

fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0) * 4096
}

type IndexStore = Store<u32, Rankings>;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let depth = args.first().copied().unwrap_or(1_000_000);
    let rounds = args.get(1).copied().unwrap_or(1_100) as usize;
    let batch_size = args.get(2).copied().unwrap_or(depth).max(1) as usize;
    let mut work = Workload { rng: Mulberry32(20_240_601), index: 0 };
    let mut now = 1_700_000_000.0;
    let mut store = fill(&mut work, depth, batch_size, now);
    let weights = Weights::default();
    let counted = std::env::var_os("COUNT").is_some();
    let mut totals = [0u64; 6];
    let mut per_round: Vec<(u64, usize, [u64; 6])> = Vec::new();
    let mut samples: [Vec<u64>; 4] = Default::default();
    for round in 0..rounds {
        now += 0.001;
        let context = SearchContext { weights, now, available: 1e9, max_tokens: 1e9 };
        let t0 = Instant::now();
        let best = if counted {
            let counting = Counting { store: &store, counts: std::cell::Cell::new([0; 6]) };
            let best = best_candidate(&counting, &context);
            let c = counting.counts.get();
            per_round.push((0, round, c));
            for (total, count) in totals.iter_mut().zip(c) {
                *total += count;
            }
            best
        } else {
            best_candidate(&store, &context)
        }
        .expect("a candidate");
        let t1 = Instant::now();
        if counted && std::env::var_os("BOUNDS").is_some() && round % 5000 == 4999 {
            print_bounds(&store, &context, round, &best);
        }
        let t2 = Instant::now();
        let handle = store.receive_slot(best.slot, 30.0, now).unwrap();
        let t3 = Instant::now();
        store.delete(&handle.to_string(), now).unwrap();
        let t4 = Instant::now();
        store.enqueue(work.next(), now).unwrap();
        let t5 = Instant::now();
        for (sample, (a, b)) in samples.iter_mut().zip([(t0, t1), (t2, t3), (t3, t4), (t4, t5)]) {
            sample.push((b - a).as_nanos() as u64);
        }
        if let Some(last) = per_round.last_mut() {
            last.0 = (t1 - t0).as_nanos() as u64;
        }
    }
    if let Some(times) = std::env::var("WARM").ok().and_then(|v| v.parse::<usize>().ok()) {
        // The same search again and again on one state: its cost with the index in cache.
        let context = SearchContext { weights, now, available: 1e9, max_tokens: 1e9 };
        let mut warm = Vec::new();
        for _ in 0..times {
            let t0 = Instant::now();
            std::hint::black_box(best_candidate(&store, &context));
            warm.push(t0.elapsed().as_nanos() as u64);
        }
        println!("same search, in cache: p50 {:.2} µs", pct(&mut warm, 50.0));
    }
    if counted {
        let per = |i: usize| totals[i] as f64 / rounds as f64;
        println!(
            "per search: {:.0} cells offered, {:.0} group heads, {:.1} members scored, {:.1} run steps, {:.1} age frontiers read ({:.1} points)",
            per(0),
            per(1),
            per(2),
            per(3),
            per(4),
            per(5)
        );
        // The slowest after the warm-up rounds (those the p50 and p99 below are over).
        per_round.retain(|r| r.1 >= rounds / 11);
        per_round.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
        for (ns, round, c) in per_round.iter().take(12) {
            println!("  slowest: round {round}: {:.1} µs, counts {c:?}", *ns as f64 / 1000.0);
        }
    }
    let warm = rounds / 11;
    if counted {
        // The slowest receive + delete after the warm-up: a frontier repair shows here.
        let mut slow: Vec<(u64, usize)> =
            (warm..rounds).map(|r| (samples[1][r] + samples[2][r], r)).collect();
        slow.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        let slow: Vec<String> =
            slow.iter().take(12).map(|(ns, r)| format!("{r}: {:.1}", *ns as f64 / 1000.0)).collect();
        println!("  slowest receive + delete (round: µs): {}", slow.join(", "));
    }
    for (name, samples) in ["search", "receive", "delete", "enqueue"].into_iter().zip(samples) {
        let first: Vec<u64> = samples[..warm.min(5)].to_vec();
        let mut rest = samples[warm..].to_vec();
        println!(
            "{name:>8}: p50 {:.2} µs, p99 {:.2} µs, max {:.2} µs; first rounds {:?} ns",
            pct(&mut rest, 50.0),
            pct(&mut rest, 99.0),
            pct(&mut rest, 100.0),
            first
        );
    }
}

/// A store holding `depth` messages of the workload, enqueued at `now` in batches of
/// `batch_size`; prints the fill rate and the RSS growth per message.
fn fill(work: &mut Workload, depth: u64, batch_size: usize, now: f64) -> IndexStore {
    let mut store = Store::with_ranking(StoreConfig::default(), now, Rankings::default()).unwrap();
    let mut batch: Vec<_> = (0..depth).map(|_| work.next()).collect();
    let before = rss();
    let started = Instant::now();
    for chunk in batch.chunks_mut(batch_size) {
        let mut chunk: Vec<_> = chunk.iter_mut().map(|m| std::mem::replace(m, placeholder())).collect();
        store.enqueue_batch(&mut chunk, now).unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(batch);
    let after = rss();
    println!(
        "fill {depth}: {:.0} msgs/s, {:.1} B/msg (RSS growth; the ids were allocated before)",
        depth as f64 / seconds,
        (after - before) as f64 / depth as f64
    );
    store
}

/// The cells whose bound is above the best found, the loosest first.
fn print_bounds(store: &IndexStore, context: &SearchContext, round: usize, best: &Candidate) {
    let weights = &context.weights;
    let mut above = Vec::new();
    store.for_each_cell(|key, cell| {
        let wait = weights.wait_time * wait_time_factor(context.now - cell.oldest_enqueued_at, key.priority);
        let bound = static_cell_bound(weights, key, cell.best_time_ms, context.available, context.max_tokens);
        if let Some(bound) = bound.map(|b| b + wait).filter(|b| *b >= best.base) {
            above.push((bound - best.base, key.priority, key.token_class, cell.best_time_ms));
        }
    });
    above.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "round {round}: best {:.12} (tokens {}, time {:?}), {} cells bound above it: {:?}",
        best.base,
        best.tokens,
        store.message(best.slot).expected_processing_seconds(),
        above.len(),
        &above[..above.len().min(6)]
    );
}

fn placeholder() -> NewMessage<u32> {
    NewMessage {
        request_id: "".into(),
        payload: 0,
        priority: 0,
        tokens: 0,
        expected_processing_seconds: None,
        tenant: None,
        deadline: None,
    }
}
