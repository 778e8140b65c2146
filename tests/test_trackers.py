"""logger=mlflow (read back with MLflow's own client), several loggers at once, and each run's provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, cli_env, run_cli
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


def store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def test_each_job_of_a_sweep_is_an_mlflow_run_in_the_sweeps_experiment(synthetic_data_dir, tmp_path):
    result = run_cli(
        [
            "mlplab-train",
            "-m",
            *SYNTHETIC_RUN,
            "logger=mlflow",
            "sweep=widths",
            "trainer.max_epochs=2",
            "model.width=8,16",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Evaluate:" in output and "tensorboard --logdir" not in output  # no event files to show
    client = store(tmp_path)
    experiment = client.get_experiment_by_name("widths")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.params["model.width"] for run in runs) == ["16", "8"]
    for run in runs:
        job_dir = Path(run.data.tags["mlplab.run_dir"])
        recorded = json.loads((job_dir / "metrics.json").read_text())
        assert run.info.run_name == job_dir.name and run.info.status == "FINISHED"
        assert run.data.params["optimizer._target_"] == "torch.optim.Adam" and run.data.params["seed"] == "42"
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [point.value for point in history] == [row["val/acc"] for row in recorded["history"]]  # per epoch
        assert run.data.metrics["final/test_acc"] == recorded["test/acc"]
        assert (
            run.data.tags["mlplab.command"].startswith("mlplab-train ")
            and "model.width=" in run.data.tags["mlplab.command"]
        )
        # With MLflow as the only logger, the views' images are its artifacts.
        assert [a.path for a in client.list_artifacts(run.info.run_id, "val/confusion_matrix")] == [
            f"val/confusion_matrix/step_{step:06d}.png" for step in (10, 20)
        ]
        # The checkpoints stay where a run keeps them, not in folders of MLflow's experiment and run ids.
        assert {p.name for p in (job_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
        assert not [p for p in job_dir.iterdir() if p.is_dir() and p.name.isdigit()]


@pytest.mark.slow
def test_tensorboard_and_mlflow_together_and_a_resume_continues_the_mlflow_run(synthetic_data_dir, tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # the user's own project, in git
    subprocess.run(
        ["git", "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-q", "--allow-empty", "-m", "start"],
        cwd=tmp_path,
        check=True,
    )
    result = run_cli(["mlplab-train", *SYNTHETIC_RUN, "logger=tensorboard_mlflow"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert f"TensorBoard:   tensorboard --logdir {run_dir}" in result.stdout + result.stderr
    result = run_cli(["mlplab-train", f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    (run,) = store(tmp_path).search_runs([store(tmp_path).get_experiment_by_name("mlplab").experiment_id])
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    # Both epochs in the one MLflow run: the resumed attempt continued it.
    assert [p.value for p in store(tmp_path).get_metric_history(run.info.run_id, "val/acc")] == [
        r["val/acc"] for r in history
    ]
    assert len(history) == 2
    val_steps = [p.step for p in store(tmp_path).get_metric_history(run.info.run_id, "val/acc")]
    assert val_steps == sorted(set(val_steps))  # each epoch once, in order: the resume neither doubled nor lost one
    epochs = {p.value for p in store(tmp_path).get_metric_history(run.info.run_id, "epoch")}
    assert epochs == {1.0, 2.0}  # counted from 1, as in metrics.json and metrics.csv

    provenance = json.loads((run_dir / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance["code"]["commit"] == head and provenance["code"]["repository"] == str(REPO)
    users = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance["working_directory"]["git"] == {
        "repository": str(tmp_path.resolve()),
        "commit": users,
        "dirty": False,
    }
    assert provenance["command"] == f"mlplab-train resume={run_dir} trainer.max_epochs=2"
    assert provenance["earlier_attempts"][0]["command"].endswith("logger=tensorboard_mlflow")
    assert provenance["versions"]["torch"] and provenance["host"] and provenance["device"].startswith("cpu")
    assert run.data.tags["mlplab.code.commit"] == head

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("run/provenance/text_summary")[0].tensor_proto.string_val[0].decode()
    assert head in text and "versions.lightning" in text


@pytest.mark.slow
def test_logger_mlflow_without_mlflow_says_how_to_install_it(synthetic_data_dir, tmp_path):
    fake = tmp_path / "no-mlflow" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n")
    env = cli_env(synthetic_data_dir)
    env["PYTHONPATH"] = f"{fake.parent}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mlplab-train"), *SYNTHETIC_RUN, "logger=mlflow"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "mlplab-train: error: logger=mlflow needs MLflow, an optional extra: pip install 'mlplab[mlflow]'"
    )
    assert not list(tmp_path.glob("outputs/runs/*"))
