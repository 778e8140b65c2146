"""From Hydra's composed config to a checked RunConfig, and what Hydra's config needs from mlplab: the config
directory, the resolvers it interpolates, and one-line descriptions of what Hydra or OmegaConf refused."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlplab.compat import hydra_plugins_listed
from mlplab.run.config import CLASS_SECTIONS, NON_EXPERIMENT_KEYS, SECTIONS, ConfigError, RunConfig, parse_run_config
from mlplab.run.records import MONITOR, MONITOR_MODE, find_checkpoint
from mlplab.run.settings import check_trainer_option, require_accelerator

# The configs: conf/ in a checkout, installed as the package mlplab.conf (a wheel carries them); users add their own
# with --config-dir.
CONFIG_DIR = str(importlib.resources.files("mlplab.conf"))
hydra_plugins_listed()  # an editable install's plugins, which Hydra's scan would miss (mlplab.compat)


# The sweep's own keys (space-separated), which its job folders name first: set by mlplab's sweeper, as an
# environment setting of every job so that each job's config, composed in whichever process, has them.
SWEPT_KEYS_SETTING = "hydra.job.env_set.MLPLAB_SWEPT_KEYS"
MAX_DIRNAME = 150  # file names end at 255 bytes; a hash keeps longer ones apart


def job_dirname(overrides: str, sweep_dir: str = "", swept: str = "") -> str:
    """A sweep job's folder name from its overrides (Hydra's override_dirname: sorted, joined by ","): one path
    component (no "/"), at most 150 characters. The ``swept`` keys come first (sorted: the same name from any
    command that sweeps them), so that ``ls`` tells the jobs apart (``seed=11,callbacks=default,...``). A folder
    of ``sweep_dir`` that holds the job already keeps its name, whatever the order of its items: a sweep run
    again, or extended by another command, finds its jobs."""
    name = overrides.replace("/", "_") or "defaults"
    items = _name_items(name)
    leading = [item for key in sorted(swept.split()) for item in items if _item_key(item) == key]
    ordered = ",".join(leading + [item for item in items if item not in leading])
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
        name, ordered = f"{name[:140]}~{digest}", f"{ordered[:140]}~{digest}"
    if not sweep_dir:
        return ordered
    for candidate in (ordered, name):  # name: as mlplab named job folders before it ordered their keys
        if (Path(sweep_dir) / candidate).is_dir():
            return candidate
    return _folders_by_job(Path(sweep_dir)).get(_job_of(name), ordered)


def _name_items(name: str) -> list[str]:
    """A folder name's overrides (``a=1,b=[2,3]`` -> ``a=1``, ``b=[2,3]``): split at commas outside brackets and
    quotes."""
    items, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(name):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(name[start:index])
            start = index + 1
    return [*items, name[start:]]


def _item_key(item: str) -> str:
    return item.lstrip("+~").partition("=")[0]


@functools.cache
def _job_of(name: str) -> tuple[str, ...]:
    """What a folder name says of its job, whatever its order: its items, or a long name's hash."""
    long = len(name) == MAX_DIRNAME - 1 and re.fullmatch(r".*~[0-9a-f]{8}", name)
    return (name[-8:],) if long else tuple(sorted(_name_items(name)))


def _folders_by_job(sweep_dir: Path) -> dict[tuple[str, ...], str]:
    """The sweep folder's job folders, by what their names say of their jobs."""
    try:
        names = [entry.name for entry in os.scandir(sweep_dir) if entry.is_dir() and not entry.name.startswith(".")]
    except FileNotFoundError:  # a sweep's first command: no folder yet
        return {}
    return {_job_of(name): name for name in names}


def sweep_name(name: str | None) -> str:
    """The sweep's folder name: as given (``sweep=<name>``, checked), else its start time and process id."""
    return checked_sweep_name(name) if name else f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def checked_sweep_name(name: object) -> str:
    """``sweep=<name>`` as a folder name under outputs/sweeps/; ConfigError otherwise. A path would escape:
    ``sweep=../../etc`` wrote the sweep outside outputs/, ``sweep=/tmp/x`` under outputs/sweeps/tmp/x."""
    if not re.fullmatch(r"[\w.-]+", str(name)) or not str(name).strip("."):
        raise ConfigError(
            f"sweep={name}: not a sweep name; a sweep's folder is outputs/sweeps/<name>, and a name is letters, "
            "digits, '.', '_' and '-' (no '/', not '..')"
        )
    return str(name)


def run_dir(resume: str | None, new_run_dir: str) -> str:
    """The run's directory: the resumed run's own (``resume=<run dir or checkpoint>``), else a new one."""
    return str(find_checkpoint(resume, "last")[0]) if resume else new_run_dir


