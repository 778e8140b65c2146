"""Views of a run's predictions: confusion matrices, per-class test accuracy, the most confident test mistakes."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor
from typing_extensions import override

from mlplab.model.classifier import EpochPredictions
from mlplab.run.trackers import image_writer
from mlplab.run.views.figures import confusion_image, image_grid
from mlplab.run.views.tensorboard import tensorboard_writer


def split_predictions(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> EpochPredictions | None:
    """The last ``stage`` pass's predictions over the whole split: in a data-parallel run, every rank's, gathered
    (every rank must call this; the views then draw on rank 0 only)."""
    local = pl_module.epoch_predictions.get(stage)
    if trainer.world_size == 1 or local is None:
        return local
    loader = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    positions = loader.positions()[: len(local.labels)]  # limit_*_batches may have ended the pass early
    parts = [positions, local.classes, local.labels, local.confidences]
    gathered = [_gather_uneven(trainer, part.to(local.labels.device)) for part in parts]
    order = gathered[0].argsort()
    return EpochPredictions(*(part[order] for part in gathered[1:]), positions=gathered[0][order])


def _gather_uneven(trainer: L.Trainer, values: Tensor) -> Tensor:
    """Every rank's ``values`` (1-D, lengths may differ by rank), one after another."""
    lengths = trainer.strategy.all_gather(torch.tensor([len(values)], device=values.device)).flatten().tolist()
    padded = values.new_zeros(max(lengths))
    padded[: len(values)] = values
    gathered = trainer.strategy.all_gather(padded).view(len(lengths), -1)
    return torch.cat([row[:length] for row, length in zip(gathered, lengths)])


def confusion_counts(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """counts[true, predicted] over the samples."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def class_names_of(pl_module: L.LightningModule) -> list[str]:
    names = list(pl_module.hparams.get("class_names") or [])
    return names or [str(index) for index in range(pl_module.hparams.num_classes)]


class ConfusionMatrix(Callback):
    """``val/confusion_matrix`` after each validation and ``test/confusion_matrix`` after testing, as images; the
    test counts also as a table in the Text tab, to copy from."""

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw("val", trainer, pl_module)

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw("test", trainer, pl_module)

    def _draw(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_image, predictions = image_writer(trainer.loggers), split_predictions(trainer, pl_module, stage)
        if write_image is None or predictions is None or not trainer.is_global_zero:
            return
        names = class_names_of(pl_module)
        counts = confusion_counts(predictions.classes, predictions.labels, len(names)).cpu().numpy()
        when = (
            f"epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
            if stage == "val"
            else f"step {trainer.global_step}"
        )
        title = f"{stage} confusion matrix ({counts.sum()} images; {when}), colour: share of the row"
        write_image(f"{stage}/confusion_matrix", confusion_image(counts, names, title), trainer.global_step)
        writer = tensorboard_writer(trainer)
        if stage == "test" and writer is not None:
            writer.add_text("test/confusion_matrix", confusion_markdown(counts, names), trainer.global_step)


def confusion_markdown(counts: Any, class_names: list[str]) -> str:
    """A Markdown table: one row per true class, one column per predicted class."""
    lines = ["| true \\ predicted | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    lines += [
        f"| {name} | " + " | ".join(str(int(count)) for count in row) + " |" for name, row in zip(class_names, counts)
    ]
    return "\n".join(lines)


class PerClassAccuracy(Callback):
    """``test/acc_per_class/<class name>`` scalars after testing ("/" in a name becomes "_")."""

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer, predictions = tensorboard_writer(trainer), split_predictions(trainer, pl_module, "test")
        if writer is None or predictions is None or not trainer.is_global_zero:
            return
        names = class_names_of(pl_module)
        counts = confusion_counts(predictions.classes, predictions.labels, len(names)).double()
        accuracies = counts.diag() / counts.sum(dim=1).clamp(min=1)
        for name, accuracy in zip(names, accuracies.tolist()):
            writer.add_scalar(f"test/acc_per_class/{name.replace('/', '_')}", accuracy, trainer.global_step)


class MisclassifiedImages(Callback):
    """``test/misclassified``: the test images the model got wrong with the highest confidence, as one grid.

    Each is captioned with its true class and the predicted class with its probability.
    """

    def __init__(self, max_images: int = 32):
        self.max_images = max_images

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_image, tested = image_writer(trainer.loggers), split_predictions(trainer, pl_module, "test")
        if write_image is None or tested is None or self.max_images <= 0 or not trainer.is_global_zero:
            return
        predictions, labels, confidences, positions = tested
        wrong = (predictions != labels).nonzero().flatten()
        probabilities = confidences[wrong]
        order = probabilities.argsort(descending=True)[: self.max_images]
        names = class_names_of(pl_module)
        captions = [
            f"true: {names[labels[wrong[i]]]}\npred: {names[predictions[wrong[i]]]} {probabilities[i]:.2f}"
            for i in order.tolist()
        ]
        if captions:
            # Tested in order (no shuffling): without positions, the i-th prediction is the split's i-th image.
            shown = wrong[order] if positions is None else positions[wrong[order]]
            images = trainer.datamodule.splits["test"].images[shown].cpu()
            write_image("test/misclassified", image_grid(images.numpy(), captions), trainer.global_step)
