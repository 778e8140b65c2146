"""Sweep reports: summary.csv, summary.md, summary.png and pareto.png from a sweep's job folders."""

from __future__ import annotations

import csv
import io
import os
import shlex
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mlplab.files import write_text_atomically
from mlplab.run.config import COMMAND_KEYS
from mlplab.run.records import MONITOR
from mlplab.sweeps.digits import setting, significant
from mlplab.sweeps.grid import varied_keys
from mlplab.sweeps.job_records import METRICS, collect_jobs
from mlplab.sweeps.jobs import FINISHED, UNREADABLE
from mlplab.sweeps.pareto import PARETO_PNG, configurations, markdown_row, pareto_section, plot_pareto
from mlplab.sweeps.storage import StudyAddress
from mlplab.sweeps.summary_figure import plot
from mlplab.sweeps.ties import Ties, chosen_line, compare_with


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between jobs, in command-line order (unreadable jobs' values are not known)."""
    jobs = [job for job in jobs if job["status"] != UNREADABLE]
    keys = list(dict.fromkeys(key for job in jobs for key in job["values"]))
    return [key for key in keys if len({job["values"].get(key) for job in jobs}) > 1]


def sweep_dimensions(sweep_dir: Path) -> list[str]:
    """The keys a sweep varies, in the order given (grid.varied_keys), from the multirun.yaml the sweeper writes
    before any job: a job's own overrides hold one value."""
    saved = sweep_dir / "multirun.yaml"
    hydra = (yaml.safe_load(saved.read_text()) or {}).get("hydra", {}) if saved.is_file() else {}
    if not hydra:
        return []
    sweeper = hydra.get("sweeper") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    return varied_keys(sweeper.get("params"), task, sweeper.get("seeds_per_trial"))


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
    """The sweep as a markdown report: how many configurations are tied with the best, ranked table, seed
    aggregates, failures, unfinished jobs. ``changed``: keys that differ between the commands that ran the sweep
    (changed_between_commands)."""
    keys = swept_keys(jobs)
    configs = configurations(jobs, [key for key in keys if key != "seed"])
    ties = compare_with(configs) if configs else None
    over_seeds = any(len(config["jobs"]) > 1 for config in configs)
    counts = Counter(job["status"] for job in jobs)
    lines = [
        f"# Sweep {title}",
        "",
        f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".",
        f"Ranked by best validation accuracy (`{MONITOR}`); test accuracy is shown, never used to choose.",
    ]
    if changed:
        lines.append(
            f"Settings changed between the commands that ran this sweep: {', '.join(f'`{k}`' for k in changed)}. "
            "Jobs of every setting are ranked together, the setting a column; where a job's command line left a key "
            "out, its value is the one the job's own config recorded."
        )
    lines += [*(ties.lines() if ties and len(configs) > 1 else []), ""]
    lines += ranked_table(jobs, keys, None if over_seeds else _cells_by_job(configs, ties))
    if "seed" in keys:
        seed_keys = [key for key in keys if key != "seed"]
        lines += ["", "## Over seeds", "", *seed_table(configs, seed_keys, ties if over_seeds else None)]
    lines += pareto_section(jobs, [k for k in keys if k != "seed"])
    return "\n".join(lines + other_sections(jobs)) + "\n"


def ranked_table(jobs: list[dict[str, Any]], keys: list[str], vs_best: dict[str, str] | None) -> list[str]:
    """The completed jobs, best first; ``vs best``: each job's cell of that column (None: no such column)."""
    header = ["rank", *keys, "val/acc", "val/loss", "best epoch", "test/acc", "epochs", "seconds", "parameters", "job"]
    header += ["vs best"] if vs_best is not None else []
    lines = [markdown_row(header), markdown_row(["---"] * len(header))]
    for rank, job in enumerate(ranked(jobs), start=1):
        row = [
            f"{rank} (best)" if rank == 1 else str(rank),
            *(setting(job["values"].get(k, "")) for k in keys),
            significant(job.get("val/acc")),
            significant(job.get("val/loss")),
            job.get("best_epoch", ""),
            significant(job.get("test/acc")),
            job.get("epochs", ""),
            _seconds(job),
            job.get("num_parameters", ""),
            job["job"],
        ]
        lines.append(markdown_row(row + ([vs_best.get(job["job"], "")] if vs_best is not None else [])))
    if any(job.get("stacked_jobs", 1) > 1 for job in ranked(jobs)):
        lines += ["", STACKED_SECONDS]
    return lines


STACKED_SECONDS = (
    "A stacked job's seconds are its share of its stack's (the stack's wall time over the N jobs it trained "
    "together, marked 1/N), here and in the Pareto front, so that jobs trained alone and stacked compare alike."
)


def _seconds(job: dict[str, Any]) -> str:
    stacked = job.get("stacked_jobs", 1)
    return significant(job.get("seconds")) + (f" (1/{stacked} of a stack)" if stacked > 1 else "")


def _cells_by_job(configs: list[dict[str, Any]], ties: Ties | None) -> dict[str, str]:
    """Each job's ``vs best`` cell: its configuration's."""
    if ties is None:
        return {}
    return {job["job"]: ties.cell(index) for index, config in enumerate(configs) for job in config["jobs"]}


def other_sections(jobs: list[dict[str, Any]]) -> list[str]:
    """The commands that evaluate finished jobs (their folders relative to where the summary was written), and the
    pruned, failed, unreadable and unfinished jobs."""
    lines = []
    evaluable = [job for job in ranked(jobs) if job["status"] in FINISHED]
    if evaluable:
        lines += ["", "## Evaluate a job", "", "```"]
        lines += [f"mlplab-eval run={shlex.quote(os.path.relpath(job['run_dir']))}" for job in evaluable]
        lines += ["```"]
    pruned = [job for job in jobs if job["status"] == "pruned"]
    if pruned:
        lines += ["", "## Pruned", ""] + [
            f"- `{job['job']}`: stopped after {job.get('epochs', '?')} epochs, best val/acc "
            f"{significant(job.get('val/acc'))}"
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
    return lines


def seed_table(configs: list[dict[str, Any]], keys: list[str], ties: Ties | None) -> list[str]:
    """Mean and standard deviation over seeds of each configuration, best mean validation accuracy first; with
    ``ties``, each one's ``vs best`` cell."""
    header = [*keys, "seeds", "val/acc mean", "val/acc std", "test/acc mean", "test/acc std"]
    header += ["vs best"] if ties else []
    rows = []
    for index, config in enumerate(configs):
        val = [job["val/acc"] for job in config["jobs"]]
        test = [job["test/acc"] for job in config["jobs"] if "test/acc" in job]
        means = [statistics.fmean(val), _std(val), statistics.fmean(test) if test else None, _std(test)]
        values = [setting(value) for value in config["values"].values()]
        rows.append([*values, len(val), *map(significant, means), *([ties.cell(index)] if ties else [])])
    return [markdown_row(header), markdown_row(["---"] * len(header)), *map(markdown_row, rows)]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def write_summary(sweep_dir: Path, study: Any = None) -> tuple[list[dict[str, Any]], str]:
    """Write summary.csv, summary.md, summary.png and (with more than one configuration) pareto.png into the sweep
    folder; returns the jobs and the markdown.
    ``study``: a search's open Optuna study (else found from the folder's multirun.yaml)."""
    jobs = collect_jobs(sweep_dir)
    text = markdown(jobs, sweep_dir.name, changed_between_commands(jobs, sweep_dir))
    keys = [key for key in swept_keys(jobs) if key != "seed"]
    configs = configurations(jobs, keys)
    address = StudyAddress.of_sweep(sweep_dir)
    if address is not None:
        from mlplab.sweeps.search import search_summary  # Optuna, only for searches

        text += search_summary(sweep_dir, address, study, lambda job: chosen_line(configs, job))
    write_csv(jobs, sweep_dir / "summary.csv")
    write_text_atomically(sweep_dir / "summary.md", text)
    plot(ranked(jobs), swept_keys(jobs), sweep_dir / "summary.png")
    if len(configs) > 1:
        plot_pareto(jobs, configs, keys, sweep_dir / PARETO_PNG)
    else:  # one configuration (a seed-only sweep) is no front; a picture of an earlier one would be out of date
        (sweep_dir / PARETO_PNG).unlink(missing_ok=True)
    return jobs, text
