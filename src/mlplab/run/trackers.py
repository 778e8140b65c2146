"""The run's loggers beyond Lightning's curves: its config, provenance, final metrics and images go to each
tracker it logs to (TensorBoard, MLflow, W&B, CSV), and MLflow's store and run are set up the way a run of mlplab
uses it (W&B's: mlplab.run.wandb_tracker).

MLflow is an optional extra, imported only when ``logger=mlflow`` is chosen.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

from mlplab.errors import MlplabError
from mlplab.files import write_text_atomically

MLFLOW_HINT = "logger=mlflow needs MLflow, an optional extra: pip install 'mlplab[mlflow]'"
DEFAULT_EXPERIMENT = "mlplab"  # single runs; a sweep's jobs go to an experiment named after the sweep
RUN_DIR_TAG = "mlplab.run_dir"  # finds a run's MLflow run again when it resumes
TAG_LIMIT = 5000  # characters MLflow keeps of a tag's value


class TrackerError(MlplabError):
    """A logger cannot be set up as configured (a missing optional package, an unreachable store)."""


class EpochsFromOne(Logger):
    """A logger whose ``epoch`` values count from 1, as everywhere in mlplab (Lightning logs its 0-based counter
    with each row of metrics): the CSV file's column and MLflow's metric. A test after training already has the
    number of epochs trained, which is the last one's, counted from 1."""

    @override
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if "epoch" in metrics and not any(key.startswith("test/") for key in metrics):
            metrics = {**metrics, "epoch": int(metrics["epoch"]) + 1}
        super().log_metrics(metrics, step)


class RunMLFlowLogger(EpochsFromOne, MLFlowLogger):
    """Lightning's MLFlowLogger, with epochs counted from 1 (``logger=mlflow``)."""


class ResumableCSVLogger(EpochsFromOne, CSVLogger):
    """Lightning's CSVLogger as a run's metrics.csv needs it (``logger=csv``), epochs counted from 1.

    A resumed run appends to what its earlier part wrote; Lightning's would delete the file. Like TensorBoard's
    ``purge_step``, the rows logged after the checkpoint it resumes from are left out: the resumed run logs them
    again.
    """

    def __init__(self, *args: Any, purge_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kept: tuple[list[str], list[dict[str, str]]] | None = None
        path = Path(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if purge_step is not None and path.is_file():
            with path.open(newline="") as file:
                reader = csv.DictReader(file)
                rows = [row for row in reader if row.get("step") and int(float(row["step"])) < purge_step]
            if any(row.get("epoch") == "0" for row in rows):  # an earlier version's rows: Lightning's 0-based count
                rows = [{**row, "epoch": str(int(row["epoch"]) + 1)} if row.get("epoch") else row for row in rows]
            self._kept = (list(reader.fieldnames or []), rows)

    @property
    @override
    def experiment(self) -> ExperimentWriter:
        writer = super().experiment  # made at first use, when it removes an earlier metrics.csv
        if self._kept is not None and isinstance(writer, ExperimentWriter):  # a data-parallel run's rank 0
            keys, rows = self._kept
            self._kept = None
            text = io.StringIO(newline="")
            table = csv.DictWriter(text, fieldnames=keys)
            table.writeheader()
            table.writerows(rows)
            write_text_atomically(Path(writer.metrics_file_path), text.getvalue())
            writer.metrics_keys = keys  # later rows are appended under the same header (widened if they add keys)
        return writer


def mlflow_arguments(settings: dict[str, Any], run_dir: Path, experiment: str | None) -> dict[str, Any]:
    """MLFlowLogger's arguments for this run: its experiment (made now, so that parallel jobs do not race to
    create the store), its name and tags, and the id of the MLflow run it already has when it resumes."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackerError(MLFLOW_HINT) from None
    uri = settings.get("tracking_uri")
    name = settings.get("experiment_name") or experiment or DEFAULT_EXPERIMENT
    with _store_lock(uri), _quiet("mlflow", "alembic"):  # notes on creating the store's tables
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(name)
        if found is None:
            location = settings.get("artifact_location") or _default_artifacts(uri)
            experiment_id = client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = found.experiment_id
    run_dir_value = str(run_dir.resolve())
    earlier = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{_quoted(run_dir_value)}'", max_results=1
    )
    return {
        "experiment_name": name,
        "run_name": settings.get("run_name") or run_dir.name,
        "tags": {**(settings.get("tags") or {}), RUN_DIR_TAG: run_dir_value},
        "run_id": earlier[0].info.run_id if earlier else None,
    }


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _local_path(uri: str | None) -> Path | None:
    """The file of a local SQLite store (``sqlite:///outputs/mlflow.db``), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None


def _default_artifacts(uri: str | None) -> str | None:
    """Beside a local store, not in ``./mlruns`` of whatever directory the run started in."""
    database = _local_path(uri)
    return (database.parent / "mlflow-artifacts").resolve().as_uri() if database else None


@contextmanager
def _store_lock(uri: str | None) -> Iterator[None]:
    """One process at a time creates a local store's tables and experiments (the sweep's jobs start together)."""
    database = _local_path(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def log_run_start(loggers: list[Logger], config: dict[str, Any], record: dict[str, Any], first_attempt: bool) -> None:
    """The run's settings (``model.width``: one param each; logged once, so a resume cannot contradict them) and its
    provenance (TensorBoard's Text tab, MLflow's tags, W&B's summary)."""
    tags = {key: "" if value is None else str(value) for key, value in _flattened(record).items()}
    for logger in loggers:
        if first_attempt:
            logger.log_hyperparams(_flattened(config))
        if isinstance(logger, TensorBoardLogger):
            rows = "\n".join(f"| {key} | `{value}` |" for key, value in tags.items())
            logger.experiment.add_text("run/provenance", f"| | |\n|---|---|\n{rows}", 0)
        elif isinstance(logger, MLFlowLogger):
            for key, value in tags.items():
                logger.experiment.set_tag(logger.run_id, f"mlplab.{key}", value[:TAG_LIMIT])
        elif isinstance(logger, WandbLogger):  # the latest attempt's, as MLflow's tags
            logger.experiment.summary["provenance"] = record


def image_writer(loggers: list[Logger]) -> Callable[[str, np.ndarray, int], None] | None:
    """Writes an H x W x C uint8 image under a tag: to TensorBoard's Images tab, or, without TensorBoard, to
    MLflow as a PNG artifact ``<tag>/step_<step>.png``; and to W&B's media when the run logs to W&B. None when
    the run has none of them."""
    tensorboard = next((logger for logger in loggers if isinstance(logger, TensorBoardLogger)), None)
    mlflow = next((logger for logger in loggers if isinstance(logger, MLFlowLogger)), None)
    writers = [partial(_to_wandb, logger) for logger in loggers if isinstance(logger, WandbLogger)]
    if tensorboard is not None:
        writers.append(partial(_to_tensorboard, tensorboard))
    elif mlflow is not None:
        writers.append(partial(_to_mlflow, mlflow))
    if not writers:
        return None

    def write(tag: str, image: np.ndarray, step: int) -> None:
        for writer in writers:
            writer(tag, image, step)

    return write


def _to_tensorboard(logger: TensorBoardLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.add_image(tag, image, step, dataformats="HWC")


def _to_mlflow(logger: MLFlowLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.log_image(logger.run_id, image, artifact_file=f"{tag}/step_{step:06d}.png")


def _to_wandb(logger: WandbLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.log_image(tag, [image], step)


def _flattened(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= _flattened(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
