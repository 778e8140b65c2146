"""The private APIs mlplab.compat relies on, checked against the installed versions: an upgrade that changes one
fails here, naming what to update, instead of somewhere deep in a data-parallel run."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from mlplab.compat import adams_stepped_together

LIGHTNING = f"lightning {version('lightning')}"
HYDRA = f"hydra-core {version('hydra-core')}"


def require(ok: bool, what: str, piece: str, library: str = LIGHTNING) -> None:
    if not ok:
        pytest.fail(f"{library} changed {what}; update {piece} in src/mlplab/compat.py")


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


class Tiny(LightningModule):
    """Two inputs, one weight matrix; with a step schedule stepped per ``interval`` (None: no schedule)."""

    def __init__(self, interval: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).square().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.hparams.interval is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": self.hparams.interval}}


def fit(module: LightningModule, callback: Callback, batches: int, **settings) -> None:
    """Train ``module`` for 3 epochs of ``batches`` batches (2 at most with ``settings``' max_epochs) on the CPU."""
    data = DataLoader(TensorDataset(torch.randn(2 * batches, 2)), batch_size=2)
    trainer = Trainer(
        **{"max_epochs": 3, **settings},
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(module, data, data)


class ValidationWatch(Callback):
    """The training batches (epoch, index) after which validates_next said Lightning validates, and those after
    which it did."""

    def __init__(self):
        self.said, self.validated, self.last = set(), set(), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from mlplab.compat import validates_next

        self.last = (trainer.current_epoch, batch_idx)
        if validates_next(trainer):
            self.said.add(self.last)

    def on_validation_start(self, trainer, pl_module):
        self.validated.add(self.last)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"val_check_interval": 2},
        {"val_check_interval": 0.5},
        {"check_val_every_n_epoch": 2},
        {"check_val_every_n_epoch": None, "val_check_interval": 4},  # every 4 batches, counted across epochs
        {"limit_train_batches": 4},
        {"limit_train_batches": 0.5, "val_check_interval": 2},
    ],
)
def test_validates_next_says_what_lightnings_fit_loop_does(settings):
    watch = ValidationWatch()
    fit(Tiny(), watch, batches=6, **settings)
    require(
        watch.said == watch.validated and watch.validated,
        f"when validation follows a training batch ({settings}: validated after (epoch, batch) "
        f"{sorted(watch.validated)}, validates_next said {sorted(watch.said)})",
        "validates_next",
    )


