"""What fits in memory: a training process's peak, the memory this machine has free, and the guard that refuses a
network too big to train here (naming the settings that make it so). The stacked sweeps size their stacks from
the same arithmetic."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlplab.errors import MlplabError

if TYPE_CHECKING:
    from mlplab.run.config import RunConfig


class NotEnoughMemoryError(MlplabError):
    """Training as configured would need more memory than this machine has free."""


def training_peak_bytes(
    num_parameters: int,
    optimizer_state: int,
    activations_per_sample: int,
    batch_size: int,
    eval_batch_size: int,
    bytes_per_value: int = 4,
) -> int:
    """Memory one training process needs beyond what it holds before the model is built (imports, the data).

    Per parameter: the weights, their gradients, the optimizer's state, and two in-memory copies of weights and
    optimizer state for checkpoints (each save is cloned for the background writer, and at an epoch's end the best
    and the last checkpoint are queued together). Per sample of the larger of a training batch (kept for
    backward, with its gradients and activation masks: about three values) and an evaluation batch: the layers'
    outputs. tests/test_memory.py measures peaks against it.
    """
    per_parameter = (2 + optimizer_state + 2 * (1 + optimizer_state)) * bytes_per_value
    activations = max(3 * batch_size, eval_batch_size) * activations_per_sample * bytes_per_value
    return RUN_OVERHEAD_BYTES + num_parameters * per_parameter + activations


def planned_peak_bytes(config: RunConfig, input_shape: Sequence[int], num_classes: int) -> tuple[int, int]:
    """The parameters of ``config``'s network for this data, and the memory one process training it needs
    (training_peak_bytes); ValueError where the network does not suit the data's images."""
    parameters, activations = config.model.planned_size(input_shape, num_classes)
    state = config.optimizer.state_per_parameter
    return parameters, training_peak_bytes(
        parameters, state, activations, config.data.batch_size, config.data.eval_batch_size
    )


# What a run allocates beyond its model whatever its size: the fit and test loops, the views and their writers,
# the allocator's slack. Measured: about 220 MB for a 13,002-parameter network (tests/test_memory.py).
RUN_OVERHEAD_BYTES = 300 * 2**20


def available_memory() -> int:
    """Bytes this process may still take: the system's MemAvailable, or less under a cgroup's memory limit."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except OSError:  # no cgroup v2 memory controller here
        return available
    return available if limit == "max" else min(available, int(limit) - used)


def resident_bytes() -> int:
    """This process's resident memory now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def require_memory_for(peak_bytes: int, processes: int, num_parameters: int, size_keys: Sequence[str]) -> int:
    """Refuse, naming the keys that set its size, a network whose training would not fit in the memory this
    machine has free (each of ``processes`` data-parallel ranks holds a whole copy); returns the estimated peak
    resident memory of this process."""
    here = resident_bytes()
    needed = processes * peak_bytes + (processes - 1) * here
    available = available_memory()
    if needed > available:
        raise NotEnoughMemoryError(
            f"{' and '.join(size_keys)} make a network of {num_parameters:,} parameters; training it "
            f"needs about {needed / 2**30:.1f} GiB more memory (weights, gradients, optimizer state, "
            f"checkpoint copies, activations{', per rank' if processes > 1 else ''}), and "
            f"{available / 2**30:.1f} GiB is available; choose a smaller {' or '.join(size_keys)}"
        )
    return here + peak_bytes
