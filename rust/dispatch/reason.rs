//! The words of a dispatch's `reason`: why its message won, as a person reads it.

use crate::fair::FairRank;
use crate::store::py_repr;

use super::{Capacity, Facts};

const PRIORITY_NAMES: [&str; 4] = ["URGENT", "HIGH", "NORMAL", "LOW"];

/// `(urgent, tenant rank, tenant use, effective priority)` of a fair choice: its score's
/// breakdown.
pub fn fair_breakdown(rank: FairRank) -> (bool, usize, f64, u8) {
    match rank {
        FairRank::Urgent => (true, 0, 0.0, 0),
        FairRank::Tenant { rank, usage, effective_priority, .. } => (false, rank, usage, effective_priority),
    }
}

/// The reason of a choice: the score policy's total and its top three weighted factors (of
/// `names`, the factors' then the custom scorers'), or the `fair_priority` policy's rank of the
/// tenant (`tenant`, its request's `priority`, the seconds it `waited`, over `window` seconds).
pub fn describe(
    facts: &Facts,
    names: &[String],
    tenant: &str,
    priority: u8,
    waited: f64,
    window: f64,
) -> String {
    match facts {
        Facts::Score { factors, custom, total } => {
            let mut parts: Vec<(&str, f64)> =
                names.iter().map(String::as_str).zip(factors.iter().chain(custom).copied()).collect();
            // A stable sort: equal parts keep the factors' order, as Python's `sorted` does.
            parts.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> =
                parts.iter().take(3).filter(|(_, v)| *v > 0.0).map(|(n, v)| format!("{n} {v:.3}")).collect();
            if top.is_empty() {
                format!("score {total:.3}")
            } else {
                format!("score {total:.3}: {}", top.join(", "))
            }
        }
        Facts::Fair(candidate) => {
            let who = if tenant.is_empty() {
                "the default tenant".to_owned()
            } else {
                format!("tenant {}", py_repr(tenant))
            };
            let waited = waited.max(0.0);
            match candidate.rank {
                FairRank::Urgent => format!("fair_priority: URGENT first ({who}), waited {waited:.1} s"),
                FairRank::Tenant { rank, of, usage, effective_priority } => {
                    let name = PRIORITY_NAMES[usize::from(effective_priority.min(3))];
                    let aged = if effective_priority < priority {
                        format!(" (aged from {})", PRIORITY_NAMES[usize::from(priority.min(3))])
                    } else {
                        String::new()
                    };
                    format!(
                        "fair_priority: {who} used {} tokens in the last {} s (rank {rank} of {of}); {name}{aged}; \
                         waited {waited:.1} s",
                        thousands(usage),
                        general(window),
                    )
                }
            }
        }
    }
}

/// The warning logged once for a request the limiter can never grant, a `logging` format
/// whose `%r` is the request id: the capacity of the limits counting the whole estimate, then
/// those of the input and output limits where there are any (`1000; input 300, output 200`).
pub fn unfittable_warning(capacity: Capacity) -> String {
    let parts: Vec<String> = [("input", capacity.input), ("output", capacity.output)]
        .into_iter()
        .filter(|(_, value)| value.is_finite())
        .map(|(name, value)| format!("{name} {}", general(value)))
        .collect();
    let mut shown = general(capacity.whole);
    if !parts.is_empty() {
        shown = format!("{shown}; {}", parts.join(", "));
    }
    format!(
        "request %r needs more tokens than the limiter can ever grant (capacity {shown}); take it out with \
         take_unfittable()"
    )
}

/// `value` with thousands separators and no decimals (Python's `f"{value:,.0f}"`).
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Python's `f"{value:g}"`: six significant digits, trailing zeros dropped, an exponent
/// (`e+06`) below 1e-4 and from 1e6 on.
fn general(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let exponent = value.abs().log10().floor() as i32;
    let trim = |text: String| -> String {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    if (-4..6).contains(&exponent) {
        let decimals = usize::try_from(5 - exponent).unwrap_or(0);
        trim(format!("{value:.decimals$}"))
    } else {
        let mantissa = value / 10f64.powi(exponent);
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(format!("{mantissa:.5}")), exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fair::FairCandidate;

    #[test]
    fn numbers_read_as_python_formats_them() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.6), "1,000");
        assert_eq!(thousands(0.0), "0");
        assert_eq!(general(60.0), "60");
        assert_eq!(general(0.5), "0.5");
        assert_eq!(general(12.25), "12.25");
        assert_eq!(general(1e6), "1e+06");
        assert_eq!(general(0.00001), "1e-05");
        assert_eq!(general(123_456.0), "123456");
    }

    #[test]
    fn the_unfittable_warning_names_each_finite_capacity() {
        let tail = "; take it out with take_unfittable()";
        assert_eq!(
            unfittable_warning(Capacity::whole(1000.0)),
            format!("request %r needs more tokens than the limiter can ever grant (capacity 1000){tail}")
        );
        let parts = Capacity { whole: 2e6, input: 300.0, output: f64::INFINITY };
        assert!(unfittable_warning(parts).contains("(capacity 2e+06; input 300)"));
        let both = Capacity { whole: f64::INFINITY, input: 300.5, output: 200.0 };
        assert!(unfittable_warning(both).contains("(capacity inf; input 300.5, output 200)"));
    }

    #[test]
    fn a_score_reason_names_the_top_three_factors() {
        let names: Vec<String> =
            ["a", "b", "c", "d", "e", "f", "mine"].iter().map(|s| (*s).to_owned()).collect();
        let facts = Facts::Score { factors: [0.1, 0.0, 0.3, 0.2, 0.0, 0.05], custom: vec![0.2], total: 0.85 };
        assert_eq!(describe(&facts, &names, "", 2, 0.0, 60.0), "score 0.850: c 0.300, d 0.200, mine 0.200");
        let nothing = Facts::Score { factors: [0.0; 6], custom: vec![], total: 0.0 };
        assert_eq!(describe(&nothing, &names, "", 2, 0.0, 60.0), "score 0.000");
    }

    #[test]
    fn a_fair_reason_names_the_tenant_and_its_rank() {
        let rank = FairRank::Tenant { rank: 2, of: 3, usage: 12_345.0, effective_priority: 1 };
        let facts = Facts::Fair(FairCandidate { slot: 0, tenant: 1, urgent: false, backlogged: false, rank });
        assert_eq!(
            describe(&facts, &[], "acme", 2, 4.25, 60.0),
            "fair_priority: tenant 'acme' used 12,345 tokens in the last 60 s (rank 2 of 3); HIGH (aged from \
             NORMAL); waited 4.2 s"
        );
        let urgent = Facts::Fair(FairCandidate {
            slot: 0,
            tenant: 0,
            urgent: true,
            backlogged: false,
            rank: FairRank::Urgent,
        });
        assert_eq!(
            describe(&urgent, &[], "", 0, -1.0, 60.0),
            "fair_priority: URGENT first (the default tenant), waited 0.0 s"
        );
    }
}
