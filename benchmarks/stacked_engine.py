#!/usr/bin/env python
"""K networks trained one after another against the same K trained as one stack (mlplab.model.stacked_network).

    python benchmarks/stacked_engine.py                       # CPU: K = 1, 4, 8; 5 interleaved repeats
    python benchmarks/stacked_engine.py --device cuda --ks 1 4 8 16 32

Compute only, no data pipeline or framework: each contender trains K default networks (depth 2, width 512, on
28 x 28 inputs) for --steps Adam steps at batch --batch-size, each network on its own random batches. "one after
another" is torch's fused Adam on each network in turn, as mlplab trains a single job; "stacked" is one batched
forward and backward for all K and torch's fused Adam on each network's slice (PerNetworkOptimizer). Repeats are
interleaved; the table gives medians and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from mlplab.model.backbones.mlp import MLP
from mlplab.model.stacked_network import PerNetworkOptimizer, StackedMLP

HERE = Path(__file__).resolve().parent
SHAPE, CLASSES = (1, 28, 28), 10


def one_after_another(k: int, steps: int, batch: int, device: torch.device) -> float:
    networks = [MLP().build(SHAPE, CLASSES).to(device) for _ in range(k)]
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-3, fused=True) for n in networks]
    images = torch.randn(steps, batch, *SHAPE, device=device)
    labels = torch.randint(0, CLASSES, (steps, batch), device=device)
    _sync(device)
    start = time.perf_counter()
    for network, optimizer in zip(networks, optimizers):
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(network(images[step]), labels[step]).backward()
            optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def stacked(k: int, steps: int, batch: int, device: torch.device) -> float:
    backbones = [MLP()] * k
    model = StackedMLP(backbones, [b.build(SHAPE, CLASSES) for b in backbones]).to(device)
    optimizer = PerNetworkOptimizer(model, [functools.partial(torch.optim.Adam, lr=1e-3, fused=True)] * k)
    images = torch.randn(steps, k, batch, *SHAPE, device=device)
    labels = torch.randint(0, CLASSES, (steps, k * batch), device=device)
    _sync(device)
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad()
        logits = model(images[step]).flatten(0, 1)
        # each network's mean loss, summed: each network's gradient is its own
        (F.cross_entropy(logits, labels[step], reduction="sum") / batch).backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "results", help="folder for the JSON result")
    args = parser.parse_args()
    device = torch.device(args.device)
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for k in args.ks:
            for name, contender in (("one after another", one_after_another), ("stacked", stacked)):
                times.setdefault((k, name), []).append(contender(k, args.steps, args.batch_size, device))
    rows = []
    print(f"{'K':>3} {'one after another (s)':>22} {'stacked (s)':>12} {'stacked / one after another':>28}")
    for k in args.ks:
        alone, together = (statistics.median(times[(k, name)]) for name in ("one after another", "stacked"))
        rows.append(
            {
                "k": k,
                "one_after_another_s": alone,
                "stacked_s": together,
                "ratio": together / alone,
                "all_s": {name: times[(k, name)] for name in ("one after another", "stacked")},
            }
        )
        print(f"{k:>3} {alone:>22.3f} {together:>12.3f} {together / alone:>28.2f}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "stacked_engine",
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows": rows,
    }
    out = args.output / f"stacked-engine-{device.type}-{datetime.now():%Y-%m-%dT%H%M}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
