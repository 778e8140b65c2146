"""Data-parallel training (trainer=ddp, gloo on the CPU) under the real command line: single runs, -m sweeps,
submitit's local launcher, and a killed run resumed. Two CPU processes per run, on synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, cli_env, run_cli
from probes import fingerprint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlplab.data.datamodule import ImageDataModule
from mlplab.data.settings import DataSettings

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
# Not so easy that every run scores 1.0: the test accuracy must be able to disagree with a second opinion.
RUN = [*SYNTHETIC_RUN, *DDP, "trainer.max_epochs=2", "optimizer.lr=3e-5", "data.batch_size=32"]


def processes_running_in(run_dir: Path) -> list[int]:
    """Processes whose command line names ``run_dir`` (the other ranks of a run are started with it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir) in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def written_outside(cwd: Path, kept: Path) -> list[Path]:
    """What exists under ``cwd`` that is neither inside ``kept`` nor one of the folders leading to it."""
    return [path for path in cwd.rglob("*") if path != kept and kept not in path.parents and path not in kept.parents]


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def ddp_run(synthetic_data_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cwd, run dir, sample-record prefix) of one 2-process run, with a preset from the user's own config dir
    (which the second rank must find too)."""
    cwd, records = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("records") / "samples"
    own = tmp_path_factory.mktemp("own-configs")
    (own / "experiment").mkdir()
    (own / "experiment" / "rare_checkpoints.yaml").write_text(
        "# @package _global_\ncheckpoint:\n  every_n_steps: 499\n"
    )
    result = run_cli(
        [
            "mlplab-train",
            "--config-dir",
            str(own),
            "experiment=rare_checkpoints",
            *RUN,
            "+callbacks.record._target_=probes.RecordTrainingSamples",
            f"+callbacks.record.path={records}",
        ],
        cwd,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist" not in result.stderr  # Lightning's advice, moot: mlplab gathers the ranks' metrics itself
    return cwd, cwd / "outputs" / "runs", records


@pytest.mark.slow
def test_ddp_run_has_one_directory_written_by_rank_zero(ddp_run):
    cwd, runs, _ = ddp_run
    (run_dir,) = runs.iterdir()  # not one per rank
    assert not written_outside(cwd, run_dir)
    files = files_under(run_dir)
    assert {"metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt", ".hydra/config.yaml"} <= files
    assert [name for name in files if name.endswith(".log")] == ["train.log"]  # the other rank wrote no log file
    assert len([name for name in files if name.endswith(".ckpt")]) == 2
    assert "every_n_steps: 499" in (run_dir / ".hydra" / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    events = EventAccumulator(str(run_dir))
    events.Reload()
    # One point per epoch: one rank logged, with the value over both ranks' samples.
    assert [point.value for point in events.Scalars("val/acc")] == pytest.approx(
        [row["val/acc"] for row in metrics["history"]]
    )
    assert len(events.Scalars("test/acc")) == 1


@pytest.mark.slow
def test_ddp_test_accuracy_is_the_whole_test_set_evaluated_in_one_process(ddp_run, synthetic_data_dir):
    _, runs, _ = ddp_run
    (run_dir,) = runs.iterdir()
    recorded = json.loads((run_dir / "metrics.json").read_text())
    result = run_cli(["mlplab-eval", f"run={run_dir}", "format=json", "accelerator=cpu"], run_dir, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads(result.stdout)
    assert 0.2 < single["test/acc"] < 1.0  # a model that still makes mistakes, so agreement means something
    assert recorded["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    assert recorded["test/loss"] == pytest.approx(single["test/loss"], rel=1e-4)
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("test/confusion_matrix/text_summary")[0].tensor_proto.string_val[0].decode()
    counted = sum(int(cell) for line in table.splitlines()[2:] for cell in line.strip("| ").split(" | ")[1:])
    assert counted == 200  # the confusion matrix has every test image, from both ranks


def test_ddp_ranks_share_each_epoch_every_training_sample_once(ddp_run, synthetic_data_dir):
    _, _, records = ddp_run
    seen = [Path(f"{records}.rank{rank}").read_text().split("\n") for rank in (0, 1)]
    assert abs(len(seen[0]) - len(seen[1])) <= 1  # an even split
    datamodule = ImageDataModule(DataSettings(val_size=100, download=False), synthetic_data_dir)
    datamodule.setup()
    train = datamodule.splits["train"]
    expected = Counter(f"{label}:{fingerprint(image)}" for image, label in zip(train.images, train.labels.tolist()))
    assert Counter(seen[0] + seen[1]) == expected  # the whole training split, nothing twice


@pytest.mark.slow
def test_ddp_sweep_has_one_directory_per_job_and_a_summary(synthetic_data_dir, tmp_path):
    # two jobs in this process; one job in a process of submitit's, which has no command line of its own to re-run
    for launcher, seeds in (([], ["1", "2"]), (["hydra/launcher=submitit_local"], ["1"])):
        cwd = tmp_path / (launcher[0].split("=")[1] if launcher else "basic")
        cwd.mkdir()
        result = run_cli(
            ["mlplab-train", "-m", *RUN, "trainer.max_epochs=1", f"seed={','.join(seeds)}", "sweep=s", *launcher],
            cwd,
            synthetic_data_dir,
        )
        assert result.returncode == 0, (launcher, result.stderr[-3000:])
        sweep_dir = cwd / "outputs" / "sweeps" / "s"
        assert not written_outside(cwd, sweep_dir), launcher
        jobs = sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())
        assert [job.name.split("seed=")[1].split(",")[0] for job in jobs] == seeds, launcher
        for job in jobs:
            assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
            assert [name for name in files_under(job) if name.endswith(".log")] == ["train.log"]
        rows = (sweep_dir / "summary.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + len(seeds), launcher  # a header and a row per job


def start_paced_run(cwd: Path, data_dir: Path, checkpoints: str, stderr: int) -> subprocess.Popen:
    """A 3-epoch data-parallel run, slowed so that a signal lands mid-run, in a session of its own (the ranks too)."""
    args = [*RUN, "trainer.max_epochs=3", checkpoints, "+callbacks.pace._target_=probes.PaceSteps"]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlplab-train"), *args, "+callbacks.pace.seconds=0.1"],
        cwd=cwd,
        env=cli_env(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_killed_ddp_run_resumes_and_completes(synthetic_data_dir, tmp_path):
    process = start_paced_run(tmp_path, synthetic_data_dir, "checkpoint.every_n_steps=4", stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "outputs" / "runs").glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert processes_running_in(run_dir), "rank 1 should be running"
    process.kill()  # rank 0 only, as a crash would; rank 1 must not be left waiting for it
    process.wait()
    deadline = time.time() + 30
    while processes_running_in(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_running_in(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    result = run_cli(["mlplab-train", f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3 and "test/acc" in metrics
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 1


def rank_processes(parent: int) -> list[int]:
    """The pids of the other ranks a run's first process started (python -m mlplab.cli.rank)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"mlplab.cli.rank" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(rank, synthetic_data_dir, tmp_path):
    process = start_paced_run(tmp_path, synthetic_data_dir, "checkpoint.every_n_steps=0", stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "outputs" / "runs").glob("*/checkpoints/best.ckpt")) and time.time() < deadline:
        time.sleep(0.1)
    (rank_one,) = rank_processes(process.pid)
    os.kill(process.pid if rank == 0 else rank_one, signal.SIGTERM)  # one rank: the other learns of it at the next step
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["stopped_by"] == "SIGTERM"
    assert 8 < metrics["step"] < 24  # in the second or third epoch (8 steps each), not at its end
    result = run_cli(["mlplab-train", f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_failing_ddp_job_does_not_end_the_sweep(synthetic_data_dir, tmp_path):
    result = run_cli(
        ["mlplab-train", "-m", *RUN, "optimizer.lr=1e30,1e-3", "sweep=mixed"], tmp_path, synthetic_data_dir
    )
    assert result.returncode == 1 and "1 of 2 jobs did not complete" in result.stderr, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "mixed"
    status = {
        job.name.split("optimizer.lr=")[1].split(",")[0]: json.loads((job / "metrics.json").read_text())["status"]
        for job in sweep_dir.iterdir()
        if (job / ".hydra").is_dir()
    }
    assert status == {"1e+30": "diverged", "0.001": "completed"}
