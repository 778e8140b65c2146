"""A run's settings, typed: each config group is the dataclass its builder takes, checked once, before any work.

The schema of each group lives with the code that uses it (``model``: the family's Backbone dataclass,
``data``: DataSettings, ``optimizer`` and ``scheduler``: mlplab.model.optim, ``trainer``: TrainerSettings,
``checkpoint``: CheckpointSettings). This module only checks keys and types and builds them. The optimizer and
the schedule are open: a class path (``_target_``) and the keyword arguments that class takes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mlplab.data.settings import DATA_DIR, DataSettings
from mlplab.errors import MlplabError, SettingError
from mlplab.run.settings import CheckpointSettings, TrainerSettings

if typing.TYPE_CHECKING:  # imported where a config is parsed: their modules import torch
    from mlplab.model.backbones import Backbone
    from mlplab.model.optim import OptimizerSettings, ScheduleSettings

# Keys that steer the command (name or list a sweep, resume a run, a search's trial and objective), not settings of
# a run.
COMMAND_KEYS = ("sweep", "dry_run", "resume", "trial", "hparams_search", "optimized_metric")
# Keys that do not define an experiment: left out of job folder names, the HParams table and a search's best
# command. Besides the command's own keys, where things are and how a run reports and checkpoints.
NON_EXPERIMENT_KEYS = (
    *COMMAND_KEYS,
    "debug",
    "paths.data_dir",
    "data.system_dir",
    "data.download",
    "checkpoint.every_n_steps",
    "callbacks.progress_bar",
)
# What a resumed run may change: how long it trains, and keys that do not define the experiment.
RESUMABLE_KEYS = ("trainer.max_epochs", *(key for key in NON_EXPERIMENT_KEYS if "." in key))


class ConfigError(MlplabError):
    """A config value that is not allowed; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    seed: int
    data_dir: str
    model: Backbone
    data: DataSettings
    optimizer: OptimizerSettings
    scheduler: ScheduleSettings
    trainer: TrainerSettings
    checkpoint: CheckpointSettings
    label_smoothing: float = 0.0  # the training loss's (torch's CrossEntropyLoss); validation and test: plain

    def as_dict(self) -> dict[str, Any]:
        """Every setting as plain values, grouped as in the config (the Trainer's options beside its other keys)."""
        trainer = {key: value for key, value in dataclasses.asdict(self.trainer).items() if key != "options"}
        return {
            "seed": self.seed,
            "label_smoothing": self.label_smoothing,
            "paths": {"data_dir": self.data_dir},
            "model": self.model.as_dict(),
            "data": dataclasses.asdict(self.data),
            "optimizer": self.optimizer.as_dict(),
            "scheduler": self.scheduler.as_dict(),
            "trainer": {**trainer, **self.trainer.options},
            "checkpoint": dataclasses.asdict(self.checkpoint),
        }


SECTIONS = {"data": DataSettings, "trainer": TrainerSettings, "checkpoint": CheckpointSettings}
# Groups that are a class and its keyword arguments: any key the class takes (class_section).
CLASS_SECTIONS = ("optimizer", "scheduler")


def class_section(name: str) -> type:
    """The settings class of a CLASS_SECTIONS group (mlplab.model.optim, imported here: it imports torch)."""
    from mlplab.model.optim import OptimizerSettings, ScheduleSettings

    return {"optimizer": OptimizerSettings, "scheduler": ScheduleSettings}[name]


