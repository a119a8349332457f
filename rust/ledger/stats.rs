//! What a dispatcher's metrics report is computed from: streaming summaries of dispatches and
//! completions, bounded in memory whatever the rate.
//!
//! Each dispatch appends one sample (when, wait, tenant, tokens charged) to a ring of the last
//! [`SAMPLES`]; wait percentiles and per-tenant figures are computed from it when a report
//! asks, over the retention window (and, for token use, the fairness window). Throughput counts
//! completions per clock second over the last minute. Recording costs two pushes.

use std::collections::{HashMap, VecDeque};

/// Samples kept regardless of the clock (a `ManualClock` may never advance).
pub const SAMPLES: usize = 10_000;

/// Wait percentiles `(p50, p95, p99)` in seconds.
pub type Percentiles = (f64, f64, f64);

#[derive(Debug, Clone, Copy)]
struct Dispatch {
    at: f64,
    wait: f64,
    tenant: u32,
    charged: u64,
    priority: u8,
    /// The limit (an index into [`LIMITS`]) the limiter named when it last refused while this
    /// message waited, if it did.
    limit: Option<u8>,
}

/// The limits a dispatch can wait for, as the metrics name them, in the order of the limiter's
/// reasons (`rpm_limit`, `tpm_limit`, `itpm_limit`, `otpm_limit`, `rpd_limit`, `tpd_limit`,
/// `concurrency_limit`).
pub const LIMITS: [&str; 7] = ["RPM", "TPM", "ITPM", "OTPM", "RPD", "TPD", "concurrency"];

/// The reasons a limiter gives for a refusal, in the order of [`LIMITS`].
const REASONS: [&str; 7] =
    ["rpm_limit", "tpm_limit", "itpm_limit", "otpm_limit", "rpd_limit", "tpd_limit", "concurrency_limit"];

/// The index into [`LIMITS`] of a limiter's refusal `reason` (`"tpm_limit"`, …); None for a
/// reason no limit of the list gives.
pub fn limit_of_reason(reason: &str) -> Option<u8> {
    REASONS.iter().position(|r| *r == reason).map(|i| i as u8)
}

/// The default wait targets (seconds from enqueue to dispatch) per priority, URGENT first: what
/// `llmqd simulate` measures SLO attainment against by default.
pub const DEFAULT_SLO_TARGETS: [f64; 4] = [1.0, 30.0, 300.0, 1800.0];

/// One priority's SLO attainment over the retained dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SloCount {
    /// Dispatches of the priority.
    pub dispatched: u64,
    /// Those whose wait was at most the priority's target.
    pub met: u64,
}

/// Which limit made the retained dispatches wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitSummary {
    /// The binding limit (an index into [`LIMITS`]), None when none made a dispatch wait.
    pub binding: Option<u8>,
    /// Retained dispatches that waited for each limit, in the order of [`LIMITS`].
    pub waited: [u64; 7],
}

/// Counts per clock second over the last `span` seconds: O(span) memory, however many events
/// arrive.
#[derive(Debug, Clone)]
struct Window {
    span: f64,
    /// `(second, count, tokens)`, oldest first.
    buckets: VecDeque<(f64, f64, f64)>,
}

impl Window {
    fn add(&mut self, now: f64, count: f64, tokens: f64) {
        let second = now.floor();
        if let Some(last) = self.buckets.back_mut() {
            if last.0 >= second {
                // The current second (or a clock read before another's later reading: counted
                // in the latest second).
                last.1 += count;
                last.2 += tokens;
                return;
            }
        }
        self.buckets.push_back((second, count, tokens));
        self.expire(now);
    }

    fn expire(&mut self, now: f64) {
        let horizon = now - self.span;
        while self.buckets.front().is_some_and(|b| b.0 + 1.0 <= horizon) {
            self.buckets.pop_front();
        }
    }

    fn totals(&mut self, now: f64) -> (f64, f64) {
        self.expire(now);
        self.buckets.iter().fold((0.0, 0.0), |(c, t), b| (c + b.1, t + b.2))
    }
}

/// The `q` quantile (0..1) of sorted values, linearly interpolated; 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let position = (sorted.len() - 1) as f64 * q;
    let low = position.floor() as usize;
    let high = (low + 1).min(sorted.len() - 1);
    let fraction = position - low as f64;
    sorted[low] + (sorted[high] - sorted[low]) * fraction
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.95), percentile(&samples, 0.99))
}

fn push_bounded<T>(ring: &mut VecDeque<T>, value: T) {
    if ring.len() == SAMPLES {
        ring.pop_front();
    }
    ring.push_back(value);
}

