"""The report of `llmqd simulate`: strategies side by side (`format_table`) or one row each
(`format_summary`). A figure with nothing to measure shows as ``-`` (a class with no request, a
single tenant) and an empty group of tenants as ``none``, never as 0."""

from __future__ import annotations

from collections.abc import Sequence

from .simulate_result import SimulationResult
from .types import Priority

__all__ = ["format_summary", "format_table"]

_CLASSES = [p.name for p in Priority]


def _seconds(value: float | None, empty: str = "-") -> str:
    """Two decimals below 10 s (where the targets are), one above; ``empty`` for None."""
    if value is None:
        return empty
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _binding(result: SimulationResult) -> str:
    limit = result.binding_limit
    if limit is None:
        return "none"
    return f"{limit} {100 * result.blocked.shares()[limit]:.0f}%"


def _target(seconds: float) -> str:
    return f"{seconds:g} s"


def format_table(results: Sequence[SimulationResult], per_tenant: bool = False) -> str:
    """Strategies side by side, one row per figure; with ``per_tenant``, a row per tenant's
    p99 wait too."""
    rows: list[tuple[str, list[str]]] = [
        ("completed", [f"{r.completed}/{r.requests}" for r in results]),
        ("makespan (s)", [f"{r.makespan:.1f}" for r in results]),
        ("throughput (req/min)", [f"{r.throughput_per_minute:.1f}" for r in results]),
        ("utilisation to last dispatch", [f"{r.dispatch_utilisation:.3f}" for r in results]),
        ("utilisation, arrivals", [f"{r.arrival_utilisation:.3f}" for r in results]),
        ("binding limit (share held)", [_binding(r) for r in results]),
    ]
    percentiles = [r.wait_percentiles() for r in results]
    for name in _CLASSES:
        for q in ("p50", "p99"):
            rows.append((f"wait {q} {name} (s)", [_seconds(p[name][q]) for p in percentiles]))
    attainments = [r.slo_attainment() for r in results]
    targets = results[0].slo_targets if results else {}
    for name in _CLASSES:
        rows.append(
            (f"SLO {name} <= {_target(targets.get(name, 0.0))}", [_share(a[name]) for a in attainments])
        )
    summaries = [r.tenant_summary(per_tenant) for r in results]
    if any(summaries):
        for group in ("heavy", "light"):
            for q in ("p50", "p99"):
                rows.append(
                    (
                        f"{group} tenants wait {q} (s)",
                        [_seconds(s[f"{group}_wait_s"][q], "none") if s else "-" for s in summaries],
                    )
                )
        rows.append(
            (
                "worst light tenant p99 (s)",
                [_seconds(s["worst_light_p99_s"], "none") if s else "-" for s in summaries],
            )
        )
        rows.append(
            (
                "heavy / light tenants",
                [f"{len(s['heavy'])}/{len(s['light'])}" if s else "-" for s in summaries],
            )
        )
        if per_tenant:
            names = sorted({name for s in summaries if s for name in s["per_tenant"]})
            for name in names:
                rows.append(
                    (
                        f"tenant {name or '(none)'} p99 (s)",
                        [_seconds(s["per_tenant"][name]["wait_s"]["p99"]) if s else "-" for s in summaries],
                    )
                )
        rows.append(("Jain's index, 60 s windows", [_jain(r) for r in results]))
        rows.append(
            (
                "max service gap (tokens)",
                [f"{r.fairness.max_gap:,.0f}" if r.fairness.max_gap is not None else "-" for r in results],
            )
        )
    rows.append(("priority inversions", [f"{r.inversions:,}" for r in results]))
    if any(summaries):
        rows.append(("  within a tenant", [f"{r.inversions_within_tenant:,}" for r in results]))
    rows.append(("retries", [str(r.retries) for r in results]))
    rows.append(("dead-lettered", [str(r.dead_lettered) for r in results]))
    rows.append(("expired (retention)", [str(r.expired) for r in results]))
    rows.append(("unfittable (never fits)", [str(r.unfittable) for r in results]))
    if any(r.has_deadlines for r in results):
        rows.append(("sent past deadline", [str(r.past_deadline) for r in results]))
    if any(r.interrupted for r in results):
        rows.append(("unfinished (interrupted)", [str(r.unfinished) for r in results]))
    rows.append(("wall time (s)", [f"{r.wall_time:.1f}" for r in results]))
    return _columns([r.strategy for r in results], rows)


def _jain(result: SimulationResult) -> str:
    fairness = result.fairness
    if fairness.jain_mean is None or fairness.jain_min is None:
        return "-"
    return f"{fairness.jain_mean:.3f} (min {fairness.jain_min:.2f})"


def _columns(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(header[i]), *(len(values[i]) for _, values in rows)) for i in range(len(header))]
    lines = ["  ".join([" " * width0, *(h.rjust(w) for h, w in zip(header, widths, strict=True))])]
    for name, values in rows:
        lines.append(
            "  ".join([name.ljust(width0), *(v.rjust(w) for v, w in zip(values, widths, strict=True))])
        )
    return "\n".join(lines)


def format_summary(results: Sequence[SimulationResult]) -> str:
    """One row per strategy: utilisation, the p99 waits (per priority, light and heavy
    tenants), URGENT's SLO attainment, Jain's index, inversions, the binding limit and the wall
    time."""
    header = ["strategy", "util", *(f"{name} p99" for name in _CLASSES), "URGENT SLO"]
    tenants = any(r.tenant_summary(False) for r in results)
    if tenants:
        header += ["light p99", "worst light p99", "heavy p99", "Jain"]
    header += ["inversions", "binding", "wall s"]
    rows = [header]
    for result in results:
        waits = result.wait_percentiles()
        row = [
            result.strategy,
            f"{result.dispatch_utilisation:.3f}",
            *(_seconds(waits[name]["p99"]) for name in _CLASSES),
            _share(result.slo_attainment()["URGENT"]),
        ]
        if tenants:
            summary = result.tenant_summary(False)
            row += (
                [
                    _seconds(summary["light_wait_s"]["p99"], "none"),
                    _seconds(summary["worst_light_p99_s"], "none"),
                    _seconds(summary["heavy_wait_s"]["p99"], "none"),
                    _ratio(result.fairness.jain_mean),
                ]
                if summary
                else ["-", "-", "-", "-"]
            )
        row += [f"{result.inversions:,}", _binding(result), f"{result.wall_time:.1f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        )
        for row in rows
    )
