"""A named sweep run again with other fixed settings: its folder then holds jobs of two settings, which the sweep
says in one line before anything trains, and which its summary shows as a column.

A key counts as a fixed setting changed when the earlier jobs share one value of it and this command's jobs share
another: a key with several values on either side is swept, and adding values of a swept key to a sweep is how a
sweep is extended (README, Sweeps).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig

from mlplab.run.config import NON_EXPERIMENT_KEYS
from mlplab.run.records import UnreadableRecordError
from mlplab.sweeps.job_records import HYDRA_DIR, job_config, override_values, read_overrides, value_text

log = logging.getLogger(__name__)


def changed_settings(keys: list[str], earlier: list[DictConfig], now: list[DictConfig]) -> dict[str, tuple[str, str]]:
    """Of ``keys``, those with one value in every ``earlier`` job's config and another in every one of ``now``:
    key -> (earlier value, value now). Keys that do not define the experiment (where data lives) are left out."""
    changed = {}
    for key in keys:
        if key in NON_EXPERIMENT_KEYS:
            continue
        before = {value_text(config, key) for config in earlier}
        after = {value_text(config, key) for config in now}
        if len(before) == len(after) == 1 and before != after:
            changed[key] = (_shown(before.pop()), _shown(after.pop()))
    return changed


def settings_line(sweep: str, changed: dict[str, tuple[str, str]], earlier: int, now: int) -> str:
    """The one line that says a sweep now holds jobs of two settings, and how many jobs each has."""

    def setting(side: int) -> str:
        return " ".join(f"{key}={values[side]}" for key, values in changed.items())

    return (
        f"Sweep {sweep} holds jobs of 2 settings: {setting(0)} ({_jobs(earlier)}), {setting(1)} ({_jobs(now)}, this "
        "command); its summary ranks them together, the setting a column (another sweep= name keeps them apart)"
    )


def _shown(value: str | None) -> str:
    return "(not set)" if value is None else value


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


def check_settings(sweep_dir: Path, now: list[tuple[str, list[str], DictConfig]]) -> int:
    """Warn, in one line before anything trains, when this command's jobs (folder name, overrides, composed config)
    change a fixed setting of the jobs of earlier commands in the sweep's folder; returns how many of those there
    are. A job whose records are damaged is left out of the comparison: the summary names it."""
    names = {name for name, _, _ in now}
    others = [path.parent.parent for path in sorted(sweep_dir.glob(f"*/{HYDRA_DIR}/config.yaml"))]
    others = [folder for folder in others if folder.name not in names]
    earlier = []
    for folder in others:
        with contextlib.suppress(UnreadableRecordError):
            earlier.append((read_overrides(folder), job_config(folder)))
    if earlier:
        every = [overrides for overrides, _ in earlier] + [overrides for _, overrides, _ in now]
        keys = list(dict.fromkeys(key for overrides in every for key in override_values(overrides)))
        changed = changed_settings(keys, [config for _, config in earlier], [config for _, _, config in now])
        if changed:
            log.warning(settings_line(sweep_dir.name, changed, len(earlier), len(now)))
    return len(others)