/// One tenant's figures for a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantSummary {
    /// Tokens charged over the fairness window, with the marks' corrections.
    pub used: f64,
    /// Tokens of its requests marked processed.
    pub served: u64,
    /// Its wait percentiles over the retention window.
    pub waits: Percentiles,
}

/// A tenant's messages as its pool counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCount {
    /// The tenant (the pool's number).
    pub tenant: u32,
    /// Messages waiting (visible, or buffered).
    pub visible: usize,
    /// Messages in flight.
    pub in_flight: usize,
}

/// One tenant's line of a metrics report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantLine {
    /// The tenant (the pool's number).
    pub tenant: u32,
    /// Messages waiting.
    pub visible: usize,
    /// Messages in flight.
    pub in_flight: usize,
    /// Tokens in the fairness window: the fair policy's own use when it ranks, else the
    /// dispatches' charges with the marks' corrections.
    pub used: f64,
    /// Tokens of its requests marked processed.
    pub served: u64,
    /// Its wait percentiles.
    pub waits: Percentiles,
}

/// The summaries.
#[derive(Debug, Clone)]
pub struct Stats {
    retention: f64,
    fairness_window: f64,
    dispatches: VecDeque<Dispatch>,
    /// `(at, tenant, correction of a charge)` from the marks.
    corrections: VecDeque<(f64, u32, i64)>,
    completions: Window,
    latencies: VecDeque<f64>,
    served: HashMap<u32, u64>,
    /// Wait targets per priority, URGENT first.
    slo_targets: [f64; 4],
    /// When the limiter last refused a waiting message, and the limit it named.
    last_refusal: Option<(f64, u8)>,
    /// Whether nothing was handed out since that refusal: its limit holds the queue now.
    holding: bool,
    /// Tenants' names as first dispatched (a pool may forget an idle tenant's name while its
    /// figures are still reported; numbers are never reused).
    names: HashMap<u32, Box<str>>,
    /// Messages marked failed or dead-lettered.
    pub failed: u64,
    /// Messages marked processed.
    pub completed: u64,
    /// Requests removed unsent because their deadline had passed.
    pub expired_deadlines: u64,
}

impl Stats {
    /// Summaries over `retention` seconds (token use over `fairness_window`).
    pub fn new(retention: f64, fairness_window: f64) -> Self {
        Self {
            retention,
            fairness_window,
            dispatches: VecDeque::new(),
            corrections: VecDeque::new(),
            completions: Window { span: retention.min(60.0), buckets: VecDeque::new() },
            latencies: VecDeque::new(),
            served: HashMap::new(),
            slo_targets: DEFAULT_SLO_TARGETS,
            last_refusal: None,
            holding: false,
            names: HashMap::new(),
            failed: 0,
            completed: 0,
            expired_deadlines: 0,
        }
    }

    /// Samples held (for a memory bound test).
    pub fn held(&self) -> usize {
        self.dispatches.len() + self.corrections.len() + self.latencies.len() + self.completions.buckets.len()
    }

    /// Remembers the name of `tenant` (on its first dispatch).
    pub fn name_tenant(&mut self, tenant: u32, name: &str) {
        self.names.entry(tenant).or_insert_with(|| name.into());
    }

    /// The name of a tenant dispatched before.
    pub fn tenant_name(&self, tenant: u32) -> Option<&str> {
        self.names.get(&tenant).map(|name| &**name)
    }

    /// Sets the wait targets per priority (URGENT first) SLO attainment is measured against.
    pub fn set_slo_targets(&mut self, targets: [f64; 4]) {
        self.slo_targets = targets;
    }

    /// The wait targets per priority, URGENT first.
    pub fn slo_targets(&self) -> [f64; 4] {
        self.slo_targets
    }

    /// A message of `priority` was handed out after waiting `wait` s (a negative wait, from a
    /// clock stepped back, counts as 0); selecting it took `latency` s. It waited for the limit
    /// of the latest refusal if that came after its enqueue.
    pub fn record_dispatch(
        &mut self,
        now: f64,
        wait: f64,
        latency: f64,
        tenant: u32,
        charged: u64,
        priority: u8,
    ) {
        let enqueued_at = now - wait;
        let limit = self.last_refusal.filter(|&(at, _)| at >= enqueued_at).map(|(_, limit)| limit);
        let dispatch = Dispatch { at: now, wait: wait.max(0.0), tenant, charged, priority, limit };
        push_bounded(&mut self.dispatches, dispatch);
        push_bounded(&mut self.latencies, latency.max(0.0));
        self.holding = false;
    }

