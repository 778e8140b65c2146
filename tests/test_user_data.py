"""A user's own data: data=folder (images in class folders, read by torchvision's ImageFolder rules and decoded by
Pillow) and data=tensors (.pt and .npz files), through the same in-memory batches, cache, views and predict."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_RUN, run_cli
from PIL import Image

from mlplab.data.datamodule import prepare_splits
from mlplab.data.datasets import DataError
from mlplab.data.settings import DataSettings
from mlplab.data.synthetic import learnable_images
from mlplab.data.user_data import _decode_once
from mlplab.errors import SettingError

# The synthetic runs' settings, less those of the built-in sets' files.
FOLDER_RUN = [o for o in SYNTHETIC_RUN if not o.startswith(("data.system_dir", "data.download"))]
CLASSES = ["ankle boot", "coat", "shirt"]  # folder names: a space, as Fashion-MNIST's own names have


def write_folder(root, per_class=20, size=(20, 20), mode="L", split=True, seed=0):
    """PNG files of a learnable task (a bright band per class) in ImageFolder's layout."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", per_class), ("test", per_class // 2)) if split else (("", per_class),):
        labels = np.repeat(np.arange(len(CLASSES)), count)
        shape = size if mode == "L" else (*size, 3)
        for i, (label, pixels) in enumerate(zip(labels, learnable_images(labels, shape, rng))):
            folder = root / part / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode).save(folder / f"{i:04d}.png")
    return root


def settings(path, **values) -> DataSettings:
    return DataSettings(**{"name": "folder", "path": str(path), "val_size": 5, **values})


