"""The data module: a dataset held in memory as uint8 tensors, served in batches by one indexing operation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from mlplab.data.datasets import DATASETS, DataError, ParsedDataset, Split, load_dataset, provide_files
from mlplab.data.user_data import load_image_folder, load_tensor_file, require_path

# A user's own data: ``data=folder`` (images in class folders) and ``data=tensors`` (a .pt or .npz file).
USER_DATA = ("folder", "tensors")


@dataclass(frozen=True)
class DataSettings:
    """The settings of ``data=...``: which dataset, and how it is split and batched."""

    name: str = "fashion_mnist"
    batch_size: int = 128
    eval_batch_size: int = 1000
    val_size: int = 5000
    split_seed: int = 0  # seeds the validation split, and a test split held out of a user's data
    system_dir: str | None = None  # .gz files of a system package, used when the data dir lacks the dataset
    download: bool = True
    path: str | None = None  # folder: the image folder; tensors: the .pt or .npz file
    test_size: int | float = 0.2  # a user's data without a test split: the share (or number) held out to test
    image_size: int | list[int] | None = None  # folder: height and width every image becomes; null: the first's
    channels: int | None = None  # folder: 1 (grayscale) or 3 (RGB); null: the first image's

    def __post_init__(self) -> None:
        if self.name not in (*DATASETS, *USER_DATA):
            raise ValueError(f"name must be one of {', '.join((*DATASETS, *USER_DATA))}; got {self.name!r}")
        for key in ("batch_size", "eval_batch_size", "val_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)}")
        if self.name in USER_DATA and not self.path:
            what = "DIR (an image folder)" if self.name == "folder" else "FILE (a .pt or .npz file)"
            raise ValueError(f"path is required with data={self.name}: data.path={what}")
        if not (self.test_size >= 1 if isinstance(self.test_size, int) else 0 < self.test_size < 1):
            raise ValueError(f"test_size must be a fraction in (0, 1) or a number of images >= 1, got {self.test_size}")
        sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size or []
        if len(sizes) not in (0, 1, 2) or any(size < 1 for size in sizes):
            raise ValueError(f"image_size must be null, an integer >= 1 or [height, width], got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be null, 1 (grayscale) or 3 (RGB), got {self.channels}")


@dataclass(frozen=True)
class PreparedSplits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: list[float]  # per channel, of the training split, on the 0..1 scale
    std: list[float]


def prepare_splits(settings: DataSettings, data_dir: Path) -> PreparedSplits:
    """The three splits and the training split's statistics; computed once per process for the same inputs."""
    if settings.name == "folder":
        dataset = load_image_folder(
            require_path("folder", settings.path),
            settings.image_size,
            settings.channels,
            settings.test_size,
            settings.split_seed,
            data_dir,
        )
    elif settings.name == "tensors":
        dataset = load_tensor_file(require_path("tensors", settings.path), settings.test_size, settings.split_seed)
    else:
        dataset = load_dataset(settings.name, data_dir)
    return _split_once(dataset, settings.val_size, settings.split_seed)


@functools.lru_cache(maxsize=2)
def _split_once(dataset: ParsedDataset, val_size: int, split_seed: int) -> PreparedSplits:
    train, val = split_off_validation(dataset.train, val_size, split_seed)
    mean, std = channel_stats(train.images)
    return PreparedSplits(train, val, dataset.test, dataset.class_names, mean, std)


def split_off_validation(train: Split, val_size: int, split_seed: int) -> tuple[Split, Split]:
    """A seeded split of the training set into (train, validation)."""
    if not 0 < val_size < len(train):
        raise DataError(f"data.val_size must be between 1 and {len(train) - 1} for this dataset, got {val_size}")
    return train.split_off(val_size, split_seed)


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale, from pixel-value counts (no float copy)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        variance = (counts * (values - mean) ** 2).sum() / (counts.sum() - 1)
        means.append(mean.item())
        stds.append(variance.sqrt().item())
    return means, stds