    /// The limiter refused a waiting message at `now`, naming `limit` (an index into [`LIMITS`],
    /// from [`limit_of_reason`]). Only the latest refusal is kept.
    pub fn record_refusal(&mut self, now: f64, limit: u8) {
        if usize::from(limit) < LIMITS.len() {
            self.last_refusal = Some((now, limit));
            self.holding = true;
        }
    }

    /// Per priority (URGENT first), the retained dispatches and those that waited at most the
    /// priority's target.
    pub fn slo(&mut self, now: f64) -> [SloCount; 4] {
        let targets = self.slo_targets;
        let mut counts = [SloCount::default(); 4];
        for d in self.recent(now) {
            let class = usize::from(d.priority.min(3));
            counts[class].dispatched += 1;
            if d.wait <= targets[class] {
                counts[class].met += 1;
            }
        }
        counts
    }

    /// Which limit made the retained dispatches wait: the latest refusal's while nothing has
    /// been handed out since it (the limit holding the queue now), else the limit most of them
    /// waited for (the later on a tie); None when none waited for a limit.
    pub fn limits(&mut self, now: f64) -> LimitSummary {
        let horizon = now - self.retention;
        let mut summary = LimitSummary::default();
        let mut latest = [f64::NEG_INFINITY; 7];
        for d in self.recent(now) {
            if let Some(limit) = d.limit {
                summary.waited[usize::from(limit)] += 1;
                latest[usize::from(limit)] = latest[usize::from(limit)].max(d.at);
            }
        }
        let current = self.last_refusal.filter(|&(at, _)| self.holding && at >= horizon);
        summary.binding = current.map(|(_, limit)| limit).or_else(|| {
            (0..LIMITS.len())
                .filter(|&i| summary.waited[i] > 0)
                .max_by(|&a, &b| {
                    summary.waited[a].cmp(&summary.waited[b]).then(latest[a].total_cmp(&latest[b]))
                })
                .map(|i| i as u8)
        });
        summary
    }

    /// A message was marked processed having used `tokens`; `correction` is the difference from
    /// what its dispatch charged the tenant.
    pub fn record_completion(&mut self, now: f64, tokens: u64, tenant: u32, correction: i64) {
        self.completed += 1;
        self.completions.add(now, 1.0, tokens as f64);
        *self.served.entry(tenant).or_default() += tokens;
        self.record_correction(now, tenant, correction);
    }

    /// A message was marked failed or dead-lettered; `correction` takes back its charge.
    pub fn record_failure(&mut self, now: f64, tenant: u32, correction: i64) {
        self.failed += 1;
        self.record_correction(now, tenant, correction);
    }

    /// A charge corrected without a completion or a failure (a message given back unprocessed).
    pub fn record_correction(&mut self, now: f64, tenant: u32, correction: i64) {
        if correction != 0 {
            push_bounded(&mut self.corrections, (now, tenant, correction));
        }
    }

    fn recent(&mut self, now: f64) -> impl Iterator<Item = &Dispatch> {
        let horizon = now - self.retention;
        while self.dispatches.front().is_some_and(|d| d.at < horizon) {
            self.dispatches.pop_front();
        }
        self.dispatches.iter()
    }

    /// Average wait and its percentiles over the retained dispatches.
    pub fn wait_times(&mut self, now: f64) -> (f64, Percentiles) {
        let waits: Vec<f64> = self.recent(now).map(|d| d.wait).collect();
        if waits.is_empty() {
            return (0.0, (0.0, 0.0, 0.0));
        }
        let average = waits.iter().sum::<f64>() / waits.len() as f64;
        (average, percentiles(waits))
    }

    /// Completions and tokens per minute over the last 60 s of the clock (or the retention).
    pub fn throughput(&mut self, now: f64) -> (f64, f64) {
        let (messages, tokens) = self.completions.totals(now);
        let scale = 60.0 / self.completions.span;
        (messages * scale, tokens * scale)
    }

    /// `(p50, p99)` of the time spent selecting, over the last samples.
    pub fn dequeue_latency(&self) -> (f64, f64) {
        let mut sorted: Vec<f64> = self.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        (percentile(&sorted, 0.5), percentile(&sorted, 0.99))
    }

