"""The task function of every run, sweep job and rank: the composed config checked once and turned into a
RunRequest, which trains it through ``mlplab.run.train.train``. A stacked sweep's launcher asks instead for each
job's description (``describe_stacked_job``) and trains the jobs once it knows them all."""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlplab.cli.command_line import TRAIN, rank_command
from mlplab.cli.compose import validated
from mlplab.cli.failure import exit_for
from mlplab.cli.resume import resumed_config
from mlplab.errors import MlplabError, one_line
from mlplab.run.config import NON_EXPERIMENT_KEYS, RunConfig
from mlplab.run.distributed import started_as_other_rank
from mlplab.run.lightning_notes import ignore_lightning_warnings, lightning_console_logging
from mlplab.run.ownership import LOCK_FILE, owned
from mlplab.run.records import find_checkpoint
from mlplab.run.stopping import Stopped, stopped
from mlplab.run.views.hparams import run_hparams
from mlplab.sweeps.jobs import run_sweep_job
from mlplab.sweeps.summary import sweep_dimensions

if TYPE_CHECKING:
    from mlplab.sweeps.stack_jobs import StackedJob

log = logging.getLogger(__name__)
task_started = False  # whether Hydra got as far as a task function (mlplab-train's errors before it are Hydra's)


def train_task(cfg: DictConfig) -> dict[str, Any]:
    """Train one run, or one job of a sweep; a problem the user can fix ends as one line (exit_for)."""
    return _task(cfg, describe=False)


def describe_stacked_job(cfg: DictConfig) -> StackedJob:
    """hydra/launcher=stacked's task function: the sweep job, composed and checked, to train later in a stack."""
    return _task(cfg, describe=True)


def _task(cfg: DictConfig, describe: bool) -> Any:
    global task_started
    task_started = True
    ignore_lightning_warnings()
    lightning_console_logging()
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    # Ended here, not raised: Hydra would add a line of its own ("Error executing job with overrides") to the one.
    try:
        with contextlib.ExitStack() as held:
            # A single run or resume= holds its folder before mlplab reads or writes in it (a refusal here leaves
            # the folder to its owner, whatever it holds); a sweep's job is claimed by the sweep
            # (mlplab.sweeps.jobs), a data-parallel run's other ranks by its first.
            if hydra_config.mode == RunMode.RUN and not started_as_other_rank():
                held.enter_context(owned(run_dir))
            with discarded_if_refused(run_dir):
                request = RunRequest.of(cfg, hydra_config, run_dir)
            if describe:
                return request.stacked_job(hydra_config)
            # A sweep's job has mode MULTIRUN, or none when the sweep's mode came from a config (a search preset).
            if hydra_config.mode != RunMode.RUN:
                return request.train_sweep_job(hydra_config)
            with discarded_if_refused(run_dir):
                return request.train_run()
    except (MlplabError, Stopped) as error:
        exit_for(TRAIN, error)


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
    logger_given: bool = False  # whether ``logger`` went to an attempt already (logger_for)

    @classmethod
    def of(cls, cfg: DictConfig, hydra_config: DictConfig, run_dir: Path) -> RunRequest:
        overrides = OmegaConf.to_container(hydra_config.overrides.task)  # as typed: ${...} in them stays unresolved
        resume_from = None
        if cfg.get("resume"):
            cfg, overrides = resumed_config(cfg, overrides)
            resume_from = find_checkpoint(cfg.resume, "last")[1]
        config = validated(cfg)
        # What a run needs beyond its checked settings (torch, Lightning), imported once nothing refused them.
        from mlplab.cli.instantiate import build_callbacks, build_logger

        callbacks = build_callbacks(cfg.callbacks)
        if hydra_config.mode != RunMode.RUN and cfg.get("trial") is not None:
            # A trial of a search: reports its epochs to the study. Optuna is imported only where a search runs.
            from mlplab.sweeps.search import trial_callback
            from mlplab.sweeps.storage import StudyAddress

            sweeper = hydra_config.sweeper
            pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
            address = StudyAddress.of(sweeper.get("storage"), sweeper.get("study_name"), Path(hydra_config.sweep.dir))
            seeds = sweeper.get("seeds_per_trial", 1)
            callbacks.append(trial_callback(address, cfg.trial, sweeper.metric, pruner, config.seed, seeds))
        sweep = hydra_config.mode != RunMode.RUN
        swept = sweep_dimensions(Path(hydra_config.sweep.dir)) if sweep else []  # HParams shows them first
        hparams = run_hparams(config, command_line_values(overrides, groups=set(hydra_config.runtime.choices)), swept)
        experiment = Path(hydra_config.sweep.dir).name if sweep else None
        command = [TRAIN, *overrides] if sweep else [TRAIN, *sys.argv[1:]]
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
            build_logger(cfg.logger, run_dir, resume_from, experiment, cfg.get("trial")),
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
                f"writable place (hydra.run.dir=...), then resume: {TRAIN} resume="
                f"{shlex.quote(str(self.run_dir))}"
            ) from None
        except (KeyboardInterrupt, SystemExit):
            raise stopped(self.run_dir) from None

    def train_sweep_job(self, hydra_config: DictConfig) -> dict[str, Any]:
        import torch

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
        from mlplab.sweeps.stack_jobs import StackedJob

        def train_alone() -> dict[str, Any]:
            configure_log(hydra_config.job_logging, hydra_config.verbose)  # into the job's own log file again
            return self.train_sweep_job(hydra_config)

        return StackedJob(
            self.config,
            self.run_dir,
            self.callbacks,
            self.hparams,
            self.command,
            logger_for=self.logger_for,
            train_alone=train_alone,
        )

    def logger_for(self, resume_from: Path | None) -> Any:
        """The run's logger(s) for an attempt from ``resume_from``: a sweep job learns where it resumes from (the
        logger's purge step) only once it holds the job. Those built with the request serve its first attempt
        only: a stacked job whose stack failed starts over with loggers of its own (a new W&B run)."""
        from mlplab.cli.instantiate import build_logger

        if resume_from == self.resume_from and not self.logger_given:
            self.logger_given = True
            return self.logger
        return build_logger(self.cfg.logger, self.run_dir, resume_from, self.experiment, self.cfg.get("trial"))

    def train_attempt(self, resume_from: Path | None, gpu_index: int | None) -> dict[str, Any]:
        from mlplab.run.train import train

        return train(
            self.config,
            self.run_dir,
            self.logger_for(resume_from),
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


def command_line_values(overrides: list[str], groups: set[str]) -> dict[str, str]:
    """``key: value`` of each setting the user typed, leaving out those that do not define the experiment and the
    choices of config groups (``optimizer=adamw``: its settings are columns of their own, ``optimizer._target_``)."""
    values = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in NON_EXPERIMENT_KEYS and key not in groups:
            values[key] = value
    return values


@contextmanager
def discarded_if_refused(run_dir: Path) -> Iterator[None]:
    """Remove the directory Hydra made for a run refused before it started, so typos leave no clutter."""
    try:
        yield
    except MlplabError as error:
        if (
            error.exit_status == 2
            and run_dir.is_dir()
            and all(entry.name in (".hydra", LOCK_FILE) or entry.suffix == ".log" for entry in run_dir.iterdir())
        ):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
