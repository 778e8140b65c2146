"""Sweeps as a user runs them (mlplab-train -m, mlplab-report, TensorBoard), in subprocesses on synthetic data."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, composed, run_cli, tensorboard_server
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from mlplab.run.config import parse_run_config
from mlplab.run.views.hparams import run_hparams
from mlplab.sweeps.jobs import gpu_slot, threads_per_job

BIN = Path(sys.executable).parent
# metrics.json key -> the HParams column (a scalar tag of its own) a user compares runs by; as the README lists them.
FINAL_METRICS = {
    "val/acc": "final/best_val_acc",
    "val/loss": "final/best_val_loss",
    "test/acc": "final/test_acc",
    "test/loss": "final/test_loss",
    "epochs": "final/epochs",
    "wall_seconds": "final/wall_seconds",
    "num_parameters": "final/num_parameters",
}
GRID = ["model.depth=1,2", "model.width=16,32", "trainer.max_epochs=2"]
SLOW_JOBS = ["data.batch_size=4", "trainer.max_epochs=3"]  # a few seconds per job: time to kill or contend


def sweep(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    return run_cli(["mlplab-train", "-m", *SYNTHETIC_RUN, *args], cwd, data_dir)


def start_sweep(args: list[str], cwd: Path, data_dir: Path, threads: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLPLAB_DATA_DIR": str(data_dir), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen(
        [str(BIN / "mlplab-train"), "-m", *SYNTHETIC_RUN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def summary_rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as file:
        return {row["job"]: row for row in csv.DictReader(file)}


def file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in directory.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def grid(synthetic_data_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("grid")
    result = sweep([*GRID, "sweep=grid"], cwd, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "outputs" / "sweeps" / "grid"


@pytest.mark.slow
def test_grid_sweep_gives_one_folder_per_job_and_a_summary_of_them(grid):
    jobs = job_dirs(grid)
    shapes = set()
    for job in jobs:
        config = (job / ".hydra" / "config.yaml").read_text()
        depth, width = int(config.split("depth: ")[1].split()[0]), int(config.split("width: ")[1].split()[0])
        assert f"model.depth={depth}" in job.name and f"model.width={width}" in job.name  # from the job's own overrides
        shapes.add((depth, width))
    assert shapes == {(1, 16), (1, 32), (2, 16), (2, 32)}

    rows = summary_rows(grid)
    assert sorted(rows) == [job.name for job in jobs]
    for job in jobs:
        recorded, row = metrics(job), rows[job.name]
        assert row["status"] == recorded["status"] == "completed"
        for key in ("val/acc", "val/loss", "test/acc", "test/loss", "epochs", "wall_seconds", "num_parameters"):
            assert float(row[key]) == pytest.approx(recorded[key]), key

    for picture in ("summary.png", "pareto.png"):
        assert (grid / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    ranking = (grid / "summary.md").read_text().split("\n## ")[0]  # the sections after it have tables of their own
    table = [line for line in ranking.splitlines() if line.startswith("| ")][2:]
    assert len(table) == 4 and "(best)" in table[0]
    ranked_val_acc = [float(line.split("|")[4]) for line in table]  # rank | depth | width | val/acc
    assert ranked_val_acc == sorted(ranked_val_acc, reverse=True)  # ranked by validation accuracy
    assert ranked_val_acc[0] == pytest.approx(max(metrics(job)["val/acc"] for job in jobs), abs=1e-4)


def test_report_regenerates_the_summary_and_prints_it(grid, tmp_path):
    for name in ("summary.csv", "summary.md", "summary.png", "pareto.png"):
        (grid / name).rename(tmp_path / name)
    result = run_cli(["mlplab-report", str(grid)], grid.parents[2])  # where the sweep ran: its commands the same
    assert result.returncode == 0, result.stderr
    assert (grid / "summary.md").read_text() == (tmp_path / "summary.md").read_text()
    assert summary_rows(grid).keys() == {job.name for job in job_dirs(grid)}
    assert (grid / "summary.png").is_file()
    ranking = result.stdout.split("\n## ")[0]
    assert sum(line.startswith("| ") for line in ranking.splitlines()) == 2 + 4  # header, rule, four jobs
    assert "\n## Pareto front\n" in result.stdout and (grid / "pareto.png").is_file()

    wrong = run_cli(["mlplab-report", str(tmp_path)], tmp_path)
    assert wrong.returncode == 2 and "not a sweep folder" in wrong.stderr and "Traceback" not in wrong.stderr


def hparams_session(job: Path) -> dict:
    events = EventAccumulator(str(job))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {}
    for key, value in start.hparams.items():
        values[key] = value.string_value if value.WhichOneof("kind") == "string_value" else value.number_value
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return {"hparams": values, "scalars": scalars}


def hparams_columns(job: Path) -> list[tuple[str, bool]]:
    """The HParams columns the job's experiment summary lists, in its order, each with its ``differs`` mark (which
    TensorBoard's HParams tab shows and ticks first)."""
    events = EventAccumulator(str(job))
    events.Reload()
    experiment = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    return [(info.name, info.differs) for info in experiment.hparam_infos]


