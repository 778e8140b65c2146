"""The engine of stacked sweeps, its Lightning module: K image classifiers (a stack's jobs, each as its single run
builds it, of one shape or several) trained together on the stacked network (mlplab.model.stacked_network).

Each step takes K batches (each job's own, in its seed's order), computes the K networks in one stacked pass,
and steps each network with its own optimizer. Each network's epoch metrics, and the state of its single run
(weights, optimizer state, epoch outputs so far), can be read out for that job's records and checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from mlplab.compat import loops_with_schedule_steps
from mlplab.model.backbones import backbone_from_dict
from mlplab.model.classifier import (
    EpochPredictions,
    ImageClassifier,
    divergence_message,
    normalized,
    optimizer_steps,
)
from mlplab.model.stacked_network import PerNetworkOptimizer, stacked_networks


class StackedClassifier(L.LightningModule):
    """``models``: each job's classifier as its single run builds it (same seed, same initial weights)."""

    def __init__(self, models: Sequence[ImageClassifier]):
        super().__init__()
        self.stack = stacked_networks(
            [backbone_from_dict(model.hparams["backbone"]) for model in models], [model.network for model in models]
        )
        self.optimizer_settings = [model.optimizer_settings for model in models]
        self.schedule_settings = [model.schedule_settings for model in models]
        self.max_epochs = models[0].hparams["max_epochs"]
        self.label_smoothing = [model.hparams["label_smoothing"] for model in models]  # each job's training loss's
        # Per network, its schedule's Lightning config (built with the optimizers), or None for a constant rate.
        self.schedules: list[dict[str, Any] | None] = []
        self._schedule_states: list[dict[str, Any] | None] | None = None  # a resumed stack's, until they exist
        self.register_buffer("input_scale", models[0].input_scale.clone(), persistent=False)
        self.register_buffer("input_shift", models[0].input_shift.clone(), persistent=False)
        self.size = len(models)
        # Per network, why it stopped: a diverged or pruned one no longer steps, and its records end there.
        self.diverged: dict[int, str] = {}
        self.pruned: dict[int, str] = {}  # by a search's pruner (mlplab.sweeps.search)
        self._outputs: dict[str, list[tuple[Tensor, ...]]] = {"train": [], "val": [], "test": []}
        # Per stage, each network's loss and accuracy over the last finished epoch.
        self.epoch_metrics: dict[str, list[dict[str, float]]] = {}
        self.predictions: dict[str, list[EpochPredictions]] = {}  # per stage (val, test), each network's last

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images, standardised as each job's single run does (the same statistics for all: the same data)."""
        return normalized(images, self.input_scale, self.input_shift)

    @override
    def forward(self, images: Tensor) -> Tensor:
        """K x B x C x H x W uint8 images (one batch per network) -> K x B x classes logits."""
        return self.stack(self.normalize(images))

    def _losses(self, logits: Tensor, labels: Tensor, smoothing: float | Sequence[float] = 0.0) -> Tensor:
        """Each network's mean loss over its batch (labels K x B); ``smoothing``: the training loss's, one for all
        or each network's own (the networks of each value in one cross-entropy, as their single runs compute it)."""
        values = set(smoothing) if isinstance(smoothing, Sequence) else {smoothing}
        if len(values) == 1:
            flat = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), reduction="none", label_smoothing=values.pop()
            )
            return flat.view(labels.shape).mean(1)
        losses = logits.new_empty(labels.shape[0])
        for value in values:
            index = torch.tensor([k for k, own in enumerate(smoothing) if own == value], device=logits.device)
            losses = losses.index_copy(0, index, self._losses(logits[index], labels[index], value))
        return losses

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, labels = batch
        logits = self(images)
        if not logits.requires_grad:  # every network has left the stack (the epoch ends without them): no step
            return None
        losses = self._losses(logits, labels, self.label_smoothing)
        self._outputs["train"].append((losses.detach(), logits.detach().argmax(dim=2), labels))
        # Free on the CPU: a diverged network stops before this step reaches it.
        if losses.device.type == "cpu" and not bool(losses.isfinite().all()):
            self.check_finite_loss()
        return losses.sum()

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch  # the same batch for every network
        hidden = self.normalize(images)
        logits = self.stack(hidden.unsqueeze(0).expand(self.size, *hidden.shape))
        stacked_labels = labels.unsqueeze(0).expand(self.size, -1)
        confidences, classes = logits.softmax(dim=2).max(dim=2)
        self._outputs[stage].append((self._losses(logits, stacked_labels), classes, stacked_labels, confidences))

    def check_finite_loss(self) -> None:
        """Mark each network whose training loss this epoch became NaN or infinite as diverged: from then on it
        no longer steps. One device sync per call; called before anything is validated or checkpointed."""
        outputs = self._outputs["train"]
        if not outputs:
            return
        finite = torch.stack([losses for losses, *_ in outputs]).isfinite()  # steps x K
        if bool(finite.all()):
            return
        for index in (~finite.all(dim=0)).nonzero().flatten().tolist():
            if index in self.diverged:
                continue
            first = int((~finite[:, index]).nonzero()[0])
            step = self.global_step - len(outputs) + first + 1
            self.diverged[index] = divergence_message(float(outputs[first][0][index]), step, self.current_epoch + 1)
            self._leave(index)

    def prune(self, index: int, reason: str) -> None:
        """Stop network ``index`` (a search pruned its trial): from the next step on it is no longer computed."""
        self.pruned[index] = reason
        self._leave(index)

    def _leave(self, index: int) -> None:
        """Network ``index`` no longer steps nor is computed: the stack does the others' work only."""
        self.optimizers().optimizer.frozen.add(index)
        self.stack.leave(index)

    def _epoch_metrics(self, stage: str) -> None:
        outputs = self._outputs[stage]
        if not outputs:
            return
        losses, predictions, labels, *confidences = zip(*outputs)
        if confidences:  # for the views: each network's predictions over the split
            split_labels = torch.cat([batch[0] for batch in labels])
            self.predictions[stage] = [
                EpochPredictions(classes, split_labels, confidence)
                for classes, confidence in zip(torch.cat(predictions, dim=1), torch.cat(confidences[0], dim=1))
            ]
        sizes = torch.tensor([batch.shape[1] for batch in labels], device=losses[0].device, dtype=losses[0].dtype)
        # As one run's metrics: the batches' mean losses weighted by their sizes; the share of samples right.
        loss = (torch.stack(losses) * sizes.unsqueeze(1)).sum(0) / sizes.sum()
        acc = (torch.cat(predictions, dim=1) == torch.cat(labels, dim=1)).float().mean(1)
        self.epoch_metrics[stage] = [
            {f"{stage}/loss": values[0], f"{stage}/acc": values[1]}
            for values in torch.stack([loss.float(), acc]).T.tolist()
        ]
        outputs.clear()

    @override
    def on_validation_start(self) -> None:
        self.check_finite_loss()

    def end_train_epoch(self) -> None:
        """Each network's train/loss and train/acc over the epoch (once per epoch; callbacks may ask first)."""
        self.check_finite_loss()
        self._epoch_metrics("train")

    @override
    def on_train_epoch_end(self) -> None:
        self.end_train_epoch()
        self._step_schedules("epoch")

    @override
    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._step_schedules("epoch", plateau=True)

    @override
    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test")

    def epoch_outputs(self, index: int) -> dict[str, Any] | None:
        """Network ``index``'s training outputs of the epoch so far, as its single run's checkpoint keeps them
        mid-epoch (ImageClassifier.on_save_checkpoint); None at an epoch's end."""
        outputs = self._outputs["train"]
        if not outputs or len(outputs) >= self.trainer.num_training_batches:
            return None
        losses, predictions, labels = zip(*outputs)
        return {
            "losses": torch.stack([batch[index] for batch in losses]).cpu(),
            "sizes": [batch.shape[1] for batch in labels],
            "predictions": torch.cat([batch[index] for batch in predictions]).cpu(),
            "labels": torch.cat([batch[index] for batch in labels]).cpu(),
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        outputs = self._outputs["train"]
        if outputs and len(outputs) < self.trainer.num_training_batches:
            losses, predictions, labels = zip(*outputs)
            checkpoint["train_epoch_outputs"] = {
                "losses": torch.stack(losses).cpu(),
                "predictions": [batch.cpu() for batch in predictions],
                "labels": [batch.cpu() for batch in labels],
            }
        checkpoint["diverged"] = dict(self.diverged)
        checkpoint["pruned"] = dict(self.pruned)
        checkpoint["schedules"] = [
            None if config is None else config["scheduler"].state_dict() for config in self.schedules
        ]

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("train_epoch_outputs")
        if saved:
            self._outputs["train"] = [
                (losses.to(self.device), predictions.to(self.device), labels.to(self.device))
                for losses, predictions, labels in zip(saved["losses"].unbind(), saved["predictions"], saved["labels"])
            ]
        self.diverged = dict(checkpoint.get("diverged", {}))
        self.pruned = dict(checkpoint.get("pruned", {}))
        for index in {**self.diverged, **self.pruned}:  # they left the stack before it stopped (still frozen: the
            self.stack.leave(index)  # optimizer's own state says so)
        self._schedule_states = checkpoint.get("schedules")

    def _step_schedules(self, interval: str, plateau: bool = False) -> None:
        """Each network's schedule as Lightning steps one run's: per step, per epoch, or (ReduceLROnPlateau) after
        validation with the network's own monitored metric, as ImageClassifier steps it."""
        for index, config in enumerate(self.schedules):
            if config is None or index in self.diverged or index in self.pruned or config["interval"] != interval:
                continue
            scheduler = config["scheduler"]
            if isinstance(scheduler, ReduceLROnPlateau) == plateau:
                scheduler.step(*([self.epoch_metrics["val"][index][config["monitor"]]] if plateau else []))

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._step_schedules("step")  # before any checkpoint of this step: a resumed stack goes on exactly

    @override
    def configure_optimizers(self) -> PerNetworkOptimizer:
        optimizer = PerNetworkOptimizer(self.stack, [settings.build for settings in self.optimizer_settings])
        steps = optimizer_steps(self.trainer)
        self.schedules = [
            settings.build(network, self.max_epochs, steps)
            for settings, network in zip(self.schedule_settings, optimizer.networks)
        ]
        for config, state in zip(self.schedules, self._schedule_states or []):
            if config is not None and state is not None:
                config["scheduler"].load_state_dict(state)
        return optimizer

    def schedule_states(self, index: int) -> list[dict[str, Any]]:
        """Network ``index``'s schedule state as its single run's checkpoint keeps it (``lr_schedulers``)."""
        config = self.schedules[index] if self.schedules else None
        return [] if config is None else [config["scheduler"].state_dict()]

    def network_loops(self, index: int, loops: dict[str, Any]) -> dict[str, Any]:
        """The stack's loop state with network ``index``'s schedule steps counted, as Lightning counts one run's."""
        config = self.schedules[index] if self.schedules else None
        if config is None:
            return loops
        # an epoch's schedule has stepped once this epoch at its end (no outputs left); a step's, once per batch
        this_epoch = None if config["interval"] == "step" else int(self.epoch_outputs(index) is None)
        return loops_with_schedule_steps(loops, config["scheduler"].last_epoch, this_epoch)
