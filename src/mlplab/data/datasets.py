"""Torchvision datasets on disk: where their files come from, and parsing them once into uint8 tensors."""

from __future__ import annotations

import functools
import gzip
import logging
import math
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets

from mlplab.data.settings import DATASETS
from mlplab.errors import MlplabError, one_line
from mlplab.files import write_atomically

log = logging.getLogger(__name__)

CACHE_DIR = "mlplab-cache"  # inside the data dir: one parsed tensor file per dataset
CACHE_VERSION = 1


class DataError(MlplabError):
    """The data cannot be used as configured; the message names the file or setting and the remedy."""


class DataUnavailableError(DataError):
    """The dataset's files could not be found or fetched; the message says how to provide them."""


class DataDamagedError(DataUnavailableError):
    """A dataset file is truncated, corrupted, or not the file it should be; the message names it."""


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
        with gzip.open(source, "rb") as src:  # a crash mid-copy never leaves a truncated file under the real name
            write_atomically(target, lambda dst: shutil.copyfileobj(src, dst))
    return True


@dataclass
class Split:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def split_off(self, count: int, seed: int) -> tuple[Split, Split]:
        """A seeded split into (the rest, ``count`` samples)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        rest, out = order[count:], order[:count]
        return Split(self.images[rest], self.labels[rest]), Split(self.images[out], self.labels[out])


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per parse, shared by a sweep's jobs
class ParsedDataset:
    train: Split  # the official training split, validation not yet taken out
    test: Split
    class_names: list[str]


def load_dataset(name: str, data_dir: Path) -> ParsedDataset:
    """Both official splits, parsed once: from this process's memory, the cache file, or torchvision's parser."""
    signature = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in DATASETS[name].raw_files(data_dir))
    return _load_once(name, str(data_dir), signature)


@functools.lru_cache(maxsize=2)
def _load_once(name: str, data_dir: str, signature: tuple) -> ParsedDataset:
    # Keyed by the source files' sizes and times: the jobs of one sweep share it, a changed file misses it.
    def parse() -> ParsedDataset:
        check_files(name, Path(data_dir))
        train, class_names = _parse_split(name, Path(data_dir), train=True)
        test, _ = _parse_split(name, Path(data_dir), train=False)
        return ParsedDataset(train, test, class_names)

    return cached(Path(data_dir) / CACHE_DIR / f"{name}.pt", signature, parse)


def cached(path: Path, signature: tuple, parse: Callable[[], ParsedDataset]) -> ParsedDataset:
    """The dataset in the cache file ``path`` if it was made from sources with this ``signature``, else ``parse()``
    (and the cache written for next time)."""
    dataset = _read_cache(path, signature)
    if dataset is None:
        dataset = parse()
        _write_cache(path, dataset, signature)
    return dataset


def check_files(name: str, data_dir: Path) -> None:
    """Refuse damaged source files by name before a parser meets them (its errors name neither file nor remedy)."""
    remedy = "delete it and run again to fetch it anew (from data.system_dir or by download)"
    spec = DATASETS[name]
    if not issubclass(spec.dataset_class, datasets.MNIST):
        return  # torchvision checks CIFAR-10's files against their MD5 sums itself; see _parse_split
    counts = {}
    for path in spec.raw_files(data_dir):
        ndim = 1 if "labels" in path.name else 3
        problem, counts[path.name] = _idx_problem(path, ndim)
        if problem:
            raise DataDamagedError(f"{spec.title} file {path} {problem}; {remedy}")
    for split in ("train", "t10k"):
        images, labels = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            raise DataDamagedError(
                f"{spec.title} files in {data_dir / spec.dataset_class.__name__ / 'raw'} disagree: "
                f"{images} {split} images but {labels} labels; {remedy}"
            )


def _idx_problem(path: Path, ndim: int) -> tuple[str | None, int]:
    """(what is wrong with an IDX file of uint8 data with ``ndim`` dimensions, or None; its item count)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        header = file.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        return f"is truncated ({size} bytes, shorter than its header)", 0
    if header[:4] != bytes([0, 0, 0x08, ndim]):
        return (
            f"is not a {ndim}-dimensional IDX file of bytes (magic number {header[:4].hex()}, "
            f"expected {bytes([0, 0, 8, ndim]).hex()})",
            0,
        )
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + math.prod(dims)
    if size != expected:
        return (
            f"is {'truncated' if size < expected else 'too long'} ({size} bytes; its header promises {expected})",
            dims[0],
        )
    return None, dims[0]


def _parse_split(name: str, data_dir: Path, train: bool) -> tuple[Split, list[str]]:
    """Parse one official split with torchvision's own dataset class."""
    spec = DATASETS[name]
    try:
        dataset = spec.dataset_class(str(data_dir), train=train, download=False)
    except RuntimeError as error:  # CIFAR-10: a file whose MD5 sum is wrong
        raise DataDamagedError(
            f"{spec.title} files in {data_dir} are damaged ({one_line(error)}); delete "
            f"{data_dir / getattr(spec.dataset_class, 'base_folder', '')} and run again to fetch them anew"
        ) from None
    images = torch.as_tensor(dataset.data)
    # MNIST-like data is N x H x W; CIFAR's is N x H x W x C.
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return Split(images, labels), list(dataset.classes)


def _checksums(dataset: ParsedDataset) -> list[int]:
    tensors = (dataset.train.images, dataset.train.labels, dataset.test.images, dataset.test.labels)
    return [zlib.crc32(t.contiguous().numpy()) for t in tensors]


def _write_cache(path: Path, dataset: ParsedDataset, signature: tuple) -> None:
    state = {
        "version": CACHE_VERSION,
        "signature": [list(s) for s in signature],
        "checksums": _checksums(dataset),
        "class_names": dataset.class_names,
        "train": [dataset.train.images, dataset.train.labels],
        "test": [dataset.test.images, dataset.test.labels],
    }
    try:
        write_atomically(path, lambda file: torch.save(state, file))
    except OSError as error:  # a read-only data dir only costs the next run a parse
        log.warning("could not write the dataset cache %s: %s", path, error)


def _read_cache(path: Path, signature: tuple) -> ParsedDataset | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        if state["version"] != CACHE_VERSION or state["signature"] != [list(s) for s in signature]:
            log.info("dataset cache %s is out of date; parsing the source files again", path)
            return None
        dataset = ParsedDataset(Split(*state["train"]), Split(*state["test"]), list(state["class_names"]))
        if _checksums(dataset) != state["checksums"]:
            raise ValueError("checksum mismatch")
        return dataset
    except Exception as error:  # a damaged cache is never trusted, whatever broke in it
        log.warning("dataset cache %s is damaged (%s); parsing the source files again", path, one_line(error))
        return None
