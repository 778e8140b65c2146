"""One sweep job in its stable directory: claimed by one process at a time, skipped when done, resumed when cut
short."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlplab.errors import one_line
from mlplab.run.distributed import launched_rank, one_job_of_many
from mlplab.run.ownership import ClaimLostError, claim, running_on
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, UnreadableRecordError, read_metrics, write_metrics

log = logging.getLogger(__name__)

RETRIED = ("failed", "diverged")
FINISHED = ("completed", "pruned")  # a job in either state is never trained again
DAMAGED_SUFFIX = ".damaged"  # a damaged metrics.json is kept beside the new one under this suffix
UNREADABLE = "unreadable"  # a job whose metrics.json is damaged (job_state): never resumed, it starts over


def job_state(job_dir: Path) -> str:
    """completed | pruned | failed | diverged | running | interrupted | pending, or UNREADABLE: a damaged
    metrics.json, which its report names and its sweep starts over (claimed_metrics)."""
    try:
        status = read_metrics(job_dir).get("status")
    except UnreadableRecordError:
        return UNREADABLE
    if status in (*FINISHED, *RETRIED):
        return status
    if running_on(job_dir):
        return "running"
    if status or (job_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        return "interrupted"
    return "pending"


def claimed_metrics(job_dir: Path) -> dict[str, Any]:
    """The metrics.json of a job this process holds. A damaged one makes the job a failed one, to start over: without
    its status, a job whose checkpoints must not be resumed (failed, diverged) looks like one cut short. The damaged
    file stays beside the new record, and one line names it."""
    try:
        return read_metrics(job_dir)
    except UnreadableRecordError as error:
        damaged = error.path
    kept = damaged.with_name(damaged.name + DAMAGED_SUFFIX)
    damaged.replace(kept)
    metrics = {"status": "failed", "error": f"{damaged.name} was damaged (kept as {kept.name}); the job starts over"}
    write_metrics(job_dir, metrics)
    log.warning("%s is damaged; the job starts over, as a failed job does (the file kept as %s)", damaged, kept.name)
    return metrics


def held_elsewhere(job_dir: Path) -> str:
    """Why a sweep skips a job another process holds: who holds it (a sweep's one line, as a run's refusal)."""
    owner = running_on(job_dir)
    host, _, pid = (owner or "").partition(" ")
    return f"process {pid} on {host} is running it" if owner else "another process is running it"


def prepare_attempt(job_dir: Path) -> Path | None:
    """Make the (claimed, unfinished) job ready to run; returns the checkpoint to resume from, if any.

    A failed or diverged job starts over: its checkpoints and TensorBoard events go, its log stays. An interrupted
    job resumes from its last checkpoint; events written after that checkpoint are re-logged by the resumed run.
    """
    last = resume_point(job_dir)
    if last is None:
        shutil.rmtree(job_dir / CHECKPOINT_DIR, ignore_errors=True)
        for events in job_dir.glob("events.out.tfevents.*"):
            events.unlink()
    return last


def resume_point(job_dir: Path) -> Path | None:
    """The checkpoint an unfinished job continues from: its last one, unless it failed or diverged or its metrics.json
    is damaged (it starts over)."""
    last = job_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    return last if last.is_file() and job_state(job_dir) not in (*RETRIED, UNREADABLE) else None


def threads_per_job(parallel_jobs: int | None) -> int | None:
    """CPU threads for each of ``parallel_jobs`` jobs sharing this machine; None when jobs run one at a time."""
    if not parallel_jobs or parallel_jobs == 1:
        return None
    cores = len(os.sched_getaffinity(0))
    return 1 if parallel_jobs < 0 else max(1, cores // parallel_jobs)


@contextmanager
def gpu_slot(sweep_dir: Path, gpu_count: int) -> Iterator[int | None]:
    """A GPU for one job of the sweep, held while the block runs; None with fewer than two GPUs.

    Jobs spread evenly: each GPU's first slot is taken before any GPU's second, and so on (8 jobs on 4 GPUs: two
    each). A slot is a lock file, so a job that dies frees its slot.
    """
    if gpu_count < 2:
        yield None
        return
    for share in itertools.count():
        for index in range(gpu_count):
            with claim(sweep_dir, f".gpu{index}.{share}.lock") as free:
                if free:
                    yield index
                    return


# Trains one attempt of a job: (checkpoint to resume from or None, GPU index or None) -> the run's metrics.
Attempt = Callable[[Path | None, int | None], dict[str, Any]]


def run_sweep_job(
    job_dir: Path, sweep_dir: Path, attempt: Attempt, parallel_jobs: int | None = None, gpu_count: int = 0
) -> dict[str, Any]:
    """One job of a sweep: trained once across processes, skipped when done, resumed when cut short.

    A job that fails or diverges is recorded in its metrics.json and the sweep goes on; the sweeper reports it.
    ``gpu_count``: GPUs the job may choose from (one-device jobs on a machine with several).
    """
    import torch  # a sweep's jobs train: this module itself is read by commands that only check or report

    from mlplab.run.train import ENVIRONMENT_ERRORS

    if launched_rank() > 0:  # one of the job's SLURM tasks, not its first: rank 0 holds the job and writes
        done = read_metrics(job_dir)  # a job finished already (requeued after its end): rank 0 trains nothing
        return done if done.get("status") in FINISHED else attempt(resume_point(job_dir), None)
    with claim(job_dir) as claimed:
        if not claimed:
            log.info("Skipped %s: %s", job_dir, held_elsewhere(job_dir))
            return {"status": "running"}
        done = claimed_metrics(job_dir)  # a damaged one: the job starts over
        if done.get("status") in FINISHED:
            log.info("Done already: %s", job_dir)
            return done
        resume_from = prepare_attempt(job_dir)
        if resume_from:
            log.info("Resuming from %s", resume_from)
        threads = threads_per_job(parallel_jobs)
        if threads:  # jobs side by side share the cores instead of each taking all of them
            torch.set_num_threads(threads)
            log.info("CPU threads for this job: %d", threads)
        with gpu_slot(sweep_dir, gpu_count) as gpu, one_job_of_many():
            try:
                return attempt(resume_from, gpu)
            except (KeyboardInterrupt, SystemExit):
                raise
            except ClaimLostError as error:  # the job goes on in the process that took it over
                log.warning("Job %s: %s", job_dir, error)
                return {"status": "running"}
            except Exception as error:  # one job's failure is not the sweep's
                log.error("Job failed: %s", one_line(error))
                metrics = read_metrics(job_dir)
                if metrics.get("status") in (None, "running"):  # failed before training began, or its record did
                    status = "interrupted" if isinstance(error, ENVIRONMENT_ERRORS) else "failed"
                    metrics = {**metrics, "status": status, "error": f"{type(error).__name__}: {one_line(error)}"}
                    with contextlib.suppress(OSError):  # a full disk: the job stays unfinished and resumes next time
                        write_metrics(job_dir, metrics)
                return metrics
