"""The Lightning Trainer of a run: its settings (``trainer=...``), the devices and precision it uses, and the
batches it needs (what fits in memory: mlplab.run.memory)."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from mlplab.compat import RankCommandDDPStrategy
from mlplab.data.datamodule import ImageDataModule
from mlplab.errors import MlplabError, SettingError, closest, one_line
from mlplab.run.checkpoints import AtomicCheckpointIO
from mlplab.run.distributed import started_as_other_rank
from mlplab.run.precision import note_cpu_choices, resolved_precision

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 16, 32, 64)


class TrainerError(MlplabError):
    """The trainer cannot run as configured on this machine."""


# Trainer arguments mlplab sets itself, and where a user changes what they decide.
MANAGED_ARGUMENTS = {
    "logger": "mlplab sets it from the logger group (logger=tensorboard|csv|mlflow|none)",
    "callbacks": "mlplab sets it from the callbacks group (+callbacks.<name>._target_=... adds one)",
    "default_root_dir": "it is the run directory (hydra.run.dir=... moves it)",
    "enable_checkpointing": "it follows callbacks.model_checkpoint (=null: no checkpoints)",
    "enable_progress_bar": "it follows callbacks.progress_bar (=null: no bar)",
    "enable_model_summary": "it follows callbacks.model_summary (=null: no summary)",
    "plugins": "mlplab sets its own checkpoint writer",
    "barebones": "it turns off the logging and callbacks mlplab's records are made of",
    "num_nodes": "mlplab starts data-parallel ranks on one machine (trainer.devices)",
    "use_distributed_sampler": "mlplab's in-memory batches are sharded across ranks by mlplab",
}


def trainer_arguments() -> list[str]:
    return [name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"]


def check_trainer_option(key: str) -> None:
    """Refuse what is not a Lightning Trainer argument (naming the closest ones), or one that mlplab manages."""
    if key in MANAGED_ARGUMENTS:
        raise SettingError(key, f"{key}: not settable here; {MANAGED_ARGUMENTS[key]}")
    if key not in trainer_arguments():
        allowed = [name for name in trainer_arguments() if name not in MANAGED_ARGUMENTS]
        raise SettingError(key, f"{key}: not an argument of lightning.Trainer; {closest(key, allowed)}")


@dataclass(frozen=True)
class TrainerSettings:
    """The settings of ``trainer=...``: Lightning Trainer arguments. Those mlplab reads itself are typed fields;
    any other Trainer argument is passed on as given (``options``, checked by name with check_trainer_option)."""

    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | str = 1  # as trainer=auto gives it; "auto": every device (data-parallel on several GPUs)
    precision: str | int = "32-true"
    max_epochs: int = 10
    deterministic: bool = False
    log_every_n_steps: int = 50
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    gradient_clip_val: float | None = None
    num_sanity_val_steps: int = 0
    accumulate_grad_batches: int = 1
    max_time: str | dict | None = None
    max_steps: int = -1
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    profiler: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def require(key: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise SettingError(key, f"{key} {allowed} {getattr(self, key)!r}")

        require("accelerator", self.accelerator in ACCELERATORS, f"must be one of {', '.join(ACCELERATORS)}; got")
        require("strategy", self.strategy in STRATEGIES, f"must be one of {', '.join(STRATEGIES)}; got")
        require(
            "devices",
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            "must be an integer >= 1 or 'auto', got",
        )
        require("precision", self.precision in PRECISIONS, f"must be one of {', '.join(map(str, PRECISIONS))}; got")
        require("max_epochs", self.max_epochs >= 1, "must be an integer >= 1, got")
        require("log_every_n_steps", self.log_every_n_steps >= 1, "must be an integer >= 1, got")
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            value = getattr(self, key)
            require(
                key,
                value > 0 and (isinstance(value, int) or value <= 1),
                "must be a fraction in (0, 1] or a number of batches >= 1, got",
            )
        require(
            "gradient_clip_val",
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            "must be null or a number > 0, got",
        )
        require("num_sanity_val_steps", self.num_sanity_val_steps >= -1, "must be an integer >= -1, got")
        require("accumulate_grad_batches", self.accumulate_grad_batches >= 1, "must be an integer >= 1, got")
        require("max_steps", self.max_steps >= -1, "must be an integer >= 1, or -1 for no limit, got")
        require(
            "val_check_interval",
            self.val_check_interval is None
            or self.val_check_interval > 0
            and (isinstance(self.val_check_interval, int) or self.val_check_interval <= 1),
            "must be null, a fraction in (0, 1] or a number of batches >= 1, got",
        )
        require(
            "max_time",
            self.max_time is None or _is_duration(self.max_time),
            'must be null, "DD:HH:MM:SS" (e.g. "00:02:30:00") or a mapping such as {hours: 2, minutes: 30}, got',
        )
        require(
            "check_val_every_n_epoch",
            self.check_val_every_n_epoch is None or self.check_val_every_n_epoch >= 1,
            "must be null or an integer >= 1, got",
        )
        for key in self.options:
            check_trainer_option(key)

    @property
    def data_parallel(self) -> bool:
        return self.strategy == "ddp" or (isinstance(self.devices, int) and self.devices > 1)


def _is_duration(value: Any) -> bool:
    """Whether Lightning's Timer reads ``value`` as a duration (checked here, before Lightning prints anything)."""
    if isinstance(value, str):
        return re.fullmatch(r"\d+:\d\d:\d\d:\d\d", value.strip()) is not None
    return (
        isinstance(value, dict)
        and bool(value)
        and all(key in DURATION_UNITS and isinstance(amount, (int, float)) for key, amount in value.items())
    )


