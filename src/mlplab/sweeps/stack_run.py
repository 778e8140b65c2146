"""Running a stack: the jobs of one group (mlplab.sweeps.stack_plan) claimed, then trained as one StackedClassifier
in one Lightning Trainer, with each job's records written as its single run writes them (mlplab.sweeps.stack_jobs).

A stack's folder is ``<sweep>/.stacks/<id>/``: its jobs' names, its log, and while it trains its checkpoint, from
which a killed stack resumes. A stack that fails runs its jobs one by one, each as a job-by-job sweep runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mlplab.data.datamodule import StackedDataModule, batch_orders_of
from mlplab.errors import one_line
from mlplab.model.stacked_classifier import StackedClassifier
from mlplab.run.checkpoints import CHECKPOINT_FLAGS, ResumePoints, StopRequested, read_checkpoint
from mlplab.run.lightning_notes import quiet_lightning
from mlplab.run.memory import RUN_OVERHEAD_BYTES, available_memory, resident_bytes
from mlplab.run.ownership import ClaimLostError, claim, held_claim
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, read_metrics, write_metrics
from mlplab.run.settings import TrainerSettings
from mlplab.run.train import build_model
from mlplab.run.trainer import build_trainer, require_batches
from mlplab.sweeps.jobs import FINISHED, claimed_metrics, held_elsewhere, prepare_attempt
from mlplab.sweeps.stack_jobs import JobRecords, StackedJob

log = logging.getLogger(__name__)

STACKS_DIR = ".stacks"  # in the sweep folder: one folder per stack, with its checkpoint (while it runs) and log
STACK_JOBS_FILE = "jobs.json"  # in a stack's folder: its jobs' folder names
LOG_FILE = "train.log"  # a stack's log, in its folder
# Errors a stack leaves to the next attempt of the same command rather than to its jobs one by one: the machine's
# (a full disk, a file system gone), which each job alone would meet as well. The stack's checkpoint stays.
# Running out of memory is not among them: each job alone needs a fraction of what the stack does.
RESUMED_ERRORS = (OSError,)


def train_claimed(jobs: Sequence[StackedJob], sweep_dir: Path) -> list[dict[str, Any]]:
    """Claim each job, skip those done or held elsewhere, and train the rest as one stack (one by one if it fails)."""
    results: dict[int, dict[str, Any]] = {}
    alone: list[int] = []  # trained one by one once the claims are released: each claims itself again
    with contextlib.ExitStack() as claims:
        ready = []
        for index, job in enumerate(jobs):
            if not claims.enter_context(claim(job.run_dir)):
                log.info("Skipped %s: %s", job.run_dir, held_elsewhere(job.run_dir))
                results[index] = {"status": "running"}
            elif (done := claimed_metrics(job.run_dir)).get("status") in FINISHED:  # a damaged one: failed
                log.info("Done already: %s", job.run_dir)
                results[index] = done
            else:
                ready.append(index)
        if len(ready) == 1:
            alone = ready
        elif ready:
            stacked = [jobs[index] for index in ready]
            group_dir = stack_dir(sweep_dir, stacked)
            group_dir.mkdir(parents=True, exist_ok=True)
            names = sorted(job.run_dir.name for job in stacked)
            (group_dir / STACK_JOBS_FILE).write_text(json.dumps(names, indent=1) + "\n")
            with logged_to(group_dir / LOG_FILE):
                for index, metrics in zip(ready, _train_or_fall_back(stacked, group_dir)):
                    if metrics is None:
                        alone.append(index)
                    else:
                        results[index] = metrics
    for index in alone:
        results[index] = jobs[index].train_alone()
    return [results[index] for index in range(len(jobs))]


def stack_dir(sweep_dir: Path, jobs: Sequence[StackedJob]) -> Path:
    """The folder of the stack of these jobs: named by their folders' names, so a rerun finds it again."""
    names = sorted(job.run_dir.name for job in jobs)
    return sweep_dir / STACKS_DIR / hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def in_a_stopped_stack(sweep_dir: Path, job: StackedJob) -> str | None:
    """The folder name of a stack that holds this job and left a checkpoint (the job resumes as part of it), or
    None."""
    for path in (sweep_dir / STACKS_DIR).glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"):
        names = path.parent.parent / STACK_JOBS_FILE
        if names.is_file() and job.run_dir.name in json.loads(names.read_text()):
            return path.parent.parent.name
    return None


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


