"""The data module: a dataset held in memory as uint8 tensors, served in batches by one indexing operation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from mlplab.data.batches import SEED_AND_EPOCH, SEED_PLUS_EPOCH, InMemoryBatches, ShardSampler, StackedBatches
from mlplab.data.datasets import DataError, ParsedDataset, Split, load_dataset, provide_files
from mlplab.data.settings import DATA_DIR, USER_DATA, DataSettings
from mlplab.data.user_data import load_image_folder, load_tensor_file, require_path


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
def _split_once(dataset: ParsedDataset, val_size: int | float, split_seed: int) -> PreparedSplits:
    train, val = split_off_validation(dataset.train, val_size, split_seed)
    mean, std = channel_stats(train.images)
    return PreparedSplits(train, val, dataset.test, dataset.class_names, mean, std)


def split_off_validation(train: Split, val_size: int | float, split_seed: int) -> tuple[Split, Split]:
    """A seeded split of the training set into (train, validation); ``val_size`` is a number of images or a share
    of them."""
    if isinstance(val_size, float):
        count = round(val_size * len(train))
        if not 0 < count < len(train):
            raise DataError(
                f"data.val_size={val_size} is {count} of the {len(train)} training images; validation and training "
                f"need at least one each: give a number of images between 1 and {len(train) - 1}"
            )
        return train.split_off(count, split_seed)
    if not 0 < val_size < len(train):
        raise DataError(
            f"data.val_size must be between 1 and {len(train) - 1} for this dataset (or a fraction in (0, 1)), "
            f"got {val_size}"
        )
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


def batch_orders_of(checkpoint: dict[str, Any] | None) -> str:
    """How a run that starts now (None) or resumes from ``checkpoint`` draws its epochs' orders: as it started, so
    that it continues exactly. Checkpoints of earlier versions record nothing; they drew from seed + epoch."""
    if checkpoint is None:
        return SEED_AND_EPOCH
    return checkpoint["datamodule_hyper_parameters"].get("batch_orders", SEED_PLUS_EPOCH)


class ImageDataModule(L.LightningDataModule):
    """A torchvision dataset as three in-memory splits: train, a seeded validation split of it, and test.

    ``shuffle_seed`` orders the training batches of each epoch, drawn as ``batch_orders`` says (batch_orders_of);
    ``data_dir`` is where the dataset's files live.
    """

    def __init__(
        self,
        settings: DataSettings | None = None,
        data_dir: str | Path = DATA_DIR,
        shuffle_seed: int = 0,
        batch_orders: str = SEED_AND_EPOCH,
    ) -> None:
        settings = settings or DataSettings()
        super().__init__()
        # Plain values only, so the checkpoint records the data set-up and still loads with weights_only=True.
        hparams = {**dataclasses.asdict(settings), "data_dir": str(data_dir), "shuffle_seed": shuffle_seed}
        self.save_hyperparameters({**hparams, "batch_orders": batch_orders}, logger=False)
        self.settings, self.data_dir, self.shuffle_seed = settings, Path(data_dir), shuffle_seed
        self.batch_orders = batch_orders
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
        values.pop("batch_orders", None)
        return cls(DataSettings(**values), data_dir, shuffle_seed, batch_orders_of(checkpoint))

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
        sampler = ShardSampler(len(split), shuffle, self.shuffle_seed, rank, world_size, self.batch_orders)
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

    def __init__(
        self, settings: DataSettings, data_dir: str | Path, seeds: Sequence[int], batch_orders: str = SEED_AND_EPOCH
    ):
        super().__init__(settings, data_dir, shuffle_seed=seeds[0], batch_orders=batch_orders)
        self.seeds = list(seeds)

    @override
    def train_dataloader(self) -> StackedBatches:
        return StackedBatches(self.splits["train"], self.settings.batch_size, self.seeds, self.batch_orders)