# Same-second runs get distinct directories: the timestamp alone is not unique.
OmegaConf.register_new_resolver("mlplab.pid", lambda: os.getpid(), replace=True)
# Cached in the sweep's config, so that every job, in whichever process, resolves the same folder.
OmegaConf.register_new_resolver("mlplab.sweep_name", sweep_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("mlplab.job_dirname", job_dirname, replace=True)
OmegaConf.register_new_resolver("mlplab.run_dir", run_dir, replace=True)
# A resumed run keeps the .hydra record of how it was started (its overrides are what resume= repeats).
OmegaConf.register_new_resolver("mlplab.unless_resumed", lambda resume, value: None if resume else value, replace=True)
OmegaConf.register_new_resolver("mlplab.non_experiment_keys", lambda: list(NON_EXPERIMENT_KEYS), replace=True)
OmegaConf.register_new_resolver("mlplab.monitor", lambda: MONITOR, replace=True)
# A search's objective: lightning-hydra-template's optimized_metric names the best epoch's value "<metric>_best";
# metrics.json holds every metric at the best epoch under its own name.
OmegaConf.register_new_resolver(
    "mlplab.objective", lambda name: MONITOR if name is None else str(name).removesuffix("_best"), replace=True
)
OmegaConf.register_new_resolver("mlplab.monitor_mode", lambda: MONITOR_MODE, replace=True)


def validated(cfg: DictConfig) -> RunConfig:
    """The run's settings of a composed config, checked; raises ConfigError (resolving included)."""
    # A sweeper's composed job config holds Hydra's own settings too, which resolve only in a running job.
    run_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg
    try:
        raw = OmegaConf.to_container(run_cfg, resolve=True)
    except OmegaConfBaseException as error:  # an interpolation that does not resolve: ${oops}, ${oc.env:UNSET}
        raise ConfigError(describe_config_error(error)) from None
    return parse_run_config(raw)


def checked_job_config(
    compose: Callable[[list[str]], DictConfig], overrides: list[str], here: bool = True
) -> DictConfig:
    """``compose(overrides)``, checked as the job will check it; raises ConfigError (one line) if it would fail.
    ``here``: the job runs on this machine, whose devices are checked too (not for a SLURM job: its node's are)."""
    try:
        config = compose(overrides)
    except (CompactHydraException, OmegaConfBaseException) as error:
        raise ConfigError(describe_config_error(error)) from None
    run_config = validated(config)
    if here:
        require_accelerator(run_config.trainer.accelerator, "trainer.accelerator", "use trainer=cpu or trainer=auto")
    return config


def describe_config_error(error: Exception) -> str:
    """One line for what Hydra or OmegaConf refused while composing or resolving: the key, then what is wrong."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; allowed: {', '.join(sorted(error.options))}"
    if isinstance(error, OverrideParseException):
        reason = " ".join(str(error).split("See https://")[0].split())
        return (
            f"cannot read {error.override!r} ({reason}); write key=value, and quote a value with spaces, commas or "
            "brackets for Hydra inside the shell's quotes: \"key='a, b'\""
        )
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if not (isinstance(cause, OmegaConfBaseException) and cause.full_key):
        return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    key, reason = cause.full_key, str(cause.msg).splitlines()[0]
    if "is not in struct" not in reason:
        return f"{key}: {reason}"
    section, _, name = key.partition(".")
    fields = _fields_of(section) if "." not in name else []
    having = sorted(p.stem for p in (Path(CONFIG_DIR) / section).glob("*.yaml") if name in (OmegaConf.load(p) or {}))
    if section in CLASS_SECTIONS:  # any keyword argument of the chosen class, checked against it once composed
        options = f"{section} options that have it: {', '.join(having)}; or " if having else ""
        return f"{key}: not a setting of the chosen {section}; {options}add it as +{key}=... if its class takes it"
    if section == "trainer" and "." not in name:  # any Lightning Trainer argument, added with +
        try:
            check_trainer_option(name)
        except ValueError as refused:
            return f"trainer.{refused}"
        return f"{key}: not in the trainer config; add it as +{key}=..."
    if name in fields:  # e.g. model.width with a family that has no width
        return f"{key}: not a setting of the chosen {section}; {section} options that have it: {', '.join(having)}"
    if fields:
        return f"{key}: unknown key; allowed: {', '.join(fields)}"
    return f"{key}: unknown key; mlplab-train --cfg job lists the keys (+{key}=... adds one where that makes sense)"


def _fields_of(section: str) -> list[str]:
    if section in SECTIONS:
        return [f.name for f in dataclasses.fields(SECTIONS[section])]
    if section == "model":
        from mlplab.model.backbones import backbone_class  # the families' modules import torch

        # The default family's first: its settings are the ones most users mean.
        families = sorted(
            {OmegaConf.load(p).get("family", "mlp") for p in Path(CONFIG_DIR, "model").glob("*.yaml")},
            key=lambda family: (family != "mlp", family),
        )
        return list(
            dict.fromkeys(
                ["family", *(f.name for family in families for f in dataclasses.fields(backbone_class(family)))]
            )
        )
    return []
