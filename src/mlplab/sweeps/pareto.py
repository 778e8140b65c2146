"""Accuracy against cost (parameters, seconds): which configurations of a sweep are on the Pareto front, in a table
and in pareto.png."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlplab.run.records import MONITOR
from mlplab.sweeps.digits import setting, significant

# A job's cost (its summary row's key) -> how a table names it. Seconds: a stacked job's share of its stack's.
COSTS = {"num_parameters": "parameters", "seconds": "seconds"}
PARETO_PNG = "pareto.png"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal ``(cost, accuracy)`` points, cheapest first: those for which no other point has
    an accuracy >= theirs at a cost <= theirs, strictly better in one of the two.

    Ties: of points at the same cost, only the most accurate can be on the front; of points with the same accuracy,
    only the cheapest. Points equal in both do not dominate each other: all are on the front, in input order.
    ``[(100, .80), (200, .85), (150, .79), (400, .85), (50, .70)]`` -> ``[4, 0, 1]``.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for index in order:
        last = points[front[-1]] if front else None
        if last is None or points[index][1] > last[1] or tuple(points[index]) == tuple(last):
            front.append(index)
    return front


def configurations(jobs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Completed jobs grouped by their values of ``keys`` (the swept settings but the seed), best mean first: each
    with its jobs and the mean over them (its seeds) of the accuracy and of each cost."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        if job["status"] == "completed" and MONITOR in job:
            groups[tuple(job["values"].get(key, "") for key in keys)].append(job)
    configs = [
        {
            "values": dict(zip(keys, config)),
            "jobs": members,
            **{
                metric: statistics.fmean(job[metric] for job in members)
                for metric in (MONITOR, *COSTS)
                if all(metric in job for job in members)
            },
        }
        for config, members in groups.items()
    ]
    return sorted(configs, key=lambda config: -config[MONITOR])


def front_of(configs: list[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    """The configurations on the front of ``MONITOR`` against ``cost``, cheapest first."""
    scored = [config for config in configs if cost in config]
    return [scored[i] for i in pareto_front([(config[cost], config[MONITOR]) for config in scored])]


def front_table(configs: list[dict[str, Any]], keys: list[str], cost: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the front against ``cost``: its settings, seeds (if several), val/acc, cost, job(s)."""
    seeds = any(len(config["jobs"]) > 1 for config in configs)
    header = [*keys, *(["seeds"] if seeds else []), MONITOR + (" mean" if seeds else ""), COSTS[cost], "job"]
    rows = [
        [
            *(setting(config["values"][key]) for key in keys),
            *([str(len(config["jobs"]))] if seeds else []),
            significant(config[MONITOR]),
            _cost(config[cost], cost),
            "; ".join(f"`{job['job']}`" for job in config["jobs"]),
        ]
        for config in front_of(configs, cost)
    ]
    return header, rows


def pareto_section(jobs: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """summary.md's lines on the fronts against parameters and against seconds; none for a single configuration."""
    configs = configurations(jobs, keys)
    if len(configs) < 2:
        return []
    seeds = any(len(config["jobs"]) > 1 for config in configs)
    lines = [
        "",
        "## Pareto front",
        "",
        f"No other configuration has a `{MONITOR}` at least as high with at most as many parameters (or seconds) "
        "and is better in one" + (" (means over each one's seeds)" if seeds else "") + ".",
        f"Pictured in `{PARETO_PNG}`.",
    ]
    for cost, name in COSTS.items():
        header, rows = front_table(configs, keys, cost)
        if rows:
            table = [markdown_row(header), markdown_row(["---"] * len(header)), *map(markdown_row, rows)]
            lines += ["", f"By {name}:", "", *table]
    return lines


def markdown_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _cost(value: float, cost: str) -> str:
    return significant(value) if cost == "seconds" else f"{value:.0f}"


def plot_pareto(jobs: list[dict[str, Any]], configs: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """pareto.png: ``MONITOR`` against parameters (log scale) and against seconds. Every completed job is a dot;
    configurations run with several seeds are also shown by their mean; the front is highlighted, joined by a step
    line (the best accuracy within each cost) and labelled with its settings."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    completed = [job for job in jobs if job["status"] == "completed" and MONITOR in job]
    seeds = any(len(config["jobs"]) > 1 for config in configs)
    figure, axes = plt.subplots(1, len(COSTS), figsize=(6.5 * len(COSTS), 4.8), squeeze=False)
    for axis, (cost, name) in zip(axes.flat, COSTS.items()):
        dots = [job for job in completed if cost in job]
        axis.scatter([job[cost] for job in dots], [job[MONITOR] for job in dots], s=14, color="0.6", label="job")
        if seeds:
            means = [config for config in configs if cost in config]
            axis.scatter(
                [c[cost] for c in means],
                [c[MONITOR] for c in means],
                s=30,
                facecolors="none",
                edgecolors="C0",
                label="configuration (mean over seeds)",
            )
        front = front_of(configs, cost)
        if front:
            xs, ys = [c[cost] for c in front], [c[MONITOR] for c in front]
            axis.step(xs, ys, where="post", color="C3", linewidth=1.2)
            axis.scatter(xs, ys, s=40, color="C3", zorder=3, label="Pareto front")
            for config, x, y in zip(front, xs, ys):
                axis.annotate(_label(config, keys), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if cost == "num_parameters" and dots:
            _log_count_axis(axis.xaxis, [job[cost] for job in dots])
        axis.set(title=f"best {MONITOR} against {name}", xlabel=name, ylabel=f"best {MONITOR}")
        if dots:
            axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _log_count_axis(axis: Any, values: list[float]) -> None:
    """A log scale labelled 20k, 1.2M: the powers of ten, and within a decade 2x and 5x too (all ticks within 2x)."""
    import matplotlib.ticker

    axis.axes.set_xscale("log")
    counts = matplotlib.ticker.EngFormatter(sep="")
    low, high = min(values), max(values)

    def minor(value: float, position: int) -> str:
        leading = value / 10 ** math.floor(math.log10(value))
        return counts(value) if high < 2 * low or (high < 10 * low and round(leading, 6) in (2, 5)) else ""

    axis.set_major_formatter(counts)
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))


def _label(config: dict[str, Any], keys: list[str]) -> str:
    """The configuration's settings, each key by its last part (``width=64``) unless two keys share it."""
    short = [key.rsplit(".", 1)[-1] for key in keys]
    names = short if len(set(short)) == len(short) else keys
    return " ".join(f"{name}={_short(config['values'][key])}" for name, key in zip(names, keys))


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or len(value) <= 6 else f"{number:.3g}"
