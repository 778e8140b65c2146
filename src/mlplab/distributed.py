"""Data-parallel training (``trainer=ddp``) whose other ranks run this same job, not the whole command again.

Lightning starts ranks 1..N-1 by re-running the command line (under Hydra with a new ``hydra.run.dir`` only):
a sweep's job would start the whole sweep again in each rank, and a job started by a launcher (submitit, joblib)
has no command line of its own to re-run. Here the entry point hands over the exact command of one rank of this
run, and ``python -m mlplab.distributed`` runs it without any of mlplab-train's command-line rewriting.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override


class RankObserver(_ChildProcessObserver):
    """Lightning's watch over the other ranks: when one dies, it kills them all and this process too, lest a
    collective wait forever. ``release`` ends the watch, for when this process stops the ranks itself (a failed or
    interrupted job): a sweep then goes on to its next job instead of being killed with it."""

    released = False

    def release(self) -> None:
        self.released = True

    @override
    def _run(self) -> bool:
        return self.released or super()._run()


class RankLauncher(_SubprocessScriptLauncher):
    """Starts the other local ranks with ``command``; the environment tells each which rank it is."""

    def __init__(self, cluster_environment: Any, num_processes: int, num_nodes: int, command: Sequence[str]):
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.command = list(command)
        self.observer: RankObserver | None = None

    @override
    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.observer = RankObserver(main_pid=os.getpid(), child_processes=self.procs)
            self.observer.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    @override
    def kill(self, signum: Any) -> None:
        if self.observer is not None:
            self.observer.release()
        super().kill(signum)

    def end_ranks(self, wait_seconds: float) -> None:
        """Let the other ranks finish (up to ``wait_seconds``), then kill what is left; this process lives on."""
        if self.observer is not None:
            self.observer.release()
        for process in self.procs:
            try:
                process.wait(timeout=wait_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @override
    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        # What Lightning's own launcher sets (lightning/pytorch/strategies/launchers/subprocess_script.py).
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            self.procs.append(subprocess.Popen(self.command, env={**os.environ, "LOCAL_RANK": str(local_rank)}))


class JobDDPStrategy(DDPStrategy):
    """DDP whose extra processes run ``rank_command``; without one, Lightning's own behaviour."""

    def __init__(self, rank_command: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.rank_command = rank_command

    @override
    def _configure_launcher(self) -> None:
        if self.rank_command is None:
            return super()._configure_launcher()
        self._launcher = RankLauncher(self.cluster_environment, self.num_processes, self.num_nodes, self.rank_command)

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Rank 0 failed (diverged, a bad file): the other ranks would wait in the next collective forever.
        super().on_exception(exception)
        self.end_ranks(wait_seconds=0)

    def end_ranks(self, wait_seconds: float = 60) -> None:
        """Called when the job is over, however it ended, by the process that started the other ranks."""
        if isinstance(self._launcher, RankLauncher):
            self._launcher.end_ranks(wait_seconds)


def launched_rank() -> int:
    """This process's rank where the cluster started one process per rank (SLURM tasks); else 0."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


# What a launch leaves in this process's environment: Lightning then reads "the processes exist already", and
# shares the CPU threads out among the ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextmanager
def one_job_of_many() -> Iterator[None]:
    """Leave the process as it was for the next job of a sweep: a second data-parallel job must start its own
    ranks and process group, not find the last job's (its ranks have exited), and a one-process job after it gets
    the CPU threads back."""
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


if __name__ == "__main__":  # one rank of a data-parallel run, started by RankLauncher
    from mlplab.train import hydra_main

    exit_with_parent()
    hydra_main()
