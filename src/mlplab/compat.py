"""Every use of another library's private API, in one place, each with what upstream lacks.

tests/test_compat.py checks each against the installed versions and names the piece here to update when an
upgrade changes one.

Lightning (2.5, 2.6): a DDP run starts its other ranks by re-running ``sys.argv`` (``_SubprocessScriptLauncher``).
There is no public way to give it another command. Under Hydra that command is wrong: a sweep's job would start the
whole sweep again in each rank, and a job started by a launcher (submitit, joblib) has no command line of its own.
So the launcher is replaced (``DDPStrategy._configure_launcher`` sets ``_launcher``), and its watch over the other
ranks (``_ChildProcessObserver``, which kills this process when a rank dies) gets an off switch, so that a sweep
outlives one failed job.

Lightning's fit loop decides when validation follows a training batch, and has no public way to ask it;
``ResumePoints`` must know (a stop checkpointed between a batch and its validation would resume past that
validation). ``validates_next`` asks the loop's own decision (``_TrainingEpochLoop._should_check_val_fx``, given the
fit loop's data fetcher) rather than repeat it: the settings it weighs (val_check_interval, check_val_every_n_epoch,
limit_train_batches, batches counted across epochs, a time interval, a stop requested) change between versions.

A stacked sweep trains several networks in one Trainer and steps each network's learning-rate schedule itself, then
writes each network's checkpoint as its single run would. Lightning counts a run's schedule steps in the
checkpoint's loop state (``loops``: the fit loop's ``epoch_loop.scheduler_progress``), a format with no public API;
``loops_with_schedule_steps`` writes that count with Lightning's own progress class.

Hydra (1.3): a sweep job's config costs a full composition (``ConfigLoaderImpl.load_sweep_config``, ~0.1 s). Jobs
that differ from a composed one only in values are derived from it instead (mlplab.sweeps.grid.ComposedOnce), and
Hydra has no public way to finish such a config as it finishes a composed one: ``derive_job_config`` sets the
values, ``hydra.overrides.task``, ``hydra.job.override_dirname`` (Hydra's own ``get_overrides_dirname``) and the
resolver cache (``OmegaConf.copy_cache``) as ``load_sweep_config`` does.

torch (2.14): a stacked sweep steps each network's own optimizer, and K optimizers' ``step()`` calls cost K times
torch's per-call bookkeeping (about 0.3 ms each on a 2-core CPU: 16 networks spent 4 s of a 30 s stack there).
torch has no public way to step several Adams as one. ``adams_stepped_together`` hands the tensors of all the
Adams (and AdamWs) with equal settings to one call of torch's functional ``torch.optim.adam.adam``, which
``Adam.step`` itself calls: the same arithmetic for each element, in one kernel call. It reads each optimizer's
state by Adam's own keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).

setuptools (editable installs): pyproject.toml maps the package ``mlplab.conf`` to the top-level ``conf/``, and
``pip install -e .`` then serves the packages through an import finder whose namespace entries pkgutil cannot list.
Hydra finds its plugins by listing ``hydra_plugins`` with pkgutil, so it would not see mlplab's sweeper and launcher;
``hydra_plugins_listed`` adds their real folder to the namespace's path. Installed from a wheel, it is there already.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Hydra is imported where a sweep derives a job's config, not by every run
    import torch
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

# Made on first use (``__getattr__``): importing this module imports neither Lightning nor torch, so that the
# commands that need neither (help, refusals, dry runs, mlplab-report) answer without their seconds of imports.
LIGHTNING_CLASSES = ("RankObserver", "RankLauncher", "RankCommandDDPStrategy")


def __getattr__(name: str) -> Any:
    if name in LIGHTNING_CLASSES:
        globals().update(_lightning_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning_classes() -> dict[str, type]:
    """The data-parallel launcher's pieces, built on Lightning's private classes (see the module's docstring)."""
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
            self._launcher = RankLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, self.rank_command
            )

        @override
        def on_exception(self, exception: BaseException) -> None:
            # Rank 0 failed (diverged, a bad file): the other ranks would wait in the next collective forever.
            super().on_exception(exception)
            self.end_ranks(wait_seconds=0)

        def end_ranks(self, wait_seconds: float = 60) -> None:
            """Called when the job is over, however it ended, by the process that started the other ranks."""
            if isinstance(self._launcher, RankLauncher):
                self._launcher.end_ranks(wait_seconds)

    return {
        "RankObserver": RankObserver,
        "RankLauncher": RankLauncher,
        "RankCommandDDPStrategy": RankCommandDDPStrategy,
    }


