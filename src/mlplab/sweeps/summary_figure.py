"""summary.png: a sweep's best validation accuracy against each swept key, and its top runs' curves."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlplab.run.records import MONITOR


def plot(finished: list[dict[str, Any]], swept: list[str], path: Path, top: int = 5) -> None:
    """best val/acc of the ``finished`` jobs (ranked, best first) against each ``swept`` key but the seed (one line
    per value of a second key), and the top runs' curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = [key for key in swept if key != "seed"]
    panels = len(keys) + 1
    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        others = [other for other in keys if other != key]
        _plot_against(axis, finished, key, others[0] if others else None)
    curves = axes.flat[len(keys)]
    for job in finished[:top]:
        history = [point for point in job["history"] if MONITOR in point]
        label = " ".join(f"{key}={job['values'][key]}" for key in swept if key in job["values"])
        curves.plot([p["epoch"] for p in history], [p[MONITOR] for p in history], marker="o", label=label or job["job"])
    curves.set(title=f"{MONITOR} per epoch, top {min(top, len(finished))} runs", xlabel="epoch", ylabel=MONITOR)
    curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if finished:
        curves.legend(fontsize=7)
    for axis in list(axes.flat)[panels:]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_against(axis: Any, jobs: list[dict[str, Any]], key: str, line_key: str | None) -> None:
    """Mean best val/acc per value of ``key`` (error bars: spread over the other keys and seeds)."""
    values = sorted({job["values"][key] for job in jobs if key in job["values"]}, key=_sort_key)
    numeric = all(_is_number(value) for value in values)
    positions = {value: float(value) if numeric else index for index, value in enumerate(values)}
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        lines[job["values"].get(line_key, "") if line_key else "all"].append(job)
    for label, members in sorted(lines.items(), key=lambda item: _sort_key(item[0])):
        points = defaultdict(list)
        for job in members:
            points[job["values"].get(key)].append(job[MONITOR])
        xs = [value for value in values if value in points]
        axis.errorbar(
            [positions[x] for x in xs],
            [statistics.fmean(points[x]) for x in xs],
            yerr=[_std(points[x]) or 0.0 for x in xs],
            marker="o",
            capsize=3,
            label=f"{line_key}={label}" if line_key else None,
        )
    if numeric and values and float(values[0]) > 0 and float(values[-1]) / float(values[0]) >= 8:
        axis.set_xscale("log", base=2)  # widths, batch sizes, learning rates: spaced by factors
    axis.set_xticks(list(positions.values()), list(positions), rotation=20 if not numeric else 0)
    axis.minorticks_off()
    axis.set(title=f"best {MONITOR} by {key}", xlabel=key, ylabel=f"best {MONITOR} (mean ± sd of its jobs)")
    if line_key and axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _sort_key(value: str) -> tuple:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, value)
