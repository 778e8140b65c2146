"""mlplab-train: Hydra composes the config; it is checked once, then one run (or, under -m, one sweep job, or a
data-parallel rank) trains through ``mlplab.run.train.train``.

    main -> hydra_main (the task function: every run, sweep job and rank) -> RunRequest -> train
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlplab.cli.command_line import check_resume, override_key, quoted
from mlplab.cli.compose import CONFIG_DIR, validated
from mlplab.cli.failure import Stopped, exit_for
from mlplab.errors import MlplabError, one_line
from mlplab.files import write_text_atomically
from mlplab.run.checkpoints import checkpoint_step
from mlplab.run.config import COMMAND_KEYS, NON_EXPERIMENT_KEYS, RESUMABLE_KEYS, ConfigError, RunConfig
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, find_checkpoint, read_metrics
from mlplab.run.trackers import mlflow_arguments
from mlplab.run.train import train
from mlplab.run.views.hparams import run_hparams
from mlplab.sweeps import stacked
from mlplab.sweeps.jobs import run_sweep_job
from mlplab.sweeps.stack_training import StackedJob

log = logging.getLogger(__name__)
TOOL = "mlplab-train"
_task_started = False


def main() -> None:
    """Console script: every problem the user can fix ends as one line and an exit status (exit_for)."""
    try:
        check_resume(sys.argv[1:])
        with errors_raised():
            hydra_main()
    except BaseException as error:  # noqa: BLE001 - exit_for re-raises what it does not recognise
        if isinstance(error, SystemExit):
            raise
        exit_for(TOOL, error, before_task=not _task_started)


@contextmanager
def errors_raised() -> Iterator[None]:
    """Hydra prints what it refuses (a composition error, a bad override) as several lines and exits 1; with its
    documented HYDRA_FULL_ERROR switch it raises instead, and exit_for makes one line of it."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":  # the user asked for Hydra's full tracebacks
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    global _task_started
    _task_started = True
    # Lightning 2.6's own use of a torch API deprecated in torch 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    # Ended here, not raised: Hydra would add a line of its own ("Error executing job with overrides") to the one.
    try:
        with discarded_if_refused(run_dir):
            request = RunRequest.of(cfg, hydra_config, run_dir)
        # A sweep's job has mode MULTIRUN, or none when the sweep's mode came from a config (a search preset), not -m.
        if hydra_config.mode != RunMode.RUN:
            if stacked.collecting():  # hydra/launcher=stacked trains the jobs once it knows them all
                return request.stacked_job(hydra_config)
            return request.train_sweep_job(hydra_config)
        with discarded_if_refused(run_dir):
            return request.train_run()
    except (MlplabError, Stopped) as error:
        exit_for(TOOL, error)


