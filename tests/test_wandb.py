"""logger=wandb, offline: runs read back with W&B's own reader (``wandb leet inspect --json``, which prints an offline
run's records), a resumed run continuing its W&B run, a sweep's jobs as one group, and the hint without W&B.

No test uses the network: every command runs with WANDB_MODE=offline, no API key, and W&B's own folders in tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SYNTHETIC_RUN, composed, run_cli, shared_forked_cli, single_run_dir
from PIL import Image

from mlplab.cli.instantiate import build_logger
from mlplab.run.wandb_tracker import RECORD_FILE, RunWandbLogger, wandb_arguments, wandb_mode

NEEDS_WANDB = "logger=wandb needs W&B, an optional extra: pip install 'mlplab[wandb]'"
WANDB = Path(sys.executable).parent / "wandb"
SMALL = [*SYNTHETIC_RUN, "model.width=4"]  # 10 steps an epoch; a network small enough to make test mistakes


@pytest.fixture
def wandb_installed():
    pytest.importorskip("wandb", reason=NEEDS_WANDB)


def train(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    """mlplab-train with this command line, offline, without an API key, W&B's own folders under ``cwd``."""
    env: dict[str, str | None] = {"MLPLAB_DATA_DIR": str(data_dir), "WANDB_MODE": "offline", "WANDB_API_KEY": None}
    env |= {name: str(cwd / "wandb-home" / name) for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    code, stdout, stderr = shared_forked_cli().run_apart(args, cwd, "mlplab-train", env, 300, [])
    return subprocess.CompletedProcess(args, code, stdout, stderr)


class Part:
    """One offline W&B run folder (a run, or the part of it one attempt logged), read with W&B's own reader."""

    def __init__(self, folder: Path):
        printed = subprocess.run(
            [str(WANDB), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True, timeout=120
        )
        assert printed.returncode == 0, printed.stderr[-2000:]
        records = [json.loads(line) for line in printed.stdout.splitlines() if line.strip()]
        self.folder = folder
        (self.run,) = [record["run"] for record in records if record["type"] == "run"]
        self.rows = [record["history"]["item"] for record in records if record["type"] == "history"]
        self.config: dict[str, Any] = dict(self.run["config"]["update"])  # wandb.init's, then the run's updates
        self.summary: dict[str, Any] = {}
        for record in records:
            if record["type"] in ("config", "summary"):
                getattr(self, record["type"]).update(record[record["type"]]["update"])
        (self.exit_code,) = [record["exit"].get("exit_code", 0) for record in records if record["type"] == "exit"]

    def epochs(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if "val/acc" in row]


def wandb_runs(cwd: Path) -> dict[str, list[Part]]:
    """Every W&B run under outputs/wandb/, by id: its parts in the order they were logged."""
    parts = [Part(folder) for folder in sorted((cwd / "outputs" / "wandb" / "wandb").glob("offline-run-*"))]
    runs: dict[str, list[Part]] = {}
    for part in sorted(parts, key=lambda part: part.run["start_time"]):
        runs.setdefault(part.run["run_id"], []).append(part)
    return runs


@pytest.mark.slow
def test_a_run_logs_to_wandb_offline_and_wandbs_reader_finds_its_config_epochs_final_metrics_and_images(
    wandb_installed, synthetic_data_dir, tmp_path
):
    result = train([*SMALL, "logger=wandb", "trainer.max_epochs=2"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B syncing is set to `offline`" in result.stderr
    run_dir = single_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ((run_id, (part,)),) = wandb_runs(tmp_path).items()
    assert json.loads((run_dir / RECORD_FILE).read_text())["id"] == run_id  # what a resume reads back
    assert part.run["display_name"] == run_dir.name and part.run["project"] == "mlplab"
    assert part.run["job_type"] == "train" and "run_group" not in part.run
    # The settings, flat, as hparams.yaml has them.
    assert part.config["model.width"] == 4 and part.config["model.depth"] == 2 and part.config["seed"] == 42
    assert part.config["optimizer._target_"] == "torch.optim.Adam" and part.config["trainer.max_epochs"] == 2
    # One row per epoch, counted from 1, at Lightning's step; the values are metrics.json's.
    epochs = part.epochs()
    assert [(row["_step"], row["epoch"]) for row in epochs] == [(9, 1), (19, 2)]
    assert [row["val/acc"] for row in epochs] == [epoch["val/acc"] for epoch in metrics["history"]]
    assert [row["val/loss"] for row in epochs] == [epoch["val/loss"] for epoch in metrics["history"]]
    assert all({"train/loss", "train/acc", "trainer/global_step"} <= row.keys() for row in epochs)  # the same row
    # The final metrics, the status and the provenance in the summary.
    assert part.summary["final/test_acc"] == metrics["test/acc"] and part.summary["test/acc"] == metrics["test/acc"]
    assert part.summary["final/best_val_acc"] == metrics["val/acc"] and part.summary["final/epochs"] == 2
    assert part.summary["status"] == "completed" and part.exit_code == 0
    assert part.summary["provenance"]["command"].startswith("mlplab-train ")
    assert part.summary["provenance"]["command"].endswith("logger=wandb trainer.max_epochs=2")
    # Images: each epoch's confusion matrix in its row, the test's and the misclassified grid at the end.
    assert [row["val/confusion_matrix.count"] for row in epochs] == [1, 1]
    (image,) = epochs[0]["val/confusion_matrix.filenames"]
    assert image.startswith("media/images/val/confusion_matrix_9_") and image.endswith(".png")
    with Image.open(part.folder / "files" / image) as png:
        assert png.size == (epochs[0]["val/confusion_matrix.width"], epochs[0]["val/confusion_matrix.height"])
    assert part.summary["test/confusion_matrix.count"] == 1 and part.summary["test/misclassified.count"] == 1
    # The architecture, a table of text, logged when the run started.
    table = json.loads((part.folder / "files" / part.rows[0]["run/architecture.path"]).read_text())
    assert table["columns"] == ["#", "layer", "parameters"]
    assert table["data"][1] == ["1", "Linear(in_features=784, out_features=4, bias=True)", "3,140"]
    assert table["data"][-1] == ["", "total", f"{metrics['num_parameters']:,}"] == ["", "total", "3,210"]


@pytest.mark.slow
@pytest.mark.parametrize("again", ["resume=", "the sweep's command"])
def test_a_run_stopped_by_sigterm_and_resumed_is_one_wandb_run_with_every_epoch_once(
    again, wandb_installed, synthetic_data_dir, tmp_path
):
    stop = "+callbacks.signal_probe={_target_:probes.SignalAtStep,signal_name:SIGTERM,step:15}"  # mid epoch 2
    args = [*SMALL, "logger=tensorboard_wandb", "trainer.max_epochs=3", stop]
    sweep = ["-m", *args, "sweep=again"]  # a sweep of one job; the probe stops only the first attempt, at its step
    first = train(args if again == "resume=" else sweep, tmp_path, synthetic_data_dir)
    assert first.returncode == 143, first.stderr[-3000:]
    if again == "resume=":
        run_dir = single_run_dir(tmp_path)
    else:
        (run_dir,) = [path for path in (tmp_path / "outputs" / "sweeps" / "again").iterdir() if path.is_dir()]
    recorded = json.loads((run_dir / RECORD_FILE).read_text())
    resumed = train([f"resume={run_dir}"] if again == "resume=" else sweep, tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ((run_id, parts),) = wandb_runs(tmp_path).items()  # one W&B run: the resumed attempt continued it
    assert run_id == recorded["id"] == json.loads((run_dir / RECORD_FILE).read_text())["id"]
    assert len(parts) == 2 and all(part.run["resume"] for part in parts)
    epochs = [row for part in parts for row in part.epochs()]
    assert [(row["_step"], row["epoch"]) for row in epochs] == [(9, 1), (19, 2), (29, 3)]  # each once, none lost
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [row["val/acc"] for row in epochs] == [epoch["val/acc"] for epoch in history]
    assert [part.summary["status"] for part in parts] == ["interrupted", "completed"]
    assert [part.exit_code for part in parts] == [1, 0]
    assert "model.width" in parts[0].config and "model.width" not in parts[1].config  # settings logged once
    assert [part.run.get("run_group") for part in parts] == ([None, None] if again == "resume=" else ["again"] * 2)
    if again == "resume=":  # the summary's provenance is the latest attempt's
        assert parts[1].summary["provenance"]["command"] == f"mlplab-train resume={run_dir}"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "stacked"])
def test_a_sweeps_jobs_are_wandb_runs_in_one_group_named_after_the_sweep(
    launcher, wandb_installed, synthetic_data_dir, tmp_path
):
    args = ["-m", *SMALL, "logger=wandb", "model.width=4,8", "sweep=widths", f"hydra/launcher={launcher}"]
    result = train(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and all(len(parts) == 1 for parts in runs.values())
    jobs = {path.name: path for path in (tmp_path / "outputs" / "sweeps" / "widths").iterdir() if path.is_dir()}
    for run_id, (part,) in runs.items():
        assert part.run["run_group"] == "widths" and part.run["job_type"] == "sweep"
        job_dir = jobs[part.run["display_name"]]  # named after its job folder, which records its id
        assert json.loads((job_dir / RECORD_FILE).read_text())["id"] == run_id
        assert f"model.width={part.config['model.width']}" in job_dir.name
        assert part.summary["final/test_acc"] == json.loads((job_dir / "metrics.json").read_text())["test/acc"]
    assert sorted(part.config["model.width"] for (part,) in runs.values()) == [4, 8]


@pytest.mark.slow
def test_the_jobs_of_a_stack_that_failed_start_over_as_new_wandb_runs(wandb_installed, synthetic_data_dir, tmp_path):
    args = ["-m", *SMALL, "logger=wandb", "model.width=4,8", "sweep=widths", "hydra/launcher=stacked"]
    args += ["trainer.max_epochs=2", "+hydra.callbacks.break_stacks._target_=probes.BreakStacks"]
    result = train(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its jobs run one by one" in result.stdout + result.stderr
    jobs = [path for path in (tmp_path / "outputs" / "sweeps" / "widths").iterdir() if path.is_dir()]
    recorded = {json.loads((job / RECORD_FILE).read_text())["id"] for job in jobs if not job.name.startswith(".")}
    runs = wandb_runs(tmp_path)
    assert len(recorded) == 2 and len(runs) == 4 and recorded <= runs.keys()
    for run_id, (part,) in runs.items():
        if run_id in recorded:  # each job on its own, from its start: every epoch, completed
            assert [row["epoch"] for row in part.epochs()] == [1, 2]
            assert part.summary["status"] == "completed" and part.exit_code == 0
        else:  # the stack's attempt, ended as failed rather than left open for the job's second attempt
            assert part.epochs() == [] and part.summary["status"] == "failed" and part.exit_code == 1


@pytest.mark.slow
def test_a_searchs_trials_are_wandb_runs_with_their_trial_number_and_seed_in_their_config(
    wandb_installed, synthetic_data_dir, tmp_path
):
    search = ["hparams_search=fmnist_mlp", "sweep=search", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1"]
    result = train([*SMALL, *search, "trainer.limit_train_batches=2", "logger=wandb"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [part for (part,) in wandb_runs(tmp_path).values()]
    assert sorted(part.config["trial"] for part in parts) == [0, 1]
    assert [part.config["seed"] for part in parts] == [42, 42]
    assert {(part.run["run_group"], part.run["job_type"]) for part in parts} == {("search", "search")}


def test_logger_wandb_without_wandb_says_how_to_install_it(synthetic_data_dir, tmp_path):
    fake = tmp_path / "no-wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    result = run_cli(["mlplab-train", *SMALL, "logger=wandb"], tmp_path, synthetic_data_dir, python_path=[fake.parent])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"mlplab-train: error: {NEEDS_WANDB}"
    assert not list(tmp_path.glob("outputs/runs/*")) and not (tmp_path / "outputs" / "wandb").exists()


def test_a_resumed_attempt_continues_the_recorded_wandb_run_and_a_fresh_start_begins_a_new_one(
    wandb_installed, tmp_path
):
    run_dir, earlier = tmp_path / "runs" / "a", tmp_path / "elsewhere" / "wandb"
    run_dir.mkdir(parents=True)
    earlier.mkdir(parents=True)
    record = {"id": "abcd1234", "project": "mlplab", "entity": "", "dir": str(earlier), "group": ""}
    (run_dir / RECORD_FILE).write_text(json.dumps({**record, "job_type": "train"}))
    settings = {"save_dir": str(tmp_path / "outputs" / "wandb")}
    resumed = wandb_arguments(settings, run_dir, run_dir / "checkpoints" / "last.ckpt", None, None)
    assert resumed["id"] == "abcd1234" and resumed["save_dir"] == str(earlier)  # beside the first part
    assert resumed["name"] == "a" and resumed["group"] is None and resumed["job_type"] == "train"
    fresh = wandb_arguments(settings, run_dir, None, None, None)  # a failed job starting over: a W&B run of its own
    assert fresh["id"] != "abcd1234" and len(fresh["id"]) == 8 and fresh["save_dir"] == settings["save_dir"]
    (run_dir / RECORD_FILE).write_text("{not json")
    assert wandb_arguments(settings, run_dir, run_dir / "last.ckpt", None, None)["id"] != "abcd1234"


def test_a_sweep_job_is_grouped_by_its_sweep_and_a_search_trial_carries_its_number(wandb_installed, tmp_path):
    job = wandb_arguments({"save_dir": "outputs/wandb"}, tmp_path / "model.width=8", None, "widths", None)
    assert (job["name"], job["group"], job["job_type"]) == ("model.width=8", "widths", "sweep") and "trial" not in job
    trial = wandb_arguments({"save_dir": "outputs/wandb"}, tmp_path / "t", None, "search", 3)
    assert (trial["group"], trial["job_type"], trial["trial"]) == ("search", "search", 3)
    own = wandb_arguments({"group": "mine", "job_type": "probe"}, tmp_path / "t", None, "search", 3)
    assert (own["group"], own["job_type"]) == ("mine", "probe")


def test_offline_unless_asked_otherwise_and_wandb_mode_decides_when_set(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert (wandb_mode(offline=True), wandb_mode(offline=False)) == ("offline", "online")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(offline=True) is None  # W&B reads its own variable


def test_tensorboard_wandb_builds_both_loggers_and_wandb_writes_under_outputs(wandb_installed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed(["logger=tensorboard_wandb"])
    assert cfg.logger.wandb.save_dir == "outputs/wandb" and cfg.logger.wandb.offline is True
    tensorboard, wandb = build_logger(cfg.logger, tmp_path / "run")
    assert type(tensorboard).__name__ == "TensorBoardLogger" and Path(tensorboard.log_dir) == tmp_path / "run"
    assert isinstance(wandb, RunWandbLogger) and wandb.save_dir == str(tmp_path / "outputs" / "wandb")
    assert wandb.name == "mlplab"  # Lightning's name of a WandbLogger: its project
    assert not (tmp_path / "outputs").exists()  # nothing is written before the run starts
