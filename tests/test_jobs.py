"""Claims on run folders (sweep jobs here) across hosts: a lease renewed by a heartbeat, so a dead host's job is
taken over and a waiting process does not wait for ever (a sweep shared over a network file system)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import hold_as_a_dead_host_would

import mlplab.run.ownership as ownership
import mlplab.sweeps.jobs as jobs
from mlplab.run.records import write_metrics


def stale_claim_of_another_host(job: Path, age_seconds: float) -> Path:
    job.mkdir(parents=True, exist_ok=True)
    write_metrics(job, {"status": "running"})
    lock = job / ownership.LOCK_FILE
    lock.write_text("another-host 4242\n")
    then = time.time() - age_seconds
    os.utime(lock, (then, then))
    return lock


def test_another_hosts_claim_counts_while_renewed_and_expires_after_its_lease(tmp_path):
    job = tmp_path / "job"
    stale_claim_of_another_host(job, age_seconds=ownership.LEASE_SECONDS / 2)
    assert jobs.job_state(job) == "running" and ownership.running_on(job) == "another-host 4242"
    stale_claim_of_another_host(job, age_seconds=ownership.LEASE_SECONDS + 1)
    assert jobs.job_state(job) == "interrupted" and ownership.running_on(job) is None
    from mlplab.sweeps.grid import wait_for_other_processes

    started = time.monotonic()
    wait_for_other_processes([job], poll_seconds=0.1)  # the summary is written, not waited for for ever
    assert time.monotonic() - started < 5


def test_a_held_claim_is_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 0.05)
    with ownership.claim(tmp_path / "job") as claimed:
        assert claimed
        lock = tmp_path / "job" / ownership.LOCK_FILE
        os.utime(lock, (0, 0))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5  # renewed since
    assert lock.read_text() == ""  # released


@pytest.fixture
def dead_hosts_lock(tmp_path):
    """A lock file whose flock is still held (as a network file system may keep a dead host's) but not renewed."""
    job = tmp_path / "job"
    lock = stale_claim_of_another_host(job, age_seconds=ownership.LEASE_SECONDS + 30)
    holder = hold_as_a_dead_host_would(lock, age_seconds=ownership.LEASE_SECONDS + 30)
    yield job
    holder.kill()
    holder.wait()


def test_an_expired_claim_is_taken_over_and_a_live_one_is_not(dead_hosts_lock):
    job = dead_hosts_lock
    with ownership.claim(job) as claimed:
        assert claimed  # the lease ran out: taken over
        assert (job / ownership.LOCK_FILE).read_text().split()[1] == str(os.getpid())
        with ownership.claim(job) as again:
            assert not again  # now held and renewed: nobody else gets it
    assert not list(job.glob(f"{ownership.LOCK_FILE}.expired.*"))