# The units of a duration given as a mapping (datetime.timedelta's arguments).
DURATION_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def require_accelerator(accelerator: str, key: str, alternative: str) -> None:
    """Refuse ``gpu`` on a machine where CUDA sees none, before any data is loaded."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise TrainerError(f"{key}=gpu, but this machine has no usable CUDA GPU; {alternative}")


def build_trainer(
    settings: TrainerSettings,
    run_dir: Path,
    loggers: Any,
    callbacks: list[Any],
    gpu_index: int | None = None,
    rank_command: Sequence[str] | None = None,
) -> L.Trainer:
    """A Lightning Trainer writing into ``run_dir``; refuses an accelerator this machine lacks.

    ``gpu_index`` pins a one-device run to that GPU (parallel sweep jobs each get their own). Data-parallel runs
    start their other ranks with ``rank_command``.
    """
    require_accelerator(settings.accelerator, "trainer.accelerator", "use trainer=cpu or trainer=auto")

    def has(kind: type) -> bool:
        return any(isinstance(callback, kind) for callback in callbacks)

    arguments: dict[str, Any] = {key: value for key, value in vars(settings).items() if key != "options"}
    arguments |= settings.options
    arguments["precision"] = resolved_precision(settings, gpu_index)
    note_cpu_choices(settings, arguments["precision"], gpu_index)
    if gpu_index is not None:
        arguments.update(accelerator="gpu", devices=[gpu_index])
    if settings.data_parallel:
        arguments["strategy"] = RankCommandDDPStrategy(rank_command)
        # Every rank loads the best checkpoint to test right after fit: it must be on disk when fit returns.
        checkpoint_io: Any = AtomicCheckpointIO()
    else:
        # Checkpoints are copied in memory and written by a background thread: on a busy disk a write can
        # stall for seconds, longer than an epoch. Lightning waits for the writes when fit ends.
        checkpoint_io = AsyncCheckpointIO(AtomicCheckpointIO())
    plugins: list[Any] = [checkpoint_io]
    if SLURMEnvironment.detect():
        # A SLURM job (hydra/launcher=slurm), whose tasks are a data-parallel run's ranks: submitit handles its
        # signal (requeued before the time limit, or when preempted) and the job resumes from its checkpoints;
        # Lightning's own SLURM requeue would be a second.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        return L.Trainer(
            **arguments,
            default_root_dir=run_dir,
            logger=loggers,
            callbacks=callbacks,
            plugins=plugins,
            # Lightning adds its own of each unless told not to; the callbacks group decides instead.
            enable_checkpointing=has(ModelCheckpoint),
            enable_progress_bar=has(ProgressBar),
            enable_model_summary=has(ModelSummary),
        )
    except (MisconfigurationException, ValueError, TypeError) as error:  # a value Lightning refuses
        # Lightning's messages rarely name the argument: an option it refuses on its own is named here.
        given = {
            **{key: value for key, value in arguments.items() if key not in ("strategy", "devices")},
            **settings.options,
        }
        culprit = next((key for key, value in given.items() if not _accepted(key, value)), None)
        raise TrainerError(
            f"trainer.{culprit}: {one_line(error)}" if culprit else f"trainer: {one_line(error)}"
        ) from None


def _accepted(key: str, value: Any) -> bool:
    try:
        L.Trainer(
            **{"accelerator": "cpu", key: value},
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, TypeError):
        return False
    return True


def end_ranks(trainer: L.Trainer) -> None:
    """Called when a data-parallel job is over, however it ended, by the process that started its other ranks."""
    if isinstance(trainer.strategy, RankCommandDDPStrategy):
        trainer.strategy.end_ranks()


def require_batches(settings: TrainerSettings, datamodule: ImageDataModule) -> None:
    """Refuse a fraction of batches that rounds to none for this dataset (Lightning would stop with a traceback);
    say so when a batch is larger than the training split, and every epoch one optimizer step."""
    images, batch_size = len(datamodule.splits["train"]), datamodule.settings.batch_size
    if batch_size > images and not started_as_other_rank():
        log.warning(
            "data.batch_size=%d is larger than the training split (%d images): each epoch is one batch of them all, "
            "one optimizer step",
            batch_size,
            images,
        )
    for stage in ("train", "val", "test"):
        limit = getattr(settings, f"limit_{stage}_batches")
        batches = len(getattr(datamodule, f"{stage}_dataloader")())
        if isinstance(limit, float) and limit * batches < 1:
            raise TrainerError(
                f"trainer.limit_{stage}_batches={limit} selects none of the {batches} {stage} batches; "
                f"give at least {1 / batches:.3g} or a number of batches"
            )
    train_batches = len(datamodule.train_dataloader())
    limit = settings.limit_train_batches
    train_batches = min(train_batches, limit) if isinstance(limit, int) else int(limit * train_batches)
    interval = settings.val_check_interval
    if isinstance(interval, int) and settings.check_val_every_n_epoch is not None and interval > train_batches:
        raise TrainerError(
            f"trainer.val_check_interval={interval} is more than the {train_batches} training batches "
            "of an epoch; give at most that many, a fraction in (0, 1], or also "
            "trainer.check_val_every_n_epoch=null"
        )
