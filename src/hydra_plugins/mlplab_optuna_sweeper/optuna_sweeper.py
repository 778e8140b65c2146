"""mlplab's Optuna sweeper (``hydra/sweeper=optuna``; presets in ``conf/hparams_search/``).

Built on Optuna's ask-and-tell interface and its journal file storage in the sweep folder, so that a search is
persistent and resumable, survives failing trials, prunes through each job's own reports, and shares one study
between parallel workers. Keeps the stable Hydra Optuna sweeper's keys (``n_trials``, ``direction``, ``sampler``,
``pruner``, ``params``). Each trial is a job folder of the usual kind, so summaries and TensorBoard work as for a grid.

Optuna is imported only when a search runs: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mlplab_sweeper.mlplab_sweeper import checked_job_config
from mlplab.config import ConfigError
from mlplab.report import write_summary
from mlplab.runs import read_metrics
from mlplab.sweep import claim

log = logging.getLogger(__name__)
SEARCH_LOCK = ".search.lock"


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str = "maximize", metric: str = "val/acc", n_trials: int = 20,
                 n_jobs: int | None = None, max_failure_ratio: float = 0.5, sampler: Any = None, pruner: Any = None,
                 params: dict[str, str] | None = None, timeout: float | None = None):
        self.direction, self.metric, self.n_trials, self.n_jobs = direction, metric, n_trials, n_jobs
        self.timeout = timeout
        self.max_failure_ratio, self.sampler, self.pruner, self.params = max_failure_ratio, sampler, pruner, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def sweep(self, arguments: list[str]) -> None:
        from mlplab.search import parse_params

        # hparams_search=<preset> stays among each job's overrides: its settings (pruner, mode) reach the jobs.
        try:
            fixed, space = parse_params(OmegaConf.to_container(self.params) if self.params else None, arguments)
        except ConfigError as error:  # a sweep syntax that is no search dimension, e.g. glob(...)
            _refuse(str(error))
        if not space:
            _refuse("the search has no dimensions; set hydra.sweeper.params (or use hparams_search=<preset>)")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        with claim(sweep_dir, SEARCH_LOCK) as claimed:  # one process asks; parallel workers come from the launcher
            if not claimed:
                _refuse(f"another process is running the search in {sweep_dir}; wait for it, or use "
                        "hydra/launcher=parallel for parallel trials")
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            self._search(sweep_dir, fixed, space)
        _, text = write_summary(sweep_dir)
        print(text, end="")
        print(f"Summary: {sweep_dir / 'summary.md'} (also .csv, .png, search.png); TensorBoard: tensorboard --logdir {sweep_dir}")

    def _search(self, sweep_dir: Path, fixed: list[str], space: dict[str, Any]) -> None:
        from mlplab.search import as_override, open_study, recover_crashed

        # Hydra built sampler and pruner already, from their _target_; each job builds its own pruner the same way.
        study = open_study(sweep_dir, self.direction, self.sampler, self.pruner)
        for number in recover_crashed(study):
            log.info("Trial %d was cut short; its configuration is asked again", number)
        batch_size = self.n_jobs or self.config.hydra.launcher.get("n_jobs") or 1
        log.info("Search %s: %d of %d trials done; study %s", sweep_dir, _done(study), self.n_trials, sweep_dir / "optuna.journal")
        deadline = time.monotonic() + self.timeout if self.timeout else None
        while (remaining := self.n_trials - _done(study)) > 0:
            if deadline and time.monotonic() > deadline:
                log.info("Time is up (hydra.sweeper.timeout=%s s): %d of %d trials done; run the same command again "
                         "to continue", self.timeout, _done(study), self.n_trials)
                break
            self._stop_if_hopeless(study)
            trials = [study.ask(space) for _ in range(min(batch_size, remaining))]
            launched = []
            for trial in trials:
                overrides = [*fixed, *(as_override(key, value) for key, value in trial.params.items())]
                trial.set_user_attr("overrides", overrides)
                problem = self._check(overrides)
                if problem:
                    log.error("Trial %d: %s", trial.number, problem)
                    trial.set_user_attr("error", problem)
                    study.tell(trial, state=_state("FAIL"))
                else:
                    launched.append((trial, overrides))
            if launched:
                returns = self.launcher.launch([[*o, f"trial={t.number}"] for t, o in launched], initial_job_idx=launched[0][0].number)
                for (trial, _), job in zip(launched, returns):
                    self._tell(study, trial, Path(job.hydra_cfg.hydra.runtime.output_dir))

    def _check(self, overrides: list[str]) -> str | None:
        """Why this trial's config is not a valid run, or None; composed and checked as the job will."""
        try:
            checked_job_config(lambda o: self.hydra_context.config_loader.load_sweep_config(self.config, o), overrides)
        except ConfigError as error:
            return str(error)
        return None

    def _tell(self, study: Any, trial: Any, job_dir: Path) -> None:
        """Tell Optuna how the trial's job ended, from its metrics.json."""
        metrics = read_metrics(job_dir)
        status, value = metrics.get("status"), metrics.get(self.metric)
        trial.set_user_attr("job", job_dir.name)
        if status == "completed" and value is not None:
            study.tell(trial, float(value))
        elif status == "pruned":
            study.tell(trial, state=_state("PRUNED"))
        elif status == "interrupted":
            print("mlplab-train: search stopped; run the same command again to continue it", file=sys.stderr)
            sys.exit(130)
        else:  # failed, diverged, or a metric the job did not record
            trial.set_user_attr("error", metrics.get("error") or f"status {status}, no {self.metric} recorded")
            study.tell(trial, state=_state("FAIL"))
        log.info("Trial %d: %s %s", trial.number, status, f"{self.metric} {value:.4f}" if value is not None else "")

    def _stop_if_hopeless(self, study: Any) -> None:
        from mlplab.search import failed_trials

        failed = failed_trials(study)
        if len(failed) > self.max_failure_ratio * self.n_trials:
            reasons = sorted({trial.user_attrs.get("error", "?") for trial in failed})
            print(f"mlplab-train: search stopped: {len(failed)} of {self.n_trials} trials failed, more than "
                  f"hydra.sweeper.max_failure_ratio={self.max_failure_ratio}; errors: {'; '.join(reasons)[:500]}",
                  file=sys.stderr)
            write_summary(Path(self.config.hydra.sweep.dir))
            sys.exit(1)


def _done(study: Any) -> int:
    from mlplab.search import counted

    return len(counted(study))


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _refuse(message: str) -> None:
    print(f"mlplab-train: error: {message}", file=sys.stderr)
    sys.exit(2)
