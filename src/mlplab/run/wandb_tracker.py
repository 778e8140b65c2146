"""Weights & Biases as a run's tracker (``logger=wandb``): Lightning's WandbLogger, offline by default, one W&B run per
run folder however often the run resumes, a sweep's jobs grouped under the sweep's name.

W&B is an optional extra, imported only when ``logger=wandb`` is chosen. What mlplab sets in ``wandb.init``:
``dir`` (``logger.save_dir``), ``mode`` (offline unless ``logger.offline=false``; ``WANDB_MODE``, when set, decides),
``id`` (recorded in the run folder's ``wandb.json``; a resumed attempt continues that run, ``resume="allow"``),
``name`` (the run folder's name), ``group`` and ``job_type`` (a sweep's name; train, sweep or search), ``config``
(a search trial's number) and ``reinit="create_new"``: a sweep trains its jobs in one process, a stack all at once,
each its own W&B run.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlplab.files import write_text_atomically
from mlplab.run.trackers import EpochsFromOne, TrackerError

WANDB_HINT = "logger=wandb needs W&B, an optional extra: pip install 'mlplab[wandb]'"
DEFAULT_DIR = "outputs/wandb"  # where W&B writes, when the logger's config does not say (logger.save_dir)
RECORD_FILE = "wandb.json"  # in the run folder: its W&B run's id, project, entity, folder and group, for a resume
TRAINING_METRIC = "train/loss"  # the last of an epoch's metrics Lightning logs
ENDED_WELL = ("completed", "pruned")  # statuses whose W&B run ends with exit code 0 (finished); others: failed


class StepRowsWandbLogger(WandbLogger):
    """Lightning's WandbLogger as a run of mlplab uses it (RunWandbLogger, below, counts its epochs from 1).

    The history is keyed by Lightning's step (W&B's ``step=``), so a resumed attempt, which logs from its checkpoint's
    step on, continues the same rows in the same run, offline too. An epoch's validation and training metrics share
    its row; images and tables join the row being written (TensorBoard logs a validation's images at the next
    step, which W&B, whose steps only increase, would then refuse for the epoch's training metrics).
    """

    def __init__(self, *, offline: bool = True, run_dir: str | None = None, trial: int | None = None, **kwargs: Any):
        mode = wandb_mode(offline)
        if mode:
            kwargs["mode"] = mode
        if trial is not None:  # a search trial's number, in the run's config from the start
            kwargs["config"] = {**(kwargs.get("config") or {}), "trial": trial}
        kwargs.setdefault("reinit", "create_new")
        super().__init__(**kwargs)  # offline left False: Lightning's would set WANDB_MODE for the whole process
        self._run_dir = Path(run_dir) if run_dir else None
        self._row: int | None = None  # the step of the history row being written
        self._started = self._ended = False  # whether the W&B run started, and ended

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._started:
            return super().experiment
        if self.save_dir:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        run = super().experiment
        self._started = True
        if self._run_dir is not None:
            record = {"id": run.id, "project": run.project, "entity": run.entity, "dir": str(self.save_dir)}
            record |= {"group": run.group, "job_type": run.job_type}
            write_text_atomically(self._run_dir / RECORD_FILE, json.dumps(record, indent=1) + "\n")
        return run

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        step = step if step is not None else self._row or 0
        # W&B writes a step's row once a later step arrives; an epoch's is complete with its training metrics
        # (Lightning logs them last), so it is written then: a live view, or what a killed run leaves, is not an
        # epoch behind (the resumed run would not log again an epoch its checkpoint has).
        complete = TRAINING_METRIC in metrics
        self._row = step + 1 if complete else step
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step, commit=complete or None)

    @override
    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        super().log_image(key, images, step if self._row is None else self._row, **kwargs)

    @override
    @rank_zero_only
    def log_table(
        self, key: str, columns: Any = None, data: Any = None, dataframe: Any = None, step: int | None = None
    ) -> None:
        super().log_table(key, columns, data, dataframe, step if self._row is None else self._row)

    @rank_zero_only
    def end(self, status: str) -> None:
        """End the W&B run, if it started: mlplab's ``status`` in its summary, failed unless completed or pruned."""
        if not self._started or self._ended:
            return
        self._ended = True
        self.experiment.summary["status"] = status
        self.experiment.finish(exit_code=0 if status in ENDED_WELL else 1)


class RunWandbLogger(EpochsFromOne, StepRowsWandbLogger):
    """``logger=wandb``: Lightning's WandbLogger, epochs counted from 1, offline by default, one W&B run per run
    folder (conf/logger/wandb.yaml)."""


def wandb_mode(offline: bool) -> str | None:
    """W&B's mode for ``logger.offline``; None when WANDB_MODE is set: W&B's own switch (online, offline, disabled)
    then decides."""
    return None if os.environ.get("WANDB_MODE") else "offline" if offline else "online"


def end_wandb_runs(loggers: list[Logger], status: str) -> None:
    """End the W&B runs among ``loggers``; Lightning's ``finalize`` leaves them open, and one process may train many."""
    for logger in loggers:
        if isinstance(logger, StepRowsWandbLogger):
            logger.end(status)


def wandb_arguments(
    settings: dict[str, Any], run_dir: Path, resume_from: Path | None, experiment: str | None, trial: int | None
) -> dict[str, Any]:
    """RunWandbLogger's arguments for this run: the W&B run it continues when it resumes (else a new id), where it
    writes, its name, group and job type. ``experiment``: a sweep's name; ``trial``: a search trial's number."""
    try:
        import wandb  # noqa: F401  (checked here: a missing extra is one line before any work)
    except ImportError:
        raise TrackerError(WANDB_HINT) from None
    record = read_record(run_dir) if resume_from else {}
    earlier_dir = record.get("dir")
    save_dir = earlier_dir if earlier_dir and Path(earlier_dir).is_dir() else settings.get("save_dir") or DEFAULT_DIR
    job_type = "search" if trial is not None else "sweep" if experiment else "train"
    arguments = {
        "save_dir": str(Path(save_dir).resolve()),  # a resume from another directory writes beside the first part
        "run_dir": str(run_dir),
        "id": record.get("id") or new_id(),
        "name": settings.get("name") or run_dir.name,
        # resume= of a sweep's job is no sweep: it keeps what its first attempt had
        "group": settings.get("group") or record.get("group") or experiment,
        "job_type": settings.get("job_type") or record.get("job_type") or job_type,
    }
    if trial is not None:
        arguments["trial"] = trial
    return arguments


def read_record(run_dir: Path) -> dict[str, Any]:
    """What ``wandb.json`` in the run folder says of its W&B run; empty when there is none (or it is damaged: the
    run then starts a new W&B run rather than fail)."""
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def new_id() -> str:
    """A new W&B run id, as W&B makes them: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
