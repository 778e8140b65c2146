"""mlplab's SLURM launchers (``hydra/launcher=slurm``, ``stacked_slurm``): Hydra's submitit launcher, with the request
fitted to the run and checked against the cluster before anything is submitted (mlplab.sweeps.slurm), a refused
submission said in one line, and the jobs followed through the queue (squeue) rather than accounting (sacct, which a
cluster without slurmdbd cannot answer: submitit would warn at every poll, and never see a cancelled job end).

Each job runs mlplab-train's task as Hydra's submitit launcher runs it (the launcher is pickled into the job). A job
requeued by SLURM (preemption, ``scontrol requeue``, or submitit's own requeue before the time limit) starts again
and continues from its last checkpoint in its own job folder; a job that ends without a result (``scancel``) is
left interrupted, and the same command submits the unfinished jobs again. Jobs still in the queue from an earlier
submission of the sweep (``<sweep>/slurm_jobs.json``) are followed, not submitted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from mlplab.cli.command_line import OTHER_RANK_OVERRIDES
from mlplab.cli.compose import validated
from mlplab.errors import one_line
from mlplab.run.distributed import launched_rank
from mlplab.sweeps.slurm import (
    ENDED,
    SlurmError,
    cluster_nodes,
    fitted_request,
    job_states,
    rank_tasks,
    record_submitted,
    scheduler_states,
)

log = logging.getLogger(__name__)
POLL_SECONDS = (0.5, 10.0)  # the queue is read every half second at first, then less often, up to every 10 s
RESULT_GRACE_SECONDS = 10.0  # after a job left the queue, how long its result file may take to appear
QUEUE_RETRIES = 5  # polls in a row squeue may fail (a busy controller) before the sweep gives up following


class MlplabSlurmLauncher(SlurmLauncher):
    runs_elsewhere = True  # its jobs run on the cluster's nodes, whose devices this machine need not have
    stacks = False  # hydra/launcher=stacked_slurm: the sweep's jobs train in stacks in one SLURM job

    def __init__(self, **params: Any) -> None:
        # mlplab's settings, not sbatch's: hydra/launcher=stacked_slurm's stack size; whether to wait for the jobs
        self.max_stack = params.pop("max_stack", None)
        self.wait = params.pop("wait", True)
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        earlier = self._earlier()
        arguments, fresh = [], []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            if tuple(overrides) in earlier:
                log.info("\t#%d : already in the queue as SLURM job %s", number, earlier[tuple(overrides)][0])
                continue
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
            state = Singleton.get_state()
            arguments.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", state))
            fresh.append(list(overrides))
        jobs = dict(zip(map(tuple, fresh), self._submitted(self, arguments, job_overrides))) if arguments else {}
        self._record([(job.job_id, list(overrides)) for overrides, job in jobs.items()])
        if not self.wait:
            return [JobReturn(overrides=list(overrides), status=JobStatus.UNKNOWN) for overrides in job_overrides]
        followed = [jobs.get(tuple(o)) or self._job(earlier[tuple(o)][0]) for o in job_overrides]
        return [_returned(result, o) for result, o in zip(self._followed(followed), job_overrides)]

    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: Any
    ) -> JobReturn:
        """In each SLURM task of a job: the job, as Hydra's submitit launcher runs it. A data-parallel job's other
        ranks write no config copy and no log file of their own into the job folder (rank 0 writes both)."""
        if launched_rank() > 0:
            sweep_overrides = [*sweep_overrides, *OTHER_RANK_OVERRIDES]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def _earlier(self) -> dict[tuple[str, ...], tuple[str, str]]:
        """The sweep's jobs still in the queue from an earlier submission: (SLURM job id, state) by overrides."""
        assert self.config is not None
        return scheduler_states(Path(str(self.config.hydra.sweep.dir)))

    def _record(self, submitted: list[tuple[str, list[str]]]) -> None:
        assert self.config is not None
        if submitted:
            record_submitted(Path(str(self.config.hydra.sweep.dir)), submitted)
        if submitted and not self.wait:
            log.info(
                "Submitted; not waiting (hydra.launcher.wait=false). Follow the sweep with: mlplab-report %s",
                self.config.hydra.sweep.dir,
            )

    def _job(self, job_id: str) -> Any:
        import submitit

        return submitit.SlurmJob(folder=self.params["submitit_folder"], job_id=job_id)

    def _request(self, job_overrides: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The SLURM request for these jobs, from their runs' trainer settings (one request per sweep)."""
        assert self.config is not None and self.hydra_context is not None
        swept = any(o.lstrip("+~").startswith("trainer") for overrides in job_overrides for o in overrides)
        configs = (
            [self.hydra_context.config_loader.load_sweep_config(self.config, list(o)) for o in job_overrides]
            if swept
            else [self.config]
        )
        trainers = {(t.accelerator, t.devices, t.data_parallel) for t in (validated(c).trainer for c in configs)}
        if len(trainers) > 1:
            raise SlurmError(
                "hydra/launcher=slurm makes one request for a sweep, and its jobs differ in trainer.accelerator or "
                "trainer.devices; sweep them in separate sweeps"
            )
        ((accelerator, devices, data_parallel),) = trainers
        if not isinstance(devices, int):
            raise SlurmError(
                f"trainer.devices={devices}: hydra/launcher=slurm asks SLURM for a number of devices; give one"
            )
        if data_parallel and self.stacks:
            raise SlurmError(
                "trainer=ddp with hydra/launcher=stacked_slurm: a data-parallel job does not stack; submit it with "
                "hydra/launcher=slurm (one SLURM task per rank)"
            )
        device = "gpu" if accelerator == "gpu" else "cpu"
        tasks = rank_tasks(
            self.params.get("tasks_per_node"), int(self.params.get("nodes") or 1), devices, data_parallel
        )
        params = {**self.params, "tasks_per_node": tasks}
        return fitted_request(params, device, devices, cluster_nodes(self.params.get("partition")))

    def _submitted(self, function: Any, arguments: list[tuple], job_overrides: Sequence[Sequence[str]]) -> list[Any]:
        """``function`` submitted once per item of ``arguments`` (a job array), the request fitted to the runs of
        ``job_overrides`` and checked against the cluster first."""
        import submitit

        assert self.config is not None
        params = self._request(job_overrides)
        executor = submitit.AutoExecutor(
            folder=params["submitit_folder"], cluster="slurm", slurm_max_num_timeout=params["max_num_timeout"]
        )
        queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in queue_keys else f"slurm_{key}": value
                for key, value in params.items()
                if key not in ("submitit_folder", "max_num_timeout")
            }
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        try:
            jobs = executor.map_array(function, *zip(*arguments))
        except submitit.core.utils.FailedJobError as error:
            raise SlurmError(f"sbatch refused the sweep's jobs: {one_line(error)}") from None
        array = jobs[0].job_id.split("_")[0]
        log.info(
            "Submitted SLURM job %s (%d job(s); %s CPUs, %s GB, %s GPUs per node each); their logs: %s",
            array,
            len(jobs),
            params["cpus_per_task"] * params["tasks_per_node"],
            params["mem_gb"],
            params["gpus_per_node"],
            params["submitit_folder"].replace("%j", f"{array}_*"),
        )
        return jobs

    def _followed(self, jobs: list[Any]) -> list[Any]:
        """Each job's result once it has left the queue, or (cancelled, killed, failed) why it has none."""
        returns: dict[int, Any] = {}
        left_queue: dict[int, float] = {}
        failures, pause = 0, POLL_SECONDS[0]
        while len(returns) < len(jobs):
            waiting = [index for index in range(len(jobs)) if index not in returns]
            try:
                states = job_states([jobs[index].job_id for index in waiting])
                failures = 0
            except SlurmError:
                failures += 1
                if failures > QUEUE_RETRIES:
                    raise
                time.sleep(POLL_SECONDS[1])
                continue
            for index in waiting:
                job = jobs[index]
                state = states.get(job.job_id, "no longer listed")
                if state not in ENDED and job.job_id in states:  # pending, running, or requeued (an earlier
                    left_queue.pop(index, None)  # attempt's result may exist)
                elif _first_task(job).paths.result_pickle.exists():
                    returns[index] = _result(job)
                elif time.monotonic() - left_queue.setdefault(index, time.monotonic()) > RESULT_GRACE_SECONDS:
                    why = f"SLURM job {job.job_id} ended without a result (its state: {state})"
                    log.warning(why)
                    returns[index] = SlurmError(why)
            if len(returns) < len(jobs):
                time.sleep(pause)
                pause = min(pause * 1.25, POLL_SECONDS[1])
        return [returns[index] for index in range(len(jobs))]


