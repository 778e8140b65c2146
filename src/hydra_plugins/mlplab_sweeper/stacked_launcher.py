"""mlplab's stacked launcher (``hydra/launcher=stacked``), the entry point of stacked sweeps: the sweep's jobs that
may stack (what may differ within a stack: mlplab.sweeps.stack_plan) train together as one stack in this process;
the others run one after another, as Hydra's basic launcher runs them.

Each job is composed, checked and given its folder by Hydra as usual (its ``.hydra/`` and log); the launcher runs
mlplab-train's ``describe_stacked_job`` on it instead of the training task, and trains the jobs once all are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from mlplab.run.config import ConfigError
from mlplab.run.lightning_notes import lightning_console_logging
from mlplab.run.stopping import stopped


class StackedLauncher(Launcher):
    def __init__(self, max_stack: int | None = None) -> None:
        self.max_stack = max_stack

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config  # mlplab-train's task: describe_stacked_job

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Checked here, not when Hydra builds the launcher: Hydra would wrap the message in its own.
        if self.max_stack is not None and (not isinstance(self.max_stack, int) or self.max_stack < 1):
            raise ConfigError(
                f"hydra.launcher.max_stack must be null (as many as memory holds) or an integer >= 1, "
                f"got {self.max_stack!r}"
            )
        lightning_console_logging()  # before stack_plan imports Lightning
        from mlplab.cli.run_request import describe_stacked_job  # a run's imports: Hydra imports plugins for --help
        from mlplab.sweeps.stack_plan import run_jobs

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):  # as Hydra's own launchers number the jobs
                job_config.hydra.job.id = f"{job_config.hydra.job.name}_{number}"
                job_config.hydra.job.num = number
            HydraConfig.instance().set_config(job_config)
            returns.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=describe_stacked_job,  # the job, composed and checked, not trained yet
                    config=job_config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        jobs = [returned.return_value for returned in returns]
        try:
            results: list[Any] = run_jobs(jobs, sweep_dir, self.max_stack)
        except (KeyboardInterrupt, SystemExit):  # a signal stopped a stack; its jobs resume with the same command
            raise stopped(jobs[0].run_dir, sweep=True) from None
        for returned, metrics in zip(returns, results):
            returned.return_value = metrics
        return returns
