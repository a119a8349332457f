"""`llmqd simulate --plot FILE.png`: the results as a picture, through matplotlib (extra
``[plot]``).

Six panels: the distribution of the wait per priority (URGENT, HIGH, NORMAL, LOW), and of the
light tenants' waits (those offering no more than their fair share of tokens), one line per
strategy, as the share of requests that waited longer than x (a log-log survival curve: the
tail, where the strategies differ, reads directly); and the queue depth over virtual time per
strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .simulate_result import SimulationResult
from .types import Priority

__all__ = ["MissingPlotDependency", "plot_results", "require_matplotlib"]

# Waits below this many seconds are drawn at it (a log axis has no zero).
_FLOOR = 1e-3


class MissingPlotDependency(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """The ``matplotlib.pyplot`` module on the non-interactive Agg backend; raises
    `MissingPlotDependency` naming the extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise MissingPlotDependency(
            "--plot needs matplotlib: pip install 'llm-queue-dispatcher[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _survival(waits: Sequence[float]) -> tuple[list[float], list[float]]:
    """(x, share of waits > x) of sorted ``waits``, thinned to at most ~400 steps."""
    n = len(waits)
    if n == 0:
        return [], []
    step = max(1, n // 400)
    xs: list[float] = []
    ys: list[float] = []
    for index in range(0, n, step):
        xs.append(max(waits[index], _FLOOR))
        ys.append((n - index) / n)
    xs.append(max(waits[-1], _FLOOR))
    ys.append(1.0 / n)
    return xs, ys


def plot_results(results: Sequence[SimulationResult], path: str | Path, title: str = "") -> None:
    """Draws ``results`` to ``path`` (PNG, or any format matplotlib knows by the extension)."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels: list[tuple[Any, str, list[list[float]]]] = []
    for position, priority in enumerate(Priority):
        panels.append(
            (
                axes.flat[position],
                f"{priority.name} wait",
                [r.wait_by_priority.get(priority.name, []) for r in results],
            )
        )
    light: list[list[float]] = []
    for result in results:
        light.append(sorted(w for name in result.light_tenants() for w in result.wait_by_tenant[name]))
    panels.append((axes.flat[4], "light tenants' wait", light))
    for ax, name, series in panels:
        for index, (result, waits) in enumerate(zip(results, series, strict=True)):
            xs, ys = _survival(waits)
            if xs:
                ax.step(xs, ys, where="post", color=colors[index % len(colors)], label=result.strategy)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("wait (s)")
        ax.set_ylabel("share of requests waiting longer")
        ax.grid(True, which="major", alpha=0.3)
        if not any(series):
            ax.text(0.5, 0.5, "no requests", transform=ax.transAxes, ha="center", va="center")
    depth = axes.flat[5]
    for index, result in enumerate(results):
        if result.queue_depth:
            times, counts = zip(*result.queue_depth, strict=True)
            depth.plot(times, counts, color=colors[index % len(colors)], label=result.strategy)
    depth.set_title("queue depth (waiting requests)")
    depth.set_xlabel("virtual time (s)")
    depth.set_ylabel("requests")
    depth.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, labels = depth.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 7) or 1)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=80)
    plt.close(figure)
