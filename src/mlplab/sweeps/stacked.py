"""Stacked sweeps (``hydra/launcher=stacked``): a sweep's jobs that differ only in numbers train as one stack.

Jobs are grouped by everything that must be equal (network shape, data, batch sizes, epochs, Trainer settings,
optimizer class); seed, optimizer numbers and dropout may differ. Each group trains as one StackedClassifier in
one process, and each job's folder ends up as a job-by-job sweep leaves it: metrics.json, provenance.json, its
own checkpoints (an ordinary run's: mlplab-eval, mlplab-predict and resume= take them), its TensorBoard curves,
test views and HParams row. A killed group resumes from its own checkpoint (``<sweep>/.stacks/<group>/``).
Jobs that cannot stack run the ordinary way, with one line saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary, ProgressBar

from mlplab.data.datamodule import ImageDataModule
from mlplab.errors import one_line
from mlplab.model.backbones.mlp import MLP
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, MONITOR, read_metrics, write_metrics
from mlplab.run.train import ENVIRONMENT_ERRORS
from mlplab.run.trainer import RUN_OVERHEAD_BYTES, available_memory, training_peak_bytes
from mlplab.sweeps.jobs import FINISHED, claim, prepare_attempt, resume_point
from mlplab.sweeps.stack_training import LOG_FILE, VIEWS, StackedJob, train_stack

log = logging.getLogger(__name__)

STACKS_DIR = ".stacks"  # in the sweep folder: one folder per stack, with its checkpoint (while it runs) and log
JOBS_FILE = "jobs.json"  # in a stack's folder: its jobs' folder names
SEARCH = "mlplab.sweeps.search"  # the module of a search trial's callback (reports to the study, prunes)
# Optimizers whose update is element by element: a network's slice of the stacked weights steps as its own weight.
ELEMENTWISE_OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
# Trainer settings one stack cannot apply per job; each job with one of these set runs on its own.
UNSTACKED_TRAINER_SETTINGS = {
    "gradient_clip_val": None,
    "accumulate_grad_batches": 1,
    "val_check_interval": None,
    "check_val_every_n_epoch": 1,
    "max_steps": -1,
    "max_time": None,
    "profiler": None,
}


_collecting = contextvars.ContextVar("mlplab_collecting_stacked_jobs", default=False)


@contextlib.contextmanager
def collecting_jobs() -> Iterator[None]:
    """While the block runs, a sweep job's task describes the job (a StackedJob) instead of training it."""
    token = _collecting.set(True)
    try:
        yield
    finally:
        _collecting.reset(token)


def collecting() -> bool:
    return _collecting.get()


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
    for key, plain in UNSTACKED_TRAINER_SETTINGS.items():
        if getattr(config.trainer, key) != plain:
            return f"trainer.{key}={getattr(config.trainer, key)} applies to each job on its own"
    if config.trainer.options:
        return f"trainer.{next(iter(config.trainer.options))} is not applied to stacks"
    for callback in job.callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.monitor not in (None, MONITOR) or callback.save_top_k != 1 or "{" in (callback.filename or ""):
                return "callbacks.model_checkpoint: a stack keeps one best (by val/acc) and one last checkpoint per job"
        elif isinstance(callback, EarlyStopping):
            return "callbacks.early_stopping stops each job on its own"
        elif type(callback).__module__ == SEARCH:
            return "a search's trial reports to its study after each epoch, and may be pruned on its own"
        elif not isinstance(callback, (ProgressBar, ModelSummary)) and not type(callback).__module__.startswith(VIEWS):
            return f"callback {type(callback).__name__} acts on one run's training"
    return None


def stack_key(config: Any) -> str:
    """What jobs of one stack share: every setting but the seed, the optimizer's numbers and dropout."""
    settings = config.as_dict()
    settings.pop("seed")
    settings["model"].pop("dropout")
    settings["optimizer"] = settings["optimizer"]["_target_"]
    return json.dumps(settings, sort_keys=True, default=str)


