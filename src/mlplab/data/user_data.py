"""A user's own data: a folder of images in torchvision's ImageFolder layout (``data=folder``), or arrays in a
``.pt`` or ``.npz`` file (``data=tensors``); both become the same uint8 tensors as the built-in sets.

A folder is decoded once, into the data dir's cache; the cache is rebuilt when any file changes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from mlplab.data.datasets import CACHE_DIR, DataError, DataUnavailableError, ParsedDataset, Split, cached
from mlplab.data.images import read_image

log = logging.getLogger(__name__)

TENSOR_SUFFIXES = (".pt", ".npz")
SHOWN = 5  # problem files named in a message


def require_path(kind: str, path: str) -> Path:
    """The path ``data.path`` names, which must be a directory (folder) or a .pt/.npz file (tensors)."""
    where = Path(path).expanduser()
    if kind == "folder" and not where.is_dir():
        raise DataUnavailableError(
            f"data.path={path}: no such directory; data=folder reads DIR/<class>/<image> "
            "or DIR/train/<class>/<image> and DIR/test/<class>/<image>"
        )
    if kind == "tensors" and not where.is_file():
        raise DataUnavailableError(f"data.path={path}: no such file; data=tensors reads a .pt or .npz file")
    return where


def held_out(split: Split, size: int | float, seed: int) -> tuple[Split, Split]:
    """A seeded (rest, held-out) split: ``size`` samples, or that fraction of them."""
    count = round(size * len(split)) if isinstance(size, float) else size
    if not 0 < count < len(split):
        raise DataError(
            f"data.test_size={size} holds out {count} of {len(split)} images; it must leave some for "
            "training and some for testing"
        )
    return split.split_off(count, seed)


# --- data=folder ----------------------------------------------------------------------------------------------


def load_image_folder(
    root: Path,
    image_size: Sequence[int] | None,
    channels: int | None,
    test_size: int | float,
    split_seed: int,
    data_dir: Path,
) -> ParsedDataset:
    """Both splits of an image folder: ``root/train`` and ``root/test``, or ``root`` itself with ``test_size`` of
    it held out (seeded by ``split_seed``). Images are converted to ``channels`` and ``image_size`` (H, W), by
    default the first image's."""
    parts = {"train": root / "train", "test": root / "test"}
    split_layout = all(p.is_dir() for p in parts.values())
    listings = {name: _listing(p) for name, p in parts.items()} if split_layout else {"all": _listing(root)}
    if split_layout and listings["train"][0] != listings["test"][0]:
        train, test = set(listings["train"][0]), set(listings["test"][0])
        raise DataError(
            f"data.path={root}: train/ and test/ have different classes (only in train/: "
            f"{', '.join(sorted(train - test)) or 'none'}; only in test/: {', '.join(sorted(test - train)) or 'none'})"
        )
    first = next(iter(listings.values()))[1][0][0]
    shape = _image_shape(first, image_size, channels)
    files = [
        (path, stat.st_size, stat.st_mtime_ns)
        for _, samples in listings.values()
        for path, _ in samples
        for stat in [Path(path).stat()]
    ]
    signature = hashlib.sha256(repr((str(root.resolve()), shape, split_layout, files)).encode()).hexdigest()
    return _decode_once(root, shape, split_layout, signature, data_dir, test_size, split_seed)


@functools.lru_cache(maxsize=2)
def _decode_once(
    root: Path,
    shape: tuple[int, int, int],
    split_layout: bool,
    signature: str,
    data_dir: Path,
    test_size: int | float,
    split_seed: int,
) -> ParsedDataset:
    # Keyed by every file's size and time: a sweep's jobs decode once; an added, removed or changed file misses it.
    cache = data_dir / CACHE_DIR / f"folder-{signature[:16]}.pt"

    def decode() -> ParsedDataset:
        if split_layout:
            train, class_names = _decode(root / "train", shape)
            test, _ = _decode(root / "test", shape)
            return ParsedDataset(train, test, class_names)
        everything, class_names = _decode(root, shape)
        train, test = held_out(everything, test_size, split_seed)
        return ParsedDataset(train, test, class_names)

    # A folder without test/ is split before caching: then test_size and split_seed are part of what is cached.
    held_out_by = (repr(test_size), split_seed) if not split_layout else ()
    return cached(cache, ((signature, *held_out_by),), decode)


def _listing(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) of ImageFolder's layout; DataError for an empty folder or class."""
    try:
        classes, class_to_index = find_classes(str(directory))
    except FileNotFoundError:
        raise DataError(
            f"data.path: {directory} has no class folders; put each class's images in a folder of "
            "its own (DIR/<class>/<image>)"
        ) from None
    samples = make_dataset(str(directory), class_to_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(classes) - {classes[index] for _, index in samples})
    if empty:
        raise DataError(
            f"data.path: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {directory} "
            f"{'have' if len(empty) > 1 else 'has'} no images ({', '.join(IMG_EXTENSIONS)})"
        )
    return classes, samples


