#!/usr/bin/env python
"""The simplest loop that trains a shape sweep's networks together: the floor a stacked sweep is judged against.

    python benchmarks/bare_stack.py --depths 1 2 --widths 64 128 256 512 --seeds 1 2 --epochs 2

Plain PyTorch, no Lightning, no records: read Fashion-MNIST with torchvision's parsers, split off 5,000 validation
images (``--val-size``), then per step one batch per seed (the networks of a seed share it), each network's forward
pass (networks that read the same batch have their first layers concatenated into one matrix multiply, the cheapest
way to compute them), one backward pass, and one fused Adam step over every network's parameters. Each epoch ends
with validation, the run with a test of each network's last weights. Prints the seconds spent after the imports, and
those of the whole process come from the caller (benchmarks/stacked_sweep.py --bare times this script as a
subprocess, beside mlplab's stacked and job-by-job sweeps of the same jobs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets.mnist import read_image_file, read_label_file


def load(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    images = read_image_file(str(data_dir / f"{prefix}-images-idx3-ubyte"))
    return images, read_label_file(str(data_dir / f"{prefix}-labels-idx1-ubyte"))


class SharedInputNetworks(nn.Module):
    """The networks that read one batch: their first layers one matrix multiply, the rest each its own."""

    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.widths = [width if depth else 10 for depth, width in shapes]
        self.first = nn.Linear(784, sum(self.widths))
        self.rests = nn.ModuleList()
        for depth, width in shapes:
            layers: list[nn.Module] = [nn.ReLU()] if depth else []
            for _ in range(max(depth - 1, 0)):
                layers += [nn.Linear(width, width), nn.ReLU()]
            layers += [nn.Linear(width, 10)] if depth else []
            self.rests.append(nn.Sequential(*layers))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.first(images.flatten(1))
        return [rest(part) for rest, part in zip(self.rests, hidden.split(self.widths, dim=1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the four uncompressed idx files")
    parser.add_argument("--depths", type=int, nargs="+", default=[2])
    parser.add_argument("--widths", type=int, nargs="+", default=[512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    args = parser.parse_args()
    started = time.perf_counter()
    images, labels = load(args.data_dir, train=True)
    test_images, test_labels = load(args.data_dir, train=False)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    val, train = order[: args.val_size], order[args.val_size :]
    scale = 1 / (255 * 0.3530)

    def normalized(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() * scale - 0.2860 / 0.3530).unsqueeze(1)

    shapes = [(depth, width) for depth in args.depths for width in args.widths]
    networks = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        networks[seed] = SharedInputNetworks(shapes)
    optimizer = torch.optim.Adam([p for net in networks.values() for p in net.parameters()], lr=1e-3, fused=True)
    steps = math.ceil(len(train) / args.batch_size)
    for epoch in range(args.epochs):
        orders = {
            seed: train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))]
            for seed in args.seeds
        }
        for net in networks.values():
            net.train()
        for step in range(steps):
            loss = 0.0
            for seed, net in networks.items():
                index = orders[seed][step * args.batch_size : (step + 1) * args.batch_size]
                batch, target = normalized(images[index]), labels[index]
                loss = loss + sum(F.cross_entropy(logits, target) for logits in net(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc = evaluate(networks, normalized, images[val], labels[val])
    test_acc = evaluate(networks, normalized, test_images, test_labels)
    print(
        json.dumps(
            {
                "train_s": time.perf_counter() - started,
                "networks": len(shapes) * len(args.seeds),
                "val_acc": val_acc,
                "test_acc": test_acc,
            }
        )
    )


@torch.no_grad()
def evaluate(networks, normalized, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    correct: dict[tuple[int, int], int] = {}
    for net in networks.values():
        net.eval()
    for start in range(0, len(images), 1000):
        batch, target = normalized(images[start : start + 1000]), labels[start : start + 1000]
        for seed, net in networks.items():
            for index, logits in enumerate(net(batch)):
                correct[seed, index] = correct.get((seed, index), 0) + int((logits.argmax(1) == target).sum())
    return [count / len(images) for count in correct.values()]


if __name__ == "__main__":
    main()
