"""One sweep job in its stable directory: claimed by one process at a time, skipped when done, resumed when cut
short."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mlplab.errors import one_line
from mlplab.run.distributed import launched_rank, one_job_of_many
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, read_metrics, write_metrics
from mlplab.run.train import ENVIRONMENT_ERRORS

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RETRIED = ("failed", "diverged")
FINISHED = ("completed", "pruned")  # a job in either state is never trained again


# A holder renews its claim every HEARTBEAT_SECONDS (the lock file's time); a claim not renewed for LEASE_SECONDS
# is a dead holder's. That matters across hosts: there is no process to ask, and a network file system may keep a
# dead host's lock for long (NFSv3's lock manager until the host returns).
HEARTBEAT_SECONDS = 15.0
LEASE_SECONDS = 120.0


@contextmanager
def claim(job_dir: Path, lock_name: str = LOCK_FILE) -> Iterator[bool]:
    """Hold the job for this process while the block runs; yields False when another process holds it.

    An flock rather than a marker file: the kernel drops it when its owner dies, SIGKILL included, so a crashed
    sweep never leaves a job locked. The file names the holder for ``running_on`` and is renewed while held; one
    whose lease ran out is taken over.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / lock_name
    fd = _locked(path, os.O_RDWR | os.O_CREAT)
    if fd is None and _expired(path):
        fd = _take_over(path)
    if fd is None:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        with renewed(lambda: os.utime(fd)):
            try:
                yield True
            finally:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _locked(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` holding its flock, or None if another process holds it."""
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _expired(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > LEASE_SECONDS
    except FileNotFoundError:
        return False


def _take_over(path: Path) -> int | None:
    """A fresh lock file in place of one whose holder stopped renewing it; None if another process was quicker."""
    expired = path.with_name(f"{path.name}.expired.{socket.gethostname()}.{os.getpid()}")
    try:
        path.rename(expired)
        fd = _locked(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    except (FileNotFoundError, FileExistsError):
        return None
    log.warning(
        "Took over %s: its holder (%s) stopped renewing it %.0f s ago",
        path.parent,
        expired.read_text().strip() or "unknown",
        time.time() - expired.stat().st_mtime,
    )
    expired.unlink(missing_ok=True)
    return fd


@contextmanager
def renewed(renew: Callable[[], None]) -> Iterator[None]:
    """Call ``renew`` every HEARTBEAT_SECONDS while the block runs: a claim's heartbeat. A renewal that fails (a
    file system or database blip) is left to the next one, well within the lease."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                renew()

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def running_on(job_dir: Path) -> str | None:
    """ "host pid" of the process working on the job now, if one is (for reports: reading never takes the lock)."""
    path = job_dir / LOCK_FILE
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return None if _expired(path) else f"{host} {pid}"  # no process to ask: the lease says
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None  # died without releasing: SIGKILL, power loss
    except PermissionError:
        pass  # alive, someone else's
    return f"{host} {pid}"


def job_state(job_dir: Path) -> str:
    """completed | pruned | failed | diverged | running | interrupted | pending."""
    status = read_metrics(job_dir).get("status")
    if status in (*FINISHED, *RETRIED):
        return status
    if running_on(job_dir):
        return "running"
    if status or (job_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        return "interrupted"
    return "pending"


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
    """The checkpoint an unfinished job continues from: its last one, unless it failed or diverged (it starts over)."""
    last = job_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    return last if last.is_file() and read_metrics(job_dir).get("status") not in RETRIED else None


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
    if launched_rank() > 0:  # one of the job's SLURM tasks, not its first: rank 0 holds the job and writes
        done = read_metrics(job_dir)  # a job finished already (requeued after its end): rank 0 trains nothing
        return done if done.get("status") in FINISHED else attempt(resume_point(job_dir), None)
    with claim(job_dir) as claimed:
        if not claimed:
            log.info("Skipped: another process is running this job (%s)", job_dir)
            return {"status": "running"}
        done = read_metrics(job_dir)
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
            except Exception as error:  # one job's failure is not the sweep's
                log.error("Job failed: %s", one_line(error))
                metrics = read_metrics(job_dir)
                if metrics.get("status") in (None, "running"):  # failed before training began, or its record did
                    status = "interrupted" if isinstance(error, ENVIRONMENT_ERRORS) else "failed"
                    metrics = {**metrics, "status": status, "error": f"{type(error).__name__}: {one_line(error)}"}
                    with contextlib.suppress(OSError):  # a full disk: the job stays unfinished and resumes next time
                        write_metrics(job_dir, metrics)
                return metrics
