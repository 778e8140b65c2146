"""Stacked sweeps (``hydra/launcher=stacked``), the plan: which of a sweep's jobs may train in a stack, grouped by
what they must share, in stacks as large as the memory holds. mlplab.sweeps.stack_run runs each stack; the engine
is mlplab.model.stacked_network and mlplab.model.stacked_classifier.

What may differ within a stack (stack_group_key follows it; the README's Stacked sweeps says it to users):
    Jobs stack when they differ only in their network and in numbers: the MLP's shape (model.depth, model.width,
    per layer too, model.norm, model.activation, model.output_activation), seed, model.dropout, label_smoothing,
    the optimizer's arguments that are numbers or flags (optimizer.lr, weight_decay, betas, nesterov, ...), and the
    learning-rate schedule (each network steps its own). Networks of one shape are computed as one batched network,
    the shapes one after another in the same step (mlplab.model.stacked_network).
    Everything else must be equal: the data and batch sizes, the epochs, the Trainer's settings, and the optimizer's
    class and its other settings. Each job keeps its own views; a callback that acts on training makes its job run
    alone (alone_reason).

Each stack's jobs end as a job-by-job sweep leaves them: metrics.json, provenance.json, their own checkpoints
(mlplab-eval, mlplab-predict and resume= take them), TensorBoard curves, test views and HParams row. Jobs that
cannot stack (alone_reason: another model family, data-parallel, gradient clipping, ...) run the ordinary way, with
one line saying why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary, ProgressBar, WeightAveraging

from mlplab.data.datamodule import ImageDataModule
from mlplab.model.backbones.mlp import MLP
from mlplab.model.stacked_network import network_shape
from mlplab.run.memory import RUN_OVERHEAD_BYTES, planned_peak_bytes
from mlplab.run.records import MONITOR
from mlplab.run.settings import TrainerSettings
from mlplab.sweeps.jobs import resume_point
from mlplab.sweeps.stack_jobs import SEARCH, VIEWS, StackedJob
from mlplab.sweeps.stack_run import in_a_stopped_stack, stack_memory, train_claimed

log = logging.getLogger(__name__)

# Optimizers whose update is element by element: a network's slice of the stacked weights steps as its own weight.
ELEMENTWISE_OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
# Trainer settings one stack cannot apply per job; each job with one of these set runs on its own.
UNSTACKED_TRAINER_SETTINGS = (
    "gradient_clip_val",
    "accumulate_grad_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "max_steps",
    "max_time",
    "profiler",
)


def alone_reason(job: StackedJob) -> str | None:
    """Why a job cannot train in a stack, or None."""
    config = job.config
    if not isinstance(config.model, MLP):
        return f"model.family={config.model.as_dict()['family']}: only MLPs stack"
    if config.trainer.data_parallel:
        return "a data-parallel job (trainer=ddp) has its devices to itself"
    if config.optimizer.target not in {f"torch.optim.{name}" for name in ELEMENTWISE_OPTIMIZERS}:
        names = ", ".join(ELEMENTWISE_OPTIMIZERS)
        return f"optimizer._target_={config.optimizer.target}: only torch.optim's {names} stack"
    plain = TrainerSettings()  # each of these at its default stacks
    for key in UNSTACKED_TRAINER_SETTINGS:
        if getattr(config.trainer, key) != getattr(plain, key):
            return f"trainer.{key}={getattr(config.trainer, key)} applies to each job on its own"
    if config.trainer.options:
        return f"trainer.{next(iter(config.trainer.options))} is not applied to stacks"
    for callback in job.callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.monitor not in (None, MONITOR) or callback.save_top_k != 1 or "{" in (callback.filename or ""):
                return "callbacks.model_checkpoint: a stack keeps one best (by val/acc) and one last checkpoint per job"
        elif isinstance(callback, EarlyStopping):
            return "callbacks.early_stopping stops each job on its own"
        elif isinstance(callback, WeightAveraging):
            return (
                f"weight averaging ({type(callback).__name__}): a stack does not keep each job's average for its "
                "validation, checkpoints and test"
            )
        elif not isinstance(callback, (ProgressBar, ModelSummary)) and not type(callback).__module__.startswith(
            (VIEWS, SEARCH)  # a search's report: each job's, by JobRecords
        ):
            return f"callback {type(callback).__name__} acts on one run's training"
    return None


def stack_group_key(config: Any) -> str:
    """The settings a stack's jobs share, as one string: jobs with equal keys may stack. Every setting but those
    that may differ (this module's docstring): the network's shape and dropout, the seed, label smoothing, the
    optimizer's numeric arguments and the schedule."""
    settings = config.as_dict()
    settings.pop("seed")
    settings.pop("label_smoothing")
    settings.pop("scheduler")
    for key in NETWORK_SETTINGS:
        settings["model"].pop(key)
    settings["optimizer"] = {key: value for key, value in settings["optimizer"].items() if not _is_number(value)}
    return json.dumps(settings, sort_keys=True, default=str)


# What may differ between a stack's MLPs: each computes its own network.
NETWORK_SETTINGS = ("depth", "width", "norm", "activation", "output_activation", "dropout")


def _is_number(value: Any) -> bool:
    """A number, a flag, or a list of them (Adam's betas, MultiStepLR's milestones); not a name nor a class."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_number(item) for item in value)
    return isinstance(value, (bool, int, float))


def run_jobs(jobs: Sequence[StackedJob], sweep_dir: Path, max_stack: int | None = None) -> list[dict[str, Any]]:
    """Each job's metrics, in order: jobs that stack train in groups of at most ``max_stack`` (default: as many
    as the memory holds), the others one by one as a job-by-job sweep runs them."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        reason = alone_reason(job) or (
            "it has a checkpoint of its own to resume from"
            if resume_point(job.run_dir) and not in_a_stopped_stack(sweep_dir, job)
            else None
        )
        if reason:
            log.info("Job %s runs on its own: %s", job.run_dir.name, reason)
            results[index] = job.train_alone()
        else:  # a stopped stack's jobs stack again as they were, to resume it (one of an earlier version too)
            groups.setdefault(in_a_stopped_stack(sweep_dir, job) or stack_group_key(job.config), []).append(index)
    for indices in groups.values():
        # A stack's networks of one shape side by side (one batched network each); as many as the largest allows.
        shapes = {json.dumps(network_shape(jobs[index].config.model)): index for index in indices}
        indices.sort(key=lambda index: json.dumps(network_shape(jobs[index].config.model)))
        size = max_stack or min(stack_capacity(jobs[index]) for index in shapes.values())
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            if len(chunk) == 1:
                log.info(
                    "Job %s runs on its own: no other job of the sweep stacks with it", jobs[chunk[0]].run_dir.name
                )
                results[chunk[0]] = jobs[chunk[0]].train_alone()
                continue
            for index, metrics in zip(chunk, train_claimed([jobs[i] for i in chunk], sweep_dir)):
                results[index] = metrics
    return results  # type: ignore[return-value]


def stack_capacity(job: StackedJob) -> int:
    """How many jobs like ``job`` one stack may hold: as many as the memory free now holds (the GPU's, on a GPU),
    by the arithmetic of stack_run.stack_peak_bytes (a run's overhead once, then each job's share)."""
    config = job.config
    datamodule = ImageDataModule(config.data, config.data_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # parsed once per process: the stack's own set-up finds it ready
    _, peak = planned_peak_bytes(config, datamodule.input_shape, datamodule.num_classes)
    per_job = peak - RUN_OVERHEAD_BYTES
    free, _ = stack_memory(config.trainer)
    # the run's overhead once; of the rest, a fifth kept back: the allocator's slack, the other jobs' views
    return max(1, int((free - RUN_OVERHEAD_BYTES) * 0.8) // per_job)
