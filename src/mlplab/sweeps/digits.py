"""How a summary's tables show numbers: 4 significant digits, as a reader compares them. summary.csv, hparams.yaml
and ready-to-run commands keep every digit."""

from __future__ import annotations


def significant(value: float | None) -> str:
    """``0.9056``, ``0.8100``, ``12.35``, ``0.0001235``; from 10,000 on a whole number (``12346``); None: empty."""
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:#.4g}"


def setting(text: str) -> str:
    """A setting's value as a table shows it: a decimal given with more than 4 significant digits (a search's
    ``0.040929726807568505``) as ``0.04093``; whole numbers, names and shorter decimals as given."""
    try:
        number = float(text)
    except ValueError:
        return text
    if text.lstrip("+-").isdigit():
        return text
    short = f"{number:.4g}"
    return short if len(short) < len(text) else text
