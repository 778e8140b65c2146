"""Files written whole or not at all: a reader, or a run resumed after SIGKILL, never sees half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], None], *, durable: bool = False, sole_writer: bool = False
) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``.

    Beside, not in /tmp: a rename across file systems is a copy. ``durable`` also syncs the data to disk before
    the rename, for files a run resumes from. A ``sole_writer`` (a run's checkpoints: one process writes them)
    also removes the half-written files an earlier writer left when it was killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if not sole_writer:
        return
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode()))
