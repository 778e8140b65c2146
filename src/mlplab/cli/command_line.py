"""What mlplab-train checks on its command line before Hydra starts, and how it writes values into overrides."""

from __future__ import annotations

from pathlib import Path

from mlplab.run.checkpoints import read_checkpoint
from mlplab.run.config import ConfigError
from mlplab.run.records import find_checkpoint


def check_resume(args: list[str]) -> None:
    """Refuse a ``resume=`` that cannot work before Hydra makes or writes into any directory."""
    resumes = [arg for arg in args if arg.startswith("resume=")]
    if not resumes:
        return
    if any(arg in ("-m", "--multirun") for arg in args):
        raise ConfigError("resume= continues one run; to resume a sweep, run the same -m command again")
    _, checkpoint = find_checkpoint(resumes[-1].split("=", 1)[1].strip("'\""), "last")
    read_checkpoint(checkpoint)  # refuses a damaged or unsafe file before anything else happens


def override_key(override: str) -> str:
    """``model.width`` of ``model.width=64``, ``+model.width=64`` or ``~model.width``."""
    return override.lstrip("+~").split("=", 1)[0]


def quoted(path: Path) -> str:
    """A path as one Hydra value, whatever it holds (sweep job folders have '=' and ',' in their names)."""
    escaped = str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
