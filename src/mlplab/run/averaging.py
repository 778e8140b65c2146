"""Averaged weights (``callbacks=ema``, ``callbacks=swa``): Lightning's WeightAveraging callbacks, with the average
also what a run is tested with.

Lightning's callbacks validate with the average and save it as a checkpoint's ``state_dict`` (the trained weights
beside it, for resuming). Loading a checkpoint to test, they would put the trained weights back, so a run's test/acc
would not be its best checkpoint's; here a checkpoint loaded outside fitting keeps its ``state_dict``, the average,
as mlplab-eval and mlplab-predict read it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_swa_avg_fn
from typing_extensions import override

from mlplab.errors import SettingError
from mlplab.run.config import ConfigError


class AveragedWeights(WeightAveraging):
    """Weights averaged while training, validated, checkpointed and tested (see the module)."""

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resuming: the average and the trained weights both continue
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMAWeights(AveragedWeights, EMAWeightAveraging):
    """An exponential moving average of the weights (Lightning's EMAWeightAveraging), tested with too."""


class SWAWeights(AveragedWeights):
    """Stochastic Weight Averaging: the equal average of the weights at the end of each epoch, from
    ``swa_epoch_start`` on (torch's AveragedModel, its buffers averaged too). Until the first epoch is averaged,
    validation and the checkpoints see the trained weights; from then on, the average.

    ``swa_epoch_start``, as Lightning's StochasticWeightAveraging takes it: an epoch number (an integer >= 1,
    counted from 1), or a share 0 < s < 1 of ``trainer.max_epochs`` (epoch ``int(s * max_epochs)``, at least 1).
    Unlike Lightning's StochasticWeightAveraging, the learning rate and its schedule are left as configured, and
    batch-norm statistics are not recomputed: they are averaged like the weights.
    """

    def __init__(self, swa_epoch_start: int | float = 0.8):
        share = isinstance(swa_epoch_start, float) and 0 < swa_epoch_start < 1
        epoch = isinstance(swa_epoch_start, int) and not isinstance(swa_epoch_start, bool) and swa_epoch_start >= 1
        if not (share or epoch):
            raise SettingError(
                "swa_epoch_start",
                "swa_epoch_start must be a share of trainer.max_epochs (a number 0 < s < 1) or the first epoch "
                f"averaged (an integer >= 1), got {swa_epoch_start!r}",
            )
        # The equal average, one tensor at a time: AveragedModel's default on a GPU (foreach) cannot average batch
        # norm's integer num_batches_tracked.
        super().__init__(avg_fn=get_swa_avg_fn())
        self.swa_epoch_start = swa_epoch_start
        self.epochs_averaged = 0
        self._first_epoch = 0  # counted from 0, as Lightning's current_epoch; set when fitting starts
        self._ending_epoch: int | None = None  # the epoch whose last training batch has just ended

    def first_epoch(self, max_epochs: int | None) -> int:
        """The first epoch averaged, counted from 1, in a run of ``max_epochs``."""
        if isinstance(self.swa_epoch_start, int):
            if max_epochs is not None and max_epochs >= 1 and self.swa_epoch_start > max_epochs:
                raise ConfigError(
                    f"callbacks.swa.swa_epoch_start={self.swa_epoch_start} is after the last epoch "
                    f"(trainer.max_epochs={max_epochs}): nothing would be averaged"
                )
            return self.swa_epoch_start
        if max_epochs is None or max_epochs < 1:
            raise ConfigError(
                f"callbacks.swa.swa_epoch_start={self.swa_epoch_start} is a share of trainer.max_epochs, which is "
                "not set; give the first epoch averaged as an integer"
            )
        return max(int(self.swa_epoch_start * max_epochs), 1)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._first_epoch = self.first_epoch(trainer.max_epochs) - 1
        super().setup(trainer, pl_module, stage)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Averaged after the epoch's last step, not at its end as Lightning's epoch updates are: those come after
        # the epoch's validation, which would measure (and best.ckpt keep) the previous epoch's average.
        last = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        self._ending_epoch = trainer.current_epoch if last else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After each epoch's last optimizer step from the first epoch on (once started, it goes on even if a
        resumed run's trainer.max_epochs moves a share's start). Lightning asks only where an update may follow,
        and updates when told yes: the count of epochs averaged is kept here."""
        due = (
            step_idx is not None
            and self._ending_epoch is not None
            and (self._ending_epoch >= self._first_epoch or self.epochs_averaged > 0)
        )
        self.epochs_averaged += due
        return due

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epochs_averaged": self.epochs_averaged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epochs_averaged = state_dict["epochs_averaged"]

    # Before the first epoch is averaged, there is no average: validation, the checkpoints and the end of training
    # keep the trained weights (Lightning's would use the copy of the initial weights the average starts from).

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs_averaged:
            super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs_averaged:
            super().on_validation_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs_averaged:
            super().on_train_end(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if not self.epochs_averaged and "current_model_state" in checkpoint:
            # The average's own state (none averaged yet) stays for resuming; its first update replaces it.
            checkpoint["state_dict"] = checkpoint["current_model_state"]