def _image_shape(first: str, image_size: Sequence[int] | None, channels: int | None) -> tuple[int, int, int]:
    """(C, H, W) every image becomes: as set, else the first image's."""
    try:
        with Image.open(first) as image:
            width, height = image.size
            mode_channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    except (OSError, ValueError) as error:
        raise DataError(f"data.path: cannot read the image {first} ({error})") from None
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return channels or mode_channels, height, width


def _decode(directory: Path, shape: tuple[int, int, int]) -> tuple[Split, list[str]]:
    classes, samples = _listing(directory)
    log.info(
        "Decoding %d images in %s to %s uint8 (once; then from the cache)",
        len(samples),
        directory,
        "x".join(map(str, shape)),
    )
    images = torch.empty((len(samples), *shape), dtype=torch.uint8)
    unreadable = []
    for i, (path, _) in enumerate(
        tqdm(samples, desc=f"Decoding {directory.name or directory}", unit="image", disable=None, leave=False)
    ):
        try:
            images[i] = read_image(Path(path), shape)
        except (OSError, ValueError) as error:
            unreadable.append(f"{path} ({error})")
    if unreadable:
        raise DataError(
            f"data.path: {len(unreadable)} file{'s' if len(unreadable) > 1 else ''} cannot be read as "
            f"images: {'; '.join(unreadable[:SHOWN])}{' ...' if len(unreadable) > SHOWN else ''}; "
            "remove or replace them"
        )
    return Split(images, torch.tensor([index for _, index in samples], dtype=torch.long)), classes


# --- data=tensors ---------------------------------------------------------------------------------------------


def load_tensor_file(path: Path, test_size: int | float, split_seed: int) -> ParsedDataset:
    """``images`` and ``labels``, or ``train_images``/``train_labels`` with ``test_images``/``test_labels``, and
    optionally ``class_names``: from a .pt file (a dict of tensors) or an .npz file (numpy arrays)."""
    if path.suffix not in TENSOR_SUFFIXES:
        raise DataError(f"data.path={path}: data=tensors reads {' or '.join(TENSOR_SUFFIXES)} files")
    try:
        if path.suffix == ".pt":
            arrays = torch.load(path, weights_only=True, map_location="cpu")
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = dict(npz)
    except Exception as error:  # a damaged or foreign file: torch and numpy raise many kinds
        raise DataError(f"data.path={path}: cannot read it ({type(error).__name__}: {error})".splitlines()[0]) from None
    if not isinstance(arrays, dict):
        raise DataError(f"data.path={path}: must hold a dict of arrays, got {type(arrays).__name__}")
    if "train_images" in arrays:
        train, test = _split_of(arrays, path, "train_"), _split_of(arrays, path, "test_")
        if train.images.shape[1:] != test.images.shape[1:]:
            raise DataError(
                f"data.path={path}: train_images are {tuple(train.images.shape[1:])} but test_images "
                f"are {tuple(test.images.shape[1:])}"
            )
    else:
        train, test = held_out(_split_of(arrays, path, ""), test_size, split_seed)
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    names = [str(name) for name in arrays.get("class_names", range(classes))]
    if len(names) < classes:
        raise DataError(f"data.path={path}: class_names has {len(names)} names but the labels go up to {classes - 1}")
    return ParsedDataset(train, test, names)


def _split_of(arrays: dict, path: Path, prefix: str) -> Split:
    keys = (f"{prefix}images", f"{prefix}labels")
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise DataError(
            f"data.path={path}: no {', '.join(missing)}; give images and labels, or train_images, "
            f"train_labels, test_images and test_labels (found: {', '.join(map(str, arrays))})"
        )
    images, labels = (
        torch.as_tensor(np.asarray(arrays[key])) if not torch.is_tensor(arrays[key]) else arrays[key] for key in keys
    )
    if images.dtype != torch.uint8:
        raise DataError(f"data.path={path}: {keys[0]} must be uint8 (0-255), got {images.dtype}")
    images = _channels_first(images, path, keys[0])
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool or len(labels) != len(images):
        raise DataError(
            f"data.path={path}: {keys[1]} must be {len(images)} integers, one per image; got "
            f"{labels.dtype} of shape {tuple(labels.shape)}"
        )
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"data.path={path}: {keys[1]} must be class indices >= 0, got {int(labels.min())}")
    return Split(images.contiguous(), labels.long())


def _channels_first(images: Tensor, path: Path, key: str) -> Tensor:
    """N x H x W, N x C x H x W or N x H x W x C (C: 1 or 3) as N x C x H x W."""
    if images.ndim == 3:
        return images.unsqueeze(1)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.permute(0, 3, 1, 2)
    raise DataError(
        f"data.path={path}: {key} has shape {tuple(images.shape)}; expected N x H x W, N x C x H x W or "
        "N x H x W x C with 1 or 3 channels"
    )