class StackedSlurmLauncher(MlplabSlurmLauncher):
    """``hydra/launcher=stacked_slurm``: a stacked sweep as one SLURM job, which trains the sweep's jobs as
    ``hydra/launcher=stacked`` does on the node it runs on (one GPU, sixteen seeds). Requeued, it resumes its
    stacks from their checkpoints."""

    stacks = True

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        overrides = [list(item) for item in job_overrides]
        earlier = self._earlier()
        if all(tuple(item) in earlier for item in overrides) and len({earlier[tuple(i)][0] for i in overrides}) == 1:
            job_id = earlier[tuple(overrides[0])][0]
            log.info("%d jobs: already in the queue as SLURM job %s", len(overrides), job_id)
            job = self._job(job_id)
        else:
            log.info("%d jobs as one SLURM job, trained in stacks", len(overrides))
            (job,) = self._submitted(self, [(overrides, initial_job_idx, Singleton.get_state())], overrides)
            self._record([(job.job_id, item) for item in overrides])
        if not self.wait:
            return [JobReturn(overrides=item, status=JobStatus.UNKNOWN) for item in overrides]
        (result,) = self._followed([job])
        return result if isinstance(result, list) else [_returned(result, item) for item in overrides]

    def __call__(self, job_overrides: list[list[str]], initial_job_idx: int, singleton_state: Any) -> list[JobReturn]:
        """In the SLURM job: the stacked launcher over the sweep's jobs. submitit requeues it (this launcher's
        ``checkpoint``) when the time limit nears."""
        from hydra_plugins.mlplab_sweeper.stacked_launcher import StackedLauncher

        Singleton.set_state(singleton_state)
        launcher = StackedLauncher(self.max_stack)
        launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        return list(launcher.launch(job_overrides, initial_job_idx))


def _first_task(job: Any) -> Any:
    """The job's rank-0 task (a data-parallel job has one per rank), whose result is the job's."""
    return job.task(0) if job.num_tasks > 1 else job


def _result(job: Any) -> Any:
    try:
        return _first_task(job).results()[0]
    except Exception as error:  # the job's own failure, already in its folder's metrics.json and log
        return SlurmError(f"SLURM job {job.job_id}: {one_line(error)}")


def _returned(result: Any, overrides: Sequence[str]) -> JobReturn:
    """A job's return: its own, or a failed one saying why it has none (SlurmError)."""
    if isinstance(result, JobReturn):
        return result
    returned = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    returned.return_value = result
    return returned
