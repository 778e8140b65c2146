"""``resume=``: refused early when it cannot work, and the resumed run's config: its own experiment, as it recorded
it when it started, with the changes a resume may make."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from mlplab.cli.command_line import override_key, quoted
from mlplab.earlier_versions import upgraded_override, upgraded_section
from mlplab.files import write_text_atomically
from mlplab.run.config import CLASS_SECTIONS, NON_EXPERIMENT_KEYS, RESUMABLE_KEYS, SECTIONS, ConfigError
from mlplab.run.ownership import refusal, running_on
from mlplab.run.records import find_checkpoint, read_yaml_record

# overrides.yaml cannot be removed as other records can: the resumed run is composed from it.
OVERRIDES_REMEDY = (
    "restore it from a copy; resume= composes the run from it (the overrides the run started with are also in "
    ".hydra/hydra.yaml, under hydra.overrides.task)"
)
CONFIG_REMEDY = (
    "restore it from a copy, or remove it: resume= then takes the experiment from the run's overrides and today's "
    "defaults"
)
# The top-level keys of a run's config that hold its experiment (mlplab.run.config.RunConfig's, but where the data
# is): a resumed run takes them from its recorded config, never from today's defaults.
EXPERIMENT_SECTIONS = ("seed", "label_smoothing", "model", *SECTIONS, *CLASS_SECTIONS)


def check_resume(args: list[str]) -> None:
    """Refuse a ``resume=`` that cannot work before Hydra makes or writes into any directory."""
    resumes = [arg for arg in args if arg.startswith("resume=")]
    if not resumes:
        return
    from mlplab.run import provenance  # torch and Lightning: only for a command that resumes
    from mlplab.run.checkpoints import read_checkpoint

    if any(arg in ("-m", "--multirun") for arg in args):
        raise ConfigError("resume= continues one run; to resume a sweep, run the same -m command again")
    run_dir, checkpoint = find_checkpoint(resumes[-1].split("=", 1)[1].strip("'\""), "last", key="resume")
    if running_on(run_dir):  # refused before Hydra writes a line in its log (the task claims it for good)
        raise refusal(run_dir)
    # What the resumed run reads, refused here if damaged or unsafe: once Hydra starts, it writes into the folder.
    read_checkpoint(checkpoint)
    recorded_overrides(run_dir)
    recorded_config(run_dir)
    provenance.earlier_attempts(run_dir)


def resumed_config(cfg: DictConfig, given: list[str]) -> tuple[DictConfig, list[str]]:
    """The config of the run ``resume=`` names: its own experiment, with the changes allowed now."""
    run_dir, checkpoint = find_checkpoint(cfg.resume, "last", key="resume")
    original = [upgraded_override(str(o)) for o in recorded_overrides(run_dir)]
    changes = [o for o in given if override_key(o) != "resume" and o not in original]
    for change in changes:
        if override_key(change) not in RESUMABLE_KEYS:
            raise ConfigError(
                f"resume: {change} would change the experiment; a resumed run may only change "
                f"{', '.join(RESUMABLE_KEYS)}"
            )
    changed = {override_key(change) for change in changes} | {"resume"}
    overrides = [*(o for o in original if override_key(o) not in changed), *changes]
    if changes and "LOCAL_RANK" not in os.environ:  # ranks of a data-parallel run read what rank 0 wrote
        write_text_atomically(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides))
    composed = compose(config_name="train", overrides=[*overrides, f"resume={quoted(checkpoint)}"])
    return with_recorded_experiment(composed, recorded_config(run_dir), overrides), overrides


def with_recorded_experiment(cfg: DictConfig, recorded: dict[str, Any] | None, overrides: list[str]) -> DictConfig:
    """``cfg`` (composed from today's files and the run's overrides) with every value that defines the experiment
    as the run recorded it (``recorded``), so that a default changed since does not change the resumed run. Keys
    that do not define an experiment keep ``cfg``'s values, as do the resumable keys ``overrides`` set."""
    if recorded is None:  # a run without its config record: its overrides are all there is
        return cfg
    set_now = {override_key(override) for override in overrides}
    absent = object()
    kept = {
        key: OmegaConf.select(cfg, key, default=absent)
        for key in RESUMABLE_KEYS
        if key in NON_EXPERIMENT_KEYS or key in set_now
    }
    with open_dict(cfg):
        for name in EXPERIMENT_SECTIONS:
            if name in recorded:
                cfg[name] = upgraded_section(name, recorded[name])
        for key, value in kept.items():
            if value is not absent:
                OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def recorded_overrides(run_dir: Path) -> list[Any]:
    """The overrides the run was started with (plus what a resume changed), from its .hydra/overrides.yaml."""
    return read_yaml_record(run_dir / ".hydra" / "overrides.yaml", list, OVERRIDES_REMEDY)


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config the run started with (.hydra/config.yaml: a resume does not rewrite it), or None without one."""
    path = run_dir / ".hydra" / "config.yaml"
    return read_yaml_record(path, dict, CONFIG_REMEDY) if path.is_file() else None
