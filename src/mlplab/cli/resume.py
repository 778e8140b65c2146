"""``resume=``: refused early when it cannot work, and the resumed run's config composed from its own overrides."""

from __future__ import annotations

import os

from hydra import compose
from omegaconf import DictConfig, OmegaConf

from mlplab.cli.command_line import override_key, quoted
from mlplab.earlier_versions import upgraded_override
from mlplab.files import write_text_atomically
from mlplab.run.checkpoints import read_checkpoint
from mlplab.run.config import RESUMABLE_KEYS, ConfigError
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


def resumed_config(cfg: DictConfig, given: list[str]) -> tuple[DictConfig, list[str]]:
    """The config of the run ``resume=`` names, composed from its own overrides and the changes allowed now."""
    run_dir, checkpoint = find_checkpoint(cfg.resume, "last")
    original = [upgraded_override(str(o)) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
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
    return compose(config_name="train", overrides=[*overrides, f"resume={quoted(checkpoint)}"]), overrides