@dataclass
class RunRequest:
    """A composed, checked run: its typed config, where it runs, and the objects Hydra builds for it."""

    cfg: DictConfig
    config: RunConfig
    run_dir: Path
    overrides: list[str]  # the run's own, as given when it started (plus what a resume changed)
    callbacks: list[Any]
    hparams: dict[str, Any]  # TensorBoard's HParams columns
    resume_from: Path | None
    logger: Any  # for an attempt from resume_from; a sweep job's first attempt may start elsewhere
    experiment: str | None  # a sweep job's: the sweep's name
    command: list[str]  # what provenance.json records: the command typed, or for a sweep job the run it is
    config_dirs: list[str]  # the user's own (--config-dir), which the ranks of a data-parallel run need too

    @classmethod
    def of(cls, cfg: DictConfig, hydra_config: DictConfig, run_dir: Path) -> RunRequest:
        overrides = OmegaConf.to_container(hydra_config.overrides.task)  # as typed: ${...} in them stays unresolved
        resume_from = None
        if cfg.get("resume"):
            cfg, overrides = resumed_config(cfg, overrides)
            resume_from = find_checkpoint(cfg.resume, "last")[1]
        config = validated(cfg)
        callbacks = build_callbacks(cfg.callbacks)
        if hydra_config.mode != RunMode.RUN and cfg.get("trial") is not None:
            # A trial of a search: reports its epochs to the study. Optuna is imported only where a search runs.
            from mlplab.sweeps.search import trial_callback
            from mlplab.sweeps.storage import StudyAddress

            sweeper = hydra_config.sweeper
            pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
            address = StudyAddress.of(sweeper.get("storage"), sweeper.get("study_name"), Path(hydra_config.sweep.dir))
            callbacks.append(trial_callback(address, cfg.trial, sweeper.metric, pruner))
        hparams = run_hparams(config, command_line_values(overrides, groups=set(hydra_config.runtime.choices)))
        sweep = hydra_config.mode != RunMode.RUN
        experiment = Path(hydra_config.sweep.dir).name if sweep else None
        command = [TOOL, *overrides] if sweep else [TOOL, *sys.argv[1:]]
        config_dirs = [
            source.path.removeprefix("file://")
            for source in hydra_config.runtime.config_sources
            if source.provider == "command-line" and source.schema == "file"
        ]
        # Built now: a wrong logger setting fails here, before any work.
        return cls(
            cfg,
            config,
            run_dir,
            overrides,
            callbacks,
            hparams,
            resume_from,
            build_logger(cfg.logger, run_dir, resume_from, experiment),
            experiment,
            command,
            config_dirs,
        )

    def train_run(self) -> dict[str, Any]:
        if self.resume_from:
            log.info("Resuming from %s", self.resume_from)
        try:
            return self.train_attempt(self.resume_from, None)
        except OSError as error:  # an unwritable run directory, a full disk: the last complete checkpoint stays
            raise RunWriteError(
                f"could not write the run's files ({one_line(error)}); free space or choose a "
                f"writable place (hydra.run.dir=...), then resume: {TOOL} resume="
                f"{shlex.quote(str(self.run_dir))}"
            ) from None
        except (KeyboardInterrupt, SystemExit):
            raise stopped(self.run_dir) from None

    def train_sweep_job(self, hydra_config: DictConfig) -> dict[str, Any]:
        one_device = self.config.trainer.accelerator != "cpu" and self.config.trainer.devices == 1
        try:
            return run_sweep_job(
                self.run_dir,
                Path(hydra_config.sweep.dir),
                self.train_attempt,
                hydra_config.launcher.get("n_jobs"),
                torch.cuda.device_count() if one_device else 0,
            )
        except (KeyboardInterrupt, SystemExit):
            raise stopped(self.run_dir, sweep=True) from None

    def stacked_job(self, hydra_config: DictConfig) -> StackedJob:
        def train_alone() -> dict[str, Any]:
            configure_log(hydra_config.job_logging, hydra_config.verbose)  # into the job's own log file again
            return self.train_sweep_job(hydra_config)

        return StackedJob(
            self.config,
            self.run_dir,
            self.callbacks,
            self.hparams,
            self.command,
            logger_for=lambda resume_from: (
                self.logger
                if resume_from is None
                else build_logger(self.cfg.logger, self.run_dir, resume_from, self.experiment)
            ),
            train_alone=train_alone,
        )

    def train_attempt(self, resume_from: Path | None, gpu_index: int | None) -> dict[str, Any]:
        # A sweep job learns where it resumes from (the logger's purge step) only once it holds the job.
        logger = (
            self.logger
            if resume_from == self.resume_from
            else build_logger(self.cfg.logger, self.run_dir, resume_from, self.experiment)
        )
        return train(
            self.config,
            self.run_dir,
            logger,
            self.callbacks,
            hparams=self.hparams,
            resume_from=resume_from,
            gpu_index=gpu_index,
            rank_command=rank_command(self.overrides, self.run_dir, resume_from, self.config_dirs),
            command=self.command,
        )


class RunWriteError(MlplabError):
    """The run's files could not be written (a full disk, an unwritable folder); it can be resumed."""

    exit_status = 1


def resumed_config(cfg: DictConfig, given: list[str]) -> tuple[DictConfig, list[str]]:
    """The config of the run ``resume=`` names, composed from its own overrides and the changes allowed now."""
    run_dir, checkpoint = find_checkpoint(cfg.resume, "last")
    original = [upgraded_override(str(o)) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    changes = [o for o in given if override_key(o) != "resume" and o not in original]
    for change in changes:
        if override_key(change) not in RESUMABLE_KEYS:
            raise ConfigError(
                f"resume: {change} would change the experiment; a resumed run may only change "
                f"{', '.join(RESUMABLE_KEYS)}"
            )
    changed = {override_key(change) for change in changes} | {"resume"}
    overrides = [*(o for o in original if override_key(o) not in changed), *changes]
    if changes and "LOCAL_RANK" not in os.environ:  # ranks of a data-parallel run read what rank 0 wrote
        write_text_atomically(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides))
    return compose(config_name="train", overrides=[*overrides, f"resume={quoted(checkpoint)}"]), overrides