@pytest.mark.slow
def test_a_folder_of_pngs_trains_and_predicts_with_its_class_names(tmp_path):
    folder = write_folder(tmp_path / "clothes")
    result = run_cli(
        [
            "mlplab-train",
            *FOLDER_RUN,
            "data=folder",
            f"data.path={folder}",
            "data.val_size=12",
            "data.batch_size=16",
            "trainer.max_epochs=4",
            "model.width=32",
        ],
        tmp_path,
        tmp_path / "data",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test/acc"] > 0.9
    assert list((tmp_path / "data" / "mlplab-cache").glob("folder-*.pt"))  # decoded once, cached in the data dir
    shirt = sorted((folder / "test" / "shirt").iterdir())[0]
    predicted = run_cli(["mlplab-predict", f"run={run_dir}", f"inputs=[{shirt}]", "format=json"], tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    (row,) = json.loads(predicted.stdout)
    assert row["class"] == "shirt"


@pytest.mark.slow
def test_a_folder_of_a_few_hundred_images_trains_with_the_default_split(tmp_path):
    """The built-in sets' 5,000 validation images are more than such a folder has; a user's data defaults to a
    tenth of its training images instead."""
    folder = write_folder(tmp_path / "few", per_class=100, size=(8, 8))  # 300 training and 150 test images
    result = run_cli(
        [
            "mlplab-train",
            *(o for o in FOLDER_RUN if not o.startswith(("data.val_size", "data.batch_size"))),
            "data=folder",
            f"data.path={folder}",
            "model.width=16",
        ],
        tmp_path,
        tmp_path / "data",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert hparams["val_size"] == 0.1 and hparams["batch_size"] == 128
    prepared = prepare_splits(DataSettings(name="folder", path=str(folder)), tmp_path / "data")
    assert (len(prepared.train), len(prepared.val), len(prepared.test)) == (270, 30, 150)


@pytest.mark.parametrize(
    "val_size, message",
    [
        (0, "data.val_size must be a fraction in (0, 1) or a number of images >= 1, got 0"),
        (1.5, "data.val_size must be a fraction in (0, 1) or a number of images >= 1, got 1.5"),
        (60, "data.val_size must be between 1 and 59 for this dataset (or a fraction in (0, 1)), got 60"),
        (
            0.001,
            "data.val_size=0.001 is 0 of the 60 training images; validation and training need at least one "
            "each: give a number of images between 1 and 59",
        ),
    ],
)
def test_a_validation_size_that_does_not_fit_is_refused_in_one_line(val_size, message, tmp_path):
    folder = write_folder(tmp_path / "small", per_class=20, size=(8, 8))  # 60 training images
    try:
        prepare_splits(DataSettings(name="folder", path=str(folder), val_size=val_size), tmp_path / "data")
    except SettingError as error:  # the settings' own check: the config names the group in front
        assert error.within("data") == message
    except DataError as error:  # only the data's size tells
        assert str(error) == message
    else:
        raise AssertionError(f"data.val_size={val_size} was accepted")


def test_a_folder_without_test_split_holds_out_a_seeded_test_set_and_converts_every_image(tmp_path):
    folder = write_folder(tmp_path / "flat", per_class=10, split=False, size=(12, 16))
    Image.new("RGB", (30, 30), (200, 10, 10)).save(folder / "coat" / "9999.png")  # another size, in colour
    prepared = prepare_splits(settings(folder, test_size=0.2), tmp_path / "data")
    assert prepared.class_names == CLASSES
    assert len(prepared.test) == 6 and len(prepared.train) + len(prepared.val) == 25
    # The first image (ankle boot/0000.png) sets the shape: grayscale, 12 x 16; the RGB square was converted.
    assert prepared.train.images.shape[1:] == (1, 12, 16) and prepared.train.images.dtype == torch.uint8
    again = prepare_splits(settings(folder, test_size=0.2), tmp_path / "data")
    assert torch.equal(again.test.images, prepared.test.images)  # the same seed, the same test set
    resized = prepare_splits(settings(folder, image_size=[8, 10], channels=3), tmp_path / "data")
    assert resized.train.images.shape[1:] == (3, 8, 10)


def test_the_folder_cache_is_used_and_rebuilt_when_a_file_changes(tmp_path, caplog, monkeypatch):
    folder = write_folder(tmp_path / "clothes", per_class=6)
    first = prepare_splits(settings(folder), tmp_path / "data")
    _decode_once.cache_clear()  # a new process: only the cache file remains
    monkeypatch.setattr("mlplab.data.user_data.read_image", lambda *_: pytest.fail("decoded again, cache unused"))
    assert torch.equal(prepare_splits(settings(folder), tmp_path / "data").test.images, first.test.images)
    monkeypatch.undo()
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(folder / "test" / "coat" / "0000.png")
    _decode_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="mlplab.data.user_data"):
        changed = prepare_splits(settings(folder), tmp_path / "data")
    assert "Decoding" in caplog.text
    assert bool((changed.test.images == 255).all(dim=(1, 2, 3)).any()) and not torch.equal(
        changed.test.images, first.test.images
    )


def test_tensor_files_pt_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    np.savez(
        tmp_path / "arrays.npz",
        train_images=learnable_images(labels, (10, 10, 3), rng),
        train_labels=labels,
        test_images=learnable_images(labels[:12], (10, 10, 3), rng),
        test_labels=labels[:12],
        class_names=np.array(["a", "b", "c", "d"]),
    )
    npz = prepare_splits(DataSettings(name="tensors", path=str(tmp_path / "arrays.npz"), val_size=8), tmp_path)
    assert npz.train.images.shape[1:] == (3, 10, 10) and len(npz.test) == 12 and npz.class_names == ["a", "b", "c", "d"]
    torch.save(
        {"images": torch.from_numpy(learnable_images(labels, (10, 10), rng)), "labels": torch.from_numpy(labels)},
        tmp_path / "arrays.pt",
    )
    pt = prepare_splits(
        DataSettings(name="tensors", path=str(tmp_path / "arrays.pt"), val_size=8, test_size=10), tmp_path
    )
    assert pt.train.images.shape[1:] == (1, 10, 10) and len(pt.test) == 10 and pt.class_names == ["0", "1", "2", "3"]


def bad_folders(root):
    (root / "empty").mkdir()
    (root / "no-images" / "cat").mkdir(parents=True)
    (root / "no-images" / "dog").mkdir()
    (root / "no-images" / "cat" / "notes.txt").write_text("not an image")
    Image.new("L", (8, 8)).save(root / "no-images" / "dog" / "rex.png")
    write_folder(root / "unreadable", per_class=3, split=False)
    (root / "unreadable" / "coat" / "broken.png").write_bytes(b"\x89PNG but not really")
    write_folder(root / "mismatch", per_class=4)
    (root / "mismatch" / "test" / "shirt").rename(root / "mismatch" / "test" / "dress")
    np.savez(root / "floats.npz", images=np.zeros((4, 5, 5), np.float32), labels=np.zeros(4, np.int64))


BAD = [  # (data overrides, what the one line must say)
    (["data.path=DIR/nowhere"], "data.path=DIR/nowhere: no such directory"),
    (["data.path=DIR/empty"], "has no class folders"),
    (["data.path=DIR/no-images"], "class folder cat in DIR/no-images has no images"),
    (["data.path=DIR/unreadable"], "1 file cannot be read as images: DIR/unreadable/coat/broken.png"),
    (
        ["data.path=DIR/mismatch"],
        "train/ and test/ have different classes (only in train/: shirt; only in test/: dress)",
    ),
    ([], "data.path is required with data=folder"),
    (["data=tensors", "data.path=DIR/floats.npz"], "images must be uint8"),
]


@pytest.mark.slow
def test_bad_data_is_one_line_naming_what_is_wrong(forked_cli, tmp_path):
    bad_folders(tmp_path)
    for overrides, expected in BAD:
        overrides = [o.replace("DIR", str(tmp_path)) for o in overrides]
        code, output = forked_cli.run(
            [*FOLDER_RUN, f"paths.data_dir={tmp_path / 'data'}", "data=folder", *overrides], tmp_path
        )
        errors = [line for line in output.splitlines() if line.startswith("mlplab-train: error:")]
        assert code == 2 and "Traceback" not in output and len(errors) == 1, (overrides, output)
        assert expected.replace("DIR", str(tmp_path)) in errors[0], (overrides, errors[0])
    assert not list(tmp_path.glob("outputs/runs/*"))
