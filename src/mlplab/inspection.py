"""What a run shows in TensorBoard beyond loss and accuracy curves.

Each view is a callback of its own, listed in ``conf/callbacks/default.yaml`` and switched off there (or with
``callbacks.<name>=null``): confusion matrices, the test set's most confident mistakes, per-class test accuracy,
weight and gradient histograms, the network's graph and a text summary, and the learning rate under a schedule.
They write to the run's TensorBoard logger and do nothing without one.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
import numpy as np
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import override

from mlplab.figures import confusion_image, image_grid
from mlplab.module import EpochPredictions
from mlplab.network import count_parameters


def tensorboard_writer(trainer: L.Trainer) -> SummaryWriter | None:
    """The run's TensorBoard writer, if it logs to TensorBoard."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def add_png(writer: SummaryWriter, tag: str, image: np.ndarray, step: int) -> None:
    """An H x W x 3 uint8 image into the Images tab.

    ``SummaryWriter.add_image`` converts it to float and back, resamples it at its own size and compresses at
    level 6: ~20 ms for the misclassified grid, against ~7 ms for this fast compression (10 % larger files).
    """
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG", compress_level=1)
    height, width, channels = image.shape
    summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue()))])
    writer._get_file_writer().add_summary(summary, step)  # what add_image itself calls once it has the summary


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
        writer, predictions = tensorboard_writer(trainer), split_predictions(trainer, pl_module, stage)
        if writer is None or predictions is None or not trainer.is_global_zero:
            return
        names = class_names_of(pl_module)
        counts = confusion_counts(predictions.classes, predictions.labels, len(names)).cpu().numpy()
        when = f"epoch {trainer.current_epoch}, step {trainer.global_step}" if stage == "val" else f"step {trainer.global_step}"
        title = f"{stage} confusion matrix ({counts.sum()} images; {when}), colour: share of the row"
        add_png(writer, f"{stage}/confusion_matrix", confusion_image(counts, names, title), trainer.global_step)
        if stage == "test":
            writer.add_text("test/confusion_matrix", confusion_markdown(counts, names), trainer.global_step)


def confusion_markdown(counts: Any, class_names: list[str]) -> str:
    """A Markdown table: one row per true class, one column per predicted class."""
    lines = ["| true \\ predicted | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(int(count)) for count in row) + " |" for name, row in zip(class_names, counts)]
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
        writer, tested = tensorboard_writer(trainer), split_predictions(trainer, pl_module, "test")
        if writer is None or tested is None or self.max_images <= 0 or not trainer.is_global_zero:
            return
        predictions, labels, confidences, positions = tested
        wrong = (predictions != labels).nonzero().flatten()
        probabilities = confidences[wrong]
        order = probabilities.argsort(descending=True)[: self.max_images]
        names = class_names_of(pl_module)
        captions = [f"true: {names[labels[wrong[i]]]}\npred: {names[predictions[wrong[i]]]} {probabilities[i]:.2f}"
                    for i in order.tolist()]
        if captions:
            # Tested in order (no shuffling): without positions, the i-th prediction is the split's i-th image.
            shown = wrong[order] if positions is None else positions[wrong[order]]
            images = trainer.datamodule.splits["test"].images[shown].cpu()
            add_png(writer, "test/misclassified", image_grid(images.numpy(), captions), trainer.global_step)


class WeightHistograms(Callback):
    """Histograms of each layer's weights and of its gradients (from the epoch's last batch) every N epochs.

    Off by default (``every_n_epochs: 0``): for the default network it costs about 3 % of a CPU epoch.
    """

    def __init__(self, every_n_epochs: int = 0):
        self.every_n_epochs = every_n_epochs

    def _due(self, trainer: L.Trainer) -> bool:
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    @rank_zero_only
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not (trainer.is_last_batch and self._due(trainer)):  # checked first: this runs at every step
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for name, parameter in pl_module.network.named_parameters():  # at the step these gradients make
            if parameter.grad is not None:
                writer.add_histogram(f"gradients/{name}", parameter.grad, trainer.global_step + 1)

    @override
    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self._due(trainer):
            return
        for name, parameter in pl_module.network.named_parameters():
            writer.add_histogram(f"weights/{name}", parameter.detach(), trainer.global_step)


class ModelDescription(Callback):
    """The network's graph (Graphs tab) and, in the Text tab, its layers with parameter counts and the run's config.

    ``config`` is the run's resolved config (conf/callbacks/default.yaml fills it in). Written once, when a run
    starts; a resumed run has them already.
    """

    def __init__(self, graph: bool = True, config: dict[str, Any] | None = None):
        self.graph, self.config = graph, config

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or trainer.ckpt_path:
            return
        network = pl_module.network
        writer.add_text("run/architecture", architecture_markdown(network), 0)
        if self.config:
            # Indented four spaces: Markdown shows it as a code block, line breaks kept.
            writer.add_text("run/config", "    " + OmegaConf.to_yaml(self.config).replace("\n", "\n    "), 0)
        if self.graph:
            example = torch.zeros(1, *trainer.datamodule.input_shape, device=pl_module.device)
            with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns that it is deprecated
                warnings.simplefilter("ignore")
                writer.add_graph(network, example)


def architecture_markdown(network: torch.nn.Module) -> str:
    """A Markdown table of the network's layers with their output sizes and parameter counts, then its total."""
    rows = ["| # | layer | parameters |", "|---|---|---:|"]
    for index, layer in enumerate(network):
        rows.append(f"| {index} | `{layer}` | {count_parameters(layer):,} |")
    rows.append(f"| | **total** | **{count_parameters(network):,}** |")
    return "\n".join(rows)


class LearningRate(Callback):
    """``train/lr``, the learning rate of each epoch, when a schedule changes it."""

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Read as the epoch starts: Lightning steps an epoch schedule before the epoch's end hooks run.
        if trainer.lr_scheduler_configs:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])
