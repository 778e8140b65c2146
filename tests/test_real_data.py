"""One epoch on the real Fashion-MNIST from the Debian package (about half a minute)."""

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.real_data
def test_one_epoch_of_the_default_network_learns_fashion_mnist(tmp_path):
    if not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        absent = f"real Fashion-MNIST absent: apt-get install dataset-fashion-mnist puts it in {SYSTEM_DIR}"
        if os.environ.get("CI") == "true":  # CI installs it (make data): its absence there is a failure
            pytest.fail(absent)
        pytest.skip(absent)
    data_dir = tmp_path / "data"  # empty: the files must come from the Debian package
    result = run_cli(["mlplab-train", "trainer=cpu", "trainer.max_epochs=1", "callbacks.progress_bar=null",
                      "data.download=false"], tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (data_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["test/acc"] >= 0.80, metrics
