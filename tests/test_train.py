"""``train(config, run_dir)`` in-process: what a notebook or another tool calls."""

import json

import pytest
import torch
from conftest import SYNTHETIC_RUN, composed
from omegaconf import OmegaConf

from mlplab.cli.instantiate import build_callbacks
from mlplab.run import precision
from mlplab.run.config import parse_run_config
from mlplab.run.precision import fast_bf16
from mlplab.run.train import train


def run(data_dir, run_dir, *overrides):
    """Train as mlplab-train does, minus Hydra's command line: the composed config and its callbacks."""
    cfg = composed([*SYNTHETIC_RUN, f"paths.data_dir={data_dir}", "model.width=32", *overrides])
    config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
    return train(config, run_dir, callbacks=build_callbacks(cfg.callbacks))


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_same_seed_same_result_other_seed_other_result(synthetic_data_dir, tmp_path):
    runs = {name: tmp_path / name for name in ("a", "b", "c")}
    metrics = {
        "a": run(synthetic_data_dir, runs["a"], "seed=1"),
        "b": run(synthetic_data_dir, runs["b"], "seed=1"),
        "c": run(synthetic_data_dir, runs["c"], "seed=2"),
    }
    assert metrics["a"]["test/acc"] == metrics["b"]["test/acc"]
    weights = {name: final_weights(run_dir) for name, run_dir in runs.items()}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["network.1.weight"], weights["c"]["network.1.weight"])


def test_cosine_schedule_anneals_over_max_epochs_towards_eta_min(synthetic_data_dir, tmp_path):
    metrics = run(synthetic_data_dir, tmp_path, "scheduler=cosine", "scheduler.eta_min=0.0001", "trainer.max_epochs=2")
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (scheduler,) = state["lr_schedulers"]
    # From 0.001, halfway through two epochs the rate is midway to eta_min (0.00055), and at the end eta_min.
    assert scheduler["T_max"] == 2 and scheduler["last_epoch"] == 2
    assert scheduler["_last_lr"] == [pytest.approx(0.0001)]
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["lr_schedulers"][0]
    stepped = best["last_epoch"]  # the epochs done when the best checkpoint was taken
    assert stepped == metrics["best_epoch"]  # epochs count from 1
    assert best["_last_lr"] == [pytest.approx({1: 0.00055, 2: 0.0001}[stepped])]


@pytest.mark.parametrize("native, chosen", [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_is_bf16_mixed_where_the_cpu_multiplies_bf16_and_is_recorded(
    native, chosen, synthetic_data_dir, tmp_path, monkeypatch
):
    # Whether this CPU multiplies bf16 natively (read from its flags: the test below); both answers tried here.
    monkeypatch.setattr(precision, "fast_bf16", lambda on_gpu: native)
    metrics = run(synthetic_data_dir, tmp_path / "run", "trainer.precision=auto")
    assert metrics["status"] == "completed" and metrics["precision"] == chosen
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["precision"] == chosen


@pytest.mark.parametrize(
    "flags, native",
    [("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True), ("fpu sse avx2 avx512f", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(flags, native, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert fast_bf16(on_gpu=False, cpuinfo=cpuinfo) is native
    assert fast_bf16(on_gpu=False, cpuinfo=tmp_path / "absent") is False
