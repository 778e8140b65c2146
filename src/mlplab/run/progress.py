"""Progress in the terminal: tqdm's bar where someone watches it, one line per epoch where output goes to a file."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from typing_extensions import override


def progress_bar(refresh_rate: int = 20) -> ProgressBar:
    """tqdm's bar on a terminal; off one (``make train > log``, a cluster job), where its redraws would fill the file
    with copies of each bar, a line per epoch."""
    return TQDMProgressBar(refresh_rate=refresh_rate) if sys.stderr.isatty() else EpochLines()


class EpochLines(ProgressBar):
    """``epoch 3/10: train/loss 0.4123, train/acc 0.8512, val/loss 0.3901, val/acc 0.8634 (2.1 s)`` on stderr.

    Printed when the next epoch starts (or training ends): the epoch's training metrics are logged after its
    validation, at the very end of the epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started: float | None = None
        self._epoch = -1  # the epoch running (Lightning's count), whose line is due when the next one starts

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch continues that epoch without a new epoch start; its line is due all the same.
        self._epoch, self._started = trainer.current_epoch, time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self._epoch:
            self._say_epoch(trainer, trainer.current_epoch)
            self._epoch, self._started = trainer.current_epoch, time.perf_counter()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say_epoch(trainer, trainer.current_epoch)

    def _say_epoch(self, trainer: L.Trainer, finished: int) -> None:
        """The line of the epoch numbered ``finished`` (counting from 1: Lightning's count of finished epochs)."""
        if self._started is None or not self._enabled or not trainer.is_global_zero:
            return
        metrics: dict[str, Any] = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.split("/")[0] in ("train", "val") and "/" in key
        }
        shown = ", ".join(f"{key} {value:.4f}" for key, value in sorted(metrics.items()))
        seconds = time.perf_counter() - self._started
        print(f"epoch {finished}/{trainer.max_epochs}: {shown} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        self._started = None