    /// Per tenant seen in the retained dispatches or in `keep`: token use charged over the
    /// fairness window (with the marks' corrections), tokens served, wait percentiles.
    pub fn tenant_summaries(&mut self, now: f64, keep: &[u32]) -> Vec<(u32, TenantSummary)> {
        let window = now - self.fairness_window;
        let mut waits: HashMap<u32, Vec<f64>> = keep.iter().map(|&t| (t, Vec::new())).collect();
        let mut used: HashMap<u32, f64> = HashMap::new();
        let recent: Vec<Dispatch> = self.recent(now).copied().collect();
        for d in recent {
            waits.entry(d.tenant).or_default().push(d.wait);
            if d.at > window {
                *used.entry(d.tenant).or_default() += d.charged as f64;
            }
        }
        for &(at, tenant, correction) in &self.corrections {
            if at > window {
                if let Some(u) = used.get_mut(&tenant) {
                    *u += correction as f64;
                }
            }
        }
        let mut out: Vec<(u32, TenantSummary)> = waits
            .into_iter()
            .map(|(tenant, samples)| {
                let summary = TenantSummary {
                    used: used.get(&tenant).copied().unwrap_or(0.0).max(0.0),
                    served: self.served.get(&tenant).copied().unwrap_or(0),
                    waits: percentiles(samples),
                };
                (tenant, summary)
            })
            .collect();
        out.sort_by_key(|(tenant, _)| *tenant);
        out
    }
}

impl Stats {
    /// The tenant lines of a report at `now`: every tenant the pool `counts`, has recent
    /// dispatches, or (with `fair_usage`, what the fair policy ranks by) used tokens in the
    /// window.
    pub fn tenant_lines(
        &mut self,
        now: f64,
        counts: &[TenantCount],
        fair_usage: Option<&[(u32, f64)]>,
    ) -> Vec<TenantLine> {
        let keep: Vec<u32> = counts.iter().map(|c| c.tenant).collect();
        let summaries = self.tenant_summaries(now, &keep);
        let usage_of =
            |tenant: u32| fair_usage.and_then(|u| u.iter().find(|(t, _)| *t == tenant).map(|(_, u)| *u));
        let mut lines: Vec<TenantLine> = summaries
            .iter()
            .map(|&(tenant, summary)| {
                let count = counts.iter().find(|c| c.tenant == tenant);
                TenantLine {
                    tenant,
                    visible: count.map_or(0, |c| c.visible),
                    in_flight: count.map_or(0, |c| c.in_flight),
                    used: if fair_usage.is_some() { usage_of(tenant).unwrap_or(0.0) } else { summary.used },
                    served: summary.served,
                    waits: summary.waits,
                }
            })
            .collect();
        for &(tenant, used) in fair_usage.unwrap_or(&[]) {
            if !summaries.iter().any(|(t, _)| *t == tenant) {
                lines.push(TenantLine {
                    tenant,
                    visible: 0,
                    in_flight: 0,
                    used,
                    served: 0,
                    waits: (0.0, 0.0, 0.0),
                });
            }
        }
        lines
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_linearly() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(percentile(&[1.0, 2.0], 0.99), 1.99);
    }

    #[test]
    fn a_clock_stepped_back_never_reports_a_negative_wait() {
        let mut stats = Stats::new(300.0, 60.0);
        stats.record_dispatch(10.0, -5.0, -1.0, 0, 100, 2);
        assert_eq!(stats.wait_times(10.0), (0.0, (0.0, 0.0, 0.0)));
        assert_eq!(stats.dequeue_latency(), (0.0, 0.0));
    }

    #[test]
    fn throughput_counts_the_last_minute() {
        let mut stats = Stats::new(300.0, 60.0);
        stats.record_completion(0.5, 100, 0, 0);
        stats.record_completion(30.0, 300, 0, 0);
        assert_eq!(stats.throughput(30.0), (2.0, 400.0));
        assert_eq!(stats.throughput(61.0), (1.0, 300.0));
    }

    #[test]
    fn tenant_use_is_charged_then_corrected_within_the_window() {
        let mut stats = Stats::new(300.0, 60.0);
        stats.record_dispatch(1.0, 2.0, 0.0, 3, 500, 2);
        stats.record_completion(2.0, 200, 3, -300);
        stats.record_dispatch(1.0, 4.0, 0.0, 4, 100, 2);
        stats.record_failure(2.0, 4, -100);
        let summaries = stats.tenant_summaries(10.0, &[7]);
        assert_eq!(summaries.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [3, 4, 7]);
        assert_eq!(summaries[0].1.used, 200.0);
        assert_eq!(summaries[0].1.served, 200);
        assert_eq!(summaries[1].1.used, 0.0);
        assert_eq!(summaries[2].1, TenantSummary { used: 0.0, served: 0, waits: (0.0, 0.0, 0.0) });
        // Past the window the use is gone; past the retention the waits too.
        assert_eq!(stats.tenant_summaries(100.0, &[])[0].1.used, 0.0);
        assert!(stats.tenant_summaries(400.0, &[]).is_empty());
    }

