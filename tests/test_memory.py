"""The memory guard's estimate against the real peak: training networks of a few sizes, the peak resident memory
of the mlplab-train process (as the kernel counts it) stays at or below the estimate the run recorded. A stack on a
GPU is checked against the GPU's free memory, not the machine's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, cli_env


def peak_and_estimate(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[int, int]:
    """(peak resident bytes of one mlplab-train process, the estimate in its metrics.json)."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    args = [
        str(Path(sys.executable).parent / "mlplab-train"),
        *SYNTHETIC_RUN,
        "trainer.limit_train_batches=3",
        *overrides,
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/runs/*/metrics.json")
    return int(result.stdout.split()[-1]) * 1024, json.loads(metrics.read_text())["memory_estimate_bytes"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.width=16"],
        ["model.width=4000"],
        ["model.width=2000", "model.depth=4"],
        ["model.width=4000", "optimizer=sgd"],
    ],
    ids=" ".join,
)
@pytest.mark.slow
def test_the_estimate_is_at_or_above_the_measured_peak(overrides, synthetic_data_dir, tmp_path):
    peak, estimate = peak_and_estimate(tmp_path, synthetic_data_dir, *overrides)
    assert estimate >= peak, f"estimated {estimate >> 20} MB, measured {peak >> 20} MB"
    assert estimate <= 1.6 * peak, f"estimated {estimate >> 20} MB for a measured {peak >> 20} MB: too cautious to use"


@pytest.mark.slow
def test_a_network_that_does_not_fit_is_refused_with_what_is_available(synthetic_data_dir, tmp_path):
    # 100000 x 100000: 10 billion parameters, hundreds of GB to train; no machine here has that free
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mlplab-train"), *SYNTHETIC_RUN, "model.width=100000"],
        cwd=tmp_path,
        env=cli_env(synthetic_data_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mlplab-train: error:")]
    assert "model.width and model.depth make a network of 10,079,600,010 parameters" in line
    assert "GiB is available; choose a smaller model.width or model.depth" in line
    assert not list(tmp_path.glob("outputs/runs/*"))


def test_the_estimate_covers_the_peak_that_was_killed():
    """30000 x 30000 with Adam was let through at 14.8 GB and killed by the kernel at 24.2 GB of resident memory."""
    from mlplab.model.backbones.mlp import MLP
    from mlplab.run.memory import training_peak_bytes

    parameters, activations = MLP(depth=2, width=30000).planned_size((1, 28, 28), 10)
    assert parameters == 923_880_010
    assert training_peak_bytes(parameters, 2, activations, batch_size=128, eval_batch_size=1000) > 24.2e9


def test_a_stack_on_a_gpu_needs_the_gpus_free_memory_not_the_machines(monkeypatch):
    import torch

    from mlplab.run.settings import TrainerSettings
    from mlplab.sweeps import stack_run

    gib = 2**30
    monkeypatch.setattr(stack_run, "available_memory", lambda: 1 * gib)  # a GPU machine with little RAM free
    monkeypatch.setattr(stack_run, "resident_bytes", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu, cpu = TrainerSettings(accelerator="auto"), TrainerSettings(accelerator="cpu")
    assert stack_run.stack_memory(gpu) == (8 * gib, "free on the GPU")  # what stack_plan sizes stacks by too
    stack_run._require_stack_memory([2 * gib] * 3, gpu)  # about 5.4 GiB: fits the GPU, though not the RAM
    with pytest.raises(MemoryError) as refused:
        stack_run._require_stack_memory([2 * gib] * 5, gpu)
    assert str(refused.value) == (
        "5 stacked jobs need about 8.8 GiB and 8.0 GiB is free on the GPU; set hydra.launcher.max_stack lower"
    )
    with pytest.raises(MemoryError) as refused:
        stack_run._require_stack_memory([2 * gib] * 3, cpu)
    assert str(refused.value) == (
        "3 stacked jobs need about 5.4 GiB and 1.0 GiB is available; set hydra.launcher.max_stack lower"
    )
