"""One run, start to end: data, model and trainer from a typed RunConfig; fit, test the best checkpoint, write
metrics.json. Every entry point, sweep job and data-parallel rank trains through ``train``.

No Hydra here: a notebook or test calls ``train`` with a ``RunConfig`` directly.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from mlplab.data.datamodule import ImageDataModule, batch_orders_of
from mlplab.errors import SettingError, one_line
from mlplab.model.backbones import count_parameters
from mlplab.model.classifier import DivergedError, ImageClassifier
from mlplab.run import provenance
from mlplab.run.checkpoints import ResumePoints, StopRequested, read_checkpoint
from mlplab.run.config import ConfigError, RunConfig
from mlplab.run.history import BestValCorrect, EpochHistory
from mlplab.run.lightning_notes import quiet_lightning
from mlplab.run.memory import planned_peak_bytes, require_memory_for
from mlplab.run.records import CHECKPOINT_DIR, MONITOR, has_event_files, write_metrics
from mlplab.run.trackers import log_run_start
from mlplab.run.trainer import build_trainer, end_ranks, require_batches
from mlplab.run.views.hparams import log_hparams
from mlplab.run.wandb_tracker import end_wandb_runs

log = logging.getLogger(__name__)


class Pruned(Exception):
    """Raised by a callback (a search's pruning) to end the run early by decision, not failure: status pruned."""


def build_model(config: RunConfig, datamodule: ImageDataModule, processes: int) -> tuple[ImageClassifier, int]:
    """The model, after checking that training it fits in memory; and the estimated peak memory of this process."""
    input_shape, num_classes = datamodule.input_shape, datamodule.num_classes
    try:
        parameters, peak = planned_peak_bytes(config, input_shape, num_classes)
    except ValueError as error:  # a setting that does not suit this data's images, e.g. too many pooling blocks
        setting = error if isinstance(error, SettingError) else SettingError(None, str(error))
        raise ConfigError(setting.within("model")) from None
    size_keys = [f"model.{name}" for name in config.model.size_settings] or ["model"]
    estimate = require_memory_for(peak, processes, parameters, size_keys)
    model = ImageClassifier(
        config.model,
        input_shape,
        num_classes,
        config.optimizer,
        config.scheduler,
        max_epochs=config.trainer.max_epochs,
        input_mean=datamodule.mean,
        input_std=datamodule.std,
        class_names=datamodule.class_names,
        label_smoothing=config.label_smoothing,
    )
    last = len(datamodule.splits["train"]) % (config.data.batch_size * processes)
    if last == 1 and any(isinstance(module, nn.BatchNorm1d) for module in model.network.modules()):
        # Batch norm cannot normalise one sample by the batch's statistics: the epoch would end in an error.
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} leaves a last training batch of 1 image, which batch norm "
            "cannot train on; choose another data.batch_size (or data.val_size)"
        )
    return model, estimate


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
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train (or resume from a checkpoint), then test the best checkpoint; writes and returns metrics.json's content.

    ``hparams`` go to TensorBoard's HParams tab with the final metrics when the run ends. ``command`` (default: this
    process's) is recorded in provenance.json with the code's commit and the versions. Only rank 0 of a
    data-parallel run writes anything.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    history, resume_points = EpochHistory(), ResumePoints(run_dir, config.checkpoint.every_n_steps)
    for callback in callbacks or []:
        # Lightning would put them under the first logger's folders (MLflow's: <experiment>/<run id>/).
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / CHECKPOINT_DIR)
    with quiet_lightning():
        # The history first: an epoch a callback ends the run after (a search's pruning) is recorded too.
        trainer = build_trainer(
            config.trainer,
            run_dir,
            logger,
            [history, BestValCorrect(run_dir, history), *(callbacks or []), resume_points],
            gpu_index,
            rank_command,
        )
    orders = batch_orders_of(read_checkpoint(resume_from) if resume_from else None)  # as the run started
    datamodule = ImageDataModule(config.data, config.data_dir, shuffle_seed=config.seed, batch_orders=orders)
    if trainer.is_global_zero:
        datamodule.prepare_data()
    datamodule.setup("fit")
    require_batches(config.trainer, datamodule)
    model, memory_estimate = build_model(config, datamodule, trainer.world_size)
    log.info("Run directory: %s", run_dir)

    metrics: dict[str, Any] = {
        "status": "running",
        "precision": str(trainer.precision),  # trainer.precision=auto's choice
        "num_parameters": count_parameters(model.network),
        "memory_estimate_bytes": memory_estimate,
    }
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)  # a sweep report can tell running jobs from pending ones
        record = provenance.collect(command or sys.argv, trainer.strategy.root_device)
        provenance.write(run_dir, record)
        log_run_start(trainer.loggers, config.as_dict(), record, first_attempt=resume_from is None)
    # Lightning sets this at import so device checks cannot initialise CUDA before a fork. With it set, torch's
    # Adam queries NVML at every step (dlopen + init, ~0.3 ms). Nothing forks from here on.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
        if resume_points.stopped_by:  # a signal during validation: the epoch ended with its checkpoints
            raise StopRequested
        metrics.update(history.best())
        stopper = trainer.early_stopping_callback
        if stopper is not None and stopper.stopped_epoch:
            metrics["stopped_early_at_epoch"] = stopper.stopped_epoch + 1  # epochs count from 1
        # The best checkpoint by path: "best" would make Lightning warn that there are two ModelCheckpoints.
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({key: value for key, value in tested[0].items() if key.startswith("test/")})
        metrics["status"] = "completed"
    except Pruned as error:  # a search's decision, not a failure: the run ends here, untested
        metrics.update(history.best())
        metrics["status"], metrics["pruned"] = "pruned", str(error)
    except BaseException as error:
        metrics["status"] = status_of(error)
        metrics["error"] = f"{type(error).__name__}: {one_line(error)}"
        raise
    finally:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        metrics.update(finished_metrics(history, trainer.global_step, best, run_dir))
        if resume_points.stopped_by:
            metrics["stopped_by"] = resume_points.stopped_by
        # A process whose claim was taken over leaves the folder's records to the new owner (mlplab.run.ownership).
        if trainer.is_global_zero and resume_points.lost_claim() is None:
            write_metrics(run_dir, metrics)
            if metrics["status"] != "interrupted":  # an interrupted run gets its HParams row when it finishes
                log_hparams(trainer.loggers, hparams or {}, metrics, trainer.global_step)
        end_wandb_runs(trainer.loggers, metrics["status"])  # W&B's run ends with the run's last record
        end_ranks(trainer)
    if trainer.is_global_zero:
        report(run_dir, metrics)
    return metrics


