"""How every console script ends on a problem: one line (or a resume hint) on stderr and an exit status; never a
traceback for something the user can fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from mlplab.cli.compose import describe_config_error
from mlplab.errors import MlplabError, one_line


class Stopped(KeyboardInterrupt):
    """A signal stopped the run or sweep; the message says how to continue. A KeyboardInterrupt, so that Hydra's
    launchers (which record a job's exceptions and go on) let it end the sweep."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


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
