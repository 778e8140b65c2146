"""Shared fixtures: a synthetic Fashion-MNIST in torchvision's layout, and running the console scripts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlplab.data.synthetic import write_mnist_like


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


def cli_env(data_dir: Path | None = None) -> dict[str, str]:
    """A user's environment, plus tests/ on the path for the probes (tests/probes.py) a command line may add."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("HYDRA_FULL_ERROR", None)
    if data_dir is not None:
        env["MLPLAB_DATA_DIR"] = str(data_dir)
    return env


def run_cli(args: list[str], cwd: Path, data_dir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an mlplab console script the way a user does, in a subprocess."""
    script = Path(sys.executable).parent / args[0]
    return subprocess.run([str(script), *args[1:]], cwd=cwd, env=cli_env(data_dir), capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def tensorboard_server(logdir: Path) -> Iterator[str]:
    """A real TensorBoard server on a free loopback port, stopped afterwards; yields its plugin data URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}/data/plugin"
    finally:
        server.terminate()
        server.wait(timeout=30)
