"""A run or sweep a signal stopped: how to continue it, and the shell's exit status for that signal."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, read_metrics


class Stopped(KeyboardInterrupt):
    """A signal stopped the run or sweep; the message says how to continue. A KeyboardInterrupt, so that Hydra's
    launchers (which record a job's exceptions and go on) let it end the sweep."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def stopped(run_dir: Path, sweep: bool = False) -> Stopped:
    """How to continue a run (or sweep) a signal stopped, with the shell's exit status for that signal."""
    from mlplab.run.checkpoints import checkpoint_step  # Lightning's module; this one's Stopped is imported by all

    metrics = read_metrics(run_dir)
    stopped_by = metrics.get("stopped_by") or "SIGINT"  # not recorded: Ctrl-C outside training (e.g. testing)
    status = 128 + signal.Signals[stopped_by].value
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if sweep:
        return Stopped(f"sweep stopped by {stopped_by}; run the same command again to resume it", status)
    if last.is_file():
        return Stopped(
            f"stopped by {stopped_by} at step {metrics.get('step', '?')}; the last checkpoint is at step "
            f"{checkpoint_step(last)}.\nResume with: mlplab-train resume={shlex.quote(str(run_dir))}",
            status,
        )
    return Stopped("interrupted before training began; nothing to resume", status)
