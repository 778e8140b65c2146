"""The real Fashion-MNIST from the Debian package: one epoch of the default network, and its test images as a
folder of PNG files (data=folder). About a minute together."""

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from mlplab.data.datasets import load_dataset, provide_files

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def require_real_data() -> None:
    if not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        absent = f"real Fashion-MNIST absent: apt-get install dataset-fashion-mnist puts it in {SYSTEM_DIR}"
        if os.environ.get("CI") == "true":  # CI installs it (make data): its absence there is a failure
            pytest.fail(absent)
        pytest.skip(absent)


@pytest.mark.slow
@pytest.mark.real_data
def test_one_epoch_of_the_default_network_learns_fashion_mnist(tmp_path):
    require_real_data()
    data_dir = tmp_path / "data"  # empty: the files must come from the Debian package
    result = run_cli(
        ["mlplab-train", "trainer=cpu", "trainer.max_epochs=1", "callbacks.progress_bar=null", "data.download=false"],
        tmp_path,
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (data_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["test/acc"] >= 0.80, metrics


@pytest.mark.slow
@pytest.mark.real_data
def test_fashion_mnist_test_images_as_png_files_train_with_data_folder_and_predict_by_folder_name(tmp_path):
    require_real_data()
    provide_files("fashion_mnist", tmp_path / "data", SYSTEM_DIR, download=False)
    test = load_dataset("fashion_mnist", tmp_path / "data").test
    # "T-shirt/top" cannot be a folder's name.
    names = [name.replace("/", "-") for name in load_dataset("fashion_mnist", tmp_path / "data").class_names]
    folder = tmp_path / "fashion-pngs"
    for i, (image, label) in enumerate(zip(test.images, test.labels.tolist())):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / names[label] / f"{i:05d}.png")

    result = run_cli(
        [
            "mlplab-train",
            "trainer=cpu",
            "trainer.max_epochs=2",
            "callbacks.progress_bar=null",
            "data=folder",
            f"data.path={folder}",
            "data.val_size=1000",
        ],
        tmp_path,
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test/acc"] >= 0.78, metrics  # 7,000 training images

    bags = sorted((folder / "Bag").iterdir())[:20]
    predicted = run_cli(
        ["mlplab-predict", f"run={run_dir}", f"inputs=[{','.join(map(str, bags))}]", "format=json"], tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    classes = [row["class"] for row in json.loads(predicted.stdout)]
    assert set(classes) <= set(names) and classes.count("Bag") >= 15 and "T-shirt-top" in names
