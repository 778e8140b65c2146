"""Batches cut from splits held in memory: the seeded order of an epoch, its share for each data-parallel rank,
and the stateful iterators a Lightning loop reads (one run's, or a stack of runs')."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mlplab.data.datasets import Split

# How an epoch's order comes from the run's seed: both numbers seed the generator together, so no two (seed, epoch)
# pairs share an order. Runs of earlier versions seeded it with their sum, so seed s+1's epoch e was seed s's epoch
# e+1; those resume with the orders they started with (the scheme is recorded in the checkpoint).
SEED_AND_EPOCH = "seed-and-epoch"
SEED_PLUS_EPOCH = "seed+epoch"


def epoch_seed(seed: int, epoch: int, orders: str = SEED_AND_EPOCH) -> int:
    """The generator seed of ``epoch``'s order for a run of ``seed``."""
    if orders == SEED_PLUS_EPOCH:
        return seed + epoch
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


class ShardSampler:
    """Seeded order of the samples for one epoch; ``set_epoch`` reshuffles, as with DistributedSampler.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` at the start of every training epoch. Every rank of a
    data-parallel run draws the same order; ``shard_batches`` deals it out. ``orders``: SEED_AND_EPOCH, or an
    earlier version's SEED_PLUS_EPOCH.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        orders: str = SEED_AND_EPOCH,
    ):
        self.num_samples, self.shuffle, self.seed, self.orders = num_samples, shuffle, seed, orders
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.orders))
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)


def shard_batches(order: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """This rank's batches of ``order``: every sample once across ranks, the same number of batches on each.

    Steps of ``batch_size * world_size`` samples are dealt out in turn (the i-th sample of a step goes to rank
    i mod world_size). DistributedSampler instead repeats samples to even out the ranks, which makes those count
    twice in an epoch; here a last step too small to give every rank a sample joins the one before it.
    """
    starts = _step_starts(len(order), batch_size, world_size)
    ends = [*starts[1:], len(order)]
    return [order[start:end][rank::world_size] for start, end in zip(starts, ends)]


def num_shard_batches(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """len(shard_batches(...)) without drawing the order."""
    return len(_step_starts(num_samples, batch_size, world_size))


def _step_starts(num_samples: int, batch_size: int, world_size: int) -> list[int]:
    starts = list(range(0, num_samples, batch_size * world_size))
    if world_size > 1 and len(starts) > 1 and num_samples - starts[-1] < world_size:
        starts.pop()
    return starts


class InMemoryBatches:
    """Batches of (uint8 images, labels) cut from tensors that already sit on the training device.

    Stateful in Lightning's sense (``state_dict``/``load_state_dict``): a checkpoint taken mid-epoch records how
    many batches of which epoch were served, and a resumed run continues with the next batch of the same order.
    """

    batch_sampler = None  # Lightning inspects loaders that have a ``sampler`` for this DataLoader attribute

    def __init__(self, split: Split, batch_size: int, sampler: ShardSampler):
        self.split, self.batch_size, self.sampler = split, batch_size, sampler
        self._served = 0  # batches handed out in the current pass
        self._resume_at: dict[str, int] | None = None

    def __len__(self) -> int:
        return num_shard_batches(self.sampler.num_samples, self.batch_size, self.sampler.world_size)

    def positions(self) -> Tensor:
        """The split's sample indices this rank is served in one pass, in order (the current epoch's, if shuffled)."""
        return torch.cat(self._batches()) if len(self) else torch.empty(0, dtype=torch.long)

    def _batches(self) -> list[Tensor]:
        order = self.sampler.order().to(self.split.images.device)
        return shard_batches(order, self.batch_size, self.sampler.rank, self.sampler.world_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = self._batches()
        resume, self._resume_at = self._resume_at, None
        self._served = resume["batches"] if resume and resume["epoch"] == self.sampler.epoch else 0
        images, labels = self.split.images, self.split.labels
        for batch in batches[self._served :]:
            self._served += 1
            # index_select copies whole rows; `images[batch]` goes element by element, ten times slower.
            # A batch of several runs (StackedBatches) is K x B indices: K x B x C x H x W images.
            rows = batch.flatten()
            yield (
                images.index_select(0, rows).view(*batch.shape, *images.shape[1:]),
                labels.index_select(0, rows).view(batch.shape),
            )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = dict(state)


class SeedSamplers:
    """The samplers of several runs of one split, each with its own seed; ``set_epoch`` sets all."""

    def __init__(self, num_samples: int, seeds: Sequence[int], orders: str = SEED_AND_EPOCH):
        self.samplers = [ShardSampler(num_samples, True, seed, orders=orders) for seed in seeds]
        self.num_samples, self.rank, self.world_size = num_samples, 0, 1

    @property
    def epoch(self) -> int:
        return self.samplers[0].epoch

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class StackedBatches(InMemoryBatches):
    """The training batches of K runs served together (a stacked sweep): step i gives each run its own i-th batch,
    in its own seed's order, as K x B images and labels."""

    def __init__(self, split: Split, batch_size: int, seeds: Sequence[int], orders: str = SEED_AND_EPOCH):
        super().__init__(split, batch_size, SeedSamplers(len(split), seeds, orders))  # type: ignore[arg-type]

    def _batches(self) -> list[Tensor]:
        device = self.split.images.device
        per_run = [shard_batches(sampler.order().to(device), self.batch_size) for sampler in self.sampler.samplers]
        return [torch.stack(batches) for batches in zip(*per_run)]
