"""Synthetic datasets in the real on-disk formats, so torchvision's own parsers read them."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of the MNIST family: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def learnable_images(labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright band whose position encodes the label, so a network can learn it in one epoch."""
    images = rng.integers(0, 90, size=(len(labels), *shape), dtype=np.uint8)
    rows = shape[-2] if len(shape) == 2 else shape[0]
    band = rows // 10
    for k in range(10):
        sel = labels == k
        if len(shape) == 2:
            images[sel, k * band : (k + 1) * band, :] = 230
        else:
            images[sel, k * band : (k + 1) * band, :, :] = 230
    return images


def write_mnist_like(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, gz: bool = False) -> dict:
    """The four IDX files in ``directory`` (gzip-compressed like the originals when ``gz``)."""
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
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def write_cifar_like(directory: Path, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five training batches, a test batch and batches.meta in CIFAR-10's pickle layout: {file: (labels, N x C x H x W)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        images = learnable_images(labels, (32, 32, 3), rng)  # H x W x C
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # CIFAR stores C x H x W rows
        with open(directory / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f)
        written[name] = (labels, images.transpose(0, 3, 1, 2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return written


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """A data dir with a small synthetic Fashion-MNIST (600 train, 200 test) in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    write_mnist_like(root / "FashionMNIST" / "raw")
    return root


# Overrides that keep command-line runs on the synthetic data small, offline and quiet.
SYNTHETIC_RUN = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "data.val_size=100",
    "data.batch_size=50",
    "data.system_dir=null",
    "data.download=false",
    "callbacks.progress_bar=null",
]


def run_cli(args: list[str], cwd: Path, data_dir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an mlplab console script the way a user does, in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if data_dir is not None:
        env["MLPLAB_DATA_DIR"] = str(data_dir)
    script = Path(sys.executable).parent / args[0]
    return subprocess.run([str(script), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