# Groups of third-party objects (built by the entry point from their _target_), and where things are.
OPEN_GROUPS = ("logger", "callbacks")


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Check a resolved config (plain dict) key by key and return it typed; raises ConfigError."""
    allowed = {"seed", "label_smoothing", "paths", "model", *SECTIONS, *CLASS_SECTIONS, *OPEN_GROUPS, *COMMAND_KEYS}
    for key in raw:
        _require(key in allowed, f"{key}: unknown top-level key; allowed: {', '.join(sorted(allowed))}")
    seed = raw.get("seed")
    _require(_matches(seed, int) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    smoothing = raw.get("label_smoothing", 0.0)
    _require(
        _matches(smoothing, float) and 0 <= smoothing < 1,
        f"label_smoothing must be a number with 0 <= s < 1, got {smoothing!r}",
    )
    paths = raw.get("paths") or {}
    _require(isinstance(paths, dict), f"paths must be a group of keys, got {paths!r}")
    for key in paths:
        _require(key == "data_dir", f"paths.{key}: unknown key; allowed: data_dir")
    data_dir = paths.get("data_dir", DATA_DIR)
    _require(isinstance(data_dir, str), f"paths.data_dir must be a string, got {data_dir!r}")
    # The model first, the optimizer after the other groups: the optimizer's check steps an example optimizer, whose
    # construction imports torch's compiler (about 1.5 s), so a refused model or data value is answered without it.
    model = parse_model(raw.get("model") or {})
    sections = {
        name: parse_section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items() if name != "trainer"
    }
    sections["trainer"] = parse_trainer(raw.get("trainer") or {})
    sections |= {name: parse_class_section(name, class_section(name), raw.get(name) or {}) for name in CLASS_SECTIONS}
    try:
        sections["scheduler"].check_with(sections["optimizer"])
    except ValueError as error:
        raise ConfigError(_within("scheduler", error)) from None
    return RunConfig(seed=seed, data_dir=data_dir, model=model, label_smoothing=float(smoothing), **sections)


def parse_model(values: dict[str, Any]) -> Backbone:
    _require(isinstance(values, dict), f"model must be a group of keys, got {values!r}")
    from mlplab.model.backbones import backbone_class  # the families' modules import torch

    settings = dict(values)
    family = settings.pop("family", "mlp")
    try:
        cls = backbone_class(family)
    except ValueError as error:
        raise ConfigError(SettingError("family", str(error)).within("model")) from None
    return parse_section("model", cls, settings)


def parse_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from one config group, refusing unknown keys and wrong types; its own checks'
    messages get the group's name in front (the key's, for a SettingError about one)."""
    _require(isinstance(values, dict), f"{name} must be a group of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        _require(key in fields, f"{name}.{key}: unknown key; allowed: {', '.join(fields)}")
        _require(_matches(value, hints[key]), f"{name}.{key} must be {_describe(hints[key])}, got {value!r}")
        _require(
            not (isinstance(value, float) and not math.isfinite(value)),
            f"{name}.{key} must be a finite number, got {value}",
        )
    for key, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        _require(key in values or not no_default, f"{name}.{key} is required ({_describe(hints[key])})")
    converted = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    try:
        return cls(**converted)
    except ValueError as error:
        raise ConfigError(_within(name, error, fields)) from None


def parse_trainer(values: dict[str, Any]) -> TrainerSettings:
    """TrainerSettings: its typed fields checked as any group's; other keys are Lightning Trainer arguments."""
    _require(isinstance(values, dict), f"trainer must be a group of keys, got {values!r}")
    typed = {f.name for f in dataclasses.fields(TrainerSettings)} - {"options"}
    options = {key: value for key, value in values.items() if key not in typed}
    settings = parse_section("trainer", TrainerSettings, {key: value for key, value in values.items() if key in typed})
    try:
        return dataclasses.replace(settings, options=options)
    except ValueError as error:
        raise ConfigError(_within("trainer", error)) from None


def parse_class_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """``cls.from_dict`` of one class-and-arguments group; its messages get the group's name in front."""
    _require(isinstance(values, dict), f"{name} must be a group of keys, got {values!r}")
    try:
        return cls.from_dict(values)
    except ValueError as error:
        raise ConfigError(_within(name, error, {*values, "_target_"})) from None


def _within(group: str, error: ValueError, fields: Iterable[str] = ()) -> str:
    """A settings check's message with its group in front: ``group.key ...`` for a SettingError about a key,
    ``group: ...`` otherwise. mlplab's own checks raise SettingError; a plain ValueError comes from a user's own
    model family, and is taken to be about the key its message starts with, if that is one of ``fields``."""
    if isinstance(error, SettingError):
        return error.within(group)
    first = str(error).split(" ")[0].rstrip(":")
    return SettingError(first if first in fields else None, str(error)).within(group)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _matches(value: Any, expected: Any) -> bool:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if expected is type(None):
        return value is None
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return f"a list of {_PLURALS.get(typing.get_args(expected)[0], 'values')}"
    return _NAMES.get(expected, str(expected))


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}
