"""callbacks=early_stopping: Lightning's EarlyStopping on val/acc, recorded in metrics.json, exact across a resume."""

from __future__ import annotations

import json

import torch
from conftest import stopped_and_resumed, train_in_process

# No epoch can raise val/acc by a whole 1.0: epoch 1 sets the mark, and patience 1 ends training after epoch 2.
NEVER_IMPROVES = [
    "callbacks=early_stopping",
    "callbacks.early_stopping.patience=1",
    "callbacks.early_stopping.min_delta=1.0",
    "trainer.max_epochs=5",
]


def test_early_stopping_ends_training_and_metrics_json_says_when(synthetic_data_dir, tmp_path):
    state = train_in_process(synthetic_data_dir, tmp_path, NEVER_IMPROVES)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["stopped_early_at_epoch"] == 2
    assert state["global_step"] == 20 and "test/acc" in metrics


def test_a_resumed_run_keeps_its_early_stopping_count(synthetic_data_dir, tmp_path):
    straight = train_in_process(synthetic_data_dir, tmp_path / "straight", NEVER_IMPROVES)
    resumed = stopped_and_resumed(synthetic_data_dir, tmp_path / "resumed", NEVER_IMPROVES, stop_after=1)
    # Resumed after epoch 1, it stops after epoch 2 as the straight run did: the count survived the checkpoint.
    assert resumed["global_step"] == straight["global_step"] == 20
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["stopped_early_at_epoch"] == 2
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])
