"""One owner per run folder: a run in training is refused to a second process, a dead owner's folder is taken over
once its lease runs out, and a process whose claim was taken over stops instead of training beside the new owner."""

from __future__ import annotations

import csv
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, cli_env, composed, hold_as_a_dead_host_would, run_cli, start_train
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from mlplab.run import ownership
from mlplab.run.config import parse_run_config
from mlplab.run.ownership import ClaimLostError, claim, held_claim, renewed
from mlplab.run.trackers import ResumableCSVLogger
from mlplab.run.train import train

BIN = Path(sys.executable).parent
# 3 epochs of 50 steps, paced to ~5 s an epoch, logged to metrics.csv: long enough to meet a second process.
RUN = [
    *SYNTHETIC_RUN,
    "data.batch_size=10",
    "trainer.max_epochs=3",
    "model.width=16",
    "logger=csv",
    "checkpoint.every_n_steps=20",
]
PACE = "+callbacks.pace={_target_:probes.PaceSteps,seconds:0.1,until_resumed:true}"


def start(args: list[str], cwd: Path, data_dir: Path) -> subprocess.Popen:
    return start_train(args, cwd, data_dir, merged=True)


def training(pattern: str, cwd: Path, process: subprocess.Popen) -> Path:
    """The folder (matching ``pattern`` under ``cwd``) of a run that has begun its steps: its first checkpoint."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        found = list(cwd.glob(f"{pattern}/checkpoints/last.ckpt"))
        if found:
            return found[0].parent.parent
        time.sleep(0.05)
    raise AssertionError(f"never started training: {process.communicate()[0][-3000:]}")


def validation_epochs(run_dir: Path) -> list[int]:
    """The epoch column of metrics.csv's validation rows, in file order."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    with (run_dir / "metrics.csv").open(newline="") as file:
        return [int(row["epoch"]) for row in csv.DictReader(file) if row.get("val/acc")]


