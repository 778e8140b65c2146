#!/usr/bin/env python
"""How fast can the default network's training step be in bf16 on this CPU? Bare loops, no framework:

    python benchmarks/cpu_bf16.py                 # 300 steps per contender, 5 interleaved repeats
    python benchmarks/cpu_bf16.py --steps 5 --repeats 1   # checks the script

Contenders, each the default network (784-512-512-10, ReLU) at batch 128 with Adam at 1e-3 on random batches of
uint8 images: *fp32* (torch's default Adam, as tutorials write it; the reference of issue 17's target), *fp32
fused* (mlplab's optimizer), *bf16 autocast* (what ``trainer.precision=bf16-mixed`` does), *bf16 weights, fp32
masters* (a bf16 copy of the weights refreshed after each step, gradients cast to fp32 for a fused fp32 Adam),
*bf16 throughout* (weights, gradients and Adam's state in bf16: the cheapest, and not accurate enough to use), and
the matrix multiplies alone in bf16 (forward and backward, the step's floor). Times are per epoch of 430 steps
(55000 samples), medians; the last column divides by the fp32 loop's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
BATCH, STEPS_PER_EPOCH, SHAPE = 128, 430, (1, 28, 28)


def network(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).to(dtype)


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (BATCH, *SHAPE), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (BATCH,), generator=generator),
        )
        for _ in range(steps)
    ]


def plain(dtype: torch.dtype, fused: bool, autocast: bool = False) -> Callable:
    model = network(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images.to(dtype).div_(255)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def masters() -> Callable:
    model, work = network(), network(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    pairs = list(zip(work.parameters(), model.parameters()))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(work(images.to(torch.bfloat16).div_(255)).float(), labels)
        for copy, _ in pairs:
            copy.grad = None
        loss.backward()
        for copy, master in pairs:
            master.grad = copy.grad.float()
        optimizer.step()
        with torch.no_grad():
            for copy, master in pairs:
                copy.copy_(master)

    return step


def matmuls_only() -> Callable:
    weights = [layer.weight.detach() for layer in network(torch.bfloat16) if isinstance(layer, nn.Linear)]

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        hidden = images.flatten(1).to(torch.bfloat16)
        outputs = [hidden]
        for weight in weights:  # forward
            hidden = hidden @ weight.T
            outputs.append(hidden)
        grad = torch.ones_like(hidden)
        for weight, inputs in zip(reversed(weights), reversed(outputs[:-1])):  # backward: weight and input grads
            _ = grad.T @ inputs
            grad = grad @ weight

    return step


CONTENDERS = {
    "fp32": lambda: plain(torch.float32, fused=False),
    "fp32 fused": lambda: plain(torch.float32, fused=True),
    "bf16 autocast": lambda: plain(torch.float32, fused=True, autocast=True),
    "bf16 weights, fp32 masters": masters,
    "bf16 throughout": lambda: plain(torch.bfloat16, fused=True),
    "matrix multiplies only (bf16)": matmuls_only,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    data = batches(args.steps)
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name, make in CONTENDERS.items():
            step = make()
            for images, labels in data[:3]:  # warm-up: first calls pick kernels and allocate
                step(images, labels)
            started = time.perf_counter()
            for images, labels in data:
                step(images, labels)
            seconds[name].append((time.perf_counter() - started) / len(data) * STEPS_PER_EPOCH)
    reference = statistics.median(seconds["fp32"])
    rows = [
        {
            "contender": name,
            "epoch_s": statistics.median(values),
            "ratio_to_fp32": statistics.median(values) / reference,
            "samples_s": values,
        }
        for name, values in seconds.items()
    ]
    print(f"{'contender':<32} {'epoch s':>8} {'/ fp32':>7}")
    for row in rows:
        print(f"{row['contender']:<32} {row['epoch_s']:>8.3f} {row['ratio_to_fp32']:>7.2f}")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    result = {
        "benchmark": "cpu_bf16",
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"cpu-bf16-{datetime.now():%Y-%m-%dT%H%M}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
