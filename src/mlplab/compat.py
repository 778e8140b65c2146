"""Every use of another library's private API, in one place, each with what upstream lacks.

tests/test_compat.py checks each against the installed versions and names the piece here to update when an
upgrade changes one.

Lightning (2.5, 2.6): a DDP run starts its other ranks by re-running ``sys.argv`` (``_SubprocessScriptLauncher``).
There is no public way to give it another command. Under Hydra that command is wrong: a sweep's job would start the
whole sweep again in each rank, and a job started by a launcher (submitit, joblib) has no command line of its own.
So the launcher is replaced (``DDPStrategy._configure_launcher`` sets ``_launcher``), and its watch over the other
ranks (``_ChildProcessObserver``, which kills this process when a rank dies) gets an off switch, so that a sweep
outlives one failed job.

Lightning's fit loop decides when validation follows a training batch; ``ResumePoints`` must know it (a stop
checkpointed between a batch and its validation would resume past that validation). With
``check_val_every_n_epoch=None`` that counts batches across epochs, which only the (private) epoch loop's
``total_batch_idx`` holds: ``batches_trained``.

setuptools (editable installs): pyproject.toml maps the package ``mlplab.conf`` to the top-level ``conf/``, and
``pip install -e .`` then serves the packages through an import finder whose namespace entries pkgutil cannot list.
Hydra finds its plugins by listing ``hydra_plugins`` with pkgutil, so it would not see mlplab's sweeper and launcher;
``hydra_plugins_listed`` adds their real folder to the namespace's path. Installed from a wheel, it is there already.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override


class RankObserver(_ChildProcessObserver):
    """Lightning's watch over the other ranks; ``release`` ends it, for when this process stops the ranks itself
    (a failed or interrupted job): a sweep then goes on to its next job instead of being killed with it."""

    released = False

    def release(self) -> None:
        self.released = True

    @override
    def _run(self) -> bool:  # called in a loop by the watch thread; True ends the watch
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
            _set_num_threads_if_needed(num_processes=self.num_processes)  # shares the CPU threads out among ranks
        elif "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))  # a SLURM task: the cores it was given
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


class RankCommandDDPStrategy(DDPStrategy):
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


def batches_trained(trainer: Any) -> int:
    """The index of the current training batch counted across epochs (Lightning's ``total_batch_idx``; in
    ``on_train_batch_end``, the batch just trained)."""
    return int(trainer.fit_loop.epoch_loop.total_batch_idx)


def hydra_plugins_listed() -> None:
    """Make mlplab's Hydra plugins (src/hydra_plugins/mlplab_sweeper) visible to Hydra's scan in every install."""
    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.mlplab_sweeper")
    folder = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    if folder and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)
