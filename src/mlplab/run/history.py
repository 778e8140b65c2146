"""What each epoch did: its validation metrics and its wall time, kept in checkpoints so a resumed run has all."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from mlplab.model.classifier import EpochPredictions
from mlplab.run.records import MONITOR, write_val_correct
from mlplab.run.views.predictions import split_predictions


class EpochHistory(Callback):
    """Records ``val/*`` after each validation epoch (sanity checks excluded) and each training epoch's seconds.
    Epochs count from 1, as users count them (Lightning's ``current_epoch`` counts from 0).

    Reporting the best epoch from here avoids validating again after training, which would log a second
    point at the last step and bend the curves.
    """

    def __init__(self, monitor: str = MONITOR):
        self.monitor = monitor
        self.epochs: list[dict[str, float]] = []
        self.epoch_seconds: list[float] = []
        self._epoch_started = 0.0
        self._started = time.perf_counter()
        self._earlier_seconds = 0.0  # wall time of the attempts before a resume
        self._fitted = False

    @property
    def wall_seconds(self) -> float:
        """Wall time of the whole run, over all its attempts."""
        return round(self._earlier_seconds + time.perf_counter() - self._started, 3)

    @property
    def epochs_validated(self) -> int:
        """Epochs with at least one validation (trainer.val_check_interval can validate several times in one)."""
        return len({row["epoch"] for row in self.epochs})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "epoch_seconds": self.epoch_seconds,
            "wall_seconds": self.wall_seconds,
            "first_epoch": 1,
        }

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fitted = True

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitted:  # testing the best checkpoint would otherwise rewind the record to that epoch
            return
        # Checkpoints of mlplab 0.1 numbered epochs from 0.
        shift = 1 - state_dict.get("first_epoch", 0)
        self.epochs = [{**row, "epoch": row["epoch"] + shift} for row in state_dict["epochs"]]
        self.epoch_seconds = list(state_dict["epoch_seconds"])
        self._earlier_seconds = state_dict["wall_seconds"]
        self._started = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation and checkpointing run before this hook, so they count in the epoch's time.
        self.epoch_seconds.append(round(time.perf_counter() - self._epoch_started, 4))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        self.epochs.append({"epoch": trainer.current_epoch + 1, **values})

    def best(self) -> dict[str, Any]:
        """The first epoch with the highest ``monitor`` value, as ModelCheckpoint keeps it."""
        if not self.epochs:
            return {}
        best = self._best_row()
        return {**{key: value for key, value in best.items() if key != "epoch"}, "best_epoch": best["epoch"]}

    @property
    def last_is_best(self) -> bool:
        """Whether the latest validation is the run's best so far (the one best() reports)."""
        return bool(self.epochs) and self._best_row() is self.epochs[-1]

    def _best_row(self) -> dict[str, Any]:
        return max(self.epochs, key=lambda row: row.get(self.monitor, float("-inf")))


def record_val_correct(run_dir: Path, predictions: EpochPredictions) -> None:
    """Write which validation images (in the split's order) the predictions got right: the best epoch's record."""
    correct = (predictions.classes == predictions.labels).cpu().numpy()
    write_val_correct(run_dir, correct, predictions.labels.cpu().numpy())


class BestValCorrect(Callback):
    """At each new best epoch (of ``history``, which must come first among the callbacks), records which validation
    images it classified correctly (records.VAL_CORRECT_FILE): what a sweep's summary compares two jobs on. Rank 0
    writes; every rank takes part in gathering a data-parallel run's predictions."""

    def __init__(self, run_dir: Path, history: EpochHistory):
        self.run_dir, self.history = run_dir, history

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.history.last_is_best:
            return
        predictions = split_predictions(trainer, pl_module, "val")
        if predictions is not None and trainer.is_global_zero:
            record_val_correct(self.run_dir, predictions)
