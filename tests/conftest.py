"""Shared fixtures: a synthetic Fashion-MNIST in torchvision's layout, and running the console scripts."""

from __future__ import annotations

import contextlib
import json
import os

# Two test workers on two cores, each training in processes of its own: one thread per process, as the README
# advises for two processes on two cores (oversubscribed, tiny networks spend their steps waiting). Set before torch
# is imported, so this process and every command the tests start have it; a value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.instantiate import build_callbacks
from mlplab.data.synthetic import write_mnist_like
from mlplab.run.config import parse_run_config
from mlplab.run.train import train


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


def start_train(args: list[str], cwd: Path, data_dir: Path, merged: bool = False) -> subprocess.Popen:
    """The installed mlplab-train in a process of its own, running while the test acts on it (signals, a second
    process); ``merged``: stderr into stdout."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlplab-train"), *args],
        cwd=cwd,
        env=cli_env(data_dir),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
    )


def composed(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train", hydra: bool = False) -> Any:
    """The config mlplab's command line composes from ``overrides`` (with Hydra's own part if ``hydra``)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def single_run_dir(cwd: Path) -> Path:
    """The one run directory a command made under ``cwd``."""
    (run_dir,) = (cwd / "outputs" / "runs").iterdir()
    return run_dir


def study_of(sweep_dir: Path) -> Any:
    """The Optuna study a search keeps in its sweep folder (its journal file), read with Optuna's own API."""
    import optuna

    from mlplab.sweeps.storage import STUDY_FILE

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / STUDY_FILE)))
    return optuna.load_study(study_name=sweep_dir.name, storage=storage)


def run_cli(
    args: list[str],
    cwd: Path,
    data_dir: Path | None = None,
    timeout: int = 300,
    fresh: bool = False,
    python_path: list[Path] | None = None,
) -> subprocess.CompletedProcess:
    """Run an mlplab console script the way a user does: its ``main()`` with this command line, in a process forked
    from one that imported mlplab once (forked_cli.py). ``fresh``: the installed script in a new interpreter, where
    the process boundary itself is what a test checks. ``python_path``: a user's own code, as on PYTHONPATH."""
    if fresh:
        script = Path(sys.executable).parent / args[0]
        env = cli_env(data_dir)
        env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path or []), env["PYTHONPATH"]])
        return subprocess.run(
            [str(script), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    env = {"MLPLAB_DATA_DIR": str(data_dir) if data_dir is not None else None}
    code, stdout, stderr = shared_forked_cli().run_apart(args[1:], cwd, args[0], env, timeout, python_path or [])
    return subprocess.CompletedProcess(args, code, stdout, stderr)


class ForkedCli:
    """mlplab's console scripts, each command line in its own process, forked from one that imported everything
    once."""

    def __init__(self):
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forked_cli.py"))],
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.outputs = Path(tempfile.mkdtemp(prefix="mlplab-forked-"))

    def _ask(self, request: dict) -> int:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())["returncode"]

    def run(self, args: list[str], cwd: Path, tool: str = "mlplab-train", seconds: int = 300) -> tuple[int, str]:
        """``tool`` (mlplab-train, -eval, -predict or -report) with ``args``: its exit status and its output; a
        child still running after ``seconds`` is stopped (SIGALRM)."""
        output = self.outputs / "output.txt"
        code = self._ask({"tool": tool, "args": args, "cwd": str(cwd), "output": str(output), "seconds": seconds})
        return code, output.read_text()

    def run_apart(
        self, args: list[str], cwd: Path, tool: str, env: dict[str, str | None], seconds: int, path: list[Path]
    ) -> tuple[int, str, str]:
        """As ``run``, with ``env`` set and ``path`` first on sys.path in the child: exit status, stdout and
        stderr."""
        output, errors = self.outputs / "stdout.txt", self.outputs / "stderr.txt"
        request = {"tool": tool, "args": args, "cwd": str(cwd), "output": str(output), "errors": str(errors)}
        code = self._ask({**request, "env": env, "seconds": seconds, "path": [str(folder) for folder in path]})
        return code, output.read_text(), errors.read_text()

    def run_together(
        self, commands: list[list[str]], cwd: Path, env: dict[str, str | None], seconds: int = 300
    ) -> list[tuple[int, str, str]]:
        """mlplab-train command lines side by side, each a process of its own (as two users' terminals would run
        them): each one's exit status, stdout and stderr, once all have ended."""
        requests = [
            {
                "tool": "mlplab-train",
                "args": args,
                "cwd": str(cwd),
                "output": str(self.outputs / f"stdout-{index}.txt"),
                "errors": str(self.outputs / f"stderr-{index}.txt"),
                "env": env,
                "seconds": seconds,
            }
            for index, args in enumerate(commands)
        ]
        self.server.stdin.write(json.dumps({"together": requests}) + "\n")
        self.server.stdin.flush()
        codes = json.loads(self.server.stdout.readline())["returncodes"]
        return [
            (code, Path(request["output"]).read_text(), Path(request["errors"]).read_text())
            for code, request in zip(codes, requests)
        ]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
        shutil.rmtree(self.outputs, ignore_errors=True)


_shared: list[ForkedCli] = []


def shared_forked_cli() -> ForkedCli:
    """This test process's forked runner for run_cli, started on first use and closed at the end of the session."""
    if not _shared:
        _shared.append(ForkedCli())
    return _shared[0]


# Tests that mostly wait (on a SLURM cluster's scheduler and its jobs' processes) go first, so that their waits
# overlap the other worker's training rather than end the run.
WAITING_FIRST = ("test_slurm.py",)


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: item.path.name not in WAITING_FIRST)  # stable: the rest keep their order


