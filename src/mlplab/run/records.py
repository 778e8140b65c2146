"""The files of a run directory that other tools read: metrics.json, checkpoints and TensorBoard's event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlplab.errors import MlplabError
from mlplab.files import write_text_atomically

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # where a run resumes from
# The metric that picks a run's best epoch (its best.ckpt, metrics.json's val/* values) and ranks a sweep's jobs.
# Never a test metric: choosing by the test set would make its accuracy an optimistic estimate.
MONITOR = "val/acc"
MONITOR_MODE = "max"


class RunNotFoundError(MlplabError):
    """A run directory or checkpoint that is not there."""


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    path = run_dir / METRICS_FILE
    write_text_atomically(path, json.dumps(metrics, indent=2) + "\n")
    return path


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def find_checkpoint(run: str | Path, which: str = "best") -> tuple[Path, Path]:
    """(run directory, checkpoint file) for a run directory or a checkpoint file inside one."""
    path = Path(run)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return run_dir, path
    checkpoint = path / CHECKPOINT_DIR / f"{which}.ckpt"
    if not checkpoint.is_file():
        problem = "does not exist" if not path.exists() else f"has no {CHECKPOINT_DIR}/{which}.ckpt"
        raise RunNotFoundError(f"run={run} {problem}; give a run directory made by mlplab-train or a .ckpt file")
    return path, checkpoint


def has_event_files(folder: Path) -> bool:
    """Whether TensorBoard has anything to show under ``folder`` (not with logger=mlflow alone)."""
    return any(folder.rglob("events.out.tfevents.*"))
