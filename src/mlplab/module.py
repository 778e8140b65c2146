"""The Lightning module: the network, its loss, accuracy and optimizer."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from mlplab.network import build_mlp

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")


class MLPClassifier(L.LightningModule):
    """Classifies uint8 images with an MLP; normalises each batch on the device itself.

    Every argument is a plain value, so checkpoints load with ``torch.load(weights_only=True)``
    and ``MLPClassifier.load_from_checkpoint`` rebuilds the exact network without any config system.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        depth: int = 2,
        width: int | Sequence[int] = 512,
        activation: str = "relu",
        dropout: float = 0.0,
        output_activation: str = "none",
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        scheduler: str = "none",
        min_lr: float = 0.0,
        max_epochs: int = 10,
        input_mean: Sequence[float] = (0.0,),
        input_std: Sequence[float] = (1.0,),
        class_names: Sequence[str] = (),
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        self.save_hyperparameters()
        self.network = build_mlp(num_features, num_classes, depth, width, activation, dropout, output_activation)
        # Buffers, not parameters: saved with the weights and moved with the module, never trained.
        self.register_buffer("input_mean", torch.tensor(list(input_mean)).view(-1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(list(input_std)).view(-1, 1, 1), persistent=False)
        # One metric object per stage, so training batches never leak into validation accuracy.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 N x C x H x W -> float, standardised per channel with the training split's statistics."""
        return (images.float() / 255 - self.input_mean) / self.input_std

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.network(self.normalize(images))

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels)
        # Epoch-level for every stage: train and val curves share points, and no step pays for a log write.
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    @override
    def configure_optimizers(self):
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.max_epochs, eta_min=hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