def pytest_sessionfinish(session, exitstatus) -> None:
    for cli in _shared:
        cli.close()


@pytest.fixture(scope="module")
def forked_cli():
    cli = ForkedCli()
    yield cli
    cli.close()


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epoch


def train_in_process(data_dir, run_dir, overrides, stop_after=None, resume_from=None) -> dict:
    """Train as mlplab-train does but in this process (3 epochs; an MLP of width 16 unless ``model=`` is among
    ``overrides``); returns last.ckpt's contents.
    ``stop_after``: end training after that many epochs, as if stopped and resumed later."""
    small = [] if any(o.startswith("model=") for o in overrides) else ["model.width=16"]
    cfg = composed(
        [
            *SYNTHETIC_RUN,
            f"paths.data_dir={data_dir}",
            *small,
            "trainer.max_epochs=3",
            "callbacks.model_description=null",
            "callbacks.misclassified=null",
            *overrides,
        ],
    )
    config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
    callbacks = build_callbacks(cfg.callbacks) + ([StopAfterEpoch(stop_after)] if stop_after else [])
    train(config, run_dir, callbacks=callbacks, resume_from=resume_from)
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def stopped_and_resumed(data_dir, folder: Path, overrides, stop_after: int) -> dict:
    """train_in_process stopped after ``stop_after`` epochs in ``folder``, then resumed from its last.ckpt there;
    returns the resumed run's last.ckpt contents."""
    train_in_process(data_dir, folder, overrides, stop_after=stop_after)
    return train_in_process(data_dir, folder, overrides, resume_from=folder / "checkpoints" / "last.ckpt")


def hold_as_a_dead_host_would(lock: Path, age_seconds: float) -> subprocess.Popen:
    """A process holding the lock file's flock (as a network file system keeps a dead host's) that names another
    host and has not renewed it for ``age_seconds``."""
    lock.write_text("another-host 4242\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, time
                fd = os.open({str(lock)!r}, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.utime(fd, (time.time() - {age_seconds}, time.time() - {age_seconds}))
                print("held", flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@contextlib.contextmanager
def tensorboard_server(logdir: Path) -> Iterator[str]:
    """A real TensorBoard server on a free loopback port, stopped afterwards; yields its plugin data URL."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "tensorboard"),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}/data/plugin"
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server on a free loopback port, in a temporary folder, stopped and removed afterwards;
    yields a database URL for Optuna. PostgreSQL refuses to run as root: as root, it runs as the postgres user."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb and pg_ctl are not on the PATH (.ci/run installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="mlplab-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "mlplab", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(folder / "server.log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://mlplab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
