"""The Lightning Trainer of a run: its settings (``trainer=...``), the devices and precision it uses, and the
batches it needs (what fits in memory: mlplab.run.memory)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from mlplab.compat import RankCommandDDPStrategy
from mlplab.data.datamodule import ImageDataModule
from mlplab.errors import one_line
from mlplab.run.checkpoints import AtomicCheckpointIO
from mlplab.run.distributed import started_as_other_rank
from mlplab.run.precision import note_cpu_choices, resolved_precision
from mlplab.run.settings import TrainerError, TrainerSettings, require_accelerator

log = logging.getLogger(__name__)


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
