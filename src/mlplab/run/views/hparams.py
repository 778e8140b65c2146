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


# What TensorBoard's HParams tab shows first (TensorBoard 2.21). Its backend sorts the experiment's hparams by
# (not differs, name): tensorboard/plugins/hparams/backend_context.py, _sort_and_reduce_to_hparams_limit. Its table
# (tf-hparams-query-pane, _computeHParams, in tensorboard/webfiles.zip) sorts them again by `differs` alone and ticks
# the first Math.min(5, ...) as visible columns. So a column comes first, and is ticked, because its HParamInfo says
# `differs`, not because of its place in the dict; torch's add_hparams never sets it, which left the five first
# names in alphabetical order (data.batch_size, data.name, model.*) as the visible columns of every sweep.


class HParams(dict):
    """A run's HParams columns, the keys its sweep varies first, then those set on its command line, then the rest;
    ``swept``: the columns of the keys its sweep varies, which the HParams tab shows (and ticks) first."""

    def __init__(self, values: dict[str, Any] | None = None, swept: tuple[str, ...] = ()):
        super().__init__(values or {})
        self.swept = swept


def run_hparams(config: RunConfig, overrides: dict[str, str] | None = None, swept: list[str] | None = None) -> HParams:
    """The hyperparameters a user compares runs by (every model, optimizer and schedule setting, the data set and
    batch size, epochs and seed), plus every key set on the command line (as written).

    ``swept``: the keys the run's sweep varies (a sweep's ``a=1,2``, a search's parameters), as given; a config group
    (``optimizer=adam,sgd``) stands for the column that names its choice (``optimizer._target_``)."""
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
    columns = [column for column in (_column(key, values) for key in swept or []) if column is not None]
    first = dict.fromkeys([*columns, *(overrides or {})])
    return HParams({key: values[key] for key in first if key in values} | values, tuple(dict.fromkeys(columns)))


def _column(key: str, values: dict[str, Any]) -> str | None:
    """The column of a swept key: its own, or for a config group the one naming its choice."""
    candidates = (key, f"{key}._target_", f"{key}.family", f"{key}.name")
    return next((column for column in candidates if column in values), None)


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
    W&B's run gets the final metrics in its summary too (the last value of each).
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
    experiment, start, end = hparams_summary(values, dict.fromkeys(FINAL_METRICS.values(), 0.0))
    _mark_differing(experiment, hparams.swept if isinstance(hparams, HParams) else ())
    with SummaryWriter(log_dir=logger.log_dir) as writer:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in finals.items():
            writer.add_scalar(tag, value, step)


def _mark_differing(experiment: Any, swept: tuple[str, ...]) -> None:
    """Mark the swept columns ``differs`` in the experiment summary, so that the HParams tab shows and ticks them
    first (see the note above HParams)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    plugin_data = experiment.value[0].metadata.plugin_data
    content = HParamsPluginData.FromString(plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in swept
    plugin_data.content = content.SerializeToString()


def _plain(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)
