"""Callbacks tests add to real command lines: ``+callbacks.<name>._target_=probes.<Class>``, or Hydra's own
``+hydra.callbacks.<name>._target_=...`` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Checkpoint


class StopAfterOneStep(Callback):
    """Ends training after its first optimizer step (several batches with trainer.accumulate_grad_batches)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= 1


class SignalDuringValidation(Callback):
    """Sends the run a signal from inside the validation of one epoch, as a user or a scheduler might."""

    def __init__(self, signal_name: str, epoch: int):
        self.signum, self.epoch = signal.Signals[signal_name], epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


class SignalAtStep(Callback):
    """Sends the run a signal during its ``step``-th optimizer step (counting from 1), as a user or a scheduler
    might."""

    def __init__(self, signal_name: str, step: int):
        self.signum, self.step = signal.Signals[signal_name], step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class PaceSteps(Callback):
    """Sleeps after each optimizer step, so that a test's signal from outside lands where the test means it to;
    with ``until_resumed``, only until the run is stopped: a resumed run goes at its own pace. With ``marker``, the
    pause says what happens in it, for a test to wait on: ``<marker>.paused`` once it began, ``<marker>.stopping``
    once the run heard a signal (its ResumePoints' ``stopped_by``)."""

    def __init__(self, seconds: float, until_resumed: bool = False, marker: str | None = None):
        self.seconds, self.until_resumed, self.pacing = seconds, until_resumed, True
        self.marker = marker

    def on_train_start(self, trainer, *args) -> None:
        self.pacing = not (self.until_resumed and trainer.ckpt_path)

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.pacing:
            return
        if self.marker is None:
            time.sleep(self.seconds)
            return
        Path(f"{self.marker}.paused").touch()
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            if any(getattr(callback, "stopped_by", None) for callback in trainer.callbacks):
                Path(f"{self.marker}.stopping").touch()
            time.sleep(0.02)


def fingerprint(image) -> str:
    """The same for the same pixels in any process (``hash`` of bytes is salted per process)."""
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16]


class RecordTrainingSamples(Callback):
    """Writes, per rank, a fingerprint of every training image it was given in the first epoch: ``<path>.rank<N>``."""

    def __init__(self, path: str):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            images, labels = batch
            self.seen += [f"{label}:{fingerprint(image)}" for image, label in zip(images, labels.tolist())]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            with open(f"{self.path}.rank{trainer.global_rank}", "w") as file:
                file.write("\n".join(self.seen))


class FailOnceWithOSError(Callback):
    """The environment failing mid-run, once: at the start of ``epoch`` (after the epochs before it and their
    checkpoints), an OSError as a full disk raises it; ``marker`` records that it happened."""

    def __init__(self, marker: str, epoch: int):
        self.marker, self.epoch = marker, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise OSError(28, "No space left on device")


class KillAtEpochEnd(Checkpoint):
    """The machine losing the run, once, right after epoch ``epoch`` (counting from 1) ended: its views drawn, its
    metrics logged, its checkpoints handed to the background writer. A Checkpoint callback, listed after the run's
    own, so that Lightning calls it after them. SIGKILL: nothing of the run's own runs after it. ``marker`` records
    that it happened. ``written``: only once the background writer has put the epoch's last.ckpt on disk."""

    def __init__(self, epoch: int, marker: str, written: bool = False):
        self.epoch, self.marker, self.written = epoch, marker, written

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 != self.epoch or os.path.exists(self.marker):
            return
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 60
        while self.written and time.monotonic() < deadline and _saved_step(last) != trainer.global_step:
            time.sleep(0.01)
        open(self.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _saved_step(checkpoint: Path) -> int | None:
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


class RaiseAtStart(Callback):
    """A job's own error (not its environment's): raises when training starts if ``fail``."""

    def __init__(self, fail: bool):
        self.fail = fail

    def on_train_start(self, trainer, pl_module) -> None:
        if self.fail:
            raise RuntimeError("this trial's own bug")


class KillDuringJob(HydraCallback):
    """A Hydra callback (``+hydra.callbacks.<name>._target_=probes.KillDuringJob``): SIGKILLs the sweep's process
    during its ``job``-th job, once that job has written a checkpoint: a crash in the middle of a trial."""

    def __init__(self, job: int):
        self.job, self.started = job, 0

    def on_job_start(self, config, **kwargs) -> None:
        self.started += 1
        if self.started == self.job:
            checkpoint = os.path.join(config.hydra.runtime.output_dir, "checkpoints", "last.ckpt")
            threading.Thread(target=_kill_when, args=(checkpoint,), daemon=True).start()


class KillAfterJobs(HydraCallback):
    """SIGKILLs the sweep's process as its ``jobs``-th job returns, before the sweeper hears of it: a crash between
    trials."""

    def __init__(self, jobs: int):
        self.jobs, self.ended = jobs, 0

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self.ended += 1
        if self.ended == self.jobs:
            os.kill(os.getpid(), signal.SIGKILL)


def _kill_when(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


class KillWhenStackCheckpoints(HydraCallback):
    """SIGKILLs the sweep's process as soon as a stack of its jobs has written a checkpoint (hydra/launcher=stacked):
    a crash in the middle of a stack's training."""

    def on_multirun_start(self, config, **kwargs) -> None:
        pattern = os.path.join(config.hydra.sweep.dir, ".stacks", "*", "checkpoints", "last.ckpt")
        threading.Thread(target=_kill_when_any, args=(pattern,), daemon=True).start()


def _kill_when_any(pattern: str) -> None:
    import glob

    while not glob.glob(pattern):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)


class BreakStacks(HydraCallback):
    """Makes every stack of a stacked sweep (hydra/launcher=stacked) fail at its first training step, a bug of the
    stack's own: a job trained on its own (mlplab.model.classifier) is untouched."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from mlplab.model.stacked_classifier import StackedClassifier

        def broken(self, batch, batch_idx):
            raise RuntimeError("a stack's own bug")

        StackedClassifier.training_step = broken


class RequeueOnce(Callback):
    """Asks SLURM to requeue the job it runs in (``scontrol requeue``, as a preemption does), once: after ``step``
    optimizer steps, mid-epoch, in the sweep job whose overrides include ``job`` (e.g. ``seed=1``); ``marker``
    records that it happened."""

    def __init__(self, marker: str, step: int, job: str):
        self.marker, self.step, self.job = marker, step, job

    def on_train_batch_end(self, trainer, *args) -> None:
        overrides = Path(trainer.default_root_dir, ".hydra", "overrides.yaml")
        mine = f"- {self.job}\n" in overrides.read_text()
        if mine and trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            import subprocess

            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)  # SIGTERM follows


class HoldAtStep(Callback):
    """Waits after optimizer step ``step`` until the file ``until`` exists (at most 5 minutes): a test does what it
    must while the run is certainly training, however busy the machine, then lets it go on."""

    def __init__(self, step: int, until: str):
        self.step, self.until = step, Path(until)

    def on_train_batch_end(self, trainer, *args) -> None:
        deadline = time.monotonic() + 300
        while trainer.global_step == self.step and not self.until.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class PruneTrials:
    """An Optuna pruner that prunes the trials numbered ``numbers`` once they reported epoch ``after`` (and no
    other): a test decides which of a search's trials leave their stack, and when."""

    def __init__(self, numbers: list[int], after: int):
        self.numbers, self.after = set(numbers), after

    def prune(self, study, trial) -> bool:
        return trial.number in self.numbers and trial.last_step is not None and trial.last_step >= self.after
