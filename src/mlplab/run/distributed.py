"""Data-parallel training (``trainer=ddp``) whose other ranks run this same job, not the whole command again.

The entry point hands over the exact command of one rank of this run (``python -m mlplab.cli.rank ...``); the
strategy that starts it is in ``mlplab.compat`` (Lightning offers no public way to do that).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def launched_rank() -> int:
    """This process's rank where the cluster started one process per rank (SLURM tasks); else 0."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def started_as_other_rank() -> bool:
    """Whether this process is a data-parallel run's rank other than its first: started by the first
    (mlplab.compat.RankLauncher sets LOCAL_RANK) or by SLURM as a task of its own."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or launched_rank() > 0


# What a launch leaves in this process's environment: Lightning then reads "the processes exist already", and
# shares the CPU threads out among the ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextmanager
def one_job_of_many() -> Iterator[None]:
    """Leave the process as it was for the next job of a sweep: a second data-parallel job must start its own
    ranks and process group, not find the last job's (its ranks have exited), and a one-process job after it gets
    the CPU threads back."""
    import torch  # here, not above: commands that only check settings read this module's rank variables
    import torch.distributed

    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if saved["LOCAL_RANK"] is None:  # this process started the ranks: it owns what they shared
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            torch.set_num_threads(threads)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """End this rank when the process that started it dies (SIGKILL, a crash): left alone, it would wait in a
    collective for a peer that is gone, forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