def run_jobs(jobs: Sequence[StackedJob], sweep_dir: Path, max_stack: int | None = None) -> list[dict[str, Any]]:
    """Each job's metrics, in order: jobs that stack train in groups of at most ``max_stack`` (default: as many
    as the memory holds), the others one by one as a job-by-job sweep runs them."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        reason = alone_reason(job) or (
            "it has a checkpoint of its own to resume from"
            if resume_point(job.run_dir) and not _group_checkpoint(sweep_dir, job)
            else None
        )
        if reason:
            log.info("Job %s runs on its own: %s", job.run_dir.name, reason)
            results[index] = job.train_alone()
        else:
            groups.setdefault(stack_key(job.config), []).append(index)
    for indices in groups.values():
        size = max_stack or stack_capacity(jobs[indices[0]])
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
    """How many jobs like ``job`` one stack may hold: as many as the memory free now holds (the GPU's, on a GPU)."""
    config = job.config
    datamodule = ImageDataModule(config.data, config.data_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")  # parsed once per process: the stack's own set-up finds it ready
    parameters, activations = config.model.planned_size(datamodule.input_shape, len(datamodule.class_names))
    per_job = (
        training_peak_bytes(
            parameters,
            config.optimizer.state_per_parameter,
            activations,
            config.data.batch_size,
            config.data.eval_batch_size,
        )
        - RUN_OVERHEAD_BYTES
    )
    on_gpu = config.trainer.accelerator == "gpu" or (config.trainer.accelerator == "auto" and torch.cuda.is_available())
    free = torch.cuda.mem_get_info()[0] if on_gpu else available_memory() - RUN_OVERHEAD_BYTES
    return max(1, int(free * 0.8) // per_job)  # a fifth kept back: the allocator's slack, the other jobs' views


def _group_checkpoint(sweep_dir: Path, job: StackedJob) -> bool:
    """Whether a stack that holds this job left a checkpoint (so it resumes as that stack)."""
    return any(
        job.run_dir.name in json.loads((path.parent.parent / JOBS_FILE).read_text())
        for path in (sweep_dir / STACKS_DIR).glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
        if (path.parent.parent / JOBS_FILE).is_file()
    )


def train_claimed(jobs: Sequence[StackedJob], sweep_dir: Path) -> list[dict[str, Any]]:
    """Claim each job, skip those done or held elsewhere, and train the rest as one stack."""
    results: dict[int, dict[str, Any]] = {}
    with contextlib.ExitStack() as claims:
        ready = []
        for index, job in enumerate(jobs):
            if not claims.enter_context(claim(job.run_dir)):
                log.info("Skipped: another process is running this job (%s)", job.run_dir)
                results[index] = {"status": "running"}
            elif (done := read_metrics(job.run_dir)).get("status") in FINISHED:
                log.info("Done already: %s", job.run_dir)
                results[index] = done
            else:
                ready.append(index)
        if len(ready) == 1:
            claims.close()
            results[ready[0]] = jobs[ready[0]].train_alone()
        elif ready:
            stacked = [jobs[index] for index in ready]
            names = sorted(job.run_dir.name for job in stacked)
            group_dir = sweep_dir / STACKS_DIR / hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
            group_dir.mkdir(parents=True, exist_ok=True)
            (group_dir / JOBS_FILE).write_text(json.dumps(names, indent=1) + "\n")
            last = group_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            resume_from = last if last.is_file() else None
            if resume_from:
                log.info("Resuming the stack from %s", resume_from)
            else:
                for job in stacked:
                    prepare_attempt(job.run_dir)  # a failed or diverged job starts over
            with logged_to(group_dir / LOG_FILE):
                for index, metrics in zip(ready, train_stack_safely(stacked, group_dir, resume_from)):
                    results[index] = metrics
    return [results[index] for index in range(len(jobs))]


@contextlib.contextmanager
def logged_to(path: Path) -> Iterator[None]:
    """The stack's log lines also go to its own log file while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def train_stack_safely(jobs: Sequence[StackedJob], group_dir: Path, resume_from: Path | None) -> list[dict[str, Any]]:
    """train_stack; a failure of the stack is each unfinished job's (recorded in its metrics.json), not the sweep's."""
    try:
        return train_stack(jobs, group_dir, resume_from)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        log.error("Stack failed: %s", one_line(error))
        status = "interrupted" if isinstance(error, ENVIRONMENT_ERRORS) else "failed"
        if status == "failed":  # its jobs start over: no stack checkpoint to resume from
            shutil.rmtree(group_dir / CHECKPOINT_DIR, ignore_errors=True)
        results = []
        for job in jobs:
            metrics = read_metrics(job.run_dir)
            if metrics.get("status") in (None, "running"):
                metrics = {**metrics, "status": status, "error": f"{type(error).__name__}: {one_line(error)}"}
                with contextlib.suppress(OSError):
                    write_metrics(job.run_dir, metrics)
            results.append(metrics)
        return results
