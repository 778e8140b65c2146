"""Command lines: how mlplab writes values into overrides, and the command that starts a rank of a data-parallel
run."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlplab.run.config import COMMAND_KEYS

TRAIN = "mlplab-train"  # the training command's name, as users type it


def override_key(override: str) -> str:
    """``model.width`` of ``model.width=64``, ``+model.width=64`` or ``~model.width``."""
    return override.lstrip("+~").split("=", 1)[0]


def quoted(path: Path) -> str:
    """A path as one Hydra value, whatever it holds (sweep job folders have '=' and ',' in their names)."""
    return hydra_string(str(path.resolve()))


def hydra_string(value: str) -> str:
    """``value`` as one quoted Hydra string."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


# Keys whose value is a path. A sweep job's folder (seed=1,trainer=cpu) or ~/my-images is read as the path it is:
# Hydra's grammar would take '=' and ',' as syntax and refuse '~', and a shell leaves '~' in key=value as it is.
PATH_KEYS = ("run", "resume", "data.path", "paths.data_dir", "output", "inputs")
HYDRA_SYNTAX = set("=,()[]{}'\" ")


def paths_as_values(args: Sequence[str]) -> list[str]:
    """The command line with each path given to a PATH_KEYS key written as one Hydra value, ``~`` expanded. Under
    -m, a value with commas that is no existing path stays a sweep over paths (``data.path=a,b``)."""
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    written = []
    for arg in args:
        key, equals, value = arg.partition("=")
        path = os.path.expanduser(value)
        if (
            equals
            and key.lstrip("+") in PATH_KEYS
            and value
            and value[0] not in "'\"["
            and (value.startswith("~") or HYDRA_SYNTAX & set(value))
            and not (multirun and "," in value and not os.path.exists(path))
        ):
            arg = f"{key}={hydra_string(path)}"
        written.append(arg)
    return written


# What a data-parallel run's other ranks add to the job's overrides: rank 0 alone writes the config copy and the log.
OTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stderr")


def rank_command(
    overrides: list[str], run_dir: Path, resume_from: Path | None, config_dirs: Sequence[str] = ()
) -> list[str]:
    """The command that runs another rank of this run or job, should it train data-parallel (mlplab.cli.rank):
    the job's own overrides as one run in the same directory, writing no config copy and no log file."""
    kept = [override for override in overrides if override_key(override) not in COMMAND_KEYS]
    if resume_from:
        kept.append(f"resume={quoted(resume_from)}")
    return [
        sys.executable,
        "-m",
        "mlplab.cli.rank",
        *(f"--config-dir={path}" for path in config_dirs),
        *kept,
        f"hydra.run.dir={quoted(run_dir)}",
        *OTHER_RANK_OVERRIDES,
    ]
