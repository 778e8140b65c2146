"""Lightning's log notes and warnings that a user of mlplab cannot act on: the notes filtered out while a run's
trainer works, the warnings wherever an entry point runs Lightning."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class LightningNotes(logging.Filter):
    """Drops Lightning's notes that a user of mlplab cannot act on: an advertisement, the device banners, and
    remarks on settings mlplab makes itself (its own model summary callback, batch limits of 1.0)."""

    NOTES = (
        "💡 Tip:",
        # The device banners: the device a run used is in its provenance.json; before a one-line error, noise.
        "GPU available:",
        "TPU available:",
        "Trainer already configured with model summary callbacks",
        "` was configured so ",
        "to estimate number of stepping batches",
    )
    LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in self.NOTES)


# Lightning's own uses of torch APIs deprecated in torch 2.10 (a tree spec check; all_gather across ranks); its
# advice to sync logged metrics across ranks (mlplab gathers a data-parallel run's metrics itself); a resumed run's
# checkpoint folder, which holds checkpoints, and its metrics.csv, which mlplab keeps (ResumableCSVLogger); the
# model summary's size estimate under bf16-mixed (trainer.precision=auto), which it gives in fp32 sizes anyway; the
# hint to prepend `srun` on a machine with SLURM installed (a login node): mlplab submits SLURM jobs itself
# (hydra/launcher=slurm), and a plain run there is meant to run where it is.
WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    r"It is recommended to use `self\.log\(.*sync_dist=True",
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"Precision .* is not supported by the model summary",
    r"The `srun` command is available on your system but is not used",
)


LIGHTNING_CONSOLES = ("lightning.pytorch", "lightning.fabric")


def lightning_console_logging() -> None:
    """Lightning's log lines on the console as ever, each once. Imported into a process whose root logger has no
    handler yet, Lightning gives each of these loggers a console handler of its own and stops it propagating;
    imported later (an entry point imports it once Hydra has set up logging, so that help and refusals answer
    without it), its lines would also reach its package logger's console handler and Hydra's. Called before that
    import, this sets them up as Lightning would have."""
    if "lightning" in sys.modules or not logging.getLogger().hasHandlers():
        return  # Lightning did it already, or will do it itself
    for name in LIGHTNING_CONSOLES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.propagate = False


def ignore_lightning_warnings() -> None:
    """Lightning's WARNINGS ignored in this process (an entry point's)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """LightningNotes while the block runs (one run's trainer), and nowhere else."""
    notes, loggers = LightningNotes(), [logging.getLogger(name) for name in LightningNotes.LOGGERS]
    for logger in loggers:
        logger.addFilter(notes)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notes)
