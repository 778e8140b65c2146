"""Torchvision datasets held in memory as uint8 tensors, served in batches by one indexing operation."""

from __future__ import annotations

import gzip
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchvision import datasets


class DataUnavailableError(RuntimeError):
    """The dataset's files could not be found or fetched; the message says how to provide them."""


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    dataset_class: type[datasets.VisionDataset]

    def raw_files(self, data_dir: Path) -> list[Path]:
        """The files torchvision's parser reads, under ``data_dir``."""
        cls = self.dataset_class
        if issubclass(cls, datasets.MNIST):
            raw = data_dir / cls.__name__ / "raw"
            return [raw / Path(name).stem for name, _ in cls.resources]
        base = data_dir / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [base / name for name in names]


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("Fashion-MNIST", datasets.FashionMNIST),
    "mnist": DatasetSpec("MNIST", datasets.MNIST),
    "kmnist": DatasetSpec("KMNIST", datasets.KMNIST),
    "cifar10": DatasetSpec("CIFAR-10", datasets.CIFAR10),
}


def provide_files(name: str, data_dir: Path, system_dir: Path | None = None, download: bool = True) -> str:
    """Make sure the dataset's files are in ``data_dir``; returns where they came from.

    Order: ``data_dir`` itself, then ``system_dir`` (the ``.gz`` files of a system package such as
    Debian's dataset-fashion-mnist, decompressed into ``data_dir``), then torchvision's download.
    """
    spec = DATASETS[name]
    files = spec.raw_files(data_dir)
    if all(f.is_file() for f in files):
        return "data_dir"
    tried = [f"{files[0].parent} (missing {', '.join(f.name for f in files if not f.is_file())})"]
    if system_dir is not None:
        if _copy_system_files(system_dir, files):
            return str(system_dir)
        tried.append(f"{system_dir} (no such files)")
    if download:
        try:
            for train in (True, False):
                spec.dataset_class(str(data_dir), train=train, download=True)
            return "download"
        except Exception as exc:  # torchvision raises many kinds here (URLError, RuntimeError, OSError)
            reason = str(exc).splitlines()[0][:160] if str(exc) else ""
            tried.append(f"torchvision's download ({type(exc).__name__}: {reason})")
    else:
        tried.append("torchvision's download (off: data.download=false)")
    hint = "put the files there, or point MLPLAB_DATA_DIR (or paths.data_dir) at a folder that has them"
    if name == "fashion_mnist":
        hint += ", or install the Debian package: apt-get install dataset-fashion-mnist"
    raise DataUnavailableError(f"{spec.title} is not available. Tried: {'; '.join(tried)}. To provide it, {hint}.")


def _copy_system_files(system_dir: Path, files: list[Path]) -> bool:
    sources = [system_dir / f"{f.name}.gz" for f in files]
    if not all(s.is_file() for s in sources):
        return False
    for source, target in zip(sources, files):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)  # a crash mid-copy never leaves a truncated file under the real name
    return True


@dataclass
class Split:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


def load_split(name: str, data_dir: Path, train: bool) -> tuple[Split, list[str]]:
    """Parse one official split with torchvision's own dataset class."""
    dataset = DATASETS[name].dataset_class(str(data_dir), train=train, download=False)
    images = torch.as_tensor(dataset.data)
    # MNIST-like data is N x H x W; CIFAR's is N x H x W x C.
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return Split(images, labels), list(dataset.classes)


def split_off_validation(train: Split, val_size: int, split_seed: int) -> tuple[Split, Split]:
    """A seeded split of the training set into (train, validation)."""
    if not 0 < val_size < len(train):
        raise ValueError(f"data.val_size must be between 1 and {len(train) - 1} for this dataset, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Split(train.images[train_idx], train.labels[train_idx]), Split(train.images[val_idx], train.labels[val_idx])


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1).tolist()


class ShardSampler:
    """Seeded order of sample indices for one rank; ``set_epoch`` reshuffles, as with DistributedSampler.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` at the start of every training epoch.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class InMemoryBatches:
    """Batches of (uint8 images, labels) cut from tensors that already sit on the training device."""

    batch_sampler = None  # Lightning inspects loaders that have a ``sampler`` for this DataLoader attribute

    def __init__(self, split: Split, batch_size: int, sampler: ShardSampler):
        self.split, self.batch_size, self.sampler = split, batch_size, sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self.sampler.indices().to(self.split.images.device)
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.split.images[batch], self.split.labels[batch]


class ImageDataModule(L.LightningDataModule):
    """A torchvision dataset as three in-memory splits: train, a seeded validation split of it, and test."""

    def __init__(
        self,
        name: str = "fashion_mnist",
        data_dir: str | Path = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        system_dir: str | Path | None = None,
        download: bool = True,
    ):
        super().__init__()
        # Plain values only, so the checkpoint records the data set-up and still loads with weights_only=True.
        self.save_hyperparameters({"name": name, "data_dir": str(data_dir), "batch_size": batch_size,
                                   "val_size": val_size, "split_seed": split_seed, "shuffle_seed": shuffle_seed,
                                   "system_dir": str(system_dir) if system_dir else None, "download": download})
        if name not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
        self.name, self.data_dir = name, Path(data_dir)
        self.batch_size, self.val_size = batch_size, val_size
        self.split_seed, self.shuffle_seed = split_seed, shuffle_seed
        self.system_dir = Path(system_dir) if system_dir else None
        self.download = download
        self.splits: dict[str, Split] = {}
        self.class_names: list[str] = []
        self.mean: list[float] = []
        self.std: list[float] = []

    def prepare_data(self) -> None:
        provide_files(self.name, self.data_dir, self.system_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            train, self.class_names = load_split(self.name, self.data_dir, train=True)
            test, _ = load_split(self.name, self.data_dir, train=False)
            train, val = split_off_validation(train, self.val_size, self.split_seed)
            self.mean, self.std = channel_stats(train.images)
            self.splits = {"train": train, "val": val, "test": test}
        if self.trainer is not None:
            # Once per run; every batch afterwards is one indexing operation on the device.
            device = self.trainer.strategy.root_device
            self.splits = {key: split.to(device) for key, split in self.splits.items()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].images.shape[1:])

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _batches(self, key: str, shuffle: bool) -> InMemoryBatches:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        split = self.splits[key]
        sampler = ShardSampler(len(split), shuffle, self.shuffle_seed, rank, world_size)
        return InMemoryBatches(split, self.batch_size, sampler)

    def train_dataloader(self) -> InMemoryBatches:
        return self._batches("train", shuffle=True)

    def val_dataloader(self) -> InMemoryBatches:
        return self._batches("val", shuffle=False)

    def test_dataloader(self) -> InMemoryBatches:
        return self._batches("test", shuffle=False)
