"""Checkpoints a run can resume from: written atomically, every few hundred steps, and when the run is stopped."""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from mlplab.compat import validates_next
from mlplab.errors import MlplabError, first_sentence, one_line
from mlplab.files import write_atomically
from mlplab.run.ownership import Claim, ClaimLostError, held_claim
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT
from mlplab.run.settings import EVERY_N_STEPS

# What both of a run's ModelCheckpoints are given (conf/callbacks/checkpoint/plain.yaml holds the same flags, and
# tests/test_config.py checks that they agree): one file each, under a plain name, overwritten in place.
CHECKPOINT_FLAGS: dict[str, Any] = {"save_top_k": 1, "auto_insert_metric_name": False, "enable_version_counter": False}


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then rename: a reader (or a resume after SIGKILL) sees
    the previous checkpoint or the new one, never half of one. Lightning's own write goes through a temporary file
    in /tmp, and moving that onto another file system is a copy, not a rename."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        # One writer at a time per run (the sweep's claim and resume= see to that), so half-written files left
        # beside it are a killed writer's.
        try:
            write_atomically(Path(path), lambda file: torch.save(checkpoint, file), durable=True, sole_writer=True)
        except RuntimeError as error:  # torch.save reports a failed write (a full disk) so: "unexpected pos ..."
            raise OSError(f"could not write {path} (torch.save: {first_sentence(error)})") from None


class UnreadableCheckpointError(MlplabError):
    """A checkpoint that is damaged, not a checkpoint, or would run code when loaded."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents as tensors and plain values only (``weights_only``): a file whose unpickling would
    build other objects, and so could run code, is refused before anything in it runs."""
    try:
        # mmap: every object is unpickled (and checked), but tensor data is read only where it is used.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UnreadableCheckpointError(
            f"{path} holds objects other than tensors and plain values; refused, since loading it could run code "
            "(checkpoints written by mlplab never do)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UnreadableCheckpointError(
            f"{path} is not a readable checkpoint ({_why_unreadable(path, error)}); restore it from a copy, or give "
            "another checkpoint of the run"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableCheckpointError(f"{path} is not a Lightning checkpoint (no state_dict in it)")
    return checkpoint


ZIP_SIGNATURE = b"PK\x03\x04"  # how a file torch.save writes begins: it is a zip archive


def _why_unreadable(path: Path, error: BaseException) -> str:
    """What is wrong with a file torch.load refused, in a few whole words: torch's own message names its internals
    (miniz, mmap) and goes on to a paragraph of advice."""
    try:
        with path.open("rb") as file:
            start = file.read(len(ZIP_SIGNATURE))
    except OSError as unopened:  # no permission to read it
        return one_line(unopened)
    if not start:
        return "it is empty"
    if start != ZIP_SIGNATURE:
        return "not a file torch.save writes"
    return f"cut short or damaged: {first_sentence(error)}"


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was taken at."""
    return int(read_checkpoint(path)["global_step"])


class StopRequested(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) arrived; raised at the next point a checkpoint can be taken from."""


def requeue_signal() -> int | None:
    """The signal a SLURM job of hydra/launcher=slurm gets before its time limit or when preempted (submitit's,
    USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise); None outside such a job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


class ResumePoints(Callback):
    """Keeps ``checkpoints/last.ckpt`` a point to resume from between epochs: every ``every_n_steps`` optimizer
    steps, and when SIGINT or SIGTERM stops the run, or (in a SLURM job of hydra/launcher=slurm) submitit's signal
    before the time limit or a preemption: then, once the checkpoint is saved, submitit's own handler requeues the
    job, which resumes from it. That is the one requeue mechanism (Lightning's SLURM auto-requeue is off).

    A signal takes effect at the next point a resumed run can continue exactly from: after the current training
    batch (the checkpoint is saved there), or, during validation or at a batch that validation follows (an epoch's
    last), once that validation and its checkpoints are done: a run resumed from a checkpoint taken between a
    batch and its validation would never run that validation (nor is ``every_n_steps``'s checkpoint taken there).
    Lightning's own SIGTERM handling is replaced while training: it stops in the middle of validation, leaving the
    finished epoch without a checkpoint. A second signal stops at once.
    """

    def __init__(self, run_dir: Path, every_n_steps: int = EVERY_N_STEPS, claims: Sequence[Claim | None] = ()):
        self.path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        self.every_n_steps = every_n_steps
        self.stopped_by: str | None = None  # this process's signal, or another rank's (then "SIGTERM")
        # The run folder's claim (mlplab.run.ownership), or a stack's jobs' (``claims``): once another process has
        # taken one over, this one stops.
        self.claims = [claim for claim in (claims or [held_claim(run_dir)]) if claim is not None]
        self._signalled = False  # whether this process itself got a signal: its second one stops at once
        self._previous_handlers: dict[int, Any] = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        # Dropout draws from the global generator: a run resumed mid-epoch continues its sequence, not a new one.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return {"cpu_rng": torch.get_rng_state(), "cuda_rng": cuda}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu_rng"])
        if state_dict["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        signals = [signal.SIGINT, signal.SIGTERM, *filter(None, [requeue_signal()])]
        self._previous_handlers = {signum: signal.signal(signum, self._request_stop) for signum in signals}

    def lost_claim(self) -> Claim | None:
        """A claim of this run's (or stack's jobs') that another process has taken over, if any."""
        return next((claim for claim in self.claims if claim.lost.is_set()), None)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._signalled:
            raise KeyboardInterrupt
        # A data-parallel run's ranks may hear of a stop from each other before their own signal (SLURM signals
        # every task): that signal is still this process's first, and names the stop.
        self._signalled, self.stopped_by = True, signal.Signals(signum).name

    def _stop_requested(self, trainer: Trainer) -> bool:
        """Whether any rank was signalled: the ranks of a data-parallel run must stop at the same step."""
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(bool(self.stopped_by), all=False):
            self.stopped_by = self.stopped_by or "SIGTERM"  # another rank's signal
        return bool(self.stopped_by)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self._stop_requested(trainer)
        lost = self.lost_claim()
        if lost is not None:
            # Another process trains there now, from the last checkpoint, and writes the folder's files: this one
            # writes nothing more (a checkpoint written now would race the new owner's writes of the same file).
            raise ClaimLostError(lost.path.parent, trainer.global_step)
        if validates_next(trainer):  # on_validation_end stops, and the epoch's checkpoints follow it
            return
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            if hasattr(pl_module, "check_finite_loss"):
                pl_module.check_finite_loss()  # never a checkpoint of diverged weights
            trainer.save_checkpoint(self.path, weights_only=False)
        if self.stopped_by:
            self._hand_over_to_requeue()
            raise StopRequested

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The checkpoint callbacks (always called last) save the epoch next; then fit ends.
        if self._stop_requested(trainer):
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stopped_by:  # stopped after a validation, whose epoch checkpoints are saved
            self._hand_over_to_requeue()
        self._restore_handlers()

    def _hand_over_to_requeue(self) -> None:
        """After submitit's signal, with the checkpoint saved: submitit's handler requeues the job and exits."""
        signum = requeue_signal()
        if signum is not None and self.stopped_by == signal.Signals(signum).name:
            handler = self._previous_handlers.get(signum)
            self._restore_handlers()
            if callable(handler):
                handler(signum, None)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
