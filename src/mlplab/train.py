"""mlplab-train: the Hydra entry point. Below it (``training.train``) everything takes typed values."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
import torch

from mlplab.arguments import (conflicting_modes, quoted, resume_arguments, search_arguments, unknown_group_option,
                              unreadable_override, unwritable_output)
from mlplab.checkpoints import checkpoint_step
from mlplab.config import CONFIG_DIR, CONTROL_KEYS, ConfigError, RunConfig, describe_config_error, parse_run_config
from mlplab.datasets import DataUnavailableError
from mlplab.distributed import launched_rank, one_job_of_many
from mlplab.hparams import run_hparams
from mlplab.module import DivergedError
from mlplab.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, read_metrics, write_metrics
from mlplab.sweep import FINISHED, RETRIED, claim, gpu_slot, prepare_attempt, resume_point, threads_per_job
from mlplab.training import one_line, train

log = logging.getLogger(__name__)


def job_dirname(overrides: str) -> str:
    """A sweep job's directory name from its overrides: one path component (no "/"), at most 150 characters."""
    name = overrides.replace("/", "_") or "defaults"
    if len(name) > 150:  # file names end at 255 bytes; the hash keeps long ones apart
        name = f"{name[:140]}~{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
    return name


def sweep_name(name: str | None) -> str:
    """The sweep's folder name: as given (``sweep=<name>``), else its start time and process id."""
    return name or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


