"""GPU path: the data lives on the GPU and batches are cut there. Skipped without CUDA."""

import json

import lightning as L
import pytest
import torch
from conftest import SYNTHETIC_RUN, run_cli

from mlplab.data.datamodule import ImageDataModule
from mlplab.data.settings import DataSettings
from mlplab.model.backbones.mlp import MLP
from mlplab.model.classifier import ImageClassifier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fit_on_the_gpu(data_dir, callbacks=()) -> tuple[ImageDataModule, L.Trainer]:
    """One epoch of a small MLP on the synthetic data, on the GPU, with nothing else of a run."""
    datamodule = ImageDataModule(DataSettings(batch_size=50, val_size=100, download=False), data_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = ImageClassifier(
        MLP(depth=2, width=64),
        datamodule.input_shape,
        len(datamodule.class_names),
        input_mean=datamodule.mean,
        input_std=datamodule.std,
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=datamodule)
    return datamodule, trainer


def test_dataset_moves_to_the_gpu_once_and_batches_stay_there(synthetic_data_dir):
    datamodule, trainer = fit_on_the_gpu(synthetic_data_dir)
    assert all(split.images.is_cuda and split.labels.is_cuda for split in datamodule.splits.values())
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.is_cuda and images.dtype == torch.uint8 and labels.is_cuda
    assert trainer.strategy.root_device.type == "cuda"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cli_trains_on_the_gpu(precision, synthetic_data_dir, tmp_path):
    args = ["mlplab-train", *SYNTHETIC_RUN, "trainer=gpu", f"trainer.precision={precision}"]
    result = run_cli(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPU available: True (cuda), used: True" in result.stdout + result.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test/acc"] > 0.5


def test_a_stacked_sweep_on_the_gpu_gives_each_job_what_it_gives_alone(synthetic_data_dir, tmp_path):
    common = ["mlplab-train", "-m", *SYNTHETIC_RUN, "trainer=gpu", "trainer.max_epochs=2", "seed=1,2,3"]
    for name, launcher in (("stacked", ["hydra/launcher=stacked"]), ("alone", [])):
        result = run_cli([*common, f"hydra.sweep.dir={name}", *launcher], tmp_path, synthetic_data_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Training 3 jobs as one stack" in result.stderr or (tmp_path / "stacked" / ".stacks").is_dir()
    for job in (tmp_path / "alone").glob("*seed=*"):
        alone, stacked = (
            torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
            for folder in (job, tmp_path / "stacked" / job.name)
        )
        for key, value in alone["state_dict"].items():
            torch.testing.assert_close(stacked["state_dict"][key], value, rtol=1e-3, atol=1e-4)
        metrics = [
            json.loads((folder / "metrics.json").read_text()) for folder in (job, tmp_path / "stacked" / job.name)
        ]
        assert metrics[1]["stacked_jobs"] == 3 and abs(metrics[0]["test/acc"] - metrics[1]["test/acc"]) < 0.02


class SyncWatch(L.Callback):
    """Turns on torch's warning for operations that wait for the GPU, from each batch's start to its end."""

    def on_train_batch_start(self, *args) -> None:
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_a_training_step_on_the_gpu_never_waits_for_the_device(synthetic_data_dir, recwarn):
    fit_on_the_gpu(synthetic_data_dir, [SyncWatch()])
    waits = [str(warning.message) for warning in recwarn if "synchroniz" in str(warning.message).lower()]
    assert not waits, waits[:3]
