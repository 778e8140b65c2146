"""Training one run: a Lightning Trainer, the model and data built from a typed RunConfig, metrics.json.

No Hydra here: a notebook or test calls ``train`` with a ``RunConfig`` directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from mlplab.checkpoints import AtomicCheckpointIO, ResumePoints, StopRequested
from mlplab.config import ConfigError, RunConfig, TrainerConfig, require_accelerator
from mlplab.data import ImageDataModule
from mlplab.distributed import JobDDPStrategy
from mlplab.history import EpochHistory
from mlplab.hparams import log_hparams
from mlplab.module import DivergedError, MLPClassifier, PrunedError
from mlplab.network import count_parameters, planned_parameters
from mlplab.runs import write_metrics

log = logging.getLogger(__name__)


def build_trainer(
    config: TrainerConfig, run_dir: Path, logger: Any, callbacks: list[Any], gpu_index: int | None = None,
    rank_command: Sequence[str] | None = None,
) -> L.Trainer:
    """A Lightning Trainer writing into ``run_dir``; refuses an accelerator this machine lacks.

    ``gpu_index`` pins a one-device run to that GPU (parallel sweep jobs each get their own). Data-parallel runs
    (``strategy=ddp`` or several devices) start their other ranks with ``rank_command``.
    """
    require_accelerator(config.accelerator, "trainer.accelerator", "use trainer=cpu or trainer=auto")

    def has(kind: type) -> bool:
        return any(isinstance(callback, kind) for callback in callbacks)

    settings: dict[str, Any] = dict(vars(config))
    if gpu_index is not None:
        settings.update(accelerator="gpu", devices=[gpu_index])
    if config.strategy == "ddp" or (isinstance(config.devices, int) and config.devices > 1):
        settings["strategy"] = JobDDPStrategy(rank_command)
        # Every rank loads the best checkpoint to test right after fit: it must be on disk when fit returns.
        checkpoint_io: Any = AtomicCheckpointIO()
    else:
        # Checkpoints are copied in memory and written by a background thread: on a busy disk a write can
        # stall for seconds, longer than an epoch. Lightning waits for the writes when fit ends.
        checkpoint_io = AsyncCheckpointIO(AtomicCheckpointIO())
    try:
        return L.Trainer(
            **settings,
            default_root_dir=run_dir,
            logger=logger,
            callbacks=callbacks,
            plugins=[checkpoint_io],
            # Lightning adds its own of each unless told not to; the callbacks group decides instead.
            enable_checkpointing=has(ModelCheckpoint),
            enable_progress_bar=has(ProgressBar),
            enable_model_summary=has(ModelSummary),
        )
    except MisconfigurationException as error:
        raise ConfigError(f"trainer: {one_line(error)}") from None


def build_model(config: RunConfig, datamodule: ImageDataModule) -> MLPClassifier:
    model, optimizer = config.model, config.optimizer
    require_memory_for(planned_parameters(datamodule.num_features, datamodule.num_classes, model.depth, model.width))
    return MLPClassifier(
        num_features=datamodule.num_features,
        num_classes=datamodule.num_classes,
        depth=model.depth,
        width=model.width,
        activation=model.activation,
        dropout=model.dropout,
        output_activation=model.output_activation,
        optimizer=optimizer.name,
        lr=optimizer.lr,
        weight_decay=optimizer.weight_decay,
        momentum=optimizer.momentum,
        scheduler=config.scheduler.name,
        min_lr=config.scheduler.min_lr,
        max_epochs=config.trainer.max_epochs,
        input_mean=datamodule.mean,
        input_std=datamodule.std,
        class_names=datamodule.class_names,
    )


# Bytes per parameter while training: weights, gradients and Adam's two moment estimates, float32 each.
TRAINING_BYTES_PER_PARAMETER = 16


def require_memory_for(num_parameters: int) -> None:
    """Refuse, naming the keys, a network whose training state alone would not fit in this machine's memory."""
    needed = num_parameters * TRAINING_BYTES_PER_PARAMETER
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(f"model.depth and model.width make a network of {num_parameters:,} parameters, "
                          f"{needed / 2**30:.0f} GiB to train, more than this machine's {available / 2**30:.0f} GiB; "
                          "choose a smaller model.width or model.depth")


