"""mlplab's Hydra sweeper (``hydra/sweeper=mlplab``, the default of mlplab-train): a grid, or an Optuna search.

A grid runs every combination of the sweep's values. With ``n_trials`` set (``hydra/sweeper=optuna``, or an
``hparams_search`` preset) it searches instead: Optuna's ask-and-tell on a study in ``hydra.sweeper.storage`` (by
default a journal file in the sweep folder), so a search is resumable, survives failing trials, prunes through each
job's own reports, never proposes a configuration twice, and shares one study between parallel workers and between
processes on one machine or many. Either way every job's config is checked before any trains, finished jobs are skipped,
and the sweep folder gets its summary. Each job is a job folder of the usual kind (mlplab.sweeps.jobs). The search
itself: search_loop.py.

Optuna is imported only when a search runs: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, read_write

from hydra_plugins.mlplab_sweeper.search_loop import SearchLoop, SweepIncomplete, trial_state
from mlplab.cli.compose import SWEPT_KEYS_SETTING, checked_job_config, checked_sweep_name
from mlplab.errors import MlplabError
from mlplab.run.config import ConfigError
from mlplab.run.records import has_event_files
from mlplab.sweeps.grid import (
    ComposedOnce,
    Job,
    dry_run_listing,
    grid_jobs,
    job_folder,
    sweep_overrides,
    varied_keys,
    wait_for_other_processes,
)
from mlplab.sweeps.job_records import SWEEP_JOBS_FILE
from mlplab.sweeps.jobs import FINISHED, job_state
from mlplab.sweeps.settings import check_settings
from mlplab.sweeps.summary import write_summary

log = logging.getLogger(__name__)
STABLE_OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


class MlplabSweeper(SearchLoop, Sweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        n_trials: int | None = None,
        direction: str = "maximize",
        metric: str = "val/acc",
        n_jobs: int | None = None,
        timeout: float | None = None,
        max_failure_ratio: float = 0.5,
        sampler: Any = None,
        pruner: Any = None,
        storage: str | None = None,
        study_name: str | None = None,
        max_failure_rate: float | None = None,
        seeds_per_trial: Any = 1,
    ):
        self.max_batch_size, self.params, self.n_trials = max_batch_size, params, n_trials
        self.direction, self.metric, self.n_jobs, self.timeout = direction, metric, n_jobs, timeout
        self.sampler, self.pruner, self.storage, self.study_name = sampler, pruner, storage, study_name
        self.study: Any = None  # a search's Optuna study, once opened
        # max_failure_rate: the stable hydra-optuna-sweeper's name (lightning-hydra-template's configs use it)
        self.max_failure_ratio = max_failure_ratio if max_failure_rate is None else max_failure_rate
        self.failure_limit_key = "max_failure_ratio" if max_failure_rate is None else "max_failure_rate"
        if n_trials is not None and direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction}: allowed: maximize, minimize (one objective)")
        if isinstance(seeds_per_trial, bool) or not isinstance(seeds_per_trial, int) or seeds_per_trial < 1:
            raise ConfigError(
                f"hydra.sweeper.seeds_per_trial={seeds_per_trial}: allowed: a whole number >= 1, the seeds each "
                "trial trains with (1: the trial's seed alone)"
            )
        self.seeds_per_trial = seeds_per_trial

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.loader = ComposedOnce(hydra_context.config_loader)
        self.hydra_context = HydraContext(config_loader=self.loader, callbacks=hydra_context.callbacks)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=task_function, config=config
        )
        # A cluster's launcher runs the jobs on its nodes: their devices are checked there, not on this machine.
        self.jobs_run_here = not getattr(self.launcher, "runs_elsewhere", False)

    def sweep(self, arguments: list[str]) -> Any:
        params = OmegaConf.to_container(self.params) if self.params else None
        if self.config.get("sweep"):  # refused in one line here; from inside the resolver it would come wrapped
            checked_sweep_name(self.config.sweep)
        sweep_dir = Path(self.config.hydra.sweep.dir)  # resolved (and cached) before any job copies the cache
        swept = varied_keys(params, arguments, self.seeds_per_trial)
        if swept:  # each job's config, composed in whichever process, names its folder with these keys first
            with read_write(self.config.hydra.overrides):
                self.config.hydra.overrides.hydra.append(f"++{SWEPT_KEYS_SETTING}='{' '.join(swept)}'")
        if self.n_trials is not None:
            if not getattr(self.launcher, "wait", True):
                raise ConfigError(
                    "hydra.launcher.wait=false with a search (hydra.sweeper.n_trials): a search tells each trial's "
                    "result before it asks the next; use hydra.launcher.wait=true"
                )
            self._search(sweep_dir, params, arguments)
        elif not self._grid(sweep_dir, sweep_overrides(params, arguments)):
            return  # a dry run
        jobs, text = write_summary(sweep_dir, self.study)
        print(text, end="")
        board = f"; TensorBoard: tensorboard --logdir {sweep_dir}" if has_event_files(sweep_dir) else ""
        pictures = ", pareto.png" if (sweep_dir / "pareto.png").is_file() else ""  # drawn for 2+ configurations
        print(f"Summary: {sweep_dir / 'summary.md'} (also summary.csv, summary.png{pictures}){board}")
        unfinished = [job for job in jobs if job["status"] not in FINISHED]
        if not getattr(self.launcher, "wait", True):  # submitted to a cluster, to run there (hydra.launcher.wait)
            return
        if self.n_trials is None and unfinished:
            raise SweepIncomplete(
                f"{len(unfinished)} of {len(jobs)} jobs did not complete: "
                + ", ".join(f"{job['job']} ({job['status']})" for job in unfinished)
            )
        if self.n_trials is not None:
            from mlplab.sweeps.study import failed_trials

            failed = failed_trials(self.study)
            if failed and not self.study.get_trials(deepcopy=False, states=(trial_state("COMPLETE"),)):
                raise SweepIncomplete(
                    f"search ended without a completed trial: all {len(failed)} failed; errors: "
                    + "; ".join(sorted({t.user_attrs["error"] for t in failed}))[:500]
                )

    # A grid

    def _grid(self, sweep_dir: Path, overrides: list[str]) -> bool:
        """Run the grid's jobs; False for a dry run, which only lists them."""
        parsed = OverridesParser.create(config_loader=self.loader).parse_overrides(overrides)
        checked = [self._check(job_overrides) for job_overrides in grid_jobs(parsed)]
        jobs = [job for job, _ in checked]
        earlier = check_settings(sweep_dir, [(job.dir.name, job.overrides, config) for job, config in checked])
        states = {job.dir: job_state(job.dir) for job in jobs}
        done = [job for job in jobs if states[job.dir] == "completed"]
        if self.config.get("dry_run"):
            print(dry_run_listing(jobs, done, sweep_dir))
            return False
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        listing = [{"overrides": job.overrides, "dir": job.dir.name} for job in jobs]
        (sweep_dir / SWEEP_JOBS_FILE).write_text(json.dumps(listing, indent=1) + "\n")
        todo = [job for job in jobs if job not in done]
        held = f"; its folder also holds {earlier} job{'s' * (earlier > 1)} of earlier commands" if earlier else ""
        log.info("Sweep %s: %d jobs, %d done already, %d to run%s", sweep_dir, len(jobs), len(done), len(todo), held)
        log.info("Resume or extend it with the same command and sweep=%s", sweep_dir.name)
        batch_size = self.max_batch_size or max(len(todo), 1)
        for start in range(0, len(todo), batch_size):
            self.launcher.launch([job.overrides for job in todo[start : start + batch_size]], initial_job_idx=start)
        if getattr(self.launcher, "wait", True):  # else submitted to a cluster, to run there
            wait_for_other_processes([job.dir for job in jobs])
        return True

    def _check(self, job_overrides: list[str]) -> tuple[Job, DictConfig]:
        """Compose one job's config and check it as the job will; a bad point stops the sweep before any training."""
        try:
            config = checked_job_config(
                lambda overrides: self.loader.compose(self.config, overrides, keep=True),
                job_overrides,
                self.jobs_run_here,
            )
        except MlplabError as error:
            raise ConfigError(f"job {' '.join(job_overrides)}: {error}; no job was started") from None
        return Job(job_overrides, job_folder(config)), config


class StableOptunaConfigs(Callback):
    """Runs search configs written for the stable hydra-optuna-sweeper (lightning-hydra-template's ``hparams_search``
    files) on mlplab's sweeper, which takes the same keys: they name that plugin's class, which Hydra would look up
    among the installed plugins. A Hydra callback (``hydra.callbacks`` in train.yaml): it runs after the config is
    composed and before the sweeper is built."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") == STABLE_OPTUNA_SWEEPER:
            with read_write(config.hydra.sweeper):
                config.hydra.sweeper._target_ = f"{MlplabSweeper.__module__}.{MlplabSweeper.__name__}"
            log.info("hydra.sweeper._target_ names hydra-optuna-sweeper's class; mlplab's sweeper runs the search")
