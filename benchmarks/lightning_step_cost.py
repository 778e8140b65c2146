"""Lightning's own cost per training step, apart from any model: a 8->2 linear layer trained by a bare loop and by
Lightning's automatic and manual optimisation loops (no logger, no checkpoints, no callbacks but a step timer).

Median microseconds per step over 100 steps, 3 interleaved repeats. Usage: python benchmarks/lightning_step_cost.py
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
x, y = torch.randn(STEPS * BATCH_SIZE, 8), torch.randint(0, 2, (STEPS * BATCH_SIZE,))
BATCHES = [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, len(y), BATCH_SIZE)]


class Batches:
    def __iter__(self):
        return iter(BATCHES)

    def __len__(self) -> int:
        return len(BATCHES)


class Tiny(L.LightningModule):
    def __init__(self, manual: bool):
        super().__init__()
        self.net, self.automatic_optimization = torch.nn.Linear(8, 2), not manual

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
    )
    trainer.fit(Tiny(manual), train_dataloaders=Batches())
    return statistics.median(timer.seconds)


def bare_step() -> float:
    model = torch.nn.Linear(8, 2)
    optimizer, seconds = torch.optim.Adam(model.parameters(), fused=True), []
    for images, labels in BATCHES:
        started = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help says what it does, and stops
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    samples = {"bare loop": [], "Lightning, automatic optimisation": [], "Lightning, manual optimisation": []}
    for _ in range(REPEATS):
        samples["bare loop"].append(bare_step())
        samples["Lightning, automatic optimisation"].append(lightning_step(manual=False))
        samples["Lightning, manual optimisation"].append(lightning_step(manual=True))
    for name, values in samples.items():
        print(f"{name:<36} {statistics.median(values) * 1e6:6.0f} us per step")


if __name__ == "__main__":
    main()
