"""The settings of ``data=...``: which dataset, where it is, and how it is split and batched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlplab.errors import SettingError


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: its title, and the torchvision class that fetches and parses it (``class_name`` in
    ``torchvision.datasets``, imported only where the data is loaded: settings are checked without torchvision)."""

    title: str
    class_name: str

    @property
    def dataset_class(self) -> Any:
        from torchvision import datasets

        return getattr(datasets, self.class_name)

    def raw_files(self, data_dir: Path) -> list[Path]:
        """The files torchvision's parser reads, under ``data_dir``."""
        from torchvision import datasets

        cls = self.dataset_class
        if issubclass(cls, datasets.MNIST):
            raw = data_dir / cls.__name__ / "raw"
            return [raw / Path(name).stem for name, _ in cls.resources]
        base = data_dir / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [base / name for name in names]


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("Fashion-MNIST", "FashionMNIST"),
    "mnist": DatasetSpec("MNIST", "MNIST"),
    "kmnist": DatasetSpec("KMNIST", "KMNIST"),
    "cifar10": DatasetSpec("CIFAR-10", "CIFAR10"),
}

# A user's own data: ``data=folder`` (images in class folders) and ``data=tensors`` (a .pt or .npz file).
USER_DATA = ("folder", "tensors")
DATA_DIR = "data"  # where datasets live unless paths.data_dir (or MLPLAB_DATA_DIR) says otherwise
# data.val_size unless given: the built-in sets have 60,000 or 50,000 training images and a validation split of
# 5,000 in the literature; a user's data may have any number, so a share of it.
BUILT_IN_VAL_SIZE = 5000
USER_VAL_SIZE = 0.1


def _is_share_or_count(value: int | float) -> bool:
    """A fraction in (0, 1), or a whole number >= 1."""
    return value >= 1 if isinstance(value, int) else 0 < value < 1


@dataclass(frozen=True)
class DataSettings:
    """The settings of ``data=...``: which dataset, and how it is split and batched."""

    name: str = "fashion_mnist"
    batch_size: int = 128
    eval_batch_size: int = 1000
    # The training images split off for validation: a number, or a share in (0, 1). None: the dataset's default,
    # BUILT_IN_VAL_SIZE for the built-in sets and USER_VAL_SIZE for a user's data.
    val_size: int | float | None = None
    split_seed: int = 0  # seeds the validation split, and a test split held out of a user's data
    system_dir: str | None = None  # .gz files of a system package, used when the data dir lacks the dataset
    download: bool = True
    path: str | None = None  # folder: the image folder; tensors: the .pt or .npz file
    test_size: int | float = 0.2  # a user's data without a test split: the share (or number) held out to test
    image_size: int | list[int] | None = None  # folder: height and width every image becomes; null: the first's
    channels: int | None = None  # folder: 1 (grayscale) or 3 (RGB); null: the first image's

    def __post_init__(self) -> None:
        if self.name not in (*DATASETS, *USER_DATA):
            raise SettingError("name", f"name must be one of {', '.join((*DATASETS, *USER_DATA))}; got {self.name!r}")
        if self.val_size is None:
            object.__setattr__(self, "val_size", USER_VAL_SIZE if self.name in USER_DATA else BUILT_IN_VAL_SIZE)
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise SettingError(key, f"{key} must be an integer >= 1, got {getattr(self, key)}")
        if not _is_share_or_count(self.val_size):
            raise SettingError(
                "val_size",
                f"val_size must be a fraction in (0, 1) or a number of images >= 1, got {self.val_size}",
            )
        if self.name in USER_DATA and not self.path:
            what = "DIR (an image folder)" if self.name == "folder" else "FILE (a .pt or .npz file)"
            raise SettingError("path", f"path is required with data={self.name}: data.path={what}")
        if not _is_share_or_count(self.test_size):
            raise SettingError(
                "test_size",
                f"test_size must be a fraction in (0, 1) or a number of images >= 1, got {self.test_size}",
            )
        sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size or []
        if len(sizes) not in (0, 1, 2) or any(size < 1 for size in sizes):
            raise SettingError(
                "image_size", f"image_size must be null, an integer >= 1 or [height, width], got {self.image_size}"
            )
        if self.channels not in (None, 1, 3):
            raise SettingError("channels", f"channels must be null, 1 (grayscale) or 3 (RGB), got {self.channels}")
