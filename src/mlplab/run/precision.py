"""Where and in what precision a run trains, as Lightning will do it: ``trainer.precision=auto`` resolved for the
device, and one line for each way a CPU run differs from what its settings suggest. ``settings``: the run's
mlplab.run.settings.TrainerSettings (mlplab.run.trainer builds the Trainer from them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mlplab.run.distributed import started_as_other_rank

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU instructions that multiply bf16 matrices natively


def fast_bf16(on_gpu: bool, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine multiplies bf16 natively: a GPU with bf16 units (Ampere or later), or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated, and slower than fp32."""
    if on_gpu:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = {
            flag
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()
        }
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def trains_on_cpu(settings: Any, gpu_index: int | None = None) -> bool:
    """Whether Lightning trains the run on the CPU: accelerator=cpu, or auto on a machine without a GPU (CUDA, or
    Apple's MPS, which Lightning's auto picks too)."""
    if gpu_index is not None or settings.accelerator == "gpu":
        return False
    return settings.accelerator == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def resolved_precision(settings: Any, gpu_index: int | None = None) -> str | int:
    """``trainer.precision``, with ``auto`` made ``bf16-mixed`` where the device multiplies bf16 natively (fp32
    weights and optimizer, bf16 matrix multiplies) and ``32-true`` elsewhere; and ``16-mixed`` on the CPU made
    ``bf16-mixed``, as Lightning would, but said in one line (note_cpu_choices), not among Lightning's many."""
    if settings.precision in ("16-mixed", 16) and trains_on_cpu(settings, gpu_index):
        return "bf16-mixed"
    if settings.precision != "auto":
        return settings.precision
    on_gpu = (
        gpu_index is not None
        or settings.accelerator == "gpu"
        or (settings.accelerator == "auto" and torch.cuda.is_available())
    )
    return "bf16-mixed" if fast_bf16(on_gpu) else "32-true"


def note_cpu_choices(settings: Any, precision: str | int, gpu_index: int | None = None) -> None:
    """One line for each way a CPU run differs from what its settings suggest: a precision changed for the CPU,
    and data-parallel ranks more than the cores, which then share them (legitimate, to try data-parallel training,
    but slower than one process)."""
    if not trains_on_cpu(settings, gpu_index) or started_as_other_rank():  # rank 0 speaks for the run
        return
    if settings.precision not in ("auto", precision):
        log.warning(
            "trainer.precision=%s: Lightning has no float16 mixed precision on the CPU; training with %s",
            settings.precision,
            precision,
        )
    cores = len(os.sched_getaffinity(0))
    shared = settings.data_parallel and isinstance(settings.devices, int) and settings.devices > cores
    if shared and not SLURMEnvironment.detect():  # SLURM gives each rank (a task) cores of its own
        log.warning(
            "trainer.devices=%d: the %d data-parallel ranks share this machine's %d CPU cores, which makes "
            "training slower than in one process",
            settings.devices,
            settings.devices,
            cores,
        )
