import pytest
import torch
from torchvision import datasets

import mlplab.data.datasets as datasets_module
from mlplab.data.batches import ShardSampler, num_shard_batches, shard_batches
from mlplab.data.datamodule import ImageDataModule
from mlplab.data.datasets import (
    CACHE_DIR,
    DataDamagedError,
    DataUnavailableError,
    _load_once,
    load_dataset,
    provide_files,
)
from mlplab.data.settings import DataSettings
from mlplab.data.synthetic import write_cifar_like, write_mnist_like
from mlplab.model.backbones.mlp import MLP
from mlplab.model.classifier import ImageClassifier


def loaded(data_dir, shuffle_seed=0, **settings) -> ImageDataModule:
    datamodule = ImageDataModule(DataSettings(val_size=100, download=False, **settings), data_dir, shuffle_seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_splits_shapes_and_classes_come_from_torchvision(synthetic_data_dir):
    datamodule = loaded(synthetic_data_dir)
    sizes = {key: len(split) for key, split in datamodule.splits.items()}
    assert sizes == {"train": 500, "val": 100, "test": 200}
    assert datamodule.splits["train"].images.dtype == torch.uint8
    assert datamodule.input_shape == (1, 28, 28)
    assert datamodule.class_names == datasets.FashionMNIST.classes


def test_test_split_is_the_official_test_file(tmp_path):
    arrays = write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    test = loaded(tmp_path).splits["test"]
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_validation_split_is_seeded_disjoint_and_independent_of_run_seed(synthetic_data_dir):
    a, b = loaded(synthetic_data_dir, shuffle_seed=1), loaded(synthetic_data_dir, shuffle_seed=2)
    assert torch.equal(a.splits["val"].images, b.splits["val"].images)
    other = loaded(synthetic_data_dir, split_seed=5)
    assert not torch.equal(a.splits["val"].images, other.splits["val"].images)
    flat = lambda split: {bytes(img.flatten().tolist()) for img in split.images}  # noqa: E731
    assert not flat(a.splits["val"]) & flat(a.splits["train"])


def test_normalisation_standardises_the_training_split(synthetic_data_dir):
    datamodule = loaded(synthetic_data_dir)
    model = ImageClassifier(
        MLP(depth=1, width=8), (1, 28, 28), 10, input_mean=datamodule.mean, input_std=datamodule.std
    )
    x = model.normalize(datamodule.splits["train"].images)
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_shuffling_is_seeded_per_epoch_and_shards_cover_every_sample_once():
    sampler = ShardSampler(103, shuffle=True, seed=7)
    first = sampler.order()
    assert torch.equal(first, ShardSampler(103, shuffle=True, seed=7).order())
    sampler.set_epoch(1)
    assert not torch.equal(first, sampler.order())
    assert sorted(first.tolist()) == list(range(103))
    for num_samples, batch_size, world_size in [
        (103, 10, 3),
        (103, 17, 2),
        (61, 10, 3),
        (60, 10, 3),
        (2, 8, 2),
        (7, 1, 4),
    ]:
        order = torch.randperm(num_samples)
        shards = [shard_batches(order, batch_size, rank, world_size) for rank in range(world_size)]
        seen = torch.cat([torch.cat(batches) for batches in shards])
        assert sorted(seen.tolist()) == list(range(num_samples))  # each sample once, none repeated
        lengths = {len(batches) for batches in shards}  # ranks step together: the same number of batches
        assert lengths == {num_shard_batches(num_samples, batch_size, world_size)}
        assert all(len(batch) >= 1 for batches in shards for batch in batches), (num_samples, batch_size, world_size)
        assert all(len(batch) <= batch_size + 1 for batches in shards for batch in batches)
    assert [len(b) for b in shard_batches(torch.arange(61), 10, 0, 3)] == [10, 11]  # the last sample joins a step


def test_training_batches_are_one_epoch_of_the_split(synthetic_data_dir):
    datamodule = loaded(synthetic_data_dir, batch_size=64)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == len(datamodule.train_dataloader()) == 8  # 500 / 64, last one short
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.sort().values, datamodule.splits["train"].labels.sort().values)
    assert batches[0][0].shape == (64, 1, 28, 28) and batches[0][0].dtype == torch.uint8
    evaluation = torch.cat([y for _, y in datamodule.val_dataloader()])
    assert torch.equal(evaluation, datamodule.splits["val"].labels)  # in order, not shuffled


