"""Validation metrics of every epoch, to report the best epoch without validating again."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class ValidationHistory(Callback):
    """Records ``val/*`` after each validation epoch (sanity checks excluded).

    A validation run after training would log a second point at the last step and bend the curves.
    """

    def __init__(self, monitor: str = "val/acc"):
        self.monitor = monitor
        self.epochs: list[dict[str, float]] = []

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        self.epochs.append({"epoch": trainer.current_epoch, **values})

    def best(self) -> dict[str, Any]:
        """The first epoch with the highest ``monitor`` value, as ModelCheckpoint keeps it."""
        if not self.epochs:
            return {}
        best = max(self.epochs, key=lambda row: row.get(self.monitor, float("-inf")))
        return {**{key: value for key, value in best.items() if key != "epoch"}, "best_epoch": best["epoch"]}
