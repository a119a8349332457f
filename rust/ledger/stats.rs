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

    /// A message was handed out after waiting `wait` s (a negative wait, from a clock stepped
    /// back, counts as 0); selecting it took `latency` s.
    pub fn record_dispatch(&mut self, now: f64, wait: f64, latency: f64, tenant: u32, charged: u64) {
        push_bounded(&mut self.dispatches, Dispatch { at: now, wait: wait.max(0.0), tenant, charged });
        push_bounded(&mut self.latencies, latency.max(0.0));
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
        stats.record_dispatch(10.0, -5.0, -1.0, 0, 100);
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
        stats.record_dispatch(1.0, 2.0, 0.0, 3, 500);
        stats.record_completion(2.0, 200, 3, -300);
        stats.record_dispatch(1.0, 4.0, 0.0, 4, 100);
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
        stats.record_dispatch(1.0, 2.0, 0.0, 1, 500);
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
            stats.record_dispatch(0.0, 1.0, 0.0, 0, 1);
            stats.record_completion(0.0, 1, 0, i64::try_from(i % 2).unwrap());
        }
        assert!(stats.held() <= 3 * SAMPLES + 1);
    }
}
