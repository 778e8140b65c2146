"""The Lightning module: any backbone as an image classifier, with its loss, accuracy, optimizer and schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from mlplab.earlier_versions import upgraded_hparams
from mlplab.errors import MlplabError
from mlplab.model.backbones import Backbone, backbone_from_dict
from mlplab.model.optim import OptimizerSettings, ScheduleSettings

STAGES = ("train", "val", "test")


class EpochPredictions(NamedTuple):
    """One finished epoch's predictions, in the order of its batches."""

    classes: Tensor  # the predicted class of each sample
    labels: Tensor  # its true class
    confidences: Tensor | None  # the predicted class's probability (softmax of the output); None for training
    positions: Tensor | None = None  # each sample's index in the split; None: the i-th is the split's i-th


class DivergedError(MlplabError):
    """The training loss became NaN or infinite."""

    exit_status = 1
    label = "diverged"


def normalized(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """uint8 images (any leading dimensions, then C x H x W) -> ``images * scale + shift`` per channel, in the
    dtype of ``scale``: float32, or what a "-true" precision (bf16, 16, 64) made the weights. Also the stack's."""
    return images.to(scale.dtype).mul_(scale).add_(shift)


def divergence_message(loss: float, step: int, epoch: int) -> str:
    """Why a run stopped as diverged (a single run's DivergedError, a stacked job's record)."""
    return (
        f"train/loss became {loss} at step {step} (epoch {epoch}); "
        "try a lower optimizer.lr or set trainer.gradient_clip_val"
    )


class ImageClassifier(L.LightningModule):
    """Classifies uint8 images with any backbone; normalises each batch on the device itself.

    Its hyperparameters are plain values (the backbone's, optimizer's and schedule's settings as dicts), so
    checkpoints load with ``torch.load(weights_only=True)`` and ``from_checkpoint`` rebuilds the exact network
    without any config system.
    """

    def __init__(
        self,
        backbone: Backbone | dict[str, Any],
        input_shape: Sequence[int],
        num_classes: int,
        optimizer: OptimizerSettings | dict[str, Any] = OptimizerSettings(),
        scheduler: ScheduleSettings | dict[str, Any] = ScheduleSettings(),
        max_epochs: int | None = None,  # the epochs a schedule spans; None: the trainer's (trainer.max_epochs)
        input_mean: Sequence[float] = (0.0,),
        input_std: Sequence[float] = (1.0,),
        class_names: Sequence[str] = (),
        label_smoothing: float = 0.0,  # the training loss's; validation and test report the plain cross-entropy
    ):
        super().__init__()
        backbone = backbone_from_dict(backbone) if isinstance(backbone, dict) else backbone
        self.optimizer_settings = OptimizerSettings.from_dict(optimizer) if isinstance(optimizer, dict) else optimizer
        self.schedule_settings = ScheduleSettings.from_dict(scheduler) if isinstance(scheduler, dict) else scheduler
        self.save_hyperparameters(
            {
                "backbone": backbone.as_dict(),
                "input_shape": list(input_shape),
                "num_classes": num_classes,
                "optimizer": self.optimizer_settings.as_dict(),
                "scheduler": self.schedule_settings.as_dict(),
                "max_epochs": max_epochs,
                "input_mean": list(input_mean),
                "input_std": list(input_std),
                "class_names": list(class_names),
                "label_smoothing": label_smoothing,
            },
            logger=False,
        )  # the run logs its whole config itself (mlplab.run.trackers)
        self.network = backbone.build(tuple(input_shape), num_classes)
        # (x / 255 - mean) / std as one multiply and one add per pixel. Buffers move with the module; not
        # persistent, since the hyperparameters already hold mean and std.
        mean, std = torch.tensor(list(input_mean)).view(-1, 1, 1), torch.tensor(list(input_std)).view(-1, 1, 1)
        self.register_buffer("input_scale", 1 / (255 * std), persistent=False)
        self.register_buffer("input_shift", -mean / std, persistent=False)
        # Per stage, a mean of the loss and an accuracy over the epoch. A metric update costs more than a training
        # step of a small MLP on the CPU, so each step only keeps its loss and predictions (one integer per sample),
        # and the metrics take a whole epoch in one update at its end.
        for stage in STAGES:  # train_metrics, val_metrics, test_metrics
            setattr(
                self,
                f"{stage}_metrics",
                torch.nn.ModuleDict(
                    {
                        "loss": MeanMetric(nan_strategy="disable"),  # NaN checks would sync the GPU
                        "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                    }
                ),
            )
        self._epoch_outputs: dict[str, list[tuple[Tensor, ...]]] = {stage: [] for stage in STAGES}
        # Per stage, the last finished epoch's predictions, for the views that inspect them (mlplab.run.views).
        self.epoch_predictions: dict[str, EpochPredictions] = {}
        # What callbacks add to this epoch's row of training metrics (the LearningRate view: train/lr).
        self.train_row: dict[str, float] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ImageClassifier:
        """The trained model of a checkpoint's contents (as ``torch.load`` returns them), in evaluation mode."""
        model = cls(**upgraded_hparams(checkpoint["hyper_parameters"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 N x C x H x W -> float, standardised per channel with the training split's statistics."""
        return normalized(images, self.input_scale, self.input_shift)

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.network(self.normalize(images))

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0
        )
        if stage == "train":
            self._epoch_outputs[stage].append((loss.detach(), logits.detach().argmax(dim=1), labels))
        else:  # evaluation keeps each prediction's probability too: the views show the most confident mistakes
            confidences, classes = logits.detach().softmax(dim=1).max(dim=1)
            self._epoch_outputs[stage].append((loss.detach(), classes, labels, confidences))
        return loss

    def _log_epoch(self, stage: str) -> None:
        """``<stage>/loss`` and ``<stage>/acc`` over the epoch (synchronised across processes)."""
        outputs, metrics = self._epoch_outputs[stage], getattr(self, f"{stage}_metrics")
        if not outputs:
            return
        losses, predictions, labels, *confidences = zip(*outputs)
        sizes = torch.tensor([len(batch) for batch in labels], device=losses[0].device)
        epoch = EpochPredictions(
            torch.cat(predictions), torch.cat(labels), torch.cat(confidences[0]) if confidences else None
        )
        self.epoch_predictions[stage] = epoch
        metrics["loss"].update(torch.stack(losses), weight=sizes)
        metrics["acc"].update(epoch.classes, epoch.labels)
        # compute() combines every rank's state; logged as a number, Lightning does not sum it again
        values = {f"{stage}/{name}": metric.compute().item() for name, metric in metrics.items()}
        for metric in metrics.values():
            metric.reset()
        outputs.clear()
        if stage == "train":
            values |= self.train_row
            self.train_row = {}
        # Lightning sends an epoch's training metrics to the loggers after the epoch's checkpoint is written: a run
        # killed between the two would resume after the epoch without them. So they reach the loggers here, before
        # it, at the step and with the epoch Lightning would log them at.
        now = stage == "train" and bool(self.loggers)
        for key, value in values.items():
            self.log(key, value, **({"logger": False} if now else {}))  # still for callbacks and the progress line
        for logger in self.loggers if now else []:
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step - 1)
            logger.save()

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        # On the CPU the check is free, so a diverged loss stops the run before its step reaches the weights.
        if loss.device.type == "cpu" and not torch.isfinite(loss):
            self._diverged(float(loss.detach()), self.global_step + 1)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def check_finite_loss(self) -> None:
        """Raise DivergedError if a training loss of this epoch so far is NaN or infinite.

        Called before anything is validated or checkpointed: one device sync each time, not one per step.
        """
        outputs = self._epoch_outputs["train"]
        if not outputs:
            return
        finite = torch.stack([loss for loss, *_ in outputs]).isfinite()
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            self._diverged(float(outputs[first][0]), self.global_step - len(outputs) + first + 1)

    def _diverged(self, loss: float, step: int) -> None:
        raise DivergedError(divergence_message(loss, step, self.current_epoch + 1))

    @override
    def on_validation_start(self) -> None:
        self.check_finite_loss()  # inside fit the training epoch's losses are all in; elsewhere there are none

    @override
    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()
        self._log_epoch("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        schedule = self.lr_schedulers()
        if (
            isinstance(schedule, ReduceLROnPlateau)
            and self.trainer.state.fn == "fit"
            and not self.trainer.sanity_checking
        ):
            schedule.step(self.trainer.callback_metrics[self.schedule_settings.monitor])

    @override
    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # Lightning steps a ReduceLROnPlateau after the epoch's checkpoints are written, and skips that step when a
        # run resumes from them; stepped above instead, before they are written, a resumed run goes on exactly.
        if not isinstance(scheduler, ReduceLROnPlateau):
            super().lr_scheduler_step(scheduler, metric)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint taken mid-epoch keeps the epoch's training outputs so far: the resumed run reports the
        # epoch's train/loss and train/acc over all of it, as the uninterrupted run does.
        outputs = self._epoch_outputs["train"]
        # At the epoch's end they are not kept: a run resumed from there logs that epoch's train metrics again
        # only if it has them, and they were logged already.
        if outputs and len(outputs) < self.trainer.num_training_batches:
            losses, predictions, labels = zip(*outputs)
            checkpoint["train_epoch_outputs"] = {
                "losses": torch.stack(losses).cpu(),
                "sizes": [len(batch) for batch in labels],
                "predictions": torch.cat(predictions).cpu(),
                "labels": torch.cat(labels).cpu(),
            }

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("train_epoch_outputs")
        if saved:
            sizes = saved["sizes"]
            self._epoch_outputs["train"] = list(
                zip(
                    saved["losses"].to(self.device).unbind(),
                    saved["predictions"].to(self.device).split(sizes),
                    saved["labels"].to(self.device).split(sizes),
                )
            )

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_settings.build(self.parameters())
        epochs = self.hparams.max_epochs or self.trainer.max_epochs
        schedule = self.schedule_settings.build(optimizer, epochs, optimizer_steps(self.trainer))
        return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


def optimizer_steps(trainer: L.Trainer) -> int:
    """The optimizer steps of the whole run, as Lightning's ``estimated_stepping_batches`` counts them. That
    property sets up the training loader early, and a loader set up before a checkpoint is restored does not
    get its position back: a run resumed mid-epoch would not continue exactly. Our batches cost nothing to count."""
    batches = len(trainer.datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = int(batches * limit) if isinstance(limit, float) else min(batches, limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
    return steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)
