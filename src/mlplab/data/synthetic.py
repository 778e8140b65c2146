"""Synthetic datasets in torchvision's own on-disk formats, for tests, benchmarks and trying mlplab offline.

The images are noise plus a bright band whose position encodes the label, so a network learns them fast.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of the MNIST family: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def learnable_images(labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """uint8 images of ``shape`` (H x W or H x W x C) with a label-dependent band of rows."""
    images = rng.integers(0, 90, size=(len(labels), *shape), dtype=np.uint8)
    band = shape[0] // 10
    for label in range(10):
        images[labels == label, label * band : (label + 1) * band] = 230
    return images


def write_mnist_like(
    directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, gz: bool = False
) -> dict[str, np.ndarray]:
    """The four IDX files of an MNIST-family dataset in ``directory`` (gzip-compressed like the originals if ``gz``)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = learnable_images(labels, (28, 28), rng)
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (directory / name).write_bytes(data)
    return arrays


def write_cifar_like(directory: Path, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10's pickle layout (5 training batches, a test batch, batches.meta): {file: (labels, N x C x H x W)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        images = learnable_images(labels, (32, 32, 3), rng).transpose(0, 3, 1, 2)  # CIFAR stores channels first
        with open(directory / name, "wb") as f:
            pickle.dump({"data": images.reshape(per_batch, -1), "labels": labels.tolist()}, f)
        written[name] = (labels, images)
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    return written