def _train_or_fall_back(jobs: Sequence[StackedJob], group_dir: Path) -> list[dict[str, Any] | None]:
    """train_stack, resuming the stack if it left a checkpoint. Each job's metrics, or None for a job to train on
    its own: a stack that fails (its own error, not a signal's or the disk's) leaves its unfinished jobs to run one
    by one, each from its start. A signal propagates; the disk's error leaves the jobs interrupted, to resume as
    this stack with the same command (RESUMED_ERRORS)."""
    last = group_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    resume_from = last if last.is_file() else None
    if resume_from:
        log.info("Resuming the stack from %s", resume_from)
    else:
        for job in jobs:
            prepare_attempt(job.run_dir)  # a failed or diverged job starts over
    try:
        return list(train_stack(jobs, group_dir, resume_from))
    except (KeyboardInterrupt, SystemExit):
        raise
    except ClaimLostError as error:  # the stack stops; its checkpoint stays for the jobs still this sweep's
        log.warning("Stack of %d jobs: %s", len(jobs), error)
        return [{"status": "running"} for _ in jobs]
    except Exception as error:
        resumed = isinstance(error, RESUMED_ERRORS)
        if resumed:
            log.error("Stack of %d jobs interrupted: %s", len(jobs), one_line(error))
        else:
            log.error("Stack of %d jobs failed (%s); its jobs run one by one", len(jobs), _described(error))
            shutil.rmtree(group_dir / CHECKPOINT_DIR, ignore_errors=True)  # nothing to resume as a stack
        results: list[dict[str, Any] | None] = []
        for job in jobs:
            metrics = read_metrics(job.run_dir)
            if metrics.get("status") in (*FINISHED, "diverged"):  # its own end, reached in the stack
                results.append(metrics)
                continue
            # Recorded before it runs alone: a job left unfinished says why its stack did not finish it.
            status = "interrupted" if resumed else "failed"  # failed: it starts over, without the stack's epochs
            metrics = {**metrics, "status": status, "error": _described(error)}
            with contextlib.suppress(OSError):
                write_metrics(job.run_dir, metrics)
            results.append(metrics if resumed else None)
        return results


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"


def train_stack(jobs: Sequence[StackedJob], group_dir: Path, resume_from: Path | None = None) -> list[dict[str, Any]]:
    """Train ``jobs`` (jobs that may stack: mlplab.sweeps.stack_plan) as one stack, then test each job's best
    checkpoint, all in one stacked pass; writes each job's records and returns each job's metrics.json content."""
    first = jobs[0].config
    orders = batch_orders_of(read_checkpoint(resume_from) if resume_from else None)  # as the stack started
    datamodule = StackedDataModule(first.data, first.data_dir, [job.config.seed for job in jobs], orders)
    datamodule.prepare_data()
    datamodule.setup("fit")
    require_batches(first.trainer, datamodule)
    models, estimates = [], []
    for job in jobs:
        L.seed_everything(job.config.seed, workers=True, verbose=False)  # the initial weights of its single run
        model, estimate = build_model(job.config, datamodule, 1)
        models.append(model)
        estimates.append(estimate)
    _require_stack_memory(estimates, first.trainer)
    log.info("Training %d jobs as one stack; its log and jobs: %s", len(jobs), group_dir)
    module = StackedClassifier(models)
    records = JobRecords(jobs, models, estimates, resume_from, group_dir / LOG_FILE)
    resume_points = ResumePoints(group_dir, first.checkpoint.every_n_steps, [held_claim(job.run_dir) for job in jobs])
    with quiet_lightning():
        callbacks = [records, resume_points, _stack_last_checkpoint(group_dir)]
        trainer = build_trainer(first.trainer, group_dir, False, callbacks)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # as in run.train.train: no NVML query per step
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        if resume_points.stopped_by:  # a signal during validation: the epoch ended with its checkpoints
            raise StopRequested
    except BaseException as error:
        if not isinstance(error, ClaimLostError):  # else a job's records are another process's now
            records.stopped(trainer, error, resume_points.stopped_by)
        raise
    results = records.finish(trainer)
    for path in (group_dir / CHECKPOINT_DIR).glob("*.ckpt"):  # every job has its own now
        path.unlink()
    return results


def _stack_last_checkpoint(group_dir: Path) -> ModelCheckpoint:
    """The stack's checkpoint after each epoch, made as a run's last checkpoint is (CHECKPOINT_FLAGS), in the
    stack's folder under the name a resumed stack looks for."""
    return ModelCheckpoint(
        dirpath=group_dir / CHECKPOINT_DIR, filename=Path(LAST_CHECKPOINT).stem, monitor=None, **CHECKPOINT_FLAGS
    )


def stack_peak_bytes(job_peaks: Sequence[int]) -> int:
    """The memory one process training a stack needs beyond what it holds before (mlplab.run.memory's arithmetic):
    a run's overhead once, and each job's weights, gradients, optimizer state, checkpoint copies and activations
    (``job_peaks``: each job's training_peak_bytes, as its single run would need)."""
    return RUN_OVERHEAD_BYTES + sum(peak - RUN_OVERHEAD_BYTES for peak in job_peaks)


def stack_memory(trainer: TrainerSettings) -> tuple[int, str]:
    """The memory a stack trains in, free now, and where it is: the GPU's when the stack trains on one, else this
    machine's (what this process may still take). Both a stack's size (stack_plan.stack_capacity) and the check
    before it trains go by it."""
    if trainer.accelerator == "gpu" or (trainer.accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.mem_get_info()[0], "free on the GPU"
    return available_memory(), "available"


def _require_stack_memory(estimates: Sequence[int], trainer: TrainerSettings) -> None:
    """Refuse a stack whose jobs together would not fit in the memory free now (hydra.launcher.max_stack); its
    jobs then run one by one. ``estimates``: each job's build_model estimate (this process's memory and its peak)."""
    here = resident_bytes()
    needed = stack_peak_bytes([estimate - here for estimate in estimates])
    available, where = stack_memory(trainer)
    if needed > available:
        raise MemoryError(
            f"{len(estimates)} stacked jobs need about {needed / 2**30:.1f} GiB and {available / 2**30:.1f} GiB "
            f"is {where}; set hydra.launcher.max_stack lower"
        )
