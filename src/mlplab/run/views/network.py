"""Views of the network itself: weight and gradient histograms, its graph and layer table, the learning rate."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlplab.model.backbones import count_parameters
from mlplab.run.views.tensorboard import tensorboard_writer


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
    """The network's graph (Graphs tab) and, in the Text tab, its layers with parameter counts and the run's config;
    to W&B, the layers as a table (``run/architecture``).

    ``config`` is the run's resolved config (conf/callbacks/default.yaml fills it in). Written once, when a run
    starts; a resumed run has them already.
    """

    def __init__(self, graph: bool = True, config: dict[str, Any] | None = None):
        self.graph, self.config = graph, config

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            return
        network = pl_module.network
        for logger in trainer.loggers:  # W&B: the layer table as a table of text
            if isinstance(logger, WandbLogger):
                logger.log_text("run/architecture", ARCHITECTURE_COLUMNS, architecture_rows(network), step=0)
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        writer.add_text("run/architecture", architecture_markdown(network), 0)
        if self.config:
            # Indented four spaces: Markdown shows it as a code block, line breaks kept.
            writer.add_text(
                "run/config", "    " + yaml.safe_dump(self.config, sort_keys=False).replace("\n", "\n    "), 0
            )
        if self.graph:
            example = torch.zeros(1, *pl_module.hparams["input_shape"], device=pl_module.device, dtype=pl_module.dtype)
            with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns that it is deprecated
                warnings.simplefilter("ignore")
                writer.add_graph(network, example)


ARCHITECTURE_COLUMNS = ["#", "layer", "parameters"]


def architecture_rows(network: torch.nn.Module) -> list[list[str]]:
    """The network's layers with their parameter counts, then its total: one row each, as text."""
    rows = [[name, str(layer), f"{count_parameters(layer):,}"] for name, layer in network.named_children()]
    return [*rows, ["", "total", f"{count_parameters(network):,}"]]


def architecture_markdown(network: torch.nn.Module) -> str:
    """A Markdown table of the network's layers with their output sizes and parameter counts, then its total."""
    *layers, (_, _, total) = architecture_rows(network)
    rows = ["| # | layer | parameters |", "|---|---|---:|"]
    rows += [f"| {name} | `{layer}` | {parameters} |" for name, layer, parameters in layers]
    rows.append(f"| | **total** | **{total}** |")
    return "\n".join(rows)


class LearningRate(Callback):
    """``train/lr``, the learning rate of each epoch, when a schedule changes it: read as the epoch starts, logged in
    the epoch's row of training metrics (ImageClassifier.train_row)."""

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Read as the epoch starts: the schedule may step before the epoch's end.
        if trainer.lr_scheduler_configs:
            pl_module.train_row["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
