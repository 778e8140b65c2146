"""One owner per run folder: a single run, a ``resume=`` and a sweep job all claim their folder here, and a second
process is refused (or, in a sweep, skips the job) while the first trains in it.

A claim is an flock on ``<folder>/.lock`` rather than a marker file: the kernel drops it when its owner dies, SIGKILL
included, so a crashed run never leaves its folder locked on this host. The file names the holder and is renewed
while held (a heartbeat); a claim not renewed for LEASE_SECONDS is a dead holder's and is taken over. That matters
across hosts: there is no process to ask, and a network file system may keep a dead host's lock for long (NFSv3's
lock manager until the host returns). A holder on this host is never taken over: its flock is held only while it
lives. A holder whose claim was taken over learns it at its next heartbeat and stops at its next step (``lost``),
rather than train beside the new owner.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlplab.errors import MlplabError, one_line

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 15.0
LEASE_SECONDS = 120.0


class Claim:
    """A claim this process holds on a folder. ``lost`` is set once another process has taken it over."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self.lost = threading.Event()

    def renew(self) -> None:
        """The heartbeat: refresh the lease, unless the lock file is no longer this claim's (taken over)."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or current.st_ino != os.fstat(self.fd).st_ino:
            if not self.lost.is_set():
                self.lost.set()
                log.warning(
                    "Lost the claim on %s: %s took it over (this process had not renewed it for %.0f s); this process "
                    "stops at its next step",
                    self.path.parent,
                    holder(self.path) or "another process",
                    LEASE_SECONDS,
                )
            return
        os.utime(self.fd)


# The claims this process holds, by folder: a run's ResumePoints asks whether its own was lost.
_held: dict[Path, Claim] = {}


def held_claim(folder: Path) -> Claim | None:
    return _held.get(folder.resolve())


@contextmanager
def claim(folder: Path, lock_name: str = LOCK_FILE) -> Iterator[Claim | None]:
    """Hold ``folder`` for this process while the block runs; yields None when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    fd = _locked(path, os.O_RDWR | os.O_CREAT)
    if fd is None and _expired(path) and not _on_this_host(path):  # here, a held flock means a live holder
        fd = _take_over(path)
    if fd is None:
        yield None
        return
    held = Claim(path, fd)
    key = folder.resolve()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        _held[key] = held
        with renewed(held.renew, f"the claim on {folder}"):
            try:
                yield held
            finally:
                if not held.lost.is_set():  # a lost claim's file is the new owner's now
                    os.ftruncate(fd, 0)
    finally:
        _held.pop(key, None)
        os.close(fd)


class RunOwnedError(MlplabError):
    """Another process trains in the run folder."""


class ClaimLostError(MlplabError):
    """Another process took this one's claim over (it had not renewed it within the lease): this one stopped."""

    exit_status = 1

    def __init__(self, folder: Path, step: int):
        super().__init__(
            f"stopped at step {step}: {holder(folder / LOCK_FILE) or 'another process'} took {folder} over after "
            f"this process could not renew its claim for {LEASE_SECONDS:.0f} s; it continues the run from its last "
            "checkpoint"
        )


@contextmanager
def owned(run_dir: Path) -> Iterator[Claim]:
    """Claim a run's folder for this process, or refuse in one line naming the process that holds it."""
    with claim(run_dir) as held:
        if held is None:
            raise refusal(run_dir)
        yield held


def refusal(run_dir: Path) -> RunOwnedError:
    """Why a second process may not train in ``run_dir``: who holds it, and how to wait or take over."""
    host, _, pid = (holder(run_dir / LOCK_FILE) or "? ?").partition(" ")
    stop = f"kill {pid}" if host == socket.gethostname() else f"stop it on {host}"
    return RunOwnedError(
        f"{run_dir} is being trained by process {pid} on {host}; wait for it to end, or stop it ({stop}) and run "
        "this command again to continue from its last checkpoint (a holder on another host that stops renewing its "
        f"claim is taken over after {LEASE_SECONDS:.0f} s)"
    )


def _locked(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` holding its flock, or None if another process holds it."""
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _on_this_host(path: Path) -> bool:
    """Whether the lock file names a holder on this host: one this host's kernel would have let go of if it died
    (a process stopped with Ctrl-Z or SIGSTOP renews nothing, and is still the owner)."""
    return (holder(path) or "").partition(" ")[0] == socket.gethostname()


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
        "Took over %s: its holder (%s) stopped renewing its claim %.0f s ago",
        path.parent,
        expired.read_text().strip() or "unknown",
        time.time() - expired.stat().st_mtime,
    )
    expired.unlink(missing_ok=True)
    return fd


@contextmanager
def renewed(renew: Callable[[], None], what: str) -> Iterator[None]:
    """Call ``renew`` every HEARTBEAT_SECONDS while the block runs: a claim's heartbeat. A renewal that fails (a
    file system or database blip) is logged and left to the next one; the lease outlasts several."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                renew()
            except Exception as error:
                log.warning(
                    "Could not renew %s (%s); another process may take it over if this lasts %.0f s",
                    what,
                    one_line(error),
                    LEASE_SECONDS,
                )

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def holder(path: Path) -> str | None:
    """ "host pid" written in a lock file, if any."""
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return None
    return f"{host} {pid}"


def running_on(folder: Path) -> str | None:
    """ "host pid" of the process working in the folder now, if one is (for reports: reading never takes the lock)."""
    path = folder / LOCK_FILE
    owner = holder(path)
    if owner is None:
        return None
    host, pid = owner.split()
    if host != socket.gethostname():
        return None if _expired(path) else owner  # no process to ask: the lease says
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None  # died without releasing: SIGKILL, power loss
    except PermissionError:
        pass  # alive, someone else's
    return owner
