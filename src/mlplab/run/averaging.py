"""Averaged weights (``callbacks=ema``): Lightning's EMAWeightAveraging, with the average also what a run is
tested with.

Lightning's callback validates with the average and saves it as a checkpoint's ``state_dict`` (the trained weights
beside it, for resuming). Loading a checkpoint to test, it would put the trained weights back, so a run's test/acc
would not be its best checkpoint's; here a checkpoint loaded outside fitting keeps its ``state_dict``, the average,
as mlplab-eval and mlplab-predict read it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class EMAWeights(EMAWeightAveraging):
    """An exponential moving average of the weights, validated, checkpointed and tested (see the module)."""

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resuming: the average and the trained weights both continue
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