def test_offline_system_package_files_are_decompressed_into_data_dir(tmp_path):
    system_dir = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_mnist_like(system_dir, gz=True)
    data_dir = tmp_path / "data"
    assert provide_files("fashion_mnist", data_dir, system_dir, download=False) == str(system_dir)
    assert (data_dir / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    datamodule = loaded(data_dir, system_dir=system_dir)
    assert len(datamodule.splits["test"]) == len(arrays["t10k-labels-idx1-ubyte"])
    # Second time the files are already in the data dir.
    assert provide_files("fashion_mnist", data_dir, system_dir, download=False) == "data_dir"


def test_missing_data_names_dataset_data_dir_and_remedies(tmp_path):
    with pytest.raises(DataUnavailableError) as caught:
        provide_files("fashion_mnist", tmp_path / "data", tmp_path / "nothing-here", download=False)
    message = str(caught.value)
    assert "Fashion-MNIST" in message and str(tmp_path / "data") in message
    assert "apt-get install dataset-fashion-mnist" in message and "MLPLAB_DATA_DIR" in message
    assert "\n" not in message


def test_cifar_like_batches_parse_with_torchvision(tmp_path, monkeypatch):
    base = tmp_path / datasets.CIFAR10.base_folder
    written = write_cifar_like(base)
    # torchvision checks each file's md5 against the real CIFAR-10; point it at the synthetic files' sums.
    from torchvision.datasets.utils import calculate_md5

    monkeypatch.setattr(
        datasets.CIFAR10,
        "train_list",
        [[f"data_batch_{i}", calculate_md5(base / f"data_batch_{i}")] for i in range(1, 6)],
    )
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", calculate_md5(base / "test_batch")]])
    monkeypatch.setattr(
        datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": calculate_md5(base / "batches.meta")}
    )
    datamodule = ImageDataModule(DataSettings("cifar10", val_size=10, download=False), tmp_path)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.input_shape == (3, 32, 32)
    assert len(datamodule.splits["train"]) == 90 and len(datamodule.splits["test"]) == 20
    labels, images = written["test_batch"]
    assert torch.equal(datamodule.splits["test"].labels, torch.as_tensor(labels))
    assert torch.equal(datamodule.splits["test"].images, torch.from_numpy(images))  # channels first, as written
    assert datamodule.class_names[0] == "airplane" and len(datamodule.mean) == 3


def test_a_damaged_cifar_file_is_named_with_the_remedy(tmp_path, monkeypatch):
    base = tmp_path / datasets.CIFAR10.base_folder
    write_cifar_like(base)
    from torchvision.datasets.utils import calculate_md5

    # The other files pass torchvision's MD5 check; the test batch, cut short, does not.
    monkeypatch.setattr(
        datasets.CIFAR10,
        "train_list",
        [[f"data_batch_{i}", calculate_md5(base / f"data_batch_{i}")] for i in range(1, 6)],
    )
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", calculate_md5(base / "test_batch")]])
    monkeypatch.setattr(
        datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": calculate_md5(base / "batches.meta")}
    )
    (base / "test_batch").write_bytes((base / "test_batch").read_bytes()[:100])
    datamodule = ImageDataModule(DataSettings("cifar10", val_size=10, download=False), tmp_path)
    with pytest.raises(DataDamagedError) as refused:
        datamodule.setup("fit")
    message = str(refused.value)
    assert "CIFAR-10 files in" in message and "damaged" in message and f"delete {base}" in message
    assert "\n" not in message


@pytest.fixture
def fresh_process(monkeypatch):
    """Forget the datasets this test process parsed, as a new run would."""
    _load_once.cache_clear()
    yield
    _load_once.cache_clear()


def parse_calls(monkeypatch) -> list:
    calls = []
    original = datasets_module._parse_split
    monkeypatch.setattr(datasets_module, "_parse_split", lambda *a, **k: calls.append(a) or original(*a, **k))
    return calls


def test_later_runs_load_the_cache_instead_of_parsing(tmp_path, monkeypatch, fresh_process):
    arrays = write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    calls = parse_calls(monkeypatch)
    first = load_dataset("fashion_mnist", tmp_path)
    assert len(calls) == 2 and (tmp_path / CACHE_DIR / "fashion_mnist.pt").is_file()
    _load_once.cache_clear()
    second = load_dataset("fashion_mnist", tmp_path)
    assert len(calls) == 2  # no parse: read from the cache file
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.test.labels, first.test.labels)
    assert torch.equal(second.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert second.class_names == datasets.FashionMNIST.classes


def test_cache_is_rebuilt_when_a_source_file_changes(tmp_path, monkeypatch, fresh_process):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_like(raw, seed=0)
    load_dataset("fashion_mnist", tmp_path)
    arrays = write_mnist_like(raw, seed=1)  # new content, same sizes
    calls = parse_calls(monkeypatch)
    _load_once.cache_clear()
    reloaded = load_dataset("fashion_mnist", tmp_path)
    assert len(calls) == 2
    assert torch.equal(reloaded.train.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage"])
def test_damaged_cache_is_rebuilt_not_trusted(damage, tmp_path, monkeypatch, fresh_process, caplog):
    arrays = write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    load_dataset("fashion_mnist", tmp_path)
    cache = tmp_path / CACHE_DIR / "fashion_mnist.pt"
    data = bytearray(cache.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF  # inside the image tensor: still loads, wrong pixels
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not a cache")
    cache.write_bytes(bytes(data))
    calls = parse_calls(monkeypatch)
    _load_once.cache_clear()
    reloaded = load_dataset("fashion_mnist", tmp_path)
    assert len(calls) == 2 and "damaged" in caplog.text
    assert torch.equal(reloaded.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    _load_once.cache_clear()
    assert torch.equal(load_dataset("fashion_mnist", tmp_path).train.images, reloaded.train.images)  # cache repaired


def test_fast_batches_equal_an_index_by_index_reference(synthetic_data_dir):
    datamodule = loaded(synthetic_data_dir, batch_size=64, shuffle_seed=3)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(2)
    split = datamodule.splits["train"]
    order = loader.positions().tolist()
    # The order is the seed's and the epoch's, the same on every machine and version: a resumed or repeated run
    # sees the same batches. These are the first positions of shuffle seed 3's third epoch over 500 samples.
    assert order[:8] == [174, 47, 27, 262, 293, 317, 473, 413]
    loader.sampler.set_epoch(0)
    assert loader.positions()[:8].tolist() == [266, 284, 19, 331, 166, 229, 495, 209]
    loader.sampler.set_epoch(2)
    assert sorted(order) == list(range(len(split))) == list(range(500))
    for number, (images, labels) in enumerate(loader):
        chunk = order[number * 64 : (number + 1) * 64]
        assert torch.equal(images, torch.stack([split.images[i] for i in chunk]))
        assert torch.equal(labels, torch.stack([split.labels[i] for i in chunk]))
    assert number == len(loader) - 1


DAMAGES = {  # file -> (how it is damaged, what the message must say)
    "truncated": ("train-images-idx3-ubyte", lambda data: data[: len(data) // 2], "is truncated"),
    "wrong magic": ("t10k-labels-idx1-ubyte", lambda data: b"\x00\x00\x08\x03" + data[4:], "magic number 00000803"),
    "not IDX at all": ("train-labels-idx1-ubyte", lambda data: b"<html>oops", "is not a 1-dimensional IDX file"),
    "counts disagree": (
        "t10k-labels-idx1-ubyte",
        lambda data: data[:4] + (199).to_bytes(4, "big") + data[8:-1],
        "200 t10k images but 199 labels",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_dataset_files_are_named_with_the_remedy(damage, tmp_path):
    from conftest import SYNTHETIC_RUN, run_cli

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    name, damaged, message = DAMAGES[damage]
    (raw / name).write_bytes(damaged((raw / name).read_bytes()))
    if damage == "truncated":  # once through the real command line
        result = run_cli(["mlplab-train", *SYNTHETIC_RUN], tmp_path, tmp_path / "data")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        error = result.stderr
        assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.json"))
    else:
        with pytest.raises(datasets_module.DataDamagedError) as raised:
            load_dataset("fashion_mnist", tmp_path / "data")
        error = str(raised.value)
    assert str(raw / name) in error or (damage == "counts disagree" and str(raw) in error)
    assert message in error and "delete it and run again to fetch it anew" in error
