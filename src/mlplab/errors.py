"""What every layer's errors share: entry points turn an ``MlplabError`` into one line and its exit status."""

from __future__ import annotations

import difflib


class MlplabError(Exception):
    """A problem the user can fix (a setting, a file, a path); the message says what is wrong and what is allowed."""

    exit_status = 2
    label: str | None = "error"  # the word after the tool's name: "mlplab-train: error: ..."


def one_line(error: BaseException) -> str:
    """An error (or the error behind it) as one line."""
    return " ".join(str(error.__cause__ or error).split()) or type(error).__name__


def closest(name: str, allowed: list[str]) -> str:
    """The end of an "unknown name" message: the allowed names closest to ``name``, or all of them."""
    close = difflib.get_close_matches(name, allowed, n=3)
    return f"did you mean {', '.join(close)}?" if close else f"allowed: {', '.join(allowed)}"
