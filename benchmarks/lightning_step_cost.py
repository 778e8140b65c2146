"""Lightning's own cost per training step: a network trained by a bare loop and by Lightning's automatic and
manual optimisation loops (no logger, no checkpoints, no callbacks but a step timer), in fp32 or bf16 autocast.

    python benchmarks/lightning_step_cost.py                      # an 8->2 linear layer: Lightning's cost alone
    python benchmarks/lightning_step_cost.py --network default --precision bf16-mixed   # the default MLP in bf16

Median microseconds per step over 100 steps, 3 interleaved repeats; the last column divides by the bare loop's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F

STEPS, BATCH_SIZE, REPEATS = 100, 128, 3
NETWORKS = {  # name: (build the network, input features, classes)
    "tiny": (lambda: torch.nn.Linear(8, 2), 8, 2),
    "default": (  # mlplab's default MLP on Fashion-MNIST's image size
        lambda: torch.nn.Sequential(
            torch.nn.Linear(784, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        ),
        784,
        10,
    ),
}
BATCHES: list[tuple[torch.Tensor, torch.Tensor]] = []
NETWORK, BF16 = NETWORKS["tiny"][0], False


def make_batches(features: int, classes: int) -> None:
    x, y = torch.randn(STEPS * BATCH_SIZE, features), torch.randint(0, classes, (STEPS * BATCH_SIZE,))
    BATCHES[:] = [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, len(y), BATCH_SIZE)]


class Batches:
    def __iter__(self):
        return iter(BATCHES)

    def __len__(self) -> int:
        return len(BATCHES)


class Tiny(L.LightningModule):
    def __init__(self, manual: bool):
        super().__init__()
        self.net, self.automatic_optimization = NETWORK(), not manual

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), fused=True)


class StepTimer(L.Callback):
    def __init__(self):
        self.seconds, self._last = [], None

    def on_train_batch_start(self, *args) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now


def lightning_step(manual: bool) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        precision="bf16-mixed" if BF16 else "32-true",
    )
    trainer.fit(Tiny(manual), train_dataloaders=Batches())
    return statistics.median(timer.seconds)


def bare_step() -> float:
    model = NETWORK()
    optimizer, seconds = torch.optim.Adam(model.parameters(), fused=True), []
    for images, labels in BATCHES:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    global NETWORK, BF16
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="tiny")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    args = parser.parse_args()
    NETWORK, features, classes = NETWORKS[args.network]
    BF16 = args.precision == "bf16-mixed"
    make_batches(features, classes)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    samples = {"bare loop": [], "Lightning, automatic optimisation": [], "Lightning, manual optimisation": []}
    for _ in range(REPEATS):
        samples["bare loop"].append(bare_step())
        samples["Lightning, automatic optimisation"].append(lightning_step(manual=False))
        samples["Lightning, manual optimisation"].append(lightning_step(manual=True))
    bare = statistics.median(samples["bare loop"])
    print(f"{args.network} network, {args.precision}, batch {BATCH_SIZE}, {torch.get_num_threads()} threads")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<36} {median * 1e6:6.0f} us per step  {median / bare:5.2f}")


if __name__ == "__main__":
    main()