class CheckpointAt(Callback):
    """The checkpoint Lightning saves after the second batch of the second epoch, and at that epoch's end."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (1, 1):  # where ResumePoints saves one mid-epoch
            trainer.save_checkpoint(self.folder / "mid-epoch.ckpt")

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # where ModelCheckpoint saves the epoch's
            trainer.save_checkpoint(self.folder / "epoch-end.ckpt")


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_loops_with_schedule_steps_writes_the_loop_state_lightning_saves(interval, tmp_path):
    from mlplab.compat import loops_with_schedule_steps

    fit(Tiny(interval), CheckpointAt(tmp_path), batches=4, max_epochs=2)
    for name, steps_this_epoch in (("mid-epoch", 0), ("epoch-end", 1)):
        checkpoint = torch.load(tmp_path / f"{name}.ckpt", weights_only=True)
        loops = checkpoint["loops"]
        stack = loops_with_schedule_steps(loops, 0, 0)  # a stack's own: its Trainer steps no schedule
        steps = checkpoint["lr_schedulers"][0]["last_epoch"]
        ours = loops_with_schedule_steps(stack, steps, None if interval == "step" else steps_this_epoch)
        require(
            ours == loops,
            f"a checkpoint's loop state ({interval} schedule, {name}: Lightning saved {loops['fit_loop']}, "
            f"mlplab writes {ours['fit_loop']})",
            "loops_with_schedule_steps",
        )
        # what each stacked job's checkpoint is given of its own (mlplab.sweeps.stack_jobs JobRecords._job_checkpoint)
        own = {
            "state_dict",
            "optimizer_states",
            "lr_schedulers",
            "loops",
            "callbacks",
            "hparams_name",
            "hyper_parameters",
        }
        if (
            not own <= checkpoint.keys()
            or LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY != "datamodule_hyper_parameters"
        ):
            pytest.fail(
                f"{LIGHTNING} saves a checkpoint's parts under other keys ({sorted(checkpoint)}); update "
                "JobRecords._job_checkpoint in src/mlplab/sweeps/stack_jobs.py"
            )


@pytest.mark.slow
def test_jobs_derived_from_a_composed_one_equal_hydras_own_composition():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mlplab.cli.compose import CONFIG_DIR  # registers the resolvers the config uses
    from mlplab.sweeps.grid import ComposedOnce

    jobs = [
        ["seed=1", "model.width=[256,128]", "optimizer.lr=0.1"],
        ["seed=2", "model.width=[64]", "optimizer.lr=${model.dropout}"],  # derived: same groups, same keys
        ["model=linear", "seed=3", "optimizer=sgd", "optimizer.momentum=0.9"],
        ["model=linear", "seed=4", "optimizer=sgd", "optimizer.momentum=0.5"],  # derived from the one before
        ["seed=5", "model.width=[32]", "optimizer.lr=0.3"],  # derived from the first
        ["seed=6", "checkpoint.every_n_steps=10"],
        ["seed=7", "checkpoint.every_n_steps=20"],  # derived; a key left out of the job's folder name
        ["seed=8", "+model.note=x"],  # an addition: composed in full
        ["seed=9", "model={depth: 3}"],  # a dict merges: composed in full
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", overrides=["hydra.sweep.dir=sweeps/x"], run_mode=RunMode.MULTIRUN)
        composed_once = ComposedOnce(loader)
        for overrides in jobs:
            expected = loader.load_sweep_config(master, overrides)
            got = composed_once.compose(master, overrides)
            run_keys = [key for key in expected if key != "hydra"]  # hydra's own keys resolve only in a running job
            require(
                OmegaConf.to_yaml(got) == OmegaConf.to_yaml(expected)
                and OmegaConf.to_yaml(OmegaConf.masked_copy(got, run_keys), resolve=True)
                == OmegaConf.to_yaml(OmegaConf.masked_copy(expected, run_keys), resolve=True),
                f"the config load_sweep_config composes for a sweep job ({' '.join(overrides)}: "
                f"hydra.job.override_dirname {expected.hydra.job.override_dirname!r}, derived "
                f"{got.hydra.job.override_dirname!r})",
                "derive_job_config",
                HYDRA,
            )
        assert len(composed_once._bases) == 3  # the first job's shape, model=linear's and seed=6's: the rest derived


def test_csv_logger_still_removes_metrics_csv_when_its_writer_is_made_and_keeps_its_header(tmp_path):
    # mlplab.run.trackers.ResumableCSVLogger rewrites the rows a resumed run keeps after Lightning's writer removed
    # the file, and hands the writer their header: update it if either changes.
    from lightning.pytorch.loggers import CSVLogger

    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc\n0,9,0.5\n")
    writer = CSVLogger(tmp_path, name="", version="").experiment
    assert not (tmp_path / "metrics.csv").exists(), "update mlplab.run.trackers.ResumableCSVLogger"
    assert writer.metrics_keys == [], "update mlplab.run.trackers.ResumableCSVLogger"
    writer.metrics_keys = ["epoch", "step", "val/acc"]
    writer.metrics = [{"epoch": 2, "step": 19, "val/acc": 0.6}]
    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc\n1,9,0.5\n")
    writer.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,step,val/acc", "1,9,0.5", "2,19,0.6"], (
        "update mlplab.run.trackers.ResumableCSVLogger"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
        lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=True, weight_decay=0.01),
        lambda params, lr: torch.optim.AdamW(params, lr=lr, amsgrad=True, foreach=False),
    ],
    ids=["fused Adam", "foreach Adam", "AdamW amsgrad"],
)
def test_adams_stepped_together_step_as_each_adam_steps_alone(make):
    """If torch changes Adam's functional form or its state's names, update compat.adams_stepped_together."""
    torch.manual_seed(0)
    tensors = [[torch.randn(5, 3), torch.randn(3)] for _ in range(3)]
    alone = [[tensor.clone().requires_grad_() for tensor in network] for network in tensors]
    together = [[tensor.clone().requires_grad_() for tensor in network] for network in tensors]
    lrs = [0.1, 0.1, 0.01]  # two of one setting, one of another: two calls
    alone_optimizers = [make(params, lr) for params, lr in zip(alone, lrs)]
    together_optimizers = [make(params, lr) for params, lr in zip(together, lrs)]
    assert not adams_stepped_together(together_optimizers)  # no state yet: step one by one
    for step in range(4):
        grads = [[torch.randn_like(tensor) for tensor in network] for network in tensors]
        for params_alone, params_together, network_grads in zip(alone, together, grads):
            for a, b, grad in zip(params_alone, params_together, network_grads):
                a.grad, b.grad = grad.clone(), grad.clone()
        for optimizer in alone_optimizers:
            optimizer.step()
        if step == 0:
            for optimizer in together_optimizers:
                optimizer.step()
        else:
            assert adams_stepped_together(together_optimizers)
    for network_alone, network_together in zip(alone, together):
        for a, b in zip(network_alone, network_together):
            assert torch.equal(a, b)
    for optimizer_alone, optimizer_together in zip(alone_optimizers, together_optimizers):
        for state_alone, state_together in zip(
            optimizer_alone.state_dict()["state"].values(), optimizer_together.state_dict()["state"].values()
        ):
            assert state_alone.keys() == state_together.keys()
            assert all(torch.equal(state_alone[key], state_together[key]) for key in state_alone)
            assert float(state_together["step"]) == 4.0


def test_adams_stepped_together_leaves_other_optimizers_to_step_alone():
    params = [torch.zeros(2, requires_grad=True)]
    params[0].grad = torch.ones(2)
    sgd = torch.optim.SGD(params, lr=0.1)
    assert not adams_stepped_together([sgd])
    assert torch.equal(params[0].detach(), torch.zeros(2))
