"""The search half of mlplab's sweeper (``n_trials`` set): Optuna's ask-and-tell over a study in
``hydra.sweeper.storage``, each trial's jobs (one per seed) launched through the sweeper's launcher, each told from
its jobs' metrics.json. A mixin of MlplabSweeper (mlplab_sweeper.py), whose settings it reads.

Optuna is imported only when a search runs: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mlplab.cli.compose import checked_job_config
from mlplab.errors import MlplabError
from mlplab.run.lightning_notes import lightning_console_logging
from mlplab.run.records import read_metrics
from mlplab.run.stopping import Stopped
from mlplab.sweeps.grid import SweepError, job_folder
from mlplab.sweeps.jobs import FINISHED
from mlplab.sweeps.summary import write_summary

log = logging.getLogger(__name__)
OTHERS_POLL_SECONDS = 2.0  # how often a search whose last trials run elsewhere looks at the study again


class SweepIncomplete(MlplabError):
    """Jobs that did not complete, or a search that gave up: said after the summary."""

    exit_status = 1
    label = None


class SearchLoop:
    """MlplabSweeper's search: its settings (n_trials, seeds_per_trial, ...) and launcher are the sweeper's."""

    config: Any
    loader: Any
    launcher: Any
    n_trials: int
    seeds_per_trial: int
    study: Any
    jobs_run_here: bool

    def _search(self, sweep_dir: Path, params: dict[str, Any] | None, arguments: list[str]) -> None:
        lightning_console_logging()  # before mlplab.sweeps.search imports Lightning
        from mlplab.sweeps.sampling import GRID_SAMPLER, DistinctSampler
        from mlplab.sweeps.search import parse_params
        from mlplab.sweeps.storage import StudyAddress
        from mlplab.sweeps.study import open_study

        # hparams_search=<preset> stays among each job's overrides: its settings (pruner, mode) reach the jobs.
        fixed, space = parse_params(params, arguments)
        if not space:
            raise SweepError("the search has no dimensions; set hydra.sweeper.params (or use hparams_search=<preset>)")
        if self.seeds_per_trial > 1 and "seed" in space:
            raise SweepError(
                f"seed is a search dimension and hydra.sweeper.seeds_per_trial={self.seeds_per_trial} gives each "
                "trial its seeds; search seed, or set seeds_per_trial, not both"
            )
        spec = dict(self.sampler or {})
        grid = spec.get("_target_") == GRID_SAMPLER
        sampler = DistinctSampler(lambda seed: _built(spec, seed), space, spec.get("seed"), grid)
        address = StudyAddress.of(self.storage, self.study_name, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = open_study(address, self.direction, space, sampler, _built(self.pruner))  # checked before any write
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "Search %s: study %r in %s; watch it live: %s",
            sweep_dir,
            address.name,
            address.shown,
            address.dashboard_command(),
        )
        self.study = study
        self._ask_and_tell(study, sweep_dir, fixed, space)

    def _ask_and_tell(self, study: Any, sweep_dir: Path, fixed: list[str], space: dict[str, Any]) -> None:
        from mlplab.sweeps.sampling import space_size
        from mlplab.sweeps.study import counted, kept_alive, others_running, retry_cut_short, taken

        batch_size = self.n_jobs or self.config.hydra.launcher.get("n_jobs") or 1
        size = space_size(space)
        log.info("%d of %d trials done", len(counted(study)), self.n_trials)
        deadline = time.monotonic() + self.timeout if self.timeout else None
        waiting_logged = False
        while len(counted(study)) < self.n_trials:
            for number in retry_cut_short(study):
                log.info("Trial %d was cut short; its configuration is asked again", number)
            if size is not None and len(taken(study)) >= size:
                log.info("All %d configurations of the search space have been tried", size)
                break
            if deadline and time.monotonic() > deadline:
                log.info(
                    "Time is up (hydra.sweeper.timeout=%s s): %d of %d trials done; run the same command again "
                    "to continue",
                    self.timeout,
                    len(counted(study)),
                    self.n_trials,
                )
                break
            remaining = self.n_trials - len(counted(study)) - len(others_running(study))
            if remaining <= 0:  # the last trials run in other processes: wait, and take over any whose process dies
                if not waiting_logged:
                    log.info("Waiting for the trials other processes are running")
                    waiting_logged = True
                time.sleep(OTHERS_POLL_SECONDS)
                continue
            self._stop_if_hopeless(study)
            launched = [
                asked for asked in (self._ask(study, fixed, space) for _ in range(min(batch_size, remaining))) if asked
            ]
            if launched:
                # Each trial's seeds, one job each: under hydra/launcher=stacked they train as one stack (with the
                # batch's other trials of the same shape).
                jobs = [[*o, f"trial={t.number}"] for t, seeds in launched for o in seeds]
                with kept_alive([trial for trial, _ in launched]):
                    returns = iter(self.launcher.launch(jobs, initial_job_idx=launched[0][0].number))
                for trial, seeds in launched:
                    ended = [next(returns) for _ in seeds]
                    job_dirs = [self._job_dir(r, [*o, f"trial={trial.number}"]) for r, o in zip(ended, seeds)]
                    # A cluster's job that ended without a return (cancelled, killed) fails its trial, whatever its
                    # folder last recorded.
                    lost = any(r.hydra_cfg is None for r in ended)
                    self._tell(study, trial, job_dirs, "its cluster job ended without a result" if lost else None)

    def _job_dir(self, returned: Any, overrides: list[str]) -> Path:
        """Where a trial's job ran: from its return, or (a cluster job that ended without one) from its overrides."""
        if returned.hydra_cfg is not None:
            return Path(returned.hydra_cfg.hydra.runtime.output_dir)
        return job_folder(self.loader.load_sweep_config(self.config, overrides))

    def _ask(self, study: Any, fixed: list[str], space: dict[str, Any]) -> tuple[Any, list[list[str]]] | None:
        """A new trial and the overrides of each of its seeds' jobs, checked; None when it is told failed (an
        invalid config) or set aside (another process proposed the same values first)."""
        from mlplab.sweeps.search import as_override
        from mlplab.sweeps.study import DUPLICATE_OF, duplicate_of, mark_running

        trial = study.ask(space)
        mark_running(trial)
        overrides = [*fixed, *(as_override(key, value) for key, value in trial.params.items())]
        trial.set_user_attr("overrides", overrides)
        try:
            config = checked_job_config(
                lambda o: self.loader.load_sweep_config(self.config, o), overrides, self.jobs_run_here
            )
        except MlplabError as problem:
            log.error("Trial %d: %s", trial.number, problem)
            trial.set_user_attr("error", str(problem))
            study.tell(trial, state=trial_state("FAIL"))
            return None
        first = duplicate_of(study, trial)
        if first is not None:
            log.info("Trial %d: trial %d has the same values; asking again", trial.number, first)
            trial.set_user_attr(DUPLICATE_OF, first)
            study.tell(trial, state=trial_state("FAIL"))
            return None
        if self.seeds_per_trial == 1:
            return trial, [overrides]
        # The same seeds for every trial (the trial's seed and the next ones): trials compare on equal luck.
        unseeded = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "seed"]
        seeds = [config.seed + index for index in range(self.seeds_per_trial)]
        trial.set_user_attr("seeds", seeds)
        return trial, [[*unseeded, f"seed={seed}"] for seed in seeds]

    def _tell(self, study: Any, trial: Any, job_dirs: list[Path], lost: str | None = None) -> None:
        """Tell Optuna how the trial's jobs (one per seed) ended, from their metrics.json; ``lost``: why one of them
        has no result (its trial fails)."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            if lost and not all(read_metrics(job_dir).get("status") in FINISHED for job_dir in job_dirs):
                trial.set_user_attr("error", lost)
                study.tell(trial, state=trial_state("FAIL"))
                log.info("Trial %d: failed, %s", trial.number, lost)
                return
            self._tell_once(study, trial, job_dirs)
        except UpdateFinishedTrialError:  # another process took the trial over, thinking this one had died
            log.warning(
                "Trial %d was taken over by another process meanwhile; its jobs' results stay in %s",
                trial.number,
                ", ".join(str(job_dir) for job_dir in job_dirs),
            )

    def _tell_once(self, study: Any, trial: Any, job_dirs: list[Path]) -> None:
        """One seed: its job's objective. Several: their mean, each seed's value kept (``seed_values``); the trial
        is pruned if one seed was, and fails if one did."""
        ended = [read_metrics(job_dir) for job_dir in job_dirs]
        statuses = [metrics.get("status") for metrics in ended]
        values = [metrics.get(self.metric) for metrics in ended]
        trial.set_user_attr("job", job_dirs[0].name)
        if len(job_dirs) > 1:
            trial.set_user_attr("jobs", [job_dir.name for job_dir in job_dirs])
        if "running" in statuses:  # another process holds a job folder: its trial has these values
            from mlplab.sweeps.study import DUPLICATE_OF

            trial.set_user_attr(DUPLICATE_OF, "a trial another process is running")
            study.tell(trial, state=trial_state("FAIL"))
        elif "interrupted" in statuses:
            raise Stopped("search stopped; run the same command again to continue it", 130)
        elif all(status == "completed" for status in statuses) and None not in values:
            mean = statistics.fmean(values)
            if len(values) > 1:
                trial.set_user_attr("seed_values", values)
                trial.set_user_attr("std", statistics.stdev(values))
            study.tell(trial, mean)
            spread = f" ± {statistics.stdev(values):.4f} over {len(values)} seeds" if len(values) > 1 else ""
            log.info("Trial %d: completed, %s %.4f%s", trial.number, self.metric, mean, spread)
            return
        elif "pruned" in statuses and set(statuses) <= {"completed", "pruned"}:
            study.tell(trial, state=trial_state("PRUNED"))
        else:  # failed, diverged, or a metric the job did not record
            failed = next(
                (job_dir, metrics) for job_dir, metrics in zip(job_dirs, ended) if metrics.get("status") != "completed"
            )
            error = failed[1].get("error") or f"status {failed[1].get('status')}, no {self.metric} recorded"
            trial.set_user_attr("error", f"{failed[0].name}: {error}" if len(job_dirs) > 1 else error)
            study.tell(trial, state=trial_state("FAIL"))
        log.info("Trial %d: %s", trial.number, ", ".join(sorted(set(map(str, statuses)))))

    def _stop_if_hopeless(self, study: Any) -> None:
        from mlplab.sweeps.study import failed_trials

        failed = failed_trials(study)
        if len(failed) > self.max_failure_ratio * self.n_trials:
            reasons = sorted({trial.user_attrs.get("error", "?") for trial in failed})
            write_summary(Path(self.config.hydra.sweep.dir), study)
            raise SweepIncomplete(
                f"search stopped: {len(failed)} of {self.n_trials} trials failed, more than "
                f"hydra.sweeper.{self.failure_limit_key}={self.max_failure_ratio}; errors: "
                f"{'; '.join(reasons)[:500]}"
            )


def _built(spec: Any, seed: int | None = None) -> Any:
    """A sampler or pruner from its config (``_target_``), with ``seed`` if given; the sweeper's config is not built
    recursively, so that a grid never imports Optuna."""
    from hydra.utils import instantiate

    if not spec:
        return None
    return instantiate(spec, seed=seed) if seed is not None else instantiate(spec)


def trial_state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]