def finished_metrics(history: EpochHistory, step: int, best_checkpoint: str | None, run_dir: Path) -> dict[str, Any]:
    """What metrics.json records of a run's training however it ended: epochs, times, last step, best checkpoint."""
    metrics = {
        "epochs": history.epochs_validated,
        "epoch_seconds": history.epoch_seconds,
        "wall_seconds": history.wall_seconds,
        "history": history.epochs,
        "step": step,
    }
    if best_checkpoint:
        metrics["best_checkpoint"] = os.path.relpath(best_checkpoint, run_dir)
    return metrics


# Failures of the machine, not of the run: a full disk, an unwritable folder, memory. The run is interrupted and
# continues from its last complete checkpoint (a sweep job too); only its own errors make it start over.
ENVIRONMENT_ERRORS = (OSError, MemoryError)


def status_of(error: BaseException) -> str:
    if isinstance(error, (KeyboardInterrupt, SystemExit, *ENVIRONMENT_ERRORS)):
        return "interrupted"
    return "diverged" if isinstance(error, DivergedError) else "failed"


def report(run_dir: Path, metrics: dict[str, Any]) -> None:
    log.info(
        "Finished: test/acc %.4f, best %s %.4f at epoch %d, %.1f s",
        metrics.get("test/acc", float("nan")),
        MONITOR,
        metrics.get(MONITOR, float("nan")),
        metrics.get("best_epoch", -1),
        metrics["wall_seconds"],
    )
    log.info("Run directory: %s", run_dir)
    log.info("Evaluate:      mlplab-eval run=%s", shlex.quote(str(run_dir)))
    if has_event_files(run_dir):
        log.info("TensorBoard:   tensorboard --logdir %s", shlex.quote(str(run_dir)))
