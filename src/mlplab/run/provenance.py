"""What ran: the code's version and git commit, the libraries, the host and device, and the command. Written to the
run directory as provenance.json when a run starts; each resume adds its own record."""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import mlplab
from mlplab.files import write_text_atomically
from mlplab.run.records import UnreadableRecordError, read_json_record

PROVENANCE_FILE = "provenance.json"


def git_state(directory: Path, tracked: str | None = None) -> dict[str, Any] | None:
    """The repository holding ``directory``: its root, commit and whether tracked files differ from it; None
    outside a repository, without git, or when the file ``tracked`` (in ``directory``) is not part of it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        if tracked:
            git("ls-files", "--error-unmatch", tracked)
        root, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"repository": root, "commit": commit, "dirty": dirty}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor()
    )
    return f"{device} ({model or 'unknown'}, {os.cpu_count()} cores)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def collect(command: Sequence[str], device: torch.device) -> dict[str, Any]:
    """The record of this process running ``command`` on ``device``."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(command),
        "mlplab": _version("mlplab"),
        # The code that ran (when it runs from a checkout: an installed copy inside some repository's virtualenv
        # is not that repository's code), and the repository the command ran in (the user's own).
        "code": git_state(Path(mlplab.__file__).parent, tracked="__init__.py"),
        "working_directory": {"path": os.getcwd(), "git": git_state(Path.cwd())},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{name: _version(name) for name in ("lightning", "hydra-core", "torchvision", "optuna")},
        },
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device_name(device),
    }


def earlier_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the run's attempts so far (none before it first starts); UnreadableRecordError when its
    provenance.json is damaged, rather than a new record written over it."""
    path = run_dir / PROVENANCE_FILE
    if not path.is_file():
        return []
    previous = read_json_record(path)
    if not isinstance(previous, dict) or not isinstance(previous.get("earlier_attempts", []), list):
        raise UnreadableRecordError(path, "a JSON object with a list of earlier_attempts was expected")
    return [*previous.pop("earlier_attempts", []), previous]


def write(run_dir: Path, record: dict[str, Any]) -> None:
    """provenance.json: this attempt's record, with those of the run's earlier attempts (before a resume)."""
    earlier = earlier_attempts(run_dir)
    write_text_atomically(
        run_dir / PROVENANCE_FILE,
        json.dumps({**record, **({"earlier_attempts": earlier} if earlier else {})}, indent=2) + "\n",
    )
