"""A run directory written by mlplab 0.1.0 (tests/data/run-0.1.0: 2 epochs on the synthetic Fashion-MNIST of
conftest, depth 1, width 16) still evaluates, predicts and resumes with this version."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC_RUN, composed, run_cli, single_run_dir

OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"


@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(OLD_RUN, tmp_path / "run-0.1.0"))


@pytest.mark.slow
def test_old_checkpoint_evaluates_to_its_recorded_metrics(old_run, synthetic_data_dir, tmp_path):
    result = run_cli(["mlplab-eval", f"run={old_run}", "format=json", "accelerator=cpu"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    recorded = json.loads((OLD_RUN / "metrics.json").read_text())
    assert report["test/acc"] == pytest.approx(recorded["test/acc"], abs=1e-6)
    assert report["test/loss"] == pytest.approx(recorded["test/loss"], rel=1e-5)


def test_old_checkpoint_predicts_the_test_set(old_run, synthetic_data_dir, tmp_path):
    result = run_cli(
        ["mlplab-predict", f"run={old_run}", "inputs=test", "checkpoint=last"], tmp_path, synthetic_data_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((old_run / "predictions_test.csv").open()))
    assert len(rows) == 200 and rows[0]["label_name"] in (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )


def test_old_run_resumes_where_it_stopped_and_keeps_its_record(old_run, synthetic_data_dir, tmp_path):
    before = torch.load(old_run / "checkpoints" / "last.ckpt", weights_only=True)
    result = run_cli(["mlplab-train", f"resume={old_run}", "trainer.max_epochs=3"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]  # its two (0.1 counted from 0), one more
    after = torch.load(old_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == before["global_step"] * 3 // 2
    assert after["state_dict"]["network.1.weight"].shape == (16, 784)  # the old run's own network, continued
    overrides = (old_run / ".hydra" / "overrides.yaml").read_text()
    assert "model.width=16" in overrides and "trainer.max_epochs=3" in overrides and "resume" not in overrides
    assert not (tmp_path / "outputs").exists()  # nothing written anywhere else


@pytest.mark.slow
def test_a_run_that_named_its_optimizer_and_schedule_resumes(synthetic_data_dir, tmp_path):
    """The version before this one named the optimizer and schedule (``optimizer.name``, ``scheduler.min_lr``) in
    its checkpoints and overrides; made here from a run of this version, rewritten as that version wrote it."""
    result = run_cli(
        [
            "mlplab-train",
            *SYNTHETIC_RUN,
            "optimizer=sgd",
            "scheduler=cosine",
            "scheduler.eta_min=0.001",
            "trainer.max_epochs=2",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text(
        overrides.read_text()
        .replace("optimizer=sgd", "optimizer.name=sgd")
        .replace("scheduler=cosine", "scheduler.name=cosine")
        .replace("eta_min", "min_lr")
    )
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        state = torch.load(path, weights_only=True)
        state["hyper_parameters"]["optimizer"] = {"name": "sgd", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9}
        state["hyper_parameters"]["scheduler"] = {"name": "cosine", "min_lr": 0.001}
        torch.save(state, path)
    result = run_cli(["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=3"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    assert "scheduler.eta_min=0.001" in overrides.read_text()  # rewritten as this version names it
    evaluated = run_cli(
        ["mlplab-eval", f"run={run_dir}", "format=json", "accelerator=cpu"], tmp_path, synthetic_data_dir
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]


@pytest.mark.slow
def test_a_resumed_run_keeps_its_recorded_experiment_when_a_default_has_changed_since(synthetic_data_dir, tmp_path):
    """A run from when data.val_size was 120 by default (it is 5000 now): its overrides do not name it, its recorded
    config does."""
    assert composed().data.val_size == 5000
    started = [*(o for o in SYNTHETIC_RUN if not o.startswith("data.val_size=")), "data.val_size=120"]
    result = run_cli(["mlplab-train", *started], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("- data.val_size=120\n", ""))  # as if it were the default
    assert (
        "val_size" not in overrides.read_text() and "val_size: 120" in (run_dir / ".hydra" / "config.yaml").read_text()
    )
    result = run_cli(["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2  # max_epochs, resumable, given now
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["datamodule_hyper_parameters"]["val_size"] == 120  # the split it started with