class ShardSampler:
    """Seeded order of the samples for one epoch; ``set_epoch`` reshuffles, as with DistributedSampler.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` at the start of every training epoch. Every rank of a
    data-parallel run draws the same order; ``shard_batches`` deals it out.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
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

    def __init__(self, num_samples: int, seeds: Sequence[int]):
        self.samplers = [ShardSampler(num_samples, True, seed) for seed in seeds]
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

    def __init__(self, split: Split, batch_size: int, seeds: Sequence[int]):
        super().__init__(split, batch_size, SeedSamplers(len(split), seeds))  # type: ignore[arg-type]

    def _batches(self) -> list[Tensor]:
        device = self.split.images.device
        per_run = [shard_batches(sampler.order().to(device), self.batch_size) for sampler in self.sampler.samplers]
        return [torch.stack(batches) for batches in zip(*per_run)]


class ImageDataModule(L.LightningDataModule):
    """A torchvision dataset as three in-memory splits: train, a seeded validation split of it, and test.

    ``shuffle_seed`` orders the training batches of each epoch; ``data_dir`` is where the dataset's files live.
    """

    def __init__(self, settings: DataSettings = DataSettings(), data_dir: str | Path = "data", shuffle_seed: int = 0):
        super().__init__()
        # Plain values only, so the checkpoint records the data set-up and still loads with weights_only=True.
        self.save_hyperparameters(
            {**dataclasses.asdict(settings), "data_dir": str(data_dir), "shuffle_seed": shuffle_seed}, logger=False
        )
        self.settings, self.data_dir, self.shuffle_seed = settings, Path(data_dir), shuffle_seed
        self.splits: dict[str, Split] = {}
        self.class_names: list[str] = []
        self.mean: list[float] = []
        self.std: list[float] = []

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], data_dir: str | Path) -> ImageDataModule:
        """The data module a checkpoint trained with; only the data's location is this machine's."""
        values = dict(checkpoint["datamodule_hyper_parameters"])
        shuffle_seed = values.pop("shuffle_seed")
        values.pop("data_dir")
        return cls(DataSettings(**values), data_dir, shuffle_seed)

    @override
    def prepare_data(self) -> None:
        if self.settings.name in USER_DATA:
            require_path(self.settings.name, self.settings.path)
            return
        system_dir = Path(self.settings.system_dir) if self.settings.system_dir else None
        provide_files(self.settings.name, self.data_dir, system_dir, self.settings.download)

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            prepared = prepare_splits(self.settings, self.data_dir)
            self.class_names, self.mean, self.std = prepared.class_names, prepared.mean, prepared.std
            self.splits = {"train": prepared.train, "val": prepared.val, "test": prepared.test}
        if self.trainer is not None:
            # Once per run; every batch afterwards is one indexing operation on the device.
            device = self.trainer.strategy.root_device
            self.splits = {key: split.to(device) for key, split in self.splits.items()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _batches(self, key: str, shuffle: bool, batch_size: int) -> InMemoryBatches:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        split = self.splits[key]
        sampler = ShardSampler(len(split), shuffle, self.shuffle_seed, rank, world_size)
        return InMemoryBatches(split, batch_size, sampler)

    @override
    def transfer_batch_to_device(
        self, batch: tuple[Tensor, Tensor], device: torch.device, dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        # The batches are cut on the device already; Lightning's generic walk over the batch costs more than a step.
        images, labels = batch
        return images.to(device), labels.to(device)

    @override
    def train_dataloader(self) -> InMemoryBatches:
        return self._batches("train", shuffle=True, batch_size=self.settings.batch_size)

    @override
    def val_dataloader(self) -> InMemoryBatches:
        return self._batches("val", shuffle=False, batch_size=self.settings.eval_batch_size)

    @override
    def test_dataloader(self) -> InMemoryBatches:
        return self._batches("test", shuffle=False, batch_size=self.settings.eval_batch_size)


class StackedDataModule(ImageDataModule):
    """The data of K runs that differ only in their seeds' batch order: training serves StackedBatches;
    validation and test batches are the same for all."""

    def __init__(self, settings: DataSettings, data_dir: str | Path, seeds: Sequence[int]):
        super().__init__(settings, data_dir, shuffle_seed=seeds[0])
        self.seeds = list(seeds)

    @override
    def train_dataloader(self) -> StackedBatches:
        return StackedBatches(self.splits["train"], self.settings.batch_size, self.seeds)
