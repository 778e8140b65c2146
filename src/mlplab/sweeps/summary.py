"""Sweep reports: summary.csv, summary.md, summary.png and pareto.png from a sweep's job folders."""

from __future__ import annotations

import csv
import io
import shlex
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mlplab.files import write_text_atomically
from mlplab.run.config import COMMAND_KEYS
from mlplab.run.records import MONITOR
from mlplab.sweeps.grid import sweep_overrides
from mlplab.sweeps.job_records import METRICS, collect_jobs
from mlplab.sweeps.jobs import FINISHED, UNREADABLE
from mlplab.sweeps.pareto import configurations, markdown_row, pareto_section, plot_pareto
from mlplab.sweeps.storage import StudyAddress


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between jobs, in command-line order (unreadable jobs' values are not known)."""
    jobs = [job for job in jobs if job["status"] != UNREADABLE]
    keys = list(dict.fromkeys(key for job in jobs for key in job["values"]))
    return [key for key in keys if len({job["values"].get(key) for job in jobs}) > 1]


def sweep_dimensions(sweep_dir: Path) -> list[str]:
    """The keys a sweep varies, in the order given: those its command line or ``hydra.sweeper.params`` sweep
    (``a=1,2``, ``choice(...)``, ``range(...)``, ``interval(...)``), and ``seed`` when a search gives each trial
    several seeds. From the multirun.yaml the sweeper writes before any job: a job's own overrides hold one value."""
    saved = sweep_dir / "multirun.yaml"
    hydra = (yaml.safe_load(saved.read_text()) or {}).get("hydra", {}) if saved.is_file() else {}
    if not hydra:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = hydra.get("sweeper") or {}
    lines = sweep_overrides(sweeper.get("params"), (hydra.get("overrides") or {}).get("task") or [])
    keys = [line.key_or_group for line in OverridesParser.create().parse_overrides(lines) if line.is_sweep_override()]
    seeds = sweeper.get("seeds_per_trial")
    return list(dict.fromkeys(keys + (["seed"] if isinstance(seeds, int) and seeds > 1 else [])))


def changed_between_commands(jobs: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """Swept keys that the sweep's last command did not sweep (multirun.yaml): settings changed between the
    commands that ran it, such as ``optimizer.lr=0.01`` added to a sweep first run without it."""
    if not (sweep_dir / "multirun.yaml").is_file():
        return []
    dimensions = set(sweep_dimensions(sweep_dir)) | set(COMMAND_KEYS)
    return [key for key in swept_keys(jobs) if key not in dimensions]


def ranked(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished jobs, best validation accuracy first."""
    return sorted(
        (job for job in jobs if job["status"] == "completed" and MONITOR in job), key=lambda job: -job[MONITOR]
    )


def write_csv(jobs: list[dict[str, Any]], path: Path) -> None:
    keys = swept_keys(jobs)
    with io.StringIO(newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["job", "overrides", "status", *keys, *METRICS, "run_dir", "error"])
        for job in jobs:
            writer.writerow(
                [
                    job["job"],
                    " ".join(job["overrides"]),
                    job["status"],
                    *(job["values"].get(k, "") for k in keys),
                    *(job.get(metric, "") for metric in METRICS),
                    job["run_dir"],
                    job["error"],
                ]
            )
        write_text_atomically(path, file.getvalue())


def markdown(jobs: list[dict[str, Any]], title: str, changed: Sequence[str] = ()) -> str:
    """The sweep as a markdown report: ranked table, seed aggregates, failures, unfinished jobs. ``changed``: keys
    that differ between the commands that ran the sweep (changed_between_commands)."""
    keys = swept_keys(jobs)
    counts = defaultdict(int)
    for job in jobs:
        counts[job["status"]] += 1
    lines = [
        f"# Sweep {title}",
        "",
        f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".",
        f"Ranked by best validation accuracy (`{MONITOR}`); test accuracy is shown, never used to choose.",
        "",
    ]
    if changed:
        lines[-1:-1] = [
            f"Settings changed between the commands that ran this sweep: {', '.join(f'`{k}`' for k in changed)}. "
            "Jobs of every setting are ranked together, the setting a column; where a job's command line left a key "
            "out, its value is the one the job's own config recorded."
        ]
    header = ["rank", *keys, "val/acc", "val/loss", "best epoch", "test/acc", "epochs", "seconds", "parameters", "job"]
    lines += [markdown_row(header), markdown_row(["---"] * len(header))]
    for rank, job in enumerate(ranked(jobs), start=1):
        lines.append(
            markdown_row(
                [
                    f"{rank} (best)" if rank == 1 else str(rank),
                    *(job["values"].get(k, "") for k in keys),
                    _number(job.get("val/acc")),
                    _number(job.get("val/loss")),
                    job.get("best_epoch", ""),
                    _number(job.get("test/acc")),
                    job.get("epochs", ""),
                    _number(job.get("wall_seconds"), 1),
                    job.get("num_parameters", ""),
                    job["job"],
                ]
            )
        )
    if "seed" in keys:
        lines += ["", "## Over seeds", "", *seed_table(jobs, [k for k in keys if k != "seed"])]
    lines += pareto_section(jobs, [k for k in keys if k != "seed"])
    evaluable = [job for job in ranked(jobs) if job["status"] in FINISHED]
    if evaluable:
        lines += ["", "## Evaluate a job", "", "```"]
        lines += [f"mlplab-eval run={shlex.quote(str(Path(job['run_dir']).absolute()))}" for job in evaluable]
        lines += ["```"]
    pruned = [job for job in jobs if job["status"] == "pruned"]
    if pruned:
        lines += ["", "## Pruned", ""] + [
            f"- `{job['job']}`: stopped after {job.get('epochs', '?')} epochs, best val/acc "
            f"{_number(job.get('val/acc'))}"
            for job in pruned
        ]
    failed = [job for job in jobs if job["status"] in ("failed", "diverged")]
    if failed:
        lines += ["", "## Failed", ""] + [
            f"- `{job['job']}`: {job['status']}: {job['error'] or 'no error recorded'}" for job in failed
        ]
    unreadable = [job for job in jobs if job["status"] == UNREADABLE]
    if unreadable:
        lines += ["", "## Unreadable", ""] + [f"- `{job['job']}`: {job['error']}" for job in unreadable]
    ended = ("completed", "pruned", "failed", "diverged", UNREADABLE)
    unfinished = [job for job in jobs if job["status"] not in ended]
    if unfinished:
        lines += ["", "## Not finished", ""] + [
            f"- `{job['job']}`: {job['status']}" + (f" ({job['scheduler']})" if "scheduler" in job else "")
            for job in unfinished
        ]
    return "\n".join(lines) + "\n"


def seed_table(jobs: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Mean and standard deviation over seeds of each configuration, best mean validation accuracy first."""
    header = [*keys, "seeds", "val/acc mean", "val/acc std", "test/acc mean", "test/acc std"]
    rows = []
    for config in configurations(jobs, keys):
        val = [job["val/acc"] for job in config["jobs"]]
        test = [job["test/acc"] for job in config["jobs"] if "test/acc" in job]
        means = [statistics.fmean(val), _std(val), statistics.fmean(test) if test else None, _std(test)]
        rows.append([*config["values"].values(), len(val), *map(_number, means)])
    return [markdown_row(header), markdown_row(["---"] * len(header)), *map(markdown_row, rows)]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _number(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def plot(jobs: list[dict[str, Any]], path: Path, top: int = 5) -> None:
    """best val/acc against each swept key (one line per value of a second key), and the top runs' curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    finished = ranked(jobs)
    keys = [key for key in swept_keys(jobs) if key != "seed"]
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
        label = " ".join(f"{key}={job['values'][key]}" for key in swept_keys(jobs) if key in job["values"])
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


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _sort_key(value: str) -> tuple:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, value)


def write_summary(sweep_dir: Path, study: Any = None) -> tuple[list[dict[str, Any]], str]:
    """Write summary.csv, summary.md, summary.png and pareto.png into the sweep folder; returns the jobs and the
    markdown.
    ``study``: a search's open Optuna study (else found from the folder's multirun.yaml)."""
    jobs = collect_jobs(sweep_dir)
    text = markdown(jobs, sweep_dir.name, changed_between_commands(jobs, sweep_dir))
    address = StudyAddress.of_sweep(sweep_dir)
    if address is not None:
        from mlplab.sweeps.search import search_summary  # Optuna, only for searches

        text += search_summary(sweep_dir, address, study)
    write_csv(jobs, sweep_dir / "summary.csv")
    write_text_atomically(sweep_dir / "summary.md", text)
    plot(jobs, sweep_dir / "summary.png")
    keys = [key for key in swept_keys(jobs) if key != "seed"]
    plot_pareto(jobs, configurations(jobs, keys), keys, sweep_dir / "pareto.png")
    return jobs, text
