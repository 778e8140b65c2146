"""TensorBoard's HParams tab: one session per run, its hyperparameters beside its final metrics."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from mlplab.run.config import RunConfig

_UNIONS = (typing.Union, types.UnionType)
# metrics.json key -> the scalar tag the HParams table shows as a column. Tags of their own, so that a final value
# never lands as an extra point on a training curve.
FINAL_METRICS = {
    "val/acc": "final/best_val_acc",
    "val/loss": "final/best_val_loss",
    "test/acc": "final/test_acc",
    "test/loss": "final/test_loss",
    "epochs": "final/epochs",
    "wall_seconds": "final/wall_seconds",
    "num_parameters": "final/num_parameters",
}


def run_hparams(config: RunConfig, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The hyperparameters a user compares runs by (every model, optimizer and schedule setting, the data set and
    batch size, epochs and seed), plus every key set on the command line (as written)."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(type(config.model))
    for field in dataclasses.fields(config.model):
        value = getattr(config.model, field.name)
        # A setting that may be a list is one text column, as written (512, [512, 256]): a column has one type.
        values[f"model.{field.name}"] = (
            str(value)
            if typing.get_origin(hints[field.name]) in _UNIONS
            and any(typing.get_origin(option) is list for option in typing.get_args(hints[field.name]))
            else value
        )
    for group, settings in (("optimizer", config.optimizer), ("scheduler", config.scheduler)):
        values |= {f"{group}.{key}": _plain(value) for key, value in settings.as_dict().items()}
    values["model.family"] = config.model.as_dict()["family"]
    values |= {
        "data.name": config.data.name,
        "data.batch_size": config.data.batch_size,
        "trainer.max_epochs": config.trainer.max_epochs,
        "seed": config.seed,
    }
    for key, value in (overrides or {}).items():
        values.setdefault(key, _number_if_numeric(value))
    return values


def _number_if_numeric(value: str) -> int | float | str:
    """Command-line values arrive as text; numbers stay numbers so the HParams table sorts and filters them."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def log_hparams(loggers: list[Any], hparams: dict[str, Any], metrics: dict[str, Any], step: int) -> None:
    """Write the HParams session (hyperparameters, status, final metrics) into the run's directory; other trackers
    get the final metrics as metrics of their own.

    Lightning's ``log_hyperparams`` would log the metrics at step 0 under their curve's own tag; torch's
    ``SummaryWriter.add_hparams`` would make a timestamped sub-run. Neither is what a sweep table needs. This is
    what ``add_hparams`` writes, into an event file of the run's own directory, which TensorBoard reads as part of it.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    finals = {tag: float(metrics[key]) for key, tag in FINAL_METRICS.items() if key in metrics}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _write_session(logger, hparams, metrics, finals, step)
        elif finals:
            logger.log_metrics(finals, step)


def _write_session(
    logger: Any, hparams: dict[str, Any], metrics: dict[str, Any], finals: dict[str, float], step: int
) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    values = {key: _plain(value) for key, value in {**hparams, "status": metrics.get("status", "")}.items()}
    with SummaryWriter(log_dir=logger.log_dir) as writer:
        for summary in hparams_summary(values, dict.fromkeys(FINAL_METRICS.values(), 0.0)):
            writer.file_writer.add_summary(summary)
        for tag, value in finals.items():
            writer.add_scalar(tag, value, step)


def _plain(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)
