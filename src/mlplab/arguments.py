"""What mlplab-train does with its command line before Hydra sees it: a resume or a search preset becomes the
overrides that mean it, and mistakes Hydra would report as a traceback (or late) become one line first."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mlplab.checkpoints import read_checkpoint
from mlplab.config import ConfigError
from mlplab.runs import find_checkpoint


def search_arguments(args: list[str]) -> list[str]:
    """``hparams_search=<preset>`` runs on the Optuna sweeper. Said here because the root config's own choice of
    sweeper would win over one made in a preset's defaults list; a choice on the command line wins over both."""
    if any(arg.startswith("hparams_search=") for arg in args) and not any(arg.startswith("hydra/sweeper=") for arg in args):
        return [*args, "hydra/sweeper=optuna"]
    return args


# What a resumed run may change: how long it trains and where things are, never what is trained.
RESUMABLE_KEYS = ("trainer.max_epochs", "checkpoint.every_n_steps", "callbacks.progress_bar", "paths.data_dir",
                  "data.system_dir", "data.download")


def resume_arguments(args: list[str]) -> list[str]:
    """``resume=<run dir or checkpoint> [allowed changes]`` -> the run's own overrides, its directory and checkpoint."""
    resumes = [arg for arg in args if arg.startswith("resume=")]
    if not resumes:
        return args
    if any(arg in ("-m", "--multirun") for arg in args):
        raise ConfigError("resume= continues one run; to resume a sweep, run the same -m command again")
    run_dir, checkpoint = find_checkpoint(resumes[-1].split("=", 1)[1], "last")
    read_checkpoint(checkpoint)  # refuses a damaged or unsafe file before anything else happens
    changes = [arg for arg in args if not arg.startswith("resume=")]
    for change in changes:
        if change.lstrip("+~").split("=", 1)[0] not in RESUMABLE_KEYS:
            raise ConfigError(f"resume: {change} would change the experiment; a resumed run may only change "
                              f"{', '.join(RESUMABLE_KEYS)}")
    changed = {change.lstrip("+~").split("=", 1)[0] for change in changes}
    original = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    kept = [o for o in original if o.lstrip("+~").split("=", 1)[0] not in {*changed, "resume"}]
    return [*kept, *changes, f"hydra.run.dir={quoted(run_dir)}", f"resume={quoted(checkpoint)}"]


def quoted(path: Path) -> str:
    """A path as one Hydra value, whatever it holds (sweep job folders have '=' and ',' in their names)."""
    escaped = str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


MODES = {"-m": "--multirun", "--multirun": "--multirun", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info",
         "--info": "--info", "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def conflicting_modes(args: list[str]) -> str | None:
    """Two of Hydra's modes at once (``-m ... --cfg job``), which Hydra refuses with a traceback."""
    modes = sorted({MODES[arg] for arg in args if arg in MODES})
    if len(modes) > 1:
        return f"{' and '.join(modes)} cannot be combined; give one of them"
    return None


def unwritable_output(args: list[str]) -> str | None:
    """Where run directories would go, if nothing can be written there (Hydra would fail with a traceback)."""
    if any(arg in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c") for arg in args):
        return None  # prints, writes nothing
    target = Path("outputs")
    for arg in args:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if arg.startswith(key):
                target = Path(arg.removeprefix(key).strip("'\""))
    existing = target.absolute()
    while not existing.exists():
        existing = existing.parent
    try:  # a real write, not os.access: root passes access checks on read-only file systems' directories too
        Path(tempfile.mkdtemp(prefix=".mlplab-write-probe-", dir=existing)).rmdir()
    except OSError as error:
        return (f"cannot write run directories under {existing} ({error.strerror}); run from a writable directory "
                "or set hydra.run.dir=<a writable path> (hydra.sweep.dir=... for -m)")
    return None


# Hydra's flags that take the next argument as their value (--cfg job, -p model, --config-name train).
FLAGS_WITH_VALUE = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                    "--config-dir", "--experimental-rerun")


def overrides_in(args: list[str]) -> list[str]:
    """The overrides among ``args``: neither flags nor a flag's value."""
    overrides, after_flag = [], False
    for arg in args:
        if not arg.startswith("-") and not after_flag:
            overrides.append(arg)
        after_flag = arg in FLAGS_WITH_VALUE
    return overrides


def unreadable_override(args: list[str]) -> str | None:
    """The first argument Hydra's override grammar cannot read, with its reason and the usual remedy."""
    parser = OverridesParser.create()
    for arg in overrides_in(args):
        try:
            parser.parse_overrides([arg])
        except HydraException as error:
            reason = " ".join(str(error).split("See https://")[0].split())
            return f"cannot read {arg!r} ({reason}); write key=value, quoting values with spaces, commas or brackets: key='a, b'"
    return None


def unknown_group_option(args: list[str], config_dir: Path) -> str | None:
    """The first ``group=option`` in ``args`` whose option has no YAML file, described with the options allowed."""
    try:
        overrides = OverridesParser.create().parse_overrides(overrides_in(args))
    except HydraException:
        return None  # Hydra reports syntax errors itself
    for override in overrides:
        group_dir = config_dir / override.key_or_group
        if override.is_delete() or override.key_or_group == "hydra" or not group_dir.is_dir():
            continue
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        except HydraException:
            continue  # glob() and friends are expanded by Hydra later
        allowed = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for value in values:
            if value not in allowed and override.key_or_group.startswith("hydra/"):
                allowed = sorted({*allowed, *plugin_options(override.key_or_group)})
            if value not in allowed:
                return f"{override.key_or_group}={value}: no such option; allowed: {', '.join(allowed)}"
    return None


def plugin_options(group: str) -> list[str]:
    """Options Hydra's plugins add to a ``hydra/`` group (launchers: joblib, submitit_local, submitit_slurm)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # registers the plugins' configs; Hydra reuses this scan when it starts
    return [name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)]
