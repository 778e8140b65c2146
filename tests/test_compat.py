"""The private APIs mlplab.compat relies on, checked against the installed versions: an upgrade that changes one
fails here, naming what to update, instead of somewhere deep in a data-parallel run."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

LIGHTNING = f"lightning {version('lightning')}"


def require(ok: bool, what: str, piece: str) -> None:
    if not ok:
        pytest.fail(f"{LIGHTNING} changed {what}; update {piece} in src/mlplab/compat.py")


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_child_process_observer_still_watches_through_run():
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    require(
        parameters(_ChildProcessObserver.__init__)[1:3] == ["main_pid", "child_processes"],
        "_ChildProcessObserver(main_pid, child_processes)",
        "RankObserver",
    )
    require(
        "self._run()" in inspect.getsource(_ChildProcessObserver.run),
        "how _ChildProcessObserver.run polls (_run)",
        "RankObserver._run",
    )


def test_subprocess_script_launcher_still_starts_ranks_as_mlplab_replaces_it():
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    require(
        parameters(_SubprocessScriptLauncher.__init__)[1:4] == ["cluster_environment", "num_processes", "num_nodes"],
        "_SubprocessScriptLauncher's constructor",
        "RankLauncher.__init__",
    )
    for method in ("launch", "kill", "_call_children_scripts", "_check_can_spawn_children"):
        require(
            callable(getattr(_SubprocessScriptLauncher, method, None)),
            f"_SubprocessScriptLauncher.{method}",
            "RankLauncher",
        )
    require(
        "self.procs" in inspect.getsource(_SubprocessScriptLauncher),
        "where _SubprocessScriptLauncher keeps its child processes (procs)",
        "RankLauncher._call_children_scripts",
    )
    require(
        "MASTER_PORT" in inspect.getsource(_SubprocessScriptLauncher._call_children_scripts),
        "the environment a rank is started with",
        "RankLauncher._call_children_scripts",
    )


def test_thread_sharing_helper_keeps_its_signature():
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    require(
        parameters(_set_num_threads_if_needed) == ["num_processes"],
        "_set_num_threads_if_needed(num_processes)",
        "RankLauncher.launch",
    )


def test_ddp_strategy_still_configures_its_launcher_in_one_method():
    from lightning.pytorch.strategies import DDPStrategy

    source = inspect.getsource(DDPStrategy._configure_launcher)
    require(
        "self._launcher" in source,
        "DDPStrategy._configure_launcher (it sets self._launcher)",
        "RankCommandDDPStrategy._configure_launcher",
    )
    from lightning.pytorch.trainer.connectors import accelerator_connector

    require(
        "strategy._configure_launcher()" in inspect.getsource(accelerator_connector),
        "who calls Strategy._configure_launcher (the trainer's accelerator connector)",
        "RankCommandDDPStrategy",
    )


def test_rank_command_strategy_builds_mlplabs_launcher():
    from lightning.fabric.plugins.environments import LightningEnvironment

    from mlplab.compat import RankCommandDDPStrategy, RankLauncher

    strategy = RankCommandDDPStrategy(["python", "-c", "pass"], cluster_environment=LightningEnvironment())
    strategy._configure_launcher()
    assert isinstance(strategy.launcher, RankLauncher) and strategy.launcher.command == ["python", "-c", "pass"]


def test_hydra_finds_mlplabs_plugins_in_this_install():
    """The checkout's editable install serves packages through setuptools' finder, which pkgutil cannot list."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    import mlplab.cli.compose  # noqa: F401 - lists the plugins' folder (mlplab.compat.hydra_plugins_listed)

    found = {cls.__name__ for cls in Plugins.instance().discover(Sweeper)}
    found |= {cls.__name__ for cls in Plugins.instance().discover(Launcher)}
    if not {"MlplabSweeper", "StackedLauncher"} <= found:
        pytest.fail("Hydra no longer finds mlplab's plugins; update hydra_plugins_listed in src/mlplab/compat.py")


def test_the_fit_loop_still_counts_training_batches_across_epochs():
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    require(
        isinstance(getattr(_TrainingEpochLoop, "total_batch_idx", None), property),
        "the epoch loop's count of batches across epochs (total_batch_idx)",
        "batches_trained",
    )
