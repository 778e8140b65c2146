"""Optimizers and schedules by class path: presets and any torch.optim class, exact across a resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import SYNTHETIC_RUN, run_cli, train_in_process

from mlplab.model.classifier import ImageClassifier

SCHEDULES = {
    "cosine": [],
    "warmup_cosine": ["scheduler.warmup_fraction=0.2"],
    "onecycle": [],
    "step": ["scheduler.step_size=1", "scheduler.gamma=0.5"],
    "plateau": ["scheduler.patience=0", "scheduler.mode=max"],  # a falling loss never "improves": decays every epoch
    "exponential": ["scheduler._target_=torch.optim.lr_scheduler.ExponentialLR", "+scheduler.gamma=0.7"],
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_changes_the_rate_and_resumes_exactly(schedule, synthetic_data_dir, tmp_path):
    preset = "none" if schedule == "exponential" else schedule
    overrides = [f"scheduler={preset}", *SCHEDULES[schedule]]
    straight = train_in_process(synthetic_data_dir, tmp_path / "straight", overrides)
    first = train_in_process(synthetic_data_dir, tmp_path / "resumed", overrides, stop_after=2)
    assert first["global_step"] == 20  # two of the three epochs
    resumed = train_in_process(
        synthetic_data_dir,
        tmp_path / "resumed",
        overrides,
        resume_from=tmp_path / "resumed" / "checkpoints" / "last.ckpt",
    )
    (state,), (resumed_state,) = straight["lr_schedulers"], resumed["lr_schedulers"]
    lr = straight["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr != pytest.approx(1e-3), "the schedule never changed the learning rate"
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == lr
    assert {k: v for k, v in resumed_state.items() if k != "_get_lr_called_within_step"} == {
        k: v for k, v in state.items() if k != "_get_lr_called_within_step"
    }
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


def test_step_schedules_count_optimizer_steps(synthetic_data_dir, tmp_path):
    # 500 training samples in batches of 50, 3 epochs, two batches per step: 15 steps; one-cycle ends at its floor.
    state = train_in_process(synthetic_data_dir, tmp_path, ["scheduler=onecycle", "trainer.accumulate_grad_batches=2"])
    (schedule,) = state["lr_schedulers"]
    assert state["global_step"] == 15 and schedule["total_steps"] == 15 and schedule["last_epoch"] == 15


def test_any_torch_optimizer_by_class_path_trains_and_is_recorded(synthetic_data_dir, tmp_path):
    result = run_cli(
        [
            "mlplab-train",
            *SYNTHETIC_RUN,
            "optimizer._target_=torch.optim.RMSprop",
            "+optimizer.alpha=0.9",
            "trainer.accumulate_grad_batches=2",
            "scheduler=warmup_cosine",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["optimizer"] == {"_target_": "torch.optim.RMSprop", "lr": 0.001, "weight_decay": 0.0, "alpha": 0.9}
    assert config["trainer"]["accumulate_grad_batches"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 5  # 10 batches, two per step
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.RMSprop"  # a path, as text
    assert "square_avg" in checkpoint["optimizer_states"][0]["state"][0]  # RMSprop's own state
    model = ImageClassifier.from_checkpoint(checkpoint)
    assert type(model.optimizer_settings.build(model.parameters())) is torch.optim.RMSprop


def test_checkpoints_of_the_previous_version_name_their_optimizer():
    model = ImageClassifier(
        {"family": "mlp", "depth": 1, "width": 4},
        (1, 4, 4),
        3,
        {"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.5},
        {"name": "cosine", "min_lr": 0.01},
    )
    assert model.hparams.optimizer == {"_target_": "torch.optim.SGD", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.5}
    assert model.hparams.scheduler == {
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "eta_min": 0.01,
        "interval": "epoch",
    }