def require_batches(trainer_config: TrainerConfig, datamodule: ImageDataModule) -> None:
    """Refuse a fraction of batches that rounds to none for this dataset (Lightning would stop with a traceback)."""
    for stage in ("train", "val", "test"):
        limit = getattr(trainer_config, f"limit_{stage}_batches")
        batches = len(getattr(datamodule, f"{stage}_dataloader")())
        if isinstance(limit, float) and limit * batches < 1:
            raise ConfigError(f"trainer.limit_{stage}_batches={limit} selects none of the {batches} {stage} batches; "
                              f"give at least {1 / batches:.3g} or a number of batches")


def train(
    config: RunConfig,
    run_dir: Path,
    logger: Any = False,
    callbacks: list[Any] | None = None,
    *,
    hparams: dict[str, Any] | None = None,
    resume_from: Path | None = None,
    gpu_index: int | None = None,
    rank_command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train (or resume from a checkpoint), then test the best checkpoint; writes and returns metrics.json's content.

    ``hparams`` go to TensorBoard's HParams tab with the final metrics when the run ends. Only rank 0 of a
    data-parallel run writes anything.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    history, resume_points = EpochHistory(), ResumePoints(run_dir, config.checkpoint.every_n_steps)
    trainer = build_trainer(config.trainer, run_dir, logger, [*(callbacks or []), history, resume_points], gpu_index,
                            rank_command)
    datamodule = ImageDataModule(
        name=config.data.name,
        data_dir=config.data_dir,
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        shuffle_seed=config.seed,
        system_dir=config.data.system_dir,
        download=config.data.download,
    )
    if trainer.is_global_zero:
        datamodule.prepare_data()
    datamodule.setup("fit")
    require_batches(config.trainer, datamodule)
    model = build_model(config, datamodule)
    log.info("Run directory: %s", run_dir)

    metrics: dict[str, Any] = {"status": "running", "num_parameters": count_parameters(model.network)}
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)  # a sweep report can tell running jobs from pending ones
    # Lightning sets this at import so device checks cannot initialise CUDA before a fork. With it set, torch's
    # Adam queries NVML at every step (dlopen + init, ~0.3 ms). Nothing forks from here on.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
        if resume_points.stopped_by:  # a signal during validation: the epoch ended with its checkpoints
            raise StopRequested
        metrics.update(history.best())
        # The best checkpoint by path: "best" would make Lightning warn that there are two ModelCheckpoints.
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({key: value for key, value in tested[0].items() if key.startswith("test/")})
        metrics["status"] = "completed"
    except PrunedError as error:  # a search's decision, not a failure: the run ends here, untested
        metrics.update(history.best())
        metrics["status"], metrics["pruned"] = "pruned", str(error)
    except BaseException as error:
        metrics["status"] = _status_of(error)
        metrics["error"] = f"{type(error).__name__}: {one_line(error)}"
        raise
    finally:
        metrics["epochs"] = len(history.epochs)
        metrics["epoch_seconds"] = history.epoch_seconds
        metrics["wall_seconds"] = history.wall_seconds
        metrics["history"] = history.epochs
        metrics["step"] = trainer.global_step
        if resume_points.stopped_by:
            metrics["stopped_by"] = resume_points.stopped_by
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            metrics["best_checkpoint"] = os.path.relpath(trainer.checkpoint_callback.best_model_path, run_dir)
        if trainer.is_global_zero:
            write_metrics(run_dir, metrics)
            if metrics["status"] != "interrupted":  # an interrupted run gets its HParams row when it finishes
                log_hparams(logger, hparams or {}, metrics, trainer.global_step)
        if isinstance(trainer.strategy, JobDDPStrategy):
            trainer.strategy.end_ranks()
    if trainer.is_global_zero:
        _report(run_dir, metrics)
    return metrics


def _status_of(error: BaseException) -> str:
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return "diverged" if isinstance(error, DivergedError) else "failed"


def _report(run_dir: Path, metrics: dict[str, Any]) -> None:
    log.info(
        "Finished: test/acc %.4f, best val/acc %.4f at epoch %d, %.1f s",
        metrics.get("test/acc", float("nan")), metrics.get("val/acc", float("nan")),
        metrics.get("best_epoch", -1), metrics["wall_seconds"],
    )
    log.info("Run directory: %s", run_dir)
    log.info("TensorBoard:   tensorboard --logdir %s", run_dir)


def one_line(error: BaseException) -> str:
    """An error (or the error behind it) as one line."""
    return " ".join(str(error.__cause__ or error).split())