    #[test]
    fn tenant_lines_join_counts_summaries_and_the_fair_use() {
        let mut stats = Stats::new(300.0, 60.0);
        stats.record_dispatch(1.0, 2.0, 0.0, 1, 500, 2);
        let counts = [TenantCount { tenant: 2, visible: 3, in_flight: 1 }];
        let lines = stats.tenant_lines(10.0, &counts, None);
        assert_eq!(
            lines.iter().map(|l| (l.tenant, l.visible, l.in_flight, l.used)).collect::<Vec<_>>(),
            [(1, 0, 0, 500.0), (2, 3, 1, 0.0)]
        );
        // Under fair_priority the policy's own use replaces the charges; a tenant only it knows
        // gets a line too.
        let lines = stats.tenant_lines(10.0, &counts, Some(&[(1, 7.0), (9, 4.0)]));
        assert_eq!(
            lines.iter().map(|l| (l.tenant, l.used)).collect::<Vec<_>>(),
            [(1, 7.0), (2, 0.0), (9, 4.0)]
        );
    }

    #[test]
    fn memory_is_bounded_whatever_the_rate() {
        let mut stats = Stats::new(300.0, 60.0);
        for i in 0..3 * SAMPLES {
            stats.record_dispatch(0.0, 1.0, 0.0, 0, 1, 2);
            stats.record_refusal(0.0, 1);
            stats.record_completion(0.0, 1, 0, i64::try_from(i % 2).unwrap());
        }
        assert!(stats.held() <= 3 * SAMPLES + 1);
    }

    #[test]
    fn slo_attainment_counts_the_waits_within_each_priority_target() {
        let mut stats = Stats::new(300.0, 60.0);
        stats.set_slo_targets([1.0, 30.0, 300.0, 1800.0]);
        // URGENT: 0.5 and exactly 1.0 meet the target, 1.5 misses; HIGH: 31 misses.
        for (wait, priority) in [(0.5, 0), (1.0, 0), (1.5, 0), (31.0, 1)] {
            stats.record_dispatch(10.0, wait, 0.0, 0, 1, priority);
        }
        let slo = stats.slo(10.0);
        assert_eq!(slo[0], SloCount { dispatched: 3, met: 2 });
        assert_eq!(slo[1], SloCount { dispatched: 1, met: 0 });
        assert_eq!(slo[2], SloCount::default());
        // Past the retention the dispatches are gone.
        assert_eq!(stats.slo(400.0), [SloCount::default(); 4]);
    }

    #[test]
    fn a_dispatch_waited_for_the_latest_refusal_after_its_enqueue() {
        let mut stats = Stats::new(300.0, 60.0);
        assert_eq!(stats.limits(0.0), LimitSummary::default());
        stats.record_refusal(5.0, limit_of_reason("tpm_limit").unwrap());
        // Enqueued at 4 (before the refusal): it waited for TPM.
        stats.record_dispatch(6.0, 2.0, 0.0, 0, 1, 2);
        // Enqueued at 5.5 (after it): it did not wait for a limit.
        stats.record_dispatch(6.0, 0.5, 0.0, 0, 1, 2);
        let limits = stats.limits(6.0);
        assert_eq!(limits.waited, [0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(limits.binding.map(|i| LIMITS[usize::from(i)]), Some("TPM"));
    }

    #[test]
    fn the_binding_limit_is_the_one_holding_the_queue_now_else_the_most_waited_for() {
        let (rpm, tpm) = (limit_of_reason("rpm_limit").unwrap(), limit_of_reason("tpm_limit").unwrap());
        let name = |summary: LimitSummary| summary.binding.map(|i| LIMITS[usize::from(i)]);
        let mut stats = Stats::new(300.0, 60.0);
        stats.record_refusal(1.0, tpm);
        stats.record_dispatch(2.0, 2.0, 0.0, 0, 1, 2);
        stats.record_dispatch(2.0, 2.0, 0.0, 0, 1, 2);
        stats.record_refusal(3.0, rpm);
        stats.record_dispatch(4.0, 4.0, 0.0, 0, 1, 2);
        // Two dispatches waited for TPM, one for RPM.
        assert_eq!(stats.limits(4.0).waited[..2], [1, 2]);
        assert_eq!(name(stats.limits(4.0)), Some("TPM"));
        // A refusal with nothing handed out since: that limit holds the queue now.
        stats.record_refusal(5.0, rpm);
        assert_eq!(name(stats.limits(5.0)), Some("RPM"));
        // Out of the window: none.
        assert_eq!(stats.limits(400.0), LimitSummary::default());
        assert_eq!(limit_of_reason("penalty"), None);
    }
}
