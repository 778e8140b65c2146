"""What every layer's errors share: entry points turn an ``MlplabError`` into one line and its exit status."""

from __future__ import annotations

import difflib
import re


class MlplabError(Exception):
    """A problem the user can fix (a setting, a file, a path); the message says what is wrong and what is allowed."""

    exit_status = 2
    label: str | None = "error"  # the word after the tool's name: "mlplab-train: error: ..."


def one_line(error: BaseException) -> str:
    """An error (or the error behind it) as one line."""
    return " ".join(str(error.__cause__ or error).split()) or type(error).__name__


def first_sentence(error: BaseException) -> str:
    """The first sentence of ``one_line(error)``, without its full stop: a library's message may go on to a
    paragraph of advice about its own internals, and a message cut at some length would end mid-sentence."""
    text = one_line(error)
    end = re.search(r"\.\s+(?=[A-Z])", text)  # a full stop before a capital: where the next sentence starts
    return (text[: end.start()] if end else text).rstrip(".")


def closest(name: str, allowed: list[str]) -> str:
    """The end of an "unknown name" message: the allowed names closest to ``name``, or all of them."""
    close = difflib.get_close_matches(name, allowed, n=3)
    return f"did you mean {', '.join(close)}?" if close else f"allowed: {', '.join(allowed)}"


class SettingError(ValueError):
    """A setting's own check refused its value: ``key`` is the setting (a field of the dataclass that raised it,
    or None for the settings as a whole), so a config layer can name it in full (``data.batch_size``) without
    reading the message. The message is the whole sentence a user reads, usually starting with the key."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key, self.message = key, message

    def within(self, group: str) -> str:
        """The message with the group's name in front: ``group.key ...``, or ``group: ...`` without a key."""
        if self.key is None:
            return f"{group}: {self.message}"
        if self.message.startswith(self.key):
            return f"{group}.{self.message}"
        return f"{group}.{self.key}: {self.message}"