def test_hparams_in_each_jobs_own_event_files(grid):
    for job in job_dirs(grid):
        assert [p.parent for p in job.rglob("events.out.tfevents.*")] == [job] * len(list(job.glob("events.*")))
        session = hparams_session(job)
        for key in (
            "data.name",
            "model.depth",
            "model.width",
            "model.activation",
            "model.dropout",
            "optimizer._target_",
            "optimizer.lr",
            "optimizer.weight_decay",
            "data.batch_size",
            "trainer.max_epochs",
            "seed",
        ):
            assert key in session["hparams"], key
        config = (job / ".hydra" / "config.yaml").read_text()
        assert str(session["hparams"]["model.width"]) in config and session["hparams"]["status"] == "completed"
        recorded = metrics(job)
        for key, tag in FINAL_METRICS.items():
            assert session["scalars"][tag] == pytest.approx(recorded[key]), tag
        assert "hp_metric" not in session["scalars"]


def test_hparams_have_one_column_per_setting_named_as_on_the_command_line(synthetic_data_dir, tmp_path):
    result = run_cli(
        [
            "mlplab-train",
            *SYNTHETIC_RUN,
            "optimizer=adamw",
            "scheduler=cosine",
            "model.width=[32,16]",
            "model.depth=2",
            "trainer.limit_train_batches=2",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    hparams = hparams_session(run_dir)["hparams"]
    # a group's choice is shown by its settings' columns, not as a column of its own beside them
    assert "optimizer" not in hparams and "scheduler" not in hparams
    assert hparams["optimizer._target_"] == "torch.optim.AdamW"
    assert hparams["scheduler._target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert hparams["model.width"] == "[32, 16]"  # a list, as written
    columns = hparams_columns(run_dir)  # a single run: what it set on the command line first, nothing marked swept
    assert [name for name, _ in columns][:6] == [
        "trainer.max_epochs",
        "data.val_size",
        "data.batch_size",
        "model.width",
        "model.depth",
        "trainer.limit_train_batches",
    ]
    assert not [name for name, differs in columns if differs]


def test_hparams_put_the_swept_keys_first_then_the_command_lines():
    config = parse_run_config(
        OmegaConf.to_container(composed(["optimizer=sgd", "model.depth=2", "seed=3"]), resolve=True)
    )
    hparams = run_hparams(config, {"model.depth": "2", "seed": "3"}, swept=["seed", "optimizer"])
    # a swept config group stands for the column naming its choice
    assert list(hparams)[:3] == ["seed", "optimizer._target_", "model.depth"]
    assert hparams.swept == ("seed", "optimizer._target_")
    assert hparams["optimizer._target_"] == "torch.optim.SGD" and hparams["seed"] == 3


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_server_shows_one_hparams_row_per_job(grid, tmp_path):
    query = {
        "experimentName": "",
        "startIndex": 0,
        "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": "final/best_val_acc"}}, {"hparam": "model.depth"}, {"hparam": "model.width"}],
    }
    with tensorboard_server(grid) as base:
        deadline, groups = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            try:
                groups = post(f"{base}/hparams/session_groups", query)["sessionGroups"]
                if len(groups) == 4:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        experiment = post(f"{base}/hparams/experiment", {"experimentName": ""})
        with urllib.request.urlopen(f"{base}/scalars/tags", timeout=30) as response:
            runs = json.loads(response.read())
    jobs = {job.name: job for job in job_dirs(grid)}
    assert sorted(group["name"] for group in groups) == sorted(jobs)
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(FINAL_METRICS.values())  # all seven
    columns = {info["name"]: info.get("type") for info in experiment["hparamInfos"]}
    assert {"model.depth", "model.width", "optimizer._target_", "optimizer.lr", "seed", "trainer.max_epochs"} <= set(
        columns
    )
    assert not {"model", "optimizer", "scheduler", "data", "trainer"} & set(columns)  # named as on the command line
    assert columns["model.width"] == "DATA_TYPE_STRING"  # a width may be a list: one text column, as written
    # The swept keys are the columns the HParams tab shows first and ticks (it ticks the first 5, differing first).
    names = [info["name"] for info in experiment["hparamInfos"]]
    assert names[:2] == ["model.depth", "model.width"]
    assert [info["name"] for info in experiment["hparamInfos"] if info.get("differs")] == names[:2]
    for group in groups:
        value = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}["final/best_val_acc"]
        assert value == pytest.approx(metrics(jobs[group["name"]])["val/acc"])
        assert f"model.width={group['hparams']['model.width']}" in group["name"]
    assert set(runs) == set(jobs) and all("val/acc" in tags for tags in runs.values())  # curves under job names


