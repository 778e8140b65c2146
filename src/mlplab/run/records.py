"""The files of a run directory that other tools read: metrics.json, checkpoints and TensorBoard's event files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mlplab.errors import MlplabError
from mlplab.files import write_atomically, write_text_atomically

METRICS_FILE = "metrics.json"
# Which validation images the run's best epoch so far classified correctly, and their labels (numpy's .npz): what a
# sweep's summary pairs two jobs on (mlplab.sweeps.ties). Runs of earlier versions have none.
VAL_CORRECT_FILE = "val_correct.npz"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # where a run resumes from
# The metric that picks a run's best epoch (its best.ckpt, metrics.json's val/* values) and ranks a sweep's jobs.
# Never a test metric: choosing by the test set would make its accuracy an optimistic estimate.
MONITOR = "val/acc"
MONITOR_MODE = "max"


class RunNotFoundError(MlplabError):
    """A run directory or checkpoint that is not there."""


REMOVE_OR_RESTORE = (
    "restore it from a copy, or remove it and run the command again (a sweep trains such a job again from the start)"
)


class UnreadableRecordError(MlplabError):
    """A record of a run (metrics.json, provenance.json, its overrides) that is damaged: cut short or edited.
    ``remedy``: what the user can do, for a record a run cannot do without (its overrides: resume= needs them)."""

    def __init__(self, path: Path, reason: str, remedy: str = REMOVE_OR_RESTORE):
        super().__init__(f"{path} is damaged ({reason}); {remedy}")
        self.path = path


def read_json_record(path: Path) -> Any:
    """A JSON record of a run; UnreadableRecordError, naming the file, when it cannot be read as JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableRecordError(path, f"not readable JSON: {error}") from None


def read_yaml_record(path: Path, kind: type[dict] | type[list], remedy: str = REMOVE_OR_RESTORE) -> Any:
    """A YAML record Hydra wrote for a run (``.hydra/config.yaml``, ``overrides.yaml``) as plain values;
    UnreadableRecordError, naming the file, when it is not a YAML ``kind``."""
    try:
        record = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        problem = getattr(error, "problem", None)  # a YAML syntax error's own words, without the file's name
        raise UnreadableRecordError(path, f"not readable YAML{': ' + problem if problem else ''}", remedy) from None
    if not isinstance(record, kind):
        found = type(record).__name__ if record is not None else "nothing"
        raise UnreadableRecordError(path, f"a YAML {kind.__name__} was expected, found {found}", remedy)
    return record


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    path = run_dir / METRICS_FILE
    write_text_atomically(path, json.dumps(metrics, indent=2) + "\n")
    return path


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json's content ({} before a run writes it); UnreadableRecordError when it is damaged."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    metrics = read_json_record(path)
    if not isinstance(metrics, dict):
        raise UnreadableRecordError(path, f"a JSON object was expected, found {type(metrics).__name__}")
    return metrics


def write_val_correct(run_dir: Path, correct: np.ndarray, labels: np.ndarray) -> None:
    """Record which validation images (in the split's order) the run's best epoch classified correctly."""
    arrays = {"correct": np.packbits(correct.astype(bool)), "count": np.array(len(correct)), "labels": labels}
    write_atomically(run_dir / VAL_CORRECT_FILE, lambda file: np.savez_compressed(file, **arrays))


def read_val_correct(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(correct, labels) as write_val_correct recorded them; None for a run without the file, or with a damaged one
    (a summary then leaves the job's comparison out and says why)."""
    try:
        with np.load(run_dir / VAL_CORRECT_FILE) as saved:
            count = int(saved["count"])
            return np.unpackbits(saved["correct"], count=count).astype(bool), saved["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent, or not a whole .npz: the same to a summary


def find_checkpoint(run: str | Path, which: str = "best", key: str = "run") -> tuple[Path, Path]:
    """(run directory, checkpoint file) for a run directory or a checkpoint file inside one; ``key`` is the setting
    that gave it, as a refusal names it (``run=`` of mlplab-eval and -predict, ``resume=`` of mlplab-train)."""
    path = Path(run)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return run_dir, path
    checkpoint = path / CHECKPOINT_DIR / f"{which}.ckpt"
    if not checkpoint.is_file():
        problem = "does not exist" if not path.exists() else f"has no {CHECKPOINT_DIR}/{which}.ckpt"
        raise RunNotFoundError(f"{key}={run} {problem}; give a run directory made by mlplab-train or a .ckpt file")
    return path, checkpoint


def has_event_files(folder: Path) -> bool:
    """Whether TensorBoard has anything to show under ``folder`` (not with logger=mlflow alone)."""
    return any(folder.rglob("events.out.tfevents.*"))
