"""How every console script starts and ends: paths on its command line read as paths, and a problem ended as one
line (or a resume hint) on stderr and an exit status; never a traceback for something the user can fix."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from mlplab.cli.command_line import paths_as_values
from mlplab.cli.compose import describe_config_error
from mlplab.errors import MlplabError, one_line
from mlplab.run.stopping import Stopped


def exit_for(tool: str, error: BaseException, before_task: bool = False) -> NoReturn:
    """Print ``error`` for the user and exit; re-raise what is not the user's to fix (a bug: keep its traceback).

    ``before_task``: raised while Hydra read the command line or composed the config, before mlplab ran.
    """
    if isinstance(error, Stopped):
        print(f"{tool}: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    if isinstance(error, MlplabError):
        print(f"{tool}: {error.label + ': ' if error.label else ''}{one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_status)
    if isinstance(error, (CompactHydraException, OmegaConfBaseException)):
        print(f"{tool}: error: {describe_config_error(error)}", file=sys.stderr)
        sys.exit(2)
    if isinstance(error, OSError) and before_task:  # Hydra could not make the run directory or its log file
        where = f" under {Path(error.filename).absolute()}" if error.filename else ""
        print(
            f"{tool}: error: cannot write run directories{where} ({error.strerror or one_line(error)}); run from a "
            "writable directory or set hydra.run.dir=<a writable path> (hydra.sweep.dir=... for -m)",
            file=sys.stderr,
        )
        sys.exit(2)
    if isinstance(error, ValueError) and before_task:  # Hydra's own command-line checks (-m with --cfg)
        print(f"{tool}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    raise error


def console_main(
    tool: str,
    hydra_main: Callable[[], Any],
    check: Callable[[list[str]], None] | None = None,
    task_started: Callable[[], bool] = lambda: True,
) -> None:
    """Run a console script's Hydra main: ``check`` the command line first, and end every problem the user can fix
    as one line and an exit status (exit_for). ``task_started``: whether Hydra got as far as the task function."""
    sys.argv[1:] = paths_as_values(sys.argv[1:])
    try:
        if check:
            check(sys.argv[1:])
        with errors_raised():
            hydra_main()
    except BaseException as error:  # exit_for re-raises what it does not recognise
        if isinstance(error, SystemExit):
            raise
        exit_for(tool, error, before_task=not task_started())


@contextmanager
def errors_raised() -> Iterator[None]:
    """Hydra prints what it refuses (a composition error, a bad override) as several lines and exits 1; with its
    documented HYDRA_FULL_ERROR switch it raises instead, and exit_for makes one line of it."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":  # the user asked for Hydra's full tracebacks
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