# Keys of earlier versions that are written differently now; resuming one of their runs repeats its overrides.
RENAMED_KEYS = {"optimizer.name": "optimizer", "scheduler.name": "scheduler", "scheduler.min_lr": "scheduler.eta_min"}


def upgraded_override(override: str) -> str:
    key = override_key(override)
    return override.replace(key, RENAMED_KEYS[key], 1) if key in RENAMED_KEYS else override


def command_line_values(overrides: list[str], groups: set[str]) -> dict[str, str]:
    """``key: value`` of each setting the user typed, leaving out those that do not define the experiment and the
    choices of config groups (``optimizer=adamw``: its settings are columns of their own, ``optimizer._target_``)."""
    values = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in NON_EXPERIMENT_KEYS and key not in groups:
            values[key] = value
    return values


def rank_command(
    overrides: list[str], run_dir: Path, resume_from: Path | None, config_dirs: Sequence[str] = ()
) -> list[str]:
    """The command that runs another rank of this run or job, should it train data-parallel (mlplab.cli.rank):
    the job's own overrides as one run in the same directory, writing no config copy and no log file."""
    kept = [override for override in overrides if override_key(override) not in COMMAND_KEYS]
    if resume_from:
        kept.append(f"resume={quoted(resume_from)}")
    return [
        sys.executable,
        "-m",
        "mlplab.cli.rank",
        *(f"--config-dir={path}" for path in config_dirs),
        *kept,
        f"hydra.run.dir={quoted(run_dir)}",
        "hydra.output_subdir=null",
        "hydra/job_logging=stderr",
    ]


def stopped(run_dir: Path, sweep: bool = False) -> Stopped:
    """How to continue a run (or sweep) a signal stopped, with the shell's exit status for that signal."""
    metrics = read_metrics(run_dir)
    stopped_by = metrics.get("stopped_by") or "SIGINT"  # not recorded: Ctrl-C outside training (e.g. testing)
    status = 128 + signal.Signals[stopped_by].value
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if sweep:
        return Stopped(f"sweep stopped by {stopped_by}; run the same command again to resume it", status)
    if last.is_file():
        return Stopped(
            f"stopped by {stopped_by} at step {metrics.get('step', '?')}; the last checkpoint is at step "
            f"{checkpoint_step(last)}.\nResume with: {TOOL} resume={shlex.quote(str(run_dir))}",
            status,
        )
    return Stopped("interrupted before training began; nothing to resume", status)


@contextmanager
def discarded_if_refused(run_dir: Path) -> Iterator[None]:
    """Remove the directory Hydra made for a run refused before it started, so typos leave no clutter."""
    try:
        yield
    except MlplabError as error:
        if (
            error.exit_status == 2
            and run_dir.is_dir()
            and all(entry.name == ".hydra" or entry.suffix == ".log" for entry in run_dir.iterdir())
        ):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def build_logger(
    logger_cfg: DictConfig | None, run_dir: Path, resume_from: Path | None = None, experiment: str | None = None
) -> Any:
    """The configured logger, or several (a group of ``name: logger config``), writing into ``run_dir``.

    Resuming, TensorBoard hides what the stopped run logged after its checkpoint (``purge_step``), so the curves
    continue without doubled or rewound points; MLflow continues the run's own MLflow run. ``experiment``: the
    sweep's name for a sweep job (MLflow's experiment).
    """
    if not logger_cfg:
        return False
    if "_target_" not in logger_cfg:
        return [build_logger(cfg, run_dir, resume_from, experiment) for cfg in logger_cfg.values() if cfg] or False
    extra: dict[str, Any] = {}
    target = logger_cfg.get("_target_", "")
    try:
        if resume_from and target.endswith("TensorBoardLogger"):
            extra["purge_step"] = checkpoint_step(resume_from) + 1
        if target.endswith("MLFlowLogger"):
            extra = mlflow_arguments(OmegaConf.to_container(logger_cfg, resolve=True), run_dir, experiment)
        return instantiate(logger_cfg, save_dir=str(run_dir), **extra)
    except InstantiationException as error:
        raise ConfigError(f"logger: {one_line(error)}") from None


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[Any]:
    callbacks = []
    for name, callback_cfg in (callbacks_cfg or {}).items():
        if callback_cfg is None:  # callbacks.<name>=null switches one off
            continue
        try:
            callbacks.append(instantiate(callback_cfg))
        except InstantiationException as error:
            raise ConfigError(f"callbacks.{name}: {one_line(error)}") from None
    return callbacks


if __name__ == "__main__":
    main()