@pytest.mark.slow
def test_parallel_launcher_gives_the_same_results_as_one_process(grid, synthetic_data_dir, tmp_path):
    two_cores = sorted(os.sched_getaffinity(0))[:2]  # the sweep sees 2 cores on any machine: 1 thread per job of 2
    result = subprocess.run(
        [
            str(BIN / "mlplab-train"),
            "-m",
            *SYNTHETIC_RUN,
            *GRID,
            "sweep=grid",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
        ],
        cwd=tmp_path,
        env={**os.environ, "MLPLAB_DATA_DIR": str(synthetic_data_dir)},
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.sched_setaffinity(0, two_cores),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = tmp_path / "outputs" / "sweeps" / "grid"
    logs = [p.read_text() for p in parallel.glob("*/train.log")]
    assert len(logs) == 4 and all("CPU threads for this job: 1" in log for log in logs)
    sequential_rows, parallel_rows = summary_rows(grid), summary_rows(parallel)
    assert sequential_rows.keys() == parallel_rows.keys()
    for job, row in parallel_rows.items():
        assert row["status"] == "completed"
        for key in ("val/acc", "val/loss", "test/acc", "test/loss", "best_epoch"):
            assert float(row[key]) == pytest.approx(float(sequential_rows[job][key]), rel=1e-4), (job, key)


@pytest.mark.slow
def test_failing_and_diverging_jobs_are_recorded_and_the_sweep_goes_on(synthetic_data_dir, tmp_path):
    # data.val_size=100000 fails when the data is split (more than the 600 training images); lr=1e30 diverges.
    args = ["model.width=16", "optimizer.lr=0.001,1e30", "data.val_size=100,100000", "sweep=mixed"]
    result = sweep(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 1
    assert "3 of 4 jobs did not complete" in result.stderr and "Traceback" not in result.stderr
    sweep_dir = tmp_path / "outputs" / "sweeps" / "mixed"
    jobs = {("lr=0.001" in job.name, "val_size=100," in job.name): job for job in job_dirs(sweep_dir)}
    assert metrics(jobs[True, True])["status"] == "completed"
    diverged = metrics(jobs[False, True])
    assert diverged["status"] == "diverged" and "lower optimizer.lr" in diverged["error"]
    assert not list(jobs[False, True].glob("checkpoints/*.ckpt"))  # no checkpoint of NaN weights
    for lr_ok in (True, False):
        failed = metrics(jobs[lr_ok, False])
        assert failed["status"] == "failed" and "data.val_size must be between 1 and 599" in failed["error"]
    summary = (sweep_dir / "summary.md").read_text()
    assert summary.count(": failed: ") == 2 and summary.count(": diverged: ") == 1

    completed = file_stamps(jobs[True, True])
    again = sweep(args, tmp_path, synthetic_data_dir)  # the same command: failed jobs run again, finished ones do not
    assert again.returncode == 1 and file_stamps(jobs[True, True]) == completed
    assert (jobs[False, True] / "train.log").read_text().count("Job failed: train/loss became nan") == 2


@pytest.mark.slow
def test_killed_sweep_resumes_where_it_stopped(synthetic_data_dir, tmp_path):
    args = [*SLOW_JOBS, "seed=1,2,3", "sweep=killed"]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "killed"
    process = start_sweep(args, tmp_path, synthetic_data_dir)
    deadline = time.monotonic() + 240
    while not list(sweep_dir.glob("*seed=2*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    first, second = job_dirs(sweep_dir)  # the third never started
    assert metrics(first)["status"] == "completed" and metrics(second)["status"] == "running"
    finished_files = file_stamps(first)
    report = run_cli(["mlplab-report", str(sweep_dir)], tmp_path)  # mid-sweep: from jobs.json and the folders
    assert report.returncode == 0, report.stderr[-2000:]
    statuses = {row["job"]: row["status"] for row in summary_rows(sweep_dir).values()}
    assert sorted(statuses.values()) == ["completed", "interrupted", "pending"]  # killed: not "running"
    assert statuses[second.name] == "interrupted"
    listed = json.loads((sweep_dir / "jobs.json").read_text())
    assert len(listed) == 3 and [job["dir"] for job in listed][:2] == [first.name, second.name]
    assert all("seed=" in " ".join(job["overrides"]) for job in listed)

    result = sweep(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert file_stamps(first) == finished_files  # not retrained, not even touched
    assert "Resuming from" in (second / "train.log").read_text()
    resumed = metrics(second)
    assert resumed["status"] == "completed" and resumed["epochs"] == 3
    assert [point["epoch"] for point in resumed["history"]] == [1, 2, 3]
    assert {row["status"] for row in summary_rows(sweep_dir).values()} == {"completed"}
    assert len(summary_rows(sweep_dir)) == 3


@pytest.mark.slow
def test_over_seeds_table_averages_each_configuration(synthetic_data_dir, tmp_path):
    result = sweep(
        ["model.width=16,32", "seed=1,2", "optimizer.lr=0.0003", "sweep=seeds"], tmp_path, synthetic_data_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "seeds"
    text = (sweep_dir / "summary.md").read_text()
    seeds_section = text.split("## Over seeds")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in seeds_section.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 2  # one per width, over its two seeds
    for width, count, val_mean, _, test_mean, _, _ in ([cell.strip() for cell in row] for row in rows):
        jobs = [job for job in job_dirs(sweep_dir) if f"model.width={width}," in job.name + ","]
        assert count == "2" and len(jobs) == 2
        assert float(val_mean) == pytest.approx(sum(metrics(job)["val/acc"] for job in jobs) / 2, abs=1e-4)
        assert float(test_mean) == pytest.approx(sum(metrics(job)["test/acc"] for job in jobs) / 2, abs=1e-4)
    for job in job_dirs(sweep_dir):  # HParams: the swept keys first (marked differing), then the command line's
        columns = hparams_columns(job)
        assert [name for name, _ in columns][:5] == [
            "model.width",
            "seed",
            "trainer.max_epochs",
            "data.val_size",
            "data.batch_size",
        ]
        assert [name for name, differs in columns if differs] == ["model.width", "seed"]


@pytest.mark.slow
def test_two_processes_on_one_sweep_train_each_job_once(forked_cli, synthetic_data_dir, tmp_path):
    args = ["-m", *SYNTHETIC_RUN, f"paths.data_dir={synthetic_data_dir}", *SLOW_JOBS, "seed=1,2,3,4", "sweep=shared"]
    # Two processes on 2 cores: one thread each (conftest.py), as the README says (2 x 2 spinning threads run 20x
    # slower).
    results = forked_cli.run_together([args, args], tmp_path, {})
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "shared"
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 4
    for job in jobs:
        assert (job / "train.log").read_text().count("Finished: test/acc") == 1, job.name
        assert metrics(job)["status"] == "completed"
    assert {row["status"] for row in summary_rows(sweep_dir).values()} == {"completed"}


def test_bad_point_stops_the_sweep_before_any_training(synthetic_data_dir, tmp_path):
    result = sweep(["model.width=64,-1", "sweep=bad"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    assert "model.width=-1" in result.stderr and "model.width must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_dry_run_lists_jobs_and_what_is_done_without_training(grid, synthetic_data_dir):
    cwd = grid.parent.parent.parent
    args = ["model.depth=1,2", "model.width=16,32,48", "trainer.max_epochs=2", "sweep=grid", "dry_run=true"]
    result = sweep(args, cwd, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith("#")]
    assert len(lines) == 6
    assert sum("done" in line for line in lines) == 4 and sum("to run" in line for line in lines) == 2
    assert len(job_dirs(grid)) == 4  # nothing new trained


def test_parallel_jobs_share_cores_and_take_distinct_gpus(tmp_path, monkeypatch):
    assert threads_per_job(None) is None and threads_per_job(1) is None  # one job at a time: all the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # a machine of 8 cores
    assert [threads_per_job(jobs) for jobs in (2, 3, 4, 8, 16, -1)] == [4, 2, 2, 1, 1, 1]
    with gpu_slot(tmp_path, 2) as first, gpu_slot(tmp_path, 2) as second, gpu_slot(tmp_path, 2) as third:
        assert (first, second, third) == (0, 1, 0)  # a third job shares rather than waits
    with gpu_slot(tmp_path, 2) as again:
        assert again == 0  # released when the job ended
    with gpu_slot(tmp_path, 1) as single:
        assert single is None  # one GPU: Lightning's own choice


def test_more_jobs_than_gpus_are_spread_evenly(tmp_path):
    with contextlib.ExitStack() as jobs:
        gpus = [jobs.enter_context(gpu_slot(tmp_path, 4)) for _ in range(8)]
        assert Counter(gpus) == {0: 2, 1: 2, 2: 2, 3: 2}  # the README's "4 GPUs: two jobs each"
        with contextlib.ExitStack() as more:
            assert [more.enter_context(gpu_slot(tmp_path, 4)) for _ in range(3)] == [0, 1, 2]  # a third each, in turn
    with contextlib.ExitStack() as jobs:  # all released: the next jobs start from the first GPU again
        assert [jobs.enter_context(gpu_slot(tmp_path, 4)) for _ in range(5)] == [0, 1, 2, 3, 0]