@pytest.mark.slow
def test_a_run_in_training_is_refused_to_a_resume_and_its_sweep_job_to_a_second_sweep(synthetic_data_dir, tmp_path):
    go = tmp_path / "go"  # both trainings wait at step 25 until the test has made its checks
    hold = f"+callbacks.hold={{_target_:probes.HoldAtStep,step:25,until:'{go}'}}"
    run = start([*RUN, hold], tmp_path, synthetic_data_dir)
    sweep_args = ["-m", "sweep=twice", *RUN, "seed=7", hold]
    sweep = start(sweep_args, tmp_path, synthetic_data_dir)
    run_dir = training("outputs/runs/*", tmp_path, run)
    job_dir = training("outputs/sweeps/twice/*", tmp_path, sweep)

    resumed = run_cli(["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=3"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 2
    assert resumed.stderr.startswith(
        f"mlplab-train: error: {run_dir} is being trained by process {run.pid} on {socket.gethostname()}; wait for "
        f"it to end, or stop it (kill {run.pid}) and run this command again"
    )
    assert resumed.stderr.count("\n") == 1 and "Traceback" not in resumed.stderr

    with (tmp_path / "second.log").open("w") as log:  # the second sweep waits for the first one's job to end
        second = subprocess.Popen(
            [str(BIN / "mlplab-train"), *sweep_args],
            cwd=tmp_path,
            env=cli_env(synthetic_data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        skipped = f"Skipped {job_dir}: process {sweep.pid} on {socket.gethostname()} is running it"
        deadline = time.monotonic() + 120
        while skipped not in (tmp_path / "second.log").read_text() and second.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-3000:]
            time.sleep(0.1)
        go.touch()
        assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert skipped in (tmp_path / "second.log").read_text()

    assert run.wait(timeout=120) == 0, run.stdout.read()[-3000:]
    assert sweep.wait(timeout=120) == 0, sweep.stdout.read()[-3000:]
    for folder in (run_dir, job_dir):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 3 and 0 <= metrics["test/acc"] <= 1
        assert validation_epochs(folder) == [1, 2, 3]
        assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
        assert "earlier_attempts" not in json.loads((folder / "provenance.json").read_text())  # trained once
    assert (run_dir / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_a_killed_owners_run_is_refused_within_its_lease_and_taken_over_and_resumed_after_it(
    synthetic_data_dir, tmp_path
):
    run = start([*RUN, PACE], tmp_path, synthetic_data_dir)
    run_dir = training("outputs/runs/*", tmp_path, run)
    deadline = time.monotonic() + 120
    while validation_epochs(run_dir) != [1]:  # killed in the second epoch: the CSV holds the first's rows
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert (run_dir / ".lock").read_text() == f"{socket.gethostname()} {run.pid}\n"  # never released

    resume = ["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=3"]
    holder = hold_as_a_dead_host_would(run_dir / ".lock", age_seconds=ownership.LEASE_SECONDS - 60)
    try:
        refused = run_cli(resume, tmp_path, synthetic_data_dir)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"mlplab-train: error: {run_dir} is being trained by process 4242 on ")
        assert "(stop it on another-host)" in refused.stderr and refused.stderr.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    holder = hold_as_a_dead_host_would(run_dir / ".lock", age_seconds=ownership.LEASE_SECONDS + 30)
    try:
        resumed = run_cli(resume, tmp_path, synthetic_data_dir)
    finally:
        holder.kill()
        holder.wait()
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"Took over {run_dir}: its holder (another-host 4242) stopped renewing its claim" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert validation_epochs(run_dir) == [1, 2, 3]  # the killed part's rows kept, none doubled
    with (run_dir / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows if row.get("train/loss")] == [1, 2, 3]
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps)  # rows the killed part logged after its last checkpoint were left out


@pytest.mark.slow
def test_a_resumed_csv_run_keeps_every_epochs_row_counted_from_1(synthetic_data_dir, tmp_path):
    args = [*SYNTHETIC_RUN, "model.width=8", "logger=csv"]
    first = run_cli(["mlplab-train", *args, "trainer.max_epochs=2"], tmp_path, synthetic_data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    resumed = run_cli(["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=4"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert validation_epochs(run_dir) == [1, 2, 3, 4]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    with (run_dir / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/acc")]
    assert [float(row["val/acc"]) for row in rows] == [pytest.approx(epoch["val/acc"]) for epoch in history]
    with (run_dir / "metrics.csv").open(newline="") as file:
        tested = [row["epoch"] for row in csv.DictReader(file) if row.get("test/acc")]
    assert tested == ["2", "4"]  # each test after training, at the last epoch trained: the first part's kept


class TakenOverAtStep(Callback):
    """Another host takes the run's folder over at ``step`` (as after this process failed to renew its claim for a
    lease); this process's heartbeat then finds it out."""

    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step = run_dir, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            lock = self.run_dir / ownership.LOCK_FILE
            lock.rename(lock.with_name("taken"))
            lock.write_text("another-host 4242\n")
            held_claim(self.run_dir).renew()


def test_a_process_whose_claim_was_taken_over_stops_at_its_next_step_and_writes_nothing_more(
    synthetic_data_dir, tmp_path, caplog
):
    run_dir = tmp_path / "run"
    cfg = composed([*SYNTHETIC_RUN, f"paths.data_dir={synthetic_data_dir}", "model.width=8", "trainer.max_epochs=2"])
    config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
    with caplog.at_level(logging.WARNING, logger="mlplab.run.ownership"), claim(run_dir):
        with pytest.raises(ClaimLostError) as stopped:
            train(config, run_dir, callbacks=[TakenOverAtStep(run_dir, step=3)])
    assert str(stopped.value).startswith(f"stopped at step 3: another-host 4242 took {run_dir} over after this ")
    assert f"Lost the claim on {run_dir}: another-host 4242 took it over" in caplog.text
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"  # as it began: left alone
    assert (run_dir / ".lock").read_text() == "another-host 4242\n"  # the new owner's, untouched
    assert not (run_dir / "checkpoints").exists()  # 10 steps an epoch: no checkpoint before the takeover


def test_a_heartbeat_that_cannot_renew_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 0.05)

    def failing() -> None:
        raise OSError("Stale file handle")

    with caplog.at_level(logging.WARNING, logger="mlplab.run.ownership"), renewed(failing, "the claim on job"):
        deadline = time.monotonic() + 30
        while "Could not renew" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "Could not renew the claim on job (Stale file handle); another process may take it over if this lasts " in (
        caplog.text
    )


def test_a_run_of_an_earlier_version_resumed_keeps_its_csv_rows_counted_from_1(tmp_path):
    # metrics.csv as mlplab wrote it before: Lightning's 0-based epochs; then a checkpoint at step 19 (epoch 2's end)
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc\n0,9,,0.5\n0,9,1.2,\n1,19,,0.6\n1,19,0.9,\n2,24,0.8,\n"
    )
    logger = ResumableCSVLogger(tmp_path, name="", version="", purge_step=20)
    logger.log_metrics({"val/acc": 0.7, "epoch": 2}, step=29)
    logger.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss,val/acc",
        "1,9,,0.5",
        "1,9,1.2,",
        "2,19,,0.6",
        "2,19,0.9,",
        "3,29,,0.7",
    ]