# Same-second runs get distinct directories: the timestamp alone is not unique.
OmegaConf.register_new_resolver("mlplab.pid", lambda: os.getpid(), replace=True)
# Cached in the sweep's config, so that every job, in whichever process, resolves the same folder.
OmegaConf.register_new_resolver("mlplab.sweep_name", sweep_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("mlplab.job_dirname", job_dirname, replace=True)


def main() -> None:
    """Console script: a mistyped group option or a bad resume costs one line, then Hydra takes over."""
    try:
        sys.argv[1:] = search_arguments(resume_arguments(sys.argv[1:]))
    except (ConfigError, FileNotFoundError) as error:
        print(f"mlplab-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    problem = (conflicting_modes(sys.argv[1:]) or unreadable_override(sys.argv[1:])
               or unknown_group_option(sys.argv[1:], Path(CONFIG_DIR)) or unwritable_output(sys.argv[1:]))
    if problem:
        print(f"mlplab-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra prints what it cannot compose as several lines and exits 1; raised instead, it becomes one line here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (CompactHydraException, OmegaConfBaseException) as error:
        if full_error == "1":
            raise
        print(f"mlplab-train: error: {describe_config_error(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        _restore_environment("HYDRA_FULL_ERROR", full_error)


def _restore_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    # Lightning 2.6's own use of a torch API deprecated in torch 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    resume_from = Path(cfg.resume) if cfg.get("resume") else None
    try:
        config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
        callbacks = build_callbacks(cfg.callbacks)
        logger = build_logger(cfg.logger, run_dir, resume_from)  # a wrong logger setting fails here, before any work
    except (ConfigError, DataUnavailableError) as error:
        _exit_with(error, run_dir)
    except OmegaConfBaseException as error:  # an interpolation that does not resolve: ${oops}, ${oc.env:UNSET}
        _exit_with(ConfigError(describe_config_error(error)), run_dir)
    hparams = run_hparams(config, command_line_values(hydra_config))
    # A sweep's job has mode MULTIRUN, or none when the sweep's mode came from a config (a search preset), not -m.
    if hydra_config.mode != RunMode.RUN:
        if cfg.get("trial") is not None:  # a trial of a search (hydra/sweeper=optuna): reports its epochs to the study
            from mlplab.search import trial_callback  # Optuna is imported only where a search runs

            sweeper = hydra_config.sweeper
            callbacks.append(trial_callback(Path(hydra_config.sweep.dir), cfg.trial, sweeper.metric, instantiate(sweeper.pruner)))
        # Each job builds its own logger: where it resumes from (its purge step) is known only once it holds the job.
        return train_sweep_job(config, run_dir, cfg.logger, callbacks, hparams, hydra_config)
    if resume_from:
        log.info("Resuming from %s", resume_from)
    try:
        return train(config, run_dir, logger, callbacks, hparams=hparams, resume_from=resume_from,
                     rank_command=rank_command(hydra_config, run_dir, resume_from))
    except (ConfigError, DataUnavailableError) as error:
        _exit_with(error, run_dir)
    except DivergedError as error:
        print(f"mlplab-train: diverged: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # an unwritable run directory, a full disk: the last complete checkpoint stays
        print(f"mlplab-train: error: could not write the run's files ({one_line(error)}); free space or choose "
              f"a writable place (hydra.run.dir=...), then resume: mlplab-train resume={shlex.quote(str(run_dir))}",
              file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit):
        _exit_interrupted(run_dir)


def _exit_interrupted(run_dir: Path, sweep: bool = False) -> NoReturn:
    """Say how to continue a run (or sweep) a signal stopped; exit with the shell's code for that signal."""
    metrics = read_metrics(run_dir)
    stopped_by = metrics.get("stopped_by") or "SIGINT"  # not recorded: Ctrl-C outside training (e.g. testing)
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if sweep:
        print(f"mlplab-train: sweep stopped by {stopped_by}; run the same command again to resume it", file=sys.stderr)
    elif last.is_file():
        print(f"mlplab-train: stopped by {stopped_by} at step {metrics.get('step', '?')}; the last checkpoint is at "
              f"step {checkpoint_step(last)}.\nResume with: mlplab-train resume={shlex.quote(str(run_dir))}",
              file=sys.stderr)
    else:
        print("mlplab-train: interrupted before training began; nothing to resume", file=sys.stderr)
    sys.exit(128 + signal.Signals[stopped_by].value)


def command_line_values(hydra_config: DictConfig) -> dict[str, str]:
    """``key: value`` of each override the user typed, leaving out those that only say where things are."""
    excluded = set(hydra_config.job.config.override_dirname.exclude_keys)
    values = {}
    for override in hydra_config.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in excluded and key not in CONTROL_KEYS:
            values[key] = value
    return values


def rank_command(hydra_config: DictConfig, run_dir: Path, resume_from: Path | None) -> list[str]:
    """The command that runs another rank of this run or job, should it train data-parallel (mlplab.distributed):
    the job's own overrides as one run in the same directory, writing no config copy and no log file."""
    overrides = [override for override in hydra_config.overrides.task
                 if override.lstrip("+~").split("=", 1)[0] not in CONTROL_KEYS]
    if resume_from:
        overrides.append(f"resume={quoted(resume_from)}")
    return [sys.executable, "-m", "mlplab.distributed", *overrides, f"hydra.run.dir={quoted(run_dir)}",
            "hydra.output_subdir=null", "hydra/job_logging=stderr"]


def train_sweep_job(
    config: RunConfig, run_dir: Path, logger_cfg: DictConfig, callbacks: list[Any], hparams: dict[str, Any],
    hydra_config: DictConfig,
) -> dict[str, Any]:
    """One job of a multirun: trained once across processes, skipped when done, resumed when cut short.

    A job that fails or diverges is recorded in its metrics.json and the sweep goes on; the sweeper reports it.
    """
    if launched_rank() > 0:  # one of the job's SLURM tasks, not its first: rank 0 holds the job and writes
        resume_from = resume_point(run_dir)
        return train(config, run_dir, build_logger(logger_cfg, run_dir, resume_from), callbacks, hparams=hparams,
                     resume_from=resume_from)
    with claim(run_dir) as claimed:
        if not claimed:
            log.info("Skipped: another process is running this job (%s)", run_dir)
            return {"status": "running"}
        done = read_metrics(run_dir)
        if done.get("status") in FINISHED:
            log.info("Done already: %s", run_dir)
            return done
        resume_from = prepare_attempt(run_dir)
        if resume_from:
            log.info("Resuming from %s", resume_from)
        threads = threads_per_job(hydra_config.launcher.get("n_jobs"))
        if threads:  # jobs side by side share the cores instead of each taking all of them
            torch.set_num_threads(threads)
            log.info("CPU threads for this job: %d", threads)
        one_device = config.trainer.accelerator != "cpu" and config.trainer.devices == 1
        gpu_count = torch.cuda.device_count() if one_device else 0
        with gpu_slot(Path(hydra_config.sweep.dir), gpu_count) as gpu, one_job_of_many():
            try:
                logger = build_logger(logger_cfg, run_dir, resume_from)
                return train(config, run_dir, logger, callbacks, hparams=hparams, resume_from=resume_from, gpu_index=gpu,
                             rank_command=rank_command(hydra_config, run_dir, resume_from))
            except (KeyboardInterrupt, SystemExit):
                _exit_interrupted(run_dir, sweep=True)
            except Exception as error:  # one job's failure is not the sweep's
                log.error("Job failed: %s", one_line(error))
                metrics = read_metrics(run_dir)
                if metrics.get("status") not in RETRIED:  # failed before training began (data set-up)
                    metrics = {**metrics, "status": "failed", "error": f"{type(error).__name__}: {one_line(error)}"}
                    write_metrics(run_dir, metrics)
                return metrics


def _exit_with(error: Exception, run_dir: Path) -> NoReturn:
    print(f"mlplab-train: error: {error}", file=sys.stderr)
    _discard_if_unused(run_dir)
    sys.exit(2)


def _discard_if_unused(run_dir: Path) -> None:
    """Remove the directory Hydra made for a run that never started, so typos leave no clutter."""
    if all(entry.name == ".hydra" or entry.suffix == ".log" for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def build_logger(logger_cfg: DictConfig | None, run_dir: Path, resume_from: Path | None = None) -> Any:
    """The configured logger, writing into ``run_dir``.

    Resuming, TensorBoard hides what the stopped run logged after its checkpoint (``purge_step``), so the curves
    continue without doubled or rewound points.
    """
    if not logger_cfg:
        return False
    extra = {}
    if resume_from and logger_cfg.get("_target_", "").endswith("TensorBoardLogger"):
        extra["purge_step"] = checkpoint_step(resume_from) + 1
    try:
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