def adams_stepped_together(optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Step ``optimizers`` as each one's ``step()`` would, those with equal settings in one call of torch's
    functional Adam. Only where each is a torch.optim.Adam (AdamW included) with one parameter group whose
    parameters all have gradients and state (so after each one's first step); else nothing is stepped and the
    answer is False: step them one by one."""
    import torch
    from torch.optim.adam import adam as functional_adam

    together: dict[str, tuple[dict[str, Any], list[list[torch.Tensor]]]] = {}
    for optimizer in optimizers:
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or len(optimizer.param_groups) != 1:
            return False
        group = optimizer.param_groups[0]
        if group["differentiable"] or any(torch.is_tensor(value) for value in (group["lr"], *group["betas"])):
            return False
        if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
            return False
        settings = repr(sorted((name, value) for name, value in group.items() if name != "params"))
        lists = together.setdefault(settings, (group, [[], [], [], [], [], []]))[1]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state or param.grad.is_sparse or torch.is_complex(param):
                return False
            lists[0].append(param)
            lists[1].append(param.grad)
            lists[2].append(state["exp_avg"])
            lists[3].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                lists[4].append(state["max_exp_avg_sq"])
            lists[5].append(state["step"])
    with torch.no_grad():
        for group, lists in together.values():  # as Adam.step calls it for one group
            functional_adam(
                *lists,
                amsgrad=group["amsgrad"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=False,
                fused=group["fused"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
    return True


def validates_next(trainer: Any) -> bool:
    """In ``on_train_batch_end``: whether Lightning validates right after the batch that just trained. The loop's
    own decision, on the state it decides on (it asks once the batch's hooks have returned)."""
    fit_loop = trainer.fit_loop
    return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))


def loops_with_schedule_steps(loops: dict[str, Any], steps: int, steps_this_epoch: int | None) -> dict[str, Any]:
    """A checkpoint's loop state (``loops``) as Lightning writes it for a run whose one learning-rate schedule has
    stepped ``steps`` times, ``steps_this_epoch`` of them in the current epoch (None: once per training batch of
    this epoch so far, a schedule stepped after every batch)."""
    from lightning.pytorch.loops.progress import _ReadyCompletedTracker, _SchedulerProgress

    fit_loop = dict(loops["fit_loop"])
    if steps_this_epoch is None:
        steps_this_epoch = fit_loop["epoch_loop.batch_progress"]["current"]["ready"]
    progress = _SchedulerProgress(
        total=_ReadyCompletedTracker(ready=steps, completed=steps),
        current=_ReadyCompletedTracker(ready=steps_this_epoch, completed=steps_this_epoch),
    )
    fit_loop["epoch_loop.scheduler_progress"] = progress.state_dict()
    return {**loops, "fit_loop": fit_loop}


def derive_job_config(
    base: DictConfig, master_config: DictConfig, parsed: list[Override], values: list[Override]
) -> DictConfig:
    """The config Hydra's ``load_sweep_config`` composes for the sweep job with overrides ``parsed``, derived from
    ``base``: the composed config of a job that chose the same config groups and set the same keys. ``values``: the
    overrides among ``parsed`` that set a value, each a plain change (``key=value``, no ``+``, ``~`` or ``@``)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from omegaconf import OmegaConf

    config = copy.deepcopy(base)
    for change in values:  # as ConfigLoaderImpl._apply_overrides_to_config applies a plain change
        OmegaConf.update(config, change.key_or_group, change.value(), merge=True)
    config.hydra.overrides.task = [given.input_line for given in parsed]
    dirname = config.hydra.job.config.override_dirname
    config.hydra.job.override_dirname = get_overrides_dirname(
        overrides=parsed, exclude_keys=list(dirname.exclude_keys), item_sep=dirname.item_sep, kv_sep=dirname.kv_sep
    )
    OmegaConf.copy_cache(from_config=master_config, to_config=config)
    return config


def hydra_plugins_listed() -> None:
    """Make mlplab's Hydra plugins (src/hydra_plugins/mlplab_sweeper) visible to Hydra's scan in every install."""
    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.mlplab_sweeper")
    folder = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    if folder and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)
