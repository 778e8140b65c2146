"""Writes that fail because the disk is full, on a real small file system: a 6 MB tmpfs (root), else a file size
limit (RLIMIT_FSIZE, as ``ulimit -f``) that makes the kernel refuse larger writes the same way."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC_RUN, cli_env

from mlplab.run.checkpoints import AtomicCheckpointIO

LIMIT_BYTES = 6 * 2**20  # a default network's checkpoint (weights and Adam's state) is about 8 MB


@contextlib.contextmanager
def small_place(tmp_path: Path) -> Iterator[tuple[Path, object]]:
    """(a folder where writes beyond ~6 MB fail, a preexec_fn for the process writing there)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={LIMIT_BYTES}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield folder, None if mounted else _limit_file_size
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def test_a_disk_full_at_the_first_checkpoint_is_one_line(synthetic_data_dir, tmp_path):
    with small_place(tmp_path) as (folder, preexec):
        run_dir = folder / "run"
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "mlplab-train"),
                *SYNTHETIC_RUN,
                "trainer.max_epochs=3",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=tmp_path,
            env=cli_env(synthetic_data_dir),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=preexec,
        )
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("mlplab-train")]
        assert "could not write the run's files" in line and f"mlplab-train resume={run_dir}" in line
        assert not list(run_dir.rglob("*.partial"))  # no half-written checkpoint left behind


@pytest.mark.slow
def test_a_sweep_job_the_environment_stopped_resumes_instead_of_starting_over(synthetic_data_dir, tmp_path):
    marker = tmp_path / "failed-once"
    args = [
        str(Path(sys.executable).parent / "mlplab-train"),
        "-m",
        *SYNTHETIC_RUN,
        "trainer.max_epochs=3",
        "seed=1",
        "sweep=s",
        "+callbacks.disk._target_=probes.FailOnceWithOSError",
        f"+callbacks.disk.marker={marker}",
        "+callbacks.disk.epoch=1",
    ]
    first = subprocess.run(
        args, cwd=tmp_path, env=cli_env(synthetic_data_dir), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 1 and marker.exists(), first.stderr[-3000:]
    (job,) = [p.parent for p in (tmp_path / "outputs" / "sweeps" / "s").glob("*/metrics.json")]
    stopped = json.loads((job / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and "No space left on device" in stopped["error"]
    assert stopped["epochs"] == 1  # its first epoch was done and checkpointed
    second = subprocess.run(
        args, cwd=tmp_path, env=cli_env(synthetic_data_dir), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {job / 'checkpoints' / 'last.ckpt'}" in second.stdout + second.stderr
    done = json.loads((job / "metrics.json").read_text())
    assert done["status"] == "completed" and [row["epoch"] for row in done["history"]] == [1, 2, 3]


WRITE_TWO_CHECKPOINTS = """
import sys, torch
from pathlib import Path
from mlplab.run.checkpoints import AtomicCheckpointIO
path, io = Path(sys.argv[1]), AtomicCheckpointIO()
io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
try:
    io.save_checkpoint({"state_dict": {"w": torch.zeros(4 * 2**20)}, "global_step": 2}, path)  # 16 MB: no room
except OSError as error:
    print("refused:", error)
"""


@pytest.mark.slow
def test_a_checkpoint_write_the_disk_cannot_hold_leaves_the_previous_one_loadable(tmp_path):
    with small_place(tmp_path) as (folder, preexec):
        path = folder / "checkpoints" / "last.ckpt"
        result = subprocess.run(
            [sys.executable, "-c", WRITE_TWO_CHECKPOINTS, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=preexec,
        )
        assert result.returncode == 0 and "refused:" in result.stdout, result.stderr[-2000:]
        previous = torch.load(path, weights_only=True)
        assert previous["global_step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.ones(3))
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind

        (path.parent / ".last.ckpt.999999.partial").write_bytes(b"half of a checkpoint from a killed process")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 3}, path)
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the killed writer's leftover is cleared
